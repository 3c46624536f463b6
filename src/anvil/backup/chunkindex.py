"""The repository's chunk index in memory, packed: chunk id -> where it is stored.

A dict of `Location`s held ~280 bytes a chunk (a 64-character key, a slotted object, three
integers, the dict's entry): ~110 MiB for a repository of 400,000 small blobs, loaded whole by
every backup (the writer's `known`), where the issue's target for a whole backup's peak is 300 MB.
Here each chunk is one 52-byte record (`REC`: the id's 32 raw bytes, the pack's number, offset,
length, plaintext length) in one of 65,536 bytearrays chosen by the id's first two bytes. Chunk
ids are HMAC outputs, so the buckets fill evenly; a lookup is one C-level `find` over a bucket's
few records, about as fast as a dict's. New chunks are appended to their bucket (no re-sorting).

Index files are parsed one pack object at a time from the decompressed stream
(`iter_index_packs`), never as one JSON document: a 400,000-chunk index file decoded whole was
another ~110 MiB of lists and strings while a backup started.
"""

from __future__ import annotations

import json
import re
import struct
from binascii import unhexlify
from collections.abc import Iterator
from typing import Any

import zstandard

from anvil.backup.pack import Location

REC = struct.Struct("<32sIQII")  # chunk id (raw), pack number, offset, sealed length, plaintext length
SIZE = REC.size  # 52
BUCKET_BITS = 16


class ChunkIndex:
    """A mapping of chunk id (64 hex characters) -> `Location`, 52 bytes a chunk.

    Supports what the backup code asks of the index: `in`, `get`, `[]`, assignment, `len`,
    iteration, `items()`, `values()`, and `packs()` (the pack ids it names)."""

    def __init__(self) -> None:
        self._buckets: list[bytearray | None] = [None] * (1 << BUCKET_BITS)
        self._packs: list[str] = []
        self._pack_no: dict[str, int] = {}
        self._len = 0
        self._odd: dict[str, Location] = {}  # ids that are not 64 hex digits (never written so)

    # ---------------------------------------------------------------- lookups

    @staticmethod
    def _key(cid: str) -> bytes | None:
        if len(cid) != 64:
            return None
        try:
            return unhexlify(cid)
        except (ValueError, TypeError):  # binascii.Error is a ValueError
            return None

    @staticmethod
    def _find(bucket: bytearray, key: bytes) -> int:
        pos = bucket.find(key)
        while pos > 0 and pos % SIZE:  # the bytes matched across two records: look further
            pos = bucket.find(key, pos + 1)
        return pos

    def _locate(self, cid: str) -> tuple[bytearray | None, int]:
        key = self._key(cid) if isinstance(cid, str) else None
        if key is None:
            return None, -1
        bucket = self._buckets[(key[0] << 8) | key[1]]
        if bucket is None:
            return None, -1
        return bucket, self._find(bucket, key)

    def __contains__(self, cid: object) -> bool:
        key = self._key(cid) if isinstance(cid, str) else None
        if key is None:
            return cid in self._odd
        bucket = self._buckets[(key[0] << 8) | key[1]]
        return bucket is not None and self._find(bucket, key) >= 0

    def get(self, cid: str, default: Location | None = None) -> Location | None:
        bucket, pos = self._locate(cid)
        if pos < 0 or bucket is None:
            return self._odd.get(cid, default)
        _, pack, off, length, raw = REC.unpack_from(bucket, pos)
        return Location(self._packs[pack], off, length, raw)

    def __getitem__(self, cid: str) -> Location:
        loc = self.get(cid)
        if loc is None:
            raise KeyError(cid)
        return loc

    def __len__(self) -> int:
        return self._len + len(self._odd)

    # ---------------------------------------------------------------- updates

    def pack_number(self, pack_id: str) -> int:
        n = self._pack_no.get(pack_id)
        if n is None:
            n = self._pack_no[pack_id] = len(self._packs)
            self._packs.append(pack_id)
        return n

    def add(self, cid: str, pack_no: int, offset: int, length: int, raw_length: int) -> None:
        """Record (or move: the last one read wins, as in a dict) one chunk's location."""
        key = self._key(cid)
        if key is None:
            self._odd[cid] = Location(self._packs[pack_no], offset, length, raw_length)
            return
        b = (key[0] << 8) | key[1]
        bucket = self._buckets[b]
        record = REC.pack(key, pack_no, offset, length, raw_length)
        if bucket is None:
            self._buckets[b] = bytearray(record)
        else:
            pos = self._find(bucket, key)
            if pos >= 0:
                bucket[pos:pos + SIZE] = record
                return
            bucket += record
        self._len += 1

    def __setitem__(self, cid: str, loc: Location) -> None:
        self.add(cid, self.pack_number(loc.pack), loc.offset, loc.length, loc.raw_length)

    # ---------------------------------------------------------------- whole-index walks

    def _records(self) -> Iterator[tuple[str, int, int, int, int]]:
        for bucket in self._buckets:
            if bucket:
                for key, pack, off, length, raw in REC.iter_unpack(bucket):
                    yield key.hex(), pack, off, length, raw

    def items(self) -> Iterator[tuple[str, Location]]:
        packs = self._packs
        for cid, pack, off, length, raw in self._records():
            yield cid, Location(packs[pack], off, length, raw)
        yield from list(self._odd.items())

    def keys(self) -> Iterator[str]:
        for cid, *_ in self._records():
            yield cid
        yield from list(self._odd)

    __iter__ = keys

    def values(self) -> Iterator[Location]:
        for _, loc in self.items():
            yield loc

    def packs(self) -> set[str]:
        """The ids of the packs at least one chunk is recorded in."""
        used: set[int] = set()
        for bucket in self._buckets:
            if bucket:
                used.update(pack for _, pack, _, _, _ in REC.iter_unpack(bucket))
        return {self._packs[n] for n in used} | {loc.pack for loc in self._odd.values()}


_HEAD = re.compile(r'\s*\{\s*"packs"\s*:\s*\[')
_SKIP = re.compile(r"[\s,]*")
READ = 1 << 20


def iter_index_packs(plain: bytes) -> Iterator[dict[str, Any]]:
    """The pack objects of an index file's body (`pack.compress` of `{"packs": [...]}`), one at a
    time, decompressed and decoded as they are reached: at most one pack's entries (a few
    thousand) are Python objects at once. Raises ValueError or zstandard.ZstdError if unreadable."""
    if plain[:1] == b"\x00":
        stream: Any = _BytesReader(memoryview(plain)[1:])
    elif plain[:1] == b"\x01":
        stream = zstandard.ZstdDecompressor().stream_reader(memoryview(plain)[1:])
    else:
        raise ValueError("unknown compression tag")
    decoder = json.JSONDecoder()
    buf = ""
    eof = False

    def more() -> bool:
        nonlocal buf, eof
        if eof:
            return False
        piece = stream.read(READ)
        if not piece:
            eof = True
            return False
        buf += piece.decode()
        return True

    while len(buf) < 64 and more():
        pass
    head = _HEAD.match(buf)
    if head is None:
        while more():
            pass
        body = json.loads(buf)
        yield from body["packs"]
        return
    pos = head.end()
    while True:
        pos = _SKIP.match(buf, pos).end()  # type: ignore[union-attr]
        while pos >= len(buf):
            if not more():
                raise ValueError("index file ends inside its pack list")
            pos = _SKIP.match(buf, pos).end()  # type: ignore[union-attr]
        if buf[pos] == "]":
            return
        while True:
            try:
                pack, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError:
                if not more():
                    raise
        yield pack
        buf, pos = buf[end:], 0  # what was decoded is dropped: the buffer stays about one pack


class _BytesReader:
    def __init__(self, view: memoryview):
        self.view = view
        self.pos = 0

    def read(self, n: int) -> bytes:
        out = bytes(self.view[self.pos:self.pos + n])
        self.pos += len(out)
        return out
