"""Participants' summaries a backup takes over from its parent snapshot instead of computing them.

A summary of a large store reads every row (the objects digest, the journal chain, a stat per
blob): at 400,000 objects that is most of a full snapshot's own work even when nothing changed.
A participant says when its parent's summary still holds (`Participant.summary_reuse`); the
journal since the parent says what happened. Anything uncertain (another Anvil version, a
journal compacted past the parent, a parent that is not readable) means computing it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from anvil import __version__
from anvil.backup.errors import BackupError
from anvil.backup.repository import Repository, env_seconds
from anvil.storage import journal
from anvil.storage.recovery import Participant, Replayer

HEADER_KEYS = ("anvil_version", "participants", "stats")


def event_kinds_since(conn: Any, seq: int) -> set[str] | None:
    """Kinds of the events after `seq`; None if the journal no longer holds all of them (compacted)."""
    base_seq, _ = journal.base(conn)
    if base_seq > seq:
        return None
    return {row[0] for row in conn.execute("SELECT DISTINCT kind FROM journal WHERE seq > ?", (seq,))}


# A journal summary is extended from its parent's (`Participant.summary_after`: only the events
# after the parent's head are hashed) for at most this long after the chain was last walked whole;
# then a snapshot walks it whole again. Seconds; 0 walks it whole every time.
CHAIN_FULL_EVERY_ENV = "ANVIL_BACKUP_CHAIN_FULL_EVERY"
CHAIN_FULL_EVERY = 24 * 3600
# The manifest's `stats` key recording when (epoch seconds) the journal chain was last walked whole.
CHAIN_FULL_KEY = "journal_chain_full_walk"


def extendable(participants: list[Participant]) -> list[Participant]:
    """The participants whose summary can be extended from the parent's (`summary_after` overridden)."""
    return [p for p in participants if type(p).summary_after is not Participant.summary_after]


@dataclass
class FromParent:
    """What a backup takes from its parent's summaries: `reused` (name -> the parent's summary, which
    still holds as it is), `extend` (name -> the parent's summary, to extend with `summary_after`),
    and `chain_full_walk`: when the journal chain was last walked whole (None: never recorded)."""

    reused: dict[str, Any] = field(default_factory=dict)
    extend: dict[str, Any] = field(default_factory=dict)
    chain_full_walk: float | None = None


def from_parent(repo: Repository, parent: dict[str, Any] | None, conn: Any, head: tuple[int, str],
                participants: list[Participant], *, now: float) -> FromParent:
    """The parent's summaries this backup reuses or extends (`FromParent`). A summary is extended
    only from a parent of this Anvil version whose chain was walked whole less than
    `CHAIN_FULL_EVERY` before `now`."""
    out = FromParent()
    wanted = [p for p in participants if p.summary_reuse in ("events", "head")]
    can_extend = extendable(participants)
    if parent is None or not (wanted or can_extend) or parent.get("kind") == "delta":
        return out
    consistency = parent.get("consistency") or {}
    parent_seq = int(consistency.get("journal_seq", head[0] + 1))
    if parent_seq > head[0]:
        return out
    same_head = (parent_seq, consistency.get("journal_hash")) == head
    kinds: set[str] | None = set() if same_head else event_kinds_since(conn, parent_seq)
    names = [p.name for p in wanted if same_head or (
        p.summary_reuse == "events" and kinds is not None and isinstance(p, Replayer) and p.replays
        and not any(kind.startswith(tuple(p.replays)) for kind in kinds))]
    every = env_seconds(CHAIN_FULL_EVERY_ENV, CHAIN_FULL_EVERY)
    extend = [p.name for p in can_extend if p.name not in names] if every > 0 else []
    if not names and not extend:
        return out  # decided from the header row: the parent's manifest is not decrypted for nothing
    from anvil.backup.treestream import read_header

    try:
        recorded = read_header(repo, parent["id"], HEADER_KEYS)
    except BackupError:
        return out
    if recorded.get("anvil_version") != __version__:  # a summary's shape may differ between versions
        return out
    full_walk = (recorded.get("stats") or {}).get(CHAIN_FULL_KEY)
    out.chain_full_walk = float(full_walk) if isinstance(full_walk, int | float) else None
    for name in names:
        entry = (recorded.get("participants") or {}).get(name)
        if isinstance(entry, dict) and "summary" in entry:
            out.reused[name] = entry["summary"]
    if out.chain_full_walk is not None and now - out.chain_full_walk < every:
        for name in extend:
            entry = (recorded.get("participants") or {}).get(name)
            if isinstance(entry, dict) and isinstance(entry.get("summary"), dict):
                out.extend[name] = entry["summary"]
    return out
