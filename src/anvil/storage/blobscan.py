"""Fast walks of the blob store and streaming SHA-256 of files.

fsck --deep over tens of thousands of small blobs is dominated by per-file overhead, so the
walk reads names only (no stat per blob) and the hasher reads into one reused buffer per
thread (a fresh 1 MiB `bytes` per read costs an mmap and page faults for every small file).
hashlib and `os.readv` release the GIL, so a few threads hash in parallel. The walk itself is
`blobwalk`'s, which an offline `fsck --deep` also runs in a child process started early.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from anvil.storage import blobwalk
from anvil.storage.blobwalk import READ_SIZE, hash_fd, read_sequentially

__all__ = ["HEX64", "READ_SIZE", "HashResult", "ScanResult", "hash_file", "read_sequentially", "scan_blobs"]

HEX64 = re.compile(r"[0-9a-f]{64}")


class HashResult(NamedTuple):
    name: str  # the expected hash (the file's name) or any caller key
    path: str
    actual: str | None
    size: int
    error: str | None


@dataclass
class ScanResult:
    blobs: dict[str, str]  # sha256 -> path
    misplaced: list[str]
    bad: list[HashResult]  # deep only: content differs from the name, or unreadable
    sizes: dict[str, int]  # deep only: bytes read per blob


def scan_blobs(
    root: str | os.PathLike, *, deep: bool, threads: int = 2, on_progress: Callable[[int], None] | None = None,
) -> ScanResult:
    """List every blob and, with `deep`, hash each (`blobwalk.walk_tree`): the answer of the child
    process `blobwalk.start_early` started for this root, if any, else on `threads` threads here."""
    root = os.fspath(root)
    walked = blobwalk.take_early(root, threads, on_progress) if deep else None
    if walked is None:
        walked = blobwalk.walk_tree(root, deep=deep, threads=threads, on_progress=on_progress)
    blobs, misplaced, bad, sizes = walked
    return ScanResult(blobs, misplaced, [HashResult(*b) for b in bad], sizes)


def hash_file(path: str) -> tuple[str | None, int, str | None]:
    """(sha256 hex, size, error) of one file, streamed 1 MiB at a time."""
    buf = bytearray(READ_SIZE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return None, 0, e.strerror or str(e)
    try:
        actual, size = hash_fd(fd, buf, memoryview(buf))
    except OSError as e:
        return None, 0, e.strerror or str(e)
    finally:
        os.close(fd)
    return actual, size, None
