"""Real servers for integration tests: the CNCF registry, nginx, and skopeo.

Plain helpers, importable without pytest, so benchmarks and the demo can reuse them.
Every server listens on 127.0.0.1 on a free port, keeps its files in a directory the
caller owns, is polled for readiness (never slept for) and is killed and reaped by
``stop()``.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

READY_TIMEOUT = 15.0

REGISTRY_BIN = "docker-registry"
NGINX_BIN = "nginx"
SKOPEO_BIN = "skopeo"


class ServerStartError(RuntimeError):
    """A test server did not come up; the message carries its log."""


def missing_binaries(*names: str) -> list[str]:
    """The names among ``names`` that are not on PATH (for pytest skips)."""
    return [n for n in names if shutil.which(n) is None]


PACKAGES = {REGISTRY_BIN: "docker-registry", NGINX_BIN: "nginx-light", SKOPEO_BIN: "skopeo"}


def require(*binaries: str) -> None:
    """In a test: skip it, naming the Debian package, when a binary is missing."""
    missing = missing_binaries(*binaries)
    if missing:
        import pytest  # only when used from a test: the helpers stay importable without it

        names = ", ".join(f"{b} (apt-get install {PACKAGES.get(b, b)})" for b in missing)
        pytest.skip(f"not on PATH: {names}")


def free_port() -> int:
    """A port that was free a moment ago. Callers retry if another process takes it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively with ``extra``; neither argument is modified."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _stop_process(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> None:
    """Terminate, then kill, and always reap, so no zombie outlives a test."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    else:
        proc.wait()


def _read_log(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "<no log>"


def _wait_http(
    url: str, proc: subprocess.Popen[bytes], log: Path, *, timeout: float = READY_TIMEOUT
) -> None:
    """Poll ``url`` until any HTTP answer arrives; fail early if the process died."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(
                f"{proc.args!r} exited with {proc.returncode} before {url} answered:\n"
                + _read_log(log)
            )
        try:
            with urllib.request.urlopen(url, timeout=2.0):
                return
        except urllib.error.HTTPError:
            return  # any status (e.g. 401 with auth enabled) proves it is listening
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        # A short back-off between connect attempts, not a wait for an event.
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    raise ServerStartError(f"{url} not ready after {timeout}s ({last}):\n" + _read_log(log))


# --------------------------------------------------------------------------- registry


@dataclass
class Registry:
    """A running ``docker-registry serve`` (CNCF distribution)."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    config_path: Path
    config: dict[str, Any]
    log_path: Path
    storage: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log(self) -> str:
        return _read_log(self.log_path)

    def stop(self) -> None:
        _stop_process(self.process)


def registry_config(storage: Path, port: int) -> dict[str, Any]:
    """The minimal config: no auth, filesystem storage, deletes allowed."""
    return {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            # The upload purger is a background job that only adds log noise in tests.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "resumer-tests"},
    }


def start_registry(
    workdir: Path | str, *, extra_config: dict[str, Any] | None = None, attempts: int = 3
) -> Registry:
    """Start the real registry in ``workdir``; ``extra_config`` is deep-merged into its config.

    The packaged /etc/docker/registry/config.yml turns on htpasswd, so we write our own.
    YAML is a superset of JSON, so the config is written with ``json``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    last: ServerStartError | None = None
    for _ in range(attempts):  # the free port may be taken between probe and bind
        port = free_port()
        config = registry_config(storage, port)
        if extra_config:
            config = deep_merge(config, extra_config)
        config_path = workdir / "config.yml"
        config_path.write_text(json.dumps(config, indent=2))
        log_path = workdir / "registry.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        try:
            _wait_http(f"http://127.0.0.1:{port}/v2/", proc, log_path)
        except ServerStartError as exc:
            _stop_process(proc)
            last = exc
            continue
        return Registry(proc, port, workdir, config_path, config, log_path, storage)
    assert last is not None
    raise last


# --------------------------------------------------------------------------- nginx


@dataclass
class Nginx:
    """A running nginx serving ``docroot`` as static files."""

    process: subprocess.Popen[bytes]
    port: int
    docroot: Path
    workdir: Path
    config_path: Path
    error_log: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log(self) -> str:
        return _read_log(self.error_log)

    def stop(self) -> None:
        # SIGTERM is nginx's fast shutdown; the master reaps its workers itself.
        _stop_process(self.process)


def nginx_config(docroot: Path, workdir: Path, port: int, *, extra_server: str = "") -> str:
    w = workdir
    return f"""
# Running as root in CI: workers stay root so they can read any test file.
user root;
daemon off;
master_process on;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    etag on;
    client_body_temp_path {w}/client_body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {docroot};
        location / {{ }}
        {extra_server}
    }}
}}
"""


def start_nginx(
    docroot: Path | str,
    workdir: Path | str | None = None,
    *,
    extra_server: str = "",
    attempts: int = 3,
) -> Nginx:
    """Start nginx serving ``docroot`` (Range and ETag are on by default in nginx).

    ``workdir`` holds the config, pid, logs and temp dirs; default: ``<docroot>.nginx``.
    ``extra_server`` is raw config text added inside the ``server`` block.
    """
    docroot = Path(docroot).resolve()
    workdir = Path(workdir) if workdir is not None else docroot.with_name(docroot.name + ".nginx")
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    last: ServerStartError | None = None
    for _ in range(attempts):
        port = free_port()
        config_path = workdir / "nginx.conf"
        config_path.write_text(nginx_config(docroot, workdir, port, extra_server=extra_server))
        error_log = workdir / "error.log"
        stderr_log = workdir / "stderr.log"
        with stderr_log.open("ab") as log:
            proc = subprocess.Popen(
                # -e: the compiled-in error log (/var/log/nginx) may be unwritable.
                [NGINX_BIN, "-c", str(config_path), "-p", str(workdir), "-e", str(error_log)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_http(f"http://127.0.0.1:{port}/", proc, error_log)
        except ServerStartError as exc:
            _stop_process(proc)
            last = exc
            continue
        return Nginx(proc, port, docroot, workdir, config_path, error_log)
    assert last is not None
    raise last


# --------------------------------------------------------------------------- skopeo


class SkopeoError(RuntimeError):
    """skopeo failed; the message carries its command line and stderr."""


def _is_docker(ref: str) -> bool:
    return ref.startswith("docker://")


def skopeo_copy(src: str, dst: str, *extra_args: str, timeout: float = 120.0) -> str:
    """``skopeo copy`` with TLS verification off for docker:// ends; returns stdout."""
    args = [SKOPEO_BIN, "--insecure-policy", "copy"]
    if _is_docker(src):
        args.append("--src-tls-verify=false")
    if _is_docker(dst):
        args.append("--dest-tls-verify=false")
    args += [*extra_args, src, dst]
    return _run_skopeo(args, timeout)


def skopeo_inspect(ref: str, *extra_args: str, raw: bool = False, timeout: float = 60.0) -> Any:
    """``skopeo inspect`` parsed as JSON (``raw=True``: the manifest as stored)."""
    args = [SKOPEO_BIN, "--insecure-policy", "inspect"]
    if _is_docker(ref):
        args.append("--tls-verify=false")
    if raw:
        args.append("--raw")
    args += [*extra_args, ref]
    return json.loads(_run_skopeo(args, timeout))


def _run_skopeo(args: list[str], timeout: float) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise SkopeoError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    return proc.stdout
