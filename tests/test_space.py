"""`storage.space` and the blob store's ENOSPC handling, on a real tiny tmpfs (no mocks)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from anvil.errors import AnvilError
from anvil.storage.blobs import BlobStore
from anvil.storage.space import RESERVE_FILE, DiskSpace, parse_size
from tests.tmpfs import MiB, fill_to_zero, free_bytes, mount_tmpfs, umount


@pytest.fixture
def tiny_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # The reserve's own default (sized from the filesystem), not the suite's small one.
    monkeypatch.delenv("ANVIL_DISK_RESERVE", raising=False)
    mnt = tmp_path / "fs"
    mount_tmpfs(mnt, 8 * MiB)
    try:
        yield mnt
    finally:
        umount(mnt)


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("4096", 4096), ("64K", 64 * 1024), ("32M", 32 * MiB), ("32MiB", 32 * MiB), ("1g", 1024 * MiB),
    (" 2 MB ", 2 * MiB), ("1T", 1024 * 1024 * MiB),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size("X", text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1", "1.5G", "12Q", "M"])
def test_parse_size_refuses_garbage(text: str) -> None:
    with pytest.raises(AnvilError) as exc:
        parse_size("ANVIL_DISK_RESERVE", text)
    assert exc.value.code == "InvalidArgument" and "ANVIL_DISK_RESERVE" in exc.value.message


def test_defaults_follow_the_filesystem_size(tiny_fs: Path) -> None:
    space = DiskSpace(tiny_fs)
    assert space.reserve_size == 8 * MiB // 16
    assert space.min_free == space.reserve_size  # 1% of 8 MiB is less
    assert (tiny_fs / RESERVE_FILE).stat().st_blocks * 512 == space.reserve_size


def test_reserve_release_admission_and_recreation(tiny_fs: Path) -> None:
    space = DiskSpace(tiny_fs, reserve=MiB, min_free=2 * MiB)
    reserve = tiny_fs / RESERVE_FILE
    assert reserve.stat().st_size == MiB
    space.admit(MiB)  # ~7 MiB free
    filler = tiny_fs / "filler"
    fill_to_zero(filler)
    with pytest.raises(AnvilError) as exc:
        space.admit()
    assert exc.value.code == "StorageFull" and exc.value.status == 507
    # Released on demand (a commit found no space): the bytes come back, once.
    assert space.release() is True
    assert reserve.stat().st_size == 0 and free_bytes(tiny_fs) == MiB
    assert space.release() is False
    # The reserve's bytes are kept for deletes: admission counts them as still held.
    with pytest.raises(AnvilError):
        space.admit()
    assert space.status().to_dict()["accepting_writes"] is False
    # Space comes back: the next admission re-creates the reserve first, then admits.
    with open(filler, "r+b") as f:
        f.truncate(2 * MiB)
    space.admit()
    assert reserve.stat().st_size == MiB
    assert space.status().net_free >= 2 * MiB


def test_reserve_not_created_without_room(tiny_fs: Path) -> None:
    fill_to_zero(tiny_fs / "filler")
    space = DiskSpace(tiny_fs, reserve=MiB, min_free=0)
    assert (tiny_fs / RESERVE_FILE).stat().st_size == 0  # no partial reserve
    assert space.status().reserve_held == 0
    with pytest.raises(AnvilError):
        space.admit()  # net of the missing reserve there is less than nothing free


def test_blob_writer_enospc_removes_its_temp_file(tiny_fs: Path) -> None:
    (tiny_fs / "blobs").mkdir()
    (tiny_fs / "tmp").mkdir()
    store = BlobStore(tiny_fs / "blobs", tiny_fs / "tmp")
    store.prepare_fanout()
    w = store.writer()
    with pytest.raises(AnvilError) as exc:
        for _ in range(16):
            w.write(os.urandom(MiB))
    assert exc.value.code == "StorageFull"
    assert list((tiny_fs / "tmp").iterdir()) == []
    w.abort()  # idempotent after the failure
    assert free_bytes(tiny_fs) > 7 * MiB


def test_put_bytes_enospc_leaves_nothing(tiny_fs: Path) -> None:
    (tiny_fs / "blobs").mkdir()
    (tiny_fs / "tmp").mkdir()
    store = BlobStore(tiny_fs / "blobs", tiny_fs / "tmp")
    store.prepare_fanout()
    with pytest.raises(AnvilError) as exc:
        store.put_bytes(os.urandom(9 * MiB))
    assert exc.value.code == "StorageFull"
    assert list(store.iter_all()) == [] and list((tiny_fs / "tmp").iterdir()) == []
    assert free_bytes(tiny_fs) > 7 * MiB


def test_a_smaller_setting_shrinks_the_reserve_and_zero_disables_it(tiny_fs: Path) -> None:
    DiskSpace(tiny_fs, reserve=2 * MiB)
    assert (tiny_fs / RESERVE_FILE).stat().st_size == 2 * MiB
    space = DiskSpace(tiny_fs, reserve=MiB, min_free=0)
    assert (tiny_fs / RESERVE_FILE).stat().st_size == MiB and space.status().reserve_held == MiB
    space = DiskSpace(tiny_fs, reserve=0, min_free=0)
    assert (tiny_fs / RESERVE_FILE).stat().st_size == 0
    fill_to_zero(tiny_fs / "filler")
    space.admit()  # no reserve and no threshold: nothing to keep back
