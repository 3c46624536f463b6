"""A Starlette request whose header lookups and query parsing cost one pass each.

Starlette's `Headers.get` re-encodes the name and scans every raw header on each lookup; a small GET
looks up seven or eight headers (authorization, idempotency-key, the four conditions, range), an S3
request more. Here the first lookup builds a dict of the request's headers, and every other lookup
is one dict access. Same answers as Starlette's: names are matched case-insensitively and the first
of repeated headers wins (`getlist`, `raw`, `items` are Starlette's own, unchanged).
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request


class FastHeaders(Headers):
    """Request headers with dict lookups (read-only: request headers are never changed), decoded once:
    `items()` (metadata, checksum headers, the SigV4 canonical headers each walk them) reuses it."""

    def __init__(self, scope: Any) -> None:
        raw = scope["headers"]
        if type(raw) is not list:  # as Starlette's Headers(scope=...) does
            raw = scope["headers"] = list(raw)
        self._list = raw
        self._items = [(k.decode("latin-1"), val.decode("latin-1")) for k, val in raw]
        # Reversed so that, of repeated headers, the first one is kept, as Headers.__getitem__ does.
        self._map = dict(reversed(self._items))
        self._amz: list[tuple[str, str]] | None = None

    def __getitem__(self, key: str) -> str:
        return self._map[key.lower()]

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return self._map.get(key.lower(), default)

    def __contains__(self, key: Any) -> bool:
        return isinstance(key, str) and key.lower() in self._map

    def items(self) -> list[tuple[str, str]]:  # type: ignore[override]
        return list(self._items)

    def keys(self) -> list[str]:  # type: ignore[override]
        return [k for k, _ in self._items]

    def values(self) -> list[str]:  # type: ignore[override]
        return [val for _, val in self._items]

    def amz_items(self) -> list[tuple[str, str]]:
        """The `x-amz-*` headers, in arrival order, found once: the signature check, the checksum headers
        and the user metadata each look through them (a handful out of every request's dozen)."""
        amz = self._amz
        if amz is None:
            amz = self._amz = [(k, val) for k, val in self._items if k.startswith("x-amz-")]
        return amz


def amz_items(headers: Headers) -> list[tuple[str, str]]:
    """The `x-amz-*` (name, value) pairs of any request's headers, names lower-case."""
    if type(headers) is FastHeaders:
        return headers.amz_items()
    return [(k, val) for k, val in headers.items() if k.startswith("x-amz-")]


class FastRequest(Request):
    """`Request` with `FastHeaders`; the app builds one per request on its direct paths."""

    @property
    def headers(self) -> Headers:
        h = self.__dict__.get("_headers")
        if h is None:
            h = self._headers = FastHeaders(self.scope)
        return h


# The parsed query of a native request, kept in its scope so it is parsed once (api/native.py).
QUERY_KEY = "anvil.query"
