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
from typing import Any

from anvil.authz import relationships as rels
from anvil.authz.relationships import Relationship
from anvil.authz.schema import parse
from anvil.errors import AnvilError
from anvil.storage.records import Connection, table_exists
from anvil.storage.recovery import Finding, Participant, RecoveryContext

TABLES = ["authz_relationships", "authz_schemas", "authz_revisions"]
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
    return [(r[0], Relationship(*r[1:])) for r in conn.execute(
        f"SELECT tenant, {_COLS} FROM authz_relationships WHERE deleted_rev IS NULL "
        "ORDER BY tenant, rtype, rid, relation, stype, sid, srel")]


def digest(schemas: dict[str, str], relationships: list[tuple[str, str]]) -> str:
    """Over (tenant -> schema text) and (tenant, relationship text): what the API can reproduce."""
    h = hashlib.sha256()
    for tenant in sorted(schemas):
        h.update(f"schema\t{tenant}\t{hashlib.sha256(schemas[tenant].encode()).hexdigest()}\n".encode())
    for tenant, text in sorted(relationships):
        h.update(f"rel\t{tenant}\t{text}\n".encode())
    return h.hexdigest()


def summary(conn: Connection) -> dict[str, Any]:
    if not table_exists(conn, "authz_schemas"):
        return {"tenants": 0, "schemas": 0, "caveats": 0, "relationships": 0, "rows": 0, "revision": 0,
                "digest": digest({}, []), "per_tenant": {}}
    with conn:  # one read snapshot: counts and digest agree
        schemas = _schemas(conn)
        live = _live(conn)
        rows = int(conn.execute("SELECT count(*) FROM authz_relationships").fetchone()[0])
        n_schemas = int(conn.execute("SELECT count(*) FROM authz_schemas").fetchone()[0])
        head = conn.execute("SELECT max(seq) FROM journal").fetchone()[0] if table_exists(conn, "journal") else 0
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
                            "authz.summary_differs"})

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
        now = summary(conn)
        ctx.stats["authz"] = {k: now[k] for k in ("tenants", "relationships", "rows", "caveats")}
        if recorded:
            for field in ("tenants", "schemas", "caveats", "relationships", "rows", "digest"):
                if field in recorded and recorded[field] != now[field]:
                    add(self.finding("error", f"authz {field}",
                                     f"restored {now[field]!r}, recorded {recorded[field]!r}",
                                     "authz.summary_differs", {"field": field}))
        if not findings:
            findings.append(self.finding("info", "authz", f"{now['tenants']} schemas parse; {now['relationships']} "
                                                          "relationships are valid under them"
                                         + ("; counts and digest match the manifest" if recorded else "")))
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
        for tenant, r in sampled:
            res = client.authz_check(f"{r.rtype}:{r.rid}", r.relation, f"{r.stype}:{r.sid}", tenant=tenant,
                                     consistency="fully_consistent")
            if res["permissionship"] != "has_permission":
                findings.append(self.finding("error", f"check {r.text()}",
                                             f"a direct relationship answers {res['permissionship']}"))
        if not findings:
            findings.append(self.finding("info", "authz", f"{len(schemas)} schemas and {len(seen)} relationships read "
                                                          f"back match the digest; {len(sampled)} checks agree"))
        return findings
