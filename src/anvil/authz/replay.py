"""Rebuild the authorisation tables from journal events (point-in-time restore, the replay property).

A write's revision is the seq of its one event, and the mutation's clock (`written`) the event's
`ts`. `authz.relationships.write` lists only the relationships the batch changed (a touch that
changed nothing is absent), each in its text form, plus `expires` (the exact instant; the text
keeps microseconds) when it has one: a create or touch retires the live row with the same key
and inserts the new one; a delete retires the live row. Events journaled before `expires` was
recorded fall back to the text form's instant. `authz.binding.put` / `.delete` carry the whole
bucket binding (bucket, its creation instant, the binding) / the bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from anvil.authz import relationships as rels
from anvil.authz.binding import parse_binding
from anvil.authz.service import schema_digest
from anvil.storage.records import Connection

_KEY = "tenant = ? AND rtype = ? AND rid = ? AND relation = ? AND stype = ? AND sid = ? AND srel = ?"


def apply(conn: Connection, ev: Any) -> None:
    p: dict[str, Any] = ev.payload
    kind = ev.kind
    tenant = p.get("tenant", ev.tenant)
    rev = int(ev.seq)
    if kind == "authz.schema.write":
        text = p["text"]
        conn.execute("INSERT INTO authz_schemas(tenant, revision, text, digest, written) VALUES (?,?,?,?,?)",
                     (tenant, rev, text, p.get("digest") or schema_digest(text), ev.ts))
        _revision(conn, tenant, rev, "schema")
    elif kind == "authz.relationships.write":
        for u in p.get("updates") or []:
            rel = rels.parse(u["relationship"])
            if u.get("expires") is not None:
                rel = dataclasses.replace(rel, expires=float(u["expires"]))
            _retire(conn, tenant, rel, rev)
            if u["operation"] != "delete":
                conn.execute(
                    "INSERT INTO authz_relationships(tenant, rtype, rid, relation, stype, sid, srel, caveat, context, "
                    "expires, created_rev) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (tenant, *rel.key, rel.caveat, rel.context, rel.expires, rev))
        _revision(conn, tenant, rev, "relationships")
    elif kind == "authz.relationships.delete":
        for u in p.get("updates") or []:
            _retire(conn, tenant, rels.parse(u["relationship"]), rev)
        _revision(conn, tenant, rev, "delete")
    elif kind == "authz.binding.put":
        conn.execute("DELETE FROM authz_bindings WHERE bucket = ?", (p["bucket"],))
        conn.execute("INSERT INTO authz_bindings(bucket, tenant, bucket_created, binding, revision, written) "
                     "VALUES (?,?,?,?,?,?)", (p["bucket"], tenant, float(p["bucket_created"]),
                                              parse_binding(p["binding"]).canonical(), rev, ev.ts))
    elif kind == "authz.binding.delete":
        conn.execute("DELETE FROM authz_bindings WHERE bucket = ?", (p["bucket"],))
    else:
        raise ValueError(f"authz cannot replay event kind {kind!r}")


def _retire(conn: Connection, tenant: str, rel: rels.Relationship, rev: int) -> None:
    conn.execute(f"UPDATE authz_relationships SET deleted_rev = ? WHERE {_KEY} AND deleted_rev IS NULL",
                 (rev, tenant, *rel.key))


def _revision(conn: Connection, tenant: str, rev: int, kind: str) -> None:
    conn.execute("INSERT INTO authz_revisions(tenant, revision, kind) VALUES (?,?,?)", (tenant, rev, kind))
