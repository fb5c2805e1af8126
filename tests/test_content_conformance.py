"""A conformance suite for the partials of the content store, in the manner of
containerd's content test suite (``core/content/testsuite``): write, resume, truncate,
corrupted in the middle, commit-exists, readers of a growing partial, commit after repair.

Every case runs against three stores: a fresh root, a root reopened by a new process
(its state.db already there), and a root whose state.db was made by schema version 4
(before attempt_discards) and carried over by the migration, holding a partial of
another blob written by that era's code (a prefix file and its chunk records), which
must come through with every verified chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from test_helpers_core import CHUNK, make_blob, open_engine, sha256

from resumer.content.partial import Partial
from resumer.digest import to_signed
from resumer.engine import Engine
from resumer.errors import DigestMismatchError, TransferError
from resumer.store import load_migrations

SIZE = 10 * CHUNK + 1234  # a short last chunk
DATA = make_blob(SIZE, seed=91)
DIGEST = sha256(DATA)

#: what the v4 root holds: a prefix partial of OLD, 5½ chunks, recorded chunk by chunk
OLD = make_blob(8 * CHUNK, seed=92)
OLD_DIGEST = sha256(OLD)
OLD_WRITTEN = 5 * CHUNK + 100


def _make_v4_root(root: Path) -> None:
    """A root as schema version 4 left it, with one partial of OLD in it."""
    (root / "ingest").mkdir(parents=True)
    conn = sqlite3.connect(root / "state.db")
    for version, _, sql in load_migrations():
        if version > 4:
            break
        conn.executescript(sql)
        conn.execute(f"PRAGMA user_version = {version}")
    conn.execute(
        "INSERT INTO transfers (key, digest, size, chunk_size, offset, state, created, updated)"
        " VALUES (?, ?, ?, ?, ?, 'partial', 0, 0)",
        (OLD_DIGEST, OLD_DIGEST, len(OLD), CHUNK, 4 * CHUNK),
    )
    rows = []
    for idx in range(-(-OLD_WRITTEN // CHUNK)):
        piece = OLD[idx * CHUNK : min((idx + 1) * CHUNK, OLD_WRITTEN)]
        length = None if len(piece) == CHUNK else len(piece)
        rows.append((OLD_DIGEST, idx, to_signed(xxhash.xxh3_64_intdigest(piece)), length))
    conn.executemany("INSERT INTO chunks (key, idx, xxh3, length) VALUES (?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    (root / "ingest" / ("sha256-" + OLD_DIGEST[7:])).write_bytes(OLD[:OLD_WRITTEN])


@pytest.fixture(params=["fresh", "reopened", "migrated"])
async def root(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    if request.param == "reopened":
        async with open_engine(root):
            pass
    elif request.param == "migrated":
        _make_v4_root(root)
    return root


@contextlib.asynccontextmanager
async def partial_of(
    engine: Engine, data: bytes = DATA, digest: str = DIGEST, size: int | None = SIZE
) -> AsyncIterator[Partial]:
    partial, _ = await engine.ingest.open(digest, digest=digest, size=size)
    try:
        yield partial
    finally:
        if partial._fd >= 0:
            await partial.close()


def partial_file(root: Path, digest: str = DIGEST) -> Path:
    return root / "ingest" / ("sha256-" + digest[7:])


def damage(path: Path, *edits: tuple[int, bytes]) -> None:
    """Overwrite bytes of a closed partial in place (a torn write, a flipped bit)."""
    with open(path, "r+b") as f:
        for at, data in edits:
            f.seek(at)
            f.write(data)


async def write_range(partial: Partial, start: int, end: int, data: bytes = DATA) -> None:
    await partial.begin_segment(start)
    pos = start
    while pos < end:  # uneven pieces, so chunk edges fall inside writes
        step = min(end - pos, 3000)
        await partial.write(data[pos : pos + step])
        pos += step


# --- the cases ------------------------------------------------------------------------


async def test_write_and_commit(root: Path) -> None:
    async with open_engine(root) as engine, partial_of(engine) as partial:
        await write_range(partial, 0, SIZE)
        path = await partial.commit()
    assert path.read_bytes() == DATA
    assert not partial_file(root).exists()


async def test_resume_keeps_every_byte_of_a_clean_stop(root: Path) -> None:
    cut = 6 * CHUNK + 77
    async with open_engine(root) as engine, partial_of(engine) as partial:
        await write_range(partial, 0, cut)
    async with open_engine(root) as engine:
        partial, reopened = await engine.ingest.open(DIGEST, digest=DIGEST, size=SIZE)
        assert (reopened.offset, reopened.discarded) == (cut, 0)
        assert partial.holes() == [(cut, SIZE)]
        await write_range(partial, cut, SIZE)
        assert (await partial.commit()).read_bytes() == DATA


async def test_truncated_file_keeps_the_whole_chunks_before_the_cut(root: Path) -> None:
    async with open_engine(root) as engine, partial_of(engine) as partial:
        await write_range(partial, 0, 8 * CHUNK)
    os.truncate(partial_file(root), 3 * CHUNK + 10)
    async with open_engine(root) as engine:
        partial, reopened = await engine.ingest.open(DIGEST, digest=DIGEST, size=SIZE)
        assert reopened.offset == 3 * CHUNK
        assert partial.holes() == [(3 * CHUNK, SIZE)]
        await write_range(partial, 3 * CHUNK, SIZE)
        assert (await partial.commit()).read_bytes() == DATA


async def test_corrupted_in_the_middle_becomes_one_hole(root: Path) -> None:
    written = 9 * CHUNK
    async with open_engine(root) as engine, partial_of(engine) as partial:
        await write_range(partial, 0, written)
    damage(partial_file(root), (4 * CHUNK + 50, b"\0" * 4000))  # a torn write in chunk 4
    async with open_engine(root) as engine:
        partial, reopened = await engine.ingest.open(DIGEST, digest=DIGEST, size=SIZE)
        assert reopened.offset == written - CHUNK
        assert reopened.discards == {"corrupt-chunk": CHUNK}
        assert partial.holes() == [(4 * CHUNK, 5 * CHUNK), (written, SIZE)]
        await partial.close()


async def test_commit_after_repair(root: Path) -> None:
    written = 9 * CHUNK
    async with open_engine(root) as engine, partial_of(engine) as partial:
        await write_range(partial, 0, written)
    damage(partial_file(root), (2 * CHUNK + 5, b"\xff"), (7 * CHUNK, b"\0" * CHUNK))
    async with open_engine(root) as engine:
        partial, _ = await engine.ingest.open(DIGEST, digest=DIGEST, size=SIZE)
        assert partial.holes() == [
            (2 * CHUNK, 3 * CHUNK),
            (7 * CHUNK, 8 * CHUNK),
            (written, SIZE),
        ]
        for start, end in partial.holes():
            assert end is not None
            await write_range(partial, start, end)
        assert partial.holes() == []
        assert (await partial.commit()).read_bytes() == DATA


async def test_a_wrong_repair_is_never_committed(root: Path) -> None:
    async with open_engine(root) as engine, partial_of(engine) as partial:
        await write_range(partial, 0, SIZE)
        await partial.close()
    damage(partial_file(root), (5 * CHUNK, b"\xff"))
    async with open_engine(root) as engine:
        partial, _ = await engine.ingest.open(DIGEST, digest=DIGEST, size=SIZE)
        assert partial.holes() == [(5 * CHUNK, 6 * CHUNK)]
        wrong = bytearray(DATA)
        wrong[5 * CHUNK + 9] ^= 1
        await write_range(partial, 5 * CHUNK, 6 * CHUNK, bytes(wrong))
        with pytest.raises(DigestMismatchError):
            await partial.commit()
        assert not engine.ingest.has_blob(DIGEST)
        await partial.close()


async def test_commit_of_existing_content_is_success(root: Path) -> None:
    async with open_engine(root) as engine:
        async with partial_of(engine) as first:
            await write_range(first, 0, SIZE)
            path = await first.commit()
        before = path.stat().st_ino
        async with partial_of(engine) as second:
            await write_range(second, 0, SIZE)
            assert await second.commit() == path
        assert path.read_bytes() == DATA
        assert path.stat().st_ino == before  # the blob there first stays
        assert not partial_file(root).exists()


async def test_concurrent_readers_of_a_growing_partial(root: Path) -> None:
    starts = [0, 0, CHUNK + 17, SIZE - 5]
    async with open_engine(root) as engine, partial_of(engine) as partial:

        async def read(start: int) -> bytes:
            return b"".join([piece async for piece in partial.read_growing(start)])

        readers = [asyncio.create_task(read(s)) for s in starts]
        await asyncio.sleep(0)  # each reader is waiting on an empty partial
        for start in range(0, SIZE, 5000):
            await write_range(partial, start, min(SIZE, start + 5000))
            await partial.flush()
            assert partial.readable() == min(SIZE, start + 5000)
        await partial.commit()
        got = await asyncio.gather(*readers)
    assert got == [DATA[s:] for s in starts]


async def test_a_reader_is_cut_off_when_the_partial_is_thrown_away(root: Path) -> None:
    async with open_engine(root) as engine, partial_of(engine) as partial:
        await write_range(partial, 0, 3 * CHUNK)
        await partial.flush()
        stream = partial.read_growing(0)
        assert await anext(stream) == DATA[: 3 * CHUNK]
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        await partial.reset()
        with pytest.raises(TransferError, match="discarded"):
            await waiting


async def test_the_migrated_partial_keeps_its_verified_chunks(root: Path) -> None:
    migrated = partial_file(root, OLD_DIGEST).exists()
    async with open_engine(root) as engine:
        async with partial_of(engine, OLD, OLD_DIGEST, len(OLD)) as partial:
            if migrated:
                assert partial.held == OLD_WRITTEN
                assert partial.holes() == [(OLD_WRITTEN, len(OLD))]
            await write_range(partial, partial.holes()[0][0], len(OLD), OLD)
            path = await partial.commit()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == OLD_DIGEST[7:]
        version = (await engine.store.read("PRAGMA user_version"))[0][0]
        assert version == len(load_migrations())


# --- a power cut with K streams: each chunk falls back to what the last sync covered ----

#: the ranges K streams write at once (a parallel attempt's connections), chunk-aligned
STREAMS = {
    1: [(0, SIZE)],
    2: [(0, 5 * CHUNK), (5 * CHUNK, SIZE)],
    3: [(0, 3 * CHUNK), (3 * CHUNK, 6 * CHUNK), (6 * CHUNK, SIZE)],
}


async def _write_streams(partial: Partial, segs: list[Any], upto: list[int]) -> None:
    """Each stream writes on to ``upto[i]``, the streams taking turns in uneven pieces
    (so chunk edges fall inside writes), as K connections do."""
    while True:
        moved = False
        for seg, end in zip(segs, upto, strict=True):
            if seg.offset < end:
                step = min(end - seg.offset, 1500 + 700 * (seg.offset % 3))
                await seg.write(DATA[seg.offset : seg.offset + step])
                moved = True
        if not moved:
            return


async def _cut_after_a_sync(root: Path, k: int, synced: list[int], written: list[int]) -> None:
    """K streams write, a finished fdatasync covers ``synced[i]`` of each, they write on
    to ``written[i]`` and every record reaches SQLite; then the power goes: the file is
    what that sync made durable, not a byte more. Reopen keeps exactly what was synced:
    each stream's chunk that straddles the sync keeps its synced prefix, though its newer
    record (a longer tail, or the whole chunk) no longer matches."""
    ranges = STREAMS[k]
    path = partial_file(root)
    async with open_engine(root) as engine:
        partial, _ = await engine.ingest.open(DIGEST, digest=DIGEST, size=SIZE)
        segs = [await partial.open_segment(a, b) for a, b in ranges]
        await _write_streams(partial, segs, synced)
        await partial.flush(sync=True)
        durable_image = path.read_bytes()  # what the disk holds after that sync
        await _write_streams(partial, segs, written)
        await partial.flush()  # written (to the page cache), not synced
        await partial._drain_records()  # and every record of it is in state.db
        partial._release()  # the power goes: no last checkpoint, no sync
    path.write_bytes(durable_image)  # the reboot: what was not synced is gone
    kept = [(a, s) for (a, _), s in zip(ranges, synced, strict=True) if s > a]
    holes, pos = [], 0
    for a, s in kept:
        if a > pos:
            holes.append((pos, a))
        pos = s
    if pos < SIZE:
        holes.append((pos, SIZE))
    async with open_engine(root) as engine, partial_of(engine) as partial:
        assert partial.resumed_from == sum(s - a for a, s in kept), (synced, written)
        assert partial.holes() == holes
        for start, end in holes:
            await write_range(partial, start, end)
        assert (await partial.commit()).read_bytes() == DATA


@pytest.mark.parametrize(
    ("k", "synced", "written"),
    [
        # one stream, its sync mid-chunk, then the rest of that chunk and more
        (1, [2 * CHUNK + 1000], [4 * CHUNK + 10]),
        # one stream, the chunk finished after the sync (a whole record over a tail)
        (1, [2 * CHUNK + 1000], [3 * CHUNK]),
        # three streams, each straddling the sync in its own chunk
        (3, [CHUNK + 300, 4 * CHUNK + 2000, 7 * CHUNK + 1], [2 * CHUNK + 5, 5 * CHUNK, SIZE]),
    ],
)
async def test_a_power_cut_keeps_what_the_last_sync_covered_in_every_stream(
    root: Path, k: int, synced: list[int], written: list[int]
) -> None:
    await _cut_after_a_sync(root, k, synced, written)


@st.composite
def _cut_layouts(draw: st.DrawFn) -> tuple[int, list[int], list[int]]:
    k = draw(st.sampled_from(sorted(STREAMS)))
    synced, written = [], []
    for a, b in STREAMS[k]:
        s = draw(st.integers(a, b))
        synced.append(s)
        written.append(draw(st.integers(s, b)))
    return k, synced, written


@settings(max_examples=40, deadline=None)
@given(layout=_cut_layouts())
def test_a_power_cut_after_any_sync_keeps_exactly_what_it_covered(
    tmp_path_factory: pytest.TempPathFactory, layout: tuple[int, list[int], list[int]]
) -> None:
    k, synced, written = layout
    asyncio.run(_cut_after_a_sync(tmp_path_factory.mktemp("cut") / "root", k, synced, written))


async def test_a_quiet_stream_hands_on_its_bytes_without_another_read(root: Path) -> None:
    """Bytes gathered below a batch go to the disk within the hand-off time even when the
    stream receives nothing more (a rate-limited server sends in bursts): they must not
    wait in memory, where neither a sync nor a record covers them, until its next read.
    The clock is a FakeClock that never moves: only the hand-off timer can send them."""
    async with open_engine(root) as engine, partial_of(engine) as partial:
        await partial.write(DATA[:1000])
        end = await asyncio.wait_for(partial.wait_readable(0, partial.generation), 10)
        assert end == 1000
