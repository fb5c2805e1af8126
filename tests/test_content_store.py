"""``ContentStore``: the one commit for every blob, and the copy that publishes one.

Failures are injected at the system-call boundary (``os.fdatasync``, ``fcntl.ioctl``,
``os.copy_file_range`` …), never by faking a success.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resumer.content import ContentStore, copy_into
from resumer.content.blobs import FICLONE, STALE_TMP_SECONDS
from resumer.engine import publish
from resumer.errors import (
    DigestMismatchError,
    DiskFullError,
    StoreError,
    TransferError,
    UsageError,
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def visible(store: ContentStore) -> list[str]:
    """Every name in the store's directory, temp files included."""
    return sorted(p.name for p in store.dir.iterdir())


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    s = ContentStore(tmp_path / "blobs" / "sha256")
    s.ensure()
    return s


def partial(tmp_path: Path, data: bytes) -> tuple[int, Path]:
    """A finished partial, as ingest hands it over: written, still open."""
    ingest = tmp_path / "ingest"
    ingest.mkdir(exist_ok=True)
    path = ingest / "sha256-x"
    path.write_bytes(data)
    return os.open(path, os.O_WRONLY | os.O_APPEND), path


def fd_is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def fail_with(code: int) -> Callable[..., Any]:
    def fail(*args: object, **kw: object) -> Any:
        raise OSError(code, os.strerror(code))

    return fail


# ---------------------------------------------------------------------- commit_bytes


async def test_commit_bytes_stores_verifies_and_exists_is_success(store: ContentStore) -> None:
    data = b'{"config": true}'
    d = await store.commit_bytes(data, sha256(data))
    assert d == sha256(data)
    assert store.has(d, len(data)) and not store.has(d, len(data) + 1)
    with store.open_blob(d) as f:
        assert f.read() == data
    before = store.path(d).stat()
    assert await store.commit_bytes(data) == d  # already there: success, untouched
    assert store.path(d).stat().st_ino == before.st_ino
    assert visible(store) == [d[7:]]


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=4096), other=st.binary(max_size=64))
def test_commit_bytes_refuses_a_wrong_digest_and_nothing_becomes_visible(
    data: bytes, other: bytes
) -> None:
    wrong = sha256(other)
    with tempfile.TemporaryDirectory() as tmp:
        store = ContentStore(Path(tmp) / "blobs")
        store.ensure()
        if other == data:
            assert asyncio.run(store.commit_bytes(data, wrong)) == wrong
            return
        with pytest.raises(DigestMismatchError, match=wrong):
            asyncio.run(store.commit_bytes(data, wrong))
        assert visible(store) == []  # neither the blob, under any name, nor a temp file


async def test_a_wrong_sized_blob_in_the_way_is_replaced_not_trusted(store: ContentStore) -> None:
    data = b"manifest bytes"
    store.path(sha256(data)).write_bytes(b"torn")  # e.g. written by another tool
    await store.commit_bytes(data, sha256(data))
    assert store.path(sha256(data)).read_bytes() == data


@pytest.mark.parametrize("where", ["fsync", "replace"])
async def test_a_failed_commit_bytes_leaves_no_temp_file_and_names_the_blob(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    data = os.urandom(1000)
    monkeypatch.setattr(os, where, fail_with(errno.ENOSPC))
    with pytest.raises(DiskFullError, match=sha256(data)):
        await store.commit_bytes(data, sha256(data))
    monkeypatch.undo()
    assert visible(store) == []


# ---------------------------------------------------------------------- commit_file


async def test_commit_file_syncs_closes_and_renames_without_hashing_again(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(300_000)
    fd, path = partial(tmp_path, data)
    digest = sha256(data)
    synced: list[int] = []
    real_sync = os.fdatasync

    def sync(n: int) -> None:
        synced.append(n)
        real_sync(n)

    def no_hashing(*a: object) -> None:
        raise AssertionError("commit_file must not hash: the caller verified the digest")

    monkeypatch.setattr(os, "fdatasync", sync)
    monkeypatch.setattr(hashlib, "sha256", no_hashing)
    dest = await store.commit_file(fd, path, digest, len(data))
    monkeypatch.undo()
    assert synced == [fd] and fd_is_closed(fd)
    assert dest == store.path(digest) and dest.read_bytes() == data
    assert not path.exists()


async def test_commit_file_already_exists_is_success_and_drops_the_partial(
    store: ContentStore, tmp_path: Path
) -> None:
    data = os.urandom(5000)
    await store.commit_bytes(data)
    inode = store.path(sha256(data)).stat().st_ino
    fd, path = partial(tmp_path, data)
    assert await store.commit_file(fd, path, sha256(data), len(data)) == store.path(sha256(data))
    assert fd_is_closed(fd) and not path.exists()
    assert store.path(sha256(data)).stat().st_ino == inode  # the existing blob is kept


async def test_commit_file_without_an_fd_opens_the_file_to_sync_it(
    store: ContentStore, tmp_path: Path
) -> None:
    data = b"x" * 4097
    fd, path = partial(tmp_path, data)
    os.close(fd)
    await store.commit_file(None, path, sha256(data), len(data))
    assert store.path(sha256(data)).read_bytes() == data


@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=1, max_size=2048), delta=st.integers(-3, 3).filter(bool))
def test_commit_file_refuses_a_wrong_size_and_keeps_the_partial(data: bytes, delta: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = ContentStore(Path(tmp) / "blobs")
        store.ensure()
        fd, path = partial(Path(tmp), data)
        size = max(0, len(data) + delta)
        if size == len(data):
            os.close(fd)
            return
        with pytest.raises(TransferError, match="refusing to commit"):
            asyncio.run(store.commit_file(fd, path, sha256(data), size))
        assert fd_is_closed(fd)
        assert visible(store) == []
        assert path.read_bytes() == data  # the caller's partial: invariant 4 keeps it


async def test_a_failed_sync_of_a_partial_is_a_disk_error_naming_the_blob(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(10_000)
    fd, path = partial(tmp_path, data)
    monkeypatch.setattr(os, "fdatasync", fail_with(errno.ENOSPC))
    with pytest.raises(DiskFullError, match=sha256(data)):
        await store.commit_file(fd, path, sha256(data), len(data))
    monkeypatch.undo()
    assert fd_is_closed(fd) and visible(store) == []
    assert path.read_bytes() == data

    fd, path = partial(tmp_path, data)
    monkeypatch.setattr(os, "replace", fail_with(errno.EIO))
    with pytest.raises(StoreError, match=sha256(data)):
        await store.commit_file(fd, path, sha256(data), len(data))
    monkeypatch.undo()
    assert visible(store) == [] and path.read_bytes() == data


async def test_commit_file_runs_on_the_executor_it_is_given(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"ordered after the writes"
    fd, path = partial(tmp_path, data)
    threads: list[str] = []
    real_sync = os.fdatasync

    def sync(n: int) -> None:
        threads.append(threading.current_thread().name)
        real_sync(n)

    monkeypatch.setattr(os, "fdatasync", sync)
    with ThreadPoolExecutor(1, thread_name_prefix="writer") as pool:
        await store.commit_file(fd, path, sha256(data), len(data), executor=pool)
    assert len(threads) == 1 and threads[0].startswith("writer")


# ---------------------------------------------------------------------- import_verified


async def test_import_verified_hardlinks_on_one_file_system(
    store: ContentStore, tmp_path: Path
) -> None:
    other = ContentStore(tmp_path / "other")
    other.ensure()
    data = os.urandom(50_000)
    d = await other.commit_bytes(data)
    dest = await store.import_verified(other.path(d), d)
    assert dest.stat().st_ino == other.path(d).stat().st_ino
    assert await store.import_verified(other.path(d), d) == dest  # exists: success
    assert visible(store) == [d[7:]]


async def test_import_verified_copies_and_hashes_across_file_systems(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(3 << 20))
    good = sha256(src.read_bytes())
    monkeypatch.setattr(os, "link", fail_with(errno.EXDEV))
    bad = sha256(b"something else")
    with pytest.raises(DigestMismatchError, match=bad):
        await store.import_verified(src, bad)
    assert visible(store) == []  # no blob, no temp file
    dest = await store.import_verified(src, good)
    assert dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_ino != src.stat().st_ino
    assert visible(store) == [good[7:]]


async def test_import_verified_replaces_a_wrong_sized_blob(
    store: ContentStore, tmp_path: Path
) -> None:
    src = tmp_path / "blob"
    src.write_bytes(b"the real layer")
    d = sha256(src.read_bytes())
    store.path(d).write_bytes(b"short")
    await store.import_verified(src, d)
    assert store.path(d).read_bytes() == b"the real layer"
    assert visible(store) == [d[7:]]


async def test_a_failed_import_leaves_no_temp_file(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(2 << 20))
    d = sha256(src.read_bytes())
    monkeypatch.setattr(os, "replace", fail_with(errno.ENOSPC))
    with pytest.raises(DiskFullError, match=d):
        await store.import_verified(src, d)  # the hardlink's temp name
    monkeypatch.setattr(os, "link", fail_with(errno.EXDEV))
    with pytest.raises(DiskFullError, match=d):
        await store.import_verified(src, d)  # the copy's temp file
    monkeypatch.undo()
    assert visible(store) == []


# ---------------------------------------------------------------------- readers, upkeep


async def test_readers_and_removal(store: ContentStore) -> None:
    a, b = await store.commit_bytes(b"a"), await store.commit_bytes(b"b")
    (store.dir / ".x.tmp").write_bytes(b"in progress")
    (store.dir / "README").write_bytes(b"put there by hand: no digest, no blob")
    assert sorted(d for d, _ in store.blobs()) == sorted([a, b])
    with pytest.raises(StoreError, match=sha256(b"c")):
        store.open_blob(sha256(b"c"))
    with pytest.raises(UsageError):
        store.path("sha256:../../etc/passwd")  # no name escapes the store
    await store.remove([a])
    assert not store.has(a) and store.has(b, 1)


def test_ensure_removes_only_old_temp_files(store: ContentStore) -> None:
    fresh, old = store.dir / ".a.fresh.tmp", store.dir / ".a.old.tmp"
    for p in (fresh, old):
        p.write_bytes(b"torn")
    past = time.time() - STALE_TMP_SECONDS - 60
    os.utime(old, (past, past))
    store.ensure()
    assert fresh.exists() and not old.exists()


# ---------------------------------------------------------------------- copy_into


def copy_files(tmp_path: Path, data: bytes) -> tuple[Path, Path]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(data)
    return src, dst


def run_copy(src: Path, dst: Path) -> str:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        return copy_into(fin.fileno(), fout.fileno())


DATA = os.urandom((3 << 20) + 12_345)


def test_copy_into_tries_a_reflink_first_and_copies_whatever_the_file_system_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real ioctl is called (not faked): on btrfs or XFS it succeeds and the way is
    "reflink"; on ext4 or tmpfs it fails as unsupported and the copy falls through."""
    calls: list[tuple[int, int, int]] = []
    real_ioctl = fcntl.ioctl

    def spy(fd: int, request: int, arg: Any = 0, *rest: Any) -> Any:
        if request == FICLONE:
            calls.append((fd, request, arg))
        return real_ioctl(fd, request, arg, *rest)

    monkeypatch.setattr(fcntl, "ioctl", spy)
    src, dst = copy_files(tmp_path, DATA)
    how = run_copy(src, dst)
    assert len(calls) == 1
    assert how in {"reflink", "copy_file_range", "sendfile", "read/write"}
    assert dst.read_bytes() == DATA


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ((), "copy_file_range"),
        (("copy_file_range",), "sendfile"),
        (("copy_file_range", "sendfile"), "read/write"),
    ],
)
def test_copy_into_falls_back_when_the_kernel_refuses_each_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: tuple[str, ...], expected: str
) -> None:
    monkeypatch.setattr(fcntl, "ioctl", fail_with(errno.EOPNOTSUPP))  # no reflink here
    codes = {"copy_file_range": errno.EXDEV, "sendfile": errno.EINVAL}
    for name in broken:
        monkeypatch.setattr(os, name, fail_with(codes[name]))
    src, dst = copy_files(tmp_path, DATA)
    assert run_copy(src, dst) == expected
    assert dst.read_bytes() == DATA


def test_a_way_that_gives_up_midway_hands_on_from_its_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fcntl, "ioctl", fail_with(errno.ENOTTY))
    real = os.copy_file_range
    done = [0]

    def twice_then_exdev(src: int, dst: int, count: int, *offsets: int) -> int:
        if done[0] == 2:
            raise OSError(errno.EXDEV, "cross-device")
        done[0] += 1
        return real(src, dst, min(count, 1 << 20), *offsets)

    monkeypatch.setattr(os, "copy_file_range", twice_then_exdev)
    src, dst = copy_files(tmp_path, DATA)
    assert run_copy(src, dst) == "sendfile"
    assert dst.read_bytes() == DATA


@pytest.mark.parametrize("way", ["ioctl", "copy_file_range"])
def test_a_real_error_is_raised_not_papered_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    if way == "ioctl":
        monkeypatch.setattr(fcntl, "ioctl", fail_with(errno.ENOSPC))
    else:
        monkeypatch.setattr(fcntl, "ioctl", fail_with(errno.EOPNOTSUPP))
        monkeypatch.setattr(os, "copy_file_range", fail_with(errno.ENOSPC))
    src, dst = copy_files(tmp_path, DATA)
    with pytest.raises(OSError) as info:
        run_copy(src, dst)
    assert info.value.errno == errno.ENOSPC


def test_publish_failing_midway_leaves_the_output_and_the_blob_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob, out = copy_files(tmp_path, DATA)
    out.write_bytes(b"the old output")
    monkeypatch.setattr(fcntl, "ioctl", fail_with(errno.EOPNOTSUPP))
    monkeypatch.setattr(os, "copy_file_range", fail_with(errno.ENOSPC))
    with pytest.raises(OSError):
        publish(blob, out)
    monkeypatch.undo()
    assert out.read_bytes() == b"the old output"
    assert blob.read_bytes() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no temp file
    assert publish(blob, out) in {"reflink", "copy_file_range"}
    assert out.read_bytes() == DATA and blob.read_bytes() == DATA  # a copy, not a move
