"""A whole image pull: resolve, store the job, download and register layers, write the layout.

The order matters for the invariants: the pull (reference, manifest digest, ordered
layers, destination, options) is stored before the first layer byte moves; blobs enter
the destination layout only once committed; ``index.json`` names the image last.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .download import LayerJob, PullResult, pull_layers
from .errors import ResumerError
from .events import Event, ProgressCallback, Stats, ignore
from .layout import Layout
from .pulls import Pulls, PullState
from .registry.client import RegistryClient
from .registry.manifest import ResolvedImage
from .registry.reference import Reference, parse_reference
from .retry import fails_for_good
from .store import Store
from .transfer import TransferManager

log = logging.getLogger(__name__)

#: Config fields a stored pull keeps, so ``resume`` continues it as it was started.
STORED_OPTIONS = ("registry_mirrors", "insecure_registries", "platform")


@dataclass
class PullOutcome:
    """What ``docker pull`` prints at the end, plus the numbers."""

    reference: str
    digest: str
    up_to_date: bool
    stats: Stats = field(default_factory=Stats)
    pull_id: int = 0

    @property
    def status(self) -> str:
        if self.up_to_date:
            return f"Image is up to date for {self.reference}"
        return f"Downloaded newer image for {self.reference}"


def stored_options(config: Config) -> dict[str, Any]:
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(config).items()
        if k in STORED_OPTIONS
    }


def config_with(config: Config, options: dict[str, Any]) -> Config:
    """The engine's config with a stored pull's registry options laid over it."""
    changes = {
        k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if k in STORED_OPTIONS
    }
    return config.replace(**changes)


async def pull_image(
    reference: str | Reference,
    *,
    client: RegistryClient,
    transfers: TransferManager,
    store: Store,
    config: Config,
    dest: Layout,
    content: Layout,
    platform: str | None = None,
    emit: ProgressCallback = ignore,
    pin: str | None = None,
) -> PullOutcome:
    """Pull ``reference`` into ``dest``; ``pin`` resolves a stored pull's manifest exactly."""
    ref = parse_reference(reference) if isinstance(reference, str) else reference
    shown_tag = ref.tag or (ref.digest or "")[:19]
    emit(Event(shown_tag, f"Pulling from {ref.repository}"))
    resolve_ref = dataclasses.replace(ref, digest=pin) if pin else ref
    image = await client.resolve(resolve_ref, platform or config.platform)
    jobs = [
        LayerJob(d.digest, d.size, d.media_type, diff_id, client.blob_source(ref, d.digest))
        for d, diff_id in zip(image.layers, image.diff_ids, strict=True)
    ]
    pulls = Pulls(store)
    # Stored before the first byte moves: a crash from here on is resumable.
    pull_id, joined = await pulls.create_or_join(
        str(ref),
        dest=str(dest.path),
        layers=jobs,
        manifest_digest=image.manifest_digest,
        platform=image.platform,
        options=stored_options(config),
    )
    if joined:
        log.info("pull %d of %s: joining the stored pull", pull_id, ref)
        await pulls.reset_failed_layers(pull_id)
    await pulls.set_state(pull_id, PullState.PENDING)
    was_there = _names(dest, ref, image)
    try:
        result = await pull_layers(
            jobs, transfers=transfers, store=store, config=config, emit=emit, pull_id=pull_id
        )
        await _write_layout(dest, content, ref, image, jobs, result)
    except BaseException as exc:
        reason = "cancelled" if not isinstance(exc, Exception) else str(exc)
        await pulls.set_state(
            pull_id, PullState.FAILED, error=reason, permanent=fails_for_good(exc)
        )
        raise
    await pulls.set_state(pull_id, PullState.DONE)
    up_to_date = was_there and len(result.existed) == len(jobs)
    emit(Event("", f"Digest: {image.digest}"))
    return PullOutcome(str(ref), image.digest, up_to_date, result.stats, pull_id)


def _names(dest: Layout, ref: Reference, image: ResolvedImage) -> bool:
    """Whether ``dest`` already names this very manifest as ``ref``."""
    try:
        return any(
            e.image_name == str(ref) and e.digest == image.manifest_digest for e in dest.images()
        )
    except ResumerError:
        return False


async def _write_layout(
    dest: Layout,
    content: Layout,
    ref: Reference,
    image: ResolvedImage,
    jobs: list[LayerJob],
    result: PullResult,
) -> None:
    # Every blob enters dest through its content store (verified, synced, renamed in).
    if dest.path.resolve() != content.path.resolve():
        for job, blob in zip(jobs, result.blobs, strict=True):
            if not dest.content.has(job.digest, job.size):
                await dest.content.import_verified(blob, job.digest)
    await dest.content.commit_bytes(image.config, image.config_digest)
    await dest.content.commit_bytes(image.manifest, image.manifest_digest)
    descriptor: dict[str, Any] = {
        "mediaType": image.manifest_media_type,
        "digest": image.manifest_digest,
        "size": len(image.manifest),
    }
    os_, _, arch = image.platform.partition("/")
    arch, _, variant = arch.partition("/")
    if os_ and arch:
        descriptor["platform"] = {"os": os_, "architecture": arch}
        if variant:
            descriptor["platform"]["variant"] = variant
    ref_name = ref.tag or (ref.digest or image.manifest_digest)
    await dest.add_image(descriptor, ref_name=ref_name, image_name=str(ref))


def layout_for(root: Path, dest: Path | None) -> Layout:
    layout = Layout(dest if dest is not None else root)
    layout.ensure()
    return layout


__all__ = ["PullOutcome", "config_with", "layout_for", "pull_image", "stored_options"]
