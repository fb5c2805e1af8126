"""The checkpoint store: migrations runner, refusal of a newer schema, WAL, one writer."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from resumer.errors import SchemaTooNewError, StoreError
from resumer.store import Store, TransferState, load_migrations


async def test_fresh_database_is_migrated_to_the_latest_version(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "state.db")
    await store.close()
    conn = sqlite3.connect(tmp_path / "state.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(load_migrations())
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"transfers", "chunks", "attempts", "pulls", "pull_layers", "layers"} <= tables


async def test_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    await (await Store.open(db)).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {len(load_migrations()) + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNewError, match="newer than this resumer"):
        await Store.open(db)


async def test_each_migration_runs_in_its_own_transaction(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_a.sql").write_text("CREATE TABLE a (x INTEGER);\n")
    (folder / "0002_b.sql").write_text(
        "CREATE TABLE b (y INTEGER);\nINSERT INTO nope VALUES (1);\n"
    )
    db = tmp_path / "state.db"
    with pytest.raises(StoreError, match=r"0002_b\.sql"):
        await Store.open(db, migrations=folder)
    conn = sqlite3.connect(db)
    # 0001 stayed applied; 0002 rolled back entirely.
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "a" in names and "b" not in names


def test_migration_numbers_must_not_skip(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(StoreError, match="expected number 0002"):
        load_migrations(tmp_path)


async def test_not_a_database_gives_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=r"state\.db"):
        await Store.open(db)


async def test_concurrent_checkpoints_do_not_interleave(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "state.db")
    try:
        for k in range(4):
            await store.create_transfer(
                f"k{k}",
                digest=None,
                size=None,
                media_type=None,
                source=None,
                validator=None,
                chunk_size=4096,
            )

        async def writer(k: int) -> None:
            for i in range(50):
                await store.checkpoint(f"k{k}", [(i, i * 7 - k, None)], i * 4096)

        await asyncio.gather(*(writer(k) for k in range(4)))
        for k in range(4):
            hashes = await store.chunk_map(f"k{k}")
            assert hashes == {i: (i * 7 - k, None) for i in range(50)}
            row = await store.transfer(f"k{k}")
            assert row is not None and row.offset == 49 * 4096
            assert row.state is TransferState.PARTIAL
    finally:
        await store.close()
