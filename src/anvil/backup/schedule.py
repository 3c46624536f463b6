"""Scheduled backups inside `anvil serve` (`--backup-repo URL --backup-every 1h`)."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from anvil.backup.errors import BackupError
from anvil.backup.repository import env_seconds
from anvil.context import Principal

# Who heals blobs on its own (recorded as the actor of the journal events it causes).
AUTO_HEAL_PRINCIPAL = Principal(tenant="system", subject="auto-heal", admin=True, scopes=("*",))

log = logging.getLogger("anvil.backup")

HEAL_POLL_ENV = "ANVIL_HEAL_POLL"
HEAL_POLL = 30.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> float:
    """'90s', '15m', '1h', '1d' (or combinations like '1h30m') -> seconds."""
    parts = re.fullmatch(r"((\d+)([smhd]))+", text.strip())
    if not parts:
        raise ValueError(f"interval must look like 30s, 15m, 1h or 1d, got {text!r}")
    seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([smhd])", text))
    if seconds < 1:
        raise ValueError("the backup interval must be at least 1s")
    return float(seconds)


@dataclass
class ScheduleConfig:
    repo: str
    every: float
    passphrase: str
    s3_endpoint: str | None = None


class BackupScheduler:
    """A daemon thread taking one backup per interval through `run_backup`, which the server
    hands in (the same function its admin API uses), so this package never calls up into it.

    A second thread heals blobs on its own: when `quarantine/` holds a blob (verify-on-read put
    it there), it runs the server's `anvil.heal_blobs` from this repository, as
    `anvil repair blobs --from-backup` would. `ANVIL_HEAL_POLL` (default 30s; 0 = off) is how
    often it looks."""

    def __init__(self, app: Any, config: ScheduleConfig, run_backup: Callable[..., Any]):
        self.app = app
        self.config = config
        self.run_backup = run_backup
        # Many nodes (docs/scale-out.md): the runtime's lease runner, so one node takes them at a time.
        self.guard: Callable[[Callable[[], Any]], Any] = lambda fn: fn()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anvil-backup-schedule", daemon=True)
        self.heal_poll = env_seconds(HEAL_POLL_ENV, HEAL_POLL)
        self._healer = threading.Thread(target=self._heal_loop, name="anvil-auto-heal", daemon=True)

    def start(self) -> None:
        self.app.state.backup_schedule = {"repository": self.config.repo, "every_seconds": self.config.every,
                                          "next": time.time() + self.config.every}
        self._thread.start()
        if self.heal_poll > 0:
            self._healer.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._healer.is_alive():
            self._healer.join(timeout=5)

    def _heal_loop(self) -> None:
        anvil = self.app.state.anvil
        tried: set[str] = set()
        tried_after: Any = None  # the newest snapshot when `tried` was attempted
        while not self._stop.wait(self.heal_poll):
            names = set(anvil.storage.blobs.quarantined())
            newest = (getattr(self.app.state, "last_backup", None) or {}).get("snapshot")
            # An unrecoverable blob is retried only once a new snapshot exists, not every poll.
            if not names or self.app.state.recovery_mode or (names <= tried and newest == tried_after):
                continue
            tried, tried_after = set(names), newest
            try:
                report = self.heal_once()
                log.warning("auto-heal: %d quarantined blob(s); healed %d, unrecoverable %d",
                            len(names), report["healed_count"], len(report["unrecoverable"]))
            except Exception:  # noqa: BLE001 - reported; the next poll tries again
                tried = set()
                log.exception("auto-heal from %s failed", self.config.repo)

    def heal_once(self) -> dict[str, Any]:
        """One heal of every missing blob from the scheduled repository, as the system."""
        from anvil.backup.ops import open_repo
        from anvil.context import RequestContext

        anvil = self.app.state.anvil
        repo = open_repo(self.config.repo, passphrase=self.config.passphrase, s3_endpoint=self.config.s3_endpoint,
                         storage_path=anvil.storage.root)
        return anvil.heal_blobs(RequestContext(AUTO_HEAL_PRINCIPAL), repo)

    def _run(self) -> None:
        while not self._stop.wait(self.config.every):
            if self.app.state.recovery_mode:
                self.app.state.last_backup = {"time": time.time(), "ok": False, "skipped": "recovery mode"}
            else:
                try:
                    self.guard(lambda: self.run_backup(self.app, self.config.repo, passphrase=self.config.passphrase,
                                                       s3_endpoint=self.config.s3_endpoint, mode="scheduled"))
                    log.info("scheduled backup: %s", self.app.state.last_backup)
                except Exception:  # noqa: BLE001 - a failed backup is reported, never kills the server
                    log.exception("scheduled backup failed")
            self.app.state.backup_schedule["next"] = time.time() + self.config.every


def check_schedule(config: ScheduleConfig, storage_root: Any) -> None:
    """Fail at start, not an hour later: the repository must exist and accept the passphrase."""
    from anvil.backup.ops import open_repo

    try:
        open_repo(config.repo, passphrase=config.passphrase, s3_endpoint=config.s3_endpoint,
                  storage_path=storage_root)
    except BackupError as e:
        raise ValueError(f"--backup-repo: {e}") from None
