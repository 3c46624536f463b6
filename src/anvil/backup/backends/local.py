"""A repository in a local directory (`file:///path`)."""

from __future__ import annotations

import contextlib
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

from anvil.backup.backends import Backend, BackendOptions, check_name, missing
from anvil.backup.errors import BackupError

# Reading a name that is a folder (or under a file) means no such object, as on S3.
_ABSENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


# A file read whole at least this large (a pack, a large manifest) leaves the page cache after it
# is read: each is read once per verify or restore (a restore keeps recent packs in memory itself).
DROP_AFTER_READ = 1 << 20


def drop_behind(fd: int, offset: int = 0, length: int = 0) -> None:
    """Let the kernel drop a written and fsynced (or a read) file's pages from the page cache.

    A repository is written now and read rarely (verify, restore), so its pages only push the store's
    own hot pages out of the cache. And growing the page cache is what costs: on this project's VMs,
    writing into pages the kernel must newly allocate cost ~5 s of system time per GB written (a
    1.6 GB initial backup spent 62 % of the server's CPU in that copy), while pages just freed by
    the previous pack are reused for ~0.35 s a GB (docs/backup.md, "Repository files drop behind"). Clean
    pages only (written ones were fsynced), so nothing is lost; where fadvise is missing nothing is done.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class LocalBackend(Backend):
    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"

    def _p(self, name: str) -> Path:
        return self.root / check_name(name)

    def local_path(self, name: str) -> Path:
        """The file holding `name` (restore workers read pack windows from it themselves)."""
        return self._p(name)

    def read(self, name: str) -> bytes:
        try:
            with open(self._p(name), "rb") as f:
                data = f.read()
                if len(data) >= DROP_AFTER_READ:
                    drop_behind(f.fileno())
                return data
        except _ABSENT:
            raise missing(name) from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise BackupError(f"{name}: invalid range offset {offset} length {length}")
        try:
            with open(self._p(name), "rb") as f:
                f.seek(offset)
                data = f.read(length)
                if len(data) >= DROP_AFTER_READ:
                    drop_behind(f.fileno(), offset, len(data))
                return data
        except _ABSENT:
            raise missing(name) from None

    def write(self, name: str, data: bytes) -> None:
        p = self._p(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target, then renamed over it: a crash leaves the old object or the new
        # one, never a torn one. Dot-names are invisible to list().
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    def write_parts(self, name: str, parts: list[bytes]) -> None:
        p = self._p(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            # writev in batches (IOV_MAX is 1024): one syscall per many sealed chunks.
            views = [memoryview(part) for part in parts if part]
            while views:
                n = os.writev(fd, views[:1024])
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]
            os.fsync(fd)
            drop_behind(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)

    def list(self, folder: str) -> list[str]:
        base = self._p(folder.rstrip("/"))
        if not base.is_dir():
            return []
        cut = len(str(self.root)) + 1
        return sorted(e.path[cut:] for e in _files(str(base)) if not e.name.startswith("."))

    def delete(self, name: str) -> None:
        try:
            self._p(name).unlink()
        except _ABSENT:
            pass

    def exists(self, name: str) -> bool:
        return self._p(name).is_file()

    def size(self, name: str) -> int:
        return self._stat(name).st_size

    def modified(self, name: str) -> float:
        return self._stat(name).st_mtime

    def _stat(self, name: str) -> os.stat_result:
        p = self._p(name)
        if not p.is_file():
            raise missing(name)
        return p.stat()

    def remove_incomplete(self, older_than: float) -> int:
        removed = 0
        for e in _files(str(self.root)):
            if e.name.startswith(".") and e.name.endswith(".tmp") and len(e.name) >= 5:
                with contextlib.suppress(FileNotFoundError):
                    if e.stat().st_mtime < older_than:
                        os.unlink(e.path)
                        removed += 1
        return removed


def _files(top: str) -> Iterator[os.DirEntry[str]]:
    """Every file under `top`, as `Path.rglob("*")` with `is_file()` finds them (symlinks to files
    included, symlinked folders not entered) without a Path object and a stat per entry: a
    backup lists the packs and walks the repository for leftovers (tenths of a second with pathlib)."""
    try:
        with os.scandir(top) as it:
            entries = list(it)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            yield from _files(e.path)
        elif e.is_file():
            yield e


def from_url(url: str, parsed: urllib.parse.ParseResult, options: BackendOptions) -> LocalBackend:
    """`file:///absolute/path`; a repository inside `options.storage_path` is refused."""
    if parsed.netloc not in ("", "localhost"):
        raise BackupError(f"file URLs must be file:///absolute/path, got {url!r}")
    path = Path(urllib.parse.unquote(parsed.path)).absolute()
    if options.storage_path is not None:
        root = Path(options.storage_path).absolute().resolve()
        target = path.resolve()
        if target == root or root in target.parents:
            raise BackupError(f"the repository {path} is inside STORAGE_PATH {root}: "
                              "a backup must live somewhere else")
    return LocalBackend(path)
