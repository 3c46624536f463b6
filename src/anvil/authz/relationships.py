"""Relationships: SpiceDB's text form, validation against a schema, and filters.

Text form (as `zed` writes it):
`resource_type:resource_id#relation@subject_type:subject_id[#subject_relation][caveat_name:{json}][expiration:RFC3339]`
A caveat without context is `[caveat_name]`; `user:*` is the wildcard subject.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from anvil import jsontext
from anvil.authz.schema import Schema, TypeRef, convert, parse_timestamp
from anvil.errors import AnvilError

TYPE_PART = r"[a-z][a-z0-9_]{1,62}[a-z0-9](?:/[a-z][a-z0-9_]{1,62}[a-z0-9])?"
REL_PART = r"[a-z][a-z0-9_]{1,62}[a-z0-9]"
# SpiceDB's object id alphabet, plus `.` (file names); `*` only as a subject (the wildcard).
ID_PART = r"[a-zA-Z0-9/_|\-=+.]{1,1024}"
_HEAD = re.compile(
    rf"(?P<rt>{TYPE_PART}):(?P<rid>{ID_PART})#(?P<rel>{REL_PART})@"
    rf"(?P<st>{TYPE_PART}):(?P<sid>{ID_PART}|\*)(?:#(?P<srel>{REL_PART}|\.\.\.))?"
)
TYPE_RE = re.compile(rf"^{TYPE_PART}$")
REL_RE = re.compile(rf"^{REL_PART}$")
ID_RE = re.compile(rf"^{ID_PART}$")
MAX_CONTEXT_BYTES = 4096


def bad(message: str, where: str = "") -> AnvilError:
    return AnvilError("InvalidArgument", f"{where}: {message}" if where else message)


@dataclass(frozen=True)
class Relationship:
    rtype: str
    rid: str
    relation: str
    stype: str
    sid: str
    srel: str = ""  # "" = the subject object itself (SpiceDB's `...`)
    caveat: str = ""
    context: str | None = None  # canonical JSON of the caveat context, or None
    expires: float | None = None  # epoch seconds

    @property
    def key(self) -> tuple[str, str, str, str, str, str]:
        return (self.rtype, self.rid, self.relation, self.stype, self.sid, self.srel)

    def text(self) -> str:
        s = f"{self.rtype}:{self.rid}#{self.relation}@{self.stype}:{self.sid}"
        if self.srel:
            s += f"#{self.srel}"
        if self.caveat:
            s += f"[{self.caveat}:{self.context}]" if self.context else f"[{self.caveat}]"
        if self.expires is not None:
            s += f"[expiration:{format_time(self.expires)}]"
        return s

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"relationship": self.text(), "resource": f"{self.rtype}:{self.rid}",
                             "relation": self.relation, "subject": subject_text(self.stype, self.sid, self.srel)}
        if self.caveat:
            d["caveat"] = {"name": self.caveat, "context": json.loads(self.context) if self.context else {}}
        if self.expires is not None:
            d["expires_at"] = format_time(self.expires)
        return d


def subject_text(stype: str, sid: str, srel: str) -> str:
    return f"{stype}:{sid}" + (f"#{srel}" if srel else "")


def format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_expiration(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise bad("expiration must be an RFC 3339 timestamp", where)
    try:
        return parse_timestamp(value).timestamp()
    except ValueError:
        raise bad(f"expiration {value[:40]!r} is not an RFC 3339 timestamp", where) from None


def parse(text: Any, where: str = "relationship") -> Relationship:
    """SpiceDB text form -> Relationship; errors name the character position."""
    if not isinstance(text, str) or not text:
        raise bad("a relationship is a non-empty string such as document:readme#viewer@user:amy", where)
    m = _HEAD.match(text)
    if m is None:
        raise bad(f"malformed relationship at character {_first_bad(text) + 1}: expected "
                  "type:id#relation@type:id[#relation][caveat:{json}][expiration:time]", where)
    pos = m.end()
    caveat, context, expires = "", None, None
    while pos < len(text):
        if text[pos] != "[":
            raise bad(f"malformed relationship at character {pos + 1}: expected '[' or the end", where)
        close = re.compile(r"([a-z][a-z0-9_/]*)(:|\])").match(text, pos + 1)
        if close is None:
            raise bad(f"malformed relationship at character {pos + 2}: expected a caveat name or expiration", where)
        name = close.group(1)
        pos = close.end()
        if close.group(2) == "]":
            if name == "expiration" or caveat:
                raise bad(f"malformed relationship at character {close.start() + 1}", where)
            caveat = name
            continue
        if name == "expiration":
            end = text.find("]", pos)
            if end < 0 or expires is not None:
                raise bad(f"malformed expiration at character {pos + 1}", where)
            expires = parse_expiration(text[pos:end], f"{where} at character {pos + 1}")
            pos = end + 1
            continue
        if caveat:
            raise bad(f"a second caveat at character {close.start() + 1}", where)
        try:
            # Strict: a context nested deeply (RecursionError) or holding "\ud800" (a lone surrogate that
            # failed in SQLite) was a 500; NaN and Infinity are no JSON either.
            value, end = jsontext.raw_decode(text, pos)
        except ValueError as e:
            raise bad(f"caveat context is not JSON at character {pos + 1}: {e}", where) from None
        if not isinstance(value, dict) or end >= len(text) or text[end] != "]":
            raise bad(f"caveat context must be a JSON object followed by ']' at character {pos + 1}", where)
        caveat, context, pos = name, (canonical_json(value) if value else None), end + 1
    srel = m.group("srel") or ""
    return Relationship(m.group("rt"), m.group("rid"), m.group("rel"), m.group("st"), m.group("sid"),
                        "" if srel == "..." else srel, caveat, context, expires)


def _first_bad(text: str) -> int:
    """Index of the first character that cannot continue a relationship (prefix validity is
    monotone, so a binary search finds it)."""
    if _prefix_ok(text):
        return len(text)  # all of it could start one: what is missing comes at the end
    lo, hi = 0, len(text)  # text[:lo] is a valid prefix; text[:hi] is not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _prefix_ok(text[:mid]):
            lo = mid
        else:
            hi = mid
    return lo


def _prefix_ok(prefix: str) -> bool:
    # Good enough to point at the first character that cannot belong: each part's alphabet in turn.
    return _PREFIX.match(prefix) is not None


_PREFIX = re.compile(r"^[a-z][a-z0-9_/]*(?::[a-zA-Z0-9/_|\-=+.]*(?:#[a-z0-9_]*(?:@[a-z][a-z0-9_/]*"
                     r"(?::(?:[a-zA-Z0-9/_|\-=+.]*|\*)(?:#[a-z0-9_.]*)?)?)?)?)?$|^$")


def from_dict(obj: Any, where: str) -> Relationship:
    """{"relationship": TEXT} or fields {resource_type, resource_id, relation, subject_type, subject_id,
    subject_relation?, caveat?: {name, context}, expires_at?}."""
    if isinstance(obj, str):
        return parse(obj, where)
    if not isinstance(obj, dict):
        raise bad("expected a relationship string or object", where)
    if "relationship" in obj:
        rel = parse(obj["relationship"], where)
    else:
        fields = {}
        for f in ("resource_type", "resource_id", "relation", "subject_type", "subject_id"):
            v = obj.get(f)
            if not isinstance(v, str) or not v:
                raise bad(f"{f} is required", where)
            fields[f] = v
        srel = obj.get("subject_relation") or ""
        text = (f"{fields['resource_type']}:{fields['resource_id']}#{fields['relation']}@"
                f"{fields['subject_type']}:{fields['subject_id']}" + (f"#{srel}" if srel else ""))
        rel = parse(text, where)
    cav = obj.get("caveat")
    if cav is not None:
        if not isinstance(cav, dict) or not isinstance(cav.get("name"), str):
            raise bad("caveat must be {name, context}", where)
        ctx = cav.get("context") or {}
        if not isinstance(ctx, dict):
            raise bad("caveat context must be a JSON object", where)
        rel = Relationship(*rel.key, cav["name"], canonical_json(ctx) if ctx else None, rel.expires)
    exp = obj.get("expires_at", obj.get("expiration"))
    if exp is not None:
        rel = Relationship(*rel.key, rel.caveat, rel.context, parse_expiration(exp, where))
    return rel


def validate_names(schema: Schema, rel: Relationship, where: str) -> None:
    """The resource type and relation exist (what a delete needs; the subject may be anything)."""
    d = schema.definitions.get(rel.rtype)
    if d is None:
        raise bad(f"unknown resource type {rel.rtype!r}", where)
    if rel.relation not in d.relations:
        what = "a permission; relationships are written to relations" if rel.relation in d.permissions else "unknown"
        raise bad(f"relation {rel.rtype}#{rel.relation} is {what}", where)


def validate(schema: Schema, rel: Relationship, where: str) -> None:
    """The relationship is allowed by the schema: its relation exists and lists its subject type,
    with the same caveat; the caveat context has the caveat's parameters with their types."""
    d = schema.definitions.get(rel.rtype)
    if d is None:
        raise bad(f"unknown resource type {rel.rtype!r}", where)
    r = d.relations.get(rel.relation)
    if r is None:
        what = "a permission; relationships are written to relations" if rel.relation in d.permissions else "unknown"
        raise bad(f"relation {rel.rtype}#{rel.relation} is {what}", where)
    if rel.stype not in schema.definitions:
        raise bad(f"unknown subject type {rel.stype!r}", where)
    if rel.sid == "*" and rel.srel:
        raise bad("a wildcard subject cannot have a relation", where)
    if ref_for(r.types, rel) is None:
        allowed = " | ".join(str(t) for t in r.types)
        shown = subject_text(rel.stype, rel.sid if rel.sid == "*" else "ID", rel.srel)
        extra = f" with caveat {rel.caveat}" if rel.caveat else ""
        extra += " with expiration" if rel.expires is not None else ""
        raise bad(f"subject {shown}{extra} is not allowed on {rel.rtype}#{rel.relation} (allowed: {allowed})", where)
    if rel.caveat:
        cav = schema.caveats[rel.caveat]
        ctx = json.loads(rel.context) if rel.context else {}
        if rel.context and len(rel.context.encode()) > MAX_CONTEXT_BYTES:
            raise bad(f"caveat context is larger than {MAX_CONTEXT_BYTES} bytes", where)
        for k, v in ctx.items():
            if k not in cav.params:
                raise bad(f"caveat {rel.caveat} has no parameter {k!r}", where)
            convert(cav.params[k], v, f"{where}: caveat {rel.caveat} parameter {k}")


def ref_for(types: list[TypeRef], rel: Relationship) -> TypeRef | None:
    """The allowed subject type this relationship instantiates (the caveat must match exactly;
    an expiration needs a type declared `with expiration`)."""
    wildcard = rel.sid == "*"
    for t in types:
        if t.type != rel.stype or t.wildcard != wildcard or (t.relation or "") != rel.srel:
            continue
        if (t.caveat or "") != rel.caveat:
            continue
        if rel.expires is not None and not t.expiration:
            continue
        return t
    return None


# ------------------------------------------------------------------ filters


FILTER_FIELDS = ("resource_type", "resource_id", "relation", "subject_type", "subject_id", "subject_relation")
_COLUMNS = {"resource_type": "rtype", "resource_id": "rid", "relation": "relation", "subject_type": "stype",
            "subject_id": "sid", "subject_relation": "srel"}


def parse_filter(obj: Any, where: str = "filter") -> dict[str, str]:
    """{resource_type (required), resource_id?, relation?, subject_type?, subject_id?, subject_relation?}."""
    if not isinstance(obj, dict):
        raise bad("a filter is an object with resource_type and optional fields", where)
    unknown = sorted(set(obj) - set(FILTER_FIELDS))
    if unknown:
        raise bad(f"unknown filter field(s): {', '.join(unknown)}", where)
    out: dict[str, str] = {}
    for f in FILTER_FIELDS:
        v = obj.get(f)
        if v is None or v == "":
            continue
        if not isinstance(v, str):
            raise bad(f"{f} must be a string", where)
        ok = (TYPE_RE if f.endswith("type") else REL_RE if f.endswith("relation") else ID_RE).match(v) or \
            (f == "subject_id" and v == "*") or (f == "subject_relation" and v == "...")
        if not ok:
            raise bad(f"{f} {v[:80]!r} is malformed", where)
        out[f] = "" if v == "..." else v
    if "resource_type" not in out:
        raise bad("resource_type is required", where)
    return out


def filter_sql(flt: dict[str, str]) -> tuple[str, list[Any]]:
    """WHERE fragments (AND-joined) and parameters for a parsed filter."""
    clauses, params = [], []
    for f, v in flt.items():
        clauses.append(f"{_COLUMNS[f]} = ?")
        params.append(v)
    return " AND ".join(clauses), params
