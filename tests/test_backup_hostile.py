"""A hostile repository and a hostile restore, through the CLI as an operator meets them.

One tiny store (two buckets, versioned objects, small and file-sized bodies) is backed up
offline three times: two full snapshots and a journal delta, into a repository of small packs.
Each test damages a copy of that repository the way a disk, a careless operator or a crash
would, and checks that every command either does exactly the right thing or says precisely
what is damaged: never a traceback, never a bare OS error, never a repository made worse.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anvil.backup.backends.local import LocalBackend
from anvil.backup.repository import Repository
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil
from tests.helpers import run_anvil

pytestmark = pytest.mark.timeout(180)

PASS = "hostile passphrase"
# No snapshot-header cache: a header cached before the damage would hide it from the commands.
ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": PASS, "ANVIL_BACKUP_CACHE_DIR": "off"}


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


def anvil_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = run_anvil([*args], env={**os.environ, **ENV, **(env or {})}, capture_output=True, timeout=120, text=True)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _put(data: Path, bucket: str, key: str, body: bytes) -> None:
    anvil = Anvil(data)
    try:
        anvil.objects.put_object(RequestContext(DEV_PRINCIPAL), bucket, key, anvil.storage.blobs.put_bytes(body))
    finally:
        anvil.close()


def _create(repo: Path, data: Path, *extra: str) -> dict:
    proc = anvil_cli("backup", "create", "--repo", f"file://{repo}", "--storage-path", str(data), "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("backup-hostile")
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    data, repo = base / "data", base / "repo"
    anvil = Anvil(data)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        anvil.objects.create_bucket(ctx, "photos", versioning="Enabled")
        anvil.objects.create_bucket(ctx, "docs")
        for i in range(6):
            body = os.urandom(30_000 + i) if i % 2 else f"small body {i}".encode()
            anvil.objects.put_object(ctx, "photos" if i % 3 else "docs", f"k/{i}", anvil.storage.blobs.put_bytes(body))
    finally:
        anvil.close()
    try:
        proc = anvil_cli("backup", "init", "--repo", f"file://{repo}", "--pack-size", str(64 * 1024))
        assert proc.returncode == 0, proc.stderr
        first = _create(repo, data, "--tag", "first")
        _put(data, "photos", "k/1", os.urandom(41_000))  # a new version
        second = _create(repo, data, "--tag", "second")
        _put(data, "docs", "after", b"written after the second snapshot")
        delta = _create(repo, data, "--incremental", "--tag", "delta")
        assert delta["kind"] == "delta" and delta["base"] == second["id"]
        yield {"data": data, "repo": repo, "first": first["id"], "second": second["id"], "delta": delta["id"]}
    finally:
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


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_restore_names_a_corrupted_chunk_instead_of_a_missing_folder(built, repo_copy: Path, tmp_path: Path) -> None:
    """A small blob whose only chunk is corrupted: its pack window fails, so its fan-out folder is
    never made. The restore used to fsync that folder and die with `[Errno 2] No such file or
    directory: .../blobs/sha256/xx`, naming neither the chunk, the pack nor the objects."""
    r = Repository.open(LocalBackend(repo_copy), PASS)
    m = r.load_snapshot(built["second"])
    index = r.index()
    blobs = m["tree"]["blobs"]
    # A file-sized blob (inline ones come back inside catalog.db) alone under its fan-out prefix.
    sha = next(s for s, e in blobs.items() if e["size"] > 20_000 and e["chunks"]
               and sum(o[:2] == s[:2] for o in blobs) == 1)
    (cid,) = blobs[sha]["chunks"]
    loc = index[cid]
    flip(repo_copy / "data" / loc.pack[:2] / loc.pack, loc.offset + loc.length // 2)
    target = tmp_path / "restored"
    proc = anvil_cli("restore", "--repo", f"file://{repo_copy}", "--snapshot", built["second"], "--target",
                     str(target), "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert "error" not in out, out
    (problem,) = out["problems"]
    assert problem.startswith(f"blob {sha}: chunk {cid} cannot be decrypted (corrupted) in pack {loc.pack}")
    assert "photos/k/" in problem or "docs/k/" in problem  # the objects it affects
    assert json.loads((target / "RECOVERY").read_text())["problems"] == [problem]


def test_verify_reports_a_delta_whose_base_snapshot_is_gone(built, repo_copy: Path, tmp_path: Path) -> None:
    """Every chunk and segment left reads back, yet the delta cannot be restored: verify said ok."""
    (repo_copy / "snapshots" / built["second"]).unlink()
    proc = anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}", "--read-data", "--json")
    assert proc.returncode == 1
    (err,) = json.loads(proc.stdout)["errors"]
    assert err["what"] == f"snapshot {built['delta']}"
    assert f"its base snapshot {built['second']} is missing" in err["problem"]
    restore = anvil_cli("restore", "--repo", f"file://{repo_copy}", "--snapshot", built["delta"], "--target",
                        str(tmp_path / "t"))
    assert restore.returncode == 1 and built["second"] in restore.stderr


def test_verify_reports_a_delta_whose_archive_segment_is_gone(built, repo_copy: Path, tmp_path: Path) -> None:
    segments = sorted(p for p in (repo_copy / "archive").rglob("*") if p.is_file())
    assert segments
    for seg in segments:
        seg.unlink()
    proc = anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}", "--json")
    assert proc.returncode == 1
    (err,) = json.loads(proc.stdout)["errors"]
    assert err["what"] == f"snapshot {built['delta']}" and "has no segment holding event" in err["problem"]
    restore = anvil_cli("restore", "--repo", f"file://{repo_copy}", "--snapshot", built["delta"], "--target",
                        str(tmp_path / "t"))
    assert restore.returncode == 1 and "nothing was written" in restore.stderr


def test_a_damaged_snapshot_hides_no_other(built, repo_copy: Path, tmp_path: Path) -> None:
    """One corrupted old manifest made `backup list` fail whole (the operator could not see which
    snapshots were left to restore) and every later `backup create` fail (choosing its parent)."""
    flip(repo_copy / "snapshots" / built["first"], 40)
    listed = anvil_cli("backup", "list", "--repo", f"file://{repo_copy}", "--json")
    assert listed.returncode == 1
    assert [r["id"] for r in json.loads(listed.stdout)] == [built["second"], built["delta"]]
    assert f"snapshot {built['first']} cannot be decrypted (corrupted)" in listed.stderr
    # "latest" cannot be told while a snapshot is unreadable: refused, saying how to name one.
    latest = anvil_cli("restore", "--repo", f"file://{repo_copy}", "--target", str(tmp_path / "a"))
    assert latest.returncode == 1 and built["first"] in latest.stderr and "backup list" in latest.stderr
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    named = anvil_cli("restore", "--repo", f"file://{repo_copy}", "--snapshot", built["second"], "--target",
                      str(tmp_path / "b"), "--json")
    assert named.returncode == 0 and json.loads(named.stdout)["ok"], named.stdout
    # A new backup still works (the damaged snapshot cannot be its parent), and verify names the damage.
    data = tmp_path / "data"
    shutil.copytree(built["data"], data)
    new = _create(repo_copy, data)
    assert new["parent"] == built["second"]
    verify = anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}", "--json")
    assert verify.returncode == 1
    assert [e["what"] for e in json.loads(verify.stdout)["errors"]] == [f"snapshot {built['first']}"]


def _index_files_by_age(repo: Path) -> list[Path]:
    return sorted((repo / "index").iterdir(), key=lambda p: p.stat().st_mtime_ns)


def test_prune_never_deletes_packs_of_a_lost_index(built, repo_copy: Path) -> None:
    """The journal delta's index file (naming the pack of the blob its archive segment shipped) is
    lost. That pack then looked like an orphan: prune deleted it, and the delta was gone for good."""
    _index_files_by_age(repo_copy)[-1].unlink()
    before = tree(repo_copy / "data")
    proc = anvil_cli("backup", "forget", "--repo", f"file://{repo_copy}", "--keep-last", "1", "--prune",
                     "--orphan-grace", "0")
    assert proc.returncode == 1
    assert "refusing to prune" in proc.stderr and "in no index" in proc.stderr
    assert built["first"] in proc.stderr  # says what was forgotten before it refused
    assert tree(repo_copy / "data") == before
    # Verify names the chunks the lost index held, so the operator knows what is at stake.
    verify = anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}", "--json")
    assert verify.returncode == 1
    (err,) = json.loads(verify.stdout)["errors"]
    assert err["problem"] == "referenced by a snapshot but in no index" and "archive seq" in err["affects"][0]


def test_forget_with_prune_changes_nothing_while_an_index_is_unreadable(built, repo_copy: Path) -> None:
    """The refusal to prune came after the snapshots were forgotten: a failed command changed the repository."""
    idx = _index_files_by_age(repo_copy)[-1]
    idx.write_bytes(idx.read_bytes()[:-10])
    before = tree(repo_copy)
    proc = anvil_cli("backup", "forget", "--repo", f"file://{repo_copy}", "--keep-last", "1", "--prune")
    assert proc.returncode == 1 and "refusing to prune" in proc.stderr and idx.name in proc.stderr
    assert tree(repo_copy) == before


def test_a_passphrase_that_is_not_utf8_is_refused_in_one_line(built, tmp_path: Path) -> None:
    """A key file of random bytes, or such bytes in ANVIL_BACKUP_PASSPHRASE: a UnicodeDecodeError
    (or UnicodeEncodeError from argon2's input) traceback, and `init` had begun."""
    key_file = tmp_path / "key"
    key_file.write_bytes(b"\xff\xfe random bytes \x00")
    proc = anvil_cli("backup", "list", "--repo", f"file://{built['repo']}", "--key-file", str(key_file))
    assert proc.returncode == 1
    assert proc.stderr == f"error: the passphrase in key file {key_file} is not UTF-8 text; use a text passphrase " \
                          "(e.g. the base64 of random bytes: head -c 32 /dev/urandom | base64)\n"
    # os.environ holds such bytes as surrogates; only a real process gets them from the kernel.
    env = {k.encode(): v.encode() for k, v in {**os.environ, **ENV}.items()}
    env[b"ANVIL_BACKUP_PASSPHRASE"] = b"\xff\xfe"
    for args in (["list", "--repo", f"file://{built['repo']}"], ["init", "--repo", f"file://{tmp_path / 'new'}"]):
        p = subprocess.run([sys.executable, "-m", "anvil.cli.main", "backup", *args], env=env, capture_output=True,
                           timeout=60)
        assert p.returncode == 1 and p.stderr.startswith(b"error: the passphrase in ANVIL_BACKUP_PASSPHRASE is not")
        assert b"Traceback" not in p.stderr
    assert not (tmp_path / "new").exists()


def test_verify_finds_a_pack_moved_out_of_its_folder(built, repo_copy: Path) -> None:
    """Packs are read at data/<first two hex>/<id>: one moved elsewhere under data/ was counted by
    its file name, so plain verify said ok while every restore found the pack missing."""
    pack = next(p for p in sorted((repo_copy / "data").rglob("*")) if p.is_file())
    other = repo_copy / "data" / ("00" if pack.parent.name != "00" else "01")
    other.mkdir(exist_ok=True)
    pack.rename(other / pack.name)
    proc = anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}", "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    # (Blob chunks are reported one by one; a tree page in that pack makes a snapshot's tree unreadable.)
    assert any(e["problem"] == f"pack {pack.name} is missing" for e in out["errors"])
    assert all(pack.name in json.dumps(e) for e in out["errors"])
    assert any(w.startswith(f"data/{other.name}/{pack.name} is not where a pack") for w in out["warnings"])


def test_verify_warns_of_a_hole_in_the_archive(built, repo_copy: Path, tmp_path: Path) -> None:
    """A lost segment between two others: every byte left reads back, verify said "no errors",
    and a point-in-time restore across it failed only when it was needed."""
    data = tmp_path / "data"
    shutil.copytree(built["data"], data)
    for n in range(2):
        _put(data, "docs", f"later/{n}", os.urandom(3000))
        _create(repo_copy, data, "--incremental")
    segments = sorted(p for p in (repo_copy / "archive").rglob("*") if p.is_file())
    assert len(segments) == 3
    lost = segments[1]
    lost.unlink()
    seq = int(lost.name.split("-")[0])
    proc = anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}", "--json")
    out = json.loads(proc.stdout)
    assert any(w.startswith("the archive of deployment ") and f"has no events {seq}..{seq} " in w
               for w in out["warnings"])
    # The journal delta that needs the lost events is an error: it cannot be restored.
    assert proc.returncode == 1 and any(f"has no segment holding event {seq} " in e["problem"] for e in out["errors"])


@pytest.mark.parametrize("value", ["big", None, 0])
def test_a_damaged_pack_size_in_config_refuses_writes_not_restores(built, repo_copy: Path, tmp_path: Path,
                                                                   value: object) -> None:
    """The config is plaintext: a damaged pack_target failed `backup create` after its checkpoint
    with a traceback (a string, null) or silently wrote one pack per chunk (0)."""
    cfg = json.loads((repo_copy / "config").read_text())
    cfg["pack_target"] = value
    (repo_copy / "config").write_text(json.dumps(cfg))
    before = tree(repo_copy)
    data = tmp_path / "data"
    shutil.copytree(built["data"], data)
    _put(data, "docs", "new", os.urandom(20_000))
    create = anvil_cli("backup", "create", "--repo", f"file://{repo_copy}", "--storage-path", str(data))
    assert create.returncode == 1
    assert create.stderr.startswith(f"error: the repository's config is damaged: pack_target is {json.dumps(value)}")
    forget = anvil_cli("backup", "forget", "--repo", f"file://{repo_copy}", "--keep-last", "1", "--prune")
    assert forget.returncode == 1 and "pack_target" in forget.stderr
    assert tree(repo_copy) == before
    verify = anvil_cli("backup", "verify", "--repo", f"file://{repo_copy}", "--json")
    assert verify.returncode == 1 and [e["what"] for e in json.loads(verify.stdout)["errors"]] == ["config"]
    restore = anvil_cli("restore", "--repo", f"file://{repo_copy}", "--snapshot", built["second"], "--target",
                        str(tmp_path / "t"))
    assert restore.returncode == 0, restore.stderr


@pytest.mark.parametrize("where", [".", "data", "snapshots/x", ".."])
def test_a_restore_never_writes_into_the_repository(built, repo_copy: Path, where: str) -> None:
    """With --force a restore wrote FORMAT, catalog.db, blobs/ and secrets/ among the repository's
    objects: into snapshots/ it broke every later `backup list` ("snapshot secrets/... cannot be
    decrypted"); into data/ its files became "packs". A target holding the repository likewise."""
    target = (repo_copy / where).resolve()
    before = tree(repo_copy)
    for extra in (["--snapshot", built["second"]], ["--to-time", "2999-01-01T00:00:00Z"]):
        proc = anvil_cli("restore", "--repo", f"file://{repo_copy}", "--target", str(target), "--force", *extra)
        assert proc.returncode == 1
        assert f"the target {target} and the repository {repo_copy} overlap" in proc.stderr
    assert tree(repo_copy) == before
    assert anvil_cli("backup", "list", "--repo", f"file://{repo_copy}").returncode == 0


def test_point_in_time_restore_to_a_delta_seq_starts_from_its_base(built, tmp_path: Path) -> None:
    """A journal delta is a snapshot row at its seq, but holds no files: a point-in-time restore to
    (or past) its seq chose it as the snapshot to start from and crashed (KeyError: 'FORMAT')."""
    seq = json.loads(anvil_cli("backup", "inspect", "--repo", f"file://{built['repo']}", built["delta"],
                               "--json").stdout)["consistency"]["journal_seq"]
    for args in (["--to-seq", str(seq)], ["--to-time", "2999-01-01T00:00:00Z"]):
        target = tmp_path / args[0].strip("-")
        proc = anvil_cli("restore", "--repo", f"file://{built['repo']}", "--target", str(target), "--json", *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = json.loads(proc.stdout)
        assert out["snapshot"] == built["second"] and out["point_in_time"]["head_seq"] == seq
        val = anvil_cli("recovery", "validate", "--storage-path", str(target))
        assert val.returncode == 0, val.stdout


def test_a_create_keeps_the_packs_of_a_lost_index(built, repo_copy: Path, tmp_path: Path) -> None:
    """Every index file is lost. The next create re-encodes what it needs, then its cleanup took
    every older pack for a killed create's leftovers and deleted it: all older snapshots gone,
    though verify had named their chunks as merely unindexed (recoverable from the pack headers)."""
    for idx in (repo_copy / "index").iterdir():
        idx.unlink()
    packs_before = tree(repo_copy / "data")
    data = tmp_path / "data"
    shutil.copytree(built["data"], data)
    _put(data, "docs", "changed", os.urandom(20_000))
    made = _create(repo_copy, data, "--orphan-grace", "0")
    assert "in no index (an index file lost?)" in made["stats"]["orphans"]["skipped"]
    after = tree(repo_copy / "data")
    assert all(after.get(name) == body for name, body in packs_before.items())


def test_a_repository_where_no_lock_can_be_written_says_why(built, repo_copy: Path, tmp_path: Path) -> None:
    """A read-only copy (here: locks/ cannot hold files) failed with a bare OS error naming a
    temporary lock file, and nothing said why a restore needs to write at all."""
    shutil.rmtree(repo_copy / "locks", ignore_errors=True)
    (repo_copy / "locks").write_text("not a folder")
    for args in (["backup", "verify"], ["restore", "--target", str(tmp_path / "t")]):
        proc = anvil_cli(*args, "--repo", f"file://{repo_copy}")
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"error: cannot write a lock into file://{repo_copy}/locks/ (")
        assert "read-only" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "t").exists()


def test_a_damaged_or_hostile_key_file_is_named_not_a_wrong_passphrase(built, repo_copy: Path) -> None:
    """Key files are plaintext, read before anything authenticates them: argon2 costs of 4 GiB were
    a HashingError traceback (larger valid ones would run for hours), and any damage read as a
    wrong passphrase, sending the operator after the wrong problem."""
    (key,) = (repo_copy / "keys").iterdir()
    entry = json.loads(key.read_text())
    entry["kdf"]["memory_cost"] = 2**32 - 1
    key.write_text(json.dumps(entry))
    proc = anvil_cli("backup", "list", "--repo", f"file://{repo_copy}")
    assert proc.returncode == 1
    assert proc.stderr == (f"error: no usable key in file://{repo_copy}: keys/{key.name} is damaged (KDF parameter "
                           "memory_cost is 4294967295, outside 8..4194304); restore keys/ from a copy of the "
                           "repository\n")
    # Beside a good key, a damaged one is still named when the passphrase is wrong.
    key.rename(repo_copy / "keys" / "0000000000000000")
    shutil.copy(built["repo"] / "keys" / key.name, key)
    assert anvil_cli("backup", "list", "--repo", f"file://{repo_copy}").returncode == 0
    wrong = anvil_cli("backup", "list", "--repo", f"file://{repo_copy}", env={"ANVIL_BACKUP_PASSPHRASE": "not it"})
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("error: wrong passphrase: no key in the repository accepts it (and keys/")
