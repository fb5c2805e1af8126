"""Unattended operation: nothing gets stuck, nothing stored is lost, every failure says
what and why. Real processes, a real small file system for the full disk, the real
registry for pulls that fail for good."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NginxFactory, PushImage

from resumer.lab.images import LayerSpec
from resumer.store import Store

MiB = 1 << 20


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("RESUMER_ROOT", None)
    return subprocess.run(
        [sys.executable, "-m", "resumer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def stats_of(stdout: str) -> dict[str, int]:
    for line in reversed(stdout.splitlines()):
        msg = json.loads(line)
        if "stats" in msg:
            return dict(msg["stats"])
    raise AssertionError(f"no stats line in {stdout!r}")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def small_fs(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size``: a disk that fills up for real."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fetch_args(url: str, digest: str, out: Path, root: Path, *extra: str) -> list[str]:
    return ["fetch", url, "--digest", digest, "-o", str(out), "--root", str(root), *extra]


#: one stream, and K = 4 streams per blob: a partial written at four offsets has gaps
CONNECTIONS = pytest.mark.parametrize("k", [1, 4], ids=["K1", "K4"])


def k_args(k: int) -> list[str]:
    return ["--max-connections-per-blob", str(k)]


def disk_held(root: Path) -> int:
    """The space the partials take on disk, reserved blocks included."""
    return sum(p.stat().st_blocks * 512 for p in (root / "ingest").iterdir() if p.is_file())


def recorded(root: Path) -> dict[str, int]:
    """The verified bytes the store keeps for each partial (``resumer status``): with
    gaps in a partial its length says nothing."""
    res = cli("status", "--root", str(root), "--json")
    assert res.returncode == 0, res.stderr
    return {t["key"]: t["recorded"] for t in json.loads(res.stdout)["transfers"]}


@CONNECTIONS
def test_a_full_disk_says_disk_full_keeps_the_partial_and_the_next_run_continues(
    tmp_path: Path, nginx_factory: NginxFactory, k: int
) -> None:
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(24 * MiB)
    (www / "blob").write_bytes(data)
    srv = nginx_factory(www)
    out = tmp_path / "out.bin"
    with small_fs(tmp_path / "small", "12m") as small:
        root = small / "root"
        args = fetch_args(
            f"{srv.url}/blob", sha256(data), out, root, "--progress", "json", *k_args(k)
        )
        first = cli(*args)
        assert first.returncode == 1, first.stderr
        assert "disk full" in first.stderr and str(root) in first.stderr, first.stderr
        assert "Traceback" not in first.stderr
        assert not out.exists()
        assert len([p for p in (root / "ingest").iterdir() if p.is_file()]) == 1
        [kept] = recorded(root).values()
        assert kept >= 4 * MiB
        # No space went to reservations that data never filled: what the partial holds
        # on disk is its verified data, and what was in flight when the disk filled.
        assert disk_held(root) - kept <= 2 * MiB
        status = cli("status", "--root", str(root))
        assert status.returncode == 0, status.stderr
        assert "disk full" in status.stdout, status.stdout
        # Space freed (the file system grown): the next run fetches only the rest.
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        second = cli(*args)
        assert second.returncode == 0, second.stderr
        assert out.read_bytes() == data
        assert stats_of(second.stdout)["wire_bytes"] <= len(data) - kept + 2 * MiB


def test_resume_goes_past_pulls_that_fail_for_good_and_ls_rm_drop_them(
    tmp_path: Path, pushed_image: PushImage
) -> None:
    good = pushed_image("lab/good", "v1", [LayerSpec(size=256 * 1024)])
    host = good.registry.host
    root = tmp_path / "root"
    broken_dest = tmp_path / "broken"
    broken_dest.mkdir()
    (broken_dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (broken_dest / "index.json").write_text("{ not json")

    async def store_pulls() -> None:
        from resumer.pulls import Pulls

        root.mkdir()
        store = await Store.open(root / "state.db")
        try:
            pulls = Pulls(store)
            # Deleted upstream: the stored manifest is unknown to the registry.
            await pulls.create(f"{host}/lab/gone:v1", dest=str(root), layers=[])
            # Its destination's index.json is corrupt.
            await pulls.create(good.reference, dest=str(broken_dest), layers=[])
            await pulls.create(good.reference, dest=str(root), layers=[])
        finally:
            await store.close()

    import asyncio

    asyncio.run(store_pulls())
    first = cli("resume", "--root", str(root), "--progress", "plain")
    assert first.returncode == 1, first.stderr
    assert "Traceback" not in first.stderr
    assert f"pull 1 of {host}/lab/gone:v1" in first.stderr
    assert f"pull 2 of {good.reference}" in first.stderr and "index.json" in first.stderr
    assert "2 of 3 stored pulls failed" in first.stderr
    assert f"Downloaded newer image for {good.reference}" in first.stdout
    ls = cli("ls", "--root", str(root))
    assert ls.returncode == 0, ls.stderr
    assert "failed for good" in ls.stdout and "lab/gone:v1" in ls.stdout
    status = cli("status", "--root", str(root))
    assert "pull 1 " in status.stdout and "failed for good" in status.stdout
    # Still stuck on nothing: a second resume does the same, without blocking.
    assert cli("resume", "--root", str(root)).returncode == 1
    rm = cli("rm", "1", "2", "--root", str(root))
    assert rm.returncode == 0, rm.stderr
    assert "Removed pull 1" in rm.stdout and "Removed pull 2" in rm.stdout
    assert "no stored pulls" in cli("ls", "--root", str(root)).stdout
    last = cli("resume", "--root", str(root), "--progress", "plain")
    assert last.returncode == 0, last.stderr
    assert "nothing to resume" in last.stdout
    # The image the good pull brought is still there.
    assert good.digest in (root / "index.json").read_text()
    assert cli("rm", "7", "--root", str(root)).returncode == 2


def _leave_partial(
    tmp_path: Path, nginx_factory: NginxFactory, k: int = 1
) -> tuple[list[str], bytes, Path]:
    """A fetch SIGKILLed halfway: (its CLI arguments, the blob, the root)."""
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(16 * MiB)
    (www / "blob").write_bytes(data)
    srv = nginx_factory(www, extra_server="limit_rate 8m;")
    root = tmp_path / "root"
    args = fetch_args(
        f"{srv.url}/blob", sha256(data), tmp_path / "out.bin", root, "--progress", "json"
    )
    args += k_args(k)
    child = subprocess.Popen(
        [sys.executable, "-m", "resumer", *args], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    for line in child.stdout:  # progress arrives as the bytes do: no sleeping
        if json.loads(line).get("progressDetail", {}).get("current", 0) >= len(data) // 2:
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=60)
    child.stdout.close()
    return args, data, root


@CONNECTIONS
def test_a_corrupt_state_db_names_the_file_and_reset_state_keeps_the_partials(
    tmp_path: Path, nginx_factory: NginxFactory, k: int
) -> None:
    args, data, root = _leave_partial(tmp_path, nginx_factory, k)
    kept = sum(recorded(root).values())  # verified, before the record is lost
    db = root / "state.db"
    for extra in ("-wal", "-shm"):
        db.with_name(db.name + extra).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    partials = {p.name: p.stat().st_size for p in (root / "ingest").iterdir() if p.is_file()}
    for command in (["status", "--root", str(root)], args):
        res = cli(*command)
        assert res.returncode == 1, res.stderr
        assert str(db) in res.stderr, res.stderr
        assert f"resumer reset-state --root {root}" in res.stderr
        assert "Traceback" not in res.stderr
    reset = cli("reset-state", "--root", str(root))
    assert reset.returncode == 0, reset.stderr
    [aside] = root.glob("state.db.broken-*")
    assert (aside / "state.db").read_bytes().startswith(b"this is not")
    assert {p.name: p.stat().st_size for p in (root / "ingest").iterdir() if p.is_file()} == (
        partials
    )
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out.bin").read_bytes() == data
    # The kept-aside partial was adopted: only the rest (and at most a chunk) came again.
    assert stats_of(res.stdout)["wire_bytes"] <= len(data) - kept + MiB


def test_status_names_a_missing_root_and_a_root_that_is_a_file(tmp_path: Path) -> None:
    missing = cli("status", "--root", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such root" in missing.stderr
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = cli("status", "--root", str(afile))
    assert res.returncode == 2 and "not a directory" in res.stderr
    assert not (tmp_path / "nowhere").exists()


def test_status_reads_a_root_it_may_not_write(tmp_path: Path, nginx_factory: NginxFactory) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run status as another user")
    _args, _data, root = _leave_partial(tmp_path, nginx_factory)
    for p in [tmp_path, *tmp_path.parents]:
        os.chmod(p, os.stat(p).st_mode | 0o005)  # others may enter and list, not write
    before = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    res = subprocess.run(
        [
            *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
            *(sys.executable, "-m", "resumer", "status", "--root", str(root)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "partial transfers:" in res.stdout
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == before


@CONNECTIONS
def test_a_pull_onto_a_full_disk_says_disk_full_and_a_later_pull_finishes(
    tmp_path: Path, pushed_image: PushImage, k: int
) -> None:
    image = pushed_image(
        "lab/big",
        "v1",
        [LayerSpec(size=6 * MiB, compressible=False) for _ in range(3)],
    )
    # Segments of 1 MiB and up, so each 6 MiB layer is written at K offsets at once.
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"min-segment-size": MiB}))
    with small_fs(tmp_path / "small", "10m") as small:
        root = small / "root"
        args = ["pull", image.reference, "--root", str(root), "--progress", "json"]
        args += [*k_args(k), "--config", str(config)]
        first = cli(*args)
        assert first.returncode == 1, first.stderr
        assert "disk full" in first.stderr, first.stderr
        assert "Traceback" not in first.stderr and "Task exception" not in first.stderr
        status = cli("status", "--root", str(root))
        assert "disk full" in status.stdout, status.stdout
        kept = sum(recorded(root).values())
        layers = image.image.layers
        blobs = root / "blobs" / "sha256"
        committed = sum(x.size for x in layers if (blobs / x.digest[7:]).exists())
        assert kept + committed >= 4 * MiB
        assert disk_held(root) - kept <= 2 * MiB
        subprocess.run(["mount", "-o", "remount,size=80m", str(small)], check=True)
        second = cli(*args)
        assert second.returncode == 0, second.stderr
        assert image.digest in (root / "index.json").read_text()
        rest = sum(x.size for x in layers) - kept - committed
        assert stats_of(second.stdout)["wire_bytes"] <= rest + 2 * MiB
