"""Relationship answers for PersonalDB rows and projection filters (docs/personaldb.md, "Row
permissions by relationship").

PersonalDB and authz are sibling layers: neither imports the other. The runtime hands a `RowAuthz`
to the PersonalDB service (which decides *whom* to ask and *what* the row's resource is) and
`relations_at` to the projections participant; this module only answers questions about
resources, permissions and subjects of one tenant's schema, and names the revision it answered at.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from anvil.authz import binding as bnd
from anvil.authz.engine import HAS, Engine, RowCache, Snapshot
from anvil.authz.schema import MAX_DEPTH_DEFAULT, Schema, parse
from anvil.authz.service import OBJECT_RE, AuthzService, _ctx_key, parse_subject
from anvil.errors import AnvilError
from anvil.storage.records import Connection, table_exists

# A projection pass decides its first rows of a (type, permission, subject) one check each; past this
# many it asks lookup resources once and answers the rest from that set (a full rebuild).
CHECKS_BEFORE_LOOKUP = 16
MAX_LOOKUP = 100_000

_parsed: dict[str, Schema] = {}
_parsed_lock = threading.Lock()


def _schema_of(text: str) -> Schema:
    hit = _parsed.get(text)
    if hit is None:
        hit = parse(text)
        with _parsed_lock:
            if len(_parsed) > 64:
                _parsed.clear()
            _parsed[text] = hit
    return hit


def request_facts() -> dict[str, Any]:
    """Caveat context of the request (as for objects): `client_ip` and `now` (whole seconds)."""
    facts: dict[str, Any] = {"now": datetime.fromtimestamp(int(time.time()), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    ip = bnd.CLIENT_ADDRESS.get()
    if ip:
        facts["client_ip"] = ip
    return facts


class RowAuthz:
    """What the PersonalDB service asks authz, through the service's caches and consistency."""

    def __init__(self, authz: AuthzService):
        self.authz = authz

    def validate_binding(self, tenant: str, resource_type: str, permissions: dict[str, str]) -> None:
        """InvalidArgument unless the tenant's schema has the definition and every named permission."""
        schema = self.authz._schema(self.authz._conn(), tenant, None, required=False)
        if schema is None:
            raise AnvilError("InvalidArgument", f"tenant {tenant} has no authorisation schema: write one before "
                                                "binding a group")
        d = schema.definitions.get(resource_type)
        if d is None:
            raise AnvilError("InvalidArgument", f"resource_type {resource_type!r} is not a definition of tenant "
                                                f"{tenant}'s schema")
        for op, perm in permissions.items():
            if not d.has(perm):
                raise AnvilError("InvalidArgument", f"{op}: {resource_type!r} has no permission or relation {perm!r}")

    def row_checker(self, tenant: str, subject: str) -> tuple[int, Callable[[str, str, str], tuple[str, list[str]]]]:
        """(revision, check): check(resource_type, resource_id, permission) -> (permissionship, missing
        caveat context) for `subject`, all at one revision (the tenant's newest known: minimize latency),
        with the request's facts as caveat context. NotFound without a schema, InvalidArgument for a
        subject or name the schema does not know (callers refuse: fail closed)."""
        facts = request_facts()
        engine, rev = self.authz.object_engine(tenant, facts)
        subj = parse_subject(subject)
        ctx_key = _ctx_key(facts)
        cache = self.authz.cache

        def check(rtype: str, rid: str, perm: str) -> tuple[str, list[str]]:
            if len(rid) > bnd.MAX_ID:
                return "no_permission", []  # no relationship can name it (SpiceDB's id limit)
            self.authz._check_names(engine, rtype, perm, subj)
            key = ("check", tenant, rev, rtype, rid, perm, subj, ctx_key)
            hit = cache.get(key, engine.snap.now)
            if hit is None:
                hit = engine.check(rtype, rid, perm, subj)
                cache.put(key, hit, engine.snap.min_expiry)
            return hit.name, sorted(hit.missing)

        return rev, check

    def relations(self, conn: Connection, tenant: str) -> Relations | None:
        return relations_at(conn, tenant, self.authz.max_depth)


class Relations:
    """`subject has permission on resource` (text forms `user:amy`, `view`, `note:notes/1`) for one tenant
    at one revision; no caveat context, so a conditional answer is no. Bad names answer no."""

    mode = "relationships"

    def __init__(self, engine: Engine, revision: int):
        self.engine = engine
        self.revision = revision
        self._calls: dict[tuple, int] = {}
        self._found: dict[tuple, set[str] | None] = {}

    def __call__(self, subject: str, permission: str, resource: str) -> bool:
        m = OBJECT_RE.match(resource)
        if m is None or len(m.group(2)) > bnd.MAX_ID:
            return False
        rtype, rid = m.group(1), m.group(2)
        try:
            subj = parse_subject(subject)
        except AnvilError:
            return False
        schema = self.engine.schema
        d = schema.definitions.get(rtype)
        if d is None or not d.has(permission) or subj[0] not in schema.definitions:
            return False
        key = (rtype, permission, subj)
        try:
            if key in self._found:
                found = self._found[key]
                if found is not None:
                    return rid in found
            else:
                n = self._calls[key] = self._calls.get(key, 0) + 1
                if n > CHECKS_BEFORE_LOOKUP:
                    rows = self.engine.lookup_resources(rtype, permission, subj, MAX_LOOKUP + 1)
                    found = {r for r, res in rows if res.state == HAS} if len(rows) <= MAX_LOOKUP else None
                    self._found[key] = found
                    if found is not None:
                        return rid in found
            return self.engine.check(rtype, rid, permission, subj).state == HAS
        except AnvilError:
            return False  # MaxDepthExceeded and the like: not shown (fail closed)


def relations_at(conn: Connection, tenant: str, max_depth: int = MAX_DEPTH_DEFAULT) -> Relations | None:
    """The tenant's relationships at its newest authz revision as `conn` sees it, or None when the tenant
    has no schema (relationships are not configured: scopes decide). Works on any catalog connection,
    so a restore's rebuild decides exactly as the server does."""
    if not table_exists(conn, "authz_schemas"):
        return None
    row = conn.execute("SELECT max(revision) FROM authz_revisions WHERE tenant = ?", (tenant,)).fetchone()
    rev = int(row[0] or 0)
    text = conn.execute("SELECT text FROM authz_schemas WHERE tenant = ? AND revision <= ? ORDER BY revision DESC "
                        "LIMIT 1", (tenant, rev)).fetchone()
    if text is None:
        return None
    engine = Engine(_schema_of(text[0]), Snapshot(conn, tenant, rev, time.time(), RowCache(20_000)), {}, max_depth)
    return Relations(engine, rev)


def binding_problem(conn: Connection, tenant: str, resource_type: str, permissions: dict[str, str]) -> str | None:
    """Why a binding does not fit the tenant's newest schema as `conn` sees it (None: it fits). For
    validation after a restore, where the schema guard of the live server never ran."""
    if not table_exists(conn, "authz_schemas"):
        return f"tenant {tenant} has no authorisation schema"
    row = conn.execute("SELECT text FROM authz_schemas WHERE tenant = ? ORDER BY revision DESC LIMIT 1",
                       (tenant,)).fetchone()
    if row is None:
        return f"tenant {tenant} has no authorisation schema"
    d = _schema_of(row[0]).definitions.get(resource_type)
    if d is None:
        return f"{resource_type!r} is not a definition of tenant {tenant}'s schema"
    gone = sorted({f"{op}={perm}" for op, perm in permissions.items() if not d.has(perm)})
    return f"{resource_type!r} has no {', '.join(gone)}" if gone else None
