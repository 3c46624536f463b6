"""SpiceDB's schema language: the schema model and its validation (the grammar: `authz.grammar`).

An existing SpiceDB schema loads unchanged: `definition` blocks (names may carry a `prefix/`),
relations with subject types (`user`, `group#member`, `user:*`, `with caveat`, `with
expiration`, `with caveat and expiration`), permissions built from `+` `&` `-` `->` `.any()`
`.all()` `nil` and parentheses, `caveat name(param type, ...) { CEL }`, `use expiration`, and
`//`, `/* */` and `/** doc */` comments.

As in SpiceDB, `+`, `&` and `-` share one precedence and associate to the left (`a + b - c`
is `(a + b) - c`); arrows bind tighter than all three. Every error names its line and column
in the schema text.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from anvil.errors import AnvilError

MAX_SCHEMA_BYTES = 256 * 1024


DEFINITION_RE = re.compile(r"^([a-z][a-z0-9_]{1,62}[a-z0-9]/)?[a-z][a-z0-9_]{1,62}[a-z0-9]$")
RELATION_RE = re.compile(r"^[a-z][a-z0-9_]{1,62}[a-z0-9]$")
CAVEAT_RE = DEFINITION_RE
PARAM_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,63}$")
KEYWORDS = {"definition", "relation", "permission", "caveat", "nil", "with", "and", "expiration", "use",
            "any", "all", "this"}

# SpiceDB's caveat parameter types and how many type arguments each takes.
PARAM_TYPES = {"any": 0, "int": 0, "uint": 0, "bool": 0, "string": 0, "double": 0, "bytes": 0,
               "duration": 0, "timestamp": 0, "ipaddress": 0, "list": 1, "map": 1}
MAX_DEPTH_DEFAULT = 50
# Operators nested in one permission's expression (`a + b + c ...` nests to the left, one level per
# operator). Evaluation, expand and its JSON answer recurse once or twice per level: a schema of ~500
# chained unions was written and then made every expand a RecursionError (500), and ~500 more failed
# in the parser itself. SpiceDB schemas stay far below this.
MAX_EXPRESSION_DEPTH = 100


def schema_error(line: int | None, column: int | None, message: str) -> AnvilError:
    where = f"line {line}, column {column}: " if line is not None else ""
    err = AnvilError("InvalidArgument", f"schema error at {where}{message}")
    err.line, err.column = line, column  # type: ignore[attr-defined]
    return err


# ------------------------------------------------------------------ the model


@dataclass(frozen=True)
class ParamType:
    name: str
    args: tuple[ParamType, ...] = ()

    def __str__(self) -> str:
        return self.name + (f"<{', '.join(str(a) for a in self.args)}>" if self.args else "")


@dataclass(frozen=True)
class TypeRef:
    """One allowed subject type of a relation: `user`, `group#member`, `user:*`, `... with c and expiration`."""

    type: str
    relation: str | None = None
    wildcard: bool = False
    caveat: str | None = None
    expiration: bool = False

    def __str__(self) -> str:
        s = self.type + (":*" if self.wildcard else f"#{self.relation}" if self.relation else "")
        withs = [w for w in (self.caveat, "expiration" if self.expiration else None) if w]
        return s + (" with " + " and ".join(withs) if withs else "")


# Permission expressions.
@dataclass(frozen=True)
class Ref:
    name: str


@dataclass(frozen=True)
class Arrow:
    tupleset: str
    target: str
    mode: str = "any"  # "any" (`->`, `.any()`) or "all" (`.all()`)


@dataclass(frozen=True)
class Nil:
    pass


@dataclass(frozen=True)
class Op:
    op: str  # "union" | "intersection" | "exclusion"
    left: Any
    right: Any


@dataclass
class Relation:
    name: str
    types: list[TypeRef]
    line: int = 0
    column: int = 0


@dataclass
class Permission:
    name: str
    expr: Any
    line: int = 0
    column: int = 0


@dataclass
class Definition:
    name: str
    relations: dict[str, Relation] = field(default_factory=dict)
    permissions: dict[str, Permission] = field(default_factory=dict)
    line: int = 0
    column: int = 0

    def has(self, name: str) -> bool:
        return name in self.relations or name in self.permissions


@dataclass
class Caveat:
    name: str
    params: dict[str, ParamType]
    expression: str
    program: Any = None
    line: int = 0
    column: int = 0


@dataclass
class Schema:
    text: str
    definitions: dict[str, Definition] = field(default_factory=dict)
    caveats: dict[str, Caveat] = field(default_factory=dict)
    uses: set[str] = field(default_factory=set)

    def definition(self, name: str) -> Definition | None:
        return self.definitions.get(name)

    def relation(self, type_: str, name: str) -> Relation | None:
        d = self.definitions.get(type_)
        return d.relations.get(name) if d else None


def expr_text(e: Any) -> str:
    if isinstance(e, Ref):
        return e.name
    if isinstance(e, Nil):
        return "nil"
    if isinstance(e, Arrow):
        return f"{e.tupleset}->{e.target}" if e.mode == "any" else f"{e.tupleset}.all({e.target})"
    sym = {"union": "+", "intersection": "&", "exclusion": "-"}[e.op]
    return f"({expr_text(e.left)} {sym} {expr_text(e.right)})"



def _expr_pos(e: Any) -> tuple[int | None, int | None]:
    return getattr(e, "_pos", (None, None))


# ------------------------------------------------------------------ entry point


def parse(text: str) -> Schema:
    """Parse and validate a schema; AnvilError(InvalidArgument) naming line and column otherwise."""
    if not isinstance(text, str):
        raise AnvilError("InvalidArgument", "the schema must be text")
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise AnvilError("InvalidArgument", f"the schema is larger than {MAX_SCHEMA_BYTES} bytes")
    from anvil.authz.grammar import parse_items  # lark and its LALR tables: only when a schema is parsed

    items = parse_items(text)
    schema = Schema(text)
    for kind, obj, tok in items:
        if kind == "use":
            if obj != "expiration":
                raise schema_error(tok.line, tok.column, f"unknown feature {obj!r} (SpiceDB knows `use expiration`)")
            schema.uses.add(obj)
        elif kind == "definition":
            if obj.name in schema.definitions:
                raise schema_error(tok.line, tok.column, f"definition {obj.name!r} is defined twice")
            schema.definitions[obj.name] = obj
        else:
            if obj.name in schema.caveats:
                raise schema_error(tok.line, tok.column, f"caveat {obj.name!r} is defined twice")
            schema.caveats[obj.name] = obj
    _validate(schema)
    return schema


def _check_name(pattern: re.Pattern[str], name: str, what: str, line: int, col: int) -> None:
    base = name.rsplit("/", 1)[-1]
    if base in KEYWORDS or not pattern.match(name):
        raise schema_error(line, col, f"invalid {what} name {name!r}: 3-64 characters of a-z 0-9 _, starting "
                                      "with a letter and not ending with _"
                                      + (" (definitions may carry a prefix/)" if what == "definition" else ""))


def _validate(schema: Schema) -> None:
    for cav in schema.caveats.values():
        _check_name(CAVEAT_RE, cav.name, "caveat", cav.line, cav.column)
        _compile_caveat(cav)
    for d in schema.definitions.values():
        _check_name(DEFINITION_RE, d.name, "definition", d.line, d.column)
        for r in d.relations.values():
            _check_name(RELATION_RE, r.name, "relation", r.line, r.column)
            refs: list[TypeRef] = []
            for ref, tok in r.types:  # type: ignore[misc]
                line, col = tok.line, tok.column
                target = schema.definitions.get(ref.type)
                if target is None:
                    raise schema_error(line, col, f"relation {d.name}#{r.name}: unknown definition {ref.type!r}")
                if ref.relation is not None and not target.has(ref.relation):
                    raise schema_error(line, col, f"relation {d.name}#{r.name}: {ref.type!r} has no relation "
                                                  f"or permission {ref.relation!r}")
                if ref.caveat is not None and ref.caveat not in schema.caveats:
                    raise schema_error(line, col, f"relation {d.name}#{r.name}: unknown caveat {ref.caveat!r}")
                if ref in refs:
                    raise schema_error(line, col, f"relation {d.name}#{r.name}: subject type {ref} is listed twice")
                refs.append(ref)
            r.types = refs
        for p in d.permissions.values():
            _check_name(RELATION_RE, p.name, "permission", p.line, p.column)
            _check_expr(schema, d, p, p.expr)


def check_expression_depth(schema: Schema) -> None:
    """Refuse a schema written now whose permission nests deeper than MAX_EXPRESSION_DEPTH. Only for
    writes: `parse` reads stored schemas too, which were accepted before this bound existed."""
    for d in schema.definitions.values():
        for p in d.permissions.values():
            if _expr_depth(p.expr) > MAX_EXPRESSION_DEPTH:
                raise schema_error(p.line, p.column, f"permission {d.name}#{p.name} nests more than "
                                                     f"{MAX_EXPRESSION_DEPTH} operators deep")


def _expr_depth(e: Any) -> int:
    """How deep an expression's operators nest (iteratively: the tree may be deep)."""
    deepest, stack = 0, [(e, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, Op):
            stack.append((node.left, depth + 1))
            stack.append((node.right, depth + 1))
    return deepest


def _check_expr(schema: Schema, d: Definition, p: Permission, e: Any) -> None:
    if isinstance(e, Op):
        _check_expr(schema, d, p, e.left)
        _check_expr(schema, d, p, e.right)
    elif isinstance(e, Ref):
        if not d.has(e.name):
            line, col = _expr_pos(e)
            raise schema_error(line, col, f"permission {d.name}#{p.name}: {e.name!r} is not a relation or "
                                          f"permission of {d.name!r}")
    elif isinstance(e, Arrow):
        line, col = _expr_pos(e)
        if e.tupleset not in d.relations:
            what = "a permission" if e.tupleset in d.permissions else "not a relation"
            raise schema_error(line, col, f"permission {d.name}#{p.name}: the left of an arrow must be a relation "
                                          f"of {d.name!r}; {e.tupleset!r} is {what}")
        types = d.relations[e.tupleset].types
        if not any(schema.definitions[t.type].has(e.target) for t in types):
            raise schema_error(line, col, f"permission {d.name}#{p.name}: no subject type of "
                                          f"{d.name}#{e.tupleset} has {e.target!r}")


# ------------------------------------------------------------------ caveats


def in_cidr(ip: Any, cidr: Any) -> bool:
    """SpiceDB's `ipaddress.in_cidr(cidr)`: IP addresses are strings here (see docs/authz.md)."""
    try:
        return ipaddress.ip_address(str(ip)) in ipaddress.ip_network(str(cidr), strict=False)
    except ValueError:
        return False


def _ipaddress_fn(value: Any) -> str:
    return str(ipaddress.ip_address(str(value)))


CEL_FUNCTIONS = {"in_cidr": in_cidr, "ipaddress": _ipaddress_fn}
_CEL_POS = re.compile(r"<input>:(\d+):(\d+):\s*(.*)")


def _compile_caveat(cav: Caveat) -> None:
    body_line: int = cav.body_line  # type: ignore[attr-defined]
    body_col: int = cav.body_column  # type: ignore[attr-defined]
    raw: str = cav.body_raw  # type: ignore[attr-defined]
    if not cav.expression:
        raise schema_error(body_line, body_col, f"caveat {cav.name!r} has an empty expression")
    source = raw[1:-1]
    # Imported here: the `cel` package loads its REPL (prompt_toolkit, ~0.5 s) on import, which every
    # server start would pay although most stores declare no caveat.
    import cel

    try:
        cav.program = cel.compile(source)
    except (ValueError, RuntimeError, TypeError) as e:
        m = _CEL_POS.search(str(e))
        if m:
            ln, cl = int(m.group(1)), int(m.group(2))
            # CEL counts from the body's first character (just after the brace).
            line = body_line + ln - 1
            col = (body_col + 1 + cl) if ln == 1 else cl + 1
            msg = m.group(3).split("\n")[0]
        else:
            line, col, msg = body_line, body_col, str(e).split("\n")[0]
        raise schema_error(line, col, f"caveat {cav.name!r}: invalid CEL: {msg}") from None
    unknown = [f for f in cav.program.functions() if not f.startswith(("_", "@", "!"))
               and f not in CEL_FUNCTIONS and f not in _CEL_BUILTINS]
    if unknown:
        raise schema_error(body_line, body_col, f"caveat {cav.name!r}: unknown function(s) {', '.join(unknown)}")


# Functions CEL itself provides (so a misspelt one is caught when the schema is written).
_CEL_BUILTINS = {
    "size", "contains", "startsWith", "endsWith", "matches", "has", "all", "exists", "exists_one", "map",
    "filter", "int", "uint", "double", "string", "bytes", "bool", "timestamp", "duration", "dyn", "type",
    "getFullYear", "getMonth", "getDayOfMonth", "getDate", "getDayOfWeek", "getDayOfYear", "getHours",
    "getMinutes", "getSeconds", "getMilliseconds", "max", "min", "in", "lowerAscii", "upperAscii", "trim",
    "split", "join", "replace", "indexOf", "lastIndexOf", "substring", "charAt", "format", "abs", "ceil",
    "floor", "round", "sign", "isNaN", "isInf", "isFinite", "optional", "or", "orValue", "hasValue", "value",
    "sort", "reverse", "flatten", "distinct", "slice", "first", "last", "range",
}

_DURATION_RE = re.compile(r"^(-)?((\d+(\.\d+)?)(h|ms|us|ns|m|s))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|ns|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def parse_duration(text: str) -> timedelta:
    if not _DURATION_RE.match(text):
        raise ValueError(f"{text!r} is not a duration like 1h30m, 90s or 250ms")
    seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
    return timedelta(seconds=-seconds if text.startswith("-") else seconds)


def parse_timestamp(text: str) -> datetime:
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def convert(ptype: ParamType, value: Any, where: str) -> Any:
    """A JSON context value -> the CEL value of the declared type; AnvilError naming `where` otherwise."""

    def bad(expected: str) -> AnvilError:
        shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
        return AnvilError("InvalidArgument", f"{where}: expected {expected} for type {ptype}, got {shown}")

    n = ptype.name
    if n == "any":
        return value
    if n == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if n in ("int", "uint"):
        # CEL's int and uint are 64-bit: a JSON integer outside the range is not a value of the type
        # (CEL would take it as another type and fail with a confusing overload error, or overflow).
        low, high = (-(2**63), 2**63 - 1) if n == "int" else (0, 2**64 - 1)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise bad("a 64-bit integer" if n == "int" else "a non-negative 64-bit integer")
        return value
    if n == "double":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if n == "string":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if n == "bytes":
        if not isinstance(value, str):
            raise bad("a string")
        return value.encode()
    if n == "duration":
        if not isinstance(value, str):
            raise bad("a duration string such as '1h30m'")
        try:
            return parse_duration(value)
        except ValueError:
            raise bad("a duration string such as '1h30m'") from None
    if n == "timestamp":
        if not isinstance(value, str):
            raise bad("an RFC 3339 timestamp string")
        try:
            return parse_timestamp(value)
        except ValueError:
            raise bad("an RFC 3339 timestamp string") from None
    if n == "ipaddress":
        if not isinstance(value, str):
            raise bad("an IP address string")
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise bad("an IP address") from None
    if n == "list":
        if not isinstance(value, list):
            raise bad("a list")
        return [convert(ptype.args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if n == "map":
        if not isinstance(value, dict):
            raise bad("a map (JSON object)")
        return {str(k): convert(ptype.args[0], v, f"{where}.{k}") for k, v in value.items()}
    raise bad("a known type")
