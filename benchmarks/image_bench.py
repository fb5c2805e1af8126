"""The registry + image + proxy set-up that the cuts and power benchmarks share.

A seeded image of incompressible gzip layers is pushed into the real CNCF registry on
127.0.0.1; every single run gets an empty scratch directory and a fresh
``resumer.lab.proxy`` in front of the registry, and the tools copy the image (or its
largest layer) through that proxy.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import common
from .common import BenchImage


@dataclass(frozen=True)
class Ctx:
    """One run: the proxy's port, the image behind it, the run's scratch directory."""

    port: int
    image: BenchImage
    scratch: Path

    @property
    def ref(self) -> str:
        return f"127.0.0.1:{self.port}/{self.image.repo}:{self.image.tag}"

    @property
    def blob_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2/{self.image.repo}/blobs/{self.image.largest[0]}"


def pull_argv(c: Ctx, *extra: str) -> list[str]:
    """``resumer pull`` of the image into ``scratch/oci`` (root ``scratch/root``), JSON progress."""
    return [
        *common.resumer_bin(),
        "pull",
        c.ref,
        "--root",
        str(c.scratch / "root"),
        "--dest",
        str(c.scratch / "oci"),
        "--insecure-registry",
        f"127.0.0.1:{c.port}",
        "--progress",
        "json",
        *extra,
    ]


def skopeo_copy_argv(c: Ctx, *extra: str) -> list[str]:
    """``skopeo copy docker://… oci:scratch/oci:TAG``; ``extra`` goes before the references."""
    return [
        "skopeo",
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        *extra,
        f"docker://{c.ref}",
        f"oci:{c.scratch / 'oci'}:{c.image.tag}",
    ]


def pulled(c: Ctx) -> bool:
    """Whether ``scratch/oci`` holds every layer of the image, at full size."""
    return common.oci_has_blobs(c.scratch / "oci", c.image.layers)


@dataclass(frozen=True)
class Lab:
    """The registry's port, the image pushed to it, and the scratch directory for runs."""

    registry_port: int
    image: BenchImage
    scratch: Path

    @contextmanager
    def proxied(
        self, seed: int, *, cut_after: tuple[int, int] | None = None, rate: float | None = None
    ) -> Iterator[tuple[Ctx, dict[str, int]]]:
        """An emptied scratch directory and a fresh proxy seeded with ``seed``.

        Yields the run's ``Ctx`` and a dict that holds the proxy's counters once the
        block has ended (the proxy is stopped then, also when the block raises).
        """
        common.fresh_dir(self.scratch)
        proxy = common.ProxyProcess(self.registry_port, seed, cut_after=cut_after, rate=rate)
        counters: dict[str, int] = {}
        try:
            yield Ctx(proxy.port, self.image, self.scratch), counters
        finally:
            counters.update(proxy.stop())


@contextmanager
def registry_with_image(
    name: str, layers_mib: Sequence[int], seed: int, repo: str = "bench/img"
) -> Iterator[Lab]:
    """The registry under ``WORK/name`` with the seeded image pushed as ``repo:v1``; stopped
    on exit (``repo`` ``library/…``: a name dockerd sends to its ``registry-mirrors``).

    The scratch directory is removed when the block ends normally.
    """
    servers = common.load_servers()
    work = common.WORK / name
    registry = servers.start_registry(work / "registry")
    try:
        image = common.push_bench_image(registry.url, work, layers_mib, seed, repo)
        lab = Lab(registry.port, image, work / "scratch")
        yield lab
        shutil.rmtree(lab.scratch, ignore_errors=True)
    finally:
        registry.stop()


def versions() -> dict[str, str]:
    """``peer_versions`` and ``more_versions`` together (skopeo and the registry included)."""
    return {**common.peer_versions(), **common.more_versions()}


def image_summary(
    image: BenchImage, layers_mib: Sequence[int], *, with_blob: bool = False
) -> dict[str, Any]:
    """The results file's ``image`` entry; ``with_blob`` adds the largest layer as ``blob``."""
    out: dict[str, Any] = {
        "repo": image.repo,
        "tag": image.tag,
        "manifest": image.manifest_digest,
        "layers": image.layers,
        "payload_bytes": image.payload,
    }
    if with_blob:
        out["blob"] = image.largest
    out["layers_mib"] = layers_mib
    out["generator"] = "resumer.lab.images.build_image, incompressible gzip layers"
    return out
