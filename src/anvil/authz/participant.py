"""Authorisation's recovery participant: schemas and relationships are source records.

The summary is taken at the checkpoint revision (the catalog copy's journal head): counts of
tenants, schemas, caveats and relationships, and one digest over each tenant's current schema
and every live relationship in its text form. Validation parses every tenant's schema, checks
every live relationship against it (and the revision bookkeeping), and compares the summary
with the manifest's. The smoke test reads every schema and relationship back through the
public API of the restored server and recomputes the digest, then asks a check for sampled
direct relationships.

No structure is precomputed from relationships today (answers are computed on demand and
cached in memory per revision), so there is nothing derived to rebuild. Its rows are replayable
from the journal (`Replayer`, in `anvil.authz.replay`).
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
from typing import TYPE_CHECKING, Any

from anvil.authz.binding import OPERATIONS, binding_from_json
from anvil.errors import AnvilError
from anvil.storage.records import Connection, table_exists
from anvil.storage.recovery import Finding, Participant, RecoveryContext

if TYPE_CHECKING:
    from anvil.authz.relationships import Relationship


class _OnFirstUse:
    """A module imported when first used: the schema language (a lark grammar, ~0.1 s of
    imports) is needed only when a store has schemas or relationships to check, and `anvil
    fsck` of a store without any should not pay for it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


rels: Any = _OnFirstUse("anvil.authz.relationships")


def parse(text: str) -> Any:
    return importlib.import_module("anvil.authz.schema").parse(text)

TABLES = ["authz_relationships", "authz_schemas", "authz_revisions", "authz_bindings"]
MAX_FINDINGS = 50
SMOKE_CHECKS = 20
_COLS = "rtype, rid, relation, stype, sid, srel, caveat, context, expires"


def _schemas(conn: Connection) -> dict[str, tuple[int, str, str]]:
    """tenant -> (revision, text, recorded digest) of its current schema."""
    out: dict[str, tuple[int, str, str]] = {}
    for tenant, rev, text, digest in conn.execute(
            "SELECT tenant, revision, text, digest FROM authz_schemas ORDER BY tenant, revision"):
        out[tenant] = (int(rev), text, digest)
    return out


def _live(conn: Connection) -> list[tuple[str, Relationship]]:
    rows = iter(conn.execute(
        f"SELECT tenant, {_COLS} FROM authz_relationships WHERE deleted_rev IS NULL "
        "ORDER BY tenant, rtype, rid, relation, stype, sid, srel"))
    first = next(rows, None)
    if first is None:
        return []  # without importing the schema language (~20 ms of every fsck of such a store)
    rel = rels.Relationship  # looked up once, not per row
    return [(r[0], rel(*r[1:])) for r in itertools.chain((first,), rows)]


def digest(schemas: dict[str, str], relationships: list[tuple[str, str]]) -> str:
    """Over (tenant -> schema text) and (tenant, relationship text): what the API can reproduce."""
    h = hashlib.sha256()
    for tenant in sorted(schemas):
        h.update(f"schema\t{tenant}\t{hashlib.sha256(schemas[tenant].encode()).hexdigest()}\n".encode())
    for tenant, text in sorted(relationships):
        h.update(f"rel\t{tenant}\t{text}\n".encode())
    return h.hexdigest()


def _bindings(conn: Connection) -> list[tuple[str, str, float, str]]:
    """(bucket, tenant, bucket_created, canonical binding) of every bucket binding."""
    if not table_exists(conn, "authz_bindings"):
        return []
    return [(r[0], r[1], float(r[2]), r[3]) for r in conn.execute(
        "SELECT bucket, tenant, bucket_created, binding FROM authz_bindings ORDER BY bucket")]


def bindings_digest(rows: list[tuple[str, str, str]]) -> str:
    """Over (bucket, tenant, canonical binding): what the API can reproduce."""
    h = hashlib.sha256()
    for bucket, tenant, text in sorted(rows):
        h.update(f"binding\t{bucket}\t{tenant}\t{text}\n".encode())
    return h.hexdigest()


DECISIONS_PER_TENANT = 16
MAX_DECISIONS = 64


def _decision_point(conn: Connection) -> tuple[int, float]:
    """The revision decisions are recorded at (the last authz write: every later revision answers the
    same) and the instant they are evaluated at (that write's time, so that replays agree however
    much later they run, even where relationships expire)."""
    rev = int(conn.execute("SELECT max(revision) FROM authz_revisions").fetchone()[0] or 0)
    row = conn.execute("SELECT ts FROM journal WHERE seq = ?", (rev,)).fetchone() if table_exists(
        conn, "journal") else None
    if row is None:
        row = conn.execute("SELECT max(written) FROM authz_schemas").fetchone()
    return rev, float(row[0] or 0.0) if row else 0.0


def _decide(conn: Connection, schema: Any, tenant: str, rev: int, now: float, resource: str, permission: str,
            subject: str) -> tuple[dict[str, Any], bool]:
    """(the answer, whether it depended on an expiring relationship) of one check at (rev, now)."""
    from anvil.authz.engine import COND, Engine, RowCache, Snapshot
    from anvil.authz.service import parse_object, parse_subject

    rtype, rid = parse_object(resource, "resource")
    snap = Snapshot(conn, tenant, rev, now, RowCache(1000))
    r = Engine(schema, snap, {}).check(rtype, rid, permission, parse_subject(subject))
    out: dict[str, Any] = {"permissionship": r.name}
    if r.state == COND:
        out["missing_context"] = sorted(r.missing)
    return out, snap.min_expiry != float("inf")


def record_decisions(conn: Connection) -> dict[str, Any]:
    """A deterministic sample of check decisions at the checkpoint revision (docs/authz.md, Recovery):
    for evenly spaced live relationships, each permission of the resource's definition for that
    relationship's subject (mostly granted) and for the subject of another sampled relationship (mostly
    denied). The drill and `recovery validate` replay them at that exact revision."""
    rev, now = _decision_point(conn)
    checks: list[dict[str, Any]] = []
    for tenant, (_srev, text, _d) in sorted(_schemas(conn).items()):
        try:
            schema = parse(text)
        except AnvilError:
            continue  # validate reports it
        rel = rels.Relationship
        rows = [rel(*r) for r in conn.execute(
            f"SELECT {_COLS} FROM authz_relationships WHERE tenant = ? AND created_rev <= ? AND "
            "(deleted_rev IS NULL OR deleted_rev > ?) AND sid <> '*' "
            "ORDER BY rtype, rid, relation, stype, sid, srel", (tenant, rev, rev))]
        if not rows:
            continue
        step = max(1, len(rows) // DECISIONS_PER_TENANT)
        picked = rows[::step][:DECISIONS_PER_TENANT]
        for i, r in enumerate(picked):
            d = schema.definitions.get(r.rtype)
            if d is None:
                continue
            names = sorted(d.permissions) or [r.relation]
            other = picked[(i + 1) % len(picked)]
            subjects = [f"{r.stype}:{r.sid}" + (f"#{r.srel}" if r.srel else ""),
                        f"{other.stype}:{other.sid}" + (f"#{other.srel}" if other.srel else "")]
            for permission in [r.relation, *names[:2]]:
                for subject in dict.fromkeys(subjects):
                    if len(checks) >= MAX_DECISIONS:
                        break
                    resource = f"{r.rtype}:{r.rid}"
                    try:
                        answer, expiring = _decide(conn, schema, tenant, rev, now, resource, permission, subject)
                    except AnvilError:
                        continue
                    checks.append({"tenant": tenant, "resource": resource, "permission": permission,
                                   "subject": subject, "context": {}, "expiring": expiring, **answer})
    # The same question may come up twice (two relationships of one resource): keep it once.
    unique = list({json.dumps(c, sort_keys=True): c for c in checks}.values())
    return {"revision": rev, "now": now, "checks": unique}


def replay_decisions(conn: Connection, recorded: dict[str, Any]) -> list[str]:
    """Each recorded decision asked again at its revision and instant: the differences, as sentences."""
    rev, now = int(recorded.get("revision") or 0), float(recorded.get("now") or 0.0)
    schemas: dict[str, Any] = {}
    problems = []
    for c in recorded.get("checks") or []:
        tenant = c["tenant"]
        if tenant not in schemas:
            row = conn.execute("SELECT text FROM authz_schemas WHERE tenant = ? AND revision <= ? "
                               "ORDER BY revision DESC LIMIT 1", (tenant, rev)).fetchone()
            try:
                schemas[tenant] = parse(row[0]) if row else None
            except AnvilError:
                schemas[tenant] = None
        schema = schemas[tenant]
        want = c["permissionship"]
        if schema is None:
            problems.append(f"check {c['resource']} {c['permission']} {c['subject']} (tenant {tenant}): the "
                            f"schema at revision {rev} is missing or broken; recorded {want}")
            continue
        try:
            got = _decide(conn, schema, tenant, rev, now, c["resource"], c["permission"], c["subject"])[0]
        except AnvilError as e:
            got = {"permissionship": f"error {e.code}: {e.message}"}
        if got["permissionship"] != want or got.get("missing_context", []) != c.get("missing_context", []):
            problems.append(f"check {c['resource']} {c['permission']} {c['subject']} (tenant {tenant}) at revision "
                            f"{rev} answers {got['permissionship']}, recorded at backup {want}")
    return problems


def summary(conn: Connection) -> dict[str, Any]:
    if not table_exists(conn, "authz_schemas"):
        return {"tenants": 0, "schemas": 0, "caveats": 0, "relationships": 0, "rows": 0, "revision": 0,
                "digest": digest({}, []), "per_tenant": {}, "bindings": 0, "bindings_digest": bindings_digest([])}
    with conn:  # one read snapshot: counts and digest agree
        schemas = _schemas(conn)
        live = _live(conn)
        rows = int(conn.execute("SELECT count(*) FROM authz_relationships").fetchone()[0])
        n_schemas = int(conn.execute("SELECT count(*) FROM authz_schemas").fetchone()[0])
        head = conn.execute("SELECT max(seq) FROM journal").fetchone()[0] if table_exists(conn, "journal") else 0
        bindings = _bindings(conn)
        decisions = record_decisions(conn)
    caveats = 0
    per_tenant: dict[str, dict[str, Any]] = {}
    for tenant, (_rev, text, _d) in schemas.items():
        try:
            caveats += len(parse(text).caveats)
        except AnvilError:
            pass  # validate reports it
        per_tenant[tenant] = {"relationships": 0}
    for tenant, _r in live:
        per_tenant.setdefault(tenant, {"relationships": 0})["relationships"] += 1
    return {
        "tenants": len(schemas), "schemas": n_schemas, "caveats": caveats, "relationships": len(live),
        "rows": rows, "revision": int(head or 0),
        "digest": digest({t: s[1] for t, s in schemas.items()}, [(t, r.text()) for t, r in live]),
        "per_tenant": per_tenant,
        "bindings": len(bindings), "bindings_digest": bindings_digest([(b[0], b[1], b[3]) for b in bindings]),
        "decisions": decisions,
    }


class AuthzParticipant(Participant):
    name = "authz"
    kind = "source"
    covers = ["authz"]
    owns = [f"catalog.db: {', '.join(TABLES)}"]
    tables = list(TABLES)
    summary_depends_on_buckets = False
    replays = ("authz.",)

    def migrations(self) -> dict[str, list[str]]:
        from anvil.authz.service import MIGRATIONS

        return {"authz": MIGRATIONS}

    def apply(self, ctx: RecoveryContext, event: Any) -> None:
        from anvil.authz import replay

        replay.apply(ctx.conn, event)

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        return summary(ctx.conn)

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        findings: list[Finding] = []
        ctx.checked.update({"authz.schema_invalid", "authz.relationship_invalid", "authz.revision_inconsistent",
                            "authz.summary_differs", "authz.binding_invalid", "authz.decision_differs"})

        def add(f: Finding) -> None:
            if len(findings) < MAX_FINDINGS:
                findings.append(f)

        conn = ctx.conn
        if not table_exists(conn, "authz_schemas"):
            return [self.finding("info", "authz", "no authorisation records in this store")]
        schemas = _schemas(conn)
        parsed = {}
        for tenant, (_rev, text, recorded_digest) in schemas.items():
            if hashlib.sha256(text.encode()).hexdigest() != recorded_digest:
                add(self.finding("error", f"schema of tenant {tenant}", "schema text differs from its recorded digest",
                                 "authz.schema_invalid", {"tenant": tenant}))
            try:
                parsed[tenant] = parse(text)
            except AnvilError as e:
                add(self.finding("error", f"schema of tenant {tenant}", f"does not parse: {e.message}",
                                 "authz.schema_invalid", {"tenant": tenant}))
        live = _live(conn)
        for tenant, r in live:
            schema = parsed.get(tenant)
            if schema is None:
                if tenant not in schemas:
                    add(self.finding("error", f"relationship {r.text()}", "its tenant has no schema",
                                     "authz.relationship_invalid", {"tenant": tenant}))
                continue
            try:
                rels.validate(schema, r, "relationship")
            except AnvilError as e:
                add(self.finding("error", f"relationship {r.text()}", f"not valid under its tenant's schema: "
                                                                      f"{e.message}",
                                 "authz.relationship_invalid", {"tenant": tenant}))
        has_buckets = table_exists(conn, "buckets")
        for bucket, tenant, created, text in _bindings(conn):
            row = conn.execute("SELECT created FROM buckets WHERE name = ?", (bucket,)).fetchone() if has_buckets \
                else None
            if row is None or float(row[0]) != created:
                continue  # the bucket was deleted (or made again): the binding binds nothing
            try:
                b = binding_from_json(text)
                d = parsed[tenant].definitions.get(b.resource_type) if tenant in parsed else None
                if d is None:
                    raise AnvilError("InvalidArgument", f"its tenant's schema has no definition {b.resource_type!r}")
                gone = [b.permission(op) for op in OPERATIONS if not d.has(b.permission(op))]
                if gone:
                    raise AnvilError("InvalidArgument", f"{b.resource_type!r} has no permission {gone[0]!r}")
            except (AnvilError, ValueError) as e:
                # Object requests on the bucket are refused while this holds (fail closed): an error.
                add(self.finding("error", f"binding of bucket {bucket}", f"not valid: {getattr(e, 'message', e)}",
                                 "authz.binding_invalid", {"bucket": bucket, "tenant": tenant}))
        bad_revs = conn.execute(
            "SELECT count(*) FROM authz_relationships WHERE deleted_rev IS NOT NULL AND deleted_rev <= created_rev"
        ).fetchone()[0]
        missing_revs = conn.execute(
            "SELECT count(*) FROM authz_relationships r WHERE NOT EXISTS (SELECT 1 FROM authz_revisions v "
            "WHERE v.tenant = r.tenant AND v.revision = r.created_rev)").fetchone()[0]
        if bad_revs or missing_revs:
            add(self.finding("error", "authz revisions",
                             f"{bad_revs} relationship rows deleted before they were created, {missing_revs} "
                             "created at a revision with no recorded write", "authz.revision_inconsistent"))
        if recorded and isinstance(recorded.get("decisions"), dict):
            differ = replay_decisions(conn, recorded["decisions"])
            for text in differ:
                add(self.finding("error", "authz decision", text, "authz.decision_differs"))
        now = summary(conn)
        ctx.stats["authz"] = {k: now[k] for k in ("tenants", "relationships", "rows", "caveats")}
        if recorded:
            for field in ("tenants", "schemas", "caveats", "relationships", "rows", "digest", "bindings",
                          "bindings_digest"):
                if field in recorded and recorded[field] != now[field]:
                    add(self.finding("error", f"authz {field}",
                                     f"restored {now[field]!r}, recorded {recorded[field]!r}",
                                     "authz.summary_differs", {"field": field}))
        if not findings:
            findings.append(self.finding("info", "authz", f"{now['tenants']} schemas parse; {now['relationships']} "
                                                          "relationships are valid under them"
                                         + ("; counts and digest match the manifest" if recorded else "")
                                         + (f"; {len(recorded['decisions']['checks'])} check decisions recorded at "
                                            f"backup answer the same at revision {recorded['decisions']['revision']}"
                                            if recorded and isinstance(recorded.get("decisions"), dict) else "")))
        return findings

    def smoke(self, client: Any, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        from anvil.client import AnvilAPIError

        findings: list[Finding] = []
        schemas: dict[str, str] = {}
        seen: list[tuple[str, str]] = []
        tenants = sorted((recorded or summary(ctx.conn)).get("per_tenant", {}))
        sampled: list[tuple[str, Relationship]] = []
        try:
            for tenant in tenants:
                text = client.authz_read_schema(tenant=tenant, consistency="fully_consistent")["schema"]
                schemas[tenant] = text
                for rtype in sorted(parse(text).definitions):
                    for row in client.authz_iter({"resource_type": rtype}, tenant=tenant,
                                                 consistency="fully_consistent"):
                        seen.append((tenant, row["relationship"]))
                        r = rels.parse(row["relationship"])
                        if (len(sampled) < SMOKE_CHECKS and not r.caveat and r.expires is None and r.sid != "*"
                                and not r.srel):
                            sampled.append((tenant, r))
        except (AnvilAPIError, AnvilError) as e:
            return [self.finding("error", "authz read-back", f"{getattr(e, 'code', '')}: {e}")]
        want = (recorded or summary(ctx.conn))["digest"]
        if digest(schemas, seen) != want:
            findings.append(self.finding("error", "authz", f"schemas and {len(seen)} relationships read through the "
                                                           "API differ from the recorded digest"))
        read_back = []
        for bucket, _tenant, _created, _text in _bindings(ctx.conn):
            try:
                got = client.authz_bucket_binding(bucket)
            except (AnvilAPIError, AnvilError) as e:
                findings.append(self.finding("error", f"binding of bucket {bucket}", f"not readable: {e}"))
                continue
            binding = json.dumps(got.to_dict()["binding"])  # the SDK answers a model: its JSON as sent
            read_back.append((bucket, got["tenant"], binding_from_json(binding).canonical()))
        if recorded and "bindings_digest" in recorded and bindings_digest(read_back) != recorded["bindings_digest"]:
            findings.append(self.finding("error", "authz bindings", f"{len(read_back)} bucket bindings read through "
                                                                    "the API differ from the recorded digest"))
        for tenant, r in sampled:
            res = client.authz_check(f"{r.rtype}:{r.rid}", r.relation, f"{r.stype}:{r.sid}", tenant=tenant,
                                     consistency="fully_consistent")
            if res["permissionship"] != "has_permission":
                findings.append(self.finding("error", f"check {r.text()}",
                                             f"a direct relationship answers {res['permissionship']}"))
        decisions = (recorded or {}).get("decisions")
        replayed = 0
        if isinstance(decisions, dict) and decisions.get("checks"):
            # Through the public API, at exactly the recorded revision. Decisions that depended on an
            # expiring relationship are left to `validate`, which replays them at the recorded instant.
            token = f"z1.{int(decisions['revision'])}.{client.health()['deployment_id']}"
            for c in decisions["checks"]:
                if c.get("expiring"):
                    continue
                try:
                    res = client.authz_check(c["resource"], c["permission"], c["subject"], tenant=c["tenant"],
                                             context=c.get("context") or None,
                                             consistency={"at_exact_snapshot": token})
                except (AnvilAPIError, AnvilError) as e:
                    res = {"permissionship": f"error {getattr(e, 'code', '')}"}
                replayed += 1
                if res["permissionship"] != c["permissionship"]:
                    findings.append(self.finding(
                        "error", f"check {c['resource']} {c['permission']} {c['subject']}",
                        f"replayed at revision {decisions['revision']} it answers {res['permissionship']}, recorded "
                        f"at backup {c['permissionship']}", "authz.decision_differs", {"tenant": c["tenant"]}))
        if not findings:
            findings.append(self.finding("info", "authz", f"{len(schemas)} schemas and {len(seen)} relationships read "
                                                          f"back match the digest; {len(sampled)} checks agree"))
            if replayed:
                findings.append(self.finding("info", "authz decisions",
                                             f"{replayed} check decisions recorded at backup answer the same at "
                                             f"revision {decisions['revision']}"))
        return findings
