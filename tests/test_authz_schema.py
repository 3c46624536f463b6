"""The SpiceDB schema language: what loads, the model it builds, and errors that name line and column."""

from __future__ import annotations

import pytest

from anvil.authz import relationships as rels
from anvil.authz.schema import Arrow, Nil, Op, Ref, expr_text, parse
from anvil.errors import AnvilError

# A schema in SpiceDB's own style, using every construct the issue lists.
SPICEDB_SCHEMA = """
use expiration

/** user is a person */
definition user {}

// teams nest
definition team/group {
    relation member: user | team/group#member | user with expiration
}

/*
 * folders nest, documents live in folders
 */
definition folder {
    relation parent: folder
    relation viewer: user | user:* | team/group#member with ip_allowlist
    permission view = viewer + parent->view
    permission view_every = parent.all(view)
    permission view_any = parent.any(view)
}

definition document {
    relation folder: folder
    relation owner: user
    relation viewer: user | team/group#member with during_window and expiration
    relation banned: user
    permission edit = owner & folder->view
    permission view = (viewer + edit + folder->view) - banned
    permission nothing = nil
}

caveat ip_allowlist(user_ip ipaddress, allowed list<string>) {
    allowed.exists(cidr, user_ip.in_cidr(cidr))
}

caveat during_window(now timestamp, start timestamp, length duration, tags map<list<string>>, n uint,
                     d double, flag bool, raw bytes, any_value any, count int, label string) {
    now >= start && now < start + length
}
"""


def test_a_spicedb_schema_loads_unchanged() -> None:
    s = parse(SPICEDB_SCHEMA)
    assert sorted(s.definitions) == ["document", "folder", "team/group", "user"]
    assert s.uses == {"expiration"}
    member = s.relation("team/group", "member")
    assert [str(t) for t in member.types] == ["user", "team/group#member", "user with expiration"]
    viewer = s.relation("document", "viewer")
    assert [str(t) for t in viewer.types] == ["user", "team/group#member with during_window and expiration"]
    assert [str(t) for t in s.relation("folder", "viewer").types] == [
        "user", "user:*", "team/group#member with ip_allowlist"]
    doc = s.definitions["document"]
    assert expr_text(doc.permissions["view"].expr) == "((viewer + edit) + folder->view) - banned".join(["(", ")"])
    assert doc.permissions["edit"].expr == Op("intersection", Ref("owner"), Arrow("folder", "view", "any"))
    assert doc.permissions["nothing"].expr == Nil()
    folder = s.definitions["folder"]
    assert folder.permissions["view_every"].expr == Arrow("parent", "view", "all")
    assert folder.permissions["view_any"].expr == Arrow("parent", "view", "any")
    assert str(s.caveats["ip_allowlist"].params["allowed"]) == "list<string>"
    assert str(s.caveats["during_window"].params["tags"]) == "map<list<string>>"


def test_operators_share_one_precedence_and_associate_left() -> None:
    s = parse("definition user {}\ndefinition doc {\n relation aaa: user\n relation bbb: user\n relation ccc: user\n"
              " permission pone = aaa - bbb + ccc\n permission ptwo = aaa + bbb - ccc\n"
              " permission pthree = aaa + (bbb - ccc)\n}")
    d = s.definitions["doc"]
    assert expr_text(d.permissions["pone"].expr) == "((aaa - bbb) + ccc)"
    assert expr_text(d.permissions["ptwo"].expr) == "((aaa + bbb) - ccc)"
    assert expr_text(d.permissions["pthree"].expr) == "(aaa + (bbb - ccc))"


def test_caveat_bodies_may_hold_braces_and_strings_with_braces() -> None:
    s = parse('caveat map_check(m map<int>) {\n  {"a": {"b": 1}}["a"]["b"] == 1 && "}" != "{" && m["x"] == 1\n}')
    assert s.caveats["map_check"].program.execute({"m": {"x": 1}}) is True


@pytest.mark.parametrize("text, line, column, words", [
    ("definition user {", 1, 18, "unexpected end"),
    ("definition user {}\ndefinition doc {\n  relation viewer: user\n  permission view = viewer + writer\n}",
     4, 30, "'writer' is not a relation or permission"),
    ("definition doc {\n  relation viewer: person\n}", 2, 20, "unknown definition 'person'"),
    ("definition user {}\ndefinition doc {\n  relation viewer: user#friend\n}", 3, 20, "has no relation"),
    ("definition user {}\ndefinition doc {\n  relation viewer: user with nocaveat\n}", 3, 20, "unknown caveat"),
    ("definition user {}\ndefinition doc {\n  relation viewer: user @\n}", 3, 25, "unexpected character '@'"),
    ("definition user {}\ndefinition doc {\n  relation viewer: user\n  permission view = viewer->nope\n}",
     4, 21, "has 'nope'"),
    ("definition user {}\ndefinition doc {\n  relation viewer: user\n  permission view = view->viewer\n}",
     4, 21, "left of an arrow must be a relation"),
    ("definition user {}\ndefinition user {}", 2, 12, "defined twice"),
    ("definition user {}\ndefinition doc {\n  relation viewer: user\n  relation viewer: user\n}", 4, 12, "twice"),
    ("caveat bad_cel(a int) {\n  a >\n}", 3, None, "invalid CEL"),
    ("caveat bad_type(a lst<int>) { a }", 1, 19, "unknown caveat parameter type 'lst'"),
    ("caveat bad_args(a list) { a }", 1, 19, "takes 1 type argument"),
    ("caveat unknown_fn(a int) { frobnicate(a) }", 1, 26, "unknown function(s) frobnicate"),
    ("definition user {}\ndefinition doc {\n  relation viewer: user\n  permission view = viewer.some(viewer)\n}",
     4, 28, "unknown arrow function 'some'"),
    ("definition Bad {}", 1, 12, "invalid definition name"),
    ("use magic", 1, 5, "unknown feature"),
])
def test_errors_name_line_and_column(text: str, line: int, column: int | None, words: str) -> None:
    with pytest.raises(AnvilError) as e:
        parse(text)
    assert e.value.code == "InvalidArgument"
    assert words in e.value.message
    assert e.value.line == line  # type: ignore[attr-defined]
    if column is not None:
        assert e.value.column == column  # type: ignore[attr-defined]
    assert f"line {line}, column" in e.value.message


@pytest.mark.parametrize("text, want", [
    ("document:readme#viewer@user:amy", "document:readme#viewer@user:amy"),
    ("document:readme#viewer@team/group:eng#member", "document:readme#viewer@team/group:eng#member"),
    ("document:readme#viewer@user:*", "document:readme#viewer@user:*"),
    ("document:readme#viewer@user:amy#...", "document:readme#viewer@user:amy"),
    ('document:a/b.txt#viewer@user:amy[during_window:{"start":"2025-01-01T00:00:00Z"}]',
     'document:a/b.txt#viewer@user:amy[during_window:{"start":"2025-01-01T00:00:00Z"}]'),
    ("document:readme#viewer@user:amy[during_window]", "document:readme#viewer@user:amy[during_window]"),
    ("document:readme#viewer@user:amy[expiration:2030-01-01T00:00:00Z]",
     "document:readme#viewer@user:amy[expiration:2030-01-01T00:00:00Z]"),
])
def test_relationship_text_form_round_trips(text: str, want: str) -> None:
    assert rels.parse(text).text() == want


@pytest.mark.parametrize("text, position", [
    ("document:read me#viewer@user:amy", 14),
    ("document:readme#viewer", 23),
    ("document:readme#viewer@user:amy[cav:{bad}]", 37),
    ("document:readme#viewer@user:amy[expiration:soon]", 44),
    ("document:readme#viewer@user:amy junk", 32),
])
def test_malformed_relationships_name_the_position(text: str, position: int) -> None:
    with pytest.raises(AnvilError) as e:
        rels.parse(text)
    assert e.value.code == "InvalidArgument" and f"character {position}" in e.value.message


def test_relationships_are_validated_against_the_schema() -> None:
    s = parse(SPICEDB_SCHEMA)
    ok = ["document:d#viewer@user:amy", "folder:f#viewer@user:*", "document:d#viewer@team/group:eng#member"
          '[during_window:{"start":"2025-01-01T00:00:00Z","length":"1h"}][expiration:2030-01-01T00:00:00Z]',
          "team/group:eng#member@user:amy[expiration:2030-01-01T00:00:00Z]"]
    for text in ok:
        rels.validate(s, rels.parse(text), "x")
    bad = {
        "paper:d#viewer@user:amy": "unknown resource type",
        "document:d#view@user:amy": "is a permission",
        "document:d#reader@user:amy": "is unknown",
        "document:d#viewer@robot:r2": "unknown subject type",
        "document:d#viewer@user:*": "not allowed",
        "document:d#viewer@team/group:eng#member": "not allowed",  # the type requires its caveat
        "document:d#owner@user:amy[expiration:2030-01-01T00:00:00Z]": "not allowed",
        'folder:f#viewer@team/group:eng#member[ip_allowlist:{"user_ip":"not-an-ip"}]': "expected an IP address",
        'folder:f#viewer@team/group:eng#member[ip_allowlist:{"allowed":"10.0.0.0/8"}]': "expected a list",
        'folder:f#viewer@team/group:eng#member[ip_allowlist:{"extra":1}]': "has no parameter 'extra'",
    }
    for text, words in bad.items():
        with pytest.raises(AnvilError) as e:
            rels.validate(s, rels.parse(text), "updates[0]")
        assert words in e.value.message and e.value.message.startswith("updates[0]"), (text, e.value.message)
