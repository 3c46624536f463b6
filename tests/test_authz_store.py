"""The relationship store on a real catalog: batches, preconditions, filters, paging, expiration,
journal events, revisions and consistency tokens, schema changes that would orphan relationships."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from anvil.context import DEV_PRINCIPAL, Principal, RequestContext
from anvil.errors import AnvilError
from anvil.runtime import Anvil
from anvil.storage import journal
from anvil.watch import make_scope
from anvil.watch.events import ReadFilter, project

SCHEMA = """
use expiration
definition user {}
definition group {
    relation member: user | group#member
}
definition document {
    relation viewer: user | user with expiration | group#member
    relation owner: user
    permission view = viewer + owner
}
"""

ADMIN = DEV_PRINCIPAL
CTX = RequestContext(ADMIN)


@pytest.fixture
def anvil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Anvil]:
    monkeypatch.setenv("ANVIL_ARGON2_FAST", "1")
    a = Anvil(tmp_path / "data")
    a.authz.write_schema(CTX, SCHEMA)
    try:
        yield a
    finally:
        a.close()


def _write(a: Anvil, *texts: str, op: str = "touch", **kw) -> dict:
    return a.authz.write_relationships(CTX, [{"operation": op, "relationship": t} for t in texts], **kw)


def _all(a: Anvil, **flt) -> list[str]:
    return [r["relationship"] for r in a.authz.read_relationships(
        ADMIN, {"resource_type": "document", **flt}, consistency="fully_consistent", limit=1000)["relationships"]]


def _journal(a: Anvil) -> list:
    """Events as watchers see them (the journal, projected by the watch subsystem)."""
    return [project(e) for e in journal.read(a.storage.catalog.reader(), 0, 10_000) if e.kind.startswith("authz.")]


def test_a_batch_is_one_journal_event_and_returns_a_token(anvil: Anvil) -> None:
    before = len(_journal(anvil))
    res = _write(anvil, "document:a#viewer@user:amy", "document:a#viewer@user:bob", "document:b#owner@user:amy",
                 op="create")
    assert res["changed"] == 3 and res["written_at"].startswith(f"z1.{res['revision']}.")
    events = _journal(anvil)
    assert len(events) == before + 1
    ev = events[-1]
    assert ev.kind == "authz.relationships.write" and ev.seq == res["revision"]
    assert [u["relationship"] for u in ev.data["updates"]] == [
        "document:a#viewer@user:amy", "document:a#viewer@user:bob", "document:b#owner@user:amy"]


def test_create_touch_delete(anvil: Anvil) -> None:
    _write(anvil, "document:a#viewer@user:amy", op="create")
    with pytest.raises(AnvilError) as e:
        _write(anvil, "document:a#viewer@user:amy", "document:a#viewer@user:bob", op="create")
    assert e.value.code == "AlreadyExists" and "updates[0]" in e.value.message
    assert _all(anvil) == ["document:a#viewer@user:amy"]  # the failed batch wrote nothing
    _write(anvil, "document:a#viewer@user:amy", "document:a#viewer@user:bob", op="touch")
    assert _all(anvil) == ["document:a#viewer@user:amy", "document:a#viewer@user:bob"]
    res = _write(anvil, "document:a#viewer@user:amy", "document:a#viewer@user:nobody", op="delete")
    assert res["changed"] == 1
    assert _all(anvil) == ["document:a#viewer@user:bob"]


def test_bad_input_names_the_update_and_writes_nothing(anvil: Anvil) -> None:
    head = anvil.storage.catalog.head()
    cases = {
        "document:a#viewer@user:amy#": "updates[1]: malformed relationship at character 27",
        "paper:a#viewer@user:amy": "updates[1]: unknown resource type 'paper'",
        "document:a#view@user:amy": "updates[1]: relation document#view is a permission",
        "document:a#viewer@user:*": "updates[1]: subject user:* is not allowed",
        "document:a#owner@user:amy[expiration:2030-01-01T00:00:00Z]": "with expiration is not allowed",
    }
    for text, words in cases.items():
        with pytest.raises(AnvilError) as e:
            _write(anvil, "document:ok#viewer@user:amy", text)
        assert e.value.code == "InvalidArgument" and words in e.value.message, e.value.message
    with pytest.raises(AnvilError) as e:
        _write(anvil, *[f"document:d{i}#viewer@user:amy" for i in range(1001)])
    assert "at most 1000" in e.value.message
    with pytest.raises(AnvilError) as e:
        _write(anvil, "document:a#viewer@user:amy", "document:a#viewer@user:amy")
    assert "the same relationship as updates[0]" in e.value.message
    assert anvil.storage.catalog.head() == head and _all(anvil) == []


def test_preconditions(anvil: Anvil) -> None:
    _write(anvil, "document:a#owner@user:amy")
    must = [{"operation": "must_match", "filter": {"resource_type": "document", "resource_id": "a",
                                                   "relation": "owner", "subject_id": "amy"}}]
    _write(anvil, "document:a#viewer@user:bob", preconditions=must)
    must_not = [{"operation": "must_not_match", "filter": {"resource_type": "document", "relation": "owner"}}]
    head = anvil.storage.catalog.head()
    with pytest.raises(AnvilError) as e:
        _write(anvil, "document:a#viewer@user:carl", preconditions=must_not)
    assert e.value.code == "PreconditionFailed" and "preconditions[0] (must_not_match" in e.value.message
    missing = [{"operation": "must_match", "filter": {"resource_type": "document", "subject_id": "zed"}}]
    with pytest.raises(AnvilError) as e:
        anvil.authz.delete_relationships(CTX, {"resource_type": "document"}, missing)
    assert e.value.code == "PreconditionFailed"
    assert anvil.storage.catalog.head() == head
    assert _all(anvil) == ["document:a#owner@user:amy", "document:a#viewer@user:bob"]


def test_delete_and_read_by_filter_with_paging(anvil: Anvil) -> None:
    _write(anvil, *[f"document:d{i:03}#viewer@user:u{i % 7}" for i in range(250)])
    page, seen, cursor = 0, [], None
    while True:
        res = anvil.authz.read_relationships(ADMIN, {"resource_type": "document"}, limit=40, cursor=cursor)
        seen += [r["relationship"] for r in res["relationships"]]
        page += 1
        if page == 2:
            _write(anvil, "document:zzz#viewer@user:late")  # a later write does not leak into the snapshot
        cursor = res["cursor"]
        if cursor is None:
            break
    assert page == 7 and len(seen) == 250 and seen == sorted(seen)
    assert len(_all(anvil, subject_id="u3")) == len([i for i in range(250) if i % 7 == 3])
    with pytest.raises(AnvilError) as e:
        anvil.authz.delete_relationships(CTX, {"resource_type": "document", "relation": "viewer"}, limit=100)
    assert "more than 100 relationships match" in e.value.message
    res = anvil.authz.delete_relationships(CTX, {"resource_type": "document", "subject_id": "u3"})
    assert res["deleted"] == 36 and not res["partial"]
    res = anvil.authz.delete_relationships(CTX, {"resource_type": "document"}, limit=100, allow_partial=True)
    assert res["deleted"] == 100 and res["partial"]
    assert len(_all(anvil)) == 250 - 36 - 100 + 1
    with pytest.raises(AnvilError) as e:
        anvil.authz.read_relationships(ADMIN, {"resource_type": "document", "colour": "red"})
    assert "unknown filter field" in e.value.message
    with pytest.raises(AnvilError):
        anvil.authz.read_relationships(ADMIN, {"resource_type": "document"}, cursor="garbage!")


def test_expired_relationships_are_absent(anvil: Anvil) -> None:
    soon = time.time() + 1.0
    anvil.authz.write_relationships(CTX, [
        {"operation": "touch", "relationship": "document:a#viewer@user:amy", "expires_at": soon},
        {"operation": "touch", "relationship": "document:a#viewer@user:bob[expiration:2100-01-01T00:00:00Z]"}])
    check = lambda who: anvil.authz.check(ADMIN, "document:a", "view", who)["permissionship"]  # noqa: E731
    assert check("user:amy") == "has_permission"
    rows = anvil.authz.read_relationships(ADMIN, {"resource_type": "document"})["relationships"]
    assert rows[0]["relationship"].startswith("document:a#viewer@user:amy[expiration:")
    time.sleep(max(0.0, soon - time.time()) + 0.05)
    assert check("user:amy") == "no_permission"  # the cached answer lapsed with the relationship
    assert check("user:bob") == "has_permission"
    assert _all(anvil) == ["document:a#viewer@user:bob[expiration:2100-01-01T00:00:00Z]"]
    _write(anvil, "document:a#viewer@user:amy", op="create")  # an expired one does not block a create


def test_consistency_tokens(anvil: Anvil) -> None:
    first = _write(anvil, "document:a#viewer@user:amy")["written_at"]
    second = _write(anvil, "document:a#viewer@user:amy", op="delete")["written_at"]
    check = lambda c: anvil.authz.check(ADMIN, "document:a", "view", "user:amy", consistency=c)  # noqa: E731
    assert check({"at_exact_snapshot": first})["permissionship"] == "has_permission"
    assert check({"at_exact_snapshot": second})["permissionship"] == "no_permission"
    assert check({"at_least_as_fresh": first})["permissionship"] == "no_permission"
    assert check("fully_consistent")["checked_at"] == second
    assert check("minimize_latency")["permissionship"] == "no_permission"
    rev = int(second.split(".")[1])
    for token, words in [(f"z1.{rev + 1000}.{anvil.authz.deployment}", "cannot be honoured"),
                         (f"z1.{rev}.another-store", "issued by another store"), ("nonsense", "malformed")]:
        for mode in ("at_exact_snapshot", "at_least_as_fresh"):
            with pytest.raises(AnvilError) as e:
                check({mode: token})
            assert e.value.code == "InvalidArgument" and words in e.value.message
    with pytest.raises(AnvilError):
        check("sometimes")
    # Reading relationships at the old snapshot sees the old state.
    old = anvil.authz.read_relationships(ADMIN, {"resource_type": "document"}, consistency={"at_exact_snapshot": first})
    assert [r["relationship"] for r in old["relationships"]] == ["document:a#viewer@user:amy"]


def test_schema_changes_that_would_orphan_relationships_are_refused(anvil: Anvil) -> None:
    _write(anvil, "document:a#owner@user:amy", "group:g#member@user:amy")
    head = anvil.storage.catalog.head()
    without_owner = SCHEMA.replace("relation owner: user\n", "").replace("viewer + owner", "viewer")
    with pytest.raises(AnvilError) as e:
        anvil.authz.write_schema(CTX, without_owner)
    assert e.value.code == "PreconditionFailed" and "orphan" in e.value.message and "document#owner" in e.value.message
    narrower = SCHEMA.replace("relation member: user | group#member", "relation member: group#member")
    with pytest.raises(AnvilError) as e:
        anvil.authz.write_schema(CTX, narrower)
    assert "group#member@user" in e.value.message
    assert anvil.storage.catalog.head() == head
    _write(anvil, "document:a#owner@user:amy", op="delete")
    anvil.authz.write_schema(CTX, without_owner)  # nothing depends on it any more
    assert "relation owner" not in anvil.authz.read_schema(ADMIN)["schema"]


def test_authz_events_stream_through_watch_to_a_tenant_reader(anvil: Anvil) -> None:
    acme = RequestContext(Principal("acme", "app", scopes=("authz:*|tenant:acme", "bucket:list|tenant:acme")))
    anvil.authz.write_schema(acme, SCHEMA)
    anvil.authz.write_relationships(acme, [{"operation": "touch", "relationship": "document:x#viewer@user:amy"}])
    scope = make_scope(acme.principal, kinds="authz.*")
    seen = [e for e in _journal(anvil) if ReadFilter(acme.principal).visible(scope, e)]
    assert [e.kind for e in seen] == ["authz.schema.write", "authz.relationships.write"]
    assert seen[1].data["updates"] == [{"operation": "touch", "relationship": "document:x#viewer@user:amy"}]
    outsider = Principal("acme", "other", scopes=("bucket:list|tenant:acme",))
    assert not any(ReadFilter(outsider).visible(make_scope(outsider, kinds="authz.*"), e) for e in seen)


def test_tenants_are_separate_and_scopes_are_required(anvil: Anvil) -> None:
    acme = Principal("acme", "app", scopes=("authz:*|tenant:acme",))
    reader = Principal("acme", "reader", scopes=("authz:read|tenant:acme",))
    with pytest.raises(AnvilError) as e:
        anvil.authz.check(acme, "document:a", "view", "user:amy")
    assert e.value.code == "NotFound"  # acme has no schema; the default tenant's is not visible
    anvil.authz.write_schema(RequestContext(acme), SCHEMA)
    with pytest.raises(AnvilError) as e:
        anvil.authz.write_relationships(RequestContext(reader), [{"relationship": "document:a#viewer@user:amy"}])
    assert e.value.code == "PermissionDenied"
    with pytest.raises(AnvilError) as e:
        anvil.authz.check(acme, "document:a", "view", "user:amy", tenant="default")
    assert e.value.code == "PermissionDenied"
    assert anvil.authz.check(reader, "document:a", "view", "user:amy")["permissionship"] == "no_permission"


def test_the_participant_summarises_and_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import apsw

    from anvil.authz.participant import AuthzParticipant
    from anvil.storage import records
    from anvil.storage.recovery import RecoveryContext, has_errors

    monkeypatch.setenv("ANVIL_ARGON2_FAST", "1")
    a = Anvil(tmp_path / "data")
    try:
        a.authz.write_schema(CTX, SCHEMA)
        _write(a, "document:a#viewer@user:amy", "group:g#member@user:bob", "document:a#viewer@group:g#member")
        _write(a, "group:g#member@user:bob", op="delete")
    finally:
        a.close()
    p = AuthzParticipant()

    def run(recorded: dict | None = None) -> tuple[dict, list]:
        conn = records.open_readonly(tmp_path / "data" / "catalog.db")
        try:
            ctx = RecoveryContext(tmp_path / "data", conn, a.storage.blobs, [p])
            return p.summary(ctx), p.validate(ctx, recorded)
        finally:
            records.close(conn)

    summary, found = run()
    assert (summary["tenants"], summary["relationships"], summary["rows"]) == (1, 2, 3)
    assert not has_errors(found)
    # A relationship edited underneath into one its schema does not allow: named, and the digest differs.
    raw = apsw.Connection(str(tmp_path / "data" / "catalog.db"))
    raw.execute("UPDATE authz_relationships SET relation = 'owner' WHERE rid = 'a' AND stype = 'group'")
    raw.close()
    _, found = run(summary)
    messages = [f.message for f in found if f.severity == "error"]
    assert any("not valid under its tenant's schema" in m and "not allowed on document#owner" in m for m in messages)
    assert any(f.invariant == "authz.summary_differs" for f in found)
