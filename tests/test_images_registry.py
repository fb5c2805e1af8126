"""resumer.lab.images against the real CNCF registry, and sanity checks of the fixtures."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from conftest import PushImage
from servers import Nginx, Registry, skopeo_inspect

from resumer.lab.images import (
    DOCKER_LAYER_GZIP,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    LayerSpec,
    build_image,
    build_multiplatform,
    make_layer,
    push_to_registry,
)

ACCEPT_ALL = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def get_manifest(
    session: aiohttp.ClientSession, reg: Registry, repo: str, ref: str, accept: str = ACCEPT_ALL
) -> tuple[bytes, str, str]:
    async with session.get(f"{reg.url}/v2/{repo}/manifests/{ref}", headers={"Accept": accept}) as r:
        assert r.status == 200, await r.text()
        return await r.read(), r.headers["Content-Type"], r.headers["Docker-Content-Digest"]


async def get_blob(session: aiohttp.ClientSession, reg: Registry, repo: str, digest: str) -> bytes:
    async with session.get(f"{reg.url}/v2/{repo}/blobs/{digest}") as r:
        assert r.status == 200, await r.text()
        return await r.read()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


def test_same_seed_builds_the_same_image(tmp_path: Path) -> None:
    specs = [
        LayerSpec(size=200_000),
        LayerSpec(size=50_000, compression="zstd", compressible=False),
    ]
    a = build_image(tmp_path / "a", specs, seed=9)
    b = build_image(tmp_path / "b", specs, seed=9)
    c = build_image(tmp_path / "c", specs, seed=10)
    assert a.manifest == b.manifest and a.manifest_digest == b.manifest_digest
    assert a.manifest_digest != c.manifest_digest
    assert [x.digest for x in a.layers] != [x.digest for x in c.layers]
    # Compressible content really compresses; random content does not.
    assert a.layers[0].size < 200_000 / 2
    assert a.layers[1].size > 50_000


async def test_skopeo_pushes_gzip_zstd_and_repeated_layers_that_come_back_intact(
    pushed_image: PushImage, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    work = tmp_path / "build"
    repeated = make_layer(work, LayerSpec(size=30_000), seed=77)
    image = build_image(
        work,
        [LayerSpec(size=300_000), repeated, LayerSpec(size=100_000, compression="zstd"), repeated],
        seed=1,
    )
    assert [x.media_type for x in image.layers] == [OCI_LAYER_GZIP] * 2 + [
        OCI_LAYER_ZSTD,
        OCI_LAYER_GZIP,
    ]
    config = json.loads(image.config)
    assert config["rootfs"]["diff_ids"] == [x.diff_id for x in image.layers]
    assert len(config["history"]) == 4

    pushed = await asyncio.to_thread(pushed_image, "lab/stack", "v1", image=image)
    body, ctype, digest = await get_manifest(session, pushed.registry, "lab/stack", "v1")
    assert (body, ctype, digest) == (image.manifest, OCI_MANIFEST, image.manifest_digest)
    assert await get_blob(session, pushed.registry, "lab/stack", image.config_digest) == (
        image.config
    )
    for layer in image.layers:
        blob = await get_blob(session, pushed.registry, "lab/stack", layer.digest)
        assert sha(blob) == layer.digest and len(blob) == layer.size


async def test_skopeo_pushes_a_multi_platform_index(
    pushed_image: PushImage, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = build_multiplatform(tmp_path / "build", [LayerSpec(size=40_000)], seed=2)
    pushed = await asyncio.to_thread(pushed_image, "lab/multi", "v2", image=image)
    reg = pushed.registry
    body, ctype, digest = await get_manifest(session, reg, "lab/multi", "v2")
    assert (ctype, digest) == (OCI_INDEX, image.index_digest)
    index = json.loads(body)
    assert [m["platform"] for m in index["manifests"]] == [
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
    ]
    for child, entry in zip(image.children, index["manifests"], strict=True):
        assert entry["digest"] == child.manifest_digest
        m_body, _, m_digest = await get_manifest(session, reg, "lab/multi", child.manifest_digest)
        assert m_digest == sha(m_body) == child.manifest_digest
    # Each platform has its own layers.
    assert image.children[0].layers[0].digest != image.children[1].layers[0].digest


async def test_push_to_registry_over_the_http_api(
    registry: Registry, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    work = tmp_path / "build"
    base = build_image(work, [LayerSpec(size=120_000)], seed=3, flavour="docker")
    child = build_image(work, [LayerSpec(size=20_000)], seed=4, flavour="docker", base=base)
    assert child.layers[0].digest == base.layers[0].digest
    assert {x.media_type for x in child.layers} == {DOCKER_LAYER_GZIP}
    assert await push_to_registry(registry.url, "lab/base", "1", base) == base.manifest_digest
    # A given session; the shared base layer is already there and is skipped by HEAD.
    await push_to_registry(session, "lab/base", "2", child, base_url=registry.url)
    body, ctype, digest = await get_manifest(session, registry, "lab/base", "2", DOCKER_MANIFEST)
    assert (body, ctype, digest) == (child.manifest, DOCKER_MANIFEST, child.manifest_digest)

    multi = build_multiplatform(work, [LayerSpec(size=10_000, compression="zstd")], seed=5)
    await push_to_registry(session, "lab/idx", "latest", multi, base_url=registry.url)
    raw = await asyncio.to_thread(
        skopeo_inspect, f"docker://{registry.host}/lab/idx:latest", raw=True
    )
    assert [m["digest"] for m in raw["manifests"]] == [c.manifest_digest for c in multi.children]
    info = await asyncio.to_thread(
        skopeo_inspect, f"docker://{registry.host}/lab/idx:latest", "--override-arch", "arm64"
    )
    assert info["Digest"] == multi.index_digest  # skopeo reports the digest it was given
    assert info["Layers"] == [x.digest for x in multi.children[1].layers]


async def test_registry_fixture_serves_blob_ranges_with_206(
    pushed_image: PushImage, session: aiohttp.ClientSession
) -> None:
    pushed = await asyncio.to_thread(pushed_image, layers=[LayerSpec(size=200_000)])
    layer = pushed.image.layers[0]
    whole = layer.read_bytes()
    url = f"{pushed.registry.url}/v2/{pushed.repo}/blobs/{layer.digest}"
    offset = layer.size // 3
    async with session.get(
        url, headers={"Range": f"bytes={offset}-", "Accept-Encoding": "identity"}
    ) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes {offset}-{layer.size - 1}/{layer.size}"
        assert await r.read() == whole[offset:]
        assert r.headers.get("ETag")


async def test_nginx_fixture_serves_ranges_with_etag(
    nginx: Nginx, session: aiohttp.ClientSession
) -> None:
    data = bytes(range(256)) * 64
    (nginx.docroot / "blob").write_bytes(data)
    async with session.get(f"{nginx.url}/blob", headers={"Range": "bytes=1000-"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        assert r.headers["ETag"]
        assert await r.read() == data[1000:]
    async with session.get(f"{nginx.url}/blob", headers={"Range": f"bytes={len(data)}-"}) as r:
        assert r.status == 416
