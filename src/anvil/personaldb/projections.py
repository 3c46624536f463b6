"""Projections: read-only databases derived from a source group for another audience.

A projection's definition is a source record (`pdb_projections`); its database is derived
(`derived/personaldb/projections/NAME.sqlite`) and rebuilt from the source group's log. Next to
it, `derived/personaldb/mirrors/GROUP.sqlite` is the source group materialised at its head: a
commit's changeset is applied to the mirror, then every row it touched is re-read whole from the
mirror and re-projected, so projections follow each commit incrementally.

Spec (JSON):

    {"source": "notes",
     "tables": [{"from": "notes", "to": "shared", "columns": {"id": "id", "body": "text"},
                 "filter": {"equals": {"owner": "ann"}}}                        # literal equality
                {"from": "notes", "to": "mine", "columns": {...},
                 "filter": {"relation": {"subject": "CLIENT_ID", "permission": "pdb:read",
                                         "resource": "pdb:notes/notes/{id}"}}}], # subject may, on the row
     "write_back": "deny" | {"columns": ["text"]}}

The relation filter asks whether `subject` has `permission` on the row's resource (the template's
`{column}` parts filled from the row). When the source group's tenant has an authz schema, the
relationships answer (a decider the runtime composes in, `anvil.authz.rows.Relations`: `subject`
like `user:amy`, `permission` of the resource's definition, values filled in ids as
`rowauth.id_value` writes them), at one authz revision for the whole file, recorded in its
bookkeeping (`relation_filters`, `authz_revision`). Otherwise the subject's granted scopes
(`identity_policies`) answer, through `ScopeRelations`.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anvil.errors import AnvilError
from anvil.identity.scopes import allows
from anvil.personaldb import rowauth
from anvil.storage import sqlitefile as sf
from anvil.storage.records import Connection

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
META = "_anvil_projection"
LOG_KEEP = 20_000  # projection changes kept for subscribers; one further behind loads the file
Relation = Callable[[str, str, str], bool]


def invalid(msg: str) -> AnvilError:
    return AnvilError("InvalidArgument", f"projection: {msg}")


def validate_spec(spec: Any, source_tables: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A clean spec, or InvalidArgument naming what is wrong."""
    if not isinstance(spec, dict) or not isinstance(spec.get("tables"), list) or not spec["tables"]:
        raise invalid("a spec needs a non-empty list of tables")
    out_tables = []
    targets: set[str] = set()
    for t in spec["tables"]:
        if not isinstance(t, dict):
            raise invalid("each table is an object")
        src, dst, cols = t.get("from"), t.get("to", t.get("from")), t.get("columns")
        if src not in source_tables:
            raise AnvilError("PersonalDbUnknownTable", f"projection: table {str(src)[:64]!r} is not in the source")
        # SQLite names are case-insensitive, and it reserves every name that starts with sqlite_: a target
        # such as sqlite_master, two targets `aa` and `AA`, or two projected columns `id` and `ID` were
        # recorded, then the projection's file could not be built (500), and every later rebuild of the
        # source group's projections failed on it. `_anvil` names are Anvil's own (LIKE matches any case).
        if (not isinstance(dst, str) or not IDENT_RE.match(dst) or dst.lower() in targets
                or dst.lower().startswith(("_anvil", "sqlite_"))):
            raise invalid(f"bad or repeated target table {str(dst)[:64]!r}")
        targets.add(dst.lower())
        have = source_tables[src]["columns"]
        if cols is None:
            cols = {c: c for c in have}
        if not isinstance(cols, dict) or not cols:
            raise invalid("columns maps source column -> projected column")
        names: set[str] = set()
        for c, d in cols.items():
            if c not in have or not isinstance(d, str) or not IDENT_RE.match(d) or d.lower() in names:
                raise invalid(f"bad column mapping {str(c)[:64]!r} -> {str(d)[:64]!r}")
            names.add(d.lower())
        pk = source_tables[src]["pk"]
        if not all(p in cols for p in pk):
            raise invalid(f"table {src}: the projection must keep the primary key ({', '.join(pk)})")
        flt = t.get("filter")
        if flt is not None:
            if not isinstance(flt, dict) or len(flt) != 1 or next(iter(flt)) not in ("equals", "relation"):
                raise invalid("filter is {\"equals\": {...}} or {\"relation\": {...}}")
            if "equals" in flt:
                if not isinstance(flt["equals"], dict) or not all(c in have for c in flt["equals"]):
                    raise invalid("equals names source columns")
            else:
                r = flt["relation"]
                if (not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in
                                                       ("subject", "permission", "resource"))):
                    raise invalid("relation needs subject, permission and resource (a template like "
                                  "pdb:GROUP/TABLE/{id})")
                for ref in re.findall(r"\{([^}]*)\}", r["resource"]):
                    if ref not in have:
                        raise invalid(f"relation resource names unknown column {ref[:64]!r}")
        # A list of pairs: the projected table keeps the given column order (the stored spec is
        # canonical JSON with sorted keys, which would reorder a mapping).
        out_tables.append({"from": src, "to": dst, "columns": [[c, d] for c, d in cols.items()], "pk": pk,
                           "filter": flt})
    wb = spec.get("write_back", "deny")
    if wb != "deny":
        if not isinstance(wb, dict) or not isinstance(wb.get("columns"), list):
            raise invalid("write_back is \"deny\" or {\"columns\": [projected column, ...]}")
        projected = {d for t in out_tables for _, d in t["columns"]}
        if not all(isinstance(c, str) and c in projected for c in wb["columns"]):
            raise invalid("write_back columns must be projected columns")
    return {"source": spec.get("source"), "tables": out_tables, "write_back": wb}


class ScopeRelations:
    """`subject has permission on resource`, decided by the subject's granted scopes (until
    relationship authorisation lands). Reads the grants once per projection pass."""

    mode = "scopes"
    revision = 0

    def __init__(self, conn: Connection):
        self.conn = conn
        self._cache: dict[str, list[str]] = {}

    def __call__(self, subject: str, permission: str, resource: str) -> bool:
        if subject not in self._cache:
            self._cache[subject] = [r[0] for r in self.conn.execute(
                "SELECT scope FROM identity_policies WHERE client_id = ?", (subject,))]
        return any(allows(s, permission, resource) for s in self._cache[subject])


def _passes(table: dict[str, Any], row: dict[str, Any], relation: Relation) -> bool:
    flt = table["filter"]
    if flt is None:
        return True
    if "equals" in flt:
        return all(row.get(c) == v for c, v in flt["equals"].items())
    r = flt["relation"]
    if getattr(relation, "mode", "scopes") == "relationships":
        resource = rowauth.fill(r["resource"], row)  # ids as row bindings write them
    else:
        resource = re.sub(r"\{([^}]*)\}", lambda m: str(row.get(m.group(1))), r["resource"])
    return relation(r["subject"], r["permission"], resource)


def has_relation_filter(spec: dict[str, Any]) -> bool:
    return any(t.get("filter") and "relation" in t["filter"] for t in spec["tables"])


def relation_meta(spec: dict[str, Any], relation: Relation) -> dict[str, str]:
    """What decided a projection's relation filters (none: {}), kept in its bookkeeping table."""
    if not has_relation_filter(spec):
        return {}
    return {"relation_filters": getattr(relation, "mode", "scopes"),
            "authz_revision": str(getattr(relation, "revision", 0))}


def create_tables(db: sf.Database, spec: dict[str, Any], source_tables: dict[str, dict[str, Any]]) -> None:
    for t in spec["tables"]:
        mapping = dict(t["columns"])
        cols = ", ".join(f'"{d}"' for d in mapping.values())
        pk = ", ".join(f'"{mapping[p]}"' for p in t["pk"])
        db.script(f'CREATE TABLE IF NOT EXISTS "{t["to"]}"({cols}, PRIMARY KEY ({pk}))')
    db.script(f"CREATE TABLE IF NOT EXISTS {META}(k TEXT PRIMARY KEY, v TEXT NOT NULL)")


def project_rows(db: sf.Database, mirror: sf.Database, spec: dict[str, Any], touched: dict[str, set[tuple]] | None,
                 relation: Relation) -> int:
    """Re-project the `touched` rows (table -> pk tuples; None: every row) from the mirror."""
    n = 0
    for t in spec["tables"]:
        mapping = dict(t["columns"])
        src_cols = list(mirror.tables()[t["from"]]["columns"])
        pk = t["pk"]
        if touched is None:
            db.execute(f'DELETE FROM "{t["to"]}"')
            rows = mirror.execute(f'SELECT * FROM "{t["from"]}"')
            keys = None
        else:
            keys = touched.get(t["from"])
            if not keys:
                continue
            rows = []
            where = " AND ".join(f'"{p}" = ?' for p in pk)
            for k in keys:
                rows += mirror.execute(f'SELECT * FROM "{t["from"]}" WHERE {where}', k)
                dwhere = " AND ".join(f'"{mapping[p]}" = ?' for p in pk)
                db.execute(f'DELETE FROM "{t["to"]}" WHERE {dwhere}', k)
        names = list(mapping)
        ins = (f'INSERT INTO "{t["to"]}"({", ".join(chr(34) + mapping[c] + chr(34) for c in names)}) '
               f'VALUES ({", ".join("?" for _ in names)})')
        for r in rows:
            row = dict(zip(src_cols, r, strict=True))
            if _passes(t, row, relation):
                db.execute(ins, [row[c] for c in names])
                n += 1
        del keys
    return n


class Projections:
    """The derived files of every projection, kept current by `on_commit` and rebuilt by `rebuild`."""

    def __init__(self, root: Path):
        self.dir = Path(root) / "derived" / "personaldb"

    def mirror_path(self, group: str) -> Path:
        return self.dir / "mirrors" / f"{group}.sqlite"

    def path(self, name: str) -> Path:
        return self.dir / "projections" / f"{name}.sqlite"

    def meta(self, name: str) -> dict[str, str]:
        return self.meta_of(self.path(name))

    @staticmethod
    def meta_of(p: Path) -> dict[str, str]:
        if not p.exists():
            return {}
        db = sf.Database(p)
        try:
            return {k: v for k, v in db.execute(f"SELECT k, v FROM {META}")}
        except sf.SqliteError:
            return {}
        finally:
            db.close()

    def rebuild_group(self, group: str, materialise: Callable[[Path], sf.Database], head: tuple[int, str],
                      projections: list[tuple[str, dict[str, Any]]], relation: Relation) -> None:
        """The mirror of `group` from the log, then every projection of it from the mirror."""
        (self.dir / "mirrors").mkdir(parents=True, exist_ok=True)
        (self.dir / "projections").mkdir(parents=True, exist_ok=True)
        tmp = self.mirror_path(group).with_suffix(".tmp")
        for suffix in ("", "-wal", "-shm"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
        mirror = materialise(tmp)
        try:
            mirror.script(f"CREATE TABLE IF NOT EXISTS {META}(k TEXT PRIMARY KEY, v TEXT NOT NULL)")
            _set_meta(mirror, group, head)
        finally:
            mirror.close()
        shutil.move(str(tmp), self.mirror_path(group))
        for name, spec in projections:
            self.rebuild_one(name, spec, group, head, relation)

    def rebuild_one(self, name: str, spec: dict[str, Any], group: str, head: tuple[int, str],
                    relation: Relation) -> None:
        (self.dir / "projections").mkdir(parents=True, exist_ok=True)
        mirror = sf.Database(self.mirror_path(group))
        tmp = self.path(name).with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        db = sf.Database(tmp)
        try:
            db.begin()
            create_tables(db, spec, mirror.tables())
            project_rows(db, mirror, spec, None, relation)
            _set_meta(db, group, head, relation_meta(spec, relation))
            db.commit()
        finally:
            db.close()
            mirror.close()
        tmp.replace(self.path(name))
        self._log_reset(name, head)

    # -- the change log subscribers follow ---------------------------------------------------
    #
    # Beside each projection file, `NAME.log.sqlite` holds the session changeset of every source
    # entry applied to it since its last full build (whose head is the log's first row, with no
    # changeset). A subscriber at (source index I, hash H) gets the rows after I, which must
    # follow on from I without a gap; otherwise (a rebuild, a trimmed log, a crash between the
    # file and its log) it is told to load the file again, like a group's snapshot_required.

    def log_path(self, name: str) -> Path:
        return self.dir / "projections" / f"{name}.log.sqlite"

    def _log_db(self, name: str) -> sf.Database:
        db = sf.Database(self.log_path(name))
        db.set_journal_wal()
        db.script("CREATE TABLE IF NOT EXISTS entries(source_index INTEGER PRIMARY KEY, source_hash TEXT NOT NULL, "
                  "changeset BLOB)")
        return db

    def _log_reset(self, name: str, head: tuple[int, str]) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.log_path(name)) + suffix).unlink(missing_ok=True)
        db = self._log_db(name)
        try:
            db.execute("INSERT INTO entries(source_index, source_hash, changeset) VALUES (?, ?, NULL)", head)
        finally:
            db.close()

    def _log_append(self, name: str, head: tuple[int, str], changeset: bytes) -> None:
        db = self._log_db(name)
        try:
            db.begin()
            db.execute("INSERT INTO entries(source_index, source_hash, changeset) VALUES (?, ?, ?) "
                       "ON CONFLICT (source_index) DO UPDATE SET source_hash = excluded.source_hash, "
                       "changeset = excluded.changeset", (head[0], head[1], changeset))
            db.execute("DELETE FROM entries WHERE source_index <= ?", (head[0] - LOG_KEEP,))
            db.commit()
        finally:
            db.close()

    def changes_after(self, name: str, index: int, h: str, limit: int) -> dict[str, Any]:
        """The changes after source entry (index, h), or `snapshot_required` (load the file again)."""
        if not self.log_path(name).exists():
            return {"status": "snapshot_required", "reason": "no change log"}
        db = self._log_db(name)
        try:
            at = db.execute("SELECT source_hash FROM entries WHERE source_index = ?", (index,))
            if not at or at[0][0] != h:
                return {"status": "snapshot_required", "reason": "this source entry is not in the change log"}
            rows = db.execute("SELECT source_index, source_hash, changeset FROM entries WHERE source_index > ? "
                              "ORDER BY source_index LIMIT ?", (index, limit + 1))
        finally:
            db.close()
        more = len(rows) > limit
        rows = rows[:limit]
        for expect, r in enumerate(rows, start=index + 1):
            if r[0] != expect or r[2] is None:
                return {"status": "snapshot_required", "reason": "the change log has a gap"}
        return {"status": "ok", "more": more,
                "entries": [{"source_index": r[0], "source_hash": r[1], "changeset": bytes(r[2])} for r in rows]}

    def on_commit(self, group: str, changeset: bytes, kind: str, head: tuple[int, str],
                  projections: list[tuple[str, dict[str, Any]]], relation: Relation) -> None:
        """Apply one committed entry to the mirror, re-project the rows it touched."""
        mirror = sf.Database(self.mirror_path(group))
        try:
            mirror.begin()
            if kind == "migration":
                mirror.script(changeset.decode())
                touched = None
            else:
                mirror.apply(changeset)
                touched = {}
                # Key values in the key's declared order: project_rows looks rows up by `t["pk"]`.
                for ch in sf.in_key_order(sf.parse_changeset(changeset), mirror.tables()):
                    touched.setdefault(ch.table, set()).add(ch.pk)
            _set_meta(mirror, group, head)
            mirror.commit()
            for name, spec in projections:
                db = sf.Database(self.path(name))
                try:
                    db.start_session()  # what subscribers apply (the bookkeeping table is not recorded)
                    db.begin()
                    project_rows(db, mirror, spec, touched, relation)
                    _set_meta(db, group, head, relation_meta(spec, relation))
                    db.commit()
                    changes = db.take_changeset()
                finally:
                    db.stop_session()
                    db.close()
                self._log_append(name, head, changes)
        finally:
            mirror.close()

    def state(self, name: str) -> str | None:
        p = self.path(name)
        if not p.exists():
            return None
        db = sf.Database(p)
        try:
            return db.state_hash()
        finally:
            db.close()


def _set_meta(db: sf.Database, group: str, head: tuple[int, str], extra: dict[str, str] | None = None) -> None:
    for k, v in (("group", group), ("source_index", str(head[0])), ("source_hash", head[1]),
                 *(extra or {}).items()):
        db.execute(f"INSERT INTO {META}(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v", (k, v))


def dumps(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))
