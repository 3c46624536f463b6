"""Identity's recovery participant data: what it owns, a summary, and post-restore validation.

Plain functions over a catalog connection and a keyring; the backup engine adapts them to its
participant interface without knowing identity's tables.
"""

from __future__ import annotations

import hashlib
from typing import Any

from anvil.identity import envelope as env
from anvil.storage.records import Connection

TABLES = ("identity_realm", "identity_tenants", "identity_apps", "identity_policies")


def describe() -> dict[str, Any]:
    return {
        "name": "identity",
        "kind": "source",
        "owns": {"tables": list(TABLES), "files": ["bootstrap/first-admin.json", "bootstrap/dev-app.json"]},
        "covers": "tenants, applications, policies, secret envelopes (key ids always; key material never)",
    }


def summary(conn: Connection) -> dict[str, Any]:
    """Counts, key ids in use, and a digest of (client_id, tenant, scopes) that a restore must reproduce."""

    def count(table: str) -> int:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    # Each app's scopes are gathered here rather than with an SQL string aggregate: SQLite and
    # PostgreSQL spell that differently (group_concat / string_agg), and there are few policies.
    # One read transaction, so the two reads (and the counts) describe one state on a live server.
    with conn:
        scopes: dict[str, list[str]] = {}
        for client_id, scope in conn.execute("SELECT client_id, scope FROM identity_policies"):
            scopes.setdefault(client_id, []).append(scope)
        digest = hashlib.sha256()
        for client_id, tenant in conn.execute("SELECT client_id, tenant FROM identity_apps ORDER BY client_id"):
            # Joined then split, as the aggregate's text was: the digest stays byte-identical.
            joined = " ".join(scopes.get(client_id, ()))
            digest.update(f"{client_id}\t{tenant}\t{' '.join(sorted(joined.split()))}\n".encode())
        key_ids = sorted({r[0] for r in conn.execute("SELECT key_id FROM identity_apps")})
        counts = {t: count(t) for t in TABLES}
    return {
        "tenants": counts["identity_tenants"],
        "apps": counts["identity_apps"],
        "policies": counts["identity_policies"],
        "realm": counts["identity_realm"] == 1,
        "key_ids_in_use": key_ids,
        "digest": digest.hexdigest(),
    }


def validate(conn: Connection, keyring: env.Keyring) -> list[dict[str, Any]]:
    """Findings: every envelope must decrypt with the configured keys and match its recorded key id."""
    findings: list[dict[str, Any]] = []
    if conn.execute("SELECT count(*) FROM identity_realm").fetchone()[0] != 1:
        findings.append({"severity": "error", "item": "realm", "problem": "the system realm is missing"})
    for client_id, envelope, key_id in conn.execute("SELECT client_id, envelope, key_id FROM identity_apps"):
        try:
            env.open_envelope(keyring, envelope, client_id)
            if env.key_id(envelope) != key_id:
                findings.append({"severity": "warning", "item": f"app/{client_id}",
                                 "problem": "recorded key id differs from the envelope's"})
        except env.EnvelopeError as e:
            findings.append({"severity": "error", "item": f"app/{client_id}", "problem": e.message})
    return findings
