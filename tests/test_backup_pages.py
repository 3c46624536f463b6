"""The blob tree in content-addressed pages, and the snapshot of an unchanged store (`backup.treepages`,
`engine._unchanged_snapshot`).

One small store, snapshots taken in process (pages made small so a few dozen blobs fill several):
a snapshot with nothing changed lists its parent's catalog.db and pages, and restores and validates
to the same state; a change after it writes only the pages it touches and is seen; a change outside
the journal (a summary that differs) takes the full path; forgetting the parent and pruning keeps
what the child uses; verify --read-data reads the pages, and a damaged page shared by two snapshots
is reported as affecting both. Snapshots with an inline tree (older ones) stay readable beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anvil.backup import engine, treepages
from anvil.backup import mode as recovery
from anvil.backup.backends.local import LocalBackend
from anvil.backup.repository import Repository, compress_manifest
from anvil.backup.restore import restore
from anvil.backup.treestream import light_tree
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil, recovery_participants
from anvil.storage import Storage

PASS = "pages passphrase"


def _snapshot(anvil: Anvil, repo: Repository, **kwargs) -> dict:
    m = engine.create_snapshot(anvil.storage.root, anvil.storage.layout.catalog_path, anvil.storage.blobs,
                               anvil.storage.layout.tmp, anvil.storage.format.deployment_id,
                               recovery_participants(), repo, **{"escrow_secrets": True, **kwargs})
    assert m["problems"] == [], m["problems"]
    return m


def _restores_and_validates(repo: Repository, snap_id: str, target: Path) -> dict:
    res = restore(repo, repo.load_snapshot(snap_id), target, recovery_participants())
    assert res["ok"], res["problems"]
    storage = Storage(target)
    try:
        report = recovery.validate(storage, recovery_participants())
    finally:
        storage.close()
    assert report["ok"], json.dumps(report, default=str)[-2500:]
    return res


@pytest.fixture(scope="module")
def snaps(tmp_path_factory: pytest.TempPathFactory) -> dict:
    mp = pytest.MonkeyPatch()
    mp.setenv("ANVIL_BACKUP_KDF", "test")
    mp.setenv("ANVIL_BACKUP_CACHE_DIR", "off")
    mp.setattr(treepages, "PAGE_END", "0")  # a page ends after one blob in 16: several pages from 40 blobs
    base = tmp_path_factory.mktemp("pages")
    anvil = Anvil(base / "data")
    ctx = RequestContext(DEV_PRINCIPAL)
    out: dict = {"base": base}
    try:
        anvil.objects.create_bucket(ctx, "pages")
        for i in range(40):
            anvil.objects.put_object(ctx, "pages", f"k{i}", anvil.storage.blobs.put_bytes(f"body {i} ".encode() * 30))
        repo = Repository.init(LocalBackend(base / "repo"), PASS)
        out["first"] = _snapshot(anvil, repo)
        out["same"] = _snapshot(anvil, repo)  # nothing happened: the parent's catalog.db and pages
        anvil.objects.put_object(ctx, "pages", "late", anvil.storage.blobs.put_bytes(b"a later body " * 40))
        out["changed"] = _snapshot(anvil, repo)
        out["again"] = _snapshot(anvil, repo)
        out["other_escrow"] = _snapshot(anvil, repo, escrow_secrets=False)  # a different choice: full path
        # A record changed outside the journal: a summary differs, so the catalog is copied again.
        anvil.storage.catalog.mutate(lambda txn: txn.conn.execute(
            "INSERT INTO findings(id, time, subsystem, severity, invariant, detail, affected, origin, "
            "fingerprint, repair_attempted, operator_action_required) "
            "VALUES ('f-unjournaled', 0, 'objects', 'warning', 'x.y', 'not journaled', '{}', 'test', 'fp', 0, 0)"),
            actor="test", request_id="test")
        out["outside"] = _snapshot(anvil, repo, escrow_secrets=False)
    finally:
        anvil.close()
        mp.undo()
    return out


def _open(snaps: dict) -> Repository:
    return Repository.open(LocalBackend(snaps["base"] / "repo"), PASS)


def test_unchanged_store_lists_its_parents_catalog_and_pages(snaps: dict, tmp_path: Path) -> None:
    first, same = snaps["first"], snaps["same"]
    repo = _open(snaps)
    a, b = repo.load_snapshot(first["id"], pages=False), repo.load_snapshot(same["id"], pages=False)
    assert len(a["tree"]["blob_pages"]) > 2 and "blobs" not in a["tree"]
    assert same["stats"]["unchanged_since_parent"] is True and "unchanged_since_parent" not in first["stats"]
    assert b["tree"]["blob_pages"] == a["tree"]["blob_pages"]
    assert b["tree"]["files"]["catalog.db"] == a["tree"]["files"]["catalog.db"]
    assert b["tree"] == a["tree"]  # taken over as written (its chunk lists never decoded)
    assert set(b) == set(a) and list(b)[-1] == "tree"  # last, as treestream reads it
    assert b["consistency"]["journal_seq"] == a["consistency"]["journal_seq"]
    assert {n: p["summary"] for n, p in b["participants"].items()} == \
        {n: p["summary"] for n, p in a["participants"].items()}
    assert same["stats"]["blobs"] == first["stats"]["blobs"] == 41 - 1  # (the later one is not there yet)
    assert same["stats"]["new_bytes"] < 2048  # FORMAT and the escrowed keys are deduplicated: nothing
    # The expanded tree is the parent's, entry for entry, and restores to the same state.
    assert repo.load_snapshot(same["id"])["tree"]["blobs"] == repo.load_snapshot(first["id"])["tree"]["blobs"]
    res = _restores_and_validates(repo, same["id"], tmp_path / "same")
    assert res["blobs_restored"] == 40


def test_a_change_after_a_reused_tree_is_seen_and_shares_pages(snaps: dict, tmp_path: Path) -> None:
    same, changed, again = snaps["same"], snaps["changed"], snaps["again"]
    repo = _open(snaps)
    assert "unchanged_since_parent" not in changed["stats"] and changed["parent"] == same["id"]
    old = repo.load_snapshot(same["id"], pages=False)["tree"]["blob_pages"]
    new = repo.load_snapshot(changed["id"], pages=False)["tree"]["blob_pages"]
    # One blob more: the page it falls in is new (or two, at a boundary); the others are the parent's.
    assert 1 <= changed["stats"]["tree_pages_new"] <= 2
    assert len({p[0] for p in new} - {p[0] for p in old}) == changed["stats"]["tree_pages_new"]
    assert sum(n for _, n in new) == 41 == changed["stats"]["blobs"]
    assert again["stats"].get("unchanged_since_parent") is True
    res = _restores_and_validates(repo, again["id"], tmp_path / "again")
    assert res["blobs_restored"] == 41


def test_what_the_journal_does_not_show_takes_the_full_path(snaps: dict) -> None:
    other, outside = snaps["other_escrow"], snaps["outside"]
    assert "unchanged_since_parent" not in other["stats"]  # the escrow choice differs from the parent's
    assert "unchanged_since_parent" not in outside["stats"]  # a finding written without an event
    assert outside["consistency"]["journal_seq"] == other["consistency"]["journal_seq"]
    assert outside["participants"]["diagnostics"]["summary"] != other["participants"]["diagnostics"]["summary"]


def test_forget_prune_verify_keep_what_children_use(snaps: dict, tmp_path: Path) -> None:
    repo = _open(snaps)
    ok = engine.verify(repo, read_data=True)
    assert ok["ok"], ok["errors"]
    pages = {c for sid in repo.snapshot_ids() for c in treepages.page_ids(repo.load_snapshot(sid, pages=False))}
    assert ok["chunks_read"] >= len(pages)
    # Forget all but the newest three and prune: `again` (its catalog.db and pages its parent's,
    # and its grandparent's) loses both, and still restores.
    result = engine.forget(repo, keep_last=3, prune=True)
    assert {snaps[n]["id"] for n in ("first", "same", "changed")} == set(result["removed"])
    repo = _open(snaps)
    after = engine.verify(repo, read_data=True)
    assert after["ok"] and after["snapshots"] == 3, after["errors"]
    _restores_and_validates(repo, snaps["again"]["id"], tmp_path / "kept")


def test_a_damaged_shared_page_is_found_by_verify(snaps: dict, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(snaps["base"] / "repo", copy)
    repo = Repository.open(LocalBackend(copy), PASS)
    ids = repo.snapshot_ids()
    manifests = {sid: repo.load_snapshot(sid, pages=False) for sid in ids}
    users: dict[str, list[str]] = {}
    for sid, m in manifests.items():
        for cid in treepages.page_ids(m):
            users.setdefault(cid, []).append(sid)
    cid, sharing = next((c, s) for c, s in users.items() if len(s) >= 2)
    loc = repo.index()[cid]
    pack = copy / "data" / loc.pack[:2] / loc.pack
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0xFF
    pack.chmod(0o644)
    pack.write_bytes(bytes(data))
    report = engine.verify(Repository.open(LocalBackend(copy), PASS), read_data=True)
    assert not report["ok"]
    bad = [e for e in report["errors"] if e["what"] == f"chunk {cid}"]
    assert bad and all(f"snapshot {sid}: blob tree page" in bad[0]["affects"] for sid in sharing), report["errors"]
    # Reading such a snapshot says which page, and restore refuses rather than restoring a partial tree.
    unreadable = [e for e in report["errors"] if e["what"] == f"snapshot {sharing[0]}"]
    assert unreadable and cid in unreadable[0]["problem"]
    with pytest.raises(Exception, match=cid):
        Repository.open(LocalBackend(copy), PASS).load_snapshot(sharing[0])


def test_an_inline_tree_snapshot_is_read_beside_paged_ones(snaps: dict, tmp_path: Path) -> None:
    """A manifest with `tree.blobs` (every snapshot before pages) is read, restored, and used as a parent."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(snaps["base"] / "repo", copy)
    repo = Repository.open(LocalBackend(copy), PASS)
    m = repo.load_snapshot(snaps["again"]["id"])  # (escrowed: it validates)
    del m["tree"]["blob_pages"]  # as an older Anvil wrote it: the whole tree inline
    m["id"] = "0ld" + m["id"][3:]
    m["started"] += 1
    repo.save_snapshot(m)
    again = Repository.open(LocalBackend(copy), PASS)
    loaded = again.load_snapshot(m["id"])
    assert "blob_pages" not in loaded["tree"] and len(loaded["tree"]["blobs"]) == 41
    _restores_and_validates(again, m["id"], tmp_path / "old")
    assert json.dumps(engine.verify(again)["errors"]) == "[]"


def test_the_cli_pack_size_default_is_the_engines() -> None:
    from anvil.backup import pack
    from anvil.cli import backup as cli_backup

    assert cli_backup.PACK_TARGET == pack.PACK_TARGET


@pytest.mark.timeout(30)
def test_light_tree_leaves_out_only_the_chunk_lists() -> None:
    """An unchanged snapshot decodes its parent's tree without the files' chunk lists; names that
    spell a chunk list inside a string are left alone, and a manifest cannot carry two trees."""
    odd = 'odd"chunks":["x]'  # escaped in the JSON text: not a chunk list
    tree = {"files": {"catalog.db": {"size": 5, "chunks": ["ab" * 32, "cd" * 32],
                                     "chunking": {"method": "fixed", "size": 65536}},
                      odd: {"size": 1, "sha256": "00", "chunks": ["ef" * 32], "mode": 384}},
            "blob_pages": [["aa" * 32, 3]], "blob_page_keys": [["aa" * 32, "k", 7]]}
    light = light_tree(json.dumps(tree, separators=(",", ":")))
    tree["files"]["catalog.db"]["chunks"] = None
    tree["files"][odd]["chunks"] = None
    assert light == tree
    with pytest.raises(ValueError, match="a tree and tree_json"):
        compress_manifest({"id": "x", "tree": {}}, "{}")
