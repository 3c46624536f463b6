"""Backup, restore, validation, recovery mode and the restore drill (docs/backup.md)."""
