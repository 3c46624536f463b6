"""Evaluation at one revision: check, lookup resources, lookup subjects, expand.

Answers are three-valued, as in SpiceDB: HAS (`has_permission`), NO (`no_permission`) and
CONDITIONAL (a caveat needs context the caller did not give; the missing parameter names
travel with it). Combination rules:

- union: HAS if any operand HAS, else CONDITIONAL if any is, else NO;
- intersection: NO if any operand is NO, HAS if all HAS, else CONDITIONAL;
- exclusion `a - b`: NO if a is NO or b HAS; HAS if a HAS and b is NO; else CONDITIONAL;
- a relationship with a caveat contributes (its subject's answer) AND (the caveat's answer).

Cycles in the data (group a in b in a) are detected on the evaluation path: re-entering a
(resource, relation) already being evaluated contributes NO to that path, which is the least
fixpoint (membership that only a cycle would justify does not exist). Depth is bounded
(`max_depth`, SpiceDB's default 50); going past it raises `MaxDepthExceeded`.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from anvil.authz.schema import CEL_FUNCTIONS, Arrow, Caveat, Definition, Nil, Op, Ref, Schema, convert
from anvil.errors import AnvilError
from anvil.storage.records import Connection

NO, COND, HAS = 0, 1, 2
MAX_EXPAND = 100_000  # nodes plus leaf subjects in one expand answer
STATE_NAMES = {NO: "no_permission", COND: "conditional", HAS: "has_permission"}


@dataclass(frozen=True)
class Result:
    state: int
    missing: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return STATE_NAMES[self.state]


R_NO = Result(NO)
R_HAS = Result(HAS)


def r_and(a: Result, b: Result) -> Result:
    if a.state == NO or b.state == NO:
        return R_NO
    if a.state == HAS and b.state == HAS:
        return R_HAS
    return Result(COND, a.missing | b.missing)


def r_or(a: Result, b: Result) -> Result:
    if a.state == HAS or b.state == HAS:
        return R_HAS
    if a.state == NO and b.state == NO:
        return R_NO
    return Result(COND, a.missing | b.missing)


def r_not(a: Result) -> Result:
    return R_NO if a.state == HAS else R_HAS if a.state == NO else a


@dataclass(frozen=True)
class Row:
    stype: str
    sid: str
    srel: str
    caveat: str
    context: str | None
    expires: float | None


Subject = tuple[str, str, str]  # (type, id, relation or "")


def depth_error(limit: int) -> AnvilError:
    return AnvilError("MaxDepthExceeded",
                      f"evaluation went deeper than {limit} levels of nested relations; the data nests more "
                      "deeply than the bound allows (or the schema recurses without end)")


class RowCache:
    """Relationship rows per (tenant, revision, resource, relation), shared by every question.

    Rows at a revision never change (a write makes a new revision), so entries need no
    invalidation; they are kept unfiltered by expiry and filtered when used, so they stay right
    as time passes. Bounded LRU: a question touching a group or folder many others share finds
    its rows in memory instead of the catalog."""

    def __init__(self, size: int = 200_000):
        self.size = size
        self._d: OrderedDict[tuple, list[Row]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> list[Row] | None:
        with self._lock:
            hit = self._d.get(key)
            if hit is not None:
                self._d.move_to_end(key)
            return hit

    def put(self, key: tuple, rows: list[Row]) -> None:
        with self._lock:
            self._d[key] = rows
            while len(self._d) > self.size:
                self._d.popitem(last=False)


class Snapshot:
    """The relationships of one tenant at one revision, read through one connection."""

    def __init__(self, conn: Connection, tenant: str, revision: int, now: float, cache: RowCache | None = None):
        self.conn = conn
        self.tenant = tenant
        self.revision = revision
        self.now = now
        self.cache = cache
        self._rows: dict[tuple[str, str, str], list[Row]] = {}
        self.min_expiry = math.inf  # the earliest expiration any answer depended on

    _AT = "created_rev <= ? AND (deleted_rev IS NULL OR deleted_rev > ?)"
    _LIVE = _AT + " AND (expires IS NULL OR expires > ?)"

    def rows(self, rtype: str, rid: str, relation: str) -> list[Row]:
        key = (rtype, rid, relation)
        hit = self._rows.get(key)
        if hit is None:
            shared_key = (self.tenant, self.revision, rtype, rid, relation)
            every = self.cache.get(shared_key) if self.cache is not None else None
            if every is None:
                every = [Row(*r) for r in self.conn.execute(
                    "SELECT stype, sid, srel, caveat, context, expires FROM authz_relationships "
                    f"WHERE tenant = ? AND rtype = ? AND rid = ? AND relation = ? AND {self._AT}",
                    (self.tenant, rtype, rid, relation, self.revision, self.revision))]
                if self.cache is not None:
                    self.cache.put(shared_key, every)
            hit = self._live(every)
            self._rows[key] = hit
        return hit

    def _live(self, every: list[Row]) -> list[Row]:
        """Rows not yet expired; notes the earliest expiry an answer now depends on."""
        hit = []
        for r in every:
            if r.expires is not None:
                if r.expires <= self.now:
                    continue
                self.min_expiry = min(self.min_expiry, r.expires)
            hit.append(r)
        return hit

    def prefetch(self, rtype: str, ids: list[str], relations: list[str]) -> None:
        """Load the rows of many objects' relations in a few queries (lookups verify many candidates)."""
        if not ids or not relations:
            return
        wanted = [i for i in ids if any((rtype, i, r) not in self._rows for r in relations)]
        if not wanted:
            return
        found: dict[tuple[str, str], list[Row]] = {(i, r): [] for i in wanted for r in relations}
        marks = ",".join("?" * len(wanted))
        rel_marks = ",".join("?" * len(relations))
        for rid, relation, *rest in self.conn.execute(
            "SELECT rid, relation, stype, sid, srel, caveat, context, expires FROM authz_relationships "
            f"WHERE tenant = ? AND rtype = ? AND relation IN ({rel_marks}) AND rid IN ({marks}) AND {self._AT}",
            (self.tenant, rtype, *relations, *wanted, self.revision, self.revision)):
            found[(rid, relation)].append(Row(*rest))
        for (rid, relation), every in found.items():
            if self.cache is not None:
                self.cache.put((self.tenant, self.revision, rtype, rid, relation), every)
            self._rows[(rtype, rid, relation)] = self._live(every)

    def resources_with_subject(self, stype: str, sid: str, srel: str,
                               relations: Iterable[tuple[str, str]] | None = None) -> list[tuple[str, str, str]]:
        """(rtype, rid, relation) of live relationships whose subject is exactly (stype, sid, srel)."""
        out = []
        for rtype, rid, relation, expires in self.conn.execute(
            "SELECT rtype, rid, relation, expires FROM authz_relationships "
            f"WHERE tenant = ? AND stype = ? AND sid = ? AND srel = ? AND {self._LIVE}",
            (self.tenant, stype, sid, srel, self.revision, self.revision, self.now)):
            if expires is not None and expires < self.min_expiry:
                self.min_expiry = expires
            out.append((rtype, rid, relation))
        if relations is not None:
            wanted = set(relations)
            out = [o for o in out if (o[0], o[2]) in wanted]
        return out


class Engine:
    """One question's evaluation state: the schema, a snapshot, the caller's caveat context."""

    def __init__(self, schema: Schema, snap: Snapshot, context: dict[str, Any] | None = None,
                 max_depth: int = 50):
        self.schema = schema
        self.snap = snap
        self.context = context or {}
        self.max_depth = max_depth
        self._memo: dict[tuple[str, str, str, Subject], Result] = {}
        self._stack: set[tuple[str, str, str, Subject]] = set()
        self._cuts = 0
        self._caveat_memo: dict[tuple[str, str | None], Result] = {}
        self._converted: dict[str, dict[str, Any]] = {}
        self._index: _SchemaIndex | None = None
        self._expand_budget = MAX_EXPAND

    # ------------------------------------------------------------ caveats

    def caveat(self, name: str, row_context: str | None) -> Result:
        if not name:
            return R_HAS
        key = (name, row_context)
        hit = self._caveat_memo.get(key)
        if hit is not None:
            return hit
        cav = self.schema.caveats[name]
        values = dict(self._request_values(cav))
        if row_context:
            # Values written with the relationship take precedence over the request's (SpiceDB's rule).
            for k, v in json.loads(row_context).items():
                if k in cav.params:
                    values[k] = convert(cav.params[k], v, f"caveat {name} parameter {k}")
        missing = frozenset(p for p in cav.params if p not in values)
        try:
            out = cav.program.execute({**CEL_FUNCTIONS, **values})
        except RuntimeError as e:
            if missing and "Undefined variable" in str(e):
                res = Result(COND, missing)
                self._caveat_memo[key] = res
                return res
            raise AnvilError("InvalidArgument", f"caveat {name} failed to evaluate: {str(e).splitlines()[0]}") from None
        except (TypeError, ValueError, ArithmeticError) as e:
            # ArithmeticError: CEL's division by zero and 64-bit overflow (ZeroDivisionError, OverflowError)
            # are the caveat's failure on these values, not the server's.
            raise AnvilError("InvalidArgument", f"caveat {name} failed to evaluate: {str(e).splitlines()[0]}") from None
        if not isinstance(out, bool):
            raise AnvilError("InvalidArgument", f"caveat {name} yielded {type(out).__name__}, not a boolean")
        res = R_HAS if out else R_NO
        self._caveat_memo[key] = res
        return res

    def _request_values(self, cav: Caveat) -> dict[str, Any]:
        hit = self._converted.get(cav.name)
        if hit is None:
            hit = {k: convert(cav.params[k], v, f"context parameter {k} (caveat {cav.name})")
                   for k, v in self.context.items() if k in cav.params}
            self._converted[cav.name] = hit
        return hit

    # ------------------------------------------------------------ entry points

    # Evaluation recurses (relations, permission expressions, arrows). `max_depth` bounds the data's
    # nesting, but a long operator chain in a permission adds a Python frame per operator on top, so
    # the interpreter's own limit can come first: that is the same condition (too deep to answer),
    # reported as MaxDepthExceeded instead of escaping as an internal error.
    # (A try statement, not a context manager: `check` runs once per row a listing filters, and a
    # try costs nothing until it catches.)
    def check(self, rtype: str, rid: str, name: str, subject: Subject) -> Result:
        try:
            return self._check(rtype, rid, name, subject)
        except RecursionError:
            raise _too_deep(self.max_depth) from None

    def lookup_resources(self, rtype: str, permission: str, subject: Subject,
                         limit: int | None = None) -> list[tuple[str, Result]]:
        try:
            return self._lookup_resources(rtype, permission, subject, limit)
        except RecursionError:
            raise _too_deep(self.max_depth) from None

    def lookup_subjects(self, rtype: str, rid: str, permission: str, stype: str,
                        srel: str = "") -> list[dict[str, Any]]:
        try:
            return self._lookup_subjects(rtype, rid, permission, stype, srel)
        except RecursionError:
            raise _too_deep(self.max_depth) from None

    def expand(self, rtype: str, rid: str, name: str) -> dict[str, Any]:
        """The tree of `name` on the object. It is not memoised (every path is shown), so shared
        sub-trees repeat: data shaped as a diamond lattice doubles it at each level. Its size is
        bounded (nodes plus leaf subjects, MAX_EXPAND) so one request cannot hold a worker and the
        server's memory without end."""
        self._expand_budget = MAX_EXPAND
        try:
            return self._expand(rtype, rid, name)
        except RecursionError:
            raise _too_deep(self.max_depth) from None

    def _spend_expand(self, n: int) -> None:
        self._expand_budget -= n
        if self._expand_budget < 0:
            raise AnvilError("InvalidArgument", f"the expansion has more than {MAX_EXPAND} nodes and subjects; "
                                                "expand a narrower permission or a relation further down")

    # ------------------------------------------------------------ check

    def _check(self, rtype: str, rid: str, name: str, subject: Subject, depth: int = 0) -> Result:
        if subject[2] and (rtype, rid, name) == subject:
            return R_HAS  # a userset contains itself
        key = (rtype, rid, name, subject)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        if key in self._stack:
            self._cuts += 1
            return R_NO
        if depth > self.max_depth:
            raise depth_error(self.max_depth)
        d = self.schema.definitions.get(rtype)
        if d is None:
            return R_NO
        cuts = self._cuts
        self._stack.add(key)
        try:
            if name in d.relations:
                res = self._relation(rtype, rid, name, subject, depth)
            elif name in d.permissions:
                res = self._expr(d, rid, d.permissions[name].expr, subject, depth)
            else:
                res = R_NO
        finally:
            self._stack.discard(key)
        if self._cuts == cuts:
            # An answer computed while a cycle was cut short may be partial: only whole ones are kept.
            self._memo[key] = res
        return res

    def _relation(self, rtype: str, rid: str, rel: str, subject: Subject, depth: int) -> Result:
        st, sid, srel = subject
        acc = R_NO
        for row in self.snap.rows(rtype, rid, rel):
            if row.stype == st and row.srel == srel and (row.sid == sid or (row.sid == "*" and not srel)):
                r = R_HAS
            elif row.srel:
                r = self._check(row.stype, row.sid, row.srel, subject, depth + 1)
            else:
                continue
            if r.state != NO and row.caveat:
                r = r_and(r, self.caveat(row.caveat, row.context))
            acc = r_or(acc, r)
            if acc.state == HAS:
                return acc
        return acc

    def _expr(self, d: Definition, rid: str, e: Any, subject: Subject, depth: int) -> Result:
        if isinstance(e, Ref):
            return self._check(d.name, rid, e.name, subject, depth + 1)
        if isinstance(e, Op):
            left = self._expr(d, rid, e.left, subject, depth)
            if e.op == "union":
                return left if left.state == HAS else r_or(left, self._expr(d, rid, e.right, subject, depth))
            if e.op == "intersection":
                return left if left.state == NO else r_and(left, self._expr(d, rid, e.right, subject, depth))
            if left.state == NO:
                return left
            return r_and(left, r_not(self._expr(d, rid, e.right, subject, depth)))
        if isinstance(e, Arrow):
            rows = self.snap.rows(d.name, rid, e.tupleset)
            acc = R_NO if e.mode == "any" else R_HAS
            if not rows:
                return R_NO
            for row in rows:
                target = self.schema.definitions.get(row.stype)
                r = self._check(row.stype, row.sid, e.target, subject, depth + 1) \
                    if target is not None and target.has(e.target) else R_NO
                if r.state != NO and row.caveat:
                    r = r_and(r, self.caveat(row.caveat, row.context))
                acc = r_or(acc, r) if e.mode == "any" else r_and(acc, r)
                if (e.mode == "any" and acc.state == HAS) or (e.mode == "all" and acc.state == NO):
                    return acc
            return acc
        if isinstance(e, Nil):
            return R_NO
        raise AssertionError(f"unknown expression {e!r}")

    # ------------------------------------------------------------ lookup resources

    @property
    def index(self) -> _SchemaIndex:
        if self._index is None:
            self._index = _SchemaIndex(self.schema)
        return self._index

    def _lookup_resources(self, rtype: str, permission: str, subject: Subject,
                          limit: int | None = None) -> list[tuple[str, Result]]:
        """Resources of `rtype` on which `subject` has `permission`: candidates by walking the
        relationship graph backwards from the subject, each then decided by `check`."""
        candidates = sorted(self.resource_candidates(rtype, permission, subject))
        relations = self.index.local_relations(self.schema, rtype, permission)
        out: list[tuple[str, Result]] = []
        for n, rid in enumerate(candidates):
            if n % 500 == 0:
                # The candidates' own rows, 500 ids per query, instead of a few queries per check.
                self.snap.prefetch(rtype, candidates[n:n + 500], relations)
            r = self._check(rtype, rid, permission, subject)
            if r.state != NO:
                out.append((rid, r))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def resource_candidates(self, rtype: str, permission: str, subject: Subject) -> set[str]:
        idx = self.index
        st, sid, srel = subject
        seen: set[tuple[str, str, str]] = set()
        queue: list[tuple[str, str, str]] = []

        def add(node: tuple[str, str, str]) -> None:
            if node not in seen:
                seen.add(node)
                queue.append(node)

        if srel:
            add(subject)
        for node in self.snap.resources_with_subject(st, sid, srel):
            add(node)
        if not srel and sid != "*":
            for node in self.snap.resources_with_subject(st, "*", ""):
                add(node)
        while queue:
            if len(seen) > 1_000_000:
                raise AnvilError("InvalidArgument", "lookup reached more than a million relations; narrow it")
            t, i, name = queue.pop()
            if (t, name) in idx.usersets:  # usersets naming this one (only if some relation allows them)
                for node in self.snap.resources_with_subject(t, i, name):
                    add(node)
            for perm in idx.refs.get((t, name), ()):  # permissions of the same object using it
                add((t, i, perm))
            for rt, perm, ts in idx.arrows.get((t, name), ()):  # arrows walking to it
                for node in self.snap.resources_with_subject(t, i, "", [(rt, ts)]):
                    add((node[0], node[1], perm))
        return {i for (t, i, n) in seen if t == rtype and n == permission}

    # ------------------------------------------------------------ lookup subjects

    def _lookup_subjects(self, rtype: str, rid: str, permission: str, stype: str,
                         srel: str = "") -> list[dict[str, Any]]:
        """Subjects of `stype` (`#srel`) with `permission` on the resource; a wildcard answer lists
        the subjects it excludes."""
        candidates: set[str] = set()
        seen: set[tuple[str, str, str]] = set()
        stack = [(rtype, rid, permission)]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if len(seen) > 1_000_000:
                raise AnvilError("InvalidArgument", "lookup reached more than a million relations; narrow it")
            t, i, name = node
            d = self.schema.definitions.get(t)
            if d is None:
                continue
            if srel and t == stype and name == srel:
                candidates.add(i)
            if name in d.relations:
                for row in self.snap.rows(t, i, name):
                    if row.stype == stype and row.srel == srel:
                        candidates.add(row.sid)
                    if row.srel:
                        stack.append((row.stype, row.sid, row.srel))
            elif name in d.permissions:
                for leaf in _leaves(d.permissions[name].expr):
                    if isinstance(leaf, Ref):
                        stack.append((t, i, leaf.name))
                    else:
                        for row in self.snap.rows(t, i, leaf.tupleset):
                            target = self.schema.definitions.get(row.stype)
                            if target is not None and target.has(leaf.target):
                                stack.append((row.stype, row.sid, leaf.target))
        out: list[dict[str, Any]] = []
        failed: list[str] = []
        for sid in sorted(candidates - {"*"}):
            r = self._check(rtype, rid, permission, (stype, sid, srel))
            if r.state == NO:
                failed.append(sid)
            else:
                out.append(_subject_answer(stype, sid, srel, r))
        if "*" in candidates:
            r = self._check(rtype, rid, permission, (stype, "*", ""))
            if r.state != NO:
                ans = _subject_answer(stype, "*", "", r)
                ans["excluded"] = [f"{stype}:{s}" for s in failed]
                out.append(ans)
        return out

    # ------------------------------------------------------------ expand

    def _expand(self, rtype: str, rid: str, name: str, depth: int = 0,
                path: frozenset[tuple[str, str, str]] = frozenset()) -> dict[str, Any]:
        node = (rtype, rid, name)
        label = f"{rtype}:{rid}#{name}"
        if node in path:
            return {"object": label, "cycle": True}
        if depth > self.max_depth:
            raise depth_error(self.max_depth)
        d = self.schema.definitions.get(rtype)
        if d is None or not d.has(name):
            return {"object": label, "leaf": []}
        path = path | {node}
        self._spend_expand(1)
        if name in d.relations:
            subjects, children = [], []
            rows = self.snap.rows(rtype, rid, name)
            self._spend_expand(len(rows))
            for row in rows:
                s = {"subject": f"{row.stype}:{row.sid}" + (f"#{row.srel}" if row.srel else "")}
                if row.caveat:
                    s["caveat"] = row.caveat
                if row.expires is not None:
                    s["expires"] = row.expires
                subjects.append(s)
                if row.srel:
                    children.append(self._expand(row.stype, row.sid, row.srel, depth + 1, path))
            out: dict[str, Any] = {"object": label, "leaf": subjects}
            if children:
                out["children"] = children
            return out
        return {"object": label, "expression": self._expand_expr(d, rid, d.permissions[name].expr, depth, path)}

    def _expand_expr(self, d: Definition, rid: str, e: Any, depth: int,
                     path: frozenset[tuple[str, str, str]]) -> dict[str, Any]:
        if isinstance(e, Ref):
            return self._expand(d.name, rid, e.name, depth + 1, path)
        if isinstance(e, Nil):
            return {"nil": True}
        if isinstance(e, Op):
            return {e.op: [self._expand_expr(d, rid, e.left, depth, path),
                           self._expand_expr(d, rid, e.right, depth, path)]}
        children = []
        for row in self.snap.rows(d.name, rid, e.tupleset):
            target = self.schema.definitions.get(row.stype)
            if target is not None and target.has(e.target):
                children.append(self._expand(row.stype, row.sid, e.target, depth + 1, path))
        return {"arrow": f"{e.tupleset}->{e.target}" if e.mode == "any" else f"{e.tupleset}.all({e.target})",
                "children": children}


def _too_deep(limit: int) -> AnvilError:
    """What a RecursionError in an evaluation is answered with."""
    return AnvilError("MaxDepthExceeded",
                      f"evaluation nested too deeply to answer (the data's bound is {limit} levels; the schema's "
                      "permissions chain too many operators and permissions on top of it)")


def _subject_answer(stype: str, sid: str, srel: str, r: Result) -> dict[str, Any]:
    a: dict[str, Any] = {"subject": f"{stype}:{sid}" + (f"#{srel}" if srel else ""), "permissionship": r.name}
    if r.state == COND:
        a["missing_context"] = sorted(r.missing)
    return a


def _leaves(e: Any) -> list[Any]:
    if isinstance(e, Op):
        return _leaves(e.left) + _leaves(e.right)
    if isinstance(e, (Ref, Arrow)):
        return [e]
    return []


class _SchemaIndex:
    """Reverse edges of the schema for walking from a subject up to resources.

    refs[(type, name)]: permissions of `type` whose expression names `name` directly;
    arrows[(subject type, target)]: (resource type, permission, tupleset) for each arrow
    `tupleset->target` whose tupleset relation allows `subject type`.
    """

    def __init__(self, schema: Schema):
        self.refs: dict[tuple[str, str], list[str]] = {}
        self.arrows: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
        # (type, relation) pairs some relation allows as a subject (`group#member`).
        self.usersets = {(t.type, t.relation) for d in schema.definitions.values()
                         for r in d.relations.values() for t in r.types if t.relation}
        self._local: dict[tuple[str, str], list[str]] = {}
        for d in schema.definitions.values():
            for p in d.permissions.values():
                for leaf in _leaves(p.expr):
                    if isinstance(leaf, Ref):
                        self.refs.setdefault((d.name, leaf.name), []).append(p.name)
                    else:
                        for t in d.relations[leaf.tupleset].types:
                            lst = self.arrows.setdefault((t.type, leaf.target), [])
                            if (d.name, p.name, leaf.tupleset) not in lst:
                                lst.append((d.name, p.name, leaf.tupleset))

    def local_relations(self, schema: Schema, rtype: str, name: str) -> list[str]:
        """The relations of `rtype` that evaluating `name` reads on the object itself (through its
        permissions, and the tuplesets of its arrows)."""
        key = (rtype, name)
        if key not in self._local:
            d = schema.definitions[rtype]
            found: list[str] = []
            todo, seen = [name], set()
            while todo:
                n = todo.pop()
                if n in seen:
                    continue
                seen.add(n)
                if n in d.relations:
                    found.append(n)
                elif n in d.permissions:
                    for leaf in _leaves(d.permissions[n].expr):
                        todo.append(leaf.name if isinstance(leaf, Ref) else leaf.tupleset)
            self._local[key] = sorted(found)
        return self._local[key]

