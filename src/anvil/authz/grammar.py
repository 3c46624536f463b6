"""SpiceDB's schema language as a lark (LALR) grammar, and its parse tree turned into the model of
`anvil.authz.schema`. Imported only when a schema is parsed: lark and the grammar cost ~0.1 s of
every process that imports the schema model otherwise (every server start, `anvil fsck`)."""

from __future__ import annotations

import functools
from typing import Any

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from anvil.authz.schema import (
    MAX_EXPRESSION_DEPTH,
    PARAM_RE,
    PARAM_TYPES,
    Arrow,
    Caveat,
    Definition,
    Nil,
    Op,
    ParamType,
    Permission,
    Ref,
    Relation,
    TypeRef,
    schema_error,
)
from anvil.errors import AnvilError

# A caveat body is a CEL expression inside braces; CEL has map literals, so the terminal allows
# braces nested two deep and skips over string literals (a brace inside a string is no brace).
_STR = r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\''
_INNER = r"\{(?:" + _STR + r"|[^{}\"'])*\}"
_MID = r"\{(?:" + _STR + r"|" + _INNER + r"|[^{}\"'])*\}"
CEL_BODY = r"\{(?:" + _STR + r"|" + _MID + r"|[^{}\"'])*\}"

GRAMMAR = r"""
start: item*
?item: definition | caveat | use

use: "use" NAME

definition: "definition" TYPENAME "{" member* "}"
?member: relation | permission

relation: "relation" NAME ":" typeref ("|" typeref)*
typeref: TYPENAME typesuffix? withclause?
typesuffix: ":" STAR            -> wildcard
          | "#" NAME            -> subrelation
withclause: "with" NAME ("and" NAME)?

permission: "permission" NAME "=" expr

?expr: term
     | expr "+" term            -> union
     | expr "&" term            -> intersection
     | expr "-" term            -> exclusion
?term: NAME                     -> ref
     | NAME "->" NAME           -> arrow_any
     | NAME "." NAME "(" NAME ")" -> arrow_fn
     | "nil"                    -> nil
     | "(" expr ")"

caveat: "caveat" NAME "(" [param ("," param)*] ")" CELBODY
param: NAME ptype
ptype: NAME ("<" ptype ("," ptype)* ">")?

STAR: "*"
TYPENAME: /[a-zA-Z_][a-zA-Z0-9_]*(\/[a-zA-Z_][a-zA-Z0-9_]*)?/
NAME: /[a-zA-Z_][a-zA-Z0-9_]*/
CELBODY: /""" + CEL_BODY + r"""/s

COMMENT: /\/\/[^\n]*/
BLOCK_COMMENT: /\/\*(.|\n)*?\*\//
%import common.WS
%ignore WS
%ignore COMMENT
%ignore BLOCK_COMMENT
"""


@functools.cache
def _parser() -> Lark:
    """Built on first use: the LALR tables take ~0.3 s of CPU, paid by every server start otherwise."""
    return Lark(GRAMMAR, parser="lalr", propagate_positions=True, maybe_placeholders=False)

# ------------------------------------------------------------------ parse tree -> model


def _pos(meta_or_token: Any) -> tuple[int, int]:
    return getattr(meta_or_token, "line", 0), getattr(meta_or_token, "column", 0)


@v_args(meta=True)
class _Build(Transformer):
    def start(self, meta: Any, items: list[Any]) -> list[Any]:
        return items

    def use(self, meta: Any, c: list[Token]) -> tuple[str, str, Any]:
        return ("use", str(c[0]), c[0])

    def definition(self, meta: Any, c: list[Any]) -> tuple[str, Definition, Any]:
        name = c[0]
        d = Definition(str(name), line=name.line, column=name.column)
        for m in c[1:]:
            if d.has(m.name):
                raise schema_error(m.line, m.column, f"{m.name!r} is defined twice in definition {d.name!r}")
            if isinstance(m, Relation):
                d.relations[m.name] = m
            else:
                d.permissions[m.name] = m
        return ("definition", d, name)

    def relation(self, meta: Any, c: list[Any]) -> Relation:
        return Relation(str(c[0]), list(c[1:]), *_pos(c[0]))

    def typeref(self, meta: Any, c: list[Any]) -> tuple[TypeRef, Any]:
        ref = TypeRef(str(c[0]))
        caveat, expiration, rel, wildcard = None, False, None, False
        for x in c[1:]:
            if isinstance(x, tuple) and x[0] == "wildcard":
                wildcard = True
            elif isinstance(x, tuple) and x[0] == "sub":
                rel = x[1]
            elif isinstance(x, tuple) and x[0] == "with":
                for tok in x[1]:
                    if str(tok) == "expiration":
                        if expiration:
                            raise schema_error(tok.line, tok.column, "'expiration' given twice")
                        expiration = True
                    elif caveat is None:
                        caveat = str(tok)
                    else:
                        raise schema_error(tok.line, tok.column, "a subject type takes at most one caveat")
        ref = TypeRef(ref.type, rel, wildcard, caveat, expiration)
        return (ref, c[0])

    def wildcard(self, meta: Any, c: list[Any]) -> tuple[str]:
        return ("wildcard",)

    def subrelation(self, meta: Any, c: list[Any]) -> tuple[str, str]:
        return ("sub", str(c[0]))

    def withclause(self, meta: Any, c: list[Any]) -> tuple[str, list[Token]]:
        return ("with", list(c))

    def permission(self, meta: Any, c: list[Any]) -> Permission:
        return Permission(str(c[0]), c[1], *_pos(c[0]))

    def union(self, meta: Any, c: list[Any]) -> Op:
        return Op("union", c[0], c[1])

    def intersection(self, meta: Any, c: list[Any]) -> Op:
        return Op("intersection", c[0], c[1])

    def exclusion(self, meta: Any, c: list[Any]) -> Op:
        return Op("exclusion", c[0], c[1])

    def ref(self, meta: Any, c: list[Token]) -> Ref:
        if str(c[0]) == "nil":
            return Nil()
        return _Positioned.ref(str(c[0]), c[0])

    def arrow_any(self, meta: Any, c: list[Token]) -> Arrow:
        return _Positioned.arrow(str(c[0]), str(c[1]), "any", c[0])

    def arrow_fn(self, meta: Any, c: list[Token]) -> Arrow:
        fn = str(c[1])
        if fn not in ("any", "all"):
            raise schema_error(c[1].line, c[1].column, f"unknown arrow function {fn!r} (expected any or all)")
        return _Positioned.arrow(str(c[0]), str(c[2]), fn, c[0])

    def nil(self, meta: Any, c: list[Any]) -> Nil:
        return Nil()

    def caveat(self, meta: Any, c: list[Any]) -> tuple[str, Caveat, Any]:
        name, params, body = c[0], [p for p in c[1:-1] if p is not None], c[-1]
        ps: dict[str, ParamType] = {}
        for pname, ptype in params:
            if str(pname) in ps:
                raise schema_error(pname.line, pname.column, f"parameter {str(pname)!r} is declared twice")
            if not PARAM_RE.match(str(pname)):
                raise schema_error(pname.line, pname.column, f"invalid parameter name {str(pname)!r}")
            ps[str(pname)] = ptype
        cav = Caveat(str(name), ps, str(body)[1:-1].strip(), line=name.line, column=name.column)
        cav.body_line, cav.body_column = body.line, body.column  # type: ignore[attr-defined]
        cav.body_raw = str(body)  # type: ignore[attr-defined]
        return ("caveat", cav, name)

    def param(self, meta: Any, c: list[Any]) -> tuple[Token, ParamType]:
        return (c[0], c[1])

    def ptype(self, meta: Any, c: list[Any]) -> ParamType:
        name, args = c[0], tuple(c[1:])
        if str(name) not in PARAM_TYPES:
            raise schema_error(name.line, name.column,
                               f"unknown caveat parameter type {str(name)!r} (known: {', '.join(PARAM_TYPES)})")
        want = PARAM_TYPES[str(name)]
        if len(args) != want:
            raise schema_error(name.line, name.column, f"type {str(name)} takes {want} type argument(s)")
        return ParamType(str(name), args)


class _Positioned:
    """Expression nodes are frozen (hashable, comparable); their positions live beside them."""

    positions: dict[int, tuple[int, int]] = {}

    @staticmethod
    def ref(name: str, tok: Token) -> Ref:
        r = Ref(name)
        object.__setattr__(r, "_pos", (tok.line, tok.column))
        return r

    @staticmethod
    def arrow(ts: str, target: str, mode: str, tok: Token) -> Arrow:
        a = Arrow(ts, target, mode)
        object.__setattr__(a, "_pos", (tok.line, tok.column))
        return a

def parse_items(text: str) -> list[Any]:
    """The schema text's top-level items, ("use" | "definition" | "caveat", object, token), in order;
    AnvilError(InvalidArgument) naming line and column on a syntax error."""
    try:
        tree: Tree = _parser().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text) from None
    try:
        return _Build().transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, AnvilError):
            raise e.orig_exc from None
        raise
    except RecursionError:  # lark's transformer recurses per level: hundreds of chained operators (500)
        raise AnvilError("InvalidArgument", f"schema error: an expression nests more than {MAX_EXPRESSION_DEPTH} "
                                            "operators deep") from None


def _syntax_error(e: UnexpectedInput, text: str) -> AnvilError:
    line, col = getattr(e, "line", None), getattr(e, "column", None)
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream is not None and e.pos_in_stream < len(text) else "?"
        return schema_error(line, col, f"unexpected character {ch!r}")
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        lines = text.splitlines() or [""]
        return schema_error(len(lines), len(lines[-1]) + 1, "unexpected end of schema (a '}' or ')' missing?)")
    if isinstance(e, UnexpectedToken):
        expected = sorted(x for x in e.expected if not x.startswith("__"))[:8]
        return schema_error(line, col, f"unexpected {str(e.token)!r}; expected one of {', '.join(expected)}")
    return schema_error(line, col, "syntax error")
