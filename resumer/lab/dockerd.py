"""dockerd ("the seed"), a daemon of its own run as DESIGN.md says: a benchmark peer, and
the engine that tests/test_serve_engines.py puts behind ``resumer serve``.

``Dockerd(base)`` runs Debian's dockerd 20.10 with ``--storage-driver=vfs --iptables=false
--ip-masq=false --bridge=none``, its own ``--data-root``, ``--exec-root``, pid file and
``-H unix://SOCK``, and ``--insecure-registry 127.0.0.0/8`` (so ``docker pull`` talks plain
HTTP to the registry and the fault proxy on loopback), and ``--max-download-attempts`` as
configured. ``start()`` polls ``docker -H unix://SOCK version`` until it answers (with a
deadline, never a blind sleep); ``kill()`` SIGKILLs the daemon's process group (the
containerd it supervises dies with it: dockerd starts it with ``Pdeathsig``) and clears the
exec root, as a reboot clears /run (a killed daemon also leaves its data root bind-mounted
onto itself: the next daemon reuses that mount); ``stop()`` terminates it and unmounts
whatever it left at or under its roots. ``with dockerd(base) as d:`` starts one and stops
and removes it on exit. ``daemon_config`` is written as its ``--config-file`` (e.g.
``{"registry-mirrors": ["http://127.0.0.1:5000"]}``), and ``env`` adds to its environment
(e.g. a dead ``HTTPS_PROXY``, so a pull that bypasses the mirror fails instead of going out).

``extra_args`` go after those flags (another ``--insecure-registry``, say) and ``prefix``
before ``dockerd`` (``nsenter --net=/run/netns/NS --``: the daemon in a network namespace,
reached by the client through its socket's path all the same).

The client is Debian's ``/usr/bin/docker`` (the same 20.10), named by path: another
``docker`` may come first on PATH. Nothing here imports resumer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DOCKERD = "/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").exists() else "dockerd"
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
READY_LIMIT_S = 30.0  # dockerd answered in 0.3 s here; a cold first start takes longer
POLL_S = 0.02  # between two `docker version` probes
DEFAULT_ATTEMPTS = 5  # dockerd's own default for --max-download-attempts


class DockerdError(RuntimeError):
    """dockerd did not come up, or exited; the message carries its log's tail."""


def versions() -> dict[str, str]:
    """``dockerd --version`` and the client's, for a results file's ``versions``."""

    def first(cmd: Sequence[str]) -> str:
        try:
            p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable ({exc})"
        text = (p.stdout or p.stderr).strip()
        return text.splitlines()[0] if text else "unknown"

    return {"dockerd": first([DOCKERD, "--version"]), "docker": first([DOCKER, "--version"])}


def unmount_under(path: Path) -> None:
    """Lazily unmount every mount point at or under ``path`` (deepest first).

    ``path`` itself counts: dockerd bind-mounts its data root onto itself (to make it a
    shared mount) and only a clean shutdown undoes that, so a SIGKILL leaves it mounted.
    """
    top = str(path.resolve())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [ln.split()[4] for ln in lines if len(ln.split()) > 4]
    mine = (m for m in points if m == top or m.startswith(top + "/"))
    for mp in sorted(mine, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, timeout=10, check=False)


def image_recorded(data_root: Path, ref: str, manifest_digest: str | None = None) -> bool:
    """Whether dockerd's reference store names ``ref`` (``HOST:PORT/REPO:TAG``), and with
    ``manifest_digest`` also ``HOST:PORT/REPO@DIGEST``: what a pull that completed writes.

    Read from ``DATA_ROOT/image/vfs/repositories.json``, so it needs no running daemon.
    """
    path = data_root / "image" / "vfs" / "repositories.json"
    try:
        repos = json.loads(path.read_text()).get("Repositories", {})
    except (OSError, ValueError):
        return False
    name = ref.rsplit(":", 1)[0]
    names = repos.get(name, {})
    if ref not in names:
        return False
    return manifest_digest is None or f"{name}@{manifest_digest}" in names


class Dockerd:
    """One dockerd with its own roots and socket under ``base``; see the module doc."""

    def __init__(
        self,
        base: Path,
        *,
        max_download_attempts: int = DEFAULT_ATTEMPTS,
        max_concurrent_downloads: int | None = None,
        exec_root: Path | None = None,
        log: Path | None = None,
        daemon_config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
        extra_args: Sequence[str] = (),
    ) -> None:
        self.base = base
        self.data_root = base / "data"
        # The exec root holds containerd's sockets: keep the path short (108-byte limit).
        self.exec_root = exec_root if exec_root is not None else base / "exec"
        self.sock = base / "d.sock"
        self.pidfile = self.exec_root / "dockerd.pid"
        self.log = log if log is not None else base / "dockerd.log"
        self.max_download_attempts = max_download_attempts
        self.max_concurrent_downloads = max_concurrent_downloads
        self.config_file = base / "daemon.json"
        self.daemon_config = dict(daemon_config or {})
        self.env = dict(env or {})
        self.prefix = list(prefix)  # the daemon's argv goes after it (e.g. nsenter --net=…)
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: list[float] = []  # each start's time to answer `docker version`
        self.kills = 0

    # ------------------------------------------------------------------ commands

    def argv(self) -> list[str]:
        out = [
            DOCKERD,
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.pidfile),
            "-H",
            f"unix://{self.sock}",
            "--insecure-registry",
            "127.0.0.0/8",
            "--max-download-attempts",
            str(self.max_download_attempts),
            # its own namespace in the containerd it starts, and no host config file
            "--containerd-namespace",
            "resumer-bench",
            "--containerd-plugins-namespace",
            "resumer-bench-plugins",
            "--config-file",
            str(self.config_file),
        ]
        if self.max_concurrent_downloads is not None:
            out += ["--max-concurrent-downloads", str(self.max_concurrent_downloads)]
        return [*out, *self.extra_args]

    def docker(self, *args: str) -> list[str]:
        """The client's argv against this daemon's socket."""
        return [DOCKER, "-H", f"unix://{self.sock}", *args]

    def pull_argv(self, ref: str) -> list[str]:
        return self.docker("pull", "-q", ref)

    def has_image(self, ref: str, manifest_digest: str | None = None) -> bool:
        return image_recorded(self.data_root, ref, manifest_digest)

    # ------------------------------------------------------------------ life cycle

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        """Start the daemon and return at once (``wait_ready`` polls for its socket)."""
        if self.running:
            raise DockerdError("dockerd is already running")
        for d in (self.base, self.data_root, self.exec_root):
            d.mkdir(parents=True, exist_ok=True)
        # Ours, never /etc/docker/daemon.json; written at every start, as an operator edits it.
        self.config_file.write_text(json.dumps(self.daemon_config, indent=2) + "\n")
        self.sock.unlink(missing_ok=True)
        with self.log.open("ab") as out:
            argv = [*self.prefix, *self.argv()]
            out.write(f"--- start: {' '.join(argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # its own group: kill() takes containerd too
                env={**os.environ, **self.env},
            )
        self._t0 = time.perf_counter()

    def answers(self, timeout: float = 5.0) -> bool:
        """One probe: does ``docker version`` get the server's answer on the socket?"""
        if not self.sock.exists():
            return False
        try:
            p = subprocess.run(
                self.docker("version", "--format", "{{.Server.Version}}"),
                capture_output=True,
                timeout=max(0.05, timeout),
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return p.returncode == 0 and bool(p.stdout.strip())

    def wait_ready(self, deadline: float | None = None) -> bool:
        """Poll until the daemon answers; False at ``deadline`` (``perf_counter`` time).

        Raises ``DockerdError`` if the daemon exits, or after ``READY_LIMIT_S`` without
        a deadline.
        """
        assert self.proc is not None, "spawn() first"
        limit = deadline if deadline is not None else self._t0 + READY_LIMIT_S
        while True:
            if self.proc.poll() is not None:
                raise DockerdError(f"dockerd exited {self.proc.returncode}:\n{self.log_tail()}")
            now = time.perf_counter()
            if now >= limit:
                if deadline is None:
                    tail = self.log_tail()
                    raise DockerdError(f"dockerd not ready in {READY_LIMIT_S} s:\n{tail}")
                return False
            if self.answers(timeout=limit - now):
                self.ready_s.append(time.perf_counter() - self._t0)
                return True
            time.sleep(POLL_S)

    def start(self) -> float:
        """Spawn and wait until it answers; returns the seconds that took."""
        self.spawn()
        self.wait_ready()
        return self.ready_s[-1]

    def kill(self) -> None:
        """SIGKILL the daemon's group, reap it, and clear the exec root (a reboot clears
        /run); the data root stays, as a disk does."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
            self.kills += 1
        self._reap_strays()
        unmount_under(self.exec_root)
        shutil.rmtree(self.exec_root, ignore_errors=True)
        self.sock.unlink(missing_ok=True)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (then SIGKILL after ``grace``), reap, and unmount under both roots."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # containerd and shims, if left
            self.proc.wait()
            self.proc = None
        self._reap_strays()
        unmount_under(self.exec_root)
        unmount_under(self.data_root)
        self.sock.unlink(missing_ok=True)

    def remove(self) -> None:
        """Stop, then delete the roots (a fresh data root: the next pull downloads all)."""
        self.stop()
        shutil.rmtree(self.exec_root, ignore_errors=True)
        shutil.rmtree(self.data_root, ignore_errors=True)

    def _reap_strays(self) -> None:
        """SIGKILL any process still holding our exec root in its argv (a containerd that
        left the group); they are not our children, so this only signals them."""
        marker = str(self.exec_root)
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd and int(pid_dir.name) != os.getpid():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(pid_dir.name), signal.SIGKILL)

    # ------------------------------------------------------------------ inspection

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def status(self, field: str) -> int:
        """A ``/proc/PID/status`` figure of the daemon in KiB (e.g. ``VmHWM``), 0 if gone."""
        if self.proc is None:
            return 0
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def cpu_s(self) -> tuple[float, float]:
        """The daemon's user and system CPU seconds so far (``/proc/PID/stat``)."""
        if self.proc is None:
            return 0.0, 0.0
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return 0.0, 0.0
        fields = stat.rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def leftovers(self) -> dict[str, int]:
        """What the data root holds besides images: the files of abandoned downloads in
        ``tmp/`` (a killed pull's ``GetImageBlob*``), their count and bytes."""
        tmp = self.data_root / "tmp"
        sizes = []
        for p in tmp.glob("GetImageBlob*") if tmp.is_dir() else []:
            try:
                sizes.append(p.stat().st_size)
            except FileNotFoundError:
                continue  # a running daemon removed it meanwhile (its download ended)
        return {"tmp_files": len(sizes), "tmp_bytes": sum(sizes)}

    def __enter__(self) -> Dockerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def dockerd(base: Path, **kwargs: object) -> Iterator[Dockerd]:
    """A started ``Dockerd`` under ``base`` (emptied first); stopped and removed on exit."""
    unmount_under(base)
    shutil.rmtree(base, ignore_errors=True)
    d = Dockerd(base, **kwargs)  # type: ignore[arg-type]
    try:
        d.start()
        yield d
    finally:
        d.remove()
        shutil.rmtree(base, ignore_errors=True)
