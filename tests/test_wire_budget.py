"""``max-wire-bytes``: a run stops cleanly once its body bytes reach the budget.

Within one network read of the limit (at most 256 KiB over), with every partial kept,
a distinct error (exit 1 from the CLI), and a next run that moves only what is missing:
its wire bytes are the blob minus what the first run kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
from badserver import BlobServer
from test_helpers_core import make_blob, open_engine, run_cli_child

from resumer import fetch as fetch_module
from resumer.config import Config, KiB, MiB
from resumer.engine import Engine
from resumer.errors import WireBudgetExhaustedError
from resumer.store import TransferState

ONE_READ = 256 * KiB
SIZE = 4 * MiB
DATA = make_blob(SIZE, seed=21)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


async def _run_totals(engine: Engine) -> tuple[int, int]:
    """(wire bytes, kept bytes) of every attempt the store holds."""
    rows = [a for a in await engine.store.attempts(None) if a.attempt_no > 0]
    return sum(a.wire_bytes for a in rows), sum(a.kept_bytes for a in rows)


@pytest.mark.parametrize("direct", [True, False], ids=["direct-body", "stream-reader"])
async def test_the_budget_stops_within_one_read_keeps_the_partial_and_the_next_run_ends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    monkeypatch.setattr(fetch_module, "_DIRECT_BODY", direct)
    budget = 1536 * KiB
    root = tmp_path / "root"
    async with BlobServer({"b": DATA}) as srv:
        url = f"{srv.url}/b"
        async with open_engine(root, max_wire_bytes=budget) as eng:
            with pytest.raises(WireBudgetExhaustedError) as info:
                await eng.fetch(url, digest=DIGEST, dest=tmp_path / "out")
            wire, kept = await _run_totals(eng)
            row = await eng.store.transfer(DIGEST)
        err = info.value
        assert (err.budget, err.used) == (budget, wire)
        print(f"wire-budget overshoot: {wire - budget} B")
        assert budget <= wire <= budget + ONE_READ, wire - budget
        assert kept == wire  # nothing thrown away: every byte received is in the partial
        assert srv.requests and len(srv.requests) == 1  # not retried: a new attempt would spend
        assert row is not None and row.state is not TransferState.COMMITTED
        assert not (tmp_path / "out").exists()
        text = str(err)
        assert str(budget) in text and str(wire) in text and "again" in text

        served_before = srv.bytes_served
        async with open_engine(root) as eng:
            result = await eng.fetch(url, digest=DIGEST, dest=tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == DATA
        assert result.stats.wire_bytes == SIZE - kept
        assert srv.bytes_served - served_before == SIZE - kept  # as the server counts it


async def test_three_transfers_share_one_budget_and_every_partial_is_kept(tmp_path: Path) -> None:
    blobs = {f"b{i}": make_blob(2 * MiB, seed=30 + i) for i in range(3)}
    digests = {k: "sha256:" + hashlib.sha256(v).hexdigest() for k, v in blobs.items()}
    budget = 3 * MiB
    root = tmp_path / "root"
    async with BlobServer(blobs) as srv:
        async with open_engine(root, max_wire_bytes=budget) as eng:
            results = await asyncio.gather(
                *(eng.fetch(f"{srv.url}/{k}", digest=digests[k]) for k in blobs),
                return_exceptions=True,
            )
            wire, kept = await _run_totals(eng)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors and all(isinstance(e, WireBudgetExhaustedError) for e in errors), errors
        print(f"wire-budget overshoot: {wire - budget} B")
        assert budget <= wire <= budget + ONE_READ, wire - budget
        assert kept == wire
        served_before = srv.bytes_served
        async with open_engine(root) as eng:
            again = await asyncio.gather(
                *(eng.fetch(f"{srv.url}/{k}", digest=digests[k]) for k in blobs)
            )
        assert sum(r.stats.wire_bytes for r in again) == 6 * MiB - kept
        assert srv.bytes_served - served_before == 6 * MiB - kept
        for k, r in zip(blobs, again, strict=True):
            assert r.path.read_bytes() == blobs[k]


async def test_a_budget_exactly_the_blob_lets_it_complete(tmp_path: Path) -> None:
    async with (
        BlobServer({"b": DATA}) as srv,
        open_engine(tmp_path / "r", max_wire_bytes=SIZE) as eng,
    ):
        result = await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out")
    assert result.stats.wire_bytes == SIZE
    assert (tmp_path / "out").read_bytes() == DATA


def _argv(url: str, out: Path, root: Path, *extra: str) -> list[str]:
    return ["fetch", url, "--digest", DIGEST, "-o", str(out), "--root", str(root), *extra]


async def test_cli_exits_1_with_the_distinct_message_and_the_next_run_continues(
    tmp_path: Path,
) -> None:
    out, root = tmp_path / "out.bin", tmp_path / "root"
    async with BlobServer({"b": DATA}) as srv:
        url = f"{srv.url}/b"
        code, stdout, stderr = await run_cli_child(
            *_argv(url, out, root, "--max-wire-bytes", "1M", "--progress", "plain")
        )
        assert code == 1, stderr
        assert "Wire budget: 1 MiB for this run" in stdout
        assert "wire-byte budget spent" in stderr and "budget 1048576 bytes" in stderr
        assert "run the same command again" in stderr
        assert not out.exists()
        first_run_served = srv.bytes_served
        async with Engine.open(root, Config()) as eng:
            wire, kept = await _run_totals(eng)
            row = await eng.store.transfer(DIGEST)
        assert row is not None and row.state is not TransferState.COMMITTED
        print(f"wire-budget overshoot (CLI): {wire - MiB} B")
        assert 1 * MiB <= wire <= 1 * MiB + ONE_READ
        assert kept == wire

        code, stdout, stderr = await run_cli_child(*_argv(url, out, root, "--progress", "json"))
        assert code == 0, stderr
        stats = json.loads(stdout.splitlines()[-1])["stats"]
        assert stats["wire_bytes"] == SIZE - kept
        assert srv.bytes_served - first_run_served == SIZE - kept
        assert out.read_bytes() == DATA


async def test_cli_refuses_a_bad_budget_with_exit_2(tmp_path: Path) -> None:
    code, _, stderr = await run_cli_child(
        *_argv("http://127.0.0.1:9/b", tmp_path / "o", tmp_path / "r", "--max-wire-bytes", "lots")
    )
    assert code == 2
    assert "--max-wire-bytes" in stderr
    assert not (tmp_path / "r").exists()
