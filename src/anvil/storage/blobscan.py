"""Fast walks of the blob store and streaming SHA-256 of files.

fsck --deep over tens of thousands of small blobs is dominated by per-file overhead, so the
walk reads names only (no stat per blob) and the hasher reads into one reused buffer per
thread (a fresh 1 MiB `bytes` per read costs an mmap and page faults for every small file).
hashlib and `os.readv` release the GIL, so a few threads hash in parallel.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

READ_SIZE = 1024 * 1024
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


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (NotADirectoryError, FileNotFoundError):
        return []


def read_sequentially(fd: int) -> None:
    """Tell the kernel a blob file will be read front to back, so it reads ahead twice as far.
    On this VM's disk every small read-ahead is expensive: a cold 256 MiB file read in 1 MiB
    preads took 0.42-0.56 s of CPU at 95-140 MB/s without the advice and 0.04-0.15 s at
    160-1,200 MB/s with it (bench/largeput.py `read_from_disk` against
    `read_from_disk_sequential`). Advice only: a kernel that refuses it reads as before."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except OSError:
        pass


def _hash_fd(fd: int, buf: bytearray, view: memoryview) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while True:
        n = os.readv(fd, (buf,))
        h.update(view[:n])
        size += n
        # A short read of a regular file is its end: blobs are immutable, so this saves the
        # extra empty read per file that dominates for small blobs.
        if n < READ_SIZE:
            return h.hexdigest(), size
        if size == READ_SIZE:  # more than one read: a large blob, read on sequentially
            read_sequentially(fd)


def scan_blobs(
    root: str | os.PathLike, *, deep: bool, threads: int = 2, on_progress: Callable[[int], None] | None = None,
) -> ScanResult:
    """List every blob and, with `deep`, hash each as soon as it is found.

    Listing and hashing are fused and split by top-level fan-out folder across `threads`
    workers: at 10k small blobs the walk (one directory per blob, nearly) costs as much as
    the hashing, and both mostly wait in syscalls that release the GIL. Names are all the
    walk needs (no stat per blob; `dir_fd`-relative opens measured slower, since most leaf
    folders hold one blob): a non-folder where a folder belongs is skipped, a non-file
    named like a hash fails to hash and is reported."""
    root = os.fspath(root)
    tops = sorted(n for n in _listdir(root) if len(n) == 2)
    fullmatch = HEX64.fullmatch
    lock = threading.Lock()

    def work(my_tops: list[str]) -> ScanResult:
        res = ScanResult({}, [], [], {})
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        pending = 0
        for a in my_tops:
            pa = f"{root}/{a}"
            for name in _listdir(pa):
                if fullmatch(name) is None:
                    continue
                path = f"{pa}/{name}"
                if name[:2] != a:
                    res.misplaced.append(path)
                    continue
                res.blobs[name] = path
                if not deep:
                    continue
                try:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        actual, size = _hash_fd(fd, buf, view)
                    finally:
                        os.close(fd)
                    err = None
                except OSError as e:
                    actual, size, err = None, 0, e.strerror or str(e)
                res.sizes[name] = size
                if actual != name:
                    res.bad.append(HashResult(name, path, actual, size, err))
                pending += 1
                if on_progress is not None and pending >= 256:
                    with lock:
                        on_progress(pending)
                    pending = 0
        if on_progress is not None and pending:
            with lock:
                on_progress(pending)
        return res

    shares = [tops[i::threads] for i in range(max(1, threads))]
    if len(shares) == 1:
        return work(shares[0])
    out = ScanResult({}, [], [], {})
    with ThreadPoolExecutor(max_workers=len(shares), thread_name_prefix="anvil-fsck-scan") as pool:
        for r in pool.map(work, shares):
            out.blobs.update(r.blobs)
            out.misplaced.extend(r.misplaced)
            out.bad.extend(r.bad)
            out.sizes.update(r.sizes)
    return out


def hash_file(path: str) -> tuple[str | None, int, str | None]:
    """(sha256 hex, size, error) of one file, streamed 1 MiB at a time."""
    buf = bytearray(READ_SIZE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return None, 0, e.strerror or str(e)
    try:
        actual, size = _hash_fd(fd, buf, memoryview(buf))
    except OSError as e:
        return None, 0, e.strerror or str(e)
    finally:
        os.close(fd)
    return actual, size, None
