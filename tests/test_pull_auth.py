"""Authenticated pulls against the real registry: token auth, htpasswd, expiry, redirects.

- Token auth: the registry's ``auth: token`` config trusts JWTs from the test token server
  (``test_registry_real.JwtTokenServer``).
- A token that expires mid-pull: a transparent front before the registry revokes the
  first token once the first layer has been served (deterministic: no clock involved) and
  answers later uses of it with the registry's own 401 challenge.
- Redirects: a front answers blob GETs with 307 to a pre-signed URL on another port that
  works exactly once, as object storage behind a registry does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import shutil
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import test_registry_real
from aiohttp import web
from conftest import RegistryFactory, ServeApp
from servers import skopeo_copy
from test_pull_real import (
    assert_readable,
    cli_env,
    json_lines,
    resumer_cmd,
)
from test_registry_real import StartTokens

from resumer.config import Config
from resumer.engine import Engine
from resumer.lab.images import BuiltImage, LayerSpec, build_image, write_oci_layout

KiB = 1 << 10

#: The registry tests' token server fixture, shared.
token_server = test_registry_real.token_server


def build(work: Path, seed: int) -> BuiltImage:
    return build_image(
        work,
        (
            LayerSpec(size=512 * KiB, compressible=False),
            LayerSpec(size=512 * KiB, compression="zstd", compressible=False),
            LayerSpec(size=256 * KiB),
        ),
        seed=seed,
    )


def push(image: BuiltImage, host: str, repo: str, work: Path, *creds: str) -> None:
    layout = write_oci_layout(work / f"layout-{repo.replace('/', '-')}", image, "v1")
    skopeo_copy(f"oci:{layout}:v1", f"docker://{host}/{repo}:v1", "--preserve-digests", *creds)


def bcrypt_hash(password: str) -> str:
    """A cheap bcrypt hash (cost 4): the registry checks it on every request."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # removed in Python 3.13

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
        if hashed and hashed.startswith("$2"):
            return hashed
    except ImportError:
        pass
    if shutil.which("htpasswd"):
        out = subprocess.run(
            ["htpasswd", "-nbB", "-C", "4", "user", password],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return out.strip().partition(":")[2]
    pytest.skip("no bcrypt: neither the crypt module nor htpasswd (apache2-utils)")


def docker_config(tmp_path: Path, host: str, user: str, password: str) -> Path:
    conf = tmp_path / "docker-config"
    conf.mkdir(exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (conf / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return conf


async def run_cli_async(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """The CLI as a child, without blocking this loop (the token server runs on it)."""
    proc = await asyncio.create_subprocess_exec(
        *resumer_cmd(*args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# ---------------------------------------------------------------------- token auth


async def test_token_auth_pull_needs_the_credentials_from_docker_config(
    registry_factory: RegistryFactory, token_server: StartTokens, tmp_path: Path
) -> None:
    ts = await token_server(users={"alice": "s3cret"})
    registry = registry_factory(ts.registry_config())
    image = build(tmp_path / "b", seed=91)
    await asyncio.to_thread(
        push, image, registry.host, "lab/private", tmp_path, "--dest-creds", "alice:s3cret"
    )
    ref = f"{registry.host}/lab/private:v1"
    root = tmp_path / "root"
    args = ("pull", ref, "--root", str(root), "--progress", "json")

    code, out, err = await run_cli_async(*args, env=cli_env(tmp_path))
    assert code == 1, err
    assert "Traceback" not in err
    assert "access denied" in err or "refused" in err
    assert json_lines(out)[-1]["errorDetail"]["message"]

    conf = docker_config(tmp_path, registry.host, "alice", "s3cret")
    code, out, err = await run_cli_async(*args, env=cli_env(tmp_path, conf))
    assert code == 0, err
    assert ts.issued[-1]["subject"] == "alice"
    assert {"status": f"Status: Downloaded newer image for {ref}"} in json_lines(out)
    assert_readable(root, "v1", ref, tmp_path)
    # No secret at rest: neither the password nor any token issued.
    db = b"".join(p.read_bytes() for p in root.glob("state.db*"))
    assert b"s3cret" not in db
    assert b"alice:s3cret" not in out.encode() + err.encode()


async def test_htpasswd_basic_auth_pull_with_docker_config(
    registry_factory: RegistryFactory, tmp_path: Path
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"bob:{bcrypt_hash('pa ss')}\n")
    registry = registry_factory({"auth": {"htpasswd": {"realm": "lab", "path": str(htpasswd)}}})
    image = build(tmp_path / "b", seed=92)
    push(image, registry.host, "lab/basic", tmp_path, "--dest-creds", "bob:pa ss")
    ref = f"{registry.host}/lab/basic:v1"
    root = tmp_path / "root"

    code, _, err = await run_cli_async("pull", ref, "--root", str(root), env=cli_env(tmp_path))
    assert code == 1 and "Traceback" not in err
    assert "access denied" in err

    conf = docker_config(tmp_path, registry.host, "bob", "pa ss")
    code, out, err = await run_cli_async(
        "pull", ref, "--root", str(root), "--progress", "plain", env=cli_env(tmp_path, conf)
    )
    assert code == 0, err
    assert f"Status: Downloaded newer image for {ref}" in out
    assert_readable(root, "v1", ref, tmp_path)


# ---------------------------------------------------------------------- fronts


_FORWARDED = ("Authorization", "Accept", "Range", "If-Range", "Accept-Encoding")
_HOP = {"transfer-encoding", "connection", "keep-alive", "content-length"}


@dataclass
class Front:
    """A transparent HTTP front before the registry, recording what it saw."""

    upstream: str
    session: aiohttp.ClientSession
    seen: list[tuple[str, str, dict[str, str], int]] = field(default_factory=list)
    #: Authorization values that now get the registry's 401 challenge, as if expired
    revoked: set[str] = field(default_factory=set)
    #: once this blob has been served, its token is revoked
    revoke_after: str = ""
    challenge: str = ""
    url: str = ""

    def app(self, blob_handler: Any = None) -> web.Application:
        app = web.Application()
        if blob_handler is not None:
            app.router.add_get("/v2/{repo:.+}/blobs/{digest}", blob_handler)
        app.router.add_route("*", "/{path:.*}", self.forward)
        return app

    def _headers(self, request: web.Request) -> dict[str, str]:
        return {k: request.headers[k] for k in _FORWARDED if k in request.headers}

    async def forward(self, request: web.Request) -> web.StreamResponse:
        headers = self._headers(request)
        auth = headers.get("Authorization", "")
        is_blob = "/blobs/sha256:" in request.path and request.method == "GET"
        if auth and auth in self.revoked:
            self.seen.append((request.method, request.path, headers, 401))
            return web.Response(status=401, headers={"WWW-Authenticate": self.challenge})
        async with self.session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            allow_redirects=False,
            auto_decompress=False,
        ) as up:
            self.seen.append((request.method, request.path, headers, up.status))
            if up.status == 401:
                self.challenge = up.headers.get("WWW-Authenticate", self.challenge)
            resp = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in _HOP:
                    resp.headers[k] = v
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_chunked(64 * KiB):
                await resp.write(chunk)
            await resp.write_eof()
        served = up.status in (200, 206) and auth
        if is_blob and served and self.revoke_after and request.path.endswith(self.revoke_after):
            self.revoked.add(auth)
            self.revoke_after = ""
        return resp


async def test_token_expiring_mid_pull_is_refreshed_once_without_costing_an_attempt(
    registry_factory: RegistryFactory,
    token_server: StartTokens,
    serve_app: ServeApp,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ts = await token_server()
    registry = registry_factory(ts.registry_config())
    image = build(tmp_path / "b", seed=93)
    await asyncio.to_thread(push, image, registry.host, "lab/expiring", tmp_path)
    ts.issued.clear()
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nothing"))

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        front = Front(registry.url, session, revoke_after=image.layers[0].digest)
        front.url = await serve_app(front.app())
        ref = f"{front.url.removeprefix('http://')}/lab/expiring:v1"
        # One download at a time, one attempt per layer: a 401 that cost an attempt would
        # exhaust the budget of the second layer and fail the pull.
        config = Config(
            retry_delay=0, max_download_attempts=1, max_concurrent_downloads=1, stall_timeout=3
        )
        async with Engine.open(tmp_path / "root", config) as engine:
            outcome = await engine.pull(ref, dest=tmp_path / "oci")

    statuses = [s for (_, p, _, s) in front.seen if "/blobs/sha256:" in p]
    print(front.seen)
    assert statuses.count(401) == 1, front.seen
    assert len(ts.issued) == 2  # the first token, and the one refresh
    assert outcome.stats.attempts == len(image.layers)
    assert outcome.stats.wire_bytes == image.total_layer_bytes()
    assert_readable(tmp_path / "oci", "v1", ref, tmp_path)


@dataclass
class SignedStorage:
    """Pre-signed blob URLs on their own host:port, each good for exactly one GET."""

    registry: str
    registry_auth: str
    session: aiohttp.ClientSession
    issued: dict[str, tuple[str, str]] = field(default_factory=dict)  # sig → (repo, digest)
    used: set[str] = field(default_factory=set)
    requests: list[dict[str, str]] = field(default_factory=list)
    #: cut the first GET of this digest halfway
    cut_digest: str = ""
    url: str = ""

    def sign(self, repo: str, digest: str) -> str:
        sig = secrets.token_hex(16)
        self.issued[sig] = (repo, digest)
        return f"{self.url}/signed/{digest}?sig={sig}&once=1"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/signed/{digest}", self.get)
        return app

    async def get(self, request: web.Request) -> web.StreamResponse:
        sig = request.query.get("sig", "")
        self.requests.append({**request.headers, "sig": sig, "path": request.path})
        if sig not in self.issued or sig in self.used:
            return web.Response(status=403, text="signature expired")
        self.used.add(sig)
        repo, digest = self.issued[sig]
        headers = {"Authorization": self.registry_auth}
        if "Range" in request.headers:
            headers["Range"] = request.headers["Range"]
        async with self.session.get(
            f"{self.registry}/v2/{repo}/blobs/{digest}", headers=headers, auto_decompress=False
        ) as up:
            resp = web.StreamResponse(status=up.status)
            for k in ("Content-Range", "Content-Type", "ETag"):
                if k in up.headers:
                    resp.headers[k] = up.headers[k]
            assert up.content_length is not None
            resp.content_length = up.content_length
            await resp.prepare(request)
            sent = 0
            async for chunk in up.content.iter_chunked(64 * KiB):
                if digest == self.cut_digest and sent >= up.content_length // 2:
                    # The link drops mid-body: the next attempt must resume with Range.
                    self.cut_digest = ""
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write_eof()
            return resp


async def test_redirected_blobs_resume_with_range_on_a_fresh_url_and_no_secret_leaks(
    registry_factory: RegistryFactory,
    serve_app: ServeApp,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"carol:{bcrypt_hash('hunter2')}\n")
    registry = registry_factory({"auth": {"htpasswd": {"realm": "lab", "path": str(htpasswd)}}})
    image = build_image(tmp_path / "b", (LayerSpec(size=3 << 20, compressible=False),), seed=94)
    push(image, registry.host, "lab/signed", tmp_path, "--dest-creds", "carol:hunter2")
    basic = "Basic " + base64.b64encode(b"carol:hunter2").decode()

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        storage = SignedStorage(registry.url, basic, session, cut_digest=image.layers[0].digest)
        storage.url = await serve_app(storage.app())
        front = Front(registry.url, session)

        async def blob(request: web.Request) -> web.StreamResponse:
            # The registry checks the credentials (HEAD), then hands out a signed URL.
            headers = front._headers(request)
            headers.pop("Range", None)
            url = f"{registry.url}/v2/{request.match_info['repo']}/blobs/"
            async with session.head(url + request.match_info["digest"], headers=headers) as r:
                if r.status == 401:
                    challenge = r.headers.get("WWW-Authenticate", "")
                    return web.Response(status=401, headers={"WWW-Authenticate": challenge})
                assert r.status == 200, r.status
            location = storage.sign(request.match_info["repo"], request.match_info["digest"])
            return web.Response(status=307, headers={"Location": location})

        front.url = await serve_app(front.app(blob))
        host = front.url.removeprefix("http://")
        monkeypatch.setenv("DOCKER_CONFIG", str(docker_config(tmp_path, host, "carol", "hunter2")))
        ref = f"{host}/lab/signed:v1"
        root = tmp_path / "root"
        caplog.set_level(logging.DEBUG)
        async with Engine.open(root, Config(retry_delay=0)) as engine:
            outcome = await engine.pull(ref, dest=tmp_path / "oci")

    [layer] = image.layers
    assert outcome.stats.resumes == 1
    # The config blob is redirected too; the layer's GETs are the ones that matter here.
    config_gets = [r for r in storage.requests if r["path"].endswith(image.config_digest)]
    assert len(config_gets) == 1
    layer_gets = [r for r in storage.requests if r["path"].endswith(layer.digest)]
    assert len(layer_gets) == 2, [(r.get("Range"), r["sig"]) for r in layer_gets]
    first, second = layer_gets
    assert "Range" not in first
    # Resolved anew through the registry: a second signature, and the Range kept.
    assert first["sig"] != second["sig"]
    offset = int(second["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset < layer.size
    assert outcome.stats.wire_bytes == layer.size
    # Credentials are the registry's: never sent to the storage host.
    assert not any("Authorization" in r for r in storage.requests)
    # A used signature is dead, as pre-signed URLs with once=1 are.
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{storage.url}/signed/{layer.digest}?sig={first['sig']}") as r,
    ):
        assert r.status == 403
    # The signed query never reaches the database or the logs.
    # (The test servers' own access logs are left out: they are not resumer's.)
    logged = "\n".join(
        r.getMessage()
        for r in caplog.records
        if not r.name.startswith(("aiohttp.access", "aiohttp.server"))
    )
    assert "resumer.transfer" in {r.name for r in caplog.records}  # the attempts were logged
    db = b"".join(p.read_bytes() for p in root.glob("state.db*"))
    for sig in storage.issued:
        assert sig.encode() not in db
        assert sig not in logged
    assert b"hunter2" not in db and "hunter2" not in logged
    assert basic.encode() not in db and basic not in logged
    assert_readable(tmp_path / "oci", "v1", ref, tmp_path)
