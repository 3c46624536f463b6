"""A full snapshot takes over its parent's summaries where the journal shows they still hold
(`anvil.backup.summaries`), and computes every one whose records changed.

Snapshots of one store, taken in process: with no change since the parent, the objects, journal and
blobs summaries are the parent's; after an identity change only, the objects summary is still
the parent's and the journal's and identity's are new; after an object write, the objects and
blobs summaries are new too. Each reused summary is what a fresh computation gives (the restore
of that snapshot validates against it). Also: one worker pool serves every encode batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from anvil.backup import engine, refstore, workers
from anvil.backup import mode as recovery
from anvil.backup.backends.local import LocalBackend
from anvil.backup.repository import Repository
from anvil.backup.restore import restore
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil, recovery_participants
from anvil.storage import Storage

PASS = "summary reuse passphrase"


def _snapshot(anvil: Anvil, repo: Repository, *, problems: int = 0) -> dict:
    m = engine.create_snapshot(anvil.storage.root, anvil.storage.layout.catalog_path, anvil.storage.blobs,
                               anvil.storage.layout.tmp, anvil.storage.format.deployment_id,
                               recovery_participants(), repo, escrow_secrets=True)
    assert len(m["problems"]) == problems, m["problems"]
    return m


def test_unchanged_summaries_are_reused_and_every_change_is_seen(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    anvil = Anvil(tmp_path / "data")
    ctx = RequestContext(DEV_PRINCIPAL)
    try:
        anvil.objects.create_bucket(ctx, "reuse")
        for i in range(3):
            anvil.objects.put_object(ctx, "reuse", f"k{i}", anvil.storage.blobs.put_bytes(f"body {i} ".encode() * 40))
        repo = Repository.init(LocalBackend(tmp_path / "repo"), PASS)

        def summaries(m: dict) -> dict:
            return {name: p["summary"] for name, p in m["participants"].items()}

        first = _snapshot(anvil, repo)
        assert first["stats"]["summaries_reused"] == []  # no parent: everything computed

        same = _snapshot(anvil, repo)  # nothing happened since: the parent's summaries still hold
        assert same["stats"]["summaries_reused"] == ["blobs", "journal", "objects"]
        assert summaries(same) == summaries(first)

        anvil.identity.create_tenant(ctx, "reuse-tenant")  # an identity event only
        ident = _snapshot(anvil, repo)
        assert ident["stats"]["summaries_reused"] == ["objects"]
        before, after = summaries(same), summaries(ident)
        assert after["identity"]["tenants"] == before["identity"]["tenants"] + 1  # seen
        assert after["journal"]["head_seq"] > before["journal"]["head_seq"]  # seen
        assert after["objects"] == before["objects"]

        # An object event and a new blob: both summaries are computed again and see it.
        anvil.objects.put_object(ctx, "reuse", "new", anvil.storage.blobs.put_bytes(b"a new body " * 50))
        obj = _snapshot(anvil, repo)
        assert obj["stats"]["summaries_reused"] == []
        newer = summaries(obj)
        assert newer["objects"] != after["objects"]
        assert newer["blobs"]["referenced"] == after["blobs"]["referenced"] + 1

        # A blob file missing at the parent and back since (no event: the head has not moved) is
        # encoded now, so the blob store's count is taken again, not over from the parent.
        kept = b"a late body " * 50
        sha = anvil.storage.blobs.put_bytes(kept)
        anvil.objects.put_object(ctx, "reuse", "late", sha)
        path = anvil.storage.blobs.path(sha.sha256)
        os.chmod(path, 0o644)
        path.unlink()
        lost = _snapshot(anvil, repo, problems=1)
        path.write_bytes(kept)
        back = _snapshot(anvil, repo)
        assert back["stats"]["summaries_reused"] == ["objects"]
        assert summaries(back)["blobs"]["present"] == summaries(lost)["blobs"]["present"] + 1
    finally:
        anvil.close()

    # The snapshot whose objects summary was taken over restores and validates against it.
    target = tmp_path / "restored"
    res = restore(repo, repo.load_snapshot(ident["id"]), target, recovery_participants())
    assert res["ok"], res["problems"]
    storage = Storage(target)
    try:
        report = recovery.validate(storage, recovery_participants())
    finally:
        storage.close()
    assert report["ok"], report


def test_one_worker_pool_serves_every_encode_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    monkeypatch.setenv(workers.WORKERS_ENV, "2")
    monkeypatch.setenv(workers.PROCESS_MIN_ENV, "1")
    monkeypatch.setattr(refstore, "ENCODE_BATCH", 4)  # several batches from a few blobs
    started = []
    real_pool = workers.pool

    def counted(*args, **kwargs):
        started.append(args[0])
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(workers, "pool", counted)
    anvil = Anvil(tmp_path / "data")
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        anvil.objects.create_bucket(ctx, "bkt")
        for i in range(13):  # bodies as files (above the inline size), so workers read them
            anvil.objects.put_object(ctx, "bkt", f"k{i}", anvil.storage.blobs.put_bytes(bytes([i]) * 70_000))
        repo = Repository.init(LocalBackend(tmp_path / "repo"), PASS)
        m = engine.create_snapshot(anvil.storage.root, anvil.storage.layout.catalog_path, anvil.storage.blobs,
                                   anvil.storage.layout.tmp, anvil.storage.format.deployment_id,
                                   recovery_participants(), repo, escrow_secrets=True)
    finally:
        anvil.close()
    assert m["problems"] == [] and m["stats"]["blobs"] == 13
    assert started == [2]  # 4 batches, one pool
