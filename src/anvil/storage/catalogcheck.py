"""catalog.db's deep checks, all C work on connections of their own: SQLite's `integrity_check` and
the hashing of every inline body (`inline_blobs`) against its address and recorded size.

A module (for small catalogs, checked in the caller's process) and a script (`python
catalogcheck.py`, run by `check_catalog` for a large one): it imports only the standard library and
apsw, never the `anvil` package, so the child starts in ~25–30 ms of CPU. In a child process the checks share
no GIL with the caller's record checks: in one process, every body the hashing threads read and
every hashlib call hands the GIL back and forth with the caller's Python, and a thread that asks
for it waits up to the switch interval (5 ms) while Python runs, which made the hashing 2-6 times
slower beside a busy main thread (measured). The child also maps the file for both checks
(see `integrity_problems`), which a read error of a mapped page would turn into SIGBUS: it kills the
child only, and the caller then checks in its own process, where that error is reported.
"""

from __future__ import annotations

# Only what the child needs is imported at the top (it starts in ~25–30 ms of CPU, hashlib's OpenSSL
# being half of it; not even pathlib, ~10 ms): the caller's side imports `subprocess` and `logging`
# where it uses them, and the answer comes back marshalled (the child is the same interpreter), not
# as JSON (`json` loads `re`).
import hashlib
import marshal
import os
import sys
import threading
from collections.abc import Iterable

import apsw

if False:  # for the annotations only (`typing.TYPE_CHECKING` would import typing: ~5 ms of the child's start)
    import subprocess

# A catalog file of this size or more is checked in a child process; below it the child's start
# (~25–30 ms of CPU) costs more than it saves.
PROCESS_FROM = 32 << 20

# (sha256, recorded size, size read, actual sha256) of an inline body that fails its check.
Mismatch = tuple[str, int, int, str]
# (bodies hashed, mismatches) of an inline-bodies check.
BodiesResult = tuple[int, list[Mismatch]]


def open_readonly(path: str | os.PathLike[str], mmap_size: int = 0) -> apsw.Connection:
    """A read-only connection to a catalog file that no server may be writing (or one that is: WAL).
    `mmap_size`: bytes of the file SQLite reads through a memory map instead of `pread`."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    conn.setbusytimeout(10_000)
    if mmap_size:
        conn.execute(f"PRAGMA mmap_size={int(mmap_size)}")
    return conn


def integrity_problems(conn: apsw.Connection, limit: int = 100) -> list[str]:
    """SQLite's structural check of the file: [] when it is sound.

    The full `integrity_check`, not `quick_check`: only the former verifies that every index
    matches its table (an index entry pointing at the wrong row makes lookups by key miss a row
    that a table scan still finds), and fsck --deep's own reads cover neither. It reads every page,
    every overflow page of an inline body twice: once walking the b-tree, and once loading the
    REAL `stored` column that follows the body in its row (its NOT NULL check must see the value to
    tell a NaN). Over a memory map those reads cost no system call and no copy: 0.09 s of CPU
    instead of 0.2 s over 160 MB of inline bodies."""
    try:
        rows = [r[0] for r in conn.execute(f"PRAGMA integrity_check({int(limit)})").fetchall()]
    except apsw.Error as e:
        # Damage bad enough that the check aborts is itself the answer.
        return [f"integrity_check aborted: {e}"]
    return [] if rows == ["ok"] else rows


def integrity_problems_of_file(path: str | os.PathLike[str], limit: int = 100, mmap_size: int = 0) -> list[str]:
    """`integrity_problems` on a connection of its own."""
    try:
        conn = open_readonly(path, mmap_size)
    except apsw.Error as e:
        return [f"integrity_check aborted: {e}"]
    try:
        return integrity_problems(conn, limit)
    finally:
        conn.close()


def check_rows(rows: Iterable[tuple[str, int, bytes]]) -> BodiesResult:
    """Hash every body of `rows`; (rows seen, those whose hash or size is not what the row says).
    Nothing but the mismatches is kept: fsck checks sizes against references from the rows' sizes."""
    sha256 = hashlib.sha256
    seen = 0
    bad: list[Mismatch] = []
    for sha, recorded, body in rows:
        seen += 1
        actual = sha256(body).hexdigest()
        if actual != sha or len(body) != recorded:
            bad.append((sha, int(recorded), len(body), actual))
    return seen, bad


def _check_range(path: str, lo: int, hi: int, mmap_size: int = 0) -> BodiesResult:
    conn = open_readonly(path, mmap_size)
    try:
        return check_rows(conn.execute(
            "SELECT sha256, size, body FROM inline_blobs WHERE rowid BETWEEN ? AND ?", (lo, hi)))
    except apsw.Error:
        return 0, []  # a damaged table: the integrity check reports it
    finally:
        conn.close()


def check_bodies(path: str, threads: int, mmap_size: int = 0) -> BodiesResult:
    """Hash every inline body of the catalog file `path`; (bodies hashed, mismatches).

    Each of `threads` workers reads its own rowid ranges of the table on a connection of its own
    and hashes what it reads: SQLite's reads and hashlib (bodies over 2 KiB) release the GIL, so
    both cores read and hash, with one Python call per body beyond the row itself. Ranges are table
    order (one sequential pass, no index lookups), several per worker so that rows deleted from one
    part do not leave a thread idle. `mmap_size` (the child only, see the module's docstring): the
    rows are read over a memory map, no `pread` per page: ~15 % less CPU than `pread` (10,000 ×
    16 KiB, 0.215 → 0.180 s)."""
    try:
        conn = open_readonly(path)
        try:
            lo, hi = conn.execute("SELECT min(rowid), max(rowid) FROM inline_blobs").fetchone()
        finally:
            conn.close()
    except apsw.Error:
        return 0, []
    if lo is None:
        return 0, []
    threads = max(1, threads)
    parts = threads * 4
    step = max(1, (hi - lo + parts) // parts)
    todo = [(r, min(hi, r + step - 1)) for r in range(lo, hi + 1, step)]
    results: list[BodiesResult] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        try:
            while True:
                with lock:
                    if not todo or failures:
                        return
                    a, b = todo.pop(0)
                result = _check_range(path, a, b, mmap_size)
                with lock:
                    results.append(result)
        except BaseException as e:  # noqa: BLE001 - raised below: a range left unhashed must not pass
            with lock:
                failures.append(e)

    # Plain threads, not concurrent.futures (which imports logging: the child's start).
    workers = [threading.Thread(target=work, name=f"anvil-inline-hash-{i}", daemon=True)
               for i in range(min(threads, len(todo)) - 1)]
    for w in workers:
        w.start()
    work()  # this thread is one of the workers
    for w in workers:
        w.join()
    if failures:
        raise failures[0]
    return sum(r[0] for r in results), [m for r in results for m in r[1]]


def check_here(path: str, hash_threads: int, limit: int = 100,
               mmap_size: int = 0) -> tuple[list[str], BodiesResult | None]:
    """(integrity problems, inline bodies result or None when `hash_threads` is 0), in this process:
    the integrity check on a thread of its own beside the hashing threads, both over a memory map
    of `mmap_size` bytes of the file (0: none)."""
    outcome: list[list[str] | BaseException] = []

    def integrity() -> None:
        try:
            outcome.append(integrity_problems_of_file(path, limit, mmap_size))
        except BaseException as e:  # noqa: BLE001 - raised below: a check that did not run must not pass
            outcome.append(e)

    checker = threading.Thread(target=integrity, name="anvil-catalog-integrity", daemon=True)
    checker.start()
    bodies = check_bodies(path, hash_threads, mmap_size) if hash_threads else None
    checker.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0], bodies


# Children started ahead of `check_catalog` (`start_early`): (real path, hash threads, limit) -> process.
_early: dict[tuple[str, int, int], subprocess.Popen[bytes]] = {}


def _spawn(path: str, hash_threads: int, limit: int, size: int) -> subprocess.Popen[bytes] | None:
    """A child process of this script checking `path`, or None when it cannot start."""
    import subprocess

    try:
        # -P: the script's folder (anvil/storage) is not put on sys.path, where its modules could
        # shadow the standard library's.
        return subprocess.Popen([sys.executable, "-P", __file__, path, str(int(hash_threads)), str(int(limit)),
                                 str(size)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except (OSError, subprocess.SubprocessError) as e:
        import logging

        logging.getLogger("anvil.catalogcheck").warning(
            "the catalog check's child process could not run (%s); checking in-process", e)
        return None


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def start_early(path: str | os.PathLike[str], hash_threads: int, limit: int = 100) -> None:
    """Start the child process that `check_catalog(path, hash_threads, limit)` will use, now: an offline
    `fsck --deep` calls this before its own imports and before it opens the store (~0.1 s on one core
    of a 0.4 s run), so the catalog's checks use the other core meanwhile, and `check_catalog` takes
    the child's answer. Nothing for a catalog checked in-process (under `PROCESS_FROM`). The child only
    reads: should the store turn out to be locked by a server, `discard_early` ends it."""
    path = os.path.realpath(path)
    key = (path, int(hash_threads), int(limit))
    size = _file_size(path)
    if size >= PROCESS_FROM and key not in _early:
        proc = _spawn(path, hash_threads, limit, size)
        if proc is not None:
            _early[key] = proc


def discard_early() -> None:
    """End the children `start_early` started that no `check_catalog` took (the store could not be opened)."""
    from anvil.storage.blobwalk import end_children  # the caller's side only: the child never imports anvil

    end_children(_early)


def _in_child(path: str, hash_threads: int, limit: int, size: int) -> tuple[list[str], BodiesResult | None] | None:
    """`check_here` run by a child process of this script (the one `start_early` started, if any), both
    checks over a memory map of the whole file; None when the child did not answer (could not start,
    or died)."""
    import logging
    import subprocess

    log = logging.getLogger("anvil.catalogcheck")
    proc = _early.pop((os.path.realpath(path), int(hash_threads), int(limit)), None)
    if proc is None:
        proc = _spawn(path, hash_threads, limit, size)
        if proc is None:
            return None
    try:
        stdout, stderr = proc.communicate(timeout=24 * 3600)
    except subprocess.SubprocessError as e:
        proc.kill()
        proc.communicate()
        log.warning("the catalog check's child process did not finish (%s); checking in-process", e)
        return None
    if proc.returncode == 0:
        try:
            problems, bodies = marshal.loads(stdout)
            if isinstance(problems, list) and all(isinstance(p, str) for p in problems):
                return problems, None if bodies is None else (bodies[0], [tuple(m) for m in bodies[1]])
        except (ValueError, EOFError, TypeError, IndexError):
            pass
    log.warning("the catalog check's child process failed (exit %s: %s); checking in-process",
                proc.returncode, stderr.decode(errors="replace")[-500:].strip())
    return None


def check_catalog(path: str | os.PathLike[str], hash_threads: int,
                  limit: int = 100) -> tuple[list[str], BodiesResult | None]:
    """catalog.db's deep checks: (integrity problems, and with `hash_threads` the inline bodies'
    (bodies hashed, mismatches)). A file of `PROCESS_FROM` bytes or more is checked by a child
    process (no GIL shared with the caller; the integrity check over mapped pages), or here when
    that child does not answer."""
    path = str(path)
    size = _file_size(path)
    if size >= PROCESS_FROM:
        answer = _in_child(path, hash_threads, limit, size)
        if answer is not None:
            return answer
    return check_here(path, hash_threads, limit)


def main(argv: list[str]) -> None:
    path, hash_threads, limit, size = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    problems, bodies = check_here(path, hash_threads, limit, mmap_size=size)
    sys.stdout.buffer.write(marshal.dumps((problems, bodies)))


if __name__ == "__main__":
    main(sys.argv[1:])
