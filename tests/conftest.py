"""Shared fixtures: the real registry, nginx, and images pushed into the registry.

The helpers live in ``tests/servers.py`` so benchmarks and the demo can use them without
pytest. Every fixture tears down what it started.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).parent))

from servers import (
    NGINX_BIN,
    REGISTRY_BIN,
    SKOPEO_BIN,
    Nginx,
    Registry,
    require,
    skopeo_copy,
    start_nginx,
    start_registry,
)

from resumer.lab.images import (
    BuiltImage,
    Layer,
    LayerSpec,
    build_image,
    build_multiplatform,
    write_oci_layout,
)

RegistryFactory = Callable[..., Registry]
NginxFactory = Callable[..., Nginx]
ServeApp = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def serve_app() -> AsyncIterator[ServeApp]:
    """``await serve_app(app) -> "http://127.0.0.1:PORT"``: the app listens until the test ends."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def registry_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryFactory]:
    """``registry_factory(extra_config=None) -> Registry``, for auth or proxy variants."""
    require(REGISTRY_BIN)
    started: list[Registry] = []

    def start(extra_config: dict[str, Any] | None = None) -> Registry:
        reg = start_registry(tmp_path_factory.mktemp("registry"), extra_config=extra_config)
        started.append(reg)
        return reg

    yield start
    for reg in started:
        reg.stop()


@pytest.fixture
def registry(registry_factory: RegistryFactory) -> Registry:
    """A fresh CNCF registry without auth on 127.0.0.1: ``.url``, ``.host``."""
    return registry_factory()


@pytest.fixture
def nginx_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxFactory]:
    """``nginx_factory(docroot, extra_server="") -> Nginx`` serving ``docroot``."""
    require(NGINX_BIN)
    started: list[Nginx] = []

    def start(docroot: Path | str, extra_server: str = "") -> Nginx:
        srv = start_nginx(docroot, tmp_path_factory.mktemp("nginx"), extra_server=extra_server)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def nginx(nginx_factory: NginxFactory, tmp_path: Path) -> Nginx:
    """nginx serving the (initially empty) directory ``nginx.docroot``."""
    docroot = tmp_path / "www"
    docroot.mkdir()
    return nginx_factory(docroot)


@dataclass
class PushedImage:
    registry: Registry
    repo: str
    tag: str
    image: BuiltImage
    layout: Path  # the OCI layout it was pushed from

    @property
    def reference(self) -> str:
        """``127.0.0.1:PORT/REPO:TAG``, as a user would type it."""
        return f"{self.registry.host}/{self.repo}:{self.tag}"

    @property
    def digest(self) -> str:
        return self.image.digest


PushImage = Callable[..., PushedImage]


@pytest.fixture
def pushed_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> PushImage:
    """``pushed_image(repo="lab/app", tag="v1", layers=..., seed=0, multiplatform=False,
    flavour="oci", image=None) -> PushedImage``: build (or take) an image and push it into
    ``registry`` with skopeo from an OCI layout."""
    require(SKOPEO_BIN)

    def push(
        repo: str = "lab/app",
        tag: str = "v1",
        layers: Sequence[LayerSpec | Layer] = (LayerSpec(), LayerSpec(compression="zstd")),
        *,
        seed: int = 0,
        multiplatform: bool = False,
        flavour: Any = "oci",
        image: BuiltImage | None = None,
    ) -> PushedImage:
        work = tmp_path_factory.mktemp("image")
        if image is None:
            build = build_multiplatform if multiplatform else build_image
            image = build(work / "build", layers, seed=seed, flavour=flavour)
        layout = write_oci_layout(work / "layout", image, tag)
        # --all keeps every platform of an index; --preserve-digests refuses any rewrite,
        # so the registry holds exactly the digests the test knows.
        skopeo_copy(
            f"oci:{layout}:{tag}",
            f"docker://{registry.host}/{repo}:{tag}",
            "--all",
            "--preserve-digests",
        )
        return PushedImage(registry, repo, tag, image, layout)

    return push
