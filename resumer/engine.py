"""The Engine: one root, one state database, one HTTP session, one transfer manager.

async with Engine.open(root, Config()) as engine:
    result = await engine.fetch(url, digest="sha256:…", dest=path)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from . import progress as P
from .clock import Clock, SystemClock
from .config import Config
from .digest import Digest
from .errors import StoreError
from .gc import collect_partials
from .ingest import Ingest
from .layout import Layout, fsync_dir, make_dirs
from .progress import Stats
from .rootlock import RootLock
from .source import UrlSource, redact_url
from .store import Store
from .transfer import BlobRequest, TransferContext, TransferManager

if TYPE_CHECKING:  # the pull machinery loads on first use: `resumer fetch` starts faster
    from .pull import PullOutcome
    from .registry import RegistryClient

log = logging.getLogger(__name__)


@dataclass
class FetchResult:
    path: Path
    digest: str
    size: int
    stats: Stats = field(default_factory=Stats)
    attempts: int = 0


def url_key(url: str) -> str:
    """A transfer key for a URL fetched without a digest. Hashed: URLs may hold secrets."""
    return "url:" + hashlib.sha256(url.encode()).hexdigest()


def make_session(config: Config) -> aiohttp.ClientSession:
    # total=None: a layer may take hours on a satellite link; stalls are our watchdog's job.
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=config.connect_timeout or None,
        sock_read=None,
    )
    return aiohttp.ClientSession(
        timeout=timeout,
        auto_decompress=False,
        # One network read is the unit a kill can lose on top of unrecorded chunks.
        read_bufsize=256 * 1024,
        connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
    )


class Engine:
    """Everything a process needs to pull and fetch into one root."""

    def __init__(
        self,
        root: Path,
        config: Config,
        store: Store,
        session: aiohttp.ClientSession,
        clock: Clock,
    ) -> None:
        self.root = root
        self.config = config
        self.store = store
        self.session = session
        self.clock = clock
        self.run_id = uuid.uuid4().hex
        self.ingest = Ingest(root, store, config, clock)
        self.ctx = TransferContext(session, store, self.ingest, config, clock, self.run_id)
        self.transfers = TransferManager(self.ctx)
        self.lock: RootLock | None = None
        self._registries: dict[tuple[tuple[str, ...], tuple[str, ...]], RegistryClient] = {}
        #: tests and the lab point a registry name at a local URL (e.g. docker.io → 127.0.0.1)
        self.endpoint_overrides: dict[str, str] = {}

    def registry(self, config: Config | None = None) -> RegistryClient:
        """One client (token cache, host health) per set of mirror/insecure options."""
        from .registry import RegistryClient

        config = config or self.config
        key = (config.registry_mirrors, config.insecure_registries)
        if key not in self._registries:
            self._registries[key] = RegistryClient(
                self.session,
                config,
                clock=self.clock,
                endpoint_overrides=self.endpoint_overrides,
            )
        return self._registries[key]

    async def pull(
        self,
        reference: str,
        *,
        dest: Path | None = None,
        platform: str | None = None,
        on_progress: P.ProgressCallback = P.ignore,
    ) -> PullOutcome:
        """Pull an image into ``dest`` (an OCI layout; default: the root's own)."""
        from .pull import layout_for, pull_image

        return await pull_image(
            reference,
            client=self.registry(),
            transfers=self.transfers,
            store=self.store,
            config=self.config,
            dest=layout_for(self.root, dest),
            content=self.ingest.layout,
            platform=platform,
            emit=on_progress,
        )

    async def resume(self, on_progress: P.ProgressCallback = P.ignore) -> list[PullOutcome]:
        """Continue every unfinished pull, oldest first, with its stored options."""
        from .pull import config_with, layout_for, pull_image
        from .pulls import Pulls

        outcomes = []
        for stored in await Pulls(self.store).unfinished():
            config = config_with(self.config, stored.options)
            outcomes.append(
                await pull_image(
                    stored.reference,
                    client=self.registry(config),
                    transfers=self.transfers,
                    store=self.store,
                    config=config,
                    dest=layout_for(self.root, Path(stored.dest)),
                    content=self.ingest.layout,
                    platform=stored.platform,
                    emit=on_progress,
                    pin=stored.manifest_digest,
                )
            )
        return outcomes

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        root: Path,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        lock_timeout: float | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> AsyncIterator[Engine]:
        """Open ``root`` (created if needed), holding its lock until the block ends."""
        config = config or Config()
        try:
            make_dirs(root)
        except OSError as exc:
            raise StoreError(f"cannot create root {root}: {exc.strerror or exc}") from exc
        lock = RootLock(root)
        await lock.acquire(timeout=lock_timeout, on_wait=on_wait)
        try:
            Layout(root).ensure()  # the root is an OCI image layout
            store = await Store.open(root / "state.db", clock=clock)
            try:
                async with make_session(config) as session:
                    engine = cls(root, config, store, session, clock or SystemClock())
                    engine.lock = lock
                    await collect_partials(engine.ingest, config.partial_budget_bytes)
                    yield engine
            finally:
                await store.close()
        finally:
            lock.release()

    async def fetch(
        self,
        url: str,
        *,
        digest: str | None = None,
        dest: Path | None = None,
        on_progress: P.ProgressCallback = P.ignore,
        headers: dict[str, str] | None = None,
    ) -> FetchResult:
        """Download one URL resumably; ``dest`` appears only once the content is verified."""
        if digest is not None:
            digest = str(Digest.parse(digest))
        source = UrlSource(url, headers)
        key = digest or url_key(url)
        req = BlobRequest(key, source, digest=digest)
        log.info("fetch %s -> %s", redact_url(url), key)
        result = await self.transfers.fetch(req, on_progress)
        if dest is not None:
            # A blob that was already in the store may be shared by images: copy it.
            # One this fetch brought in is moved out, so a 1 GiB fetch costs no copy.
            await asyncio.to_thread(publish, result.path, dest, move=not result.existed)
        return FetchResult(
            dest or result.path, result.digest, result.size, result.stats, result.attempts
        )


def publish(blob: Path, dest: Path, *, move: bool) -> None:
    """Make a verified blob appear at ``dest`` atomically: rename, else copy then rename."""
    dest = dest.absolute()
    if move:
        try:
            os.replace(blob, dest)
        except OSError:
            move = False
    if not move:
        # Never hardlink: a user editing dest would silently corrupt the content store.
        tmp = dest.with_name(f".{dest.name}.resumer-tmp")
        shutil.copyfile(blob, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    fsync_dir(dest.parent)
