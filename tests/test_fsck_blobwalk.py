"""`fsck --deep`'s blob hashing in a child process started early (`blobwalk.start_early`,
docs/performance.md "fsck13"): the same findings as the walk on threads of fsck's own process
(corrupt, missing, orphan, misplaced and unreadable blobs, a reference of the wrong size), a blob
written after the child started is never an orphan, a child that dies is replaced by the in-process
walk, one nothing takes (the store is locked) is ended, as is the catalog's, and a small store
starts no child.

Real stores built through the service layer, real child processes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import apsw
import pytest

from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.diagnostics import run_fsck
from anvil.diagnostics.service import open_offline_target
from anvil.participants import recovery_participants
from anvil.runtime import Anvil
from anvil.storage import blobwalk

pytestmark = pytest.mark.timeout(120)

BODIES = 12
SIZE = 70_000  # over the inline threshold (64 KiB): blob files


def _body(i: int) -> bytes:
    return (f"blobwalk body {i:04d} ".encode() * (SIZE // 16 + 1))[:SIZE + i]


def _sha(i: int) -> str:
    return hashlib.sha256(_body(i)).hexdigest()


def _put(a: Anvil, key: str, body: bytes) -> None:
    w = a.storage.blobs.writer()
    w.write(body)
    a.objects.put_object(RequestContext(DEV_PRINCIPAL), "walkb", key, a.objects.store_body(w))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("blobwalk") / "data"
    a = Anvil(root)
    try:
        a.objects.create_bucket(RequestContext(DEV_PRINCIPAL), "walkb")
        for i in range(BODIES):
            _put(a, f"k{i:03d}", _body(i))
    finally:
        a.close()
    return root


def _blob(root: Path, sha: str) -> Path:
    return root / "blobs" / "sha256" / sha[:2] / sha


def _deep(root: Path) -> dict:
    with open_offline_target(root) as target:
        return run_fsck(target, recovery_participants(), deep=True, record=False).to_dict()


def _findings(report: dict) -> set[tuple[str, str]]:
    return {(f["invariant"], f["affected"].get("blob") or f["affected"].get("path", "")) for f in report["findings"]}


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every child `start_early` starts (the real `_spawn`, recorded); any store is "large"."""
    monkeypatch.setattr(blobwalk, "PROCESS_FROM", 0)
    out: list = []
    spawn = blobwalk._spawn
    monkeypatch.setattr(blobwalk, "_spawn", lambda *a: out.append(spawn(*a)) or out[-1])
    yield out
    blobwalk.discard_early()


def _damage(root: Path) -> dict[str, str]:
    """Each kind of damage the walk can see, on its own blob: name -> the invariant fsck reports."""
    corrupt = _blob(root, _sha(1))
    data = bytearray(corrupt.read_bytes())
    data[100] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    _blob(root, _sha(2)).unlink()
    orphan_body = b"nobody references this blob " * 3000
    orphan = hashlib.sha256(orphan_body).hexdigest()
    _blob(root, orphan).parent.mkdir(exist_ok=True)
    _blob(root, orphan).write_bytes(orphan_body)
    # A folder named like a blob: it cannot be read as one.
    unreadable = hashlib.sha256(b"a folder, not a file").hexdigest()
    _blob(root, unreadable).mkdir(parents=True)
    # A blob in the wrong fan-out folder.
    misplaced = _blob(root, _sha(3)).parent.parent / ("00" if _sha(3)[:2] != "00" else "01") / _sha(3)
    misplaced.parent.mkdir(exist_ok=True)
    shutil.copy(_blob(root, _sha(3)), misplaced)
    # A reference recording another size than the sound blob's.
    conn = apsw.Connection(str(root / "catalog.db"))
    conn.execute("UPDATE versions SET size = size + 1, chunks = json_array(json_array(sha256, size + 1)) "
                 "WHERE sha256 = ?", (_sha(4),))
    assert conn.changes() == 1
    conn.close()
    return {_sha(1): "blobs.hash_mismatch", _sha(2): "objects.blob_missing", orphan: "blobs.orphan",
            unreadable: "blobs.hash_mismatch", os.path.relpath(misplaced, root): "blobs.misplaced",
            _sha(4): "objects.chunk_size"}


def test_the_early_child_finds_what_the_in_process_walk_finds(store: Path, tmp_path: Path, spawned: list) -> None:
    root = tmp_path / "data"
    shutil.copytree(store, root)
    expected = _damage(root)
    in_process = _deep(root)
    assert spawned == []
    blobwalk.start_early(root / "blobs" / "." / "sha256", 2)  # the path may be spelled differently
    assert len(spawned) == 1 and len(blobwalk._early) == 1
    early = _deep(root)
    assert blobwalk._early == {} and spawned[0].returncode == 0  # the child's answer was taken
    assert _findings(early) == _findings(in_process)
    found = {(inv, blob) for inv, blob in _findings(early)}
    for blob, invariant in expected.items():
        assert (invariant, blob) in found, (invariant, blob, found)
    assert early["checks"]["blobs"]["hashed"] == in_process["checks"]["blobs"]["hashed"]
    assert not early["ok"]


def test_a_blob_written_after_the_child_started_is_no_orphan(store: Path, tmp_path: Path, spawned: list) -> None:
    """Two blobs and their records written after the child started: one whose file existed before
    (the child lists it; its record commits later), one written entirely after. Neither is an orphan
    nor missing; a blob no record takes is still an orphan."""
    root = tmp_path / "data"
    shutil.copytree(store, root)
    listed_body, late_body, orphan_body = b"listed first " * 9000, b"written late " * 9000, b"orphan " * 16000
    a = Anvil(root)
    try:
        for body in (listed_body, orphan_body):
            w = a.storage.blobs.writer()
            w.write(body)
            a.objects.store_body(w)  # the file only: no record references it yet
        blobwalk.start_early(root / "blobs" / "sha256", 2)
        assert len(spawned) == 1
        _put(a, "listed", listed_body)
        _put(a, "late", late_body)
    finally:
        a.close()
    report = _deep(root)
    assert blobwalk._early == {} and spawned[0].returncode == 0
    assert _findings(report) == {("blobs.orphan", hashlib.sha256(orphan_body).hexdigest())}, report["findings"]
    assert report["checks"]["blobs"]["missing"] == 0


def test_a_child_that_dies_is_replaced_by_the_in_process_walk(store: Path, tmp_path: Path, spawned: list,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    shutil.copytree(store, root)
    expected = _damage(root)
    dies = tmp_path / "python-that-dies"
    dies.write_text("#!/bin/sh\nkill -KILL $$\n")
    dies.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(dies))
    blobwalk.start_early(root / "blobs" / "sha256", 2)
    assert len(spawned) == 1
    assert blobwalk.take_early(root / "blobs" / "sha256", 2) is None and blobwalk._early == {}
    blobwalk.start_early(root / "blobs" / "sha256", 2)
    report = _deep(root)
    assert spawned[1].returncode != 0 and blobwalk._early == {}
    assert {(inv, blob) for blob, inv in expected.items()} <= _findings(report)


def test_early_children_nothing_takes_are_ended(store: Path, tmp_path: Path, spawned: list,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The command starts both children (the catalog's and the blobs'); a locked store (a server
    runs) refuses the command as before and ends them, not left running; unlocked, the command takes
    each child's answer: one child each, and the store is sound."""
    from click.testing import CliRunner

    from anvil.cli.main import cli
    from anvil.storage import catalogcheck
    from anvil.storage.layout import Layout

    root = tmp_path / "data"
    shutil.copytree(store, root)  # the command records its run in the store
    monkeypatch.setattr(catalogcheck, "PROCESS_FROM", 0)
    catalog_children: list = []
    spawn = catalogcheck._spawn
    monkeypatch.setattr(catalogcheck, "_spawn", lambda *a: catalog_children.append(spawn(*a)) or catalog_children[-1])
    holder = Layout(root)
    holder.acquire_lock()
    try:
        result = CliRunner().invoke(cli, ["fsck", "--deep", "--storage-path", str(root), "--json"])
    finally:
        holder.release_lock()
    assert result.exit_code == 2 and "StorageLocked" in result.output, result.output
    for children, early in ((spawned, blobwalk._early), (catalog_children, catalogcheck._early)):
        assert len(children) == 1 and children[0].returncode is not None and early == {}
    result = CliRunner().invoke(cli, ["fsck", "--deep", "--storage-path", str(root), "--json"])
    assert result.exit_code == 0, result.output
    for children, early in ((spawned, blobwalk._early), (catalog_children, catalogcheck._early)):
        assert len(children) == 2 and children[1].returncode == 0 and early == {}


def test_a_small_store_starts_no_child(store: Path, tmp_path: Path) -> None:
    """Under PROCESS_FROM bytes of blob files the walk stays in fsck's process; the estimate is exact
    when every fan-out folder is sampled."""
    blobs = store / "blobs" / "sha256"
    total = sum(p.stat().st_size for p in blobs.glob("*/*") if blobwalk.is_blob_name(p.name))
    assert total < blobwalk.PROCESS_FROM
    blobwalk.start_early(blobs, 2)
    assert blobwalk._early == {}
    tree = tmp_path / "tree"
    for i, size in enumerate((10, 2000, 300_000)):
        sha = hashlib.sha256(str(i).encode()).hexdigest()
        (tree / sha[:2]).mkdir(parents=True, exist_ok=True)
        (tree / sha[:2] / sha).write_bytes(b"x" * size)
    assert blobwalk.estimated_bytes(str(tree)) == 302_010
    assert blobwalk.estimated_bytes(str(tmp_path / "none")) == 0


def test_hashing_through_maps_reads_what_hashing_by_reads_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child's `hash_mapped` against `hash_fd`: a file over several map windows (one page each
    here), one of exactly a window, an empty one, and a folder (which cannot be mapped: the same error
    as a read gives)."""
    import mmap

    monkeypatch.setattr(blobwalk, "MAP_WINDOW", mmap.ALLOCATIONGRANULARITY)
    buf = bytearray(blobwalk.READ_SIZE)
    view = memoryview(buf)
    for size in (3 * mmap.ALLOCATIONGRANULARITY + 17, mmap.ALLOCATIONGRANULARITY, 0):
        path = tmp_path / f"f{size}"
        path.write_bytes(os.urandom(size))
        fd = os.open(path, os.O_RDONLY)
        try:
            assert blobwalk.hash_mapped(fd, buf, view) == blobwalk.hash_fd(fd, buf, view) == \
                (hashlib.sha256(path.read_bytes()).hexdigest(), size)
        finally:
            os.close(fd)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(IsADirectoryError):
            blobwalk.hash_mapped(fd, buf, view)
    finally:
        os.close(fd)


# A fresh interpreter running `anvil fsck ...` as the `anvil` script would, the thresholds lowered
# so the test store gets both children: prints what anvil.cli started before click was imported,
# and (at exit, after anvil.cli's own exit handlers) whether every child was reaped.
EARLY_START = """
import atexit, json, sys
from anvil.storage import blobwalk, catalogcheck
blobwalk.PROCESS_FROM = catalogcheck.PROCESS_FROM = 0
children = []
atexit.register(lambda: print(json.dumps({"reaped": [p.returncode is not None for p in children]})))
sys.argv = ["anvil", *sys.argv[1:]]
import anvil.cli
children += [*blobwalk._early.values(), *catalogcheck._early.values()]
print(json.dumps({"click": "click" in sys.modules, "early": len(children)}), flush=True)
from anvil.cli.main import main
main()
"""


@pytest.mark.parametrize("extra, code", [([], 0), (["--endpoint", "http://127.0.0.1:9"], 2)])
def test_the_command_line_starts_both_children_before_click(store: Path, tmp_path: Path, extra: list[str],
                                                            code: int) -> None:
    """`anvil fsck --deep --storage-path DIR` starts the catalog's and the blobs' children when the
    `anvil.cli` package is imported, before click and the command's modules; the command then takes
    their answers (exit 0, the store sound), and on a usage error nothing takes them: they are ended
    at exit, never left running."""
    import json
    import subprocess

    root = tmp_path / "data"
    shutil.copytree(store, root)
    out = subprocess.run([sys.executable, "-c", EARLY_START, "fsck", "--deep", "--storage-path", str(root), "--json",
                          *extra], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == code, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"')]
    assert lines[0] == {"click": False, "early": 2}
    assert lines[-1] == {"reaped": [True, True]}
    if code == 0:
        assert json.loads(out.stdout[out.stdout.index("\n") + 1:out.stdout.rindex('{"reaped"')])["ok"] is True
    else:
        assert "not both" in out.stderr


def test_progress_a_dying_child_reported_is_taken_back(store: Path, tmp_path: Path, spawned: list,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that reported progress and then died: the caller walks again in its own process and
    reports every blob again, so what the child reported is taken back (no bar past its total)."""
    import marshal

    said = tmp_path / "progress"
    said.write_bytes(marshal.dumps(3) + marshal.dumps(4))
    dies = tmp_path / "python-that-reports-then-dies"
    dies.write_text(f"#!/bin/sh\ncat {said}\nkill -KILL $$\n")
    dies.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(dies))
    blobwalk.start_early(store / "blobs" / "sha256", 2)
    progress: list[int] = []
    assert blobwalk.take_early(store / "blobs" / "sha256", 2, progress.append) is None
    assert progress == [3, 4, -7]
