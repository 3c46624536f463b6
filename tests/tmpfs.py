"""A real small filesystem for tests: a tmpfs mounted by the test (root here and in CI)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

MiB = 1024 * 1024


def mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): the full-disk tests "
                    "need a real small filesystem and root (they have both on the dev machines and in CI)")


def umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill_to_zero(path: Path) -> None:
    """Write `path` until the filesystem has 0 bytes free, halving the write size at each ENOSPC."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = MiB
        while size >= 1:
            try:
                os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                size //= 2
    finally:
        os.close(fd)


def fill_until_free(path: Path, mnt: Path, left: int) -> None:
    """Write `path` until exactly `left` bytes (page-aligned) stay free on `mnt`."""
    need = free_bytes(mnt) - left
    assert need > 0
    with open(path, "wb") as f:
        while need > 0:
            n = min(need, MiB)
            f.write(b"\0" * n)
            need -= n
