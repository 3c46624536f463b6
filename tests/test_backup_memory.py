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


def test_packed_chunk_index_answers_as_a_dict(tmp_path: Path) -> None:
    """The repository's chunk index (`backup.chunkindex`, 52 bytes a chunk) against a dict."""
    import secrets

    from anvil.backup.chunkindex import ChunkIndex, iter_index_packs
    from anvil.backup.pack import Location, compress

    rng = random.Random(11)
    index, want = ChunkIndex(), {}
    ids = [secrets.token_hex(32) for _ in range(3000)]
    # A few ids share their first two bytes (one bucket), one is an id no writer makes.
    ids += [ids[0][:4] + secrets.token_hex(30) for _ in range(20)] + ["not-hex"]
    for i, cid in enumerate(ids):
        loc = Location(f"pack{i % 17}", rng.randrange(1 << 40), rng.randrange(1 << 30), rng.randrange(1 << 30))
        index[cid] = want[cid] = loc
    index[ids[5]] = want[ids[5]] = Location("moved", 1, 2, 3)  # the last location recorded wins
    assert len(index) == len(want)
    assert all(index[c] == want[c] and c in index for c in ids)
    assert dict(index.items()) == want and sorted(index) == sorted(want)
    assert index.packs() == {loc.pack for loc in want.values()}
    # A record's bytes that straddle two records are no match.
    straddle = (bytes.fromhex(ids[0])[10:] + bytes(20) + bytes.fromhex(ids[1])[:10]).hex()
    for miss in (secrets.token_hex(32), straddle, "", 7):
        assert miss not in index and index.get(miss) is None  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        index[secrets.token_hex(32)]
    # Index files are decoded one pack object at a time, across read boundaries, in any spacing.
    packs = [{"id": f"p{k}", "size": k, "chunks": [[c, 1, 2, 3] for c in ids[k * 100:(k + 1) * 100]]}
             for k in range(12)]
    for seps in ((",", ":"), None):
        text = json.dumps({"packs": packs}, separators=seps).encode()
        for body in (compress(text), b"\x00" + text):
            assert list(iter_index_packs(body)) == packs
        with pytest.raises(ValueError):
            list(iter_index_packs(compress(text[:-300])))
    assert list(iter_index_packs(compress(b'{"packs":[]}'))) == []


def test_chunks_dedup_across_snapshots_through_the_packed_index(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A second deployment with the same bodies (no parent tree to take entries over from) stores
    none of their chunks again: each is found in the index read back from the repository's files."""
    from anvil.backup import chunkindex, pack

    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    monkeypatch.setenv("ANVIL_BACKUP_CACHE_DIR", "off")
    monkeypatch.setattr(chunkindex, "READ", 97)  # index files decoded across many read boundaries
    monkeypatch.setattr(pack, "INDEX_CHUNKS", 8)  # a session's index written in several files
    rng = random.Random(5)
    bodies = [rng.randbytes(rng.randrange(100, 3000)) for _ in range(30)]
    Repository.init(LocalBackend(tmp_path / "repo"), "pw", pack_target=16 * 1024)
    trees = []
    for name in ("a", "b"):
        anvil = Anvil(tmp_path / name)
        try:
            ctx = RequestContext(DEV_PRINCIPAL)
            anvil.objects.create_bucket(ctx, "mem")
            for i, body in enumerate(bodies):
                anvil.objects.put_object(ctx, "mem", f"{name}/{i}", anvil.objects.store_bytes(body))
            fresh = Repository.open(LocalBackend(tmp_path / "repo"), "pw")  # its index from the files
            manifest = _snapshot(anvil, fresh)
        finally:
            anvil.close()
        assert manifest["problems"] == [] and manifest["parent"] is None
        trees.append((manifest, fresh.load_snapshot(manifest["id"])["tree"]))
    (first, tree_a), (second, tree_b) = trees
    assert len(tree_a["blobs"]) == len(bodies) and tree_b["blobs"].keys() == tree_a["blobs"].keys()
    assert all(tree_b["blobs"][s]["chunks"] == e["chunks"] for s, e in tree_a["blobs"].items())
    file_chunks = sum(len(e["chunks"]) for e in tree_b["files"].values())
    # New in the second: its files' chunks and its blob tree's pages (the refs name other keys), no body.
    assert first["stats"]["new_chunks"] >= len(bodies)
    assert second["stats"]["new_chunks"] <= file_chunks + len(tree_b["blob_pages"])
    index = Repository.open(LocalBackend(tmp_path / "repo"), "pw").index()
    used = {c for t in (tree_a, tree_b) for e in [*t["files"].values(), *t["blobs"].values()] for c in e["chunks"]}
    assert used <= set(index) and len(list(index.packs())) > 3
    assert len(list((tmp_path / "repo" / "index").iterdir())) > 2  # one a session without the early writes


def test_server_allocator_settings_leave_the_environment_s_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """`anvil serve` bounds glibc's arenas (`api.malloc`) unless the environment sets them, or
    ANVIL_MALLOC_TUNE=off asks for glibc's defaults."""
    import ctypes

    from anvil.api import malloc

    try:
        assert ctypes.CDLL(None).mallopt is not None
    except (AttributeError, OSError):
        pytest.skip("not glibc")
    monkeypatch.setenv(malloc.TUNE_ENV, "off")
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert malloc.tune() == {}
    monkeypatch.delenv(malloc.TUNE_ENV)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert malloc.tune() == {}
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert malloc.tune() == {"arena_max": malloc.ARENA_MAX}
