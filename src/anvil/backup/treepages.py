"""A snapshot's blob tree stored in content-addressed pages instead of inside its manifest.

The manifest used to carry the whole blob tree (every blob's entry: size, chunks, refs), so every
snapshot encoded, compressed, sealed and uploaded O(store) bytes again, even when nothing had
changed. Now the tree, sorted by hash, is cut into pages; each page is one chunk of the
repository (its JSON text: the same `{"sha": entry, ...}` the manifest held), so it is sealed,
deduplicated by chunk id, indexed, checked by `verify --read-data` and kept by prune exactly as
file chunks are. The manifest lists the pages (`tree.blob_pages`: `[chunk id, entries]`).

Page boundaries are set by content, not by position: a page ends after a blob whose hash ends in
`PAGE_END` (one blob in 256, so ~256 entries a page; a cap bounds a rare long run). A blob added
or removed changes only the page it falls in (or joins/splits two at a boundary), so the other
pages of a child snapshot are the very chunks of its parent and cost nothing to store. A snapshot
taken when nothing happened lists its parent's pages (`engine`, the unchanged-store path).

Readers see no difference: `Repository.load_snapshot` expands the pages into `tree.blobs`, and
`treestream.iter_tree_blobs` streams them. Manifests with an inline `tree.blobs` (every snapshot
written before this format) are read as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from anvil.backup.errors import BackupError

if TYPE_CHECKING:
    from anvil.backup.pack import PackWriter
    from anvil.backup.repository import Repository

PAGE_END = "00"
PAGE_MAX = 4096  # entries: bounds a page's size should many hashes in a row miss the boundary
# Hex digits of a page key's digest (128 bits).
PAGE_DIGEST = 32


class ReusedPage(NamedTuple):
    """A parent's page with its key (`tree.blob_page_keys`): taken over whole by a child snapshot."""

    cid: str
    count: int
    last: str  # the page's last (highest) blob hash
    digest: str  # of its (hash, refs note) list: `page_digest`
    nbytes: int  # the sum of its blobs' sizes


def page_digest(rows: Iterable[tuple[str, Any, Any, str]]) -> str:
    """A page key's digest of its blobs, `(sha, _, _, refs note JSON text)` in hash order: the first
    `PAGE_DIGEST` hex digits of the SHA-256 of the lines `<sha>\t<refs>\n`."""
    import hashlib

    return hashlib.sha256("".join([f"{r[0]}\t{r[3]}\n" for r in rows]).encode()).hexdigest()[:PAGE_DIGEST]


def write_pages(writer: PackWriter,
                items: Iterable[tuple[str, int, str, str] | ReusedPage]) -> tuple[list[list[Any]], list[list[Any]]]:
    """Store the tree's items in hash order, each a blob's `(sha, size, entry JSON text with refs,
    refs note JSON text)` or a `ReusedPage`, as pages; returns the manifest's `blob_pages` and
    `blob_page_keys`. A page the repository already holds is not written again; a `ReusedPage`
    (a parent's page whose blobs and refs notes are unchanged) is listed as it is, never read."""
    pages: list[list[Any]] = []
    keys: list[list[Any]] = []
    page: list[tuple[str, int, str, str]] = []

    def close() -> None:
        text = "{" + ",".join([f'"{r[0]}":{r[2]}' for r in page]) + "}"
        pages.append([writer.add(text.encode()), len(page)])
        keys.append([page[-1][0], page_digest(page), sum(r[1] for r in page)])
        page.clear()

    for item in items:
        if isinstance(item, ReusedPage):
            if page:
                close()  # the page before it ends here (its range is no longer contiguous)
            pages.append([item.cid, item.count])
            keys.append([item.last, item.digest, item.nbytes])
            continue
        page.append(item)  # type: ignore[arg-type]
        if item[0].endswith(PAGE_END) or len(page) >= PAGE_MAX:
            close()
    if page:
        close()
    return pages, keys


def reusable_pages(tree: dict[str, Any]) -> list[ReusedPage] | None:
    """A manifest tree's pages with their keys, if it records well-formed ones (hashes strictly
    increasing); None for a tree without keys (written before them) or with any doubt."""
    pages, keys = tree.get("blob_pages"), tree.get("blob_page_keys")
    if not isinstance(pages, list) or not isinstance(keys, list) or len(pages) != len(keys):
        return None
    out: list[ReusedPage] = []
    prev = ""
    try:
        for (cid, count), (last, digest, nbytes) in zip(pages, keys, strict=True):
            if not (isinstance(cid, str) and isinstance(last, str) and len(last) == 64 and last > prev
                    and isinstance(digest, str) and len(digest) == PAGE_DIGEST
                    and isinstance(count, int) and count > 0 and isinstance(nbytes, int) and nbytes >= 0):
                return None
            out.append(ReusedPage(cid, count, last, digest, nbytes))
            prev = last
    except (TypeError, ValueError):
        return None
    return out


def read_page(repo: Repository, cid: str) -> dict[str, Any]:
    """One page's entries: only its bytes are read from the pack (a ranged read), then unsealed and
    checked against its id (a page that does not decrypt to its id is an error, never a tree)."""
    import json

    try:
        page = json.loads(read_page_bytes(repo, cid))
    except ValueError:
        raise BackupError(f"blob tree page {cid} is not a tree page (corrupted)") from None
    if not isinstance(page, dict):
        raise BackupError(f"blob tree page {cid} is not a tree page (corrupted)")
    return page


def read_page_texts(repo: Repository, cid: str) -> dict[str, str]:
    """sha -> the entry's JSON text, as the page holds it (`entry_texts`), or re-encoded from the
    parsed page if its text cannot be cut safely."""
    import json

    # Not checked against its id (a keyed hash of the page): AES-GCM authenticates it under that id,
    # and every entry taken from it is parsed again here.
    raw = read_page_bytes(repo, cid, check_id=False)
    try:
        text = bytes(raw).decode()
    except UnicodeDecodeError:
        raise BackupError(f"blob tree page {cid} is not a tree page (corrupted)") from None
    texts = entry_texts(text)
    if texts is not None:
        return texts
    page = read_page(repo, cid)
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    return {sha: dumps(entry) for sha, entry in page.items()}


def entry_texts(text: str) -> dict[str, str] | None:
    """A page's `{"sha":{entry},...}` text cut into sha -> entry text without parsing it. An entry
    holds no object (size, a list of chunk ids, a list of labels), and a `"` inside a string is
    always escaped, so `},"` occurs only between two entries. None if anything does not look
    like that (then the page is parsed)."""
    if not (text.startswith('{"') and text.endswith("}}")):
        return None
    parts = text[1:-1].split('},"')
    out: dict[str, str] = {}
    last = len(parts) - 1
    for i, part in enumerate(parts):
        if i:
            part = '"' + part
        if i < last:
            part += "}"
        if len(part) < 69 or part[65:68] != '":{' or part[0] != '"' or '{' in part[68:]:
            return None
        out[part[1:65]] = part[67:]
    return out


def read_page_bytes(repo: Repository, cid: str, *, check_id: bool = True) -> bytes | memoryview:
    """One page's plaintext: only its bytes are read from the pack (a ranged read), then unsealed
    and checked against its id."""
    from anvil.backup.pack import pack_name

    loc = repo.index().get(cid)
    if loc is None:
        raise BackupError(f"blob tree page {cid} is not in any index (missing from the repository)")
    try:
        sealed = repo.backend.read_range(pack_name(loc.pack), loc.offset, loc.length)
    except BackupError:
        raise BackupError(f"blob tree page {cid}: pack {loc.pack} is missing from the repository") from None
    if len(sealed) != loc.length:
        raise BackupError(f"blob tree page {cid}: pack {loc.pack} is truncated")
    return repo.decode_chunk(cid, sealed, check_id=check_id)


def iter_pages(repo: Repository, pages: list[list[Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(sha, entry) of every page, in hash order."""
    for cid, _count in pages:
        yield from read_page(repo, cid).items()


def page_ids(manifest: dict[str, Any]) -> list[str]:
    """The chunk ids of a manifest's tree pages (none for a manifest with an inline tree)."""
    return [p[0] for p in (manifest.get("tree") or {}).get("blob_pages") or []]


def expand(repo: Repository, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with `tree.blobs` read from its pages (`tree.blob_pages` stays: prune and verify
    count the pages as chunks the snapshot uses)."""
    tree = manifest.get("tree")
    if isinstance(tree, dict) and "blob_pages" in tree and "blobs" not in tree:
        tree["blobs"] = dict(iter_pages(repo, tree["blob_pages"]))
    return manifest
