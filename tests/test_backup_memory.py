"""A backup's references and new blob tree go through an on-disk sorted store (`backup.refstore`)
and the summaries stream (`storage.spill`): the snapshot must be exactly what the in-memory path
made. In-process, on a real store: the batch sizes are made tiny so every batch, run and merge
boundary is crossed by a few dozen objects."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from anvil.backup import engine, refstore
from anvil.backup import mode as recovery
from anvil.backup.backends.local import LocalBackend
from anvil.backup.repository import Repository, compress_manifest
from anvil.backup.restore import restore
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil, recovery_participants
from anvil.storage import Storage, records, spill
from anvil.storage.recovery import RecoveryContext


def test_sorter_sorts_as_sorted_across_spilled_runs(tmp_path: Path) -> None:
    rng = random.Random(7)
    alphabet = "ab\"\\,\n\u00e9\u4e2d\U0001f600z"
    for run in (1, 3, 50, 10_000):
        items = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(6))) for _ in range(400)]
        assert list(spill.sorted_strings(items, tmp_path, run=run)) == sorted(items), run
    assert list(spill.sorted_strings([], tmp_path, run=2)) == []


def _snapshot(anvil: Anvil, repo: Repository) -> dict:
    s = anvil.storage
    return engine.create_snapshot(s.root, s.layout.catalog_path, s.blobs, s.layout.tmp, s.format.deployment_id,
                                  anvil.participants(), repo, escrow_secrets=True)


def _expected_tree(anvil: Anvil, chunks_of: dict) -> dict:
    """The blob tree as the in-memory path built it: every reference, sorted by hash, with its
    first three labels (and how many more)."""
    conn = records.open_readonly(anvil.storage.layout.catalog_path)
    try:
        refs = RecoveryContext(anvil.storage.root, conn, anvil.storage.blobs, anvil.participants()).references()
    finally:
        records.close(conn)
    out = {}
    for sha, uses in refs.items():
        labels = [u.label for u in uses]
        out[sha] = {"size": uses[0].size, "chunks": chunks_of[sha],
                    "refs": labels[:3] + ([f"+{len(labels) - 3} more"] if len(labels) > 3 else [])}
    return out


def test_tree_from_the_sorted_store_is_the_in_memory_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    monkeypatch.setenv("ANVIL_BACKUP_CACHE_DIR", "off")
    monkeypatch.setattr(refstore, "INSERT_BATCH", 4)
    monkeypatch.setattr(refstore, "ENCODE_BATCH", 7)
    monkeypatch.setattr(spill, "RUN", 5)
    rng = random.Random(3)
    anvil = Anvil(tmp_path / "data")
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        anvil.objects.create_bucket(ctx, "mem")
        shared = b"one body under many keys"
        for i in range(40):
            # Unique bodies, one shared by six keys (its refs note: three labels and "+3 more"),
            # a large one stored as a file (over the inline threshold).
            body = shared if i % 7 == 0 else rng.randbytes(rng.randrange(1, 3000))
            anvil.objects.put_object(ctx, "mem", f"k/{i:03d}-\u00e9", anvil.objects.store_bytes(body))
        anvil.objects.put_object(ctx, "mem", "big", anvil.objects.store_bytes(rng.randbytes(200_000)))
        repo = Repository.init(LocalBackend(tmp_path / "repo"), "pw")
        first = _snapshot(anvil, repo)
        assert first["problems"] == []
        saved = repo.load_snapshot(first["id"])
        tree = saved["tree"]["blobs"]
        assert list(tree) == sorted(tree)
        assert tree == _expected_tree(anvil, {sha: e["chunks"] for sha, e in tree.items()})
        assert any(e["refs"][-1] == "+3 more" for e in tree.values())
        assert first["stats"]["blobs"] == len(tree) and first["stats"]["blobs_reused_from_parent"] == 0
        # The caller's copy reads the saved tree back when used; the manifest's bytes are
        # those of the whole dict's JSON.
        assert dict(first["tree"]["blobs"]) == tree and len(first["tree"]["blobs"]) == len(tree)
        assert compress_manifest(saved) == compress_manifest(json.loads(json.dumps(saved)))
        # Snapshot rows are read up to the tree (never the whole manifest), field for field.
        from anvil.backup.repository import ROW_FIELDS
        assert repo.snapshot_rows() == [{k: saved.get(k) for k in ROW_FIELDS}]
        # A second snapshot takes every entry over from its parent (streamed merge) but one.
        anvil.objects.put_object(ctx, "mem", "k/new", anvil.objects.store_bytes(b"a new body"))
        second = _snapshot(anvil, repo)
        tree2 = repo.load_snapshot(second["id"])["tree"]["blobs"]
        assert second["stats"]["blobs"] == len(tree) + 1 == len(tree2)
        assert second["stats"]["blobs_reused_from_parent"] == len(tree)
        assert tree2 == _expected_tree(anvil, {sha: e["chunks"] for sha, e in tree2.items()})
        # Summaries streamed from the store equal the in-memory ones (the restore compares them).
        conn = records.open_readonly(anvil.storage.layout.catalog_path)
        try:
            live = RecoveryContext(anvil.storage.root, conn, anvil.storage.blobs, anvil.participants())
            want = {p.name: p.summary(live) for p in anvil.participants()}
        finally:
            records.close(conn)
        got = {name: v["summary"] for name, v in second["participants"].items()}
        assert got["blobs"] == want["blobs"] and got["objects"] == want["objects"]
        assert not list(anvil.storage.layout.tmp.iterdir())  # the scratch store went with the checkpoint
    finally:
        anvil.close()
    restored = tmp_path / "restored"
    assert restore(repo, repo.load_snapshot(second["id"]), restored, recovery_participants())["ok"]
    storage = Storage(restored)
    try:
        report = recovery.validate(storage, recovery_participants())
    finally:
        storage.close()
    assert report["ok"], report
