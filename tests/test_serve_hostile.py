"""Hostile clients of ``resumer serve``: each gets its error or its timeout, and the mirror
keeps serving the others. Requests are written on raw sockets where a client library
would clean them up (``..``, encoded slashes, huge headers, one byte a second)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import aiohttp
import pytest
from conftest import PushImage, ServeApp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import Registry
from serving import InProcess, mirror_in_process
from test_serve_mirror import get_manifest, one_layer
from tokenserver import FakeRegistry, make_image

from resumer.lab.proxy import FaultProxy, Faults
from resumer.serve import names
from resumer.serve.mirror import MirrorSettings

MiB = 1 << 20
HEX = "a" * 64


async def raw(m: InProcess, request: bytes, *, timeout: float = 30.0) -> tuple[int, bytes]:
    """Send ``request`` as it is; the status and body of the answer (0: none)."""
    host, port = m.host.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(1 << 20), timeout)
        while chunk := await asyncio.wait_for(reader.read(1 << 20), timeout):
            data += chunk
    except (ConnectionError, TimeoutError):
        data = b""
    finally:
        writer.close()
    if not data.startswith(b"HTTP/1."):
        return 0, data
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def get(path: str, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n".encode()


def code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


@pytest.fixture
async def mirror(registry: Registry, pushed_image: PushImage, tmp_path: Path) -> object:
    image = one_layer(tmp_path / "b", seed=31, size=MiB)
    await asyncio.to_thread(pushed_image, repo="lab/app", tag="v1", image=image)
    settings = MirrorSettings(upstream=registry.host, header_timeout=3.0)
    async with mirror_in_process(tmp_path / "root", registry.host, settings=settings) as m:
        yield m


TRAVERSALS = [
    "/v2/../../state.db/manifests/latest",
    "/v2/lab/../../state.db/blobs/sha256:" + HEX,
    "/v2/%2e%2e/%2e%2e/manifests/latest",
    "/v2/lab%2f..%2f..%2fstate.db/manifests/v1",
    "/v2/lab/app/manifests/..%2f..%2fstate.db",
    "/v2/lab/app/manifests/..",
    "/v2/lab/app/blobs/sha256:..%2f..%2fstate.db",
    "/v2/lab/app/blobs/../../../etc/passwd",
    "/v2/lab\\..\\app/manifests/v1",
    "/v2//lab/app/manifests/v1",
    "/v2/lab/app/manifests/v1%00",
]


async def test_path_traversal_in_names_and_references_is_refused(mirror: InProcess) -> None:
    for path in TRAVERSALS:
        status, body = await raw(mirror, get(path))
        assert status in (400, 404), (path, status, body[:200])
        assert code(body) in {"NAME_INVALID", "NAME_UNKNOWN", "DIGEST_INVALID", "MANIFEST_INVALID"}
    # The mirror still serves.
    status, _ = await raw(mirror, get("/v2/lab/app/manifests/v1"))
    assert status == 200


@pytest.mark.parametrize(
    ("digest", "want"),
    [
        ("sha256:abc", "DIGEST_INVALID"),
        ("sha256:" + "A" * 64, "DIGEST_INVALID"),
        ("sha256:" + "a" * 65, "DIGEST_INVALID"),
        ("sha512:" + "a" * 128, "UNSUPPORTED"),
        ("md5:d41d8cd98f00b204e9800998ecf8427e", "UNSUPPORTED"),
        ("sha256", "DIGEST_INVALID"),
    ],
)
async def test_bad_digests_are_refused(mirror: InProcess, digest: str, want: str) -> None:
    status, body = await raw(mirror, get(f"/v2/lab/app/blobs/{digest}"))
    assert (status, code(body)) == (400, want)


async def test_an_unknown_blob_and_manifest_are_oci_errors(mirror: InProcess) -> None:
    status, body = await raw(mirror, get("/v2/lab/app/blobs/sha256:" + HEX))
    assert (status, code(body)) == (404, "BLOB_UNKNOWN")
    status, body = await raw(mirror, get("/v2/lab/app/manifests/nope"))
    assert (status, code(body)) == (404, "MANIFEST_UNKNOWN")
    status, body = await raw(mirror, get("/v2/lab/app/manifests/v1?ns=bad_host!"))
    assert (status, code(body)) == (400, "NAME_INVALID")


async def test_writes_catalog_and_bodies_are_refused(mirror: InProcess) -> None:
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        req = (
            f"{method} /v2/lab/app/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
        status, body = await raw(mirror, req)
        assert (status, code(body)) == (405, "UNSUPPORTED"), method
    status, body = await raw(
        mirror,
        b"DELETE /v2/lab/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert (status, code(body)) == (405, "UNSUPPORTED")
    for path in ("/v2/_catalog", "/v2/lab/app/tags/list"):
        status, body = await raw(mirror, get(path))
        assert (status, code(body)) == (405, "UNSUPPORTED"), path
    req = (
        b"GET /v2/lab/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    status, body = await raw(mirror, req)
    assert status == 400 and code(body) == "UNSUPPORTED"


async def test_a_64_kib_header_is_refused_and_others_are_served(mirror: InProcess) -> None:
    status, _ = await raw(mirror, get("/v2/", "X-Big: " + "a" * (64 * 1024)))
    assert status in (400, 431, 0)
    status, _ = await raw(mirror, get("/v2/" + "a" * (64 * 1024)))
    assert status in (400, 414, 0)
    status, _ = await raw(mirror, get("/v2/lab/app/manifests/v1"))
    assert status == 200


async def test_a_client_sending_one_byte_a_second_is_dropped_while_others_are_served(
    mirror: InProcess,
) -> None:
    host, port = mirror.host.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = get("/v2/")
    loop = asyncio.get_running_loop()
    started = loop.time()
    dropped_at: float | None = None
    served = 0
    try:
        for byte in request:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                dropped_at = loop.time()
                break
            # Meanwhile, another client is served at once.
            status, _ = await raw(mirror, get("/v2/lab/app/manifests/v1"), timeout=10)
            assert status == 200
            served += 1
            # One byte a second: the pace of the attack, not a wait for a condition.
            try:
                data = await asyncio.wait_for(reader.read(1), 1.0)
            except TimeoutError:
                continue
            assert data == b"", "the server answered a request it never fully got"
            dropped_at = loop.time()
            break
    finally:
        writer.close()
    assert dropped_at is not None, "a slow client was never dropped"
    elapsed = dropped_at - started
    # header_timeout is 3 s here: dropped after it, long before the 40-odd bytes were sent.
    assert 2.5 <= elapsed <= 15, elapsed
    assert served >= 2


async def test_200_connections_at_once_each_get_an_answer_and_a_normal_client_is_served(
    mirror: InProcess,
) -> None:
    host, port = mirror.host.split(":")
    idle = [await asyncio.open_connection(host, int(port)) for _ in range(200)]
    try:
        results = await asyncio.gather(
            *(raw(mirror, get("/v2/lab/app/manifests/v1"), timeout=60) for _ in range(200))
        )
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 429}, sorted(set(statuses))
        assert statuses.count(200) >= 100
        async with aiohttp.ClientSession() as http:
            assert (await get_manifest(http, mirror.url, "lab/app", "v1"))[0] == 200
    finally:
        for _, w in idle:
            w.close()


async def test_beyond_the_cap_a_request_waits_briefly_then_gets_toomanyrequests(
    registry: Registry, pushed_image: PushImage, tmp_path: Path
) -> None:
    image = one_layer(tmp_path / "b", seed=32, size=4 * MiB)
    await asyncio.to_thread(pushed_image, repo="lab/cap", tag="v1", image=image)
    layer = image.layers[0]
    async with FaultProxy("127.0.0.1", registry.port, Faults(rate=MiB)) as proxy:
        upstream = f"127.0.0.1:{proxy.port}"
        settings = MirrorSettings(upstream=upstream, max_clients=2, queue_wait=0.2)
        async with (
            mirror_in_process(tmp_path / "root", upstream, settings=settings) as m,
            aiohttp.ClientSession() as http,
        ):
            assert (await get_manifest(http, m.url, "lab/cap", "v1"))[0] == 200
            url = f"{m.url}/v2/lab/cap/blobs/{layer.digest}"
            streams = [await http.get(url) for _ in range(2)]  # two slow streams in flight
            for s in streams:
                await s.content.readexactly(1024)
            async with http.get(f"{m.url}/v2/") as r:
                assert r.status == 429
                assert code(await r.read()) == "TOOMANYREQUESTS"
                assert r.headers["Retry-After"] == "1"
            for s in streams:
                s.close()


async def test_no_upstream_token_or_challenge_reaches_a_client(
    serve_app: ServeApp, tmp_path: Path
) -> None:
    fake = FakeRegistry(auth="bearer")
    img = make_image(2, seed="tok")
    fake.put_image("lab/secret", "v1", img)
    fake.base_url = await serve_app(fake.app)
    upstream = fake.base_url.removeprefix("http://")
    seen: list[tuple[int, dict[str, str], bytes]] = []
    async with (
        mirror_in_process(tmp_path / "root", upstream) as m,
        aiohttp.ClientSession() as http,
    ):
        seen.append(await get_manifest(http, m.url, "lab/secret", "v1"))
        doc = json.loads(seen[0][2])
        for d in [doc["config"], *doc["layers"]]:
            async with http.get(f"{m.url}/v2/lab/secret/blobs/{d['digest']}") as r:
                seen.append((r.status, dict(r.headers), await r.read()))
        async with http.get(f"{m.url}/v2/lab/secret/blobs/sha256:{HEX}") as r:
            seen.append((r.status, dict(r.headers), await r.read()))
        async with http.get(f"{m.url}/v2/") as r:
            seen.append((r.status, dict(r.headers), await r.read()))
    assert fake.issued >= 1  # the upstream did hand out tokens
    assert any(r.headers.get("Authorization", "").startswith("Bearer ") for r in fake.requests)
    for status, headers, body in seen:
        assert status != 401
        lowered = {k.lower() for k in headers}
        assert not lowered & {"www-authenticate", "authorization", "set-cookie", "location"}
        text = json.dumps(headers).encode() + body
        assert b"secret-token" not in text and b"/token" not in text
    assert hashlib.sha256(seen[1][2]).hexdigest() == hashlib.sha256(img.config).hexdigest()


# --------------------------------------------------------------------------- properties

RANGE_PIECES = st.sampled_from(
    ["bytes=", "bytes", "=", "-", ",", " ", "0", "1", "5", "99", "12345678901234567890", "x", ";"]
)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.one_of(st.text(max_size=40), st.lists(RANGE_PIECES, max_size=8).map("".join)),
    size=st.integers(min_value=0, max_value=10**12),
)
def test_any_range_header_gives_a_valid_span_a_416_or_the_whole_blob(
    header: str, size: int
) -> None:
    got = names.parse_range(header, size)
    if got is None:
        return
    if isinstance(got, names.Unsatisfiable):
        assert got.content_range == f"bytes */{size}"
        return
    assert 0 <= got.start <= got.end < size
    assert got.length == got.end - got.start + 1 >= 1


@given(start=st.integers(0, 2000), end=st.integers(0, 2000), size=st.integers(0, 1500))
def test_a_single_range_is_served_as_rfc_9110_says(start: int, end: int, size: int) -> None:
    got = names.parse_range(f"bytes={start}-{end}", size)
    if end < start:
        assert got is None
    elif start >= size:
        assert isinstance(got, names.Unsatisfiable)
    else:
        assert got == names.Span(start, min(end, size - 1), size)
    suffix = names.parse_range(f"bytes=-{end}", size)
    if end == 0 or size == 0:
        assert isinstance(suffix, names.Unsatisfiable)
    else:
        assert suffix == names.Span(max(0, size - end), size - 1, size)


PATH_CHARS = st.sampled_from([*list("ab0_.-/:%2eE\\"), "..", "%2e", "%2f", "sha256:", HEX])


@settings(max_examples=800)
@given(st.lists(PATH_CHARS, max_size=12).map("".join), st.sampled_from(["manifests", "blobs"]))
def test_no_accepted_name_or_reference_builds_a_path_outside_the_root(text: str, kind: str) -> None:
    root = Path("/srv/root")
    for path in (f"/v2/{text}/{kind}/v1", f"/v2/lab/{kind}/{text}", f"/v2/{text}"):
        try:
            target = names.parse_target(path)
        except names.BadRequest:
            continue
        if target is None:
            continue
        assert names.valid_name(target.name)
        for piece in (*target.name.split("/"), target.reference):
            assert piece not in ("", ".", "..") and "/" not in piece and "%" not in piece
            joined = os.path.normpath(root / "x" / piece)
            assert joined.startswith(str(root / "x") + "/")
        if target.kind is names.Kind.BLOBS:
            assert names.is_digest(target.reference)


async def test_an_allow_list_bounds_the_registries_ns_may_name(tmp_path: Path) -> None:
    """With --allow-upstream, ?ns= naming any other host is refused before a byte goes
    out (a LAN mirror must not fetch from whatever internal host a client names)."""
    settings = MirrorSettings(upstream="127.0.0.1:9", allowed_upstreams=("registry.example",))
    async with mirror_in_process(tmp_path / "r", "127.0.0.1:9", settings=settings) as m:
        status, body = await raw(m, get("/v2/lab/app/manifests/v1?ns=10.0.0.7:8080"))
        assert (status, code(body)) == (403, "DENIED")
        # The listed one and the default upstream pass the check (and then find nothing
        # there: port 9 is closed, and no manifest is cached).
        for ns in ("registry.example", "127.0.0.1:9"):
            status, body = await raw(m, get(f"/v2/lab/app/manifests/v1?ns={ns}"))
            assert status != 403, (ns, body)
