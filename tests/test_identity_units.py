"""Identity building blocks in-process: scopes, envelopes, tokens (no server needed)."""

from __future__ import annotations

import base64
import json
import os
import time

import jwt
import pytest

from anvil.errors import AnvilError
from anvil.identity import envelope as env
from anvil.identity import scopes as sc
from anvil.identity.settings import parse_previous_keys
from anvil.identity.tokens import TokenAuthority


@pytest.mark.parametrize("scope", [
    "object:read", "object:read|", "|bucket:x", "object:read|bucket:a?b", "object:read|bucket:[ab]",
    "frobnicate:now|bucket:x", "object:read|disk:/etc", "object:read|bucket:a b", "x" * 600, "",
    "object:read|bucket:a|b",
])
def test_malformed_scopes_are_invalid_token_scope(scope: str) -> None:
    with pytest.raises(AnvilError) as e:
        sc.parse(scope)
    assert e.value.code == "InvalidTokenScope"


def test_scope_examples_parse_and_match() -> None:
    assert sc.allows("object:read|bucket:documents/*", "object:read", "bucket:documents/a/b.txt")
    assert not sc.allows("object:read|bucket:documents/*", "object:read", "bucket:documents")
    assert not sc.allows("object:read|bucket:documents/*", "object:write", "bucket:documents/a")
    assert sc.allows("object:write|bucket:uploads/tenants/acme/*", "object:write", "bucket:uploads/tenants/acme/f")
    assert not sc.allows("object:write|bucket:uploads/tenants/acme/*", "object:write", "bucket:uploads/tenants/x/f")
    assert sc.allows("bucket:create|tenant:acme", "bucket:create", "tenant:acme")
    assert sc.allows("object:*|bucket:*", "object:delete", "bucket:x/y")


def test_covers_is_conservative() -> None:
    assert sc.covers("*", "object:read|bucket:x")
    assert not sc.covers("object:read|bucket:*", "*")
    assert sc.covers("object:*|bucket:docs/*", "object:read|bucket:docs/a/*")
    assert not sc.covers("object:read|bucket:docs/*", "object:read|bucket:*")
    assert not sc.covers("object:read|bucket:docs/*", "object:write|bucket:docs/x")
    # A wildcard in the middle cannot be proven to contain another pattern: refused.
    assert not sc.covers("object:read|bucket:*/docs", "object:read|bucket:a*/docs")
    assert sc.covers("object:read|bucket:*/docs", "object:read|bucket:a/docs")


def test_intersection_narrows_both_ways() -> None:
    granted = ["object:read|bucket:docs/*", "object:write|bucket:uploads/*"]
    assert sc.intersect(["object:*|bucket:*"], granted) == granted
    assert sc.intersect(["object:read|bucket:docs/a/*"], granted) == ["object:read|bucket:docs/a/*"]
    assert sc.intersect(["object:delete|bucket:docs/*"], granted) == []


KEY_A, KEY_B = os.urandom(32), os.urandom(32)


def test_envelope_round_trip_previous_keys_and_binding() -> None:
    old = env.Keyring("a", KEY_A)
    sealed = env.seal(old, "s3cret", "APPID")
    assert json.loads(sealed)["kid"] == "a" and "s3cret" not in sealed
    rotated = env.Keyring("b", KEY_B, {"a": KEY_A})
    assert env.open_envelope(rotated, sealed, "APPID") == "s3cret"
    resealed = env.seal(rotated, env.open_envelope(rotated, sealed, "APPID"), "APPID")
    assert env.open_envelope(env.Keyring("b", KEY_B), resealed, "APPID") == "s3cret"
    with pytest.raises(AnvilError, match="not configured"):
        env.open_envelope(env.Keyring("b", KEY_B), sealed, "APPID")
    with pytest.raises(AnvilError, match="does not decrypt"):
        env.open_envelope(old, sealed, "OTHERAPP")  # copied onto another application


def test_previous_keys_parsing() -> None:
    raw = f"a:{base64.b64encode(KEY_A).decode()}, b:{KEY_B.hex()}"
    assert parse_previous_keys(raw) == {"a": KEY_A, "b": KEY_B}
    for bad in ("nokey", "a:short", ":abc"):
        with pytest.raises(AnvilError):
            parse_previous_keys(bad)


def test_token_verify_rejects_none_other_algs_tamper_expiry_and_size() -> None:
    secret = os.urandom(32)
    auth = TokenAuthority(secret)
    token, claims = auth.issue(tenant="acme", subject="APP", scopes=["object:read|bucket:*"], ttl=60)
    p = auth.verify(token)
    assert (p.tenant, p.subject, p.admin, p.scopes) == ("acme", "APP", False, ("object:read|bucket:*",))
    assert auth.verify(token) is p  # cached

    forged = {**claims, "tenant": "system", "scopes": ["*"]}
    bad = [
        jwt.encode(forged, None, algorithm="none"),
        jwt.encode(forged, secret, algorithm="HS512"),
        jwt.encode(forged, os.urandom(32), algorithm="HS256"),
        token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
        token + "x" * 9000,
    ]
    h, payload, sig = token.split(".")
    tampered_body = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    bad.append(f"{h}.{tampered_body}.{sig}")
    for b in bad:
        with pytest.raises(AnvilError) as e:
            auth.verify(b)
        assert e.value.code == "Unauthenticated"

    issued_at = time.time()
    short, short_claims = auth.issue(tenant="acme", subject="APP", scopes=["*"], ttl=2)
    # exp is whole seconds, rounded up: the token lives at least the 2 s asked for, less than 3 s.
    assert isinstance(short_claims["exp"], int) and 2 <= short_claims["exp"] - issued_at < 3.01
    auth.verify(short)
    time.sleep(3.1)
    for _ in range(2):  # the cached entry expires too; replays keep failing
        with pytest.raises(AnvilError, match="expired"):
            auth.verify(short)


def test_in_process_service_bootstrap_and_sigv4_lookup(tmp_path, monkeypatch) -> None:
    """The runtime opened directly: bootstrap once, envelopes open, S3 gateway lookup, summary/validate."""
    from anvil.context import RequestContext
    from anvil.identity import summary, validate
    from anvil.runtime import Anvil

    monkeypatch.setenv("ANVIL_ARGON2_FAST", "1")
    a = Anvil(tmp_path / "data")
    try:
        cred = json.loads((tmp_path / "data" / "bootstrap" / "first-admin.json").read_text())
        assert a.identity.bootstrap() is None  # the realm exists: never again
        secret, admin = a.identity.sigv4_credentials(cred["client_id"])
        assert secret == cred["client_secret"] and admin.admin and admin.scopes == ("*",)
        assert a.identity.sigv4_credentials("ANAAAAAAAAAAAAAAAAAA") is None
        ctx = RequestContext(principal=admin)
        a.identity.create_tenant(ctx, "acme")
        app = a.identity.create_app(ctx, "acme", "s3", ["object:read|bucket:*"])
        secret, p = a.identity.sigv4_credentials(app["client_id"])
        assert secret == app["client_secret"]
        assert (p.tenant, p.admin, p.scopes) == ("acme", False, ("object:read|bucket:*",))
        conn = a.storage.catalog.reader()
        s = summary(conn)
        assert (s["tenants"], s["apps"], s["policies"]) == (2, 2, 2)
        assert s["key_ids_in_use"] == [a.identity.keyring.active_id]
        assert validate(conn, a.identity.keyring) == []
        # The lookup is cached (30 s), but rotation, grants and revocations through the service drop the
        # entry at once: a rotated secret or a revoked scope is never honoured from the cache.
        assert a.identity.sigv4_credentials(app["client_id"]) == (secret, p)
        rotated = a.identity.rotate_secret(ctx, app["client_id"])
        new_secret, p2 = a.identity.sigv4_credentials(app["client_id"])
        assert new_secret == rotated["client_secret"] != secret
        a.identity.grant(ctx, app["client_id"], ["object:write|bucket:*"])
        assert a.identity.sigv4_credentials(app["client_id"])[1].scopes == (
            "object:read|bucket:*", "object:write|bucket:*")
        a.identity.revoke(ctx, app["client_id"], ["object:read|bucket:*"])
        assert a.identity.sigv4_credentials(app["client_id"])[1].scopes == ("object:write|bucket:*",)
        assert validate(conn, env.Keyring("other", KEY_B))[0]["severity"] == "error"
    finally:
        a.close()


def test_a_verified_secret_skips_argon2_and_nothing_else(tmp_path, monkeypatch) -> None:
    """A secret that verified is remembered (by digest, per verifier): the next exchange does not run
    argon2; a wrong secret, a rotated one and a disabled application are refused as before."""
    from anvil.context import RequestContext
    from anvil.runtime import Anvil

    monkeypatch.setenv("ANVIL_ARGON2_FAST", "1")
    a = Anvil(tmp_path / "data")
    try:
        cred = json.loads((tmp_path / "data" / "bootstrap" / "first-admin.json").read_text())
        admin = a.identity.sigv4_credentials(cred["client_id"])[1]
        ctx = RequestContext(principal=admin)
        a.identity.create_tenant(ctx, "acme")
        app = a.identity.create_app(ctx, "acme", "s3", ["object:read|bucket:*"])
        calls = []
        real = a.identity._hasher

        class Counting:  # argon2's hasher, counting its verifications
            def verify(self, h: str, s: str) -> bool:
                calls.append(1)
                return real.verify(h, s)

            def hash(self, s: str) -> str:
                return real.hash(s)

        monkeypatch.setattr(a.identity, "_hasher", Counting())
        assert a.identity.exchange(app["client_id"], app["client_secret"])["tenant"] == "acme"
        assert a.identity.exchange(app["client_id"], app["client_secret"])["tenant"] == "acme"
        assert len(calls) == 1  # the second exchange took the remembered digest
        with pytest.raises(AnvilError, match="invalid client credentials"):
            a.identity.exchange(app["client_id"], app["client_secret"] + "x")
        assert len(calls) == 2  # a wrong secret still pays argon2
        rotated = a.identity.rotate_secret(ctx, app["client_id"])
        with pytest.raises(AnvilError, match="invalid client credentials"):
            a.identity.exchange(app["client_id"], app["client_secret"])  # the old secret: a new verifier
        assert a.identity.exchange(app["client_id"], rotated["client_secret"])["tenant"] == "acme"
    finally:
        a.close()


def test_client_secrets_never_start_with_a_dash() -> None:
    # One in 64 would otherwise; 3,000 draws without the rule all avoid it with odds of ~1e-21.
    from anvil.identity.service import new_client_secret

    drawn = [new_client_secret() for _ in range(3000)]
    assert not any(s.startswith("-") for s in drawn)
    assert len(set(drawn)) == 3000 and all(len(s) == 40 for s in drawn)
