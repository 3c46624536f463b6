"""`ArtefactService`: model and source artefacts as signed, content-addressed manifests.

Source records (catalog tables, every change a journal event in the same transaction):
`artefacts` (one manifest per bucket and id, with its signatures), `artefact_components` (the
components each manifest lists, for blob references and per-bucket deduplication),
`artefact_tags` (mutable names -> ids, with an optional required signing key) and
`artefact_keys` (Ed25519 public keys per tenant).

Components are content-addressed blobs in the blob store: a component identical to one already
stored (any version, any artefact) is stored once. Derived state: the tensor index of each
safetensors component, one JSON file per blob under `derived/artefact-tensors/`, rebuilt from
the blob's header whenever it is missing (see `participant.py`).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from anvil import artefact_format as mf
from anvil.context import RequestContext
from anvil.errors import AnvilError
from anvil.storage import Storage
from anvil.storage.blobs import BlobCorrupted, BlobWriter
from anvil.storage.catalog import Txn
from anvil.storage.records import Connection

MIGRATIONS = [
    """
    CREATE TABLE artefacts (
        bucket TEXT NOT NULL,
        id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        manifest TEXT NOT NULL,
        signatures TEXT NOT NULL,
        created REAL NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (bucket, id)
    );
    CREATE INDEX artefacts_by_name ON artefacts (bucket, name, seq);
    CREATE TABLE artefact_components (
        bucket TEXT NOT NULL,
        artefact_id TEXT NOT NULL,
        path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (bucket, artefact_id, path)
    );
    CREATE INDEX artefact_components_by_sha ON artefact_components (bucket, sha256);
    CREATE TABLE artefact_tags (
        bucket TEXT NOT NULL,
        name TEXT NOT NULL,
        tag TEXT NOT NULL,
        artefact_id TEXT,
        required_key TEXT,
        updated REAL NOT NULL,
        PRIMARY KEY (bucket, name, tag)
    );
    CREATE TABLE artefact_keys (
        tenant TEXT NOT NULL,
        key_id TEXT NOT NULL,
        public_key TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (tenant, key_id)
    );
    """,
    # 2: proof of possession. A component counts as this bucket's only once it was uploaded to this
    # bucket (or an artefact of the bucket already references it): the blob store is shared and
    # content-addressed, so "the blob exists" alone would let anyone who knows a hash and size
    # claim, and then pull, another tenant's file.
    """
    CREATE TABLE artefact_uploads (
        bucket TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (bucket, sha256)
    );
    """,
]

TENSOR_DIR = "derived/artefact-tensors"
GIT_DIR = "derived/artefact-git"  # per source artefact id: its packs, indexed (a cache for git reads)
READ_BLOCK = 1024 * 1024

BucketLookup = Callable[[str], Any]  # name -> object with .tenant and .public, or None


def tensor_index_path(root: Path, sha256: str) -> Path:
    return Path(root) / TENSOR_DIR / sha256[:2] / f"{sha256}.json"


def read_blob_range(blobs: Any, sha256: str, size: int, offset: int, length: int) -> bytes:
    """Verified bytes of a blob range (each chunk checked against the blob's digests)."""
    return b"".join(blobs.read_verified(sha256, size, offset, length))


def compute_tensor_index(blobs: Any, sha256: str, size: int, path: str) -> list[dict[str, Any]]:
    """Parse one safetensors or GGUF component's header from its blob (InvalidArgument if malformed)."""
    if mf.is_gguf(path):
        blobs.check_size(sha256, size)
        with blobs.local_copy(sha256) as local:  # the gguf parser wants a file (remote backend: a download)
            tensors = mf.index_gguf(str(local), size, path)
        for t in tensors:
            t.pop("file")
        return tensors
    tensors = mf.index_file(lambda off, n: read_blob_range(blobs, sha256, size, off, min(n, size - off)),
                            size, path)
    for t in tensors:
        t.pop("file")
    return tensors


def write_tensor_index(root: Path, sha256: str, tensors: list[dict[str, Any]]) -> None:
    """Atomically publish a blob's tensor index (derived: deterministic, rewritten freely)."""
    target = tensor_index_path(root, sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(json.dumps({"sha256": sha256, "tensors": tensors}, sort_keys=True,
                               separators=(",", ":")).encode())
    os.replace(tmp, target)


def load_tensor_index(root: Path, sha256: str) -> list[dict[str, Any]] | None:
    try:
        doc = json.loads(tensor_index_path(root, sha256).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("sha256") != sha256 or not isinstance(doc.get("tensors"), list):
        return None
    return doc["tensors"]


def effective_files(conn: Connection, bucket: str, artefact_id: str, depth: int = 0) -> dict[str, dict[str, Any]]:
    """path -> {path, size, sha256}: the artefact's own components over its base's (minus removed)."""
    if depth > 64:
        raise AnvilError("InvalidArgument", "base chain deeper than 64 artefacts")
    row = conn.execute("SELECT manifest FROM artefacts WHERE bucket = ? AND id = ?", (bucket, artefact_id)).fetchone()
    if row is None:
        raise AnvilError("NotFound", "artefact not found")
    m = json.loads(row[0])
    files: dict[str, dict[str, Any]] = {}
    if m.get("base"):
        files = effective_files(conn, bucket, m["base"], depth + 1)
        for p in m.get("removed", []):
            files.pop(p, None)
    for c in m["components"]:
        files[c["path"]] = dict(c)
    return dict(sorted(files.items()))


class ArtefactService:
    def __init__(self, storage: Storage, bucket_lookup: BucketLookup):
        self.storage = storage
        self.blobs = storage.blobs
        self.root = storage.layout.root
        self._bucket_lookup = bucket_lookup
        storage.catalog.migrate("artefacts", MIGRATIONS)

    # ------------------------------------------------------------------ helpers

    def _conn(self) -> Connection:
        return self.storage.catalog.reader()

    def bucket_tenant(self, bucket: str) -> str:
        b = self._bucket_lookup(bucket)
        if b is None:
            raise AnvilError("NotFound", "bucket not found")
        return b.tenant

    def _row(self, conn: Connection, bucket: str, artefact_id: str) -> dict[str, Any]:
        tenant = self.bucket_tenant(bucket)
        row = conn.execute("SELECT id, name, kind, manifest, signatures, created, seq, tenant FROM artefacts "
                           "WHERE bucket = ? AND id = ?", (bucket, artefact_id)).fetchone()
        # An artefact of a former bucket of the same name but another tenant is not this bucket's.
        if row is None or row[7] != tenant:
            raise AnvilError("NotFound", "artefact not found")
        return {"id": row[0], "name": row[1], "kind": row[2], "manifest": json.loads(row[3]),
                "signatures": json.loads(row[4]), "created": row[5], "seq": row[6]}

    def resolve(self, bucket: str, name: str, ref: str) -> str:
        """A ref (a full id, a unique id prefix of at least 12 hex digits, or a tag) -> the artefact id."""
        mf.check_name(name)
        conn = self._conn()
        self.bucket_tenant(bucket)
        if mf.HEX64.match(ref):
            row = conn.execute("SELECT id FROM artefacts WHERE bucket = ? AND name = ? AND id = ?",
                               (bucket, name, ref)).fetchone()
            if row is None:
                raise AnvilError("NotFound", "artefact not found")
            return row[0]
        if 12 <= len(ref) < 64 and all(c in "0123456789abcdef" for c in ref):
            rows = conn.execute("SELECT id FROM artefacts WHERE bucket = ? AND name = ? AND id >= ? AND id < ?",
                                (bucket, name, ref, ref + "g")).fetchall()
            if len(rows) == 1:
                return rows[0][0]
        row = conn.execute("SELECT artefact_id FROM artefact_tags WHERE bucket = ? AND name = ? AND tag = ?",
                           (bucket, name, ref)).fetchone()
        if row is None or row[0] is None:
            raise AnvilError("NotFound", "no artefact with that id or tag")
        return row[0]

    # ------------------------------------------------------------------ components

    def missing_components(self, bucket: str, shas: list[str]) -> list[str]:
        """Which of these hashes this bucket's artefacts do not already hold (the client uploads those).

        Only this bucket's references count: answering for the whole blob store would tell anyone
        whether some other tenant stores a file with a given hash."""
        self.bucket_tenant(bucket)
        if not isinstance(shas, list) or len(shas) > mf.MAX_COMPONENTS:
            raise AnvilError("InvalidArgument", f"sha256s must be a list of at most {mf.MAX_COMPONENTS} hashes")
        conn = self._conn()
        out = []
        for s in dict.fromkeys(shas):
            mf.check_sha(s)
            if not self._held_by_bucket(conn, bucket, s) or not self.blobs.exists(s):
                out.append(s)
        return out

    def component_writer(self, expected_size: int | None = None) -> BlobWriter:
        self.storage.space.admit(expected_size or 0)
        return self.blobs.writer(md5=False)  # components are addressed by SHA-256; no ETag to compute

    def store_component(self, ctx: RequestContext, bucket: str, writer: BlobWriter,
                        expected_sha256: str) -> dict[str, Any]:
        """Commit an uploaded component if it hashes to what the caller declared (else store nothing),
        and record that this bucket holds it (journaled): what a later push may reference."""
        info = writer.digests()
        if info.sha256 != expected_sha256:
            writer.abort()
            raise AnvilError("BadDigest", f"the component hashes to {info.sha256}, not the declared "
                             f"{expected_sha256}: nothing was stored")
        info = writer.commit()
        tenant = self.bucket_tenant(bucket)

        def fn(txn: Txn) -> None:
            txn.conn.execute("INSERT INTO artefact_uploads (bucket, sha256, size, created) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (bucket, sha256) DO UPDATE SET size = excluded.size, "
                             "created = excluded.created", (bucket, info.sha256, info.size, txn.now))
            txn.emit(tenant, "artefact.upload", bucket, {"bucket": bucket, "sha256": info.sha256, "size": info.size})

        self.storage.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        return {"sha256": info.sha256, "size": info.size}

    def store_component_bytes(self, ctx: RequestContext, bucket: str, data: bytes,
                              expected_sha256: str) -> dict[str, Any]:
        w = self.component_writer(len(data))
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        return self.store_component(ctx, bucket, w, expected_sha256)

    def bucket_deleting(self, txn: Txn, bucket: str, tenant: str) -> None:
        """A bucket holding artefacts (manifests or tags) is not deleted: manifests are source records
        that reference their components, and deleting them silently would break every pull and
        backup validation of them. Components uploaded but named by no manifest only prove
        possession to this bucket: they go with it (one `artefact.uploads_drop` event), so a later
        bucket of the same name cannot reference them."""
        c = txn.conn
        manifests = c.execute("SELECT count(*) FROM artefacts WHERE bucket = ? AND tenant = ?",
                              (bucket, tenant)).fetchone()[0]
        tags = c.execute("SELECT count(*) FROM artefact_tags WHERE bucket = ?", (bucket,)).fetchone()[0]
        if manifests or tags:
            raise AnvilError("BucketNotEmpty", f"bucket holds artefacts ({manifests} manifests, {tags} tags); "
                             "artefacts cannot be deleted, so neither can their bucket")
        n = c.execute("SELECT count(*) FROM artefact_uploads WHERE bucket = ?", (bucket,)).fetchone()[0]
        if n:
            c.execute("DELETE FROM artefact_uploads WHERE bucket = ?", (bucket,))
            txn.emit(tenant, "artefact.uploads_drop", bucket, {"bucket": bucket, "uploads": n})

    def _held_by_bucket(self, conn: Connection, bucket: str, sha256: str) -> bool:
        return any(conn.execute(f"SELECT 1 FROM {table} WHERE bucket = ? AND sha256 = ? LIMIT 1",
                                (bucket, sha256)).fetchone() is not None
                   for table in ("artefact_uploads", "artefact_components"))

    def component_for_read(self, bucket: str, name: str, sha256: str) -> int:
        """The size of a component this artefact name references (else NotFound)."""
        mf.check_sha(sha256)
        tenant = self.bucket_tenant(bucket)
        row = self._conn().execute(
            "SELECT c.size FROM artefact_components c JOIN artefacts a ON a.bucket = c.bucket AND a.id = c.artefact_id "
            "WHERE c.bucket = ? AND a.name = ? AND a.tenant = ? AND c.sha256 = ? LIMIT 1",
            (bucket, name, tenant, sha256)).fetchone()
        if row is None:
            raise AnvilError("NotFound", "component not found")
        return row[0]

    def read_component(self, sha256: str, size: int, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        try:
            yield from self.blobs.read_verified(sha256, size, offset, size - offset if length is None else length)
        except BlobCorrupted as e:
            raise AnvilError("DataCorrupted", f"component {sha256} {e.detail}") from None

    # ------------------------------------------------------------------ keys

    def add_key(self, ctx: RequestContext, tenant: str, key_id: str, public_key: str) -> dict[str, Any]:
        if not isinstance(key_id, str) or not mf.KEY_ID_RE.match(key_id):
            raise AnvilError("InvalidArgument", "a key id is 1-64 letters, digits, '.', '_' or '-'")
        raw = base64.b64encode(mf.public_key_bytes(public_key)).decode()

        def fn(txn: Txn) -> dict[str, Any]:
            row = txn.conn.execute("SELECT public_key FROM artefact_keys WHERE tenant = ? AND key_id = ?",
                                   (tenant, key_id)).fetchone()
            if row is not None:
                if row[0] == raw:
                    return {"tenant": tenant, "key_id": key_id, "public_key": raw, "created": False}
                raise AnvilError("AlreadyExists", "a different key is registered under that key id")
            txn.conn.execute("INSERT INTO artefact_keys (tenant, key_id, public_key, created) VALUES (?, ?, ?, ?)",
                             (tenant, key_id, raw, txn.now))
            txn.emit(tenant, "artefact.key_add", f"tenant/{tenant}",
                     {"tenant": tenant, "key_id": key_id, "public_key": raw})
            return {"tenant": tenant, "key_id": key_id, "public_key": raw, "created": True}

        return self.storage.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)

    def list_keys(self, tenant: str | None) -> list[dict[str, Any]]:
        sql = "SELECT tenant, key_id, public_key, created FROM artefact_keys"
        rows = (self._conn().execute(sql + " ORDER BY tenant, key_id") if tenant is None
                else self._conn().execute(sql + " WHERE tenant = ? ORDER BY key_id", (tenant,)))
        return [{"tenant": r[0], "key_id": r[1], "public_key": r[2], "created": r[3]} for r in rows]

    @staticmethod
    def _key(conn: Connection, tenant: str, key_id: str) -> bytes | None:
        row = conn.execute("SELECT public_key FROM artefact_keys WHERE tenant = ? AND key_id = ?",
                           (tenant, key_id)).fetchone()
        return base64.b64decode(row[0]) if row else None

    @classmethod
    def _check_signatures(cls, conn: Connection, tenant: str, body: bytes, sigs: list[dict[str, str]]) -> set[str]:
        """Every signature must verify with a key registered for the tenant; returns the key ids."""
        ok: set[str] = set()
        for s in sigs:
            key = cls._key(conn, tenant, s["key_id"])
            if key is None:
                raise AnvilError("SignatureInvalid", f"signing key {s['key_id']!r} is not registered for this "
                                 "tenant: nothing was stored")
            if not mf.verify_signature(body, s, key):
                raise AnvilError("SignatureInvalid", f"the signature by {s['key_id']!r} does not verify against "
                                 "the manifest: nothing was stored")
            ok.add(s["key_id"])
        return ok

    # ------------------------------------------------------------------ push

    def _index_components(self, files: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """Parse (or reuse) the tensor index of every safetensors file; malformed headers refuse the push."""
        out: dict[str, list[dict[str, Any]]] = {}
        for path, c in files.items():
            if not mf.is_indexed(path):
                continue
            tensors = load_tensor_index(self.root, c["sha256"])
            if tensors is None:
                try:
                    tensors = compute_tensor_index(self.blobs, c["sha256"], c["size"], path)
                except BlobCorrupted as e:
                    raise AnvilError("DataCorrupted", f"component {path} {e.detail}") from None
            out[c["sha256"]] = tensors
        return out

    def push(self, ctx: RequestContext, bucket: str, manifest: Any, signatures: Any = None,
             tag: str | None = None) -> dict[str, Any]:
        """Record a manifest (and move `tag` to it) after checking everything; on any error nothing is written."""
        m = mf.check_manifest(manifest)
        sigs = mf.check_signatures(signatures)
        if tag is not None:
            mf.check_tag(tag)
        tenant = self.bucket_tenant(bucket)
        body = mf.canonical(m)
        aid = mf.artefact_id(m)
        held = self._conn()
        for c in m["components"]:
            if not self._held_by_bucket(held, bucket, c["sha256"]):
                raise AnvilError("InvalidArgument", f"component {c['path']} ({c['sha256']}) was not uploaded to "
                                 "this bucket: nothing was stored")
            try:
                actual = self.blobs.size(c["sha256"])
            except FileNotFoundError:
                raise AnvilError("InvalidArgument", f"component {c['path']} ({c['sha256']}) was not uploaded: "
                                 "nothing was stored") from None
            if actual != c["size"]:
                raise AnvilError("BadDigest", f"component {c['path']} declares {c['size']} bytes, but the content "
                                 f"with its SHA-256 is {actual} bytes: nothing was stored")
        conn = self._conn()
        with conn:
            base_files: dict[str, dict[str, Any]] = {}
            if m.get("base"):
                row = conn.execute("SELECT tenant, name FROM artefacts WHERE bucket = ? AND id = ?",
                                   (bucket, m["base"])).fetchone()
                # The base must be an artefact of the same name: its files become this artefact's, and
                # the right to push and pull is per name (scopes on bucket:B/NAME, a binding's artefact
                # part), so a base of another name let a caller who may push `a` but not pull `b` read
                # `b`'s files through `a`. Same answer as an absent base: nothing about `b` is confirmed.
                if row is None or row[0] != tenant or row[1] != m["name"]:
                    raise AnvilError("NotFound", "the base artefact does not exist in this bucket")
                base_files = effective_files(conn, bucket, m["base"])
                for p in m.get("removed", []):
                    if p not in base_files:
                        raise AnvilError("InvalidArgument", f"removed path {p!r} is not in the base artefact")
            files = dict(base_files)
            for p in m.get("removed", []):
                files.pop(p, None)
            files.update({c["path"]: c for c in m["components"]})
            mf.check_layout(files)  # the effective list (base included) must fit a file system when pulled
            self._check_signatures(conn, tenant, body, sigs)
        tensors = self._index_components(files)
        # Derived, but published *before* the manifest commits: written after it, a crash between the
        # commit and the write left a recorded manifest without its tensor index, which nothing rebuilt
        # on restart (fsck: artefacts.tensor_index_missing until `anvil repair tensors`). The index is
        # keyed by the component's SHA-256 and deterministic, so writing it early is harmless even if
        # the mutation below is then refused.
        for sha, ts in tensors.items():
            if load_tensor_index(self.root, sha) is None:
                write_tensor_index(self.root, sha, ts)

        def fn(txn: Txn) -> dict[str, Any]:
            c = txn.conn
            if m.get("base") and c.execute("SELECT 1 FROM artefacts WHERE bucket = ? AND id = ?",
                                           (bucket, m["base"])).fetchone() is None:
                raise AnvilError("NotFound", "the base artefact does not exist in this bucket")
            signed = self._check_signatures(c, tenant, body, sigs)
            existing = c.execute("SELECT signatures FROM artefacts WHERE bucket = ? AND id = ?",
                                 (bucket, aid)).fetchone()
            created = existing is None
            if created:
                c.execute("INSERT INTO artefacts (bucket, id, tenant, name, kind, manifest, signatures, created, seq) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (bucket, aid, tenant, m["name"], m["kind"], body.decode(), json.dumps(sigs), txn.now,
                           txn.next_seq))
                for comp in m["components"]:
                    c.execute("INSERT INTO artefact_components (bucket, artefact_id, path, sha256, size) "
                              "VALUES (?, ?, ?, ?, ?)", (bucket, aid, comp["path"], comp["sha256"], comp["size"]))
                txn.emit(tenant, "artefact.push", bucket,
                         {"bucket": bucket, "id": aid, "name": m["name"], "kind": m["kind"], "manifest": m,
                          "signatures": sigs})
            else:
                # The same manifest again: signatures it did not carry yet are added (journaled).
                have = json.loads(existing[0])
                known = {(x["key_id"], x["signature"]) for x in have}
                added = [x for x in sigs if (x["key_id"], x["signature"]) not in known]
                if added:
                    have += added
                    c.execute("UPDATE artefacts SET signatures = ? WHERE bucket = ? AND id = ?",
                              (json.dumps(have), bucket, aid))
                    txn.emit(tenant, "artefact.sign", bucket, {"bucket": bucket, "id": aid, "name": m["name"],
                                                               "signatures": added})
                signed |= {x["key_id"] for x in have}
            moved = None
            if tag is not None:
                moved = self._move_tag(txn, tenant, bucket, m["name"], tag, aid, signed)
            return {"id": aid, "name": m["name"], "kind": m["kind"], "created": created, "tag": moved}

        result = self.storage.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        result["components"] = len(m["components"])
        result["files"] = len(files)
        result["tensors"] = sum(len(t) for t in tensors.values())
        return result

    # ------------------------------------------------------------------ tags

    def _move_tag(self, txn: Txn, tenant: str, bucket: str, name: str, tag: str, aid: str | None,
                  signed: set[str], require_key: str | None = None) -> dict[str, Any]:
        c = txn.conn
        row = c.execute("SELECT artefact_id, required_key FROM artefact_tags WHERE bucket = ? AND name = ? AND tag = ?",
                        (bucket, name, tag)).fetchone()
        required = require_key if require_key is not None else (row[1] if row else None)
        if require_key is not None and self._key(c, tenant, require_key) is None:
            raise AnvilError("NotFound", f"signing key {require_key!r} is not registered for this tenant")
        if aid is not None and required and required not in signed:
            raise AnvilError("SignatureInvalid", f"tag {tag!r} requires a signature by key {required!r}; the "
                             "artefact has none that verifies: nothing was stored")
        previous = row[0] if row else None
        if row is None:
            c.execute("INSERT INTO artefact_tags (bucket, name, tag, artefact_id, required_key, updated) "
                      "VALUES (?, ?, ?, ?, ?, ?)", (bucket, name, tag, aid, required, txn.now))
        else:
            c.execute("UPDATE artefact_tags SET artefact_id = ?, required_key = ?, updated = ? "
                      "WHERE bucket = ? AND name = ? AND tag = ?", (aid, required, txn.now, bucket, name, tag))
        txn.emit(tenant, "artefact.tag", bucket, {"bucket": bucket, "name": name, "tag": tag, "id": aid,
                                                  "previous": previous, "required_key": required})
        return {"tag": tag, "id": aid, "previous": previous, "required_key": required}

    def set_tag(self, ctx: RequestContext, bucket: str, name: str, tag: str, artefact_id: str | None,
                require_key: str | None = None) -> dict[str, Any]:
        """Point `tag` at an id (journaled); `require_key` makes every later target need that key's signature.

        `artefact_id` None only sets the policy of a tag that points nowhere yet."""
        mf.check_name(name)
        mf.check_tag(tag)
        if artefact_id is not None:
            mf.check_sha(artefact_id, "id")
        if require_key is not None and (not isinstance(require_key, str) or not mf.KEY_ID_RE.match(require_key)):
            raise AnvilError("InvalidArgument", "require_key must be a key id")
        tenant = self.bucket_tenant(bucket)

        def fn(txn: Txn) -> dict[str, Any]:
            signed: set[str] = set()
            if artefact_id is not None:
                row = txn.conn.execute("SELECT manifest, signatures, tenant FROM artefacts "
                                       "WHERE bucket = ? AND name = ? AND id = ?",
                                       (bucket, name, artefact_id)).fetchone()
                if row is None or row[2] != tenant:
                    raise AnvilError("NotFound", f"tag {tag!r} cannot point to artefact {artefact_id}: no such "
                                     f"artefact named {name!r} in this bucket")
                signed = self._check_signatures(txn.conn, tenant, row[0].encode(), json.loads(row[1]))
            elif txn.conn.execute("SELECT 1 FROM artefact_tags WHERE bucket = ? AND name = ? AND tag = ?",
                                  (bucket, name, tag)).fetchone() is None and require_key is None:
                raise AnvilError("InvalidArgument", "give an id, a required key, or both")
            return self._move_tag(txn, tenant, bucket, name, tag, artefact_id, signed, require_key)

        return self.storage.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)

    # ------------------------------------------------------------------ reads

    def list_artefacts(self, bucket: str, name: str | None = None) -> list[dict[str, Any]]:
        tenant = self.bucket_tenant(bucket)
        conn = self._conn()
        args: tuple[Any, ...] = (bucket, tenant)
        sql = "SELECT id, name, kind, created, signatures FROM artefacts WHERE bucket = ? AND tenant = ?"
        if name is not None:
            sql += " AND name = ?"
            args += (mf.check_name(name),)
        tags: dict[str, list[str]] = {}
        for _n, tag, aid in conn.execute("SELECT name, tag, artefact_id FROM artefact_tags WHERE bucket = ? "
                                        "ORDER BY tag", (bucket,)):
            if aid:
                tags.setdefault(aid, []).append(tag)
        return [{"id": r[0], "name": r[1], "kind": r[2], "created": r[3], "tags": tags.get(r[0], []),
                 "signed_by": [s["key_id"] for s in json.loads(r[4])]}
                for r in conn.execute(sql + " ORDER BY name, seq", args)]

    def list_tags(self, bucket: str, name: str) -> list[dict[str, Any]]:
        self.bucket_tenant(bucket)
        rows = self._conn().execute("SELECT tag, artefact_id, required_key, updated FROM artefact_tags "
                                    "WHERE bucket = ? AND name = ? ORDER BY tag", (bucket, mf.check_name(name)))
        return [{"tag": r[0], "id": r[1], "required_key": r[2], "updated": r[3]} for r in rows]

    def describe(self, bucket: str, name: str, ref: str) -> dict[str, Any]:
        aid = self.resolve(bucket, name, ref)
        conn = self._conn()
        with conn:
            info = self._row(conn, bucket, aid)
            info["files"] = list(effective_files(conn, bucket, aid).values())
        return info

    # Parsed tensor indexes by blob hash: immutable for a given hash, so a hit never goes stale.
    _tensor_cache: dict[str, list[dict[str, Any]]] = {}

    def _cached_index(self, sha256: str) -> list[dict[str, Any]] | None:
        ts = self._tensor_cache.get(sha256)
        if ts is None:
            ts = load_tensor_index(self.root, sha256)
            if ts is not None:
                if len(self._tensor_cache) > 4096:
                    self._tensor_cache.clear()
                self._tensor_cache[sha256] = ts
        return ts

    def tensors(self, bucket: str, name: str, ref: str) -> list[dict[str, Any]]:
        info = self.describe(bucket, name, ref)
        out: list[dict[str, Any]] = []
        for f in info["files"]:
            if not mf.is_indexed(f["path"]):
                continue
            ts = self._cached_index(f["sha256"])
            if ts is None:  # derived and lost (restore, damage): recompute from the blob and keep it
                try:
                    ts = compute_tensor_index(self.blobs, f["sha256"], f["size"], f["path"])
                except BlobCorrupted as e:
                    raise AnvilError("DataCorrupted", f"component {f['path']} {e.detail}") from None
                write_tensor_index(self.root, f["sha256"], ts)
            out += [{**t, "file": f["path"], "file_sha256": f["sha256"], "file_size": f["size"]} for t in ts]
        return out

    def tensor(self, bucket: str, name: str, ref: str, tensor: str) -> dict[str, Any]:
        for t in self.tensors(bucket, name, ref):
            if t["name"] == tensor:
                return t
        raise AnvilError("NotFound", f"no tensor named {tensor!r} in this artefact")

    def verify(self, bucket: str, name: str, ref: str) -> dict[str, Any]:
        """Re-hash every component, check every signature, and compare every tensor index with its header."""
        info = self.describe(bucket, name, ref)
        tenant = self.bucket_tenant(bucket)
        problems: list[str] = []
        body = mf.canonical(info["manifest"])
        if mf.artefact_id(info["manifest"]) != info["id"]:
            problems.append("the stored manifest does not hash to its id")
        conn = self._conn()
        sigs = []
        for s in info["signatures"]:
            key = self._key(conn, tenant, s["key_id"])
            ok = key is not None and mf.verify_signature(body, s, key)
            sigs.append({"key_id": s["key_id"], "ok": ok})
            if not ok:
                problems.append(f"signature by {s['key_id']} does not verify")
        comps = []
        for f in info["files"]:
            actual = self.blobs.full_sha256(f["sha256"])
            ok = actual == f["sha256"]
            comps.append({"path": f["path"], "ok": ok})
            if not ok:
                problems.append(f"component {f['path']} is missing" if actual is None
                                else f"component {f['path']} does not match its SHA-256")
            elif mf.is_indexed(f["path"]):
                try:
                    fresh = compute_tensor_index(self.blobs, f["sha256"], f["size"], f["path"])
                except AnvilError as e:  # a header stricter checks now refuse: a finding, not a failed verify
                    problems.append(e.message)
                    continue
                stored = load_tensor_index(self.root, f["sha256"])
                if stored is not None and stored != fresh:
                    problems.append(f"the tensor index of {f['path']} differs from its header")
        return {"id": info["id"], "ok": not problems, "problems": problems, "signatures": sigs,
                "components": comps}

    # ------------------------------------------------------------------ source artefacts (git)

    _git_cache: dict[str, Any] = {}
    _git_lock = threading.Lock()

    def _git_store(self, bucket: str, name: str, ref: str) -> tuple[dict[str, Any], Any]:
        """The artefact and an object store over its packs, on disk (`derived/artefact-git/<id>/`).

        Built once per artefact id by streaming each pack component from its blob into dulwich's
        pack writer (which indexes it): nothing holds a whole pack in memory, and the store is kept
        across restarts. Derived: a missing or unfinished store is built again from the blobs."""
        from dulwich.object_store import DiskObjectStore

        info = self.describe(bucket, name, ref)
        if info["kind"] != "source":
            raise AnvilError("InvalidArgument", "this artefact is not a source artefact")
        with self._git_lock:
            store = self._git_cache.get(info["id"])
            if store is not None:
                return info, store
            final = self.root / GIT_DIR / info["id"]
            if not (final / "complete").is_file():
                shutil.rmtree(final, ignore_errors=True)
                tmp = self.root / GIT_DIR / f".{info['id']}.{os.getpid()}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                building = DiskObjectStore.init(tmp)
                try:
                    for f in info["files"]:
                        if f["path"].endswith(".pack"):
                            self._add_pack(building, f)
                finally:
                    building.close()
                (tmp / "complete").write_text(info["id"])
                os.replace(tmp, final)
            store = DiskObjectStore(final)
            if len(self._git_cache) > 16:
                for old in self._git_cache.values():
                    old.close()
                self._git_cache.clear()
            self._git_cache[info["id"]] = store
        return info, store

    def close(self) -> None:
        """Close the on-disk git stores opened for reads (their pack files stay for the next start)."""
        with self._git_lock:
            for store in self._git_cache.values():
                store.close()
            self._git_cache.clear()

    def _add_pack(self, store: Any, f: dict[str, Any]) -> None:
        out, commit, abort = store.add_pack()
        try:
            for chunk in self.read_component(f["sha256"], f["size"]):
                out.write(chunk)
            commit()
        except AnvilError:
            abort()
            raise
        except Exception as e:  # noqa: BLE001 - a damaged pack is a clear error, not a 500
            abort()
            raise AnvilError("DataCorrupted", f"pack {f['path']} cannot be read: {e}") from None

    def git_resolve(self, bucket: str, name: str, ref: str, refname: str) -> dict[str, Any]:
        info = self.describe(bucket, name, ref)
        refs = info["manifest"].get("refs", {})
        for cand in (refname, f"refs/heads/{refname}", f"refs/tags/{refname}"):
            if cand in refs:
                return {"ref": cand, "commit": refs[cand]}
        raise AnvilError("NotFound", f"ref {refname!r} is not recorded in this source artefact")

    def _git_object(self, store: Any, commit: str, path: str) -> Any:
        from dulwich.object_store import tree_lookup_path

        if not isinstance(commit, str) or len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
            raise AnvilError("InvalidArgument", "commit must be 40 hex digits")
        try:
            c = store[commit.encode()]
        except KeyError:
            raise AnvilError("NotFound", "commit not found in this source artefact") from None
        if c.type_name != b"commit":
            raise AnvilError("InvalidArgument", "not a commit id")
        if not path or path == "/":
            return store[c.tree]
        mf.check_path(path.strip("/"))
        try:
            _mode, sha = tree_lookup_path(store.__getitem__, c.tree, path.strip("/").encode())
            return store[sha]
        except (KeyError, Exception):  # noqa: BLE001 - dulwich raises KeyError or NotTreeError
            raise AnvilError("NotFound", f"no path {path!r} in commit {commit}") from None

    def git_tree(self, bucket: str, name: str, ref: str, commit: str, path: str) -> dict[str, Any]:
        _info, store = self._git_store(bucket, name, ref)
        obj = self._git_object(store, commit, path)
        if obj.type_name != b"tree":
            raise AnvilError("InvalidArgument", f"{path!r} is not a directory")
        entries = [{"name": e.path.decode(errors="replace"), "mode": f"{e.mode:o}", "sha": e.sha.decode(),
                    "type": "tree" if e.mode & 0o40000 else "blob"} for e in obj.items()]
        return {"commit": commit, "path": path, "entries": entries}

    def git_blob(self, bucket: str, name: str, ref: str, commit: str, path: str) -> bytes:
        _info, store = self._git_store(bucket, name, ref)
        obj = self._git_object(store, commit, path)
        if obj.type_name != b"blob":
            raise AnvilError("InvalidArgument", f"{path!r} is not a file")
        return obj.data

    def git_http(self, bucket: str, name: str, ref: str, method: str, subpath: str, query: str, body: bytes,
                 content_type: str) -> tuple[int, list[tuple[str, str]], Iterator[bytes]]:
        """Read-only git smart HTTP (`git clone`) of a source artefact, answered by dulwich's server.

        Only ref discovery for upload-pack and upload-pack itself are served: receive-pack (push)
        is removed from the handlers, so the artefact cannot be written through git. The status and
        headers are known once dulwich starts answering; the body (the pack it generates from the
        on-disk store) is an iterator the caller streams, so a clone is never held whole in memory."""
        import io

        from dulwich.repo import MemoryRepo
        from dulwich.server import DictBackend
        from dulwich.web import HTTPGitApplication

        if not ((method == "GET" and subpath == "info/refs" and query == "service=git-upload-pack")
                or (method == "POST" and subpath == "git-upload-pack")):
            raise AnvilError("NotFound", "only `git clone`/`git fetch` (smart HTTP upload-pack) is served")
        info, store = self._git_store(bucket, name, ref)
        repo = MemoryRepo()  # only its refs live in memory; objects come from the on-disk store
        repo.object_store = store
        refs = info["manifest"].get("refs", {})
        for k, v in refs.items():
            repo.refs[k.encode()] = v.encode()
        heads = sorted(k for k in refs if k.startswith("refs/heads/"))
        head = "refs/heads/main" if "refs/heads/main" in refs else (heads[0] if heads else None)
        if head:
            repo.refs.set_symbolic_ref(b"HEAD", head.encode())
        app = HTTPGitApplication(DictBackend({"/": repo}))
        app.handlers.pop(b"git-receive-pack", None)
        environ = {"REQUEST_METHOD": method, "PATH_INFO": "/" + subpath, "QUERY_STRING": query,
                   "CONTENT_TYPE": content_type, "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
                   "wsgi.errors": io.StringIO(), "SERVER_NAME": "anvil", "SERVER_PORT": "0",
                   "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1"}
        answer: dict[str, Any] = {}
        written: list[bytes] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            answer["status"], answer["headers"] = int(status.split()[0]), headers
            return written.append  # dulwich writes through WSGI's write() as well as yielding

        chunks = iter(app(environ, start_response))
        first = next(chunks, None)  # dulwich calls start_response by its first chunk at the latest

        def body_chunks() -> Iterator[bytes]:
            # In the order produced: what write() received while a chunk was made comes before it.
            pending = [first] if first is not None else []
            while True:
                while written:
                    yield written.pop(0)
                yield from pending
                try:
                    pending = [next(chunks)]
                except StopIteration:
                    break
            while written:
                yield written.pop(0)

        return answer["status"], answer["headers"], body_chunks()
