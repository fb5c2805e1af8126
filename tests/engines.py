"""The real engines from Debian, each a daemon (or a client) of its own, for the tests that
put them behind ``resumer serve``; and the configuration snippets the README shows.

- ``Dockerd`` is ``resumer.lab.dockerd`` (the benchmarks' too); ``engine_dockerd`` gives it
  a ``daemon.json`` naming the mirror, and a dead HTTP(S) proxy in its environment so that a
  Docker Hub fallback fails here instead of going out.
- ``Containerd``: a daemon with its own root, state and socket (no CRI), pulled with
  ``ctr images pull --hosts-dir DIR`` and ``DIR/REGISTRY/hosts.toml`` naming the mirror.
- ``Podman``: rootful, vfs, its own ``--root`` and ``--runroot``, no systemd (cgroupfs, file
  events), and a ``registries.conf`` of its own (``CONTAINERS_REGISTRIES_CONF``).
- ``skopeo_pull``: ``skopeo copy docker://MIRROR/NAME:TAG oci:DIR``.
- ``ProxyThread``: the fault proxy (``resumer.lab.proxy``) on a loop of its own thread, so a
  synchronous test can drive engines while the proxy counts the upstream's bytes.
- ``ResumerServe`` (``resumer.lab.serveproc``, the benchmarks' too): ``resumer serve`` as a
  subprocess, killed and restarted on its port.

Sockets live under short directories (``short_dir``): a unix socket path has 108 bytes, and
pytest's ``tmp_path`` is long. Every helper is polled for readiness with a deadline, never
slept for, and tears down what it started; a SIGKILLed one can be started again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resumer.lab.dockerd import DOCKER, DOCKERD, Dockerd, unmount_under
from resumer.lab.proxy import Counters, FaultProxy, Faults
from resumer.lab.serveproc import READY_S, ResumerServe, ServeError
from resumer.lab.serveproc import kill_group as _kill_group
from resumer.lab.serveproc import tail as _tail
from resumer.lab.serveproc import wait_until as _wait_until

__all__ = [
    "DOCKER",
    "DOCKERD",
    "Containerd",
    "Dockerd",
    "Podman",
    "ProxyThread",
    "ResumerServe",
    "cleanup",
    "daemon_json",
    "docker_image_id",
    "engine_dockerd",
    "hosts_toml",
    "registries_conf",
    "registries_yaml",
    "short_dir",
    "skopeo_pull",
    "wait_until",
]


class EngineError(ServeError):
    """An engine did not come up or failed; the message carries its log's tail."""


def wait_until(
    check: Callable[[], object], *, timeout: float, what: str, log: Callable[[], str] = str
) -> None:
    """Poll ``check`` until it is true; ``EngineError`` naming ``what`` at the deadline."""
    _wait_until(check, timeout=timeout, what=what, log=log, error=EngineError)


def short_dir(prefix: str) -> Path:
    """A fresh directory with a short path under /tmp (unix sockets go in it)."""
    return Path(tempfile.mkdtemp(prefix=f"rz-{prefix}-", dir="/tmp"))


# --------------------------------------------------------------------------- snippets
#
# What the README's "Putting it in front of docker, containerd, podman, k3s" shows, with
# 127.0.0.1:5000 and docker.io; the tests write the very same text with their own ports.
# tests/test_serve_engines.py checks that the README holds each one verbatim.

#: where the README's mirror listens (contrib/resumer.service's --listen)
EXAMPLE_MIRROR = "127.0.0.1:5000"


def daemon_json(mirror: str = EXAMPLE_MIRROR) -> str:
    """dockerd's ``/etc/docker/daemon.json`` (its mirrors cover Docker Hub names only)."""
    return json.dumps({"registry-mirrors": [f"http://{mirror}"]}, indent=2) + "\n"


def hosts_toml(mirror: str = EXAMPLE_MIRROR) -> str:
    """containerd's ``certs.d/REGISTRY/hosts.toml``: the mirror first, with ``?ns=REGISTRY``
    (containerd adds it); without ``server`` the registry itself comes after it."""
    return f'[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n'


def registries_conf(registry: str = "docker.io", mirror: str = EXAMPLE_MIRROR) -> str:
    """podman's (containers-registries.conf v2) ``/etc/containers/registries.conf``."""
    return (
        "[[registry]]\n"
        f'location = "{registry}"\n'
        "\n"
        "[[registry.mirror]]\n"
        f'location = "{mirror}"\n'
        "insecure = true\n"
    )


def registries_yaml(mirror: str = EXAMPLE_MIRROR) -> str:
    """k3s's ``/etc/rancher/k3s/registries.yaml`` (not run here: no k3s in Debian)."""
    return f'mirrors:\n  docker.io:\n    endpoint:\n      - "http://{mirror}"\n'


# --------------------------------------------------------------------------- the proxy


class ProxyThread:
    """A ``FaultProxy`` to ``127.0.0.1:target_port`` on an event loop of its own thread.

    ``counters`` is the proxy's own record, read from the test's thread (plain ints).
    ``close()`` closes the proxy, then stops and closes its loop: nothing outlives it.
    """

    def __init__(self, target_port: int, faults: Faults | None = None, *, seed: int = 0):
        self.target_port = target_port
        self.faults = faults
        self.seed = seed
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._proxy: FaultProxy | None = None

    def start(self) -> ProxyThread:
        self._thread.start()

        async def start() -> FaultProxy:
            proxy = FaultProxy("127.0.0.1", self.target_port, self.faults, seed=self.seed)
            await proxy.start()
            return proxy

        self._proxy = asyncio.run_coroutine_threadsafe(start(), self._loop).result(30)
        self.port = self._proxy.port
        return self

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def counters(self) -> Counters:
        assert self._proxy is not None, "start() first"
        return self._proxy.counters

    def log(self) -> str:
        return "" if self._proxy is None else self._proxy.format_log()[-3000:]

    def close(self) -> None:
        if self._proxy is not None:
            asyncio.run_coroutine_threadsafe(self._proxy.close(), self._loop).result(60)
            self._proxy = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(60)
        if not self._loop.is_closed() and not self._loop.is_running():
            self._loop.close()


# --------------------------------------------------------------------------- dockerd


#: a proxy nobody listens on: a pull that bypasses the mirror fails here, never goes out
DEAD_PROXY = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
}


def engine_dockerd(base: Path, mirror: str, **kwargs: Any) -> Dockerd:
    """A dockerd (not started) whose ``daemon.json`` is the README's, naming ``mirror``."""
    return Dockerd(
        base,
        exec_root=base / "x",
        daemon_config=json.loads(daemon_json(mirror)),
        env=DEAD_PROXY,
        **kwargs,
    )


def docker_image_id(d: Dockerd, ref: str) -> str | None:
    """``docker image inspect``'s ID (the config's digest), None if dockerd has no such image."""
    p = subprocess.run(
        d.docker("image", "inspect", "--format", "{{.Id}}", ref),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return p.stdout.strip() if p.returncode == 0 else None


# --------------------------------------------------------------------------- containerd

CONTAINERD = "containerd"
CTR = "ctr"
CTD_NAMESPACE = "resumer-tests"
#: plugins that need what a test machine may lack (CRI, kernel file systems, tracing)
_CTD_DISABLED = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


class Containerd:
    """containerd with its own root, state and socket under ``base`` (a short path)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.state = base / "state"
        self.sock = self.state / "c.sock"
        self.config = base / "config.toml"
        self.hosts_dir = base / "certs.d"
        self.log = base / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        self.config.write_text(
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            f'temp = "{self.base / "tmp"}"\n'
            f"disabled_plugins = {json.dumps(list(_CTD_DISABLED))}\n"
            "[grpc]\n"
            f'  address = "{self.sock}"\n'
            "[ttrpc]\n"
            f'  address = "{self.sock}.ttrpc"\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{self.base / "opt"}"\n'
        )

    def ctr(self, *args: str) -> list[str]:
        return [CTR, "-a", str(self.sock), "-n", CTD_NAMESPACE, *args]

    def start(self) -> Containerd:
        self.base.mkdir(parents=True, exist_ok=True)
        self.write_config()
        shutil.rmtree(self.state, ignore_errors=True)  # /run after a reboot
        self.state.mkdir(parents=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [CONTAINERD, "--config", str(self.config), "--log-level", "warn"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise EngineError(f"containerd exited {proc.returncode}:\n{_tail(self.log)}")
            if not self.sock.exists():
                return False
            p = subprocess.run(self.ctr("version"), capture_output=True, timeout=30, check=False)
            return p.returncode == 0

        wait_until(answers, timeout=READY_S, what="containerd answers", log=self.log_tail)
        return self

    def mirror(self, registry: str, mirror: str) -> None:
        """``hosts_dir/REGISTRY/hosts.toml`` names ``mirror`` (the README's text)."""
        d = self.hosts_dir / registry
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text(hosts_toml(mirror))

    def pull(self, ref: str, *, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.ctr("images", "pull", "--hosts-dir", str(self.hosts_dir), ref),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def image_target(self, ref: str) -> str | None:
        """The digest ``ref`` names in containerd's image store (``ctr images ls``)."""
        p = subprocess.run(
            self.ctr("images", "ls"), capture_output=True, text=True, timeout=60, check=False
        )
        for line in p.stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[0] == ref:
                return fields[2]
        return None

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc, grace=15.0)
            self.proc = None
        unmount_under(self.base)

    def log_tail(self) -> str:
        return _tail(self.log)


# --------------------------------------------------------------------------- podman

PODMAN = "podman"


class Podman:
    """Rootful podman with vfs storage under ``base`` and a ``registries.conf`` of its own."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.runroot = base / "run"
        self.registries = base / "registries.conf"
        self.containers_conf = base / "containers.conf"

    def argv(self, *args: str) -> list[str]:
        return [
            PODMAN,
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            "--tmpdir",
            str(self.base / "tmp"),
            *args,
        ]

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            **DEAD_PROXY,
            "CONTAINERS_REGISTRIES_CONF": str(self.registries),
            # an empty containers.conf of ours: nothing from the host's
            "CONTAINERS_CONF": str(self.containers_conf),
        }

    def mirror(self, registry: str, mirror: str) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.registries.write_text(registries_conf(registry, mirror))
        self.containers_conf.write_text("")

    def run(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env(),
        )

    def image_id(self, ref: str) -> str | None:
        p = self.run("image", "inspect", "--format", "{{.Id}}", ref, timeout=60)
        return p.stdout.strip() if p.returncode == 0 else None

    def remove(self) -> None:
        self.run("system", "reset", "--force", timeout=120)
        unmount_under(self.base)


# --------------------------------------------------------------------------- skopeo


def skopeo_pull(mirror: str, name: str, dest: Path, *, timeout: float = 300.0) -> str:
    """``skopeo copy docker://MIRROR/NAME:TAG oci:DEST``; returns stdout, raises on failure."""
    args = ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false"]
    args += [f"docker://{mirror}/{name}", f"oci:{dest}"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode != 0:
        raise EngineError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr.strip()}")
    return p.stdout


def cleanup(path: Path) -> None:
    """Unmount whatever a daemon left under ``path``, then delete it."""
    unmount_under(path)
    shutil.rmtree(path, ignore_errors=True)
