"""Large bodies: received pieces are written as they came (no copies), hashed with the MD5 on a side
thread that may trail the writes, written back as they are written and, past `ANVIL_DROP_BEHIND`,
dropped from the page cache behind the writes. Whatever the pieces, the
stored blob, its digests, its sidecar and what a read serves are those of the body as one buffer
(in process, on a real BlobStore; tests/test_objects.py streams such a body through a server)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from anvil.api.common import SMALL_PIECE, BlockGatherer
from anvil.errors import AnvilError
from anvil.storage import blobs
from anvil.storage.blobs import BlobStore, decode_sidecar, digest_bytes

MIB = 1024 * 1024


def _pieces(seed: int) -> list[bytes]:
    """A body of ~6 MiB in pieces of every kind of size: tiny, under SMALL_PIECE, socket-sized, over 1 MiB
    (tests/test_objects.py streams the same through a real server)."""
    rnd = hashlib.sha256(str(seed).encode()).digest()
    sizes = [1, 7, 4096, SMALL_PIECE - 1, SMALL_PIECE, 300_000, 1, 2 * MIB + 5, 65_537, 3 * MIB, 12_345]
    return [(rnd * (n // 32 + 1))[:n] for n in sizes]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BlobStore:
    # Small thresholds, so a body of a few MiB goes through writeback and drop-behind windows.
    monkeypatch.setattr(blobs, "WRITEBACK_EVERY", MIB)
    (tmp_path / "blobs" / "sha256").mkdir(parents=True)
    (tmp_path / "tmp").mkdir()
    store = BlobStore(tmp_path / "blobs" / "sha256", tmp_path / "tmp")
    store.drop_behind = 2 * MIB
    return store


def test_pieces_store_the_same_blob_as_one_buffer(store: BlobStore) -> None:
    pieces = _pieces(1)
    body = b"".join(pieces)
    w = store.writer()
    # Blocks as stream_into makes them: immutable bytes (the MD5 may trail), mutable buffers too.
    w.write_pieces(pieces[:4])
    w.write_pieces([memoryview(pieces[4]), bytearray(pieces[5])])
    w.write_pieces(pieces[6:])
    info = w.commit()
    assert info == digest_bytes(body)
    assert store.path(info.sha256).read_bytes() == body
    _, digests = decode_sidecar(store.sidecar_path(info.sha256).read_bytes(), len(body))
    assert digests == [blobs.chunk_digest(body[i:i + blobs.CHUNK_SIZE]) for i in range(0, len(body), blobs.CHUNK_SIZE)]
    # Read back from the disk (the pages were dropped behind the writes), whole and a range across chunks.
    assert b"".join(store.read_verified(info.sha256, len(body))) == body
    lo, hi = MIB - 3, 3 * MIB + 17
    assert b"".join(store.read_verified(info.sha256, len(body), lo, hi - lo)) == body[lo:hi]


def test_a_reused_buffer_is_hashed_before_write_returns(store: BlobStore) -> None:
    """A caller may refill its buffer once `write` returns: the side MD5 must be done with it."""
    buf = bytearray(512 * 1024)
    parts = []
    w = store.writer()
    for i in range(4):
        buf[:] = bytes([i]) * len(buf)
        parts.append(bytes(buf))
        w.write(buf)
    assert w.digests() == digest_bytes(b"".join(parts))
    w.abort()


def test_gatherer_keeps_large_pieces_and_joins_small_ones() -> None:
    pieces = _pieces(2)
    g = BlockGatherer(block=2 * MIB)
    blocks = [b for p in pieces if (b := g.add(p)) is not None]
    blocks.append(g.take())
    assert b"".join(b"".join(block) for block in blocks) == b"".join(pieces)
    assert all(sum(map(len, block)) >= 2 * MIB for block in blocks[:-1])
    flat = [p for block in blocks for p in block]
    # Large pieces travel by reference (no copy); small ones in a row were joined into one piece.
    assert any(p is pieces[9] for p in flat)
    assert len(flat) < len(pieces)
    assert not any(len(a) < SMALL_PIECE and len(b) < SMALL_PIECE
                   for block in blocks for a, b in zip(block, block[1:], strict=False))
    assert g.take() == []


def test_drop_behind_setting_is_checked() -> None:
    assert blobs.drop_behind_from_env({}) == blobs.DROP_BEHIND_DEFAULT
    assert blobs.drop_behind_from_env({"ANVIL_DROP_BEHIND": "0"}) == 0
    assert blobs.drop_behind_from_env({"ANVIL_DROP_BEHIND": "64M"}) == 64 * MIB
    with pytest.raises(AnvilError) as err:
        blobs.drop_behind_from_env({"ANVIL_DROP_BEHIND": "lots"})
    assert err.value.code == "InvalidArgument" and "ANVIL_DROP_BEHIND" in str(err.value)
