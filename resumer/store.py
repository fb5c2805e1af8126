"""The checkpoint store: one SQLite database (WAL) behind aiosqlite, with one writer.

Every transaction is one function run in aiosqlite's thread under an asyncio.Lock, so a
checkpoint costs one await and coroutines never interleave statements inside a
transaction. Schema changes live in numbered ``migrations/NNNN_name.sql`` files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import quote

import aiosqlite

from .clock import Clock, SystemClock
from .errors import CorruptStateError, DiskFullError, SchemaTooNewError, StoreError
from .layout import fsync_dir

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class TransferState(enum.StrEnum):
    PARTIAL = "partial"  # bytes may be on disk under ingest/; resumable
    COMMITTED = "committed"  # verified and renamed into blobs/
    FAILED = "failed"  # the last run gave up; the partial is kept for the next run


#: an open attempt's (id, wire bytes, kept bytes, bytes held) so far
AttemptTally = tuple[int, int, int, int]


@dataclass(frozen=True)
class TransferRow:
    key: str
    digest: str | None
    size: int | None
    media_type: str | None
    source: str | None
    validator: str | None
    chunk_size: int
    offset: int
    state: TransferState
    last_error: str | None
    updated: float


@dataclass(frozen=True)
class AttemptRow:
    id: int
    key: str
    run_id: str
    attempt_no: int
    host: str | None
    started: float
    ended: float | None
    start_offset: int
    end_offset: int | None
    wire_bytes: int
    kept_bytes: int
    discarded_bytes: int
    discard_reason: str | None
    http_status: int | None
    error: str | None


def migrations_dir() -> Path:
    """The SQL files ship inside the package (``resumer/migrations`` → ``migrations/``)."""
    return Path(str(resources.files("resumer") / "migrations"))


def load_migrations(folder: Path | None = None) -> list[tuple[int, str, str]]:
    """(version, name, sql) in order; versions must run 1, 2, 3 … without gaps."""
    folder = folder or migrations_dir()
    out = []
    for path in sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        out.append((int(path.name[:4]), path.name, path.read_text()))
    for want, (version, name, _) in enumerate(out, start=1):
        if version != want:
            raise StoreError(f"migration {name}: expected number {want:04d}")
    return out


def _migrate(conn: sqlite3.Connection, db: Path, migrations: list[tuple[int, str, str]]) -> None:
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    latest = len(migrations)
    if current > latest:
        raise SchemaTooNewError(
            f"{db}: schema version {current} is newer than this resumer understands "
            f"({latest}); upgrade resumer or use another --root"
        )
    for version, name, sql in migrations[current:]:
        # The runner owns the transaction: the files hold no BEGIN/COMMIT.
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _split_sql(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise StoreError(f"{db}: migration {name} failed: {exc}") from exc
        if conn.execute("PRAGMA user_version").fetchone()[0] != version:
            raise StoreError(f"{db}: migration {name} did not advance the schema version")


def _split_sql(sql: str) -> list[str]:
    statements, buf = [], ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                statements.append(buf)
            buf = ""
    if buf.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()
    ):
        raise StoreError(f"incomplete SQL statement in migration: {buf.strip()[:60]!r}")
    return statements


class Store:
    """All state resumer keeps: transfers, chunk hashes, attempts, pulls and layers."""

    def __init__(self, conn: aiosqlite.Connection, path: Path, clock: Clock) -> None:
        self._conn = conn
        self.path = path
        self.clock = clock
        self._lock = asyncio.Lock()
        #: set once this process met a full disk: partial writers stop, so the space the
        #: reserve frees goes to recording it (see Partial._write_batch)
        self.disk_full = False

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        clock: Clock | None = None,
        migrations: Path | None = None,
        read_only: bool = False,
    ) -> Store:
        """Open (creating and migrating as needed) the database at ``path``.

        ``read_only``: open an existing database without writing to it (``status``, ``ls``):
        it works on a root this user may not write, and never creates or migrates.
        """
        created = not path.exists()
        if read_only and created:
            raise StoreError(f"{path}: no state database here")
        try:
            if read_only:
                target = f"file:{quote(str(path.absolute()))}?mode=ro"
                conn = await aiosqlite.connect(target, isolation_level=None, uri=True)
            else:
                conn = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise db_error(path, exc) from exc
        steps = load_migrations(migrations)
        try:
            await conn._execute(_setup, conn._conn, path, steps, read_only)  # type: ignore[no-untyped-call]
        except sqlite3.Error as exc:
            await conn.close()
            raise db_error(path, exc) from exc
        except BaseException:
            await conn.close()
            raise
        if created:
            # SQLite syncs the directory for its WAL, not for the database file it
            # created: without this a power cut can leave a WAL with no database.
            await asyncio.to_thread(fsync_dir, path.parent)
        store = cls(conn, path, clock or SystemClock())
        if not read_only:
            await asyncio.to_thread(store._make_reserve)
        return store

    async def close(self) -> None:
        await self._conn.close()

    @property
    def reserve_path(self) -> Path:
        return self.path.with_name(self.path.name + ".reserve")

    def _make_reserve(self) -> None:
        """Set aside RESERVE_BYTES of real blocks beside the database. When the disk fills
        (with partials, say), releasing them lets the database record what happened, so
        ``status`` can say "disk full" rather than "killed or crashed"."""
        path = self.reserve_path
        if path.exists():
            return
        tmp = path.with_name(path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            # No room even for the reserve: work without it; a full disk is reported anyway.
            tmp.unlink(missing_ok=True)
            log.warning("cannot set aside %s (%s)", path, exc.strerror or exc)

    def _release_reserve(self) -> bool:
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        log.warning(
            "disk full: released the %d-byte reserve %s to record it",
            RESERVE_BYTES,
            self.reserve_path,
        )
        return True

    async def run(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``fn`` as one write transaction in the database thread: one await.

        ``durable``: the transaction is on disk when this returns (its WAL frames and every
        earlier one are fsynced). Only a transaction that claims nothing may pass False:
        chunk records ahead of the durable offset, attempt rows. Losing those to a power
        cut costs re-verification or accounting, never a wrong claim.
        """
        async with self._lock:
            for last_try in (False, True):
                try:
                    # aiosqlite's own hand-off: the whole transaction is one await.
                    result: T = await self._conn._execute(  # type: ignore[no-untyped-call]
                        _transaction, self._conn._conn, fn, durable
                    )
                    return result
                except sqlite3.Error as exc:
                    error = db_error(self.path, exc)
                    if isinstance(error, DiskFullError):
                        self.disk_full = True
                    if last_try or not isinstance(error, DiskFullError):
                        raise error from exc
                    if not await asyncio.to_thread(self._release_reserve):
                        raise error from exc
            raise AssertionError("unreachable")

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """A read-only query outside any transaction."""
        try:
            return list(await self._conn.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise db_error(self.path, exc) from exc

    # --- transfers -------------------------------------------------------------------

    async def transfer(self, key: str) -> TransferRow | None:
        rows = await self.read("SELECT * FROM transfers WHERE key = ?", (key,))
        return _transfer(rows[0]) if rows else None

    async def transfers(self, states: Iterable[TransferState] | None = None) -> list[TransferRow]:
        rows = await self.read("SELECT * FROM transfers ORDER BY updated")
        wanted = set(states) if states is not None else None
        return [t for t in map(_transfer, rows) if wanted is None or t.state in wanted]

    async def create_transfer(
        self,
        key: str,
        *,
        digest: str | None,
        size: int | None,
        media_type: str | None,
        source: str | None,
        validator: str | None,
        chunk_size: int,
    ) -> TransferRow:
        now = self.clock.time()

        def tx(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM chunks WHERE key = ?", (key,))
            c.execute(
                "INSERT OR REPLACE INTO transfers (key, digest, size, media_type, source,"
                " validator, chunk_size, offset, state, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                (
                    key,
                    digest,
                    size,
                    media_type,
                    source,
                    validator,
                    chunk_size,
                    TransferState.PARTIAL,
                    now,
                    now,
                ),
            )

        await self.run(tx)
        row = await self.transfer(key)
        assert row is not None
        return row

    async def chunk_map(self, key: str) -> dict[int, tuple[int, int | None]]:
        """Every recorded chunk: idx → (xxh3, length).

        ``length`` is None for a whole chunk, else the byte count the hash covers (the
        first bytes of a chunk a cut left, or the blob's short last chunk). Gaps are holes.
        """
        rows = await self.read("SELECT idx, xxh3, length FROM chunks WHERE key = ?", (key,))
        return {int(r[0]): (int(r[1]), r[2]) for r in rows}

    async def synced_chunk_map(self, key: str) -> dict[int, tuple[int, int | None]]:
        """The records a finished fdatasync covered, where they differ from the latest:
        idx → (xxh3, length). What reopen falls back to when the latest does not verify
        (a power cut took the data that record describes, not what was synced before)."""
        rows = await self.read(
            "SELECT idx, synced_xxh3, synced_length FROM chunks WHERE key = ?"
            " AND synced_xxh3 IS NOT NULL"
            " AND (synced_xxh3 != xxh3 OR synced_length IS NOT length)",
            (key,),
        )
        return {int(r[0]): (int(r[1]), r[2]) for r in rows}

    async def checkpoint(
        self,
        key: str,
        chunks: Sequence[tuple[int, int, int | None]],
        durable: int | None,
        tally: AttemptTally | None = None,
        synced: Sequence[tuple[int, int, int | None]] = (),
    ) -> None:
        """Record (idx, xxh3, length) chunk hashes; advance the durable offset once synced.

        ``synced``: records (recorded before) that a finished fdatasync covers, kept
        beside each chunk's latest record for reopen to fall back to. Pass them with the
        ``durable`` offset of the same sync: they are a claim too.

        ``tally`` books the open attempt's bytes so far in the same transaction, so a
        process killed mid-attempt leaves a row that says what that attempt moved.
        """
        now = self.clock.time()

        def tx(c: sqlite3.Connection) -> None:
            if tally is not None:
                c.execute(
                    "UPDATE attempts SET wire_bytes = ?, kept_bytes = ?, end_offset = ?"
                    " WHERE id = ? AND ended IS NULL",
                    (tally[1], tally[2], tally[3], tally[0]),
                )
            if chunks:
                # An upsert, not a replace: the row's synced record stays until a sync
                # covers a newer one.
                c.executemany(
                    "INSERT INTO chunks (key, idx, xxh3, length) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (key, idx) DO UPDATE"
                    " SET xxh3 = excluded.xxh3, length = excluded.length",
                    [(key, i, h, n) for i, h, n in chunks],
                )
            if synced:
                c.executemany(
                    "UPDATE chunks SET synced_xxh3 = ?, synced_length = ?"
                    " WHERE key = ? AND idx = ?",
                    [(h, n, key, i) for i, h, n in synced],
                )
            if durable is not None:
                c.execute(
                    "UPDATE transfers SET offset = ?, updated = ? WHERE key = ?",
                    (durable, now, key),
                )

        # Chunk records alone claim nothing: reopen verifies them, and losing them only
        # makes reopen keep less. A durable offset or a synced record is a claim, so it
        # is synced.
        await self.run(tx, durable=durable is not None or bool(synced))

    async def forget_chunks(
        self,
        key: str,
        idxs: Sequence[int] | None,
        offset: int,
        validator: str | None,
        fell_back: Sequence[int] = (),
    ) -> None:
        """Forget the records of chunks ``idxs`` (None: every chunk), found bad or gone:
        they are holes now. ``offset`` is the durable prefix that is left. Chunks
        ``fell_back`` were kept at their synced record (the latest did not verify): it
        becomes their latest."""
        now = self.clock.time()

        def tx(c: sqlite3.Connection) -> None:
            if idxs is None:
                c.execute("DELETE FROM chunks WHERE key = ?", (key,))
            else:
                c.executemany(
                    "DELETE FROM chunks WHERE key = ? AND idx = ?", [(key, i) for i in idxs]
                )
            c.executemany(
                "UPDATE chunks SET xxh3 = synced_xxh3, length = synced_length"
                " WHERE key = ? AND idx = ? AND synced_xxh3 IS NOT NULL",
                [(key, i) for i in fell_back],
            )
            c.execute(
                "UPDATE transfers SET offset = ?, validator = ?, state = ?, updated = ?"
                " WHERE key = ?",
                (offset, validator, TransferState.PARTIAL, now, key),
            )

        await self.run(tx)

    async def set_size(self, key: str, size: int | None, validator: str | None) -> None:
        await self.run(
            lambda c: c.execute(
                "UPDATE transfers SET size = ?, validator = ? WHERE key = ?",
                (size, validator, key),
            )
        )

    async def finish_transfer(
        self, key: str, state: TransferState, *, digest: str | None = None, error: str | None = None
    ) -> None:
        now = self.clock.time()

        def tx(c: sqlite3.Connection) -> None:
            if state is TransferState.COMMITTED:
                c.execute("DELETE FROM chunks WHERE key = ?", (key,))
            c.execute(
                "UPDATE transfers SET state = ?, last_error = ?, updated = ?,"
                " digest = COALESCE(?, digest) WHERE key = ?",
                (state, error, now, digest, key),
            )

        await self.run(tx)

    async def forget_transfer(self, key: str) -> None:
        def tx(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM chunks WHERE key = ?", (key,))
            c.execute("DELETE FROM transfers WHERE key = ?", (key,))

        await self.run(tx)

    # --- attempts --------------------------------------------------------------------

    async def start_attempt(
        self,
        key: str,
        *,
        run_id: str,
        attempt_no: int,
        host: str | None,
        start_offset: int,
        pull_id: int | None = None,
    ) -> int:
        now = self.clock.time()

        def tx(c: sqlite3.Connection) -> int:
            cur = c.execute(
                "INSERT INTO attempts (key, run_id, pull_id, attempt_no, host, started,"
                " start_offset) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, run_id, pull_id, attempt_no, host, now, start_offset),
            )
            return int(cur.lastrowid or 0)

        return await self.run(tx, durable=False)  # accounting: the next sync carries it

    async def end_attempt(
        self,
        attempt_id: int,
        *,
        end_offset: int,
        wire_bytes: int,
        kept_bytes: int,
        discards: Mapping[str, int],
        http_status: int | None,
        error: str | None,
    ) -> None:
        """End an attempt; ``discards`` is every byte it threw away, per reason."""
        now = self.clock.time()
        total = sum(discards.values())
        top = max(discards, key=discards.__getitem__) if discards else None

        def tx(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE attempts SET ended = ?, end_offset = ?, wire_bytes = ?, kept_bytes = ?,"
                " discarded_bytes = ?, discard_reason = ?, http_status = ?, error = ?"
                " WHERE id = ?",
                (
                    now,
                    end_offset,
                    wire_bytes,
                    kept_bytes,
                    total,
                    top,
                    http_status,
                    error,
                    attempt_id,
                ),
            )
            _book_discards(c, attempt_id, discards)

        await self.run(tx, durable=False)

    async def record_discard(self, key: str, run_id: str, nbytes: int, reason: str) -> None:
        """An accounting row for bytes found bad on reopen (no request was made)."""
        now = self.clock.time()

        def tx(c: sqlite3.Connection) -> None:
            cur = c.execute(
                "INSERT INTO attempts (key, run_id, attempt_no, started, ended, start_offset,"
                " end_offset, discarded_bytes, discard_reason) VALUES (?, ?, 0, ?, ?, 0, 0, ?, ?)",
                (key, run_id, now, now, nbytes, reason),
            )
            _book_discards(c, int(cur.lastrowid or 0), {reason: nbytes})

        await self.run(tx, durable=False)

    async def discards(self, key: str | None = None) -> dict[str, int]:
        """Bytes thrown away per reason, over every attempt (of ``key``, if given)."""
        sql = "SELECT d.reason, SUM(d.bytes) FROM attempt_discards d"
        params: tuple[str, ...] = ()
        if key is not None:
            sql += " JOIN attempts a ON a.id = d.attempt_id WHERE a.key = ?"
            params = (key,)
        rows = await self.read(sql + " GROUP BY d.reason", params)
        return {str(r[0]): int(r[1]) for r in rows}

    async def attempts(self, key: str | None = None) -> list[AttemptRow]:
        if key is None:
            rows = await self.read("SELECT * FROM attempts ORDER BY id")
        else:
            rows = await self.read("SELECT * FROM attempts WHERE key = ? ORDER BY id", (key,))
        return [_attempt(r) for r in rows]


def move_aside(db: Path) -> Path | None:
    """Move ``db`` with its WAL and shared-memory files into a new folder beside it
    (``state.db.broken-<UTC time>``), durably; None when there is no database. The caller
    holds the root lock. Partials are untouched: gc keeps them aside for adoption."""
    names = (db.name, db.name + "-wal", db.name + "-shm")
    parts = [db.with_name(n) for n in names if db.with_name(n).exists()]
    if not parts:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = db.with_name(f"{db.name}.broken-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = db.with_name(f"{db.name}.broken-{stamp}-{n}")
    dest.mkdir()
    for p in parts:
        os.replace(p, dest / p.name)
    fsync_dir(dest)
    fsync_dir(db.parent)
    return dest


def _book_discards(c: sqlite3.Connection, attempt_id: int, discards: Mapping[str, int]) -> None:
    c.executemany(
        "INSERT OR REPLACE INTO attempt_discards (attempt_id, reason, bytes) VALUES (?, ?, ?)",
        [(attempt_id, r, n) for r, n in discards.items() if n > 0],
    )


def db_error(path: Path, exc: sqlite3.Error) -> StoreError:
    """The one mapping of SQLite's errors: a full disk and a corrupt file each get an
    error that says what to do; anything else names the file and SQLite's words."""
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    if code == sqlite3.SQLITE_FULL or "disk is full" in text:
        return DiskFullError(
            f"disk full: cannot write the state database {path}; free space on its file"
            " system and run the same command again (every partial download is kept)"
        )
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or (
        "malformed" in text or "not a database" in text
    ):
        root = path.parent
        return CorruptStateError(
            f"{path} is not a usable state database ({text}). To move it aside and start"
            f" afresh, keeping every partial download: resumer reset-state --root {root}"
        )
    return StoreError(f"{path}: {text}")


def _setup(
    conn: sqlite3.Connection, path: Path, steps: list[tuple[int, str, str]], read_only: bool
) -> None:
    conn.row_factory = sqlite3.Row
    if read_only:
        # Touch the file so a non-database fails here, with the advice, not later.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(steps):
            raise SchemaTooNewError(
                f"{path}: schema version {version} is newer than this resumer understands"
                f" ({len(steps)}); upgrade resumer"
            )
        if version < len(steps):
            raise StoreError(
                f"{path}: schema version {version} is older than this resumer's"
                f" ({len(steps)}); any command that writes (pull, resume, fetch) upgrades it"
            )
        conn.execute("PRAGMA query_only = ON")
        return
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"{path}: cannot switch the state database to WAL mode (got {mode})")
    # Each transaction chooses FULL or NORMAL (see _transaction); the schema and its
    # migrations are durable.
    _set_synchronous(conn, _FULL)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 10000")
    _migrate(conn, path, steps)


#: room kept beside state.db for recording a full disk (a few hundred WAL frames)
RESERVE_BYTES = 2 << 20

_FULL, _NORMAL = "FULL", "NORMAL"  # PRAGMA synchronous levels


def _set_synchronous(conn: sqlite3.Connection, level: str) -> None:
    # A microsecond in the database thread: cheaper than tracking the current level.
    conn.execute(f"PRAGMA synchronous = {level}")


def _transaction(
    conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], durable: bool
) -> T:
    # In WAL mode, synchronous = NORMAL syncs the WAL only at a checkpoint (every 1000
    # pages), so a power cut can take every commit since the database was created. FULL
    # fsyncs the WAL at this commit, which also makes every earlier frame durable: one
    # sync serves the NORMAL transactions before it. Durable once recorded (invariant 1).
    _set_synchronous(conn, _FULL if durable else _NORMAL)
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def from_row(cls: type[R], row: sqlite3.Row, **converted: Any) -> R:
    """The dataclass ``cls`` from a row whose columns carry its field names.

    ``converted`` gives the fields that need more than the column's value (enums, JSON).
    """
    names = [f.name for f in dataclasses.fields(cast(Any, cls)) if f.name not in converted]
    return cls(**{n: row[n] for n in names}, **converted)


def _transfer(r: sqlite3.Row) -> TransferRow:
    return from_row(TransferRow, r, state=TransferState(r["state"]))


def _attempt(r: sqlite3.Row) -> AttemptRow:
    return from_row(AttemptRow, r)
