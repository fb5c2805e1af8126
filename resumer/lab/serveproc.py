"""``resumer serve`` as a child process, for the tests and the benchmarks alike.

``ResumerServe(root, upstream)`` runs ``resumer serve --listen 127.0.0.1:PORT`` (port 0 on
the first life: the kernel picks one) with stdout and stderr in ``log``. It is ready when
this life's part of the log says ``Serving on http://HOST:PORT``: the port is read from
there, polled with a deadline, never slept for. ``kill()`` is a SIGKILL of its process
group (as a power cut or the OOM killer would end it); ``start()`` again listens on the
first life's port, on the same root, so clients that were pointed at it keep working.
``stop()`` is a SIGTERM (the daemon drains) with a grace period, then SIGKILL.

The command is ``sys.executable -m resumer`` unless ``command`` says otherwise (the
benchmarks name the console script; ``RESUMER_TEST_SERVE`` runs another build under the
same tests).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

#: A cold start on a loaded 2-core machine: generous, it is only a bound.
READY_S = 90.0
#: Between two probes of a condition that has no event to wait on (a file, a log line).
POLL_S = 0.01

_SERVING = re.compile(r"Serving on http://(\S+)")


class ServeError(RuntimeError):
    """``resumer serve`` did not come up, or exited; the message carries its log's tail."""


def wait_until(
    check: Callable[[], object],
    *,
    timeout: float,
    what: str,
    log: Callable[[], str] = str,
    error: type[Exception] = ServeError,
) -> None:
    """Poll ``check`` until it is true; ``error`` naming ``what`` (and ``log()``) at the
    deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise error(f"not within {timeout:.0f} s: {what}\n{log()}")
        time.sleep(POLL_S)  # a probe interval: the condition has no event to wait on


def tail(path: Path, n: int = 3000) -> str:
    """The last ``n`` characters of a log, or a placeholder if it cannot be read."""
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


def kill_group(proc: subprocess.Popen[bytes], *, grace: float = 0.0) -> None:
    """SIGTERM (if ``grace``) then SIGKILL the process group, and reap the leader."""
    if grace and proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def default_command() -> list[str]:
    # RESUMER_TEST_SERVE runs another build of resumer (e.g. "/path/.venv/bin/python -m
    # resumer") under the same tests; by default, the one this interpreter imports.
    return shlex.split(os.environ.get("RESUMER_TEST_SERVE", "")) or [
        sys.executable,
        "-m",
        "resumer",
    ]


class ResumerServe:
    """``resumer serve`` as a subprocess (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        upstream: str,
        *,
        insecure: Sequence[str] = (),
        extra: Sequence[str] = (),
        log: Path | None = None,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.upstream = upstream
        self.insecure = list(insecure) or [upstream]
        self.extra = list(extra)
        self.log = log if log is not None else root.with_name(root.name + ".log")
        self.command = list(command) if command is not None else default_command()
        self.env = dict(env) if env is not None else None
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.lives = 0
        self.returncode: int | None = None  # of the last life that ended
        self._log_start = 0  # where this life's lines begin in the log

    def argv(self) -> list[str]:
        out = [*self.command, "serve", "--listen", f"127.0.0.1:{self.port}"]
        out += ["--root", str(self.root), "--upstream", self.upstream]
        for host in self.insecure:
            out += ["--insecure-registry", host]
        return out + self.extra

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> ResumerServe:
        self.spawn()
        self.wait_ready()
        return self

    def __enter__(self) -> ResumerServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spawn(self) -> None:
        """Start the process and return at once (``wait_ready`` reads its log)."""
        if self.proc is not None and self.proc.poll() is None:
            raise ServeError("resumer serve is already running")
        self.root.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            out.write(f"--- life {self.lives}: {' '.join(self.argv())}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                env=self.env,
            )
        self.lives += 1

    def _serving(self) -> re.Match[str] | None:
        """The "Serving on" line this life wrote, if it has (ServeError if it exited)."""
        proc = self.proc
        assert proc is not None, "spawn() first"
        if proc.poll() is not None:
            raise ServeError(f"resumer serve exited {proc.returncode}:\n{self.log_tail()}")
        with self.log.open("rb") as f:
            f.seek(self._log_start)
            return _SERVING.search(f.read().decode(errors="replace"))

    def wait_ready(self, deadline: float | None = None) -> bool:
        """Poll until it serves; False at ``deadline`` (``time.perf_counter`` time). Without
        one, ServeError after ``READY_S``; ServeError too if the process exits."""
        if deadline is None:
            wait_until(
                self._serving, timeout=READY_S, what="resumer serve ready", log=self.log_tail
            )
        while (found := self._serving()) is None:
            if deadline is not None and time.perf_counter() >= deadline:
                return False
            time.sleep(POLL_S)  # a probe interval: the log line has no event to wait on
        self.port = int(found.group(1).rsplit(":", 1)[1])
        return True

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        self._end(0.0)

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM (a drain), SIGKILL after ``grace``; the exit code of this life."""
        self._end(grace)
        return self.returncode

    def _end(self, grace: float) -> None:
        if self.proc is not None:
            kill_group(self.proc, grace=grace)
            self.returncode = self.proc.returncode
            self.proc = None

    def text(self) -> str:
        """The whole log, every life."""
        return tail(self.log, n=1 << 30)

    def log_tail(self) -> str:
        return tail(self.log)
