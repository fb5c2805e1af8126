"""The mirror's HTTP API: the read-only half of the OCI distribution spec.

Every route answers with OCI error JSON when it cannot serve, so that a client (dockerd,
containerd, podman) falls through to its next endpoint. Every response is built here:
no header of an upstream answer (a token, a challenge, a redirect) is ever passed on,
and the mirror asks no client for credentials.

- ``GET /v2/``: the API check.
- ``GET``/``HEAD /v2/<name>/manifests/<tag|digest>``: by digest from the store (verified
  when first fetched, then kept); by tag revalidated upstream, else the last known digest
  (logged as stale).
- ``GET``/``HEAD /v2/<name>/blobs/<digest>``: see ``blobs.py``.
- ``?ns=<registry>`` (containerd) names the upstream; without it, ``settings.upstream``.

The limits (``server_options`` and ``_guard``): header size, no request body, a cap on
requests in flight, and a deadline for a request's headers (a client sending one byte a
second is dropped while others are served).
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..engine import Engine
from ..errors import (
    AccessDeniedError,
    NotFoundError,
    ReferenceError_,
    ResumerError,
    UsageError,
)
from ..registry import Reference, parse_reference
from ..retry import fails_for_good
from ..transfer import BlobResult
from . import names
from .blobs import (
    Feeds,
    blob_headers,
    send_committed,
    send_growing,
    upstream_error,
    wait_for_partial,
)
from .cache import CachedManifest, MirrorCache
from .names import BadRequest, Kind, Target
from .upstream import blob_size, get_manifest

log = logging.getLogger(__name__)

#: the API version header every /v2/ answer carries (docker checks it)
_API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
#: descriptor sizes remembered from served manifests, at most (then forgotten and relearnt)
_SIZES_MAX = 100_000


@dataclass(frozen=True)
class MirrorSettings:
    """What the mirror needs beyond the engine's Config."""

    #: the registry a request without ``?ns=`` goes to (dockerd and podman send none)
    upstream: str = "docker.io"
    #: requests served at once; more wait ``queue_wait`` seconds for a turn, then get 429
    max_clients: int = 128
    queue_wait: float = 2.0
    #: seconds a connection may take to send a request's headers (and may stay idle)
    header_timeout: float = 15.0
    #: the longest request line and header field, in bytes
    max_header_bytes: int = 8190
    #: how long a manifest request upstream may take before the cached one is served
    upstream_timeout: float = 10.0
    #: the registries a request may name with ``?ns=`` (with the default upstream); empty:
    #: any. A mirror reachable from a LAN would otherwise fetch from any host a client
    #: names, internal ones included.
    allowed_upstreams: tuple[str, ...] = ()


def server_options(settings: MirrorSettings) -> dict[str, Any]:
    """The aiohttp server's limits, for ``web.AppRunner(app, **server_options(s))``.

    aiohttp starts the keep-alive timer when a connection is made and closes a connection
    still waiting for a whole request when it fires: it is the deadline for headers sent
    slowly, as well as for idle connections.
    """
    return {
        "keepalive_timeout": settings.header_timeout,
        "max_line_size": settings.max_header_bytes,
        "max_field_size": settings.max_header_bytes,
        "max_headers": 64,
    }


def oci_error(status: int, code: str, message: str, **headers: str) -> web.Response:
    body = {"errors": [{"code": code, "message": message, "detail": None}]}
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={**_API_VERSION, **headers},
    )


class Mirror:
    """The handlers, with what they share: the engine, the manifest cache, the feeds."""

    def __init__(self, engine: Engine, settings: MirrorSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.cache = MirrorCache(engine.store)
        self.feeds = Feeds(engine)
        self.sizes: dict[str, int] = {}
        self.slots = asyncio.Semaphore(settings.max_clients)
        #: threads that sendfile committed blobs: one per client in flight at most, so
        #: long sends never starve the default executor the store's work runs on
        self.senders = ThreadPoolExecutor(settings.max_clients, "resumer-sendfile")
        self._allowed = _allowed_registries(settings)

    # ---- routing ------------------------------------------------------------------------

    async def route(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.partition("?")[0]
        if path in ("/v2", "/v2/"):
            return web.Response(body=b"{}", content_type="application/json", headers=_API_VERSION)
        if path.startswith("/v2/_catalog") or path.endswith("/tags/list"):
            return oci_error(405, "UNSUPPORTED", "this mirror serves no catalog or tag list")
        try:
            target = names.parse_target(request.raw_path)
            if target is None:
                return oci_error(404, "NAME_UNKNOWN", "not served by this mirror")
            ref = self._reference(request, target)
        except BadRequest as exc:
            return oci_error(exc.status, exc.code, exc.message)
        if target.kind is Kind.MANIFESTS:
            return await self.manifest(request, target, ref)
        return await self.blob(request, target, ref)

    def _reference(self, request: web.Request, target: Target) -> Reference:
        ns = request.query.get("ns")
        if ns is not None and not names.valid_host(ns):
            raise BadRequest(400, "NAME_INVALID", f"invalid ns {ns[:80]!r}")
        registry = ns or self.settings.upstream
        suffix = f"@{target.reference}" if target.digest else f":{target.reference}"
        try:
            ref = parse_reference(f"{registry}/{target.name}{suffix}")
        except ReferenceError_ as exc:
            raise BadRequest(400, "NAME_INVALID", str(exc)) from None
        if self._allowed is not None and ref.registry not in self._allowed:
            raise BadRequest(403, "DENIED", f"ns {ref.registry!r} is not a mirrored registry")
        return ref

    # ---- manifests ----------------------------------------------------------------------

    async def manifest(self, request: web.Request, target: Target, ref: Reference) -> web.Response:
        got = await (self._by_digest(ref) if target.digest else self._by_tag(ref))
        if isinstance(got, web.Response):
            return got
        cached, body = got
        self._learn_sizes(body)
        headers = {
            **_API_VERSION,
            "Content-Type": cached.media_type,
            "Docker-Content-Digest": cached.digest,
            "Content-Length": str(len(body)),
        }
        if request.method == "HEAD":
            resp = web.Response(status=200, headers=headers)
            return resp
        return web.Response(status=200, body=body, headers=headers)

    async def _by_digest(self, ref: Reference) -> tuple[CachedManifest, bytes] | web.Response:
        digest = ref.digest
        assert digest is not None
        cached = await self.cache.manifest(digest)
        if cached is not None:
            body = await self._stored(digest)
            if body is not None:
                return cached, body
        try:
            m = await get_manifest(
                self.engine.registry(), ref, digest, timeout=self.settings.upstream_timeout
            )
        except ResumerError as exc:
            return self._manifest_error(ref, exc)
        return await self._keep(m.digest, m.media_type, m.body, None), m.body

    async def _by_tag(self, ref: Reference) -> tuple[CachedManifest, bytes] | web.Response:
        tag = ref.tag
        assert tag is not None
        try:
            m = await get_manifest(
                self.engine.registry(), ref, tag, timeout=self.settings.upstream_timeout
            )
        except ResumerError as exc:
            if isinstance(exc, NotFoundError | AccessDeniedError):
                return self._manifest_error(ref, exc)
            cached = await self.cache.tag(ref.registry, ref.repository, tag)
            body = await self._stored(cached.digest) if cached is not None else None
            if cached is None or body is None:
                return self._manifest_error(ref, exc)
            log.warning(
                "serve: %s: upstream did not answer (%s); serving the last known %s (stale)",
                ref,
                exc,
                cached.digest,
            )
            return cached, body
        return await self._keep(m.digest, m.media_type, m.body, ref), m.body

    async def _keep(
        self, digest: str, media_type: str, body: bytes, tagged: Reference | None
    ) -> CachedManifest:
        content = self.engine.ingest.content
        if not content.has(digest, len(body)):
            await content.commit_bytes(body, digest)
        cached = CachedManifest(digest, media_type, len(body))
        tag = (tagged.registry, tagged.repository, tagged.tag) if tagged and tagged.tag else None
        await self.cache.keep(cached, tag)
        return cached

    async def _stored(self, digest: str) -> bytes | None:
        path = self.engine.ingest.blob_path(digest)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    def _manifest_error(self, ref: Reference, exc: BaseException) -> web.Response:
        if isinstance(exc, NotFoundError):
            return oci_error(404, "MANIFEST_UNKNOWN", f"manifest unknown: {ref}")
        if isinstance(exc, AccessDeniedError):
            return oci_error(403, "DENIED", f"upstream refused access to {ref.name}")
        log.warning("serve: manifest %s: %s", ref, exc)
        kind = "upstream unavailable" if not fails_for_good(exc) else "upstream failed"
        return oci_error(503, "UNAVAILABLE", f"{kind} for {ref}, and nothing cached")

    def _learn_sizes(self, body: bytes) -> None:
        """Remember the size of every blob and child manifest this manifest describes: a
        blob GET that follows can then say its Content-Length before the bytes arrive."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(doc, dict):
            return
        described = [doc.get("config")]
        for key in ("layers", "manifests"):
            if isinstance(doc.get(key), list):
                described.extend(doc[key])
        if len(self.sizes) > _SIZES_MAX:
            self.sizes.clear()
        for d in described:
            if isinstance(d, dict):
                digest, size = d.get("digest"), d.get("size")
                if isinstance(digest, str) and names.is_digest(digest) and type(size) is int:
                    self.sizes[digest] = max(size, 0)

    # ---- blobs --------------------------------------------------------------------------

    async def blob(
        self, request: web.Request, target: Target, ref: Reference
    ) -> web.StreamResponse:
        digest = target.reference
        engine = self.engine
        headers = blob_headers(digest, _API_VERSION)
        if engine.ingest.has_blob(digest):
            try:
                return await send_committed(request, engine, digest, headers, self.senders)
            except web.HTTPNotFound:
                pass  # pruned just now: fetch it again
        size = await self._known_size(digest)
        client = engine.registry()
        if size is None and not self.feeds.running(digest):
            size = await blob_size(client, ref, digest, timeout=self.settings.upstream_timeout)
        if request.method == "HEAD" and not self.feeds.running(digest):
            if size is not None:
                headers["Content-Length"] = str(size)
            resp = web.StreamResponse(status=200, headers=headers)
            await resp.prepare(request)
            return resp
        task = self.feeds.start(digest, client.blob_source(ref, digest), size)
        try:
            got = await wait_for_partial(engine, digest, task)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            status, code, message = upstream_error(exc)
            log.warning("serve: blob %s of %s: %s", digest, ref.name, exc)
            return oci_error(status, code, message)
        if isinstance(got, BlobResult):
            return await send_committed(request, engine, digest, headers, self.senders)
        return await send_growing(request, got, digest, got.size or size, headers)

    async def _known_size(self, digest: str) -> int | None:
        size = self.sizes.get(digest)
        if size is None:
            row = await self.engine.store.transfer(digest)
            size = row.size if row is not None else None
        return size

    async def close(self, _app: web.Application | None = None) -> None:
        await self.feeds.close()

    async def closed(self, _app: web.Application | None = None) -> None:
        """After the handlers ended: their sendfile threads have stopped too."""
        await self.close()
        await asyncio.to_thread(self.senders.shutdown, True)


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Refuse what a read-only mirror never serves, before any work: writes (push, delete),
    request bodies; and hold each request to the cap on requests in flight."""
    mirror: Mirror = request.app[_MIRROR]
    if request.method not in ("GET", "HEAD"):
        return oci_error(
            405, "UNSUPPORTED", f"{request.method}: this mirror is read-only", Allow="GET, HEAD"
        )
    if request.content_length or "Transfer-Encoding" in request.headers:
        return oci_error(400, "UNSUPPORTED", "a request body is not accepted", Connection="close")
    slots = mirror.slots
    try:
        await asyncio.wait_for(slots.acquire(), mirror.settings.queue_wait)
    except TimeoutError:
        return oci_error(
            429, "TOOMANYREQUESTS", "too many clients at once; try again", **{"Retry-After": "1"}
        )
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    finally:
        slots.release()


_MIRROR = web.AppKey("mirror", Mirror)


def mirror_app(engine: Engine, settings: MirrorSettings) -> web.Application:
    # client_max_size: no route reads a body; one that came is refused by _guard.
    app = web.Application(middlewares=[_guard], client_max_size=1024)
    mirror = Mirror(engine, settings)
    app[_MIRROR] = mirror
    app.router.add_route("*", "/{tail:.*}", mirror.route)
    # At shutdown, before aiohttp waits for the handlers: the transfers end (each keeps
    # its partial), so a client streaming a growing blob is cut off, not waited for.
    app.on_shutdown.append(mirror.close)
    app.on_cleanup.append(mirror.closed)
    return app


def _allowed_registries(settings: MirrorSettings) -> frozenset[str] | None:
    """The registries ``?ns=`` may name, as parsed references spell them (``docker.io``
    for its aliases), the default upstream among them; None: any."""
    if not settings.allowed_upstreams:
        return None
    allowed = set()
    for name in (*settings.allowed_upstreams, settings.upstream):
        try:
            allowed.add(parse_reference(f"{name}/probe").registry)
        except ReferenceError_ as exc:
            raise UsageError(f"--allow-upstream {name!r}: not a registry name ({exc})") from None
    return frozenset(allowed)
