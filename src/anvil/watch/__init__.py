"""Watch streams: durable, scoped, resumable change feeds over the journal."""

from anvil.watch.events import KINDS, KindFilter, ReadFilter, Scope, WatchEvent, make_scope, parse_cursor, parse_kinds
from anvil.watch.participant import summary, validate
from anvil.watch.service import Heartbeat, StreamError, WatchService, WatchSettings

__all__ = [
    "KINDS", "Heartbeat", "KindFilter", "ReadFilter", "Scope", "StreamError", "WatchEvent", "WatchService",
    "WatchSettings", "make_scope", "parse_cursor", "parse_kinds", "summary", "validate",
]
