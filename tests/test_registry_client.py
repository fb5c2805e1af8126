"""RegistryClient against small aiohttp servers: manifests, platforms, auth, mirrors, errors."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ServeApp
from tokenserver import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    FakeImage,
    FakeRegistry,
    digest_of,
    dumps,
    make_image,
)

from resumer.clock import FakeClock
from resumer.config import Config
from resumer.errors import (
    AccessDeniedError,
    BudgetExhaustedError,
    ConnectionCutError,
    DigestMismatchError,
    NotFoundError,
    PlatformNotFoundError,
    RegistryError,
    ServerError,
)
from resumer.registry import (
    DEMOTION_SECONDS,
    MANIFEST_ACCEPT,
    RegistryBlobSource,
    RegistryClient,
    host_platform_default,
    parse_challenges,
    parse_reference,
)

Serve = Callable[[FakeRegistry], Awaitable[str]]
ServeImage = Callable[..., Awaitable[tuple[FakeRegistry, str, FakeImage]]]


@pytest.fixture
def serve(serve_app: ServeApp) -> Serve:
    """``await serve(fake) -> "127.0.0.1:PORT"``: the fake listens until the test ends."""

    async def start(fake: FakeRegistry) -> str:
        fake.base_url = await serve_app(fake.app)
        return fake.base_url.removeprefix("http://")

    return start


@pytest.fixture
def serve_image(serve: Serve) -> ServeImage:
    """``await serve_image(img=None, **fake_kwargs) -> (fake, host, img)``.

    A served ``FakeRegistry(**fake_kwargs)`` holding ``img`` (``make_image()`` unless given)
    as ``app:v1``.
    """

    async def start(
        img: FakeImage | None = None, **kwargs: Any
    ) -> tuple[FakeRegistry, str, FakeImage]:
        fake = FakeRegistry(**kwargs)
        host = await serve(fake)
        img = img or make_image()
        fake.put_image("app", "v1", img)
        return fake, host, img

    return start


async def resolved_source(client: RegistryClient, host: str, digest: str) -> RegistryBlobSource:
    """The blob source for ``digest`` of ``host``'s app:v1, once the client resolved it."""
    await client.resolve(f"{host}/app:v1")
    return client.blob_source(f"{host}/app:v1", digest)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def docker_config(tmp_path: Path) -> Path:
    """An empty DOCKER_CONFIG directory, so the host's ~/.docker never leaks in."""
    d = tmp_path / "docker-config"
    d.mkdir()
    return d


@pytest.fixture
def make_client(
    session: aiohttp.ClientSession, clock: FakeClock, docker_config: Path
) -> Callable[..., RegistryClient]:
    def make(config: Config | None = None, **kwargs: Any) -> RegistryClient:
        kwargs.setdefault("docker_config_dir", docker_config)
        return RegistryClient(session, config or Config(), clock=clock, **kwargs)

    return make


def write_docker_config(directory: Path, auths: dict[str, Any]) -> None:
    (directory / "config.json").write_text(json.dumps({"auths": auths}))


# ---- manifests ------------------------------------------------------------------------


async def test_resolve_sends_accept_for_all_four_manifest_types(
    serve: Serve, make_client: Callable[..., RegistryClient]
) -> None:
    fake = FakeRegistry()
    host = await serve(fake)
    img = make_image(3)
    fake.put_image("team/app", "v1", img)

    resolved = await make_client().resolve(f"{host}/team/app:v1")

    accept = fake.requests[0].headers["Accept"]
    for media_type in (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ):
        assert media_type in accept
    assert accept == MANIFEST_ACCEPT
    assert resolved.manifest == img.manifest
    assert resolved.manifest_digest == img.digest
    assert resolved.digest == img.digest
    assert resolved.index is None
    assert resolved.config == img.config
    assert resolved.config_digest == digest_of(img.config)
    assert [(x.digest, x.size) for x in resolved.layers] == [
        (digest_of(x), len(x)) for x in img.layers
    ]
    assert resolved.diff_ids == tuple(json.loads(img.config)["rootfs"]["diff_ids"])
    assert resolved.platform == "linux/amd64"


async def test_pinned_digest_fetches_by_digest_and_verifies(
    serve_image: ServeImage, make_client: Callable[..., RegistryClient]
) -> None:
    fake, host, img = await serve_image()

    resolved = await make_client().resolve(f"{host}/app:v1@{img.digest}")
    assert fake.requests[0].path == f"/v2/app/manifests/{img.digest}"
    assert resolved.manifest_digest == img.digest


async def test_pinned_digest_mismatch_is_refused(
    serve: Serve, make_client: Callable[..., RegistryClient]
) -> None:
    fake = FakeRegistry()
    host = await serve(fake)
    real, other = make_image(seed="a"), make_image(seed="b")
    fake.put_image("app", "v1", real)
    # The registry answers the pinned digest with different bytes.
    fake.manifests[("app", other.digest)] = (real.manifest, DOCKER_MANIFEST)

    with pytest.raises(DigestMismatchError, match="pinned") as info:
        await make_client().resolve(f"{host}/app@{other.digest}")
    assert not info.value.retryable


async def test_docker_content_digest_header_mismatch_is_refused(
    serve_image: ServeImage, make_client: Callable[..., RegistryClient]
) -> None:
    fake, host, _ = await serve_image()
    fake.wrong_content_digest = True

    with pytest.raises(DigestMismatchError, match="Docker-Content-Digest"):
        await make_client().resolve(f"{host}/app:v1")


async def test_config_blob_with_wrong_content_is_refused(
    serve_image: ServeImage, make_client: Callable[..., RegistryClient]
) -> None:
    fake, host, img = await serve_image()
    fake.blobs[digest_of(img.config)] = img.config.replace(b"amd64", b"arm64")

    with pytest.raises(DigestMismatchError, match="config"):
        await make_client().resolve(f"{host}/app:v1")


@pytest.mark.parametrize(
    ("body", "media_type", "message"),
    [
        (b"{not json", DOCKER_MANIFEST, "not valid JSON"),
        (b"[]", DOCKER_MANIFEST, "not a JSON object"),
        (
            dumps({"schemaVersion": 1, "name": "app", "fsLayers": []}),
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            "schema1",
        ),
        (dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST}), DOCKER_MANIFEST, "config"),
        (
            dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": DOCKER_MANIFEST,
                    "config": {
                        "mediaType": "application/vnd.docker.container.image.v1+json",
                        "digest": "sha256:" + "1" * 64,
                        "size": 2,
                    },
                    "layers": [{"digest": "sha256:" + "2" * 64, "size": -1, "mediaType": "x"}],
                }
            ),
            DOCKER_MANIFEST,
            "layers[0] has a missing or invalid size",
        ),
        (dumps({"schemaVersion": 2, "mediaType": OCI_INDEX}), OCI_INDEX, "'manifests'"),
    ],
)
async def test_malformed_manifests_raise_registry_error_naming_manifest(
    serve: Serve,
    make_client: Callable[..., RegistryClient],
    body: bytes,
    media_type: str,
    message: str,
) -> None:
    fake = FakeRegistry()
    host = await serve(fake)
    fake.put_raw_manifest("app", "bad", body, media_type)

    with pytest.raises(RegistryError) as info:
        await make_client().resolve(f"{host}/app:bad")
    assert message in str(info.value)
    assert f"{host}/app:bad" in str(info.value)


async def test_diff_ids_must_match_layer_count(
    serve: Serve, make_client: Callable[..., RegistryClient]
) -> None:
    fake = FakeRegistry()
    host = await serve(fake)
    img = make_image(2)
    config = dumps({"os": "linux", "architecture": "amd64", "rootfs": {"diff_ids": []}})
    manifest = json.loads(img.manifest)
    manifest["config"].update(digest=digest_of(config), size=len(config))
    body = dumps(manifest)
    fake.put_raw_manifest("app", "v1", body, DOCKER_MANIFEST)
    fake.blobs[digest_of(config)] = config

    with pytest.raises(RegistryError, match="2 layers but the config lists 0 diff_ids"):
        await make_client().resolve(f"{host}/app:v1")


# ---- platforms ------------------------------------------------------------------------


def _multiarch(fake: FakeRegistry) -> dict[str, Any]:
    images = {
        "linux/amd64": make_image(os="linux", arch="amd64", seed="amd64"),
        "linux/arm64/v8": make_image(os="linux", arch="arm64", variant="v8", seed="arm64"),
        "linux/arm/v6": make_image(os="linux", arch="arm", variant="v6", seed="armv6"),
        "linux/s390x": make_image(os="linux", arch="s390x", seed="s390x"),
    }
    index = fake.put_index("multi", "v1", list(images.values()))
    return {"images": images, "index": index}


@pytest.mark.parametrize(
    ("wanted", "chosen"),
    [
        ("linux/amd64", "linux/amd64"),
        ("linux/arm64", "linux/arm64/v8"),  # arm64 and arm64/v8 are one platform
        ("linux/aarch64", "linux/arm64/v8"),
        ("linux/arm/v7", "linux/arm/v6"),  # an arm/v7 host runs v6 images
        ("linux/s390x", "linux/s390x"),
    ],
)
async def test_index_resolves_the_requested_platform(
    serve: Serve, make_client: Callable[..., RegistryClient], wanted: str, chosen: str
) -> None:
    fake = FakeRegistry()
    host = await serve(fake)
    multi = _multiarch(fake)

    resolved = await make_client().resolve(f"{host}/multi:v1", platform=wanted)

    img = multi["images"][chosen]
    assert resolved.platform == chosen
    assert resolved.manifest == img.manifest
    assert resolved.manifest_digest == img.digest
    assert resolved.index == multi["index"]
    assert resolved.index_digest == digest_of(multi["index"])
    assert resolved.index_media_type == OCI_INDEX
    assert resolved.digest == digest_of(multi["index"])  # what docker prints
    assert resolved.config == img.config


async def test_default_platform_is_the_host_and_config_platform_wins(
    serve: Serve, make_client: Callable[..., RegistryClient]
) -> None:
    fake = FakeRegistry()
    host = await serve(fake)
    multi = _multiarch(fake)
    if str(host_platform_default()) not in multi["images"]:
        pytest.skip(f"host platform {host_platform_default()} not in the test index")

    resolved = await make_client().resolve(f"{host}/multi:v1")
    assert resolved.platform == str(host_platform_default())
    via_config = await make_client(Config(platform="linux/s390x")).resolve(f"{host}/multi:v1")
    assert via_config.platform == "linux/s390x"


async def test_missing_platform_error_lists_the_available_ones(
    serve: Serve, make_client: Callable[..., RegistryClient]
) -> None:
    fake = FakeRegistry()
    host = await serve(fake)
    _multiarch(fake)

    with pytest.raises(PlatformNotFoundError) as info:
        await make_client().resolve(f"{host}/multi:v1", platform="windows/amd64")
    message = str(info.value)
    assert "windows/amd64" in message
    for name in ("linux/amd64", "linux/arm64/v8", "linux/arm/v6", "linux/s390x"):
        assert name in message


async def test_single_manifest_for_another_platform_is_refused_when_asked_explicitly(
    serve_image: ServeImage, make_client: Callable[..., RegistryClient]
) -> None:
    _, host, _ = await serve_image(make_image(arch="arm64", variant="v8"))

    with pytest.raises(PlatformNotFoundError, match="available: linux/arm64/v8"):
        await make_client().resolve(f"{host}/app:v1", platform="linux/amd64")
    ok = await make_client().resolve(f"{host}/app:v1", platform="linux/arm64")
    assert ok.platform == "linux/arm64/v8"


# ---- token auth -----------------------------------------------------------------------


async def test_token_flow_sends_realm_service_and_pull_scope(
    serve: Serve, make_client: Callable[..., RegistryClient]
) -> None:
    fake = FakeRegistry(auth="bearer")
    host = await serve(fake)
    fake.put_image("team/app", "v1", make_image())

    await make_client().resolve(f"{host}/team/app:v1")

    # One anonymous 401 teaches the challenge; one token serves every later request.
    assert len(fake.token_requests) == 1
    query = fake.token_requests[0].query
    assert query == {"service": "fake-registry", "scope": "repository:team/app:pull"}
    assert "Authorization" not in fake.token_requests[0].headers  # anonymous
    assert "Authorization" not in fake.requests[0].headers
    assert all(r.headers["Authorization"] == "Bearer secret-token-1" for r in fake.requests[1:])


async def test_cached_token_is_reused_until_near_expiry(
    serve_image: ServeImage, make_client: Callable[..., RegistryClient], clock: FakeClock
) -> None:
    fake, host, img = await serve_image(auth="bearer", expires_in=300)
    client = make_client()
    source = await resolved_source(client, host, digest_of(img.layers[0]))

    clock.now += 200
    [endpoint] = await source.endpoints()
    assert endpoint.headers["Authorization"] == "Bearer secret-token-1"
    assert fake.issued == 1

    clock.now += 90  # 10 s left: too close to trust for a request
    [endpoint] = await source.endpoints()
    assert endpoint.headers["Authorization"] == "Bearer secret-token-2"
    assert fake.issued == 2


async def test_token_without_expires_in_lives_sixty_seconds(
    serve_image: ServeImage, make_client: Callable[..., RegistryClient], clock: FakeClock
) -> None:
    fake, host, _ = await serve_image(auth="bearer", expires_in=None)
    client = make_client()
    source = await resolved_source(client, host, "sha256:" + "a" * 64)
    await source.endpoints()
    assert fake.issued == 1
    clock.now += 50
    await source.endpoints()
    assert fake.issued == 2


async def test_blob_401_refreshes_once_and_a_second_refusal_is_access_denied(
    serve_image: ServeImage, make_client: Callable[..., RegistryClient]
) -> None:
    fake, host, img = await serve_image(auth="bearer")
    client = make_client()
    source = await resolved_source(client, host, digest_of(img.layers[0]))
    [stale] = await source.endpoints()

    fake.revoke_tokens()  # the token "expired" mid-pull
    async with client._session.get(stale.url, headers=stale.headers) as resp:
        assert resp.status == 401
        challenge = resp.headers["WWW-Authenticate"]
    assert await source.refresh_auth(stale, challenge)
    [fresh] = await source.endpoints()
    assert fresh.headers["Authorization"] == "Bearer secret-token-2"
    async with client._session.get(fresh.url, headers=fresh.headers) as resp:
        assert resp.status == 200
        assert await resp.read() == img.layers[0]

    # A token server that refuses us now: the refresh fails permanently.
    fake.revoke_tokens()
    fake.refuse_tokens = True
    with pytest.raises(AccessDeniedError, match="refused"):
        await source.refresh_auth(fresh, challenge)


async def test_manifest_refused_after_refresh_is_access_denied(
    serve_image: ServeImage, make_client: Callable[..., RegistryClient]
) -> None:
    fake, host, _ = await serve_image(auth="bearer")
    # Tokens are issued but the registry never accepts them (wrong scope, revoked user…).
    fake.valid_tokens = _NeverValid()

    with pytest.raises(AccessDeniedError, match="HTTP 401") as info:
        await make_client().resolve(f"{host}/app:v1")
    assert not info.value.retryable
    assert fake.issued == 1  # exactly one refresh
    assert len(fake.requests) == 2


class _NeverValid(set[str]):
    def add(self, _: str) -> None:
        pass


async def test_concurrent_401s_share_one_refresh(
    serve_image: ServeImage, make_client: Callable[..., RegistryClient]
) -> None:
    fake, host, img = await serve_image(auth="bearer")
    client = make_client()
    a = await resolved_source(client, host, digest_of(img.layers[0]))
    b = client.blob_source(f"{host}/app:v1", digest_of(img.layers[1]))
    [ea], [eb] = await a.endpoints(), await b.endpoints()
    challenge = f'Bearer realm="{fake.base_url}/token",service="fake-registry"'

    assert await a.refresh_auth(ea, challenge)
    # b carried the same old token: a's fresh one serves it too.
    assert await b.refresh_auth(eb, challenge)
    assert fake.issued == 2


# ---- Basic and config.json ------------------------------------------------------------


async def test_basic_auth_from_docker_config_env(
    serve_image: ServeImage,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, host, img = await serve_image(auth="basic", users={"alice": "pa:ss"})
    conf = tmp_path / "dockercfg"
    conf.mkdir()
    encoded = base64.b64encode(b"alice:pa:ss").decode()
    write_docker_config(conf, {f"http://{host}": {"auth": encoded}})
    monkeypatch.setenv("DOCKER_CONFIG", str(conf))

    client = RegistryClient(session, Config(), clock=clock)
    resolved = await client.resolve(f"{host}/app:v1")
    assert resolved.manifest == img.manifest
    assert fake.requests[-1].headers["Authorization"] == "Basic " + encoded
    [endpoint] = await client.blob_source(resolved.reference, img.digest).endpoints()
    assert endpoint.headers["Authorization"] == "Basic " + encoded
    assert fake.token_requests == []


async def test_basic_challenge_without_credentials_is_access_denied(
    serve_image: ServeImage, make_client: Callable[..., RegistryClient]
) -> None:
    _, host, _ = await serve_image(auth="basic", users={"alice": "x"})

    with pytest.raises(AccessDeniedError):
        await make_client().resolve(f"{host}/app:v1")


async def test_credentials_go_to_the_token_server(
    serve_image: ServeImage, make_client: Callable[..., RegistryClient], docker_config: Path
) -> None:
    fake, host, _ = await serve_image(auth="bearer", users={"bob": "hunter2"})
    write_docker_config(docker_config, {host: {"username": "bob", "password": "hunter2"}})

    await make_client().resolve(f"{host}/app:v1")
    expected = "Basic " + base64.b64encode(b"bob:hunter2").decode()
    assert fake.token_requests[0].headers["Authorization"] == expected
    # The password goes to the realm only, never to the registry itself.
    assert all(r.headers.get("Authorization") != expected for r in fake.requests)


async def test_identity_token_uses_the_oauth2_refresh_grant(
    serve_image: ServeImage, make_client: Callable[..., RegistryClient], docker_config: Path
) -> None:
    fake, host, _ = await serve_image(auth="bearer", refresh_tokens={"identity-xyz": "bob"})
    write_docker_config(docker_config, {host: {"auth": "", "identitytoken": "identity-xyz"}})

    await make_client().resolve(f"{host}/app:v1")
    [request] = fake.token_requests
    assert request.method == "POST"
    assert request.form["grant_type"] == "refresh_token"
    assert request.form["refresh_token"] == "identity-xyz"
    assert request.form["scope"] == "repository:app:pull"
    assert request.form["service"] == "fake-registry"


async def test_no_token_or_password_reaches_the_logs(
    serve_image: ServeImage,
    make_client: Callable[..., RegistryClient],
    docker_config: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, host, img = await serve_image(auth="bearer", users={"bob": "hunter2"})
    write_docker_config(docker_config, {host: {"username": "bob", "password": "hunter2"}})
    fake.failures["/v2/app/manifests/v1"] = [(503, {"Retry-After": "1"})]
    caplog.set_level(logging.DEBUG)

    client = make_client()
    source = await resolved_source(client, host, digest_of(img.layers[0]))
    [endpoint] = await source.endpoints()
    fake.revoke_tokens()
    await source.refresh_auth(endpoint, f'Bearer realm="{fake.base_url}/token"')
    await source.endpoints()

    assert fake.issued == 2
    assert caplog.records, "the client should log what it does"
    text = "\n".join(r.getMessage() for r in caplog.records) + repr(
        [r.args for r in caplog.records]
    )
    for secret in ("secret-token", "hunter2", base64.b64encode(b"bob:hunter2").decode()):
        assert secret not in text


# ---- errors and retries ---------------------------------------------------------------


async def test_transient_errors_are_retried_with_the_injected_clock(
    serve_image: ServeImage, make_client: Callable[..., RegistryClient], clock: FakeClock
) -> None:
    fake, host, _ = await serve_image()
    fake.failures["/v2/app/manifests/v1"] = [(503, {"Retry-After": "12"}), (429, {})]

    await make_client(Config(retry_delay=5)).resolve(f"{host}/app:v1")
    # Retry-After longer than the linear 5 s wins; then 2 × 5 s.
    assert clock.sleeps == [12.0, 10.0]


async def test_transient_errors_give_up_after_the_engine_attempt_budget(
    serve_image: ServeImage, make_client: Callable[..., RegistryClient], clock: FakeClock
) -> None:
    fake, host, _ = await serve_image()
    fake.failures["/v2/app/manifests/v1"] = [(500, {})] * 5

    with pytest.raises(BudgetExhaustedError, match="HTTP 500") as info:
        await make_client(Config(max_download_attempts=3)).resolve(f"{host}/app:v1")
    assert isinstance(info.value.last, ServerError) and info.value.last.status == 500
    assert info.value.attempts == 3
    assert clock.sleeps == [5.0, 10.0]
    assert len(fake.requests) == 3


async def test_unknown_manifest_is_not_found_and_not_retried(
    serve: Serve, make_client: Callable[..., RegistryClient], clock: FakeClock
) -> None:
    fake = FakeRegistry()
    host = await serve(fake)

    with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN"):
        await make_client().resolve(f"{host}/app:nope")
    assert clock.sleeps == []


async def test_connection_refused_is_a_connection_cut(
    make_client: Callable[..., RegistryClient], clock: FakeClock
) -> None:
    server = TestServer(web.Application(), host="127.0.0.1")
    await server.start_server()
    port = server.port
    await server.close()  # nothing listens there any more

    with pytest.raises(BudgetExhaustedError) as info:
        await make_client().resolve(f"127.0.0.1:{port}/app:v1")
    last = info.value.last
    assert isinstance(last, ConnectionCutError)
    assert isinstance(last.__cause__, aiohttp.ClientError)
    assert info.value.attempts == 5 and len(clock.sleeps) == 4


# ---- schemes and mirrors --------------------------------------------------------------


def test_scheme_is_https_unless_insecure_or_loopback(
    make_client: Callable[..., RegistryClient],
) -> None:
    client = make_client(Config(insecure_registries=("reg.lan:5000", "plain.lan", "10.0.0.0/8")))
    url = client.origin_url
    assert url(parse_reference("example.com/app")) == "https://example.com"
    assert url(parse_reference("reg.lan:5000/app")) == "http://reg.lan:5000"
    assert url(parse_reference("reg.lan:5001/app")) == "https://reg.lan:5001"
    assert url(parse_reference("plain.lan:8080/app")) == "http://plain.lan:8080"
    assert url(parse_reference("10.1.2.3:5000/app")) == "http://10.1.2.3:5000"
    assert url(parse_reference("127.0.0.2:5000/app")) == "http://127.0.0.2:5000"
    assert url(parse_reference("localhost:5000/app")) == "http://localhost:5000"
    assert url(parse_reference("[::1]:5000/app")) == "http://[::1]:5000"
    assert url(parse_reference("alpine")) == "https://registry-1.docker.io"


async def test_mirrors_come_first_for_docker_hub_only(
    make_client: Callable[..., RegistryClient],
) -> None:
    client = make_client(
        Config(registry_mirrors=("https://mirror-a.example/", "http://127.0.0.1:5001"))
    )
    hub = client.blob_source("alpine", "sha256:" + "c" * 64)
    assert [e.url for e in await hub.endpoints()] == [
        f"https://mirror-a.example/v2/library/alpine/blobs/sha256:{'c' * 64}",
        f"http://127.0.0.1:5001/v2/library/alpine/blobs/sha256:{'c' * 64}",
        f"https://registry-1.docker.io/v2/library/alpine/blobs/sha256:{'c' * 64}",
    ]
    assert [e.host for e in await hub.endpoints()] == [
        "mirror-a.example",
        "127.0.0.1:5001",
        "registry-1.docker.io",
    ]
    own = client.blob_source("quay.io/org/app:v1", "sha256:" + "c" * 64)
    assert [e.url for e in await own.endpoints()] == [
        f"https://quay.io/v2/org/app/blobs/sha256:{'c' * 64}"
    ]


async def test_failed_mirror_is_tried_last_until_it_works_again(
    make_client: Callable[..., RegistryClient], clock: FakeClock
) -> None:
    client = make_client(Config(registry_mirrors=("http://m1.example", "http://m2.example")))
    source = client.blob_source("alpine", "sha256:" + "c" * 64)
    first = (await source.endpoints())[0]
    source.note_failure(first)
    assert [e.host for e in await source.endpoints()] == [
        "m2.example",
        "registry-1.docker.io",
        "m1.example",
    ]
    # Demotion is per client: another layer's source skips the dead mirror too.
    other = client.blob_source("alpine", "sha256:" + "d" * 64)
    assert (await other.endpoints())[0].host == "m2.example"
    source.note_success(first)
    assert (await source.endpoints())[0].host == "m1.example"
    # Without a success, the demotion wears off: a mirror down for a while gets another go.
    source.note_failure(first)
    clock.now += DEMOTION_SECONDS - 1
    assert (await source.endpoints())[0].host == "m2.example"
    clock.now += 2
    assert (await source.endpoints())[0].host == "m1.example"


async def test_mirror_whose_token_server_fails_is_skipped_for_the_attempt(
    serve: Serve, make_client: Callable[..., RegistryClient]
) -> None:
    mirror, origin = FakeRegistry(auth="bearer"), FakeRegistry()
    mirror_host, origin_host = await serve(mirror), await serve(origin)
    img = make_image()
    mirror.put_image("library/app", "v1", img)
    origin.put_image("library/app", "v1", img)
    client = make_client(
        Config(registry_mirrors=(f"http://{mirror_host}",)),
        endpoint_overrides={"docker.io": f"http://{origin_host}"},
    )
    await client.resolve("app:v1")  # through the mirror: its challenge is now known
    source = client.blob_source("app:v1", digest_of(img.layers[0]))
    assert [e.host for e in await source.endpoints()] == [mirror_host, origin_host]

    mirror.refuse_tokens = True
    client._tokens.clear()  # as if the mirror's token expired
    assert [e.host for e in await source.endpoints()] == [origin_host]


async def test_resolve_goes_through_the_mirror_and_falls_back_to_the_origin(
    serve: Serve, make_client: Callable[..., RegistryClient], clock: FakeClock
) -> None:
    origin, mirror = FakeRegistry(), FakeRegistry()
    origin_host, mirror_host = await serve(origin), await serve(mirror)
    img = make_image()
    origin.put_image("library/app", "v1", img)
    mirror.put_image("library/app", "v1", img)
    client = make_client(
        Config(registry_mirrors=(f"http://{mirror_host}",)),
        endpoint_overrides={"docker.io": f"http://{origin_host}"},
    )

    via_mirror = await client.resolve("app:v1")
    assert via_mirror.served_by == f"http://{mirror_host}"
    assert origin.requests == []

    # A mirror that lacks the image (or answers 5xx) is skipped at once, without sleeping.
    mirror.manifests.clear()
    via_origin = await client.resolve("app:v1")
    assert via_origin.served_by == f"http://{origin_host}"
    assert via_origin.manifest == img.manifest
    assert clock.sleeps == []


async def test_config_redirect_to_another_host_drops_authorization(
    serve: Serve, make_client: Callable[..., RegistryClient]
) -> None:
    fake, storage = FakeRegistry(auth="bearer"), FakeRegistry()
    host = await serve(fake)
    storage_host = await serve(storage)
    img = make_image()
    fake.put_image("app", "v1", img)
    storage.put_image("app", "v1", img)
    config_path = f"/v2/app/blobs/{digest_of(img.config)}"
    fake.failures[config_path] = [(307, {"Location": f"http://{storage_host}{config_path}"})]

    resolved = await make_client().resolve(f"{host}/app:v1")
    assert resolved.config == img.config
    [redirected] = [r for r in storage.requests if r.path == config_path]
    assert "Authorization" not in redirected.headers


def test_challenges_parse_several_schemes_and_quoted_values() -> None:
    [basic, bearer] = parse_challenges(
        'Basic realm="Registry Realm", Bearer realm="https://auth.example/token",'
        'service="registry.example",scope="repository:a/b:pull,push",error="x\\"y"'
    )
    assert basic.scheme == "basic"
    assert basic.params == {"realm": "Registry Realm"}
    assert bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
        "error": 'x"y',
    }
