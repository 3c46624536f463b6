"""Repository corruption and misuse: each case reports precisely what is affected, never success.

The storage path is built in-process (no server needed); the repository is written once
with small packs so data spreads over many pack files, then copied per test and damaged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from anvil.backup import engine
from anvil.backup.backends.local import LocalBackend
from anvil.backup.errors import BackupError
from anvil.backup.repository import Repository
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil
from tests.helpers import run_anvil

PASS = "s3cret passphrase"
ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": PASS}


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


def anvil_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_anvil([*args], env={**os.environ, **ENV, **(env or {})},
                          capture_output=True, timeout=120, text=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("backup-repo")
    # For this module only: left in os.environ, this passphrase reached every later module's CLI
    # subprocesses on the same worker (a "wrong passphrase" elsewhere, depending on test order).
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    data = base / "data"
    anvil = Anvil(data)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        anvil.objects.create_bucket(ctx, "photos", versioning="Enabled")
        anvil.objects.create_bucket(ctx, "docs")
        for i in range(24):
            body = os.urandom(40_000 + i)  # incompressible, so packs fill quickly
            info = anvil.storage.blobs.put_bytes(body)
            anvil.objects.put_object(ctx, "photos" if i % 2 else "docs", f"k/{i:02d}", info)
        repo = Repository.init(LocalBackend(base / "repo"), PASS, pack_target=64 * 1024)
        manifest = engine.create_snapshot(
            anvil.storage.root, anvil.storage.layout.catalog_path, anvil.storage.blobs, anvil.storage.layout.tmp,
            anvil.storage.format.deployment_id, anvil.participants(), repo)
    finally:
        anvil.close()
    yield {"base": base, "data": data, "repo": base / "repo", "manifest": manifest}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def repo_copy(built, tmp_path: Path) -> Path:
    dest = tmp_path / "repo"
    shutil.copytree(built["repo"], dest)
    return dest


def _blob_only_pack(repo_dir: Path, manifest: dict) -> tuple[str, list[str]]:
    """A pack holding only object-body chunks, and the objects those chunks belong to."""
    r = Repository.open(LocalBackend(repo_dir), PASS)
    index = r.index()
    file_chunks = {c for e in manifest["tree"]["files"].values() for c in e["chunks"]}
    file_packs = {index[c].pack for c in file_chunks}
    for entry in manifest["tree"]["blobs"].values():
        pack = index[entry["chunks"][0]].pack
        if pack not in file_packs:
            users = [ref for e in manifest["tree"]["blobs"].values() if any(index[c].pack == pack for c in e["chunks"])
                     for ref in e["refs"]]
            return pack, users
    raise AssertionError("no blob-only pack")


def test_verify_read_data_clean(built) -> None:
    proc = anvil_cli("backup", "verify", "--repo", f"file://{built['repo']}", "--read-data", "--json")
    out = json.loads(proc.stdout)
    assert proc.returncode == 0 and out["ok"] and out["chunks_read"] == out["chunks"] > 10 and out["packs"] > 5


def test_flipped_byte_names_chunk_pack_and_objects(built, repo_copy: Path) -> None:
    pack, users = _blob_only_pack(repo_copy, built["manifest"])
    path = repo_copy / "data" / pack[:2] / pack
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0x01
    path.write_bytes(bytes(raw))
    proc = anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}", "--read-data", "--json")
    assert proc.returncode == 1
    errors = json.loads(proc.stdout)["errors"]
    assert any(e["what"] == f"pack {pack}" and "does not hash to its name" in e["problem"] for e in errors)
    bad_chunks = [e for e in errors if e["what"].startswith("chunk ")]
    assert len(bad_chunks) == 1 and bad_chunks[0]["pack"] == pack and bad_chunks[0]["offset"] == 0
    affected = " ".join(bad_chunks[0]["affects"])
    assert "blob" in affected and any(u.split("@")[0] in affected for u in users)
    # Human output names the same things.
    text = anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}", "--read-data")
    assert text.returncode == 1 and pack in text.stdout and "affects" in text.stdout


def test_deleted_pack_reported_with_affected_objects(built, repo_copy: Path) -> None:
    pack, users = _blob_only_pack(repo_copy, built["manifest"])
    (repo_copy / "data" / pack[:2] / pack).unlink()
    proc = anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}", "--json")
    assert proc.returncode == 1
    errors = json.loads(proc.stdout)["errors"]
    assert errors and all(f"pack {pack} is missing" == e["problem"] for e in errors)
    assert any(users[0].split("@")[0] in " ".join(e["affects"]) for e in errors)


def test_snapshot_with_missing_chunks_restore_names_objects(built, repo_copy: Path, tmp_path: Path) -> None:
    pack, users = _blob_only_pack(repo_copy, built["manifest"])
    (repo_copy / "data" / pack[:2] / pack).unlink()
    target = tmp_path / "restored"
    proc = anvil_cli("restore", "--repo", f"file://{repo_copy}", "--target", str(target), "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert not out["ok"] and out["problems"]
    assert all(f"pack {pack} is missing" in p for p in out["problems"])
    named = " ".join(out["problems"])
    assert all(u in named for u in users)
    # The partial result is left in recovery mode and validation fails on exactly those objects.
    val = anvil_cli("recovery", "validate", "--storage-path", str(target), "--json")
    assert val.returncode == 1
    report = json.loads(val.stdout)
    missing = [f for f in report["needs_operator"] if f["participant"] == "blobs"]
    assert missing and all("missing" in f["message"] for f in missing)
    resume = anvil_cli("recovery", "resume", "--storage-path", str(target))
    assert resume.returncode == 1 and "validation failed" in resume.stderr
    forced = anvil_cli("recovery", "resume", "--storage-path", str(target), "--force")
    assert forced.returncode == 1 and "--reason" in forced.stderr
    ok = anvil_cli("recovery", "resume", "--storage-path", str(target), "--force", "--reason", "accept loss")
    assert ok.returncode == 0, ok.stderr


def test_truncated_index(built, repo_copy: Path) -> None:
    (idx,) = list((repo_copy / "index").iterdir())
    idx.write_bytes(idx.read_bytes()[: idx.stat().st_size // 2])
    proc = anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}", "--json")
    assert proc.returncode == 1
    errors = json.loads(proc.stdout)["errors"]
    assert errors[0]["what"] == "index" and idx.name in errors[0]["problem"] and "truncated" in errors[0]["problem"]
    unindexed = [e for e in errors if e["problem"] == "referenced by a snapshot but in no index"]
    # The blob tree is stored in chunks too (pages): with their index gone the blobs' chunks are
    # unknown, and verify says so per snapshot; every chunk it does know of is reported.
    full = Repository.open(LocalBackend(built["repo"]), PASS)
    known = set()
    for sid in full.snapshot_ids():
        m = full.load_snapshot(sid, pages=False)
        known |= {c for e in m["tree"]["files"].values() for c in e["chunks"]} | {p[0] for p in m["tree"]["blob_pages"]}
    assert {e["what"].split()[1] for e in unindexed} == known
    assert any("catalog.db" in " ".join(e["affects"]) for e in unindexed)
    assert any("blob tree page" in " ".join(e["affects"]) for e in unindexed)
    assert any(e["what"].startswith("snapshot ") and "blob tree" in e["problem"] for e in errors)
    prune = anvil_cli("backup", "forget", "--repo", f"file://{repo_copy}", "--keep-last", "1", "--prune")
    assert prune.returncode == 1 and "refusing to prune" in prune.stderr


def test_wrong_passphrase(built) -> None:
    before = sorted(p.name for p in built["repo"].rglob("*"))
    proc = anvil_cli("backup", "list", "--repo", f"file://{built['repo']}",
                     env={"ANVIL_BACKUP_PASSPHRASE": "not it"})
    assert proc.returncode == 1 and "wrong passphrase" in proc.stderr
    assert sorted(p.name for p in built["repo"].rglob("*")) == before
    with pytest.raises(BackupError, match="wrong passphrase"):
        Repository.open(LocalBackend(built["repo"]), "also wrong")


def test_restore_into_non_empty_dir_is_refused(built, tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    proc = anvil_cli("restore", "--repo", f"file://{built['repo']}", "--target", str(target))
    assert proc.returncode == 1 and "not empty" in proc.stderr and "--force" in proc.stderr
    assert [p.name for p in target.iterdir()] == ["precious.txt"]
    forced = anvil_cli("restore", "--repo", f"file://{built['repo']}", "--target", str(target), "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert (target / "precious.txt").read_text() == "keep me" and (target / "RECOVERY").exists()


def test_newer_format_version_is_refused(repo_copy: Path) -> None:
    cfg = json.loads((repo_copy / "config").read_text())
    cfg["format_version"] = 99
    (repo_copy / "config").write_text(json.dumps(cfg))
    before = (repo_copy / "config").read_bytes()
    proc = anvil_cli("backup", "list", "--repo", f"file://{repo_copy}")
    assert proc.returncode == 1 and "format version 99" in proc.stderr and "upgrade" in proc.stderr
    assert (repo_copy / "config").read_bytes() == before


def test_other_chunk_id_scheme_is_refused(repo_copy: Path) -> None:
    # Chunk ids computed another way could neither dedupe nor verify: refuse, change nothing.
    cfg = json.loads((repo_copy / "config").read_text())
    assert cfg["chunk_id"] == "hmac-sha256(sha256)"
    cfg["chunk_id"] = "hmac-sha256"
    (repo_copy / "config").write_text(json.dumps(cfg))
    before = sorted(p.relative_to(repo_copy) for p in repo_copy.rglob("*"))
    proc = anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}")
    assert proc.returncode == 1 and "chunk ids are 'hmac-sha256'" in proc.stderr
    assert sorted(p.relative_to(repo_copy) for p in repo_copy.rglob("*")) == before


def test_repo_inside_storage_path_is_refused(built) -> None:
    # URL schemes and the backends themselves: tests/test_backup_backends.py.
    proc = anvil_cli("backup", "init", "--repo", f"file://{built['data']}/backups", "--storage-path",
                     str(built["data"]))
    assert proc.returncode == 1 and "inside STORAGE_PATH" in proc.stderr
    assert not (built["data"] / "backups").exists()


def test_keys_add_passwd_remove(repo_copy: Path) -> None:
    r = Repository.open(LocalBackend(repo_copy), PASS)
    first = r.key_id
    added = anvil_cli("backup", "key", "add", "--repo", f"file://{repo_copy}", "--json",
                      env={"ANVIL_BACKUP_NEW_PASSPHRASE": "second"})
    assert added.returncode == 0, added.stderr
    assert Repository.open(LocalBackend(repo_copy), "second").key_id == json.loads(added.stdout)["added"]
    changed = anvil_cli("backup", "key", "passwd", "--repo", f"file://{repo_copy}",
                        env={"ANVIL_BACKUP_NEW_PASSPHRASE": "third"})
    assert changed.returncode == 0, changed.stderr
    with pytest.raises(BackupError, match="wrong passphrase"):
        Repository.open(LocalBackend(repo_copy), PASS)
    r3 = Repository.open(LocalBackend(repo_copy), "third")
    assert first not in r3.key_ids()
    assert r3.snapshots()  # same data, no re-encryption
    r3.remove_key(Repository.open(LocalBackend(repo_copy), "second").key_id)
    with pytest.raises(BackupError, match="last key"):
        r3.remove_key(r3.key_id)


def test_forget_and_prune(built, repo_copy: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(built["data"], data)
    anvil = Anvil(data)
    try:
        repo = Repository.open(LocalBackend(repo_copy), PASS)
        ctx = RequestContext(DEV_PRINCIPAL)
        for round_ in range(2):
            for i in range(3):
                info = anvil.storage.blobs.put_bytes(os.urandom(30_000))
                anvil.objects.put_object(ctx, "docs", f"new/{round_}-{i}", info)
            anvil.objects.delete_object(ctx, "docs", f"k/{round_ * 2:02d}")  # its blob becomes unreferenced
            engine.create_snapshot(anvil.storage.root, anvil.storage.layout.catalog_path, anvil.storage.blobs,
                                   anvil.storage.layout.tmp, anvil.storage.format.deployment_id,
                                   anvil.participants(), repo)
    finally:
        anvil.close()
    def stored() -> int:
        return sum(p.stat().st_size for p in (repo_copy / "data").rglob("*") if p.is_file())

    bytes_before = stored()
    proc = anvil_cli("backup", "forget", "--repo", f"file://{repo_copy}", "--keep-last", "1", "--prune", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert len(res["removed"]) == 2 and len(res["kept"]) == 1
    assert res["prune"]["packs_deleted"] + res["prune"]["packs_repacked"] > 0
    assert stored() == bytes_before - res["prune"]["bytes_freed"] + res["prune"]["new_pack_bytes"] < bytes_before
    check = anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}", "--read-data", "--json")
    assert check.returncode == 0, check.stdout
    restored = anvil_cli("restore", "--repo", f"file://{repo_copy}", "--target", str(tmp_path / "r"), "--json")
    assert restored.returncode == 0, restored.stdout
    nothing = anvil_cli("backup", "forget", "--repo", f"file://{repo_copy}")
    assert nothing.returncode == 1 and "refusing to forget every snapshot" in nothing.stderr


def test_drill_fails_and_says_why(built, repo_copy: Path, tmp_path: Path) -> None:
    pack, users = _blob_only_pack(repo_copy, built["manifest"])
    (repo_copy / "data" / pack[:2] / pack).unlink()
    # The restore fails before any server starts, so the credential is never used.
    proc = anvil_cli("drill", "--repo", f"file://{repo_copy}", "--report-dir", str(tmp_path),
                     env={"ANVIL_CLIENT_ID": "unused", "ANVIL_CLIENT_SECRET": "unused"})
    assert proc.returncode == 1 and "DRILL FAILED" in proc.stdout
    report = json.loads((tmp_path / "drill-report.json").read_text())
    assert not report["ok"]
    failed = [c for c in report["checks"] if not c["ok"]]
    assert failed[0]["check"] == "restore into an isolated directory"
    assert users[0] in " ".join(f["message"] for f in failed[0]["findings"])
    assert "FAILED" in (tmp_path / "drill-report.md").read_text()


def test_prune_refuses_while_a_backup_holds_the_repository(repo_copy: Path) -> None:
    repo = Repository.open(LocalBackend(repo_copy), PASS)
    with repo.lock("shared"):  # as a running `backup create` holds it
        proc = anvil_cli("backup", "forget", "--repo", f"file://{repo_copy}", "--keep-last", "1", "--prune")
        assert proc.returncode == 1 and "locked" in proc.stderr and "shared lock by pid" in proc.stderr
        assert anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}").returncode == 0  # shared is fine
    assert not list((repo_copy / "locks").iterdir())
    # A lock of another host with a recent heartbeat cannot be judged from here: it blocks until
    # `backup unlock` (stale locks are taken over: tests/test_backup_interrupted.py).
    now = time.time()
    (repo_copy / "locks" / "exclusive-other").write_text(json.dumps({"kind": "exclusive", "pid": 1, "host": "h",
                                                                     "time": now, "heartbeat": now}))
    blocked = anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}")
    assert blocked.returncode == 1 and "backup unlock" in blocked.stderr
    assert anvil_cli("backup", "unlock", "--repo", f"file://{repo_copy}").returncode == 0
    assert anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}").returncode == 0


def test_interrupted_restore_stays_in_recovery_mode(built, repo_copy: Path, tmp_path: Path) -> None:
    """A restore that stops partway (here: catalog.db's chunks are gone) never looks finished."""
    r = Repository.open(LocalBackend(repo_copy), PASS)
    index = r.index()
    for chunk in built["manifest"]["tree"]["files"]["catalog.db"]["chunks"]:
        pack = index[chunk].pack
        (repo_copy / "data" / pack[:2] / pack).unlink(missing_ok=True)
    # An empty target is cleaned up after a failure; a forced restore over an existing directory
    # (like a process killed mid-restore) is left behind, and must stay in recovery mode.
    empty = tmp_path / "empty"
    proc = anvil_cli("restore", "--repo", f"file://{repo_copy}", "--target", str(empty), "--json")
    assert proc.returncode != 0 and "missing from the repository" in proc.stdout
    assert not empty.exists() or not any(empty.iterdir())
    target = tmp_path / "half"
    target.mkdir()
    (target / "operator-notes.txt").write_text("kept")
    proc = anvil_cli("restore", "--repo", f"file://{repo_copy}", "--target", str(target), "--force", "--json")
    assert proc.returncode != 0 and "missing from the repository" in proc.stdout
    marker = json.loads((target / "RECOVERY").read_text())
    assert marker["incomplete"] is True and "did not finish" in marker["problems"][0]
    val = anvil_cli("recovery", "validate", "--storage-path", str(target), "--json")
    assert val.returncode != 0


def test_sealing_nonces_come_from_a_pool_and_never_repeat() -> None:
    """seal() takes its nonces from a per-thread pool of getrandom output (one syscall per many
    chunks): every nonce is fresh, across pool refills and threads, and every chunk opens."""
    import threading

    from anvil.backup.crypto import NONCE, seal, unseal

    key = os.urandom(32)
    nonces: list[bytes] = []
    lock = threading.Lock()

    def run() -> None:
        mine = []
        for i in range(1000):  # ~3 pool refills per thread
            blob = seal(key, b"chunk %d" % i, b"aad")
            assert unseal(key, blob, b"aad") == b"chunk %d" % i
            mine.append(blob[:NONCE])
        with lock:
            nonces.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(nonces) == 3000 and len(set(nonces)) == 3000
