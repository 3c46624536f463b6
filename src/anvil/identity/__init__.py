"""Identity and access: tenants, applications, secret envelopes, tokens, scopes, the gate."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anvil.identity.gate import BucketAccess, authorize, install_bucket_lookup
    from anvil.identity.participant import summary, validate
    from anvil.identity.service import IdentityService

# Loaded on first use (PEP 562): importing one submodule (a participant, for `anvil fsck`) must
# not import the whole subsystem through this __init__.
_WHERE = {
    **dict.fromkeys(["BucketAccess", "authorize", "install_bucket_lookup"], "gate"),
    **dict.fromkeys(["summary", "validate"], "participant"),
    **dict.fromkeys(["IdentityService"], "service"),
}

__all__ = ["BucketAccess", "IdentityService", "authorize", "install_bucket_lookup", "summary", "validate"]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{where}"), name)
