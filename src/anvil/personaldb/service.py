"""PersonalDB's server side: groups, the commit path, certificates, catch-up and snapshots.

The server is a *witness*: it orders the changesets of a group, refuses any whose base is not
the head (`PersonalDbStaleBase`), never merges, and signs a certificate for every entry with
its Ed25519 witness key. Every mutation is one `Catalog.mutate` with one journal event.

Source records (catalog tables): groups, schema versions, the hash-chained log (changesets and
certificates), snapshot records, public witness keys. Snapshot files are blobs (content
addressed, referenced by their records). The witness private key lives in `secrets/` with the
other control-plane secrets and is escrowed by backups that ask for it.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zstandard

from anvil.context import Principal, RequestContext
from anvil.errors import AnvilError
from anvil.identity.scopes import allows
from anvil.personaldb import certs, rowauth
from anvil.personaldb import projections as pj
from anvil.storage import Storage, Txn
from anvil.storage import sqlitefile as sf
from anvil.storage.layout import write_file_durably
from anvil.storage.records import Connection

log = logging.getLogger("anvil.personaldb")

MIGRATIONS = [
    """CREATE TABLE pdb_groups(
        name TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        created REAL NOT NULL,
        created_by TEXT NOT NULL,
        schema_version INTEGER NOT NULL,
        genesis TEXT NOT NULL,
        head_index INTEGER NOT NULL,
        head_hash TEXT NOT NULL,
        snapshot_every INTEGER NOT NULL,
        max_changeset INTEGER NOT NULL,
        compacted_through INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE pdb_schemas(
        grp TEXT NOT NULL REFERENCES pdb_groups(name),
        version INTEGER NOT NULL,
        sql TEXT NOT NULL,
        sql_sha256 TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (grp, version)
    )""",
    """CREATE TABLE pdb_log(
        grp TEXT NOT NULL REFERENCES pdb_groups(name),
        idx INTEGER NOT NULL,
        kind TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        changeset BLOB,
        changeset_sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        schema_version INTEGER NOT NULL,
        actor TEXT NOT NULL,
        idem_key TEXT,
        fingerprint TEXT,
        ts REAL NOT NULL,
        certificate TEXT NOT NULL,
        PRIMARY KEY (grp, idx)
    )""",
    "CREATE UNIQUE INDEX pdb_log_idem ON pdb_log(grp, idem_key)",
    """CREATE TABLE pdb_snapshots(
        grp TEXT NOT NULL REFERENCES pdb_groups(name),
        idx INTEGER NOT NULL,
        hash TEXT NOT NULL,
        state_hash TEXT NOT NULL,
        schema_version INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        raw_size INTEGER NOT NULL,
        ts REAL NOT NULL,
        certificate TEXT NOT NULL,
        PRIMARY KEY (grp, idx)
    )""",
    """CREATE TABLE pdb_keys(
        key_id TEXT PRIMARY KEY,
        public_key TEXT NOT NULL,
        created REAL NOT NULL,
        retired REAL
    )""",
    """CREATE TABLE pdb_projections(
        name TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        source TEXT NOT NULL REFERENCES pdb_groups(name),
        spec TEXT NOT NULL,
        created REAL NOT NULL,
        created_by TEXT NOT NULL
    )""",
    # Row permissions by relationship (rowauth.py): at most one binding per group.
    """CREATE TABLE pdb_bindings(
        grp TEXT PRIMARY KEY REFERENCES pdb_groups(name),
        tenant TEXT NOT NULL,
        binding TEXT NOT NULL,
        written REAL NOT NULL
    )""",
]

GROUP_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEFAULT_MAX_CHANGESET = 16 * 1024 * 1024
DEFAULT_SNAPSHOT_EVERY = 1000
MAX_SCHEMA = 1024 * 1024
MAX_PAGE = 2000
MAX_BATCH = 1000  # changesets in one batch commit
# Log and snapshot indexes are SQLite integers. A larger number from a caller can name no entry, and
# binding it raised OverflowError in the query: 500 Internal instead of InvalidArgument.
MAX_INDEX = (1 << 63) - 1
KEY_FILE = "personaldb_witness.json"
# The certificate records which authorisation state decided a commit's rows: the authz revision
# (zedtoken position) when the group's binding decided, 0 when the token's scopes alone did.
AUTHZ_REVISION = 0
SYSTEM_ACTOR = "system/personaldb"
OPS = {"INSERT": "pdb:insert", "UPDATE": "pdb:update", "DELETE": "pdb:delete"}
# Journal event kinds (watch family `pdb`).
EVENT_KINDS = frozenset({"pdb.group.create", "pdb.commit", "pdb.migrate", "pdb.snapshot", "pdb.compact",
                         "pdb.keys", "pdb.projection.create", "pdb.projection.update", "pdb.binding.put",
                         "pdb.binding.delete"})


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INDEX


def _group_missing() -> AnvilError:
    return AnvilError("NotFound", "group not found")


def _denied(message: str) -> AnvilError:
    err = AnvilError("PermissionDenied", message)
    err.denied = True  # type: ignore[attr-defined]  # the audit log records it as a denial
    return err


def _may(principal: Principal, action: str, resource: str) -> bool:
    return any(allows(s, action, resource) for s in principal.scopes)


def _pk_text(pk: tuple[Any, ...]) -> str:
    parts = []
    for v in pk:
        if isinstance(v, bytes):
            parts.append(v.hex())
        else:
            parts.append(str(v))
    return ",".join(p.replace("/", "%2F") for p in parts)


class WitnessKeys:
    """The witness keyring: the current private key and every public key ever used (rotation)."""

    def __init__(self, secrets_dir: Path):
        self.path = Path(secrets_dir) / KEY_FILE
        self._lock = threading.Lock()
        self.keys: list[dict[str, Any]] = []
        self._current: certs.WitnessKey | None = None
        if self.path.exists():
            self.keys = json.loads(self.path.read_text())["keys"]
        if not self.keys:
            self.rotate()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_file_durably(self.path, json.dumps({"keys": self.keys}, indent=1).encode(), 0o600)

    @property
    def current(self) -> certs.WitnessKey:
        # Kept between commits: loading the private key costs as much as signing (the commit path).
        hit = self._current
        if hit is None:
            k = next(k for k in self.keys if k.get("retired") is None)
            hit = self._current = certs.WitnessKey(base64.b64decode(k["private"]))
        return hit

    def rotate(self) -> certs.WitnessKey:
        with self._lock:
            new = certs.WitnessKey.generate()
            now = time.time()
            for k in self.keys:
                if k.get("retired") is None:
                    k["retired"] = now
            self._current = None
            self.keys.append({"key_id": new.key_id, "private": base64.b64encode(new.private_raw()).decode(),
                              "public": base64.b64encode(new.public_raw).decode(), "created": now, "retired": None})
            self._save()
            return new

    def public(self) -> list[dict[str, Any]]:
        return [{k2: k[k2] for k2 in ("key_id", "public", "created", "retired")} for k in self.keys]


def public_keys(conn: Connection) -> dict[str, str]:
    """{key_id: base64 public key} as recorded in the catalog (what restore validation checks with)."""
    return {kid: pub for kid, pub in conn.execute("SELECT key_id, public_key FROM pdb_keys")}


def chain_problems(conn: Connection, group: str) -> list[str]:
    """Verify one group's log against its certificates and the group's head; [] when intact."""
    keys = public_keys(conn)
    row = conn.execute("SELECT genesis, head_index, head_hash FROM pdb_groups WHERE name = ?", (group,)).fetchone()
    if row is None:
        return [f"group {group} is missing"]
    genesis, head_index, head_hash = row
    prev, expected = genesis, 0
    problems: list[str] = []
    for idx, prev_hash, h, cs, cs_sha, cert_text in conn.execute(
            "SELECT idx, prev_hash, hash, changeset, changeset_sha256, certificate FROM pdb_log WHERE grp = ? "
            "ORDER BY idx", (group,)):
        expected += 1
        if idx != expected:
            problems.append(f"entry {expected} is missing (next is {idx})")
            return problems
        try:
            body = certs.verify_entry(json.loads(cert_text), keys, group=group, prev_hash=prev, index=idx,
                                      changeset=bytes(cs) if cs is not None else None)
        except (certs.CertificateInvalid, ValueError) as e:
            msg = str(getattr(e, "message", e))
            problems.append(msg if msg.startswith("entry ") else f"entry {idx}: {msg}")
            return problems
        if body["hash"] != h or prev_hash != prev or cs_sha != body["changeset_sha256"]:
            problems.append(f"entry {idx}: the stored hashes differ from the certificate")
            return problems
        prev = h
    if (expected, prev) != (head_index, head_hash):
        problems.append(f"the group head ({head_index}, {head_hash[:12]}) is not the end of the certified chain "
                        f"({expected}, {prev[:12]})")
    return problems


def snapshot_problems(conn: Connection, blobs: Any, group: str, *, deep: bool = True) -> list[str]:
    """Every snapshot of a group: certificate, link to the chain, blob present, state hash (deep)."""
    keys = public_keys(conn)
    problems = []
    for idx, h, state, sha, size, cert_text in conn.execute(
            "SELECT idx, hash, state_hash, sha256, size, certificate FROM pdb_snapshots WHERE grp = ? ORDER BY idx",
            (group,)):
        try:
            body = certs.verify_snapshot(json.loads(cert_text), keys, group=group, state_hash=state)
        except (certs.CertificateInvalid, ValueError) as e:
            problems.append(f"snapshot {idx}: {getattr(e, 'message', e)}")
            continue
        link = conn.execute("SELECT hash FROM pdb_log WHERE grp = ? AND idx = ?", (group, idx)).fetchone()
        if body["index"] != idx or body["hash"] != h or (idx > 0 and (link is None or link[0] != h)):
            problems.append(f"snapshot {idx}: not linked to the chain entry it names")
            continue
        if not blobs.exists(sha):
            problems.append(f"snapshot {idx}: file {sha} is missing")
            continue
        if deep:
            try:
                got = state_of_snapshot(blobs.read_small(sha, size))
            except Exception as e:  # noqa: BLE001 - any failure to open it is the finding
                problems.append(f"snapshot {idx}: cannot be opened: {e}")
                continue
            if got != state:
                problems.append(f"snapshot {idx}: its state hash differs from the certified one")
    return problems


def state_of_snapshot(compressed: bytes) -> str:
    with tempfile.TemporaryDirectory(prefix="anvil-pdb-") as d:
        p = Path(d) / "s.sqlite"
        p.write_bytes(zstandard.ZstdDecompressor().decompress(compressed))
        db = sf.Database(p)
        try:
            return db.state_hash()
        finally:
            db.close()


def materialise(conn: Connection, blobs: Any, name: str, upto: int, dest: Path) -> sf.Database:
    """A group's database as of entry `upto`: the latest snapshot at or before it, then the log."""
    with conn:
        snap = conn.execute("SELECT idx, sha256, size FROM pdb_snapshots WHERE grp = ? AND idx <= ? "
                            "ORDER BY idx DESC LIMIT 1", (name, upto)).fetchone()
        schema = conn.execute("SELECT sql FROM pdb_schemas WHERE grp = ? AND version = 1", (name,)).fetchone()[0]
        start = 0
        if snap is not None:
            dest.write_bytes(zstandard.ZstdDecompressor().decompress(blobs.read_small(snap[1], snap[2])))
            start = snap[0]
        db = sf.Database(dest)
        db.set_synchronous("OFF")
        if snap is None:
            db.script(schema)
        db.begin()
        try:
            for idx, kind, cs in conn.execute(
                    "SELECT idx, kind, changeset FROM pdb_log WHERE grp = ? AND idx > ? AND idx <= ? ORDER BY idx",
                    (name, start, upto)):
                if cs is None:
                    raise AnvilError("Internal", f"entry {idx} of {name} was compacted and no snapshot covers it")
                if kind == "migration":
                    db.script(bytes(cs).decode())
                else:
                    db.apply(bytes(cs))
            db.commit()
        except BaseException:
            db.rollback()
            db.close()
            raise
    return db


def projection_specs(conn: Connection, group: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, source group, spec) of every projection (of `group`)."""
    sql = "SELECT name, source, spec FROM pdb_projections"
    rows = conn.execute(sql + " WHERE source = ? ORDER BY name", (group,)) if group else conn.execute(
        sql + " ORDER BY name")
    return [(n, src, json.loads(spec)) for n, src, spec in rows]


# relations(conn, tenant) -> a relation decider by relationships, or None when the tenant has none
# configured (composed by the runtime: anvil.authz.rows.relations_at).
RelationsFactory = Any


def relations_for(conn: Connection, tenant: str, relations: RelationsFactory | None) -> Any:
    """How projections of `tenant` decide relation filters: by relationships when authz is composed in
    and the tenant has a schema, else by the subjects' granted scopes."""
    found = relations(conn, tenant) if relations is not None else None
    return found if found is not None else pj.ScopeRelations(conn)


def rebuild_projections(conn: Connection, blobs: Any, root: Path, group: str | None = None,
                        relations: RelationsFactory | None = None) -> list[str]:
    """Recompute mirrors and projection files from source records; the names rebuilt."""
    store = pj.Projections(root)
    by_group: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for n, src, spec in projection_specs(conn, group):
        by_group.setdefault(src, []).append((n, spec))
    for g, specs in by_group.items():
        head = conn.execute("SELECT head_index, head_hash, tenant FROM pdb_groups WHERE name = ?", (g,)).fetchone()
        store.rebuild_group(g, lambda dest, g=g, head=head: materialise(conn, blobs, g, head[0], dest),
                            (head[0], head[1]), specs, relations_for(conn, head[2], relations))
    return [n for specs in by_group.values() for n, _ in specs]


class PersonalDbService:
    def __init__(self, storage: Storage, *, snapshot_every: int | None = None):
        self.storage = storage
        self.catalog = storage.catalog
        self.catalog.migrate("personaldb", MIGRATIONS)
        self.keys = WitnessKeys(storage.layout.secrets)
        # Keys are recorded with the first group (no journal event for a store that never uses
        # PersonalDB); later, only when the keyring changed (a rotation, a restore without escrow).
        if self.catalog.reader().execute("SELECT count(*) FROM pdb_groups").fetchone()[0]:
            self._publish_keys()
        self._tables: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
        self.default_snapshot_every = snapshot_every or int(
            os.environ.get("ANVIL_PDB_SNAPSHOT_EVERY", DEFAULT_SNAPSHOT_EVERY))
        self._builder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="anvil-pdb-snap")
        self._listeners: list[Any] = []
        self.projections = pj.Projections(storage.root)
        # One thread applies commits to mirrors and projections, in commit order, off the writer.
        self._projector = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="anvil-pdb-proj")
        self._projected: set[str] = set()  # groups whose mirror was checked against the log since start
        # Relationship authorisation, composed in by the runtime (install_authz): personaldb and authz
        # are sibling layers, so the decisions arrive through this hook (anvil.authz.rows.RowAuthz).
        self._authz: Any = None

    def install_authz(self, hooks: Any) -> None:
        """hooks: validate_binding(tenant, resource_type, {op: permission}); row_checker(tenant, subject)
        -> (revision, check(resource_type, resource_id, permission) -> (permissionship, missing));
        relations(conn, tenant) -> relation decider or None."""
        self._authz = hooks

    def _relations_factory(self) -> RelationsFactory | None:
        return self._authz.relations if self._authz is not None else None

    def add_commit_listener(self, fn: Any) -> None:
        """fn(group, entry) after each commit (projections rebuild incrementally on it)."""
        self._listeners.append(fn)

    # -- keys -----------------------------------------------------------------------------

    def _record_keys(self, txn: Txn) -> dict[str, Any] | None:
        """Inside a mutation: record the keyring's public keys. A key recorded but absent from the
        keyring (e.g. after a restore without escrowed secrets, which starts a new key) is marked
        retired: its certificates keep verifying, nothing new is signed with it. What changed, or None."""
        mine = {k["key_id"]: k for k in self.keys.public()}
        recorded = {r[0]: (r[1], r[2]) for r in txn.conn.execute("SELECT key_id, public_key, retired FROM pdb_keys")}
        changes = [k for kid, k in mine.items() if kid not in recorded or recorded[kid][1] != k["retired"]]
        orphans = [kid for kid, (_, retired) in recorded.items() if kid not in mine and retired is None]
        if not changes and not orphans:
            return None
        for k in changes:
            txn.conn.execute(
                "INSERT INTO pdb_keys(key_id, public_key, created, retired) VALUES (?,?,?,?) "
                "ON CONFLICT (key_id) DO UPDATE SET retired = excluded.retired",
                (k["key_id"], k["public"], k["created"], k["retired"]))
        for kid in orphans:
            txn.conn.execute("UPDATE pdb_keys SET retired = ? WHERE key_id = ?", (txn.now, kid))
        # `keys`: the rows written, so replay rebuilds them (`retired` ones take the event's clock).
        return {"published": [k["key_id"] for k in changes], "retired": orphans, "current": self.keys.current.key_id,
                "keys": [{"key_id": k["key_id"], "public": k["public"], "created": k["created"],
                          "retired": k["retired"]} for k in changes]}

    def _publish_keys(self) -> None:
        def fn(txn: Txn) -> None:
            changed = self._record_keys(txn)
            if changed is not None:
                txn.emit("system", "pdb.keys", "pdb/keys", changed)

        self.catalog.mutate(fn, actor=SYSTEM_ACTOR, request_id="pdb-keys")

    def public_keys(self) -> list[dict[str, Any]]:
        """Every witness public key ever used here (catalog records), current one last."""
        return [{"key_id": kid, "public": pub, "created": created, "retired": retired}
                for kid, pub, created, retired in self.catalog.reader().execute(
                    "SELECT key_id, public_key, created, retired FROM pdb_keys ORDER BY created, key_id")]

    def rotate_key(self, ctx: RequestContext) -> dict[str, Any]:
        if not ctx.principal.admin or not _may(ctx.principal, "admin:write", "system"):
            raise AnvilError("PermissionDenied", "not allowed")
        new = self.keys.rotate()
        self._publish_keys()  # (also before any group exists: the rotation itself is the event)
        return {"key_id": new.key_id, "keys": self.public_keys()}

    # -- groups ---------------------------------------------------------------------------

    def _group_row(self, conn: Connection, name: str) -> dict[str, Any] | None:
        row = conn.execute(
            "SELECT name, tenant, created, created_by, schema_version, genesis, head_index, head_hash, "
            "snapshot_every, max_changeset, compacted_through FROM pdb_groups WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        keys = ("name", "tenant", "created", "created_by", "schema_version", "genesis", "head_index", "head_hash",
                "snapshot_every", "max_changeset", "compacted_through")
        return dict(zip(keys, row, strict=True))

    def group(self, principal: Principal, name: str, action: str = "pdb:read") -> dict[str, Any]:
        """The group, if the principal may see it (another tenant's group is exactly a missing one)."""
        if principal.anonymous:
            raise AnvilError("Unauthenticated", "authentication required")
        if not isinstance(name, str) or not GROUP_RE.match(name):
            raise _group_missing()
        g = self._group_row(self.catalog.reader(), name)
        if g is None or (g["tenant"] != principal.tenant and not principal.admin):
            raise _group_missing()
        if not _may(principal, action, f"pdb:{name}"):
            raise AnvilError("PermissionDenied", "not allowed")
        return g

    def _schemas(self, conn: Connection, name: str) -> list[tuple[int, str, str]]:
        return [(int(v), s, h) for v, s, h in conn.execute(
            "SELECT version, sql, sql_sha256 FROM pdb_schemas WHERE grp = ? ORDER BY version", (name,))]

    def tables(self, name: str, version: int) -> dict[str, dict[str, Any]]:
        key = (name, version)
        if key not in self._tables:
            schemas = self._schemas(self.catalog.reader(), name)
            self._tables[key] = sf.schema_tables(schemas[0][1], [s for v, s, _ in schemas[1:] if v <= version])
        return self._tables[key]

    def describe_group(self, principal: Principal, name: str) -> dict[str, Any]:
        g = self.group(principal, name)
        conn = self.catalog.reader()
        schemas = self._schemas(conn, name)
        snaps = self.list_snapshots(principal, name)
        return {**g, "schemas": [{"version": v, "sql": s, "sql_sha256": h} for v, s, h in schemas],
                "tables": self.tables(name, g["schema_version"]), "snapshots": snaps}

    def list_groups(self, principal: Principal) -> list[dict[str, Any]]:
        if principal.anonymous:
            raise AnvilError("Unauthenticated", "authentication required")
        out = []
        for (name,) in self.catalog.reader().execute("SELECT name FROM pdb_groups ORDER BY name"):
            g = self._group_row(self.catalog.reader(), name)
            if g and (principal.admin or g["tenant"] == principal.tenant) and _may(principal, "pdb:read",
                                                                                  f"pdb:{name}"):
                out.append(g)
        return out

    def create_group(self, ctx: RequestContext, name: Any, schema: Any, *, snapshot_every: Any = None,
                     max_changeset: Any = None) -> dict[str, Any]:
        p = ctx.principal
        if p.anonymous:
            raise AnvilError("Unauthenticated", "authentication required")
        if not _may(p, "pdb:create", f"tenant:{p.tenant}"):
            raise AnvilError("PermissionDenied", "not allowed")
        if not isinstance(name, str) or not GROUP_RE.match(name):
            raise AnvilError("InvalidArgument", "a group name is 1-63 characters of a-z, 0-9, '_' and '-'")
        if not isinstance(schema, str) or not schema.strip() or len(schema.encode()) > MAX_SCHEMA:
            raise AnvilError("InvalidArgument", f"schema must be SQL text of at most {MAX_SCHEMA} bytes")
        every = self.default_snapshot_every if snapshot_every is None else snapshot_every
        limit = DEFAULT_MAX_CHANGESET if max_changeset is None else max_changeset
        if not isinstance(every, int) or isinstance(every, bool) or not 1 <= every <= 10_000_000:
            raise AnvilError("InvalidArgument", "snapshot_every must be an integer from 1")
        if (not isinstance(limit, int) or isinstance(limit, bool)
                or not 1024 <= limit <= DEFAULT_MAX_CHANGESET):
            raise AnvilError("InvalidArgument", f"max_changeset must be 1024..{DEFAULT_MAX_CHANGESET}")
        try:
            tables = sf.schema_tables(schema)
        except sf.ChangesetError as e:
            raise AnvilError("PersonalDbInvalidSchema", str(e)) from None
        if not tables:
            raise AnvilError("PersonalDbInvalidSchema", "the schema creates no table")
        schema_sha = certs.sha256_hex(schema.encode())
        genesis = certs.genesis_hash(name, schema_sha)

        def fn(txn: Txn) -> dict[str, Any]:
            if txn.conn.execute("SELECT 1 FROM pdb_groups WHERE name = ?", (name,)).fetchone():
                raise AnvilError("AlreadyExists", "a group of that name exists")
            txn.conn.execute(
                "INSERT INTO pdb_groups(name, tenant, created, created_by, schema_version, genesis, head_index, "
                "head_hash, snapshot_every, max_changeset) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (name, p.tenant, txn.now, txn.actor, 1, genesis, 0, genesis, every, limit))
            txn.conn.execute("INSERT INTO pdb_schemas(grp, version, sql, sql_sha256, created) VALUES (?,?,?,?,?)",
                             (name, 1, schema, schema_sha, txn.now))
            keys = self._record_keys(txn)  # the first group records the witness keys (in its own event)
            txn.emit(p.tenant, "pdb.group.create", f"pdb/{name}",
                     {"group": name, "tenant": p.tenant, "schema_sha256": schema_sha, "schema": schema,
                      "genesis": genesis, "snapshot_every": every, "max_changeset": limit,
                      **({"keys": keys} if keys else {})})
            return {"name": name, "tenant": p.tenant, "schema_version": 1, "schema_sha256": schema_sha,
                    "genesis": genesis, "head_index": 0, "head_hash": genesis, "snapshot_every": every,
                    "max_changeset": limit, "tables": sorted(tables)}

        return self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)

    # -- row bindings (row permissions by relationship) ------------------------------------

    @staticmethod
    def _binding(conn: Connection, name: str) -> rowauth.RowBinding | None:
        row = conn.execute("SELECT binding FROM pdb_bindings WHERE grp = ?", (name,)).fetchone()
        return rowauth.binding_from_json(row[0]) if row else None

    @staticmethod
    def binding_requirements(conn: Connection, tenant: str) -> list[tuple[str, str, set[str]]]:
        """(what, resource type, permissions) the tenant's authz schema must keep for its groups' bindings
        (the runtime makes authz refuse a schema change that would drop one)."""
        out = []
        for grp, text in conn.execute("SELECT grp, binding FROM pdb_bindings WHERE tenant = ? ORDER BY grp",
                                      (tenant,)):
            b = rowauth.binding_from_json(text)
            out.append((f"PersonalDB group {grp} binds rows", b.resource_type, set(b.permissions().values())))
        return out

    def put_binding(self, ctx: RequestContext, name: str, body: Any) -> dict[str, Any]:
        """Decide the group's row changes by relationships (`pdb:admin`); validated against the tenant's
        authz schema (InvalidArgument, nothing written)."""
        g = self.group(ctx.principal, name, "pdb:admin")
        binding = rowauth.parse_binding(body, self.tables(name, g["schema_version"]))
        if self._authz is None:
            raise AnvilError("InvalidArgument", "relationship authorisation is not available in this process")
        self._authz.validate_binding(g["tenant"], binding.resource_type, binding.permissions())

        def fn(txn: Txn) -> dict[str, Any]:
            txn.conn.execute("DELETE FROM pdb_bindings WHERE grp = ?", (name,))
            txn.conn.execute("INSERT INTO pdb_bindings(grp, tenant, binding, written) VALUES (?,?,?,?)",
                             (name, g["tenant"], binding.canonical(), txn.now))
            txn.emit(g["tenant"], "pdb.binding.put", f"pdb/{name}",
                     {"group": name, "tenant": g["tenant"], "binding": binding.to_dict()})
            return {"group": name, "tenant": g["tenant"], "binding": binding.to_dict()}

        return self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)

    def get_binding(self, principal: Principal, name: str) -> dict[str, Any]:
        g = self.group(principal, name)
        b = self._binding(self.catalog.reader(), name)
        if b is None:
            raise AnvilError("NotFound", f"group {name} has no authorisation binding")
        return {"group": name, "tenant": g["tenant"], "binding": b.to_dict()}

    def delete_binding(self, ctx: RequestContext, name: str) -> dict[str, Any]:
        g = self.group(ctx.principal, name, "pdb:admin")

        def fn(txn: Txn) -> dict[str, Any]:
            if txn.conn.execute("SELECT 1 FROM pdb_bindings WHERE grp = ?", (name,)).fetchone() is None:
                raise AnvilError("NotFound", f"group {name} has no authorisation binding")
            txn.conn.execute("DELETE FROM pdb_bindings WHERE grp = ?", (name,))
            txn.emit(g["tenant"], "pdb.binding.delete", f"pdb/{name}", {"group": name})
            return {"group": name, "unbound": True}

        return self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)

    # -- the commit path ------------------------------------------------------------------

    def _append(self, txn: Txn, g: dict[str, Any], kind: str, payload: bytes, schema_version: int,
                idem: str | None, fingerprint: str | None, authz_revision: int = AUTHZ_REVISION) -> dict[str, Any]:
        index = g["head_index"] + 1
        cs_sha = certs.sha256_hex(payload)
        h = certs.entry_hash(g["name"], index, g["head_hash"], cs_sha, schema_version, kind)
        cert = self.keys.current.sign({
            "v": 1, "type": "commit", "group": g["name"], "index": index, "prev_hash": g["head_hash"], "hash": h,
            "changeset_sha256": cs_sha, "schema_version": schema_version, "entry_kind": kind,
            "authz_revision": authz_revision, "time": round(txn.now, 6)})
        cert_text = json.dumps(cert, separators=(",", ":"))
        txn.conn.execute(
            "INSERT INTO pdb_log(grp, idx, kind, prev_hash, hash, changeset, changeset_sha256, size, schema_version, "
            "actor, idem_key, fingerprint, ts, certificate) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (g["name"], index, kind, g["head_hash"], h, payload, cs_sha, len(payload), schema_version, txn.actor,
             idem, fingerprint, txn.now, cert_text))
        txn.conn.execute("UPDATE pdb_groups SET head_index = ?, head_hash = ?, schema_version = ? WHERE name = ?",
                         (index, h, schema_version, g["name"]))
        return {"group": g["name"], "index": index, "prev_hash": g["head_hash"], "hash": h, "kind": kind,
                "changeset_sha256": cs_sha, "size": len(payload), "schema_version": schema_version,
                "certificate": cert, "_certificate_text": cert_text}

    def _emit_projection_updates(self, txn: Txn, g: dict[str, Any], entry: dict[str, Any]) -> list[str]:
        """One `pdb.projection.update` event per projection of the group, in the commit's transaction:
        watchers learn that the projection now follows this source entry (its file catches up
        right after, on the projector thread)."""
        names = [r[0] for r in txn.conn.execute("SELECT name FROM pdb_projections WHERE source = ? ORDER BY name",
                                                (g["name"],))]
        for n in names:
            txn.emit(g["tenant"], "pdb.projection.update", f"pdb/{g['name']}",
                     {"projection": n, "group": g["name"], "source_index": entry["index"],
                      "source_hash": entry["hash"]})
        return names

    def _stale(self, g: dict[str, Any]) -> AnvilError:
        return AnvilError(
            "PersonalDbStaleBase",
            f"the base is not the head of group {g['name']}: the head is index {g['head_index']} hash "
            f"{g['head_hash']}; pull, rebase and submit again",
            headers={"x-anvil-pdb-head-index": str(g["head_index"]), "x-anvil-pdb-head-hash": g["head_hash"]})

    def validate_changeset(self, principal: Principal, g: dict[str, Any], data: bytes,
                           decide: Any = None) -> list[sf.RowChange]:
        """Parse and check a changeset: size, tables in the schema, column counts, and a permission
        for every row change (one denied row refuses the whole changeset): the token's scopes, then
        `decide(change)` (the group's binding, see `_row_decider`) when given."""
        if len(data) > g["max_changeset"]:
            raise AnvilError("EntityTooLarge", f"the changeset is larger than {g['max_changeset']} bytes")
        try:
            changes = sf.parse_changeset(data)
            columns = sf.changeset_columns(data)
        except sf.ChangesetError as e:
            raise AnvilError("PersonalDbInvalidChangeset", str(e)) from None
        tables = self.tables(g["name"], g["schema_version"])
        for table, n in columns.items():
            if table not in tables:
                raise AnvilError("PersonalDbUnknownTable", f"the changeset touches table {table[:64]!r}, which is "
                                                           f"not in the schema of group {g['name']}")
            if n != len(tables[table]["columns"]):
                raise AnvilError("PersonalDbInvalidChangeset",
                                 f"table {table!r} has {len(tables[table]['columns'])} columns in schema version "
                                 f"{g['schema_version']}, the changeset has {n}")
        if not changes:
            # A bare table header parses but changes no row: no permission would be asked, so a reader
            # could append certified entries (and make every replica rebase) with it.
            raise AnvilError("PersonalDbInvalidChangeset", "the changeset holds no row change")
        try:
            # Key values in the key's declared order (not the changeset's column order): the scopes'
            # PK text and the binding's `{column}` placeholders name them.
            changes = sf.in_key_order(changes, tables)
        except sf.ChangesetError as e:
            raise AnvilError("PersonalDbInvalidChangeset", str(e)) from None
        if not principal.admin:
            for ch in changes:
                resource = f"pdb:{g['name']}/{ch.table}/{_pk_text(ch.pk)}"
                if not _may(principal, OPS[ch.op], resource):
                    raise AnvilError("PermissionDenied", f"{ch.op.lower()} of row ({_pk_text(ch.pk)}) of table "
                                                         f"{ch.table} is not allowed (the whole changeset is refused)")
        if decide is not None:
            for ch in changes:
                decide(ch)
        return changes

    def _row_decider(self, principal: Principal, g: dict[str, Any]) -> tuple[int, Any]:
        """(authz revision, decide) when the group's binding decides rows for this principal; (0, None) when
        the token's scopes alone decide. The scope admits the application to the group; within it, the
        binding decides each row for the token's subject, all at one authz revision. A token acting for
        no subject is refused unless the binding says `without_subject: scopes` (admins acting for no
        subject are not subject to bindings); a conditional answer is a refusal."""
        conn = self.catalog.reader()
        binding = self._binding(conn, g["name"])
        if binding is None:
            return AUTHZ_REVISION, None
        subject = principal.acting_for
        if not subject:
            if binding.without_subject == "scopes" or principal.admin:
                return AUTHZ_REVISION, None
            raise _denied(f"group {g['name']} decides row permissions by relationships: use a token acting for "
                          "a subject (the token exchange's subject)")
        if self._authz is None:
            raise _denied(f"group {g['name']} decides row permissions by relationships, which this process "
                          "cannot ask")
        try:
            rev, check = self._authz.row_checker(g["tenant"], subject)
        except AnvilError as e:
            if e.code in ("InvalidArgument", "NotFound", "MaxDepthExceeded"):
                raise _denied(f"group {g['name']}'s binding cannot decide for {subject}: {e.message}") from None
            raise
        tables = self.tables(g["name"], g["schema_version"])

        def decide(ch: sf.RowChange) -> None:
            where = f"{ch.op.lower()} of row ({_pk_text(ch.pk)}) of table {ch.table}"
            rid = binding.resource_id(g["name"], ch.table, tables[ch.table]["pk"], ch.pk)
            perm = binding.permission(ch.op)
            try:
                state, missing = check(binding.resource_type, rid, perm)
            except AnvilError as e:
                if e.code in ("InvalidArgument", "NotFound", "MaxDepthExceeded"):
                    raise _denied(f"{where}: the group's binding cannot decide for {subject}: {e.message} "
                                  "(the whole changeset is refused)") from None
                raise
            if state != "has_permission":
                why = f" (missing caveat context: {', '.join(missing)})" if missing else ""
                raise _denied(f"{where} is not allowed: {subject} has no {perm} on "
                              f"{binding.resource_type}:{rid}{why} (the whole changeset is refused)")

        return rev, decide

    def commit(self, ctx: RequestContext, name: str, data: bytes, *, base_index: Any, base_hash: Any,
               schema_version: Any = None) -> dict[str, Any]:
        return self.submit_commit(ctx, name, data, base_index=base_index, base_hash=base_hash,
                                  schema_version=schema_version).result()

    def submit_commit(self, ctx: RequestContext, name: str, data: bytes, *, base_index: Any, base_hash: Any,
                      schema_version: Any = None) -> concurrent.futures.Future:
        """One changeset against (base_index, base_hash); the future's result is its entry."""
        batch = self.submit_commits(ctx, name, [(data, ctx.idempotency_key)], base_index=base_index,
                                    base_hash=base_hash, schema_version=schema_version)
        out: concurrent.futures.Future = concurrent.futures.Future()

        def done(f: concurrent.futures.Future) -> None:
            if f.exception() is not None:
                out.set_exception(f.exception())
            else:
                out.set_result(f.result()[0])
        batch.add_done_callback(done)
        return out

    def submit_commits(self, ctx: RequestContext, name: str, items: list[tuple[bytes, str | None]], *,
                       base_index: Any, base_hash: Any, schema_version: Any = None) -> concurrent.futures.Future:
        """Changesets of one replica in order, each (bytes, idempotency key or None): the first is based on
        (base_index, base_hash), each next one on the entry before it. Each becomes its own log entry,
        certificate and `pdb.commit` event, all in one catalog transaction (one fsync for the lot, one
        round trip): all are appended or none is. A retry after a lost answer returns the same entries
        (each key's fingerprint chains over its base, like a single commit's)."""
        g = self.group(ctx.principal, name)
        if not _is_index(base_index):
            raise AnvilError("InvalidArgument", "the base index must be a non-negative integer")
        if not isinstance(base_hash, str) or not re.fullmatch(r"[0-9a-f]{64}", base_hash):
            raise AnvilError("InvalidArgument", "the base hash must be 64 hex digits")
        if schema_version is not None and (not isinstance(schema_version, int) or schema_version < 1):
            raise AnvilError("InvalidArgument", "the schema version must be a positive integer")
        if schema_version is not None and schema_version != g["schema_version"]:
            raise AnvilError("PersonalDbSchemaMismatch",
                             f"the replica is at schema version {schema_version}, group {name} is at "
                             f"{g['schema_version']}: pull to migrate, then submit again")
        if not items or len(items) > MAX_BATCH:
            raise AnvilError("InvalidArgument", f"a batch holds 1 to {MAX_BATCH} changesets")
        if sum(len(d) for d, _ in items) > g["max_changeset"]:
            raise AnvilError("EntityTooLarge", f"the batch's changesets add up to more than {g['max_changeset']} "
                             "bytes (the group's changeset limit)")
        authz_revision, decide = self._row_decider(ctx.principal, g)
        checked = []
        for data, idem in items:
            changes = self.validate_changeset(ctx.principal, g, data, decide)
            if idem is not None and not (isinstance(idem, str) and 1 <= len(idem) <= 255 and idem.isprintable()):
                raise AnvilError("InvalidArgument", "Idempotency-Key must be 1-255 printable characters")
            checked.append((data, idem, sorted({c.table for c in changes}), len(changes)))
        checked_version = g["schema_version"]

        def fn(txn: Txn) -> list[dict[str, Any]]:
            cur = self._group_row(txn.conn, name)
            if cur is None:
                raise _group_missing()
            base = (base_index, base_hash)
            out: list[dict[str, Any]] = []
            for data, idem, tables, rows in checked:
                fingerprint = certs.sha256_hex(f"{base[0]}:{base[1]}:".encode() + data)
                if idem is not None:
                    row = txn.conn.execute("SELECT fingerprint, idx FROM pdb_log WHERE grp = ? AND idem_key = ?",
                                           (name, idem)).fetchone()
                    if row is not None:
                        if row[0] != fingerprint:
                            raise AnvilError("IdempotencyMismatch",
                                             "this Idempotency-Key was already used for a different changeset")
                        entry = self._entry_of(txn.conn, name, int(row[1]), replay=True)
                        out.append(entry)
                        base = (entry["index"], entry["hash"])
                        continue
                if base != (cur["head_index"], cur["head_hash"]):
                    raise self._stale(cur)
                version = cur["schema_version"]
                if (schema_version is not None and schema_version != version) or version != checked_version:
                    raise AnvilError("PersonalDbSchemaMismatch",
                                     f"the replica is at schema version {schema_version or checked_version}, group "
                                     f"{name} is at {version}: pull to migrate, then submit again")
                entry = self._append(txn, cur, "changeset", data, version, idem, fingerprint, authz_revision)
                txn.emit(cur["tenant"], "pdb.commit", f"pdb/{name}",
                         {"group": name, "index": entry["index"], "hash": entry["hash"],
                          "prev_hash": entry["prev_hash"], "changeset_sha256": entry["changeset_sha256"],
                          "size": len(data), "tables": tables, "rows": rows, "schema_version": version,
                          # What replay needs to rebuild the log row (the witness key is not in the journal).
                          "changeset": base64.b64encode(data).decode(), "idem_key": idem,
                          "fingerprint": fingerprint, "certificate": entry.pop("_certificate_text")})
                entry["snapshot_due"] = entry["index"] % cur["snapshot_every"] == 0
                entry["projections"] = self._emit_projection_updates(txn, cur, entry)
                cur = {**cur, "head_index": entry["index"], "head_hash": entry["hash"]}
                base = (entry["index"], entry["hash"])
                out.append(entry)
            return out

        fut = self.catalog.submit(fn, actor=ctx.actor, request_id=ctx.request_id)
        fut.add_done_callback(lambda f: self._after_commits(name, f))
        return fut

    def _after_commits(self, name: str, fut: concurrent.futures.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        for entry in fut.result():
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(entry)
            self._after_commit(name, done)

    def _after_commit(self, name: str, fut: concurrent.futures.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        entry = fut.result()
        if entry.get("idempotent_replay"):
            return
        for fn in self._listeners:
            try:
                fn(name, entry)
            except Exception:  # noqa: BLE001 - a derived view must never fail a commit
                log.exception("personaldb commit listener failed")
        if entry.get("projections"):
            self._projector.submit(self._project, name, entry)
        if entry.get("snapshot_due"):
            self.schedule_snapshot(name, entry["index"])

    def _entry_of(self, conn: Connection, name: str, index: int, *, replay: bool = False,
                  with_changeset: bool = False) -> dict[str, Any]:
        row = conn.execute("SELECT idx, kind, prev_hash, hash, changeset_sha256, size, schema_version, certificate, "
                           "changeset FROM pdb_log WHERE grp = ? AND idx = ?", (name, index)).fetchone()
        out = {"group": name, "index": row[0], "kind": row[1], "prev_hash": row[2], "hash": row[3],
               "changeset_sha256": row[4], "size": row[5], "schema_version": row[6],
               "certificate": json.loads(row[7])}
        if replay:
            out["idempotent_replay"] = True
        if with_changeset:
            out["changeset"] = base64.b64encode(row[8]).decode() if row[8] is not None else None
        return out

    def migrate(self, ctx: RequestContext, name: str, sql: Any) -> dict[str, Any]:
        """A new schema version: its migration SQL becomes a certified log entry every replica runs."""
        g = self.group(ctx.principal, name, "pdb:admin")
        if not isinstance(sql, str) or not sql.strip() or len(sql.encode()) > MAX_SCHEMA:
            raise AnvilError("InvalidArgument", "migration SQL is required")
        schemas = self._schemas(self.catalog.reader(), name)
        try:
            sf.schema_tables(schemas[0][1], [s for _, s, _ in schemas[1:]] + [sql])
        except sf.ChangesetError as e:
            raise AnvilError("PersonalDbInvalidSchema", str(e)) from None

        def fn(txn: Txn) -> dict[str, Any]:
            cur = self._group_row(txn.conn, name)
            assert cur is not None
            version = cur["schema_version"] + 1
            txn.conn.execute("INSERT INTO pdb_schemas(grp, version, sql, sql_sha256, created) VALUES (?,?,?,?,?)",
                             (name, version, sql, certs.sha256_hex(sql.encode()), txn.now))
            entry = self._append(txn, cur, "migration", sql.encode(), version, None, None)
            txn.emit(cur["tenant"], "pdb.migrate", f"pdb/{name}",
                     {"group": name, "index": entry["index"], "hash": entry["hash"], "schema_version": version,
                      "sql": sql, "prev_hash": entry["prev_hash"], "certificate": entry.pop("_certificate_text")})
            entry["projections"] = self._emit_projection_updates(txn, cur, entry)
            return entry

        fut = self.catalog.submit(fn, actor=ctx.actor, request_id=ctx.request_id)
        fut.add_done_callback(lambda f: self._after_commit(name, f))
        out = fut.result()
        del g
        return out

    # -- catch-up -------------------------------------------------------------------------

    def catch_up(self, principal: Principal, name: str, after_index: Any, after_hash: Any, *,
                 limit: int = 1000, certificates_only: bool = False) -> dict[str, Any]:
        g = self.group(principal, name)
        if not _is_index(after_index):
            raise AnvilError("InvalidArgument", "after_index must be a non-negative integer")
        if not isinstance(after_hash, str):
            raise AnvilError("InvalidArgument", "after_hash is required")
        limit = max(1, min(int(limit), MAX_PAGE))
        conn = self.catalog.reader()
        with conn:
            g = self._group_row(conn, name) or g
            head = {"index": g["head_index"], "hash": g["head_hash"], "schema_version": g["schema_version"]}
            if after_index == 0:
                on_chain = after_hash == g["genesis"]
            else:
                row = conn.execute("SELECT hash FROM pdb_log WHERE grp = ? AND idx = ?", (name, after_index)).fetchone()
                on_chain = row is not None and row[0] == after_hash
            if not on_chain:
                return self._snapshot_required(conn, name, head, "divergent",
                                               f"({after_index}, {after_hash[:16]}) is not on the chain of {name}")
            if not certificates_only and after_index < g["compacted_through"]:
                return self._snapshot_required(conn, name, head, "compacted",
                                               f"entries up to {g['compacted_through']} were compacted")
            cols = "idx, kind, prev_hash, hash, changeset_sha256, size, schema_version, certificate"
            if not certificates_only:
                cols += ", changeset"
            entries = []
            for r in conn.execute(f"SELECT {cols} FROM pdb_log WHERE grp = ? AND idx > ? ORDER BY idx LIMIT ?",
                                  (name, after_index, limit)):
                e = {"index": r[0], "kind": r[1], "prev_hash": r[2], "hash": r[3], "changeset_sha256": r[4],
                     "size": r[5], "schema_version": r[6], "certificate": json.loads(r[7])}
                if not certificates_only:
                    e["changeset"] = base64.b64encode(r[8]).decode()
                entries.append(e)
        last = entries[-1]["index"] if entries else after_index
        return {"status": "ok", "group": name, "genesis": g["genesis"], "head": head, "entries": entries,
                "more": last < head["index"]}

    def _snapshot_required(self, conn: Connection, name: str, head: dict[str, Any], reason: str,
                           detail: str) -> dict[str, Any]:
        snap = self._latest_snapshot(conn, name)
        return {"status": "snapshot_required", "reason": reason, "detail": detail, "group": name, "head": head,
                "snapshot": snap, "entries": [], "more": False}

    # -- snapshots ------------------------------------------------------------------------

    def _snapshot_dict(self, r: tuple[Any, ...]) -> dict[str, Any]:
        return {"index": r[0], "hash": r[1], "state_hash": r[2], "schema_version": r[3], "sha256": r[4],
                "size": r[5], "raw_size": r[6], "time": r[7], "certificate": json.loads(r[8])}

    _SNAP_COLS = "idx, hash, state_hash, schema_version, sha256, size, raw_size, ts, certificate"

    def _latest_snapshot(self, conn: Connection, name: str) -> dict[str, Any] | None:
        r = conn.execute(f"SELECT {self._SNAP_COLS} FROM pdb_snapshots WHERE grp = ? ORDER BY idx DESC LIMIT 1",
                         (name,)).fetchone()
        return self._snapshot_dict(r) if r else None

    def list_snapshots(self, principal: Principal, name: str) -> list[dict[str, Any]]:
        self.group(principal, name)
        return [self._snapshot_dict(r) for r in self.catalog.reader().execute(
            f"SELECT {self._SNAP_COLS} FROM pdb_snapshots WHERE grp = ? ORDER BY idx", (name,))]

    def snapshot_data(self, principal: Principal, name: str, index: int) -> bytes:
        self.group(principal, name)
        if not _is_index(index):
            raise AnvilError("NotFound", "snapshot not found")
        r = self.catalog.reader().execute("SELECT sha256, size FROM pdb_snapshots WHERE grp = ? AND idx = ?",
                                          (name, index)).fetchone()
        if r is None:
            raise AnvilError("NotFound", "snapshot not found")
        return self.storage.blobs.read_small(r[0], r[1])

    def schedule_snapshot(self, name: str, index: int | None = None) -> None:
        """Build the snapshot at `index` (default: the head) in the background. One builder thread:
        builds run one at a time, in the order they fell due, each at its own index."""

        def run() -> None:
            try:
                self.build_snapshot(name, index=index)
            except Exception:  # noqa: BLE001 - logged; validation reports a missing snapshot as nothing
                log.exception("personaldb snapshot of %s failed", name)

        self._builder.submit(run)

    def request_snapshot(self, ctx: RequestContext, name: str) -> dict[str, Any]:
        self.group(ctx.principal, name, "pdb:admin")
        return self.build_snapshot(name, actor=ctx.actor, request_id=ctx.request_id)

    def materialise(self, name: str, upto: int, dest: Path) -> sf.Database:
        return materialise(self.catalog.reader(), self.storage.blobs, name, upto, dest)

    def build_snapshot(self, name: str, *, index: int | None = None, actor: str = SYSTEM_ACTOR,
                       request_id: str = "pdb-snapshot") -> dict[str, Any]:
        """Materialise entry `index` (default: the head), hash its state, compress it (zstd) into a
        blob, certify and record it."""
        g = self._group_row(self.catalog.reader(), name)
        if g is None:
            raise _group_missing()
        if index is None or index == g["head_index"]:
            index, h, version = g["head_index"], g["head_hash"], g["schema_version"]
        else:
            row = self.catalog.reader().execute("SELECT hash, schema_version FROM pdb_log WHERE grp = ? AND idx = ?",
                                                (name, index)).fetchone()
            if row is None:
                raise AnvilError("NotFound", f"entry {index} not found")
            h, version = row
        existing = self.catalog.reader().execute(
            f"SELECT {self._SNAP_COLS} FROM pdb_snapshots WHERE grp = ? AND idx = ?", (name, index)).fetchone()
        if existing:
            return self._snapshot_dict(existing)
        with tempfile.TemporaryDirectory(prefix="anvil-pdb-", dir=self.storage.layout.tmp) as d:
            work = Path(d) / "work.sqlite"
            db = self.materialise(name, index, work)
            try:
                state = db.state_hash()
                clean = Path(d) / "snap.sqlite"
                db.backup_to(clean)
            finally:
                db.close()
            raw = clean.read_bytes()
        packed = zstandard.ZstdCompressor(level=3, threads=2).compress(raw)
        # Through a BlobWriter, so a large snapshot gets its per-chunk digests like any large blob.
        w = self.storage.blobs.writer()
        try:
            for off in range(0, len(packed), 1 << 20):
                w.write(packed[off:off + (1 << 20)])
            info = w.commit()
        except BaseException:
            w.abort()
            raise
        cert = self.keys.current.sign({"v": 1, "type": "snapshot", "group": name, "index": index, "hash": h,
                                       "state_hash": state, "schema_version": version, "time": round(time.time(), 6)})

        def fn(txn: Txn) -> dict[str, Any]:
            cur = self._group_row(txn.conn, name)
            if cur is None:
                raise _group_missing()
            cert_text = json.dumps(cert, separators=(",", ":"))
            txn.conn.execute(
                "INSERT INTO pdb_snapshots(grp, idx, hash, state_hash, schema_version, sha256, size, raw_size, ts, "
                "certificate) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (grp, idx) DO NOTHING",
                (name, index, h, state, version, info.sha256, info.size, len(raw), txn.now, cert_text))
            txn.emit(cur["tenant"], "pdb.snapshot", f"pdb/{name}",
                     {"group": name, "index": index, "hash": h, "state_hash": state, "sha256": info.sha256,
                      "size": info.size, "raw_size": len(raw), "schema_version": version, "certificate": cert_text})
            r = txn.conn.execute(f"SELECT {self._SNAP_COLS} FROM pdb_snapshots WHERE grp = ? AND idx = ?",
                                 (name, index)).fetchone()
            return self._snapshot_dict(r)

        return self.catalog.mutate(fn, actor=actor, request_id=request_id)

    def compact(self, ctx: RequestContext, name: str) -> dict[str, Any]:
        """Drop the changeset bytes covered by the latest snapshot (hashes and certificates stay, so
        the chain still verifies); a replica behind that point is told `snapshot_required`."""
        self.group(ctx.principal, name, "pdb:admin")

        def fn(txn: Txn) -> dict[str, Any]:
            cur = self._group_row(txn.conn, name)
            assert cur is not None
            snap = self._latest_snapshot(txn.conn, name)
            if snap is None:
                raise AnvilError("PreconditionFailed", "no snapshot to compact up to: build one first")
            upto = snap["index"]
            n = txn.conn.execute("SELECT count(*) FROM pdb_log WHERE grp = ? AND idx <= ? AND changeset IS NOT NULL",
                                 (name, upto)).fetchone()[0]
            txn.conn.execute("UPDATE pdb_log SET changeset = NULL WHERE grp = ? AND idx <= ?", (name, upto))
            txn.conn.execute("UPDATE pdb_groups SET compacted_through = ? WHERE name = ?", (upto, name))
            txn.emit(cur["tenant"], "pdb.compact", f"pdb/{name}", {"group": name, "through": upto, "entries": n})
            return {"group": name, "compacted_through": upto, "entries": n}

        return self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)

    # -- projections ----------------------------------------------------------------------

    def _project(self, group: str, entry: dict[str, Any]) -> None:
        conn = self.catalog.reader()
        try:
            specs = [(n, spec) for n, _, spec in projection_specs(conn, group)]
            mirror_meta = self.projections.meta_of(self.projections.mirror_path(group))
            tenant = conn.execute("SELECT tenant FROM pdb_groups WHERE name = ?", (group,)).fetchone()[0]
            relation = relations_for(conn, tenant, self._relations_factory())
            metas = {n: self.projections.meta(n) for n, _ in specs}
            # A file whose relation filters were decided at another authz revision (or by scopes, before
            # the tenant had a schema) is rebuilt whole: every row of one file is decided at one revision.
            if (group not in self._projected or mirror_meta.get("source_index") != str(entry["index"] - 1)
                    or any(metas[n].get("source_index") != str(entry["index"] - 1) for n, _ in specs)
                    or any(pj.relation_meta(spec, relation).items() - metas[n].items() for n, spec in specs)):
                rebuild_projections(conn, self.storage.blobs, self.storage.root, group, self._relations_factory())
                self._projected.add(group)
                return
            row = conn.execute("SELECT changeset FROM pdb_log WHERE grp = ? AND idx = ?",
                               (group, entry["index"])).fetchone()
            self.projections.on_commit(group, bytes(row[0]), entry["kind"], (entry["index"], entry["hash"]), specs,
                                       relation)
        except Exception:  # noqa: BLE001 - derived: the next commit (or repair) rebuilds it
            log.exception("personaldb projection of %s failed", group)
            self._projected.discard(group)

    def create_projection(self, ctx: RequestContext, name: Any, source: Any, spec: Any) -> dict[str, Any]:
        g = self.group(ctx.principal, source if isinstance(source, str) else "", "pdb:admin")
        if not isinstance(name, str) or not pj.NAME_RE.match(name):
            raise AnvilError("InvalidArgument", "a projection name is 1-63 characters of a-z, 0-9, '_' and '-'")
        clean = pj.validate_spec(spec, self.tables(g["name"], g["schema_version"]))
        clean["source"] = g["name"]

        def fn(txn: Txn) -> dict[str, Any]:
            if txn.conn.execute("SELECT 1 FROM pdb_projections WHERE name = ?", (name,)).fetchone():
                raise AnvilError("AlreadyExists", "a projection of that name exists")
            txn.conn.execute("INSERT INTO pdb_projections(name, tenant, source, spec, created, created_by) "
                             "VALUES (?,?,?,?,?,?)", (name, g["tenant"], g["name"], pj.dumps(clean), txn.now,
                                                      txn.actor))
            txn.emit(g["tenant"], "pdb.projection.create", f"pdb/{g['name']}",
                     {"projection": name, "group": g["name"], "spec": clean})
            return {"name": name, "source": g["name"], "spec": clean}

        out = self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        # Built on the projector thread, so it is ordered with the commits that follow.
        self._projector.submit(self._rebuild_group_safely, g["name"]).result()
        return {**out, **self.describe_projection(ctx.principal, name)}

    def _rebuild_group_safely(self, group: str) -> None:
        rebuild_projections(self.catalog.reader(), self.storage.blobs, self.storage.root, group,
                            self._relations_factory())
        self._projected.add(group)

    def authz_changed(self, tenant: str, revision: int) -> None:
        """After an authz write of `tenant` (schema or relationships): rebuild, on the projector thread
        (ordered with commits), every projection of the tenant's groups with a relation filter, so a
        change of who may see a row shows without waiting for the next commit."""
        conn = self.catalog.reader()
        groups = sorted({src for _, src, spec in projection_specs(conn) if pj.has_relation_filter(spec)
                         and (conn.execute("SELECT tenant FROM pdb_groups WHERE name = ?", (src,)).fetchone()
                              or ("",))[0] == tenant})
        for g in groups:
            self._projector.submit(self._rebuild_after_authz, g)

    def _rebuild_after_authz(self, group: str) -> None:
        try:
            self._rebuild_group_safely(group)
        except Exception:  # noqa: BLE001 - derived: the next commit (or repair) rebuilds it
            log.exception("personaldb projection rebuild of %s after an authz write failed", group)
            self._projected.discard(group)

    def _projection_row(self, principal: Principal, name: str) -> tuple[str, str, dict[str, Any]]:
        if not isinstance(name, str) or not pj.NAME_RE.match(name):
            raise AnvilError("NotFound", "projection not found")
        r = self.catalog.reader().execute("SELECT name, source, spec FROM pdb_projections WHERE name = ?",
                                          (name,)).fetchone()
        if r is None:
            raise AnvilError("NotFound", "projection not found")
        try:
            self.group(principal, r[1])
        except AnvilError as e:
            if e.code == "NotFound":
                raise AnvilError("NotFound", "projection not found") from None
            raise
        return r[0], r[1], json.loads(r[2])

    def describe_projection(self, principal: Principal, name: str) -> dict[str, Any]:
        n, src, spec = self._projection_row(principal, name)
        meta = self.projections.meta(n)
        return {"name": n, "source": src, "spec": spec, "source_index": int(meta.get("source_index", -1)),
                "source_hash": meta.get("source_hash"), "state_hash": self.projections.state(n),
                # What decided the relation filters: "relationships" (at authz_revision) or "scopes".
                "relation_filters": meta.get("relation_filters"),
                "authz_revision": int(meta["authz_revision"]) if "authz_revision" in meta else None}

    def projection_data(self, principal: Principal, name: str, *, wait_for: int | None = None) -> bytes:
        """The projection's SQLite file (zstd), once it reflects at least source entry `wait_for`."""
        n, src, _ = self._projection_row(principal, name)
        if wait_for is not None:
            deadline = time.monotonic() + 10
            while int(self.projections.meta(n).get("source_index", -1)) < wait_for and time.monotonic() < deadline:
                time.sleep(0.02)
        with tempfile.TemporaryDirectory(prefix="anvil-pdb-", dir=self.storage.layout.tmp) as d:
            db = sf.Database(self.projections.path(n))
            try:
                db.backup_to(Path(d) / "p.sqlite")
            finally:
                db.close()
            return zstandard.ZstdCompressor(level=3).compress((Path(d) / "p.sqlite").read_bytes())

    def projection_changes(self, principal: Principal, name: str, after_index: Any, after_hash: Any, *,
                           limit: int = 1000) -> dict[str, Any]:
        """What a subscriber at source entry (after_index, after_hash) applies to follow the projection:
        one changeset per source entry since, or `snapshot_required` (load the file again)."""
        n, _, _ = self._projection_row(principal, name)
        if not _is_index(after_index):
            raise AnvilError("InvalidArgument", "after_index must be a non-negative integer")
        if not isinstance(after_hash, str) or not re.fullmatch(r"[0-9a-f]{64}", after_hash):
            raise AnvilError("InvalidArgument", "after_hash must be 64 hex digits")
        if not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise AnvilError("InvalidArgument", f"limit must be 1-{MAX_PAGE}")
        out = self.projections.changes_after(n, after_index, after_hash, limit)
        for e in out.get("entries", []):
            e["changeset"] = base64.b64encode(e["changeset"]).decode()
        return {"projection": n, **out}

    def write_back(self, ctx: RequestContext, name: str, data: bytes) -> dict[str, Any]:
        """A changeset made on a copy of the projection, sent back to the source group under the
        projection's write-back policy: `deny`, or UPDATEs of the named projected columns of rows the
        projection shows. It is translated into a source changeset (against the mirror at the head)
        and committed like any other, with the caller's own row permissions."""
        n, src, spec = self._projection_row(ctx.principal, name)
        policy = spec.get("write_back", "deny")
        if policy == "deny":
            raise AnvilError("PermissionDenied", f"projection {n} denies write-back")
        allowed = set(policy["columns"])
        try:
            changes = sf.parse_changeset(data)
            columns = sf.changeset_columns(data)
        except sf.ChangesetError as e:
            raise AnvilError("PersonalDbInvalidChangeset", str(e)) from None
        by_target = {t["to"]: t for t in spec["tables"]}
        for table, count in columns.items():
            if table not in by_target:
                raise AnvilError("PersonalDbUnknownTable", f"table {table[:64]!r} is not in projection {n}")
            if count != len(by_target[table]["columns"]):
                raise AnvilError("PersonalDbInvalidChangeset", f"table {table!r} has "
                                 f"{len(by_target[table]['columns'])} projected columns, the changeset {count}")
        try:
            # Key values in the order of the key the projected table declares (the source's, renamed),
            # which the row lookups below name: a changeset lists them in column order.
            changes = sf.in_key_order(changes, {
                t["to"]: {"columns": [d for _, d in t["columns"]],
                          "pk": [dict(t["columns"])[p] for p in t["pk"]]} for t in spec["tables"]})
        except sf.ChangesetError as e:
            raise AnvilError("PersonalDbInvalidChangeset", str(e)) from None
        g = self.group(ctx.principal, src)
        deadline = time.monotonic() + 10
        while (self.projections.meta_of(self.projections.mirror_path(src)).get("source_index") != str(g["head_index"])
               and time.monotonic() < deadline):
            time.sleep(0.02)
            g = self.group(ctx.principal, src)
        if self.projections.meta_of(self.projections.mirror_path(src)).get("source_index") != str(g["head_index"]):
            raise self._stale(g)
        statements: list[tuple[str, list[Any]]] = []
        for ch in changes:
            t = by_target[ch.table]
            pairs = t["columns"]
            if ch.op != "UPDATE":
                raise AnvilError("PermissionDenied", f"projection {n} allows only updates of "
                                                     f"{', '.join(sorted(allowed))} (a {ch.op.lower()} was sent)")
            names = [pairs[i][1] for i in ch.changed]
            if not set(names) <= allowed or any(pairs[i][0] in t["pk"] for i in ch.changed):
                raise AnvilError("PermissionDenied", f"projection {n} allows write-back of "
                                                     f"{', '.join(sorted(allowed))} only")
            assert ch.new is not None
            sets = ", ".join(f'"{pairs[i][0]}" = ?' for i in ch.changed)
            where = " AND ".join(f'"{p}" = ?' for p in t["pk"])
            statements.append((f'UPDATE "{t["from"]}" SET {sets} WHERE {where}',
                               [ch.new[i] for i in ch.changed] + list(ch.pk)))
        with tempfile.TemporaryDirectory(prefix="anvil-pdb-", dir=self.storage.layout.tmp) as d:
            mirror = sf.Database(self.projections.mirror_path(src))
            try:
                mirror.backup_to(Path(d) / "w.sqlite")
            finally:
                mirror.close()
            work = sf.Database(Path(d) / "w.sqlite")
            reader = self.catalog.reader()
            relation = relations_for(reader, self._group_row(reader, src)["tenant"], self._relations_factory())
            try:
                cols = {t["from"]: work.tables()[t["from"]]["columns"] for t in spec["tables"]}
                for ch in changes:
                    t = by_target[ch.table]
                    where = " AND ".join(f'"{p}" = ?' for p in t["pk"])
                    row = work.execute(f'SELECT * FROM "{t["from"]}" WHERE {where}', list(ch.pk))
                    if not row or not pj._passes(t, dict(zip(cols[t["from"]], row[0], strict=True)), relation):
                        raise AnvilError("PermissionDenied", f"a row outside projection {n} cannot be written back")
                work.start_session()
                for sql, params in statements:
                    work.execute(sql, params)
                translated = work.take_changeset()
            finally:
                work.close()
        if not translated:
            raise AnvilError("InvalidArgument", "the write-back changes nothing")
        return self.commit(ctx, src, translated, base_index=g["head_index"], base_hash=g["head_hash"],
                           schema_version=g["schema_version"])

    def close(self) -> None:
        self._projector.shutdown(wait=True)
        self._builder.shutdown(wait=True)
