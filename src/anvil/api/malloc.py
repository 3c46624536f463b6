"""glibc allocator settings for the long-running server (`anvil serve`).

A backup, fsck or gc runs on several short-lived threads and allocates in proportion to the
store. glibc gives each thread that allocates concurrently its own arena (up to 8 per core), and
freed memory stays in those arenas, fragmented around whatever is still alive, so the server's
RSS stays above its idle figure after such an operation even with `malloc_trim(0)`
(`api.common.release_memory`). Two arenas (the main one and one the other threads share) bound
that; small GET/PUT server CPU was unchanged (docs/backup.md, "Memory of a backup").

A fixed mmap threshold (glibc's `MALLOC_MMAP_THRESHOLD_=262144`) took another ~15 MiB off a
backup's peak in-process, but every large body block then costs an mmap, page faults and a
munmap: it is left to the environment. `MALLOC_ARENA_MAX` in the environment wins (glibc reads it
itself); `ANVIL_MALLOC_TUNE=off` leaves glibc's defaults (to compare); elsewhere than glibc
nothing is done.
"""

from __future__ import annotations

import ctypes
import os

TUNE_ENV = "ANVIL_MALLOC_TUNE"
M_ARENA_MAX = -8
ARENA_MAX = 2


def tune() -> dict[str, int]:
    """Apply the settings this process has not been given in its environment; returns those applied."""
    if os.environ.get(TUNE_ENV, "").strip().lower() in ("off", "0", "no"):
        return {}
    if "MALLOC_ARENA_MAX" in os.environ:
        return {}
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return {}
    return {"arena_max": ARENA_MAX} if mallopt(M_ARENA_MAX, ARENA_MAX) == 1 else {}
