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
            raw = Path(key_file).read_bytes()
        except OSError as e:
            raise BackupError(f"cannot read key file {key_file}: {e.strerror}") from None
        source = f"key file {key_file}"
        try:
            value = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise BackupError(_not_text(source)) from None
    else:
        source = env
        value = os.environ.get(env, "")
    if not value:
        raise BackupError(f"no passphrase: set {env} or pass --key-file")
    try:
        # The passphrase is used as UTF-8 bytes (argon2, the key cache): bytes that are not UTF-8
        # (os.environ keeps them as surrogates) failed there with a traceback, after the command began.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BackupError(_not_text(source)) from None
    return value


def _not_text(source: str) -> str:
    return (f"the passphrase in {source} is not UTF-8 text; use a text passphrase (e.g. the base64 "
            "of random bytes: head -c 32 /dev/urandom | base64)")
