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


async def test_an_unrecorded_partial_is_kept_aside_not_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Engine.open(tmp_path, Config()):
        pass
    orphan = tmp_path / "ingest" / ("sha256-" + "0" * 64)
    orphan.write_bytes(b"x" * 1000)
    caplog.set_level(logging.WARNING, logger="resumer.gc")
    async with Engine.open(tmp_path, Config()):
        pass
    assert not orphan.exists()
    kept = tmp_path / "ingest" / "orphans" / orphan.name
    assert kept.read_bytes() == b"x" * 1000
    assert "has no record; kept aside" in caplog.text


@pytest.mark.parametrize("how", ["deleted", "emptied"])
async def test_a_lost_state_db_costs_no_partial_the_next_fetch_adopts_it(
    tmp_path: Path, how: str
) -> None:
    clock = FakeClock()
    data = {"a": os.urandom(SIZE)}
    async with BlobServer(data) as srv:
        await _leave_partial(tmp_path, srv, "a", 120_000, clock)
        db = tmp_path / "state.db"
        for extra in ("-wal", "-shm"):
            db.with_name(db.name + extra).unlink(missing_ok=True)
        if how == "deleted":
            db.unlink()
        else:
            db.write_bytes(b"")
        served = srv.bytes_served
        async with Engine.open(tmp_path, Config(chunk_size=4096), clock=clock) as engine:
            res = await engine.fetch(f"{srv.url}/a", digest=srv.digest("a"))
        assert res.path.read_bytes() == data["a"]
        # Only whole chunks of the orphan are adopted: at most one chunk comes again.
        assert srv.bytes_served - served <= SIZE - 120_000 + 4096
        assert not list((tmp_path / "ingest" / "orphans").iterdir())


async def test_an_adopted_partial_that_is_wrong_restarts_from_zero_and_commits_the_right_blob(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    data = {"a": os.urandom(SIZE)}
    async with BlobServer(data) as srv:
        await _leave_partial(tmp_path, srv, "a", 120_000, clock)
        (tmp_path / "state.db").unlink()
        for extra in ("-wal", "-shm"):
            (tmp_path / f"state.db{extra}").unlink(missing_ok=True)
        partial = tmp_path / "ingest" / ("sha256-" + srv.digest("a")[7:])
        with partial.open("r+b") as f:  # a torn write nobody recorded
            f.seek(5000)
            f.write(b"\0" * 4096)
        async with Engine.open(tmp_path, Config(chunk_size=4096), clock=clock) as engine:
            res = await engine.fetch(f"{srv.url}/a", digest=srv.digest("a"))
        assert res.path.read_bytes() == data["a"]
        assert res.stats.wasted_bytes > 0  # the mismatch is accounted for


async def test_the_budget_takes_orphans_first_and_prune_removes_the_rest(tmp_path: Path) -> None:
    clock = FakeClock()
    blobs = {n: os.urandom(SIZE) for n in ("a", "b")}
    async with BlobServer(blobs) as srv:
        await _leave_partial(tmp_path, srv, "a", 100_000, clock)
        await _leave_partial(tmp_path, srv, "b", 100_000, clock)
        orphans = tmp_path / "ingest" / "orphans"
        for n in ("old", "new"):
            (tmp_path / "ingest" / f"sha256-{n * 10}").write_bytes(b"o" * 100_000)
        async with Engine.open(tmp_path, Config(), clock=clock):
            pass
        assert len(list(orphans.iterdir())) == 2
        # Room for the two recorded partials only: both orphans go, no recorded partial.
        async with Engine.open(tmp_path, Config(partial_budget_bytes=200_000), clock=clock) as e:
            assert await e.store.transfer(srv.digest("a")) is not None
            assert await e.store.transfer(srv.digest("b")) is not None
        assert not list(orphans.iterdir())
        (tmp_path / "ingest" / "sha256-late").write_bytes(b"o" * 10)
        async with Engine.open(tmp_path, Config(), clock=clock) as engine:
            from resumer.gc import prune_orphans

            assert await prune_orphans(engine.ingest) == [("sha256-late", 10)]
            assert await engine.store.transfer(srv.digest("a")) is not None
