"""Filters on declared fields: parsed and type-checked once, then evaluated per document.

Syntax (JSON):

    {"field": F, "op": "eq"|"ne"|"lt"|"lte"|"gt"|"gte"|"in"|"exists"|"prefix", "value": V}
    {"and": [FILTER, ...]}   {"or": [FILTER, ...]}   {"not": FILTER}

`key` is always filterable (a keyword). Ranges work on numbers, dates (numbers or ISO 8601)
and strings; `prefix` on keyword and text fields; `in` takes a list of at most 1024 values.
The same compiled predicate serves every query kind and the drill's exhaustive evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from anvil.errors import AnvilError
from anvil.indexes.extract import coerce

OPS = ("eq", "ne", "lt", "lte", "gt", "gte", "in", "exists", "prefix")
MAX_NODES = 256
MAX_IN = 1024

Predicate = Callable[[dict[str, Any]], bool]


def _bad(message: str) -> AnvilError:
    return AnvilError("InvalidArgument", f"invalid filter: {message}")


def field_types(definition: dict[str, Any]) -> dict[str, str]:
    types = {n: f["type"] for n, f in definition["fields"].items() if f["type"] != "vector"}
    types.setdefault("key", "keyword")
    return types


def compile_filter(spec: Any, definition: dict[str, Any]) -> Predicate:
    types = field_types(definition)
    count = [0]

    def build(node: Any) -> Predicate:
        count[0] += 1
        if count[0] > MAX_NODES:
            raise _bad(f"more than {MAX_NODES} nodes")
        if not isinstance(node, dict):
            raise _bad("each node is an object")
        if "and" in node or "or" in node:
            op = "and" if "and" in node else "or"
            if set(node) != {op} or not isinstance(node[op], list) or not node[op]:
                raise _bad(f"{op!r} takes a non-empty list and nothing else")
            parts = [build(n) for n in node[op]]
            if op == "and":
                return lambda d: all(p(d) for p in parts)
            return lambda d: any(p(d) for p in parts)
        if "not" in node:
            if set(node) != {"not"}:
                raise _bad("'not' takes one filter and nothing else")
            inner = build(node["not"])
            return lambda d: not inner(d)
        if set(node) - {"field", "op", "value"}:
            raise _bad(f"unknown member {sorted(set(node) - {'field', 'op', 'value'})[0][:64]!r}")
        name = node.get("field")
        if not isinstance(name, str):
            raise _bad("a comparison names a field")
        if name not in types:
            if name in definition["fields"]:
                raise _bad(f"field {name!r} is a vector and cannot be filtered")
            raise AnvilError("InvalidArgument", f"unknown field {name[:64]!r} in filter: the index declares "
                                                f"{', '.join(sorted(types))}")
        ftype = types[name]
        op = node.get("op", "eq")
        if op not in OPS:
            raise _bad(f"op must be one of {', '.join(OPS)}")
        if op == "exists":
            return lambda d: name in d
        if "value" not in node:
            raise _bad(f"op {op} needs a value")
        value = node["value"]
        if op == "prefix":
            if ftype not in ("keyword", "text") or not isinstance(value, str):
                raise _bad("prefix takes a string on a keyword or text field")
            return lambda d: isinstance(d.get(name), str) and d[name].startswith(value)
        if op == "in":
            if not isinstance(value, list) or len(value) > MAX_IN:
                raise _bad(f"'in' takes a list of at most {MAX_IN} values")
            wanted = {_value(ftype, v, name) for v in value}
            return lambda d: name in d and d[name] in wanted
        v = _value(ftype, value, name)
        if op in ("lt", "lte", "gt", "gte") and ftype == "bool":
            raise _bad("ranges need numbers, dates or strings")
        if op == "eq":
            return lambda d: name in d and d[name] == v
        if op == "ne":
            return lambda d: name in d and d[name] != v
        if op == "lt":
            return lambda d: name in d and d[name] < v
        if op == "lte":
            return lambda d: name in d and d[name] <= v
        if op == "gt":
            return lambda d: name in d and d[name] > v
        return lambda d: name in d and d[name] >= v

    return build(spec)


def _value(ftype: str, value: Any, name: str) -> Any:
    try:
        return coerce(ftype, value)
    except (ValueError, TypeError, OverflowError) as e:
        raise _bad(f"value for {name!r} must be {ftype}: {str(e)[:100]}") from None


def sort_key(definition: dict[str, Any], spec: Any) -> tuple[str, bool] | None:
    """`score` (default) or {"field": F, "order": "asc"|"desc"} -> (field, descending), None for score."""
    if spec is None or spec == "score":
        return None
    if not isinstance(spec, dict) or set(spec) - {"field", "order"}:
        raise AnvilError("InvalidArgument", "sort is \"score\" or {field, order}")
    types = field_types(definition)
    name = spec.get("field")
    if name not in types:
        raise AnvilError("InvalidArgument", f"unknown field {str(name)[:64]!r} in sort")
    order = spec.get("order", "asc")
    if order not in ("asc", "desc"):
        raise AnvilError("InvalidArgument", "sort order is asc or desc")
    return name, order == "desc"


def narrowing(spec: Any, definition: dict[str, Any]) -> list[tuple[str, set[Any]]]:
    """Equality constraints every match must meet: the filter itself if it is `eq`/`in`, or those
    members of a top-level `and`. Each is (field, allowed values); an engine intersects its value
    postings for them to get a candidate set, then applies the full predicate to the candidates
    only. Call after `compile_filter` accepted `spec` (values are already known to coerce)."""
    types = field_types(definition)
    nodes = spec["and"] if isinstance(spec, dict) and set(spec) == {"and"} else [spec]
    out = []
    for node in nodes:
        if not isinstance(node, dict) or set(node) - {"field", "op", "value"} or node.get("field") not in types:
            continue
        ftype = types[node["field"]]
        if ftype in ("text", "float", "date"):
            continue  # postings are kept for exact-valued fields only
        op = node.get("op", "eq")
        if op == "eq":
            out.append((node["field"], {coerce(ftype, node["value"])}))
        elif op == "in":
            out.append((node["field"], {coerce(ftype, v) for v in node["value"]}))
    return out
