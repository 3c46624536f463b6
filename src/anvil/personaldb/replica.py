"""The client replica: a local SQLite file kept in step with a PersonalDB group.

    from anvil.client import AnvilClient
    from anvil.personaldb import Replica

    r = Replica("notes.db", AnvilClient(...), "notes")
    r.execute("INSERT INTO notes(id, body) VALUES (?, ?)", (1, "hello"))   # recorded, not yet sent
    r.sync()                                                                 # submit, then pull

Local writes are recorded with SQLite's session extension: each `execute`/`transaction` turns
into one changeset, stored in the same local transaction in `_anvil_pdb_pending` (so a crash
never loses an acknowledged local write). `sync()` submits pending changesets against the known
head; when the server refuses a stale base it *rebases*: undoes the pending changes, applies
everyone else's commits in order, re-applies the local changes with the conflict policy, and
records what they became as the new pending changeset. Every certificate received is verified
with the witness's published keys before anything is applied.

Conflict policy (`policy(kind, change) -> "replace" | "omit" | "abort"`), used when local
changes are re-applied on top of newer commits; the default `local_wins`:
  - `data` (the row was changed remotely) and `conflict` (the key was inserted remotely):
    replace — the local edit, made later in the order, wins;
  - `notfound` (the row was deleted remotely): omit — a remote delete wins over a local update;
  - `constraint`: omit the local change.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zstandard

from anvil.personaldb import certs
from anvil.storage import sqlitefile as sf

# Threads that check certificate signatures during a catch-up (one per core).
VERIFY_THREADS = os.cpu_count() or 1

META = "_anvil_pdb_meta"
PENDING = "_anvil_pdb_pending"
CERTS = "_anvil_pdb_certs"
SYNC_BATCH = 500  # pending changesets submitted in one request (server's limit: MAX_BATCH)
SYNC_BATCH_BYTES = 8 * 1024 * 1024  # ... and at most this many bytes of them (the group's limit is 16 MiB)
Policy = Callable[[str, sf.RowChange], str]


def local_wins(kind: str, change: sf.RowChange) -> str:
    """The default policy (see the module docstring)."""
    return "replace" if kind in ("data", "conflict") else "omit"


class ReplicaDiverged(Exception):
    """The replica's head is not on the server's chain (e.g. the server was restored from a backup
    older than commits this replica saw). Raised only when `on_diverge="raise"`."""


class Replica:
    def __init__(self, path: str | Path, client: Any, group: str, *, policy: Policy = local_wins,
                 on_diverge: str = "reset", page: int = 1000):
        self.path = Path(path)
        self.client = client
        self.group = group
        self.policy = policy
        self.on_diverge = on_diverge
        self.page = page
        self._keys: dict[str, str] = {}
        self.diverged: list[dict[str, Any]] = []  # each divergence seen: old head, where the file was kept
        self.db = sf.Database(self.path)
        self.db.set_journal_wal()
        if not self._initialised():
            self._bootstrap()
        self.db.start_session()

    # -- local state ----------------------------------------------------------------------

    def _initialised(self) -> bool:
        return self.db.has_table(META)

    def _meta(self, k: str) -> str | None:
        r = self.db.execute(f"SELECT v FROM {META} WHERE k = ?", (k,))
        return r[0][0] if r else None

    def _set_meta(self, **kv: Any) -> None:
        for k, v in kv.items():
            self.db.execute(f"INSERT INTO {META}(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                            (k, str(v)))

    def _bookkeeping(self) -> None:
        self.db.script(f"CREATE TABLE IF NOT EXISTS {META}(k TEXT PRIMARY KEY, v TEXT NOT NULL);"
                       f"CREATE TABLE IF NOT EXISTS {PENDING}(seq INTEGER PRIMARY KEY, changeset BLOB NOT NULL, "
                       f"idem TEXT NOT NULL);"
                       f"CREATE TABLE IF NOT EXISTS {CERTS}(idx INTEGER PRIMARY KEY, certificate TEXT NOT NULL)")

    @property
    def head(self) -> tuple[int, str]:
        return int(self._meta("head_index") or 0), self._meta("head_hash") or ""

    @property
    def schema_version(self) -> int:
        return int(self._meta("schema_version") or 1)

    def pending(self) -> int:
        return int(self.db.execute(f"SELECT count(*) FROM {PENDING}")[0][0])

    def keys(self, *, refresh: bool = False) -> dict[str, str]:
        if refresh or not self._keys:
            self._keys = {k["key_id"]: k["public"] for k in self.client.pdb_keys()}
        return self._keys

    def _bootstrap(self) -> None:
        """A new replica: the latest snapshot if there is one (a new device starts fast), else the schema."""
        info = self.client.pdb_get(self.group)
        snaps = info.get("snapshots") or []
        if snaps:
            self._load_snapshot(snaps[-1])
            if info["head_index"] > snaps[-1]["index"]:
                self.pull()
            return
        self.db.begin()
        try:
            self.db.script(info["schemas"][0]["sql"])
            self._bookkeeping()
            self._set_meta(group=self.group, head_index=0, head_hash=info["genesis"], genesis=info["genesis"],
                           schema_version=1)
            self.db.commit()
        except BaseException:
            self.db.rollback()
            raise
        if info["head_index"] > 0 or len(info["schemas"]) > 1:
            self.pull()

    def _load_snapshot(self, snap: dict[str, Any]) -> None:
        """Replace the local file by a verified snapshot; pending local changes are kept for a rebase."""
        body = certs.verify_snapshot(snap["certificate"], self.keys(refresh=True), group=self.group,
                                     state_hash=snap["state_hash"])
        data = zstandard.ZstdDecompressor().decompress(self.client.pdb_snapshot_data(self.group, snap["index"]))
        pending: list[tuple[bytes, str]] = []
        genesis = None
        if self._initialised():
            pending = [(bytes(c), i) for c, i in self.db.execute(f"SELECT changeset, idem FROM {PENDING} ORDER BY seq")]
            genesis = self._meta("genesis")
        self.db.close()
        tmp = self.path.with_name(self.path.name + ".snapshot")
        tmp.write_bytes(data)
        check = sf.Database(tmp)
        try:
            got = check.state_hash()
        finally:
            check.close()
        if got != body["state_hash"]:
            tmp.unlink()
            raise certs.CertificateInvalid(f"snapshot {snap['index']}: its content does not match the certified "
                                           "state hash")
        for suffix in ("-wal", "-shm"):
            try:
                os.unlink(str(self.path) + suffix)
            except FileNotFoundError:
                pass
        os.replace(tmp, self.path)
        self.db = sf.Database(self.path)
        self.db.set_journal_wal()
        self.db.begin()
        self._bookkeeping()
        if genesis is None:
            genesis = self.client.pdb_get(self.group)["genesis"]
        self._set_meta(group=self.group, head_index=body["index"], head_hash=body["hash"], genesis=genesis,
                       schema_version=body["schema_version"])
        for cs, idem in pending:
            self.db.execute(f"INSERT INTO {PENDING}(changeset, idem) VALUES (?, ?)", (cs, idem))
        self.db.commit()

    # -- local writes ---------------------------------------------------------------------

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self.db.execute(sql, params)

    @contextmanager
    def transaction(self) -> Iterator[sf.Database]:
        """Several statements, one local transaction, one changeset."""
        self.db.begin()
        try:
            self.db.take_changeset()  # drop anything recorded outside a transaction of ours
            yield self.db
            cs = self.db.take_changeset()
            if cs:
                self.db.execute(f"INSERT INTO {PENDING}(changeset, idem) VALUES (?, ?)",
                                (cs, secrets.token_hex(16)))
            self.db.commit()
        except BaseException:
            self.db.rollback()
            self.db.take_changeset()
            raise

    def execute(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.transaction() as db:
            return db.execute(sql, params)

    # -- sync -----------------------------------------------------------------------------

    def sync(self, *, max_rounds: int = 50) -> dict[str, Any]:
        """Submit every pending changeset, rebasing on stale bases; then pull everyone else's commits."""
        stats = {"submitted": 0, "rebased": 0, "pulled": 0, "snapshot": False}
        rounds = 0
        while True:
            batch = self._next_batch()
            if not batch:
                break
            index, h = self.head
            try:
                if len(batch) == 1:
                    entries = [self.client.pdb_commit(self.group, batch[0][1], base_index=index, base_hash=h,
                                                      schema_version=self.schema_version,
                                                      idempotency_key=batch[0][2])]
                else:
                    # Many pending changesets: one request and one server transaction for all of them
                    # (each still its own certified entry), instead of a round trip and an fsync each.
                    entries = self.client.pdb_commit_batch(self.group, [(cs, idem) for _, cs, idem in batch],
                                                           base_index=index, base_hash=h,
                                                           schema_version=self.schema_version)
            except Exception as e:
                code = getattr(e, "code", None)
                if code not in ("PersonalDbStaleBase", "PersonalDbSchemaMismatch"):
                    raise
                rounds += 1
                if rounds > max_rounds:
                    raise
                got = self._pull_and_rebase()
                stats["rebased"] += 1
                stats["pulled"] += got["pulled"]
                stats["snapshot"] = stats["snapshot"] or got["snapshot"]
                continue
            if len(entries) != len(batch):
                raise certs.CertificateInvalid(f"the server answered {len(entries)} entries for {len(batch)} "
                                               "changesets")
            bodies = []
            for (_, cs, _), entry in zip(batch, entries, strict=True):
                body = self._verify(entry["certificate"], prev_hash=h, index=index + 1, changeset=cs)
                bodies.append((body, entry["certificate"]))
                index, h = body["index"], body["hash"]
            self.db.begin()
            try:
                for (seq, _, _), (body, cert) in zip(batch, bodies, strict=True):
                    self.db.execute(f"DELETE FROM {PENDING} WHERE seq = ?", (seq,))
                    self.db.execute(f"INSERT INTO {CERTS}(idx, certificate) VALUES (?, ?) ON CONFLICT(idx) DO "
                                    "UPDATE SET certificate = excluded.certificate", (body["index"], _dump(cert)))
                self._set_meta(head_index=index, head_hash=h)
                self.db.commit()
            except BaseException:
                self.db.rollback()
                raise
            stats["submitted"] += len(batch)
        got = self._pull_and_rebase()
        stats["pulled"] += got["pulled"]
        stats["snapshot"] = stats["snapshot"] or got["snapshot"]
        stats["head"] = list(self.head)
        return stats

    def _next_batch(self) -> list[tuple[int, bytes, str]]:
        """The oldest pending changesets, in order, as many as one batch takes."""
        out: list[tuple[int, bytes, str]] = []
        size = 0
        for seq, cs, idem in self.db.execute(f"SELECT seq, changeset, idem FROM {PENDING} ORDER BY seq LIMIT ?",
                                             (SYNC_BATCH,)):
            cs = bytes(cs)
            if out and size + len(cs) > SYNC_BATCH_BYTES:
                break
            out.append((seq, cs, idem))
            size += len(cs)
        return out

    def pull(self) -> dict[str, Any]:
        """Apply everyone else's commits (rebasing pending local changes on top of them)."""
        return self._pull_and_rebase()

    def _fetch(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Verified entries after the local head, or a snapshot to load first.

        The next page is requested (on a helper thread) as soon as a page arrives, after the last
        entry it names, while this thread verifies the page: the server's work and the wire overlap
        verification. Naming an unverified entry is safe: the next page is verified against the
        hash this page's verification reached, so a wrong link fails there."""
        out: list[dict[str, Any]] = []
        index, h = self.head
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="anvil-pdb-fetch") as pool:
            nxt = pool.submit(self.client.pdb_catch_up, self.group, index, h, limit=self.page)
            while True:
                page = nxt.result()
                if page["status"] == "snapshot_required":
                    return out, page
                entries = page["entries"]
                more = bool(page["more"] and entries)
                if more:
                    last = entries[-1]
                    nxt = pool.submit(self.client.pdb_catch_up, self.group, last.get("index"), last.get("hash"),
                                      limit=self.page)
                bodies = self._verify_signatures([e["certificate"] for e in entries])
                for e, signed in zip(entries, bodies, strict=True):
                    cs = _b64(e["changeset"])
                    body = certs.check_entry(signed, group=self.group, prev_hash=h, index=index + 1, changeset=cs)
                    out.append({"index": body["index"], "hash": body["hash"], "kind": body["entry_kind"],
                                "schema_version": body["schema_version"], "changeset": cs,
                                "certificate": e["certificate"]})
                    index, h = body["index"], body["hash"]
                if not more:
                    return out, None
                if (last.get("index"), last.get("hash")) != (index, h):
                    raise certs.CertificateInvalid("a catch-up page does not end at the entry it certifies")

    def _verify_signatures(self, page: list[Any]) -> list[dict[str, Any]]:
        """The signatures of a page of certificates, checked on one thread per core (Ed25519
        verification releases the GIL and is most of a catch-up's CPU); their bodies, in order.
        A key id not seen yet (a rotation) refetches the keys once."""
        try:
            return self._signatures_with(page, self.keys())
        except certs.CertificateInvalid as err:
            if "unknown witness key" not in err.message:
                raise
            return self._signatures_with(page, self.keys(refresh=True))

    def _signatures_with(self, page: list[Any], keys: dict[str, str]) -> list[dict[str, Any]]:
        workers = min(VERIFY_THREADS, max(1, len(page) // 64))
        if workers == 1:
            return [certs.verify_certificate(c, keys) for c in page]
        step = -(-len(page) // workers)
        slices = [page[i:i + step] for i in range(0, len(page), step)]
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="anvil-pdb-verify") as pool:
            done = pool.map(lambda part: [certs.verify_certificate(c, keys) for c in part], slices)
            return [body for part in done for body in part]

    def _verify(self, cert: Any, *, prev_hash: str, index: int, changeset: bytes | None) -> dict[str, Any]:
        """One certificate in its place; a key id not seen yet (a rotation) refetches the keys once."""
        try:
            return certs.verify_entry(cert, self.keys(), group=self.group, prev_hash=prev_hash, index=index,
                                      changeset=changeset)
        except certs.CertificateInvalid as err:
            if "unknown witness key" not in err.message:
                raise
            return certs.verify_entry(cert, self.keys(refresh=True), group=self.group, prev_hash=prev_hash,
                                      index=index, changeset=changeset)

    def _pull_and_rebase(self) -> dict[str, Any]:
        entries, required = self._fetch()
        snapshot = False
        if required is not None:
            self._handle_snapshot_required(required)
            snapshot = True
            entries, required = self._fetch()
            if required is not None:
                raise ReplicaDiverged(f"still told snapshot_required after loading a snapshot: {required['detail']}")
        pending = [(s, bytes(c), i) for s, c, i in self.db.execute(
            f"SELECT seq, changeset, idem FROM {PENDING} ORDER BY seq")]
        if not entries and not (snapshot and pending):
            return {"pulled": 0, "snapshot": snapshot}
        self.db.stop_session()
        self.db.begin()
        try:
            if not snapshot:
                for _, cs, _ in reversed(pending):
                    self.db.apply(sf.Database.invert(cs))
            for e in entries:
                if e["kind"] == "migration":
                    self.db.script(e["changeset"].decode())
                else:
                    self.db.apply(e["changeset"])
                self.db.execute(f"INSERT INTO {CERTS}(idx, certificate) VALUES (?, ?) ON CONFLICT(idx) DO UPDATE "
                                "SET certificate = excluded.certificate", (e["index"], _dump(e["certificate"])))
            if entries:
                last = entries[-1]
                self._set_meta(head_index=last["index"], head_hash=last["hash"], schema_version=last["schema_version"])
            if pending:
                # Re-apply local changes on the new head; what they become is the new pending changeset.
                self.db.start_session()
                for _, cs, _ in pending:
                    self.db.apply(cs, self.policy)
                rebased = self.db.take_changeset()
                self.db.stop_session()
                self.db.execute(f"DELETE FROM {PENDING}")
                if rebased:
                    self.db.execute(f"INSERT INTO {PENDING}(changeset, idem) VALUES (?, ?)",
                                    (rebased, secrets.token_hex(16)))
            self.db.commit()
        except BaseException:
            self.db.rollback()
            raise
        finally:
            self.db.stop_session()
            self.db.start_session()
        return {"pulled": len(entries), "snapshot": snapshot}

    def _handle_snapshot_required(self, page: dict[str, Any]) -> None:
        old = self.head
        if page["reason"] == "divergent":
            if self.on_diverge == "raise":
                raise ReplicaDiverged(page["detail"])
            # Never a silent fork: keep the diverged file beside the replica and say so.
            kept = self.path.with_name(f"{self.path.name}.diverged-{int(time.time())}-{old[0]}")
            self.db.backup_to(kept)
            self.diverged.append({"head_index": old[0], "head_hash": old[1], "kept": str(kept),
                                  "server_head": page["head"], "detail": page["detail"]})
        snap = page.get("snapshot")
        if snap is not None:
            self._load_snapshot(snap)
            return
        # No snapshot yet: start again from the schema at genesis.
        info = self.client.pdb_get(self.group)
        pending = [(bytes(c), i) for c, i in self.db.execute(f"SELECT changeset, idem FROM {PENDING} ORDER BY seq")]
        self.db.close()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(str(self.path) + suffix)
            except FileNotFoundError:
                pass
        self.db = sf.Database(self.path)
        self.db.set_journal_wal()
        self.db.begin()
        self.db.script(info["schemas"][0]["sql"])
        self._bookkeeping()
        self._set_meta(group=self.group, head_index=0, head_hash=info["genesis"], genesis=info["genesis"],
                       schema_version=1)
        for cs, idem in pending:
            self.db.execute(f"INSERT INTO {PENDING}(changeset, idem) VALUES (?, ?)", (cs, idem))
        self.db.commit()

    # -- checks ---------------------------------------------------------------------------

    def state_hash(self) -> str:
        return self.db.state_hash()

    def verify(self) -> dict[str, Any]:
        """Offline: the certificates this replica holds form an unbroken chain to its head."""
        rows = self.db.execute(f"SELECT idx, certificate FROM {CERTS} ORDER BY idx")
        if not rows:
            return {"entries": 0, "head_index": self.head[0]}
        import json

        first = json.loads(rows[0][1])["body"]
        prev, index = first["prev_hash"], rows[0][0] - 1
        for idx, text in rows:
            body = self._verify(json.loads(text), prev_hash=prev, index=index + 1, changeset=None)
            if idx != index + 1:
                raise certs.CertificateInvalid(f"certificate {index + 1} is missing")
            prev, index = body["hash"], idx
        if (index, prev) != self.head:
            raise certs.CertificateInvalid("the held certificates do not end at the replica's head")
        return {"entries": len(rows), "head_index": index, "head_hash": prev}

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _b64(text: str | None) -> bytes:
    import base64

    if text is None:
        raise certs.CertificateInvalid("an entry came without its changeset")
    return base64.b64decode(text)


def _dump(cert: dict[str, Any]) -> str:
    import json

    return json.dumps(cert, separators=(",", ":"))


_ = shutil


class ProjectionReplica:
    """A local, read-only copy of a projection, kept in step the way a `Replica` follows its group:

        p = ProjectionReplica("shared.db", AnvilClient(...), "shared")
        p.sync()                       # apply the projection's changes since the local source entry
        p.query("SELECT * FROM visible")

    It starts from the projection's file and then applies, in source order, the changeset each source
    entry made to the projection (`GET .../projections/NAME/changes`). When the server answers
    `snapshot_required` (the projection was rebuilt, or the replica is further behind than the
    change log reaches) it loads the file again. A `pdb.projection.update` watch event is the cue to
    call `sync()`. Projections have no certificate chain: `verify()` compares the local state hash
    with the server's. Writes go back through `client.pdb_write_back`, never into this file."""

    META = "_anvil_projection"

    def __init__(self, path: str | Path, client: Any, name: str, *, page: int = 1000):
        self.path = Path(path)
        self.client = client
        self.name = name
        self.page = page
        self.reloads = 0
        self.db: sf.Database | None = None
        if not self.path.exists():
            self._load_file()
        else:
            self.db = sf.Database(self.path)
        self.sync()

    @property
    def head(self) -> tuple[int, str]:
        """The source entry (index, hash) the local copy reflects."""
        assert self.db is not None
        meta = dict(self.db.execute(f"SELECT k, v FROM {self.META}"))
        return int(meta["source_index"]), meta["source_hash"]

    def _load_file(self) -> None:
        if self.db is not None:
            self.db.close()
        data = zstandard.ZstdDecompressor().decompress(self.client.pdb_projection_data(self.name))
        tmp = self.path.with_name(self.path.name + ".download")
        tmp.write_bytes(data)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(self.path) + suffix)
        os.replace(tmp, self.path)
        self.db = sf.Database(self.path)
        self.reloads += 1

    def sync(self, *, max_reloads: int = 3) -> dict[str, Any]:
        """Apply every change the projection made since the local head; {applied, reloaded, head}."""
        assert self.db is not None
        applied, reloaded = 0, 0
        while True:
            index, h = self.head
            page = self.client.pdb_projection_changes(self.name, index, h, limit=self.page)
            if page["status"] == "snapshot_required":
                if reloaded >= max_reloads:
                    raise RuntimeError(f"projection {self.name}: still snapshot_required after {reloaded} reloads "
                                       f"({page.get('reason')})")
                self._load_file()
                reloaded += 1
                continue
            entries = page["entries"]
            if entries:
                self.db.begin()
                try:
                    for e in entries:
                        cs = _b64(e["changeset"])
                        if cs:
                            self.db.apply(cs)
                    last = entries[-1]
                    for k, v in (("source_index", str(last["source_index"])), ("source_hash", last["source_hash"])):
                        self.db.execute(f"UPDATE {self.META} SET v = ? WHERE k = ?", (v, k))
                    self.db.commit()
                except BaseException:
                    self.db.rollback()
                    raise
                applied += len(entries)
            if not page.get("more"):
                return {"applied": applied, "reloaded": reloaded, "head": list(self.head)}

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        assert self.db is not None
        return self.db.execute(sql, params)

    def state_hash(self) -> str:
        assert self.db is not None
        return self.db.state_hash()

    def verify(self) -> dict[str, Any]:
        """The local copy against the server's projection (when both reflect the same source entry)."""
        server = self.client.pdb_projection(self.name)
        index, _ = self.head
        same = server["source_index"] == index
        return {"source_index": index, "server_source_index": server["source_index"],
                "matches": (self.state_hash() == server["state_hash"]) if same else None}

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def __enter__(self) -> ProjectionReplica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
