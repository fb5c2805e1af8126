"""``resumer pull``, ``resume`` and ``status`` while ``resumer serve`` holds the root: real
processes, the real CNCF registry (behind the fault proxy where a test cuts or counts).

- Served by the daemon (its log says so; the client never waits for the lock) with the
  same stdout, stderr and exit code as without it: a pull (plain, json, -q), a failing
  pull (an unknown image; the attempt budget spent against a dead upstream), status and
  resume.
- SIGKILL of the daemon mid-pull, then ``resumer resume`` without it: the image completes
  with about 1.0× the image on the wire overall.
- SIGTERM mid-pull: the daemon exits 0 promptly, the partial has its checkpoint, the
  socket file is gone, and the next start resumes the pull.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import PushImage
from test_resume_process import (
    METADATA_PER_RUN,
    assert_image_complete,
    cli_env,
    kept_after_kill,
    layer_id,
    per_kill_bound,
    proxied,
    reference_via,
    resumer_cmd,
    settle,
)

from resumer.config import Config
from resumer.lab.images import LayerSpec
from resumer.serve.control import SOCKET_NAME
from resumer.status import collect, render_text

KiB, MiB = 1 << 10, 1 << 20
DEADLINE = 120.0
#: the settings of the daemon and of every client here (the attempt budget and the retry
#: delay are the daemon's own: set alike, no run warns that they differ)
SETTINGS = ("--max-download-attempts", "2", "--retry-delay", "0")


@dataclass
class DaemonLog:
    """The daemon's stderr, line by line, read as it comes."""

    lines: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.lines.append(raw.decode().rstrip("\n"))
            self.changed.set()
        self.changed.set()

    async def wait_for(self, pattern: str, *, count: int = 1) -> str:
        """The ``count``-th line matching ``pattern`` (a regex), once the daemon has said it."""
        rx = re.compile(pattern)
        async with asyncio.timeout(DEADLINE):
            while True:
                hits = [line for line in self.lines if rx.search(line)]
                if len(hits) >= count:
                    return hits[count - 1]
                self.changed.clear()
                await self.changed.wait()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    log: DaemonLog
    root: Path

    async def terminate(self) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE):
            code = await self.proc.wait()
        return code, time.monotonic() - started


@contextlib.asynccontextmanager
async def daemon(root: Path, env: dict[str, str], *flags: str) -> AsyncIterator[Daemon]:
    proc = await asyncio.create_subprocess_exec(
        *resumer_cmd("serve", "--root", str(root), "--listen", "127.0.0.1:0", *flags),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    log = DaemonLog()
    reading = asyncio.create_task(log.read(proc.stderr))
    try:
        async with asyncio.timeout(DEADLINE):
            ready = (await proc.stdout.readline()).decode()
        assert ready.startswith("Serving on http://127.0.0.1:"), (ready, log.text)
        yield Daemon(proc, log, root)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        async with asyncio.timeout(DEADLINE):
            await reading
        assert "Traceback" not in log.text, log.text


@dataclass
class Run:
    code: int
    out: str
    err: str


async def cli(env: dict[str, str], *args: str) -> Run:
    proc = await asyncio.create_subprocess_exec(
        *resumer_cmd(*args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(DEADLINE):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


_LAYER_LINE = re.compile(r"^([0-9a-f]{12}): (.*)$")


def plain_view(out: str) -> tuple[list[str], dict[str, list[str]]]:
    """Plain progress without what timing decides: the pull's lines in order, and each
    layer's lines in order (layers interleave as their bytes come); byte counts of the
    first "Downloading" line, of "Resuming from" and of the stats' byte fields."""
    pull: list[str] = []
    layers: dict[str, list[str]] = {}
    for line in out.splitlines():
        line = re.sub(r"Downloading \S+/", "Downloading ~/", line)
        line = re.sub(r"Resuming from \d+", "Resuming from ~", line)
        m = _LAYER_LINE.match(line)
        if m:
            layers.setdefault(m[1], []).append(m[2])
        else:
            pull.append(re.sub(r"(wire|wasted) \d+ B( \([0-9.]+x\))?", r"\1 ~", line))
    return pull, layers


def json_view(out: str) -> tuple[list[Any], dict[str, list[Any]]]:
    pull: list[Any] = []
    layers: dict[str, list[Any]] = {}
    for line in out.splitlines():
        msg = json.loads(line)
        msg.pop("progressDetail", None)
        if "id" in msg and re.fullmatch(r"[0-9a-f]{12}", msg["id"]):
            layers.setdefault(msg["id"], []).append(msg)
        else:
            pull.append(msg)
    return pull, layers


def dead_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_served(d: Daemon, run: Run, command: str, count: int = 1) -> None:
    assert "waiting for" not in run.err, run.err  # the client never waited for the lock
    assert sum(f"control: {command}" in line for line in d.log.lines) >= count, d.log.text


async def test_pull_through_the_daemon_prints_and_exits_as_without_it(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    layers = (LayerSpec(size=1 * MiB, compressible=False), LayerSpec(size=512 * KiB))
    image = pushed_image(repo="lab/app", tag="v1", layers=layers, seed=11)
    env = cli_env(tmp_path)
    served, alone = tmp_path / "served", tmp_path / "alone"
    nope = f"{image.registry.host}/lab/never-pushed:v1"
    dead = f"127.0.0.1:{dead_port()}/lab/app:v1"

    async with daemon(served, env, *SETTINGS) as d:
        runs = {}
        for name, args in (
            ("plain", ("pull", image.reference, "--progress", "plain")),
            ("json", ("pull", image.reference, "--progress", "json")),
            ("quiet", ("pull", "-q", image.reference)),
            ("unknown", ("pull", nope, "--progress", "plain")),
            ("dead", ("pull", dead, "--progress", "json")),
            ("resume", ("resume", "--progress", "plain")),
            ("status", ("status",)),
        ):
            extra = SETTINGS if args[0] != "status" else ()
            got = await cli(env, *args, "--root", str(served), *extra)
            assert_served(d, got, args[0])
            runs[name] = got
        await d.log.wait_for(rf"control: pull {re.escape(image.reference)}: done")
        # A setting of the daemon's that the client sets otherwise: said, not silently lost.
        other = await cli(
            env,
            "pull",
            "-q",
            image.reference,
            "--root",
            str(served),
            "--max-download-attempts",
            "3",
        )
        assert other.code == 0 and other.out == image.reference + "\n"
        assert other.err == (
            f"resumer: max-download-attempts 3: the daemon serving {served} runs every pull"
            " with its own (2); stop `resumer serve` to pull with yours\n"
        )
        assert (await d.terminate())[0] == 0

    for name, args in (
        ("plain", ("pull", image.reference, "--progress", "plain")),
        ("json", ("pull", image.reference, "--progress", "json")),
        ("quiet", ("pull", "-q", image.reference)),
        ("unknown", ("pull", nope, "--progress", "plain")),
        ("dead", ("pull", dead, "--progress", "json")),
        ("resume", ("resume", "--progress", "plain")),
    ):
        without = await cli(env, *args, "--root", str(alone), *SETTINGS)
        got = runs[name]
        assert (got.code, got.err) == (without.code, without.err), name
        if name in ("json", "dead"):
            assert json_view(got.out) == json_view(without.out), name
        else:
            assert plain_view(got.out) == plain_view(without.out), name

    plain, quiet = runs["plain"], runs["quiet"]
    assert plain.code == 0 and plain.out.splitlines()[-2] == image.reference
    assert f"Status: Downloaded newer image for {image.reference}" in plain.out
    assert quiet.out == image.reference + "\n"
    # The second pull found the image there: "up to date", in JSON too.
    assert {"status": f"Status: Image is up to date for {image.reference}"} in json_view(
        runs["json"].out
    )[0]
    # The failing pulls: exit 1, the error on stderr (and as JSON on stdout with json).
    assert runs["unknown"].code == 1 and "never-pushed" in runs["unknown"].err
    assert runs["dead"].code == 1 and runs["dead"].err.startswith("resumer: ")
    assert '"error"' in runs["dead"].out
    assert runs["resume"].out.startswith("Status: nothing to resume\n")
    status = runs["status"]
    assert status.code == 0 and status.out.startswith(f"root: {served}\nin use by pid ")


async def test_status_and_resume_through_the_daemon_match_the_root_read_without_it(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    layers = (
        LayerSpec(size=2 * MiB, compressible=False),
        LayerSpec(size=2 * MiB, compression="zstd", compressible=False),
    )
    image = pushed_image(repo="lab/twice", tag="v1", layers=layers, seed=12)
    env = cli_env(tmp_path)
    served, alone = tmp_path / "served", tmp_path / "alone"
    async with proxied(image, rate=None) as proxy:
        ref = reference_via(proxy, image)
        # The same unfinished pull in both roots: one run that stops at a wire budget,
        # one layer at a time, so both keep the same bytes of the same layer.
        for root in (served, alone):
            first = await cli(
                env,
                "pull",
                ref,
                "--root",
                str(root),
                "--max-wire-bytes",
                "512K",
                "--max-concurrent-downloads",
                "1",
                "--chunk-size",
                "65536",
            )
            assert first.code == 1, first.err
        proxy.begin_outage()  # the daemon's own first run of it fails: it backs off
        async with daemon(served, env, *SETTINGS) as d:
            await d.log.wait_for(r"supervisor: pull \d+: next run at .* \(in 30 s")
            # status: what the CLI prints through the daemon is what it prints from the
            # root itself while the daemon holds it (the same pid in use).
            report = await collect(served, Config())
            text = await cli(env, "status", "--root", str(served))
            as_json = await cli(env, "status", "--json", "--root", str(served))
            assert_served(d, text, "status", count=2)
            assert text.code == as_json.code == 0
            assert text.out == render_text(report)
            assert json.loads(as_json.out) == report
            assert "failed (a new run retries it)" in text.out
            assert report["in_use_by"] == d.proc.pid

            proxy.end_outage()
            resumed = await cli(
                env, "resume", "--root", str(served), "--progress", "plain", *SETTINGS
            )
            assert_served(d, resumed, "resume")
            again = await cli(
                env, "resume", "--root", str(served), "--progress", "plain", *SETTINGS
            )
            removed = await cli(env, "rm", ref, "--root", str(served))
            missing = await cli(env, "rm", "999", "--root", str(served))
            assert_served(d, missing, "rm", count=2)
            assert (await d.terminate())[0] == 0

        resumed_alone = await cli(
            env, "resume", "--root", str(alone), "--progress", "plain", *SETTINGS
        )
        again_alone = await cli(
            env, "resume", "--root", str(alone), "--progress", "plain", *SETTINGS
        )
        removed_alone = await cli(env, "rm", ref, "--root", str(alone))
        missing_alone = await cli(env, "rm", "999", "--root", str(alone))

    assert resumed.code == resumed_alone.code == 0, (resumed.err, resumed_alone.err)
    assert resumed.err == resumed_alone.err == ""
    assert plain_view(resumed.out) == plain_view(resumed_alone.out)
    assert f"Status: Downloaded newer image for {ref}" in resumed.out
    assert "Resuming from" in resumed.out
    assert again.out == again_alone.out and again.out.startswith("Status: nothing to resume")
    # rm through the daemon: the same lines, the same exit codes (each names its root).
    assert (removed.code, removed.out, removed.err) == (0, removed_alone.out, "")
    assert removed.out.startswith("Removed pull ") and removed.out.endswith(f" {ref}\n")
    assert missing.code == missing_alone.code == 2
    assert missing.err == missing_alone.err.replace(str(alone), str(served))
    assert missing.err == f"resumer: no stored pull 999 in {served} (see `resumer ls -a`)\n"
    for root in (served, alone):
        assert_image_complete(root, image.image, ref, image.tag)


def _image_of(sizes: dict[str, int]) -> int:
    return sum(sizes.values())


async def _pull_until(
    env: dict[str, str], args: list[str], sizes: dict[str, int], share: float
) -> tuple[asyncio.subprocess.Process, list[dict[str, Any]], asyncio.Task[bytes]]:
    """Start ``resumer ARGS --progress json`` and return once it has reported ``share``
    of the image's bytes (it keeps running)."""
    proc = await asyncio.create_subprocess_exec(
        *resumer_cmd(*args, "--progress", "json"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.create_task(proc.stderr.read())
    lines: list[dict[str, Any]] = []
    current: dict[str, int] = {}
    async with asyncio.timeout(DEADLINE):
        async for raw in proc.stdout:
            msg = json.loads(raw)
            lines.append(msg)
            if msg.get("status") == "Downloading" and msg.get("id") in sizes:
                current[msg["id"]] = msg["progressDetail"]["current"]
            if sum(current.values()) >= share * _image_of(sizes):
                return proc, lines, errors
    raise AssertionError(f"the pull ended before {share:.0%}: {lines}")


async def _finish(
    proc: asyncio.subprocess.Process, lines: list[dict[str, Any]], errors: asyncio.Task[bytes]
) -> tuple[int, str]:
    assert proc.stdout is not None
    async with asyncio.timeout(DEADLINE):
        async for raw in proc.stdout:
            lines.append(json.loads(raw))
        code = await proc.wait()
        return code, (await errors).decode()


SPECS = tuple(LayerSpec(size=4 * MiB, compressible=False) for _ in range(3))


async def test_sigkill_of_the_daemon_mid_pull_then_resume_without_it_finishes_it(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    image = pushed_image(repo="lab/killed", tag="v1", layers=SPECS, seed=13)
    sizes = {layer_id(x.digest): x.size for x in image.image.layers}
    total = _image_of(sizes)
    root, env = tmp_path / "root", cli_env(tmp_path)
    async with proxied(image, rate=4 * MiB) as proxy:
        ref = reference_via(proxy, image)
        async with daemon(root, env) as d:
            client, lines, errors = await _pull_until(
                env, ["pull", ref, "--root", str(root)], sizes, 0.3
            )
            d.proc.kill()  # SIGKILL: no drain, no checkpoint beyond the last one
            await d.proc.wait()
            code, err = await _finish(client, lines, errors)
        # The client says the daemon went away and that the partials are kept.
        assert code == 1, err
        assert "stopped before it answered" in err and "partial downloads are kept" in err
        assert "waiting for" not in err
        await settle(proxy)
        kept = sum(kept_after_kill(root, x.digest, x.size) for x in image.image.layers)
        assert 0 < kept < total
        assert (root / SOCKET_NAME).exists()  # stale: the next command must not use it

        before = proxy.counters.bytes_down
        resumed = await cli(env, "resume", "--root", str(root), "--progress", "plain")
        assert resumed.code == 0, resumed.err
        assert "Resuming from" in resumed.out
        assert f"Status: Downloaded newer image for {ref}" in resumed.out
        await settle(proxy)
        resume_wire = proxy.counters.bytes_down - before
    assert_image_complete(root, image.image, ref, image.tag)
    served = proxy.counters.bytes_down
    bound = total + per_kill_bound() + 2 * METADATA_PER_RUN
    print(
        f"SIGKILL of the daemon at {kept / total:.0%} kept: image {total} B, upstream served"
        f" {served} B ({served / total:.3f}x), the resume {resume_wire} B for the"
        f" {total - kept} B missing; bound {bound} B"
    )
    # The resume moved only the missing bytes: what the kill left on record stayed.
    assert resume_wire <= total - kept + METADATA_PER_RUN
    assert served <= bound


async def test_sigterm_mid_pull_drains_exits_0_and_the_next_start_resumes_it(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    image = pushed_image(repo="lab/drained", tag="v1", layers=SPECS, seed=14)
    sizes = {layer_id(x.digest): x.size for x in image.image.layers}
    total = _image_of(sizes)
    root, env = tmp_path / "root", cli_env(tmp_path)
    async with proxied(image, rate=4 * MiB) as proxy:
        ref = reference_via(proxy, image)
        async with daemon(root, env) as d:
            client, lines, errors = await _pull_until(
                env, ["pull", ref, "--root", str(root)], sizes, 0.3
            )
            code, took = await d.terminate()
            client_code, err = await _finish(client, lines, errors)
            assert code == 0, d.log.text
            assert took < 30, took
            assert "serve: stopped" in d.log.text
        assert not (root / SOCKET_NAME).exists()
        # The client heard why, with the CLI's exit code of an interrupted pull.
        assert client_code == 130, err
        assert "the daemon serving" in err and "is stopping" in err
        await settle(proxy)
        kept = sum(kept_after_kill(root, x.digest, x.size) for x in image.image.layers)
        assert 0 < kept < total  # checkpointed: the bytes moved are on record

        before = proxy.counters.bytes_down
        async with daemon(root, env) as again:
            await again.log.wait_for(rf"supervisor: pull \d+ of {re.escape(ref)}: run 1")
            await again.log.wait_for(rf"supervisor: pull \d+ of {re.escape(ref)}: done")
            assert (await again.terminate())[0] == 0
        await settle(proxy)
        # The next start moved only what the drain had not checkpointed.
        assert proxy.counters.bytes_down - before <= total - kept + METADATA_PER_RUN
    assert_image_complete(root, image.image, ref, image.tag)
    served = proxy.counters.bytes_down
    print(
        f"SIGTERM drained in {took:.2f} s at {kept / total:.0%} kept; image {total} B,"
        f" upstream served {served} B ({served / total:.3f}x)"
    )
    assert served <= total + 2 * METADATA_PER_RUN + 3 * 1 * MiB


async def test_ctrl_c_of_the_client_leaves_the_pull_running_in_the_daemon(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    image = pushed_image(repo="lab/left", tag="v1", layers=SPECS, seed=15)
    sizes = {layer_id(x.digest): x.size for x in image.image.layers}
    root, env = tmp_path / "root", cli_env(tmp_path)
    async with proxied(image, rate=4 * MiB) as proxy:
        ref = reference_via(proxy, image)
        async with daemon(root, env) as d:
            client, lines, errors = await _pull_until(
                env, ["pull", ref, "--root", str(root)], sizes, 0.2
            )
            client.send_signal(signal.SIGINT)
            code, err = await _finish(client, lines, errors)
            # Like docker pull's Ctrl-C: the client stops, the daemon goes on.
            assert code == 130, err
            assert f"the daemon serving {root} (pid {d.proc.pid}) goes on with it" in err
            await d.log.wait_for(r"control: the client of the pull of .* left; it continues")
            await d.log.wait_for(rf"control: pull {re.escape(ref)}: done")
            assert (await d.terminate())[0] == 0
    assert_image_complete(root, image.image, ref, image.tag)
