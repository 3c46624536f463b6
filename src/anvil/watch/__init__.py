"""Watch streams: durable, scoped, resumable change feeds over the journal."""

from anvil.watch.consumers import durable_cursors
from anvil.watch.events import KINDS, KindFilter, ReadFilter, Scope, WatchEvent, make_scope, parse_cursor, parse_kinds
from anvil.watch.recovery import summary, validate
from anvil.watch.service import Heartbeat, StreamError, WatchService, WatchSettings

__all__ = [
    "durable_cursors",
    "KINDS", "Heartbeat", "KindFilter", "ReadFilter", "Scope", "StreamError", "WatchEvent", "WatchService",
    "WatchSettings", "make_scope", "parse_cursor", "parse_kinds", "summary", "validate",
]
