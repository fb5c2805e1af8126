"""The lab's offline registry speaks enough of the distribution API for resumer and skopeo."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from servers import SKOPEO_BIN, require

from resumer.config import Config
from resumer.engine import Engine
from resumer.lab.images import (
    OCI_INDEX,
    OCI_MANIFEST,
    BuiltImage,
    LayerSpec,
    build_image,
    build_multiplatform,
    push_to_registry,
    sha256_digest,
)
from resumer.lab.proxy import FaultProxy, Faults
from resumer.lab.registry import OfflineRegistry, parse_range, pull_from_zero

ACCEPT = f"{OCI_MANIFEST}, {OCI_INDEX}"


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[OfflineRegistry]:
    async with OfflineRegistry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


@pytest.fixture
def image(tmp_path: Path) -> BuiltImage:
    return build_image(
        tmp_path / "build",
        [LayerSpec(300_000), LayerSpec(700_000, compressible=False, files=1)],
        seed=5,
    )


# --------------------------------------------------------------------------- Range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-", 10, (0, 9)),
        ("bytes=3-", 10, (3, 9)),
        ("bytes=3-5", 10, (3, 5)),
        ("bytes=3-50", 10, (3, 9)),  # an end beyond the body is clamped
        ("bytes=-4", 10, (6, 9)),  # suffix
        ("bytes=-40", 10, (0, 9)),
        ("bytes=9-", 10, (9, 9)),
        ("bytes=10-", 10, "unsatisfiable"),
        ("bytes=11-20", 10, "unsatisfiable"),
        ("bytes=-0", 10, "unsatisfiable"),
        ("bytes=0-", 0, "unsatisfiable"),
        ("bytes=5-3", 10, None),  # invalid: ignored, the whole body is sent
        ("bytes=0-1,4-5", 10, None),  # several ranges: ignored
        ("items=0-1", 10, None),
        ("bytes=abc", 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: object) -> None:
    assert parse_range(header, size) == expected


# --------------------------------------------------------------------------- read side


async def test_manifests_by_tag_and_digest_with_type_digest_and_etag(
    registry: OfflineRegistry, session: aiohttp.ClientSession, image: BuiltImage
) -> None:
    digest = registry.add_image("lab/app", "v1", image)
    assert digest == image.manifest_digest
    async with session.get(f"{registry.url}/v2/") as r:
        assert r.status == 200
        assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    for ref in ("v1", digest):
        url = f"{registry.url}/v2/lab/app/manifests/{ref}"
        async with session.get(url, headers={"Accept": ACCEPT}) as r:
            assert r.status == 200
            assert await r.read() == image.manifest
            assert r.headers["Content-Type"] == OCI_MANIFEST
            assert r.headers["Docker-Content-Digest"] == digest
            assert r.headers["ETag"] == f'"{digest}"'
        async with session.head(url) as r:
            assert r.status == 200
            assert int(r.headers["Content-Length"]) == len(image.manifest)
            assert r.headers["Docker-Content-Digest"] == digest
        async with session.get(url, headers={"If-None-Match": f'"{digest}"'}) as r:
            assert r.status == 304
    async with session.get(f"{registry.url}/v2/lab/app/manifests/v2") as r:
        assert r.status == 404
        assert (await r.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    async with session.get(f"{registry.url}/v2/lab/other/manifests/v1") as r:
        assert r.status == 404
        assert (await r.json())["errors"][0]["code"] == "NAME_UNKNOWN"
    async with session.get(f"{registry.url}/v2/lab/app/tags/list") as r:
        assert await r.json() == {"name": "lab/app", "tags": ["v1"]}
    async with session.get(f"{registry.url}/v2/_catalog") as r:
        assert await r.json() == {"repositories": ["lab/app"]}


async def test_index_and_children_are_served(
    registry: OfflineRegistry, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    multi = build_multiplatform(tmp_path / "multi", [LayerSpec(10_000)], seed=2)
    assert registry.add_image("lab/multi", "v1", multi) == multi.index_digest
    async with session.get(f"{registry.url}/v2/lab/multi/manifests/v1") as r:
        assert r.headers["Content-Type"] == OCI_INDEX
        assert await r.read() == multi.index
    for child in multi.children:
        async with session.get(
            f"{registry.url}/v2/lab/multi/manifests/{child.manifest_digest}"
        ) as r:
            assert r.status == 200
            assert await r.read() == child.manifest


async def test_blobs_whole_ranged_unsatisfiable_and_if_range(
    registry: OfflineRegistry, session: aiohttp.ClientSession, image: BuiltImage
) -> None:
    registry.add_image("lab/app", "v1", image)
    layer = image.layers[1]
    data = layer.read_bytes()
    size = len(data)
    url = f"{registry.url}/v2/lab/app/blobs/{layer.digest}"
    etag = f'"{layer.digest}"'
    async with session.get(url) as r:
        assert r.status == 200
        assert await r.read() == data
        assert r.headers["ETag"] == etag
        assert r.headers["Docker-Content-Digest"] == layer.digest
        assert r.headers["Accept-Ranges"] == "bytes"
    async with session.head(url) as r:
        assert r.status == 200
        assert int(r.headers["Content-Length"]) == size
        assert await r.read() == b""
    async with session.get(url, headers={"Range": "bytes=1000-"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 1000-{size - 1}/{size}"
        assert await r.read() == data[1000:]
    async with session.get(url, headers={"Range": "bytes=10-19"}) as r:
        assert r.status == 206
        assert await r.read() == data[10:20]
    async with session.get(url, headers={"Range": f"bytes={size}-"}) as r:
        assert r.status == 416
        assert r.headers["Content-Range"] == f"bytes */{size}"
    # If-Range: the range only holds for the same representation.
    async with session.get(url, headers={"Range": "bytes=1000-", "If-Range": etag}) as r:
        assert r.status == 206
        assert await r.read() == data[1000:]
    async with session.get(url, headers={"Range": "bytes=1000-", "If-Range": '"other"'}) as r:
        assert r.status == 200
        assert await r.read() == data
    # A blob is scoped to the repositories that hold it.
    registry.add_image("lab/small", "v1", build_image(registry.root / "b", [LayerSpec(10)]))
    async with session.get(f"{registry.url}/v2/lab/small/blobs/{layer.digest}") as r:
        assert r.status == 404
        assert (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    async with session.get(f"{registry.url}/v2/lab/app/blobs/sha256:abc") as r:
        assert r.status == 400


async def test_serving_a_big_blob_does_not_hold_it_in_memory(
    registry: OfflineRegistry, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    size = 64 << 20
    path = tmp_path / "big"
    with path.open("wb") as f:  # sparse: cheap to make
        f.truncate(size)
    digest = "sha256:" + hashlib.sha256(bytes(size)).hexdigest()
    registry.add_blob("lab/big", digest, path)
    tracemalloc.start()
    try:
        got = 0
        async with session.get(f"{registry.url}/v2/lab/big/blobs/{digest}") as r:
            async for piece in r.content.iter_chunked(1 << 16):
                got += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == size
    # Server and client together, in this process: a few pieces, never the blob.
    assert peak < 8 << 20, f"peak {peak} bytes while serving {size}"


# --------------------------------------------------------------------------- pushes


async def test_push_to_registry_then_read_back(
    registry: OfflineRegistry, session: aiohttp.ClientSession, image: BuiltImage
) -> None:
    digest = await push_to_registry(registry.url, "pushed/app", "v1", image)
    assert digest == image.manifest_digest
    async with session.get(f"{registry.url}/v2/pushed/app/manifests/v1") as r:
        assert await r.read() == image.manifest
    for layer in image.layers:
        async with session.get(f"{registry.url}/v2/pushed/app/blobs/{layer.digest}") as r:
            assert await r.read() == layer.read_bytes()
    # Pushing again skips the blobs it has (HEAD 200) and succeeds.
    assert await push_to_registry(registry.url, "pushed/app", "v1", image) == digest


async def test_uploads_in_chunks_and_refusals(
    registry: OfflineRegistry, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(300_000)
    digest = sha256_digest(data)
    base = f"{registry.url}/v2/up/x/blobs/uploads/"
    async with session.post(base) as r:
        assert r.status == 202
        location = registry.url + r.headers["Location"]
    async with session.patch(location, data=data[:100_000]) as r:
        assert r.status == 202
        assert r.headers["Range"] == "0-99999"
    async with session.put(f"{location}?digest={digest}", data=data[100_000:]) as r:
        assert r.status == 201
        assert r.headers["Docker-Content-Digest"] == digest
    async with session.get(f"{registry.url}/v2/up/x/blobs/{digest}") as r:
        assert await r.read() == data
    # A digest that does not match the bytes is refused, and nothing is stored.
    async with session.post(f"{base}?digest={sha256_digest(b'other')}", data=data) as r:
        assert r.status == 400
        assert (await r.json())["errors"][0]["code"] == "DIGEST_INVALID"
    # A manifest naming a blob the repository lacks is refused.
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "x", "digest": sha256_digest(b"nope"), "size": 4},
            "layers": [],
        }
    ).encode()
    async with session.put(
        f"{registry.url}/v2/up/x/manifests/v1",
        data=manifest,
        headers={"Content-Type": OCI_MANIFEST},
    ) as r:
        assert r.status == 400
        assert (await r.json())["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"


async def test_read_only_registry_refuses_pushes(tmp_path: Path, image: BuiltImage) -> None:
    async with (
        OfflineRegistry(tmp_path / "ro", accept_pushes=False) as reg,
        aiohttp.ClientSession() as s,
        s.post(f"{reg.url}/v2/x/blobs/uploads/") as r,
    ):
        assert r.status == 405


async def test_restarted_registry_serves_the_same_images(tmp_path: Path, image: BuiltImage) -> None:
    async with OfflineRegistry(tmp_path / "reg") as reg:
        await push_to_registry(reg.url, "lab/app", "v1", image)
    async with OfflineRegistry(tmp_path / "reg") as reg:
        assert reg.tags("lab/app") == ["v1"]
        async with aiohttp.ClientSession() as s, s.get(f"{reg.url}/v2/lab/app/manifests/v1") as r:
            assert await r.read() == image.manifest


# --------------------------------------------------------------------------- clients


def _check_layout(root: Path, image: BuiltImage) -> None:
    index = json.loads((root / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [image.manifest_digest]
    for digest, content in image.blobs():
        blob = (root / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
        expected = content.read_bytes() if isinstance(content, Path) else content
        assert blob == expected


async def test_resumer_pulls_from_it(
    registry: OfflineRegistry, image: BuiltImage, tmp_path: Path
) -> None:
    registry.add_image("lab/app", "v1", image)
    async with Engine.open(tmp_path / "root", Config()) as engine:
        outcome = await engine.pull(f"{registry.host}/lab/app:v1")
    assert outcome.digest == image.manifest_digest
    _check_layout(tmp_path / "root", image)


async def test_resumer_resumes_with_ranges_through_cuts(
    registry: OfflineRegistry, tmp_path: Path
) -> None:
    image = build_image(
        tmp_path / "build", [LayerSpec(3 << 20, compressible=False, files=1)], seed=9
    )
    registry.add_image("lab/app", "v1", image)
    size = image.layers[0].size
    # Every connection is cut after 0.6-0.9 MiB: only Range requests can finish the layer.
    faults = Faults(cut_after=(600_000, 900_000))
    async with FaultProxy("127.0.0.1", registry.port, faults, seed=4) as proxy:
        config = Config(retry_delay=0, max_download_attempts=10)
        async with Engine.open(tmp_path / "root", config) as engine:
            await engine.pull(f"127.0.0.1:{proxy.port}/lab/app:v1")
    _check_layout(tmp_path / "root", image)
    ranged = [r for r in registry.requests if r.path.endswith(image.layers[0].digest) and r.range]
    assert ranged, registry.requests
    assert all(r.status == 206 for r in ranged)
    assert proxy.counters.cuts >= 3
    assert proxy.counters.bytes_down < 1.2 * size


async def test_from_zero_client_completes_on_a_clean_link_and_not_under_cuts(
    registry: OfflineRegistry, image: BuiltImage
) -> None:
    registry.add_image("lab/app", "v1", image)
    clean = await pull_from_zero(registry.url, "lab/app", "v1")
    assert clean.complete
    assert clean.blobs == 3
    assert clean.attempts == 4  # the manifest, the config, two layers
    biggest = max(layer.size for layer in image.layers)
    faults = Faults(cut_after=(biggest // 4, biggest // 2))
    async with FaultProxy("127.0.0.1", registry.port, faults, seed=1) as proxy:
        cut = await pull_from_zero(f"http://127.0.0.1:{proxy.port}", "lab/app", "v1", attempts=3)
    assert not cut.complete
    assert cut.blobs_done < cut.blobs
    # The big layer used its three attempts, each thrown away.
    assert cut.attempts >= 1 + 3
    assert proxy.counters.bytes_down >= 3 * biggest // 4


async def _skopeo(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        SKOPEO_BIN,
        "--insecure-policy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"skopeo {' '.join(args)}: {err.decode()}"
    return out.decode()


async def test_skopeo_inspects_copies_from_and_pushes_to_it(
    registry: OfflineRegistry, image: BuiltImage, tmp_path: Path
) -> None:
    require(SKOPEO_BIN)
    registry.add_image("lab/app", "v1", image)
    ref = f"docker://{registry.host}/lab/app:v1"
    info = json.loads(await _skopeo("inspect", "--tls-verify=false", ref))
    assert info["Digest"] == image.manifest_digest
    assert info["RepoTags"] == ["v1"]
    assert info["Layers"] == [layer.digest for layer in image.layers]
    raw = await _skopeo("inspect", "--tls-verify=false", "--raw", ref)
    assert raw.encode() == image.manifest
    layout = tmp_path / "copied"
    await _skopeo("copy", "--src-tls-verify=false", ref, f"oci:{layout}:v1")
    for layer in image.layers:
        blob = layout / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")
        assert blob.read_bytes() == layer.read_bytes()
    # And back in, under another name: skopeo's push (monolithic or chunked) is accepted.
    await _skopeo(
        "copy", "--dest-tls-verify=false", "--preserve-digests", f"oci:{layout}:v1",
        f"docker://{registry.host}/again/app:v2",
    )  # fmt: skip
    assert registry.tags("again/app") == ["v2"]
