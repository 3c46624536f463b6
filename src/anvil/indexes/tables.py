"""The index definitions' table in the catalog (its schema and its reads) and where the generations
live: what the service and the recovery participant share, without the engine (tantivy, faiss), so
that `anvil fsck` of a store without indexes imports neither (~20 ms of its start)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anvil.storage.records import Connection

MIGRATIONS = [
    """
    CREATE TABLE index_definitions(
        bucket TEXT NOT NULL,
        name TEXT NOT NULL,
        tenant TEXT NOT NULL,
        version INTEGER NOT NULL,
        state TEXT NOT NULL,
        definition TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (bucket, name)
    )
    """,
]

TABLES = ["index_definitions"]
INDEX_DIR = "indexes"


def index_dir(root: Path, bucket: str, name: str) -> Path:
    return Path(root) / INDEX_DIR / bucket / name


def read_definitions(conn: Connection, *, bucket: str | None = None) -> list[dict[str, Any]]:
    sql = "SELECT bucket, name, tenant, version, state, definition, created, updated FROM index_definitions"
    args: tuple = ()
    if bucket is not None:
        sql += " WHERE bucket = ?"
        args = (bucket,)
    rows = conn.execute(sql + " ORDER BY bucket, name", args).fetchall()
    return [{"bucket": r[0], "name": r[1], "tenant": r[2], "version": int(r[3]), "state": r[4],
             "definition": json.loads(r[5]), "created": r[6], "updated": r[7]} for r in rows]
