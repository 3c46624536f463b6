"""A snapshot extends its parent's verified journal chain (`JournalParticipant.summary_after`):
only the events after the parent's head are hashed again.

What still catches damage to an older event, as docs/backup.md says: the restore's validation
(every event is walked, and the restored summary differs from the recorded one), the live
store's own `verify_journal` (fsck, `anvil journal verify`), and the whole walk a snapshot takes
again once `ANVIL_BACKUP_CHAIN_FULL_EVERY` has passed since the last one (0: every time).
Snapshots taken in process; the restore is a real one into a new STORAGE_PATH.
"""

from __future__ import annotations

from pathlib import Path

import apsw
import pytest

from anvil.backup import engine, summaries
from anvil.backup import mode as recovery
from anvil.backup.backends.local import LocalBackend
from anvil.backup.repository import Repository
from anvil.backup.restore import restore
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil, recovery_participants
from anvil.storage import Storage, journal

PASS = "chain extend passphrase"


def _snapshot(anvil: Anvil, repo: Repository) -> dict:
    return engine.create_snapshot(anvil.storage.root, anvil.storage.layout.catalog_path, anvil.storage.blobs,
                                  anvil.storage.layout.tmp, anvil.storage.format.deployment_id,
                                  recovery_participants(), repo, escrow_secrets=True)


def _journal(m: dict) -> dict:
    return m["participants"]["journal"]["summary"]


def test_chain_is_extended_and_old_damage_is_still_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    anvil = Anvil(tmp_path / "data")
    ctx = RequestContext(DEV_PRINCIPAL)
    try:
        anvil.objects.create_bucket(ctx, "chain")
        anvil.objects.put_object(ctx, "chain", "a", anvil.storage.blobs.put_bytes(b"first body " * 30))
        repo = Repository.init(LocalBackend(tmp_path / "repo"), PASS)
        first = _snapshot(anvil, repo)
        assert first["stats"]["summaries_extended"] == []  # no parent: the whole chain is walked
        walked = first["stats"][summaries.CHAIN_FULL_KEY]
        assert walked == first["started"]

        anvil.objects.put_object(ctx, "chain", "b", anvil.storage.blobs.put_bytes(b"second body " * 30))
        second = _snapshot(anvil, repo)
        assert second["stats"]["summaries_extended"] == ["journal"]
        assert second["stats"][summaries.CHAIN_FULL_KEY] == walked  # carried over, not renewed
        # The extended summary is exactly what a whole walk gives.
        checked, problems = anvil.storage.verify_journal()
        head_seq, head_hash = journal.head(anvil.storage.catalog.reader())
        assert _journal(second) == {"head_seq": head_seq, "head_hash": head_hash, "events": checked,
                                    "chain_verified": True, "chain_problems": 0}
        assert not problems

        # Damage an event the parent already verified (its seq is at or below the parent's head).
        damaged = int(_journal(first)["head_seq"]) - 1
        raw = apsw.Connection(str(anvil.storage.layout.catalog_path))
        raw.execute("UPDATE journal SET actor = actor || 'x' WHERE seq = ?", (damaged,))
        raw.close()
        anvil.objects.put_object(ctx, "chain", "c", anvil.storage.blobs.put_bytes(b"third body " * 30))
        third = _snapshot(anvil, repo)
        # Not seen by the extension (by design: only the events after the parent's head are hashed)...
        assert third["stats"]["summaries_extended"] == ["journal"]
        assert _journal(third)["chain_verified"] is True
        # ...but by the live store's own walk (fsck, `anvil journal verify`),
        assert [p.seq for p in anvil.storage.verify_journal()[1]] == [damaged]

        # and by the periodic whole walk: with the period at 0, every snapshot walks the chain whole.
        monkeypatch.setenv(summaries.CHAIN_FULL_EVERY_ENV, "0")
        anvil.objects.put_object(ctx, "chain", "d", anvil.storage.blobs.put_bytes(b"fourth body " * 30))
        fourth = _snapshot(anvil, repo)
        assert fourth["stats"]["summaries_extended"] == []
        assert _journal(fourth)["chain_verified"] is False and _journal(fourth)["chain_problems"] == 1
        # A parent whose chain did not verify is never extended from, whatever the period.
        monkeypatch.delenv(summaries.CHAIN_FULL_EVERY_ENV)
        anvil.objects.put_object(ctx, "chain", "e", anvil.storage.blobs.put_bytes(b"fifth body " * 30))
        fifth = _snapshot(anvil, repo)
        assert fifth["stats"]["summaries_extended"] == []
    finally:
        anvil.close()

    # And by the restore's validation of the snapshot that extended over the damage.
    target = tmp_path / "restored"
    res = restore(repo, repo.load_snapshot(third["id"]), target, recovery_participants())
    assert res["ok"], res["problems"]
    storage = Storage(target)
    try:
        report = recovery.validate(storage, recovery_participants())
    finally:
        storage.close()
    assert not report["ok"]
    found = [f for step in report["steps"] for f in step["findings"] if f.get("participant") == "journal"
             and f.get("severity") == "error"]
    assert any(f"journal event {damaged}" in f["message"] for f in found), found


def test_chain_walked_whole_again_after_the_period(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parent whose last whole walk is older than the period (here: 1 s, the parent's record moved
    back) is not extended from: the chain is walked whole and the time renewed."""
    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    monkeypatch.setenv(summaries.CHAIN_FULL_EVERY_ENV, "1")
    anvil = Anvil(tmp_path / "data")
    ctx = RequestContext(DEV_PRINCIPAL)
    try:
        anvil.objects.create_bucket(ctx, "period")
        repo = Repository.init(LocalBackend(tmp_path / "repo"), PASS)
        first = _snapshot(anvil, repo)
        first["stats"][summaries.CHAIN_FULL_KEY] -= 3600  # as if walked an hour ago
        del first["tree"]["blobs"]  # (read back lazily; the pages stay listed)
        repo.save_snapshot(first)
        anvil.objects.put_object(ctx, "period", "k", anvil.storage.blobs.put_bytes(b"a body " * 30))
        second = _snapshot(anvil, repo)
        assert second["stats"]["summaries_extended"] == []
        assert second["stats"][summaries.CHAIN_FULL_KEY] == second["started"]
    finally:
        anvil.close()
