"""A restore's small blobs (pack windows, in worker processes or in process) and its large and
spread-over-packs blobs (on threads, at the same time) make one restore together.

The store is built in process and backed up into a repository of small packs (256 KiB), so
every blob of several chunks spans packs. It holds many small blobs, several larger than a
worker's limit (4 MiB) and some of 0.3-1.5 MiB cut into several chunks. Restored with the
worker pool forced on and with it off, both give the live store's blob files byte for byte and
validate; a damaged pack under one large blob fails that blob alone, while every small blob
around it is restored.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from anvil.backup import engine
from anvil.backup.backends.local import LocalBackend
from anvil.backup.pack import pack_name
from anvil.backup.repository import Repository
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil
from tests.helpers import blob_file_hashes, run_anvil

PASS = "restore mix passphrase"
ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": PASS}
WORKERS_ON = {"ANVIL_BACKUP_WORKERS": "2", "ANVIL_BACKUP_PROCESS_MIN": "1"}
WORKERS_OFF = {"ANVIL_BACKUP_WORKERS": "0"}
KiB, MiB = 1024, 1024 * 1024
LARGE = 4 * MiB + 300 * KiB  # above workers.SMALL_MAX: never in a pack window

pytestmark = pytest.mark.timeout(600)


def anvil_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_anvil([*args], env={**os.environ, **ENV, **env}, capture_output=True, timeout=300, text=True)


@pytest.fixture(scope="module")
def mix(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("restore-mix")
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # the in-process snapshot reads them; restored below for later modules
    rng = random.Random(23)
    data = base / "data"
    anvil = Anvil(data)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        anvil.objects.create_bucket(ctx, "mix")
        sizes = ([rng.randint(70 * KiB, 250 * KiB) for _ in range(80)] + [LARGE, LARGE + 7, LARGE + 11]
                 + [300 * KiB, 700 * KiB, 1536 * KiB])
        for i, size in enumerate(sizes):
            body = rng.randbytes(size)  # incompressible: packs fill as sized
            anvil.objects.put_object(ctx, "mix", f"k/{i:03d}", anvil.storage.blobs.put_bytes(body))
        repo = Repository.init(LocalBackend(base / "repo"), PASS, pack_target=256 * KiB)
        manifest = engine.create_snapshot(
            anvil.storage.root, anvil.storage.layout.catalog_path, anvil.storage.blobs, anvil.storage.layout.tmp,
            anvil.storage.format.deployment_id, anvil.participants(), repo)
    finally:
        anvil.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert manifest["problems"] == []
    index = Repository.open(LocalBackend(base / "repo"), PASS).index()
    blobs = manifest["tree"]["blobs"]
    spread = [s for s, e in blobs.items() if len({index[c].pack for c in e["chunks"]}) > 1]
    large = [s for s, e in blobs.items() if e["size"] > 4 * MiB]
    # What the restore's parts each need: many one-pack small blobs, several large, some spread.
    assert len(large) == 3 and len(set(spread) - set(large)) >= 2 and len(blobs) - len(spread) >= 70
    return {"base": base, "data": data, "repo": base / "repo", "manifest": manifest, "index": index,
            "large": large, "spread": sorted(set(spread) - set(large))}


@pytest.mark.parametrize("pool", [WORKERS_ON, WORKERS_OFF], ids=["worker-processes", "in-process"])
def test_small_large_and_spread_blobs_restore_together(mix, pool: dict[str, str]) -> None:
    target = mix["base"] / f"restored-{pool['ANVIL_BACKUP_WORKERS']}"
    proc = anvil_cli("restore", "--repo", f"file://{mix['repo']}", "--target", str(target), "--json", env=pool)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(proc.stdout)
    assert res["ok"] and res["blobs_restored"] == len(mix["manifest"]["tree"]["blobs"]), res
    live = blob_file_hashes(mix["data"])
    assert len(live) == 86
    assert blob_file_hashes(target) == live  # each file's bytes, and no file more or less
    check = anvil_cli("recovery", "validate", "--storage-path", str(target), "--json", env={})
    assert check.returncode == 0 and json.loads(check.stdout)["ok"], check.stdout + check.stderr


@pytest.mark.parametrize("kind", ["large", "spread"])
def test_a_damaged_large_blob_fails_alone_while_workers_restore_the_small_ones(mix, tmp_path: Path,
                                                                               kind: str) -> None:
    """`spread`: a blob under the windows' limit whose chunks span packs, restored beside the large
    ones on their threads (from the start, no longer after the windows)."""
    repo = tmp_path / "repo"
    shutil.copytree(mix["repo"], repo)
    blobs, index = mix["manifest"]["tree"]["blobs"], mix["index"]
    owners: dict[str, set[str]] = {}  # pack -> the blobs with a chunk in it
    for sha, e in blobs.items():
        for c in e["chunks"]:
            owners.setdefault(index[c].pack, set()).add(sha)
    # A pack in the middle of the blob, holding nothing else: only that blob can fail.
    victim, pack = next((sha, index[c].pack) for sha in mix[kind] for c in blobs[sha]["chunks"][1:]
                        if owners[index[c].pack] == {sha})
    path = repo / pack_name(pack)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    target = tmp_path / "restored"
    proc = anvil_cli("restore", "--repo", f"file://{repo}", "--target", str(target), "--json", env=WORKERS_ON)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    res = json.loads(proc.stdout)
    assert not res["ok"] and len(res["problems"]) == 1, res["problems"]
    assert res["problems"][0].startswith(f"blob {victim}: "), res["problems"]
    assert "mix/k/08" in res["problems"][0]  # the object it affects (k/080-082 large, k/083-085 spread)
    live = blob_file_hashes(mix["data"])
    restored = blob_file_hashes(target)
    assert victim not in restored  # a blob that failed its check leaves no file
    assert restored == {k: v for k, v in live.items() if k != victim}


class CountingBackend(LocalBackend):
    """The local backend, counting the bytes it reads (whole files and ranges)."""

    read_bytes = 0

    def read(self, name: str) -> bytes:
        data = super().read(name)
        if name.startswith("data/"):
            self.read_bytes += len(data)
        return data

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        data = super().read_range(name, offset, length)
        self.read_bytes += len(data)
        return data


@pytest.mark.parametrize("max_span", [None, 1], ids=["spans", "a-chunk-at-a-time"])
def test_large_blobs_are_read_a_span_at_a_time(mix, monkeypatch: pytest.MonkeyPatch, max_span: int | None) -> None:
    import hashlib

    from anvil.backup import pack

    if max_span is not None:
        monkeypatch.setattr(pack, "MAX_SPAN", max_span)
    blobs, index = mix["manifest"]["tree"]["blobs"], mix["index"]
    for sha in mix["large"]:
        chunks = blobs[sha]["chunks"]
        spans = CountingBackend(mix["repo"])
        h = hashlib.sha256()
        for data in pack.SpanReader(Repository.open(spans, PASS)).iter_file(chunks, check_id=True):
            h.update(data)
        assert h.hexdigest() == sha
        # Exactly the blob's sealed chunks come off the disk, not the packs around them.
        assert spans.read_bytes == sum(index[c].length for c in chunks)
        whole = CountingBackend(mix["repo"])
        list(pack.ChunkReader(Repository.open(whole, PASS)).iter_file(chunks))
        assert whole.read_bytes > spans.read_bytes  # (whole packs: what the large blobs' reader read before)
