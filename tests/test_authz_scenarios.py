"""Scenarios written from SpiceDB's documented semantics, as data (tests/authz_scenarios/*.yaml).

The files use SpiceDB's validation-file layout — `schema`, `relationships` (one per line, in
the text form), `assertions` with `assertTrue`, `assertFalse` and `assertCaveated`, where
`... with {json}` supplies caveat context — plus these keys of ours:

- `missingContext`: check -> the parameter names a conditional answer must name;
- `lookupResources`: `type#permission@subject [with {json}]` -> the resource ids (`id?` = conditional);
- `lookupSubjects`: `type:id#permission@subject_type[#relation] [with {json}]` -> subjects
  (`s?` = conditional, `user:* - [user:a, ...]` = the wildcard and the subjects it excludes);
- `errors`: check -> the error code it must raise;
- `chain: N`: also writes groups g0..gN, each gI#member holding g(I-1)#member, and g0 holding
  user:deep (for the depth bound).

Each scenario runs in its own tenant of one real store, through the service every API route uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from anvil.context import Principal, RequestContext
from anvil.errors import AnvilError
from anvil.runtime import Anvil

HERE = Path(__file__).parent / "authz_scenarios"
FILES = sorted(HERE.glob("*.yaml"))
_CHECK = re.compile(r"^(?P<res>[^#\s]+)#(?P<perm>[a-z_]+)@(?P<subj>\S+?)(?:\s+with\s+(?P<ctx>\{.*\}))?$")
_LR = re.compile(r"^(?P<type>[a-z_/]+)#(?P<perm>[a-z_]+)@(?P<subj>\S+?)(?:\s+with\s+(?P<ctx>\{.*\}))?$")
_LS = re.compile(r"^(?P<res>[^#\s]+)#(?P<perm>[a-z_]+)@(?P<stype>[a-z_/]+)(?:#(?P<srel>[a-z_]+))?"
                 r"(?:\s+with\s+(?P<ctx>\{.*\}))?$")


@pytest.fixture(scope="module")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anvil]:
    import os

    os.environ.setdefault("ANVIL_ARGON2_FAST", "1")
    a = Anvil(tmp_path_factory.mktemp("authz") / "data")
    try:
        yield a
    finally:
        a.close()


def _principal(tenant: str) -> Principal:
    return Principal(tenant=tenant, subject="scenario", scopes=(f"authz:*|tenant:{tenant}",))


_LOADED: dict[tuple[int, str], tuple[dict[str, Any], Principal]] = {}


def _load(anvil: Anvil, path: Path) -> tuple[dict[str, Any], Principal]:
    """Write the scenario into its own tenant once per store (tests may run in any order or worker)."""
    key = (id(anvil), path.stem)
    if key not in _LOADED:
        _LOADED[key] = _write_scenario(anvil, path)
    return _LOADED[key]


def _write_scenario(anvil: Anvil, path: Path) -> tuple[dict[str, Any], Principal]:
    data = yaml.safe_load(path.read_text())
    tenant = "sc-" + path.stem.replace("_", "-")
    p = _principal(tenant)
    ctx = RequestContext(p)
    anvil.authz.write_schema(ctx, data["schema"])
    lines = [ln.strip() for ln in data.get("relationships", "").splitlines() if ln.strip()]
    if data.get("chain"):
        n = int(data["chain"])
        lines += ["group:g0#member@user:deep"] + [f"group:g{i}#member@group:g{i - 1}#member" for i in range(1, n + 1)]
    for i in range(0, len(lines), 500):
        anvil.authz.write_relationships(ctx, [{"operation": "create", "relationship": t} for t in lines[i:i + 500]])
    return data, p


def _ctx(raw: str | None) -> dict[str, Any] | None:
    return json.loads(raw) if raw else None


def _check(anvil: Anvil, p: Principal, text: str) -> dict[str, Any]:
    m = _CHECK.match(text)
    assert m, f"bad assertion {text!r}"
    return anvil.authz.check(p, m["res"], m["perm"], m["subj"], context=_ctx(m["ctx"]),
                             consistency="fully_consistent")


def _cases() -> list[Any]:
    return [pytest.param(f, id=f.stem) for f in FILES]


@pytest.mark.parametrize("path", _cases())
def test_scenario(anvil: Anvil, path: Path) -> None:
    data, p = _load(anvil, path)
    checked = 0
    want_state = {"assertTrue": "has_permission", "assertFalse": "no_permission", "assertCaveated": "conditional"}
    for key, state in want_state.items():
        for text in data.get("assertions", {}).get(key, []) or []:
            got = _check(anvil, p, text)
            assert got["permissionship"] == state, f"{path.stem}: {text}: {got}"
            checked += 1
    for text, missing in (data.get("missingContext") or {}).items():
        got = _check(anvil, p, text)
        assert got["permissionship"] == "conditional" and got["missing_context"] == sorted(missing), (text, got)
        checked += 1
    for text, code in (data.get("errors") or {}).items():
        with pytest.raises(AnvilError) as e:
            _check(anvil, p, text)
        assert e.value.code == code, f"{text}: {e.value.code}: {e.value.message}"
        checked += 1
    for text, want in (data.get("lookupResources") or {}).items():
        m = _LR.match(text)
        assert m, text
        got = anvil.authz.lookup_resources(p, m["type"], m["perm"], m["subj"], context=_ctx(m["ctx"]))
        shown = sorted(r["resource_id"] + ("?" if r["permissionship"] == "conditional" else "")
                       for r in got["resources"])
        assert shown == sorted(want), f"{path.stem}: lookup {text}: {shown}"
        checked += 1
    for text, want in (data.get("lookupSubjects") or {}).items():
        m = _LS.match(text)
        assert m, text
        got = anvil.authz.lookup_subjects(p, m["res"], m["perm"], m["stype"], subject_relation=m["srel"],
                                          context=_ctx(m["ctx"]))
        shown = []
        for s in got["subjects"]:
            label = s["subject"] + ("?" if s["permissionship"] == "conditional" else "")
            if "excluded" in s and s["excluded"]:
                label += " - [" + ", ".join(s["excluded"]) + "]"
            shown.append(label)
        assert sorted(shown) == sorted(want), f"{path.stem}: lookup subjects {text}: {shown}"
        checked += 1
    assert checked >= 5, f"{path.stem} asserts almost nothing"


def test_every_lookup_agrees_with_check(anvil: Anvil) -> None:
    """Lookup resources finds exactly the resources check allows, over every resource and user
    the nested-groups and folder scenarios mention."""
    for name in ("nested_groups", "folders", "intersection_exclusion", "wildcards"):
        data, p = _load(anvil, HERE / f"{name}.yaml")
        text = data["relationships"]
        users = sorted(set(re.findall(r"@user:([a-z0-9]+)", text)) | {"stranger"})
        docs = sorted(set(re.findall(r"^document:([a-z0-9]+)#", text, re.M)))
        schema = anvil.authz.read_schema(p)["schema"]
        perms = re.findall(r"permission ([a-z_]+) =", schema.split("definition document")[1])
        for user in users:
            for perm in perms:
                found = {r["resource_id"] for r in anvil.authz.lookup_resources(
                    p, "document", perm, f"user:{user}")["resources"]}
                allowed = {d for d in docs if anvil.authz.check(
                    p, f"document:{d}", perm, f"user:{user}")["permissionship"] == "has_permission"}
                assert found == allowed, (name, user, perm)


def test_bulk_check_and_expand(anvil: Anvil) -> None:
    _, p = _load(anvil, HERE / "nested_groups.yaml")
    _, cycles = _load(anvil, HERE / "cycles.yaml")
    res = anvil.authz.bulk_check(p, [
        {"resource": "document:roadmap", "permission": "view", "subject": "user:amy"},
        {"resource": "document:design", "permission": "view", "subject": "user:amy"},
        {"resource": "document:roadmap", "permission": "bogus", "subject": "user:amy"},
    ])
    assert [r.get("permissionship") for r in res["results"]] == ["has_permission", "no_permission", None]
    assert res["results"][2]["error"]["code"] == "InvalidArgument"
    tree = anvil.authz.expand(p, "document:roadmap", "view")["tree"]
    flat = json.dumps(tree)
    assert '"object": "document:roadmap#viewer"' in flat and '"subject": "user:amy"' in flat
    assert '"object": "group:backend#member"' in flat  # nested groups are expanded
    cyc = anvil.authz.expand(cycles, "group:alpha", "member")["tree"]
    assert '"cycle": true' in json.dumps(cyc)
