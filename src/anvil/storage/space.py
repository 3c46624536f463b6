"""Free space: write admission below a threshold, and a reserve file released when the disk fills.

A full filesystem must never wedge the store. Two mechanisms, both per `STORAGE_PATH`:

- **Admission.** Writes that grow the store (PUT, upload part, copy, complete multipart, bucket
  and upload creation) are refused up front with `StorageFull` (HTTP 507) while the free space,
  net of the reserve, is below `min_free`. One `statvfs` per admission check (~5 µs): nothing is
  cached, so there is no sticky "full" state and writes resume as soon as space is freed.
- **Reserve.** `STORAGE_PATH/reserve` is a preallocated file (`posix_fallocate`). SQLite in WAL
  mode needs new blocks to commit even a DELETE, and gc records what it removed, so at 0 bytes
  free nothing could be undone. When the record store reports "disk full", the catalog calls
  `release()` (the file is truncated to 0 bytes) and retries the batch once: deletes, aborts,
  gc and admin changes go through, and space freed by gc lets the next admission re-create the
  reserve.

A body that still runs out of space half-way (another process filled the disk) is removed and
answered `StorageFull` as well: see `BlobWriter` and `BlobStore.put_bytes`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from anvil.errors import AnvilError

log = logging.getLogger("anvil.storage.space")

RESERVE_FILE = "reserve"
MiB = 1024 * 1024
GiB = 1024 * MiB
# 32 MiB covers the catalog's worst case at 0 bytes free: the WAL growing to its auto-checkpoint
# size (1000 pages, ~4 MiB) and the checkpoint growing catalog.db by as much, several times over.
# On a small filesystem a 1/16 share is used instead, so the reserve never takes most of it.
DEFAULT_RESERVE = 32 * MiB
RESERVE_SHARE = 16
# Like MinIO's (1% of the disk, at least its 900 MiB), but capped: 1% of a 100 TB array is too much.
MIN_FREE_FRACTION = 0.01
MIN_FREE_CAP = 1 * GiB

RESERVE_ENV = "ANVIL_DISK_RESERVE"
# Below this much free space at start the reserve is released before the catalog opens.
OPEN_MIN_FREE = 1024 * 1024
MIN_FREE_ENV = "ANVIL_DISK_MIN_FREE"

# errno values meaning "no space left": the filesystem is full, or the user's quota is.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

_SIZE_RE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size(name: str, text: str) -> int:
    """`"33554432"`, `"32M"`, `"32MiB"`, `"1G"` -> bytes (binary units)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise AnvilError("InvalidArgument", f"{name} must be a size in bytes, optionally with K, M, G or T "
                         f"(binary units), got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def storage_full(detail: str = "") -> AnvilError:
    """The one error every "no space" failure becomes: 507, never a 500."""
    msg = "storage is full: new writes are refused until space is freed (delete objects, then run gc)"
    return AnvilError("StorageFull", f"{msg}{'; ' + detail if detail else ''}")


def is_full_error(exc: BaseException) -> bool:
    """Whether `exc` is a "no space left" failure of the filesystem (not of the record store)."""
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


@dataclass(frozen=True)
class SpaceStatus:
    total: int
    free: int
    reserve_size: int
    reserve_held: int
    min_free: int

    @property
    def net_free(self) -> int:
        """Free space as if the reserve were in place: what admission compares with `min_free`."""
        return self.free - (self.reserve_size - self.reserve_held)

    def to_dict(self) -> dict[str, int | bool]:
        return {"total_bytes": self.total, "free_bytes": self.free, "reserve_bytes": self.reserve_size,
                "reserve_held_bytes": self.reserve_held, "min_free_bytes": self.min_free,
                "accepting_writes": self.net_free >= self.min_free}


class DiskSpace:
    """Admission and the reserve of one storage root.

    `manage_reserve` is true only for the process holding the storage lock (the server, offline
    gc): others neither create nor release the file.
    """

    def __init__(self, root: str | os.PathLike, *, reserve: int | None = None, min_free: int | None = None,
                 manage_reserve: bool = True):
        self.root = Path(root)
        self.path = self.root / RESERVE_FILE
        self._root_text = str(self.root)  # (statvfs per admitted write: no Path.__fspath__ call each time)
        st = os.statvfs(self.root)
        total = st.f_blocks * st.f_frsize
        self.reserve_size = reserve if reserve is not None else min(DEFAULT_RESERVE, total // RESERVE_SHARE)
        self.min_free = min_free if min_free is not None else max(
            self.reserve_size, min(int(total * MIN_FREE_FRACTION), MIN_FREE_CAP))
        self._manage = manage_reserve
        self._lock = threading.Lock()
        self._held = self._allocated()
        self._last_warning = 0.0
        if manage_reserve:
            if self._held > self.reserve_size:  # the setting shrank since the file was made
                os.truncate(self.path, self.reserve_size)
                self._held = self.reserve_size
            self.ensure_reserve()

    @classmethod
    def from_env(cls, root: str | os.PathLike, *, manage_reserve: bool = True) -> DiskSpace:
        """Settings from `ANVIL_DISK_RESERVE` and `ANVIL_DISK_MIN_FREE` (unset: derived from the size)."""
        reserve = os.environ.get(RESERVE_ENV, "").strip()
        min_free = os.environ.get(MIN_FREE_ENV, "").strip()
        return cls(root, reserve=parse_size(RESERVE_ENV, reserve) if reserve else None,
                   min_free=parse_size(MIN_FREE_ENV, min_free) if min_free else None,
                   manage_reserve=manage_reserve)

    # ------------------------------------------------------------------ measuring

    def _allocated(self) -> int:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return 0
        return min(st.st_size, st.st_blocks * 512)

    def status(self) -> SpaceStatus:
        st = os.statvfs(self.root)
        return SpaceStatus(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize, self.reserve_size, self._held,
                           self.min_free)

    def _net_free(self) -> int:
        """`status().net_free` without the SpaceStatus (a frozen dataclass made per write on the event loop)."""
        st = os.statvfs(self._root_text)
        return st.f_bavail * st.f_frsize - (self.reserve_size - self._held)

    # ------------------------------------------------------------------ admission

    def admit(self, incoming: int = 0) -> None:
        """Raise `StorageFull` unless `incoming` more bytes leave at least `min_free` free (net of the reserve).

        A released reserve is re-created here once there is room for it and the threshold: the
        first write admitted after space comes back restores the safety margin.
        """
        net_free = self._net_free()
        if self._held < self.reserve_size and net_free >= self.min_free:
            self.ensure_reserve()
            net_free = self._net_free()
        if net_free - max(incoming, 0) < self.min_free:
            s = self.status()
            now = time.monotonic()
            if now - self._last_warning > 10:
                self._last_warning = now
                log.warning("refusing writes: %d bytes free, reserve %d of %d bytes held, threshold %d bytes",
                            s.free, s.reserve_held, s.reserve_size, s.min_free)
            raise storage_full()

    def accepting_writes(self) -> bool:
        """Whether `admit()` would let a write in now (re-creating the reserve if there is room)."""
        try:
            self.admit()
        except AnvilError:
            return False
        return True

    # ------------------------------------------------------------------ the reserve

    def ensure_reserve(self) -> bool:
        """Allocate the reserve if it is missing and the space exists; True when it is held in full."""
        if not self._manage or self.reserve_size <= 0:
            return self.reserve_size <= 0
        if not self._lock.acquire(blocking=False):
            return False  # another thread is allocating or releasing it right now
        try:
            if self._held >= self.reserve_size:
                return True
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                if is_full_error(exc):
                    return False
                self._give_up(exc)
                return True
            try:
                os.posix_fallocate(fd, 0, self.reserve_size)
                self._held = self.reserve_size
                log.info("disk reserve of %d bytes held in %s", self.reserve_size, self.path)
                return True
            except OSError as exc:
                if not is_full_error(exc):
                    self._give_up(exc)
                    return True
                # Not enough room: hold nothing rather than a part that admission cannot account for.
                os.ftruncate(fd, 0)
                self._held = 0
                return False
            finally:
                os.close(fd)
        finally:
            self._lock.release()

    def _give_up(self, exc: OSError) -> None:
        """The reserve cannot exist here (read-only or foreign-owned path, ...): run without one, said
        once, rather than refuse to start or retry on every write."""
        log.warning("no disk reserve: %s cannot be allocated (%s); a full disk may block deletes", self.path, exc)
        self.reserve_size = 0
        self._held = 0

    def make_room_to_open(self) -> None:
        """Release the reserve if the disk is (nearly) full before the catalog is opened: a clean
        shutdown removes SQLite's WAL and shared-memory files, and opening must create them again."""
        if self._manage and self.status().free < OPEN_MIN_FREE:
            self.release()

    def release(self) -> bool:
        """Give the reserve back to the filesystem (the disk is full); True if that freed anything."""
        if not self._manage:
            return False
        with self._lock:
            held = self._allocated()
            if held <= 0:
                self._held = 0
                return False
            os.truncate(self.path, 0)
            self._held = 0
        log.warning("disk full: released the %d-byte reserve %s so deletes, gc and admin changes can commit",
                    held, self.path)
        return True
