"""`anvil repair blobs --from-backup`: blobs deleted or quarantined are healed from a backup.

Real servers and real CLI subprocesses. A blob is lost by deleting its file, or by moving it into
`STORAGE_PATH/quarantine/` (what verify-on-read does with a corrupt blob); fsck records a finding
about it; the heal restores it from a snapshot, resolves the finding (naming the snapshot), and
afterwards `fsck --deep` is clean and every object reads back byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from anvil.client import AnvilAPIError, AnvilClient
from tests.helpers import AnvilServer, run_anvil, unique_bucket

PASSPHRASE = "correct horse battery staple"
ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": PASSPHRASE}
MiB = 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def _blob_files():
    """These tests damage, delete or age blob *files*: small bodies are kept as files here
    (ANVIL_INLINE_MAX=0). Inline bodies get the same checks in tests/test_inline.py."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANVIL_INLINE_MAX", "0")
        yield


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class World:
    """One server with a bucket of small objects and one multipart object, and a backup repository."""

    def __init__(self, base: Path, *, auto_heal: bool = False):
        self.base = base
        self.repo = f"file://{base / 'repo'}"
        args: list[str] = []
        if auto_heal:
            # A scheduled backup repository turns on healing by the server itself (polled quickly here).
            self.cli("backup", "init", "--repo", self.repo)
            args = ["--backup-repo", self.repo, "--backup-every", "1h"]
        self.server = AnvilServer(base / "data", env={**ENV, "ANVIL_HEAL_POLL": "0.2"}, extra_args=args).start()
        self.bucket = unique_bucket("heal")
        self.bodies: dict[str, bytes] = {}
        rng = random.Random(12)
        with self.client() as c:
            c.create_bucket(self.bucket)
            for key, size in (("small/a", 1000), ("small/b", 3000), ("mid/c", 300 * 1024)):
                self.put(c, key, rng.randbytes(size))
            # A multipart object: its version references one blob per part.
            self.part1, self.part2 = rng.randbytes(5 * MiB), rng.randbytes(1000)
            up = c.create_upload(self.bucket, "big/multi.bin")
            e1 = c.upload_part(self.bucket, up, 1, self.part1)["etag"]
            e2 = c.upload_part(self.bucket, up, 2, self.part2)["etag"]
            c.complete_upload(self.bucket, up, [(1, e1), (2, e2)])
            self.bodies["big/multi.bin"] = self.part1 + self.part2
        if not auto_heal:
            self.cli("backup", "init", "--repo", self.repo, "--storage-path", str(self.storage))

    @property
    def storage(self) -> Path:
        return self.server.storage_path

    def client(self) -> AnvilClient:
        return self.server.client()

    def put(self, c: AnvilClient, key: str, body: bytes) -> str:
        c.put_object(self.bucket, key, body)
        self.bodies[key] = body
        return sha(body)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        server = getattr(self, "server", None)
        cred = server.admin_credentials() if server else {"client_id": "", "client_secret": ""}
        return {**os.environ, **ENV, "ANVIL_CLIENT_ID": cred["client_id"],
                "ANVIL_CLIENT_SECRET": cred["client_secret"], **(extra or {})}

    def cli(self, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        proc = run_anvil([*args], env=self.env(env),
                              capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"anvil {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def snapshot(self) -> str:
        proc = self.cli("backup", "create", "--repo", self.repo, "--endpoint", self.server.endpoint, "--json")
        return json.loads(proc.stdout)["id"]

    def blob(self, digest: str) -> Path:
        return self.storage / "blobs" / "sha256" / digest[:2] / digest

    def quarantine(self, digest: str) -> Path:
        """Move a blob into quarantine/ by hand, as verify-on-read does with a corrupt one."""
        dest = self.storage / "quarantine" / digest
        dest.parent.mkdir(exist_ok=True)
        os.rename(self.blob(digest), dest)
        return dest

    def heal(self, *args: str, offline: bool = False, check: bool = False,
             env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        where = ["--storage-path", str(self.storage)] if offline else ["--endpoint", self.server.endpoint]
        proc = self.cli("repair", "blobs", "--from-backup", self.repo, *where, "--json", *args, check=check, env=env)
        return proc.returncode, json.loads(proc.stdout)

    def assert_all_objects_read_back(self) -> None:
        with self.client() as c:
            for key, body in self.bodies.items():
                assert c.get_object(self.bucket, key) == body, key


@pytest.fixture
def world(tmp_path: Path):
    w = World(tmp_path)
    yield w
    w.server.stop()


def open_findings_about(c: AnvilClient, digest: str) -> list[dict[str, Any]]:
    return [f for f in c.list_findings(unresolved=True) if f["affected"].get("sha256") == digest]


def test_offline_heal_of_deleted_quarantined_and_multipart_part_blobs(world: World) -> None:
    pending_body = os.urandom(700)
    with world.client() as c:  # an upload still in progress: its part's blob is referenced too
        upload = c.create_upload(world.bucket, "big/pending.bin")
        c.upload_part(world.bucket, upload, 1, pending_body)
    snap = world.snapshot()
    a, b, part1, pending = (sha(world.bodies["small/a"]), sha(world.bodies["small/b"]), sha(world.part1),
                            sha(pending_body))
    world.blob(a).unlink()
    quarantined = world.quarantine(b)
    world.blob(part1).unlink()
    world.blob(pending).unlink()
    with world.client() as c:
        report = c.fsck()
        assert report["ok"] is False
        found = {d: open_findings_about(c, d) for d in (a, b, part1, pending)}
    assert all(len(f) == 1 for f in found.values()), found
    assert found[part1][0]["invariant"] == "objects.blob_missing"
    assert found[pending][0]["invariant"] == "multipart.part_blob_missing"
    world.server.stop()

    code, report = world.heal(offline=True)
    assert code == 0, report
    assert report["ok"] is True and report["missing"] == 4 and report["healed_count"] == 4
    assert report["unrecoverable"] == [] and report["snapshots_used"] == [snap]
    healed = {h["sha256"]: h for h in report["healed"]}
    assert set(healed) == {a, b, part1, pending}
    assert healed[pending]["references"][0]["upload_id"] == upload
    assert healed[pending]["references"][0]["part_number"] == 1
    assert healed[a]["references"][0]["key"] == "small/a" and healed[a]["snapshot"] == snap
    assert healed[part1]["references"][0]["key"] == "big/multi.bin"
    assert healed[part1]["references"][0]["version_id"] and healed[part1]["size"] == 5 * MiB
    assert healed[b]["was_quarantined"] is True and not quarantined.exists()
    assert len(report["findings_resolved"]) == 4
    assert report["finding"]["invariant"] == "repair.healed_from_backup" and report["finding"]["resolved_at"]
    for d in (a, b, part1, pending):
        assert sha(world.blob(d).read_bytes()) == d

    # The offline store is whole again: fsck --deep (offline, then through the server) is clean.
    deep = world.cli("fsck", "--deep", "--storage-path", str(world.storage), "--json")
    assert json.loads(deep.stdout)["ok"] is True
    world.server.restart()
    with world.client() as c:
        for d, fs in found.items():
            f = next(x for x in c.list_findings() if x["id"] == fs[0]["id"])
            assert f["resolved_at"] and snap in f["resolution"] and d in f["resolution"]
        assert c.fsck(deep=True)["ok"] is True
        kinds = [e["kind"] for e in c.journal(after=0, limit=10000)]
        assert "diagnostics.resolve" in kinds
    world.assert_all_objects_read_back()


def test_online_heal_older_snapshot_newest_first_and_unrecoverable(world: World) -> None:
    snap1 = world.snapshot()
    with world.client() as c:
        d = world.put(c, "later/d", os.urandom(2000))
    snap2 = world.snapshot()
    with world.client() as c:
        e = world.put(c, "after-backups/e", os.urandom(500))  # in no snapshot
    a, b = sha(world.bodies["small/a"]), sha(world.bodies["small/b"])
    for digest in (a, d, e):
        world.blob(digest).unlink()
    world.quarantine(b)
    with world.client() as c:
        c.fsck()
        e_finding = open_findings_about(c, e)
    assert len(e_finding) == 1

    # Only the older snapshot: a and b come from it; d (taken later) and e are not in it.
    code, report = world.heal("--snapshot", snap1[:8])
    assert code == 1 and report["ok"] is False and report["snapshot"] == snap1
    assert {h["sha256"]: h["snapshot"] for h in report["healed"]} == {a: snap1, b: snap1}
    gone = {u["sha256"]: u for u in report["unrecoverable"]}
    assert set(gone) == {d, e} and f"snapshot {snap1} does not hold it" in gone[d]["reason"]
    assert gone[e]["references"][0]["key"] == "after-backups/e"
    assert not world.blob(d).exists() and not world.blob(e).exists()

    # Every snapshot, newest first: d comes from the newest; e is in none and stays missing.
    world.blob(a).unlink()
    code, report = world.heal()
    assert code == 1 and report["snapshot"] is None and report["snapshots_searched"] == 2
    assert {h["sha256"]: h["snapshot"] for h in report["healed"]} == {a: snap2, d: snap2}
    assert [u["sha256"] for u in report["unrecoverable"]] == [e]
    assert report["unrecoverable"][0]["reason"] == "no snapshot holds it"
    assert not world.blob(e).exists()
    with world.client() as c:
        assert [f["id"] for f in open_findings_about(c, e)] == [e_finding[0]["id"]]  # stays open
        assert open_findings_about(c, d) == []
        assert c.get_object(world.bucket, "later/d") == world.bodies["later/d"]
        assert c.get_object(world.bucket, "small/b") == world.bodies["small/b"]

    # Text output names what was healed and what was not.
    world.blob(d).unlink()
    proc = world.cli("repair", "blobs", "--from-backup", world.repo, "--endpoint", world.server.endpoint, check=False)
    assert proc.returncode == 1
    assert f"healed  {d}  from snapshot {snap2}" in proc.stdout and "later/d" in proc.stdout
    assert f"UNRECOVERABLE  {e}" in proc.stdout and "after-backups/e" in proc.stdout


def test_a_copy_that_does_not_hash_right_is_refused_and_nothing_is_written(world: World) -> None:
    a = sha(world.bodies["small/a"])
    good = world.blob(a).read_bytes()
    bad = bytearray(good)
    bad[10] ^= 0xFF
    world.blob(a).write_bytes(bad)  # corrupt in place: verify-on-read keeps it out of the backup
    proc = world.cli("backup", "create", "--repo", world.repo, "--endpoint", world.server.endpoint, "--json",
                     check=False)
    assert proc.returncode == 1 and "corrupt" in proc.stdout
    world.blob(a).write_bytes(good)
    world.snapshot()
    # Now the repository's copy is what is damaged: every pack overwritten with noise of its size.
    for pack in (Path(world.repo.removeprefix("file://")) / "data").rglob("*"):
        if pack.is_file():
            pack.write_bytes(os.urandom(pack.stat().st_size))
    world.blob(a).unlink()
    code, report = world.heal()
    assert code == 1 and report["healed"] == []
    (u,) = report["unrecoverable"]
    assert u["sha256"] == a and u["reason"] == "no snapshot holds a good copy" and u["problems"]
    assert not world.blob(a).exists()
    assert [p.name for p in (world.storage / "tmp").iterdir() if p.name.startswith("upload-")] == []


def test_wrong_passphrase_and_bad_usage_change_nothing(world: World) -> None:
    world.snapshot()
    a = sha(world.bodies["small/a"])
    world.blob(a).unlink()
    with world.client() as c:
        before = c.journal(after=0, limit=10000)[-1]["seq"]
    wrong = {"ANVIL_BACKUP_PASSPHRASE": "not the passphrase"}
    code, out = world.heal(env=wrong)
    assert code == 2 and "wrong passphrase" in out["error"]["message"]
    with world.client() as c:
        assert c.journal(after=0, limit=10000)[-1]["seq"] == before
        with pytest.raises(AnvilAPIError) as e:
            c.heal_blobs(world.repo, passphrase="not the passphrase")
        assert e.value.code == "InvalidArgument"
        with pytest.raises(AnvilAPIError) as e:
            c.heal_blobs(world.repo, passphrase=PASSPHRASE, snapshot="nosuchsnapshot")
        assert e.value.code == "InvalidArgument" and "not found" in e.value.message
    assert not world.blob(a).exists()
    proc = world.cli("repair", "blobs", "--from-backup", world.repo, "--endpoint", world.server.endpoint,
                     env=wrong, check=False)
    assert proc.returncode == 2 and "wrong passphrase" in proc.stderr

    usage = world.cli("repair", "objects", "--from-backup", world.repo, "--endpoint", world.server.endpoint,
                      check=False)
    assert usage.returncode == 2 and "family 'blobs' only" in usage.stderr
    usage = world.cli("repair", "blobs", "--endpoint", world.server.endpoint, check=False)
    assert usage.returncode == 2 and "--from-backup" in usage.stderr

    world.server.stop()
    code, out = world.heal(offline=True, env=wrong)
    assert code == 2 and "wrong passphrase" in out["error"]["message"]
    assert not world.blob(a).exists()
    world.server.restart()
    with world.client() as c:
        assert c.journal(after=0, limit=10000)[-1]["seq"] == before
        assert c.heal_blobs(world.repo, passphrase=PASSPHRASE)["healed_count"] == 1
    world.assert_all_objects_read_back()


def test_nothing_missing_is_a_clean_run(world: World) -> None:
    world.snapshot()
    code, report = world.heal()
    assert code == 0 and report["missing"] == 0 and report["healed"] == [] and report["ok"] is True
    assert report["finding"]["invariant"] == "repair.healed_from_backup"


def test_the_server_heals_a_quarantined_blob_on_its_own(tmp_path: Path) -> None:
    world = World(tmp_path, auto_heal=True)
    try:
        snap = world.snapshot()
        b, c_sha = sha(world.bodies["small/b"]), sha(world.bodies["mid/c"])
        quarantined = world.quarantine(b)
        deadline = time.monotonic() + 30
        while (quarantined.exists() or not world.blob(b).exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert world.blob(b).exists() and not quarantined.exists(), world.server.log()
        assert sha(world.blob(b).read_bytes()) == b
        with world.client() as c:
            runs = [f for f in c.list_findings() if f["invariant"] == "repair.healed_from_backup"]
            assert len(runs) == 1 and runs[0]["affected"]["healed"] == [b]
            assert runs[0]["affected"]["snapshots_used"] == [snap]
            assert c.get_object(world.bucket, "small/b") == world.bodies["small/b"]
        # A merely deleted blob (nothing in quarantine/) is left to the operator: no run, no write.
        world.blob(c_sha).unlink()
        time.sleep(1.0)
        assert not world.blob(c_sha).exists()
        with world.client() as c:
            assert len([f for f in c.list_findings() if f["invariant"] == "repair.healed_from_backup"]) == 1
        world.blob(c_sha).write_bytes(world.bodies["mid/c"])
        world.assert_all_objects_read_back()
    finally:
        world.server.stop()


def test_scenario_a_flipped_byte_is_refused_recorded_and_healed_from_backup(world: World) -> None:
    """The whole chain of issue 12: back up; flip a byte in a blob; GET refuses and a finding is
    recorded; `anvil repair blobs --from-backup` repairs it; GET serves the right bytes and
    `fsck --deep` is clean; every acknowledged write is still there."""
    from botocore.exceptions import BotoCoreError, ClientError

    from tests.s3_helpers import s3_client

    snap = world.snapshot()
    small, part1 = sha(world.bodies["small/a"]), sha(world.part1)
    for digest, offset in ((small, 10), (part1, 3 * MiB + 5)):
        raw = bytearray(world.blob(digest).read_bytes())
        raw[offset] ^= 0x01
        world.blob(digest).write_bytes(raw)

    s3 = s3_client(world.server)
    with world.client() as c:
        with pytest.raises(AnvilAPIError) as refused:  # small: a clean error before any byte
            c.get_object(world.bucket, "small/a")
        assert refused.value.code == "DataCorrupted"
        with pytest.raises((BotoCoreError, ClientError, OSError)):  # large: the stream is reset
            s3.get_object(Bucket=world.bucket, Key="big/multi.bin")["Body"].read()
        for digest, key in ((small, "small/a"), (part1, "big/multi.bin")):
            (f,) = [f for f in open_findings_about(c, digest) if f["invariant"] == "blob.corrupt"]
            assert f["affected"]["bucket"] == world.bucket and f["affected"]["key"] == key
            assert "version_id" in f["affected"]
    assert {small, part1} <= {p.name for p in (world.storage / "quarantine").iterdir()}

    code, report = world.heal()
    assert code == 0, report
    assert {h["sha256"]: h["snapshot"] for h in report["healed"]} == {small: snap, part1: snap}
    assert not (world.storage / "quarantine" / small).exists()

    with world.client() as c:
        assert open_findings_about(c, small) == [] and open_findings_about(c, part1) == []
    body = s3.get_object(Bucket=world.bucket, Key="big/multi.bin")["Body"].read()
    assert body == world.bodies["big/multi.bin"]
    world.assert_all_objects_read_back()
    fsck = world.cli("fsck", "--deep", "--endpoint", world.server.endpoint, "--json")
    assert json.loads(fsck.stdout)["ok"] is True
