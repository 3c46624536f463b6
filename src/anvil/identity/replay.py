"""Rebuild the identity tables from journal events (point-in-time restore, the replay property).

Identity events carry what their rows hold, secrets only in sealed form (the envelope under
the deployment's key and the argon2 verifier); the mutation's clock is the event's `ts` and
its actor the event's `actor` (`created_by`, `granted_by` ...).
"""

from __future__ import annotations

from typing import Any

from anvil.storage.records import Connection


def _app(conn: Connection, ev: Any, p: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO identity_apps(client_id, tenant, name, created, envelope, key_id, verifier) "
        "VALUES (?,?,?,?,?,?,?)",
        (p["client_id"], p["tenant"], p["name"], ev.ts, p["envelope"], p["key_id"], p["verifier"]))
    for scope in p.get("scopes") or []:
        conn.execute("INSERT INTO identity_policies(client_id, scope, granted, granted_by) VALUES (?,?,?,?)",
                     (p["client_id"], scope, ev.ts, ev.actor))


def apply(conn: Connection, ev: Any) -> None:
    p: dict[str, Any] = ev.payload
    kind = ev.kind
    if kind == "identity.bootstrap":
        conn.execute("INSERT INTO identity_tenants(name, created, created_by) VALUES (?,?,?)",
                     (p["tenant"], ev.ts, ev.actor))
        _app(conn, ev, p)
        conn.execute("INSERT INTO identity_realm(id, created, admin_client_id) VALUES (1,?,?)", (ev.ts, p["client_id"]))
    elif kind == "identity.tenant.create":
        conn.execute("INSERT INTO identity_tenants(name, created, created_by) VALUES (?,?,?)",
                     (p["tenant"], ev.ts, ev.actor))
    elif kind == "identity.app.create":
        _app(conn, ev, p)
    elif kind == "identity.app.rotate":
        conn.execute("UPDATE identity_apps SET envelope = ?, key_id = ?, verifier = ?, secret_version = ?, rotated = ? "
                     "WHERE client_id = ?",
                     (p["envelope"], p["key_id"], p["verifier"], p["secret_version"], ev.ts, p["client_id"]))
    elif kind == "identity.policy.grant":
        for scope in p["scopes"]:
            conn.execute("INSERT INTO identity_policies(client_id, scope, granted, granted_by) VALUES (?,?,?,?)",
                         (p["client_id"], scope, ev.ts, ev.actor))
    elif kind == "identity.policy.revoke":
        for scope in p["scopes"]:
            conn.execute("DELETE FROM identity_policies WHERE client_id = ? AND scope = ?", (p["client_id"], scope))
    elif kind in ("identity.app.enable", "identity.app.disable"):
        conn.execute("UPDATE identity_apps SET status = ?, status_changed = ? WHERE client_id = ?",
                     (p["status"], ev.ts, p["client_id"]))
    elif kind == "identity.app.delete":
        conn.execute("DELETE FROM identity_policies WHERE client_id = ?", (p["client_id"],))
        conn.execute("DELETE FROM identity_apps WHERE client_id = ?", (p["client_id"],))
        conn.execute("INSERT INTO identity_deleted_apps(client_id, tenant, name, deleted, deleted_by) "
                     "VALUES (?,?,?,?,?)",
                     (p["client_id"], p["tenant"], p["name"], ev.ts, ev.actor))
    elif kind == "identity.token.revoke":
        for jti in [*(p.get("pruned") or []), p["jti"]]:
            conn.execute("DELETE FROM identity_revoked_tokens WHERE jti = ?", (jti,))
        conn.execute("INSERT INTO identity_revoked_tokens(jti, client_id, tenant, expires, revoked, revoked_by) "
                     "VALUES (?,?,?,?,?,?)", (p["jti"], p.get("client_id"), p.get("tenant"), p["expires"], ev.ts,
                                              ev.actor))
    elif kind == "identity.key.rotate":
        for client_id, envelope in sorted(p["envelopes"].items()):
            conn.execute("UPDATE identity_apps SET envelope = ?, key_id = ? WHERE client_id = ?",
                         (envelope, p["key_id"], client_id))
    else:
        raise ValueError(f"identity cannot replay event kind {kind!r}")
