"""One index's derived state: a tantivy index (text, stored documents), an HNSW graph (faiss) and
the published generation's manifest.

Layout under `STORAGE_PATH/indexes/<bucket>/<name>/v<definition version>/`:

    tantivy/          the tantivy index: every document stores its fields as JSON and its vector
                      (normalised for cosine) as raw float32 bytes, read back without parsing
    hnsw-<n>.faiss    the HNSW graph (faiss.write_index of the IndexIDMap2), vector indexes only
    MANIFEST.json     the latest published generation: definition version and hash, the source
                      cursor reached, the document count, diagnostics, and every file's SHA-256

A batch is applied (delete by key, add), committed, merges are waited for (so the files stop
changing), and only then is the manifest naming the new cursor written (temp file, fsync,
rename). A crash between the two leaves a manifest with an older cursor: reopening replays
from it, and because every document is an upsert by key re-read from the current record,
replaying repeats work but can neither skip nor duplicate anything.

The HNSW graph lives in memory and is saved with a published generation (hashed in its manifest
like the tantivy files), so opening an index loads it instead of rebuilding it (about 37 s per
100k vectors of 384 dimensions). Writing the whole graph at every small publish would cost more
than it saves, so it is saved when it was (re)built, when the vectors added since the last save
reach `GRAPH_SAVE_FRACTION` of it, or after `GRAPH_SAVE_SECONDS`; the vectors added after the
saved graph are in tantivy's stored documents and are added to it when the index opens. A graph
file that is missing, differs from its manifest hash or cannot be read is rebuilt from the
stored vectors (logged, and counted in the status' `hnsw`). faiss HNSW has no delete, so
replaced documents are tombstones excluded by an ID selector until the graph is rebuilt; on
open they are the graph's ids that are no longer live.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import tantivy

from anvil.errors import AnvilError
from anvil.indexes.definitions import definition_hash
from anvil.indexes.lazy import LazyModule

# faiss and numpy cost ~35 MiB of resident memory when imported: only a store with a vector index
# pays for them (their first attribute access imports them).
faiss: Any = LazyModule("faiss")
np: Any = LazyModule("numpy")

MANIFEST = "MANIFEST.json"
# The generation layout; a generation of another format is rebuilt from source on open (format 1
# kept vectors inside the JSON document, which made opening 100k vectors take tens of seconds).
FORMAT = 2
GRAPH_PREFIX, GRAPH_SUFFIX = "hnsw-", ".faiss"  # hnsw-<generation that saved it>.faiss
GRAPH_SAVE_FRACTION = 0.05  # unsaved vectors (share of the graph) that make a publish save the graph
GRAPH_SAVE_MIN = 256  # ... but at least this many
GRAPH_SAVE_SECONDS = 60.0  # or any unsaved vector this long after the last save
log = logging.getLogger("anvil.indexes")
MAX_DIAGNOSTICS = 200
EXACT_FRACTION = 0.02  # filters allowing at most this share of documents use exact kNN
EXACT_MIN = 4096  # ... or at most this many documents
MAX_SORT_MATCHES = 10_000


def _analyzer(name: str) -> tantivy.TextAnalyzer:
    b = tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).filter(tantivy.Filter.remove_long(255))
    b = b.filter(tantivy.Filter.lowercase())
    if name != "simple":
        b = b.filter(tantivy.Filter.stemmer(name))
    return b.build()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tantivy_files(tdir: Path) -> list[Path]:
    """The files a generation is made of (tantivy's lock and bookkeeping files are not)."""
    if not tdir.is_dir():
        return []
    return sorted(p for p in tdir.iterdir() if p.is_file() and not p.name.startswith("."))


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"corrupt": True}


def check_files(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems of a generation's files against its manifest (empty: all present and equal).

    A manifest is written after tantivy commits (`Engine.apply` -> `publish`), and tantivy's commit
    and merges delete the segments they replace at once. So a process killed between a commit and the
    manifest's rename leaves the previous generation's manifest beside a newer commit, with segments
    it lists already gone: a state the engine opens on purpose (it replays from the manifest's cursor,
    every document an upsert), not damage, and it used to be reported as a missing-files error with
    operator action required (and so could an online fsck racing a commit). Such a newer commit is
    recognised by its `meta.json` differing from the manifest's; it is then checked for what can be
    checked -- every segment its `meta.json` names is there, and the segment files the manifest
    lists that remain are unchanged (tantivy never rewrites a segment file: its name holds the
    segment id, and the opstamp for deletes)."""
    problems = []
    files = manifest.get("files") or {}
    meta = directory / "tantivy" / "meta.json"
    superseded = ("tantivy/meta.json" in files and meta.is_file()
                  and sha256_file(meta) != files["tantivy/meta.json"])
    if superseded and manifest.get("tantivy_opstamp") is not None:
        # Newer means a later opstamp than the published one (a damaged meta.json is not a commit).
        superseded = (_opstamp(meta) or 0) > int(manifest["tantivy_opstamp"])
    if superseded:
        problems += _commit_problems(directory / "tantivy")
    for rel, digest in sorted(files.items()):
        p = directory / rel
        if superseded and rel.startswith("tantivy/") and (rel == "tantivy/meta.json" or not p.is_file()):
            continue  # replaced by the newer commit
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel} differs from its manifest hash")
    return problems


def _opstamp(meta: Path) -> int | None:
    """The opstamp of the tantivy commit `meta` (its meta.json) describes, None if unreadable."""
    try:
        return int(json.loads(meta.read_text())["opstamp"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _commit_problems(tdir: Path) -> list[str]:
    """Whether tantivy's latest commit in `tdir` is whole: its meta.json reads, and every segment it
    names has its files (the deletes file of its opstamp too)."""
    try:
        meta = json.loads((tdir / "meta.json").read_text())
        segments = [(s["segment_id"].replace("-", ""), (s.get("deletes") or {}).get("opstamp"))
                    for s in meta["segments"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"tantivy/meta.json (a commit newer than the manifest) is unreadable: {e}"]
    names = {p.name for p in tantivy_files(tdir)}
    stems = {n.split(".", 1)[0] for n in names}
    problems = []
    for sid, opstamp in segments:
        if sid not in stems:
            problems.append(f"tantivy segment {sid} of the latest commit is missing")
        elif opstamp is not None and f"{sid}.{opstamp}.del" not in names:
            problems.append(f"tantivy/{sid}.{opstamp}.del of the latest commit is missing")
    return problems


class Engine:
    def __init__(self, directory: Path, definition: dict[str, Any], version: int):
        self.dir = Path(directory)
        self.definition = definition
        self.version = version
        self.def_hash = definition_hash(definition)
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.docs: dict[int, dict[str, Any]] = {}  # vid -> fields (with "key")
        self.meta: dict[int, tuple[str, str]] = {}  # vid -> (key, version id)
        self.by_key: dict[str, int] = {}
        self.vectors: dict[int, np.ndarray] = {}
        self.diagnostics: dict[str, list[dict[str, str]]] = {}
        self.next_vid = 1
        self.cursor = 0
        self.generation = 0
        self.published_at = 0.0
        self._hash_cache: dict[tuple[str, int, int], str] = {}
        vec = definition.get("vector")
        self.vector_field = vec["field"] if vec else None
        self.metric = vec["metric"] if vec else None
        self.text_fields = [n for n, f in definition["fields"].items() if f["type"] == "text"]
        self._hnsw: Any = None
        self._hnsw_ids: set[int] = set()
        self._dead: set[int] = set()
        self._mat: tuple[np.ndarray, np.ndarray] | None = None
        # The saved graph: its file's digest, when it was written and how many vectors were added since.
        self._graph: tuple[str, str] | None = None  # (file, SHA-256)
        self._graph_saved_at = 0.0
        self._graph_unsaved = 0
        # How the graph was obtained on open ("loaded", "built", "rebuilt"), and why it was rebuilt.
        self.hnsw_info: dict[str, Any] = {"opened": None, "reason": None, "added_on_open": 0, "saves": 0}
        # field -> value -> documents, built on first use and kept current by apply.
        self._postings: dict[str, dict[Any, set[int]]] = {}
        self._open()

    # ------------------------------------------------------------------ opening

    def _schema(self) -> tantivy.Schema:
        sb = tantivy.SchemaBuilder()
        sb.add_integer_field("_vid", stored=True, indexed=True, fast=True)
        sb.add_text_field("_key", stored=True, tokenizer_name="raw")
        sb.add_bytes_field("_doc", stored=True)
        sb.add_bytes_field("_vec", stored=True)
        ft = self.definition.get("full_text") or {}
        option = "position" if ft.get("positions", True) else "freq"
        for name in self.text_fields:
            sb.add_text_field(name, stored=True, tokenizer_name="anvil", index_option=option)
        return sb.build()

    def _open(self) -> None:
        tdir = self.dir / "tantivy"
        manifest = read_manifest(self.dir)
        fresh = (manifest is None or manifest.get("corrupt") or manifest.get("definition_hash") != self.def_hash
                 or manifest.get("format", 1) != FORMAT)
        if fresh and self.dir.exists():
            shutil.rmtree(self.dir)  # no usable generation: rebuild from source
        tdir.mkdir(parents=True, exist_ok=True)
        self.schema = self._schema()
        self.index = tantivy.Index(self.schema, path=str(tdir))
        ft = self.definition.get("full_text") or {}
        self.index.register_tokenizer("anvil", _analyzer(ft.get("analyzer", "simple")))
        if not fresh and manifest is not None:
            self.cursor = int(manifest["cursor"])
            self.generation = int(manifest["generation"])
            self.published_at = float(manifest.get("published_at", 0))
            self.diagnostics = {d["key"]: d["problems"] for d in manifest.get("diagnostics", [])}
            self._load_documents()
        self._open_hnsw(None if fresh else manifest)

    def _open_hnsw(self, manifest: dict[str, Any] | None) -> None:
        """Load the generation's saved graph (verified against the manifest), or rebuild it."""
        if not self.vector_field:
            return
        if manifest is None or self.generation == 0:
            self._rebuild_hnsw()
            self.hnsw_info.update(opened="built")
            return
        problem = self._load_graph(manifest)
        if problem is None:
            self.hnsw_info.update(opened="loaded")
            return
        log.warning("index %s: HNSW graph %s; rebuilding it from %d stored vectors", self.dir, problem,
                    len(self.vectors))
        self._rebuild_hnsw()
        self.hnsw_info.update(opened="rebuilt", reason=problem)
        self.publish()  # save the repaired graph now, so the next open loads it

    def _load_graph(self, manifest: dict[str, Any]) -> str | None:
        """Problem with the saved graph (None: loaded, missing live vectors added, tombstones known)."""
        named = [(rel, d) for rel, d in (manifest.get("files") or {}).items() if rel.startswith(GRAPH_PREFIX)]
        if not named:
            return "not saved in this generation"
        rel, digest = named[0]
        path = self.dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        if sha256_file(path) != digest:
            return f"{rel} differs from its manifest hash"
        try:
            index = faiss.read_index(str(path))
            ids = faiss.vector_to_array(index.id_map)
        except (RuntimeError, AttributeError) as e:
            return f"{rel} is unreadable ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
        if index.d != self.definition["vector"]["dimension"] or len(ids) != index.ntotal:
            return f"{rel} does not match the definition"
        in_graph = set(ids.tolist())
        missing = [v for v in self.vectors if v not in in_graph]
        if missing:
            index.add_with_ids(np.stack([self.vectors[v] for v in missing]), np.asarray(missing, dtype="int64"))
        self._hnsw = index
        self._hnsw_ids = in_graph | set(missing)
        self._dead = in_graph - set(self.vectors)
        self._graph = (rel, digest)
        self._graph_saved_at = time.time()
        self._graph_unsaved = len(missing)
        self.hnsw_info["added_on_open"] = len(missing)
        return None

    def _load_documents(self) -> None:
        self.index.reload()
        s = self.index.searcher()
        if s.num_docs == 0:
            return
        for _score, addr in s.search(tantivy.Query.all_query(), s.num_docs).hits:
            d = s.doc(addr)
            raw = d.get_first("_vec")
            vec = np.frombuffer(raw, dtype="float32") if raw is not None else None
            self._remember(d["_vid"][0], json.loads(bytes(d["_doc"][0])), vec)

    def _remember(self, vid: int, stored: dict[str, Any], vec: np.ndarray | None) -> None:
        """`stored` holds no vector: it is `vec`, prepared (see _prepare)."""
        key = stored["key"]
        fields = dict(stored["fields"])
        fields["key"] = key
        self.docs[vid] = fields
        self.meta[vid] = (key, stored["version"])
        self.by_key[key] = vid
        if vec is not None:
            self.vectors[vid] = vec
        self.next_vid = max(self.next_vid, vid + 1)

    def _prepare(self, vec: list[float]) -> np.ndarray:
        a = np.asarray(vec, dtype="float32")
        if self.metric == "cosine":
            n = float(np.linalg.norm(a))
            if n > 0:
                a = a / n
        return a

    def _rebuild_hnsw(self) -> None:
        if not self.vector_field:
            return
        vec = self.definition["vector"]
        h = vec["hnsw"]
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        inner = faiss.IndexHNSWFlat(vec["dimension"], h["m"], metric)
        inner.hnsw.efConstruction = h["ef_construction"]
        index = faiss.IndexIDMap2(inner)
        if self.vectors:
            ids = np.fromiter(self.vectors.keys(), dtype="int64", count=len(self.vectors))
            index.add_with_ids(np.stack([self.vectors[i] for i in ids]), ids)
        self._hnsw = index
        self._hnsw_ids = set(self.vectors)
        self._dead = set()
        self._graph = None  # a new graph: the next publish saves it

    # ------------------------------------------------------------------ applying

    def apply(self, changes: dict[str, dict[str, Any] | None], cursor: int) -> None:
        """Upsert (`{version, fields, problems}`) or remove (None) each key, then publish a generation
        at `cursor`. Keys are processed in one tantivy commit.

        The tantivy work (add, delete, commit, merges) runs without the engine's lock: queries keep
        using the previous searcher and in-memory maps until the swap at the end, which is short."""
        if changes:
            staged: list[tuple[str, int | None, dict[str, Any] | None, np.ndarray | None, list[dict[str, str]]]] = []
            writer = self.index.writer(heap_size=50_000_000, num_threads=1)
            try:
                for key, doc in changes.items():
                    writer.delete_documents_by_term("_key", key)
                    if doc is None:
                        staged.append((key, None, None, None, []))
                        continue
                    vid = self.next_vid
                    self.next_vid += 1
                    fields = dict(doc["fields"])
                    raw_vec = fields.pop(self.vector_field, None) if self.vector_field else None
                    vec = self._prepare(raw_vec) if raw_vec is not None else None
                    stored = {"key": key, "version": doc["version"], "fields": fields}
                    extra = {"_vec": vec.tobytes()} if vec is not None else {}
                    tdoc = tantivy.Document(_vid=vid, _key=key,
                                            _doc=json.dumps(stored, separators=(",", ":")).encode(), **extra)
                    for name in self.text_fields:
                        if name in fields:
                            tdoc.add_text(name, fields[name])
                    writer.add_document(tdoc)
                    staged.append((key, vid, stored, vec, doc["problems"]))
                writer.commit()
                writer.wait_merging_threads()
            except BaseException:
                with self.lock:
                    # Memory may disagree with the index now: reload both from the last generation.
                    self._reset()
                raise
            with self.lock:
                self.index.reload()
                new_vectors: list[int] = []
                for key, vid, stored, vec, problems in staged:
                    old = self.by_key.pop(key, None)
                    if old is not None:
                        prev = self.docs.get(old, {})
                        for field, post in self._postings.items():
                            if field in prev:
                                post.get(prev[field], set()).discard(old)
                        self.docs.pop(old, None)
                        self.meta.pop(old, None)
                        if self.vectors.pop(old, None) is not None:
                            self._dead.add(old)
                    self.diagnostics.pop(key, None)
                    if vid is None or stored is None:
                        continue
                    if problems:
                        self.diagnostics[key] = problems
                    self._remember(vid, stored, vec)
                    for field, post in self._postings.items():
                        if field in self.docs[vid]:
                            post.setdefault(self.docs[vid][field], set()).add(vid)
                    if vid in self.vectors:
                        new_vectors.append(vid)
                self._mat = None
                if self._hnsw is not None:
                    if len(self._dead) > max(1000, len(self.vectors) // 4):
                        self._rebuild_hnsw()
                    elif new_vectors:
                        ids = np.asarray(new_vectors, dtype="int64")
                        self._hnsw.add_with_ids(np.stack([self.vectors[v] for v in new_vectors]), ids)
                        self._hnsw_ids.update(new_vectors)
                        self._graph_unsaved += len(new_vectors)
        with self.lock:
            self.cursor = max(self.cursor, cursor)
            self.publish()
            self.changed.notify_all()

    def _reset(self) -> None:
        self._postings.clear()
        self.docs.clear()
        self.meta.clear()
        self.by_key.clear()
        self.vectors.clear()
        self.diagnostics.clear()
        self.cursor = 0
        self._open()

    def advance(self, cursor: int, *, publish: bool = False) -> None:
        """No change for this index up to `cursor`: move the cursor (publishing now and then)."""
        with self.lock:
            if cursor > self.cursor:
                self.cursor = cursor
                interval = self.definition["build"]["publish_interval"]
                if publish or time.time() - self.published_at >= max(interval, 1.0):
                    self.publish()
                self.changed.notify_all()

    def publish(self) -> None:
        """Write the manifest of the current (committed, merged) state as the next generation."""
        files = {}
        for p in tantivy_files(self.dir / "tantivy"):
            st = p.stat()
            ck = (p.name, st.st_size, st.st_mtime_ns)
            digest = self._hash_cache.get(ck)
            if digest is None or p.name == "meta.json":
                digest = sha256_file(p)
                self._hash_cache[ck] = digest
            files[f"tantivy/{p.name}"] = digest
        graph = self._save_graph(self.generation + 1)
        if graph is not None:
            files[graph[0]] = graph[1]
        self.generation += 1
        self.published_at = time.time()
        manifest = {
            "format": FORMAT, "generation": self.generation, "definition_version": self.version,
            "definition_hash": self.def_hash, "cursor": self.cursor, "documents": len(self.docs),
            "vectors": len(self.vectors), "published_at": self.published_at, "files": files,
            "tantivy_opstamp": _opstamp(self.dir / "tantivy" / "meta.json"),  # check_files: what is newer
            "diagnostics": [{"key": k, "problems": v} for k, v in sorted(self.diagnostics.items())][:MAX_DIAGNOSTICS],
            "diagnostic_count": len(self.diagnostics),
        }
        tmp = self.dir / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / MANIFEST)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for p in self.dir.glob(f"{GRAPH_PREFIX}*"):
            if graph is None or p.name != graph[0]:
                p.unlink(missing_ok=True)  # graphs of older generations (and a crashed save's temp file)
        live = {(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in tantivy_files(self.dir / "tantivy")}
        self._hash_cache = {k: v for k, v in self._hash_cache.items() if k in live}

    def _save_graph(self, generation: int) -> tuple[str, str] | None:
        """The graph file (and digest) generation `generation` names, writing the graph first when due."""
        if self._hnsw is None:
            return None
        due = (self._graph is None
               or self._graph_unsaved >= max(GRAPH_SAVE_MIN, GRAPH_SAVE_FRACTION * len(self._hnsw_ids))
               or (self._graph_unsaved and time.time() - self._graph_saved_at >= GRAPH_SAVE_SECONDS))
        if not due:
            return self._graph
        # A new file per saving generation: the previous manifest's graph stays whole until the new
        # manifest replaces it, so a crash anywhere in between still opens with a valid graph.
        name = f"{GRAPH_PREFIX}{generation}{GRAPH_SUFFIX}"
        tmp = self.dir / (name + ".tmp")
        faiss.write_index(self._hnsw, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, self.dir / name)
        self._graph = (name, digest)
        self._graph_saved_at = time.time()
        self._graph_unsaved = 0
        self.hnsw_info["saves"] += 1
        return self._graph

    def wait_for(self, cursor: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.cursor < cursor:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
            return True

    # ------------------------------------------------------------------ querying

    def allowed(self, predicate: Any, narrow: list[tuple[str, set[Any]]] | None = None) -> list[int] | None:
        """The documents `predicate` accepts (None: no restriction). `narrow`'s equality constraints
        pick candidates from value postings first, so a selective filter never scans every document."""
        if predicate is None:
            return None
        candidates: Any = self.docs.keys()
        for field, values in narrow or []:
            post = self._postings_for(field)
            got: set[int] = set()
            for v in values:
                got |= post.get(v, set())
            candidates = got if candidates is self.docs.keys() else candidates & got
        return [vid for vid in candidates if predicate(self.docs[vid])]

    def _postings_for(self, field: str) -> dict[Any, set[int]]:
        post = self._postings.get(field)
        if post is None:
            post = {}
            for vid, d in self.docs.items():
                if field in d:
                    post.setdefault(d[field], set()).add(vid)
            self._postings[field] = post
        return post

    def text_search(self, text: str, *, boosts: dict[str, float], fuzzy: dict[str, int], fields: list[str] | None,
                    allowed: list[int] | None, limit: int, want_count: bool = True) -> tuple[list[tuple[int, float]],
                                                                                              int, Any]:
        names = fields or self.text_fields
        field_boosts = {n: self.definition["fields"][n].get("boost", 1.0) for n in names}
        field_boosts.update({n: float(b) for n, b in boosts.items()})
        try:
            q = self.index.parse_query(text, names, field_boosts=field_boosts,
                                       fuzzy_fields={n: (False, d, True) for n, d in fuzzy.items()})
        except ValueError as e:
            raise AnvilError("InvalidArgument", f"invalid text query: {str(e)[:200]}") from None
        if allowed is not None:
            if not allowed:
                return [], 0, q
            q_all = tantivy.Query.boolean_query([
                (tantivy.Occur.Must, q),
                (tantivy.Occur.Must, tantivy.Query.term_set_query(self.schema, "_vid", allowed)),
            ])
        else:
            q_all = q
        s = self.index.searcher()
        res = s.search(q_all, max(1, limit), count=want_count)
        # The id from its fast-field column: no stored document is decompressed for a hit.
        vids = s.fast_field_values("_vid", [addr for _score, addr in res.hits]) if res.hits else []
        hits = [(int(v), float(score)) for (score, _addr), v in zip(res.hits, vids, strict=True)]
        return hits, (res.count if want_count else len(hits)), q

    def snippets(self, query: Any, vids: list[int]) -> dict[int, dict[str, Any]]:
        s = self.index.searcher()
        out: dict[int, dict[str, Any]] = {vid: {} for vid in vids}
        if not vids:
            return out
        by_vid = {}
        res = s.search(tantivy.Query.term_set_query(self.schema, "_vid", vids), len(vids))
        for _score, addr in res.hits:
            d = s.doc(addr)
            by_vid[d["_vid"][0]] = d
        for name in self.text_fields:
            gen = tantivy.SnippetGenerator.create(s, query, self.schema, name)
            gen.set_max_num_chars(200)
            for vid in vids:
                d = by_vid.get(vid)
                if d is None or not d.get_first(name):
                    continue
                sn = gen.snippet_from_doc(d)
                ranges = [[r.start, r.end] for r in sn.highlighted()]
                if ranges:
                    out[vid][name] = {"fragment": sn.fragment(), "highlights": ranges, "html": sn.to_html()}
        return out

    def knn(self, vector: list[float], k: int, allowed: list[int] | None, ef_search: int) -> list[tuple[int, float]]:
        """Nearest neighbours among live (and `allowed`) documents, filtered during the search."""
        if not self.vectors or k <= 0:
            return []
        q = self._prepare(vector).reshape(1, -1)
        if allowed is not None:
            cand = [v for v in allowed if v in self.vectors]
            if not cand:
                return []
            if len(cand) <= max(EXACT_MIN, EXACT_FRACTION * len(self.vectors)):
                return self._exact(q, cand, k)
            sel = faiss.IDSelectorBatch(np.asarray(cand, dtype="int64"))
        elif self._dead:
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(sorted(self._dead), dtype="int64")))
        else:
            sel = None
        params = faiss.SearchParametersHNSW(efSearch=max(ef_search, k))
        if sel is not None:
            params.sel = sel
        dist, ids = self._hnsw.search(q, k, params=params)
        return [(int(i), self._score(float(d))) for d, i in zip(dist[0], ids[0], strict=True) if i >= 0]

    def _score(self, raw: float) -> float:
        # Higher is better for every metric: l2 distances are negated.
        return -raw if self.metric == "l2" else raw

    def _matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live vector stacked once per change (for exact search over all of them)."""
        if self._mat is None:
            ids = np.fromiter(self.vectors.keys(), dtype="int64", count=len(self.vectors))
            mat = np.stack([self.vectors[i] for i in ids]) if len(ids) else np.zeros((0, 1), dtype="float32")
            self._mat = (ids, mat)
        return self._mat

    def _exact(self, q: np.ndarray, cand: list[int] | None, k: int) -> list[tuple[int, float]]:
        if cand is None:
            ids, mat = self._matrix()
            cand = ids.tolist()
        else:
            mat = np.stack([self.vectors[v] for v in cand])
        if self.metric == "l2":
            scores = -((mat - q) ** 2).sum(axis=1)
        else:
            scores = mat @ q[0]
        top = np.argsort(-scores, kind="stable")[:k]
        return [(cand[i], float(scores[i])) for i in top]

    def exact_knn(self, vector: list[float], k: int, allowed: list[int] | None) -> list[tuple[int, float]]:
        """Brute force over every live vector (the drill's and the benchmark's yardstick)."""
        cand = None if allowed is None else [v for v in allowed if v in self.vectors]
        if not self.vectors or cand == []:
            return []
        return self._exact(self._prepare(vector).reshape(1, -1), cand, k)

    def status(self) -> dict[str, Any]:
        out = {"generation": self.generation, "cursor": self.cursor, "documents": len(self.docs),
               "vectors": len(self.vectors), "diagnostic_count": len(self.diagnostics),
               "published_at": self.published_at}
        if self._hnsw is not None:
            out["hnsw"] = {**self.hnsw_info, "unsaved_vectors": self._graph_unsaved}
        return out

    def close(self) -> None:
        with self.lock:
            self.index = None  # type: ignore[assignment]
            self._hnsw = None
