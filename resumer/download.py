"""The ordered layer download manager: Docker's semantics, with checkpoints underneath.

Given a pull's ordered layers, ``pull_layers``:

- reports "Already exists" for a layer whose chain is registered (and whose blob is in
  the content store, which the OCI layout needs), at no transfer;
- starts one transfer per distinct digest through the engine's ``TransferManager``, which
  caps concurrency across pulls ("Waiting") and shares a digest between pulls;
- registers strictly in order: layer i only after layer i−1, by inflating the committed
  blob off the loop, checking its diffID against the image config and recording its
  chain ID on the parent's. A digest repeated in the stack is transferred once and
  registered again on its own parent;
- on the first failure of any layer, cancels the other in-flight transfers (each keeps
  its partial), still registers the lower layers whose blobs are already committed, and
  fails the layer and every layer above it with that error;
- on cancellation, stops where it is: partials are checkpointed, nothing above the
  point is registered.

The registered chains are therefore always a prefix of the stack.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .errors import LayerDownloadError, RegistrationError, TransferError
from .events import Event, Stats, Status, ignore
from .pulls import LayerState, Pull, PullLayer, Pulls
from .register import chain_ids, compute_diff_id
from .source import Source
from .store import Store
from .transfer import BlobRequest, BlobResult, TransferManager

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]


@dataclass(frozen=True)
class LayerJob:
    """One layer of the stack: its manifest descriptor, its config diffID, where to get it."""

    digest: str
    size: int
    media_type: str
    diff_id: str
    source: Source

    @property
    def id(self) -> str:
        """The 12-hex id docker shows."""
        return self.digest.split(":", 1)[-1][:12]


@dataclass
class PullResult:
    """What ``pull_layers`` achieved; on success every layer of the stack is registered."""

    chain_ids: list[str]  # bottom first, one per layer
    stats: Stats = field(default_factory=Stats)  # summed over the distinct transfers
    existed: list[int] = field(default_factory=list)  # positions reported "Already exists"
    blobs: list[Path] = field(default_factory=list)  # each layer's blob in the content store


def jobs_for(pull: Pull, source_for: Callable[[PullLayer], Source]) -> list[LayerJob]:
    """The jobs of a stored pull (for ``resume``); ``source_for`` says where each layer is."""
    jobs: list[LayerJob] = []
    for layer in pull.layers:
        if layer.diff_id is None:
            raise RegistrationError(
                f"pull {pull.id}: layer {layer.position} {layer.digest} has no stored diffID"
            )
        jobs.append(
            LayerJob(layer.digest, layer.size, layer.media_type, layer.diff_id, source_for(layer))
        )
    return jobs


async def pull_layers(
    layers: Sequence[LayerJob],
    *,
    transfers: TransferManager,
    store: Store,
    config: Config,
    emit: Emit = ignore,
    pull_id: int | None = None,
) -> PullResult:
    """Download and register ``layers`` in order; see the module docstring for semantics.

    With ``pull_id``, the stored pull's layer states follow along (registered together
    with the chain, in one transaction). The pull's own state is the caller's to set:
    the pull is not done until its manifest and config are in the destination too.
    Raises ``LayerDownloadError`` or ``RegistrationError`` naming the failed layer.
    """
    run = _Run(list(layers), transfers, Pulls(store), config, emit, pull_id)
    return await run.go()


class _Run:
    def __init__(
        self,
        layers: list[LayerJob],
        transfers: TransferManager,
        pulls: Pulls,
        config: Config,
        emit: Emit,
        pull_id: int | None,
    ) -> None:
        self.layers = layers
        self.transfers = transfers
        self.pulls = pulls
        self.config = config
        self.emit = emit
        self.pull_id = pull_id
        self.chains = chain_ids([job.diff_id for job in layers])
        self.positions: dict[str, list[int]] = {}  # digest → its positions still to do
        self.tasks: dict[str, asyncio.Task[BlobResult]] = {}
        self.failures: dict[str, BaseException] = {}  # digest → its transfer's real error
        self.current = 0  # the position registration is at
        self.cancelled: set[asyncio.Task[BlobResult]] = set()
        self.diff_ids: dict[str, str] = {}  # digest → diffID computed in this run
        self.diff_errors: dict[str, RegistrationError] = {}  # digest → why it has none

    async def go(self) -> PullResult:
        ingest = self.transfers.ctx.ingest
        result = PullResult(
            list(self.chains), blobs=[ingest.blob_path(job.digest) for job in self.layers]
        )
        if self.pull_id is not None:
            await self.pulls.reset_failed_layers(self.pull_id)
        existing = await self._registered_chains()
        shown: set[tuple[str, str]] = set()
        for i, job in enumerate(self.layers):
            # "Already exists" needs the blob as well: the destination layout links it.
            if self.chains[i] in existing and ingest.has_blob(job.digest, job.size):
                result.existed.append(i)
                status = Status.ALREADY_EXISTS
            else:
                self.positions.setdefault(job.digest, []).append(i)
                status = Status.PULLING_FS_LAYER
            if (job.id, status) not in shown:  # a repeated digest is one line, as in docker
                shown.add((job.id, status))
                self.emit(Event(job.id, status))
        if self.pull_id is not None and result.existed:
            await self.pulls.set_layer_state(self.pull_id, result.existed, LayerState.REGISTERED)

        for digest, where in self.positions.items():
            self.tasks[digest] = asyncio.create_task(
                self._download(self.layers[where[0]], where), name=f"layer {digest}"
            )
            self.tasks[digest].add_done_callback(self._on_done)
        try:
            await self._register_in_order(set(result.existed))
        except BaseException as exc:
            self._cancel_all()
            interrupted = await self._settle()  # partials are checkpointed before we return
            if not isinstance(exc, asyncio.CancelledError):
                await self._mark_failed(exc)
            if interrupted:
                raise asyncio.CancelledError from exc
            raise
        for task in self.tasks.values():
            result.stats.add(task.result().stats)
        return result

    async def _registered_chains(self) -> set[str]:
        if not self.chains:
            return set()
        marks = ",".join("?" * len(self.chains))
        rows = await self.pulls.store.read(
            f"SELECT chain_id FROM layers WHERE chain_id IN ({marks})", self.chains
        )
        return {r[0] for r in rows}

    async def _download(self, job: LayerJob, positions: list[int]) -> BlobResult:
        req = BlobRequest(
            job.digest,
            job.source,
            digest=job.digest,
            size=job.size,
            media_type=job.media_type,
            pull_id=self.pull_id,
        )
        result = await self.transfers.fetch(req, self.emit)
        if result.existed:
            # Committed by an earlier run: no transfer events came, so close the line here.
            self.emit(Event(job.id, Status.DOWNLOAD_COMPLETE))
        if self.pull_id is not None:
            await self.pulls.set_layer_state(self.pull_id, positions, LayerState.DOWNLOADED)
        # Inflate now, beside the other downloads, not when registration reaches this
        # layer: layers are independent, only recording their chains is ordered.
        try:
            self.diff_ids[job.digest] = await compute_diff_id(
                result.path,
                job.media_type,
                max_uncompressed=self.config.max_uncompressed_bytes,
                digest=job.digest,
            )
        except RegistrationError as exc:
            self.diff_errors[job.digest] = exc  # raised when registration gets here
        return result

    def _on_done(self, task: asyncio.Task[BlobResult]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        digest = next(d for d, t in self.tasks.items() if t is task)
        self.failures[digest] = task.exception() or RuntimeError("unreachable")
        log.info(
            "layer %s failed: %s; cancelling the other transfers", digest, self.failures[digest]
        )
        # Docker's rule: one layer out of budget fails the pull. The others stop now
        # rather than spend the link on a pull that cannot finish; they keep their
        # partials, so the next run loses nothing.
        self._cancel_all()

    def _cancel_all(self) -> None:
        for task in self.tasks.values():
            # Once only: a second cancel would land in the transfer's own cleanup and
            # cut short the checkpoint of its partial.
            if not task.done() and task not in self.cancelled:
                self.cancelled.add(task)
                task.cancel()

    async def _settle(self) -> bool:
        """Wait until every transfer has stopped and checkpointed, even if we are
        cancelled meanwhile (returns True then): the caller may close the store next."""
        interrupted = False
        while pending := [t for t in self.tasks.values() if not t.done()]:
            try:
                await asyncio.wait(pending)
            except asyncio.CancelledError:
                interrupted = True
        return interrupted

    async def _register_in_order(self, existed: set[int]) -> None:
        parent: str | None = None
        for i, job in enumerate(self.layers):
            self.current = i
            chain = self.chains[i]
            if i in existed:
                parent = chain
                continue
            task = self.tasks[job.digest]
            # wait(), not await: a task we cancelled must not look like our own cancellation.
            await asyncio.wait([task])
            if task.cancelled() or task.exception() is not None:
                raise self._failure(i)
            self.emit(Event(job.id, Status.EXTRACTING))
            if job.digest in self.diff_errors:
                raise self.diff_errors[job.digest]
            diff_id = self.diff_ids[job.digest]  # a repeated digest is inflated once per run
            if diff_id != job.diff_id:
                raise RegistrationError(
                    f"layer {i} {job.digest}: uncompressed content has diffID {diff_id}, "
                    f"the image config says {job.diff_id}; not registered"
                )
            await self.pulls.register_chain(
                chain, diff_id, parent, job.digest, pull_id=self.pull_id, positions=[i]
            )
            self.emit(Event(job.id, Status.PULL_COMPLETE))
            parent = chain

    def _failure(self, position: int) -> BaseException:
        """The error that stops registration at ``position``: the lowest real failure."""
        digest = self.layers[position].digest
        task = self.tasks[digest]
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            return LayerDownloadError(position, digest, exc)
        # This layer was cancelled because another one failed: report that one.
        for i, job in enumerate(self.layers):
            if job.digest in self.failures:
                return LayerDownloadError(i, job.digest, self.failures[job.digest])
        return TransferError(f"layer {position} {digest}: transfer cancelled")

    async def _mark_failed(self, exc: BaseException) -> None:
        """The failed layer and every layer above it failed (Docker: with the parent's error)."""
        if self.pull_id is None:
            return
        start = exc.position if isinstance(exc, LayerDownloadError) else self.current
        todo = sorted(p for ps in self.positions.values() for p in ps if p >= start)
        await self.pulls.set_layer_state(self.pull_id, todo, LayerState.FAILED)


__all__ = ["LayerDownloadError", "LayerJob", "PullResult", "jobs_for", "pull_layers"]
