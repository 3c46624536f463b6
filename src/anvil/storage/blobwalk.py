"""The blob tree's walk and hashing (fsck --deep's per-byte work): a module and a script.

`blobscan.scan_blobs` runs `walk_tree` on threads of the caller's process. An offline `fsck --deep`
also runs it as a child process of this file (`start_early`, before fsck's imports and the opening
of the store): the store's ~0.2 s single-core start (imports, opening, the record checks) then runs
beside the hashing instead of before it, and the hashing shares no GIL with the record checks'
Python. The script imports only the standard library and runs with `-I -S` (no site-packages, not
even the `anvil` package): it starts in ~15-20 ms of CPU. It hashes the files through memory maps
(`hash_mapped`), which a process of its own can afford: a read error of a mapped page kills it
(SIGBUS), and fsck then walks in its own process, where the error is reported. Its answer comes
back marshalled (the child is the same interpreter): progress counts as it goes, then the walk's
result.
"""

from __future__ import annotations

import hashlib
import marshal
import mmap
import os
import sys
import threading

if False:  # for the annotations only (`typing` and `subprocess` would lengthen the child's start)
    import subprocess
    from collections.abc import Callable
    from typing import Any

READ_SIZE = 1024 * 1024
# Bytes of a blob file mapped at a time by `hash_mapped` (a large blob is never mapped whole).
MAP_WINDOW = 64 << 20
HEX_DIGITS = "0123456789abcdef"
# Estimated bytes of blob files (`estimated_bytes`) from which `start_early` hashes in a child: below
# it the child's start (~15-20 ms of CPU) costs more than it saves, as for catalogcheck.PROCESS_FROM.
PROCESS_FROM = 32 << 20
PROGRESS_EVERY = 256

# (name, path, actual sha256 or None, bytes read, read error or None) of a blob that fails its hash.
Bad = tuple[str, str, "str | None", int, "str | None"]
# (name -> path of every blob, misplaced paths, bad blobs, deep only: name -> bytes read).
Walked = tuple[dict[str, str], list[str], list[Bad], dict[str, int]]


def is_blob_name(name: str) -> bool:
    """64 lowercase hex digits (what `re.fullmatch("[0-9a-f]{64}")` says, without importing `re`)."""
    return len(name) == 64 and not name.strip(HEX_DIGITS)


def listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (NotADirectoryError, FileNotFoundError):
        return []


def read_sequentially(fd: int) -> None:
    """Tell the kernel a blob file will be read front to back, so it reads ahead twice as far.
    On this VM's disk every small read-ahead is expensive: a cold 256 MiB file read in 1 MiB
    preads took 0.42-0.56 s of CPU at 95-140 MB/s without the advice and 0.04-0.15 s at
    160-1,200 MB/s with it (bench/largeput.py `read_from_disk` against
    `read_from_disk_sequential`). Advice only: a kernel that refuses it reads as before."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except OSError:
        pass


def hash_fd(fd: int, buf: bytearray, view: memoryview) -> tuple[str, int]:
    """(sha256 hex, size) of the file open as `fd`, read into `buf` (READ_SIZE bytes, `view` of it)."""
    h = hashlib.sha256()
    size = 0
    while True:
        n = os.readv(fd, (buf,))
        h.update(view[:n])
        size += n
        # A short read of a regular file is its end: blobs are immutable, so this saves the
        # extra empty read per file that dominates for small blobs.
        if n < READ_SIZE:
            return h.hexdigest(), size
        if size == READ_SIZE:  # more than one read: a large blob, read on sequentially
            read_sequentially(fd)


def hash_mapped(fd: int, buf: bytearray, view: memoryview) -> tuple[str, int]:
    """`hash_fd` through memory maps of MAP_WINDOW bytes: hashlib reads the page cache in place, no
    copy into `buf`, ~0.1-0.15 s less system CPU per GiB (1,000 x 1 MiB files, warm: 0.04-0.06 s
    against 0.15-0.22 s). For the child process only: a read error of a mapped page is SIGBUS, which
    ends it (the caller then walks in its own process, where `hash_fd` reports the error). What
    cannot be mapped (a folder named like a blob) is read by `hash_fd`, for the same error."""
    try:
        size = os.fstat(fd).st_size
        h = hashlib.sha256()
        for offset in range(0, size, MAP_WINDOW):
            with mmap.mmap(fd, min(MAP_WINDOW, size - offset), prot=mmap.PROT_READ, offset=offset) as m:
                if size > READ_SIZE:
                    m.madvise(mmap.MADV_SEQUENTIAL)  # as `read_sequentially`
                h.update(m)
    except (OSError, ValueError):
        return hash_fd(fd, buf, view)
    return h.hexdigest(), size


def _walk(root: str, tops: list[str], deep: bool, on_progress: Callable[[int], None] | None,
          hasher: Callable[[int, bytearray, memoryview], tuple[str, int]]) -> Walked:
    blobs: dict[str, str] = {}
    misplaced: list[str] = []
    bad: list[Bad] = []
    sizes: dict[str, int] = {}
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    pending = 0
    for a in tops:
        pa = f"{root}/{a}"
        for name in listdir(pa):
            if not is_blob_name(name):
                continue
            path = f"{pa}/{name}"
            if name[:2] != a:
                misplaced.append(path)
                continue
            blobs[name] = path
            if not deep:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    actual, size = hasher(fd, buf, view)
                finally:
                    os.close(fd)
                err = None
            except OSError as e:
                actual, size, err = None, 0, e.strerror or str(e)
            sizes[name] = size
            if actual != name:
                bad.append((name, path, actual, size, err))
            pending += 1
            if on_progress is not None and pending >= PROGRESS_EVERY:
                on_progress(pending)
                pending = 0
    if on_progress is not None and pending:
        on_progress(pending)
    return blobs, misplaced, bad, sizes


def walk_tree(root: str, *, deep: bool, threads: int = 2, on_progress: Callable[[int], None] | None = None,
              mapped: bool = False) -> Walked:
    """List every blob under `root` and, with `deep`, hash each as soon as it is found.

    Listing and hashing are fused and split by top-level fan-out folder across `threads`
    workers: at 10k small blobs the walk (one directory per blob, nearly) costs as much as
    the hashing, and both mostly wait in syscalls that release the GIL. Names are all the
    walk needs (no stat per blob; `dir_fd`-relative opens measured slower, since most leaf
    folders hold one blob): a non-folder where a folder belongs is skipped, a non-file
    named like a hash fails to hash and is reported. `on_progress` is called under a lock.
    `mapped`: hash through memory maps (`hash_mapped`: the child process only)."""
    tops = sorted(n for n in listdir(root) if len(n) == 2)
    shares = [tops[i::threads] for i in range(max(1, threads))]
    if on_progress is not None and len(shares) > 1:
        lock = threading.Lock()
        advance = on_progress

        def on_progress(n: int) -> None:
            with lock:
                advance(n)

    results: list[Walked | BaseException] = [ValueError("not walked")] * len(shares)

    def work(i: int) -> None:
        try:
            results[i] = _walk(root, shares[i], deep, on_progress, hash_mapped if mapped else hash_fd)
        except BaseException as e:  # noqa: BLE001 - raised below: a share left unwalked must not pass
            results[i] = e

    # Plain threads, not concurrent.futures (which imports logging: the child's start).
    workers = [threading.Thread(target=work, args=(i,), name=f"anvil-fsck-scan-{i}", daemon=True)
               for i in range(1, len(shares))]
    for w in workers:
        w.start()
    work(0)  # this thread is one of the workers
    for w in workers:
        w.join()
    out: Walked = ({}, [], [], {})
    for r in results:
        if isinstance(r, BaseException):
            raise r
        out[0].update(r[0])
        out[1].extend(r[1])
        out[2].extend(r[2])
        out[3].update(r[3])
    return out


def estimated_bytes(root: str, per_folder: int = 64) -> int:
    """A cheap guess of the bytes of blob files under `root`, for `start_early`'s choice: the fan-out
    folders times the mean bytes per folder of a few of them (first, middle, last), from at most
    `per_folder` stats each. Hashes spread blobs evenly over the folders, so a handful suffice."""
    tops = sorted(n for n in listdir(root) if len(n) == 2)
    if not tops:
        return 0
    picked = sorted({tops[0], tops[len(tops) // 2], tops[-1]})
    total = 0.0
    for a in picked:
        names = [n for n in listdir(f"{root}/{a}") if is_blob_name(n)]
        sized = 0
        size = 0
        for name in names[:per_folder]:
            try:
                size += os.stat(f"{root}/{a}/{name}").st_size
                sized += 1
            except OSError:
                pass
        if sized:
            total += size / sized * len(names)
    return round(total * len(tops) / len(picked))


# Children started by `start_early`: (real path of the blob root, threads) -> process.
_early: dict[tuple[str, int], subprocess.Popen[bytes]] = {}


def _spawn(root: str, threads: int) -> subprocess.Popen[bytes] | None:
    """A child process of this script hashing the blobs under `root`, or None when it cannot start."""
    import subprocess

    try:
        # -I -S: no site-packages, no environment, the script's folder not on sys.path (where its
        # neighbours could shadow the standard library's modules).
        return subprocess.Popen([sys.executable, "-I", "-S", __file__, root, str(int(threads))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except (OSError, subprocess.SubprocessError) as e:
        import logging

        logging.getLogger("anvil.blobwalk").warning("the blob walk's child process could not run (%s)", e)
        return None


def start_early(root: str | os.PathLike[str], threads: int) -> None:
    """Start hashing the blob files under `root` now, in a child process: an offline `fsck --deep`
    calls this before its imports and the opening of the store, and `take_early` (from
    `blobscan.scan_blobs`) takes the child's answer. Nothing when the store holds less than
    PROCESS_FROM bytes of blob files (`estimated_bytes`). The child only reads: should the store be
    locked by a server, `discard_early` ends it. Every blob the child lists was listed after this
    call, i.e. before fsck reads any reference: the orphan rule of `RecoveryContext.start_blob_scan`."""
    path = os.path.realpath(root)
    key = (path, int(threads))
    if key not in _early and estimated_bytes(path) >= PROCESS_FROM:
        proc = _spawn(path, threads)
        if proc is not None:
            _early[key] = proc


def end_children(children: dict[Any, subprocess.Popen[bytes]]) -> None:
    """Kill and reap every process of `children`, emptying it (also catalogcheck's)."""
    while children:
        _, proc = children.popitem()
        proc.kill()
        proc.communicate()


def discard_early() -> None:
    """End the children `start_early` started that nothing took (the store could not be opened)."""
    end_children(_early)


def take_early(root: str | os.PathLike[str], threads: int,
               on_progress: Callable[[int], None] | None = None) -> Walked | None:
    """The deep walk of the child `start_early(root, threads)` started, passing its progress on; None
    when there is none, or it did not answer (died, or said something else): the caller walks then."""
    proc = _early.pop((os.path.realpath(root), int(threads)), None)
    if proc is None:
        return None
    assert proc.stdout is not None and proc.stderr is not None
    walked = None
    reported = 0  # progress passed on: taken back if the walk must run again here
    try:
        while walked is None:
            message = marshal.load(proc.stdout)
            if isinstance(message, int):
                if on_progress is not None:
                    on_progress(message)
                    reported += message
            elif isinstance(message, tuple) and len(message) == 4:
                walked = message
            else:
                break
    except (EOFError, ValueError, TypeError):
        pass
    finally:
        if walked is None:
            proc.kill()
        _, stderr = proc.communicate()
    if walked is not None and proc.returncode == 0:
        return walked
    if reported and on_progress is not None:
        on_progress(-reported)  # the in-process walk reports every blob again
    import logging

    logging.getLogger("anvil.blobwalk").warning(
        "the blob walk's child process failed (exit %s: %s); walking in-process",
        proc.returncode, stderr.decode(errors="replace")[-500:].strip())
    return None


def main(argv: list[str]) -> None:
    out = sys.stdout.buffer

    def progress(n: int) -> None:  # called under walk_tree's lock
        marshal.dump(n, out)
        out.flush()

    marshal.dump(walk_tree(argv[0], deep=True, threads=int(argv[1]), on_progress=progress, mapped=True), out)
    out.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
