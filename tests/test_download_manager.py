"""The ordered layer download manager (resumer.download) and persistent pulls (resumer.pulls).

Docker's download-manager cases in asyncio, against real tar layers (gzip, zstd, plain)
served by the scripted BlobServer. Nothing sleeps: retry delays go through a FakeClock,
and every "slow" or "stuck" layer is held by an asyncio.Event the test releases.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from aiohttp import web
from badserver import Behaviour, BlobServer, cut, stall, status

from resumer.clock import FakeClock
from resumer.config import Config
from resumer.download import LayerDownloadError, LayerJob, PullResult, jobs_for, pull_layers
from resumer.engine import Engine
from resumer.errors import BudgetExhaustedError, NotFoundError, RegistrationError
from resumer.events import Event, Status, ignore
from resumer.lab.images import Layer, LayerSpec, make_layer
from resumer.pulls import LayerState, Pulls, PullState
from resumer.register import chain_ids
from resumer.source import UrlSource
from resumer.store import TransferState

KiB = 1024


# --------------------------------------------------------------------------- helpers


class LayerServer(BlobServer):
    """BlobServer with a script per blob (concurrent requests make one shared script
    ambiguous) and gates: a request for a gated blob waits until the test opens it."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        super().__init__({_name(x): x.read_bytes() for x in layers})
        self.scripts: dict[str, list[Behaviour]] = {}
        self.gates: dict[str, asyncio.Event] = {}

    def plan(self, layer: Layer, *behaviours: Behaviour) -> None:
        self.scripts[_name(layer)] = list(behaviours)

    def gate(self, layer: Layer) -> asyncio.Event:
        return self.gates.setdefault(_name(layer), asyncio.Event())

    def hits(self, layer: Layer) -> list[str]:
        """The Range header (or "") of every request for ``layer``."""
        return [r.headers.get("Range", "") for r in self.requests if r.path == _name(layer)]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()
        queue = self.scripts.get(name)
        # No await between choosing and the base class popping it: no other request
        # can take this behaviour.
        self.script = [queue.pop(0)] if queue else []
        return await super()._handle(request)

    async def close(self) -> None:
        for gate in self.gates.values():
            gate.set()
        await super().close()


def _name(layer: Layer) -> str:
    return layer.digest.removeprefix("sha256:")


def job(server: BlobServer, layer: Layer, *, diff_id: str | None = None) -> LayerJob:
    return LayerJob(
        layer.digest,
        layer.size,
        layer.media_type,
        diff_id or layer.diff_id,
        UrlSource(f"{server.url}/{_name(layer)}"),
    )


class Recorder:
    """Collects events, and wakes the test when a condition on them becomes true."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._waits: list[tuple[Callable[[], bool], asyncio.Event]] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        for cond, ev in self._waits:
            if not ev.is_set() and cond():
                ev.set()

    def when(self, cond: Callable[[], bool]) -> asyncio.Event:
        ev = asyncio.Event()
        if cond():
            ev.set()
        self._waits.append((cond, ev))
        return ev

    def saw(self, layer: Layer, status: str) -> bool:
        return any(e.id == _id(layer) and e.status == status for e in self.events)

    def index(self, layer: Layer, status: str) -> int:
        return next(
            i for i, e in enumerate(self.events) if e.id == _id(layer) and e.status == status
        )

    def ids(self, status: str) -> list[str]:
        return [e.id for e in self.events if e.status == status]


def _id(layer: Layer) -> str:
    return _name(layer)[:12]


def config(**kw: object) -> Config:
    base: dict[str, object] = {
        "max_concurrent_downloads": 3,
        "max_download_attempts": 5,
        "chunk_size": 64 * KiB,
    }
    base.update(kw)
    return Config(**base)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def opened(root: Path, cfg: Config) -> AsyncIterator[Engine]:
    async with Engine.open(root, cfg, clock=FakeClock()) as engine:
        yield engine


async def pull(
    engine: Engine,
    jobs: Sequence[LayerJob],
    emit: Callable[[Event], None] = ignore,
    pull_id: int | None = None,
) -> PullResult:
    return await pull_layers(
        jobs,
        transfers=engine.transfers,
        store=engine.store,
        config=engine.config,
        emit=emit,
        pull_id=pull_id,
    )


async def stored_pull(engine: Engine, jobs: Sequence[LayerJob], ref: str = "lab/app:1") -> int:
    return await Pulls(engine.store).create(ref, dest=str(engine.root / "out"), layers=jobs)


async def chain_rows(engine: Engine) -> list[tuple[str, str, str | None, str]]:
    rows = await engine.store.read(
        "SELECT chain_id, diff_id, parent_chain_id, blob_digest FROM layers ORDER BY rowid"
    )
    return [tuple(r) for r in rows]  # type: ignore[misc]


async def layer_states(engine: Engine, pull_id: int) -> list[LayerState]:
    got = await Pulls(engine.store).get(pull_id)
    assert got is not None
    return [x.state for x in got.layers]


def expected_rows(stack: Sequence[Layer]) -> list[tuple[str, str, str | None, str]]:
    chains = chain_ids([x.diff_id for x in stack])
    return [
        (chains[i], x.diff_id, chains[i - 1] if i else None, x.digest) for i, x in enumerate(stack)
    ]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> list[Layer]:
    """Small real layers: compressible gzip/zstd/plain tars, and a few bigger random
    ones (for stalls and cuts mid-body)."""
    work = tmp_path_factory.mktemp("layers")
    specs = [
        LayerSpec(48 * KiB, "gzip"),
        LayerSpec(48 * KiB, "zstd"),
        LayerSpec(32 * KiB, "none"),
        LayerSpec(48 * KiB, "gzip"),
        LayerSpec(40 * KiB, "zstd"),
        LayerSpec(40 * KiB, "gzip"),
        LayerSpec(320 * KiB, "gzip", compressible=False),
        LayerSpec(320 * KiB, "zstd", compressible=False),
    ]
    return [make_layer(work, spec, seed=100 + i) for i, spec in enumerate(specs)]


@pytest.fixture
async def server(pool: list[Layer]) -> AsyncIterator[LayerServer]:
    async with LayerServer(pool) as srv:
        yield srv


# --------------------------------------------------------------------------- pulls table


async def test_pulls_are_stored_found_and_joined(tmp_path: Path, pool: list[Layer]) -> None:
    async with opened(tmp_path / "root", config()) as engine:
        pulls = Pulls(engine.store)
        descs = [job(BlobServer({}), x) for x in pool[:3]]
        a = await pulls.create(
            "lab/app:1",
            dest="/d",
            layers=descs,
            manifest_digest="sha256:" + "a" * 64,
            platform="linux/amd64",
            options={"max_download_attempts": 3},
        )
        b = await pulls.create("lab/other:1", dest="/d", layers=descs[:1])
        got = await pulls.get(a)
        assert got is not None
        assert got.state is PullState.PENDING
        assert got.options == {"max_download_attempts": 3}
        assert [(x.position, x.digest, x.size, x.diff_id, x.state) for x in got.layers] == [
            (i, x.digest, x.size, x.diff_id, LayerState.PENDING) for i, x in enumerate(pool[:3])
        ]
        assert [p.id for p in await pulls.unfinished()] == [a, b]  # creation order

        # Pulling the same reference into the same destination joins the stored pull.
        found = await pulls.find_unfinished("lab/app:1", "/d")
        assert found is not None and found.id == a
        assert await pulls.find_unfinished("lab/app:1", "/elsewhere") is None
        assert await pulls.create_or_join(
            "lab/app:1", dest="/d", layers=descs, manifest_digest="sha256:" + "a" * 64
        ) == (a, True)

        # A failed pull is still unfinished (resume retries it); a done one is not.
        await pulls.set_state(a, PullState.FAILED, error="layer 2: gave up")
        found = await pulls.find_unfinished("lab/app:1", "/d")
        assert found is not None and found.last_error == "layer 2: gave up"
        await pulls.set_state(b, PullState.DONE)
        assert [p.id for p in await pulls.unfinished()] == [a]

        # The tag moved: the stale pull is forgotten, a new one is stored.
        c, joined = await pulls.create_or_join(
            "lab/app:1", dest="/d", layers=descs[:2], manifest_digest="sha256:" + "c" * 64
        )
        assert not joined and c not in (a, b)
        assert await pulls.get(a) is None
        assert [p.id for p in await pulls.unfinished()] == [c]

        chains = chain_ids([x.diff_id for x in pool[:2]])
        assert not await pulls.has_chain(chains[0])
        await pulls.register_chain(
            chains[0], pool[0].diff_id, None, pool[0].digest, pull_id=c, positions=[0]
        )
        assert await pulls.has_chain(chains[0])
        assert await layer_states(engine, c) == [LayerState.REGISTERED, LayerState.PENDING]


# --------------------------------------------------------------------------- success


async def test_multi_layer_pull_registers_in_order(
    tmp_path: Path, pool: list[Layer], server: LayerServer
) -> None:
    stack = pool[:4]  # gzip, zstd, plain tar, gzip
    rec = Recorder()
    async with opened(tmp_path / "root", config()) as engine:
        jobs = [job(server, x) for x in stack]
        pull_id = await stored_pull(engine, jobs)
        result = await pull(engine, jobs, rec, pull_id)

        assert result.chain_ids == chain_ids([x.diff_id for x in stack])
        assert result.existed == []
        assert await chain_rows(engine) == expected_rows(stack)
        assert await layer_states(engine, pull_id) == [LayerState.REGISTERED] * 4
        assert result.stats.payload_bytes == sum(x.size for x in stack)
        assert result.stats.attempts == 4
        for x, path in zip(stack, result.blobs, strict=True):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == _name(x)
        assert rec.ids(Status.PULL_COMPLETE) == [_id(x) for x in stack]
        for x in stack:
            assert rec.index(x, Status.PULLING_FS_LAYER) < rec.index(x, Status.DOWNLOAD_COMPLETE)
            assert rec.index(x, Status.DOWNLOAD_COMPLETE) < rec.index(x, Status.EXTRACTING)
            assert rec.index(x, Status.EXTRACTING) < rec.index(x, Status.PULL_COMPLETE)

        # Again: every chain is registered, so every layer "Already exists", no transfer.
        requests = len(server.requests)
        rec2 = Recorder()
        again = await pull(engine, jobs, rec2)
        assert again.existed == [0, 1, 2, 3]
        assert rec2.ids(Status.ALREADY_EXISTS) == [_id(x) for x in stack]
        assert [e.status for e in rec2.events] == [Status.ALREADY_EXISTS] * 4
        assert len(server.requests) == requests
        assert again.stats.attempts == 0


async def test_blob_present_but_chain_unregistered_is_registered_without_transfer(
    tmp_path: Path, pool: list[Layer], server: LayerServer
) -> None:
    # A base shared with another image: same blob, but on a different parent here.
    async with opened(tmp_path / "root", config()) as engine:
        await pull(engine, [job(server, pool[1])])
        requests = len(server.requests)
        rec = Recorder()
        stack = [pool[0], pool[1]]
        await pull(engine, [job(server, x) for x in stack], rec)
        assert server.hits(pool[1]) == [""]  # fetched once, by the first pull
        assert len(server.requests) == requests + 1
        assert rec.saw(pool[1], Status.DOWNLOAD_COMPLETE) and rec.saw(pool[1], Status.PULL_COMPLETE)
        assert (await chain_rows(engine))[1:] == expected_rows(stack)


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("limit", [1, 2, 3])
async def test_concurrency_never_exceeds_the_limit(
    tmp_path: Path, pool: list[Layer], server: LayerServer, limit: int
) -> None:
    stack = pool[:6]
    rec = Recorder()
    async with opened(tmp_path / "root", config(max_concurrent_downloads=limit)) as engine:
        await pull(engine, [job(server, x) for x in stack], rec)
        assert engine.transfers.max_running == limit  # reached, never exceeded
        # The layers beyond the limit queued, and said so.
        assert len(set(rec.ids(Status.WAITING))) == len(stack) - limit
        assert rec.ids(Status.PULL_COMPLETE) == [_id(x) for x in stack]


# --------------------------------------------------------------------------- dedup


async def test_a_layer_twice_in_one_stack_is_transferred_once(
    tmp_path: Path, pool: list[Layer], server: LayerServer
) -> None:
    a, b, c = pool[0], pool[1], pool[2]
    stack = [a, b, a, c]
    rec = Recorder()
    async with opened(tmp_path / "root", config()) as engine:
        pull_id = await stored_pull(engine, [job(server, x) for x in stack])
        result = await pull(engine, [job(server, x) for x in stack], rec, pull_id)
        assert engine.transfers.started[a.digest] == 1
        assert server.hits(a) == [""]
        # Registered again on its own parent: four chains, the third on top of b.
        assert await chain_rows(engine) == expected_rows(stack)
        assert result.chain_ids[2] != result.chain_ids[0]
        assert rec.ids(Status.PULL_COMPLETE) == [_id(x) for x in stack]
        assert result.stats.payload_bytes == a.size + b.size + c.size
        assert await layer_states(engine, pull_id) == [LayerState.REGISTERED] * 4


async def test_two_concurrent_pulls_share_transfers(
    tmp_path: Path, pool: list[Layer], server: LayerServer
) -> None:
    a, b, c, d = pool[0], pool[1], pool[2], pool[3]
    shared = {a.digest, b.digest}
    async with opened(tmp_path / "root", config(max_concurrent_downloads=4)) as engine:
        # Hold the shared blobs until both pulls watch them, so neither can finish
        # before the other asks (which would be a second, if cheap, transfer).
        calls: dict[str, int] = {}
        both = asyncio.Event()
        real_fetch = engine.transfers.fetch

        async def counting_fetch(req, emit=ignore):  # type: ignore[no-untyped-def]
            calls[req.key] = calls.get(req.key, 0) + 1
            if all(calls.get(k, 0) == 2 for k in shared):
                both.set()
            return await real_fetch(req, emit)

        engine.transfers.fetch = counting_fetch  # type: ignore[method-assign]
        for x in (a, b):
            server.gate(x)

        async def release() -> None:
            await both.wait()
            for x in (a, b):
                server.gate(x).set()

        releaser = asyncio.create_task(release())
        r1, r2 = await asyncio.gather(
            pull(engine, [job(server, x) for x in (a, b, c)]),
            pull(engine, [job(server, x) for x in (a, b, d)]),
        )
        await releaser
        for x in (a, b, c, d):
            assert engine.transfers.started[x.digest] == 1
            assert server.hits(x) == [""]
        assert r1.chain_ids[:2] == r2.chain_ids[:2]
        rows = await chain_rows(engine)
        assert sorted(rows) == sorted(set(expected_rows([a, b, c]) + expected_rows([a, b, d])))


# --------------------------------------------------------------------------- cancellation


async def test_cancel_mid_pull_keeps_partials_and_registers_nothing_past_the_point(
    tmp_path: Path, pool: list[Layer], server: LayerServer
) -> None:
    small, big1, big2 = pool[0], pool[6], pool[7]
    stack = [small, big1, big2]
    server.plan(big1, stall(100 * KiB))
    server.plan(big2, stall(100 * KiB))
    rec = Recorder()
    async with opened(tmp_path / "root", config()) as engine:
        jobs = [job(server, x) for x in stack]
        pull_id = await stored_pull(engine, jobs)
        ready = rec.when(
            lambda: (
                rec.saw(small, Status.PULL_COMPLETE)
                and rec.saw(big1, Status.DOWNLOADING)
                and rec.saw(big2, Status.DOWNLOADING)
            )
        )
        task = asyncio.create_task(pull(engine, jobs, rec, pull_id))
        await ready.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        assert await chain_rows(engine) == expected_rows([small])
        assert await layer_states(engine, pull_id) == [
            LayerState.REGISTERED,
            LayerState.PENDING,
            LayerState.PENDING,
        ]
        offsets = {}
        for x in (big1, big2):
            partial = engine.ingest.partial_path(x.digest)
            row = await engine.store.transfer(x.digest)
            assert row is not None and row.state is TransferState.PARTIAL
            assert 0 < row.offset <= 100 * KiB
            assert partial.stat().st_size >= row.offset  # the bytes are on disk
            offsets[x.digest] = row.offset
            assert not engine.ingest.has_blob(x.digest)

        # The next run continues from the partials with Range, and finishes.
        rec2 = Recorder()
        result = await pull(engine, jobs, rec2, pull_id)
        assert result.existed == [0]
        for x in (big1, big2):
            assert server.hits(x)[-1] == f"bytes={offsets[x.digest]}-"
        assert await chain_rows(engine) == expected_rows(stack)
        assert result.stats.wire_bytes == sum(x.size - offsets[x.digest] for x in (big1, big2))


# --------------------------------------------------------------------------- budget


@pytest.mark.parametrize(
    ("attempts", "failures"),
    [(1, 0), (1, 1), (2, 1), (2, 2), (3, 2), (3, 3), (5, 4), (5, 5), (5, 9)],
)
async def test_max_attempts_per_layer(
    tmp_path: Path, pool: list[Layer], server: LayerServer, attempts: int, failures: int
) -> None:
    """Docker's table: a layer that fails ``failures`` times gets ``attempts`` tries."""
    base, other, flaky, top = pool[0], pool[7], pool[6], pool[1]
    stack = [base, other, flaky, top]
    fails = failures >= attempts
    # Each failed attempt is cut after 16 KiB more: resumed attempts count like any other.
    server.plan(flaky, *[cut(16 * KiB)] * failures)
    rec = Recorder()
    if fails:
        # Another layer is mid-body when the budget runs out: it must be checkpointed.
        server.plan(other, stall(64 * KiB))
        gate = server.gate(flaky)
    async with opened(tmp_path / "root", config(max_download_attempts=attempts)) as engine:
        jobs = [job(server, x) for x in stack]
        pull_id = await stored_pull(engine, jobs)
        task = asyncio.create_task(pull(engine, jobs, rec, pull_id))
        if not fails:
            await task
            assert len(server.hits(flaky)) == failures + 1
            assert await chain_rows(engine) == expected_rows(stack)
            return
        await rec.when(
            lambda: rec.saw(base, Status.PULL_COMPLETE) and rec.saw(other, Status.DOWNLOADING)
        ).wait()
        gate.set()
        with pytest.raises(LayerDownloadError) as info:
            await task
        err = info.value
        assert err.position == 2 and err.digest == flaky.digest
        assert flaky.digest in str(err) and str(err).startswith("layer 2")
        assert isinstance(err.cause, BudgetExhaustedError)
        assert err.cause.attempts == attempts
        assert f"after {attempts} attempt(s)" in str(err)

        hits = server.hits(flaky)
        assert len(hits) == attempts
        assert hits == [""] + [f"bytes={16 * KiB * n}-" for n in range(1, attempts)]
        # Every failed attempt kept its 16 KiB, so each reconnected at once (DESIGN.md's
        # retry delay after progress); the budget alone stopped the layer.
        assert engine.clock.sleeps == []  # type: ignore[attr-defined]

        # Everything below is kept: the base registered, the other layer checkpointed.
        assert await chain_rows(engine) == expected_rows([base])
        row = await engine.store.transfer(other.digest)
        assert row is not None and row.state is TransferState.PARTIAL and row.offset > 0
        row = await engine.store.transfer(flaky.digest)
        assert row is not None and row.state is TransferState.FAILED
        assert row.offset == 16 * KiB * attempts
        assert await layer_states(engine, pull_id) == [
            LayerState.REGISTERED,
            LayerState.PENDING,
            LayerState.FAILED,
            LayerState.FAILED,
        ]


# --------------------------------------------------------------------------- failure


async def test_failing_middle_layer_fails_the_layers_above(
    tmp_path: Path, pool: list[Layer], server: LayerServer
) -> None:
    a, b, c, d = pool[0], pool[1], pool[2], pool[3]
    stack = [a, b, c, d]
    server.plan(b, status(404))
    gate = server.gate(b)
    rec = Recorder()
    async with opened(tmp_path / "root", config(max_concurrent_downloads=4)) as engine:
        jobs = [job(server, x) for x in stack]
        pull_id = await stored_pull(engine, jobs)
        task = asyncio.create_task(pull(engine, jobs, rec, pull_id))
        await rec.when(lambda: rec.saw(a, Status.PULL_COMPLETE)).wait()
        gate.set()
        with pytest.raises(LayerDownloadError) as info:
            await task
        assert info.value.position == 1 and info.value.digest == b.digest
        assert isinstance(info.value.cause, NotFoundError)  # not retried
        assert server.hits(b) == [""]
        assert await chain_rows(engine) == expected_rows([a])
        assert await layer_states(engine, pull_id) == [
            LayerState.REGISTERED,
            LayerState.FAILED,
            LayerState.FAILED,
            LayerState.FAILED,
        ]
        assert rec.ids(Status.PULL_COMPLETE) == [_id(a)]

        # Nothing lost: the next run registers the rest; a is not fetched again.
        result = await pull(engine, jobs, Recorder(), pull_id)
        assert result.existed == [0]
        assert server.hits(a) == [""]
        assert await chain_rows(engine) == expected_rows(stack)
        assert await layer_states(engine, pull_id) == [LayerState.REGISTERED] * 4


async def test_registration_failure_cancels_in_flight_transfers(
    tmp_path: Path, pool: list[Layer], server: LayerServer
) -> None:
    a, big = pool[0], pool[6]
    server.plan(big, stall(64 * KiB))
    rec = Recorder()
    async with opened(tmp_path / "root", config()) as engine:
        jobs = [job(server, a, diff_id=pool[1].diff_id), job(server, big)]
        task = asyncio.create_task(pull(engine, jobs, rec))
        await rec.when(lambda: rec.saw(big, Status.DOWNLOADING)).wait()
        with pytest.raises(RegistrationError):
            await task  # does not wait for the stalled layer: it is cancelled
        row = await engine.store.transfer(big.digest)
        assert row is not None and row.state is TransferState.PARTIAL and row.offset > 0


# --------------------------------------------------------------------------- ordering


async def test_slow_first_layer_still_completes_first(
    tmp_path: Path, pool: list[Layer], server: LayerServer
) -> None:
    first, *rest = stack = pool[:4]
    gate = server.gate(first)
    rec = Recorder()
    async with opened(tmp_path / "root", config(max_concurrent_downloads=4)) as engine:
        task = asyncio.create_task(pull(engine, [job(server, x) for x in stack], rec))
        # The first layer's server holds it until every later layer has downloaded.
        await rec.when(lambda: all(rec.saw(x, Status.DOWNLOAD_COMPLETE) for x in rest)).wait()
        assert not any(e.status == Status.PULL_COMPLETE for e in rec.events)
        gate.set()
        await task
    assert rec.ids(Status.PULL_COMPLETE) == [_id(x) for x in stack]
    first_done = rec.index(first, Status.DOWNLOAD_COMPLETE)
    for x in rest:
        assert rec.index(x, Status.DOWNLOAD_COMPLETE) < first_done
        assert rec.index(x, Status.PULL_COMPLETE) > rec.index(first, Status.PULL_COMPLETE)


# --------------------------------------------------------------------------- registration


async def test_diff_id_mismatch_is_a_clear_error_and_not_registered(
    tmp_path: Path, pool: list[Layer], server: LayerServer
) -> None:
    a, b, c = pool[0], pool[1], pool[2]
    jobs = [job(server, a), job(server, b, diff_id=c.diff_id), job(server, c)]
    rec = Recorder()
    async with opened(tmp_path / "root", config()) as engine:
        pull_id = await stored_pull(engine, jobs)
        with pytest.raises(RegistrationError) as info:
            await pull(engine, jobs, rec, pull_id)
        text = str(info.value)
        assert "layer 1" in text and b.digest in text
        assert b.diff_id in text and c.diff_id in text
        assert await chain_rows(engine) == expected_rows([a])
        assert await layer_states(engine, pull_id) == [
            LayerState.REGISTERED,
            LayerState.FAILED,
            LayerState.FAILED,
        ]
        assert rec.ids(Status.PULL_COMPLETE) == [_id(a)]


async def test_decompression_bomb_limit(
    tmp_path: Path, pool: list[Layer], server: LayerServer
) -> None:
    layer = pool[0]  # 48 KiB of tar content, compressed
    async with opened(tmp_path / "root", config(max_uncompressed_bytes=16 * KiB)) as engine:
        with pytest.raises(RegistrationError, match="exceeds 16384 bytes"):
            await pull(engine, [job(server, layer)])
        assert await chain_rows(engine) == []


async def test_jobs_for_a_stored_pull(tmp_path: Path, pool: list[Layer]) -> None:
    srv = BlobServer({})
    async with opened(tmp_path / "root", config()) as engine:
        jobs = [job(srv, x) for x in pool[:3]]
        pull_id = await stored_pull(engine, jobs)
        stored = await Pulls(engine.store).get(pull_id)
        assert stored is not None
        again = jobs_for(stored, lambda layer: jobs[layer.position].source)
        assert again == jobs
