"""Relationship-based authorisation (Zanzibar, SpiceDB-compatible): schemas, relationships,
caveats, check / lookup / expand with consistency tokens. See docs/authz.md."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anvil.authz.service import AuthzService

# Loaded on first use (PEP 562): importing one submodule (a participant, for `anvil fsck`) must
# not import the whole subsystem through this __init__.
_WHERE = {
    **dict.fromkeys(["AuthzService"], "service"),
}

__all__ = ["AuthzService"]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{where}"), name)
