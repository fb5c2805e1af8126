"""Bad input, as a new user gave it unattended: one clear line, the right exit code, and
nothing already stored lost. Never a traceback, never a retry that cannot help.

Exit codes (DESIGN.md, "CLI contract"): 2 usage or config error, 1 failed, 130
interrupted. Most tests run ``python -m resumer`` as a real process against nginx, on a
root that already holds a committed blob and a partial (``stored_root``), and check that
both are intact afterwards. Root bypasses permissions, so "not writable" is tested with
read-only tmpfs mounts and with an unprivileged user (``setpriv``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from badserver import Behaviour, BlobServer, cut
from conftest import NginxFactory, PushImage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import SKOPEO_BIN, require
from test_tls import _certificate

from resumer import config as cfgmod
from resumer.clock import FakeClock
from resumer.config import Config, parse_size
from resumer.engine import Engine
from resumer.errors import (
    BudgetExhaustedError,
    ConfigError,
    PermanentError,
    RootLockedError,
)
from resumer.rootlock import RootLock

MiB = 1 << 20
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounts and setpriv need root")


# ----------------------------------------------------------------------------- helpers


def resumer(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    as_nobody: bool = False,
    cwd: Path | None = None,
    umask: int = -1,
) -> subprocess.CompletedProcess[str]:
    base = dict(os.environ)
    base.pop("RESUMER_ROOT", None)
    base.pop("SSL_CERT_FILE", None)
    return subprocess.run(
        [*(AS_NOBODY if as_nobody else []), sys.executable, "-m", "resumer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
        cwd=cwd,
        umask=umask,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_refused(run: subprocess.CompletedProcess[Any], code: int, *needles: str) -> str:
    """Exit ``code``, one clear line naming each of ``needles``, no traceback."""
    err = run.stderr if isinstance(run.stderr, str) else run.stderr.decode()
    assert run.returncode == code, (run.returncode, err)
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def snapshot(root: Path) -> dict[str, Any]:
    """What a root holds: every blob and partial (hashed) and every transfer row."""
    files = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in ("blobs", "ingest")
        for p in sorted((root / d).rglob("*"))
        if p.is_file()
    }
    db = sqlite3.connect(f"file:{root / 'state.db'}?mode=ro", uri=True)
    try:
        rows = sorted(db.execute("SELECT key, state, offset FROM transfers"))
    finally:
        db.close()
    return {"files": files, "transfers": rows}


def assert_kept(root: Path, before: dict[str, Any]) -> None:
    """Every blob and partial that was in ``root`` is still there, byte for byte."""
    now = snapshot(root)["files"]
    for name, digest in before["files"].items():
        assert now.get(name) == digest, f"{name} was lost or changed"


def stored_root(root: Path) -> dict[str, Any]:
    """Make ``root`` hold a committed blob and a partial (a cut fetch); its snapshot."""

    async def build() -> None:
        blobs = {"kept": os.urandom(300_000), "partial": os.urandom(400_000)}
        config = Config(max_download_attempts=1, chunk_size=4096, retry_delay=0)
        async with BlobServer(blobs) as srv, Engine.open(root, config) as engine:
            await engine.fetch(f"{srv.url}/kept", digest=srv.digest("kept"))  # stays stored
            srv.script = [cut(200_000)]
            with pytest.raises(BudgetExhaustedError):
                await engine.fetch(f"{srv.url}/partial", digest=srv.digest("partial"))

    asyncio.run(build())
    before = snapshot(root)
    assert any(name.startswith("ingest/") for name in before["files"]), before
    assert any(name.startswith("blobs/sha256/") for name in before["files"]), before
    return before


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "64m") -> Iterator[Path]:
    """A tmpfs of our own, so a test can make it read-only (or full) for real."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


@contextlib.contextmanager
def world_dir() -> Iterator[Path]:
    """A directory any user may enter (pytest's tmp_path is 0700 to everyone but root)."""
    where = Path(tempfile.mkdtemp(prefix="resumer-bad-input-", dir="/tmp"))
    where.chmod(0o755)
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def serve(nginx_factory: NginxFactory, tmp_path: Path, data: bytes, extra: str = "") -> str:
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    (www / "blob").write_bytes(data)
    return f"{nginx_factory(www, extra_server=extra).url}/blob"


def json_lines(text: str | bytes) -> list[dict[str, Any]]:
    lines = text.decode() if isinstance(text, bytes) else text
    return [json.loads(x) for x in lines.splitlines() if x.startswith("{")]


def stats_of(text: str | bytes) -> dict[str, int]:
    [stats] = [m["stats"] for m in json_lines(text) if "stats" in m]
    return dict(stats)


# ------------------------------------------------ 1. the output path is a regular file


def test_fetch_refuses_devices_fifos_sockets_and_links_up_front_and_dash_streams_to_stdout(
    tmp_path: Path, nginx_factory: NginxFactory
) -> None:
    data = os.urandom(2 * MiB)
    url, digest = serve(nginx_factory, tmp_path, data), sha256(data)
    root = tmp_path / "root"
    before = stored_root(root)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    precious = tmp_path / "precious"
    precious.write_bytes(b"precious")
    link = tmp_path / "link"
    link.symlink_to(precious)
    cases = [
        (Path("/dev/null"), "is a character device, not a regular file"),
        (fifo, "is a FIFO (named pipe), not a regular file"),
        (sock_path, "is a socket, not a regular file"),
        (link, f"is a symbolic link to {precious}"),
        (tmp_path, "is a directory"),
    ]
    errors = {}
    try:
        for out, why in cases:
            run = resumer("fetch", url, "--digest", digest, "-o", str(out), "--root", str(root))
            errors[out] = assert_refused(run, EXIT_USAGE, f"output {out}", why)
            assert len(errors[out].strip().splitlines()) == 1, errors[out]
            # Refused before the root was opened: not even a transfer row is new.
            assert snapshot(root) == before
    finally:
        listener.close()
    assert f"pass the target path (-o {precious})" in errors[link]
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    assert os.readlink(link) == str(precious) and precious.read_bytes() == b"precious"

    # -o - streams the verified blob to stdout, and nothing else: progress is on stderr.
    cmd = [sys.executable, "-m", "resumer", "fetch", url, "--digest", digest, "-o", "-"]
    common = ["--root", str(root), "--progress", "json"]
    run_b = subprocess.run([*cmd, *common], capture_output=True, cwd=tmp_path, timeout=60)
    assert run_b.returncode == 0, run_b.stderr.decode()
    assert run_b.stdout == data
    assert stats_of(run_b.stderr)["payload_bytes"] == len(data)
    assert not (tmp_path / "-").exists()
    # Only a verified blob reaches stdout: a wrong digest writes nothing there.
    wrong = ["fetch", url, "--digest", "sha256:" + "0" * 64, "-o", "-", *common]
    bad = subprocess.run(
        [sys.executable, "-m", "resumer", *wrong], capture_output=True, cwd=tmp_path, timeout=60
    )
    assert_refused(bad, EXIT_FAILED, "digest")
    assert bad.stdout == b""
    # ./- is a file named "-"; an existing regular file is replaced, no temp file left.
    (tmp_path / "-").write_bytes(b"old")
    ok = resumer("fetch", url, "--digest", digest, "-o", "./-", "--root", str(root), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "-").read_bytes() == data
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".-.")]
    assert_kept(root, before)


# -------------------------------------- 2. an unwritable output directory, found first


@needs_root
def test_an_unwritable_output_directory_is_refused_before_downloading_and_a_failed_publish_keeps_the_blob(  # noqa: E501
    tmp_path: Path, nginx_factory: NginxFactory
) -> None:
    data = os.urandom(8 * MiB)
    # 2 MB/s: a download that takes seconds, as on a slow link.
    url = serve(nginx_factory, tmp_path, data, "limit_rate 2m;")
    root = tmp_path / "root"
    before = stored_root(root)

    # A read-only mount: refused at once, before the root is even opened.
    with tmpfs(tmp_path / "ro") as ro:
        remount(ro, "ro")
        out = ro / "out.bin"
        run = resumer("fetch", url, "-o", str(out), "--root", str(root))
        assert_refused(run, EXIT_USAGE, f"output {out}", f"cannot create files in {ro}")
        assert "Read-only file system" in run.stderr
        assert snapshot(root) == before

    # A directory this (unprivileged) user may not write: the same, found by a real probe.
    with world_dir() as world:
        own_root, theirs = world / "root", world / "theirs"
        own_root.mkdir()
        os.chown(own_root, NOBODY, NOBODY)
        theirs.mkdir(mode=0o755)
        run = resumer(
            "fetch", url, "-o", str(theirs / "out"), "--root", str(own_root), as_nobody=True
        )
        assert_refused(run, EXIT_USAGE, f"cannot create files in {theirs}", "Permission denied")
        assert list(own_root.iterdir()) == []  # nothing was started

    # Publishing fails anyway (the output's file system fills while the copy follows the
    # download: 2 MiB for an 8 MiB blob): the verified blob stays in the store, the error
    # says so, the output's file system is left as it was, and the same command run
    # again, with room, downloads nothing.
    with tmpfs(tmp_path / "late", size="2m") as late:
        out = late / "out.bin"
        args = ["fetch", url, "-o", str(out), "--root", str(root), "--progress", "json"]
        done = resumer(*args)
        assert_refused(done, EXIT_FAILED, f"cannot write {out}", "No space left on device")
        stderr = done.stderr
        assert f"kept in {root} as {sha256(data)}" in stderr
        assert f"--digest {sha256(data)}" in stderr
        assert not out.exists()
        assert list(late.iterdir()) == []  # no temp copy left behind
        assert (root / "blobs" / "sha256" / sha256(data)[7:]).read_bytes() == data
        remount(late, "size=16m")
        again = resumer(*args)
        assert again.returncode == 0, again.stderr
        assert out.read_bytes() == data
        assert stats_of(again.stdout)["wire_bytes"] == 0  # unchanged upstream: reused
        with_digest = resumer(*args, "--digest", sha256(data))
        assert with_digest.returncode == 0, with_digest.stderr
        assert stats_of(with_digest.stdout)["wire_bytes"] == 0
    assert_kept(root, before)


# -------------------------------------------------- 3. tracebacks that are usage errors


ROOT_CASES = [
    "on a read-only mount",
    "not writable by the user",
    "lock not writable by the user",
    "a regular file",
]


@needs_root
@pytest.mark.parametrize("case", ROOT_CASES)
def test_an_unusable_root_is_a_usage_error_naming_the_root_and_the_cause(
    case: str, tmp_path: Path, nginx_factory: NginxFactory
) -> None:
    url = serve(nginx_factory, tmp_path, os.urandom(100_000))
    out = tmp_path / "out"
    with world_dir() as world, tmpfs(tmp_path / "mnt") as mnt:
        as_nobody = False
        root = mnt / "root"
        before: dict[str, Any] | None = None
        if case == "a regular file":
            root = tmp_path / "file"
            root.write_text("not a root")
        elif case == "on a read-only mount":
            before = stored_root(root)
            remount(mnt, "ro")
        else:  # owned by root, 0755: nobody may not write it (or just not its lock)
            root = world / "root"
            before = stored_root(root)
            as_nobody = True
            out = world / "out"
            os.chown(world, NOBODY, NOBODY)
            if case == "lock not writable by the user":
                (root / "lock").chmod(0o666)
        run = resumer("fetch", url, "-o", str(out), "--root", str(root), as_nobody=as_nobody)
        err = assert_refused(run, EXIT_USAGE, f"cannot use root {root}")
        why = {
            "on a read-only mount": "read-only file system",
            "not writable by the user": f"cannot write {root / 'lock'}: permission denied",
            "lock not writable by the user": "cannot create files in it: permission denied",
            "a regular file": "not a directory",
        }[case]
        assert why in err
        assert not out.exists()
        if case == "on a read-only mount":
            remount(mnt, "rw")
        if before is not None:
            assert snapshot(root) == before
        if case == "a regular file":
            assert root.read_text() == "not a root"


@pytest.mark.parametrize(
    "how",
    [
        ("--retry-delay", "inf"),
        ("--retry-delay", "1e400"),
        ("--retry-delay", "nan"),
        ("--stall-timeout", "-inf"),
        ("--low-speed-time", "NaN"),
        ("file", '{"retry-delay": 1e400}'),
        ("file", '{"stall-timeout": NaN}'),
        ("file", '{"low-speed-time": -Infinity}'),
        ("env", "RESUMER_RETRY_DELAY=inf"),
        ("env", "RESUMER_STALL_TIMEOUT=nan"),
    ],
)
def test_non_finite_seconds_are_a_config_error_naming_the_option(
    how: tuple[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    before = stored_root(root)
    args = ["fetch", "http://127.0.0.1:9/blob", "-o", str(tmp_path / "out"), "--root", str(root)]
    env: dict[str, str] = {}
    kind, value = how
    if kind == "file":
        config = tmp_path / "config.json"
        config.write_text(value)
        args += ["--config", str(config)]
        option = next(iter(json.loads(value)))
    elif kind == "env":
        name, _, raw = value.partition("=")
        env[name] = raw
        option = name.removeprefix("RESUMER_").lower().replace("_", "-")
    else:
        args.append(f"{kind}={value}")  # "=": argparse reads a bare "-inf" as an option
        option = kind
    run = resumer(*args, env=env)
    assert_refused(run, EXIT_USAGE, option, "finite number of seconds")
    assert snapshot(root) == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--size-mib", "0"], "argument --size-mib: must be between 1 and"),
        (["--size-mib", "-3"], "argument --size-mib: must be between 1 and"),
        (["--size-mib", "lots"], "argument --size-mib: not a whole number"),
        (["--rate-mbps", "0"], "argument --rate-mbps: must be a finite rate above 0"),
        (["--rate-mbps", "inf"], "argument --rate-mbps: must be a finite rate above 0"),
        (["--kill-at", "2"], "argument --kill-at: must be a fraction"),
        (["--kill-at", "0"], "argument --kill-at: must be a fraction"),
        (["--kill-at", "nan"], "argument --kill-at: must be a fraction"),
        (["--workdir", "{file}"], "--workdir {file}: not a directory"),
        (["--workdir", "{data}"], "--workdir {data}: not empty and not made by resumer demo"),
    ],
)
def test_bad_demo_arguments_are_usage_errors(args: list[str], needle: str, tmp_path: Path) -> None:
    file = tmp_path / "a-file"
    file.write_text("mine")
    data = tmp_path / "data"
    (data / "root").mkdir(parents=True)
    (data / "root" / "precious").write_text("mine")
    where = {"file": str(file), "data": str(data)}
    run = resumer("demo", *(a.format(**where) for a in args), timeout=30)
    assert_refused(run, EXIT_USAGE, needle.format(**where))
    assert file.read_text() == "mine"
    assert (data / "root" / "precious").read_text() == "mine"  # the demo would wipe root/


FLOAT_OPTIONS = [f.name for f in Config.__dataclass_fields__.values() if f.type == "float"]
FILE_KEYS = {name: key for key, name in cfgmod._FILE_KEYS.items()}
NON_FINITE = st.sampled_from([math.inf, -math.inf, math.nan, "1e400", "-1e400", "nan", "inf"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(FLOAT_OPTIONS), value=NON_FINITE, source=st.sampled_from("CFEL"))
def test_every_float_option_refuses_non_finite_numbers_from_every_source(
    name: str, value: float | str, source: str
) -> None:
    option = name.replace("_", "-")
    number = float(value)
    key = FILE_KEYS.get(name)
    if source in "FE" and key is None:
        source = "L"  # not settable from a file or the environment: the flag path
    with pytest.raises(ConfigError) as info:
        if source == "C":  # the library's own Config
            Config(**{name: number})
        elif source == "L":  # command-line flags (argparse's float() accepts all of these)
            cfgmod.build({name: number}, environ={})
        elif source == "E":
            assert key is not None
            env = "RESUMER_" + key.upper().replace("-", "_")
            cfgmod.build({}, environ={env: str(value)})
            option = f"environment {env}: {option}"
        else:
            assert key is not None
            # JSON's non-finite spellings, as Python's json reads them; 1e400 reads as inf
            literal = {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}.get(
                str(value), str(value)
            )
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.json"
                path.write_text(f'{{"{key}": {literal}}}')
                cfgmod.build({}, config_file=path, environ={})
                option = f"config file {path}: {option}"
    assert option in str(info.value), str(info.value)
    assert "finite" in str(info.value)


# ---------------------------------------------- 4. Ctrl-C / SIGTERM during the lock wait


async def test_sigint_and_sigterm_while_waiting_for_the_root_lock_exit_130_at_once(
    tmp_path: Path, nginx_factory: NginxFactory
) -> None:
    data = os.urandom(16 * MiB)
    url = serve(nginx_factory, tmp_path, data, "limit_rate 4m;")
    root, out = tmp_path / "root", tmp_path / "out.bin"

    async def start(*args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "resumer", "fetch", url, "--root", str(root), *args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    holder = await start("--digest", sha256(data), "-o", str(out), "--progress", "json")
    waiters: list[asyncio.subprocess.Process] = []
    try:
        assert holder.stdout is not None
        async with asyncio.timeout(60):
            while True:  # the holder has the lock once it reports bytes
                msg = json.loads(await holder.stdout.readline())
                if msg.get("status") == "Downloading":
                    break
        holder.send_signal(signal.SIGSTOP)  # holds the lock for as long as the test likes
        for sig in (signal.SIGINT, signal.SIGTERM):
            waiter = await start("-o", str(tmp_path / f"other-{sig.name}"))
            waiters.append(waiter)
            assert waiter.stderr is not None
            line = await asyncio.wait_for(waiter.stderr.readline(), 30)
            assert f"waiting for pid {holder.pid}, which is using {root}" in line.decode()
            started = time.monotonic()
            waiter.send_signal(sig)
            assert await asyncio.wait_for(waiter.wait(), 10) == EXIT_INTERRUPTED
            assert time.monotonic() - started < 3, "the lock wait did not stop promptly"
            rest = (await waiter.stderr.read()).decode()
            assert "interrupted; partial downloads are kept" in rest
            assert "Traceback" not in rest
        holder.send_signal(signal.SIGCONT)
        assert holder.stdout is not None
        await asyncio.wait_for(holder.stdout.read(), 60)
        assert await asyncio.wait_for(holder.wait(), 60) == 0
    finally:
        for p in (holder, *waiters):
            if p.returncode is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                await p.wait()
    assert out.read_bytes() == data
    # The waiters left nothing behind: the lock is free at once.
    async with Engine.open(root, lock_timeout=0):
        pass


async def test_the_root_lock_wait_polls_without_a_thread_and_gives_up_cleanly(
    tmp_path: Path,
) -> None:
    holder = RootLock(tmp_path)
    await holder.acquire()
    now = [0.0]
    pauses: list[float] = []
    parked, never = asyncio.Event(), asyncio.Event()

    async def fake_sleep(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds
        if now[0] > 100:  # a long wait: park it here, for the test to cancel
            parked.set()
            await never.wait()
        await asyncio.sleep(0)

    try:
        timed = RootLock(tmp_path, sleep=fake_sleep, monotonic=lambda: now[0])
        with pytest.raises(RootLockedError, match=r"still in use by pid \d+ after 5 s"):
            await timed.acquire(timeout=5)
        assert sum(pauses) == pytest.approx(5) and max(pauses) <= 0.25
        # Cancelled mid-wait (Ctrl-C): nothing held, nothing left to take the lock later.
        forever = RootLock(tmp_path, sleep=fake_sleep, monotonic=lambda: now[0])
        task = asyncio.create_task(forever.acquire())
        await asyncio.wait_for(parked.wait(), 10)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert forever._fd == -1
    finally:
        holder.release()
    free = RootLock(tmp_path)
    await free.acquire(timeout=0)
    free.release()


# ------------------------------------ 5. URLs fetch cannot use; untrusted certificates


BAD_URLS = [
    ("ftp://user:secret@example.com/blob?sig=s3cr3t", "ftp://example.com/blob", "scheme 'ftp'"),
    ("file:///etc/passwd", "file:///etc/passwd", "unsupported scheme 'file'"),
    ("example.com/blob?token=s3cr3t", "example.com/blob", "no scheme"),
    ("http://", "http://", "no host"),
    ("http:///blob", "http:///blob", "no host"),
    ("https://user:secret@[::1/blob?sig=s3cr3t", "https://[::1/blob", "malformed"),
    ("http://127.0.0.1:99999/blob?sig=s3cr3t", "http://127.0.0.1:99999/blob", "malformed"),
    ("http://exa mple.com/blob", "http://exa mple.com/blob", "spaces"),
]


def test_unsupported_or_malformed_urls_fail_at_once_and_an_untrusted_certificate_is_permanent(
    tmp_path: Path, nginx_factory: NginxFactory
) -> None:
    root = tmp_path / "root"
    before = stored_root(root)
    out = tmp_path / "out"
    for url, shown, why in BAD_URLS:
        started = time.monotonic()
        run = resumer("fetch", url, "-o", str(out), "--root", str(root), "--retry-delay", "30")
        err = assert_refused(run, EXIT_USAGE, f"URL {shown}", why)
        assert time.monotonic() - started < 20
        assert "secret" not in err and "s3cr3t" not in err, err
        assert snapshot(root) == before
    assert not out.exists()

    # An untrusted certificate: one attempt (a retry would wait 30 s), and what to do.
    cert, key = _certificate(tmp_path)
    www = tmp_path / "www"
    www.mkdir()
    (www / "blob").write_bytes(b"x" * 1000)
    port = free_tcp_port()
    nginx_factory(
        www,
        extra_server=f"listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; "
        f"ssl_certificate_key {key};",
    )
    started = time.monotonic()
    args = ["fetch", f"https://127.0.0.1:{port}/blob", "-o", str(out), "--root", str(root)]
    run = resumer(*args, "--retry-delay", "30")
    err = assert_refused(run, EXIT_FAILED, "TLS certificate not trusted", "SSL_CERT_FILE=")
    assert time.monotonic() - started < 20, "an untrusted certificate was retried"
    assert "gave up after" not in err
    assert not out.exists()
    # Trusted (an operator's private CA): the same command works.
    ok = resumer(*args, env={"SSL_CERT_FILE": str(cert)})
    assert ok.returncode == 0, ok.stderr
    assert out.read_bytes() == b"x" * 1000
    assert_kept(root, before)


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_a_redirect_to_another_scheme_fails_at_once_without_leaking_it(
    tmp_path: Path,
) -> None:
    data = {"blob": os.urandom(10_000)}
    clock = FakeClock()
    async with BlobServer(data) as srv:
        srv.script = [Behaviour("redirect", location="ftp://user:secret@x/y?sig=s3cr3t")]
        async with Engine.open(tmp_path, Config(retry_delay=30), clock=clock) as engine:
            with pytest.raises(PermanentError) as info:
                await engine.fetch(f"{srv.url}/blob", digest=srv.digest("blob"))
    assert "unsupported scheme" in str(info.value)
    assert "secret" not in str(info.value) and "s3cr3t" not in str(info.value)
    assert clock.sleeps == [] and len(srv.requests) == 1  # not retried


# ------------------------------------------------- 6. layouts other users can read


def modes(where: Path, skip: Sequence[str] = ()) -> dict[str, int]:
    return {
        str(p.relative_to(where)): stat.S_IMODE(p.stat().st_mode)
        for p in [where, *where.rglob("*")]
        if not any(str(p.relative_to(where)).startswith(s) for s in skip)
    }


@needs_root
def test_layout_files_are_0644_and_directories_0755_so_another_user_can_read_the_image(
    tmp_path: Path, pushed_image: PushImage, nginx_factory: NginxFactory
) -> None:
    require(SKOPEO_BIN)
    pushed = pushed_image()
    private = ("state.db", "lock")  # the root's own, not the image layout's
    with world_dir() as world, tmpfs(world / "other-fs") as other_fs:
        root, copy = world / "root", world / "copy"
        run = resumer("pull", pushed.reference, "--root", str(root), umask=0o022)
        assert run.returncode == 0, run.stderr
        # --dest on another file system: its blobs are copies, not hardlinks.
        dest = other_fs / "dest"
        run = resumer(
            "pull", pushed.reference, "--root", str(root), "--dest", str(dest), umask=0o022
        )
        assert run.returncode == 0, run.stderr
        for where in (root, dest):
            found = modes(where, skip=private)
            assert found[str(Path("blobs") / "sha256")] == 0o755
            assert found["oci-layout"] == found["index.json"] == 0o644
            blobs = {k: v for k, v in found.items() if k.startswith("blobs/sha256/")}
            assert len(blobs) == len(pushed.image.layers) + 2  # layers, config, manifest
            wrong = {k: oct(v) for k, v in found.items() if v not in (0o644, 0o755)}
            assert not wrong, wrong
        # Another user's skopeo reads the image, layers included.
        copy.mkdir()
        os.chown(copy, NOBODY, NOBODY)
        for i, layout in enumerate((root, dest)):
            to = f"dir:{copy / str(i)}"
            read = subprocess.run(
                [*AS_NOBODY, "skopeo", "copy", f"oci:{layout}:{pushed.tag}", to],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert read.returncode == 0, read.stderr
        # A published fetch (copied across file systems) and a partial: 0644 too.
        data = os.urandom(300_000)
        url = serve(nginx_factory, tmp_path, data)
        fetched = other_fs / "fetched"
        run = resumer("fetch", url, "-o", str(fetched), "--root", str(root), umask=0o022)
        assert run.returncode == 0, run.stderr
        assert stat.S_IMODE(fetched.stat().st_mode) == 0o644
        old_umask = os.umask(0o022)
        try:
            stored_root(world / "partials")  # in this process: its umask applies
        finally:
            os.umask(old_umask)
        partials = [p for p in (world / "partials" / "ingest").rglob("*") if p.is_file()]
        assert partials and {stat.S_IMODE(p.stat().st_mode) for p in partials} == {0o644}
        # The umask still has the last word, as with open().
        strict = world / "strict"
        run = resumer("pull", pushed.reference, "--root", str(strict), umask=0o027)
        assert run.returncode == 0, run.stderr
        wrong = {k: oct(v) for k, v in modes(strict).items() if v not in (0o640, 0o750)}
        assert not wrong, wrong


# ------------------------------------------------------ 7. the partial budget's units


def test_the_partial_budget_takes_units_and_a_tiny_one_is_refused_before_it_deletes_partials(
    tmp_path: Path, nginx_factory: NginxFactory
) -> None:
    data = os.urandom(200_000)
    url, digest = serve(nginx_factory, tmp_path, data), sha256(data)
    root = tmp_path / "root"
    before = stored_root(root)
    out = tmp_path / "out"
    fetch = ["fetch", url, "--digest", digest, "-o", str(out), "--root", str(root)]
    config = tmp_path / "config.json"
    minimum = "must be at least 64 MiB (67108864 bytes)"
    bad: list[tuple[list[str], dict[str, str], str, str]] = [
        (["--partial-budget", "1M"], {}, '{"a": 1}', f"--partial-budget {minimum}, got 1 MiB"),
        (["--partial-budget", "12XB"], {}, "{}", "--partial-budget: invalid size '12XB'"),
        (["--partial-budget=-1G"], {}, "{}", "--partial-budget: invalid size"),
        ([], {"RESUMER_PARTIAL_BUDGET_BYTES": "10"}, "{}", "environment RESUMER_PARTIAL_BUDGET"),
        ([], {}, '{"partial-budget-bytes": "1MiB"}', f"partial-budget-bytes {minimum}"),
        ([], {}, '{"partial-budget-bytes": 1e400}', "partial-budget-bytes: invalid size inf"),
    ]
    for flags, env, text, needle in bad:
        config.write_text(text)
        run = resumer(*fetch, *flags, "--config", str(config), env=env)
        assert_refused(run, EXIT_USAGE, needle)
        assert snapshot(root) == before  # no gc ran: every partial is still there
    good: list[tuple[list[str], dict[str, str], str]] = [
        (["--partial-budget", "16GiB"], {}, "{}"),
        ([], {"RESUMER_PARTIAL_BUDGET_BYTES": "512M"}, "{}"),
        ([], {}, '{"partial-budget-bytes": "10G"}'),
        ([], {}, '{"partial-budget-bytes": 68719476736}'),
    ]
    for flags, env, text in good:
        config.write_text(text)
        out.unlink(missing_ok=True)
        run = resumer(*fetch, *flags, "--config", str(config), env=env)
        assert run.returncode == 0, run.stderr
        assert out.read_bytes() == data
    assert_kept(root, before)


UNITS = {
    "": 1,
    "B": 1,
    **{u: 1 << 10 for u in ("K", "KB", "KiB", "k", "kib")},
    **{u: 1 << 20 for u in ("M", "MB", "MiB", "m", "mib")},
    **{u: 1 << 30 for u in ("G", "GB", "GiB", "g", "gb")},
    **{u: 1 << 40 for u in ("T", "TB", "TiB", "t")},
}


@given(
    number=st.integers(min_value=0, max_value=1 << 22),
    unit=st.sampled_from(sorted(UNITS)),
    space=st.sampled_from(["", " "]),
    pad=st.sampled_from(["", " ", "\t"]),
)
def test_sizes_round_trip_through_every_unit(number: int, unit: str, space: str, pad: str) -> None:
    text = f"{pad}{number}{space}{unit}{pad}"
    assert parse_size(text, option="--partial-budget") == number * UNITS[unit]
    assert parse_size(number * UNITS[unit], option="--partial-budget") == number * UNITS[unit]
    if UNITS[unit] > 1:  # a fraction is whole bytes, rounded down
        assert (
            parse_size(f"{number}.5{unit}", option="x") == number * UNITS[unit] + UNITS[unit] // 2
        )


GARBAGE = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"-\d+[KMGT]?", fullmatch=True),  # negative
    st.from_regex(r"\d+(e|E)\d+", fullmatch=True),  # exponents are not sizes
    st.from_regex(r"\d+\s*(XB|kk|Mi|GIBS|bytes|PB|EiB)", fullmatch=True),  # no such unit
    st.sampled_from(["nan", "inf", "-inf", "", " ", ".", "1..5G", "0x10", "1,5G", "½G", "١٢"]),
    st.sampled_from([True, None, [], {}, math.inf, math.nan, -1, 1.5, -0.5]),
)
VALID = r"\s*(\d+(\.\d*)?|\.\d+)\s*([KkMmGgTt]([Ii]?[Bb])?|[Bb])?\s*"


@given(value=GARBAGE)
def test_anything_but_a_size_is_a_config_error_naming_the_option(value: object) -> None:
    import re

    if isinstance(value, str) and re.fullmatch(VALID, value, re.ASCII):
        try:
            assert parse_size(value, option="--partial-budget") >= 0
        except ConfigError as exc:
            assert "too large" in str(exc)
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return
    with pytest.raises(ConfigError, match=r"^--partial-budget"):
        parse_size(value, option="--partial-budget")
