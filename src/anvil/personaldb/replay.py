"""Rebuild the PersonalDB tables from journal events (point-in-time restore, the replay property).

Each event carries what its rows hold: the changeset or migration SQL, the certificate text as
signed (the witness private key is never in the journal, so certificates are copied, not
re-signed), the idempotency key and fingerprint, the public witness keys. The mutation's clock
(`created`, `ts`, a key's `retired` when it was orphaned) is the event's `ts`; its actor the
event's `actor`. `pdb.projection.update` writes no row (it tells watchers a projection follows
a new entry); projection and mirror files are derived and rebuilt by the `projections`
participant.
"""

from __future__ import annotations

import base64
from typing import Any

from anvil.personaldb import certs, rowauth
from anvil.personaldb import projections as pj
from anvil.storage.records import Connection


def _keys(conn: Connection, ev: Any, changed: dict[str, Any] | None) -> None:
    if not changed:
        return
    for k in changed.get("keys") or []:
        conn.execute("INSERT INTO pdb_keys(key_id, public_key, created, retired) VALUES (?,?,?,?) "
                     "ON CONFLICT (key_id) DO UPDATE SET retired = excluded.retired",
                     (k["key_id"], k["public"], k["created"], k["retired"]))
    for kid in changed.get("retired") or []:
        conn.execute("UPDATE pdb_keys SET retired = ? WHERE key_id = ?", (ev.ts, kid))


def _log(conn: Connection, ev: Any, p: dict[str, Any], kind: str, data: bytes, prev_hash: str,
         idem: str | None, fingerprint: str | None) -> None:
    conn.execute(
        "INSERT INTO pdb_log(grp, idx, kind, prev_hash, hash, changeset, changeset_sha256, size, schema_version, "
        "actor, idem_key, fingerprint, ts, certificate) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (p["group"], p["index"], kind, prev_hash, p["hash"], data, certs.sha256_hex(data), len(data),
         p["schema_version"], ev.actor, idem, fingerprint, ev.ts, p["certificate"]))
    conn.execute("UPDATE pdb_groups SET head_index = ?, head_hash = ?, schema_version = ? WHERE name = ?",
                 (p["index"], p["hash"], p["schema_version"], p["group"]))


def _head_hash(conn: Connection, group: str) -> str:
    return conn.execute("SELECT head_hash FROM pdb_groups WHERE name = ?", (group,)).fetchone()[0]


def apply(conn: Connection, ev: Any) -> None:
    p: dict[str, Any] = ev.payload
    kind = ev.kind
    if kind == "pdb.group.create":
        conn.execute(
            "INSERT INTO pdb_groups(name, tenant, created, created_by, schema_version, genesis, head_index, "
            "head_hash, snapshot_every, max_changeset) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (p["group"], p["tenant"], ev.ts, ev.actor, 1, p["genesis"], 0, p["genesis"], p["snapshot_every"],
             p["max_changeset"]))
        conn.execute("INSERT INTO pdb_schemas(grp, version, sql, sql_sha256, created) VALUES (?,?,?,?,?)",
                     (p["group"], 1, p["schema"], p["schema_sha256"], ev.ts))
        _keys(conn, ev, p.get("keys"))
    elif kind == "pdb.keys":
        _keys(conn, ev, p)
    elif kind == "pdb.commit":
        _log(conn, ev, p, "changeset", base64.b64decode(p["changeset"]), p["prev_hash"], p.get("idem_key"),
             p.get("fingerprint"))
    elif kind == "pdb.migrate":
        sql = p["sql"]
        conn.execute("INSERT INTO pdb_schemas(grp, version, sql, sql_sha256, created) VALUES (?,?,?,?,?)",
                     (p["group"], p["schema_version"], sql, certs.sha256_hex(sql.encode()), ev.ts))
        _log(conn, ev, p, "migration", sql.encode(), p.get("prev_hash") or _head_hash(conn, p["group"]), None, None)
    elif kind == "pdb.snapshot":
        conn.execute(
            "INSERT INTO pdb_snapshots(grp, idx, hash, state_hash, schema_version, sha256, size, raw_size, ts, "
            "certificate) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (grp, idx) DO NOTHING",
            (p["group"], p["index"], p["hash"], p["state_hash"], p["schema_version"], p["sha256"], p["size"],
             p["raw_size"], ev.ts, p["certificate"]))
    elif kind == "pdb.compact":
        conn.execute("UPDATE pdb_log SET changeset = NULL WHERE grp = ? AND idx <= ?", (p["group"], p["through"]))
        conn.execute("UPDATE pdb_groups SET compacted_through = ? WHERE name = ?", (p["through"], p["group"]))
    elif kind == "pdb.projection.create":
        conn.execute("INSERT INTO pdb_projections(name, tenant, source, spec, created, created_by) "
                     "VALUES (?,?,?,?,?,?)", (p["projection"], ev.tenant, p["group"],
                                              pj.dumps(p["spec"]),
                                              ev.ts, ev.actor))
    elif kind == "pdb.binding.put":
        conn.execute("DELETE FROM pdb_bindings WHERE grp = ?", (p["group"],))
        conn.execute("INSERT INTO pdb_bindings(grp, tenant, binding, written) VALUES (?,?,?,?)",
                     (p["group"], p["tenant"], rowauth.RowBinding(**p["binding"]).canonical(), ev.ts))
    elif kind == "pdb.binding.delete":
        conn.execute("DELETE FROM pdb_bindings WHERE grp = ?", (p["group"],))
    elif kind == "pdb.projection.update":
        pass  # no row: the projection's file is derived
    else:
        raise ValueError(f"personaldb cannot replay event kind {kind!r}")
