"""JSON text from outside Anvil, decoded strictly: request bodies, tokens and cursors handed back by
clients, caveat contexts inside relationships, object bodies an index reads.

`json.loads` takes more than JSON is: NaN and Infinity (which pass every `x < 0` check), numbers like
1e400 (which become infinity), nesting as deep as the stack allows (RecursionError, which is no
ValueError), and `\\ud800` escapes, which become lone surrogates: strings no UTF-8 encoder takes, so
they failed later, deep in SQLite, the journal, tantivy or a hash, as a UnicodeEncodeError. Each of
those became a 500 somewhere. `loads` refuses them all with `JsonTextError`, a ValueError, so code that
already catches ValueError for malformed text refuses these the same way.

Imports nothing of Anvil: any layer uses it (like `anvil.frozen`).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MALFORMED = "malformed"
TOO_DEEP = "too_deep"
NOT_UNICODE = "not_unicode"


class JsonTextError(ValueError):
    """JSON text refused; `reason` is MALFORMED, TOO_DEEP or NOT_UNICODE."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _non_finite(name: str) -> float:
    raise JsonTextError(MALFORMED, f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise JsonTextError(MALFORMED, "number out of range")
    return value


# A `\uD800`-`\uDFFF` escape. Only text holding one can decode to a lone surrogate, so only such text
# is walked to look for one (a pair, `\ud83d\ude00`, decodes to one character and passes).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


def has_lone_surrogate(value: Any) -> bool:
    """Whether a decoded value holds a string (or object key) that is not valid Unicode."""
    stack = [value]  # iterative: the value may be nested as deep as the decoder allowed
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def may_hold_surrogate(text: str | bytes) -> bool:
    """Cheap pre-check: False means the text cannot decode to a lone surrogate."""
    if isinstance(text, bytes):
        return _SURROGATE_ESCAPE_BYTES.search(text) is not None
    return _SURROGATE_ESCAPE.search(text) is not None


def _check_unicode(text: str | bytes, value: Any) -> None:
    if may_hold_surrogate(text) and has_lone_surrogate(value):
        raise JsonTextError(NOT_UNICODE, "a string is not valid Unicode (an unpaired surrogate escape such as \\ud800)")


def loads(text: str | bytes) -> Any:
    """Strict `json.loads`: JsonTextError (a ValueError) for anything but finite, Unicode JSON."""
    try:
        value = json.loads(text, parse_constant=_non_finite, parse_float=_finite_float)
    except JsonTextError:
        raise
    except RecursionError:
        raise JsonTextError(TOO_DEEP, "nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError included
        raise JsonTextError(MALFORMED, getattr(e, "msg", None) or str(e)) from None
    _check_unicode(text, value)
    return value


_DECODER = json.JSONDecoder(parse_constant=_non_finite, parse_float=_finite_float)


def raw_decode(text: str, pos: int = 0) -> tuple[Any, int]:
    """Strict `JSONDecoder().raw_decode`: one JSON value starting at `pos`, and where it ends."""
    try:
        value, end = _DECODER.raw_decode(text, pos)
    except JsonTextError:
        raise
    except RecursionError:
        raise JsonTextError(TOO_DEEP, "nested too deeply") from None
    except ValueError as e:
        raise JsonTextError(MALFORMED, getattr(e, "msg", None) or str(e)) from None
    _check_unicode(text[pos:end], value)
    return value, end
