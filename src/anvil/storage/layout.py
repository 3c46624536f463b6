"""The `STORAGE_PATH` layout: FORMAT file, process lock and the fixed folders."""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from anvil.errors import AnvilError

FORMAT_VERSION = 1
FORMAT_FILE = "FORMAT"
LOCK_FILE = "LOCK"
FOLDERS = ("blobs/sha256", "derived", "secrets", "bootstrap", "tmp", "quarantine")


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temporary sibling, fsync, rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class FormatInfo:
    version: int
    deployment_id: str


class Layout:
    """Knows where everything lives under one storage root."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self._lock_fd: int | None = None

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.db"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs" / "sha256"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def quarantine(self) -> Path:
        """Blobs whose bytes failed verification, moved aside by `BlobStore.quarantine`."""
        return self.root / "quarantine"

    @property
    def derived(self) -> Path:
        return self.root / "derived"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def bootstrap(self) -> Path:
        return self.root / "bootstrap"

    def initialise(self) -> FormatInfo:
        """Create the layout on first use; refuse a format this build does not understand."""
        self.root.mkdir(parents=True, exist_ok=True)
        fmt = self.root / FORMAT_FILE
        # Check an existing FORMAT before touching anything: an unknown format is left as found.
        existing = self.read_format() if fmt.exists() else None
        if existing is None and self.catalog_path.exists():
            # A catalog without its FORMAT is a damaged or foreign path: never adopt it silently.
            raise AnvilError("UnsupportedFormat", f"{fmt} is missing but {self.catalog_path.name} exists")
        for folder in FOLDERS:
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        os.chmod(self.secrets, 0o700)
        os.chmod(self.bootstrap, 0o700)
        if existing is not None:
            return existing
        info = FormatInfo(FORMAT_VERSION, str(uuid.uuid4()))
        self.write_format(info)
        return info

    def write_format(self, info: FormatInfo) -> None:
        body = {"format_version": info.version, "deployment_id": info.deployment_id}
        write_file_durably(self.root / FORMAT_FILE, (json.dumps(body, indent=2) + "\n").encode())

    def read_format(self) -> FormatInfo:
        fmt = self.root / FORMAT_FILE
        try:
            body = json.loads(fmt.read_text())
            version = int(body["format_version"])
            deployment_id = str(body["deployment_id"])
        except FileNotFoundError:
            raise AnvilError("UnsupportedFormat", f"{fmt} is missing: not an Anvil storage path") from None
        except (ValueError, KeyError, TypeError):
            raise AnvilError("UnsupportedFormat", f"{fmt} is unreadable") from None
        if version != FORMAT_VERSION:
            raise AnvilError(
                "UnsupportedFormat",
                f"storage format version {version} is not supported by this build "
                f"(supports {FORMAT_VERSION})",
            )
        return FormatInfo(version, deployment_id)

    def acquire_lock(self) -> None:
        """Hold an exclusive lock for the life of the process so two servers never share a path."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AnvilError(
                "StorageLocked", f"storage path {self.root} is in use by another process (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
