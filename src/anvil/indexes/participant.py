"""The indexes' recovery participant.

Definitions are source records (the `index_definitions` table, restored with the catalog);
generations are derived: `rebuild` recomputes them from the restored objects, `validate`
checks every published generation's files against its manifest and, for a generation at the
journal head, that it covers exactly the objects its selector takes. Segment files are not
copied by backup: a restored server rebuilds every index from source. The summary records
the definitions, what the source says each index must hold (documents and a digest), and
each generation's manifest figures.

`smoke` proves each rebuilt index through the public API of the restored server: its hits
cover exactly the restored objects its selector matches, and probe queries (a filter, a term,
a nearest-neighbour search) answer the same as an exhaustive evaluation over those objects.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from typing import Any

from anvil.indexes.definitions import definition_hash
from anvil.indexes.tables import INDEX_DIR, MIGRATIONS, TABLES, index_dir, read_definitions
from anvil.storage import journal
from anvil.storage.records import Connection, table_exists
from anvil.storage.recovery import Finding, Participant, RecoveryContext

PROBE_WAIT_MS = 10_000


def _definitions(conn: Connection) -> list[dict[str, Any]]:
    return read_definitions(conn) if table_exists(conn, "index_definitions") else []


def _content_digest(docs: dict[str, dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for key in sorted(docs):
        d = docs[key]
        h.update(json.dumps([key, d["version"], d["fields"]], sort_keys=True, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


# The engine (tantivy, ~9 ms to import; the service ~10 ms more) is imported where a definition needs
# it: `anvil fsck` of a store without indexes loads neither.


def _stored_keys(directory: Any, d: dict[str, Any]) -> dict[str, str] | None:
    """key -> version of the documents a published generation holds (None if it cannot be opened)."""
    import tantivy

    from anvil.indexes.engine import _analyzer

    try:
        idx = tantivy.Index.open(str(directory / "tantivy"))
        idx.register_tokenizer("anvil", _analyzer((d["definition"].get("full_text") or {}).get("analyzer", "simple")))
        s = idx.searcher()
        out = {}
        if s.num_docs:
            for _score, addr in s.search(tantivy.Query.all_query(), s.num_docs).hits:
                stored = json.loads(bytes(s.doc(addr)["_doc"][0]))
                out[stored["key"]] = stored["version"]
        return out
    except Exception:  # noqa: BLE001 - an unreadable generation is reported by the caller
        return None


class IndexesParticipant(Participant):
    name = "indexes"
    kind = "derived"
    covers = ["metadata-indexes", "fulltext", "vector"]
    owns = [f"{INDEX_DIR}/ (generations: tantivy segments, the HNSW graph, MANIFEST.json)",
            "catalog.db: index_definitions (source)"]
    tables = TABLES
    # The definitions are source rows inside this derived participant: replay rebuilds them from
    # their events (the generations are then rebuilt from the replayed objects, as after a restore).
    replays = ("index.",)

    def migrations(self) -> dict[str, list[str]]:
        return {"indexes": MIGRATIONS}

    def apply(self, ctx: RecoveryContext, event: Any) -> None:
        """`index.create|update|disable|enable|drop`: each payload carries the whole definition
        row after the change (bucket, name, version, state, definition); the clock is the event's."""
        p = event.payload
        key = (p["bucket"], p["name"])
        if event.kind == "index.drop":
            ctx.conn.execute("DELETE FROM index_definitions WHERE bucket = ? AND name = ?", key)
            return
        definition = json.dumps(p["definition"], sort_keys=True)
        if event.kind == "index.create":
            ctx.conn.execute("INSERT INTO index_definitions(bucket, name, tenant, version, state, definition, "
                             "created, updated) VALUES (?,?,?,?,?,?,?,?)",
                             (*key, event.tenant, p["version"], p["state"], definition, event.ts, event.ts))
        else:
            ctx.conn.execute("UPDATE index_definitions SET version = ?, state = ?, definition = ?, updated = ? "
                             "WHERE bucket = ? AND name = ?", (p["version"], p["state"], definition, event.ts, *key))

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        defs = _definitions(ctx.conn)
        listed = [{"bucket": d["bucket"], "name": d["name"], "tenant": d["tenant"], "version": d["version"],
                   "state": d["state"], "definition_hash": definition_hash(d["definition"])} for d in defs]
        indexes: dict[str, Any] = {}
        if defs:
            from anvil.indexes.engine import read_manifest
            from anvil.indexes.service import scan_documents
        for d in defs:
            if d["state"] != "enabled":
                continue
            docs = scan_documents(ctx.conn, ctx.blobs, d["definition"], d["bucket"])
            m = read_manifest(index_dir(ctx.root, d["bucket"], d["name"]) / f"v{d['version']}")
            indexes[f"{d['bucket']}/{d['name']}"] = {
                "expected_documents": len(docs), "expected_digest": _content_digest(docs),
                "generation": None if not m or m.get("corrupt") else
                {"definition_version": m.get("definition_version"), "documents": m.get("documents")},
            }
        return {"definitions": listed, "count": len(listed),
                "digest": hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest(),
                "indexes": indexes}

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        findings: list[Finding] = []
        ctx.checked.update({"indexes.definition_missing", "indexes.generation_files", "indexes.cursor_ahead",
                            "indexes.coverage"})
        defs = _definitions(ctx.conn)
        current = {f"{d['bucket']}/{d['name']}": d for d in defs}
        if recorded:
            for r in recorded.get("definitions", []):
                k = f"{r['bucket']}/{r['name']}"
                d = current.get(k)
                if d is None:
                    findings.append(self.finding("error", f"index {k}", f"index definition {k} recorded in the "
                                                 "backup is missing", "indexes.definition_missing",
                                                 {"bucket": r["bucket"], "index": r["name"]}))
                elif (d["version"], definition_hash(d["definition"])) != (r["version"], r["definition_hash"]):
                    findings.append(self.finding("error", f"index {k}", f"index definition {k} differs from the "
                                                 f"recorded version {r['version']}", "indexes.definition_differs",
                                                 {"bucket": r["bucket"], "index": r["name"]}))
        head = journal.head(ctx.conn)[0]
        ready = 0
        if current:
            from anvil.indexes.engine import MANIFEST, check_files, read_manifest
            from anvil.indexes.service import selected_versions
        for k, d in current.items():
            if d["state"] != "enabled":
                continue
            vdir = index_dir(ctx.root, d["bucket"], d["name"]) / f"v{d['version']}"
            m = read_manifest(vdir)
            affected = {"bucket": d["bucket"], "index": d["name"], "tenant": d["tenant"]}
            if m is None:
                findings.append(self.finding("info", f"index {k}", f"index {k} has no generation yet: it is "
                                             "built from source when the server runs", affected=affected))
                continue
            if m.get("corrupt"):
                findings.append(self.finding("error", f"index {k}", f"index {k}: {MANIFEST} is unreadable",
                                             "indexes.generation_files", affected))
                continue
            problems = check_files(vdir, m)
            if problems:
                # A running builder may publish between our reads: look once more before reporting.
                time.sleep(0.2)
                m = read_manifest(vdir) or m
                problems = check_files(vdir, m)
            if problems:
                findings.append(self.finding("error", f"index {k}", f"index {k} generation {m.get('generation')}: "
                                             + "; ".join(problems[:5]), "indexes.generation_files",
                                             {**affected, "problems": problems[:20]}))
                continue
            if int(m.get("cursor", 0)) > head:
                findings.append(self.finding("error", f"index {k}", f"index {k} generation cursor {m['cursor']} is "
                                             f"beyond the journal head {head}", "indexes.cursor_ahead", affected))
                continue
            if int(m.get("cursor", 0)) == head and m.get("definition_hash") == definition_hash(d["definition"]):
                stored = _stored_keys(vdir, d)
                want = selected_versions(ctx.conn, d["definition"], d["bucket"])
                if stored is None or stored != want:
                    extra = sorted(set(stored or {}) - set(want))[:5]
                    missing = sorted(set(want) - set(stored or {}))[:5]
                    findings.append(self.finding("error", f"index {k}", f"index {k} does not cover exactly the "
                                                 f"objects its selector matches (missing {missing}, extra {extra})",
                                                 "indexes.coverage", affected))
                    continue
            ready += 1
        ctx.stats["indexes"] = {"definitions": len(defs), "generations_checked": ready}
        if not [f for f in findings if f.severity == "error"]:
            findings.append(self.finding("info", "indexes", f"{len(defs)} index definitions; {ready} generations "
                                         "match their manifests"))
        return findings

    def rebuild(self, ctx: RecoveryContext) -> list[Finding]:
        """Rebuild every enabled index's generation from the records and bodies in `ctx`."""
        from anvil.indexes.engine import Engine
        from anvil.indexes.service import LIVE, scan_documents

        live = LIVE.get(ctx.root.resolve())
        if live is not None:  # a running server's builder owns these files: rebuild through it
            done = live.rebuild_all()
            return [self.finding("info", "indexes", f"rebuilt {len(done)} index generations through the "
                                 "running builder")]
        head = journal.head(ctx.conn)[0]
        defs = _definitions(ctx.conn)
        wanted = set()
        for d in defs:
            if d["state"] != "enabled":
                continue
            base = index_dir(ctx.root, d["bucket"], d["name"])
            wanted.add(base)
            shutil.rmtree(base, ignore_errors=True)
            eng = Engine(base / f"v{d['version']}", d["definition"], d["version"])
            try:
                eng.apply(dict(scan_documents(ctx.conn, ctx.blobs, d["definition"], d["bucket"])), head)
            finally:
                eng.close()
        top = ctx.root / INDEX_DIR
        if top.is_dir():
            for b in top.iterdir():
                for n in (b.iterdir() if b.is_dir() else []):
                    if n not in wanted:
                        shutil.rmtree(n, ignore_errors=True)
        return [self.finding("info", "indexes", f"rebuilt {len(wanted)} index generations at cursor {head}")]

    # ------------------------------------------------------------------ the drill's proof

    def smoke(self, client: Any, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        findings: list[Finding] = []
        head = journal.head(ctx.conn)[0]
        proved = 0
        for d in _definitions(ctx.conn):
            if d["state"] != "enabled":
                continue
            k = f"{d['bucket']}/{d['name']}"
            try:
                problems = self._prove(client, ctx, d, head)
            except Exception as e:  # noqa: BLE001 - a failed proof is a finding
                problems = [f"{type(e).__name__}: {e}"]
            for p in problems:
                findings.append(self.finding("error", f"index {k}", f"index {k}: {p}", "indexes.smoke",
                                             {"bucket": d["bucket"], "index": d["name"]}))
            proved += not problems
        if not findings:
            findings.append(self.finding("info", "indexes", f"{proved} rebuilt indexes cover exactly their restored "
                                         "objects and answer the probe queries like an exhaustive evaluation"))
        return findings

    def _search_all(self, client: Any, bucket: str, name: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        hits: list[dict[str, Any]] = []
        body = {**body, "limit": 1000}
        while True:
            res = client.search(bucket, name, **body)
            hits.extend(res["hits"])
            tok = res.get("next_page_token")
            if not tok:
                return hits
            body = {**body, "page_token": tok}
            body.pop("min_cursor", None)

    def _prove(self, client: Any, ctx: RecoveryContext, d: dict[str, Any], head: int) -> list[str]:
        from anvil.indexes.engine import _analyzer, np
        from anvil.indexes.filters import compile_filter
        from anvil.indexes.service import scan_documents

        definition, bucket, name = d["definition"], d["bucket"], d["name"]
        expected = scan_documents(ctx.conn, ctx.blobs, definition, bucket)
        problems: list[str] = []
        # Coverage: every restored object the selector takes, at its restored version, and nothing else.
        base = {"min_cursor": head, "wait_ms": PROBE_WAIT_MS}
        # A query with neither text nor vector returns every document (filtered, key order).
        all_hits = self._search_all(client, bucket, name, base)
        got = {h["key"]: h["version"] for h in all_hits}
        want = {key: doc["version"] for key, doc in expected.items()}
        if got != want:
            problems.append(f"covers {len(got)} objects, the restored selector matches {len(want)} "
                            f"(missing {sorted(set(want) - set(got))[:3]}, extra {sorted(set(got) - set(want))[:3]})")
            return problems
        if not expected:
            return problems
        docs = {key: {**doc["fields"], "key": key} for key, doc in expected.items()}
        sample_key = sorted(docs)[len(docs) // 2]
        sample = docs[sample_key]
        # A filter probe: equality on a scalar field of a sample document, against a scan.
        for fname, f in definition["fields"].items():
            if f["type"] in ("keyword", "integer", "bool", "date", "float") and fname in sample:
                flt = {"field": fname, "op": "eq", "value": sample[fname]}
                pred = compile_filter(flt, definition)
                want_keys = {key for key, doc in docs.items() if pred(doc)}
                body = {**base, "filter": flt}
                got_keys = {h["key"] for h in self._search_all(client, bucket, name, body)}
                if got_keys != want_keys:
                    problems.append(f"filter {fname} = {sample[fname]!r}: {len(got_keys)} hits, a scan finds "
                                    f"{len(want_keys)}")
                break
        # A term probe: every document whose analysed text holds the term, against a scan.
        texts = [n for n, f in definition["fields"].items() if f["type"] == "text"]
        if texts and definition["kind"] == "full-text":
            analyzer = _analyzer((definition.get("full_text") or {}).get("analyzer", "simple"))
            field = next((n for n in texts if sample.get(n)), None)
            tokens = analyzer.analyze(sample[field]) if field else []
            words = [w for w in sample[field].split() if w.isalpha() and len(w) > 3] if field else []
            if tokens and words:
                word = words[0].lower()
                term = analyzer.analyze(word)[0]
                want_keys = {key for key, doc in docs.items()
                             if isinstance(doc.get(field), str) and term in analyzer.analyze(doc[field])}
                got_keys = {h["key"] for h in self._search_all(client, bucket, name,
                                                               {**base, "text": word, "fields": [field]})}
                if got_keys != want_keys:
                    problems.append(f"term {word!r} in {field}: {len(got_keys)} hits, a scan finds {len(want_keys)}")
        # A nearest-neighbour probe against brute force over the restored vectors.
        vec = definition.get("vector")
        if vec and definition["kind"] == "vector":
            vecs = {key: doc["fields"][vec["field"]] for key, doc in expected.items() if vec["field"] in doc["fields"]}
            if vecs:
                q = vecs[sample_key] if sample_key in vecs else next(iter(vecs.values()))
                keys = sorted(vecs)
                mat = np.asarray([vecs[key] for key in keys], dtype="float32")
                qa = np.asarray(q, dtype="float32")
                if vec["metric"] == "cosine":
                    mat = mat / np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)
                    qa = qa / max(float(np.linalg.norm(qa)), 1e-12)
                scores = -((mat - qa) ** 2).sum(axis=1) if vec["metric"] == "l2" else mat @ qa
                k = min(10, len(keys))
                truth = {keys[i] for i in np.argsort(-scores, kind="stable")[:k]}
                res = client.search(bucket, name, vector=q, limit=k, min_cursor=head, wait_ms=PROBE_WAIT_MS)
                recall = len(truth & {h["key"] for h in res["hits"]}) / k
                if recall < 0.9:
                    problems.append(f"kNN recall@{k} {recall:.2f} against brute force (< 0.9)")
        return problems

