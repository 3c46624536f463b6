"""Read a snapshot manifest's blob tree as a stream, never decoding the whole manifest.

A backup compares the store's references with its parent snapshot's blob tree. Decoded whole,
that tree cost ~0.9 KB per blob of the backup's peak memory (a dict, a list and strings for
each of hundreds of thousands of blobs). The manifest's JSON is compact and its `tree` comes
last, with `blobs` sorted by hash (it is written in the order of `RecoveryContext.references()`);
so the tree can be read entry by entry, decompressed a MiB at a time, and merged against the
references, which are sorted the same way. The repository format is unchanged.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import zstandard
from cryptography.exceptions import InvalidTag

from anvil.backup.crypto import unseal
from anvil.backup.errors import BackupError

if TYPE_CHECKING:
    from anvil.backup.repository import Repository

READ = 1024 * 1024
_WS = " \t\r\n"


class _Json:
    """Just enough of an incremental JSON reader: punctuation, and whole values via raw_decode."""

    def __init__(self, f: Any):
        self.f = f
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.dec = json.JSONDecoder()

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = self.f.read(READ)
        if not chunk:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        return True

    def peek(self) -> str:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                raise ValueError("truncated manifest")

    def char(self, want: str | None = None) -> str:
        c = self.peek()
        if want is not None and c not in want:
            raise ValueError(f"expected {want!r} at {self.pos}, found {c!r}")
        self.pos += 1
        return c

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                v, end = self.dec.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if not self._more():
                    raise
                continue
            if end == len(self.buf) and self._more():
                continue  # a number may go on in the next read
            self.pos = end
            return v


def _entries(r: _Json, paged: Any = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """`paged(blob_pages)`: the entries of a tree stored in pages (`treepages`)."""
    r.char("{")
    if r.peek() == "}":
        return
    while True:  # the manifest's keys, up to "tree"
        key = r.value()
        r.char(":")
        if key == "tree":
            break
        r.value()
        if r.char(",}") == "}":
            return
    r.char("{")
    if r.peek() == "}":
        return
    while True:  # the tree's keys: "files", then "blobs"
        key = r.value()
        r.char(":")
        if key == "blob_pages" and paged is not None:
            yield from paged(r.value())
        elif key != "blobs":
            r.value()
        else:
            r.char("{")
            if r.peek() != "}":
                while True:
                    sha = r.value()
                    r.char(":")
                    yield sha, r.value()
                    if r.char(",}") == "}":
                        break
            else:
                r.char("}")
        if r.char(",}") == "}":
            return


def _header(r: _Json, keys: tuple[str, ...]) -> dict[str, Any]:
    """The manifest's `keys` that come before its tree (the tree comes last and is not read)."""
    out: dict[str, Any] = {}
    r.char("{")
    if r.peek() == "}":
        return out
    while True:
        key = r.value()
        r.char(":")
        if key == "tree":
            return out
        value = r.value()
        if key in keys:
            out[key] = value
        if r.char(",}") == "}":
            return out


def _header_and_tree_text(r: _Json) -> tuple[dict[str, Any], str | None]:
    out: dict[str, Any] = {}
    r.char("{")
    if r.peek() == "}":
        return out, None
    while True:
        key = r.value()
        r.char(":")
        if key == "tree":  # the last key: the rest of the text is its value and the closing brace
            rest = (r.buf[r.pos:] + r.f.read()).rstrip()
            if not rest.endswith("}"):
                raise ValueError("truncated manifest")
            return out, rest[:-1]
        out[key] = r.value()
        if r.char(",}") == "}":
            return out, None


def read_header(repo: Repository, snap_id: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A snapshot's header fields, read up to its blob tree: a listing of snapshots no longer
    decodes every manifest whole (~1 KB a blob: 600 MiB of a backup's peak at 400,000 blobs,
    where it only wanted the parent's id and journal seq)."""
    return _read(repo, snap_id, lambda r: _header(r, keys))


def read_tree_text(repo: Repository, snap_id: str) -> tuple[dict[str, Any], str | None]:
    """A snapshot's manifest without its tree, and the tree's JSON text as written (None if it has
    none): for a snapshot that takes its parent's tree over unchanged (`Repository.save_snapshot`'s
    `tree_json`), which then never builds the files' chunk lists as objects (`light_tree`)."""
    return _read(repo, snap_id, _header_and_tree_text)


# A file's chunk list in a compact manifest: chunk ids (hex) only, so no "]" inside it.
_CHUNK_LIST = re.compile(r'"chunks":\[[^\]]*\]')


def light_tree(tree_json: str) -> dict[str, Any]:
    """A tree's JSON decoded with every file's `chunks` left out (None): names, sizes, digests,
    modes and the blob pages. A 350 MB catalog.db lists ~7,000 chunk ids: decoded, ~1 MiB of small
    objects, whose churn in the server left pymalloc arenas pinned (docs/backup.md, "Back to idle")."""
    return json.loads(_CHUNK_LIST.sub('"chunks":null', tree_json))


def iter_tree_blobs(repo: Repository, snap_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(sha256, tree entry) of a snapshot's blobs, in the order the manifest (or its pages) lists them."""
    yield from _read(repo, snap_id, None, entries=True)


def _read(repo: Repository, snap_id: str, fn: Any, entries: bool = False) -> Any:
    name = f"snapshots/{snap_id}"
    if not repo.backend.exists(name):
        raise BackupError(f"no snapshot {snap_id} in {repo.backend.url}")
    try:
        plain = unseal(repo.enc_key, repo.backend.read(name), f"snapshot:{snap_id}".encode())
    except InvalidTag:
        raise BackupError(f"snapshot {snap_id} cannot be decrypted (corrupted)") from None
    body = memoryview(plain)[1:]
    if plain[:1] == b"\x01":
        raw: Any = zstandard.ZstdDecompressor().stream_reader(body)
    elif plain[:1] == b"\x00":
        raw = io.BytesIO(body)
    else:
        raise BackupError(f"snapshot {snap_id} cannot be decrypted (corrupted)")
    reader = _Json(io.TextIOWrapper(raw, encoding="utf-8"))
    if entries:
        from anvil.backup.treepages import iter_pages

        return _guarded(snap_id, _entries(reader, lambda pages: iter_pages(repo, pages)))
    try:
        return fn(reader)
    except (ValueError, zstandard.ZstdError) as e:
        raise BackupError(f"snapshot {snap_id} cannot be read ({e})") from None


def _guarded(snap_id: str, it: Iterator[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        yield from it
    except (ValueError, zstandard.ZstdError) as e:
        raise BackupError(f"snapshot {snap_id} cannot be read ({e})") from None
