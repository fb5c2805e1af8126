"""Helpers for the power-cut file system tests: small file utilities, an in-memory model of
its durability rules, and random operation sequences run on both.

The model knows nothing of shadow trees, orphan directories or inode numbers: it keeps a
live tree, a durable tree and a log, and applies the rules of `resumer.lab.powercut` (its
module doc) to dictionaries. A property test runs the same steps on the file system and on
the model, then checks that both list the same pending operations and that a cut keeping
any subset of them leaves the same tree.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from resumer.lab.powercut import SECTOR, PowerCutCore

Tree = dict[str, bytes | None]  # path -> file content, None for a directory


def tree(root: str | os.PathLike[str]) -> Tree:
    """Every file and directory under ``root`` (symlinks as b"-> target")."""
    out: Tree = {}

    def walk(d: str, prefix: str) -> None:
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            path = f"{prefix}{entry.name}"
            if entry.is_symlink():
                out[path] = b"-> " + os.readlink(entry.path).encode()
            elif entry.is_dir():
                out[path] = None
                walk(entry.path, path + "/")
            else:
                out[path] = Path(entry.path).read_bytes()

    walk(os.fspath(root), "")
    return out


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str], *, datasync: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        (os.fdatasync if datasync else os.fsync)(fd)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike[str], data: bytes, *, durable: bool = False) -> None:
    """Write a whole file; ``durable``: fsync it and its directory, as a careful program does."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


# -- the model ----------------------------------------------------------------------------


@dataclass(eq=False)
class MNode:
    id: int
    kind: str  # "file" or "dir"
    durable: bool = False
    names: set[tuple[int, str]] = field(default_factory=set)
    entries: dict[str, int] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    live_entries: dict[str, int] = field(default_factory=dict)
    live_names: set[tuple[int, str]] = field(default_factory=set)
    live_data: bytearray = field(default_factory=bytearray)


@dataclass(eq=False)
class MOp:
    seq: int
    kind: str
    node: int
    group: int
    path: str
    sync_path: str
    count: int = 1
    parent: int = 0
    name: str = ""
    parent2: int = 0
    name2: str = ""
    offset: int = 0
    data: bytes = b""
    length: int = 0
    source_done: bool = False  # a rename whose old name's removal is durable already

    def pieces(self) -> Iterator[tuple[int, int, int]]:
        start, end, pid = self.offset, self.offset + len(self.data), self.seq
        while start < end:
            stop = min(end, (start // SECTOR + 1) * SECTOR)
            yield pid, start, stop
            pid, start = pid + 1, stop


def _write_at(buf: bytearray, offset: int, data: bytes) -> None:
    if len(buf) < offset:
        buf.extend(bytes(offset - len(buf)))
    buf[offset : offset + len(data)] = data


def _resize(buf: bytearray, length: int) -> None:
    if length < len(buf):
        del buf[length:]
    else:
        buf.extend(bytes(length - len(buf)))


class Model:
    """The durability rules on dictionaries (an empty durable root to start with)."""

    def __init__(self) -> None:
        self.nodes = {1: MNode(1, "dir", durable=True)}
        self._next = 2
        self._seq = 1
        self.log: dict[int, MOp] = {}
        self.entry_seq: dict[tuple[int, str], int] = {}
        self.recent = ""  # the path last created or renamed to: steps like to move it again

    # -- the live tree ---------------------------------------------------------------------

    def lookup(self, path: str) -> MNode | None:
        node = self.nodes[1]
        for part in filter(None, path.split("/")):
            nid = node.live_entries.get(part) if node.kind == "dir" else None
            if nid is None:
                return None
            node = self.nodes[nid]
        return node

    def live_path(self, node: MNode) -> str:
        if node.id == 1:
            return ""
        paths = []
        for p, n in node.live_names:
            parent = self.live_path(self.nodes[p])
            paths.append(f"{parent}/{n}" if parent else n)
        return min(paths)

    def live_items(self) -> list[tuple[str, MNode]]:
        """(path, node) of every live file and directory but the root, sorted by path."""
        out: list[tuple[str, MNode]] = []

        def walk(node: MNode, prefix: str) -> None:
            for name in sorted(node.live_entries):
                child = self.nodes[node.live_entries[name]]
                out.append((prefix + name, child))
                if child.kind == "dir":
                    walk(child, prefix + name + "/")

        walk(self.nodes[1], "")
        return out

    def _split(self, path: str) -> tuple[MNode, str]:
        parent, _, name = path.rpartition("/")
        node = self.lookup(parent)
        assert node is not None
        return node, name

    def _new(self, kind: str, parent: MNode, name: str) -> MNode:
        node = MNode(self._next, kind)
        self._next += 1
        self.nodes[node.id] = node
        parent.live_entries[name] = node.id
        node.live_names.add((parent.id, name))
        return node

    def _log(self, kind: str, node: MNode, group: MNode, path: str, **kw: object) -> None:
        op = MOp(self._seq, kind, node.id, group.id, path, self.live_path(group), **kw)  # type: ignore[arg-type]
        if kind == "write":
            op.count = sum(1 for _ in op.pieces())
        self._seq += op.count
        self.log[op.seq] = op

    # -- operations, as a program does them ----------------------------------------------------

    def mkdir(self, path: str) -> None:
        self.recent = path
        parent, name = self._split(path)
        node = self._new("dir", parent, name)
        self._log("mkdir", node, parent, path, parent=parent.id, name=name)

    def create(self, path: str) -> None:
        self.recent = path
        parent, name = self._split(path)
        node = self._new("file", parent, name)
        self._log("create", node, parent, path, parent=parent.id, name=name)

    def write(self, path: str, offset: int, data: bytes) -> None:
        node = self.lookup(path)
        assert node is not None
        _write_at(node.live_data, offset, data)
        self._log("write", node, node, self.live_path(node), offset=offset, data=data)

    def truncate(self, path: str, length: int) -> None:
        node = self.lookup(path)
        assert node is not None
        if len(node.live_data) != length:
            _resize(node.live_data, length)
            self._log("truncate", node, node, self.live_path(node), length=length)

    def unlink(self, path: str, kind: str = "unlink") -> None:
        parent, name = self._split(path)
        node = self.nodes[parent.live_entries.pop(name)]
        node.live_names.discard((parent.id, name))
        self._log(kind, node, parent, path, parent=parent.id, name=name)

    def rmdir(self, path: str) -> None:
        self.unlink(path, "rmdir")

    def link(self, path: str, existing: str) -> None:
        parent, name = self._split(path)
        node = self.lookup(existing)
        assert node is not None
        parent.live_entries[name] = node.id
        node.live_names.add((parent.id, name))
        self._log("link", node, parent, path, parent=parent.id, name=name)

    def rename(self, old: str, new: str) -> None:
        self.recent = new
        p1, n1 = self._split(old)
        p2, n2 = self._split(new)
        node = self.nodes[p1.live_entries[n1]]
        victim = p2.live_entries.get(n2)
        if victim == node.id:
            return
        if victim is not None:
            self.nodes[victim].live_names.discard((p2.id, n2))
        del p1.live_entries[n1]
        node.live_names.discard((p1.id, n1))
        p2.live_entries[n2] = node.id
        node.live_names.add((p2.id, n2))
        self._log("rename", node, p2, old, parent=p1.id, name=n1, parent2=p2.id, name2=n2)

    def fsync(self, path: str) -> None:
        node = self.lookup(path)
        assert node is not None
        self._ensure(node)
        batch = [
            (o, o.group == node.id)
            for o in self.log.values()
            if o.group == node.id or (o.kind == "rename" and o.parent == node.id)
        ]
        self._premask(batch)
        for op, _whole in batch:
            if op.seq not in self.log:
                continue
            if op.group == node.id:
                self._apply_logged(op, force=True)
            elif op.kind == "rename" and op.parent == node.id and not op.source_done:
                op.source_done = True  # the source's fsync: the old name goes, only that
                self._remove(node, op.name, op.seq)

    # -- the durable tree ----------------------------------------------------------------------

    def _ensure(self, node: MNode) -> None:
        node.durable = True

    def _premask(self, batch: list[tuple[MOp, bool]]) -> None:
        for op, whole in batch:
            keys = []
            if op.kind in ("create", "mkdir", "link", "unlink", "rmdir", "rename"):
                keys.append((op.parent, op.name))
            if op.kind == "rename" and whole:
                keys.append((op.parent2, op.name2))
            for key in keys:
                self.entry_seq[key] = max(self.entry_seq.get(key, -1), op.seq)

    def _apply_logged(self, op: MOp, *, force: bool, pieces: set[int] | None = None) -> bool:
        del self.log[op.seq]
        return self._apply(op, force=force, pieces=pieces)

    def _apply(self, op: MOp, *, force: bool, pieces: set[int] | None) -> bool:
        node = self.nodes[op.node]
        if op.kind in ("write", "truncate"):
            if not node.durable and not force:
                return False
            self._ensure(node)
            if op.kind == "truncate":
                _resize(node.data, op.length)
            for pid, start, end in op.pieces():
                if pieces is None or pid in pieces:
                    _write_at(node.data, start, op.data[start - op.offset : end - op.offset])
            return True
        if op.kind == "rename":
            return self._rename(op, force=force)
        parent = self.nodes[op.parent]
        if op.kind in ("unlink", "rmdir"):
            return self._remove(parent, op.name, op.seq)
        if not parent.durable or (op.kind == "link" and not node.durable):
            if not force:
                return False
            self._ensure(parent)
            if op.kind == "link":
                self._ensure(node)
        if self._set(parent, op.name, node, op.seq):
            return True
        if op.kind != "link":
            self._ensure(node)
        return False

    def _rename(self, op: MOp, *, force: bool) -> bool:
        node, dest = self.nodes[op.node], self.nodes[op.parent2]
        if force:
            last = None
            for other in self.log.values():
                if other.seq < op.seq and (
                    (other.kind in ("create", "mkdir", "link") and (other.parent, other.name))
                    == (op.parent, op.name)
                    or (other.kind == "rename" and (other.parent2, other.name2))
                    == (op.parent, op.name)
                ):
                    last = other
            if last is not None and last.kind == "rename":
                self._apply_logged(last, force=True)
        if not (node.durable and dest.durable):
            if not force:
                return False
            self._ensure(dest)
            self._ensure(node)
        if node.kind == "dir" and self._within(dest, node):
            if not force:
                return False
            for other in list(self.log.values()):
                if other.seq < op.seq and other.kind not in ("write", "truncate"):
                    self._apply_logged(other, force=True)
            if self._within(dest, node):
                return False
        done = self._set(dest, op.name2, node, op.seq)
        return self._remove(self.nodes[op.parent], op.name, op.seq) or done

    def _within(self, d: MNode, node: MNode) -> bool:
        seen: set[int] = set()
        while d.id not in seen:
            if d.id == node.id:
                return True
            seen.add(d.id)
            if not d.names:
                return False
            d = self.nodes[next(iter(d.names))[0]]
        return False

    def _set(self, parent: MNode, name: str, node: MNode, seq: int) -> bool:
        key = (parent.id, name)
        if self.entry_seq.get(key, -1) > seq:
            return False
        if node.kind == "dir" and node.durable and self._within(parent, node):
            return False
        self.entry_seq[key] = seq
        old = parent.entries.get(name)
        if old == node.id:
            return True
        if old is not None:
            del parent.entries[name]
            self.nodes[old].names.discard(key)
        if node.kind == "dir":
            for p, n in node.names:
                del self.nodes[p].entries[n]
            node.names.clear()
        node.durable = True
        node.names.add(key)
        parent.entries[name] = node.id
        return True

    def _remove(self, parent: MNode, name: str, seq: int) -> bool:
        key = (parent.id, name)
        if self.entry_seq.get(key, -1) > seq:
            return False
        self.entry_seq[key] = seq
        old = parent.entries.pop(name, None)
        if old is None:
            return False
        self.nodes[old].names.discard(key)
        return True

    # -- what the tests compare ------------------------------------------------------------------

    def pending(self) -> list[tuple[str, str, str, int, int]]:
        """(kind, path, sync_path, offset, size) of each pending id, in log order."""
        out = []
        for op in self.log.values():
            if op.kind == "write":
                for _pid, start, end in op.pieces():
                    out.append((op.kind, op.path, op.sync_path, start, end - start))
            else:
                out.append((op.kind, op.path, op.sync_path, 0, op.length))
        return out

    def ids(self) -> list[int]:
        return [i for op in self.log.values() for i in range(op.seq, op.seq + op.count)]

    def cut(self, keep: set[int]) -> None:
        chosen = []
        for op in self.log.values():
            ids = {i for i in range(op.seq, op.seq + op.count) if i in keep}
            if ids:
                chosen.append((op, ids))
        self._premask([(op, True) for op, _ in chosen])
        for op, ids in chosen:
            self._apply_logged(op, force=False, pieces=ids if op.kind == "write" else None)
        self.log.clear()

    def durable_tree(self) -> Tree:
        out: Tree = {}

        def walk(node: MNode, prefix: str) -> None:
            for name in sorted(node.entries):
                child = self.nodes[node.entries[name]]
                out[prefix + name] = None if child.kind == "dir" else bytes(child.data)
                if child.kind == "dir":
                    walk(child, prefix + name + "/")

        walk(self.nodes[1], "")
        return out

    def live_tree(self) -> Tree:
        return {p: None if n.kind == "dir" else bytes(n.live_data) for p, n in self.live_items()}


# -- random steps, run on the model and on a file system -------------------------------------


class Target(Protocol):
    """A file system to run steps on: in-process `PowerCutCore`, or a real mount."""

    def mkdir(self, path: str) -> None: ...
    def create(self, path: str) -> None: ...
    def write(self, path: str, offset: int, data: bytes) -> None: ...
    def truncate(self, path: str, length: int) -> None: ...
    def fsync(self, path: str, datasync: bool) -> None: ...
    def fsyncdir(self, path: str) -> None: ...
    def rename(self, old: str, new: str) -> None: ...
    def unlink(self, path: str) -> None: ...
    def rmdir(self, path: str) -> None: ...
    def link(self, path: str, existing: str) -> None: ...


class CoreTarget:
    """Calls `PowerCutCore` as the FUSE daemon would (paths as "/a/b")."""

    def __init__(self, core: PowerCutCore) -> None:
        self.core = core

    def mkdir(self, path: str) -> None:
        self.core.mkdir("/" + path, 0o755)

    def create(self, path: str) -> None:
        self.core.release(self.core.create("/" + path, 0o644, os.O_WRONLY))

    def write(self, path: str, offset: int, data: bytes) -> None:
        fh = self.core.open("/" + path, os.O_WRONLY)
        try:
            assert self.core.write(data, offset, fh) == len(data)
        finally:
            self.core.release(fh)

    def truncate(self, path: str, length: int) -> None:
        self.core.truncate("/" + path, length)

    def fsync(self, path: str, datasync: bool) -> None:
        fh = self.core.open("/" + path, os.O_RDONLY)
        try:
            self.core.fsync(datasync, fh)
        finally:
            self.core.release(fh)

    def fsyncdir(self, path: str) -> None:
        fh = self.core.opendir("/" + path)
        try:
            self.core.fsyncdir(False, fh)
        finally:
            self.core.release(fh)

    def rename(self, old: str, new: str) -> None:
        self.core.rename("/" + old, "/" + new)

    def unlink(self, path: str) -> None:
        self.core.unlink("/" + path)

    def rmdir(self, path: str) -> None:
        self.core.rmdir("/" + path)

    def link(self, path: str, existing: str) -> None:
        self.core.link("/" + path, "/" + existing)


class MountTarget:
    """Plain system calls under a mount point."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _p(self, path: str) -> str:
        return os.path.join(self.root, path)

    def mkdir(self, path: str) -> None:
        os.mkdir(self._p(path))

    def create(self, path: str) -> None:
        os.close(os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

    def write(self, path: str, offset: int, data: bytes) -> None:
        fd = os.open(self._p(path), os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, offset) == len(data)
        finally:
            os.close(fd)

    def truncate(self, path: str, length: int) -> None:
        os.truncate(self._p(path), length)

    def fsync(self, path: str, datasync: bool) -> None:
        fsync_file(self._p(path), datasync=datasync)

    def fsyncdir(self, path: str) -> None:
        fsync_dir(self._p(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._p(old), self._p(new))

    def unlink(self, path: str) -> None:
        os.unlink(self._p(path))

    def rmdir(self, path: str) -> None:
        os.rmdir(self._p(path))

    def link(self, path: str, existing: str) -> None:
        os.link(self._p(existing), self._p(path))


NAMES = ("a", "b", "c")
Step = tuple[int, ...]
"""(kind, i, j, k, l): the kind picks the operation, the rest pick among live paths."""

STEP_KINDS = 10
# Weights of the step kinds (mkdir, create, write, truncate, fsync, fsyncdir, rename, unlink,
# rmdir, link): mostly data and renames, so that a cut has much to choose from.
STEP_WEIGHTS = (1, 2, 6, 1, 1, 1, 4, 1, 1, 1)
KIND_CHOICES = tuple(k for k, w in enumerate(STEP_WEIGHTS) for _ in range(w))

PRELUDE: list[Step] = [
    (0, 0, 0, 0, 0),  # mkdir a
    (0, 0, 1, 0, 0),  # mkdir b
    (1, 1, 0, 0, 0),  # create a/a
    (1, 2, 1, 0, 0),  # create b/b
    (1, 0, 2, 0, 0),  # create c
    *[(2, f, 1 + f, 2 + f, f) for f in range(3)],  # write each
    *[(4, f, 0, 0, 0) for f in range(3)],  # fsync each
    *[(5, d, 0, 0, 0) for d in range(3)],  # fsync each directory
]
"""A durable tree to start from: two directories and three files, all synced."""


def sweep(model: Model, target: Target, seed: int, fraction: float = 1.0) -> None:
    """Fsync (a ``fraction`` of) every live file and directory, in a seeded random order:
    each applies its own part of the log, out of log order with respect to the others."""
    rng = random.Random(seed)
    paths = [""] + [p for p, _ in model.live_items()]
    rng.shuffle(paths)
    for n, path in enumerate(paths):
        if rng.random() < fraction:
            run_step(model, target, (10, sorted(paths).index(path), n, 0, 0))


def run_step(model: Model, target: Target, step: Step) -> str | None:
    """Run one step on both, when it is valid in the live tree; returns what it did."""
    kind, i, j, k, n = step
    items = model.live_items()
    files = [p for p, node in items if node.kind == "file"]
    dirs = [""] + [p for p, node in items if node.kind == "dir"]

    def child(d: str, name: str) -> str:
        return f"{d}/{name}" if d else name

    if kind == 0 or kind == 1:  # mkdir / create
        path = child(dirs[i % len(dirs)], NAMES[j % len(NAMES)])
        if model.lookup(path) is not None or path.count("/") > 2:
            return None
        if kind == 0:
            model.mkdir(path)
            target.mkdir(path)
        else:
            model.create(path)
            target.create(path)
        return f"{'mkdir' if kind == 0 else 'create'} {path}"
    if kind == 2 and files:  # write: sizes that cross sector boundaries
        path, offset, size = files[i % len(files)], (j * 1777) % 12000, 1 + (k * 2311) % 9000
        data = bytes([65 + n % 26]) * size
        model.write(path, offset, data)
        target.write(path, offset, data)
        return f"write {path} {offset}+{size}"
    if kind == 3 and files:
        path, length = files[i % len(files)], (j * 1931) % 14000
        model.truncate(path, length)
        target.truncate(path, length)
        return f"truncate {path} {length}"
    if kind == 4 and files:
        path = files[i % len(files)]
        model.fsync(path)
        target.fsync(path, bool(j % 2))
        return f"fsync {path}"
    if kind == 5:
        path = dirs[i % len(dirs)]
        model.fsync(path)
        target.fsyncdir(path)
        return f"fsyncdir {path or '.'}"
    if kind == 6 and len(dirs) + len(files) > 1:  # rename a file or a directory
        movable = files + dirs[1:]
        # Half the time the path just made or moved: chains of renames across directories.
        old = model.recent if i < 4 and model.recent in movable else movable[i % len(movable)]
        new = child(dirs[j % len(dirs)], NAMES[k % len(NAMES)])
        src, dst = model.lookup(old), model.lookup(new)
        assert src is not None
        if new == old or new.startswith(old + "/") or new.count("/") > 2:
            return None
        if dst is not None and (dst.kind != src.kind or (dst.kind == "dir" and dst.live_entries)):
            return None
        model.rename(old, new)
        target.rename(old, new)
        return f"rename {old} {new}"
    if kind == 7 and files:
        path = files[i % len(files)]
        model.unlink(path)
        target.unlink(path)
        return f"unlink {path}"
    if kind == 8 and len(dirs) > 1:
        path = dirs[1:][i % (len(dirs) - 1)]
        node = model.lookup(path)
        if node is None or node.live_entries:
            return None
        model.rmdir(path)
        target.rmdir(path)
        return f"rmdir {path}"
    if kind == 10:  # fsync a file or a directory, whichever
        paths = files + dirs
        path = sorted(paths)[i % len(paths)]
        node = model.lookup(path)
        assert node is not None
        model.fsync(path)
        if node.kind == "dir":
            target.fsyncdir(path)
        else:
            target.fsync(path, bool(j % 2))
        return f"fsync {path or '.'}"
    if kind == 9 and files:
        existing = files[i % len(files)]
        path = child(dirs[j % len(dirs)], NAMES[k % len(NAMES)])
        if model.lookup(path) is not None:
            return None
        model.link(path, existing)
        target.link(path, existing)
        return f"link {path} {existing}"
    return None
