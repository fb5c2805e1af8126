"""The control socket of ``resumer serve`` against garbage: every bad line gets one
error line (exit 2, what was wrong), never a traceback, and the daemon keeps answering.

Also: the socket is 0600 and only the owner's, a stale socket file left by a killed daemon
is replaced, and it is gone once the daemon has stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resumer.serve.control import COMMANDS, MAX_REQUEST, SOCKET_NAME

DEADLINE = 60.0
SERVE = (sys.executable, "-m", "resumer", "serve")


class SyncDaemon:
    """``resumer serve`` in a child process; stderr (its log) goes to a file."""

    def __init__(self, root: Path, log: Path) -> None:
        env = dict(os.environ)
        env.pop("RESUMER_ROOT", None)
        env["PYTHONUNBUFFERED"] = "1"
        self.log = log
        self._err = log.open("wb")
        self.proc = subprocess.Popen(
            [*SERVE, "--root", str(root), "--listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=env,
        )
        self.sock = root / SOCKET_NAME
        line: list[bytes] = []
        assert self.proc.stdout is not None
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(DEADLINE)
        assert line and line[0].startswith(b"Serving on http://"), (line, self.text())
        self.url = line[0].decode().split()[-1]

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(DEADLINE)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._err.close()
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def exchange(path: Path, data: bytes, *, half_close: bool = True) -> list[dict[str, Any]]:
    """Send ``data``, read every line the daemon answers until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(DEADLINE)
        s.connect(str(path))
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return [json.loads(line) for line in got.splitlines()]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[SyncDaemon]:
    d = SyncDaemon(tmp_path / "root", tmp_path / "serve.log")
    try:
        yield d
    finally:
        assert d.stop() == 0, d.text()
        assert not d.sock.exists()
        assert "Traceback" not in d.text(), d.text()


def _not_a_request() -> st.SearchStrategy[bytes]:
    """Lines that are not a request the daemon can run."""
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=10,
    )
    bad_command = st.fixed_dictionaries(
        {"command": json_values.filter(lambda c: c not in COMMANDS)},
        optional={"args": json_values, "config": json_values},
    )
    bad_pull = st.fixed_dictionaries(
        {
            "command": st.just("pull"),
            "args": st.fixed_dictionaries(
                {"image": json_values.filter(lambda v: not isinstance(v, str))}
            ),
        }
    )
    bad_rm = st.fixed_dictionaries(
        {
            "command": st.just("rm"),
            "args": st.fixed_dictionaries(
                {"pulls": json_values.filter(lambda v: not isinstance(v, list) or not v)}
            ),
        }
    )
    bad_setting = st.fixed_dictionaries(
        {
            "command": st.sampled_from(COMMANDS),
            "config": st.dictionaries(
                st.text(min_size=1, max_size=12).filter(lambda k: k.isidentifier()),
                json_values,
                min_size=1,
            ),
        }
    ).map(lambda r: {**r, "config": {"x_" + k: v for k, v in r["config"].items()}})
    objects = (bad_command | bad_pull | bad_rm | bad_setting).map(
        lambda obj: json.dumps(obj).encode()
    )
    raw = st.binary(max_size=300).map(lambda b: b.replace(b"\n", b""))
    return (
        objects
        | raw
        | json_values.filter(lambda v: not isinstance(v, dict)).map(
            lambda v: json.dumps(v).encode()
        )
    ).map(lambda b: b + b"\n")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(line=_not_a_request())
def test_every_garbage_line_gets_one_error_line_and_the_daemon_still_answers(
    daemon: SyncDaemon, line: bytes
) -> None:
    answer = exchange(daemon.sock, line)
    assert len(answer) == 1, answer
    [done] = [m["done"] for m in answer]
    assert done["exit"] == 2 and done["result"] is None
    assert done["error"].startswith("control request: "), done
    # Still serving: a real request right after it.
    [status] = exchange(daemon.sock, b'{"command": "status"}\n')
    assert status["done"]["exit"] == 0
    assert status["done"]["result"]["in_use_by"] == daemon.proc.pid


def test_a_huge_line_a_cut_line_and_silence_each_get_their_answer(
    daemon: SyncDaemon,
) -> None:
    [huge] = exchange(daemon.sock, b"{" + b"x" * (2 * MAX_REQUEST) + b"\n")
    assert huge["done"]["exit"] == 2
    assert f"longer than {MAX_REQUEST} bytes" in huge["done"]["error"]
    [cut] = exchange(daemon.sock, b'{"command": "status"')
    assert cut["done"]["exit"] == 2 and "before a whole line" in cut["done"]["error"]
    assert exchange(daemon.sock, b"") == []  # connected and left: nothing to answer
    [status] = exchange(daemon.sock, b'{"command": "status"}\n')
    assert status["done"]["exit"] == 0


def test_the_socket_is_the_owners_only(daemon: SyncDaemon) -> None:
    st_ = os.lstat(daemon.sock)
    assert stat.S_ISSOCK(st_.st_mode)
    assert stat.S_IMODE(st_.st_mode) == 0o600
    assert st_.st_uid == os.getuid()
    # No temporary name left beside it.
    assert [p.name for p in daemon.sock.parent.iterdir() if "serve.sock" in p.name] == [SOCKET_NAME]


def test_a_stale_socket_of_a_killed_daemon_is_replaced(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = SyncDaemon(root, tmp_path / "first.log")
    first.proc.kill()  # SIGKILL: its socket file stays behind, refusing connections
    first.proc.wait()
    first.stop()
    assert first.sock.exists()
    with socket.socket(socket.AF_UNIX) as s, pytest.raises(ConnectionRefusedError):
        s.connect(str(first.sock))
    # The CLI does not take the stale file for a daemon: status reads the root itself.
    out = subprocess.run(
        [sys.executable, "-m", "resumer", "status", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert out.returncode == 0 and "nothing unfinished" in out.stdout, out
    second = SyncDaemon(root, tmp_path / "second.log")
    try:
        assert "replacing" in second.text() and "left by a daemon that ended" in second.text()
        [status] = exchange(second.sock, b'{"command": "status"}\n')
        assert status["done"]["result"]["in_use_by"] == second.proc.pid
    finally:
        assert second.stop() == 0
    assert not second.sock.exists()


def test_a_root_whose_socket_path_is_too_long_for_a_unix_address_still_works(
    tmp_path: Path,
) -> None:
    root = tmp_path / ("r" * 60) / ("o" * 60)
    sock = root / SOCKET_NAME
    assert len(os.fsencode(sock)) > 108  # sun_path's size on Linux
    d = SyncDaemon(root, tmp_path / "serve.log")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "resumer", "status", "--json", "--root", str(root)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["in_use_by"] == d.proc.pid
        assert "control: status" in d.text()  # it went through the daemon
    finally:
        assert d.stop() == 0, d.text()
    assert not sock.exists()
