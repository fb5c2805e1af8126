"""hosts.HostHealth: one record of which hosts to try first, fed by real requests.

The ordering rules on their own with a FakeClock, then the production feed: an engine
shares one record between its registry clients, and manifest and token requests to a
mirror that refuses connections push it behind the origin for the blobs that follow.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ServeApp
from test_helpers_core import open_engine
from tokenserver import FakeRegistry, digest_of, make_image

from resumer.clock import FakeClock
from resumer.hosts import DEMOTION_SECONDS, RANGE_IGNORED_SECONDS, HostHealth, host_of
from resumer.registry import Challenge


@dataclass(frozen=True)
class Ep:
    host: str


def hosts_of(health: HostHealth, names: str, *, ranged: bool = True) -> str:
    return "".join(e.host for e in health.order([Ep(h) for h in names], ranged=ranged))


def test_the_configured_order_holds_while_every_host_is_healthy() -> None:
    assert hosts_of(HostHealth(FakeClock()), "abc") == "abc"


def test_a_host_that_failed_goes_last_the_most_recent_failure_last() -> None:
    clock = FakeClock()
    health = HostHealth(clock)
    health.failed("a")
    clock.now += 1
    health.failed("b")
    assert hosts_of(health, "abcd") == "cdab"
    assert health.is_demoted("a") and not health.is_demoted("c")


def test_when_every_host_failed_the_one_that_failed_longest_ago_goes_first() -> None:
    clock = FakeClock()
    health = HostHealth(clock)
    for h in "bca":
        health.failed(h)
        clock.now += 1
    assert hosts_of(health, "abc") == "bca"


def test_a_demotion_wears_off_and_a_success_ends_it_at_once() -> None:
    clock = FakeClock()
    health = HostHealth(clock)
    health.failed("a")
    clock.now += DEMOTION_SECONDS - 1
    assert hosts_of(health, "ab") == "ba"
    clock.now += 2
    assert hosts_of(health, "ab") == "ab"
    health.failed("a")
    health.succeeded("a")
    assert hosts_of(health, "ab") == "ab"


def test_a_host_that_ignored_range_goes_after_those_that_honour_it_for_blobs_only() -> None:
    clock = FakeClock()
    health = HostHealth(clock)
    health.range_ignored("a")
    assert hosts_of(health, "abc") == "bca"
    assert hosts_of(health, "abc", ranged=False) == "abc"  # a manifest is never ranged
    # Still before a host that does not connect: it serves, only wastefully.
    health.failed("b")
    assert hosts_of(health, "abc") == "cab"
    # A success says nothing about Range.
    health.succeeded("a")
    assert hosts_of(health, "ac") == "ca"
    clock.now += RANGE_IGNORED_SECONDS
    assert hosts_of(health, "ac") == "ac"


def test_urls_are_ordered_by_their_host_without_userinfo() -> None:
    health = HostHealth(FakeClock())
    health.failed("m1.example:5000")
    urls = ["https://u:p@m1.example:5000", "http://m2.example", "https://origin"]
    assert health.order_urls(urls) == urls[1:] + urls[:1]
    assert host_of("https://u:p@m1.example:5000/v2/x?sig=1") == "m1.example:5000"


# --------------------------------------------------------------------------- the engine's


async def test_one_record_per_engine_shared_by_every_registry_client(tmp_path: Path) -> None:
    async with open_engine(tmp_path / "root") as eng:
        plain = eng.registry()
        mirrored = eng.registry(eng.config.replace(registry_mirrors=("http://m.example",)))
        assert plain is not mirrored
        assert plain.hosts is mirrored.hosts is eng.hosts


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens there once closed


async def test_a_mirror_that_refuses_manifest_requests_goes_behind_the_origin_for_blobs(
    tmp_path: Path, serve_app: ServeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    origin = FakeRegistry()
    origin.base_url = await serve_app(origin.app)
    img = make_image()
    origin.put_image("library/app", "v1", img)
    mirror_host = f"127.0.0.1:{_refused_port()}"
    clock = FakeClock()
    async with open_engine(
        tmp_path / "root", clock, registry_mirrors=(f"http://{mirror_host}",)
    ) as eng:
        eng.endpoint_overrides["docker.io"] = origin.base_url
        client = eng.registry()
        source = client.blob_source("app:v1", digest_of(img.layers[0]))
        assert (await source.endpoints())[0].host == mirror_host

        resolved = await client.resolve("app:v1")
        assert resolved.served_by == origin.base_url
        assert eng.hosts.is_demoted(mirror_host)  # fed by the manifest request itself
        origin_host = host_of(origin.base_url)
        assert [e.host for e in await source.endpoints()] == [origin_host, mirror_host]
        assert clock.sleeps == []  # a mirror is tried once, never waited for

        clock.now += DEMOTION_SECONDS
        assert (await source.endpoints())[0].host == mirror_host


async def test_a_mirror_whose_token_server_is_gone_is_skipped_and_demoted(
    tmp_path: Path, serve_app: ServeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    mirror, origin = FakeRegistry(auth="bearer"), FakeRegistry()
    mirror.base_url = await serve_app(mirror.app)
    origin.base_url = await serve_app(origin.app)
    img = make_image()
    for fake in (mirror, origin):
        fake.put_image("library/app", "v1", img)
    mirror_host = host_of(mirror.base_url)
    clock = FakeClock()
    async with open_engine(tmp_path / "root", clock, registry_mirrors=(mirror.base_url,)) as eng:
        eng.endpoint_overrides["docker.io"] = origin.base_url
        client = eng.registry()
        await client.resolve("app:v1")  # through the mirror: its challenge is known now
        # Its token realm moves to where nothing listens, and its token has expired.
        dead = f"http://127.0.0.1:{_refused_port()}/token"
        client._challenges[mirror_host] = Challenge("bearer", {"realm": dead})
        client._tokens.clear()

        source = client.blob_source("app:v1", digest_of(img.layers[0]))
        [endpoint] = await source.endpoints()
        assert endpoint.host == host_of(origin.base_url)
        assert eng.hosts.is_demoted(mirror_host)
        assert clock.sleeps == []  # a mirror's token is not waited for
