"""Compact JSON of many small values, the same text `json.JSONEncoder(separators=(",", ":")).encode`
gives, without its per-call cost.

`JSONEncoder.encode` builds a new C encoder (`c_make_encoder`) at every call: ~1 µs of a 2.7 µs
call for a row of ten fields, and backup summaries and tree entries encode one or two such rows
per object version or blob. One C encoder, made once, writes the same text. Without the C
accelerator (another Python), `JSONEncoder.encode` itself is returned.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json import encoder as _encoder
from typing import Any


def compact(*, ensure_ascii: bool = True) -> Callable[[Any], str]:
    """A function writing `obj` as `json.JSONEncoder(separators=(",", ":"), ensure_ascii=...)` does.
    No check for circular structures: for rows of plain values (lists, dicts, str, int, None)."""
    return encoder(separators=(",", ":"), ensure_ascii=ensure_ascii)


def encoder(*, sort_keys: bool = False, separators: tuple[str, str] = (", ", ": "),
            ensure_ascii: bool = True, allow_nan: bool = True) -> Callable[[Any], str]:
    """A function writing `obj` as `json.JSONEncoder(sort_keys=..., separators=..., ensure_ascii=...,
    allow_nan=...).encode` does, byte for byte (and refusing what it refuses), with one C encoder made
    once. No check for circular structures: for values of plain data (lists, dicts, str, int, float,
    None, bools)."""
    slow = json.JSONEncoder(sort_keys=sort_keys, separators=separators, ensure_ascii=ensure_ascii,
                            allow_nan=allow_nan)
    make = getattr(_encoder, "c_make_encoder", None)
    if make is None:
        return slow.encode
    basestring = _encoder.encode_basestring_ascii if ensure_ascii else _encoder.encode_basestring
    item_sep, key_sep = separators
    try:
        fast = make(None, slow.default, basestring, None, key_sep, item_sep, sort_keys, False, allow_nan)
    except TypeError:  # another signature: keep the documented path
        return slow.encode
    join = "".join

    def encode(obj: Any) -> str:
        if isinstance(obj, str):
            return basestring(obj)  # (what `encode` does for a bare string)
        return join(fast(obj, 0))

    probe = ["a\"\\\n\u00e9\u2028", 1, -2.5, 1e300, None, True, False, {"k": [1, "x"], "b": {"z": 1, "a": []}}]
    return encode if encode(probe) == slow.encode(probe) else slow.encode
