"""A restore's flusher gives the page cache of the files it has made durable back to the kernel.

Restored files are never read back by the restore, and on a virtual machine whose free memory
returns to the host, writing into pages the kernel has not used for seconds costs ~7x more than
into pages just freed (docs/backup.md, "restore12 round"). The flusher syncs the file system
and then drops the pages of every file finished before that sync: those pages are reused for
the next files. Checked here with mincore(2): a file handed to the flusher has no page left in
memory once its sync has run, while a file not handed to it keeps its pages.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from anvil.backup import restore
from tests.test_backup_backends import _resident_pages  # mincore(2) over a mapping of the file

pytestmark = pytest.mark.timeout(60)

def resident_pages(path: Path) -> int:
    return _resident_pages(path)[0]


def write_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))


def test_the_flusher_drops_the_pages_of_files_it_made_durable(tmp_path: Path) -> None:
    control = tmp_path / "control"
    write_file(control, 1024 * 1024)
    fd = os.open(control, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if resident_pages(control):
        pytest.skip("this file system keeps clean pages after POSIX_FADV_DONTNEED (tmpfs?)")

    handed, kept = tmp_path / "handed", tmp_path / "kept"
    for path in (handed, kept):
        write_file(path, 4 * 1024 * 1024)
    assert resident_pages(handed) > 0 and resident_pages(kept) > 0  # just written: in memory
    flusher = restore._Flusher(tmp_path)
    try:
        flusher.finished(str(handed))
        deadline = time.monotonic() + 20 * restore.FLUSH_INTERVAL
        while flusher.written and time.monotonic() < deadline:
            time.sleep(restore.FLUSH_INTERVAL / 5)
        assert not flusher.written, "the flusher did not take the file within 20 intervals"
    finally:
        flusher.stop()
    assert resident_pages(handed) == 0
    assert resident_pages(kept) > 0  # only files handed over (finished before a sync) are dropped


def test_dropping_a_file_that_is_gone_changes_nothing(tmp_path: Path) -> None:
    restore._drop_cached(str(tmp_path / "never-written"))  # a hint: no error, nothing created
    assert not (tmp_path / "never-written").exists()
