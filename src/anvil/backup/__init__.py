"""Backup, restore, validation, recovery mode and the restore drill (DESIGN §5)."""
