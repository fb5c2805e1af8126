"""RegistryClient against the real CNCF distribution registry (Debian docker-registry).

Images are built by ``resumer.lab.images`` and pushed with skopeo; the registry runs with
token auth (JWTs from a token server written here), htpasswd auth, and as a pull-through
cache mirror of another registry.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import shutil
import subprocess
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import PushImage, RegistryFactory, ServeApp, require
from servers import SKOPEO_BIN, Registry, skopeo_copy

from resumer.clock import FakeClock
from resumer.config import Config
from resumer.errors import AccessDeniedError, PlatformNotFoundError
from resumer.lab.images import (
    LayerSpec,
    build_image,
    push_to_registry,
    write_oci_layout,
)
from resumer.registry import RegistryClient, ResolvedImage

cryptography = pytest.importorskip("cryptography")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


@pytest.fixture
def make_client(session: aiohttp.ClientSession, tmp_path: Path) -> Callable[..., RegistryClient]:
    empty = tmp_path / "no-docker-config"
    empty.mkdir()

    def make(config: Config | None = None, **kwargs: Any) -> RegistryClient:
        kwargs.setdefault("docker_config_dir", empty)
        return RegistryClient(session, config or Config(), clock=FakeClock(), **kwargs)

    return make


async def blob_bytes(client: RegistryClient, ref: str, digest: str) -> bytes:
    """GET a blob through the first endpoint of its Source, as fetch.py would."""
    [endpoint, *_] = await client.blob_source(ref, digest).endpoints()
    async with client._session.get(endpoint.url, headers=endpoint.headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


def assert_matches(resolved: ResolvedImage, image: Any) -> None:
    assert resolved.manifest == image.manifest
    assert resolved.manifest_digest == image.manifest_digest
    assert resolved.manifest_media_type == image.manifest_media_type
    assert resolved.config == image.config
    assert resolved.config_digest == image.config_digest
    assert [(x.digest, x.size, x.media_type) for x in resolved.layers] == [
        (x.digest, x.size, x.media_type) for x in image.layers
    ]
    assert list(resolved.diff_ids) == [x.diff_id for x in image.layers]


# ---- plain registry -------------------------------------------------------------------


async def test_resolves_an_oci_image_with_gzip_and_zstd_layers(
    pushed_image: PushImage, make_client: Callable[..., RegistryClient]
) -> None:
    pushed = pushed_image(
        layers=(LayerSpec(), LayerSpec(compression="zstd"), LayerSpec(compression="none"))
    )
    client = make_client()
    resolved = await client.resolve(pushed.reference)

    assert_matches(resolved, pushed.image)
    assert {x.media_type.rpartition("+")[2] for x in resolved.layers} >= {"gzip", "zstd"}
    # The real registry serves an OCI manifest only to a client that Accepts it.
    layer = pushed.image.layers[1]
    assert await blob_bytes(client, pushed.reference, layer.digest) == layer.read_bytes()


async def test_resolves_a_docker_schema2_image_without_schema1_conversion(
    registry: Registry, make_client: Callable[..., RegistryClient], tmp_path: Path
) -> None:
    # Pushed through the HTTP API: skopeo's oci: transport does not find Docker-typed
    # manifests in an OCI layout ("no descriptor found for reference").
    image = build_image(tmp_path, (LayerSpec(), LayerSpec()), flavour="docker")
    await push_to_registry(registry.url, "lab/docker", "v1", image)
    resolved = await make_client().resolve(f"{registry.host}/lab/docker:v1")
    assert resolved.manifest_media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert_matches(resolved, image)


async def test_resolves_each_platform_of_a_multiplatform_index(
    pushed_image: PushImage, make_client: Callable[..., RegistryClient]
) -> None:
    pushed = pushed_image(repo="lab/multi", multiplatform=True)
    client = make_client()
    for child in pushed.image.children:
        resolved = await client.resolve(pushed.reference, platform=str(child.platform))
        assert resolved.index == pushed.image.index
        assert resolved.index_digest == pushed.image.index_digest
        assert resolved.digest == pushed.image.digest
        assert resolved.platform == str(child.platform)
        assert_matches(resolved, child)
    pinned = f"{pushed.registry.host}/lab/multi@{pushed.image.index_digest}"
    assert (await client.resolve(pinned, platform="linux/arm64")).platform == "linux/arm64/v8"

    with pytest.raises(PlatformNotFoundError, match="linux/amd64, linux/arm64/v8"):
        await client.resolve(pushed.reference, platform="linux/riscv64")


# ---- token auth -------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class JwtTokenServer:
    """Issues RS256 JWTs the registry trusts: the signing cert is its rootcertbundle.

    Grants every action asked for in ``scope``, to anyone, unless ``users`` is set: then
    only requests with one of those Basic credentials get any access.
    """

    workdir: Path
    service: str = "resumer-test-registry"
    issuer: str = "resumer-test-issuer"
    users: Mapping[str, str] = field(default_factory=dict)
    expires_in: int = 300
    issued: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "resumer test token signer")])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = self.workdir / "token-ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.app = web.Application()
        self.app.router.add_get("/token", self._token)

    def registry_config(self) -> dict[str, Any]:
        return {
            "auth": {
                "token": {
                    "realm": f"{self.url}/token",
                    "service": self.service,
                    "issuer": self.issuer,
                    "rootcertbundle": str(self.bundle),
                }
            }
        }

    def _jwt(self, subject: str, access: list[dict[str, Any]]) -> str:
        der = self.cert.public_bytes(serialization.Encoding.DER)
        # x5c: the registry checks the chain against rootcertbundle, then the signature.
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    async def _token(self, request: web.Request) -> web.Response:
        subject = ""
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(user) != password:
                return web.Response(status=401)
            subject = user
        access: list[dict[str, Any]] = []
        if subject or not self.users:
            for scope in request.query.getall("scope", []):
                kind, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        self.issued.append({"subject": subject, "access": access, "query": dict(request.query)})
        token = self._jwt(subject, access)
        return web.json_response({"token": token, "expires_in": self.expires_in})


StartTokens = Callable[..., Awaitable[JwtTokenServer]]


@pytest.fixture
def token_server(tmp_path: Path, serve_app: ServeApp) -> StartTokens:
    """``await token_server(**kwargs) -> JwtTokenServer``, listening until the test ends."""
    started = 0

    async def start(**kwargs: Any) -> JwtTokenServer:
        nonlocal started
        workdir = tmp_path / f"tokens{started}"
        started += 1
        workdir.mkdir()
        ts = JwtTokenServer(workdir, **kwargs)
        ts.url = await serve_app(ts.app)
        return ts

    return start


def push(registry_host: str, repo: str, tag: str, workdir: Path, *extra: str) -> Any:
    require(SKOPEO_BIN)
    image = build_image(workdir / "build", (LayerSpec(), LayerSpec(compression="zstd")), seed=7)
    layout = write_oci_layout(workdir / "layout", image, tag)
    skopeo_copy(f"oci:{layout}:{tag}", f"docker://{registry_host}/{repo}:{tag}", *extra)
    return image


async def test_anonymous_token_auth_against_the_real_registry(
    registry_factory: RegistryFactory,
    token_server: StartTokens,
    make_client: Callable[..., RegistryClient],
    tmp_path: Path,
) -> None:
    tokens = await token_server()
    registry = registry_factory(tokens.registry_config())
    # In a thread: skopeo talks to the token server, which runs on this event loop.
    image = await asyncio.to_thread(push, registry.host, "lab/secured", "v1", tmp_path)
    tokens.issued.clear()

    client = make_client()
    ref = f"{registry.host}/lab/secured:v1"
    resolved = await client.resolve(ref)
    assert_matches(resolved, image)
    # One token, asked for with the registry's realm, service and a pull scope.
    [grant] = tokens.issued
    assert grant["query"] == {
        "service": "resumer-test-registry",
        "scope": "repository:lab/secured:pull",
    }
    layer = image.layers[0]
    assert await blob_bytes(client, ref, layer.digest) == layer.read_bytes()
    assert len(tokens.issued) == 1  # the cached token serves the blob too


async def test_credentialed_token_auth_uses_docker_config(
    registry_factory: RegistryFactory,
    token_server: StartTokens,
    make_client: Callable[..., RegistryClient],
    tmp_path: Path,
) -> None:
    tokens = await token_server(users={"alice": "s3cret"})
    registry = registry_factory(tokens.registry_config())
    image = await asyncio.to_thread(
        push, registry.host, "lab/private", "v1", tmp_path, "--dest-creds", "alice:s3cret"
    )
    ref = f"{registry.host}/lab/private:v1"

    # Anonymous: the token carries no access, the registry refuses it after one refresh.
    with pytest.raises(AccessDeniedError):
        await make_client().resolve(ref)

    conf = tmp_path / "docker"
    conf.mkdir()
    auth = base64.b64encode(b"alice:s3cret").decode()
    (conf / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
    resolved = await make_client(docker_config_dir=conf).resolve(ref)
    assert_matches(resolved, image)
    assert tokens.issued[-1]["subject"] == "alice"


# ---- htpasswd (Basic) -------------------------------------------------------------------


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash, as the registry's htpasswd requires: from libcrypt or htpasswd -B."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # removed in Python 3.13

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
        if hashed and hashed.startswith("$2"):
            return hashed
    except ImportError:
        pass
    if shutil.which("htpasswd"):
        out = subprocess.run(
            ["htpasswd", "-nbB", "user", password], capture_output=True, text=True, check=True
        ).stdout
        return out.strip().partition(":")[2]
    pytest.skip("no bcrypt: neither the crypt module nor htpasswd (apache2-utils)")


async def test_htpasswd_basic_auth_against_the_real_registry(
    registry_factory: RegistryFactory,
    make_client: Callable[..., RegistryClient],
    tmp_path: Path,
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"bob:{bcrypt_hash('pa:ss word')}\n")
    registry = registry_factory({"auth": {"htpasswd": {"realm": "lab", "path": str(htpasswd)}}})
    image = push(registry.host, "lab/basic", "v1", tmp_path, "--dest-creds", "bob:pa:ss word")
    ref = f"{registry.host}/lab/basic:v1"

    with pytest.raises(AccessDeniedError):
        await make_client().resolve(ref)

    conf = tmp_path / "docker"
    conf.mkdir()
    auth = base64.b64encode(b"bob:pa:ss word").decode()
    (conf / "config.json").write_text(
        json.dumps({"auths": {f"http://{registry.host}": {"auth": auth}}})
    )
    client = make_client(docker_config_dir=conf)
    resolved = await client.resolve(ref)
    assert_matches(resolved, image)
    layer = image.layers[1]
    assert await blob_bytes(client, ref, layer.digest) == layer.read_bytes()


# ---- pull-through cache mirror ----------------------------------------------------------


async def test_resolves_through_a_pull_through_cache_mirror_then_the_origin(
    registry_factory: RegistryFactory,
    pushed_image: PushImage,
    make_client: Callable[..., RegistryClient],
) -> None:
    pushed = pushed_image(repo="library/app", multiplatform=True)
    origin = pushed.registry
    mirror = registry_factory({"proxy": {"remoteurl": origin.url}})
    # The origin stands in for Docker Hub: mirrors only apply to docker.io images.
    client = make_client(
        Config(registry_mirrors=(mirror.url,)),
        endpoint_overrides={"docker.io": origin.url},
    )
    child = pushed.image.children[1]

    resolved = await client.resolve("app:v1", platform=str(child.platform))
    assert resolved.served_by == mirror.url
    assert resolved.index_digest == pushed.image.index_digest
    assert_matches(resolved, child)
    source = client.blob_source("app:v1", child.layers[0].digest)
    endpoints = await source.endpoints()
    assert [e.host for e in endpoints] == [mirror.host, origin.host]
    assert await blob_bytes(client, "app:v1", child.layers[0].digest) == (
        child.layers[0].read_bytes()
    )

    # The mirror goes away: resolution falls back to the origin at once.
    mirror.stop()
    again = await client.resolve("app:v1", platform=str(child.platform))
    assert again.served_by == origin.url
    assert again.manifest == resolved.manifest
    # A transfer loop that failed on the mirror demotes it for every layer.
    source.note_failure(endpoints[0])
    assert [e.host for e in await source.endpoints()] == [origin.host, mirror.host]
