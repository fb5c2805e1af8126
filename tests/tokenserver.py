"""A small fake distribution registry plus token server, on aiohttp, for client tests.

One ``web.Application`` serves both the registry API (``/v2/…``) and the token realm
(``/token``), so a test needs one port. Every request is recorded, so tests can assert
what the client sent. Tokens are opaque strings; ``revoke_tokens()`` makes the registry
answer 401 to every token issued so far, which is how a test simulates expiry.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class FakeImage:
    manifest: bytes
    config: bytes
    layers: list[bytes]
    platform: tuple[str, str, str]

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)


def make_image(
    n_layers: int = 2,
    *,
    os: str = "linux",
    arch: str = "amd64",
    variant: str = "",
    seed: str = "x",
    manifest_type: str = OCI_MANIFEST,
) -> FakeImage:
    layers = [f"layer {seed} {i}".encode() * 100 for i in range(n_layers)]
    config_doc: dict[str, Any] = {
        "os": os,
        "architecture": arch,
        "rootfs": {"type": "layers", "diff_ids": [digest_of(b"diff" + x) for x in layers]},
    }
    if variant:
        config_doc["variant"] = variant
    config = dumps(config_doc)
    manifest = dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": digest_of(x), "size": len(x)}
                for x in layers
            ],
        }
    )
    return FakeImage(manifest, config, layers, (os, arch, variant))


def make_index(images: list[FakeImage]) -> bytes:
    entries = []
    for img in images:
        plat = {"os": img.platform[0], "architecture": img.platform[1]}
        if img.platform[2]:
            plat["variant"] = img.platform[2]
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": img.digest,
                "size": len(img.manifest),
                "platform": plat,
            }
        )
    return dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})


@dataclass
class Recorded:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    form: Mapping[str, str] = field(default_factory=dict)


class FakeRegistry:
    """The registry API and a token realm. ``auth``: None, "bearer" or "basic"."""

    def __init__(
        self,
        *,
        auth: str | None = None,
        users: Mapping[str, str] | None = None,
        expires_in: int | None = 300,
        service: str = "fake-registry",
        refresh_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.auth = auth
        self.users = dict(users or {})
        self.expires_in = expires_in
        self.service = service
        #: identity token → user, for the OAuth2 refresh_token grant
        self.refresh_tokens = dict(refresh_tokens or {})
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[Recorded] = []
        self.token_requests: list[Recorded] = []
        self.valid_tokens: set[str] = set()
        self.issued = 0
        #: path → list of statuses to answer before serving normally
        self.failures: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.wrong_content_digest = False
        self.refuse_tokens = False
        self.base_url = ""  # set by the test once the server listens
        self.app = web.Application()
        self.app.router.add_get("/token", self._token)
        self.app.router.add_post("/token", self._token)
        self.app.router.add_get("/v2/{name:.+}/manifests/{ref}", self._manifest)
        self.app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)

    # ---- content ----------------------------------------------------------------------

    def put_image(self, repo: str, tag: str, image: FakeImage) -> None:
        media_type = json.loads(image.manifest)["mediaType"]
        self.manifests[(repo, tag)] = (image.manifest, media_type)
        self.manifests[(repo, image.digest)] = (image.manifest, media_type)
        self.blobs[digest_of(image.config)] = image.config
        for layer in image.layers:
            self.blobs[digest_of(layer)] = layer

    def put_index(self, repo: str, tag: str, images: list[FakeImage]) -> bytes:
        index = make_index(images)
        for img in images:
            self.put_image(repo, img.digest, img)
        self.manifests[(repo, tag)] = (index, OCI_INDEX)
        self.manifests[(repo, digest_of(index))] = (index, OCI_INDEX)
        return index

    def put_raw_manifest(self, repo: str, tag: str, body: bytes, media_type: str) -> None:
        self.manifests[(repo, tag)] = (body, media_type)

    def revoke_tokens(self) -> None:
        self.valid_tokens.clear()

    # ---- handlers -----------------------------------------------------------------------

    def _record(self, request: web.Request, form: Mapping[str, str] | None = None) -> Recorded:
        return Recorded(
            request.method, request.path, dict(request.query), dict(request.headers), form or {}
        )

    def _challenge(self, name: str) -> str:
        if self.auth == "basic":
            return 'Basic realm="fake"'
        return (
            f'Bearer realm="{self.base_url}/token",service="{self.service}",'
            f'scope="repository:{name}:pull"'
        )

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if self.auth is None:
            return True
        if self.auth == "basic":
            return header in {_basic(u, p) for u, p in self.users.items()}
        return header.startswith("Bearer ") and header[7:] in self.valid_tokens

    def _gate(self, request: web.Request) -> web.Response | None:
        scripted = self.failures.get(request.path)
        if scripted:
            status, headers = scripted.pop(0)
            return web.Response(status=status, headers=headers)
        if not self._authorized(request):
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401,
                headers={"WWW-Authenticate": self._challenge(request.match_info["name"])},
            )
        return None

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(self._record(request))
        gate = self._gate(request)
        if gate is not None:
            return gate
        key = (request.match_info["name"], request.match_info["ref"])
        if key not in self.manifests:
            return web.json_response(
                {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]},
                status=404,
            )
        body, media_type = self.manifests[key]
        digest = "sha256:" + "0" * 64 if self.wrong_content_digest else digest_of(body)
        return web.Response(
            body=body, headers={"Content-Type": media_type, "Docker-Content-Digest": digest}
        )

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(self._record(request))
        gate = self._gate(request)
        if gate is not None:
            return gate
        digest = request.match_info["digest"]
        if digest not in self.blobs:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        return web.Response(body=self.blobs[digest])

    async def _token(self, request: web.Request) -> web.StreamResponse:
        form = dict(await request.post()) if request.method == "POST" else {}
        self.token_requests.append(self._record(request, {k: str(v) for k, v in form.items()}))
        if self.refuse_tokens:
            return web.Response(status=401)
        header = request.headers.get("Authorization")
        if request.method == "POST":
            if form.get("refresh_token") not in self.refresh_tokens:
                return web.Response(status=401)
        elif header is not None and header not in {_basic(u, p) for u, p in self.users.items()}:
            return web.Response(status=401)
        self.issued += 1
        token = f"secret-token-{self.issued}"
        self.valid_tokens.add(token)
        doc: dict[str, Any] = {"token": token}
        if self.expires_in is not None:
            doc["expires_in"] = self.expires_in
        if request.method == "POST":
            doc = {"access_token": token, "expires_in": self.expires_in}
        return web.json_response(doc)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
