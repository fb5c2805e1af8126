"""A power-cut file system for tests: a FUSE pass-through that forgets every unsynced write.

SIGKILL is no power cut: the page cache keeps every write a killed process made. This file
system keeps a real directory, the *backing* directory, equal to what a disk would still
hold after a power cut at any instant, and drops everything else on ``cut()``::

    with PowerCutFS(backing, mountpoint) as fs:     # mounts; waits until it answers
        ...                                         # a process works under mountpoint
        fs.pending()                                # what a cut would drop now
        fs.cut()                                    # power off: unsynced state is gone
        fs.mount()                                  # reboot over the same backing

How it works. The daemon (``python -m resumer.lab.powercut BACKING MOUNTPOINT``, a process
of its own so that the process under test can be frozen and killed independently) copies
the backing tree to a *shadow* tree on mount and passes every operation through to the
shadow, so reads, ``mmap(MAP_SHARED)`` and locks behave as on a plain file system. Beside
that it keeps, in memory, a log of the operations that are not durable yet (with the data of
every write), and applies a part of that log to the backing tree when a sync makes it durable.
So the backing tree is the durable state at every instant, not only after a cut. Files are
identified by inode, not by path: a file may be renamed after it was written and before it
is synced.

The durability rules (the strict POSIX reading, with no journal to make more durable than
asked, so that a missing sync is a lost write):

- **File data** (``write``, ``truncate``/``ftruncate``, ``O_TRUNC``, ``fallocate``) is
  durable after ``fsync`` or ``fdatasync`` of any open file descriptor of the same inode.
- **Attributes** (``chmod``, ``chown``, ``utime``) of a file or directory are durable after
  ``fsync`` (not ``fdatasync``) of that inode. A full fsync also makes its times durable.
- **Directory entries** (create, ``mkdir``, ``mknod``, ``symlink``, ``link``, ``unlink``,
  ``rmdir``) are durable after ``fsync`` (or ``fdatasync``) of the directory that holds the
  entry (a directory file descriptor: ``os.open(dir, O_RDONLY)`` then ``os.fsync``).
- **A rename** is durable, as one atomic operation (new name there, old name gone), once
  the *destination* directory is fsynced. If the file got its source name from a rename
  that is still pending, that rename is made durable first, so that a chain ``a -> b -> c``
  never leaves ``a`` behind. A fsync of the *source* directory makes durable what changed
  in it, the old name's removal, and no more: until the destination is fsynced too, the
  file has no durable name and a cut loses it (as a disk that wrote one directory block of
  the two would). So every directory's fsync covers every change of its own entries.
- **An inode that is synced but has no durable name** (created and fsynced, but its
  directory never was) keeps its data aside; it becomes visible when a name for it becomes
  durable, and a cut loses it, like an orphan inode that fsck discards. A fsync of a
  directory whose own entry is not durable makes its entries durable inside an invisible
  directory the same way.
- ``sync(2)``, ``syncfs(2)`` and ``close()`` make nothing durable (FUSE does not forward
  the first two); ``O_SYNC``/``O_DSYNC`` writes are durable because the kernel sends the fsync.
- An entry changes in log order, like the directory block that holds it: when an operation
  on an entry becomes durable, the entry takes the value it had right after it (that inode,
  or none), and older pending operations no longer change it (a later fsync never brings
  back a replaced or removed name). Operations made durable together (by one fsync, or a
  cut's subset) are one write of the block: the newest of them on an entry sets it. A
  create whose name is superseded so still creates its inode, without a name.
- Writes through ``mmap`` reach the daemon when the kernel writes the pages back (msync,
  munmap, close, or its own writeback); ``msync(MS_SYNC)`` makes them durable.

A cut may also keep an arbitrary subset of the pending operations, as a disk may persist
any subset of unsynced writes, torn and out of order: `pending()` lists them, every data
write split into its 4 KiB sector pieces, and ``cut(keep=...)`` applies exactly the chosen
ones in log order, by the rules above, skipping those that no longer apply: an entry in a
directory that is not durable, a rename or link of an inode whose create was dropped, data
of an inode that was never created, a change of an entry that a newer kept operation sets,
a rename that would put a directory inside itself. `keep_random` draws a seeded subset.

After a cut the daemon answers every request of the old mount with EIO, then exits, which
aborts the FUSE connection: a process frozen on the old mount gets ENOTCONN afterwards, and
its open files close without waiting for anyone. The mount point is detached lazily, so a
remount over the same directory works while that process still holds its descriptors.

Hard links: libfuse's high-level API makes each name a kernel inode of its own. With the
default ``attr_timeout=0`` sizes and link counts are exact through every name (a reopen
drops the page cache); ``attr_timeout=1`` caches attributes in the kernel, so stat is
about 20 times faster, but a write through one name may show through another one up to
a second late. Durability is tracked by inode either way.

Limits: no extended attributes (EOPNOTSUPP); ``fallocate`` supports mode 0 and
``FALLOC_FL_KEEP_SIZE`` only (others give EOPNOTSUPP); ``RENAME_EXCHANGE`` gives EINVAL;
``flock`` and POSIX locks are kept by the kernel, per mount (a remount drops them, as a
reboot does); the backing tree itself is not fsynced to the real disk (it is a fixture, not
a store). Needs /dev/fuse, ``fusermount3`` (Debian: fuse3), libfuse3.so.3 (libfuse3-3) and
the ``mfusepy`` package.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from ctypes.util import find_library
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

__all__ = [
    "SECTOR",
    "CutReport",
    "PendingOp",
    "PowerCutCore",
    "PowerCutError",
    "PowerCutFS",
    "is_mounted",
    "keep_random",
    "lazy_unmount",
    "unavailable_reason",
]

SECTOR = 4096
"""Data writes are listed in pieces that never cross a multiple of this many bytes."""

MAX_WRITE = 1 << 20
ROOT = 1

# The kinds of log entries, by what makes them durable.
DATA_KINDS = frozenset({"write", "truncate", "fallocate"})  # fsync/fdatasync of the inode
ATTR_KINDS = frozenset({"chmod", "chown", "utime"})  # fsync of the inode
ENTRY_KINDS = frozenset({"create", "mkdir", "mknod", "symlink", "link", "unlink", "rmdir"})
NS_KINDS = ENTRY_KINDS | {"rename"}  # fsync of the directory (the destination, for rename)
_SETTERS = frozenset({"create", "mkdir", "mknod", "symlink", "link"})

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_FALLOC_FL_KEEP_SIZE = 1
_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
_FUSE_CAP_WRITEBACK_CACHE = 1 << 16

log = logging.getLogger("resumer.lab.powercut")


class PowerCutError(Exception):
    """The power-cut file system could not mount, answer or unmount."""


@dataclass(frozen=True)
class PendingOp:
    """One unsynced operation that a cut would drop, as `PowerCutFS.pending` lists it.

    ``path`` is the file or entry concerned (relative to the mount, "" for its root) when
    the operation happened; ``dest`` the rename destination, the existing file of a link or
    a symlink's target. A write piece has ``offset`` and ``size``; a truncate or fallocate
    the new ``size``; a chmod the ``mode``. ``sync_path`` names the file or directory whose
    fsync would make it durable, and ``node`` the inode (a number of this daemon's own,
    stable across renames).
    """

    id: int
    kind: str
    path: str
    node: int
    sync_path: str
    dest: str | None = None
    offset: int = 0
    size: int = 0
    mode: int = 0


@dataclass(frozen=True)
class CutReport:
    """What a cut (or `PowerCutFS.sync`) did with the pending operations."""

    kept: tuple[int, ...]
    """Ids applied to the backing tree."""
    skipped: tuple[int, ...]
    """Ids asked for that no longer applied (see the module doc)."""
    dropped: int
    """How many pending ids were not applied."""
    errors: tuple[str, ...] = ()
    """Internal errors of the daemon since it mounted (empty unless it has a bug)."""


Keep = Iterable[int] | Callable[[PendingOp], bool] | None


def keep_random(ops: Iterable[PendingOp], seed: int, fraction: float = 0.5) -> set[int]:
    """A seeded random subset of ``ops`` (each kept with probability ``fraction``)."""
    rng = random.Random(seed)
    return {op.id for op in ops if rng.random() < fraction}


# -- the durability model ----------------------------------------------------------------


@dataclass(eq=False)
class _Node:
    """An inode. ``names``/``entries`` describe the durable tree, ``live`` the shadow tree."""

    id: int
    kind: str  # "file", "dir", "symlink" or "special"
    mode: int
    uid: int
    gid: int
    rdev: int = 0
    target: str = ""
    durable: bool = False
    names: set[tuple[int, str]] = field(default_factory=set)
    entries: dict[str, int] = field(default_factory=dict)
    live: set[tuple[int, str]] = field(default_factory=set)


@dataclass(eq=False)
class _Op:
    """One log entry. A write uses ``count`` ids, one per sector piece; the rest use one."""

    seq: int
    kind: str
    node: int
    group: int  # the inode whose fsync makes it durable
    path: str
    sync_path: str
    count: int = 1
    parent: int = 0
    name: str = ""
    parent2: int = 0
    name2: str = ""
    dest: str | None = None
    offset: int = 0
    data: bytes = b""
    length: int = 0
    mode: int = 0
    uid: int = -1
    gid: int = -1
    times: tuple[int, int] = (0, 0)
    source_group: int = 0  # a rename across directories: its source, whose fsync drops the
    # old name (only that); 0 once done or for the other kinds

    def ids(self) -> range:
        return range(self.seq, self.seq + self.count)

    def pieces(self) -> Iterator[tuple[int, int, int]]:
        """(id, start, end) of each sector piece of a write, in absolute file offsets."""
        start, end = self.offset, self.offset + len(self.data)
        pid = self.seq
        while start < end:
            stop = min(end, (start // SECTOR + 1) * SECTOR)
            yield pid, start, stop
            pid += 1
            start = stop


def _piece_count(offset: int, size: int) -> int:
    return (offset + size - 1) // SECTOR - offset // SECTOR + 1 if size else 0


def _kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "special"


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(
    fn: Callable[Concatenate[PowerCutCore, _P], _R],
) -> Callable[Concatenate[PowerCutCore, _P], _R]:
    """One operation at a time, and none after the cut: the frozen process gets EIO."""

    @functools.wraps(fn)
    def wrapper(self: PowerCutCore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.lock:
            if self.dead:
                raise OSError(errno.EIO, "the power is cut")
            try:
                return fn(self, *args, **kwargs)
            except OSError:
                raise
            except Exception as exc:
                # A bug here must not pass silently as EINVAL: the report of the cut names it.
                self.errors.append(f"{fn.__name__}: {traceback.format_exc()}")
                raise OSError(errno.EIO, f"power-cut fs internal error: {exc}") from exc

    return wrapper


class PowerCutCore:
    """The pass-through and the durability log, without FUSE (the daemon wraps it).

    Methods take FUSE-style paths ("/a/b") and return shadow file descriptors as handles.
    Tests may drive it in-process: it needs no root and no /dev/fuse.
    """

    def __init__(self, backing: str, shadow: str, orphans: str) -> None:
        """Copy ``backing`` to ``shadow`` (both replaced if there); ``orphans`` holds the
        durable inodes that have no durable name (same file system as ``backing``)."""
        self.backing = os.path.abspath(backing)
        self.shadow = os.path.abspath(shadow)
        self.orphans = os.path.abspath(orphans)
        self.lock = threading.RLock()
        self.dead = False
        self.errors: list[str] = []
        self.caller: Callable[[], tuple[int, int]] | None = None
        self.stats: dict[str, int] = {
            "writes": 0,
            "bytes_written": 0,
            "max_write": 0,
            "fsync": 0,
            "fsyncdir": 0,
            "applied": 0,
        }
        self._seq = 1
        self._next_node = ROOT
        self.nodes: dict[int, _Node] = {}
        self._ino: dict[int, int] = {}  # shadow st_ino -> node id, for the live inodes
        self._fh: dict[int, int] = {}  # shadow fd -> node id
        self.pending_log: dict[int, _Op] = {}  # seq -> op, in log order
        self._groups: dict[int, dict[int, _Op]] = {}
        self._entry_seq: dict[tuple[int, str], int] = {}  # newest durable change of an entry
        for d in (self.shadow, self.orphans):
            if os.path.lexists(d):
                shutil.rmtree(d)
        os.makedirs(self.shadow)
        os.makedirs(self.orphans)
        # cp -a keeps modes, times, symlinks and hard links; reflinks make it cheap.
        subprocess.run(
            ["cp", "-a", "--reflink=auto", "--", f"{self.backing}/.", self.shadow],
            check=True,
            capture_output=True,
        )
        self._load()

    # -- setup -----------------------------------------------------------------------------

    def _load(self) -> None:
        """The durable tree is the backing tree; map each of its inodes to the shadow copy."""
        bst = os.lstat(self.backing)
        root = self._new_node(os.lstat(self.shadow), durable=True)
        root.mode, root.uid, root.gid = bst.st_mode, bst.st_uid, bst.st_gid
        by_backing_ino: dict[int, _Node] = {}

        def walk(bdir: str, sdir: str, parent: _Node) -> None:
            for name in sorted(os.listdir(bdir)):
                bpath, spath = os.path.join(bdir, name), os.path.join(sdir, name)
                bst, sst = os.lstat(bpath), os.lstat(spath)
                node = by_backing_ino.get(bst.st_ino)
                if node is None or stat.S_ISDIR(bst.st_mode):
                    node = self._new_node(sst, durable=True)
                    if node.kind == "symlink":
                        node.target = os.readlink(bpath)
                    by_backing_ino[bst.st_ino] = node
                else:
                    self._ino[sst.st_ino] = node.id
                node.names.add((parent.id, name))
                node.live.add((parent.id, name))
                parent.entries[name] = node.id
                if node.kind == "dir":
                    walk(bpath, spath, node)

        walk(self.backing, self.shadow, root)

    def _new_node(self, st: os.stat_result, *, durable: bool = False) -> _Node:
        node = _Node(
            id=self._next_node,
            kind=_kind_of(st.st_mode),
            mode=st.st_mode,
            uid=st.st_uid,
            gid=st.st_gid,
            rdev=st.st_rdev,
            durable=durable,
        )
        self._next_node += 1
        self.nodes[node.id] = node
        # A new inode may reuse the number of a dead one: the number now means this node.
        self._ino[st.st_ino] = node.id
        return node

    # -- paths and lookups -----------------------------------------------------------------

    def _sp(self, path: str) -> str:
        return self.shadow + path if path != "/" else self.shadow

    def _node_of(self, st: os.stat_result) -> _Node:
        nid = self._ino.get(st.st_ino)
        if nid is None:  # never happens while only this daemon changes the shadow tree
            return self._new_node(st)
        return self.nodes[nid]

    def _lookup(self, path: str) -> _Node:
        return self._node_of(os.lstat(self._sp(path)))

    def _split(self, path: str) -> tuple[_Node, str]:
        parent, name = os.path.split(path)
        return self._lookup(parent), name

    def _handle(self, fh: int) -> _Node:
        try:
            return self.nodes[self._fh[fh]]
        except KeyError:
            raise OSError(errno.EBADF, "unknown file handle") from None

    def live_path(self, node: _Node) -> str:
        """The node's current path in the mount ("" for the root), for labels."""
        if node.id == ROOT:
            return ""
        paths = [self._join(self.live_path(self.nodes[p]), n) for p, n in node.live]
        return min(paths) if paths else f"<unlinked #{node.id}>"

    @staticmethod
    def _join(parent: str, name: str) -> str:
        return f"{parent}/{name}" if parent else name

    def _label(self, path: str) -> str:
        return path.strip("/")

    def _set_owner(self, spath: str) -> None:
        """A file created through the mount belongs to the caller, not to the daemon."""
        if self.caller is not None and os.geteuid() == 0:
            uid, gid = self.caller()
            os.lchown(spath, uid, gid)

    def _log(self, kind: str, node: _Node, group: _Node, path: str, **kw: Any) -> _Op:
        op = _Op(
            seq=self._seq,
            kind=kind,
            node=node.id,
            group=group.id,
            path=path,
            sync_path=self.live_path(group),
            **kw,
        )
        if kind == "write":
            op.count = _piece_count(op.offset, len(op.data))
        self._seq += op.count
        self.pending_log[op.seq] = op
        self._groups.setdefault(group.id, {})[op.seq] = op
        if kind == "rename" and op.parent != op.parent2:
            op.source_group = op.parent
            self._groups.setdefault(op.parent, {})[op.seq] = op
        return op

    def _ungroup(self, op: _Op, gid: int) -> None:
        group = self._groups.get(gid)
        if group is not None:
            group.pop(op.seq, None)
            if not group:
                del self._groups[gid]

    def _drop(self, op: _Op) -> None:
        self.pending_log.pop(op.seq, None)
        self._ungroup(op, op.group)
        if op.source_group:
            self._ungroup(op, op.source_group)

    # -- pass-through operations (what FUSE calls) -------------------------------------------

    @_locked
    def getattr(self, path: str | None, fh: int | None = None) -> os.stat_result:
        if fh is not None:
            return os.fstat(fh)
        assert path is not None
        return os.lstat(self._sp(path))

    @_locked
    def readlink(self, path: str) -> str:
        return os.readlink(self._sp(path))

    @_locked
    def statfs(self, path: str) -> os.statvfs_result:
        return os.statvfs(self.shadow)

    @_locked
    def mkdir(self, path: str, mode: int) -> None:
        parent, name = self._split(path)
        spath = self._sp(path)
        os.mkdir(spath, mode & 0o7777)
        self._set_owner(spath)
        node = self._new_node(os.lstat(spath))
        node.live.add((parent.id, name))
        self._log("mkdir", node, parent, self._label(path), parent=parent.id, name=name)

    @_locked
    def mknod(self, path: str, mode: int, dev: int) -> None:
        if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise OSError(errno.EPERM, "only files, FIFOs and sockets")
        parent, name = self._split(path)
        spath = self._sp(path)
        os.mknod(spath, mode, dev)
        self._set_owner(spath)
        node = self._new_node(os.lstat(spath))
        node.live.add((parent.id, name))
        kind = "create" if node.kind == "file" else "mknod"
        self._log(kind, node, parent, self._label(path), parent=parent.id, name=name)

    @_locked
    def symlink(self, path: str, target: str) -> None:
        parent, name = self._split(path)
        spath = self._sp(path)
        os.symlink(target, spath)
        self._set_owner(spath)
        node = self._new_node(os.lstat(spath))
        node.target = target
        node.live.add((parent.id, name))
        self._log(
            "symlink", node, parent, self._label(path), parent=parent.id, name=name, dest=target
        )

    @_locked
    def link(self, path: str, existing: str) -> None:
        parent, name = self._split(path)
        node = self._lookup(existing)
        os.link(self._sp(existing), self._sp(path), follow_symlinks=False)
        node.live.add((parent.id, name))
        self._log(
            "link",
            node,
            parent,
            self._label(path),
            parent=parent.id,
            name=name,
            dest=self._label(existing),
        )

    @_locked
    def unlink(self, path: str) -> None:
        self._remove(path, "unlink")

    @_locked
    def rmdir(self, path: str) -> None:
        self._remove(path, "rmdir")

    def _remove(self, path: str, kind: str) -> None:
        parent, name = self._split(path)
        spath = self._sp(path)
        node = self._node_of(os.lstat(spath))
        (os.rmdir if kind == "rmdir" else os.unlink)(spath)
        node.live.discard((parent.id, name))
        self._log(kind, node, parent, self._label(path), parent=parent.id, name=name)

    @_locked
    def rename(self, old: str, new: str, flags: int = 0) -> None:
        if flags & ~_RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "only RENAME_NOREPLACE is supported")
        src, dst = self._sp(old), self._sp(new)
        sst = os.lstat(src)
        try:
            dst_st: os.stat_result | None = os.lstat(dst)
        except FileNotFoundError:
            dst_st = None
        if dst_st is not None and flags & _RENAME_NOREPLACE:
            raise OSError(errno.EEXIST, "destination exists")
        p1, n1 = self._split(old)
        p2, n2 = self._split(new)
        os.rename(src, dst)
        if dst_st is not None and dst_st.st_ino == sst.st_ino:
            return  # two names of one inode: POSIX says the rename does nothing
        node = self._node_of(sst)
        if dst_st is not None:
            self._node_of(dst_st).live.discard((p2.id, n2))
        node.live.discard((p1.id, n1))
        node.live.add((p2.id, n2))
        self._log(
            "rename",
            node,
            p2,
            self._label(old),
            parent=p1.id,
            name=n1,
            parent2=p2.id,
            name2=n2,
            dest=self._label(new),
        )

    @_locked
    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> None:
        if fh is not None:
            node = self._handle(fh)
            os.fchmod(fh, mode & 0o7777)
        else:
            assert path is not None
            node = self._lookup(path)
            os.chmod(self._sp(path), mode & 0o7777)
        self._log("chmod", node, node, self.live_path(node), mode=mode & 0o7777)

    @_locked
    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> None:
        if fh is not None:
            node = self._handle(fh)
            os.fchown(fh, uid, gid)
            st = os.fstat(fh)
        else:
            assert path is not None
            node = self._lookup(path)
            os.lchown(self._sp(path), uid, gid)
            st = os.lstat(self._sp(path))
        self._log("chown", node, node, self.live_path(node), uid=st.st_uid, gid=st.st_gid)

    @_locked
    def utimens(
        self,
        path: str | None,
        times: tuple[tuple[int, int], tuple[int, int]] | None,
        fh: int | None = None,
    ) -> None:
        """``times`` as (seconds, nanoseconds) pairs, which may hold UTIME_NOW/UTIME_OMIT."""
        target: int | str
        if fh is not None:
            node, target = self._handle(fh), fh
            st = os.fstat(fh)
        else:
            assert path is not None
            target = self._sp(path)
            node, st = self._lookup(path), os.lstat(target)
        now = time.time_ns()

        def pick(ts: tuple[int, int] | None, current: int) -> int:
            if ts is None or ts[1] == _UTIME_NOW:
                return now
            if ts[1] == _UTIME_OMIT:
                return current
            return ts[0] * 1_000_000_000 + ts[1]

        ns = (
            pick(times[0] if times else None, st.st_atime_ns),
            pick(times[1] if times else None, st.st_mtime_ns),
        )
        if isinstance(target, int):
            os.utime(target, ns=ns)
        else:
            os.utime(target, ns=ns, follow_symlinks=False)
        self._log("utime", node, node, self.live_path(node), times=ns)

    @_locked
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        if fh is not None:
            node = self._handle(fh)
            size = os.fstat(fh).st_size
            os.ftruncate(fh, length)
        else:
            assert path is not None
            spath = self._sp(path)
            st = os.lstat(spath)
            node, size = self._node_of(st), st.st_size
            os.truncate(spath, length)
        if size != length:
            self._log("truncate", node, node, self.live_path(node), length=length)

    @staticmethod
    def _open_flags(flags: int) -> int:
        # O_APPEND is left out: the kernel sends the offset, and pwrite on an O_APPEND fd
        # would append anyway. O_DIRECT would need aligned buffers; O_SYNC is the kernel's.
        return (flags & (os.O_ACCMODE | os.O_TRUNC)) | os.O_CLOEXEC

    @_locked
    def open(self, path: str, flags: int) -> int:
        spath = self._sp(path)
        st = os.lstat(spath)
        node = self._node_of(st)
        fd = os.open(spath, self._open_flags(flags))
        if flags & os.O_TRUNC and st.st_size and flags & os.O_ACCMODE != os.O_RDONLY:
            self._log("truncate", node, node, self.live_path(node), length=0)
        self._fh[fd] = node.id
        return fd

    @_locked
    def create(self, path: str, mode: int, flags: int) -> int:
        parent, name = self._split(path)
        spath = self._sp(path)
        try:
            st: os.stat_result | None = os.lstat(spath)
        except FileNotFoundError:
            st = None
        if st is not None:  # the kernel asks for a create only when the name is free
            if flags & os.O_EXCL:
                raise OSError(errno.EEXIST, "exists")
            return self.open(path, flags)  # the lock is reentrant
        fd = os.open(spath, self._open_flags(flags) | os.O_CREAT | os.O_EXCL, mode & 0o7777)
        self._set_owner(spath)
        node = self._new_node(os.fstat(fd))
        node.live.add((parent.id, name))
        self._log("create", node, parent, self._label(path), parent=parent.id, name=name)
        self._fh[fd] = node.id
        return fd

    @_locked
    def read(self, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    @_locked
    def write(self, data: bytes, offset: int, fh: int) -> int:
        node = self._handle(fh)
        n = os.pwrite(fh, data, offset)
        if n:
            self.stats["writes"] += 1
            self.stats["bytes_written"] += n
            self.stats["max_write"] = max(self.stats["max_write"], n)
            payload = bytes(data[:n]) if n < len(data) else bytes(data)
            self._log("write", node, node, self.live_path(node), offset=offset, data=payload)
        return n

    @_locked
    def fallocate(self, mode: int, offset: int, length: int, fh: int) -> None:
        if mode & ~_FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EOPNOTSUPP, "only mode 0 and FALLOC_FL_KEEP_SIZE")
        node = self._handle(fh)
        if mode & _FALLOC_FL_KEEP_SIZE:
            return  # reserves space only: nothing a reader or a cut could tell apart
        size = os.fstat(fh).st_size
        os.posix_fallocate(fh, offset, length)
        if offset + length > size:
            self._log("fallocate", node, node, self.live_path(node), length=offset + length)

    @_locked
    def release(self, fh: int) -> None:
        self._fh.pop(fh, None)
        os.close(fh)

    @_locked
    def opendir(self, path: str) -> int:
        spath = self._sp(path)
        node = self._lookup(path)
        fd = os.open(spath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fh[fd] = node.id
        return fd

    @_locked
    def readdir(self, fh: int) -> list[str]:
        return [".", "..", *os.listdir(fh)]

    @_locked
    def fsync(self, datasync: bool, fh: int) -> None:
        node = self._handle(fh)
        self.stats["fsync"] += 1
        self._sync_inode(node, datasync, fh)

    @_locked
    def fsyncdir(self, datasync: bool, fh: int) -> None:
        node = self._handle(fh)
        self.stats["fsyncdir"] += 1
        self._sync_inode(node, datasync, None)

    # -- durability ------------------------------------------------------------------------

    def _sync_inode(self, node: _Node, datasync: bool, fh: int | None) -> None:
        """Make what a fsync of this inode covers durable (see the rules in the module doc)."""
        self._ensure(node)
        wanted = DATA_KINDS | NS_KINDS if datasync else DATA_KINDS | NS_KINDS | ATTR_KINDS
        batch = [op for op in self._groups.get(node.id, {}).values() if op.kind in wanted]
        self._premask((op, op.group == node.id) for op in batch)
        for op in batch:
            if op.seq not in self.pending_log:
                continue  # pulled in by an earlier one meanwhile
            if op.group != node.id:
                # The source of a rename: its old name goes; the new one waits for its own
                # directory's fsync.
                self._ungroup(op, op.source_group)
                op.source_group = 0
                self._remove_entry(node, op.name, op.seq)
                self.stats["applied"] += 1
            else:
                self._apply_logged(op, force=True)
        if not datasync and node.kind == "file" and fh is not None:
            # A full fsync makes the times durable too; applying the writes just moved them.
            st = os.fstat(fh)
            os.utime(self._path(node), ns=(st.st_atime_ns, st.st_mtime_ns))

    def _premask(self, batch: Iterable[tuple[_Op, bool]]) -> None:
        """Of the operations about to be applied together, the newest on an entry gives it
        its value: the older ones no longer change it (their other effects still apply).
        Applying them one by one could otherwise pass through states that are no tree (a
        directory inside itself) when newer operations elsewhere are durable already."""
        for op, whole in batch:
            entries = []
            if op.kind in ENTRY_KINDS or op.kind == "rename":
                entries.append((op.parent, op.name))
            if op.kind == "rename" and whole:
                entries.append((op.parent2, op.name2))
            for key in entries:
                self._entry_seq[key] = max(self._entry_seq.get(key, -1), op.seq)

    def _apply_logged(self, op: _Op, *, force: bool, pieces: set[int] | None = None) -> bool:
        self._drop(op)
        self.stats["applied"] += 1
        return self._apply(op, force=force, pieces=pieces)

    def _apply(self, op: _Op, *, force: bool, pieces: set[int] | None = None) -> bool:
        """Apply one logged operation to the durable tree; False when it no longer applies.

        ``force`` is the fsync path: what the operation needs and is not durable yet (the
        directory, the inode) is made durable with it, without a name where it has none.
        Without it (a cut's subset) such an operation is skipped, as the disk never got it.
        """
        node = self.nodes[op.node]
        if op.kind in DATA_KINDS or op.kind in ATTR_KINDS:
            if not node.durable:
                if not force:
                    return False
                self._ensure(node)
            return self._apply_inode(node, op, pieces)
        if op.kind == "rename":
            return self._apply_rename(op, force=force)
        parent = self.nodes[op.parent]
        if op.kind in ("unlink", "rmdir"):
            return self._remove_entry(parent, op.name, op.seq)
        if not parent.durable or (op.kind == "link" and not node.durable):
            if not force:
                return False
            self._ensure(parent)
            if op.kind == "link":
                self._ensure(node)
        if self._set_entry(parent, op.name, node, op.seq):
            return True
        if op.kind != "link":
            self._ensure(node)  # the name is superseded, the inode was created all the same
        return False

    def _apply_rename(self, op: _Op, *, force: bool) -> bool:
        node, dest = self.nodes[op.node], self.nodes[op.parent2]
        if force:
            self._pull_in(op)
        if not (node.durable and dest.durable):
            if not force:
                return False
            self._ensure(dest)
            self._ensure(node)
        if node.kind == "dir" and self._within(dest, node):
            if not force:
                return False
            # Pending older operations keep the destination inside (the move that took it
            # out of this directory, in the live tree): apply them all, in order, as a
            # journal commit would. (Unreachable, as far as the property tests know.)
            for other in list(self.pending_log.values()):
                if other.seq < op.seq and other.kind in NS_KINDS:
                    self._apply_logged(other, force=True)
            if self._within(dest, node):
                self.errors.append(f"rename #{op.seq} {op.path} -> {op.dest}: a cycle, skipped")
                return False
        done = self._set_entry(dest, op.name2, node, op.seq)
        done = self._remove_entry(self.nodes[op.parent], op.name, op.seq) or done
        return done

    def _pull_in(self, op: _Op) -> None:
        """Apply first the pending rename that gave the source entry its current inode."""
        last: _Op | None = None
        for other in self.pending_log.values():
            if other.seq >= op.seq:
                break
            if (other.kind in _SETTERS and (other.parent, other.name) == (op.parent, op.name)) or (
                other.kind == "rename" and (other.parent2, other.name2) == (op.parent, op.name)
            ):
                last = other
        if last is not None and last.kind == "rename":
            self._apply_logged(last, force=True)

    def _within(self, d: _Node, node: _Node) -> bool:
        """Whether directory ``d`` is ``node`` or inside it, in the durable tree."""
        seen: set[int] = set()
        cur = d
        while cur.id not in seen:
            if cur.id == node.id:
                return True
            seen.add(cur.id)
            if not cur.names:
                return False
            cur = self.nodes[next(iter(cur.names))[0]]
        return False

    # -- the durable tree on disk --------------------------------------------------------------

    def _path(self, node: _Node) -> str:
        """Where a durable inode lives: under the backing tree, or aside when it has no name."""
        if node.id == ROOT:
            return self.backing
        if node.names:
            parent, name = min(node.names)
            return os.path.join(self._path(self.nodes[parent]), name)
        return os.path.join(self.orphans, str(node.id))

    def _ensure(self, node: _Node) -> None:
        if not node.durable:
            self._allocate(node, os.path.join(self.orphans, str(node.id)))

    def _allocate(self, node: _Node, path: str) -> None:
        if node.kind == "dir":
            os.mkdir(path)
        elif node.kind == "symlink":
            os.symlink(node.target, path)
        elif node.kind == "special":
            os.mknod(path, node.mode, node.rdev)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        if node.kind != "symlink":
            os.chmod(path, stat.S_IMODE(node.mode))
        with contextlib.suppress(PermissionError):
            os.lchown(path, node.uid, node.gid)
        node.durable = True

    def _set_entry(self, parent: _Node, name: str, node: _Node, seq: int) -> bool:
        key = (parent.id, name)
        if self._entry_seq.get(key, -1) > seq:
            return False  # a newer change of this entry is durable already
        if node.kind == "dir" and node.durable and self._within(parent, node):
            return False  # a directory inside itself: see _premask, and _apply_rename
        self._entry_seq[key] = seq
        old = parent.entries.get(name)
        if old == node.id:
            return True
        if old is not None:
            self._unname(self.nodes[old], parent, name)
        target = os.path.join(self._path(parent), name)
        if not node.durable:
            self._allocate(node, target)
        elif node.kind == "dir" and node.names:
            src = self._path(node)  # a directory has one name: moving it drops the old one
            for p, n in node.names:
                del self.nodes[p].entries[n]
            node.names.clear()
            os.rename(src, target)
        elif node.names:
            os.link(self._path(node), target, follow_symlinks=False)
        else:
            os.rename(self._path(node), target)
        node.names.add(key)
        parent.entries[name] = node.id
        return True

    def _remove_entry(self, parent: _Node, name: str, seq: int) -> bool:
        key = (parent.id, name)
        if self._entry_seq.get(key, -1) > seq:
            return False
        # The entry gets the value it had right after this operation: none, whichever inode
        # it durably holds (an older one, when older changes are still pending; those are
        # masked now). And when it holds none (its create is still pending), this is still
        # the newest change of it: the pending create must not bring it back later.
        self._entry_seq[key] = seq
        old = parent.entries.get(name)
        if old is None:
            return False
        self._unname(self.nodes[old], parent, name)
        return True

    def _unname(self, node: _Node, parent: _Node, name: str) -> None:
        path = os.path.join(self._path(parent), name)
        del parent.entries[name]
        node.names.discard((parent.id, name))
        if node.names:
            os.unlink(path)  # another hard link keeps the data
        else:
            # Kept aside, not deleted: a pending rename or link may still give it a name.
            os.rename(path, os.path.join(self.orphans, str(node.id)))

    def _apply_inode(self, node: _Node, op: _Op, pieces: set[int] | None) -> bool:
        path = self._path(node)
        if op.kind in ("write", "truncate", "fallocate") and node.kind != "file":
            return False
        if op.kind == "write":
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                for pid, start, end in op.pieces():
                    if pieces is None or pid in pieces:
                        chunk = memoryview(op.data)[start - op.offset : end - op.offset]
                        while chunk:
                            chunk = chunk[os.pwrite(fd, chunk, start) :]
                            start = end - len(chunk)
            finally:
                os.close(fd)
        elif op.kind == "truncate":
            os.truncate(path, op.length)
        elif op.kind == "fallocate":
            if os.stat(path).st_size < op.length:
                os.truncate(path, op.length)
        elif op.kind == "chmod":
            if node.kind != "symlink":
                os.chmod(path, op.mode)
        elif op.kind == "chown":
            os.lchown(path, op.uid, op.gid)
        elif op.kind == "utime":
            os.utime(path, ns=op.times, follow_symlinks=False)
        return True

    # -- control -----------------------------------------------------------------------------

    @staticmethod
    def _public(op: _Op) -> Iterator[PendingOp]:
        def one(pid: int, offset: int, size: int) -> PendingOp:
            return PendingOp(
                id=pid,
                kind=op.kind,
                path=op.path,
                node=op.node,
                sync_path=op.sync_path,
                dest=op.dest,
                offset=offset,
                size=size,
                mode=op.mode,
            )

        if op.kind == "write":
            for pid, start, end in op.pieces():
                yield one(pid, start, end - start)
        else:
            yield one(op.seq, 0, op.length)

    @_locked
    def pending(self) -> list[PendingOp]:
        """Every unsynced operation, in log order, writes split into sector pieces."""
        return [p for op in self.pending_log.values() for p in self._public(op)]

    @_locked
    def sync(self) -> CutReport:
        """Make everything durable, in log order (a clean shutdown, minus the unmount)."""
        return self._apply_subset(None)

    def cut(self, keep: Iterable[int] = ()) -> CutReport:
        """Cut the power: keep exactly ``keep`` of the pending ids, drop the rest, go dead."""
        with self.lock:
            if self.dead:
                raise PowerCutError("the power is already cut")
            self.dead = True
            return self._apply_subset(set(keep))

    def _apply_subset(self, keep: set[int] | None) -> CutReport:
        kept: list[int] = []
        skipped: list[int] = []
        total = sum(op.count for op in self.pending_log.values())
        chosen = [
            (op, [i for i in op.ids() if keep is None or i in keep])
            for op in self.pending_log.values()
        ]
        chosen = [(op, ids) for op, ids in chosen if ids]
        self._premask((op, True) for op, _ids in chosen)
        for op, ids in chosen:
            if op.seq not in self.pending_log:  # pulled in by an earlier one
                kept.extend(ids)
                continue
            pieces = set(ids) if op.kind == "write" and keep is not None else None
            try:
                done = self._apply_logged(op, force=keep is None, pieces=pieces)
            except OSError:
                self.errors.append(
                    f"applying #{op.seq} {op.kind} {op.path}: {traceback.format_exc()}"
                )
                done = False
            (kept if done else skipped).extend(ids)
        if keep is not None:
            self.pending_log.clear()
            self._groups.clear()
        return CutReport(
            kept=tuple(kept),
            skipped=tuple(skipped),
            dropped=total - len(kept),
            errors=tuple(self.errors),
        )


# -- the daemon: FUSE over the core -------------------------------------------------------


def _stat_dict(st: os.stat_result) -> dict[str, int]:
    return {
        "st_mode": st.st_mode,
        "st_ino": st.st_ino,
        "st_nlink": st.st_nlink,
        "st_uid": st.st_uid,
        "st_gid": st.st_gid,
        "st_rdev": st.st_rdev,
        "st_size": st.st_size,
        "st_blocks": st.st_blocks,
        "st_blksize": st.st_blksize,
        "st_atime": st.st_atime_ns,
        "st_mtime": st.st_mtime_ns,
        "st_ctime": st.st_ctime_ns,
    }


class _FuseOps:
    """The callbacks mfusepy looks up by name. Only FUSE operation names are attributes here:
    mfusepy registers any attribute named like one (so no ``lock``/``flock``: the kernel
    then keeps flock and POSIX locks itself, which is what a local disk does)."""

    use_ns = True
    flag_nullpath_ok = True
    flag_nopath = True

    def __init__(
        self,
        core: PowerCutCore,
        ready: Callable[[], None],
        caller: Any,
        attr_timeout: float,
    ) -> None:
        self._core = core
        self._ready = ready
        self._attr_timeout = attr_timeout
        core.caller = caller

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.hard_remove = 1  # no .fuse_hidden files: an unlinked open file has no name
            config.nullpath_ok = 1  # handle-based calls need no path (it may be gone)
            config.use_ino = 0
            config.direct_io = 0  # the page cache stays: shared mmap works (SQLite's -shm)
            config.kernel_cache = 0
            config.auto_cache = 0
            config.attr_timeout = self._attr_timeout  # 0: exact through hard links
        if conn is not None:
            conn.max_write = MAX_WRITE
            conn.max_readahead = MAX_WRITE
            # Writes must reach the daemon before write() returns: no writeback cache.
            conn.want &= ~_FUSE_CAP_WRITEBACK_CACHE
        self._ready()

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        return _stat_dict(self._core.getattr(path, fh))

    def readlink(self, path: str) -> str:
        return self._core.readlink(path)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        self._core.mknod(path, mode, dev)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        self._core.mkdir(path, mode)
        return 0

    def unlink(self, path: str) -> int:
        self._core.unlink(path)
        return 0

    def rmdir(self, path: str) -> int:
        self._core.rmdir(path)
        return 0

    def symlink(self, target: str, source: str) -> int:
        # mfusepy's names: ``target`` is the new link, ``source`` what it points to.
        self._core.symlink(target, source)
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self._core.rename(old, new, flags)
        return 0

    def link(self, target: str, source: str) -> int:
        self._core.link(target, source)
        return 0

    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        self._core.chmod(path, mode, fh)
        return 0

    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> int:
        self._core.chown(path, uid, gid, fh)
        return 0

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        self._core.truncate(path, length, fh)
        return 0

    def utimens(self, path: str | None, times: Any = None, fh: int | None = None) -> int:
        self._core.utimens(path, times, fh)
        return 0

    def open(self, path: str, flags: int) -> int:
        return self._core.open(path, flags)

    def create(self, path: str, mode: int, flags: int) -> int:
        return self._core.create(path, mode, flags)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return self._core.read(size, offset, fh)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        return self._core.write(data, offset, fh)

    def statfs(self, path: str) -> dict[str, int]:
        st = self._core.statfs(path)
        return {
            key: getattr(st, key)
            for key in (
                "f_bsize",
                "f_frsize",
                "f_blocks",
                "f_bfree",
                "f_bavail",
                "f_files",
                "f_ffree",
                "f_favail",
                "f_namemax",
            )
        }

    def flush(self, path: str | None, fh: int) -> int:
        return 0  # close() makes nothing durable

    def release(self, path: str | None, fh: int) -> int:
        self._core.release(fh)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self._core.fsync(bool(datasync), fh)
        return 0

    def opendir(self, path: str) -> int:
        return self._core.opendir(path)

    def readdir(self, path: str | None, fh: int) -> list[str]:
        return self._core.readdir(fh)

    def releasedir(self, path: str | None, fh: int) -> int:
        self._core.release(fh)
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        self._core.fsyncdir(bool(datasync), fh)
        return 0

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        self._core.fallocate(mode, offset, size, fh)
        return 0


def _fuse_class(mfusepy: Any) -> Any:
    """mfusepy's FUSE, passing what its libfuse 3 wrappers drop: the file handle of
    truncate/chmod/chown/utimens (with nullpath_ok the path is then None), rename flags,
    and raw UTIME_NOW/UTIME_OMIT times."""

    class Fuse(mfusepy.FUSE):  # type: ignore[misc]
        def _fh(self, fip: Any) -> int | None:
            return int(fip.contents.fh) if fip else None

        def _path(self, path: bytes | None) -> str | None:
            return None if path is None else path.decode(self.encoding, self.errors)

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return int(self.operations.rename(self._path(old), self._path(new), flags))

        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            return int(self.operations.truncate(self._path(path), length, self._fh(fip)))

        def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
            return int(self.operations.chmod(self._path(path), mode, self._fh(fip)))

        def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
            # (uid_t)-1 means "unchanged", as os.chown's -1 does.
            uid = -1 if uid == 0xFFFFFFFF else uid
            gid = -1 if gid == 0xFFFFFFFF else gid
            return int(self.operations.chown(self._path(path), uid, gid, self._fh(fip)))

        def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
            times = None
            if buf:
                a, m = buf.contents.actime, buf.contents.modtime
                times = ((a.tv_sec, a.tv_nsec), (m.tv_sec, m.tv_nsec))
            return int(self.operations.utimens(self._path(path), times, self._fh(fip)))

    return Fuse


class _Control:
    """The daemon's end of the control socket: one JSON object a line, each way."""

    def __init__(self, core: PowerCutCore, sock: socket.socket, mountpoint: str) -> None:
        self.core = core
        self.sock = sock
        self.mountpoint = mountpoint
        self._send_lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        with self._send_lock, contextlib.suppress(OSError):
            self.sock.sendall(data)

    def ready(self) -> None:
        self.send({"event": "ready", "pid": os.getpid()})

    def start(self) -> None:
        threading.Thread(target=self._run, name="powercut-control", daemon=True).start()

    def _run(self) -> None:
        reader = self.sock.makefile("rb")
        for line in reader:
            try:
                msg = json.loads(line)
                self._handle(msg)
            except Exception:
                self.send({"ok": False, "error": traceback.format_exc()})
        # The test process is gone (or closed us): cut the power and leave, so no mount and
        # no daemon outlive it.
        with contextlib.suppress(PowerCutError):
            self.core.cut(())
        self._exit()

    def _handle(self, msg: dict[str, Any]) -> None:
        cmd = msg.get("cmd")
        if cmd == "pending":
            self.send({"ok": True, "ops": [dataclasses.asdict(p) for p in self.core.pending()]})
        elif cmd == "stats":
            with self.core.lock:
                stats = dict(self.core.stats, pending=len(self.core.pending_log))
                errors = list(self.core.errors)
            self.send({"ok": True, "stats": stats, "errors": errors})
        elif cmd == "sync":
            self.send({"ok": True, "report": dataclasses.asdict(self.core.sync())})
        elif cmd == "cut":
            report = self.core.cut(int(i) for i in msg.get("keep", ()))
            self.send({"ok": True, "report": dataclasses.asdict(report)})
            self._exit()
        else:
            self.send({"ok": False, "error": f"unknown command {cmd!r}"})

    def _exit(self) -> None:
        # Detach the mount point first, then exit: closing /dev/fuse aborts the connection,
        # so whoever still holds a file there gets ENOTCONN instead of waiting for us.
        lazy_unmount(self.mountpoint)
        logging.shutdown()
        os._exit(0)


def _serve(args: argparse.Namespace) -> int:
    os.umask(0)  # modes come from the callers, already masked by their umask
    work = Path(args.work)
    core = PowerCutCore(args.backing, str(work / "shadow"), str(work / "orphans"))
    control: _Control | None = None
    if args.control_fd is not None:
        control = _Control(core, socket.socket(fileno=args.control_fd), args.mountpoint)
    # libfuse 2 may be installed too; mfusepy would take it first.
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    import mfusepy  # type: ignore[import-untyped,import-not-found,unused-ignore]

    def caller() -> tuple[int, int]:
        uid, gid, _pid = mfusepy.fuse_get_context()
        return int(uid), int(gid)

    ops = _FuseOps(core, control.ready if control else lambda: None, caller, args.attr_timeout)
    if control is not None:
        control.start()
    options: dict[str, Any] = {
        "foreground": True,
        "fsname": "powercut",
        "subtype": "powercut",
        "allow_other": True,  # a test may run its process as another user
        "default_permissions": True,  # then the kernel checks modes, as a disk's fs would
        "debug": args.debug,
    }
    _fuse_class(mfusepy)(ops, args.mountpoint, **options)
    # Unmounted from outside, or a signal: nothing unsynced survives that either.
    with contextlib.suppress(PowerCutError):
        core.cut(())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resumer.lab.powercut",
        description="Mount a FUSE file system over BACKING that drops unsynced writes on a cut.",
    )
    parser.add_argument("backing", help="the durable state: a directory")
    parser.add_argument("mountpoint")
    parser.add_argument("--work", help="scratch directory for the shadow tree (default: temp)")
    parser.add_argument("--control-fd", type=int, help="a socket to take commands from")
    parser.add_argument(
        "--attr-timeout",
        type=float,
        default=0.0,
        help="seconds the kernel caches attributes (default 0: exact through hard links)",
    )
    parser.add_argument("--debug", action="store_true", help="libfuse debug output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="powercut: %(levelname)s %(message)s")
    if not os.path.isdir(args.backing):
        parser.error(f"{args.backing} is not a directory")
    os.makedirs(args.mountpoint, exist_ok=True)
    if args.work is not None:
        return _serve(args)
    args.work = tempfile.mkdtemp(prefix=".powercut-", dir=Path(args.backing).parent)
    try:
        return _serve(args)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


# -- the test process's side --------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why the file system cannot mount here, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable (root needed)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not on PATH (apt-get install fuse3)"
    if find_library("fuse3") is None:
        return "libfuse3.so.3 not found (apt-get install libfuse3-3)"
    if importlib.util.find_spec("mfusepy") is None:
        return "the mfusepy package is not installed (pip install mfusepy)"
    return None


def _unescape_mountinfo(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether something is mounted exactly at ``path`` (in this mount namespace)."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return any(_unescape_mountinfo(line.split()[4]) == target for line in f)
    except FileNotFoundError:
        return False


def lazy_unmount(path: str | os.PathLike[str]) -> None:
    """Detach a mount without waiting for its users (a frozen process may hold files)."""
    target = os.path.realpath(path)
    for cmd in (["fusermount3", "-u", "-z", target], ["umount", "-l", target]):
        if not is_mounted(target):
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(cmd, capture_output=True, timeout=10, check=False)


class PowerCutFS:
    """Mounts the power-cut file system in a daemon process and drives it (a context manager).

    ``work`` holds the daemon's shadow tree and logs; by default a temporary directory next
    to ``backing`` (so that renames and reflinks stay on one file system), removed on close.
    ``attr_timeout``: see "Hard links" in the module doc.
    """

    def __init__(
        self,
        backing: str | os.PathLike[str],
        mountpoint: str | os.PathLike[str],
        *,
        work: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        attr_timeout: float = 0.0,
        debug: bool = False,
    ) -> None:
        self.backing = Path(os.path.realpath(backing))
        self.mountpoint = Path(os.path.realpath(mountpoint))
        if self.mountpoint == self.backing or self.backing in self.mountpoint.parents:
            raise PowerCutError("the mount point must not be inside the backing directory")
        self._own_work = work is None
        self.work = Path(work) if work is not None else None
        self.timeout = timeout
        self.attr_timeout = attr_timeout
        self.debug = debug
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._gen = 0
        self._gen_dir: Path | None = None
        self.last_log = ""
        """The daemon's output of the last mount, kept after it exits (for failures)."""

    def __enter__(self) -> PowerCutFS:
        try:
            self.mount()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def mounted(self) -> bool:
        return self._proc is not None

    def mount(self) -> None:
        """Mount over the backing tree as it is now (after a cut: as after a reboot)."""
        reason = unavailable_reason()
        if reason:
            raise PowerCutError(reason)
        if self._proc is not None:
            raise PowerCutError("already mounted")
        if not self.backing.is_dir():
            raise PowerCutError(f"the backing directory {self.backing} does not exist")
        if is_mounted(self.mountpoint):
            raise PowerCutError(f"something is mounted on {self.mountpoint} already")
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.work is None:
            self.work = Path(tempfile.mkdtemp(prefix=".powercut-", dir=self.backing.parent))
        self._gen += 1
        gen = self.work / f"mount-{self._gen}"
        gen.mkdir(parents=True)
        self._gen_dir = gen
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "resumer.lab.powercut", str(self.backing)]
        cmd += [str(self.mountpoint), "--work", str(gen), "--control-fd", str(theirs.fileno())]
        cmd += ["--attr-timeout", str(self.attr_timeout)]
        if self.debug:
            cmd.append("--debug")
        with open(gen / "daemon.log", "wb") as logf:
            self._proc = subprocess.Popen(
                cmd,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own session: a ^C meant for the test reaches the test, which then
                # cuts and unmounts in order; the daemon also leaves when we vanish.
                start_new_session=True,
            )
        theirs.close()
        self._sock, self._buf = ours, b""
        try:
            msg = self._recv(time.monotonic() + self.timeout)
            if msg.get("event") != "ready":
                raise PowerCutError(f"unexpected first message {msg}")
            self.pid = int(msg["pid"])
        except BaseException:
            self._teardown()
            raise
        if not is_mounted(self.mountpoint):
            self._teardown()
            raise PowerCutError(f"daemon ready but nothing mounted on {self.mountpoint}")

    def pending(self) -> list[PendingOp]:
        """What a cut would drop now, in log order (writes as sector pieces)."""
        reply = self._call({"cmd": "pending"})
        return [PendingOp(**op) for op in reply["ops"]]

    def stats(self) -> dict[str, Any]:
        """Counters of the daemon (ops, writes, max_write, fsync, pending …) and its errors."""
        reply = self._call({"cmd": "stats"})
        return dict(reply["stats"], errors=reply["errors"])

    def sync(self) -> CutReport:
        """Make every pending operation durable now (stays mounted)."""
        return CutReport(**self._tuples(self._call({"cmd": "sync"})["report"]))

    def cut(self, keep: Keep = None) -> CutReport:
        """Cut the power and unmount (lazily). ``keep``: pending ids (or a predicate over
        `PendingOp`) to apply before the rest is dropped; None keeps nothing.

        Raises `PowerCutError` if the daemon reported internal errors (a bug of its own).
        """
        if self._proc is None:
            raise PowerCutError("not mounted")
        try:
            if keep is None:
                ids: list[int] = []
            elif callable(keep):
                ids = [op.id for op in self.pending() if keep(op)]
            else:
                ids = sorted(int(i) for i in keep)
            reply = self._call({"cmd": "cut", "keep": ids})
        finally:
            self._teardown()
        report = CutReport(**self._tuples(reply["report"]))
        if report.errors:
            raise PowerCutError("the daemon failed:\n" + "\n".join(report.errors))
        return report

    def close(self) -> None:
        """Unmount if mounted (unsynced state is dropped), stop the daemon, remove ``work``."""
        if self._proc is not None:
            try:
                self._call({"cmd": "cut", "keep": []}, timeout=10)
            except Exception:
                log.debug("cut on close failed", exc_info=True)
            finally:
                self._teardown()
        if self._own_work and self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None

    # -- plumbing ----------------------------------------------------------------------------

    @staticmethod
    def _tuples(report: dict[str, Any]) -> dict[str, Any]:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in report.items()}

    def _call(self, msg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        if self._sock is None:
            raise PowerCutError("not mounted")
        self._sock.sendall((json.dumps(msg) + "\n").encode())
        reply = self._recv(time.monotonic() + (timeout or self.timeout))
        if not reply.get("ok"):
            raise PowerCutError(f"daemon: {reply.get('error')}")
        return reply

    def _recv(self, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PowerCutError(f"the daemon did not answer in time\n{self._log_tail()}")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                raise PowerCutError(f"the daemon exited\n{self._log_tail()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result

    def _log_tail(self) -> str:
        if self._gen_dir is not None:
            with contextlib.suppress(OSError):
                self.last_log = (self._gen_dir / "daemon.log").read_text(errors="replace")
        return self.last_log[-4000:]

    def _teardown(self) -> None:
        """Whatever state the daemon is in: it exits, the mount goes, the shadow goes."""
        proc, self._proc = self._proc, None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()  # EOF makes a live daemon cut and exit by itself
            self._sock = None
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        lazy_unmount(self.mountpoint)
        if is_mounted(self.mountpoint):
            raise PowerCutError(f"could not unmount {self.mountpoint}")
        self._log_tail()
        if self._gen_dir is not None:
            shutil.rmtree(self._gen_dir, ignore_errors=True)
            self._gen_dir = None
        self.pid = None


if __name__ == "__main__":
    sys.exit(main())
