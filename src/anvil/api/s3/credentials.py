"""The development S3 credential: one access key and secret generated once per STORAGE_PATH.

Identity replaces this lookup with applications (access key = client_id, secret = client_secret).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import sys
from pathlib import Path

from anvil.api.s3.auth import CredentialLookup
from anvil.context import DEV_PRINCIPAL, Principal
from anvil.storage.layout import write_file_durably

log = logging.getLogger("anvil.s3")

DEV_FILE = "s3-dev.json"


def load_or_create_dev_credentials(secrets_dir: Path) -> dict[str, str]:
    path = Path(secrets_dir) / DEV_FILE
    if path.exists():
        return json.loads(path.read_text())
    alphabet = string.ascii_uppercase + string.digits
    creds = {
        "access_key_id": "AKANVILDEV" + "".join(secrets.choice(alphabet) for _ in range(10)),
        "secret_access_key": secrets.token_urlsafe(30),
    }
    write_file_durably(path, json.dumps(creds, indent=2).encode(), mode=0o600)
    os.chmod(path, 0o600)
    return creds


def dev_credential_lookup(secrets_dir: Path, principal: Principal = DEV_PRINCIPAL) -> CredentialLookup:
    creds = load_or_create_dev_credentials(secrets_dir)
    message = (f"WARNING: the S3 gateway accepts the DEVELOPMENT access key {creds['access_key_id']} "
               f"(secret in {Path(secrets_dir) / DEV_FILE}) as an administrator. Never use this in production.")
    log.warning(message)
    print(message, file=sys.stderr, flush=True)
    access_key, secret = creds["access_key_id"], creds["secret_access_key"]

    def lookup(access_key_id: str) -> tuple[str, Principal] | None:
        return (secret, principal) if access_key_id == access_key else None

    return lookup
