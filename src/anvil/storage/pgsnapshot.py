"""Moving a whole record store between the two engines (backup and restore of a scaled deployment).

- `export_catalog`: one consistent snapshot of a PostgreSQL store, written as an embedded catalog
  file with the same schema (the same numbered migrations, applied by SQLite). A snapshot in the
  backup repository then has one format whichever engine it came from, and restore, validation,
  point-in-time recovery and the drill read it unchanged.
- `load_catalog`: an embedded catalog file (a restored snapshot) copied into an empty, migrated
  PostgreSQL store, in one transaction.

Consistency of the export: one `REPEATABLE READ READ ONLY` transaction takes the snapshot and
exports it (`pg_export_snapshot()`); every connection that reads tables for the copy imports it
(`SET TRANSACTION SNAPSHOT`), so all of them see exactly the commits that were visible at that one
instant. Journal appends commit with the records they describe (one transaction per batch, under
the journal lock), so the copy's journal head S and its records agree: a write racing the
snapshot is either wholly in it (records and event) or wholly out of it. No writer waits.

Only this module and `storage.pg` know both engines; everything above sees a catalog file.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import psycopg

from anvil.errors import AnvilError
from anvil.storage import journal
from anvil.storage.catalog import Catalog
from anvil.storage.pg import JOURNAL_LOCK, PgConnection, _configure, redact_url

# Rows fetched per round trip while exporting, and inserted per executemany.
BATCH = 2000
# Connections reading tables in parallel, each in the exported snapshot: the PostgreSQL server's
# work and the network overlap with the SQLite inserts on this side.
READERS = 2
MIGRATIONS_TABLE = "schema_migrations"


def method(snapshot_id: str) -> str:
    """What a manifest records as its consistency method for a PostgreSQL snapshot."""
    return (f"postgresql REPEATABLE READ snapshot {snapshot_id} (pg_export_snapshot, imported by every "
            "reader); S = journal head in that snapshot")


def _connect(url: str) -> psycopg.Connection:
    try:
        raw = psycopg.connect(url, autocommit=True)
    except psycopg.Error as e:
        raise AnvilError("Internal", f"cannot reach the record store {redact_url(url)}: "
                                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    _configure(raw)
    return raw


def _versions(raw: psycopg.Connection) -> dict[str, int] | None:
    if raw.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None:
        return None
    return {str(c): int(v) for c, v in raw.execute(
        "SELECT component, max(version) FROM schema_migrations GROUP BY component")}


def _check_versions(url: str, found: dict[str, int] | None, migrations: dict[str, list[str]]) -> None:
    """The store's schema must be exactly this Anvil's: the copy's schema is built from the code."""
    if found is None:
        raise AnvilError("UnsupportedFormat", f"the record store {redact_url(url)} has no schema: "
                                              "run `anvil admin migrate --records URL` first")
    want = {c: len(m) for c, m in migrations.items()}
    # Components of the snapshot must be at exactly this Anvil's versions; a component no participant
    # declares (node coordination, say) is not part of a snapshot and is left alone.
    differ = sorted(c for c in want if want[c] != found.get(c, 0))
    if differ:
        what = ", ".join(f"{c} at {found.get(c, 0)} (this Anvil: {want.get(c, 0)})" for c in differ)
        raise AnvilError("UnsupportedFormat", f"the record store {redact_url(url)}'s schema differs from this "
                                              f"Anvil's: {what}; run `anvil admin migrate --records URL` "
                                              "with a matching Anvil")


def new_catalog_file(path: Path, migrations: dict[str, list[str]]) -> None:
    """An empty embedded catalog with every component's schema (as `Catalog` would migrate it)."""
    cat = Catalog(path)
    try:
        for component, migs in migrations.items():
            cat.migrate(component, migs)
    finally:
        cat.close()


def _tables(conn: apsw.Connection) -> list[tuple[str, list[str]]]:
    """(table, columns) of a catalog file, parents before the tables whose foreign keys name them."""
    names = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    parents = {n: {r[2] for r in conn.execute(f'PRAGMA foreign_key_list("{n}")')} - {n} for n in names}
    ordered: list[str] = []

    def visit(n: str, path: tuple[str, ...] = ()) -> None:
        if n in ordered or n in path:
            return
        for p in sorted(parents.get(n, ())):
            visit(p, (*path, n))
        ordered.append(n)

    for n in names:
        visit(n)
    return [(n, [r[1] for r in conn.execute(f'PRAGMA table_info("{n}")')]) for n in ordered]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def export_catalog(url: str, dest: Path, migrations: dict[str, list[str]], *,
                   readers: int = READERS) -> dict[str, Any]:
    """Write one consistent snapshot of the PostgreSQL store at `url` into the catalog file `dest`.

    Returns {"snapshot": exported snapshot id, "journal_seq", "journal_hash", "tables", "rows",
    "seconds"}. The exporting transaction stays open until every reader is done with the snapshot.
    """
    started = time.monotonic()
    dest = Path(dest)
    new_catalog_file(dest, migrations)
    main = _connect(url)
    try:
        main.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot_id = main.execute("SELECT pg_export_snapshot()").fetchone()[0]
        _check_versions(url, _versions(main), migrations)
        out = apsw.Connection(str(dest))
        try:
            # A scratch file its caller reads, packs and deletes: no fsync, no rollback journal.
            out.execute("PRAGMA journal_mode=OFF")
            out.execute("PRAGMA synchronous=OFF")
            out.execute("PRAGMA foreign_keys=OFF")
            tables = _tables(out)
            rows = _copy_tables(url, snapshot_id, tables, out, max(1, readers))
            seq, chain = journal.head(out)
            out.execute("PRAGMA journal_mode=DELETE")
        finally:
            out.close()
        main.execute("COMMIT")
    finally:
        main.close()
    return {"snapshot": snapshot_id, "journal_seq": seq, "journal_hash": chain, "tables": len(tables),
            "rows": rows, "seconds": round(time.monotonic() - started, 3)}


_DONE = object()


def _copy_tables(url: str, snapshot_id: str, tables: list[tuple[str, list[str]]], out: apsw.Connection,
                 readers: int) -> int:
    """Readers (each in the exported snapshot) fetch tables in batches; this thread inserts them."""
    work: queue.Queue[tuple[str, list[str]] | None] = queue.Queue()
    for t in tables:
        work.put(t)
    batches: queue.Queue[Any] = queue.Queue(maxsize=8)  # bounded: memory stays a few batches
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            raw = _connect(url)
            try:
                raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                raw.execute(f"SET TRANSACTION SNAPSHOT '{snapshot_id}'")
                while not stop.is_set():
                    try:
                        item = work.get_nowait()
                    except queue.Empty:
                        break
                    assert item is not None
                    name, cols = item
                    with raw.cursor(name=f"anvil_export_{threading.get_ident()}") as cur:
                        cur.execute(f"SELECT {', '.join(_quote(c) for c in cols)} FROM {_quote(name)}")
                        while not stop.is_set():
                            got = cur.fetchmany(BATCH)
                            if not got:
                                break
                            batches.put((name, cols, got))
                raw.execute("COMMIT")
            finally:
                raw.close()
        except BaseException as e:  # noqa: BLE001 - handed to the inserting thread
            errors.append(e)
        finally:
            batches.put(_DONE)

    threads = [threading.Thread(target=read, name=f"anvil-pg-export-{i}", daemon=True) for i in range(readers)]
    for th in threads:
        th.start()
    rows = 0
    running = len(threads)
    cleared: set[str] = set()
    try:
        out.execute("BEGIN")
        while running:
            item = batches.get()
            if item is _DONE:
                running -= 1
                continue
            name, cols, got = item
            if name not in cleared:
                # Rows a migration seeded (journal_base's genesis, schema_migrations) come from the store.
                out.execute(f"DELETE FROM {_quote(name)}")
                cleared.add(name)
            out.executemany(f"INSERT INTO {_quote(name)}({', '.join(_quote(c) for c in cols)}) "
                            f"VALUES ({', '.join('?' for _ in cols)})", got)
            rows += len(got)
        if errors:
            raise errors[0]
        # A table with no rows in the store must be empty in the copy too (a seeded row included).
        for name, _ in tables:
            if name not in cleared:
                out.execute(f"DELETE FROM {_quote(name)}")
        out.execute("COMMIT")
    except BaseException:
        stop.set()
        while any(th.is_alive() for th in threads):
            try:
                batches.get(timeout=0.1)
            except queue.Empty:
                pass
        if not out.getautocommit():
            out.execute("ROLLBACK")
        raise
    for th in threads:
        th.join()
    return rows


# -- restore into PostgreSQL -----------------------------------------------------------------


def _seed_rows(migrations: dict[str, list[str]], scratch: Path) -> dict[str, list[tuple[Any, ...]]]:
    """What a freshly migrated store holds (journal_base's genesis row): 'empty' means exactly this."""
    path = scratch / "seed.db"
    new_catalog_file(path, migrations)
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {name: sorted(conn.execute(f"SELECT {', '.join(_quote(c) for c in cols)} FROM {_quote(name)}"))
                for name, cols in _tables(conn) if name != MIGRATIONS_TABLE}
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)


def _not_empty(raw: psycopg.Connection, seed: dict[str, list[tuple[Any, ...]]],
               columns: dict[str, list[str]]) -> list[str]:
    found = []
    for name, rows in seed.items():
        count = raw.execute(f"SELECT count(*) FROM {_quote(name)}").fetchone()[0]
        if count != len(rows):
            found.append(f"{name}: {count} row(s)")
        elif rows:
            have = sorted(tuple(r) for r in raw.execute(
                f"SELECT {', '.join(_quote(c) for c in columns[name])} FROM {_quote(name)}"))
            if have != rows:
                found.append(f"{name}: not as migrated")
    return found


def check_empty(url: str, migrations: dict[str, list[str]], scratch: Path) -> None:
    """Refuse (RecordStoreNotEmpty, UnsupportedFormat) a store that is not empty and migrated to this
    Anvil's schema; reads only."""
    seed = _seed_rows(migrations, scratch)
    raw = _connect(url)
    try:
        _check_versions(url, _versions(raw), migrations)
        _refuse_non_empty(url, raw, seed, _columns_of(migrations, scratch))
    finally:
        raw.close()


def _columns_of(migrations: dict[str, list[str]], scratch: Path) -> dict[str, list[str]]:
    path = scratch / "columns.db"
    new_catalog_file(path, migrations)
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return dict(_tables(conn))
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)


def _refuse_non_empty(url: str, raw: psycopg.Connection, seed: dict[str, list[tuple[Any, ...]]],
                      columns: dict[str, list[str]]) -> None:
    found = _not_empty(raw, seed, columns)
    if found:
        raise AnvilError("RecordStoreNotEmpty", f"the record store {redact_url(url)} is not empty "
                                                f"({'; '.join(found[:5])}): a restore needs an empty, migrated "
                                                "database (create one and run `anvil admin migrate --records URL`); "
                                                "nothing was written")


def load_catalog(source: Path, url: str, migrations: dict[str, list[str]], scratch: Path) -> dict[str, Any]:
    """Copy every table of the catalog file `source` into the empty, migrated PostgreSQL store `url`.

    `source` is first migrated to this Anvil's schema (a snapshot taken by an older Anvil), like
    an embedded catalog when it is opened. One transaction, under the journal lock, so no node can
    commit in between; emptiness is checked again inside it. Returns {"tables", "rows", "journal_seq"}.
    """
    started = time.monotonic()
    cat = Catalog(source)
    try:
        for component, migs in migrations.items():
            cat.migrate(component, migs)
    finally:
        cat.close()
    seed = _seed_rows(migrations, scratch)
    src = apsw.Connection(str(source), flags=apsw.SQLITE_OPEN_READONLY)
    raw = _connect(url)
    rows = 0
    try:
        tables = _tables(src)
        raw.execute("BEGIN")
        try:
            raw.execute("SELECT pg_advisory_xact_lock(%s)", (JOURNAL_LOCK,))
            _check_versions(url, _versions(raw), migrations)
            _refuse_non_empty(url, raw, seed, dict(tables))
            for name, cols in tables:
                if name == MIGRATIONS_TABLE:
                    continue  # the store's own: the versions were checked equal above
                raw.execute(f"DELETE FROM {_quote(name)}")
                with raw.cursor().copy(f"COPY {_quote(name)} ({', '.join(_quote(c) for c in cols)}) "
                                       "FROM STDIN") as copy:
                    for row in _rows(src, name, cols):
                        copy.write_row(row)
                        rows += 1
            seq, chain = journal.head(PgConnection(raw))
            raw.execute("COMMIT")
        except BaseException:
            if not raw.closed and not raw.broken:
                raw.execute("ROLLBACK")
            raise
    finally:
        raw.close()
        src.close()
    return {"tables": len(tables) - 1, "rows": rows, "journal_seq": seq, "journal_hash": chain,
            "seconds": round(time.monotonic() - started, 3)}


def _rows(conn: apsw.Connection, name: str, cols: list[str]) -> Iterator[tuple[Any, ...]]:
    yield from conn.execute(f"SELECT {', '.join(_quote(c) for c in cols)} FROM {_quote(name)}")
