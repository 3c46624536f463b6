"""Watch streams: durable, scoped, resumable change feeds over the journal."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anvil.watch.events import (
        KINDS,
        KindFilter,
        ReadFilter,
        Scope,
        WatchEvent,
        make_scope,
        parse_cursor,
        parse_kinds,
    )
    from anvil.watch.participant import summary, validate
    from anvil.watch.service import Heartbeat, StreamError, WatchService, WatchSettings

# Loaded on first use (PEP 562): importing one submodule (a participant, for `anvil fsck`) must
# not import the whole subsystem through this __init__.
_WHERE = {
    **dict.fromkeys(["KINDS", "KindFilter", "ReadFilter", "Scope", "WatchEvent", "make_scope", "parse_cursor",
                     "parse_kinds"], "events"),
    **dict.fromkeys(["summary", "validate"], "participant"),
    **dict.fromkeys(["Heartbeat", "StreamError", "WatchService", "WatchSettings"], "service"),
}

__all__ = [
    "KINDS", "Heartbeat", "KindFilter", "ReadFilter", "Scope", "StreamError", "WatchEvent", "WatchService",
    "WatchSettings", "make_scope", "parse_cursor", "parse_kinds", "summary", "validate",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{where}"), name)
