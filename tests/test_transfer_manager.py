"""TransferManager fixes: the pull named by each attempt, "Waiting" for late watchers,
and blobs already in the store costing no download slot.

Nothing sleeps: a "running" transfer is held by an asyncio.Event the server waits on, and
the test moves on when the events it waits for have been emitted.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web
from badserver import BlobServer, stall

from resumer.clock import FakeClock
from resumer.config import Config
from resumer.download import LayerJob, pull_layers
from resumer.engine import Engine
from resumer.events import Event, Status
from resumer.lab.images import Layer, LayerSpec, make_layer
from resumer.pulls import Pulls
from resumer.source import UrlSource
from resumer.transfer import BlobRequest, TransferManager

KiB = 1024


class GatedServer(BlobServer):
    """A request for a gated blob waits until the test opens its gate."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        super().__init__(blobs)
        self.gates: dict[str, asyncio.Event] = {}
        self.arrived: dict[str, asyncio.Event] = {}

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    def arrival(self, name: str) -> asyncio.Event:
        return self.arrived.setdefault(name, asyncio.Event())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.arrival(name).set()
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()
        return await super()._handle(request)

    async def close(self) -> None:
        for gate in self.gates.values():
            gate.set()
        await super().close()


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self._waits: list[tuple[Callable[[], bool], asyncio.Event]] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        for cond, ev in self._waits:
            if cond():
                ev.set()

    async def until(self, cond: Callable[[], bool]) -> None:
        ev = asyncio.Event()
        if cond():
            return
        self._waits.append((cond, ev))
        async with asyncio.timeout(10):
            await ev.wait()

    def statuses(self) -> list[str]:
        return [e.status for e in self.events]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _req(server: BlobServer, name: str, *, pull_id: int | None = None) -> BlobRequest:
    data = server.blobs[name]
    d = _digest(data)
    return BlobRequest(
        d, UrlSource(f"{server.url}/{name}"), digest=d, size=len(data), pull_id=pull_id
    )


def _config(**kw: object) -> Config:
    base: dict[str, object] = {"max_concurrent_downloads": 1, "chunk_size": 64 * KiB}
    base.update(kw)
    return Config(**base)  # type: ignore[arg-type]


@pytest.fixture
async def server() -> GatedServer:
    blobs = {name: os.urandom(200 * KiB) for name in ("a", "b", "c")}
    srv = GatedServer(blobs)
    await srv.start()
    try:
        yield srv  # type: ignore[misc]
    finally:
        await srv.close()


# --------------------------------------------------------------------------- pull_id


def test_pull_id_is_not_part_of_the_request_identity() -> None:
    src = UrlSource("http://127.0.0.1:1/x")
    assert BlobRequest("sha256:ab", src, pull_id=1) == BlobRequest("sha256:ab", src, pull_id=2)


async def test_attempts_name_the_pull_of_their_request(tmp_path: Path, server: GatedServer) -> None:
    async with Engine.open(tmp_path / "root", _config(max_concurrent_downloads=3)) as engine:
        assert engine.ctx.pull_id is None  # the engine-wide id is not what gets recorded
        await asyncio.gather(
            engine.transfers.fetch(_req(server, "a", pull_id=7)),
            engine.transfers.fetch(_req(server, "b", pull_id=9)),
            engine.transfers.fetch(_req(server, "c")),
        )
        rows = {a.key: a for a in await engine.store.attempts()}
        got = {
            k: r[0]
            for k in rows
            for r in await engine.store.read("SELECT pull_id FROM attempts WHERE key = ?", (k,))
        }
    assert got == {
        _digest(server.blobs["a"]): 7,
        _digest(server.blobs["b"]): 9,
        _digest(server.blobs["c"]): None,
    }


async def test_concurrent_pulls_record_their_own_pull_id(tmp_path: Path) -> None:
    """Through download.pull_layers: two stored pulls at once on one engine."""
    layers = [
        make_layer(tmp_path / "build", LayerSpec(size=100 * KiB, compressible=False), seed=s)
        for s in (1, 2)
    ]
    async with BlobServer({x.digest[7:]: x.read_bytes() for x in layers}) as srv:

        def job(x: Layer) -> LayerJob:
            return LayerJob(
                x.digest, x.size, x.media_type, x.diff_id, UrlSource(f"{srv.url}/{x.digest[7:]}")
            )

        cfg = _config(max_concurrent_downloads=3)
        async with Engine.open(tmp_path / "root", cfg, clock=FakeClock()) as engine:
            pulls = Pulls(engine.store)
            ids = [
                await pulls.create(f"example/{i}:v1", dest=str(tmp_path / "d"), layers=[job(x)])
                for i, x in enumerate(layers)
            ]
            await asyncio.gather(
                *(
                    pull_layers(
                        [job(x)],
                        transfers=engine.transfers,
                        store=engine.store,
                        config=cfg,
                        pull_id=pid,
                    )
                    for x, pid in zip(layers, ids, strict=True)
                )
            )
            rows = await engine.store.read("SELECT key, pull_id FROM attempts ORDER BY id")
    assert ids[0] != ids[1]
    assert {r["key"]: r["pull_id"] for r in rows} == {
        layers[0].digest: ids[0],
        layers[1].digest: ids[1],
    }


# --------------------------------------------------------------------------- Waiting


async def test_a_watcher_joining_a_queued_transfer_is_told_waiting(
    tmp_path: Path, server: GatedServer
) -> None:
    async with Engine.open(tmp_path / "root", _config()) as engine:
        tm = engine.transfers
        server.gate("a")  # a holds the only slot until we open it
        first, second, runner = Recorder(), Recorder(), Recorder()
        ta = asyncio.create_task(tm.fetch(_req(server, "a"), runner))
        async with asyncio.timeout(10):
            await server.arrival("a").wait()
        tb1 = asyncio.create_task(tm.fetch(_req(server, "b"), first))
        await first.until(lambda: Status.WAITING in first.statuses())
        # The second watcher joins while b is still queued behind a.
        tb2 = asyncio.create_task(tm.fetch(_req(server, "b"), second))
        await second.until(lambda: Status.WAITING in second.statuses())
        assert tm.started.get(_digest(server.blobs["b"])) is None  # still queued
        server.gate("a").set()
        _, rb1, rb2 = await asyncio.gather(ta, tb1, tb2)
        assert rb1 == rb2
        assert tm.started[rb1.digest] == 1  # one transfer, two watchers
        for rec in (first, second):
            st = rec.statuses()
            assert st.count(Status.WAITING) == 1
            assert st.index(Status.WAITING) < st.index(Status.DOWNLOAD_COMPLETE)
        assert Status.WAITING not in runner.statuses()


async def test_a_watcher_joining_a_running_transfer_is_not_told_waiting(
    tmp_path: Path, server: GatedServer
) -> None:
    async with Engine.open(tmp_path / "root", _config()) as engine:
        tm = engine.transfers
        server.gate("a")
        first, late = Recorder(), Recorder()
        t1 = asyncio.create_task(tm.fetch(_req(server, "a"), first))
        async with asyncio.timeout(10):
            await server.arrival("a").wait()
        t2 = asyncio.create_task(tm.fetch(_req(server, "a"), late))
        await asyncio.sleep(0)  # let t2 register as a watcher (a yield, not a wait)
        server.gate("a").set()
        await asyncio.gather(t1, t2)
        assert Status.WAITING not in late.statuses()
        assert Status.DOWNLOAD_COMPLETE in late.statuses()


# --------------------------------------------------------------------------- in store


async def test_a_blob_in_the_store_takes_no_slot_and_is_not_started(
    tmp_path: Path, server: GatedServer
) -> None:
    async with Engine.open(tmp_path / "root", _config()) as engine:
        tm: TransferManager = engine.transfers
        await engine.ingest.layout.add_blob_bytes(server.blobs["c"])
        server.gate("a")
        ta = asyncio.create_task(tm.fetch(_req(server, "a")))
        async with asyncio.timeout(10):
            await server.arrival("a").wait()
        assert tm.running == 1  # the only slot is taken
        seen = Recorder()
        try:
            async with asyncio.timeout(10):  # before the fix this waited for a's slot
                rc = await tm.fetch(_req(server, "c"), seen)
        finally:
            if not ta.done() and "rc" not in locals():
                server.gate("a").set()
                await ta
        assert rc.existed and rc.digest == _digest(server.blobs["c"])
        assert seen.statuses() == []  # no "Waiting", no transfer events
        assert _digest(server.blobs["c"]) not in tm.started
        assert not ta.done()
        server.gate("a").set()
        await ta
        assert tm.max_running == 1
        assert set(tm.started) == {_digest(server.blobs["a"])}
        assert [r.path for r in server.requests] == ["a"]  # c never hit the server


# --------------------------------------------------------------------------- cancel


async def test_a_cancelled_attempt_is_ended_with_its_kept_bytes(tmp_path: Path) -> None:
    """Only a dead process leaves an attempt open: ``resumer status`` relies on it."""
    data = os.urandom(512 * KiB)
    srv = BlobServer({"x": data}, script=[stall(after=128 * KiB)])
    async with srv, Engine.open(tmp_path / "root", _config(), clock=FakeClock()) as engine:
        seen = Recorder()
        task = asyncio.create_task(engine.transfers.fetch(_req(srv, "x"), seen))
        await seen.until(
            lambda: any((e.current or 0) >= 128 * KiB for e in seen.events if e.current)
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        [row] = await engine.store.attempts(_digest(data))
        transfer = await engine.store.transfer(_digest(data))
    assert row.ended is not None
    assert row.error == "cancelled"
    assert row.start_offset == 0 and row.end_offset == 128 * KiB
    assert row.kept_bytes == row.wire_bytes == 128 * KiB
    assert transfer is not None and transfer.last_error == "cancelled"
