"""Participants' summaries a backup takes over from its parent snapshot instead of computing them.

A summary of a large store reads every row (the objects digest, the journal chain, a stat per
blob): at 400,000 objects that is most of a full snapshot's own work even when nothing changed.
A participant says when its parent's summary still holds (`Participant.summary_reuse`); the
journal since the parent says what happened. Anything uncertain (another Anvil version, a
journal compacted past the parent, a parent that is not readable) means computing it again.
"""

from __future__ import annotations

from typing import Any

from anvil import __version__
from anvil.backup.errors import BackupError
from anvil.backup.repository import Repository
from anvil.storage import journal
from anvil.storage.recovery import Participant, Replayer

HEADER_KEYS = ("anvil_version", "participants")


def event_kinds_since(conn: Any, seq: int) -> set[str] | None:
    """Kinds of the events after `seq`; None if the journal no longer holds all of them (compacted)."""
    base_seq, _ = journal.base(conn)
    if base_seq > seq:
        return None
    return {row[0] for row in conn.execute("SELECT DISTINCT kind FROM journal WHERE seq > ?", (seq,))}


def reusable(repo: Repository, parent: dict[str, Any] | None, conn: Any, head: tuple[int, str],
             participants: list[Participant]) -> dict[str, Any]:
    """name -> the parent's recorded summary, for every participant whose summary still holds at `head`."""
    wanted = [p for p in participants if p.summary_reuse in ("events", "head")]
    if parent is None or not wanted or parent.get("kind") == "delta":
        return {}
    consistency = parent.get("consistency") or {}
    parent_seq = int(consistency.get("journal_seq", head[0] + 1))
    if parent_seq > head[0]:
        return {}
    same_head = (parent_seq, consistency.get("journal_hash")) == head
    kinds: set[str] | None = set() if same_head else event_kinds_since(conn, parent_seq)
    names = [p.name for p in wanted if same_head or (
        p.summary_reuse == "events" and kinds is not None and isinstance(p, Replayer) and p.replays
        and not any(kind.startswith(tuple(p.replays)) for kind in kinds))]
    if not names:
        return {}  # decided from the header row: the parent's manifest is not decrypted for nothing
    from anvil.backup.treestream import read_header

    try:
        recorded = read_header(repo, parent["id"], HEADER_KEYS)
    except BackupError:
        return {}
    if recorded.get("anvil_version") != __version__:  # a summary's shape may differ between versions
        return {}
    out: dict[str, Any] = {}
    for name in names:
        entry = (recorded.get("participants") or {}).get(name)
        if isinstance(entry, dict) and "summary" in entry:
            out[name] = entry["summary"]
    return out
