"""Leases with fencing tokens: background work runs on exactly one node at a time (scale-out).

Background work (lifecycle, journal compaction, scheduled backups, archiving) writes records. With
many nodes over one record store it must run on one node only, and a node that *believes* it still
holds the lease after a pause (SIGSTOP, a long GC, a partition) must not be able to write.

- The `leases` table (name, holder, fence, expires) lives in the record store on both engines.
- A node claims and renews its leases through the ordinary mutation path (`Catalog.mutate`, no
  journal event: a lease is coordination, not a record anybody replays). On PostgreSQL every batch
  of every node runs under one advisory lock, so claims, renewals and the fence checks below are
  totally ordered with every write.
- A claim of a free or expired lease increments its fence token; renewing a lease one still holds
  keeps it. Work started under a lease runs inside `Catalog.fenced(name, fence)`: each of its
  mutations first checks, inside the commit's transaction, that the lease still carries that fence
  and has not expired, else the mutation fails with `StaleFence` and writes nothing.
- The embedded store is one process (the storage lock guarantees it): it always holds every lease,
  nothing is written to the table and background writes carry no fence (no behaviour change).

Work started on request rather than by a timer (gc, `POST /anvil/v1/admin/gc` on any node) takes its
lease for its run only (`exclusive`): claimed at the start, refused with `LeaseHeld` while another
node holds it, renewed while the run lasts, given back at its end.

Clocks: `expires` is wall-clock time of the node that wrote it; nodes must keep their clocks in
sync (NTP) to well within the lease's time to live (ANVIL_LEASE_TTL_SECONDS, 15 s by default).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from anvil.errors import AnvilError

if TYPE_CHECKING:
    from anvil.storage.catalog import Catalog, Txn

log = logging.getLogger("anvil.leases")

T = TypeVar("T")

MIGRATIONS = [
    """CREATE TABLE leases(
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        fence INTEGER NOT NULL,
        expires REAL NOT NULL
    )""",
]

# The background work that must run on one node at a time (docs/scale-out.md).
LIFECYCLE = "lifecycle"
JOURNAL_COMPACTION = "journal-compaction"
BACKUP_SCHEDULE = "backup-schedule"
ARCHIVE = "archive"
GC = "gc"
BACKGROUND = (LIFECYCLE, JOURNAL_COMPACTION, BACKUP_SCHEDULE, ARCHIVE, GC)

DEFAULT_TTL = 15.0


def ttl_from_env() -> float:
    raw = os.environ.get("ANVIL_LEASE_TTL_SECONDS", str(DEFAULT_TTL))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"ANVIL_LEASE_TTL_SECONDS must be a number of seconds, got {raw!r}") from None
    if not 0.2 <= value <= 3600:
        raise ValueError("ANVIL_LEASE_TTL_SECONDS must be between 0.2 and 3600")
    return value


def check_fence(conn: Any, name: str, fence: int, now: float) -> None:
    """Inside a fenced mutation's transaction: refuse it unless `fence` still holds lease `name`."""
    row = conn.execute("SELECT fence, expires FROM leases WHERE name = ?", (name,)).fetchone()
    if row is None or int(row[0]) != fence:
        current = "none" if row is None else str(int(row[0]))
        raise AnvilError("StaleFence", f"the {name} lease moved on (this write carries fence {fence}, the "
                                       f"lease is at {current}): another node does this work now")
    if float(row[1]) <= now:
        raise AnvilError("StaleFence", f"the {name} lease (fence {fence}) expired before this write committed")


class Leases:
    """This node's leases. `shared`: the record store is shared with other nodes (PostgreSQL)."""

    def __init__(self, catalog: Catalog, *, shared: bool, node: str | None = None, ttl: float | None = None):
        self.catalog = catalog
        self.shared = shared
        self.node = node or f"{os.uname().nodename}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.ttl = ttl if ttl is not None else ttl_from_env()
        self._held: dict[str, tuple[int, float]] = {}  # name -> (fence, local monotonic deadline)
        self._lock = threading.Lock()
        self._names: set[str] = set()
        self._exclusive: set[str] = set()  # names held by `exclusive` blocks: renewed, never re-claimed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # One claim or release at a time: the renewal loop must not re-claim a lease `exclusive`
        # has just given back.
        self._claiming = threading.Lock()

    # ---------------------------------------------------------------- asking

    def fence(self, name: str) -> int | None:
        """The fence this node holds `name` with, or None (another node does that work now)."""
        if not self.shared:
            return 0
        with self._lock:
            held = self._held.get(name)
        # The local deadline keeps a margin: a renewal in flight may be late, the record is the truth.
        if held is None or time.monotonic() >= held[1]:
            return None
        return held[0]

    def holds(self, name: str) -> bool:
        return self.fence(name) is not None

    def run(self, name: str, fn: Callable[[], T]) -> T | None:
        """Run `fn` if this node holds `name`, its writes fenced; None when another node holds it."""
        self.want(name)
        fence = self.fence(name)
        if fence is None:
            return None
        if not self.shared:
            return fn()
        with self.catalog.fenced(name, fence):
            return fn()

    def guard(self, name: str) -> Callable[[Callable[[], T]], T | None]:
        """`run` bound to one lease, for workers that take a runner (`worker.guard = leases.guard(...)`)."""
        return lambda fn: self.run(name, fn)

    # ---------------------------------------------------------------- claiming

    def want(self, name: str) -> None:
        """Compete for `name` from now on (claimed at once if free, then renewed every ttl/3)."""
        if not self.shared or name in self._names:
            return
        self._names.add(name)
        self._claim_quietly(name)
        self.start()

    def start(self) -> None:
        if not self.shared or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="anvil-leases", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            for name in sorted(self._names):
                self._claim_quietly(name)

    def _claim_quietly(self, name: str) -> None:
        try:
            with self._claiming:
                if name in self._names:
                    self.claim(name, renew_only=name in self._exclusive)
        except Exception:  # noqa: BLE001 - the record store is away: the lease lapses, work stops
            log.exception("renewing lease %s failed", name)

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[int | None]:
        """Hold `name` for the block (work run on request, such as gc): claimed now, renewed while the
        block runs, given back at its end; its writes are fenced. `LeaseHeld` if another node holds it.
        The embedded store always holds every lease (yields None, nothing written)."""
        if not self.shared:
            yield None
            return
        if name in self._names:
            raise AnvilError("LeaseHeld", f"the {name} lease is already in use on this node ({self.node})")
        with self._claiming:
            fence = self.claim(name)
            if fence is None:
                raise AnvilError("LeaseHeld", self._held_elsewhere(name))
            self._names.add(name)
            self._exclusive.add(name)
        self.start()
        try:
            with self.catalog.fenced(name, fence):
                yield fence
        finally:
            with self._claiming:
                self._names.discard(name)
                self._exclusive.discard(name)
                with self._lock:
                    self._held.pop(name, None)
                self._release(name, fence)

    def _held_elsewhere(self, name: str) -> str:
        row = self.catalog.reader().execute("SELECT holder, fence, expires FROM leases WHERE name = ?",
                                            (name,)).fetchone()
        if row is None:
            return f"the {name} lease is held by another node"
        left = max(0.0, float(row[2]) - time.time())
        return (f"{name} is running on another node ({row[0]}, the {name} lease at fence {int(row[1])}, "
                f"{left:.1f} s left unless renewed): try again when it is done")

    def claim(self, name: str, *, renew_only: bool = False) -> int | None:
        """Claim or renew `name` now; the fence if this node holds it afterwards. `renew_only`: an
        `exclusive` block's lease, once lost (e.g. the node was paused past it), stays lost: taking
        it again at a new fence would keep it from every other node while the block fails."""
        started = time.monotonic()
        with self._lock:
            mine = self._held.get(name)
        known = mine[0] if mine else None

        def fn(txn: Txn) -> int | None:
            row = txn.conn.execute("SELECT holder, fence, expires FROM leases WHERE name = ?", (name,)).fetchone()
            until = txn.now + self.ttl
            if row is None:
                txn.conn.execute("INSERT INTO leases(name, holder, fence, expires) VALUES (?,?,?,?)",
                                 (name, self.node, 1, until))
                return 1
            holder, fence, expires = str(row[0]), int(row[1]), float(row[2])
            if holder == self.node and fence == known and expires > txn.now:
                txn.conn.execute("UPDATE leases SET expires = ? WHERE name = ? AND fence = ?", (until, name, fence))
                return fence
            if renew_only:
                return None
            if expires <= txn.now:
                # Free (released, or its holder stopped renewing): a new fence, so whatever the
                # previous holder still has in flight is refused at its commit.
                txn.conn.execute("UPDATE leases SET holder = ?, fence = ?, expires = ? WHERE name = ?",
                                 (self.node, fence + 1, until, name))
                return fence + 1
            return None

        fence = self.catalog.mutate(fn, actor="system/leases", request_id=f"lease-{name}")
        with self._lock:
            if fence is None:
                if self._held.pop(name, None) is not None:
                    log.warning("lease %s: held by another node now; this node stops that work", name)
            else:
                if known != fence:
                    log.info("lease %s: this node (%s) holds it with fence %d", name, self.node, fence)
                # The deadline counts from before the claim was sent: the record's expiry is later.
                self._held[name] = (fence, started + self.ttl * 0.9)
        return fence

    def status(self) -> dict[str, Any]:
        with self._lock:
            held = {n: f for n, (f, dl) in self._held.items() if time.monotonic() < dl}
        return {"node": self.node, "shared": self.shared, "ttl_seconds": self.ttl, "held": held,
                "stale_fence_refusals": self.catalog.stale_fences}

    def close(self) -> None:
        """Stop renewing and give every held lease back, so another node takes over at its next renewal."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not self.shared:
            return
        with self._lock:
            held, self._held = dict(self._held), {}
        for name, (fence, _) in held.items():
            self._release(name, fence)

    def _release(self, name: str, fence: int) -> None:
        def release(txn: Txn) -> None:
            txn.conn.execute("UPDATE leases SET expires = 0 WHERE name = ? AND holder = ? AND fence = ?",
                             (name, self.node, fence))
        try:
            self.catalog.mutate(release, actor="system/leases", request_id=f"lease-{name}")
        except Exception:  # noqa: BLE001 - it lapses on its own after its time to live
            log.warning("could not release lease %s", name)
