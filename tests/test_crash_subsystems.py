"""SIGKILL of a real `anvil serve` in the middle of subsystem writes other than the PUT storms of
tests/test_crash.py: after a restart every acknowledged write is there, nothing half-done shows,
the server starts without repair and an offline `anvil fsck --deep` is clean.

Each test lands the kill inside one precise window (found by watching the store from outside, as an
operator's `kill -9` could), so it fails every time the bug it guards is back, not once in a while.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import apsw
import numpy as np
import pytest

from tests.helpers import AnvilServer, assert_fsck_clean

pytestmark = pytest.mark.timeout(180)


def _poll(cond, timeout: float = 60.0, interval: float = 0.001) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return False


def _catalog_has(storage: Path, sql: str) -> bool:
    """A read-only look at catalog.db from outside the server (WAL: sees every commit)."""
    try:
        conn = apsw.Connection(str(storage / "catalog.db"), flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error:
        return False
    try:
        return conn.execute(sql).fetchone() is not None
    except apsw.Error:  # the table does not exist yet
        return False
    finally:
        conn.close()


# -- artefacts ------------------------------------------------------------------------------------

def test_kill_right_after_a_model_manifest_commits_keeps_its_tensor_index(tmp_path: Path) -> None:
    """The tensor index of every safetensors component is published before the manifest commits: a
    kill just after the commit (here: the moment the manifest row is visible) leaves a recorded
    manifest whose every component is indexed (fsck: no `artefacts.tensor_index_missing`)."""
    from safetensors.numpy import save_file

    model = tmp_path / "model"
    model.mkdir()
    for i in range(150):  # many components: the window after the commit is long enough to kill in
        save_file({f"w{i}": np.full((4, 4), i, dtype=np.float32)}, str(model / f"part-{i:03d}.safetensors"))
    srv = AnvilServer(tmp_path / "data").start()
    outcome: list[object] = []
    try:
        with srv.client() as c:
            c.create_bucket("models")

        def push() -> None:
            try:
                with srv.client(timeout=60) as c:
                    outcome.append(c.push_model("models", "m", model))
            except Exception as e:  # noqa: BLE001 - killed under us: not acknowledged
                outcome.append(e)

        t = threading.Thread(target=push)
        t.start()
        assert _poll(lambda: _catalog_has(srv.storage_path, "SELECT 1 FROM artefacts")), "no manifest committed"
        srv.kill()
        t.join(60)
        srv.start()  # no repair run: what the crash left is what fsck sees
        with srv.client() as c:
            [art] = c.list_artefacts("models", "m").artefacts
    finally:
        srv.stop()
    assert_fsck_clean(srv.storage_path)


# -- online backup --------------------------------------------------------------------------------

BACKUP_ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "crash passphrase"}


def test_kill_during_an_online_backup_leaves_no_checkpoint_behind(tmp_path: Path) -> None:
    """An online backup copies catalog.db into tmp/checkpoint-*/ first. SIGKILL while that copy exists:
    the restarted server clears it (it used to clear only files, so every interrupted backup left a
    whole catalog copy behind for ever), the next backup succeeds and fsck is clean."""
    import os
    import random

    repo = f"file://{tmp_path / 'repo'}"
    env = {**os.environ, **BACKUP_ENV}
    subprocess.run([sys.executable, "-m", "anvil.cli.main", "backup", "init", "--repo", repo], env=env,
                   check=True, capture_output=True)
    srv = AnvilServer(tmp_path / "data", env=BACKUP_ENV).start()
    tmp = srv.storage_path / "tmp"
    try:
        rng = random.Random(7)
        with srv.client() as c:
            c.create_bucket("bkup")
            acked = {f"k{i}": rng.randbytes(rng.choice([100, 80_000, 300_000])) for i in range(40)}
            for k, body in acked.items():
                c.put_object("bkup", k, body)
        done: list[object] = []

        def backup() -> None:
            try:
                with srv.client(timeout=120) as c:
                    done.append(c.create_backup(repo))
            except Exception as e:  # noqa: BLE001 - killed under us
                done.append(e)

        t = threading.Thread(target=backup)
        t.start()
        assert _poll(lambda: any(p.name.startswith("checkpoint-") for p in tmp.iterdir())), "no checkpoint seen"
        srv.kill()
        t.join(60)
        assert any(p.is_dir() for p in tmp.iterdir())  # the kill landed while the checkpoint existed
        srv.start()
        assert list(tmp.iterdir()) == []  # start-up clears what a dead process left in tmp/, folders too
        with srv.client(timeout=120) as c:
            for k, body in acked.items():
                assert c.get_object("bkup", k) == body
            snap = c.create_backup(repo)  # the dead backup's repository lock does not block the next one
            assert snap.id
    finally:
        srv.stop()
    assert_fsck_clean(srv.storage_path)


def test_a_blob_gc_had_moved_aside_when_killed_is_named_again_at_start(tmp_path: Path) -> None:
    """gc renames an orphan blob into tmp/ (`gc-<sha256>-<id>`) and links it back if a PUT of the same
    content refreshed it meanwhile. Killed between the two, the file is the only copy of a body that PUT
    was acknowledged for: start-up must name it again, not delete it with the rest of tmp/."""
    srv = AnvilServer(tmp_path / "data").start()
    try:
        body = bytes(range(256)) * 1200  # 300 KiB: a blob file, not an inline body
        with srv.client() as c:
            c.create_bucket("gcq")
            sha = c.put_object("gcq", "k", body).sha256
    finally:
        srv.kill()
    blob = srv.storage_path / "blobs" / "sha256" / sha[:2] / sha
    assert blob.is_file()
    blob.rename(srv.storage_path / "tmp" / f"gc-{sha}-0badc0de")  # where gc's kill left it
    srv.start()
    try:
        assert list((srv.storage_path / "tmp").iterdir()) == []
        with srv.client() as c:
            assert c.get_object("gcq", "k") == body
    finally:
        srv.stop()
    assert_fsck_clean(srv.storage_path)


# -- search indexes -------------------------------------------------------------------------------

TEXT_INDEX = {"name": "docs", "kind": "full-text", "selector": {"prefix": "docs/"},
              "fields": {"body": {"source": "json:/body", "type": "text"},
                         "n": {"source": "json:/n", "type": "integer"}}}


def _manifest_files_missing(vdir: Path) -> bool:
    """The published generation's manifest names tantivy files that are gone (a newer commit's merges
    removed them, and the manifest of that commit is not written yet)."""
    try:
        files = json.loads((vdir / "MANIFEST.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return any(not (vdir / rel).is_file() for rel in files)


def test_kill_between_an_index_commit_and_its_manifest(tmp_path: Path) -> None:
    """SIGKILL after tantivy committed (and its merges removed segments of the published generation)
    but before the new manifest replaced the old one. Offline fsck straight after the crash used to
    call that `indexes.generation_files` errors (operator action required) although the server opens it
    on purpose and replays from the manifest's cursor; the restarted server catches up and covers
    exactly the objects, and fsck is clean before and after the restart."""
    import random

    srv = AnvilServer(tmp_path / "data").start()
    vdir = srv.storage_path / "indexes" / "idx-b" / "docs" / "v1"
    words = [f"word{i}" for i in range(2000)]
    try:
        with srv.client() as c:
            c.create_bucket("idx-b")
            c.create_index("idx-b", TEXT_INDEX)
        hit = False
        for attempt in range(8):  # a kill at the wrong moment lands after the publish: try again
            stop = threading.Event()

            def writer(w: int, stop: threading.Event = stop, attempt: int = attempt) -> None:
                rng = random.Random(w * 100 + attempt)
                i = 0
                with srv.client(timeout=30) as c:
                    while not stop.is_set():
                        body = " ".join(rng.choices(words, k=3000))
                        try:
                            c.put_object("idx-b", f"docs/{w}-{rng.randint(0, 40)}",
                                         json.dumps({"body": body, "n": i}).encode(),
                                         content_type="application/json")
                        except Exception:  # noqa: BLE001 - killed under us
                            return
                        i += 1

            threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
            for t in threads:
                t.start()
            _poll(lambda: _manifest_files_missing(vdir), timeout=15, interval=0.0005)
            srv.kill()
            stop.set()
            for t in threads:
                t.join(30)
            if _manifest_files_missing(vdir):
                hit = True
                break
            srv.start()
        assert hit, "no kill landed between a commit and its manifest"
        assert_fsck_clean(srv.storage_path)  # the crash's state, before any restart
        srv.start()
        with srv.client() as c:
            head = c.health()["journal"]["seq"]
            keys, token = set(), None
            while True:
                q = {"filter": {"field": "n", "op": "gte", "value": 0}, "limit": 500, "min_cursor": head,
                     "wait_ms": 10000, **({"page_token": token} if token else {})}
                res = c.search("idx-b", "docs", **q)
                keys |= {h["key"] for h in res.hits}
                if not (token := res.next_page_token):
                    break
            assert keys == {o.key for o in c.iter_objects("idx-b")}
    finally:
        srv.stop()
    assert_fsck_clean(srv.storage_path)
