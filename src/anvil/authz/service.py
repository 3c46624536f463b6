"""Relationship-based authorisation: one SpiceDB schema per tenant, relationships, questions.

Storage. Schemas and relationships are source records in `catalog.db`, versioned by
revision: the revision of a write is the journal seq of its one event (`authz.schema.write`,
`authz.relationships.write`, `authz.relationships.delete`), so a consistency token is a
journal position and watchers see every change through the ordinary watch API. A
relationship row lives from `created_rev` until `deleted_rev` (NULL while live); reading "at
revision R" keeps the rows with `created_rev <= R < deleted_rev`, which is what makes exact
snapshots (and consistent paging) possible. Expired relationships (`expires <= now`) are
absent from every answer.

Questions run on a reader connection at a revision chosen by the consistency mode
(`minimize_latency` by default, `at_least_as_fresh`, `at_exact_snapshot`,
`fully_consistent`). Answers are cached per (tenant, revision of the tenant's last authz
write at or before the read revision): a write makes a new revision, so nothing is ever
invalidated, and an entry that depended on an expiring relationship lapses with it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from anvil import jsontext
from anvil.authz import binding as bnd
from anvil.authz import relationships as rels
from anvil.authz.engine import COND, HAS, R_NO, Engine, Result, RowCache, Snapshot
from anvil.authz.relationships import Relationship
from anvil.authz.schema import MAX_DEPTH_DEFAULT, Schema, check_expression_depth, parse
from anvil.context import Principal, RequestContext
from anvil.errors import AnvilError
from anvil.identity import authorize
from anvil.storage import Storage, Txn
from anvil.storage.records import Connection

MIGRATIONS = [
    """CREATE TABLE authz_schemas(
        tenant TEXT NOT NULL,
        revision INTEGER NOT NULL,
        text TEXT NOT NULL,
        digest TEXT NOT NULL,
        written REAL NOT NULL,
        PRIMARY KEY(tenant, revision)
    )""",
    """CREATE TABLE authz_relationships(
        tenant TEXT NOT NULL,
        rtype TEXT NOT NULL,
        rid TEXT NOT NULL,
        relation TEXT NOT NULL,
        stype TEXT NOT NULL,
        sid TEXT NOT NULL,
        srel TEXT NOT NULL,
        caveat TEXT NOT NULL,
        context TEXT,
        expires REAL,
        created_rev INTEGER NOT NULL,
        deleted_rev INTEGER,
        PRIMARY KEY(tenant, rtype, rid, relation, stype, sid, srel, created_rev)
    )""",
    "CREATE UNIQUE INDEX authz_rel_live ON authz_relationships(tenant, rtype, rid, relation, stype, sid, srel) "
    "WHERE deleted_rev IS NULL",
    "CREATE INDEX authz_rel_subject ON authz_relationships(tenant, stype, sid, srel)",
    """CREATE TABLE authz_revisions(
        tenant TEXT NOT NULL,
        revision INTEGER NOT NULL,
        kind TEXT NOT NULL,
        PRIMARY KEY(tenant, revision)
    )""",
    # Bucket bindings (docs/authz.md, "Object access"): a binding holds for the bucket created at
    # `bucket_created`; a bucket deleted and made again under the same name starts unbound.
    """CREATE TABLE authz_bindings(
        bucket TEXT NOT NULL PRIMARY KEY,
        tenant TEXT NOT NULL,
        bucket_created REAL NOT NULL,
        binding TEXT NOT NULL,
        revision INTEGER NOT NULL,
        written REAL NOT NULL
    )""",
]

MAX_UPDATES = 1000
MAX_PRECONDITIONS = 100
MAX_PAGE = 1000
MAX_BULK = 1000
MAX_DELETE = 1000
MAX_LOOKUP = 100_000
CACHE_ENTRIES = 200_000
TOKEN_RE = re.compile(r"^z1\.(\d{1,18})\.([A-Za-z0-9-]{1,64})$")
OBJECT_RE = re.compile(rf"^({rels.TYPE_PART}):({rels.ID_PART})$")
SUBJECT_RE = re.compile(rf"^({rels.TYPE_PART}):({rels.ID_PART}|\*)(?:#({rels.REL_PART}))?$")
CONSISTENCY_MODES = ("minimize_latency", "at_least_as_fresh", "at_exact_snapshot", "fully_consistent")
OPERATIONS = ("create", "touch", "delete")

_LIVE_NOW = "deleted_rev IS NULL AND (expires IS NULL OR expires > ?)"
_AT = "created_rev <= ? AND (deleted_rev IS NULL OR deleted_rev > ?)"
_COLS = "rtype, rid, relation, stype, sid, srel, caveat, context, expires"


def _invalid(message: str) -> AnvilError:
    return AnvilError("InvalidArgument", message)


def schema_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def parse_object(value: Any, what: str) -> tuple[str, str]:
    if not isinstance(value, str) or not (m := OBJECT_RE.match(value)):
        raise _invalid(f"{what} must look like type:id (e.g. document:readme), got {str(value)[:80]!r}")
    return m.group(1), m.group(2)


def parse_subject(value: Any, what: str = "subject") -> tuple[str, str, str]:
    if not isinstance(value, str) or not (m := SUBJECT_RE.match(value)):
        raise _invalid(f"{what} must look like type:id or type:id#relation (e.g. user:amy, group:eng#member), "
                       f"got {str(value)[:80]!r}")
    return m.group(1), m.group(2), m.group(3) or ""


class _Cache:
    """Answers per (tenant, revision, question); bounded LRU; entries lapse at `valid_until`."""

    def __init__(self, size: int = CACHE_ENTRIES):
        self.size = size
        self._d: OrderedDict[tuple, tuple[Any, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple, now: float) -> Any:
        with self._lock:
            hit = self._d.get(key)
            if hit is None or hit[1] <= now:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return hit[0]

    def put(self, key: tuple, value: Any, valid_until: float) -> None:
        with self._lock:
            self._d[key] = (value, valid_until)
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


class AuthzService:
    def __init__(self, storage: Storage, *, max_depth: int = MAX_DEPTH_DEFAULT,
                 find_bucket: Callable[[str], Any] | None = None):
        self.storage = storage
        self.catalog = storage.catalog
        self.deployment = storage.format.deployment_id
        self.max_depth = max_depth
        self.catalog.migrate("authz", MIGRATIONS)
        self._schemas: dict[tuple[str, int], Schema] = {}
        self._schema_at: dict[tuple[str, int], Schema] = {}  # (tenant, read revision) -> schema then
        self._latest: dict[str, int] = {}  # tenant -> revision of its last authz write seen by this process
        self._lock = threading.Lock()
        self.cache = _Cache()
        self.rows = RowCache()
        # bucket name -> a Bucket-like (tenant, created) or None; given by the runtime (objects sit below).
        self._find_bucket = find_bucket
        self._bindings: dict[str, tuple[str, float, bnd.Binding]] | None = None
        # Composed by the runtime for subsystems beside authz (PersonalDB's row bindings): guards name
        # what a tenant's schema must keep, write listeners learn of each authz write after it commits.
        self._schema_guards: list[Callable[[Connection, str], list[tuple[str, str, set[str]]]]] = [
            lambda conn, tenant: _bucket_binding_requirements(conn, tenant, self._binding_live)]
        self._write_listeners: list[Callable[[str, int], None]] = []

    # ---------------------------------------------------------------- composition (runtime)

    def add_schema_guard(self, fn: Callable[[Connection, str], list[tuple[str, str, set[str]]]]) -> None:
        """fn(conn, tenant) -> [(what, resource type, permissions)] that tenant's schema must keep, `what`
        reading "<thing> binds <operations>"; a schema write dropping any is refused (`PreconditionFailed`
        naming `what`), inside the write's transaction. Bucket bindings are the first guard."""
        self._schema_guards.append(fn)

    def on_write(self, fn: Callable[[str, int], None]) -> None:
        """fn(tenant, revision) after each committed schema or relationship write of the tenant."""
        self._write_listeners.append(fn)

    def _wrote(self, tenant: str, revision: int) -> None:
        self._note_write(tenant, revision)
        for fn in self._write_listeners:
            try:
                fn(tenant, revision)
            except Exception:  # noqa: BLE001 - a listener (a derived view) must never fail a committed write
                import logging

                logging.getLogger("anvil.authz").exception("authz write listener failed")

    # ---------------------------------------------------------------- plumbing

    def _conn(self) -> Connection:
        return self.catalog.reader()

    def token(self, revision: int) -> str:
        return f"z1.{revision}.{self.deployment}"

    def _tenant(self, principal: Principal, tenant: Any, action: str) -> str:
        if tenant is None or tenant == "":
            tenant = principal.tenant
        if not isinstance(tenant, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}", tenant):
            raise _invalid("invalid tenant")
        authorize(principal, action, f"tenant:{tenant}")
        return tenant

    def _schema_row(self, conn: Connection, tenant: str, at: int | None) -> tuple[int, str] | None:
        if at is None:
            row = conn.execute("SELECT revision, text FROM authz_schemas WHERE tenant = ? "
                               "ORDER BY revision DESC LIMIT 1", (tenant,)).fetchone()
        else:
            row = conn.execute("SELECT revision, text FROM authz_schemas WHERE tenant = ? AND revision <= ? "
                               "ORDER BY revision DESC LIMIT 1", (tenant, at)).fetchone()
        return (int(row[0]), row[1]) if row else None

    def _schema(self, conn: Connection, tenant: str, at: int | None, *, required: bool = True) -> Schema | None:
        if at is not None:
            # The schema in force at a revision never changes: questions skip the catalog read.
            known = self._schema_at.get((tenant, at))
            if known is not None:
                return known
        row = self._schema_row(conn, tenant, at)
        if row is None:
            if required:
                raise AnvilError("NotFound", "no authorisation schema has been written for this tenant")
            return None
        key = (tenant, row[0])
        schema = self._schemas.get(key)
        if schema is None:
            schema = parse(row[1])
            with self._lock:
                if len(self._schemas) > 256:
                    self._schemas.clear()
                self._schemas[key] = schema
        if at is not None:
            with self._lock:
                if len(self._schema_at) > 4096:
                    self._schema_at.clear()
                self._schema_at[(tenant, at)] = schema
        return schema

    def _tenant_revision(self, conn: Connection, tenant: str, at: int | None = None) -> int:
        """The revision of the tenant's last authz write at or before `at` (0: none)."""
        if at is None:
            row = conn.execute("SELECT max(revision) FROM authz_revisions WHERE tenant = ?", (tenant,)).fetchone()
        else:
            row = conn.execute("SELECT max(revision) FROM authz_revisions WHERE tenant = ? AND revision <= ?",
                               (tenant, at)).fetchone()
        return int(row[0] or 0)

    def _note_write(self, tenant: str, revision: int) -> None:
        with self._lock:
            if revision > self._latest.get(tenant, 0):
                self._latest[tenant] = revision

    def parse_token(self, token: Any) -> int:
        if not isinstance(token, str) or not (m := TOKEN_RE.match(token)):
            raise _invalid("malformed consistency token (expected one returned by a write or a question, "
                           "such as z1.42.DEPLOYMENT)")
        if m.group(2) != self.deployment:
            raise _invalid("the consistency token was issued by another store; this server cannot honour it")
        return int(m.group(1))

    def resolve(self, conn: Connection, tenant: str, consistency: Any) -> int:
        """The consistency request -> the revision to answer at (a revision of an authz write, or 0)."""
        mode, token = "minimize_latency", None
        if isinstance(consistency, str) or consistency is None:
            mode = consistency or mode
        elif isinstance(consistency, dict):
            known = [k for k in CONSISTENCY_MODES if k in consistency]
            if len(known) != 1 or set(consistency) - set(CONSISTENCY_MODES) - {"mode", "token"}:
                if "mode" in consistency:
                    mode, token = consistency["mode"], consistency.get("token")
                else:
                    raise _invalid(f"consistency names one of {', '.join(CONSISTENCY_MODES)}")
            else:
                mode = known[0]
                token = consistency[mode] if isinstance(consistency[mode], str) else None
        else:
            raise _invalid("consistency must be a mode name or an object")
        if mode not in CONSISTENCY_MODES:
            raise _invalid(f"unknown consistency mode {str(mode)[:40]!r} (known: {', '.join(CONSISTENCY_MODES)})")
        if mode == "minimize_latency":
            with self._lock:
                known_rev = self._latest.get(tenant)
            if known_rev is not None:
                return known_rev
            rev = self._tenant_revision(conn, tenant)
            self._note_write(tenant, rev)
            return rev
        if mode == "fully_consistent":
            rev = self._tenant_revision(conn, tenant)
            self._note_write(tenant, rev)
            return rev
        if token is None:
            raise _invalid(f"consistency {mode} needs a token")
        wanted = self.parse_token(token)
        head = int(self.catalog.head()[0])
        if wanted > head:
            raise _invalid(f"the consistency token names revision {wanted}, but this store's head is {head}: "
                           "it cannot be honoured here (a token from a store restored to an earlier point?)")
        if mode == "at_exact_snapshot":
            return self._tenant_revision(conn, tenant, wanted)
        rev = self._tenant_revision(conn, tenant)
        self._note_write(tenant, rev)
        return rev

    # ---------------------------------------------------------------- schema

    def write_schema(self, ctx: RequestContext, text: Any, tenant: Any = None) -> dict[str, Any]:
        tenant = self._tenant(ctx.principal, tenant, "authz:write")
        schema = parse(text)
        check_expression_depth(schema)

        def fn(txn: Txn) -> dict[str, Any]:
            rev = txn.next_seq
            _check_orphans(txn.conn, tenant, schema, txn.now)
            _check_guards(txn.conn, tenant, schema, self._schema_guards)
            txn.conn.execute("INSERT INTO authz_schemas(tenant, revision, text, digest, written) VALUES (?,?,?,?,?)",
                             (tenant, rev, schema.text, schema_digest(schema.text), txn.now))
            txn.conn.execute("INSERT INTO authz_revisions(tenant, revision, kind) VALUES (?,?,?)",
                             (tenant, rev, "schema"))
            txn.emit(tenant, "authz.schema.write", "authz/schema",
                     {"tenant": tenant, "revision": rev, "digest": schema_digest(schema.text), "text": schema.text})
            return {"revision": rev}

        res = self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        self._wrote(tenant, res["revision"])
        return {"written_at": self.token(res["revision"]), "revision": res["revision"], "tenant": tenant,
                "definitions": sorted(schema.definitions), "caveats": sorted(schema.caveats)}

    def read_schema(self, principal: Principal, tenant: Any = None, consistency: Any = None) -> dict[str, Any]:
        tenant = self._tenant(principal, tenant, "authz:read")
        conn = self._conn()
        rev = self.resolve(conn, tenant, consistency)
        row = self._schema_row(conn, tenant, rev)
        if row is None:
            raise AnvilError("NotFound", "no authorisation schema has been written for this tenant")
        return {"schema": row[1], "schema_revision": row[0], "read_at": self.token(rev), "tenant": tenant}

    # ---------------------------------------------------------------- relationship writes

    def write_relationships(self, ctx: RequestContext, updates: Any, preconditions: Any = None,
                            tenant: Any = None) -> dict[str, Any]:
        tenant = self._tenant(ctx.principal, tenant, "authz:write")
        if not isinstance(updates, list) or not updates:
            raise _invalid("updates must be a non-empty list of {operation, relationship}")
        if len(updates) > MAX_UPDATES:
            raise _invalid(f"a batch holds at most {MAX_UPDATES} updates; this one has {len(updates)}")
        parsed: list[tuple[str, Relationship]] = []
        seen: dict[tuple, int] = {}
        for i, u in enumerate(updates):
            where = f"updates[{i}]"
            if not isinstance(u, dict):
                raise _invalid(f"{where}: expected {{operation, relationship}}")
            op = u.get("operation", "touch")
            if op not in OPERATIONS:
                raise _invalid(f"{where}: operation must be one of {', '.join(OPERATIONS)}")
            rel = rels.from_dict(u if "relationship" not in u or isinstance(u["relationship"], str)
                                 else u["relationship"], where)
            if rel.key in seen:
                raise _invalid(f"{where}: the same relationship as updates[{seen[rel.key]}]; a batch changes a "
                               "relationship once")
            seen[rel.key] = i
            parsed.append((op, rel))
        pre = _parse_preconditions(preconditions)

        def fn(txn: Txn) -> dict[str, Any]:
            rev = txn.next_seq
            schema = self._schema(txn.conn, tenant, None)
            assert schema is not None
            for i, (op, rel) in enumerate(parsed):
                if op != "delete":
                    rels.validate(schema, rel, f"updates[{i}]")
                else:
                    # Deleting what cannot exist is still a mistake worth naming: the type and relation.
                    rels.validate_names(schema, rel, f"updates[{i}]")
            _check_preconditions(txn.conn, tenant, pre, txn.now)
            changed = []
            for i, (op, rel) in enumerate(parsed):
                live = txn.conn.execute(
                    f"SELECT {_COLS} FROM authz_relationships WHERE tenant = ? AND rtype = ? AND rid = ? AND "
                    "relation = ? AND stype = ? AND sid = ? AND srel = ? AND deleted_rev IS NULL",
                    (tenant, *rel.key)).fetchone()
                current = Relationship(*live) if live else None
                expired = current is not None and current.expires is not None and current.expires <= txn.now
                if op == "create" and current is not None and not expired:
                    raise AnvilError("AlreadyExists", f"updates[{i}]: relationship {rel.text()} already exists "
                                                      "(use touch to write it regardless)")
                if op == "touch" and current == rel:
                    continue
                if current is not None:
                    txn.conn.execute(
                        "UPDATE authz_relationships SET deleted_rev = ? WHERE tenant = ? AND rtype = ? AND rid = ? "
                        "AND relation = ? AND stype = ? AND sid = ? AND srel = ? AND deleted_rev IS NULL",
                        (rev, tenant, *rel.key))
                if op != "delete":
                    txn.conn.execute(
                        f"INSERT INTO authz_relationships(tenant, {_COLS}, created_rev) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (tenant, *rel.key, rel.caveat, rel.context, rel.expires, rev))
                if op != "delete":
                    entry: dict[str, Any] = {"operation": op, "relationship": rel.text()}
                    if rel.expires is not None:
                        # The exact instant (the text form keeps microseconds): replay rebuilds the row from it.
                        entry["expires"] = rel.expires
                    changed.append(entry)
                elif current is not None:
                    changed.append({"operation": op, "relationship": current.text()})
            txn.conn.execute("INSERT INTO authz_revisions(tenant, revision, kind) VALUES (?,?,?)",
                             (tenant, rev, "relationships"))
            txn.emit(tenant, "authz.relationships.write", "authz/relationships",
                     {"tenant": tenant, "revision": rev, "updates": changed})
            return {"revision": rev, "changed": len(changed)}

        res = self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        self._wrote(tenant, res["revision"])
        return {"written_at": self.token(res["revision"]), "revision": res["revision"], "changed": res["changed"]}

    def delete_relationships(self, ctx: RequestContext, flt: Any, preconditions: Any = None, *,
                             limit: Any = None, allow_partial: bool = False, tenant: Any = None) -> dict[str, Any]:
        tenant = self._tenant(ctx.principal, tenant, "authz:write")
        f = rels.parse_filter(flt)
        if limit is None:
            limit = MAX_DELETE
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_DELETE:
            raise _invalid(f"limit must be an integer from 1 to {MAX_DELETE}")
        pre = _parse_preconditions(preconditions)
        where, params = rels.filter_sql(f)

        def fn(txn: Txn) -> dict[str, Any]:
            rev = txn.next_seq
            _check_preconditions(txn.conn, tenant, pre, txn.now)
            rows = [Relationship(*r) for r in txn.conn.execute(
                f"SELECT {_COLS} FROM authz_relationships WHERE tenant = ? AND deleted_rev IS NULL AND {where} "
                "ORDER BY rtype, rid, relation, stype, sid, srel LIMIT ?", (tenant, *params, limit + 1))]
            partial = len(rows) > limit
            if partial and not allow_partial:
                raise _invalid(f"more than {limit} relationships match the filter; delete with allow_partial "
                               "(and repeat), or narrow the filter")
            rows = rows[:limit]
            for r in rows:
                txn.conn.execute(
                    "UPDATE authz_relationships SET deleted_rev = ? WHERE tenant = ? AND rtype = ? AND rid = ? "
                    "AND relation = ? AND stype = ? AND sid = ? AND srel = ? AND deleted_rev IS NULL",
                    (rev, tenant, *r.key))
            txn.conn.execute("INSERT INTO authz_revisions(tenant, revision, kind) VALUES (?,?,?)",
                             (tenant, rev, "delete"))
            txn.emit(tenant, "authz.relationships.delete", "authz/relationships",
                     {"tenant": tenant, "revision": rev, "filter": f,
                      "updates": [{"operation": "delete", "relationship": r.text()} for r in rows]})
            return {"revision": rev, "deleted": len(rows), "partial": partial}

        res = self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        self._wrote(tenant, res["revision"])
        return {"deleted_at": self.token(res["revision"]), "revision": res["revision"], "deleted": res["deleted"],
                "partial": res["partial"]}

    # ---------------------------------------------------------------- relationship reads

    def read_relationships(self, principal: Principal, flt: Any, *, consistency: Any = None, limit: Any = None,
                           cursor: Any = None, tenant: Any = None) -> dict[str, Any]:
        """A page of live relationships matching the filter, at one revision. The cursor carries the
        revision, so following pages read the same snapshot whatever is written meanwhile."""
        tenant = self._tenant(principal, tenant, "authz:read")
        f = rels.parse_filter(flt)
        if limit is None:
            limit = 100
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise _invalid(f"limit must be an integer from 1 to {MAX_PAGE}")
        conn = self._conn()
        after: list[str] | None = None
        if cursor:
            rev, after = _decode_cursor(cursor, self)
        else:
            rev = self.resolve(conn, tenant, consistency)
        where, params = rels.filter_sql(f)
        sql = (f"SELECT {_COLS} FROM authz_relationships WHERE tenant = ? AND {_AT} AND "
               f"(expires IS NULL OR expires > ?) AND {where}")
        args: list[Any] = [tenant, rev, rev, time.time(), *params]
        if after is not None:
            sql += (" AND (rtype > ? OR (rtype = ? AND (rid > ? OR (rid = ? AND (relation > ? OR (relation = ? AND "
                    "(stype > ? OR (stype = ? AND (sid > ? OR (sid = ? AND srel > ?))))))))))")
            a = after
            args += [a[0], a[0], a[1], a[1], a[2], a[2], a[3], a[3], a[4], a[4], a[5]]
        sql += " ORDER BY rtype, rid, relation, stype, sid, srel LIMIT ?"
        rows = [Relationship(*r) for r in conn.execute(sql, (*args, limit + 1))]
        more = len(rows) > limit
        rows = rows[:limit]
        nxt = _encode_cursor(rev, list(rows[-1].key), self) if more else None
        return {"relationships": [r.to_dict() for r in rows], "cursor": nxt, "read_at": self.token(rev)}

    # ---------------------------------------------------------------- questions

    def _engine(self, conn: Connection, tenant: str, rev: int, context: Any) -> Engine:
        if context is None:
            context = {}
        if not isinstance(context, dict):
            raise _invalid("context must be a JSON object of caveat parameters")
        schema = self._schema(conn, tenant, rev)
        assert schema is not None
        return Engine(schema, Snapshot(conn, tenant, rev, time.time(), self.rows), context, self.max_depth)

    def _question(self, principal: Principal, tenant: Any, consistency: Any, context: Any
                  ) -> tuple[str, Connection, int, Engine]:
        tenant = self._tenant(principal, tenant, "authz:read")
        conn = self._conn()
        rev = self.resolve(conn, tenant, consistency)
        return tenant, conn, rev, self._engine(conn, tenant, rev, context)

    @staticmethod
    def _check_names(engine: Engine, rtype: str, name: str, subject: tuple[str, str, str], *,
                     check_subject_relation: bool = True) -> None:
        d = engine.schema.definitions.get(rtype)
        if d is None:
            raise _invalid(f"unknown resource type {rtype!r}")
        if not d.has(name):
            raise _invalid(f"{rtype!r} has no permission or relation {name!r}")
        sd = engine.schema.definitions.get(subject[0])
        if sd is None:
            raise _invalid(f"unknown subject type {subject[0]!r}")
        if check_subject_relation and subject[2] and not sd.has(subject[2]):
            raise _invalid(f"{subject[0]!r} has no relation {subject[2]!r}")

    def _check_one(self, engine: Engine, tenant: str, rev: int, ctx_key: str, resource: Any, permission: Any,
                   subject: Any, where: str = "") -> dict[str, Any]:
        pfx = f"{where}: " if where else ""
        try:
            rtype, rid = parse_object(resource, "resource")
            subj = parse_subject(subject)
            if not isinstance(permission, str):
                raise _invalid("permission must be a string")
            self._check_names(engine, rtype, permission, subj)
        except AnvilError as e:
            raise AnvilError(e.code, pfx + e.message) from None
        key = ("check", tenant, rev, rtype, rid, permission, subj, ctx_key)
        now = engine.snap.now
        hit = self.cache.get(key, now)
        if hit is None:
            hit = engine.check(rtype, rid, permission, subj)
            # The earliest expiry the whole snapshot has read so far: conservative (rows memoised by
            # an earlier question of a bulk check count too), never too late.
            self.cache.put(key, hit, engine.snap.min_expiry)
        return _answer(hit)

    def check(self, principal: Principal, resource: Any, permission: Any, subject: Any, *, context: Any = None,
              consistency: Any = None, tenant: Any = None) -> dict[str, Any]:
        tenant, conn, rev, engine = self._question(principal, tenant, consistency, context)
        out = self._check_one(engine, tenant, rev, _ctx_key(context), resource, permission, subject)
        return {**out, "checked_at": self.token(rev)}

    def bulk_check(self, principal: Principal, items: Any, *, context: Any = None, consistency: Any = None,
                   tenant: Any = None) -> dict[str, Any]:
        """Many checks at one revision; each item may add its own context. An item's bad input is
        its own error; the others are still answered."""
        if not isinstance(items, list) or not items:
            raise _invalid("items must be a non-empty list of {resource, permission, subject}")
        if len(items) > MAX_BULK:
            raise _invalid(f"a bulk check holds at most {MAX_BULK} items")
        tenant, conn, rev, engine = self._question(principal, tenant, consistency, context)
        results = []
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                raise _invalid(f"items[{i}]: expected {{resource, permission, subject}}")
            try:
                e = engine
                item_ctx = it.get("context")
                if item_ctx:
                    if not isinstance(item_ctx, dict):
                        raise _invalid("context must be a JSON object")
                    e = self._engine(conn, tenant, rev, {**(context or {}), **item_ctx})
                key = _ctx_key({**(context or {}), **(item_ctx or {})})
                res = self._check_one(e, tenant, rev, key, it.get("resource"), it.get("permission"),
                                      it.get("subject"), f"items[{i}]")
                results.append({"resource": it.get("resource"), "permission": it.get("permission"),
                                "subject": it.get("subject"), **res})
            except AnvilError as err:
                if err.code == "MaxDepthExceeded" or err.code == "InvalidArgument":
                    results.append({"resource": it.get("resource"), "permission": it.get("permission"),
                                    "subject": it.get("subject"), "error": {"code": err.code, "message": err.message}})
                else:
                    raise
        return {"results": results, "checked_at": self.token(rev)}

    def lookup_resources(self, principal: Principal, resource_type: Any, permission: Any, subject: Any, *,
                         context: Any = None, consistency: Any = None, limit: Any = None,
                         tenant: Any = None) -> dict[str, Any]:
        tenant, conn, rev, engine = self._question(principal, tenant, consistency, context)
        if not isinstance(resource_type, str) or not isinstance(permission, str):
            raise _invalid("resource_type and permission are required strings")
        subj = parse_subject(subject)
        self._check_names(engine, resource_type, permission, subj)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or not 1 <= limit <= MAX_LOOKUP):
            raise _invalid(f"limit must be an integer from 1 to {MAX_LOOKUP}")
        key = ("lookup_resources", tenant, rev, resource_type, permission, subj, _ctx_key(context), limit)
        hit = self.cache.get(key, engine.snap.now)
        if hit is None:
            found = engine.lookup_resources(resource_type, permission, subj, limit)
            hit = [{"resource_id": rid, **_answer(r)} for rid, r in found]
            self.cache.put(key, hit, engine.snap.min_expiry)
        return {"resources": hit, "looked_up_at": self.token(rev)}

    def lookup_subjects(self, principal: Principal, resource: Any, permission: Any, subject_type: Any, *,
                        subject_relation: Any = None, context: Any = None, consistency: Any = None,
                        tenant: Any = None) -> dict[str, Any]:
        tenant, conn, rev, engine = self._question(principal, tenant, consistency, context)
        rtype, rid = parse_object(resource, "resource")
        if not isinstance(permission, str) or not isinstance(subject_type, str):
            raise _invalid("permission and subject_type are required strings")
        srel = subject_relation or ""
        if not isinstance(srel, str):
            raise _invalid("subject_relation must be a string")
        self._check_names(engine, rtype, permission, (subject_type, "x", srel))
        key = ("lookup_subjects", tenant, rev, rtype, rid, permission, subject_type, srel, _ctx_key(context))
        hit = self.cache.get(key, engine.snap.now)
        if hit is None:
            hit = engine.lookup_subjects(rtype, rid, permission, subject_type, srel)
            self.cache.put(key, hit, engine.snap.min_expiry)
        return {"subjects": hit, "looked_up_at": self.token(rev)}

    def expand(self, principal: Principal, resource: Any, permission: Any, *, consistency: Any = None,
               tenant: Any = None) -> dict[str, Any]:
        tenant, conn, rev, engine = self._question(principal, tenant, consistency, None)
        rtype, rid = parse_object(resource, "resource")
        if not isinstance(permission, str):
            raise _invalid("permission is a required string")
        d = engine.schema.definitions.get(rtype)
        if d is None or not d.has(permission):
            raise _invalid(f"{rtype!r} has no permission or relation {permission!r}")
        return {"tree": engine.expand(rtype, rid, permission), "expanded_at": self.token(rev)}

    # ---------------------------------------------------------------- bucket bindings (object access)

    def _bucket(self, name: Any) -> Any:
        if not isinstance(name, str) or self._find_bucket is None:
            raise AnvilError("NotFound", "bucket not found")
        b = self._find_bucket(name)
        if b is None:
            raise AnvilError("NotFound", "bucket not found")
        return b

    def _load_bindings(self) -> dict[str, tuple[str, float, bnd.Binding]]:
        cached = self._bindings
        if cached is None:
            rows = self._conn().execute("SELECT bucket, tenant, bucket_created, binding FROM authz_bindings").fetchall()
            cached = {r[0]: (r[1], float(r[2]), bnd.binding_from_json(r[3])) for r in rows}
            self._bindings = cached
        return cached

    def _binding_live(self, bucket: str, created: float) -> bool:
        b = self._find_bucket(bucket) if self._find_bucket is not None else None
        return b is not None and b.created == created

    def has_binding(self, bucket: str) -> bool:
        """Whether a bucket of this name has a binding (in memory: asked on every object request)."""
        return bucket in self._load_bindings()

    def binding_of(self, bucket: str, created: float) -> tuple[str, bnd.Binding] | None:
        """The (tenant, binding) of the bucket created at `created`, or None (unbound). In memory:
        it runs on every object request."""
        hit = self._load_bindings().get(bucket)
        if hit is None or hit[1] != created:
            return None
        return hit[0], hit[2]

    def _validate_binding(self, tenant: str, b: bnd.Binding) -> None:
        schema = self._schema(self._conn(), tenant, None, required=False)
        if schema is None:
            raise _invalid(f"tenant {tenant} has no authorisation schema: write one before binding a bucket")
        for what, rtype, perm in b.requirements():  # the object part, then the artefacts part if any
            d = schema.definitions.get(rtype)
            if d is None:
                where = "artefacts.resource_type" if what.startswith("artefacts.") else "resource_type"
                raise _invalid(f"{where} {rtype!r} is not a definition of tenant {tenant}'s schema")
            if not d.has(perm):
                raise _invalid(f"{what}: {rtype!r} has no permission or relation {perm!r}")

    def put_binding(self, ctx: RequestContext, bucket: Any, body: Any) -> dict[str, Any]:
        b = self._bucket(bucket)
        authorize(ctx.principal, "bucket:configure", f"bucket:{bucket}")
        binding = bnd.parse_binding(body)
        self._validate_binding(b.tenant, binding)

        def fn(txn: Txn) -> dict[str, Any]:
            rev = txn.next_seq
            txn.conn.execute("DELETE FROM authz_bindings WHERE bucket = ?", (bucket,))
            txn.conn.execute("INSERT INTO authz_bindings(bucket, tenant, bucket_created, binding, revision, written) "
                             "VALUES (?,?,?,?,?,?)", (bucket, b.tenant, b.created, binding.canonical(), rev, txn.now))
            txn.emit(b.tenant, "authz.binding.put", "authz/binding",
                     {"tenant": b.tenant, "bucket": bucket, "bucket_created": b.created, "binding": binding.to_dict(),
                      "revision": rev})
            return {"revision": rev}

        try:
            res = self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        finally:
            self._bindings = None
        return {"bucket": bucket, "tenant": b.tenant, "binding": binding.to_dict(), "revision": res["revision"]}

    def get_binding(self, principal: Principal, bucket: Any) -> dict[str, Any]:
        b = self._bucket(bucket)
        authorize(principal, "bucket:read", f"bucket:{bucket}")
        hit = self.binding_of(bucket, b.created)
        if hit is None:
            raise AnvilError("NotFound", f"bucket {bucket} has no authorisation binding")
        return {"bucket": bucket, "tenant": hit[0], "binding": hit[1].to_dict()}

    def delete_binding(self, ctx: RequestContext, bucket: Any) -> dict[str, Any]:
        b = self._bucket(bucket)
        authorize(ctx.principal, "bucket:configure", f"bucket:{bucket}")
        if self.binding_of(bucket, b.created) is None:
            raise AnvilError("NotFound", f"bucket {bucket} has no authorisation binding")

        def fn(txn: Txn) -> dict[str, Any]:
            rev = txn.next_seq
            txn.conn.execute("DELETE FROM authz_bindings WHERE bucket = ?", (bucket,))
            txn.emit(b.tenant, "authz.binding.delete", "authz/binding",
                     {"tenant": b.tenant, "bucket": bucket, "revision": rev})
            return {"revision": rev}

        try:
            res = self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        finally:
            self._bindings = None
        return {"bucket": bucket, "unbound": True, "revision": res["revision"]}

    def object_engine(self, tenant: str, context: dict[str, Any]) -> tuple[Engine, int]:
        """An engine at the tenant's newest known revision (minimize latency), for object checks."""
        conn = self._conn()
        rev = self.resolve(conn, tenant, None)
        return self._engine(conn, tenant, rev, context), rev

    def object_check(self, tenant: str, binding: bnd.Binding | bnd.ArtefactPart, op: str, bucket: str, key: str,
                     subject: str, context: dict[str, Any], engine: Engine | None = None) -> Result:
        """Does `subject` have the permission `op` is bound to on the object? (Cached per revision.)"""
        rid = bnd.object_id(bucket, key)
        if len(rid) > bnd.MAX_ID:
            return R_NO  # no relationship can name it (SpiceDB's id limit): fail closed
        subj = parse_subject(subject)
        rev = 0
        if engine is None:
            engine, rev = self.object_engine(tenant, context)
        else:
            rev = engine.snap.revision
        perm = binding.permission(op)
        self._check_names(engine, binding.resource_type, perm, subj)
        key_ = ("check", tenant, rev, binding.resource_type, rid, perm, subj, _ctx_key(context))
        hit = self.cache.get(key_, engine.snap.now)
        if hit is None:
            hit = engine.check(binding.resource_type, rid, perm, subj)
            self.cache.put(key_, hit, engine.snap.min_expiry)
        return hit

    def object_lookup(self, tenant: str, binding: bnd.Binding | bnd.ArtefactPart, op: str, subject: str,
                      context: dict[str, Any]) -> set[str] | None:
        """Every object id of the bound type on which `subject` has the permission `op` is bound to
        (conditional answers count as no), or None when the lookup passes MAX_LOOKUP (callers then check
        per key)."""
        subj = parse_subject(subject)
        engine, rev = self.object_engine(tenant, context)
        perm = binding.permission(op)
        self._check_names(engine, binding.resource_type, perm, subj)
        key_ = ("object_lookup", tenant, rev, binding.resource_type, perm, subj, _ctx_key(context))
        hit = self.cache.get(key_, engine.snap.now)
        if hit is None:
            found = engine.lookup_resources(binding.resource_type, perm, subj, MAX_LOOKUP + 1)
            hit = {rid for rid, r in found if r.state == HAS} if len(found) <= MAX_LOOKUP else None
            self.cache.put(key_, hit, engine.snap.min_expiry)
        return hit

    # ---------------------------------------------------------------- status

    def tenants(self) -> list[str]:
        return [r[0] for r in self._conn().execute("SELECT DISTINCT tenant FROM authz_schemas ORDER BY tenant")]


def _ctx_key(context: Any) -> str:
    return json.dumps(context, sort_keys=True, separators=(",", ":")) if context else ""


def _answer(r: Result) -> dict[str, Any]:
    out: dict[str, Any] = {"permissionship": r.name}
    if r.state == COND:
        out["missing_context"] = sorted(r.missing)
    return out


def _parse_preconditions(pre: Any) -> list[tuple[str, dict[str, str]]]:
    if pre is None:
        return []
    if not isinstance(pre, list) or len(pre) > MAX_PRECONDITIONS:
        raise _invalid(f"preconditions must be a list of at most {MAX_PRECONDITIONS} {{operation, filter}}")
    out = []
    for i, p in enumerate(pre):
        where = f"preconditions[{i}]"
        if not isinstance(p, dict) or p.get("operation") not in ("must_match", "must_not_match"):
            raise _invalid(f"{where}: operation must be must_match or must_not_match")
        out.append((p["operation"], rels.parse_filter(p.get("filter"), f"{where}.filter")))
    return out


def _check_preconditions(conn: Connection, tenant: str, pre: list[tuple[str, dict[str, str]]], now: float) -> None:
    for i, (op, f) in enumerate(pre):
        where, params = rels.filter_sql(f)
        found = conn.execute(f"SELECT 1 FROM authz_relationships WHERE tenant = ? AND {_LIVE_NOW} AND {where} "
                             "LIMIT 1", (tenant, now, *params)).fetchone() is not None
        if found != (op == "must_match"):
            shown = ", ".join(f"{k}={v}" for k, v in f.items())
            raise AnvilError("PreconditionFailed", f"preconditions[{i}] ({op} {shown}) failed: "
                                                   f"{'no' if op == 'must_match' else 'a'} relationship matches; "
                                                   "nothing was written")


def _check_orphans(conn: Connection, tenant: str, schema: Schema, now: float) -> None:
    """Refuse a schema under which some live relationship would no longer be valid (SpiceDB refuses it too)."""
    problems = []
    for rtype, relation, stype, srel, wildcard, caveat, has_exp, n in conn.execute(
        "SELECT rtype, relation, stype, srel, CASE WHEN sid = '*' THEN 1 ELSE 0 END, caveat, "
        "CASE WHEN expires IS NULL THEN 0 ELSE 1 END, count(*) FROM authz_relationships "
        "WHERE tenant = ? AND deleted_rev IS NULL GROUP BY 1, 2, 3, 4, 5, 6, 7", (tenant,)):
        probe = Relationship(rtype, "x", relation, stype, "*" if wildcard else "x", srel, caveat, None,
                             now + 1 if has_exp else None)
        try:
            rels.validate(schema, probe, "")
        except AnvilError as e:
            problems.append(f"{n} relationship(s) {rtype}#{relation}@{stype}{':*' if wildcard else ''}"
                            f"{'#' + srel if srel else ''}{' with ' + caveat if caveat else ''}: {e.message}")
    for text, ctx, caveat in conn.execute(
        "SELECT rtype || ':' || rid || '#' || relation || '@' || stype || ':' || sid, context, caveat "
        "FROM authz_relationships WHERE tenant = ? AND deleted_rev IS NULL AND context IS NOT NULL", (tenant,)):
        cav = schema.caveats.get(caveat)
        if cav is None:
            continue  # already reported above
        try:
            for k, v in json.loads(ctx).items():
                if k not in cav.params:
                    raise _invalid(f"caveat {caveat} no longer has parameter {k!r}")
                rels.convert(cav.params[k], v, f"parameter {k}")
        except AnvilError as e:
            problems.append(f"{text}: {e.message}")
        if len(problems) > 20:
            break
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise AnvilError("PreconditionFailed", "the schema change would orphan existing relationships (delete "
                                               f"them first): {shown}")


def _bucket_binding_requirements(conn: Connection, tenant: str,
                                 live: Callable[[str, float], bool]) -> list[tuple[str, str, set[str]]]:
    """What the tenant's schema must keep for its bucket bindings (else the bucket would refuse every
    object request). Bindings of buckets since deleted (or made again) bind nothing and are skipped."""
    out: list[tuple[str, str, set[str]]] = []
    for bucket, created, text in conn.execute(
            "SELECT bucket, bucket_created, binding FROM authz_bindings WHERE tenant = ? ORDER BY bucket", (tenant,)):
        if not live(bucket, float(created)):
            continue
        b = bnd.binding_from_json(text)
        out.append((f"bucket {bucket} binds object operations", b.resource_type,
                    {b.permission(op) for op in bnd.OPERATIONS}))
        if b.artefacts is not None:
            a = b.artefacts
            out.append((f"bucket {bucket} binds artefact operations", a.resource_type,
                        {a.permission(op) for op in bnd.ARTEFACT_OPERATIONS}))
    return out


def _check_guards(conn: Connection, tenant: str, schema: Schema,
                  guards: list[Callable[[Connection, str], list[tuple[str, str, set[str]]]]]) -> None:
    """Refuse a schema that drops a definition or permission a binding names (a bucket's, a PersonalDB
    group's): rebind or unbind it first."""
    problems = []
    for guard in guards:
        for what, rtype, perms in guard(conn, tenant):
            d = schema.definitions.get(rtype)
            if d is None:
                problems.append(f"{what} to {rtype!r}, which the schema no longer defines")
                continue
            gone = sorted(p for p in perms if not d.has(p))
            if gone:
                problems.append(f"{what} to {', '.join(gone)} of {rtype!r}, which the schema no longer has")
    if problems:
        raise AnvilError("PreconditionFailed", "the schema change would break bindings (unbind or rebind them "
                                               f"first): {'; '.join(problems[:5])}")


def _encode_cursor(rev: int, key: list[str], svc: AuthzService) -> str:
    import base64

    raw = json.dumps([svc.token(rev), key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: Any, svc: AuthzService) -> tuple[int, list[str]]:
    import base64
    import binascii

    try:
        raw = base64.urlsafe_b64decode(str(cursor) + "=" * (-len(str(cursor)) % 4))
        token, key = jsontext.loads(raw)  # strict: deep nesting or a "\ud800" key was a 500
        if not (isinstance(key, list) and len(key) == 6 and all(isinstance(k, str) for k in key)):
            raise ValueError
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise _invalid("malformed cursor (pass back the one a read returned)") from None
    return svc.parse_token(token), key

