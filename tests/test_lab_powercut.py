"""The power-cut file system: its durability rules, subset cuts against a model, what must
work on the mount (SQLite WAL, flock, mmap, …), and the freeze/cut/kill/remount sequence.

The rules and the model run in-process too (`PowerCutCore`, no FUSE); everything else needs
/dev/fuse and fusermount3 (root in CI) and is skipped, saying so, where they are missing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from powercut_helpers import (
    KIND_CHOICES,
    PRELUDE,
    CoreTarget,
    Model,
    MountTarget,
    Step,
    fsync_dir,
    fsync_file,
    run_step,
    sweep,
    tree,
    write_file,
)

from resumer.lab.powercut import (
    PendingOp,
    PowerCutCore,
    PowerCutError,
    PowerCutFS,
    is_mounted,
    keep_random,
    unavailable_reason,
)

MiB = 1 << 20
DEADLINE = 20.0


def _skip_reason() -> str | None:
    # Only a machine without FUSE is a reason to skip; a missing library is a setup bug.
    reason = unavailable_reason()
    if reason and ("/dev/fuse" in reason or "fusermount3" in reason):
        return reason
    return None


needs_fuse = pytest.mark.skipif(
    _skip_reason() is not None, reason=f"power-cut fs needs FUSE: {_skip_reason()}"
)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[PowerCutFS]:
    if (reason := _skip_reason()) is not None:
        pytest.skip(f"power-cut fs needs FUSE: {reason}")
    backing = tmp_path / "backing"
    backing.mkdir()
    with PowerCutFS(backing, tmp_path / "mnt") as pfs:
        yield pfs


def poll(cond: object, what: str, timeout: float = DEADLINE) -> None:
    """Wait for ``cond()`` with a deadline (a short sleep between looks, not a fixed wait)."""
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def exited(pid: int) -> bool:
    """The process is gone, or a zombie (it has exited; whoever inherited it reaps it later)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def expect_line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(prefix):
        proc.kill()
        _, err = proc.communicate(timeout=DEADLINE)
        raise AssertionError(f"expected {prefix!r}, got {line!r}; stderr:\n{err}")
    return line


def freeze_cut_kill(fs: PowerCutFS, proc: subprocess.Popen[str]) -> None:
    """The power-cut sequence of the project's tests: stop, cut, kill, reap."""
    proc.send_signal(signal.SIGSTOP)
    try:
        fs.cut()
    finally:
        proc.kill()
        proc.communicate(timeout=DEADLINE)


# -- the durability rules, on the mount ---------------------------------------------------


@needs_fuse
def test_unsynced_data_is_gone_after_cut(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    write_file(m / "a", b"durable", durable=True)
    with open(m / "a", "r+b") as f:
        f.write(b"LOST!!!")
        f.flush()
    assert (m / "a").read_bytes() == b"LOST!!!"
    assert (fs.backing / "a").read_bytes() == b"durable"  # the backing tree: the durable state
    assert [(p.kind, p.path) for p in fs.pending()] == [("write", "a")]
    fs.cut()
    assert tree(fs.backing) == {"a": b"durable"}


@needs_fuse
def test_synced_data_survives_and_remount_shows_backing_state(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    os.mkdir(m / "d")
    fsync_dir(m)
    write_file(m / "d" / "x", b"x" * 10_000, durable=True)
    write_file(m / "d" / "y", b"unsynced")
    assert fs.pending()
    fs.cut()
    assert not is_mounted(m)
    assert tree(fs.backing) == {"d": None, "d/x": b"x" * 10_000}
    fs.mount()  # as after a reboot
    assert tree(m) == {"d": None, "d/x": b"x" * 10_000}
    assert fs.pending() == []


@needs_fuse
def test_rename_without_dir_fsync_is_undone(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    write_file(m / "a", b"data", durable=True)
    os.rename(m / "a", m / "b")
    fsync_file(m / "b")  # the file, not its directory
    fs.cut()
    assert tree(fs.backing) == {"a": b"data"}


@needs_fuse
def test_rename_across_directories_is_durable_when_the_destination_is_fsynced(
    fs: PowerCutFS,
) -> None:
    m = fs.mountpoint
    for d in ("src", "dst"):
        os.mkdir(m / d)
    fsync_dir(m)
    write_file(m / "src" / "x", b"blob", durable=True)
    os.rename(m / "src" / "x", m / "dst" / "y")
    fsync_file(m / "dst" / "y")
    fs.cut()  # neither directory fsynced: the rename is undone
    assert tree(fs.backing) == {"dst": None, "src": None, "src/x": b"blob"}

    fs.mount()
    os.rename(m / "src" / "x", m / "dst" / "y")
    fsync_dir(m / "src")  # the source alone: the old name is gone, the new one not there
    assert tree(fs.backing) == {"dst": None, "src": None}
    fsync_dir(m / "dst")  # the destination: the whole rename is durable
    assert tree(fs.backing) == {"dst": None, "dst/y": b"blob", "src": None}
    fs.cut()

    fs.mount()
    os.rename(m / "dst" / "y", m / "src" / "x")
    fsync_dir(m / "src")  # the destination alone: the whole rename is durable
    fs.cut()
    assert tree(fs.backing) == {"dst": None, "src": None, "src/x": b"blob"}


@needs_fuse
def test_create_without_dir_fsync_is_undone_even_if_the_file_was_fsynced(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    fd = os.open(m / "new", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"synced data, no name")
    os.fsync(fd)
    os.close(fd)
    assert tree(fs.backing) == {}
    fs.cut()
    assert tree(fs.backing) == {}

    # The same, then the directory too: the data kept aside appears with its name.
    fs.mount()
    fd = os.open(m / "new", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"synced data")
    os.fsync(fd)
    os.close(fd)
    fsync_dir(m)
    fs.cut()
    assert tree(fs.backing) == {"new": b"synced data"}


@needs_fuse
def test_unlink_and_rmdir_without_dir_fsync_are_undone(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    os.mkdir(m / "d")
    write_file(m / "f", b"keep me", durable=True)
    os.unlink(m / "f")
    os.rmdir(m / "d")
    assert [p.kind for p in fs.pending()] == ["unlink", "rmdir"]
    fs.cut()
    assert tree(fs.backing) == {"d": None, "f": b"keep me"}


@needs_fuse
def test_truncates_without_file_fsync_are_undone(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    for name in ("t", "ft", "otrunc"):
        write_file(m / name, b"0123456789", durable=True)
    os.truncate(m / "t", 3)
    with open(m / "ft", "r+b") as f:
        f.truncate(20)
    os.close(os.open(m / "otrunc", os.O_WRONLY | os.O_TRUNC))
    assert [(p.kind, p.path, p.size) for p in fs.pending()] == [
        ("truncate", "t", 3),
        ("truncate", "ft", 20),
        ("truncate", "otrunc", 0),
    ]
    fsync_file(m / "ft", datasync=True)
    fs.cut()
    assert tree(fs.backing) == {
        "ft": b"0123456789" + bytes(10),
        "otrunc": b"0123456789",
        "t": b"0123456789",
    }


@needs_fuse
def test_a_subset_cut_keeps_exactly_the_chosen_sector_pieces(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    write_file(m / "f", b"." * 12_000, durable=True)
    fd = os.open(m / "f", os.O_WRONLY)
    os.pwrite(fd, b"N" * 10_000, 100)  # one write, three sectors
    os.close(fd)
    ops = fs.pending()
    assert [(p.kind, p.offset, p.size) for p in ops] == [
        ("write", 100, 3996),
        ("write", 4096, 4096),
        ("write", 8192, 1908),
    ]
    report = fs.cut(keep={ops[1].id})  # a torn write: only the middle sector reached the disk
    assert report.kept == (ops[1].id,) and report.dropped == 2
    assert (fs.backing / "f").read_bytes() == b"." * 4096 + b"N" * 4096 + b"." * 3808


@needs_fuse
def test_a_subset_skips_what_no_longer_applies(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    write_file(m / "x", b"data")
    os.rename(m / "x", m / "y")
    create, write, rename = fs.pending()
    assert (create.kind, write.kind, rename.kind) == ("create", "write", "rename")
    report = fs.cut(keep=lambda op: op.kind != "create")  # the disk lost the inode
    assert report.skipped == (write.id, rename.id)
    assert tree(fs.backing) == {}


def test_keep_random_is_seeded() -> None:
    ops = [PendingOp(id=i, kind="write", path="f", node=2, sync_path="f") for i in range(100)]
    assert keep_random(ops, 7) == keep_random(ops, 7)
    assert keep_random(ops, 7) != keep_random(ops, 8)
    assert keep_random(ops, 1, fraction=0.0) == set()
    assert keep_random(ops, 1, fraction=1.0) == set(range(100))


# -- the rules and a model, in-process (no FUSE) -------------------------------------------


def _core(tmp: Path) -> PowerCutCore:
    (tmp / "backing").mkdir()
    return PowerCutCore(str(tmp / "backing"), str(tmp / "shadow"), str(tmp / "orphans"))


def test_core_rename_chain_made_durable_by_the_last_destination(tmp_path: Path) -> None:
    core = _core(tmp_path)
    t = CoreTarget(core)
    for d in ("a", "b", "c"):
        t.mkdir(d)
    t.fsyncdir("")
    t.create("a/f")
    t.write("a/f", 0, b"f")
    t.fsync("a/f", False)
    t.fsyncdir("a")
    t.rename("a/f", "b/f")
    t.rename("b/f", "c/f")
    t.fsyncdir("c")  # b was never fsynced: a -> b comes along, so no a/f is left behind
    assert tree(core.backing) == {"a": None, "b": None, "c": None, "c/f": b"f"}
    assert core.pending() == []


def test_core_directory_synced_before_its_own_entry_stays_invisible(tmp_path: Path) -> None:
    core = _core(tmp_path)
    t = CoreTarget(core)
    t.mkdir("d")
    t.create("d/f")
    t.write("d/f", 0, b"x")
    t.fsync("d/f", False)
    t.fsyncdir("d")  # d/f is durable inside d, but d has no durable name yet
    assert tree(core.backing) == {}
    t.fsyncdir("")
    assert tree(core.backing) == {"d": None, "d/f": b"x"}


def test_core_subset_that_would_make_a_cycle_is_skipped(tmp_path: Path) -> None:
    core = _core(tmp_path)
    t = CoreTarget(core)
    t.mkdir("a")
    t.fsyncdir("")
    t.mkdir("a/x")
    t.fsyncdir("a")
    t.rename("a/x", "x")  # pending in the root
    t.rename("a", "x/a")  # pending in x
    _first, second = core.pending()
    report = core.cut({second.id})  # a inside x, where x is still inside a: impossible
    assert report.skipped == (second.id,)
    assert tree(core.backing) == {"a": None, "a/x": None}


def test_core_is_dead_after_the_cut(tmp_path: Path) -> None:
    core = _core(tmp_path)
    fh = core.create("/f", 0o644, os.O_WRONLY)
    core.cut(())
    with pytest.raises(OSError) as exc:
        core.write(b"late", 0, fh)
    assert exc.value.errno == errno.EIO
    assert tree(core.backing) == {}


steps = st.lists(
    st.tuples(
        st.sampled_from(KIND_CHOICES),
        st.integers(0, 7),
        st.integers(0, 7),
        st.integers(0, 7),
        st.integers(0, 25),
    ),
    min_size=10,
    max_size=60,
)
# Which pending operations the disk kept: none, all, or a seeded random part.
keeps = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.05, 0.95)).flatmap(
    lambda fraction: st.tuples(st.just(fraction), st.integers(0, 2**32))
)


def _check_against_model(
    core_or_fs: PowerCutCore | PowerCutFS,
    backing: Path,
    model: Model,
    keep: tuple[float, int],
) -> None:
    """Same pending operations as the model; after a cut keeping the same ones, same tree."""
    got = core_or_fs.pending()
    assert [(p.kind, p.path, p.sync_path, p.offset, p.size) for p in got] == model.pending()
    assert tree(backing) == model.durable_tree()  # durable at every instant, not only at a cut
    fraction, seed = keep
    chosen = keep_random(got, seed, fraction)
    positions = {i for i, p in enumerate(got) if p.id in chosen}
    model_ids = model.ids()
    model.cut({model_ids[i] for i in positions})
    if isinstance(core_or_fs, PowerCutCore):
        core_or_fs.cut(chosen)
    else:
        core_or_fs.cut(chosen)
    assert tree(backing) == model.durable_tree()


@settings(
    max_examples=int(os.environ.get("RESUMER_POWERCUT_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    steps=steps,
    keep=keeps,
    prelude=st.booleans(),
    synced=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**32),
)
def test_core_subset_cut_matches_the_model(
    steps: list[Step], keep: tuple[float, int], prelude: bool, synced: float, seed: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        core = _core(Path(tmp))
        model = Model()
        target = CoreTarget(core)
        for step in (PRELUDE if prelude else []) + steps:
            run_step(model, target, step)
            assert tree(core.backing) == model.durable_tree()
        assert tree(core.shadow) == model.live_tree()
        sweep(model, target, seed, synced)  # some syncs out of log order, then more steps
        for step in steps[: len(steps) // 2]:
            run_step(model, target, step)
        _check_against_model(core, Path(core.backing), model, keep)


@settings(
    max_examples=int(os.environ.get("RESUMER_POWERCUT_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(steps=steps, prelude=st.booleans(), seed=st.integers(0, 2**32))
def test_core_syncing_everything_in_any_order_makes_the_backing_the_live_tree(
    steps: list[Step], prelude: bool, seed: int
) -> None:
    # Needs no model: once every file and every directory was fsynced, nothing is pending
    # that a reader could see, whatever the order of the syncs.
    with tempfile.TemporaryDirectory() as tmp:
        core = _core(Path(tmp))
        target = CoreTarget(core)
        model = Model()  # only to know the live paths
        for step in (PRELUDE if prelude else []) + steps:
            run_step(model, target, step)
        sweep(model, target, seed)
        assert tree(core.backing) == tree(core.shadow)


@needs_fuse
@settings(
    max_examples=int(os.environ.get("RESUMER_POWERCUT_MOUNT_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(steps=steps, keep=keeps)
def test_mount_subset_cut_matches_the_model(
    tmp_path: Path, steps: list[Step], keep: tuple[float, int]
) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        backing = Path(tmp) / "backing"
        backing.mkdir()
        with PowerCutFS(backing, Path(tmp) / "mnt") as pfs:
            model = Model()
            target = MountTarget(pfs.mountpoint)
            for step in PRELUDE + steps:
                run_step(model, target, step)
            assert tree(pfs.mountpoint) == model.live_tree()
            sweep(model, target, keep[1], 0.5)
            for step in steps[: len(steps) // 2]:
                run_step(model, target, step)
            _check_against_model(pfs, backing, model, keep)
            pfs.mount()
            assert tree(pfs.mountpoint) == model.durable_tree()


# -- what must work on the mount -------------------------------------------------------------


@needs_fuse
def test_posix_calls_work_on_the_mount(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    write_file(m / "f", b"hello")
    # pwrite at an offset, O_APPEND, ftruncate, fdatasync
    fd = os.open(m / "f", os.O_RDWR)
    os.pwrite(fd, b"J", 0)
    os.ftruncate(fd, 4)
    os.fdatasync(fd)
    os.close(fd)
    fd = os.open(m / "f", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"-appended")
    os.pwrite(fd, b"!", 0)  # Linux appends on O_APPEND whatever the offset; so do we
    os.close(fd)
    assert (m / "f").read_bytes() == b"Jell-appended!"
    # rename, replace, symlink, hard link
    write_file(m / "g", b"g")
    os.replace(m / "g", m / "f2")
    os.rename(m / "f2", m / "f3")
    os.symlink("f3", m / "s")
    os.link(m / "f3", m / "h")
    assert os.readlink(m / "s") == "f3" and (m / "s").read_bytes() == b"g"
    assert os.stat(m / "h").st_nlink == 2
    # chmod, utime, statvfs
    os.chmod(m / "f", 0o600)
    os.utime(m / "f", ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(m / "f")
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o600, 2_000_000_000)
    vfs = os.statvfs(m)
    assert vfs.f_bsize > 0 and vfs.f_blocks > 0
    # flock: exclusive across two open files (the kernel keeps the locks, per mount)
    a, b = os.open(m / "f", os.O_RDONLY), os.open(m / "f", os.O_RDONLY)
    fcntl.flock(a, fcntl.LOCK_EX)
    with pytest.raises(BlockingIOError):
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(a, fcntl.LOCK_UN)
    fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(a)
    os.close(b)
    # fsync of a directory fd (FUSE's fsyncdir) makes the names durable; then the file
    fsync_dir(m)
    fsync_file(m / "f")
    fsync_file(m / "f3")
    assert tree(fs.backing) == {
        "f": b"Jell-appended!",
        "f3": b"g",
        "h": b"g",
        "s": b"-> f3",
    }
    assert os.stat(fs.backing / "f").st_mode & 0o777 == 0o600
    assert os.stat(fs.backing / "f").st_mtime_ns == 2_000_000_000
    assert os.stat(fs.backing / "h").st_ino == os.stat(fs.backing / "f3").st_ino


@needs_fuse
def test_shared_mmap_and_fallocate(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    write_file(m / "map", bytes(8192), durable=True)
    with open(m / "map", "r+b") as f, mmap.mmap(f.fileno(), 8192) as mm:  # MAP_SHARED
        mm[0:5] = b"mmap!"
        with open(m / "map", "rb") as other:  # the page cache is shared: seen at once
            assert other.read(5) == b"mmap!"
        mm.flush()  # msync: the daemon gets the write, and the kernel's fsync makes it durable
    assert (fs.backing / "map").read_bytes()[:5] == b"mmap!"
    # posix_fallocate: supported (mode 0 extends the size, durable on fsync)
    fd = os.open(m / "map", os.O_RDWR)
    os.posix_fallocate(fd, 0, 100_000)
    assert os.fstat(fd).st_size == 100_000
    os.fsync(fd)
    os.close(fd)
    assert os.stat(fs.backing / "map").st_size == 100_000


@needs_fuse
def test_sqlite_wal_written_by_one_process_read_by_another(fs: PowerCutFS) -> None:
    db = fs.mountpoint / "state.db"
    writer = spawn(
        """
        import sqlite3, sys
        db = sqlite3.connect(sys.argv[1], isolation_level=None)
        db.execute("pragma journal_mode=wal")
        db.execute("create table t(x)")
        db.execute("insert into t values (42)")
        print("committed", flush=True)
        sys.stdin.readline()        # stay open: the WAL and the mmap'd -shm stay in use
        db.execute("insert into t values (43)")
        print("again", flush=True)
        sys.stdin.readline()
        """,
        str(db),
    )
    try:
        expect_line(writer, "committed")
        reader = sqlite3.connect(db)
        assert reader.execute("pragma journal_mode").fetchone() == ("wal",)
        assert reader.execute("select x from t").fetchall() == [(42,)]
        assert writer.stdin is not None
        writer.stdin.write("\n")
        writer.stdin.flush()
        expect_line(writer, "again")
        assert reader.execute("select x from t").fetchall() == [(42,), (43,)]
        reader.close()
    finally:
        writer.kill()
        writer.communicate(timeout=DEADLINE)


SQLITE_WRITER = """
import os, sqlite3, sys
path, sync = sys.argv[1], sys.argv[2]
db = sqlite3.connect(path, isolation_level=None)
db.execute("pragma journal_mode=wal")
db.execute("pragma synchronous=FULL")
db.execute("create table if not exists t(x)")
db.execute("pragma wal_checkpoint(TRUNCATE)")
fd = os.open(os.path.dirname(path), os.O_RDONLY)  # the database's own name, durable
os.fsync(fd)
os.close(fd)
db.execute(f"pragma synchronous={sync}")
db.execute("insert into t values ('committed')")
print("committed", flush=True)
sys.stdin.readline()
"""


@needs_fuse
@pytest.mark.parametrize(("sync", "survives"), [("FULL", True), ("NORMAL", False)])
def test_sqlite_commit_survives_a_cut_only_with_synchronous_full(
    fs: PowerCutFS, sync: str, survives: bool
) -> None:
    db = fs.mountpoint / "state.db"
    writer = spawn(SQLITE_WRITER, str(db), sync)
    expect_line(writer, "committed")
    # The writer still runs, its commit returned. NORMAL in WAL mode synced nothing yet.
    freeze_cut_kill(fs, writer)
    fs.mount()
    rows = sqlite3.connect(db).execute("select x from t").fetchall()
    assert rows == ([("committed",)] if survives else [])


# -- the freeze / cut / kill / remount sequence ------------------------------------------------

RECORDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)  # as the project's root lock does
dfd = os.open(os.path.dirname(sys.argv[1]), os.O_RDONLY)
os.fsync(dfd)
i = 0
while True:
    try:
        os.pwrite(fd, b"%07d\\n" % i, 8 * i)
        os.fsync(fd)
    except OSError as e:
        print("error", e.errno, flush=True)
        sys.stdin.readline()
        raise SystemExit(0)
    print("synced", i, flush=True)
    i += 1
"""


@needs_fuse
def test_frozen_process_cut_kill_remount(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    proc = spawn(RECORDER, str(m / "log"))
    for _ in range(20):
        last = int(expect_line(proc, "synced").split()[1])
    freeze_cut_kill(fs, proc)
    data = (fs.backing / "log").read_bytes()
    n = len(data) // 8
    # Every record synced before the freeze is there, intact; nothing torn after them.
    assert n > last and data == b"".join(b"%07d\n" % i for i in range(n))
    fs.mount()
    assert (m / "log").read_bytes() == data
    # The next attempt works on the remounted tree.
    write_file(m / "next", b"attempt 2", durable=True)
    assert (fs.backing / "next").read_bytes() == b"attempt 2"


@needs_fuse
def test_after_the_cut_the_old_mount_answers_nothing(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    proc = spawn(RECORDER, str(m / "log"))
    expect_line(proc, "synced")
    proc.send_signal(signal.SIGSTOP)
    fs.cut()
    before = tree(fs.backing)
    proc.send_signal(signal.SIGCONT)  # it wakes up on a mount whose power is gone
    assert proc.stdout is not None
    line = proc.stdout.readline()
    while line.startswith("synced"):  # printed before it stopped, still in the pipe
        line = proc.stdout.readline()
    assert line.startswith("error"), line
    assert int(line.split()[1]) in (errno.EIO, errno.ENOTCONN, errno.ECONNABORTED)
    assert tree(fs.backing) == before
    # Rebooted while it still lives on the old mount: its flock is gone with that mount.
    fs.mount()
    fd = os.open(m / "log", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    proc.kill()
    proc.communicate(timeout=DEADLINE)


@needs_fuse
def test_context_manager_cleans_up_on_failure(tmp_path: Path) -> None:
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    held = -1
    with pytest.raises(RuntimeError, match="test failed midway"), PowerCutFS(backing, mnt) as pfs:
        held = os.open(mnt / "open-file", os.O_WRONLY | os.O_CREAT, 0o644)
        pid = pfs.pid
        raise RuntimeError("test failed midway")
    assert not is_mounted(mnt)  # unmounted lazily while our fd is still open
    assert pid is not None and exited(pid)
    assert pfs.work is None
    with pytest.raises(OSError):  # the old mount is gone: nothing answers, nothing hangs
        os.write(held, b"x")
    with contextlib.suppress(OSError):  # ENOTCONN; the descriptor is released all the same
        os.close(held)
    assert sorted(tmp_path.iterdir()) == [backing, mnt]  # the work directory is gone too


@needs_fuse
def test_daemon_leaves_when_the_test_process_dies(tmp_path: Path) -> None:
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    controller = spawn(
        """
        import sys
        from resumer.lab.powercut import PowerCutFS
        fs = PowerCutFS(sys.argv[1], sys.argv[2])
        fs.mount()
        print("mounted", fs.pid, flush=True)
        sys.stdin.readline()
        """,
        str(backing),
        str(mnt),
    )
    pid = int(expect_line(controller, "mounted").split()[1])
    assert is_mounted(mnt)
    controller.kill()  # no cleanup code runs: the daemon sees its socket close
    controller.communicate(timeout=DEADLINE)
    poll(lambda: not is_mounted(mnt) and exited(pid), "the daemon to unmount and exit")


@needs_fuse
def test_mount_refuses_a_busy_mount_point(fs: PowerCutFS) -> None:
    with pytest.raises(PowerCutError, match="already"):
        fs.mount()
    other = PowerCutFS(fs.backing, fs.mountpoint)
    with pytest.raises(PowerCutError, match="mounted"):
        other.mount()


@needs_fuse
def test_throughput_of_a_64_mib_write_and_fsync(fs: PowerCutFS) -> None:
    buf = os.urandom(MiB)
    start = time.monotonic()
    fd = os.open(fs.mountpoint / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    for _ in range(64):
        os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    elapsed = time.monotonic() - start
    fsync_dir(fs.mountpoint)  # its name too, or the synced data has no name in the backing
    stats = fs.stats()
    print(f"\npower-cut fs: 64 MiB write+fsync in {elapsed:.2f} s = {64 / elapsed:.0f} MiB/s")
    assert stats["max_write"] == MiB  # max_write = 1 MiB took effect
    assert stats["errors"] == []
    assert os.stat(fs.backing / "big").st_size == 64 * MiB
    assert 64 / elapsed > 10, "far slower than expected (~300 MiB/s here)"
