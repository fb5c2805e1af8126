"""Power cuts, as they really happen: on the power-cut file system (``resumer.lab.powercut``)
every write not yet fsynced is gone when the power goes, data and metadata alike.

Each life is a real ``resumer`` process whose root (and output) live on the mount. At the
cut point the process is frozen (SIGSTOP), the file system drops everything unsynced, the
process is killed and the file system is mounted again over the same backing directory,
as after a reboot. Then the next life runs. For any cut points (hypothesis):
- the next run finishes, byte-identical;
- no wrong or unverified blob is ever visible, in the store or at the output path;
- a cut costs at most what arrived since the last data sync (one checkpoint interval,
  4 MiB, per running transfer) plus one chunk, over one connection per blob or K = 4
  (each of the K streams then has a chunk of its own straddling the last sync);
- ``resume`` finds every pull that was stored before the cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import PushImage
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from resumer.lab.images import LayerSpec
from resumer.lab.powercut import PowerCutFS, keep_random, unavailable_reason

MiB = 1 << 20
CHECKPOINT = 4 * MiB  # Config.checkpoint_bytes: the data sync interval
CHUNK = 1 * MiB  # Config.chunk_size
#: what one cut may cost one running transfer (DESIGN.md invariant 1)
LOSS_BOUND = CHECKPOINT + CHUNK
FETCH_SIZE = 24 * MiB
#: connections per blob: one, and K = 4, where each of the K streams has a chunk of its own
#: straddling the last sync (the bound is for the transfer, whatever K)
CONNECTIONS = [1, 4]

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

settings.register_profile(
    "powercut",
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def record_losses(what: str, losses: list[int]) -> None:
    """Append the measured losses per cut to $RESUMER_POWERCUT_LOG, for the notes."""
    log = os.environ.get("RESUMER_POWERCUT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"test": what, "losses": losses}) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return "sha256:" + h.hexdigest()


def assert_nothing_unverified_visible(root: Path, out: Path | None, digest: str | None) -> None:
    """Invariant 3: every blob in the store hashes to its name; the output, if there, is
    the right blob."""
    blobs = root / "blobs" / "sha256"
    if blobs.is_dir():
        for blob in blobs.iterdir():
            if blob.name.startswith("."):
                continue  # a temp file of a commit in progress is not visible content
            assert sha256_file(blob) == "sha256:" + blob.name, f"unverified blob {blob}"
    if out is not None and out.exists():
        assert sha256_file(out) == digest, f"wrong content at the output {out}"


@dataclass
class Life:
    """One process: what it reported before it ended or was cut."""

    returncode: int | None = None
    resumed_from: dict[str, int] = field(default_factory=dict)  # layer id → offset
    current: dict[str, int] = field(default_factory=dict)  # layer id → bytes accepted
    statuses: list[str] = field(default_factory=list)  # the lines without a layer id
    stderr: str = ""
    stats: dict[str, int] = field(default_factory=dict)


def run_life(
    argv: list[str],
    fs: PowerCutFS,
    cut_when: Callable[[Life], bool] | None,
    keep: Callable[[PowerCutFS], set[int]] | None = None,
) -> Life:
    """Run ``resumer ARGV`` to its end, or power-cut it once ``cut_when(life)`` holds."""
    life = Life()
    child = subprocess.Popen(
        [sys.executable, "-m", "resumer", *argv, "--progress", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None and child.stderr is not None
    cut = False
    for line in child.stdout:  # progress lines arrive as the bytes do: no sleeping
        msg: dict[str, Any] = json.loads(line)
        status = str(msg.get("status", ""))
        lid = str(msg.get("id", ""))
        if not lid:
            life.statuses.append(status)
        if status.startswith("Resuming from "):
            life.resumed_from.setdefault(lid, int(status.rsplit(" ", 1)[1]))
        if status == "Downloading":
            life.current[lid] = int(msg["progressDetail"]["current"])
        if "stats" in msg:
            life.stats = dict(msg["stats"])
        if cut_when is not None and cut_when(life):
            # The power goes: the process stops where it is, the disk keeps what it kept.
            os.kill(child.pid, signal.SIGSTOP)
            fs.cut(keep(fs) if keep is not None else None)
            os.kill(child.pid, signal.SIGKILL)
            cut = True
            break
    child.wait(timeout=120)
    life.stderr = child.stderr.read()
    child.stdout.close()
    child.stderr.close()
    life.returncode = None if cut else child.returncode
    if cut:
        fs.mount()  # the reboot
    return life


@pytest.fixture
def powercut(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], PowerCutFS]]:
    """``powercut() -> PowerCutFS``: a fresh power-cut file system, mounted."""
    opened: list[PowerCutFS] = []

    def make() -> PowerCutFS:
        base = tmp_path_factory.mktemp("powercut")
        (base / "backing").mkdir()
        (base / "mnt").mkdir()
        fs = PowerCutFS(base / "backing", base / "mnt")
        opened.append(fs)
        fs.mount()
        return fs

    yield make
    for fs in opened:
        fs.close()


@dataclass(frozen=True)
class Blob:
    url: str
    data: bytes = field(repr=False)  # 24 MiB: kept out of hypothesis's failure reports
    digest: str

    def __iter__(self) -> Iterator[Any]:
        return iter((self.url, self.data, self.digest))


@pytest.fixture(scope="module")
def blob_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Blob]:
    """A 24 MiB blob served by nginx at 10 MB/s."""
    from servers import start_nginx

    www = tmp_path_factory.mktemp("www")
    data = os.urandom(FETCH_SIZE)
    (www / "blob").write_bytes(data)
    srv = start_nginx(www, tmp_path_factory.mktemp("nginx"), extra_server="limit_rate 10m;")
    try:
        yield Blob(f"{srv.url}/blob", data, "sha256:" + hashlib.sha256(data).hexdigest())
    finally:
        srv.stop()


def fetch_argv(url: str, digest: str, out: Path, root: Path, k: int) -> list[str]:
    """``resumer fetch`` of the blob over ``k`` connections."""
    fetch = ["fetch", url, "--digest", digest, "-o", str(out), "--root", str(root)]
    return [*fetch, "--max-connections-per-blob", str(k)]


cut_points = st.lists(st.integers(1, FETCH_SIZE - 1), min_size=1, max_size=3)


@settings(settings.get_profile("powercut"))
@given(cuts=cut_points, subset_seed=st.none() | st.integers(0, 2**16))
# Hypothesis starts small; these make sure every run cuts well past the first syncs.
@example(cuts=[12 * MiB], subset_seed=None)
@example(cuts=[7 * MiB, 19 * MiB], subset_seed=1)
@pytest.mark.parametrize("k", CONNECTIONS)
def test_power_cuts_during_fetch_lose_at_most_one_sync_interval_and_never_show_bad_bytes(
    powercut: Callable[[], PowerCutFS],
    blob_server: Blob,
    k: int,
    cuts: list[int],
    subset_seed: int | None,
) -> None:
    url, data, digest = blob_server
    fs = powercut()
    root, out = fs.mountpoint / "root", fs.mountpoint / "out.bin"
    argv = fetch_argv(url, digest, out, root, k)
    # A disk may also keep any subset of the unsynced writes, torn and reordered.
    keep = (lambda f: keep_random(f.pending(), subset_seed)) if subset_seed is not None else None
    losses = []
    wire = 0  # every byte the lives took in, the lost ones included
    for target in sorted(cuts):
        life = run_life(
            argv, fs, lambda lf, t=target: max(lf.current.values(), default=0) >= t, keep
        )
        assert life.returncode is None, life.stderr  # cut before it could finish
        arrived = max(life.current.values(), default=0)
        wire += arrived - max(life.resumed_from.values(), default=0)
        assert_nothing_unverified_visible(root, out, digest)
        # The next life is cut at its first progress: it shows where a run starts now.
        nxt = run_life(argv, fs, lambda lf: bool(lf.current))
        resumed = max(nxt.resumed_from.values(), default=0)
        wire += max(nxt.current.values(), default=0) - resumed
        losses.append(arrived - resumed)
        if arrived > LOSS_BOUND:
            # Durable once recorded: a partial that was synced keeps its record, so it is
            # resumed, not found without one (kept aside and adopted unverified).
            assert "without a record" not in nxt.stderr, nxt.stderr
        assert_nothing_unverified_visible(root, out, digest)
    last = run_life(argv, fs, None)
    assert last.returncode == 0, last.stderr
    assert "Traceback" not in last.stderr
    assert out.read_bytes() == data
    assert_nothing_unverified_visible(root, out, digest)
    wire += last.stats["wire_bytes"]
    for loss in losses:
        assert loss <= LOSS_BOUND, (losses, cuts)
    # Two cuts per round (the probe life's too), each bounded.
    assert wire <= FETCH_SIZE + 2 * len(cuts) * LOSS_BOUND, (wire, losses)
    record_losses(f"fetch K={k}", losses)


def _chunks_that_survived(root: Path, data: bytes, digest: str) -> int:
    """The oracle, read after the reboot: bytes of chunks whose record survived in
    state.db and whose data survived on disk, both matching the blob. A chunk whose
    latest record no longer matches counts its synced record's bytes (what the last
    finished fdatasync covered), if that one matches."""
    import contextlib
    import sqlite3

    import xxhash

    from resumer.digest import to_signed

    partial = root / "ingest" / ("sha256-" + digest[7:])
    if not partial.exists():
        return 0
    on_disk = partial.read_bytes()
    with contextlib.closing(sqlite3.connect(root / "state.db")) as conn:
        rows = conn.execute(
            "SELECT idx, xxh3, length, synced_xxh3, synced_length FROM chunks WHERE key = ?",
            (digest,),
        ).fetchall()

    def intact(idx: int, xxh: int | None, length: int | None) -> int:
        start = idx * CHUNK
        piece = on_disk[start : start + (length or CHUNK)]
        want = data[start : start + (length or CHUNK)]
        ok = xxh is not None and piece == want
        return len(piece) if ok and to_signed(xxhash.xxh3_64_intdigest(piece)) == xxh else 0

    return sum(intact(i, x, n) or intact(i, sx, sn) for i, x, n, sx, sn in rows)


@settings(settings.get_profile("powercut"), max_examples=4)
@given(
    cut_at=st.integers(2 * MiB, FETCH_SIZE - 2 * MiB),
    subset_seed=st.integers(0, 2**16),
    # Half the pieces tears every unsynced chunk; 99.8 % keeps most of them whole, so
    # whole chunks survive past torn ones, with or without their records.
    fraction=st.sampled_from([0.5, 0.99, 0.998]),
)
@example(cut_at=13 * MiB, subset_seed=7, fraction=0.998)
@pytest.mark.parametrize("k", CONNECTIONS)
def test_records_and_data_lost_in_a_cut_cost_exactly_their_chunks(
    powercut: Callable[[], PowerCutFS],
    blob_server: Blob,
    k: int,
    cut_at: int,
    subset_seed: int,
    fraction: float,
) -> None:
    """The disk keeps a random subset of the unsynced writes (torn, reordered), of the
    partial and of state.db's WAL alike: some chunks keep their data and lose their
    record, others the reverse. The next run fetches exactly the chunks that are not
    both recorded and intact, keeps every other one, and ends byte-identical."""
    url, data, digest = blob_server
    fs = powercut()
    root, out = fs.mountpoint / "root", fs.mountpoint / "out.bin"
    argv = fetch_argv(url, digest, out, root, k)
    keep = lambda f: keep_random(f.pending(), subset_seed, fraction)  # noqa: E731
    life = run_life(argv, fs, lambda lf: max(lf.current.values(), default=0) >= cut_at, keep)
    assert life.returncode is None, life.stderr
    assert_nothing_unverified_visible(root, out, digest)
    survived = _chunks_that_survived(root, data, digest)
    record_losses(f"records-and-data K={k}", [cut_at - survived])
    last = run_life(argv, fs, None)
    assert last.returncode == 0, last.stderr
    assert "Traceback" not in last.stderr
    assert out.read_bytes() == data
    assert_nothing_unverified_visible(root, out, digest)
    assert last.stats["wire_bytes"] == FETCH_SIZE - survived, (survived, last.stats)
    assert survived >= cut_at - LOSS_BOUND  # and what survived is what invariant 1 promises


def test_a_cut_right_after_fetch_returns_keeps_the_output_and_the_blob(
    powercut: Callable[[], PowerCutFS], blob_server: Blob
) -> None:
    """Durable once recorded: what a finished command published survives the power."""
    url, data, digest = blob_server
    fs = powercut()
    root, out = fs.mountpoint / "root", fs.mountpoint / "out.bin"
    argv = ["fetch", url, "--digest", digest, "-o", str(out), "--root", str(root)]
    done = run_life(argv, fs, None)
    assert done.returncode == 0, done.stderr
    fs.cut()
    fs.mount()
    assert out.read_bytes() == data
    assert_nothing_unverified_visible(root, out, digest)
    again = run_life(argv, fs, None)
    assert again.returncode == 0, again.stderr
    assert out.read_bytes() == data


def test_a_cut_after_gc_kept_orphans_aside_loses_none_of_them(
    powercut: Callable[[], PowerCutFS], blob_server: Blob
) -> None:
    """Garbage collection moves unrecorded partials aside: after a cut each is in exactly
    one place, whole."""
    url, digest = blob_server.url, blob_server.digest
    fs = powercut()
    root = fs.mountpoint / "root"
    ingest = root / "ingest"
    ingest.mkdir(parents=True)
    orphans = {f"sha256-{n:064x}": os.urandom(100_000 + n) for n in range(3)}
    for name, content in orphans.items():
        fd = os.open(ingest / name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, content)
        os.fsync(fd)
        os.close(fd)
    for d in (ingest, root, fs.mountpoint):
        fd = os.open(d, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    life = run_life(
        ["fetch", url, "--digest", digest, "-o", str(fs.mountpoint / "o"), "--root", str(root)],
        fs,
        lambda lf: bool(lf.current),  # gc has run (it runs before any transfer)
    )
    assert life.returncode is None
    for name, content in orphans.items():
        places = [p for p in (ingest / name, ingest / "orphans" / name) if p.exists()]
        assert len(places) == 1, (name, places)
        assert places[0].read_bytes() == content


@settings(settings.get_profile("powercut"), max_examples=4)
@given(cut_at=st.integers(1 * MiB, 14 * MiB), subset_seed=st.none() | st.integers(0, 2**16))
@example(cut_at=12 * MiB, subset_seed=None)
def test_power_cut_during_pull_then_resume_finds_the_stored_pull_and_finishes(
    powercut: Callable[[], PowerCutFS],
    pulled_image: tuple[str, str, int],
    cut_at: int,
    subset_seed: int | None,
) -> None:
    reference, manifest_digest, layer_bytes = pulled_image
    fs = powercut()
    root = fs.mountpoint / "root"
    keep = (lambda f: keep_random(f.pending(), subset_seed)) if subset_seed is not None else None
    life = run_life(
        ["pull", reference, "--root", str(root)],
        fs,
        lambda lf: sum(lf.current.values()) >= cut_at,
        keep,
    )
    assert life.returncode is None, life.stderr
    arrived = sum(life.current.values())
    assert_nothing_unverified_visible(root, None, None)
    resumed = run_life(["resume", "--root", str(root)], fs, None)
    assert resumed.returncode == 0, resumed.stderr
    # The pull was stored before its first byte: resume finds it (not "nothing to resume").
    assert any(reference in s and s.startswith("Status: ") for s in resumed.statuses), (
        resumed.statuses
    )
    index = json.loads((root / "index.json").read_text())
    assert manifest_digest in [m["digest"] for m in index["manifests"]]
    assert_nothing_unverified_visible(root, None, None)
    # At most one sync interval plus a chunk per running transfer (3 at once) was lost.
    kept = sum(resumed.resumed_from.values())
    assert arrived - kept <= 3 * LOSS_BOUND
    record_losses("pull", [arrived - kept])
    # Durable once recorded: the layout a finished resume wrote survives the next cut.
    fs.cut()
    fs.mount()
    index = json.loads((root / "index.json").read_text())
    assert manifest_digest in [m["digest"] for m in index["manifests"]]
    assert len(list((root / "blobs" / "sha256").iterdir())) >= 5  # 3 layers, config, manifest
    assert_nothing_unverified_visible(root, None, None)
    if arrived > 3 * LOSS_BOUND:
        assert "without a record" not in resumed.stderr, resumed.stderr
    assert resumed.stats["wire_bytes"] <= layer_bytes - kept + 4 * 1024 * 1024


@pytest.fixture
def pulled_image(
    pushed_image: PushImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, int]]:
    """(reference through a 10 MB/s proxy, manifest digest, layer bytes) of a 3-layer image."""
    image = pushed_image(
        "lab/power", "v1", [LayerSpec(size=6 * MiB, compressible=False) for _ in range(3)]
    )
    proxy = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resumer.lab.proxy",
            "--target",
            image.registry.host,
            "--rate",
            "10e6",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proxy.stdout is not None
    line = proxy.stdout.readline()
    assert line.startswith("listening on "), line
    host = line.split()[-1]
    try:
        yield f"{host}/lab/power:v1", image.digest, image.image.total_layer_bytes()
    finally:
        proxy.terminate()
        proxy.communicate(timeout=30)
