"""Garbage collection keeps partials within their disk budget and removes orphans."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from badserver import BlobServer, cut

from resumer.clock import FakeClock
from resumer.config import Config
from resumer.engine import Engine
from resumer.errors import BudgetExhaustedError

SIZE = 200_000


async def _leave_partial(root: Path, srv: BlobServer, name: str, at: int, clock: FakeClock) -> None:
    srv.script = [cut(at)]
    cfg = Config(max_download_attempts=1, chunk_size=4096)
    async with Engine.open(root, cfg, clock=clock) as engine:
        with pytest.raises(BudgetExhaustedError):
            await engine.fetch(f"{srv.url}/{name}", digest=srv.digest(name))
    clock.now += 10  # later partials are younger


async def test_partials_over_the_budget_are_removed_oldest_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blobs = {n: os.urandom(SIZE) for n in ("a", "b", "c")}
    clock = FakeClock()
    async with BlobServer(blobs) as srv:
        for name in ("a", "b", "c"):
            await _leave_partial(tmp_path, srv, name, 100_000, clock)
        ingest = tmp_path / "ingest"
        assert len(list(ingest.iterdir())) == 3
        caplog.set_level(logging.WARNING, logger="resumer.gc")
        # Room for two partials: the oldest one ("a") goes.
        async with Engine.open(tmp_path, Config(partial_budget_bytes=250_000), clock=clock) as e:
            assert await e.store.transfer(srv.digest("a")) is None
            assert await e.store.transfer(srv.digest("c")) is not None
        left = sorted(p.name for p in ingest.iterdir())
        assert left == sorted("sha256-" + srv.digest(n)[7:] for n in ("b", "c"))
        assert "over the 250000-byte budget" in caplog.text
        # What is left still resumes: only the rest is fetched.
        served = srv.bytes_served
        async with Engine.open(tmp_path, Config(), clock=clock) as engine:
            res = await engine.fetch(f"{srv.url}/c", digest=srv.digest("c"))
        assert res.stats.wire_bytes == SIZE - 100_000
        assert srv.bytes_served - served == SIZE - 100_000


async def test_orphan_files_in_ingest_are_removed(tmp_path: Path) -> None:
    async with Engine.open(tmp_path, Config()):
        pass
    orphan = tmp_path / "ingest" / ("sha256-" + "0" * 64)
    orphan.write_bytes(b"x" * 1000)
    async with Engine.open(tmp_path, Config()):
        pass
    assert not orphan.exists()
