"""The Engine: one root, one state database, one HTTP session, one transfer manager.

async with Engine.open(root, Config()) as engine:
    result = await engine.fetch(url, digest="sha256:…", dest=path)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import stat
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from . import http
from .clock import Clock, SystemClock
from .config import Config
from .content.blobs import can_reflink, copy_into, create_temp, fsync_dir, make_dirs
from .content.partial import Ingest
from .content.tee import Tee
from .digest import Digest
from .errors import (
    OutputError,
    PublishError,
    ResumerError,
    RootUnusableError,
    UsageError,
)
from .events import ProgressCallback, Stats, ignore
from .fetch import revalidate
from .gc import collect_partials
from .hosts import HostHealth
from .layout import Layout
from .rate import limiter_for
from .rootlock import RootLock
from .source import UrlSource, check_url, redact_url
from .store import Store, TransferState
from .transfer import BlobRequest, BlobResult, TransferContext, TransferManager

if TYPE_CHECKING:  # the pull machinery loads on first use: `resumer fetch` starts faster
    import aiohttp

    from .pull import PullOutcome
    from .registry.client import RegistryClient

log = logging.getLogger(__name__)

#: RESUMER_FETCH_TEE=0 copies to ``fetch -o`` at the end only (for comparison)
_TEE = os.environ.get("RESUMER_FETCH_TEE", "1") != "0"


@dataclass
class FetchResult:
    path: Path
    digest: str
    size: int
    stats: Stats = field(default_factory=Stats)
    attempts: int = 0


@dataclass(frozen=True)
class ResumeFailure:
    pull_id: int
    reference: str
    error: ResumerError


@dataclass
class ResumeResult:
    """What ``Engine.resume`` did: the pulls that finished and the ones that failed."""

    outcomes: list[PullOutcome] = field(default_factory=list)
    failures: list[ResumeFailure] = field(default_factory=list)


def url_key(url: str) -> str:
    """A transfer key for a URL fetched without a digest. Hashed: URLs may hold secrets."""
    return "url:" + hashlib.sha256(url.encode()).hexdigest()


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
        #: which hosts to try first, shared by every registry client and transfer
        self.hosts = HostHealth(clock)
        self.ctx = TransferContext(
            session,
            store,
            self.ingest,
            config,
            clock,
            self.run_id,
            self.hosts,
            # One rate cap and one wire budget for every transfer of this engine. The
            # bucket runs on real time whatever ``clock`` is: it caps real throughput
            # (its math is tested on a FakeClock, tests/test_rate.py).
            limiter=limiter_for(config.max_download_rate, config.max_wire_bytes),
        )
        self.transfers = TransferManager(self.ctx)
        self.lock: RootLock | None = None
        self._registries: dict[tuple[tuple[str, ...], tuple[str, ...]], RegistryClient] = {}
        #: tests and the lab point a registry name at a local URL (e.g. docker.io → 127.0.0.1)
        self.endpoint_overrides: dict[str, str] = {}

    def registry(self, config: Config | None = None) -> RegistryClient:
        """One client (token cache, host health) per set of mirror/insecure options."""
        from .registry.client import RegistryClient

        config = config or self.config
        key = (config.registry_mirrors, config.insecure_registries)
        if key not in self._registries:
            self._registries[key] = RegistryClient(
                self.session,
                config,
                clock=self.clock,
                endpoint_overrides=self.endpoint_overrides,
                hosts=self.hosts,
            )
        return self._registries[key]

    async def pull(
        self,
        reference: str,
        *,
        dest: Path | None = None,
        platform: str | None = None,
        on_progress: ProgressCallback = ignore,
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

    async def resume(self, on_progress: ProgressCallback = ignore) -> ResumeResult:
        """Continue every unfinished pull, oldest first, with its stored options.

        One pull that fails, for good or for this run, never stops the others: an
        unattended gateway would otherwise stall behind it. Each failure is returned (and
        stored on its pull) beside the outcomes of the pulls that finished.
        """
        from .pull import config_with, layout_for, pull_image
        from .pulls import Pulls, PullState
        from .retry import fails_for_good

        pulls = Pulls(self.store)
        result = ResumeResult()
        for stored in await pulls.unfinished():
            config = config_with(self.config, stored.options)
            try:
                result.outcomes.append(
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
            except ResumerError as exc:
                log.warning("resume: pull %d of %s failed: %s", stored.id, stored.reference, exc)
                # pull_image stores failures once the pull is under way; one that came
                # before (the manifest gone, a corrupt destination) is stored here.
                await pulls.set_state(
                    stored.id, PullState.FAILED, error=str(exc), permanent=fails_for_good(exc)
                )
                result.failures.append(ResumeFailure(stored.id, stored.reference, exc))
        return result

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
            # A root that cannot be a directory (a file in the way, a read-only mount) is
            # a configuration problem: exit 2, like the other unusable roots.
            raise RootUnusableError(f"cannot use root {root}: {exc.strerror or exc}") from exc
        lock = RootLock(root)
        await lock.acquire(timeout=lock_timeout, on_wait=on_wait)
        try:
            Layout(root).ensure()  # the root is an OCI image layout
            store = await Store.open(root / "state.db", clock=clock)
            try:
                async with http.make_session(connect_timeout=config.connect_timeout) as session:
                    engine = cls(root, config, store, session, clock or SystemClock())
                    engine.lock = lock
                    await collect_partials(engine.ingest, config.partial_budget_bytes)
                    try:
                        yield engine
                    finally:
                        await engine.transfers.close()  # before the session and store close
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
        on_progress: ProgressCallback = ignore,
        headers: dict[str, str] | None = None,
        stream: BinaryIO | None = None,
    ) -> FetchResult:
        """Download one URL resumably; ``dest`` appears only once the content is verified.

        Before the first byte moves, the URL must be http(s) (``UrlError``) and ``dest``
        must pass ``check_output`` (``OutputError``). ``stream`` (stdout, say) receives
        the verified blob instead of a path; the result's path is then ``-``.

        ``dest`` gets a copy (a reflink where it can) and ``stream`` a read of the blob:
        either way the blob stays committed in the root's store, so a pull sharing its
        transfer keeps it and the same fetch again moves no byte (``resumer prune``
        removes the blobs no image or pull needs). If the output cannot be written, the
        error says how to publish it without downloading it again.
        """
        check_url(url)
        if digest is not None:
            digest = str(Digest.parse(digest))
        if dest is not None and stream is not None:
            raise UsageError("fetch: give dest or stream, not both")
        if dest is not None:
            await asyncio.to_thread(check_output, dest)
        source = UrlSource(url, headers)
        key = digest or url_key(url)
        req = BlobRequest(key, source, digest=digest)
        log.info("fetch %s -> %s", redact_url(url), key)
        tee = await self._tee(key, dest) if dest is not None else None
        try:
            result = await self._kept(req) if digest is None else None
            if result is None:
                result = await self.transfers.fetch(req, on_progress)
            return await self._deliver(result, dest, stream, tee)
        finally:
            if tee is not None:
                await tee.close()

    async def _tee(self, key: str, dest: Path) -> Tee | None:
        """A copy that follows the download into ``dest``'s directory, unless a reflink
        of the finished blob costs nothing there (then that is made at the end)."""
        dest = dest.absolute()
        if not _TEE or await asyncio.to_thread(can_reflink, self.ingest.dir, dest.parent):
            return None
        try:
            tee = Tee(self.ingest, key, dest)
        except OSError as exc:
            raise OutputError(f"output {dest}: cannot create files beside it: {exc}") from exc
        tee.start()
        return tee

    async def _deliver(
        self, result: BlobResult, dest: Path | None, stream: BinaryIO | None, tee: Tee | None
    ) -> FetchResult:
        if dest is None and stream is None:
            return FetchResult(
                result.path, result.digest, result.size, result.stats, result.attempts
            )
        kept = (
            f"the verified blob is kept in {self.root} as {result.digest}: run again with "
            f"--digest {result.digest} to publish it without downloading it again"
        )
        # The blob stays in the store whatever happens here: its transfer row says
        # committed, a pull may share it, and the next fetch of it moves no byte.
        try:
            if dest is not None:
                copy = await tee.finish(result.size) if tee is not None else None
                if copy is not None:
                    await asyncio.to_thread(install, *copy, dest.absolute())
                    how = "a copy made as the bytes arrived"
                else:
                    how = await asyncio.to_thread(publish, result.path, dest)
                log.info("fetch %s: published to %s by %s", result.digest, dest, how)
            else:
                assert stream is not None
                await asyncio.to_thread(stream_blob, result.path, stream)
        except OutputError as exc:
            raise OutputError(f"{exc}; {kept}") from exc
        except OSError as exc:
            where = dest if dest is not None else getattr(stream, "name", "the output stream")
            raise PublishError(f"cannot write {where}: {exc.strerror or exc}; {kept}") from exc
        return FetchResult(
            dest or Path("-"), result.digest, result.size, result.stats, result.attempts
        )

    async def _kept(self, req: BlobRequest) -> BlobResult | None:
        """A URL fetched before whose verified blob is still in the store (``fetch`` keeps
        what it published, unless pruned since), if the server says it is unchanged."""
        row = await self.store.transfer(req.key)
        if (
            row is None
            or row.state is not TransferState.COMMITTED
            or not (row.digest and row.validator and row.size is not None)
            or not self.ingest.has_blob(row.digest, row.size)
        ):
            return None
        endpoints = await req.source.endpoints()
        if not endpoints or not await revalidate(
            self.session,
            endpoints[0],
            row.validator,
            row.size,
            timeout=self.config.stall_timeout,
        ):
            return None
        log.info("fetch %s: unchanged (%s), already in the store", req.source.display, row.digest)
        path = self.ingest.blob_path(row.digest)
        return BlobResult(path, row.digest, row.size, existed=True)


_KINDS = {
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFSOCK: "socket",
}


def _check_kind(dest: Path) -> None:
    """``OutputError`` unless ``dest`` is absent or a regular file (never followed)."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
    except OSError as exc:  # a parent that is a file, a directory we may not search …
        raise OutputError(f"output {dest}: {exc.strerror or exc}") from exc
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return
    if stat.S_ISLNK(mode):
        target = os.readlink(dest)
        real = os.path.realpath(dest)
        raise OutputError(
            f"output {dest} is a symbolic link to {target}; resumer neither writes through "
            f"a link nor replaces one: pass the target path (-o {real}) or remove the link"
        )
    if stat.S_ISDIR(mode):
        raise OutputError(f"output {dest} is a directory; give a file name")
    kind = _KINDS.get(stat.S_IFMT(mode), "special file")
    raise OutputError(
        f"output {dest} is a {kind}, not a regular file; resumer only writes regular files, "
        "replaced atomically (use -o - to write to stdout)"
    )


def check_output(dest: Path) -> None:
    """Refuse, before any byte moves, an output resumer must not or cannot write.

    ``dest`` must be absent or a regular file (never a device, FIFO, socket, directory or
    symbolic link), in an existing directory where this process can create files: that
    is probed by creating one, since ``os.access`` says yes to root on a read-only mount.
    Raises ``OutputError`` naming the path and the cause.
    """
    _check_kind(dest)
    parent = dest.absolute().parent
    if not parent.is_dir():
        raise OutputError(f"output {dest}: directory {parent} does not exist")
    try:
        fd, probe = create_temp(parent, f".{dest.name}.", ".resumer-probe")
    except OSError as exc:
        raise OutputError(
            f"output {dest}: cannot create files in {parent}: {exc.strerror or exc}"
        ) from exc
    os.close(fd)
    with contextlib.suppress(OSError):
        probe.unlink()


def publish(blob: Path, dest: Path) -> str:
    """Make a copy of a verified blob appear at ``dest`` atomically; how it was copied.

    A copy, never a move: the blob stays in the content store, where its transfer row
    and any pull sharing it expect it. Never a hardlink either: a user editing ``dest``
    would silently corrupt the store. The copy is a reflink where the file system can
    (``copy_into``), so a 1 GiB fetch on btrfs or XFS still costs no data copy.

    Only ever a regular file is replaced (checked again here: ``OutputError``), by a
    rename of a complete, fsynced temp file in the same directory, then an fsync of that
    directory. On any failure the temp file is removed and ``dest`` is left as it was.
    """
    dest = dest.absolute()
    _check_kind(dest)
    fd, tmp = create_temp(dest.parent, f".{dest.name}.", ".resumer-tmp")
    try:
        with open(blob, "rb") as src:
            how = copy_into(src.fileno(), fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    install(fd, tmp, dest)
    return how


def install(fd: int, tmp: Path, dest: Path) -> None:
    """Rename the complete copy ``tmp`` (open as ``fd``, closed here) over ``dest``:
    the output's rules checked again, fsync, rename, fsync of the directory. On any
    failure ``tmp`` is removed and ``dest`` is left as it was."""
    try:
        try:
            _check_kind(dest)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(dest.parent)


def stream_blob(blob: Path, out: BinaryIO) -> None:
    """Write a verified blob to ``out`` (stdout, say), then flush it."""
    out.flush()
    with open(blob, "rb") as src:
        try:
            fd = out.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
            shutil.copyfileobj(src, out, 1 << 20)
        else:
            _copy_fd(src.fileno(), fd)
    out.flush()


def _copy_fd(src: int, dst: int) -> None:
    """All of ``src`` to ``dst``: sendfile(2) in the kernel, else read and write."""
    size = os.fstat(src).st_size
    offset = 0
    while offset < size:
        try:
            sent = os.sendfile(dst, src, offset, min(size - offset, 1 << 30))
        except OSError as exc:
            if offset or exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            break  # sendfile cannot write there: the plain way
        if sent == 0:  # the blob shrank under us: never publish a short copy
            raise OSError(errno.EIO, f"short copy: {offset} of {size} bytes")
        offset += sent
    else:
        return
    os.lseek(src, 0, os.SEEK_SET)
    while block := os.read(src, 1 << 20):
        view = memoryview(block)
        while view:
            view = view[os.write(dst, view) :]
