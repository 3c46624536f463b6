"""End to end: populate, back up online while a writer keeps writing, restore, drill, compare.

One real server; the backup goes through its admin API (`anvil backup create --endpoint`),
restore and drill through the CLI. Acknowledged-before-checkpoint writes must read back
identically by key and version; writes after the checkpoint (journal seq > S) must not appear.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from anvil.client import AnvilAPIError, AnvilClient
from tests.helpers import AnvilServer, run_anvil, unique_bucket

ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "correct horse battery staple"}
MiB = 1024 * 1024
# The first admin's credential of the populated server: restored copies keep the same identity
# records, so the same credential must work on them (the drill proves it).
CREDS: dict[str, str] = {}


def anvil_cli(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = run_anvil([*args],
                          env={**os.environ, **ENV, **CREDS, **(env or {})}, capture_output=True, timeout=300,
                          text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"anvil {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_json(*args: str) -> dict:
    return json.loads(anvil_cli(*args, "--json").stdout)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("backup-e2e")
    srv = AnvilServer(base / "data", env=ENV).start()
    cred = srv.admin_credentials()
    CREDS.update(ANVIL_CLIENT_ID=cred["client_id"], ANVIL_CLIENT_SECRET=cred["client_secret"])
    client = srv.client()
    try:
        rng = random.Random(7)
        written: dict[tuple[str, str, str], str] = {}  # (bucket, key, version) -> sha256 of the body
        vb = unique_bucket("v")
        ub = unique_bucket("u")
        client.create_bucket(vb, versioning="Enabled")
        client.create_bucket(ub)

        def put(bucket: str, key: str, body: bytes) -> str:
            res = client.put_object(bucket, key, body)
            written[(bucket, key, res["version_id"])] = hashlib.sha256(body).hexdigest()
            return res["version_id"]

        # With the versions, markers and the other bucket: ~400 objects, three prefixes. Every one is
        # read back after the restore; more of them proved nothing more and cost ~10 s of PUTs and GETs.
        for i in range(300):
            put(vb, f"{'abc'[i % 3]}/obj-{i:04d}", rng.randbytes(rng.randint(0, 4096)))
        for i in range(0, 30):  # new versions of existing keys
            put(vb, f"{'abc'[i % 3]}/obj-{i:04d}", rng.randbytes(rng.randint(1, 4096)))
        deleted_markers = []
        for i in range(30, 45):  # delete markers
            deleted_markers.append(client.delete_object(vb, f"{'abc'[i % 3]}/obj-{i:04d}")["version_id"])
        for i in range(45, 50):  # permanently deleted versions
            key = f"{'abc'[i % 3]}/obj-{i:04d}"
            vid = [v for (b, k, v) in written if b == vb and k == key][0]
            client.delete_object(vb, key, version_id=vid)
            del written[(vb, key, vid)]
        # one completed multipart object (5 MiB + a tail) and one upload still in progress
        part1, part2 = rng.randbytes(5 * MiB), rng.randbytes(1000)
        up = client.create_upload(vb, "big/multipart.bin")
        e1 = client.upload_part(vb, up, 1, part1)["etag"]
        e2 = client.upload_part(vb, up, 2, part2)["etag"]
        mp = client.complete_upload(vb, up, [(1, e1), (2, e2)])
        written[(vb, "big/multipart.bin", mp["version_id"])] = hashlib.sha256(part1 + part2).hexdigest()
        pending = client.create_upload(vb, "big/pending.bin")
        client.upload_part(vb, pending, 1, b"pending part")
        for i in range(60):
            put(ub, f"plain/{i}", rng.randbytes(100 + i))

        repo = f"file://{base / 'repo'}"
        anvil_cli("backup", "init", "--repo", repo, "--storage-path", str(srv.storage_path))

        # A writer keeps writing while the online backup runs.
        stop = threading.Event()
        writer_acks: list[tuple[str, str, str, float]] = []  # key, version, sha, acked-at

        def writer() -> None:
            with srv.client() as wc:
                n = 0
                while not stop.is_set():
                    body = f"writer {n}".encode() * 50
                    res = wc.put_object(vb, f"w/{n:05d}", body)
                    writer_acks.append((f"w/{n:05d}", res["version_id"], hashlib.sha256(body).hexdigest(), time.time()))
                    n += 1

        t = threading.Thread(target=writer, daemon=True)
        t.start()

        def wait_for_ack_after(moment: float) -> None:
            # Wait for the writer (bounded), rather than sleeping a fixed time a loaded machine may not honour.
            deadline = time.monotonic() + 20
            while not any(a[3] > moment for a in list(writer_acks)) and time.monotonic() < deadline:
                time.sleep(0.02)

        wait_for_ack_after(0.0)
        backup_started = time.time()
        snap = cli_json("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, "--tag", "e2e",
                        "--escrow-secrets")
        backup_done = time.time()
        wait_for_ack_after(backup_done)
        stop.set()
        t.join(10)
        yield {"srv": srv, "client": client, "base": base, "repo": repo, "snap": snap, "written": written,
               "vb": vb, "ub": ub, "writer_acks": writer_acks, "backup_started": backup_started,
               "backup_done": backup_done, "parts": (part1, part2), "deleted_markers": deleted_markers}
    finally:  # also when populating fails: never leave a server behind
        client.close()
        srv.stop()


def _journal_seqs(client: AnvilClient) -> dict[str, int]:
    """version id -> journal seq of the event that created it (from the live server's journal)."""
    seqs: dict[str, int] = {}
    after = 0
    while True:
        events = client.journal(after=after, limit=1000)
        if not events:
            return seqs
        for e in events:
            if e["kind"] in ("object.put", "object.delete") and e["payload"].get("version_id"):
                seqs.setdefault(e["payload"]["version_id"], e["seq"])
        after = events[-1]["seq"]


def test_online_backup_is_consistent_and_restores_exactly(world) -> None:
    snap, vb = world["snap"], world["vb"]
    S = snap["journal_seq"]
    acks = world["writer_acks"]
    before = [a for a in acks if a[3] < world["backup_started"]]
    after = [a for a in acks if a[3] > world["backup_done"]]
    assert before and after, "the writer must have written both before and after the backup"
    seqs = _journal_seqs(world["client"])
    assert all(seqs[v] <= S for _, v, _, _ in before), "a write acknowledged before the backup is after S"
    assert all(seqs[v] > S for _, v, _, _ in after)

    target = world["base"] / "restored"
    res = cli_json("restore", "--repo", world["repo"], "--snapshot", snap["id"], "--target", str(target))
    assert res["ok"] and res["recovery_mode"]
    assert (target / "RECOVERY").exists()

    srv = AnvilServer(target, env=ENV).start()
    try:
        with srv.client(client_id=CREDS["ANVIL_CLIENT_ID"], client_secret=CREDS["ANVIL_CLIENT_SECRET"]) as c:
            assert c.health()["recovery_mode"] is True
            with pytest.raises(AnvilAPIError) as err:
                c.put_object(vb, "new", b"x")
            assert err.value.status == 503 and err.value.code == "RecoveryMode"
            # Everything acknowledged before the backup began reads back identically by key and version.
            expected = {**world["written"], **{(vb, k, v): sha for k, v, sha, _ in before}}
            for (bucket, key, vid), sha in expected.items():
                body = c.get_object(bucket, key, version_id=vid)
                assert hashlib.sha256(body).hexdigest() == sha, f"{bucket}/{key}@{vid}"
            # Writer writes are present exactly when their journal seq is <= S.
            for key, vid, sha, _ in acks:
                if seqs[vid] <= S:
                    assert hashlib.sha256(c.get_object(vb, key, version_id=vid)).hexdigest() == sha
                else:
                    with pytest.raises(AnvilAPIError) as nf:
                        c.head_object(vb, key, version_id=vid)
                    assert nf.value.status == 404
            listed = {v["version_id"] for p in ("a/", "b/", "c/") for v in c.list_versions(vb, prefix=p)["versions"]}
            assert set(world["deleted_markers"]) <= listed
            assert c.list_uploads(vb) and c.list_uploads(vb)[0]["key"] == "big/pending.bin"
            assert c.health()["journal"]["seq"] == S
    finally:
        srv.stop()

    # Validation passes, resume is recorded in the journal, then writes work.
    report = cli_json("recovery", "validate", "--storage-path", str(target))
    assert report["ok"], report["needs_operator"]
    assert (target / "recovery" / "validation.md").exists()
    resumed = cli_json("recovery", "resume", "--storage-path", str(target))
    assert resumed["journal_seq"] == S + 1 and not (target / "RECOVERY").exists()


def test_drill_passes_and_reports(world, tmp_path: Path) -> None:
    proc = anvil_cli("drill", "--repo", world["repo"], "--snapshot", world["snap"]["id"], "--report-dir", str(tmp_path),
                     "--json", check=False)
    report = json.loads((tmp_path / "drill-report.json").read_text())
    assert proc.returncode == 0, json.dumps([c for c in report["checks"] if not c["ok"]], indent=1)
    assert report["ok"] and report["snapshot"] == world["snap"]["id"]
    names = [c["check"] for c in report["checks"]]
    assert "smoke: objects" in names and "smoke after resume: objects" in names  # ordinary operations
    # Every checklist item now has a participant: none is "not present in this deployment".
    assert all(c["participants"] and c["participants"] != "not present in this deployment"
               for c in report["coverage"]), report["coverage"]
    assert "PASSED" in (tmp_path / "drill-report.md").read_text()


def test_inspect_lists_checklist(world) -> None:
    out = cli_json("backup", "inspect", "--repo", world["repo"], world["snap"]["id"])
    items = {(r["item"], r["participant"]) for r in out["checklist"]}
    assert ("object bodies and multipart state", "objects") in items
    assert ("object bodies and multipart state", "blobs") in items
    # Every checklist item is covered now (indexes, authz, PersonalDB and artefacts have landed).
    assert [r for r in out["checklist"] if r["participant"] is None] == []
    assert {r["participant"] for r in out["checklist"]} >= {"indexes", "authz", "personaldb", "artefacts"}
    objects = out["participants"]["objects"]["summary"]
    assert objects["multipart_uploads"] == 1 and objects["delete_markers"] >= 15
    assert out["consistency"]["journal_seq"] == world["snap"]["journal_seq"]
    text = anvil_cli("backup", "inspect", "--repo", world["repo"], world["snap"]["id"]).stdout
    assert "not present in this deployment" not in text and "PersonalDB commits" in text


def test_get_single_object_and_version(world, tmp_path: Path) -> None:
    vb = world["vb"]
    part1, part2 = world["parts"]
    out = tmp_path / "mp.bin"
    anvil_cli("backup", "get", "--repo", world["repo"], "--snapshot", world["snap"]["id"], vb,
              "big/multipart.bin", "-o", str(out))
    assert out.read_bytes() == part1 + part2
    (bucket, key, vid), sha = next((k, s) for k, s in world["written"].items() if k[1] == "a/obj-0000")
    anvil_cli("backup", "get", "--repo", world["repo"], bucket, key, "--version", vid, "-o", str(out))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha
    missing = anvil_cli("backup", "get", "--repo", world["repo"], bucket, "no/such/key", check=False)
    assert missing.returncode == 1 and "not in snapshot" in missing.stderr


def test_incremental_backup_dedupes(world) -> None:
    """A second online backup re-sends only the catalog's changed chunks and new blobs."""
    second = cli_json("backup", "create", "--repo", world["repo"], "--endpoint", world["srv"].endpoint)
    st = second["stats"]
    assert second["parent"] == world["snap"]["id"]
    assert st["blobs_reused_from_parent"] >= world["snap"]["stats"]["blobs"]
    # Most of this world's bodies are small, so they live inline in catalog.db (storage.inline): the
    # changed catalog chunks weigh more than when only records lived there. A third, not a quarter.
    assert st["new_bytes"] < world["snap"]["stats"]["new_bytes"] / 3


# What an online `backup create` may not load: it sends one request (the server takes the snapshot).
# Nor rich's console: its JSON and the default-escrow warning are plain text.
_NOT_FOR_ONLINE_CREATE = ("anvil.client", "httpx", "pydantic", "anvil.api_models", "cryptography", "zstandard",
                          "anvil.backup.pack", "anvil.runtime", "rich.console")
_PROBE = """
import sys
from anvil.cli.main import main
sys.argv = ["anvil", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    code = e.code
print("LOADED", *sorted(m for m in %r if m in sys.modules))
"""


def test_online_create_loads_neither_the_sdk_nor_the_backup_engine(world) -> None:
    """`anvil backup create --endpoint` talks to the server through a stdlib client (`cli.lite`): no
    httpx, pydantic or API models, no cryptography (the passphrase is only passed on)."""
    proc = subprocess.run([sys.executable, "-c", _PROBE % (_NOT_FOR_ONLINE_CREATE,), "backup", "create",
                           "--repo", world["repo"], "--endpoint", world["srv"].endpoint, "--json"],
                          env={**os.environ, **ENV, **CREDS}, capture_output=True, text=True, timeout=120)
    out, _, loaded = proc.stdout.rpartition("LOADED")
    assert json.loads(out)["kind"] == "full", proc.stderr[-2000:]
    assert loaded.split() == [], loaded
    assert "ESCROWS key material" in proc.stderr  # (development mode: the warning was printed)
    # Its errors are still the SDK's words: a wrong secret gets the credentials hint.
    bad = anvil_cli("backup", "create", "--repo", world["repo"], "--endpoint", world["srv"].endpoint,
                    check=False, env={"ANVIL_CLIENT_SECRET": "not-the-secret"})
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "check the credentials" in bad.stderr, bad.stderr


def test_partial_restore_keeps_only_chosen_bucket(world, tmp_path: Path) -> None:
    ub, vb = world["ub"], world["vb"]
    target = tmp_path / "partial"
    res = cli_json("restore", "--repo", world["repo"], "--snapshot", world["snap"]["id"], "--target", str(target),
                   "--bucket", ub)
    assert res["partial"]["objects"]["kept"] == [ub] and vb in res["partial"]["objects"]["dropped"]
    assert res["blobs_restored"] == 60
    report = cli_json("recovery", "validate", "--storage-path", str(target))
    assert report["ok"], report["needs_operator"]
    srv = AnvilServer(target, env=ENV).start()
    try:
        with srv.client(client_id=CREDS["ANVIL_CLIENT_ID"], client_secret=CREDS["ANVIL_CLIENT_SECRET"]) as c:
            assert [b["name"] for b in c.list_buckets()] == [ub]
            assert c.verify_journal()["ok"]
            last = c.journal(after=world["snap"]["journal_seq"], limit=10)
            assert [e["kind"] for e in last] == ["recovery.partial_restore"]
    finally:
        srv.stop()
    unknown = anvil_cli("restore", "--repo", world["repo"], "--target", str(tmp_path / "x"), "--bucket", "nope-zz",
                        check=False)
    assert unknown.returncode == 1 and "nope-zz" in unknown.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
