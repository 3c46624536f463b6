"""Credential profiles (`anvil configure`) and how a command finds its endpoint and credentials.

Order: an explicit --storage-path (admin commands: the first admin's credential) > --client-id /
--client-secret or ANVIL_CLIENT_ID / ANVIL_CLIENT_SECRET > the profile (--profile, ANVIL_PROFILE,
else `default` if saved). Profiles live in $XDG_CONFIG_HOME/anvil/profiles.json (else
~/.config/anvil/profiles.json), mode 0600, because they hold client secrets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from anvil import DEFAULT_ENDPOINT


class ProfileError(Exception):
    pass


@dataclass(frozen=True)
class Credentials:
    endpoint: str
    client_id: str | None
    client_secret: str | None


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "anvil"


def profiles_path() -> Path:
    return config_dir() / "profiles.json"


def load_profiles() -> dict[str, dict[str, str]]:
    path = profiles_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise ProfileError(f"{path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path} is malformed")
    return data


def save_profile(name: str, values: dict[str, str]) -> Path:
    if not name or any(c.isspace() for c in name):
        raise ProfileError("a profile name must be non-empty without spaces")
    profiles = load_profiles()
    profiles[name] = {**profiles.get(name, {}), **{k: v for k, v in values.items() if v}}
    path = profiles_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(profiles, indent=2) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def read_first_admin(storage_path: str) -> dict[str, str]:
    path = Path(storage_path) / "bootstrap" / "first-admin.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path} does not exist (has the server started once on this storage path?)") from None
    except PermissionError:
        raise ProfileError(f"{path} is not readable by this user") from None
    except ValueError:
        raise ProfileError(f"{path} is not valid JSON") from None


def resolve_credentials(*, endpoint: str | None, profile: str | None, client_id: str | None,
                        client_secret: str | None, storage_path: str | None = None) -> Credentials:
    profiles = load_profiles()
    if profile is not None and profile not in profiles:
        raise ProfileError(f"no profile named {profile!r} (create it with `anvil configure --profile {profile}`)")
    prof = profiles.get(profile or "default", {})
    hint = None
    if storage_path:
        admin = read_first_admin(storage_path)
        client_id, client_secret, hint = admin.get("client_id"), admin.get("client_secret"), admin.get("endpoint")
    elif not client_id:
        client_id, client_secret = prof.get("client_id"), prof.get("client_secret")
    if client_id and not client_secret:
        raise ProfileError("a client id needs its client secret (--client-secret or ANVIL_CLIENT_SECRET)")
    return Credentials(endpoint or prof.get("endpoint") or hint or DEFAULT_ENDPOINT, client_id, client_secret)
