"""A registry mirror that is a real pull-through cache, and the fallback when it dies.

The origin registry stands in for Docker Hub (``engine.endpoint_overrides``), so a
``docker.io/library/…`` reference uses ``registry_mirrors`` as dockerd would. The mirror
is a second CNCF registry with ``proxy: {remoteurl: <origin>}``. Counting FaultProxies
sit in front of the mirror and of the origin (as the client sees them), so the bytes each
served are known; the mirror's own upstream fetches go to the origin directly.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import PushImage, RegistryFactory
from servers import Registry
from test_pull_real import MiB, assert_readable

from resumer.config import Config
from resumer.engine import Engine
from resumer.events import Event
from resumer.lab.images import BuiltImage, LayerSpec, build_image
from resumer.lab.proxy import FaultProxy, Faults


def build(work: Path, seed: int, big: int) -> BuiltImage:
    return build_image(
        work,
        (
            LayerSpec(size=big, compressible=False),
            LayerSpec(size=256 * 1024, compression="zstd"),
        ),
        seed=seed,
    )


async def cached_in(mirror: Registry, digest: str, timeout: float = 10.0) -> bool:
    """Whether the mirror stored ``digest`` in its own storage.

    registry 2.8's proxy stores a blob in a goroutine of its own, after (or while) it
    serves it, so the file may appear a little after the client has the bytes: poll
    for it, bounded.
    """
    hexd = digest.removeprefix("sha256:")
    blob = mirror.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not blob.exists():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_docker_hub_pull_goes_through_the_pull_through_cache_mirror(
    registry: Registry,
    registry_factory: RegistryFactory,
    pushed_image: PushImage,
    tmp_path: Path,
) -> None:
    image = build(tmp_path / "b", seed=101, big=2 * MiB)
    await asyncio.to_thread(pushed_image, repo="library/app", tag="v1", image=image)
    mirror = registry_factory({"proxy": {"remoteurl": registry.url}})
    async with (
        FaultProxy("127.0.0.1", mirror.port) as via_mirror,
        FaultProxy("127.0.0.1", registry.port) as via_origin,
    ):
        config = Config(retry_delay=0, registry_mirrors=(f"http://127.0.0.1:{via_mirror.port}",))
        async with Engine.open(tmp_path / "root", config) as engine:
            engine.endpoint_overrides["docker.io"] = f"http://127.0.0.1:{via_origin.port}"
            outcome = await engine.pull("app:v1", dest=tmp_path / "oci")

    ref = "docker.io/library/app:v1"
    assert outcome.reference == ref
    layers = image.total_layer_bytes()
    assert via_mirror.counters.bytes_down >= layers
    assert via_origin.counters.bytes_down == 0  # the client never needed the origin
    # The mirror is a cache for real: the layers now sit in its own storage.
    for layer in image.layers:
        assert await cached_in(mirror, layer.digest)
    assert_readable(tmp_path / "oci", "v1", ref, tmp_path)


async def test_mirror_stopped_mid_pull_falls_back_to_the_origin_from_the_same_offset(
    registry: Registry,
    registry_factory: RegistryFactory,
    pushed_image: PushImage,
    tmp_path: Path,
) -> None:
    image = build(tmp_path / "b", seed=102, big=12 * MiB)
    await asyncio.to_thread(pushed_image, repo="library/app", tag="v1", image=image)
    big = image.layers[0]
    mirror = registry_factory({"proxy": {"remoteurl": registry.url}})
    # 20 MB/s through the mirror, so the stop lands mid-layer.
    async with (
        FaultProxy("127.0.0.1", mirror.port, Faults(rate=20e6)) as via_mirror,
        FaultProxy("127.0.0.1", registry.port) as via_origin,
    ):
        stopped_at: list[int] = []

        def on_progress(event: Event) -> None:
            if (
                not stopped_at
                and event.id == big.digest[7:19]
                and event.status == "Downloading"
                and (event.current or 0) >= big.size // 3
            ):
                stopped_at.append(event.current or 0)
                mirror.process.kill()  # the mirror dies; its connections with it
                via_mirror.begin_outage()

        mirror_url = f"http://127.0.0.1:{via_mirror.port}"
        config = Config(retry_delay=0, registry_mirrors=(mirror_url,))
        async with Engine.open(tmp_path / "root", config) as engine:
            engine.endpoint_overrides["docker.io"] = f"http://127.0.0.1:{via_origin.port}"
            outcome = await engine.pull("app:v1", dest=tmp_path / "oci", on_progress=on_progress)
            attempts = [a for a in await engine.store.attempts() if a.key == big.digest]
        mirror.process.wait()

    assert stopped_at, "the mirror was never stopped"
    origin_host = f"127.0.0.1:{via_origin.port}"
    mirror_host = f"127.0.0.1:{via_mirror.port}"
    assert attempts[0].host == mirror_host and attempts[0].start_offset == 0
    cut_at = attempts[0].end_offset
    assert cut_at is not None and cut_at >= stopped_at[0] - (1 << 20)
    [on_origin] = [a for a in attempts if a.host == origin_host]
    # Content is addressed by digest: the origin continues where the mirror stopped.
    assert on_origin.start_offset == cut_at > 0
    assert on_origin.end_offset == big.size
    assert on_origin.http_status == 206
    assert outcome.stats.wasted_bytes == 0
    assert outcome.stats.wire_bytes == image.total_layer_bytes()
    assert via_origin.counters.bytes_down < big.size - cut_at + 64 * 1024
    assert_readable(tmp_path / "oci", "v1", "docker.io/library/app:v1", tmp_path)
