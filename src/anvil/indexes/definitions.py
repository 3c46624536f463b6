"""Index definitions: validation and normalisation (pure functions, no storage).

A definition is source state: what to index and how. Everything derived from it (generations,
tantivy segments, the HNSW graph) is rebuilt from the definition plus the restored objects.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from anvil.errors import AnvilError

KINDS = ("metadata", "full-text", "vector", "hybrid")
FIELD_TYPES = ("keyword", "text", "integer", "float", "date", "bool", "vector")
AUTH_MODES = ("inherit_object", "index_only", "public")
METRICS = ("cosine", "dot", "l2")
# `simple` is tantivy's default tokenizer (split + lowercase); the others add a Snowball stemmer.
STEMMERS = ("arabic", "danish", "dutch", "english", "finnish", "french", "german", "greek", "hungarian",
            "italian", "norwegian", "portuguese", "romanian", "russian", "spanish", "swedish", "tamil",
            "turkish")
ANALYZERS = ("simple", *STEMMERS)
PLAIN_SOURCES = ("body", "key", "content_type", "size", "last_modified")
RESERVED_FIELDS = frozenset({"bucket", "key", "version", "score"})

MAX_FIELDS = 64
MAX_DIMENSION = 4096
MAX_CONTENT_TYPES = 32
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
FIELD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
TOP_KEYS = {"name", "kind", "selector", "fields", "authorization", "build", "vector", "full_text"}


def invalid(message: str) -> AnvilError:
    return AnvilError("InvalidArgument", f"invalid index definition: {message}")


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise AnvilError("InvalidArgument", "an index name is 1-63 characters of a-z, 0-9, '_' and '-', "
                                            "starting with a letter or digit")
    return name


def _check_source(name: str, source: Any, ftype: str) -> str:
    if not isinstance(source, str) or not source:
        raise invalid(f"field {name!r}: source must be a string")
    if source in PLAIN_SOURCES:
        pass
    elif source.startswith("metadata:"):
        if not source[len("metadata:"):]:
            raise invalid(f"field {name!r}: metadata source needs a key, e.g. metadata:title")
    elif source.startswith("json:"):
        pointer = source[len("json:"):]
        if pointer and not pointer.startswith("/"):
            raise invalid(f"field {name!r}: a JSON pointer starts with '/', e.g. json:/title")
    else:
        raise invalid(f"field {name!r}: unknown source {source[:64]!r} (metadata:KEY, json:/POINTER, "
                      f"{', '.join(PLAIN_SOURCES)})")
    natural = {"size": ("integer", "float", "keyword"), "last_modified": ("date", "float", "integer"),
               "key": ("keyword", "text"), "content_type": ("keyword", "text")}.get(source)
    if natural and ftype not in natural:
        raise invalid(f"field {name!r}: source {source} cannot be of type {ftype}")
    if ftype == "vector" and not source.startswith("json:"):
        raise invalid(f"field {name!r}: a vector comes from a JSON array (json:/POINTER)")
    return source


def normalise(body: Any, *, name: str | None = None) -> dict[str, Any]:
    """Check a definition and fill its defaults; raise InvalidArgument naming the first problem."""
    if not isinstance(body, dict):
        raise invalid("the definition is a JSON object")
    unknown = sorted(set(body) - TOP_KEYS)
    if unknown:
        raise invalid(f"unknown member {unknown[0][:64]!r}")
    name = check_name(name if name is not None else body.get("name"))
    if body.get("name") not in (None, name):
        raise invalid("the name in the body differs from the name in the path")
    kind = body.get("kind")
    if kind not in KINDS:
        raise invalid(f"kind must be one of {', '.join(KINDS)}")
    sel = body.get("selector") or {}
    if not isinstance(sel, dict) or set(sel) - {"prefix", "content_types"}:
        raise invalid("selector is {prefix, content_types}")
    prefix = sel.get("prefix", "")
    if not isinstance(prefix, str) or len(prefix) > 1024:
        raise invalid("selector.prefix must be a string of at most 1024 characters")
    if prefix.startswith("_anvil/"):
        raise AnvilError("UnauthorizedReservedNamespace", "keys under '_anvil/' are never indexed")
    cts = sel.get("content_types") or []
    if (not isinstance(cts, list) or len(cts) > MAX_CONTENT_TYPES
            or not all(isinstance(c, str) and c and "/" in c for c in cts)):
        raise invalid("selector.content_types is a list of media types such as text/plain or text/*")
    fields = body.get("fields")
    if not isinstance(fields, dict) or not fields:
        raise invalid("fields must be a non-empty object of NAME -> {source, type}")
    if len(fields) > MAX_FIELDS:
        raise invalid(f"at most {MAX_FIELDS} fields")
    out_fields: dict[str, dict[str, Any]] = {}
    for fname, spec in fields.items():
        if not isinstance(fname, str) or not FIELD_RE.match(fname) or fname in RESERVED_FIELDS:
            raise invalid(f"field name {str(fname)[:64]!r}: letters, digits and '_', starting with a letter, "
                          f"not one of {', '.join(sorted(RESERVED_FIELDS))}")
        if not isinstance(spec, dict) or set(spec) - {"source", "type", "dimension", "boost"}:
            raise invalid(f"field {fname!r} is {{source, type[, dimension][, boost]}}")
        ftype = spec.get("type")
        if ftype not in FIELD_TYPES:
            raise invalid(f"field {fname!r}: type must be one of {', '.join(FIELD_TYPES)}")
        f: dict[str, Any] = {"source": _check_source(fname, spec.get("source"), ftype), "type": ftype}
        if ftype == "vector":
            dim = spec.get("dimension")
            if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIMENSION:
                raise invalid(f"field {fname!r}: a vector needs a dimension between 1 and {MAX_DIMENSION}")
            f["dimension"] = dim
        elif "dimension" in spec:
            raise invalid(f"field {fname!r}: only vectors have a dimension")
        if "boost" in spec:
            boost = spec["boost"]
            if (ftype != "text" or isinstance(boost, bool) or not isinstance(boost, (int, float))
                    or not 0 < boost <= 100):
                raise invalid(f"field {fname!r}: boost is a number in (0, 100] on a text field")
            f["boost"] = float(boost)
        out_fields[fname] = f
    texts = [n for n, f in out_fields.items() if f["type"] == "text"]
    vectors = [n for n, f in out_fields.items() if f["type"] == "vector"]
    if len(vectors) > 1:
        raise invalid("at most one vector field")
    if kind in ("full-text", "hybrid") and not texts:
        raise invalid(f"a {kind} index needs at least one text field")
    if kind in ("vector", "hybrid") and not vectors:
        raise invalid(f"a {kind} index needs a vector field")
    if kind in ("metadata", "full-text") and vectors:
        raise invalid(f"a {kind} index has no vector field (use kind vector or hybrid)")
    auth = body.get("authorization", "inherit_object")
    if auth not in AUTH_MODES:
        raise invalid(f"authorization must be one of {', '.join(AUTH_MODES)}")
    build = body.get("build") or {}
    if not isinstance(build, dict) or set(build) - {"batch", "publish_interval"}:
        raise invalid("build is {batch, publish_interval}")
    batch = build.get("batch", 2000)
    interval = build.get("publish_interval", 0.0)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 100_000:
        raise invalid("build.batch is an integer between 1 and 100000")
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval <= 3600:
        raise invalid("build.publish_interval is a number of seconds between 0 and 3600")
    out: dict[str, Any] = {
        "name": name, "kind": kind, "selector": {"prefix": prefix, "content_types": list(cts)},
        "fields": out_fields, "authorization": auth,
        "build": {"batch": batch, "publish_interval": float(interval)},
    }
    vec = body.get("vector")
    if vectors:
        vec = vec or {}
        if not isinstance(vec, dict) or set(vec) - {"metric", "hnsw"}:
            raise invalid("vector is {metric, hnsw}")
        metric = vec.get("metric", "cosine")
        if metric not in METRICS:
            raise invalid(f"vector.metric must be one of {', '.join(METRICS)}")
        hnsw = vec.get("hnsw") or {}
        if not isinstance(hnsw, dict) or set(hnsw) - {"m", "ef_construction", "ef_search"}:
            raise invalid("vector.hnsw is {m, ef_construction, ef_search}")
        h = {"m": hnsw.get("m", 16), "ef_construction": hnsw.get("ef_construction", 64),
             "ef_search": hnsw.get("ef_search", 64)}
        for k, (lo, hi) in {"m": (2, 128), "ef_construction": (4, 2048), "ef_search": (1, 4096)}.items():
            if isinstance(h[k], bool) or not isinstance(h[k], int) or not lo <= h[k] <= hi:
                raise invalid(f"vector.hnsw.{k} is an integer between {lo} and {hi}")
        out["vector"] = {"field": vectors[0], "dimension": out_fields[vectors[0]]["dimension"],
                         "metric": metric, "hnsw": h}
    elif vec is not None:
        raise invalid("vector settings need a vector field")
    ft = body.get("full_text")
    if texts:
        ft = ft or {}
        if not isinstance(ft, dict) or set(ft) - {"analyzer", "positions"}:
            raise invalid("full_text is {analyzer, positions}")
        analyzer = ft.get("analyzer", "simple")
        if analyzer not in ANALYZERS:
            raise invalid(f"full_text.analyzer must be one of {', '.join(ANALYZERS)}")
        positions = ft.get("positions", True)
        if not isinstance(positions, bool):
            raise invalid("full_text.positions is true or false")
        out["full_text"] = {"analyzer": analyzer, "positions": positions}
    elif ft is not None:
        raise invalid("full_text settings need a text field")
    return out


def definition_hash(definition: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def content_type_matches(patterns: list[str], content_type: str) -> bool:
    if not patterns:
        return True
    ct = (content_type or "").split(";", 1)[0].strip().lower()
    for p in patterns:
        p = p.lower()
        if p == ct or (p.endswith("/*") and ct.startswith(p[:-1])):
            return True
    return False


def selects(definition: dict[str, Any], key: str, content_type: str) -> bool:
    """Does the selector take this object? Keys under the reserved namespace never are."""
    if key.startswith("_anvil/"):
        return False
    sel = definition["selector"]
    return key.startswith(sel["prefix"]) and content_type_matches(sel["content_types"], content_type)
