"""Reading the repository passphrase: stdlib only, so `anvil backup create --endpoint` (which only
hands the passphrase to the server) loads no cryptography at all."""

from __future__ import annotations

import os
from pathlib import Path

from anvil.backup.errors import BackupError

PASSPHRASE_ENV = "ANVIL_BACKUP_PASSPHRASE"


def read_passphrase(key_file: str | None = None, env: str = PASSPHRASE_ENV) -> str:
    if key_file:
        try:
            value = Path(key_file).read_text().rstrip("\r\n")
        except OSError as e:
            raise BackupError(f"cannot read key file {key_file}: {e.strerror}") from None
    else:
        value = os.environ.get(env, "")
    if not value:
        raise BackupError(f"no passphrase: set {env} or pass --key-file")
    return value
