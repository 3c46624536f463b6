"""Rebuild the artefacts tables from journal events (point-in-time restore, the replay property).

Each function writes exactly the rows the live mutation wrote, from the event alone: its
payload, `ts` (the mutation's `txn.now`: every `created`/`updated` column), `seq` (an
artefact's order: the live push stores the seq its `artefact.push` event takes) and `tenant`.
The manifest is stored in its canonical form, which is what the payload's manifest hashes to
(its id). `tests/test_replay.py` holds the two stores side by side.
"""

from __future__ import annotations

import json
from typing import Any

from anvil import artefact_format as mf
from anvil.storage.records import Connection


def apply(conn: Connection, ev: Any) -> None:
    p: dict[str, Any] = ev.payload
    kind = ev.kind
    if kind == "artefact.upload":
        conn.execute("INSERT INTO artefact_uploads (bucket, sha256, size, created) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (bucket, sha256) DO UPDATE SET size = excluded.size, created = excluded.created",
                     (p["bucket"], p["sha256"], p["size"], ev.ts))
    elif kind == "artefact.uploads_drop":  # with its bucket's delete
        conn.execute("DELETE FROM artefact_uploads WHERE bucket = ?", (p["bucket"],))
    elif kind == "artefact.key_add":
        conn.execute("INSERT INTO artefact_keys (tenant, key_id, public_key, created) VALUES (?, ?, ?, ?)",
                     (p.get("tenant", ev.tenant), p["key_id"], p["public_key"], ev.ts))
    elif kind == "artefact.push":
        _push(conn, ev, p)
    elif kind == "artefact.sign":
        row = conn.execute("SELECT signatures FROM artefacts WHERE bucket = ? AND id = ?",
                           (p["bucket"], p["id"])).fetchone()
        if row is None:
            raise ValueError(f"artefact.sign (seq {ev.seq}) names artefact {p['id']} that replay has not created")
        have = json.loads(row[0]) + list(p["signatures"])
        conn.execute("UPDATE artefacts SET signatures = ? WHERE bucket = ? AND id = ?",
                     (json.dumps(have), p["bucket"], p["id"]))
    elif kind == "artefact.tag":
        _tag(conn, ev, p)
    else:
        raise ValueError(f"artefacts cannot replay event kind {kind!r}")


def _push(conn: Connection, ev: Any, p: dict[str, Any]) -> None:
    m = p["manifest"]
    body = mf.canonical(m).decode()
    bucket, aid = p["bucket"], p["id"]
    conn.execute("INSERT INTO artefacts (bucket, id, tenant, name, kind, manifest, signatures, created, seq) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (bucket, aid, ev.tenant, p.get("name", m["name"]), p.get("kind", m["kind"]), body,
                  json.dumps(p.get("signatures") or []), ev.ts, ev.seq))
    for comp in m["components"]:
        conn.execute("INSERT INTO artefact_components (bucket, artefact_id, path, sha256, size) "
                     "VALUES (?, ?, ?, ?, ?)", (bucket, aid, comp["path"], comp["sha256"], comp["size"]))


def _tag(conn: Connection, ev: Any, p: dict[str, Any]) -> None:
    key = (p["bucket"], p["name"], p["tag"])
    if conn.execute("SELECT 1 FROM artefact_tags WHERE bucket = ? AND name = ? AND tag = ?", key).fetchone() is None:
        conn.execute("INSERT INTO artefact_tags (bucket, name, tag, artefact_id, required_key, updated) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (*key, p["id"], p.get("required_key"), ev.ts))
    else:
        conn.execute("UPDATE artefact_tags SET artefact_id = ?, required_key = ?, updated = ? "
                     "WHERE bucket = ? AND name = ? AND tag = ?", (p["id"], p.get("required_key"), ev.ts, *key))
