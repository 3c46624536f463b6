"""Where a repository's named objects live: the backend contract and the URL scheme registry.

A backend stores named, immutable objects (`config`, `keys/<id>`, `data/<xx>/<pack id>`, ...).
Names are the same on every backend; docs/backup-format.md describes them.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anvil.backup.errors import BackupError


def missing(name: str) -> BackupError:
    return BackupError(f"{name} is missing from the repository")


def check_name(name: str) -> str:
    """Refuse a name that could escape the repository or alias another name, before any I/O.

    Names are relative, '/'-separated, with no empty, '.'/'..' or dot-prefixed part: the local
    backend keeps its in-progress files as dot-files, and an S3 key with '..' would be one
    directory tree on one backend and another on the other.
    """
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name or name.startswith("/"):
        raise BackupError(f"refusing repository object name {name!r}")
    for part in name.split("/"):
        if not part or part.startswith("."):
            raise BackupError(f"refusing repository object name {name!r}")
    return name


class Backend:
    """Named immutable objects; the only operations the repository needs.

    Every backend: `read`/`read_range`/`size` of a missing name raise BackupError ("... is
    missing from the repository"); `write` replaces an existing object whole; `delete` of a
    missing name is not an error; `list(folder)` returns every name under `folder/` at any
    depth, sorted, and [] for an empty or absent folder; `modified` of a missing name raises
    like `size`; names failing `check_name` are refused.
    """

    url: str
    # The endpoint an S3-compatible backend was opened with: with `url`, what opens it again in
    # another process (a backup's child, `backup.snapshot_process`); credentials come from the environment.
    s3_endpoint: str | None = None

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length), cut short at the end of the object."""
        return self.read(name)[offset:offset + length]

    def write(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def write_parts(self, name: str, parts: list[bytes]) -> None:
        """`write` of the parts' concatenation; backends that can write them in turn avoid the join."""
        self.write(name, b"".join(parts))

    def list(self, folder: str) -> list[str]:
        """Names (relative to the repository) of every object under `folder/`."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def modified(self, name: str) -> float:
        """Unix time of the object's last write (the storage's clock)."""
        raise NotImplementedError

    def remove_incomplete(self, older_than: float) -> int:
        """Delete leftovers of writes that never finished, last touched before `older_than`.

        They are invisible to every other operation; a backend whose writes are atomic has none.
        """
        return 0


@dataclass(frozen=True)
class BackendOptions:
    """Everything `open_backend` callers may pass; each backend takes what applies to it."""

    s3_endpoint: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    # A local repository inside this STORAGE_PATH is refused.
    storage_path: str | Path | None = None


Factory = Callable[[str, urllib.parse.ParseResult, BackendOptions], Backend]


@dataclass(frozen=True)
class Scheme:
    factory: Factory
    form: str  # how a URL of this scheme looks, for error messages


_REGISTRY: dict[str, Scheme] = {}


def register(scheme: str, factory: Factory, form: str) -> None:
    _REGISTRY[scheme] = Scheme(factory, form)


def open_backend(url: str, *, s3_endpoint: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, storage_path: str | Path | None = None) -> Backend:
    """The backend registered for the URL's scheme (`file:///path`, `s3://bucket/prefix`)."""
    parsed = urllib.parse.urlparse(url)
    entry = _REGISTRY.get(parsed.scheme)
    if entry is None:
        forms = " or ".join(s.form for s in _REGISTRY.values())
        raise BackupError(f"unsupported repository URL {url!r}: use {forms}")
    options = BackendOptions(s3_endpoint=s3_endpoint, access_key=access_key, secret_key=secret_key,
                             storage_path=storage_path)
    return entry.factory(url, parsed, options)


# The built-in backends, imported last: they subclass Backend and use the helpers above.
from anvil.backup.backends import local, s3  # noqa: E402

register("file", local.from_url, "file:///path")
register("s3", s3.from_url, "s3://bucket/prefix")
