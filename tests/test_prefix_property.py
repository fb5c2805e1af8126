"""Property: whatever fails, runs out of budget or is cancelled, the registered chains are
a prefix of the stack, and never anything else.

Hypothesis draws a stack over a small pool of real layers (repeats allowed), a behaviour
per blob (honest, 404, or N failures by 503 or by a cut mid-body), a budget, a concurrency
limit and an optional cancellation after the k-th progress event.
"""

from __future__ import annotations

import asyncio
import collections
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from badserver import Behaviour, cut, status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_download_manager import KiB, LayerServer, job

from resumer.clock import FakeClock
from resumer.config import Config
from resumer.download import LayerDownloadError, pull_layers
from resumer.engine import Engine
from resumer.errors import RegistrationError
from resumer.events import Event
from resumer.lab.images import Layer, LayerSpec, make_layer
from resumer.pulls import LayerState, Pulls
from resumer.register import chain_ids

POOL = 4
OUTCOMES: collections.Counter[str] = collections.Counter()  # for eyeballing coverage
CUT = 4 * KiB  # each failing cut keeps this much more; layers are ≥ 24 KiB


@dataclass(frozen=True)
class Fault:
    kind: str  # "ok" | "404" | "503" | "cut"
    times: int = 0

    def script(self) -> list[Behaviour]:
        if self.kind == "404":
            return [status(404)]
        if self.kind == "503":
            return [status(503)] * self.times
        if self.kind == "cut":
            return [cut(CUT)] * self.times
        return []

    def fatal(self, budget: int) -> bool:
        return self.kind == "404" or (self.kind != "ok" and self.times >= budget)


faults = st.one_of(
    st.just(Fault("ok")),
    st.just(Fault("404")),
    st.builds(Fault, st.sampled_from(["503", "cut"]), st.integers(1, 4)),
)


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory: pytest.TempPathFactory) -> list[Layer]:
    work = tmp_path_factory.mktemp("prefix-layers")
    kinds = ["gzip", "zstd", "none", "gzip"]
    return [
        make_layer(work, LayerSpec((24 + 4 * i) * KiB, kinds[i], compressible=False), seed=7 + i)  # type: ignore[arg-type]
        for i in range(POOL)
    ]


@settings(
    max_examples=int(os.environ.get("RESUMER_PREFIX_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    stack=st.lists(st.integers(0, POOL - 1), min_size=1, max_size=6),
    plan=st.lists(faults, min_size=POOL, max_size=POOL),
    budget=st.integers(1, 4),
    limit=st.integers(1, 3),
    cancel_after=st.one_of(st.none(), st.integers(0, 30)),
)
def test_registered_chains_are_always_a_prefix(
    small_pool: list[Layer],
    stack: list[int],
    plan: list[Fault],
    budget: int,
    limit: int,
    cancel_after: int | None,
) -> None:
    asyncio.run(_scenario(small_pool, stack, plan, budget, limit, cancel_after))


async def _scenario(
    pool: list[Layer],
    stack: list[int],
    plan: list[Fault],
    budget: int,
    limit: int,
    cancel_after: int | None,
) -> None:
    layers = [pool[i] for i in stack]
    chains = chain_ids([x.diff_id for x in layers])
    cfg = Config(max_download_attempts=budget, max_concurrent_downloads=limit, chunk_size=8 * KiB)
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            LayerServer(pool) as server,
            Engine.open(Path(tmp), cfg, clock=FakeClock()) as engine,
        ):
            for i, layer in enumerate(pool):
                server.plan(layer, *plan[i].script())
            jobs = [job(server, x) for x in layers]
            pull_id = await Pulls(engine.store).create("lab/p:1", dest=tmp, layers=jobs)
            seen = 0
            task: asyncio.Task[object] | None = None

            def emit(_: Event) -> None:
                nonlocal seen
                seen += 1
                if seen == cancel_after and task is not None:
                    task.cancel()

            task = asyncio.create_task(
                pull_layers(
                    jobs,
                    transfers=engine.transfers,
                    store=engine.store,
                    config=cfg,
                    emit=emit,
                    pull_id=pull_id,
                )
            )
            outcome: BaseException | None = None
            try:
                await task
            except (asyncio.CancelledError, LayerDownloadError, RegistrationError) as exc:
                outcome = exc

            rows = await engine.store.read(
                "SELECT chain_id, parent_chain_id FROM layers ORDER BY rowid"
            )
            got = [r[0] for r in rows]
            k = len(got)
            # The property: exactly the first k chains, registered bottom first, each
            # on its parent.
            assert got == chains[:k], (got, chains)
            assert [r[1] for r in rows] == [None, *chains[: k - 1]][:k]
            stored = await Pulls(engine.store).get(pull_id)
            assert stored is not None
            states = [x.state for x in stored.layers]
            assert [s is LayerState.REGISTERED for s in states] == [
                i < k for i in range(len(layers))
            ]

            fatal = [i for i, n in enumerate(stack) if plan[n].fatal(budget)]
            if outcome is None:
                assert not fatal
                assert k == len(layers)
            elif isinstance(outcome, LayerDownloadError):
                # It names a layer that really failed; nothing at or above it registered.
                assert outcome.position in fatal
                assert k <= outcome.position
                assert all(s is LayerState.FAILED for s in states[outcome.position :])
            elif isinstance(outcome, RegistrationError):
                pytest.fail(f"real layers must register: {outcome}")
            else:
                assert cancel_after is not None
                # A failure can beat the cancellation by a hair; otherwise nothing failed.
                assert fatal or LayerState.FAILED not in states
            OUTCOMES[type(outcome).__name__ if outcome else "ok"] += 1
            for n in set(stack):
                # A budget is a budget: never more attempts than it allows in one run.
                assert len(server.hits(pool[n])) <= budget
