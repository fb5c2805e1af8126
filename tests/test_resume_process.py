"""Resume after kill: ``resumer pull`` SIGKILLed at seeded random points, then resumed.

A real process pulls a 5-layer image (gzip, zstd, plain tar; about 22 MiB) from the real
CNCF registry through a rate-limited FaultProxy, so every kill lands mid-transfer. The test
drives each process by its ``--progress json`` lines (no sleeps) and kills it when the
bytes it has reported pass a seeded target. The next run is ``resumer pull`` again (it
joins the stored pull) or ``resumer resume``; a last ``resumer resume`` completes it.

What the kills may cost, and what we assert (see ``per_kill_bound``): after a SIGKILL the
next run keeps exactly the recorded chunks of each partial (the page cache keeps the data),
so a kill loses, per running transfer, the chunk being filled, the batches handed to the
writer thread whose records had not reached SQLite (at most two in flight), and the
network reads in flight (aiohttp reads 256 KiB at a time; we allow four). With
max-concurrent-downloads 3 and 256 KiB chunks: 3 × (3 × 256 KiB + 4 × 256 KiB) = 5.25 MiB
per kill. Each run also fetches the manifest and config and sends response headers:
at most 64 KiB per run.

The helpers here are shared with test_status.py and test_two_processes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import PushedImage, PushImage
from servers import skopeo_inspect

from resumer.lab.images import BuiltImage, LayerSpec, build_image
from resumer.lab.proxy import EventKind, FaultProxy, Faults
from resumer.layout import IMAGE_NAME, REF_NAME
from resumer.register import chain_ids

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 256 * KiB
MAX_CONCURRENT = 3
#: one network read of aiohttp (Engine's read_bufsize), and how many may be in flight
NET_READ = 256 * KiB
NET_READS = 4
#: the writer thread's batches whose records may still be on their way to SQLite
INFLIGHT_BATCHES = 2
#: manifest, config and response headers of one run
METADATA_PER_RUN = 64 * KiB
RATE = 10 * MiB  # bytes/s through the proxy, shared by all connections


def per_kill_bound(chunk: int = CHUNK) -> int:
    """Bytes one SIGKILL may cost: per running transfer, the chunk being filled, the
    unrecorded batches in flight, and the network reads in flight."""
    return MAX_CONCURRENT * ((1 + INFLIGHT_BATCHES) * chunk + NET_READS * NET_READ)


# ---------------------------------------------------------------------- shared helpers


def resumer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "resumer", *args]


def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a CLI child: no credentials or root of the machine leak in."""
    env = dict(os.environ)
    docker_config = tmp_path / "no-docker-config"
    docker_config.mkdir(exist_ok=True)
    env["DOCKER_CONFIG"] = str(docker_config)
    env.pop("RESUMER_ROOT", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def build_big_image(work: Path, seed: int) -> BuiltImage:
    """Five layers, about 22 MiB on the wire: gzip, zstd, plain tar, a compressible one."""
    specs = (
        LayerSpec(size=6 * MiB, compression="gzip", compressible=False),
        LayerSpec(size=5 * MiB, compression="zstd", compressible=False),
        LayerSpec(size=4 * MiB, compression="none", compressible=False),
        LayerSpec(size=12 * MiB, compression="gzip", compressible=True),
        LayerSpec(size=4 * MiB, compression="gzip", compressible=False),
    )
    return build_image(work, specs, seed=seed)


@dataclass
class Proc:
    """One CLI run: its parsed JSON lines, its stderr and how it ended."""

    lines: list[dict[str, Any]] = field(default_factory=list)
    returncode: int | None = None
    stderr: str = ""
    killed: bool = False

    def statuses(self, layer_id: str) -> list[str]:
        return [str(m.get("status")) for m in self.lines if m.get("id") == layer_id]

    def resumed_from(self) -> dict[str, int]:
        """Layer id → the offset the run announced it resumes from (its first)."""
        out: dict[str, int] = {}
        for m in self.lines:
            st = str(m.get("status", ""))
            if st.startswith("Resuming from ") and m["id"] not in out:
                out[m["id"]] = int(st.rsplit(" ", 1)[1])
        return out

    @property
    def stats(self) -> dict[str, int]:
        [s] = [m["stats"] for m in self.lines if "stats" in m]
        return dict(s)


class Progress:
    """Per-layer bytes a run has reported (absolute offsets): what we kill on."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes  # layer id → blob size
        self.current: dict[str, int] = {}
        self.running: set[str] = set()  # started and not finished downloading in this run

    def feed(self, msg: dict[str, Any]) -> None:
        lid, st = msg.get("id"), str(msg.get("status", ""))
        if lid not in self.sizes:
            return
        if st == "Downloading":
            self.current[lid] = max(self.current.get(lid, 0), msg["progressDetail"]["current"])
            self.running.add(lid)
        elif st.startswith("Resuming from "):
            self.current[lid] = max(self.current.get(lid, 0), int(st.rsplit(" ", 1)[1]))
            self.running.add(lid)
        elif st in ("Verifying Checksum", "Download complete", "Already exists"):
            self.current[lid] = self.sizes[lid]
            self.running.discard(lid)

    @property
    def total(self) -> int:
        return sum(self.current.values())


async def run_cli(
    args: list[str],
    env: dict[str, str],
    *,
    kill_when: Callable[[dict[str, Any]], bool] | None = None,
    sig: int = signal.SIGKILL,
    on_line: Callable[[dict[str, Any]], None] | None = None,
    timeout: float = 60.0,
) -> Proc:
    """Run ``resumer ARGS`` reading its JSON lines; send ``sig`` once ``kill_when`` says so."""
    proc = await asyncio.create_subprocess_exec(
        *resumer_cmd(*args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out = Proc()
    errors = asyncio.create_task(proc.stderr.read())
    try:
        async with asyncio.timeout(timeout):
            async for raw in proc.stdout:
                text = raw.decode().strip()
                if not text:
                    continue
                msg = json.loads(text) if text.startswith("{") else {"text": text}
                out.lines.append(msg)
                if on_line is not None:
                    on_line(msg)
                if kill_when is not None and not out.killed and kill_when(msg):
                    proc.send_signal(sig)
                    out.killed = True
                    if sig == signal.SIGKILL:
                        break
            out.returncode = await proc.wait()
            out.stderr = (await errors).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        errors.cancel()
    return out


@contextlib.asynccontextmanager
async def proxied(pushed: PushedImage, rate: float | None = RATE) -> AsyncIterator[FaultProxy]:
    """A FaultProxy in front of the registry (in this test's event loop)."""
    async with FaultProxy("127.0.0.1", pushed.registry.port, Faults(rate=rate)) as proxy:
        yield proxy


def reference_via(proxy: FaultProxy, pushed: PushedImage) -> str:
    return f"127.0.0.1:{proxy.port}/{pushed.repo}:{pushed.tag}"


def layer_id(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def kept_after_kill(root: Path, digest: str, size: int) -> int:
    """What the next run keeps of ``digest`` after a SIGKILL: the whole blob once committed,
    else its recorded chunks from 0 (the data is in the page cache; reopen verifies them)."""
    if (root / "blobs" / "sha256" / digest[7:]).exists():
        return size
    with contextlib.closing(sqlite3.connect(f"file:{root / 'state.db'}?mode=ro", uri=True)) as c:
        row = c.execute("SELECT chunk_size FROM transfers WHERE key = ?", (digest,)).fetchone()
        if row is None:
            return 0
        chunks = c.execute(
            "SELECT idx, length FROM chunks WHERE key = ? ORDER BY idx", (digest,)
        ).fetchall()
    recorded = 0
    for i, (idx, length) in enumerate(chunks):
        if idx != i:
            break
        recorded += int(row[0]) if length is None else int(length)
        if length is not None:
            break  # a short chunk is the last one
    return min(recorded, size, partial_on_disk(root, digest))


def partial_on_disk(root: Path, digest: str) -> int:
    path = root / "ingest" / digest.replace(":", "-")
    return path.stat().st_size if path.exists() else 0


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def assert_image_complete(root: Path, image: BuiltImage, reference: str, tag: str) -> None:
    """index.json names it, skopeo reads it, every blob verifies, every layer is registered
    with the diffID of the config and the right chain."""
    index = json.loads((root / "index.json").read_text())
    [entry] = [m for m in index["manifests"] if m["annotations"][REF_NAME] == tag]
    assert entry["digest"] == image.manifest_digest
    assert entry["annotations"][IMAGE_NAME] == reference
    inspected = skopeo_inspect(f"oci:{root}:{tag}")
    assert inspected["Layers"] == [x.digest for x in image.layers]
    for blob in (root / "blobs" / "sha256").iterdir():
        assert sha256_file(blob) == blob.name, f"{blob} does not hash to its name"
    for x in image.layers:
        assert (root / "blobs" / "sha256" / x.digest[7:]).stat().st_size == x.size
    config = json.loads(image.config)
    diff_ids = config["rootfs"]["diff_ids"]
    assert diff_ids == [x.diff_id for x in image.layers]
    chains = chain_ids(diff_ids)
    with contextlib.closing(sqlite3.connect(f"file:{root / 'state.db'}?mode=ro", uri=True)) as c:
        rows = {
            r[0]: (r[1], r[2], r[3])
            for r in c.execute("SELECT chain_id, diff_id, parent_chain_id, blob_digest FROM layers")
        }
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for i, x in enumerate(image.layers):
        parent = chains[i - 1] if i else None
        assert rows[chains[i]] == (x.diff_id, parent, x.digest), f"layer {i}"


def integrity_ok(root: Path) -> bool:
    with contextlib.closing(sqlite3.connect(f"file:{root / 'state.db'}?mode=ro", uri=True)) as c:
        return bool(c.execute("PRAGMA integrity_check").fetchone()[0] == "ok")


@pytest.fixture
def big_image(
    pushed_image: PushImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PushedImage]:
    image = build_big_image(tmp_path_factory.mktemp("big"), seed=5)
    yield pushed_image(repo="lab/big", tag="v1", image=image)


# ---------------------------------------------------------------------- the test

KILLS = 4


@pytest.mark.parametrize("seed", [20240607, 7])
async def test_pull_killed_at_random_points_then_resumed_completes_within_the_loss_bound(
    big_image: PushedImage, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    image = big_image.image
    layers = image.layers
    sizes = {layer_id(x.digest): x.size for x in layers}
    total = sum(sizes.values())
    assert len(sizes) == len(layers) >= 4 and 18 * MiB <= total <= 30 * MiB
    root, env = tmp_path / "root", cli_env(tmp_path)

    async with proxied(big_image) as proxy:
        ref = reference_via(proxy, big_image)
        common = ["--root", str(root), "--progress", "json", "--chunk-size", str(CHUNK)]
        common += ["--max-concurrent-downloads", str(MAX_CONCURRENT)]
        pull_args = ["pull", ref, *common]
        resume_args = ["resume", "--root", str(root), "--progress", "json"]
        # A transfer keeps the chunk size of the run that created it: make it one.
        resume_args += ["--chunk-size", str(CHUNK)]
        # Which command continues after each kill: both kinds, in a seeded order.
        nexts = [pull_args, resume_args] + [
            rng.choice([pull_args, resume_args]) for _ in range(KILLS - 2)
        ]
        rng.shuffle(nexts)
        commands = [pull_args, *nexts[: KILLS - 1]]

        kept = dict.fromkeys(sizes, 0)  # what each layer keeps before the run
        kept_before: list[dict[str, int]] = []
        runs: list[Proc] = []
        losses: list[int] = []
        committed_before: list[set[str]] = []
        for k, args in enumerate(commands):
            progress = Progress(sizes)
            before = sum(kept.values())
            # Kill once this run has moved a seeded share of what is left.
            target = before + int(rng.uniform(0.2, 0.5) * (total - before))
            # Sometimes on the next registration step after the target instead (a kill
            # while a committed layer is inflated and recorded), if one comes soon enough.
            at = rng.choice(["bytes", "bytes", "registration"])
            later = target + int(0.15 * (total - before)) if at == "registration" else target

            def kill_when(
                msg: dict[str, Any], p: Progress = progress, t: int = target, t2: int = later
            ) -> bool:
                p.feed(msg)
                if p.total < t or p.total >= total:
                    return False
                if msg.get("status") in ("Extracting", "Pull complete"):
                    return True
                return p.total >= t2 and bool(p.running)

            wire_before = proxy.counters.bytes_down
            kept_before.append(dict(kept))
            committed_before.append({lid for lid in sizes if kept[lid] == sizes[lid]})
            run = await run_cli(args, env, kill_when=kill_when)
            runs.append(run)
            assert run.killed, f"run {k} ({args[0]}) ended before its kill point: {run.stderr}"
            assert run.returncode == -signal.SIGKILL
            # The proxy notices the dead client: let it finish counting what it delivered.
            await settle(proxy)
            wire = proxy.counters.bytes_down - wire_before
            after = {
                lid: kept_after_kill(root, x.digest, x.size)
                for lid, x in ((layer_id(x.digest), x) for x in layers)
            }
            for lid in sizes:
                assert after[lid] >= kept[lid], "a kill lost bytes kept before the run"
            progress_made = sum(after.values()) - before
            losses.append(wire - progress_made)
            assert losses[-1] <= per_kill_bound() + METADATA_PER_RUN, (k, losses)
            assert sum(after.values()) < total, "the image finished before the kill"
            kept = after

        kept_before.append(dict(kept))

        wire_before = proxy.counters.bytes_down
        final = await run_cli(resume_args, env)
        await settle(proxy)
        final_wire = proxy.counters.bytes_down - wire_before
        assert final.returncode == 0, final.stderr
        assert final.lines[-1].keys() == {"stats"}
        assert any(
            str(m.get("status", "")).startswith("Status: Downloaded newer image")
            for m in final.lines
        )
        # The last run moved only what was left, plus its metadata.
        assert final_wire <= total - sum(kept.values()) + METADATA_PER_RUN
        # Each run resumed each partial exactly where the previous kill left it.
        resumed = 0
        for k, run in enumerate([*runs, final]):
            for lid, offset in run.resumed_from().items():
                assert offset == kept_before[k][lid], (k, lid, offset, kept_before[k][lid])
                resumed += 1
        assert resumed >= KILLS  # partials were really resumed, not restarted

        # Committed layers are never downloaded again.
        for k, run in enumerate([*runs, final]):
            done = (
                committed_before[k]
                if k < len(runs)
                else {lid for lid in sizes if kept[lid] == sizes[lid]}
            )
            for lid in done:
                assert "Downloading" not in run.statuses(lid), (k, lid)

        assert_image_complete(root, image, ref, big_image.tag)

        served = proxy.counters.bytes_down
        bound = total + KILLS * per_kill_bound() + (KILLS + 1) * METADATA_PER_RUN
        report = (
            f"image {total} B in {len(layers)} layers; served {served} B "
            f"({served / total:.3f}x); loss per kill (incl. that run's metadata) "
            f"{losses} B, mean {sum(losses) // len(losses)} B; bound per kill "
            f"{per_kill_bound()} B + {METADATA_PER_RUN} B metadata per run; killed on "
            f"{[r.lines[-1].get('status') for r in runs]}"
        )
        print(report)
        assert served <= bound, report
        assert served >= total  # every byte of the image crossed the proxy once

        # Nothing left to do: resume exits 0 and says so.
        again = await run_cli(resume_args, env)
        assert again.returncode == 0, again.stderr
        assert any(m.get("status") == "Status: nothing to resume" for m in again.lines)
        assert again.stats["wire_bytes"] == 0


async def settle(proxy: FaultProxy) -> None:
    """Wait until the proxy has closed every connection (of a process that has exited),
    so its counters hold everything it delivered."""
    accepted = proxy.counters.connections - proxy.counters.refused
    async with asyncio.timeout(10):
        await proxy.wait_for(EventKind.CLOSE, count=accepted)


# ---------------------------------------------------------------------- SIGTERM / SIGINT


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_interrupted_pull_exits_130_keeps_partials_and_the_next_run_resumes(
    pushed_image: PushImage, tmp_path: Path, sig: int
) -> None:
    specs = [LayerSpec(size=3 * MiB, compression="gzip", compressible=False)] * 3
    image = build_image(tmp_path / "build", specs, seed=61)
    pushed = pushed_image(repo="lab/interrupt", tag="v1", image=image)
    layers = image.layers
    sizes = {layer_id(x.digest): x.size for x in layers}
    total = sum(sizes.values())
    root, env = tmp_path / "root", cli_env(tmp_path)

    async with proxied(pushed, rate=6 * MiB) as proxy:
        ref = reference_via(proxy, pushed)
        args = ["pull", ref, "--root", str(root), "--progress", "json", "--chunk-size", str(CHUNK)]
        progress = Progress(sizes)

        def halfway(msg: dict[str, Any]) -> bool:
            progress.feed(msg)
            return progress.total >= total // 2 and len(progress.running) == len(layers)

        first = await run_cli(args, env, kill_when=halfway, sig=sig)
        await settle(proxy)
        assert first.killed
        assert first.returncode == 130, first.stderr
        assert "interrupted; partial downloads are kept" in first.stderr
        wire_first = proxy.counters.bytes_down

        # Partials kept and checkpointed: each layer's recorded bytes, the transfer
        # marked cancelled and its attempt ended, nothing in the content store.
        kept = {x.digest: kept_after_kill(root, x.digest, x.size) for x in layers}
        assert all(0 < kept[x.digest] < x.size for x in layers), kept
        with contextlib.closing(
            sqlite3.connect(f"file:{root / 'state.db'}?mode=ro", uri=True)
        ) as c:
            states = dict(c.execute("SELECT key, state || ' ' || last_error FROM transfers"))
            open_attempts = c.execute("SELECT count(*) FROM attempts WHERE ended IS NULL")
            assert open_attempts.fetchone()[0] == 0
            [(pull_state,)] = c.execute("SELECT state FROM pulls").fetchall()
        assert {x.digest: states[x.digest] for x in layers} == {
            x.digest: "partial cancelled" for x in layers
        }
        assert pull_state == "failed"
        for x in layers:
            assert not (root / "blobs" / "sha256" / x.digest[7:]).exists()
        # A graceful stop records everything it accepted: the loss is what was still
        # in the socket buffers.
        lost = wire_first - sum(kept.values())
        assert lost <= MAX_CONCURRENT * NET_READS * NET_READ + METADATA_PER_RUN, lost

        second = await run_cli(args, env)
        await settle(proxy)
        assert second.returncode == 0, second.stderr
        resumed = second.resumed_from()
        assert resumed == {layer_id(x.digest): kept[x.digest] for x in layers}
        wire_second = proxy.counters.bytes_down - wire_first
        assert wire_second <= total - sum(kept.values()) + METADATA_PER_RUN
        assert second.stats["resumes"] == len(layers)
        assert_image_complete(root, image, ref, "v1")
        print(f"{signal.Signals(sig).name}: lost {lost} B (incl. metadata) on the interrupt")
