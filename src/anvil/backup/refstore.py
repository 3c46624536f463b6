"""A backup's blob references and new blob tree, kept on disk in hash order, not in memory.

A snapshot of N blobs needs, per blob, its references (what the tree's `refs` note names and
what a problem report says it affects), whether the parent snapshot holds it, and its new tree
entry. Held as Python objects these cost ~2.5 KB a blob of the server's peak memory (a `BlobRef`,
a label, a dict per reference; a dict, a list and strings per tree entry): 1.3 GiB at 400,000
blobs. Here they are rows of a scratch SQLite file in the backup's checkpoint folder (deleted
with it): the references are inserted as the participants read them, then read back sorted by
hash with one cursor (SQLite sorts with a bounded cache, spilling to temporary files); the
parent's blob tree is streamed (`treestream`) and merged with them; the blobs to encode are
handed out in bounded batches; the new tree (each entry's JSON text, its `refs` note included)
is read back from one ordered query into the tree's pages (`treepages`). Memory per blob is
O(1): a batch, a page cache, one cursor's row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

from anvil.backup.errors import BackupError
from anvil.backup.treepages import ReusedPage, page_digest
from anvil.storage import jsonfast, records
from anvil.storage.recovery import RecoveryContext

INSERT_BATCH = 5000
# Blobs handed to the encoder at a time (its own structures are per batch: ~1 KB a blob).
ENCODE_BATCH = 20_000
# `json.dumps(x, separators=(",", ":"))`'s text, without building an encoder per call (per blob, twice a backup).
_dumps = jsonfast.compact()


class _Uses:
    """A blob's references as `_refs_note` reads them (`.label`): only for problem reports."""

    __slots__ = ("label",)

    def __init__(self, label: str):
        self.label = label


def refs_note(labels: list[str], count: int) -> list[str]:
    return labels[:3] + ([f"+{count - 3} more"] if count > 3 else [])


KEPT_MAX = 100_000  # entries (~0.4 KB each in memory)
_TREE_INSERT = "INSERT INTO tree (sha, size, entry, refs) VALUES (?, ?, ?, ?)"


class RefStore:
    """The references and the new tree of one backup, in a scratch database at `path`."""

    def __init__(self, folder: Path):
        # Two files: the references are written once, then only read (the summaries read them on
        # a thread, with their own connection), while the tree file is written; a reader of a file
        # never waits for a writer of the other.
        self.refs_path = folder / "refs.db"
        self.tree_path = folder / "tree.db"
        self.refs_conn = records.open_scratch(self.refs_path)
        self.conn = records.open_scratch(self.tree_path)
        # `n`: the order the participants reported them (the first reference's size is the blob's).
        self.refs_conn.execute("CREATE TABLE refs (n INTEGER PRIMARY KEY, sha TEXT NOT NULL, size INTEGER NOT NULL, "
                               "label TEXT NOT NULL)")
        # The blobs this backup must encode (sha order, with their `refs` note), and the new tree's
        # entries (JSON text, `refs` included: the tree is written from this table alone).
        self.conn.execute("CREATE TABLE todo (n INTEGER PRIMARY KEY, sha TEXT NOT NULL, size INTEGER NOT NULL, "
                          "refs TEXT NOT NULL)")
        self.conn.execute("CREATE TABLE tree (sha TEXT PRIMARY KEY, size INTEGER NOT NULL, entry TEXT NOT NULL, "
                          "refs TEXT NOT NULL)")
        self.reused = 0  # tree entries taken over from the parent snapshot
        # The parent's tree pages taken over whole (`split_pages`), in hash order.
        self.pages: list[ReusedPage] = []
        # Entries of changed pages copied as text (`split_pages`), in hash order: held in memory up
        # to `KEPT_MAX` (an insert into the tree table per entry was a third of the merge), the rest
        # go to the table.
        self.kept: list[tuple[str, int, str, str]] = []
        self.kept_bytes = 0
        self._batch_refs: dict[str, str] = {}  # the refs notes of the batch being encoded

    def close(self) -> None:
        records.close(self.refs_conn)
        records.close(self.conn)
        for path in (self.refs_path, self.tree_path):
            path.unlink(missing_ok=True)

    # -------------------------------------------------------------- references

    def load(self, ctx: RecoveryContext) -> None:
        """Every participant's references, read in one read transaction of the checkpoint, then
        indexed by hash and order (the index is built by SQLite's external sort; reading by it needs no sort)."""
        insert = "INSERT INTO refs (sha, size, label) VALUES (?, ?, ?)"
        # A participant's SELECTs (the objects' versions and parts) are run by SQLite from the
        # checkpoint's file into this one: no Python per reference (at 10,000 versions that was
        # most of this read). `size INTEGER` makes any size an integer, as `int()` did.
        catalog = records.sqlite_file(ctx.conn)
        with ctx.conn:
            for source in ctx.blob_reference_sources():
                if isinstance(source, list) and catalog is not None:
                    records.insert_selected(self.refs_conn, "INSERT INTO refs (sha, size, label)", catalog, source)
                    continue
                rows = ctx.source_rows(source)
                while batch := list(islice(rows, INSERT_BATCH)):
                    self._insert(insert, batch, self.refs_conn)
        # Covering (size and label too): the ordered reads below never look a row up in the table.
        self.refs_conn.execute("CREATE INDEX refs_sha ON refs (sha, n, size, label)")

    def _insert(self, sql: str, rows: list[Any], conn: Any = None) -> None:
        if rows:
            conn = conn or self.conn
            with conn:
                conn.executemany(sql, rows)

    def blobs(self) -> Iterator[tuple[str, int, list[str], int]]:
        """(sha, size as the first reference records it, up to 3 labels, reference count), by hash.
        `first` is the first inserted, as `RecoveryContext.references()` keeps them."""
        cur: str | None = None
        size = count = 0
        labels: list[str] = []
        for sha, sz, label in self.refs_conn.execute("SELECT sha, size, label FROM refs ORDER BY sha, n"):
            if sha != cur:
                if cur is not None:
                    yield cur, size, labels, count
                cur, size, labels, count = sha, sz, [], 0
            if len(labels) < 3:
                labels.append(label)
            count += 1
        if cur is not None:
            yield cur, size, labels, count

    def referenced(self) -> Iterator[tuple[str, int]]:
        """(sha, first size) by hash: `RecoveryContext.referenced_blobs` for the summaries. Its own
        connection: the summaries read on a thread while this one writes the tree."""
        conn = records.open_readonly(self.refs_path)
        try:
            last = None
            for sha, size in conn.execute("SELECT sha, size FROM refs ORDER BY sha, n"):
                if sha != last:
                    last = sha
                    yield sha, size
        finally:
            records.close(conn)

    def uses(self, sha: str) -> list[_Uses]:
        """A blob's references (labels), for the rare problem report."""
        rows = self.refs_conn.execute("SELECT label FROM refs WHERE sha = ? ORDER BY n", (sha,))
        return [_Uses(r[0]) for r in rows]

    # -------------------------------------------------------------- parent merge and encode batches

    def split(self, entries: Iterator[tuple[str, dict[str, Any]]] | None, known: Any) -> tuple[int, int]:
        """Merge the references with the parent's tree entries (both sorted by hash): an entry whose
        chunks the repository holds goes to the new tree as it is, every other blob to `todo`.
        Returns (blobs to encode, their recorded bytes)."""
        cur = next(entries, None) if entries is not None else None
        todo: list[tuple[int, str, int, str]] = []
        tree: list[tuple[str, int, str]] = []
        n = todo_bytes = reused = 0
        for sha, size, labels, count in self.blobs():
            while cur is not None and cur[0] < sha:
                cur = next(entries, None)  # type: ignore[arg-type]
            refs = refs_note(labels, count)
            if cur is not None and cur[0] == sha and all(c in known for c in cur[1]["chunks"]):
                # The parent's entry with this backup's refs as its last key (as the manifest had it);
                # most entries already end so (the same references): encoded as they are, no copy.
                entry = cur[1]
                if entry.get("refs") != refs or next(reversed(entry)) != "refs":
                    entry = {k: v for k, v in entry.items() if k != "refs"}
                    entry["refs"] = refs
                reused += 1
                tree.append((sha, int(entry["size"]), _dumps(entry), _dumps(refs)))
                if len(tree) >= INSERT_BATCH:
                    self._insert(_TREE_INSERT, tree)
                    tree = []
            else:
                n += 1
                todo_bytes += size
                todo.append((n, sha, size, _dumps(refs)))
                if len(todo) >= INSERT_BATCH:
                    self._insert("INSERT INTO todo (n, sha, size, refs) VALUES (?, ?, ?, ?)", todo)
                    todo = []
        self._insert(_TREE_INSERT, tree)
        self._insert("INSERT INTO todo (n, sha, size, refs) VALUES (?, ?, ?, ?)", todo)
        self.reused = reused
        return n, todo_bytes

    def split_pages(self, pages: list[ReusedPage], load: Callable[[str], dict[str, str]],
                    known: Any) -> tuple[int, int]:
        """`split` against a parent tree whose pages carry keys (`treepages`: the last hash, the
        digest of the (hash, refs note) list and the bytes of each page). The references are
        walked in hash order and cut at the parent's page ends; a range whose digest is the page's
        holds exactly the page's blobs with the same refs notes, so the page is taken over whole
        (`self.pages`): not read, decoded, re-encoded or written again. Only the pages of a range
        that changed are read (`load`: cid -> sha -> entry JSON text): an entry whose refs note is
        unchanged is copied as text, any other merged as `split` does; a page that cannot be read
        is treated as empty (its blobs are encoded again).
        Returns (blobs to encode, their recorded bytes)."""
        todo: list[tuple[int, str, int, str]] = []
        tree: list[tuple[str, int, str, str]] = []
        n = todo_bytes = reused = 0
        pending: list[tuple[str, int, str, str]] = []  # (sha, size, "", refs note): `page_digest`'s rows
        i = 0

        def to_todo(sha: str, size: int, rtext: str) -> None:
            nonlocal n, todo_bytes
            n += 1
            todo_bytes += size
            todo.append((n, sha, size, rtext))

        def close(page: ReusedPage) -> None:
            nonlocal reused
            # A page taken over whole must itself be indexed; its entries' chunks are those of a
            # snapshot the repository holds (under this create's lock no prune runs), as for the
            # unchanged-store snapshot, which lists every page of its parent.
            if len(pending) == page.count and page.cid in known and page_digest(pending) == page.digest:
                self.pages.append(page)
                reused += page.count
            elif pending:
                try:
                    texts = load(page.cid)
                except BackupError:
                    texts = {}
                for sha, size, _, rtext in pending:
                    text = texts.get(sha)
                    if text is None:
                        to_todo(sha, size, rtext)
                        continue
                    if text.endswith(f',"refs":{rtext}}}') and text.startswith('{"size":'):
                        # The same references: the parent's entry text as it is (the page's own
                        # chunk is indexed; its entries' chunks are a held snapshot's, see above).
                        reused += 1
                        row = (sha, int(text[8:text.index(",", 8)]), text, rtext)
                        if len(self.kept) < KEPT_MAX:
                            self.kept.append(row)
                            self.kept_bytes += row[1]
                        else:
                            tree.append(row)
                        continue
                    entry = json.loads(text)
                    if isinstance(entry, dict) and all(c in known for c in entry.get("chunks") or ()):
                        entry = {k: v for k, v in entry.items() if k != "refs"}
                        entry["refs"] = json.loads(rtext)
                        reused += 1
                        tree.append((sha, int(entry["size"]), _dumps(entry), rtext))
                    else:
                        to_todo(sha, size, rtext)
            pending.clear()

        for sha, size, labels, count in self.blobs():
            rtext = _dumps(refs_note(labels, count))
            while i < len(pages) and sha > pages[i].last:
                close(pages[i])
                i += 1
            if i < len(pages):
                pending.append((sha, size, "", rtext))
            else:
                to_todo(sha, size, rtext)  # after the parent's last page: new
            if len(tree) >= INSERT_BATCH:
                self._insert(_TREE_INSERT, tree)
                tree = []
            if len(todo) >= INSERT_BATCH:
                self._insert("INSERT INTO todo (n, sha, size, refs) VALUES (?, ?, ?, ?)", todo)
                todo = []
        while i < len(pages):
            close(pages[i])
            i += 1
        self._insert(_TREE_INSERT, tree)
        self._insert("INSERT INTO todo (n, sha, size, refs) VALUES (?, ?, ?, ?)", todo)
        self.reused = reused
        return n, todo_bytes

    def reset_split(self) -> None:
        """Undo a `split` that stopped half way (the parent's tree was not in hash order)."""
        with self.conn:
            self.conn.execute("DELETE FROM todo")
            self.conn.execute("DELETE FROM tree")
        self.reused = 0
        self.pages = []
        self.kept = []
        self.kept_bytes = 0

    def todo_batches(self, batch: int | None = None) -> Iterator[tuple[list[str], dict[str, int]]]:
        """The blobs to encode, in hash order, `batch` at a time: (hashes, hash -> recorded size)."""
        batch = batch or ENCODE_BATCH
        last = 0
        while True:
            rows = self.conn.execute("SELECT n, sha, size, refs FROM todo WHERE n > ? ORDER BY n LIMIT ?",
                                     (last, batch)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            self._batch_refs = {r[1]: r[3] for r in rows}
            yield [r[1] for r in rows], {r[1]: r[2] for r in rows}

    def add_entries(self, entries: dict[str, dict[str, Any]]) -> None:
        """New tree entries (sha -> {"size", "chunks"}) from the batch `todo_batches` last handed out;
        its `refs` note is spliced in as the last key (the text `json.dumps` of the whole entry gives)."""
        refs = self._batch_refs
        self._insert(_TREE_INSERT, [(sha, int(e["size"]), f'{_dumps(e)[:-1]},"refs":{refs[sha]}}}', refs[sha])
                                    for sha, e in entries.items()])

    # -------------------------------------------------------------- the new tree

    def tree_totals(self) -> tuple[int, int]:
        """(blobs in the new tree, their bytes), the pages taken over whole included."""
        n, total = self.conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM tree").fetchone()
        return (int(n) + sum(p.count for p in self.pages) + len(self.kept),
                int(total) + sum(p.nbytes for p in self.pages) + self.kept_bytes)

    def tree_items(self) -> Iterator[tuple[str, int, str, str] | ReusedPage]:
        """The new tree in hash order, for `treepages.write_pages`: one blob at a time (its hash, size,
        entry JSON text with refs, refs note), or a parent's page taken over whole. A blob missing
        or corrupt has no entry (it is in `problems`, not in the tree). No entry falls in the range
        of a page taken over (that range held exactly the page's blobs)."""
        rows: Iterable[tuple[str, int, str, str]] = self.conn.execute(
            "SELECT sha, size, entry, refs FROM tree ORDER BY sha")
        if self.kept:
            # A hash is in the table or in `kept`, never both. Few rows in the table (the blobs this
            # backup encoded or re-referenced): one sort of the two sorted runs (a merge, in C).
            if self.conn.execute("SELECT count(*) FROM tree").fetchone()[0] <= KEPT_MAX:
                merged = self.kept + list(rows)
                merged.sort()
                rows = merged
            else:
                import heapq

                rows = heapq.merge(rows, self.kept)
        pages = iter(self.pages)
        page = next(pages, None)
        for row in rows:
            while page is not None and page.last < row[0]:
                yield page
                page = next(pages, None)
            yield row
        while page is not None:
            yield page
            page = next(pages, None)


class SavedTree(Mapping[str, Any]):
    """The returned manifest's `tree.blobs` (or, from a child process, its whole `tree`): read back
    from the saved snapshot on first use (the server's callers never use it; tests and the offline
    CLI may), so a backup ends holding none. `count`, if known, answers `len` without reading.
    A Mapping, not a dict: serialising it as JSON fails loudly instead of writing `{}`."""

    def __init__(self, load: Callable[[], dict[str, Any]], count: int | None = None):
        self._load = load
        self._count = count
        self._tree: dict[str, Any] | None = None

    def _get(self) -> dict[str, Any]:
        if self._tree is None:
            self._tree = self._load()
        return self._tree

    def __len__(self) -> int:
        return self._count if self._tree is None and self._count is not None else len(self._get())

    def __getitem__(self, k: str) -> Any:
        return self._get()[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __contains__(self, k: object) -> bool:
        return k in self._get()
