"""Heal the blob store from a backup repository: every referenced blob that is missing (deleted,
or moved to `quarantine/` by verify-on-read) is streamed back from the newest snapshot holding it.

Blobs are content-addressed and immutable, so any snapshot's copy of a blob is the right one
as long as it hashes to the blob's name: snapshots are searched newest first (or only the one
asked for), each candidate is streamed chunk by chunk from its packs into a `BlobWriter`
(never the whole blob in memory) and committed only if its SHA-256 and size match. A
mismatch (a snapshot that stored a blob already corrupt, a damaged pack) is reported and
nothing is written for it; the next older snapshot is tried.

This module returns a report and never records findings: closing findings is the caller's
(`anvil.runtime.Anvil.heal_blobs`), because backup may not import diagnostics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from anvil.backup.errors import BackupError
from anvil.backup.pack import pack_name
from anvil.backup.repository import Repository
from anvil.storage import Storage
from anvil.storage.blobscan import HEX64
from anvil.storage.recovery import BlobRef, Participant, RecoveryContext

log = logging.getLogger("anvil.backup")

MAX_REFERENCES = 20  # references listed per blob in a report; the count is always complete

Progress = Callable[[int, int, str], None]  # (blobs done, blobs total, sha)


def _refs_view(refs: list[BlobRef]) -> dict[str, Any]:
    return {"references": [r.ref for r in refs[:MAX_REFERENCES]], "reference_count": len(refs),
            "affects": [r.label for r in refs[:MAX_REFERENCES]]}


def missing_blobs(storage: Storage, participants: list[Participant]) -> dict[str, list[BlobRef]]:
    """Every blob some record references that is not in the blob store -> its references."""
    ctx = RecoveryContext(storage.root, storage.catalog.reader(), storage.blobs, participants)
    return {sha: rs for sha, rs in ctx.references().items()
            if HEX64.fullmatch(sha or "") is None or not storage.blobs.exists(sha)}


def _snapshots(repo: Repository, snapshot: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    """The snapshots to search, newest first: one if asked for, else every readable one; and why
    each other one could not be read (its manifest, or its blob tree's pages, is damaged)."""
    if snapshot:
        return [repo.resolve_snapshot(snapshot)], []
    out: list[dict[str, Any]] = []
    unreadable: list[str] = []
    for sid in repo.snapshot_ids():
        try:
            out.append(repo.load_snapshot(sid))
        except BackupError as e:
            # One unreadable manifest must not keep the others from healing.
            log.warning("heal: skipping snapshot %s: %s", sid, e)
            unreadable.append(f"snapshot {sid} cannot be read: {e}")
    return sorted(out, key=lambda m: m["started"], reverse=True), unreadable


def _stream_into(storage: Storage, repo: Repository, sha: str, entry: dict[str, Any]) -> str | None:
    """Stream one snapshot entry into the blob store; None if committed, else why not (nothing written)."""
    index = repo.index()
    size = int(entry.get("size", -1))
    writer = storage.blobs.writer(max_size=size)
    try:
        for cid in entry["chunks"]:
            loc = index.get(cid)
            if loc is None:
                raise BackupError(f"chunk {cid} is not in any index (missing from the repository)")
            # Only this chunk's bytes are read: memory is bounded by one chunk (4 MiB at most).
            sealed = repo.backend.read_range(pack_name(loc.pack), loc.offset, loc.length)
            if len(sealed) != loc.length:
                raise BackupError(f"chunk {cid}: pack {loc.pack} is truncated")
            # The whole-blob SHA-256 below covers every chunk; AES-GCM still authenticates each one.
            writer.write(bytes(repo.decode_chunk(cid, sealed, check_id=False)))
        got = writer.digests()
        if got.sha256 != sha or got.size != size:
            raise BackupError(f"the snapshot's copy hashes to {got.sha256} ({got.size} bytes), expected "
                              f"{sha} ({size} bytes)")
    except OverflowError:
        writer.abort()
        return f"the snapshot's copy is larger than its recorded {size} bytes"
    except BackupError as e:
        writer.abort()
        return str(e)
    except BaseException:
        writer.abort()
        raise
    writer.commit()
    return None


def heal_blobs(storage: Storage, participants: list[Participant], repo: Repository, *,
               snapshot: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Restore every missing referenced blob from `repo`; returns what was healed and what was not.

    `snapshot`: search only this snapshot (an id or unique prefix, or `latest`); otherwise
    every snapshot, newest first. Holds a shared repository lock, so a prune cannot remove the
    packs being read.
    """
    started = time.time()
    with repo.lock("shared", "heal"):
        snaps, unreadable = _snapshots(repo, snapshot)
        needed = missing_blobs(storage, participants)
        healed: list[dict[str, Any]] = []
        unrecoverable: list[dict[str, Any]] = []
        used: set[str] = set()
        total_bytes = 0
        for n, (sha, refs) in enumerate(needed.items()):
            if HEX64.fullmatch(sha or "") is None:
                unrecoverable.append({"sha256": sha, **_refs_view(refs),
                                      "reason": "the reference is not a SHA-256: no backup can hold it",
                                      "problems": []})
                continue
            problems: list[str] = []
            tried: set[tuple[str, ...]] = set()
            done = None
            for m in snaps:
                entry = m["tree"]["blobs"].get(sha)
                if entry is None:
                    continue
                chunks = tuple(entry["chunks"])
                if chunks in tried:
                    continue  # the same bytes as a copy already refused
                tried.add(chunks)
                if storage.blobs.exists(sha):
                    done = m["id"]  # written meanwhile (an identical PUT): nothing left to do
                    break
                why = _stream_into(storage, repo, sha, entry)
                if why is None:
                    done = m["id"]
                    break
                problems.append(f"snapshot {m['id']}: {why}")
            if done is None:
                problems += unreadable  # a snapshot whose manifest or tree pages are damaged may have held it
                reason = ("no snapshot holds a good copy" if problems else
                          f"snapshot {snaps[0]['id']} does not hold it" if snapshot else "no snapshot holds it")
                unrecoverable.append({"sha256": sha, **_refs_view(refs), "reason": reason, "problems": problems})
            else:
                size = storage.blobs.size(sha)
                total_bytes += size
                used.add(done)
                # The healthy copy is durable: the corrupt one kept for forensics has served its purpose.
                had_quarantine = storage.blobs.drop_quarantined(sha)
                healed.append({"sha256": sha, "size": size, "snapshot": done, **_refs_view(refs),
                               "was_quarantined": had_quarantine, "problems": problems})
            if progress:
                progress(n + 1, len(needed), sha[:12])
    if not snaps and not unreadable and needed:
        for u in unrecoverable:
            u["reason"] = "the repository holds no snapshots"
    return {
        "ok": not unrecoverable,
        "repository": repo.backend.url,
        "snapshot": snaps[0]["id"] if snapshot else None,
        "snapshots_searched": len(snaps),
        "snapshots_used": sorted(used),
        "missing": len(needed),
        "healed_count": len(healed),
        "healed": healed,
        "unrecoverable": unrecoverable,
        "bytes": total_bytes,
        "duration": round(time.time() - started, 3),
    }
