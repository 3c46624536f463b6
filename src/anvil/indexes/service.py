"""Index definitions (source records with journal events) and their derived builder and queries.

Definitions live in `index_definitions`; every change is one mutation with one `index.*`
event, and the version increases on update, disable and enable. The builder is a derived
consumer of the journal (docs/indexes.md "Consistency"): per index it loads its cursor from
the published generation, reads the events after it, re-reads the current record of every
touched key, applies the batch and publishes the next generation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
import time
from collections.abc import Callable
from fnmatch import fnmatchcase, translate
from pathlib import Path
from typing import Any

from anvil import jsontext
from anvil.context import Principal, RequestContext
from anvil.errors import AnvilError
from anvil.identity import authorize
from anvil.identity.gate import bucket_access, hidden_bucket, object_filter
from anvil.identity.scopes import covers
from anvil.indexes import definitions as defs
from anvil.indexes.engine import MAX_SORT_MATCHES, Engine
from anvil.indexes.extract import Source, extract, finite_float32
from anvil.indexes.filters import compile_filter, narrowing, sort_key
from anvil.indexes.tables import INDEX_DIR, MIGRATIONS, index_dir, read_definitions
from anvil.storage import Storage, journal
from anvil.storage.catalog import Txn
from anvil.storage.records import Connection

# Storage root -> the index service building there in this process (see IndexService.start).
LIVE: dict[Path, IndexService] = {}
MAX_INDEXES_PER_BUCKET = 32
MAX_LIMIT = 1000
MAX_WINDOW = 10_000  # offset + limit
MAX_TEXT = 4096
MAX_WAIT = 10.0
DEFAULT_WAIT = 2.0
QUERY_KEYS = {"text", "fields", "boosts", "fuzzy", "vector", "filter", "sort", "limit", "page_token", "min_cursor",
              "wait_ms", "return_fields", "highlight", "hybrid", "ef_search"}


def read_body(blobs: Any, chunks: list[Any]) -> bytes:
    out = bytearray()
    for sha, size in chunks:
        for piece in blobs.read_verified(sha, int(size)):
            out += piece
    return bytes(out)


def current_document(conn: Connection, blobs: Any, definition: dict[str, Any], bucket: str,
                     key: str) -> dict[str, Any] | None:
    """The document the index should hold for `key` now (None: no live selected version)."""
    if not defs.selects(definition, key, ""):
        if key.startswith("_anvil/") or not key.startswith(definition["selector"]["prefix"]):
            return None
    row = conn.execute("SELECT version_id, size, content_type, metadata, chunks, created, delete_marker "
                       "FROM versions WHERE bucket = ? AND key = ? AND is_latest = 1", (bucket, key)).fetchone()
    if row is None or row[6] or not defs.selects(definition, key, row[2] or ""):
        return None
    return document_from_row(blobs, definition, key, row)


def document_from_row(blobs: Any, definition: dict[str, Any], key: str, row: Any) -> dict[str, Any]:
    chunks = json.loads(row[4] or "[]")
    src = Source(key, row[0], int(row[1]), row[2] or "", json.loads(row[3] or "{}"), float(row[5]),
                 lambda: read_body(blobs, chunks))
    try:
        fields, problems = extract(definition, src)
    except Exception as e:  # noqa: BLE001 - an unreadable body is a diagnostic, never a failed build
        fields, problems = {}, [{"field": "", "code": "index.body_unreadable", "message": str(e)[:200]}]
    return {"version": row[0], "fields": fields, "problems": problems}


def scan_documents(conn: Connection, blobs: Any, definition: dict[str, Any], bucket: str,
                   ) -> dict[str, dict[str, Any]]:
    """Every document the selector takes from the current records (full builds and the drill)."""
    prefix = definition["selector"]["prefix"]
    rows = conn.execute("SELECT key, version_id, size, content_type, metadata, chunks, created FROM versions "
                        "WHERE bucket = ? AND is_latest = 1 AND delete_marker = 0 ORDER BY key",
                        (bucket,)).fetchall()
    out = {}
    for r in rows:
        key = r[0]
        if not key.startswith(prefix) or not defs.selects(definition, key, r[3] or ""):
            continue
        out[key] = document_from_row(blobs, definition, key, (r[1], r[2], r[3], r[4], r[5], r[6], 0))
    return out


def selected_versions(conn: Connection, definition: dict[str, Any], bucket: str) -> dict[str, str]:
    """key -> version id of every live object the selector takes (no body is read)."""
    prefix = definition["selector"]["prefix"]
    rows = conn.execute("SELECT key, version_id, content_type FROM versions "
                        "WHERE bucket = ? AND is_latest = 1 AND delete_marker = 0", (bucket,)).fetchall()
    return {r[0]: r[1] for r in rows if r[0].startswith(prefix) and defs.selects(definition, r[0], r[2] or "")}


def _glob_regex(patterns: list[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns))


def read_filter(principal: Principal, bucket: str) -> Callable[[str], bool] | None:
    """Which keys of `bucket` the principal may read by its scopes (None: all of them)."""
    access = bucket_access(bucket)
    if access is not None and access.public:
        return None
    wanted = f"object:read|bucket:{bucket}/*"
    if any(covers(s, wanted) for s in principal.scopes):
        return None
    patterns = []
    for s in principal.scopes:
        action, _, resource = s.partition("|")
        if fnmatchcase("object:read", action) and resource.startswith("bucket:"):
            patterns.append(resource)
    if not patterns:
        return lambda key: False
    rx = _glob_regex(patterns)
    return lambda key: rx.match(f"bucket:{bucket}/{key}") is not None


class IndexService:
    def __init__(self, storage: Storage):
        self.storage = storage
        self.catalog = storage.catalog
        self.blobs = storage.blobs
        self.root = storage.layout.root
        self.catalog.migrate("indexes", MIGRATIONS)
        self._engines: dict[tuple[str, str], Engine] = {}
        self._building: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._active = True  # some index is enabled (as of the builder's last pass): wake it on commits
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------ definitions (source)

    def _row(self, conn: Connection, bucket: str, name: str) -> dict[str, Any] | None:
        rows = [d for d in read_definitions(conn, bucket=bucket) if d["name"] == name]
        return rows[0] if rows else None

    def _bucket_tenant(self, conn: Connection, bucket: str) -> str:
        row = conn.execute("SELECT tenant FROM buckets WHERE name = ?", (bucket,)).fetchone()
        if row is None:
            raise AnvilError("NotFound", "bucket not found")
        return row[0]

    def _emit(self, txn: Txn, tenant: str, kind: str, d: dict[str, Any]) -> None:
        txn.emit(tenant, kind, f"{d['bucket']}/{d['name']}",
                 {"bucket": d["bucket"], "name": d["name"], "version": d["version"], "state": d["state"],
                  "definition": d["definition"]})

    @staticmethod
    def _check_disclosure(principal: Principal, bucket: str, definition: dict[str, Any]) -> None:
        """An `index_only` or `public` index answers with keys, fields and body snippets without asking,
        object by object, whether the searcher may read them: defining one discloses every object its
        selector takes, so it needs `object:read` on all of them (scopes, and the bucket's binding if it
        has one). Before, `index:write` alone sufficed: a principal that could not read one object
        defined a public full-text index over the bodies and read them anonymously."""
        if definition["authorization"] == "inherit_object" or principal.admin:
            return
        access = bucket_access(bucket)
        if access is not None and access.public:
            return  # every object is readable by anyone already
        prefix = definition["selector"]["prefix"]
        wanted = f"object:read|bucket:{bucket}/{'' if any(c in prefix for c in '*?[') else prefix}*"
        if (not any(covers(s, wanted) for s in principal.scopes)
                or object_filter(principal, "object:read", bucket) is not None):
            raise AnvilError("PermissionDenied", f"an {definition['authorization']} index shows the objects it "
                                                 "selects to its searchers: defining one needs object:read on "
                                                 "every one of them")

    def create(self, ctx: RequestContext, bucket: str, body: Any) -> dict[str, Any]:
        authorize(ctx.principal, "index:write", f"bucket:{bucket}")
        definition = defs.normalise(body)
        self._check_disclosure(ctx.principal, bucket, definition)
        name = definition["name"]

        def fn(txn: Txn) -> dict[str, Any]:
            tenant = self._bucket_tenant(txn.conn, bucket)
            if self._row(txn.conn, bucket, name) is not None:
                raise AnvilError("AlreadyExists", f"index {name} already exists")
            n = txn.conn.execute("SELECT count(*) FROM index_definitions WHERE bucket = ?", (bucket,)).fetchone()[0]
            if n >= MAX_INDEXES_PER_BUCKET:
                raise AnvilError("InvalidArgument", f"a bucket has at most {MAX_INDEXES_PER_BUCKET} indexes")
            txn.conn.execute("INSERT INTO index_definitions(bucket, name, tenant, version, state, definition, "
                             "created, updated) VALUES (?,?,?,?,?,?,?,?)",
                             (bucket, name, tenant, 1, "enabled", json.dumps(definition, sort_keys=True),
                              txn.now, txn.now))
            d = {"bucket": bucket, "name": name, "tenant": tenant, "version": 1, "state": "enabled",
                 "definition": definition, "created": txn.now, "updated": txn.now}
            cursor = txn.next_seq
            self._emit(txn, tenant, "index.create", d)
            return {**d, "cursor": cursor}

        out = self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        self._wake.set()
        return out

    def _change(self, ctx: RequestContext, bucket: str, name: str, kind: str,
                change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        authorize(ctx.principal, "index:write", f"bucket:{bucket}")
        defs.check_name(name)

        def fn(txn: Txn) -> dict[str, Any]:
            d = self._row(txn.conn, bucket, name)
            if d is None:
                raise AnvilError("NotFound", "index not found")
            new = change(d)
            if kind == "index.drop":
                txn.conn.execute("DELETE FROM index_definitions WHERE bucket = ? AND name = ?", (bucket, name))
            else:
                new["version"] = d["version"] + 1
                new["updated"] = txn.now
                txn.conn.execute("UPDATE index_definitions SET version = ?, state = ?, definition = ?, updated = ? "
                                 "WHERE bucket = ? AND name = ?",
                                 (new["version"], new["state"], json.dumps(new["definition"], sort_keys=True),
                                  txn.now, bucket, name))
            cursor = txn.next_seq
            self._emit(txn, d["tenant"], kind, new)
            return {**new, "cursor": cursor}

        out = self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        self._wake.set()
        return out

    def update(self, ctx: RequestContext, bucket: str, name: str, body: Any) -> dict[str, Any]:
        definition = defs.normalise(body, name=name)
        authorize(ctx.principal, "index:write", f"bucket:{bucket}")
        self._check_disclosure(ctx.principal, bucket, definition)
        return self._change(ctx, bucket, name, "index.update", lambda d: {**d, "definition": definition})

    def disable(self, ctx: RequestContext, bucket: str, name: str) -> dict[str, Any]:
        def change(d: dict[str, Any]) -> dict[str, Any]:
            if d["state"] == "disabled":
                raise AnvilError("PreconditionFailed", f"index {name} is already disabled")
            return {**d, "state": "disabled"}
        return self._change(ctx, bucket, name, "index.disable", change)

    def enable(self, ctx: RequestContext, bucket: str, name: str) -> dict[str, Any]:
        def change(d: dict[str, Any]) -> dict[str, Any]:
            if d["state"] == "enabled":
                raise AnvilError("PreconditionFailed", f"index {name} is already enabled")
            return {**d, "state": "enabled"}
        return self._change(ctx, bucket, name, "index.enable", change)

    def drop(self, ctx: RequestContext, bucket: str, name: str) -> dict[str, Any]:
        return self._change(ctx, bucket, name, "index.drop", lambda d: {**d, "state": "dropped"})

    def bucket_deleting(self, txn: Txn, bucket: str, tenant: str) -> None:
        """Definitions are bucket configuration (like lifecycle rules): they go with their bucket, each
        with its `index.drop` event in the bucket delete's transaction. The builder drops the derived
        files when it next sees the definitions gone."""
        for d in read_definitions(txn.conn, bucket=bucket):
            txn.conn.execute("DELETE FROM index_definitions WHERE bucket = ? AND name = ?", (bucket, d["name"]))
            self._emit(txn, d["tenant"], "index.drop", {**d, "state": "dropped"})
        self._wake.set()

    def _visible(self, principal: Principal, bucket: str, name: str) -> dict[str, Any]:
        d = self._row(self.catalog.reader(), bucket, name)
        if d is None:
            raise AnvilError("NotFound", "index not found")
        return d

    def get(self, principal: Principal, bucket: str, name: str) -> dict[str, Any]:
        authorize(principal, "index:read", f"bucket:{bucket}")
        defs.check_name(name)
        d = self._visible(principal, bucket, name)
        return {**d, "status": self.status_of(d)}

    def list(self, principal: Principal, bucket: str) -> list[dict[str, Any]]:
        authorize(principal, "index:read", f"bucket:{bucket}")
        return [{**d, "status": self.status_of(d)} for d in read_definitions(self.catalog.reader(), bucket=bucket)]

    def status_of(self, d: dict[str, Any]) -> dict[str, Any]:
        conn = self.catalog.reader()
        head = journal.head(conn)[0]
        eng = self._engines.get((d["bucket"], d["name"]))
        if d["state"] != "enabled":
            return {"state": d["state"], "head": head}
        if eng is None or eng.version != d["version"]:
            return {"state": "building", "head": head, "cursor": None, "lag_events": None,
                    "error": self.errors.get((d["bucket"], d["name"]))}
        st = eng.status()
        lag = max(0, head - st["cursor"])
        lag_s = 0.0
        if lag:
            nxt = journal.read(conn, st["cursor"], 1)
            lag_s = max(0.0, time.time() - nxt[0].ts) if nxt else 0.0
        with eng.lock:
            diags = [{"key": k, **p} for k, ps in sorted(eng.diagnostics.items())[:50] for p in ps]
        return {"state": "ready" if lag == 0 else "catching-up", "head": head, **st, "lag_events": lag,
                "lag_seconds": round(lag_s, 3), "definition_version": eng.version, "diagnostics": diags,
                "error": self.errors.get((d["bucket"], d["name"]))}

    # ------------------------------------------------------------------ the builder (derived)

    def start(self) -> None:
        # Registered so that a participant rebuild in this process goes through the running builder
        # instead of replacing files under it.
        LIVE[self.root.resolve()] = self
        if self._thread is None:
            self.catalog.add_commit_listener(self._committed)
            self._thread = threading.Thread(target=self._run, name="anvil-indexes", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if LIVE.get(self.root.resolve()) is self:
            LIVE.pop(self.root.resolve(), None)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._lock:
            for e in self._engines.values():
                e.close()
            self._engines.clear()

    def _committed(self, head: int) -> None:
        # Writer thread, after every commit. With no enabled index there is nothing to apply: waking
        # the builder for each small PUT cost a thread switch, a definitions query and a stat (~0.15 ms
        # of CPU per commit, measured). New definitions are still found: the builder also runs every
        # half second, and this service's own changes wake it directly.
        if self._active:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                busy = self.step()
            except Exception as e:  # noqa: BLE001 - the builder must survive; the error shows in status
                self.errors[("", "")] = f"{type(e).__name__}: {e}"
                busy = False
            if busy:
                self._wake.set()

    def step(self) -> bool:
        """One pass over every index; True if some index has more to do."""
        conn = self.catalog.reader()
        wanted = {(d["bucket"], d["name"]): d for d in read_definitions(conn) if d["state"] == "enabled"}
        self._active = bool(wanted)
        with self._lock:
            for k in list(self._engines):
                if k not in wanted or self._engines[k].version != wanted[k]["version"]:
                    self._engines.pop(k).close()
        self._remove_stale_dirs(set(wanted))
        busy = False
        for k, d in wanted.items():
            try:
                busy |= self._step_one(conn, d)
                self.errors.pop(k, None)
            except Exception as e:  # noqa: BLE001 - one broken index must not stop the others
                self.errors[k] = f"{type(e).__name__}: {e}"
        return busy

    def _remove_stale_dirs(self, wanted: set[tuple[str, str]]) -> None:
        top = self.root / INDEX_DIR
        if not top.is_dir():
            return
        for bdir in top.iterdir():
            for ndir in (bdir.iterdir() if bdir.is_dir() else []):
                if (bdir.name, ndir.name) not in wanted:
                    shutil.rmtree(ndir, ignore_errors=True)

    def _engine(self, d: dict[str, Any]) -> Engine:
        k = (d["bucket"], d["name"])
        eng = self._engines.get(k)
        if eng is None:
            base = index_dir(self.root, *k)
            vdir = base / f"v{d['version']}"
            if base.is_dir():
                for old in base.iterdir():
                    if old.name != vdir.name:
                        shutil.rmtree(old, ignore_errors=True)
            eng = Engine(vdir, d["definition"], d["version"])
            if eng.cursor > journal.head(self.catalog.reader())[0]:
                # A generation ahead of this journal (files from elsewhere): rebuild from source.
                eng.close()
                shutil.rmtree(vdir, ignore_errors=True)
                eng = Engine(vdir, d["definition"], d["version"])
            with self._lock:
                self._engines[k] = eng
        return eng

    def _step_one(self, conn: Connection, d: dict[str, Any]) -> bool:
        eng = self._engine(d)
        definition, bucket = d["definition"], d["bucket"]
        if eng.generation == 0:
            # A full build: the head first, then the records (newer records are fine: the events
            # after the head re-read the same keys).
            head = journal.head(conn)[0]
            docs = scan_documents(conn, self.blobs, definition, bucket)
            eng.apply(dict(docs), head)
            return False
        batch = journal.read(conn, eng.cursor, definition["build"]["batch"])
        if not batch:
            return False
        touched: list[str] = []
        prefix = definition["selector"]["prefix"]
        for ev in batch:
            p = ev.payload
            if ev.kind in ("object.put", "object.delete") and p.get("bucket") == bucket:
                key = p.get("key")
                if isinstance(key, str) and key.startswith(prefix) and not key.startswith("_anvil/"):
                    touched.append(key)
            elif ev.kind == "bucket.delete" and p.get("bucket") == bucket:
                touched.extend(eng.by_key)
        last = batch[-1].seq
        if touched:
            changes = {key: current_document(conn, self.blobs, definition, bucket, key)
                       for key in dict.fromkeys(touched)}
            eng.apply(changes, last)
        else:
            eng.advance(last)
        return len(batch) >= definition["build"]["batch"]

    def rebuild(self, ctx: RequestContext, bucket: str, name: str) -> dict[str, Any]:
        """`anvil repair index`: throw the derived state away and build it again from source."""
        authorize(ctx.principal, "index:write", f"bucket:{bucket}")
        d = self._visible(ctx.principal, bucket, name)
        if d["state"] != "enabled":
            raise AnvilError("IndexDisabled", f"index {name} is disabled")
        return self._rebuild_one(bucket, name)

    def rebuild_all(self) -> list[dict[str, Any]]:
        """Rebuild every enabled index (the participant's rebuild while this service runs)."""
        return [self._rebuild_one(d["bucket"], d["name"]) for d in read_definitions(self.catalog.reader())
                if d["state"] == "enabled"]

    def _rebuild_one(self, bucket: str, name: str) -> dict[str, Any]:
        k = (bucket, name)
        with self._lock:
            eng = self._engines.pop(k, None)
            if eng is not None:
                with eng.lock:
                    eng.close()
                    shutil.rmtree(eng.dir, ignore_errors=True)
            else:
                shutil.rmtree(index_dir(self.root, bucket, name), ignore_errors=True)
        self._wake.set()
        head = journal.head(self.catalog.reader())[0]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            eng = self._engines.get(k)
            if eng is not None and eng.generation > 0 and eng.wait_for(head, 1.0):
                return {"bucket": bucket, "name": name, "rebuilt": True, **eng.status()}
            time.sleep(0.05)
        raise AnvilError("IndexNotReady", f"index {name} did not finish rebuilding within 300 s")

    # ------------------------------------------------------------------ queries

    def _authorize_query(self, principal: Principal, bucket: str, d: dict[str, Any]) -> Callable[[str], bool] | None:
        mode = d["definition"]["authorization"]
        access = bucket_access(bucket)
        if access is None:
            raise AnvilError("NotFound", "bucket not found")
        if mode == "public":
            return None
        if principal.anonymous and not access.public:
            raise AnvilError("Unauthenticated", "authentication required")
        if not principal.admin and access.tenant != principal.tenant and not access.public:
            raise hidden_bucket()
        if mode == "index_only":
            authorize(principal, "index:read", f"bucket:{bucket}")
            return None
        scoped = read_filter(principal, bucket)
        # A bucket bound to relationships (docs/authz.md, "Object access"): hits only of objects the
        # subject may read, filtered before ranking like the scopes' filter.
        bound = object_filter(principal, "object:read", bucket)
        if bound is None:
            return scoped
        if scoped is None:
            return bound.allows
        return lambda key: scoped(key) and bound.allows(key)

    def query(self, principal: Principal, bucket: str, name: str, body: Any) -> dict[str, Any]:
        defs.check_name(name)
        if bucket_access(bucket) is None:
            raise AnvilError("NotFound", "bucket not found")
        d = self._row(self.catalog.reader(), bucket, name)
        if d is None:
            raise AnvilError("NotFound", "index not found")
        can_read = self._authorize_query(principal, bucket, d)
        if d["state"] != "enabled":
            raise AnvilError("IndexDisabled", f"index {name} is disabled: enable it to query")
        definition = d["definition"]
        q = parse_query(body, definition)
        eng = self._engines.get((bucket, name))
        wait = q["wait"]
        deadline = time.monotonic() + wait
        while (eng is None or eng.version != d["version"] or eng.generation == 0) and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.02)
            eng = self._engines.get((bucket, name))
        if eng is None or eng.version != d["version"] or eng.generation == 0:
            head = journal.head(self.catalog.reader())[0]
            raise AnvilError("IndexNotReady", f"index {name} is still building (head {head})")
        if q["min_cursor"] is not None and not eng.wait_for(q["min_cursor"], max(0.0, deadline - time.monotonic())):
            st = self.status_of(d)
            raise AnvilError("IndexNotReady", f"index {name} has reached cursor {st['cursor']}, not "
                                              f"{q['min_cursor']} (lag {st['lag_events']} events, "
                                              f"{st['lag_seconds']} s)")
        with eng.lock:
            return run_query(eng, definition, bucket, q, can_read)


def _token(offset: int, fingerprint: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset, "f": fingerprint}).encode()).decode().rstrip("=")


def parse_query(body: Any, definition: dict[str, Any]) -> dict[str, Any]:
    """Check a query against the definition; nothing runs before the whole query is valid."""
    if not isinstance(body, dict):
        raise AnvilError("InvalidArgument", "a query is a JSON object")
    unknown = sorted(set(body) - QUERY_KEYS)
    if unknown:
        raise AnvilError("InvalidArgument", f"unknown query member {unknown[0][:64]!r}")
    kind = definition["kind"]
    fields = definition["fields"]
    text = body.get("text")
    if text is not None:
        if not isinstance(text, str) or not text.strip():
            raise AnvilError("InvalidArgument", "text is a non-empty string")
        if len(text) > MAX_TEXT:
            raise AnvilError("InvalidArgument", f"text query over {MAX_TEXT} characters")
        if kind not in ("full-text", "hybrid"):
            raise AnvilError("InvalidArgument", f"a {kind} index takes no text query")
    text_fields = [n for n, f in fields.items() if f["type"] == "text"]
    chosen = body.get("fields")
    if chosen is not None and (not isinstance(chosen, list) or not all(c in text_fields for c in chosen) or not chosen):
        raise AnvilError("InvalidArgument", f"fields lists text fields of the index ({', '.join(text_fields)})")
    boosts = body.get("boosts") or {}
    if not isinstance(boosts, dict) or any(n not in text_fields or isinstance(b, bool)
                                           or not isinstance(b, (int, float)) or not 0 < b <= 100
                                           for n, b in boosts.items()):
        raise AnvilError("InvalidArgument", "boosts maps text fields to numbers in (0, 100]")
    fuzzy = body.get("fuzzy") or {}
    if not isinstance(fuzzy, dict) or any(n not in text_fields or isinstance(v, bool) or v not in (1, 2)
                                          for n, v in fuzzy.items()):
        raise AnvilError("InvalidArgument", "fuzzy maps text fields to an edit distance of 1 or 2")
    vector = body.get("vector")
    if vector is not None:
        if kind not in ("vector", "hybrid"):
            raise AnvilError("InvalidArgument", f"a {kind} index takes no vector query")
        dim = definition["vector"]["dimension"]
        if (not isinstance(vector, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                    for x in vector)):
            raise AnvilError("InvalidArgument", "vector is an array of numbers")
        if len(vector) != dim:
            raise AnvilError("InvalidArgument", f"wrong vector dimension: {len(vector)}, the index has {dim}")
        if not all(finite_float32(x) for x in vector):  # searched as float32: 1e39 is inf there
            raise AnvilError("InvalidArgument", "vector components must be finite numbers within float32 range")
    flt = body.get("filter")
    predicate = compile_filter(flt, definition) if flt is not None else None
    narrow = narrowing(flt, definition) if flt is not None else []
    if kind == "metadata" and text is None and vector is None:
        pass
    srt = sort_key(definition, body.get("sort"))
    limit = body.get("limit", 10)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise AnvilError("InvalidArgument", f"limit is an integer between 1 and {MAX_LIMIT}")
    fp = hashlib.sha256(json.dumps({k: v for k, v in body.items() if k not in ("page_token", "min_cursor",
                                                                               "wait_ms")},
                                   sort_keys=True).encode()).hexdigest()[:16]
    offset = 0
    tok = body.get("page_token")
    if tok is not None:
        try:
            # Strict: a tampered token nested deeply (RecursionError) or {"o": Infinity} (int() raised
            # OverflowError) was a 500.
            data = jsontext.loads(base64.urlsafe_b64decode(str(tok) + "=" * (-len(str(tok)) % 4)))
            offset = int(data["o"])
            ok = data["f"] == fp and offset >= 0
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise AnvilError("InvalidArgument", "page_token does not belong to this query")
    if offset + limit > MAX_WINDOW:
        raise AnvilError("InvalidArgument", f"paging stops at {MAX_WINDOW} hits; narrow the query")
    min_cursor = body.get("min_cursor")
    if min_cursor is not None and (isinstance(min_cursor, bool) or not isinstance(min_cursor, int) or min_cursor < 0):
        raise AnvilError("InvalidArgument", "min_cursor is a non-negative integer")
    wait_ms = body.get("wait_ms", DEFAULT_WAIT * 1000)
    if isinstance(wait_ms, bool) or not isinstance(wait_ms, (int, float)) or not 0 <= wait_ms <= MAX_WAIT * 1000:
        raise AnvilError("InvalidArgument", f"wait_ms is between 0 and {int(MAX_WAIT * 1000)}")
    ret = body.get("return_fields")
    non_vector = [n for n, f in fields.items() if f["type"] != "vector"]
    if ret is None:
        ret = non_vector
    elif not isinstance(ret, list) or not all(isinstance(r, str) and r in fields for r in ret):
        raise AnvilError("InvalidArgument", f"return_fields lists declared fields ({', '.join(fields)})")
    hybrid = body.get("hybrid") or {}
    if not isinstance(hybrid, dict) or set(hybrid) - {"text_weight", "vector_weight", "k"}:
        raise AnvilError("InvalidArgument", "hybrid is {text_weight, vector_weight, k}")
    for w in ("text_weight", "vector_weight"):
        v = hybrid.get(w, 1.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
            raise AnvilError("InvalidArgument", f"hybrid.{w} is a number between 0 and 100")
    rrf_k = hybrid.get("k", 60)
    if isinstance(rrf_k, bool) or not isinstance(rrf_k, int) or not 1 <= rrf_k <= 1000:
        raise AnvilError("InvalidArgument", "hybrid.k is an integer between 1 and 1000")
    ef = body.get("ef_search")
    if ef is not None and (isinstance(ef, bool) or not isinstance(ef, int) or not 1 <= ef <= 4096):
        raise AnvilError("InvalidArgument", "ef_search is an integer between 1 and 4096")
    highlight = body.get("highlight", True)
    if not isinstance(highlight, bool):
        raise AnvilError("InvalidArgument", "highlight is true or false")
    return {"text": text, "fields": chosen, "boosts": boosts, "fuzzy": fuzzy, "vector": vector,
            "predicate": predicate, "narrow": narrow, "sort": srt, "limit": limit, "offset": offset, "fingerprint": fp,
            "min_cursor": min_cursor, "wait": float(wait_ms) / 1000.0, "return": ret,
            "weights": (float(hybrid.get("text_weight", 1.0)), float(hybrid.get("vector_weight", 1.0))),
            "rrf_k": rrf_k, "ef_search": ef or (definition.get("vector") or {}).get("hnsw", {}).get("ef_search", 64),
            "highlight": highlight}


def run_query(eng: Engine, definition: dict[str, Any], bucket: str, q: dict[str, Any],
              can_read: Callable[[str], bool] | None) -> dict[str, Any]:
    """Evaluate a parsed query on an engine (called with the engine's lock held). Authorisation is a
    filter applied inside the search, so unreadable documents never reach counts, ranks or snippets."""
    pred = q["predicate"]
    if can_read is not None:
        inner = pred
        pred = (lambda doc: can_read(doc["key"]) and inner(doc)) if inner else (lambda doc: can_read(doc["key"]))
    allowed = eng.allowed(pred, q["narrow"])
    window = q["offset"] + q["limit"]
    components: dict[int, dict[str, Any]] = {}
    text_query = None
    if q["text"] is not None and q["vector"] is not None:
        depth = max(100, window)
        thits, _, text_query = eng.text_search(q["text"], boosts=q["boosts"], fuzzy=q["fuzzy"], fields=q["fields"],
                                               allowed=allowed, limit=depth, want_count=False)
        vhits = eng.knn(q["vector"], depth, allowed, max(q["ef_search"], depth))
        wt, wv = q["weights"]
        fused: dict[int, float] = {}
        for rank, (vid, score) in enumerate(thits, 1):
            fused[vid] = fused.get(vid, 0.0) + wt / (q["rrf_k"] + rank)
            components.setdefault(vid, {})["text"] = {"rank": rank, "score": score}
        for rank, (vid, score) in enumerate(vhits, 1):
            fused[vid] = fused.get(vid, 0.0) + wv / (q["rrf_k"] + rank)
            components.setdefault(vid, {})["vector"] = {"rank": rank, "score": score}
        ranked = sorted(fused.items(), key=lambda t: (-t[1], t[0]))
        count = len(ranked)
    elif q["text"] is not None:
        depth = MAX_SORT_MATCHES if q["sort"] else window
        ranked, count, text_query = eng.text_search(q["text"], boosts=q["boosts"], fuzzy=q["fuzzy"],
                                                    fields=q["fields"], allowed=allowed, limit=depth)
    elif q["vector"] is not None:
        ranked = eng.knn(q["vector"], window, allowed, q["ef_search"])
        count = len(ranked)
    else:
        vids = allowed if allowed is not None else list(eng.docs)
        ranked = [(v, 1.0) for v in vids]
        count = len(ranked)
        if not q["sort"]:
            ranked.sort(key=lambda t: eng.meta[t[0]][0])
    if q["sort"]:
        name, desc = q["sort"]
        have = [t for t in ranked if name in eng.docs[t[0]]]
        missing = [t for t in ranked if name not in eng.docs[t[0]]]
        have.sort(key=lambda t: (eng.docs[t[0]][name], eng.meta[t[0]][0]), reverse=desc)
        ranked = have + missing
    page = ranked[q["offset"]:window]
    snippets = eng.snippets(text_query, [v for v, _ in page]) if text_query is not None and q["highlight"] else {}
    hits = []
    for vid, score in page:
        key, version = eng.meta[vid]
        doc = eng.docs[vid]
        fields = {n: doc[n] for n in q["return"] if n in doc}
        if eng.vector_field in q["return"] and vid in eng.vectors:
            fields[eng.vector_field] = eng.vectors[vid].tolist()
        hit: dict[str, Any] = {"bucket": bucket, "key": key, "version": version, "score": score, "fields": fields}
        if vid in components:
            hit["components"] = components[vid]
        if snippets.get(vid):
            hit["snippets"] = snippets[vid]
        hits.append(hit)
    out: dict[str, Any] = {"hits": hits, "count": count, "cursor": eng.cursor, "generation": eng.generation}
    if window < len(ranked) or (q["text"] is not None and q["vector"] is None and window < count):
        out["next_page_token"] = _token(window, q["fingerprint"])
    return out
