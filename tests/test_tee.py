"""``fetch -o``'s copy follows the download (``resumer.content.tee``): the output's temp
copy grows while the bytes arrive, nothing unverified is ever at the output path, a
partial thrown away meanwhile starts the copy again, and the store keeps its blob."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from badserver import cut
from test_helpers_core import CHUNK, make_blob, open_engine, serve, sha256

from resumer.content import tee

SIZE = 300 * CHUNK
DATA = make_blob(SIZE, seed=77)


def temp_copies(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".resumer-tmp")]


async def test_the_copy_grows_with_the_download_and_appears_only_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tee, "_STEP", 64 * 1024)  # steps smaller than this small blob
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / "blob.bin"
    seen: list[int] = []
    async with serve({"b": DATA}, [cut(SIZE // 2)]) as srv, open_engine(tmp_path / "root") as eng:

        def observe(key: str, offset: int) -> None:
            # On the loop, as bytes are accepted: the output is never there before the
            # commit, and a temp copy beside it follows the written prefix.
            assert not dest.exists()
            for tmp in temp_copies(out_dir):
                seen.append(tmp.stat().st_size)

        eng.ingest.observer = observe
        result = await eng.fetch(f"{srv.url}/b", digest=srv.digest("b"), dest=dest)
        assert result.stats.wire_bytes == SIZE  # the cut resumed, no byte twice
        assert dest.read_bytes() == DATA
        assert temp_copies(out_dir) == []
        # The store keeps its blob: the copy did not take it away.
        assert eng.ingest.has_blob(sha256(DATA), SIZE)
    # The copy had grown well before the download ended (not all at the end).
    assert any(0 < n < SIZE for n in seen), seen[-5:]


async def test_a_partial_thrown_away_starts_the_copy_again(tmp_path: Path) -> None:
    """A partial kept aside without a record is adopted unverified; here it is of other
    content, so the resumed download ends in a digest mismatch, the partial restarts
    from zero, and so does the copy: the output is the right blob."""
    root = tmp_path / "root"
    async with open_engine(root):
        pass
    orphans = root / "ingest" / "orphans"
    orphans.mkdir(parents=True, exist_ok=True)
    (orphans / ("sha256-" + sha256(DATA)[7:])).write_bytes(make_blob(100 * CHUNK, seed=5))
    dest = tmp_path / "blob.bin"
    async with serve({"b": DATA}) as srv, open_engine(root) as eng:
        result = await eng.fetch(f"{srv.url}/b", digest=srv.digest("b"), dest=dest)
        # Everything held at the mismatch is thrown away: the adopted bytes and the rest.
        assert result.stats.discards == {"digest-mismatch": SIZE}
        assert result.stats.wire_bytes == SIZE - 100 * CHUNK + SIZE
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha256(DATA)[7:]
    assert temp_copies(tmp_path) == []


async def test_the_copy_follows_even_without_checkpoints(tmp_path: Path) -> None:
    """With checkpoints off nothing is recorded, but what is written is still readable:
    the copy must not wait for records that never come."""
    dest = tmp_path / "blob.bin"
    async with serve({"b": DATA}) as srv, open_engine(tmp_path / "root", checkpoints=False) as eng:
        await eng.fetch(f"{srv.url}/b", digest=srv.digest("b"), dest=dest)
    assert dest.read_bytes() == DATA
