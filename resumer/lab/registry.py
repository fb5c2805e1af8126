"""A small offline registry: the distribution API's read side, and pushes, on 127.0.0.1.

`OfflineRegistry` serves images that were pushed to it (``push_to_registry``, ``skopeo
copy … docker://127.0.0.1:PORT/…``) or added in-process with `OfflineRegistry.add_image`:

- ``GET/HEAD /v2/`` and ``GET /v2/_catalog``;
- ``GET/HEAD /v2/<name>/manifests/<tag|digest>`` with ``Content-Type`` (the manifest's
  media type), ``Docker-Content-Digest`` and an ``ETag``;
- ``GET/HEAD /v2/<name>/blobs/<digest>``, streamed from disk in 256 KiB pieces (memory does
  not grow with blob size), with single ``Range`` requests (``206`` + ``Content-Range``;
  ``416`` with ``Content-Range: bytes */N``), ``If-Range`` and ``If-None-Match`` against
  the ETag, which is the quoted digest as in the CNCF registry;
- ``GET /v2/<name>/tags/list``;
- uploads: ``POST /v2/<name>/blobs/uploads/`` (also monolithic ``?digest=`` and
  ``?mount=&from=``), ``PATCH`` and ``PUT ?digest=`` on the upload, and ``PUT`` manifests.

Everything lives on disk under one root, in the CNCF registry's spirit: ``blobs/sha256/``
holds the content (manifests too), and ``repositories/<name>/`` the tags, the manifest
revisions and the blob links that scope a blob to a repository. A registry restarted on
the same root serves the same images. No auth, no TLS, no deletes: it is a lab.

Run standalone (benchmarks, a terminal)::

    python -m resumer.lab.registry --root DIR [--port N]

It prints ``listening on 127.0.0.1:PORT`` once ready and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from aiohttp import web

from .images import BuiltImage, sha256_digest

__all__ = [
    "FromZeroResult",
    "OfflineRegistry",
    "RequestRecord",
    "main",
    "parse_range",
    "pull_from_zero",
]

#: Body pieces: one read from disk, one write to the socket.
PIECE = 256 * 1024
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
#: A manifest is refused beyond this size, as the CNCF registry does (4 MiB).
MAX_MANIFEST = 4 << 20

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_ROUTES = [
    ("tags", re.compile(r"(?P<name>.+)/tags/list")),
    ("manifests", re.compile(r"(?P<name>.+)/manifests/(?P<ref>[^/]+)")),
    ("uploads", re.compile(r"(?P<name>.+)/blobs/uploads/(?P<uuid>[^/]*)")),
    ("blobs", re.compile(r"(?P<name>.+)/blobs/(?P<digest>[^/]+)")),
]


class _Error(Exception):
    """A distribution-API error: status, code and message, rendered as its JSON body."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.detail = status, code, message, detail

    def response(self, head: bool) -> web.Response:
        body = json.dumps(
            {"errors": [{"code": self.code, "message": self.message, "detail": self.detail}]}
        ).encode()
        headers = {**API_VERSION, "Content-Type": "application/json"}
        if head:
            headers["Content-Length"] = str(len(body))
            return web.Response(status=self.status, headers=headers)
        return web.Response(status=self.status, body=body, headers=headers)


def _unknown(kind: str, what: str) -> _Error:
    return _Error(404, f"{kind}_UNKNOWN", f"{kind.lower().replace('_', ' ')} unknown", what)


@dataclass(frozen=True)
class RequestRecord:
    """One served request, for tests that want to see what a client asked for."""

    method: str
    path: str
    status: int
    range: str | None


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """The byte span ``(start, end_inclusive)`` a Range header asks of ``size`` bytes.

    ``None``: serve the whole body (no header, not bytes, several ranges, or garbage, which
    RFC 9110 lets a server ignore). ``"unsatisfiable"``: answer 416.
    """
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if not first:  # suffix: the last N bytes
            n = int(last)
            if n < 0:
                return None
            if n == 0 or size == 0:
                return "unsatisfiable"
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or (last and end < start):
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def _open_read(path: Path) -> BinaryIO:
    return path.open("rb")


def _open_append(path: Path) -> BinaryIO:
    return path.open("ab")


class OfflineRegistry:
    """The registry on 127.0.0.1; ``async with OfflineRegistry(root) as reg:`` then ``reg.url``.

    ``root`` holds the storage; without one, a temporary directory is made and removed on
    `close`. ``port`` 0 picks a free port.
    """

    def __init__(
        self, root: Path | str | None = None, *, port: int = 0, accept_pushes: bool = True
    ) -> None:
        self._own_root = root is None
        self.root = (
            Path(tempfile.mkdtemp(prefix="resumer-registry-")) if root is None else Path(root)
        )
        self.accept_pushes = accept_pushes
        self.port = port
        self.requests: list[RequestRecord] = []
        self._runner: web.AppRunner | None = None
        self._uploads: dict[str, Any] = {}  # uuid → running sha256 of the bytes so far
        for sub in ("blobs/sha256", "repositories", "uploads"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    async def start(self) -> str:
        """Listen; return the base URL."""
        app = web.Application(client_max_size=MAX_MANIFEST)
        app.router.add_route("*", "/v2/{tail:.*}", self._handle)
        app.router.add_route("*", "/v2", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._own_root:
            await asyncio.to_thread(shutil.rmtree, self.root, True)

    async def __aenter__(self) -> OfflineRegistry:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---- in-process content ------------------------------------------------------------

    def add_blob(self, repo: str, digest: str, content: bytes | Path) -> None:
        """Store a blob (hardlinked from a path when it can) and link it into ``repo``."""
        self._check_name(repo)
        dest = self._blob_path(digest)
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}")
            if isinstance(content, Path):
                try:
                    os.link(content, tmp)
                except OSError:
                    shutil.copyfile(content, tmp)
            else:
                tmp.write_bytes(content)
            os.replace(tmp, dest)
        self._link(repo, "_layers", digest)

    def add_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> str:
        """Store a manifest (or index) under its digest and, for a tag, the tag; → digest."""
        self._check_name(repo)
        digest = sha256_digest(body)
        self.add_blob(repo, digest, body)
        self._write(self._repo(repo) / "_manifests" / "revisions" / _hex(digest), media_type)
        if not _DIGEST.fullmatch(reference):
            if not _TAG.fullmatch(reference):
                raise ValueError(f"invalid tag {reference!r}")
            self._write(self._repo(repo) / "_manifests" / "tags" / reference, digest)
        elif reference != digest:
            raise ValueError(f"manifest digest is {digest}, not {reference}")
        return digest

    def add_image(self, repo: str, tag: str, image: BuiltImage) -> str:
        """Serve ``image`` as ``repo:tag`` (an index and its children too); → its digest."""
        for img in image.images():
            for layer in img.layers:
                self.add_blob(repo, layer.digest, layer.path)
            self.add_blob(repo, img.config_digest, img.config)
        if image.index is not None and image.index_media_type is not None:
            for img in image.children:
                self.add_manifest(repo, img.manifest_digest, img.manifest, img.manifest_media_type)
            return self.add_manifest(repo, tag, image.index, image.index_media_type)
        return self.add_manifest(repo, tag, image.manifest, image.manifest_media_type)

    def tags(self, repo: str) -> list[str]:
        d = self._repo(repo) / "_manifests" / "tags"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def repositories(self) -> list[str]:
        base = self.root / "repositories"
        return sorted(
            str(p.parent.relative_to(base)) for p in base.rglob("_manifests") if p.is_dir()
        )

    # ---- storage -----------------------------------------------------------------------

    def _blob_path(self, digest: str) -> Path:
        if not _DIGEST.fullmatch(digest):
            raise _Error(400, "DIGEST_INVALID", "only sha256:<64 hex> digests", digest)
        return self.root / "blobs" / "sha256" / _hex(digest)

    def _repo(self, name: str) -> Path:
        return self.root / "repositories" / name

    def _check_name(self, name: str) -> None:
        if not _NAME.fullmatch(name) or len(name) > 255:
            raise _Error(400, "NAME_INVALID", "invalid repository name", name)

    def _link(self, repo: str, kind: str, digest: str) -> None:
        link = self._repo(repo) / kind / _hex(digest)
        if not link.exists():
            self._write(link, digest)

    @staticmethod
    def _write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_text(text)
        os.replace(tmp, path)

    def _has_blob(self, repo: str, digest: str) -> bool:
        return (self._repo(repo) / "_layers" / _hex(digest)).exists() and self._blob_path(
            digest
        ).exists()

    def _manifest(self, repo: str, reference: str) -> tuple[str, str]:
        """(digest, media type) of a tag or digest in ``repo``; 404 if unknown."""
        if not (self._repo(repo) / "_manifests").is_dir():
            raise _unknown("NAME", repo)
        if _DIGEST.fullmatch(reference):
            digest = reference
        elif _TAG.fullmatch(reference):
            tag = self._repo(repo) / "_manifests" / "tags" / reference
            if not tag.exists():
                raise _unknown("MANIFEST", f"{repo}:{reference}")
            digest = tag.read_text().strip()
        else:
            raise _Error(400, "TAG_INVALID", "invalid tag or digest", reference)
        revision = self._repo(repo) / "_manifests" / "revisions" / _hex(digest)
        if not revision.exists():
            raise _unknown("MANIFEST", f"{repo}@{reference}")
        return digest, revision.read_text().strip()

    # ---- HTTP --------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        head = request.method == "HEAD"
        try:
            resp = await self._route(request)
        except _Error as exc:
            resp = exc.response(head)
        self.requests.append(
            RequestRecord(request.method, request.path, resp.status, request.headers.get("Range"))
        )
        return resp

    async def _route(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info.get("tail", "")
        method = request.method
        if tail == "":
            if method not in ("GET", "HEAD"):
                raise _Error(405, "UNSUPPORTED", "method not allowed")
            return _json({}, head=method == "HEAD")
        if tail == "_catalog" and method == "GET":
            return _json({"repositories": self.repositories()})
        for kind, pattern in _ROUTES:
            m = pattern.fullmatch(tail)
            if m is None:
                continue
            name = m.group("name")
            self._check_name(name)
            if kind == "tags" and method == "GET":
                if not (self._repo(name) / "_manifests").is_dir():
                    raise _unknown("NAME", name)
                return _json({"name": name, "tags": self.tags(name)})
            if kind == "manifests" and method in ("GET", "HEAD"):
                return await self._get_manifest(request, name, m.group("ref"))
            if kind == "manifests" and method == "PUT":
                return await self._put_manifest(request, name, m.group("ref"))
            if kind == "blobs" and method in ("GET", "HEAD"):
                return await self._get_blob(request, name, m.group("digest"))
            if kind == "uploads":
                return await self._upload(request, name, m.group("uuid"))
            break
        raise _Error(405 if tail else 404, "UNSUPPORTED", f"{method} /v2/{tail} is not served")

    async def _get_manifest(self, request: web.Request, name: str, ref: str) -> web.Response:
        digest, media_type = self._manifest(name, ref)
        body = self._blob_path(digest).read_bytes()
        etag = f'"{digest}"'
        headers = {
            **API_VERSION,
            "Content-Type": media_type,
            "Docker-Content-Digest": digest,
            "ETag": etag,
            "Content-Length": str(len(body)),
        }
        if _etag_in(request.headers.get("If-None-Match"), etag):
            del headers["Content-Length"]
            return web.Response(status=304, headers=headers)
        if request.method == "HEAD":
            return web.Response(headers=headers)
        del headers["Content-Length"]
        return web.Response(body=body, headers=headers)

    async def _get_blob(self, request: web.Request, name: str, digest: str) -> web.StreamResponse:
        path = self._blob_path(digest)
        if not self._has_blob(name, digest):
            raise _unknown("BLOB", digest)
        size = path.stat().st_size
        etag = f'"{digest}"'
        headers = {
            **API_VERSION,
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": digest,
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Cache-Control": "max-age=31536000",
        }
        if _etag_in(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers=headers)
        wanted = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if if_range is not None and if_range.strip() != etag:
            wanted = None  # the client's copy is of something else: send it all
        span = parse_range(wanted, size)
        if span == "unsatisfiable":
            headers["Content-Range"] = f"bytes */{size}"
            headers["Content-Length"] = "0"
            return web.Response(status=416, headers=headers)
        status, start, length = 200, 0, size
        if isinstance(span, tuple):
            status, start, length = 206, span[0], span[1] - span[0] + 1
            headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = length
        try:
            await resp.prepare(request)
            if request.method == "HEAD":
                return resp
            with _open_read(path) as f:
                f.seek(start)
                left = length
                while left:
                    piece = f.read(min(PIECE, left))
                    if not piece:  # the file shrank under us: end short, the client will see
                        break
                    left -= len(piece)
                    await resp.write(piece)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client (or the lab's proxy) cut the connection: nothing to answer
        return resp

    async def _put_manifest(self, request: web.Request, name: str, ref: str) -> web.Response:
        self._refuse_pushes()
        body = await request.read()
        if len(body) > MAX_MANIFEST:
            raise _Error(413, "MANIFEST_INVALID", "manifest too large")
        media_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise _Error(400, "MANIFEST_INVALID", "manifest is not JSON", str(exc)) from None
        if not isinstance(doc, dict):
            raise _Error(400, "MANIFEST_INVALID", "manifest is not a JSON object")
        media_type = media_type or str(doc.get("mediaType", ""))
        if not media_type:
            raise _Error(400, "MANIFEST_INVALID", "no media type (Content-Type or mediaType)")
        # Like the CNCF registry: everything a manifest names must be here first.
        for child in doc.get("manifests", []):
            self._manifest(name, str(child.get("digest", "")))
        for desc in [doc.get("config"), *doc.get("layers", [])]:
            if isinstance(desc, dict) and not self._has_blob(name, str(desc.get("digest"))):
                raise _Error(400, "MANIFEST_BLOB_UNKNOWN", "blob unknown", desc.get("digest"))
        try:
            digest = self.add_manifest(name, ref, body, media_type)
        except ValueError as exc:
            raise _Error(400, "MANIFEST_INVALID", str(exc)) from None
        return web.Response(
            status=201,
            headers={
                **API_VERSION,
                "Location": f"/v2/{name}/manifests/{digest}",
                "Docker-Content-Digest": digest,
            },
        )

    # ---- uploads -----------------------------------------------------------------------

    def _refuse_pushes(self) -> None:
        if not self.accept_pushes:
            raise _Error(405, "UNSUPPORTED", "this registry is read-only")

    async def _upload(self, request: web.Request, name: str, upload: str) -> web.Response:
        self._refuse_pushes()
        method = request.method
        if method == "POST" and not upload:
            mount, source = request.query.get("mount"), request.query.get("from")
            if mount and source and _DIGEST.fullmatch(mount) and self._has_blob(source, mount):
                self._link(name, "_layers", mount)
                return self._created(name, mount)
            upload = uuid.uuid4().hex
            self._uploads[upload] = hashlib.sha256()
            (self.root / "uploads" / upload).write_bytes(b"")
            digest = request.query.get("digest")
            if digest is not None:  # monolithic: the whole blob in the POST
                await self._append(request, upload)
                return self._finish(name, upload, digest)
            return self._accepted(name, upload)
        if upload not in self._uploads:
            raise _unknown("BLOB_UPLOAD", upload)
        if method == "PATCH":
            await self._append(request, upload)
            return self._accepted(name, upload)
        if method == "PUT":
            digest = request.query.get("digest")
            if digest is None:
                raise _Error(400, "DIGEST_INVALID", "PUT needs ?digest=")
            await self._append(request, upload)
            return self._finish(name, upload, digest)
        if method == "GET":
            resp = self._accepted(name, upload)
            resp.set_status(204)
            return resp
        if method == "DELETE":
            self._drop_upload(upload)
            return web.Response(status=204, headers=API_VERSION)
        raise _Error(405, "UNSUPPORTED", f"{method} on an upload")

    async def _append(self, request: web.Request, upload: str) -> None:
        h = self._uploads[upload]
        with _open_append(self.root / "uploads" / upload) as f:
            async for piece in request.content.iter_chunked(PIECE):
                h.update(piece)
                f.write(piece)

    def _finish(self, name: str, upload: str, digest: str) -> web.Response:
        path = self.root / "uploads" / upload
        actual = "sha256:" + self._uploads[upload].hexdigest()
        if digest != actual:
            self._drop_upload(upload)
            raise _Error(400, "DIGEST_INVALID", "digest does not match the content", actual)
        dest = self._blob_path(digest)
        if dest.exists():
            path.unlink()
        else:
            os.replace(path, dest)
        del self._uploads[upload]
        self._link(name, "_layers", digest)
        return self._created(name, digest)

    def _drop_upload(self, upload: str) -> None:
        self._uploads.pop(upload, None)
        with contextlib.suppress(FileNotFoundError):
            (self.root / "uploads" / upload).unlink()

    def _accepted(self, name: str, upload: str) -> web.Response:
        size = (self.root / "uploads" / upload).stat().st_size
        return web.Response(
            status=202,
            headers={
                **API_VERSION,
                "Location": f"/v2/{name}/blobs/uploads/{upload}",
                "Docker-Upload-UUID": upload,
                "Range": f"0-{max(0, size - 1)}",
                "Content-Length": "0",
            },
        )

    @staticmethod
    def _created(name: str, digest: str) -> web.Response:
        return web.Response(
            status=201,
            headers={
                **API_VERSION,
                "Location": f"/v2/{name}/blobs/{digest}",
                "Docker-Content-Digest": digest,
                "Content-Length": "0",
            },
        )


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


def _etag_in(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def _json(doc: dict[str, Any], *, head: bool = False) -> web.Response:
    body = json.dumps(doc).encode()
    headers = {**API_VERSION, "Content-Type": "application/json"}
    if head:
        headers["Content-Length"] = str(len(body))
        return web.Response(headers=headers)
    return web.Response(body=body, headers=headers)


# --------------------------------------------------------------------------- from zero


@dataclass
class FromZeroResult:
    """What a client that throws partials away achieved: the baseline resumer is held to."""

    complete: bool
    blobs_done: int  # config and layers that arrived whole and verified
    blobs: int
    attempts: int
    body_bytes: int  # body bytes received, kept or thrown away


async def pull_from_zero(
    base_url: str,
    repo: str,
    reference: str,
    *,
    attempts: int = 5,
    concurrency: int = 3,
) -> FromZeroResult:
    """Pull a single-platform image the way ``curl --retry`` fetches a file, into nothing.

    Every attempt at a blob is a new connection and a plain GET from byte zero; a cut
    attempt's bytes are thrown away. Each blob gets ``attempts`` attempts (the manifest
    too), ``concurrency`` blobs move at once, and there is no delay between attempts. The
    bytes are only counted and verified, never stored. Used by ``resumer demo`` to
    *measure* what restarting from zero costs on the same seeded link.
    """
    import aiohttp

    base = base_url.rstrip("/")
    accept = ", ".join(
        [
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        ]
    )
    result = FromZeroResult(False, 0, 0, 0, 0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=connector, auto_decompress=False
    ) as session:

        async def get(path: str, digest: str | None, headers: dict[str, str]) -> bytes | None:
            for _ in range(attempts):
                result.attempts += 1
                h = hashlib.sha256()
                body = bytearray() if digest is None else None
                try:
                    async with session.get(base + path, headers=headers) as r:
                        if r.status != 200:
                            continue
                        async for piece in r.content.iter_chunked(PIECE):
                            result.body_bytes += len(piece)
                            h.update(piece)
                            if body is not None:
                                body += piece
                except (TimeoutError, aiohttp.ClientError, OSError):
                    continue
                if digest is None or "sha256:" + h.hexdigest() == digest:
                    return bytes(body) if body is not None else b""
            return None

        raw = await get(f"/v2/{repo}/manifests/{reference}", None, {"Accept": accept})
        if raw is None:
            return result
        manifest = json.loads(raw)
        wanted = [manifest["config"]["digest"]] + [d["digest"] for d in manifest["layers"]]
        result.blobs = len(wanted)
        gate = asyncio.Semaphore(concurrency)

        async def blob(digest: str) -> None:
            async with gate:
                if await get(f"/v2/{repo}/blobs/{digest}", digest, {}) is not None:
                    result.blobs_done += 1

        await asyncio.gather(*(blob(d) for d in wanted))
    result.complete = result.blobs_done == result.blobs
    return result


# --------------------------------------------------------------------------- standalone


async def _serve(root: Path, port: int) -> None:
    async with OfflineRegistry(root, port=port) as reg:
        print(f"listening on {reg.host}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m resumer.lab.registry", description=__doc__)
    p.add_argument("--root", type=Path, required=True, help="storage directory")
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    args = p.parse_args(argv)
    asyncio.run(_serve(args.root, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
