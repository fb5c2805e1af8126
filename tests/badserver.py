"""A scripted blob server (aiohttp) for misbehaviour no real server shows on demand.

Each request consumes the next ``Behaviour`` from ``script`` (honest once it is empty):
cuts mid-body, stalls, ignoring Range, lying in Content-Range, error statuses,
over-long bodies, short 416 bodies and redirects.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(frozen=True)
class Behaviour:
    # honest|cut|stall|ignore-range|wrong-range|status|overlong|short-416|redirect
    kind: str = "honest"
    after: int = 0  # cut/stall: body bytes sent before it happens
    status: int = 0
    retry_after: str | None = None
    extra: bytes = b""
    location: str = ""


HONEST = Behaviour()


def cut(after: int) -> Behaviour:
    return Behaviour("cut", after=after)


def stall(after: int) -> Behaviour:
    return Behaviour("stall", after=after)


def status(code: int, retry_after: str | None = None) -> Behaviour:
    return Behaviour("status", status=code, retry_after=retry_after)


@dataclass
class Logged:
    path: str
    headers: dict[str, str]
    status: int
    body_bytes: int
    behaviour: str


@dataclass
class BlobServer:
    blobs: dict[str, bytes]
    script: list[Behaviour] = field(default_factory=list)
    etag: str | None = '"v1"'
    requests: list[Logged] = field(default_factory=list)
    bytes_served: int = 0
    #: requests that reached the handler, finished or not (``requests`` logs the finished)
    reached: int = 0
    url: str = ""

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._stalls: list[asyncio.Event] = []

    def digest(self, name: str) -> str:
        return "sha256:" + hashlib.sha256(self.blobs[name]).hexdigest()

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/{name:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    async def close(self) -> None:
        for ev in self._stalls:
            ev.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> BlobServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.reached += 1
        name = request.match_info["name"]
        b = self.script.pop(0) if self.script else HONEST
        headers = dict(request.headers)
        data = self.blobs.get(name)
        if b.kind == "redirect":
            self.requests.append(Logged(name, headers, 307, 0, b.kind))
            raise web.HTTPTemporaryRedirect(b.location)
        if data is None:
            self.requests.append(Logged(name, headers, 404, 0, b.kind))
            return web.Response(status=404)
        if b.kind == "status":
            extra = {"Retry-After": b.retry_after} if b.retry_after else {}
            if b.status == 401:
                extra["WWW-Authenticate"] = 'Bearer realm="x"'
            self.requests.append(Logged(name, headers, b.status, 0, b.kind))
            return web.Response(status=b.status, headers=extra)
        start, end = 0, None if data is None else len(data)
        rng = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        honour = rng is not None and b.kind != "ignore-range"
        if honour and if_range is not None and if_range != self.etag:
            honour = False
        if honour:
            # bytes=A- or bytes=A-B (inclusive), one range: what resumer sends
            assert rng is not None and rng.startswith("bytes=") and "," not in rng, rng
            first, _, last = rng[6:].partition("-")
            start = int(first)
            end = min(len(data), int(last) + 1) if last else len(data)
        if honour and start >= len(data):
            self.requests.append(Logged(name, headers, 416, 0, b.kind))
            resp = web.StreamResponse(
                status=416,
                headers={"Content-Range": f"bytes */{len(data)}", "Content-Length": "100"},
            )
            if b.kind == "short-416":
                # Like the CNCF registry: a Content-Length it never sends in full.
                await resp.prepare(request)
                await resp.write(b"short")
                return resp
            resp.content_length = 0
            resp.headers["Content-Length"] = "0"
            return resp
        body = data[start:end] + b.extra
        st = 206 if honour else 200
        resp = web.StreamResponse(status=st)
        if self.etag:
            resp.headers["ETag"] = self.etag
        if honour:
            first = start + 7 if b.kind == "wrong-range" else start
            resp.headers["Content-Range"] = f"bytes {first}-{(end or 0) - 1}/{len(data)}"
        resp.content_length = len(body)
        await resp.prepare(request)
        limit = len(body)
        if b.kind in ("cut", "stall"):
            limit = min(limit, b.after)
        sent = 0
        step = 64 * 1024
        while sent < limit:
            piece = body[sent : min(limit, sent + step)]
            await resp.write(piece)
            sent += len(piece)
            self.bytes_served += len(piece)
        self.requests.append(Logged(name, headers, st, sent, b.kind))
        if b.kind == "cut" and sent < len(body):
            assert request.transport is not None
            # close() flushes what was written, then ends the connection early: the client
            # gets exactly `after` bytes (abort() would drop buffered bytes unpredictably).
            request.transport.close()
            return resp
        if b.kind == "stall" and sent < len(body):
            ev = asyncio.Event()
            self._stalls.append(ev)
            await ev.wait()  # hold the connection open, send nothing
        return resp
