"""``resumer serve`` as a pull-through mirror, with real clients and the real registry.

The upstream is the CNCF registry behind the fault proxy, whose ``bytes_down`` counts
every byte the registry sent the mirror (bodies and headers): the image's size is
layers + config + manifest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path

import aiohttp
import pytest
from conftest import PushImage
from servers import SKOPEO_BIN, Registry, require, skopeo_copy
from serving import mirror_in_process

from resumer.lab.images import BuiltImage, LayerSpec, build_image
from resumer.lab.proxy import FaultProxy, Faults
from resumer.lab.serveproc import ResumerServe

MiB = 1 << 20


def full_size(image: BuiltImage) -> int:
    return image.total_layer_bytes() + len(image.config) + len(image.manifest)


def oci_digests(layout: Path) -> set[str]:
    return {"sha256:" + p.name for p in (layout / "blobs" / "sha256").iterdir()}


def image_digests(image: BuiltImage) -> set[str]:
    return {d for d, _ in image.blobs()}


def three_layers(work: Path, seed: int) -> BuiltImage:
    return build_image(
        work,
        (
            LayerSpec(size=6 * MiB, compressible=False),
            LayerSpec(size=3 * MiB, compression="zstd", compressible=False),
            LayerSpec(size=2 * MiB, files=4),
        ),
        seed=seed,
    )


async def test_skopeo_copies_an_image_through_the_mirror_at_one_times_the_image(
    registry: Registry, pushed_image: PushImage, tmp_path: Path
) -> None:
    require(SKOPEO_BIN)
    image = three_layers(tmp_path / "b", seed=11)
    await asyncio.to_thread(pushed_image, repo="library/app", tag="v1", image=image)
    async with FaultProxy("127.0.0.1", registry.port, Faults()) as proxy:
        with ResumerServe(tmp_path / "root", f"127.0.0.1:{proxy.port}", extra=["-v"]) as srv:
            dest = tmp_path / "oci"
            await asyncio.to_thread(
                skopeo_copy, f"docker://{srv.host}/library/app:v1", f"oci:{dest}:v1"
            )
            log = srv.text()
    assert image_digests(image) <= oci_digests(dest), log
    ratio = proxy.counters.bytes_down / full_size(image)
    print(f"skopeo through the mirror: upstream sent {proxy.counters.bytes_down} B, {ratio:.4f}x")
    assert 1.0 <= ratio <= 1.01, log
    assert "Traceback" not in log, log


async def test_three_clients_at_once_share_one_upstream_transfer(
    registry: Registry, pushed_image: PushImage, tmp_path: Path
) -> None:
    require(SKOPEO_BIN)
    image = three_layers(tmp_path / "b", seed=12)
    await asyncio.to_thread(pushed_image, repo="library/shared", tag="v1", image=image)
    # Slowed so the three pulls overlap: ~11 MiB at 8 MiB/s takes more than a second.
    async with FaultProxy("127.0.0.1", registry.port, Faults(rate=8 * MiB)) as proxy:
        with ResumerServe(tmp_path / "root", f"127.0.0.1:{proxy.port}", extra=["-v"]) as srv:
            dests = [tmp_path / f"oci{i}" for i in range(3)]
            await asyncio.gather(
                *(
                    asyncio.to_thread(
                        skopeo_copy, f"docker://{srv.host}/library/shared:v1", f"oci:{d}:v1"
                    )
                    for d in dests
                )
            )
            log = srv.text()
    for d in dests:
        assert image_digests(image) <= oci_digests(d), log
    ratio = proxy.counters.bytes_down / full_size(image)
    print(f"three clients: upstream sent {proxy.counters.bytes_down} B, {ratio:.4f}x the image")
    assert ratio <= 1.01, log
    assert "Traceback" not in log, log


# --------------------------------------------------------------------------- in process

ACCEPT = (
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)


def one_layer(work: Path, seed: int, size: int) -> BuiltImage:
    return build_image(work, (LayerSpec(size=size, compressible=False),), seed=seed)


async def get_manifest(
    http: aiohttp.ClientSession, base: str, name: str, ref: str
) -> tuple[int, dict[str, str], bytes]:
    async with http.get(f"{base}/v2/{name}/manifests/{ref}", headers={"Accept": ACCEPT}) as r:
        return r.status, dict(r.headers), await r.read()


async def pull_all(http: aiohttp.ClientSession, base: str, name: str, tag: str) -> str:
    """What a client does: the manifest by tag, then config and layers, each verified."""
    status, headers, body = await get_manifest(http, base, name, tag)
    assert status == 200, body
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    assert headers["Docker-Content-Digest"] == digest
    doc = json.loads(body)
    for d in [doc["config"], *doc["layers"]]:
        async with http.get(f"{base}/v2/{name}/blobs/{d['digest']}") as r:
            assert r.status == 200
            assert int(r.headers["Content-Length"]) == d["size"]
            data = await r.read()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == d["digest"]
    return digest


def partial_of(engine: object, key: str) -> object | None:
    for p in engine.ingest.open_partials:  # type: ignore[attr-defined]
        if p.key == key:
            return p
    return None


async def wait_for(predicate: object, what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_a_range_in_the_middle_of_a_blob_still_downloading_gets_its_bytes(
    registry: Registry, pushed_image: PushImage, tmp_path: Path
) -> None:
    image = one_layer(tmp_path / "b", seed=21, size=8 * MiB)
    await asyncio.to_thread(pushed_image, repo="lab/range", tag="v1", image=image)
    layer = image.layers[0]
    data = layer.read_bytes()
    async with (
        FaultProxy("127.0.0.1", registry.port, Faults(rate=2 * MiB)) as proxy,
        mirror_in_process(tmp_path / "root", f"127.0.0.1:{proxy.port}") as m,
        aiohttp.ClientSession() as http,
    ):
        assert (await get_manifest(http, m.url, "lab/range", "v1"))[0] == 200
        url = f"{m.url}/v2/lab/range/blobs/{layer.digest}"
        whole = asyncio.ensure_future(http.get(url))
        resp = await whole
        first = await resp.content.readexactly(MiB)  # the download is under way
        assert first == data[:MiB]
        partial = partial_of(m.engine, layer.digest)
        assert partial is not None and partial.readable() < layer.size  # type: ignore[attr-defined]
        # From below what is here to well past it: served as the bytes arrive.
        start, end = MiB // 2, 5 * MiB + 12345
        async with http.get(url, headers={"Range": f"bytes={start}-{end}"}) as r:
            assert r.status == 206
            assert r.headers["Content-Range"] == f"bytes {start}-{end}/{layer.size}"
            assert int(r.headers["Content-Length"]) == end - start + 1
            assert await r.read() == data[start : end + 1]
        async with http.get(url, headers={"Range": "bytes=-1000"}) as r:
            assert r.status == 206
            assert await r.read() == data[-1000:]
        rest = await resp.read()
        resp.release()
        assert first + rest == data
    assert proxy.counters.bytes_down < full_size(image) * 1.01


async def test_a_client_that_leaves_mid_blob_does_not_stop_the_transfer(
    registry: Registry, pushed_image: PushImage, tmp_path: Path
) -> None:
    image = one_layer(tmp_path / "b", seed=22, size=6 * MiB)
    await asyncio.to_thread(pushed_image, repo="lab/leave", tag="v1", image=image)
    layer = image.layers[0]
    async with (
        FaultProxy("127.0.0.1", registry.port, Faults(rate=3 * MiB)) as proxy,
        mirror_in_process(tmp_path / "root", f"127.0.0.1:{proxy.port}") as m,
    ):
        async with aiohttp.ClientSession() as http:
            assert (await get_manifest(http, m.url, "lab/leave", "v1"))[0] == 200
            resp = await http.get(f"{m.url}/v2/lab/leave/blobs/{layer.digest}")
            await resp.content.readexactly(256 * 1024)
            resp.close()  # gone mid-blob
        assert not m.engine.ingest.has_blob(layer.digest)
        await wait_for(lambda: m.engine.ingest.has_blob(layer.digest, layer.size), "the commit")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{m.url}/v2/lab/leave/blobs/{layer.digest}") as r,
        ):
            assert await r.read() == layer.read_bytes()
    assert proxy.counters.bytes_down < full_size(image) * 1.01


async def test_a_discard_cuts_off_the_client_streaming_the_thrown_away_bytes(
    registry: Registry, pushed_image: PushImage, tmp_path: Path
) -> None:
    """A partial kept aside without a record is adopted unverified; here it holds other
    bytes, so the transfer's commit finds a mismatch and throws everything away. A client
    streaming those bytes is cut off, never given the new content after the old; the next
    request gets the right blob."""
    image = one_layer(tmp_path / "b", seed=23, size=16 * MiB)
    await asyncio.to_thread(pushed_image, repo="lab/discard", tag="v1", image=image)
    layer = image.layers[0]
    data = layer.read_bytes()
    root = tmp_path / "root"
    wrong = bytes(b ^ 0xFF for b in data[: 4 * MiB])  # same length class, other content
    orphans = root / "ingest" / "orphans"
    orphans.mkdir(parents=True)
    (orphans / ("sha256-" + layer.digest[7:])).write_bytes(wrong)
    async with (
        mirror_in_process(root, registry.host) as m,
        aiohttp.ClientSession() as http,
    ):
        assert (await get_manifest(http, m.url, "lab/discard", "v1"))[0] == 200
        resp = await http.get(f"{m.url}/v2/lab/discard/blobs/{layer.digest}")
        assert resp.status == 200 and int(resp.headers["Content-Length"]) == layer.size
        got = await resp.content.readexactly(MiB)
        assert got == wrong[:MiB]  # the adopted bytes, unverified, as they are
        partial = partial_of(m.engine, layer.digest)
        assert partial is not None
        gen = partial.generation  # type: ignore[attr-defined]
        # This client reads nothing more until the transfer has thrown its bytes away.
        await wait_for(lambda: partial.generation != gen, "the discard")  # type: ignore[attr-defined]
        with pytest.raises(aiohttp.ClientError):
            while chunk := await resp.content.read(1 << 16):
                got += chunk
        resp.release()
        assert len(got) < layer.size
        # Never a byte of the new content after the old: what came is the old prefix,
        # then (at most) bytes at offsets the old content did not cover.
        assert got[: len(wrong)] == wrong[: len(got)]
        assert got[len(wrong) :] == data[len(wrong) : len(got)]
        await wait_for(lambda: m.engine.ingest.has_blob(layer.digest, layer.size), "the commit")
        async with http.get(f"{m.url}/v2/lab/discard/blobs/{layer.digest}") as r:
            assert await r.read() == data


async def test_offline_a_tag_pulled_before_is_served_stale_and_blobs_from_the_store(
    registry: Registry,
    pushed_image: PushImage,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    image = one_layer(tmp_path / "b", seed=24, size=MiB)
    await asyncio.to_thread(pushed_image, repo="lab/offline", tag="v1", image=image)
    proxy = FaultProxy("127.0.0.1", registry.port)
    await proxy.start()
    try:
        async with (
            mirror_in_process(tmp_path / "root", f"127.0.0.1:{proxy.port}") as m,
            aiohttp.ClientSession() as http,
        ):
            digest = await pull_all(http, m.url, "lab/offline", "v1")
            assert not [r for r in caplog.records if "stale" in r.getMessage()]
            await proxy.close()  # the upstream is gone: connections refused
            with caplog.at_level(logging.WARNING, logger="resumer.serve.mirror"):
                assert await pull_all(http, m.url, "lab/offline", "v1") == digest
            assert any("stale" in r.getMessage() for r in caplog.records)
            # A tag never seen, with the upstream gone: an OCI error, not a hang.
            status, _, body = await get_manifest(http, m.url, "lab/offline", "v2")
            assert status == 503 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        await proxy.close()


async def test_the_tag_map_and_the_manifests_survive_a_restart_and_prune(
    registry: Registry, pushed_image: PushImage, tmp_path: Path
) -> None:
    """Durable: a new process with the upstream down still serves the tag; and prune
    keeps every blob of the manifests the mirror cached."""
    import time

    from resumer.gc import prune_blobs

    image = one_layer(tmp_path / "b", seed=25, size=MiB)
    await asyncio.to_thread(pushed_image, repo="lab/durable", tag="v1", image=image)
    root = tmp_path / "root"
    async with mirror_in_process(root, registry.host) as m, aiohttp.ClientSession() as http:
        digest = await pull_all(http, m.url, "lab/durable", "v1")
    registry.stop()
    async with mirror_in_process(root, registry.host) as m:
        removed = await prune_blobs(m.engine.ingest, before=time.time() + 3600)
        assert removed == []
        async with aiohttp.ClientSession() as http:
            assert await pull_all(http, m.url, "lab/durable", "v1") == digest


async def test_a_manifest_by_digest_that_does_not_hash_to_it_is_refused(
    serve_app: object, tmp_path: Path
) -> None:
    """An upstream that answers a digest with other bytes (no real registry does)."""
    from aiohttp import web

    good = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
    digest = "sha256:" + hashlib.sha256(good).hexdigest()

    async def manifest(_: web.Request) -> web.Response:
        return web.Response(body=good + b" ", content_type="application/json")

    async def base_route(_: web.Request) -> web.Response:
        return web.Response(text="{}")

    app = web.Application()
    app.router.add_get("/v2/", base_route)
    app.router.add_get("/v2/lab/x/manifests/{ref}", manifest)
    base = await serve_app(app)  # type: ignore[operator]
    host = base.removeprefix("http://")
    async with (
        mirror_in_process(tmp_path / "root", host) as m,
        aiohttp.ClientSession() as http,
    ):
        status, _, body = await get_manifest(http, m.url, "lab/x", digest)
        assert status == 503, body
        assert not m.engine.ingest.has_blob(digest)


async def test_committed_blobs_honour_range_head_and_clients_leaving_mid_send(
    registry: Registry, pushed_image: PushImage, tmp_path: Path
) -> None:
    image = one_layer(tmp_path / "b", seed=26, size=24 * MiB)
    await asyncio.to_thread(pushed_image, repo="lab/committed", tag="v1", image=image)
    layer = image.layers[0]
    data = layer.read_bytes()
    size = layer.size
    async with (
        mirror_in_process(tmp_path / "root", registry.host) as m,
        aiohttp.ClientSession() as http,
    ):
        await pull_all(http, m.url, "lab/committed", "v1")
        # The client had every byte as it was written: the commit (sha256, sync, rename)
        # may still be under way when its read ends.
        await wait_for(lambda: m.engine.ingest.has_blob(layer.digest, size), "the commit")
        url = f"{m.url}/v2/lab/committed/blobs/{layer.digest}"
        async with http.head(url) as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) == size
            assert r.headers["Docker-Content-Digest"] == layer.digest
            assert r.headers["Accept-Ranges"] == "bytes"
        for header, want in [
            ("bytes=100-199", data[100:200]),
            (f"bytes={size - 10}-", data[-10:]),
            ("bytes=-7", data[-7:]),
            (f"bytes=5-{size * 2}", data[5:]),
        ]:
            async with http.get(url, headers={"Range": header}) as r:
                assert r.status == 206, header
                assert await r.read() == want, header
        for header in (f"bytes={size}-", "bytes=0-1,5-9", "bytes=-0"):
            async with http.get(url, headers={"Range": header}) as r:
                assert r.status == 416, header
                assert r.headers["Content-Range"] == f"bytes */{size}"
        async with http.get(url, headers={"Range": "items=0-5"}) as r:
            assert r.status == 200 and await r.read() == data  # not understood: whole
        # Clients that leave mid-send: their sendfile threads end, others are served.
        for _ in range(8):
            resp = await http.get(url)
            await resp.content.readexactly(64 * 1024)
            resp.close()
        async with http.get(url) as r:
            assert await r.read() == data


async def test_a_tag_moved_upstream_is_served_with_its_new_digest(
    registry: Registry, pushed_image: PushImage, tmp_path: Path
) -> None:
    """A tag is revalidated while the upstream answers: after a push moves it, the mirror
    serves the new manifest, not the one it cached (and still has the old by digest)."""
    old = one_layer(tmp_path / "a", seed=26, size=MiB)
    new = one_layer(tmp_path / "b", seed=27, size=MiB)
    await asyncio.to_thread(pushed_image, repo="lab/moving", tag="v1", image=old)
    async with (
        mirror_in_process(tmp_path / "root", registry.host) as m,
        aiohttp.ClientSession() as http,
    ):
        first = await pull_all(http, m.url, "lab/moving", "v1")
        await asyncio.to_thread(pushed_image, repo="lab/moving", tag="v1", image=new)
        second = await pull_all(http, m.url, "lab/moving", "v1")
        assert first != second
        assert second == "sha256:" + hashlib.sha256(new.manifest).hexdigest()
        status, _, _ = await get_manifest(http, m.url, "lab/moving", first)
        assert status == 200
