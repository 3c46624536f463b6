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
from typing import TYPE_CHECKING, Any

from anvil.backup.errors import BackupError

if TYPE_CHECKING:
    from anvil.backup.pack import PackWriter
    from anvil.backup.repository import Repository

PAGE_END = "00"
PAGE_MAX = 4096  # entries: bounds a page's size should many hashes in a row miss the boundary


def write_pages(writer: PackWriter, items: Iterable[str]) -> list[list[Any]]:
    """Store the tree's items (`"sha":{entry}` JSON text, in hash order) as pages; returns the
    manifest's `blob_pages`. A page the repository already holds is not written again."""
    pages: list[list[Any]] = []
    page: list[str] = []

    def close() -> None:
        text = "{" + ",".join(page) + "}"
        pages.append([writer.add(text.encode()), len(page)])
        page.clear()

    end = 65 - len(PAGE_END)
    for item in items:
        page.append(item)
        # item = '"' + sha + '":...': the hash ends at item[65].
        if item[end:65] == PAGE_END or len(page) >= PAGE_MAX:
            close()
    if page:
        close()
    return pages


def read_page(repo: Repository, cid: str) -> dict[str, Any]:
    """One page's entries: only its bytes are read from the pack (a ranged read), then unsealed and
    checked against its id (a page that does not decrypt to its id is an error, never a tree)."""
    import json

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
    data = repo.decode_chunk(cid, sealed)
    try:
        page = json.loads(bytes(data))
    except ValueError:
        raise BackupError(f"blob tree page {cid} is not a tree page (corrupted)") from None
    if not isinstance(page, dict):
        raise BackupError(f"blob tree page {cid} is not a tree page (corrupted)")
    return page


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
