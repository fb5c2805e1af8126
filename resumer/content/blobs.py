"""The content store: the one owner of ``blobs/sha256/``.

Every blob that becomes visible under a ``blobs/sha256/`` (a finished partial, a config,
a manifest, a copy into another OCI layout) goes through ``ContentStore``, whose commits
all follow containerd's ``Commit(size, expected)`` (``plugins/content/local/writer.go``):

1. the data is synced (fdatasync/fsync) while it still has its temporary name;
2. its size, then its digest, are checked; a wrong one is refused, nothing is renamed;
3. an atomic rename gives it its name ``blobs/sha256/<hex>``;
4. the directory is fsynced, so the name survives a power cut (invariant 1).

A blob that is already there with the right size is success ("already exists"): the name
is a digest, so an existing complete blob is this very content. Readers never look at the
temporary files (``.<hex>.<random>.tmp``); ``ensure()`` removes those a crash left behind
long ago, and every commit removes its own on failure.

Blobs are never moved out of the store or edited in place: an output is a copy
(``copy_into``: a reflink where the file system can), another layout gets a hardlink or a
verified copy. Removing a blob is ``remove()``'s job alone, called by ``resumer prune``.

The durable-file primitives (``fsync_dir``, ``make_dirs``, ``create_temp``,
``write_atomic``) live here too, so the rest of resumer has one implementation of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from pathlib import Path
from typing import BinaryIO, TypeVar

from ..digest import Digest
from ..errors import DigestMismatchError, TransferError, disk_error

T = TypeVar("T")

#: Temp files older than this are debris from a crash, not a write in progress.
STALE_TMP_SECONDS = 3600.0
TMP_SUFFIX = ".tmp"
_HEX = re.compile(r"[0-9a-f]{64}")
_COPY_CHUNK = 1 << 20

#: ``ioctl(dst, FICLONE, src)``: share src's extents (btrfs, XFS, bcachefs, OCFS2 …).
FICLONE = 0x40049409

# Errors that mean "this file system or kernel cannot do it this way", so the next, slower
# way is tried; any other error (ENOSPC, EIO …) is real and raised.
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.EBADF, errno.ENOSYS}
_NO_COPY_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
# os.link cannot make this hardlink (another file system, or one without hardlinks).
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP}


# ------------------------------------------------------------------ durable primitives


def fsync_dir(path: Path) -> None:
    """Make a rename, creation or removal in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new directories survive a power cut: each new one's parent is
    fsynced (a file later synced inside an unsynced directory is lost with it)."""
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(0o777)
        except FileExistsError:
            if not d.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(d)) from None
        fsync_dir(d.parent)


def create_temp(directory: Path, prefix: str, suffix: str = TMP_SUFFIX) -> tuple[int, Path]:
    """A new file ``directory/PREFIX<random>SUFFIX`` open for writing, like ``mkstemp``
    but with the mode ``open()`` gives (0o666 & ~umask, so 0644 for umask 022), not 0600:
    what is renamed into a layout must be readable by another user's skopeo or podman."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(100):
        path = _temp_name(directory, prefix, suffix)
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(directory))


def write_atomic(dest: Path, data: bytes) -> None:
    """Temp file in dest's directory, fsync, rename over dest, fsync the directory."""
    fd, tmp = create_temp(dest.parent, f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def remove_stale_temps(directory: Path, now: float | None = None) -> None:
    """Remove the temp files a crash left in ``directory`` more than an hour ago (a
    younger one may belong to a write in progress in another process)."""
    now = time.time() if now is None else now
    for p in directory.glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                p.unlink()


def _temp_name(directory: Path, prefix: str, suffix: str) -> Path:
    return directory / f"{prefix}{os.urandom(6).hex()}{suffix}"


# ------------------------------------------------------------------ copying data


def copy_into(src: int, dst: int) -> str:
    """All of the regular file ``src`` into the new, empty regular file ``dst``.

    The cheapest way the file system allows, each tried only if the one before says it
    cannot (never on a real error such as ENOSPC): a reflink (``FICLONE``, no data
    copied), then ``copy_file_range`` (in the kernel, maybe server-side or reflinked),
    then ``sendfile``, then read and write. A way that gives up midway hands on from the
    offset it reached. Returns the name of the way that finished, for logs and tests.
    The caller syncs ``dst``; a copy shorter than ``src`` raises EIO.
    """
    size = os.fstat(src).st_size
    if _reflink(src, dst):
        _check_copied(dst, size)
        return "reflink"
    offset = 0
    ways: list[tuple[str, Callable[[int, int, int, int], int], set[int]]] = [
        ("copy_file_range", _copy_file_range, _NO_COPY_RANGE),
        ("sendfile", _sendfile, _NO_SENDFILE),
    ]
    for name, way, unsupported in ways:
        try:
            offset = way(src, dst, offset, size)
        except _GaveUp as gave_up:
            if gave_up.errno not in unsupported:
                raise gave_up.cause from None
            offset = gave_up.offset
            continue
        _check_copied(dst, size)
        return name
    _read_write(src, dst, offset, size)
    _check_copied(dst, size)
    return "read/write"


def copy_range(src: int, dst: int, start: int, end: int) -> None:
    """Bytes [start, end) of ``src`` to the same offsets of ``dst``: in the kernel
    (``copy_file_range``) where it can, else read and write. For a copy that follows a
    file as it grows, a range at a time (see ``tee.py``)."""
    try:
        _copy_file_range(src, dst, start, end)
    except _GaveUp as gave_up:
        if gave_up.errno not in _NO_COPY_RANGE:
            raise gave_up.cause from None
        _read_write(src, dst, gave_up.offset, end)


def can_reflink(src_dir: Path, dst_dir: Path) -> bool:
    """Whether a file in ``src_dir`` can be reflinked into ``dst_dir`` (probed with two
    small temp files): then a copy of a finished blob costs no data copy."""
    sfd, spath = create_temp(src_dir, ".reflink-probe.")
    try:
        os.write(sfd, b"\0" * 4096)
        rfd = os.open(spath, os.O_RDONLY | os.O_CLOEXEC)  # a clone reads its source
        dfd, dpath = create_temp(dst_dir, ".reflink-probe.")
        try:
            return _reflink(rfd, dfd)
        except OSError:
            return False
        finally:
            os.close(dfd)
            os.close(rfd)
            dpath.unlink(missing_ok=True)
    finally:
        os.close(sfd)
        spath.unlink(missing_ok=True)


class _GaveUp(Exception):
    """A way of copying failed at ``offset`` with ``cause``."""

    def __init__(self, cause: OSError, offset: int) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.errno = cause.errno
        self.offset = offset


def _reflink(src: int, dst: int) -> bool:
    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError as exc:
        if exc.errno in _NO_REFLINK:
            return False
        raise
    return True


def _copy_file_range(src: int, dst: int, offset: int, size: int) -> int:
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is None:  # not Linux
        raise _GaveUp(OSError(errno.ENOSYS, "no copy_file_range"), offset)
    while offset < size:
        try:
            # Explicit offsets on both sides: neither file position is used or moved.
            n = copy_range(src, dst, min(size - offset, 1 << 30), offset, offset)
        except OSError as exc:
            raise _GaveUp(exc, offset) from exc
        offset = _advance(offset, n, size)
    return offset


def _sendfile(src: int, dst: int, offset: int, size: int) -> int:
    os.lseek(dst, offset, os.SEEK_SET)  # sendfile writes at dst's position
    while offset < size:
        try:
            n = os.sendfile(dst, src, offset, min(size - offset, 1 << 30))
        except OSError as exc:
            raise _GaveUp(exc, offset) from exc
        offset = _advance(offset, n, size)
    return offset


def _read_write(src: int, dst: int, offset: int, size: int) -> None:
    while offset < size:
        block = os.pread(src, min(_COPY_CHUNK, size - offset), offset)
        if not block:
            _advance(offset, 0, size)  # raises: the source shrank
        view = memoryview(block)
        while view:
            written = os.pwrite(dst, view, offset)
            view = view[written:]
            offset += written


def _advance(offset: int, n: int, size: int) -> int:
    if n == 0:  # the source shrank under us: never let a short copy through
        raise OSError(errno.EIO, f"short copy: {offset} of {size} bytes")
    return offset + n


def _check_copied(dst: int, size: int) -> None:
    got = os.fstat(dst).st_size
    if got != size:
        raise OSError(errno.EIO, f"short copy: {got} of {size} bytes")


# ------------------------------------------------------------------ the store


class ContentStore:
    """The blobs of one ``blobs/sha256/`` directory: commit, import, read, remove.

    Blocking work (syncs, hashing, copies) runs off the event loop; every OSError leaves
    as a ``StoreError`` (``DiskFullError`` for ENOSPC/EDQUOT) naming the blob.
    """

    def __init__(self, blobs_dir: Path | str) -> None:
        self.dir = Path(blobs_dir).absolute()

    def __repr__(self) -> str:
        return f"ContentStore({str(self.dir)!r})"

    # --- readers (cheap metadata calls: fine on the loop, as os.stat is)

    def path(self, digest: str) -> Path:
        """Where the blob lives; the digest is validated, so no path escapes the store."""
        return self.dir / Digest.parse(digest).hex

    def has(self, digest: str, size: int | None = None) -> bool:
        """Whether the blob is committed here (with ``size`` bytes, if given)."""
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def open_blob(self, digest: str) -> BinaryIO:
        """The committed blob, open for reading; ``StoreError`` if it is not here."""
        path = self.path(digest)
        try:
            return path.open("rb")
        except OSError as exc:
            raise disk_error(f"cannot read blob {digest} in {self.dir}", exc) from exc

    def blobs(self) -> list[tuple[str, os.stat_result]]:
        """(digest, stat) of every committed blob; temp files and files whose name is no
        digest (put there by hand) are not blobs."""
        out = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self.dir) as entries:
            for entry in entries:
                if not _HEX.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    out.append(("sha256:" + entry.name, entry.stat(follow_symlinks=False)))
        return out

    # --- setup

    def ensure(self) -> None:
        """Create the directory if needed (durably); remove old crash debris."""
        try:
            make_dirs(self.dir)
            remove_stale_temps(self.dir)
        except OSError as exc:
            raise disk_error(f"cannot create content store {self.dir}", exc) from exc

    # --- commits: the only ways in

    async def commit_file(
        self,
        fd: int | None,
        tmp_path: Path,
        digest: str,
        size: int,
        *,
        executor: Executor | None = None,
    ) -> Path:
        """Commit the finished file ``tmp_path`` (a partial) as ``digest``; its path.

        Contract: the caller has already verified ``digest`` with its streaming sha256
        over exactly the bytes it wrote, so the content is *not* hashed again here (that
        would read a 1 GiB blob twice). What is checked is that the file holds ``size``
        bytes. ``fd``, if given, is an open descriptor of ``tmp_path``: it is synced and
        always closed, even on failure. ``tmp_path`` must be on the store's file system.

        On success ``tmp_path`` is gone (renamed in, or removed when the blob already
        existed). On failure it is left where it is, unrenamed: it is the caller's
        partial, and invariant 4 keeps it.
        """
        Digest.parse(digest)
        run = functools.partial(_commit_file, fd, Path(tmp_path), self.path(digest), size)
        try:
            await asyncio.get_running_loop().run_in_executor(executor, run)
        except OSError as exc:
            raise disk_error(f"cannot commit blob {digest} to {self.dir}", exc) from exc
        except _WrongSize as exc:
            raise TransferError(f"blob {digest}: {exc}, refusing to commit it") from None
        return self.path(digest)

    async def commit_bytes(self, data: bytes, digest: str | None = None) -> str:
        """Commit a small blob (config, manifest), verifying ``digest`` if given; the
        digest it is stored under. ``DigestMismatchError`` if the content hashes to
        another one: then nothing is written."""
        return await self._off_loop(
            f"cannot write blob {digest or 'of ' + str(len(data)) + ' bytes'} to {self.dir}",
            _commit_bytes,
            self.dir,
            data,
            digest,
        )

    async def import_verified(self, src: Path, digest: str) -> Path:
        """Make the committed blob ``src`` of another store visible here as ``digest``.

        Same file system: a hardlink, which costs no copy (``src`` was verified when it
        was committed, and a link is no new copy of the bytes). Otherwise a copy hashed
        on the way, since a copy is a new chance for corruption: ``DigestMismatchError``
        if it does not hash to ``digest``, and nothing becomes visible.
        """
        dest = self.path(digest)
        await self._off_loop(
            f"cannot add blob {digest} from {src} to {self.dir}",
            _import_verified,
            Path(src),
            dest,
            digest,
        )
        return dest

    # --- removal: ``resumer prune`` only

    async def remove(self, digests: Iterable[str]) -> None:
        """Remove these blobs, then sync the directory once."""
        paths = [self.path(d) for d in digests]
        if paths:
            await self._off_loop(f"cannot remove blobs from {self.dir}", _remove_all, paths)

    async def _off_loop(self, doing: str, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as exc:
            raise disk_error(doing, exc) from exc


class _WrongSize(Exception):
    """The file to commit does not hold the promised number of bytes."""


def _commit_file(fd: int | None, tmp: Path, dest: Path, size: int) -> None:
    """Worker thread: sync, size check, rename (or "already exists"), directory sync."""
    if fd is None:
        fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        got = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if got != size:
        raise _WrongSize(f"{tmp} holds {got} bytes, not {size}")
    if _exists(dest, size):
        # containerd: "already exists" is success. The partial is then a leftover; if a
        # cut undoes its removal, gc removes it again (its transfer is committed).
        tmp.unlink(missing_ok=True)
    else:
        # Over a wrong-sized blob too: that one is broken, this one is verified.
        os.replace(tmp, dest)
    # The new name must be durable before the caller records the commit. The old name's
    # removal from ingest/ needs no sync: a partial whose blob is committed is gc's.
    fsync_dir(dest.parent)


def _commit_bytes(directory: Path, data: bytes, digest: str | None) -> str:
    """Worker thread: hash (manifests may be large), verify, write durably."""
    actual = Digest.of(data)
    if digest is not None and Digest.parse(digest) != actual:
        raise DigestMismatchError(
            f"blob {digest}: content hashes to {actual}, refusing to store it", resumed=False
        )
    dest = directory / actual.hex
    if not _exists(dest, len(data)):
        write_atomic(dest, data)
    else:
        fsync_dir(directory)  # the name may be another commit's, not yet synced
    return str(actual)


def _import_verified(src: Path, dest: Path, digest: str) -> None:
    """Worker thread: "already exists", else hardlink, else a hashed copy."""
    size = src.stat().st_size
    if _exists(dest, size):
        return
    try:
        _link_in(src, dest)
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        _copy_in(src, dest, digest)
    fsync_dir(dest.parent)


def _link_in(src: Path, dest: Path) -> None:
    """Hardlink ``src`` under a temp name, then rename it over ``dest``: a wrong-sized
    blob in the way is replaced, and the name appears atomically."""
    for _ in range(100):
        tmp = _temp_name(dest.parent, f".{dest.name}.", TMP_SUFFIX)
        try:
            os.link(src, tmp)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary name", str(dest.parent))
    try:
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_in(src: Path, dest: Path, digest: str) -> None:
    want = Digest.parse(digest)
    h = hashlib.sha256()
    fd, tmp = create_temp(dest.parent, f".{want.hex}.")
    try:
        # fdopen first: it owns fd from here on, so fd is closed whatever fails next.
        with os.fdopen(fd, "wb") as fout, src.open("rb") as fin:
            while block := fin.read(_COPY_CHUNK):
                h.update(block)
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
        if h.hexdigest() != want.hex:
            raise DigestMismatchError(
                f"blob {digest}: copy of {src} hashes to sha256:{h.hexdigest()}",
                resumed=False,
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_all(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
    if paths:
        fsync_dir(paths[0].parent)


def _exists(dest: Path, size: int) -> bool:
    try:
        return dest.stat().st_size == size
    except FileNotFoundError:
        return False


__all__ = [
    "FICLONE",
    "STALE_TMP_SECONDS",
    "ContentStore",
    "copy_into",
    "create_temp",
    "fsync_dir",
    "make_dirs",
    "remove_stale_temps",
    "write_atomic",
]
