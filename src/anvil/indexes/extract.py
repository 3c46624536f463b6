"""Field extraction: one object version -> the values of an index's declared fields.

Problems (a body that is not UTF-8, JSON that does not decode, a vector of the wrong
dimension, a value of the wrong type) become diagnostics with codes: the write that stored
the object has long succeeded and is never failed by an index.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from anvil import jsontext

MAX_BODY = 8 * 1024 * 1024  # bodies larger than this are not read for indexing
# Vectors are kept and searched as float32: a component finite as a double but beyond this becomes inf,
# then NaN once normalised, and such a vector is silently never found (or, as a query, finds nothing).
FLOAT32_MAX = 3.4028234663852886e38


def finite_float32(x: float) -> bool:
    try:
        return math.isfinite(x) and abs(x) <= FLOAT32_MAX
    except OverflowError:  # an integer too large for a double
        return False


class Source:
    """What extraction sees of one object version; the body is read only if a field needs it."""

    def __init__(self, key: str, version_id: str, size: int, content_type: str, metadata: dict[str, str],
                 created: float, read_body: Callable[[], bytes]):
        self.key = key
        self.version_id = version_id
        self.size = size
        self.content_type = content_type
        self.metadata = metadata
        self.created = created
        self._read_body = read_body
        self._body: bytes | None = None
        self._text: str | None = None
        self._json: Any = None
        self._json_done = False

    def body(self) -> bytes:
        if self._body is None:
            self._body = self._read_body()
        return self._body


class Problem(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _text(src: Source) -> str:
    if src._text is None:
        if src.size > MAX_BODY:
            raise Problem("index.body_too_large", f"body of {src.size} bytes is over the {MAX_BODY}-byte limit")
        try:
            src._text = src.body().decode("utf-8")
        except UnicodeDecodeError as e:
            raise Problem("index.body_not_utf8", f"body is not UTF-8 (byte {e.start})") from None
    return src._text


def _json(src: Source) -> Any:
    if not src._json_done:
        text = _text(src)
        try:
            value = json.loads(text)
        except RecursionError:
            raise Problem("index.json_invalid", "body is not JSON: nested too deeply") from None
        except ValueError as e:
            raise Problem("index.json_invalid", f"body is not JSON: {str(e)[:120]}") from None
        # A "\ud800" escape decodes to a lone surrogate that tantivy cannot take: the builder failed on
        # the batch and retried it for ever, so one such object stopped the index (every later write
        # to the bucket stayed unsearchable). It is refused here, as a diagnostic of that object.
        if jsontext.may_hold_surrogate(text) and jsontext.has_lone_surrogate(value):
            raise Problem("index.json_invalid", "body is not JSON: a string is not valid Unicode "
                                                "(an unpaired surrogate escape such as \\ud800)")
        src._json = value
        src._json_done = True
    return src._json


_MISSING = object()


def _pointer(doc: Any, pointer: str) -> Any:
    if pointer == "":
        return doc
    cur = doc
    for raw in pointer[1:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(cur, dict):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        elif isinstance(cur, list):
            if not part.isdigit() or int(part) >= len(cur):
                return _MISSING
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def parse_date(value: Any) -> float:
    """Seconds since the epoch from a number or an ISO 8601 string (naive = UTC)."""
    if isinstance(value, bool):
        raise ValueError("a date is a number or an ISO 8601 string")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError("a date must be finite")
        return float(value)
    if isinstance(value, str):
        d = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if d.tzinfo is None:
            d = d.replace(tzinfo=UTC)
        return d.timestamp()
    raise ValueError("a date is a number or an ISO 8601 string")


def coerce(ftype: str, value: Any, *, dimension: int | None = None) -> Any:
    """A raw value -> the field's type (ValueError with a reason if it cannot be)."""
    if ftype in ("keyword", "text"):
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError(f"a {ftype} is a string")
        return value if isinstance(value, str) else json.dumps(value)
    if ftype == "integer":
        if isinstance(value, bool):
            raise ValueError("an integer, not a boolean")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            value = int(value.strip())
        if not isinstance(value, int) or not -(2 ** 63) <= value < 2 ** 63:
            raise ValueError("a 64-bit integer")
        return value
    if ftype == "float":
        if isinstance(value, bool):
            raise ValueError("a number, not a boolean")
        v = float(value)
        if not math.isfinite(v):
            raise ValueError("a finite number")
        return v
    if ftype == "date":
        return parse_date(value)
    if ftype == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError("true or false")
    if ftype == "vector":
        if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  for x in value):
            raise ValueError("a vector is a JSON array of numbers")
        if len(value) != dimension:
            raise Problem("index.vector_dimension", f"vector has {len(value)} dimensions, the index {dimension}")
        if not all(finite_float32(x) for x in value):
            raise ValueError(f"a vector of finite numbers within float32 (|x| <= {FLOAT32_MAX:.7g})")
        return [float(x) for x in value]
    raise ValueError(f"unknown type {ftype}")


def extract(definition: dict[str, Any], src: Source) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The declared fields' values (absent ones omitted) and the problems met on the way."""
    values: dict[str, Any] = {}
    problems: list[dict[str, str]] = []
    for name, f in definition["fields"].items():
        source = f["source"]
        try:
            if source == "body":
                raw: Any = _text(src)
            elif source == "key":
                raw = src.key
            elif source == "content_type":
                raw = src.content_type
            elif source == "size":
                raw = src.size
            elif source == "last_modified":
                raw = src.created
            elif source.startswith("metadata:"):
                raw = src.metadata.get(source[len("metadata:"):].lower(), _MISSING)
            else:
                raw = _pointer(_json(src), source[len("json:"):])
            if raw is _MISSING or raw is None:
                continue
            values[name] = coerce(f["type"], raw, dimension=f.get("dimension"))
        except Problem as p:
            problems.append({"field": name, "code": p.code, "message": p.message})
        except (ValueError, TypeError, OverflowError) as e:
            problems.append({"field": name, "code": "index.field_type",
                             "message": f"field {name}: expected {f['type']}: {str(e)[:120]}"})
    return values, problems
