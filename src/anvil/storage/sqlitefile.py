"""SQLite databases as *data*: the files PersonalDB orders, snapshots and projects.

These are not the catalog. A PersonalDB group is one logical SQLite database that lives on
client devices; the server validates its schema, parses its changesets (SQLite's session
extension), rebuilds it to take snapshots, and derives projections from it. All of that needs
the SQLite engine itself, so it lives here beside `records` (the only package that imports the
binding) and is exposed as plain functions over plain values: subsystems above storage never
see an `apsw` object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw

# Every failure of the engine while handling such a file.
SqliteError = apsw.Error

# Conflict kinds (sqlite3changeset_apply's reasons) by name, and the answers a policy may give.
CONFLICT_KINDS = {1: "data", 2: "notfound", 3: "conflict", 4: "constraint", 5: "foreign_key"}
_ANSWERS = {"omit": apsw.SQLITE_CHANGESET_OMIT, "replace": apsw.SQLITE_CHANGESET_REPLACE,
            "abort": apsw.SQLITE_CHANGESET_ABORT}


class ChangesetError(Exception):
    """A changeset that cannot be parsed or does not fit the schema."""


@dataclass(frozen=True)
class RowChange:
    table: str
    op: str  # INSERT | UPDATE | DELETE
    pk: tuple[Any, ...]  # primary-key values of the row (old values for UPDATE/DELETE)
    old: tuple[Any, ...] | None
    new: tuple[Any, ...] | None
    # Column indexes an UPDATE sets (the session extension records only changed columns).
    changed: tuple[int, ...] = ()
    # Column indexes the changeset flags as the primary key (`pk` lists their values in this column
    # order until `in_key_order` puts them in the order the table declares its key).
    pk_columns: tuple[int, ...] = ()


def _value(v: Any) -> Any:
    return None if v is apsw.no_change else v


def parse_changeset(data: bytes) -> list[RowChange]:
    """Every row change of a session changeset, or ChangesetError for bytes that are not one."""
    if not data:
        raise ChangesetError("the changeset is empty")
    out: list[RowChange] = []
    try:
        for ch in apsw.Changeset.iter(data):
            old = tuple(_value(v) for v in ch.old) if ch.old is not None else None
            new = tuple(_value(v) for v in ch.new) if ch.new is not None else None
            pks = sorted(ch.pk_columns)
            src = old if old is not None else new
            assert src is not None
            changed = tuple(i for i, v in enumerate(ch.new) if v is not apsw.no_change) if ch.new is not None else ()
            out.append(RowChange(ch.name, ch.op, tuple(src[i] for i in pks), old, new, changed, tuple(pks)))
    except (apsw.Error, UnicodeDecodeError) as e:  # a TEXT value or a table name that is not UTF-8
        raise ChangesetError(f"not a valid SQLite changeset: {e}") from None
    return out


def changeset_columns(data: bytes) -> dict[str, int]:
    """table -> column count as the changeset records it (checked against the schema).

    Every table header counts: a changeset may name a table twice, and a second header with another
    column count would otherwise pass unchecked behind the first."""
    cols: dict[str, int] = {}
    try:
        for ch in apsw.Changeset.iter(data):
            if cols.setdefault(ch.name, ch.column_count) != ch.column_count:
                raise ChangesetError(f"table {ch.name[:64]!r} appears with {cols[ch.name]} and {ch.column_count} "
                                     "columns")
    except (apsw.Error, UnicodeDecodeError) as e:
        raise ChangesetError(f"not a valid SQLite changeset: {e}") from None
    return cols


def in_key_order(changes: list[RowChange], tables: dict[str, dict[str, Any]]) -> list[RowChange]:
    """The changes with `pk` holding the key values in the order the table declares its primary key
    (`tables`: name -> {columns, pk}, as `describe_tables` gives them).

    A changeset lists key columns in column order, so for `t(owner, id, PRIMARY KEY (id, owner))`
    the raw `pk` is (owner, id): anything that names key values (`{id}` of a row binding, a scope's
    PK text, a lookup by key) must take them in the key's order. A change whose flagged key columns
    are not the table's is ChangesetError: SQLite skips such a change when it applies it, so it
    must not be judged (or certified) as if it changed a row."""
    out = []
    for ch in changes:
        info = tables[ch.table]
        idx = [info["columns"].index(p) for p in info["pk"]]
        if tuple(sorted(idx)) != ch.pk_columns:
            raise ChangesetError(f"table {ch.table!r}: the changeset's primary-key columns are not the table's "
                                 f"({', '.join(info['pk'])})")
        src = ch.old if ch.old is not None else ch.new
        assert src is not None
        out.append(dataclasses.replace(ch, pk=tuple(src[i] for i in idx)))
    return out


# A group's schema and migration SQL is written by API callers (a group's creator or admin, not the
# server's operator), and is run by the server (validation, snapshots, projection mirrors) and by every
# replica. It defines tables; it may not reach another file: `ATTACH 'PATH'` (and `VACUUM INTO 'PATH'`,
# an attach underneath) created or rewrote any SQLite file the server may write, the catalog included.
def _no_other_files(action: int, *_: Any) -> int:
    return apsw.SQLITE_DENY if action in (apsw.SQLITE_ATTACH, apsw.SQLITE_DETACH) else apsw.SQLITE_OK


# Validation runs the schema on an empty in-memory database: a schema needs a few thousand VM steps.
# Without a bound, a recursive CTE that never ends (`WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL
# SELECT x+1 FROM c) SELECT count(*) FROM c`) held a server thread and a core for ever.
VALIDATION_STEPS = 50_000_000
_STEPS_PER_CHECK = 100_000
# ... nor build a value near SQLite's 1 GB default to refuse it (`x || x` doubling in a CTE).
VALIDATION_MAX_LENGTH = 16 * 1024 * 1024


def schema_tables(schema_sql: str, migrations: list[str] = ()) -> dict[str, dict[str, Any]]:
    """Open the schema (and migrations) in an in-memory SQLite: table -> {columns, pk}.

    Raises ChangesetError with the engine's message for SQL that does not open, and for a table
    without a PRIMARY KEY (the session extension skips those, so their changes would be lost)."""
    conn = apsw.Connection(":memory:")
    conn.authorizer = _no_other_files
    conn.limit(apsw.SQLITE_LIMIT_LENGTH, VALIDATION_MAX_LENGTH)
    checks = [VALIDATION_STEPS // _STEPS_PER_CHECK]

    def budget() -> bool:  # True interrupts the statement
        checks[0] -= 1
        return checks[0] < 0

    conn.set_progress_handler(budget, _STEPS_PER_CHECK)
    try:
        try:
            conn.execute(schema_sql)
            for m in migrations:
                conn.execute(m)
        except apsw.InterruptError:
            raise ChangesetError(f"the schema SQL does not finish within {VALIDATION_STEPS} SQLite steps "
                                 "on an empty database") from None
        except apsw.Error as e:
            raise ChangesetError(f"the schema SQL does not open in SQLite: {e}") from None
        return describe_tables(conn, require_pk=True)
    finally:
        conn.close()


def describe_tables(conn: Any, *, require_pk: bool = False) -> dict[str, dict[str, Any]]:
    tables: dict[str, dict[str, Any]] = {}
    names = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "AND name NOT LIKE '_anvil_%' ORDER BY name")]
    for name in names:
        info = list(conn.execute(f'PRAGMA table_info("{name}")'))
        pk = [r[1] for r in sorted(info, key=lambda r: r[5]) if r[5]]
        if require_pk and not pk:
            raise ChangesetError(f"table {name!r} has no PRIMARY KEY (the session extension cannot track it)")
        tables[name] = {"columns": [r[1] for r in info], "pk": pk}
    return tables


def _encode(v: Any) -> bytes:
    # Type-tagged, length-prefixed: 1 and '1' and b'1' hash differently, and no value can run into the next.
    if v is None:
        return b"N"
    if isinstance(v, int):
        return b"I" + str(v).encode() + b";"
    if isinstance(v, float):
        return b"F" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        return b"T" + str(len(b)).encode() + b":" + b
    b = bytes(v)
    return b"B" + str(len(b)).encode() + b":" + b


def state_hash(conn: Any) -> str:
    """A digest of the user tables' contents: names, columns and every row in primary-key order.

    Two replicas hold identical database contents exactly when their state hashes agree; a
    snapshot's certificate signs it, so a restored snapshot can be checked without the server."""
    h = hashlib.sha256(b"anvil.personaldb.state.v1\n")
    for name, t in describe_tables(conn).items():
        cols = t["columns"]
        order = ", ".join(f'"{c}"' for c in (t["pk"] or cols))
        h.update(_encode(name) + _encode(",".join(cols)))
        for row in conn.execute(f'SELECT * FROM "{name}" ORDER BY {order}'):
            h.update(b"R" + b"".join(_encode(v) for v in row))
    return h.hexdigest()


ConflictPolicy = Callable[[str, RowChange], str]


def _change_of(ch: Any) -> RowChange:
    old = tuple(_value(v) for v in ch.old) if ch.old is not None else None
    new = tuple(_value(v) for v in ch.new) if ch.new is not None else None
    src = old if old is not None else new
    pks = sorted(ch.pk_columns or ())
    return RowChange(ch.name, ch.op, tuple(src[i] for i in pks) if src else (), old, new)


def replay_policy(kind: str, change: RowChange) -> str:
    """How a committed changeset is applied when building server state (snapshots): the same
    deterministic answer everywhere, so every replica and the server reach the same state."""
    return "replace" if kind in ("data", "conflict") else "omit"


class Database:
    """One SQLite file holding a PersonalDB group's data (a replica, a snapshot, a projection)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.conn = apsw.Connection(self.path)
        self.conn.setbusytimeout(10_000)
        self._session: Any = None

    # -- plain SQL ------------------------------------------------------------------------

    def execute(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(sql, params))

    def script(self, sql: str) -> None:
        """Run SQL text (a group's schema or migration, a changeset's SQL): never on another file."""
        previous = self.conn.authorizer
        self.conn.authorizer = _no_other_files
        try:
            self.conn.execute(sql)
        finally:
            self.conn.authorizer = previous

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if not self.conn.getautocommit():
            self.conn.execute("ROLLBACK")

    def set_journal_wal(self) -> None:
        self.conn.execute("PRAGMA journal_mode=WAL")

    def set_synchronous(self, mode: str) -> None:
        self.conn.execute(f"PRAGMA synchronous={mode}")

    def has_table(self, name: str) -> bool:
        return bool(self.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (name,)))

    def tables(self) -> dict[str, dict[str, Any]]:
        return describe_tables(self.conn)

    def state_hash(self) -> str:
        return state_hash(self.conn)

    # -- sessions -------------------------------------------------------------------------

    def start_session(self, skip_prefix: str = "_anvil_") -> None:
        """Record every change from now on (tables named `skip_prefix...` are bookkeeping, not data)."""
        s = apsw.Session(self.conn, "main")
        s.table_filter(lambda name: not name.startswith(skip_prefix))
        s.attach()
        self._session = s

    def take_changeset(self) -> bytes:
        """The changes recorded since `start_session`, and a fresh session for the next ones."""
        assert self._session is not None
        data = self._session.changeset()
        self._session.close()
        self.start_session()
        return data

    def stop_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def apply(self, changeset: bytes, policy: ConflictPolicy = replay_policy) -> None:
        def conflict(reason: int, ch: Any) -> int:
            kind = CONFLICT_KINDS.get(reason, "constraint")
            if kind == "foreign_key":
                return apsw.SQLITE_CHANGESET_OMIT
            answer = policy(kind, _change_of(ch))
            if answer not in _ANSWERS:
                raise ChangesetError(f"conflict policy answered {answer!r} (omit, replace or abort)")
            if answer == "replace" and kind not in ("data", "conflict"):
                answer = "omit"  # SQLite accepts REPLACE only for data and conflict
            return _ANSWERS[answer]

        try:
            apsw.Changeset.apply(changeset, self.conn, conflict=conflict)
        except apsw.AbortError as e:
            raise ChangesetError(f"the changeset was aborted by the conflict policy: {e}") from None

    @staticmethod
    def invert(changeset: bytes) -> bytes:
        return apsw.Changeset.invert(changeset)

    def backup_to(self, dest: str | Path) -> None:
        out = apsw.Connection(str(dest))
        try:
            with out.backup("main", self.conn, "main") as b:
                b.step(-1)
            out.execute("PRAGMA journal_mode=DELETE")
        finally:
            out.close()

    def close(self) -> None:
        self.stop_session()
        self.conn.close()


def rows(conn_path: str | Path, sql: str, params: Any = None) -> Iterator[tuple[Any, ...]]:
    db = Database(conn_path)
    try:
        yield from db.conn.execute(sql, params)
    finally:
        db.close()
