"""Sorting more strings than should be held: runs sorted in memory, spilled to temporary files,
merged back in one pass. A summary that digests every version row in sorted order (the objects
participant's listing digest) then costs one run's memory, not the store's."""

from __future__ import annotations

import heapq
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

RUN = 50_000  # strings sorted in memory at a time (~10 MB of listing rows)
_LEN = struct.Struct("<I")


def _write_run(run: list[str], folder: Path | None) -> IO[bytes]:
    f = tempfile.TemporaryFile(dir=folder, prefix="anvil-sort-")  # noqa: SIM115 - closed by the merge
    run.sort()
    buf = bytearray()
    for s in run:
        b = s.encode("utf-8", "surrogatepass")
        buf += _LEN.pack(len(b))
        buf += b
        if len(buf) > 1 << 20:
            f.write(buf)
            buf.clear()
    f.write(buf)
    f.seek(0)
    return f


def _read_run(f: IO[bytes]) -> Iterator[str]:
    try:
        while head := f.read(4):
            (n,) = _LEN.unpack(head)
            yield f.read(n).decode("utf-8", "surrogatepass")
    finally:
        f.close()


class Sorter:
    """Strings added one by one, read back sorted (`sorted`'s order: UTF-8 byte order is code
    point order), holding at most `run` of them in memory; the rest wait in temporary files."""

    def __init__(self, folder: Path | None = None, run: int | None = None):
        self.folder = folder if folder is not None and Path(folder).is_dir() else None
        self.run = run or RUN
        self.buf: list[str] = []
        self.files: list[IO[bytes]] = []

    def add(self, s: str) -> None:
        self.buf.append(s)
        if len(self.buf) >= self.run:
            self.files.append(_write_run(self.buf, self.folder))
            self.buf = []

    def __iter__(self) -> Iterator[str]:
        """Once: the spilled runs are consumed (and their files closed) by the merge."""
        buf, files = self.buf, self.files
        self.buf, self.files = [], []
        buf.sort()
        try:
            if not files:
                yield from buf
            else:
                yield from heapq.merge(*(_read_run(f) for f in files), iter(buf))
        finally:
            for f in files:
                f.close()

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files, self.buf = [], []


def sorted_strings(items: Iterable[str], folder: Path | None = None, run: int | None = None) -> Iterator[str]:
    """`iter(sorted(items))`, holding at most `run` strings (plus a read buffer per spilled run)."""
    sorter = Sorter(folder, run)
    try:
        for s in items:
            sorter.add(s)
        yield from sorter
    finally:
        sorter.close()
