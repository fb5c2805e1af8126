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
from serving import mirror_in_process, serving

from resumer.config import Config
from resumer.lab.images import BuiltImage, LayerSpec, build_image
from resumer.lab.proxy import FaultProxy, Faults
from resumer.serve.mirror import MirrorSettings

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
        with serving(tmp_path / "root", f"127.0.0.1:{proxy.port}") as srv:
            dest = tmp_path / "oci"
            await asyncio.to_thread(
                skopeo_copy, f"docker://{srv.host}/library/app:v1", f"oci:{dest}:v1"
            )
            log = srv.log()
    assert image_digests(image) <= oci_digests(dest), log
    ratio = proxy.counters.bytes_down / full_size(image)
    print(f"skopeo through the mirror: upstream sent {proxy.counters.bytes_down} B, {ratio:.4f}x")
    assert 1.0 <= ratio <= 1.01, log


async def test_three_clients_at_once_share_one_upstream_transfer(
    registry: Registry, pushed_image: PushImage, tmp_path: Path
) -> None:
    require(SKOPEO_BIN)
    image = three_layers(tmp_path / "b", seed=12)
    await asyncio.to_thread(pushed_image, repo="library/shared", tag="v1", image=image)
    # Slowed so the three pulls overlap: ~11 MiB at 8 MiB/s takes more than a second.
    async with FaultProxy("127.0.0.1", registry.port, Faults(rate=8 * MiB)) as proxy:
        with serving(tmp_path / "root", f"127.0.0.1:{proxy.port}") as srv:
            dests = [tmp_path / f"oci{i}" for i in range(3)]
            await asyncio.gather(
                *(
                    asyncio.to_thread(
                        skopeo_copy, f"docker://{srv.host}/library/shared:v1", f"oci:{d}:v1"
                    )
                    for d in dests
                )
            )
            log = srv.log()
    for d in dests:
        assert image_digests(image) <= oci_digests(d), log
    ratio = proxy.counters.bytes_down / full_size(image)
    print(f"three clients: upstream sent {proxy.counters.bytes_down} B, {ratio:.4f}x the image")
    assert ratio <= 1.01, log
