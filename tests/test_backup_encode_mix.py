"""A backup's blobs of every size class, encoded together: tiny ones (up to 16 KiB) on the
backup's own thread, mid-size and large ones on the encoder threads in one stream, while the
backup's thread appends every result to the packs (engine._encode_new_blobs).

The store holds tiny, mid-size (16-256 KiB, compressible and not) and large blobs (several
chunks), bodies stored inline, one corrupt and one missing blob of each of the two smaller classes. The snapshot
(worker processes off: the threaded path) must name exactly those four as problems, hold every
other blob with its recorded size, and restore them byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from anvil.backup import engine
from anvil.backup.backends.local import LocalBackend
from anvil.backup.repository import Repository
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil
from anvil.storage import inline, records
from tests.helpers import blob_file_hashes, run_anvil

PASS = "encode mix passphrase"
ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": PASS, "ANVIL_BACKUP_WORKERS": "0"}
KiB, MiB = 1024, 1024 * 1024

pytestmark = pytest.mark.timeout(300)


def _body(rng: random.Random, size: int, compressible: bool) -> bytes:
    if not compressible:
        return rng.randbytes(size)
    words = [b"anvil", b"keeps", b"every", b"byte", b"safe", b"and", b"sound"]
    return b" ".join(rng.choice(words) for _ in range(size // 4))[:size]


def test_tiny_mid_and_large_blobs_encode_together_with_bad_ones_reported(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    rng = random.Random(11)
    data = tmp_path / "data"
    anvil = Anvil(data)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        anvil.objects.create_bucket(ctx, "mix")
        tiny = [rng.randint(1, 16 * KiB) for _ in range(60)]
        mid = [rng.randint(16 * KiB + 1, 256 * KiB) for _ in range(60)]
        large = [3 * MiB + 5, 5 * MiB + 17]
        shas: dict[str, list[str]] = {"tiny": [], "mid": [], "large": []}
        for kind, sizes in (("tiny", tiny), ("mid", mid), ("large", large)):
            for i, size in enumerate(sizes):
                ref = anvil.storage.blobs.put_bytes(_body(rng, size, i % 2 == 0))
                anvil.objects.put_object(ctx, "mix", f"{kind}/{i:03d}", ref)
                shas[kind].append(ref.sha256)
        # Bodies up to 64 KiB stored inline in catalog.db: read by whichever thread encodes them.
        inline_shas = []
        for i in range(12):
            ref = anvil.objects.store_bytes(_body(rng, rng.randint(1, 60 * KiB), i % 2 == 0))
            anvil.objects.put_object(ctx, "mix", f"inline/{i:03d}", ref)
            inline_shas.append(ref.sha256)
        bad: dict[str, str] = {}
        for kind in ("tiny", "mid"):
            corrupt, missing = (Path(anvil.storage.blobs.file_path(s)) for s in shas[kind][3:5])
            os.chmod(corrupt, 0o644)
            corrupt.write_bytes(b"not what was stored")
            missing.unlink()
            bad[corrupt.name], bad[missing.name] = "corrupt", "missing"
        repo = Repository.init(LocalBackend(tmp_path / "repo"), PASS)
        manifest = engine.create_snapshot(
            anvil.storage.root, anvil.storage.layout.catalog_path, anvil.storage.blobs, anvil.storage.layout.tmp,
            anvil.storage.format.deployment_id, anvil.participants(), repo)
    finally:
        anvil.close()
    problems = "\n".join(manifest["problems"])
    assert len(manifest["problems"]) == 4, problems
    for sha, how in bad.items():
        expected = f"blob {sha} in STORAGE_PATH is corrupt" if how == "corrupt" else f"blob {sha} referenced by"
        assert expected in problems
    tree = manifest["tree"]["blobs"]
    live = blob_file_hashes(data)
    assert set(tree) - set(inline_shas) == {s for s in live if s not in bad}
    assert {s: e["size"] for s, e in tree.items() if s in live} == {
        s: os.path.getsize(anvil.storage.blobs.file_path(s)) for s in tree if s in live}
    assert len(tree[shas["large"][1]]["chunks"]) > 1  # cut into several chunks
    assert set(inline_shas) <= set(tree) and not set(inline_shas) & set(live)
    target = tmp_path / "restored"
    proc = run_anvil(["restore", "--repo", f"file://{tmp_path / 'repo'}", "--target", str(target), "--json"],
                     env={**os.environ, **ENV}, capture_output=True, timeout=240, text=True)
    res = json.loads(proc.stdout)
    assert res["blobs_restored"] == len(tree), res
    restored = blob_file_hashes(target)
    assert {s: h for s, h in restored.items() if s not in inline_shas} == {
        s: h for s, h in live.items() if s not in bad}
    assert all(s == h for s, h in restored.items())  # each restored file hashes to its name
    conn = records.open_readonly(target / "catalog.db")
    try:
        assert all(hashlib.sha256(inline.get(conn, s) or b"").hexdigest() == s for s in inline_shas)
    finally:
        records.close(conn)
