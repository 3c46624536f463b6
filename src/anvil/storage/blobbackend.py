"""Where blob bodies live: the narrow interface `BlobStore` needs from a backend.

`BlobStore` (storage.blobs) owns everything about a blob's integrity: hashing while a body
arrives, per-chunk digests, verify-on-read, quarantine decisions, inline bodies in the record
store. A backend only keeps bytes under names:

- a finished body under its SHA-256, from a local spool file (`put_file`, multipart for large
  ones on a remote store) or from memory (`put_bytes`); never overwritten once present (the
  content is the same by construction, so a second put only refreshes its age for gc);
- ranged reads as a stream (`open_range`), `stat` (size and age), a paged listing
  (`list_blobs`, for gc, fsck and backup), `delete`;
- the same for the per-chunk digest sidecars, and a quarantine area for bodies proven bad.

`LocalBlobBackend` is the embedded default, `STORAGE_PATH/blobs/sha256/ab/<hash>` exactly as
before; `BlobStore` keeps its own file fast paths (O_TMPFILE puts, pread reads) for it, so the
embedded default pays nothing for the interface. `storage.s3blobs.S3BlobBackend` keeps the same
names under a prefix of an S3-compatible bucket (`anvil serve --blobs s3://bucket/prefix`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from anvil.errors import AnvilError

URL_ENV = "ANVIL_BLOBS_URL"
ENDPOINT_ENV = "ANVIL_BLOBS_ENDPOINT"
SIDECAR_SUFFIX = ".chunks"
_HASH_RE = re.compile(r"[0-9a-f]{64}")


def valid_hash(h: str) -> bool:
    return _HASH_RE.fullmatch(h) is not None


def unavailable(url: str, detail: str) -> AnvilError:
    """The one error a backend that cannot be reached (or refuses us) becomes: 503, and nothing
    is recorded (a body is stored before its record, so a failed store fails the write)."""
    return AnvilError("BlobBackendUnavailable", f"the blob backend {url} is unavailable: {detail}")


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size: int
    mtime: float  # when it was stored, or last refreshed by a deduplicating write (gc's grace)
    location: str  # a path (local) or a key URL (remote), for messages only


class BlobBackend:
    """The operations a blob backend provides. Names are SHA-256 hex digests, checked by the caller."""

    url: str = ""
    local: bool = False

    # ---- bodies
    def put_file(self, sha256: str, path: Path, size: int) -> bool:
        """Store the spool file `path` (already durable locally, hashing to `sha256`) under its hash.
        False if the body was already present: then only its age is refreshed (`touch`)."""
        raise NotImplementedError

    def put_bytes(self, sha256: str, data: bytes) -> bool:
        raise NotImplementedError

    def stat(self, sha256: str) -> tuple[int, float] | None:
        """(size, mtime) of a stored body, None if absent."""
        raise NotImplementedError

    def open_range(self, sha256: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        """A stream of bytes [offset, offset+length) (to the end if None); FileNotFoundError if absent."""
        raise NotImplementedError

    def touch(self, sha256: str) -> bool:
        """Refresh a body's age (a write deduplicated onto it); False if it is absent."""
        raise NotImplementedError

    def list_blobs(self) -> Iterator[StoredBlob]:
        """Every stored body, in pages; sidecars and quarantined bodies are not listed."""
        raise NotImplementedError

    def delete(self, sha256: str) -> bool:
        raise NotImplementedError

    # ---- per-chunk digest sidecars
    def get_sidecar(self, sha256: str) -> bytes | None:
        raise NotImplementedError

    def put_sidecar(self, sha256: str, raw: bytes) -> None:
        raise NotImplementedError

    def delete_sidecar(self, sha256: str) -> bool:
        raise NotImplementedError

    def list_sidecars(self) -> Iterator[tuple[str, float]]:
        """(hash, mtime) of every sidecar, whether or not its body exists."""
        raise NotImplementedError

    # ---- quarantine
    def quarantine(self, sha256: str) -> bool:
        """Move a body proven bad out of reach of reads and deduplication (and drop its sidecar)."""
        raise NotImplementedError

    def quarantined(self) -> list[str]:
        raise NotImplementedError

    def drop_quarantined(self, sha256: str) -> bool:
        raise NotImplementedError

    def check(self) -> None:
        """At start: the backend answers (BlobBackendUnavailable otherwise)."""

    def close(self) -> None:
        pass


def fanout_entries(root: Path) -> Iterator[os.DirEntry]:
    """Every entry of every fan-out folder under `root`, in name order (blobs, sidecars, anything else)."""
    if not root.exists():
        return
    for a in sorted(os.scandir(root), key=lambda e: e.name):
        if a.is_dir():
            yield from sorted(os.scandir(a.path), key=lambda e: e.name)


class LocalBlobBackend(BlobBackend):
    """`blobs/sha256/ab/<hash>` under STORAGE_PATH (the embedded default)."""

    local = True

    def __init__(self, root: Path, quarantine_dir: Path):
        self.root = root
        self.quarantine_dir = quarantine_dir
        self.url = str(root)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def _file(self, sha256: str) -> str:
        # A string, not a Path: see BlobStore.file_path.
        return os.path.join(self.root, sha256[:2], sha256)

    def sidecar_path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / (sha256 + SIDECAR_SUFFIX)

    def stat(self, sha256: str) -> tuple[int, float] | None:
        try:
            st = os.stat(self._file(sha256))
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime

    def open_range(self, sha256: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        f = open(self._file(sha256), "rb")  # noqa: SIM115 - the caller closes it
        if offset:
            f.seek(offset)
        return f

    def touch(self, sha256: str) -> bool:
        try:
            os.utime(self._file(sha256))
        except FileNotFoundError:
            return False
        return True

    def _fanout_entries(self) -> Iterator[os.DirEntry]:
        return fanout_entries(self.root)

    def list_blobs(self) -> Iterator[StoredBlob]:
        for f in self._fanout_entries():
            if valid_hash(f.name) and f.is_file():
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                yield StoredBlob(f.name, st.st_size, st.st_mtime, f.path)

    def delete(self, sha256: str) -> bool:
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        self.delete_sidecar(sha256)
        return True

    def get_sidecar(self, sha256: str) -> bytes | None:
        try:
            return self.sidecar_path(sha256).read_bytes()
        except FileNotFoundError:
            return None

    def delete_sidecar(self, sha256: str) -> bool:
        try:
            self.sidecar_path(sha256).unlink()
            return True
        except FileNotFoundError:
            return False

    def list_sidecars(self) -> Iterator[tuple[str, float]]:
        for f in self._fanout_entries():
            name = f.name
            if name.endswith(SIDECAR_SUFFIX) and valid_hash(name[:-len(SIDECAR_SUFFIX)]) and f.is_file():
                try:
                    yield name[:-len(SIDECAR_SUFFIX)], f.stat().st_mtime
                except FileNotFoundError:
                    continue

    def quarantined(self) -> list[str]:
        try:
            names = os.listdir(self.quarantine_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if valid_hash(n))

    def drop_quarantined(self, sha256: str) -> bool:
        try:
            os.unlink(self.quarantine_dir / sha256)
        except FileNotFoundError:
            return False
        return True

    # BlobStore does not call the four below: its own fast paths (O_TMPFILE, fsync order, folder
    # fsyncs made once) write local blobs. They complete the interface for other users (tools,
    # the backend contract tests), with the same durability: fsynced before named, folder synced.

    def put_file(self, sha256: str, path: Path, size: int) -> bool:
        with open(path, "rb") as f:
            return self._put(sha256, f)

    def put_bytes(self, sha256: str, data: bytes) -> bool:
        import io

        return self._put(sha256, io.BytesIO(data))

    def _put(self, sha256: str, src: BinaryIO) -> bool:
        if self.touch(sha256):
            return False
        final = self.path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        self._write_durably(final, src)
        return True

    @staticmethod
    def _write_durably(final: Path, src: BinaryIO) -> None:
        from anvil.storage.layout import fsync_dir

        tmp = final.with_name(f".{final.name}.{os.getpid()}.{id(src):x}.tmp")
        try:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(final.parent)

    def put_sidecar(self, sha256: str, raw: bytes) -> None:
        import io

        self.path(sha256).parent.mkdir(parents=True, exist_ok=True)
        self._write_durably(self.sidecar_path(sha256), io.BytesIO(raw))

    def quarantine(self, sha256: str) -> bool:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self.path(sha256), self.quarantine_dir / sha256)
        except FileNotFoundError:
            return False
        self.delete_sidecar(sha256)
        return True


def copy_stream(src: BinaryIO, dest: Path) -> None:
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1024 * 1024)


def backend_from_env(environ: dict[str, str] | None = None) -> BlobBackend | None:
    """The backend `ANVIL_BLOBS_URL` names (with `ANVIL_BLOBS_ENDPOINT`), or None: local blobs.

    `anvil serve --blobs` sets the variable too, so every tool of the process (and offline ones
    run with the same environment: fsck, gc, restore) opens the same backend."""
    env = os.environ if environ is None else environ
    url = (env.get(URL_ENV) or "").strip()
    if not url:
        return None
    return open_backend(url, (env.get(ENDPOINT_ENV) or "").strip() or None)


def open_backend(url: str, endpoint: str | None = None) -> BlobBackend:
    if url.startswith("s3://"):
        from anvil.storage.s3blobs import S3BlobBackend, parse_url

        bucket, prefix = parse_url(url)
        return S3BlobBackend(bucket, prefix, endpoint=endpoint)
    raise AnvilError("InvalidArgument", f"--blobs must be an s3://bucket/prefix URL, got {url!r}")
