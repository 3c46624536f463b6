"""Identity's recovery participant data: what it owns, a summary, and post-restore validation.

Plain functions over a catalog connection and a keyring; the backup engine adapts them to its
participant interface without knowing identity's tables.
"""

from __future__ import annotations

import hashlib
from typing import Any

import apsw

from anvil.identity import envelope as env

TABLES = ("identity_realm", "identity_tenants", "identity_apps", "identity_policies")


def describe() -> dict[str, Any]:
    return {
        "name": "identity",
        "kind": "source",
        "owns": {"tables": list(TABLES), "files": ["bootstrap/first-admin.json", "bootstrap/dev-app.json"]},
        "covers": "tenants, applications, policies, secret envelopes (key ids always; key material never)",
    }


def summary(conn: apsw.Connection) -> dict[str, Any]:
    """Counts, key ids in use, and a digest of (client_id, tenant, scopes) that a restore must reproduce."""

    def count(table: str) -> int:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    digest = hashlib.sha256()
    for row in conn.execute(
        "SELECT a.client_id, a.tenant, group_concat(p.scope, ' ') FROM identity_apps a "
        "LEFT JOIN identity_policies p ON p.client_id = a.client_id GROUP BY a.client_id ORDER BY a.client_id"
    ):
        digest.update(f"{row[0]}\t{row[1]}\t{' '.join(sorted((row[2] or '').split()))}\n".encode())
    key_ids = sorted({r[0] for r in conn.execute("SELECT key_id FROM identity_apps")})
    return {
        "tenants": count("identity_tenants"),
        "apps": count("identity_apps"),
        "policies": count("identity_policies"),
        "realm": count("identity_realm") == 1,
        "key_ids_in_use": key_ids,
        "digest": digest.hexdigest(),
    }


def validate(conn: apsw.Connection, keyring: env.Keyring) -> list[dict[str, Any]]:
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
