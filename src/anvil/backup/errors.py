"""The one exception type of the backup subsystem."""

from __future__ import annotations


class BackupError(Exception):
    """A backup/restore failure with a message precise enough to act on."""
