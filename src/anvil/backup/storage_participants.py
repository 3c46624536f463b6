"""Participants for the storage core: the journal and the blob store.

Both only use `anvil.storage`'s public functions (journal head/verify, BlobStore paths).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from anvil.backup.participant import Finding, Participant, RecoveryContext
from anvil.storage import journal

MAX_FINDINGS = 50


class JournalParticipant(Participant):
    name = "journal"
    kind = "source"
    covers = ["object-journal"]
    owns = ["catalog.db: journal, journal_base"]

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        seq, h = journal.head(ctx.conn)
        checked, problems = journal.verify_chain(ctx.conn)
        return {"head_seq": seq, "head_hash": h, "events": checked, "chain_verified": not problems,
                "chain_problems": len(problems)}

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        findings: list[Finding] = []
        checked, problems = journal.verify_chain(ctx.conn)
        for p in problems[:MAX_FINDINGS]:
            findings.append(self.finding("error", f"journal seq {p.seq}", p.problem))
        if len(problems) > MAX_FINDINGS:
            findings.append(self.finding("error", "journal", f"{len(problems) - MAX_FINDINGS} more chain problems"))
        if recorded:
            seq_s, hash_s = int(recorded["head_seq"]), recorded["head_hash"]
            row = ctx.conn.execute("SELECT hash FROM journal WHERE seq = ?", (seq_s,)).fetchone()
            head_seq, head_hash = journal.head(ctx.conn)
            if head_seq < seq_s:
                findings.append(self.finding("error", "journal head",
                                             f"head seq {head_seq} is before the recorded checkpoint seq {seq_s}"))
            elif (row[0] if row else head_hash if head_seq == seq_s else None) != hash_s:
                findings.append(self.finding("error", f"journal seq {seq_s}",
                                             "hash at the checkpoint seq differs from the recorded chain hash"))
        if not findings:
            findings.append(self.finding("info", "journal", f"{checked} events, hash chain intact"))
        return findings

    def smoke(self, client: Any, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        res = client.verify_journal()
        if not res.get("ok"):
            return [self.finding("error", "journal", f"server reports a broken chain: {res.get('problems')[:5]}")]
        head = client.health()["journal"]
        if recorded and head["seq"] < recorded["head_seq"]:
            return [self.finding("error", "journal", f"server head {head['seq']} < recorded {recorded['head_seq']}")]
        return [self.finding("info", "journal", f"server verified {res.get('checked')} events")]


class BlobsParticipant(Participant):
    """Blobs are owned by whoever references them; this participant checks presence and hashes."""

    name = "blobs"
    kind = "source"
    covers = ["object-bodies"]
    owns = ["blobs/sha256/"]

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        refs = ctx.references()
        present = 0
        total = 0
        for sha in refs:
            p = ctx.blobs.path(sha)
            if p.exists():
                present += 1
                total += p.stat().st_size
        digest = hashlib.sha256("\n".join(refs).encode()).hexdigest()
        return {"referenced": len(refs), "present": present, "bytes": total, "digest": digest}

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        findings: list[Finding] = []
        refs = ctx.references()
        bad = 0
        for sha, labels in refs.items():
            p = ctx.blobs.path(sha)
            affects = ", ".join(labels[:3]) + (f" (+{len(labels) - 3} more)" if len(labels) > 3 else "")
            if not p.exists():
                bad += 1
                if bad <= MAX_FINDINGS:
                    findings.append(self.finding("error", f"blob {sha}", f"missing; affects {affects}"))
                continue
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while block := f.read(1024 * 1024):
                    h.update(block)
            if h.hexdigest() != sha:
                bad += 1
                if bad <= MAX_FINDINGS:
                    findings.append(self.finding("error", f"blob {sha}", f"content hash mismatch; affects {affects}"))
        if bad > MAX_FINDINGS:
            findings.append(self.finding("error", "blobs", f"{bad - MAX_FINDINGS} more bad blobs"))
        if recorded and recorded.get("digest") and recorded["digest"] != self.summary(ctx)["digest"]:
            findings.append(self.finding("error", "blobs", "the set of referenced blobs differs from the recorded one"))
        if not findings:
            findings.append(self.finding("info", "blobs", f"{len(refs)} referenced blobs present and re-hashed"))
        return findings

    def blob_references(self, ctx: RecoveryContext) -> Iterator[tuple[str, str]]:
        return iter(())
