"""Small blobs encoded (backup) and decoded (restore) in worker processes (`anvil.backup.workers`).

A real server takes an online backup with the process pool forced on (`ANVIL_BACKUP_PROCESS_MIN=1`):
inline bodies, small blob files, a multi-chunk blob and a large streamed one. The snapshot is
restored through the workers and, for comparison, with the pool off (the threaded path that older
Anvil used): both restores hold the same blobs, byte for byte, and validate, and mark the blob
fan-out's parent for ext4 to spread its folders (chattr +T). A corrupt and a
missing blob file are reported, not stored, by a worker-encoded backup; a damaged pack fails only
the blobs in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from tests.helpers import AnvilServer, Cli, unique_bucket

ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "workers test passphrase",
       "ANVIL_BACKUP_PROCESS_MIN": "1", "ANVIL_BACKUP_WORKERS": "2"}
KiB = 1024


def _files(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root / "blobs"):
        for n in names:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


FS_IOC_GETFLAGS, FS_TOPDIR_FL = 0x80086601, 0x00020000


def _flags(folder: Path) -> int | None:
    """A folder's inode flags (lsattr), None where the file system has none (not ext2/3/4)."""
    import fcntl
    import struct

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))[0]
    except OSError:
        return None
    finally:
        os.close(fd)


def _can_mark_top(base: Path) -> bool:
    """Whether this file system takes the mark at all (ext2/3/4 do; tmpfs, for one, refuses it)."""
    import fcntl
    import struct

    probe = base / "topdir-probe"
    probe.mkdir(exist_ok=True)
    fd = os.open(probe, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, 0x40086602, struct.pack("i", FS_TOPDIR_FL))  # FS_IOC_SETFLAGS
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("backup-workers")
    srv = AnvilServer(base / "data", env=ENV).start()
    cred = srv.admin_credentials()
    cli = Cli({**ENV, "ANVIL_CLIENT_ID": cred["client_id"], "ANVIL_CLIENT_SECRET": cred["client_secret"]})
    client = srv.client()
    rng = random.Random(17)
    bucket = unique_bucket("w")
    client.create_bucket(bucket, versioning="Enabled")
    bodies: dict[str, bytes] = {}
    # Inline bodies (<= 64 KiB), small blob files, one of several FastCDC chunks, one streamed.
    sizes = [0, 1, 100, 3 * KiB] * 3 + [70 * KiB, 100 * KiB, 200 * KiB] * 4 + [3 * 1024 * KiB, 5 * 1024 * KiB]
    for i, size in enumerate(sizes):
        bodies[f"o/{i:03d}"] = rng.randbytes(size) if i % 2 else (b"anvil " * (size // 6 + 1))[:size]
        client.put_object(bucket, f"o/{i:03d}", bodies[f"o/{i:03d}"])
    repo = base / "repo"
    assert cli.run("backup", "init", "--repo", f"file://{repo}").returncode == 0
    made = cli.json("backup", "create", "--repo", f"file://{repo}", "--endpoint", srv.endpoint)
    try:
        yield {"srv": srv, "cli": cli, "base": base, "repo": repo, "bucket": bucket, "bodies": bodies,
               "snapshot": made, "client": client}
    finally:
        srv.stop()


def test_worker_backup_restores_through_workers_and_threads_alike(world) -> None:
    made = world["snapshot"]
    assert made["problems"] == []
    cli, repo, base = world["cli"], world["repo"], world["base"]
    targets = {}
    for name, extra in (("workers", {}), ("threads", {"ANVIL_BACKUP_WORKERS": "0"})):
        target = base / f"restore-{name}"
        res = Cli({**cli.env, **extra}).json("restore", "--repo", f"file://{repo}", "--target", str(target))
        assert res["ok"], res["problems"]
        targets[name] = target
    for target in targets.values():
        # A fresh restore marks the blob fan-out's parent a top of a hierarchy (chattr +T), so ext4
        # spreads the fan-out folders (and the blob files in them) over its block groups; the mark
        # is not inherited by the fan-out folders themselves.
        top = _flags(target / "blobs" / "sha256")
        if _can_mark_top(world["base"]):
            assert top is not None
            assert top & FS_TOPDIR_FL, hex(top)
            fanout = next(p for p in (target / "blobs" / "sha256").iterdir() if p.is_dir())
            assert not _flags(fanout) & FS_TOPDIR_FL  # type: ignore[operator]
    report = cli.json("recovery", "validate", "--storage-path", str(targets["workers"]))
    assert report["ok"], report
    live = _files(world["srv"].storage_path)
    restored = _files(targets["workers"])
    assert restored == _files(targets["threads"])
    # Every blob file of the live store came back with its content (and nothing else did).
    assert {k: v for k, v in live.items() if not k.endswith(".chunks")} == restored
    assert len(restored) >= 10  # the file blobs: the worker path had real work

    # Again into the restored store (--force): workers leave intact blobs alone and rewrite a
    # damaged one through a temporary name.
    target = targets["workers"]
    damaged = sorted(p for p in (target / "blobs").rglob("*") if p.is_file() and len(p.name) == 64)[0]
    os.chmod(damaged, 0o644)
    damaged.write_bytes(b"damaged")
    (target / "catalog.db").unlink()  # (a forced restore rewrites the catalog anyway)
    res = cli.json("restore", "--repo", f"file://{repo}", "--target", str(target), "--force")
    assert res["ok"], res["problems"]
    assert res["blobs_restored"] >= 1 and res["blobs_already_present"] >= 8, res
    assert _files(target) == restored
    assert not [p for p in target.rglob("*.restoring")]


def test_worker_backup_reports_corrupt_and_missing_blobs(world) -> None:
    """A fresh repository (no parent to reuse): the workers read every blob, and refuse bad ones."""
    srv, cli, base = world["srv"], world["cli"], world["base"]
    files = sorted(p for p in (srv.storage_path / "blobs").rglob("*") if p.is_file() and len(p.name) == 64)
    corrupt, missing = files[0], files[1]
    keep_c, keep_m = corrupt.read_bytes(), missing.read_bytes()
    repo = base / "repo-bad"
    try:
        os.chmod(corrupt, 0o644)
        corrupt.write_bytes(b"not what was stored")
        missing.unlink()
        assert cli.run("backup", "init", "--repo", f"file://{repo}").returncode == 0
        proc = cli.run("backup", "create", "--repo", f"file://{repo}", "--endpoint", srv.endpoint, "--json")
    finally:
        corrupt.write_bytes(keep_c)
        missing.write_bytes(keep_m)
    assert proc.returncode != 0  # a snapshot with problems says so
    text = "\n".join(json.loads(proc.stdout)["problems"])
    assert f"blob {corrupt.name} in STORAGE_PATH is corrupt" in text
    assert f"blob {missing.name} referenced by" in text and "missing from STORAGE_PATH" in text
    target = base / "restore-bad"
    res = cli.run("restore", "--repo", f"file://{repo}", "--target", str(target), "--json")
    assert f"blob {corrupt.name} is not in the snapshot" in res.stdout
    assert f"blob {missing.name} is not in the snapshot" in res.stdout


def test_worker_restore_of_a_damaged_pack_fails_only_its_blobs(world) -> None:
    cli, base = world["cli"], world["base"]
    repo = base / "repo-damaged"
    import shutil

    shutil.copytree(world["repo"], repo)
    packs = sorted((repo / "data").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    pack = packs[-1]
    data = bytearray(pack.read_bytes())
    data[100] ^= 0xFF  # inside the first sealed chunk
    pack.write_bytes(bytes(data))
    target = base / "restore-damaged"
    res = cli.run("restore", "--repo", f"file://{repo}", "--target", str(target), "--json")
    assert res.returncode != 0
    assert "cannot be decrypted (corrupted)" in res.stdout or "hashes to" in res.stdout, res.stdout


def test_a_full_backup_with_a_parent_reuses_its_tree_read_as_a_stream(world) -> None:
    """The parent's blob tree is merged as a stream (`treestream`): every unchanged blob is reused,
    a changed object is encoded, and the new snapshot restores whole."""
    cli, repo, srv = world["cli"], world["repo"], world["srv"]
    world["client"].put_object(world["bucket"], "o/new", b"a new body " * 9000)
    made = cli.json("backup", "create", "--repo", f"file://{repo}", "--endpoint", srv.endpoint)
    stats = made["stats"]
    assert made["problems"] == [] and stats["blobs"] == world["snapshot"]["stats"]["blobs"] + 1
    assert stats["blobs_reused_from_parent"] == stats["blobs"] - 1


def test_tree_stream_reads_any_manifest_shape() -> None:
    import io

    from anvil.backup import treestream as ts

    rng = random.Random(5)
    for trial in range(40):
        blobs = {f"{rng.getrandbits(256):064x}": {"size": rng.randrange(10**7), "refs": ['b/k@1 "q"'],
                                                  "chunks": [f"{rng.getrandbits(256):064x}"] * rng.randrange(3)}
                 for _ in range(rng.randrange(40))}
        m: dict = {"id": "x", "participants": {"a": {"summary": {"tree": {"blobs": 1}, "n": 1.5e10}}},
                   "tree": {"files": {"catalog.db": {"size": 1, "chunks": ["c"], "sha256": "s"}}, "blobs": blobs}}
        if trial % 7 == 0:
            m["tree"] = {"blobs": blobs, "files": {}}
        if trial % 11 == 0:
            del m["tree"]
        text = json.dumps(m, separators=(",", ":")) if trial % 2 else json.dumps(m, indent=1)
        reader = ts._Json(io.StringIO(text))
        old = ts.READ
        ts.READ = rng.choice([1, 2, 7, 64, 1 << 20])  # values cut anywhere across reads
        try:
            got = list(ts._entries(reader))
        finally:
            ts.READ = old
        assert got == (list(blobs.items()) if "tree" in m else []), trial
    with pytest.raises(ValueError):
        list(ts._entries(ts._Json(io.StringIO('{"id":"x","tree":{"blobs":{"a":{"size":1'))))


def test_worker_count_follows_the_setting_and_idle_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from anvil.backup import workers
    from anvil.backup.errors import BackupError

    monkeypatch.setenv("ANVIL_BACKUP_WORKERS", "3")
    assert workers.worker_count() == 3
    monkeypatch.setenv("ANVIL_BACKUP_WORKERS", "0")
    assert workers.use_processes(10**6) == 0
    for bad in ("two", "-1"):
        monkeypatch.setenv("ANVIL_BACKUP_WORKERS", bad)
        with pytest.raises(BackupError, match="ANVIL_BACKUP_WORKERS"):
            workers.worker_count()
    monkeypatch.delenv("ANVIL_BACKUP_WORKERS")
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert workers.worker_count() == 4  # idle cores: one worker each
    assert workers.use_processes(workers.PROCESS_MIN - 1) == 0 and workers.use_processes(workers.PROCESS_MIN) == 4
    # By default a backup's small blobs go to processes only while they average at most
    # PROCESS_AVG_MAX bytes; processes asked for by number are used whatever the sizes.
    n, avg = workers.PROCESS_MIN, workers.PROCESS_AVG_MAX
    assert workers.use_processes(n, n * avg) == 4 and workers.use_processes(n, n * avg + 1) == 0
    monkeypatch.setenv("ANVIL_BACKUP_WORKERS", "2")
    assert workers.use_processes(n, n * avg + 1) == 2
    monkeypatch.delenv("ANVIL_BACKUP_WORKERS")
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 1.0, 1.0))
    assert workers.worker_count() == 0  # every core busy: workers would only add CPU
    assert workers.worker_count(by_load=False) == 4  # (a restore: see restore.RESTORE_POOL_BY_LOAD)
    assert workers.use_processes(workers.PROCESS_MIN, by_load=False) == 4
