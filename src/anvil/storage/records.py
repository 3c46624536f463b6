"""The record store interface: the only surface through which code outside `anvil.storage` touches SQL.

Subsystems receive a `Connection` (a reader, the writer inside `Catalog.mutate`, or a
checkpoint copy) and call `execute(sql, params)`; they catch `RecordError`. Nothing outside
this package imports the SQLite binding, so a second engine (PostgreSQL) only has to provide
objects of these shapes, and SQL written outside `storage` keeps to what both engines accept:
`?` placeholders (an engine that wants `%s` translates them), no `INSERT OR ...`, no
`printf`, no `rowid`. Engine-specific JSON access goes through the fragments below.

The functions that need engine knowledge beyond one statement (a consistent online copy, an
integrity check, a read-only connection to a file) live here too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import apsw

from anvil.storage import catalogcheck

# Every failure of the record store (I/O, corruption, constraint, SQL error) is one of these:
# a tuple of the engines' base errors, for `except records.RecordError`. PostgreSQL's is added when
# `storage.pg` is imported (`add_engine_error`), so an embedded store never loads psycopg (~25 MiB
# resident). Read it as `records.RecordError` at the `except`, not bound by `from ... import`.
RecordError: Any = (apsw.Error,)


def add_engine_error(error: type[BaseException]) -> None:
    global RecordError
    if error not in RecordError:
        RecordError = (*RecordError, error)


class Cursor(Protocol):
    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """One connection to the record store. `with conn:` is one transaction (a read snapshot for readers)."""

    def execute(self, statement: str, binding: Sequence[Any] | dict[str, Any] | None = ...) -> Cursor: ...

    def __enter__(self) -> Connection: ...

    def __exit__(self, *exc: object) -> bool | None: ...


def in_transaction(conn: Connection) -> bool:
    """Whether `conn` is inside an open transaction (`with conn:`): its reads then see that snapshot,
    which may predate commits made since (a cache must not keep what it read there)."""
    if isinstance(conn, apsw.Connection):
        return not conn.getautocommit()
    held = getattr(conn, "in_transaction", None)
    return bool(held() if callable(held) else held)


def open_readonly(path: str | Path) -> Connection:
    """A read-only connection to a catalog file that no server may be writing (or one that is: WAL)."""
    return catalogcheck.open_readonly(path)


def close(conn: Connection) -> None:
    conn.close()  # type: ignore[attr-defined]


def consistent_copy(source: str | Path, dest: str | Path) -> None:
    """Copy a live catalog into `dest` as of one commit, while writers keep committing.

    The online backup API copies every page in one `step(-1)` inside one read transaction on
    the source: WAL lets the writer go on, and the copy is exactly the database as of one
    commit. Stepping in small pieces never finishes while another connection writes.
    """
    src = apsw.Connection(str(source), flags=apsw.SQLITE_OPEN_READONLY)
    src.setbusytimeout(10_000)
    out = apsw.Connection(str(dest))
    try:
        # The copy is a scratch file its caller reads and then deletes (a crash just loses it):
        # no fsync of it, which on a busy disk costs more than the copy itself.
        out.execute("PRAGMA synchronous=OFF")
        with out.backup("main", src, "main") as b:
            b.step(-1)
        # A single self-contained file: no -wal is needed to read or restore it.
        out.execute("PRAGMA journal_mode=DELETE")
    finally:
        out.close()
        src.close()


def integrity_problems(conn: Connection, limit: int = 100) -> list[str]:
    """The engine's own structural check of the store: [] when it is sound (on SQLite the full
    `integrity_check`: `catalogcheck.integrity_problems` says why)."""
    if not isinstance(conn, apsw.Connection):
        return []  # PostgreSQL: its own checks (amcheck, data checksums) are the operator's
    return catalogcheck.integrity_problems(conn, limit)


def sqlite_file(conn: Connection) -> str | None:
    """The database file behind an embedded (SQLite) connection; None for any other engine or an
    in-memory database. Checks that read a whole table in parallel (fsck --deep) open their own
    read-only connections to it: one connection can serve one thread at a time."""
    if not isinstance(conn, apsw.Connection):
        return None
    try:
        name = conn.db_filename("main")
    except apsw.Error:
        return None
    return name or None


_JSON_PROBE = "".join(map(chr, range(0x80))) + "\u00e9\u2028\u2029\ufeff\U0001f600"
_json_array_compact: bool | None = None


def json_array_is_compact(conn: Connection) -> bool:
    """Whether `json_array(...)` on this connection writes strings, integers and NULLs byte for byte
    as Python's `json.dumps(row, separators=(",", ":"), ensure_ascii=False)`: then a digest over
    such rows can have SQLite write them (C) instead of a Python call per row. SQLite's JSON
    escaping has changed between releases, so it is probed (once per process: one library) on
    every ASCII character and a few others; any other engine answers False."""
    global _json_array_compact
    if not isinstance(conn, apsw.Connection):
        return False
    if _json_array_compact is None:
        import json

        row = [_JSON_PROBE, 0, -(2**62), None, 12345]
        try:
            got = conn.execute("SELECT json_array(?, ?, ?, ?, ?)", row).fetchone()[0]
        except apsw.Error:
            got = None
        _json_array_compact = got == json.dumps(row, separators=(",", ":"), ensure_ascii=False)
    return _json_array_compact


def insert_selected(dest: Connection, insert: str, source: str | Path, selects: Sequence[str]) -> None:
    """Run `insert` followed by each SELECT in turn (in one transaction of `dest`, an embedded
    scratch database), the SELECTs reading the SQLite catalog file at `source` (attached meanwhile:
    their unqualified tables must not be `dest`'s). Rows go from one file to the other inside
    SQLite, outside the GIL, in the order each SELECT gives them."""
    dest.execute("ATTACH DATABASE ? AS source", (str(source),))
    try:
        with dest:
            for select in selects:
                dest.execute(f"{insert} {select}")
    finally:
        dest.execute("DETACH DATABASE source")


def table_exists(conn: Connection, name: str) -> bool:
    """Whether the store has table `name` (e.g. a catalog from before a component's migration).

    Asked of the catalog rather than learnt by catching an SQL error: on PostgreSQL a failed
    statement aborts the enclosing transaction, so a caller's later reads would fail too."""
    if not isinstance(conn, apsw.Connection):
        return conn.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()[0]
    return conn.execute(
        "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (name,)
    ).fetchone() is not None


def json_array_rows(column: str, alias: str) -> str:
    """A FROM-clause item yielding one row per element of the JSON array in `column` (a column,
    or `?` for a bound JSON text); `json_item(alias, i)` reads element i of such a row (itself
    an array)."""
    return f"json_each({column}) {alias}"


def json_item(alias: str, index: int) -> str:
    """Element `index` of a `json_array_rows` row, as text (for string elements)."""
    return f"{alias}.value ->> {int(index)}"


def json_int_item(alias: str, index: int) -> str:
    """Element `index` of a `json_array_rows` row, as an integer (sums, size comparisons).

    SQLite's `->>` already yields an INTEGER for a JSON integer, so no CAST is paid on the fsck
    path; an engine whose `->>` yields text casts here (the comment marks the fragment for
    `storage.pg.translate`, and costs SQLite nothing once the statement is prepared)."""
    return f"{alias}.value ->> {int(index)} /*int*/"


def json_length(column: str) -> str:
    """The number of elements of the JSON array in `column`."""
    return f"json_array_length({column})"


def json_text_at(column: str, *path: int) -> str:
    """The text at array indexes `path` of the JSON in `column` (`json_text_at("c", 0, 1)` is
    c[0][1]); NULL when absent. One lookup, without a row per element as `json_array_rows` makes."""
    return f"{column} ->> '$" + "".join(f"[{int(i)}]" for i in path) + "'"


def json_compact_array(*expressions: str) -> str:
    """A JSON array of `expressions` as one text, written by the engine: byte for byte
    `json.dumps(row, separators=(",", ":"), ensure_ascii=False)` where `json_array_is_compact`
    says so (only then may a caller digest it in place of Python's)."""
    return f"json_array({', '.join(expressions)})"


def json_boolean(condition: str) -> str:
    """`condition` as a JSON `true`/`false` element of a `json_compact_array`."""
    return f"CASE WHEN {condition} THEN json('true') ELSE json('false') END"


def text_position(column: str, needle: str) -> str:
    """The 1-based position of `needle` (an SQL expression) in `column`'s text; 0 when absent."""
    return f"instr({column}, {needle})"


def open_scratch(path: str | Path, cache_kib: int = 8192) -> Connection:
    """A private scratch database (a backup's on-disk sorted store): no journal, no fsync, its
    page cache and sorts bounded to `cache_kib` (sorts larger than that spill to temporary
    files), so what it holds costs disk, not memory. Deleted by its caller; a crash only loses it."""
    conn = apsw.Connection(str(path))
    for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE",
                   f"cache_size=-{int(cache_kib)}"):
        conn.execute(f"PRAGMA {pragma}")
    return conn
