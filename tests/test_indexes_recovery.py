"""Indexes through backup, restore, the drill, fsck and repair (real server processes, the CLI)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.helpers import AnvilServer, Cli, unique_bucket

ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "index passphrase"}
SCRUB = ("ANVIL_CLIENT_ID", "ANVIL_CLIENT_SECRET")


_CLI = Cli(ENV, SCRUB)
run, ok_json = _CLI.run, _CLI.json


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("indexes-recovery")
    srv = AnvilServer(base / "data", env=ENV).start()
    admin = srv.admin_credentials()
    creds = {"ANVIL_CLIENT_ID": admin["client_id"], "ANVIL_CLIENT_SECRET": admin["client_secret"]}
    rng = random.Random(3)
    words = ["anvil", "forge", "hammer", "steel", "spark", "bellows", "tongs", "quench"]
    try:
        with srv.client() as c:
            bucket = unique_bucket("ixr")
            c.create_bucket(bucket, versioning="Enabled")
            c.create_index(bucket, {"name": "text", "kind": "full-text", "selector": {"prefix": "docs/"},
                                    "fields": {"body": {"source": "json:/body", "type": "text"},
                                               "shop": {"source": "json:/shop", "type": "keyword"}}})
            c.create_index(bucket, {"name": "vec", "kind": "vector", "selector": {"prefix": "docs/"},
                                    "fields": {"emb": {"source": "json:/emb", "type": "vector", "dimension": 4},
                                               "shop": {"source": "json:/shop", "type": "keyword"}},
                                    "vector": {"metric": "l2"}})
            c.create_index(bucket, {"name": "off", "kind": "metadata", "fields": {"k": {"source": "key",
                                                                                       "type": "keyword"}}})
            c.disable_index(bucket, "off")
            for i in range(60):
                doc = {"body": " ".join(rng.choice(words) for _ in range(12)), "shop": f"s{i % 4}",
                       "emb": [rng.uniform(-1, 1) for _ in range(4)]}
                c.put_object(bucket, f"docs/{i:03d}", json.dumps(doc).encode(), content_type="application/json")
            c.put_object(bucket, "docs/005", b'{"body": "rewritten forge", "shop": "s9", "emb": [0, 0, 0, 1]}')
            c.delete_object(bucket, "docs/007")
            c.put_object(bucket, "misc/x", b'{"body": "anvil outside"}')
            head = c.health()["journal"]["seq"]
            assert c.search(bucket, "text", text="forge", min_cursor=head, wait_ms=10_000)["hits"]
        repo = f"file://{base / 'repo'}"
        ok_json("backup", "init", "--repo", repo)
        snap = ok_json("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, "--escrow-secrets",
                       creds=creds)
        yield {"srv": srv, "base": base, "repo": repo, "creds": creds, "bucket": bucket, "snap": snap}
    finally:
        srv.stop()


def test_backup_records_definitions_and_generations(world) -> None:
    out = ok_json("backup", "inspect", "--repo", world["repo"], world["snap"]["id"])
    row = next(r for r in out["checklist"] if r["participant"] == "indexes")
    s = row["summary"]
    names = {(d["name"], d["state"]) for d in s["definitions"]}
    assert names == {("text", "enabled"), ("vec", "enabled"), ("off", "disabled")}
    ix = s["indexes"][f"{world['bucket']}/text"]
    assert ix["expected_documents"] == 59 and ix["generation"]["documents"] == 59
    assert not [f for f in out["tree"]["files"] if f.startswith("indexes/")]  # segments are rebuilt, not copied


def test_drill_rebuilds_and_proves_every_index(world, tmp_path: Path) -> None:
    proc = run("drill", "--repo", world["repo"], "--snapshot", world["snap"]["id"], "--report-dir", str(tmp_path),
               "--json", creds=world["creds"])
    report = json.loads((tmp_path / "drill-report.json").read_text())
    assert proc.returncode == 0, json.dumps([c for c in report["checks"] if not c["ok"]], indent=1)
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["smoke: indexes"]["ok"]
    msg = " ".join(f["message"] for f in checks["smoke: indexes"]["findings"])
    assert "2 rebuilt indexes cover exactly their restored objects" in msg
    covered = {c["item"]: c["participants"] for c in report["coverage"]}
    assert covered["vector segments and HNSW graph"] == ["indexes"]


def test_restore_then_fsck_repair_index(world, tmp_path: Path) -> None:
    target = tmp_path / "restored"
    ok_json("restore", "--repo", world["repo"], "--snapshot", world["snap"]["id"], "--target", str(target))
    report = ok_json("recovery", "validate", "--storage-path", str(target))
    assert report["ok"], report["needs_operator"]
    srv = AnvilServer(target, env=ENV).start()
    try:
        bucket = world["bucket"]
        with srv.client(client_id=world["creds"]["ANVIL_CLIENT_ID"],
                        client_secret=world["creds"]["ANVIL_CLIENT_SECRET"]) as c:
            head = c.health()["journal"]["seq"]
            res = c.search(bucket, "text", filter={"field": "shop", "op": "eq", "value": "s9"}, min_cursor=head,
                           wait_ms=10_000)
            assert [h["key"] for h in res["hits"]] == ["docs/005"]
            fsck = c.fsck()
            assert not [f for f in fsck["findings"] if f["subsystem"] == "indexes" and f["severity"] == "error"]
            # Damage a generation file: fsck names it; repair index rebuilds; fsck is clean again.
            gen = next((target / "indexes" / bucket / "text").glob("v*/tantivy/*.store"))
            gen.write_bytes(gen.read_bytes()[:-8] + b"XXXXXXXX")
            bad = [f for f in c.fsck()["findings"] if f["subsystem"] == "indexes" and f["severity"] == "error"]
            assert bad and bad[0]["invariant"] == "indexes.generation_files" and ".store" in bad[0]["detail"]
            creds = {"ANVIL_CLIENT_ID": world["creds"]["ANVIL_CLIENT_ID"],
                     "ANVIL_CLIENT_SECRET": world["creds"]["ANVIL_CLIENT_SECRET"]}
            out = ok_json("repair", "index", bucket, "text", "--endpoint", srv.endpoint, creds=creds)
            assert out["rebuilt"] and out["documents"] == 59
            assert not [f for f in c.fsck()["findings"] if f["subsystem"] == "indexes" and f["severity"] == "error"]
            assert c.search(bucket, "text", text="forge")["count"] > 0
    finally:
        srv.stop()
