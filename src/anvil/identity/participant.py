"""Identity's recovery participant: tenants, applications, policies and control-plane secrets.

Policy for secrets (docs/backup.md): key ids are always recorded in the manifest; key
material (`STORAGE_PATH/secrets/`: the envelope key and the JWT secret generated in
development mode) goes into a snapshot only when the backup was asked to escrow it. Without
it, a restored deployment can open its application-secret envelopes only if the operator
supplies the keys in the environment; validation says exactly which apps fail and why.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from anvil.errors import AnvilError
from anvil.identity import envelope as env
from anvil.identity.scopes import ACTIONS, allows
from anvil.identity.settings import is_development, load_keyring
from anvil.storage.records import Connection
from anvil.storage.recovery import Finding, Participant, RecoveryContext

TABLES = ("identity_realm", "identity_tenants", "identity_apps", "identity_policies", "identity_deleted_apps",
          "identity_revoked_tokens")
STATUSES = ("enabled", "disabled")


def summary(conn: Connection) -> dict[str, Any]:
    """Counts, key ids in use, and a digest of (client_id, tenant, scopes) that a restore must reproduce."""

    def count(table: str) -> int:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    digest = hashlib.sha256()
    for client_id, tenant, scopes in _apps(conn):
        digest.update(f"{client_id}\t{tenant}\t{' '.join(sorted(scopes))}\n".encode())
    key_ids = sorted({r[0] for r in conn.execute("SELECT key_id FROM identity_apps")})
    return {
        "tenants": count("identity_tenants"),
        "apps": count("identity_apps"),
        "policies": count("identity_policies"),
        "realm": count("identity_realm") == 1,
        "key_ids_in_use": key_ids,
        "digest": digest.hexdigest(),
        **lifecycle_summary(conn),
    }


def lifecycle_summary(conn: Connection) -> dict[str, Any]:
    """Disabled apps, deleted ones and revoked tokens: what a restore must keep refusing."""
    disabled = [r[0] for r in conn.execute(
        "SELECT client_id FROM identity_apps WHERE status <> 'enabled' ORDER BY client_id")]
    deleted = [r[0] for r in conn.execute("SELECT client_id FROM identity_deleted_apps ORDER BY client_id")]
    revoked = [(r[0], r[1] or "") for r in conn.execute(
        "SELECT jti, client_id FROM identity_revoked_tokens ORDER BY jti")]
    digest = hashlib.sha256()
    for cid in disabled:
        digest.update(f"disabled\t{cid}\n".encode())
    for cid in deleted:
        digest.update(f"deleted\t{cid}\n".encode())
    for jti, cid in revoked:
        digest.update(f"revoked\t{jti}\t{cid}\n".encode())
    return {"apps_disabled": len(disabled), "apps_deleted": len(deleted), "revoked_tokens": len(revoked),
            "lifecycle_digest": digest.hexdigest()}


def lifecycle_problems(conn: Connection) -> list[dict[str, Any]]:
    """Lifecycle rows that cannot be right: an unknown status, an id both live and deleted, grants
    of a missing application, a revocation that expires before it was made."""
    found: list[dict[str, Any]] = []
    for cid, status in conn.execute("SELECT client_id, status FROM identity_apps ORDER BY client_id"):
        if status not in STATUSES:
            found.append({"severity": "error", "item": f"app/{cid}", "invariant": "identity.app_status",
                          "problem": f"unknown status {status!r}"})
    for (cid,) in conn.execute(
            "SELECT d.client_id FROM identity_deleted_apps d JOIN identity_apps a ON a.client_id = d.client_id"):
        found.append({"severity": "error", "item": f"app/{cid}", "invariant": "identity.app_deleted_and_live",
                      "problem": "the application is both deleted and present"})
    for (cid,) in conn.execute(
            "SELECT DISTINCT p.client_id FROM identity_policies p LEFT JOIN identity_apps a "
            "ON a.client_id = p.client_id WHERE a.client_id IS NULL ORDER BY p.client_id"):
        found.append({"severity": "error", "item": f"app/{cid}", "invariant": "identity.policy_orphan",
                      "problem": "grants remain for an application that does not exist"})
    for jti, expires, revoked in conn.execute(
            "SELECT jti, expires, revoked FROM identity_revoked_tokens ORDER BY jti"):
        if not isinstance(expires, int | float) or not isinstance(revoked, int | float) or expires <= revoked:
            found.append({"severity": "error", "item": f"token/{jti}", "invariant": "identity.revocation",
                          "problem": "the revocation expires before it was made"})
    return found


def validate(conn: Connection, keyring: env.Keyring) -> list[dict[str, Any]]:
    """Findings: every envelope must decrypt with the configured keys and match its recorded key id."""
    findings: list[dict[str, Any]] = []
    if conn.execute("SELECT count(*) FROM identity_realm").fetchone()[0] != 1:
        findings.append({"severity": "error", "item": "realm", "problem": "the system realm is missing"})
    for client_id, envelope, key_id in conn.execute("SELECT client_id, envelope, key_id FROM identity_apps"):
        try:
            env.open_envelope(keyring, envelope, client_id)
            if env.key_id(envelope) != key_id:
                findings.append({"severity": "warning", "item": f"app/{client_id}",
                                 "problem": "recorded key id differs from the envelope's"})
        except env.EnvelopeError as e:
            findings.append({"severity": "error", "item": f"app/{client_id}", "problem": e.message})
    return findings + lifecycle_problems(conn)


MAX_FIXTURES = 10
MAX_FINDINGS = 50
SECRET_FILES = ("encryption_key.json", "jwt_secret")
KEY_HINT = ("two ways to supply it: (1) set ANVIL_SECRET_ENCRYPTION_KEY (with ANVIL_SECRET_ENCRYPTION_KEY_ID; "
            "older keys in ANVIL_SECRET_ENCRYPTION_PREVIOUS_KEYS as KEY_ID:KEY,...) in the environment of "
            "`anvil recovery validate`, `anvil drill` and `anvil serve`; or (2) restore a snapshot that escrowed "
            "it (`anvil backup create --escrow-secrets`, the default in development mode)")


def key_hint(kid: str) -> str:
    """What to do about one missing envelope key, naming it."""
    return ("two ways to supply it: (1) set ANVIL_SECRET_ENCRYPTION_KEY=<that key> with "
            f"ANVIL_SECRET_ENCRYPTION_KEY_ID={kid} (or add {kid}:<that key> to "
            "ANVIL_SECRET_ENCRYPTION_PREVIOUS_KEYS) in the environment of `anvil recovery validate`, `anvil drill` "
            "and `anvil serve`; or (2) restore a snapshot that escrowed it (`anvil backup create "
            "--escrow-secrets`, the default in development mode)")


# Probes for a decision every non-admin app must be refused (the first one its scopes do not allow).
_DENY_PROBES = [("admin:write", "system"), ("policy:grant", "tenant:zz-drill-denied"),
                ("bucket:delete", "bucket:zz-drill-denied"), ("object:write", "bucket:zz-drill-denied/probe")]


def configured_keyring(root: Path) -> tuple[env.Keyring | None, str]:
    """The keyring a server on `root` would use, without generating anything: (keyring, where from)."""
    secrets_dir = Path(root) / "secrets"
    try:
        if os.environ.get("ANVIL_SECRET_ENCRYPTION_KEY"):
            return load_keyring(secrets_dir), "environment"
        if (secrets_dir / "encryption_key.json").exists():
            return load_keyring(secrets_dir), "secrets/encryption_key.json"
    except AnvilError as e:
        return None, f"unusable: {e.message}"
    return None, "nowhere"


def _instance(pattern: str, choices: list[str]) -> str:
    """A concrete value matching a scope pattern (the first known action, or `*` filled in)."""
    for c in choices:
        if allows(f"{pattern}|*", c, "x"):
            return c
    return pattern.replace("*", "drill-probe")


def fixtures(rows: list[tuple[str, str, list[str]]]) -> list[dict[str, Any]]:
    """For up to MAX_FIXTURES apps: one decision their scopes allow and one they deny."""
    out = []
    for client_id, tenant, scopes in rows[:MAX_FIXTURES]:
        allowed = None
        for s in scopes:
            if s == "*":
                allowed = ["admin:write", "system"]
                break
            action, _, resource = s.partition("|")
            allowed = [_instance(action, sorted(ACTIONS)), resource.replace("*", "drill-probe")]
            break
        denied = next(([a, r] for a, r in _DENY_PROBES if not any(allows(s, a, r) for s in scopes)), None)
        out.append({"client_id": client_id, "tenant": tenant, "scopes": sorted(scopes), "allowed": allowed,
                    "denied": denied})
    return out


def _apps(conn: Any) -> list[tuple[str, str, list[str]]]:
    rows: dict[str, tuple[str, list[str]]] = {}
    for cid, tenant in conn.execute("SELECT client_id, tenant FROM identity_apps ORDER BY client_id"):
        rows[cid] = (tenant, [])
    for cid, scope in conn.execute("SELECT client_id, scope FROM identity_policies ORDER BY client_id, scope"):
        if cid in rows:
            rows[cid][1].append(scope)
    return [(cid, t, s) for cid, (t, s) in rows.items()]


class IdentityParticipant(Participant):
    name = "identity"
    kind = "source"
    covers = ["secrets"]
    owns = [f"catalog.db: {', '.join(TABLES)}", "secrets/ (only when escrowed)"]
    tables = list(TABLES)
    replays = ("identity.",)

    def migrations(self) -> dict[str, list[str]]:
        from anvil.identity.service import MIGRATIONS

        return {"identity": MIGRATIONS}

    def apply(self, ctx: RecoveryContext, event: Any) -> None:
        from anvil.identity import replay

        replay.apply(ctx.conn, event)

    def _secret_files(self, ctx: RecoveryContext) -> list[Path]:
        return [p for p in (ctx.root / "secrets" / n for n in SECRET_FILES) if p.is_file()]

    def files(self, ctx: RecoveryContext) -> list[Path]:
        return self._secret_files(ctx) if ctx.escrow_secrets else []

    def default_escrow(self, ctx: RecoveryContext) -> str | None:
        """Development mode keeps its generated keys only in secrets/: a snapshot without them cannot
        open a single application secret after restore, so it takes them unless told otherwise.
        Production keys come from the environment and are escrowed only when asked for."""
        if os.environ.get("ANVIL_SECRET_ENCRYPTION_KEY") or not is_development():
            return None
        files = self._secret_files(ctx)
        if not files:
            return None
        return ("development mode: key material generated in secrets/ (" + ", ".join(p.name for p in files)
                + ") exists nowhere else")

    def key_ids(self, ctx: RecoveryContext) -> list[str]:
        keyring, _ = configured_keyring(ctx.root)
        in_use = summary(ctx.conn)["key_ids_in_use"]
        return sorted(set(in_use) | set(keyring.key_ids if keyring else []))

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        s = summary(ctx.conn)
        keyring, source = configured_keyring(ctx.root)
        escrowed = sorted(p.name for p in self._secret_files(ctx)) if ctx.escrow_secrets else []
        disabled = [r[0] for r in ctx.conn.execute(
            "SELECT client_id FROM identity_apps WHERE status <> 'enabled' ORDER BY client_id")][:MAX_FIXTURES]
        return {**s, "configured_key_ids": keyring.key_ids if keyring else [], "key_source": source,
                "escrowed": escrowed, "fixtures": fixtures(_apps(ctx.conn)), "disabled_fixtures": disabled}

    def after_restore(self, root: Path) -> None:
        secrets_dir = Path(root) / "secrets"
        if secrets_dir.is_dir():
            os.chmod(secrets_dir, 0o700)
            for p in secrets_dir.iterdir():
                if p.is_file():
                    os.chmod(p, 0o600)

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        findings: list[Finding] = []
        keyring, source = configured_keyring(ctx.root)
        if keyring is None:
            for cid, _tenant, _ in _apps(ctx.conn)[:MAX_FINDINGS]:
                kid = ctx.conn.execute("SELECT key_id FROM identity_apps WHERE client_id = ?", (cid,)).fetchone()[0]
                findings.append(self.finding("error", f"app {cid}",
                                             f"secret envelope key {kid!r} is not configured (no key: {source}); "
                                             + key_hint(kid), "identity.envelope_key_missing", {"client_id": cid}))
        else:
            problems = validate(ctx.conn, keyring)
            for p in problems[:MAX_FINDINGS]:
                message = p["problem"]
                if p["severity"] == "error" and p["item"].startswith("app/"):
                    escrow = ("" if recorded is None else "; this snapshot escrowed no key material"
                              if not recorded.get("escrowed") else "; the escrowed key does not open it")
                    message = (f"{message}; configured key ids (from {source}): {', '.join(keyring.key_ids)}"
                               f"{escrow}; " + KEY_HINT)
                findings.append(self.finding(p["severity"], p["item"].replace("app/", "app ", 1), message,
                                             p.get("invariant") or f"identity.{p['item'].partition('/')[0]}",
                                             {"item": p["item"]}))
            if len(problems) > MAX_FINDINGS:
                findings.append(self.finding("error", "identity", f"{len(problems) - MAX_FINDINGS} more problems",
                                             "identity.more"))
        if recorded:
            now = summary(ctx.conn)
            for field in ("tenants", "apps", "policies", "digest", "key_ids_in_use", "apps_disabled",
                          "apps_deleted", "revoked_tokens", "lifecycle_digest"):
                if field in recorded and recorded[field] != now[field]:
                    findings.append(self.finding("error", f"identity {field}",
                                                 f"restored {now[field]!r}, recorded {recorded[field]!r}",
                                                 "identity.summary_differs", {"field": field}))
            live = {f["client_id"]: f for f in fixtures(_apps(ctx.conn))}
            for fx in recorded.get("fixtures", []):
                if live.get(fx["client_id"], {}).get("scopes") != fx["scopes"]:
                    findings.append(self.finding("error", f"app {fx['client_id']}",
                                                 "granted scopes differ from the recorded fixture",
                                                 "identity.fixture_differs", {"client_id": fx["client_id"]}))
        if keyring is None:
            for p in lifecycle_problems(ctx.conn)[:MAX_FINDINGS]:
                findings.append(self.finding(p["severity"], p["item"].replace("/", " ", 1), p["problem"],
                                             p["invariant"], {"item": p["item"]}))
        if not findings:
            s = summary(ctx.conn)
            findings.append(self.finding("info", "identity",
                                         f"{s['apps']} application envelopes decrypt with keys from {source}; "
                                         f"tenants, apps and policies match the manifest; {s['apps_disabled']} "
                                         f"disabled, {s['apps_deleted']} deleted, {s['revoked_tokens']} "
                                         "revoked tokens"))
        return findings

    def smoke(self, client: Any, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        from anvil.client import AnvilAPIError, exchange_token

        findings: list[Finding] = []
        if ctx.credentials is None:
            return [self.finding("error", "token exchange", "the drill was given no credential to prove it with")]
        cid, secret = ctx.credentials
        try:
            tok = exchange_token(client.endpoint, cid, secret)
            who = client.whoami()
            if who["subject"] != cid or tok["tenant"] != who["tenant"]:
                findings.append(self.finding("error", "whoami", f"token is for {who['subject']}, expected {cid}"))
        except AnvilAPIError as e:
            return [self.finding("error", "token exchange", f"{cid}: {e.code}: {e.message}")]
        res = client.identity_validate()
        for p in res.get("findings", [])[:MAX_FINDINGS]:
            if p.get("severity") == "error":
                findings.append(self.finding("error", str(p.get("item")), f"server: {p.get('problem')}; " + KEY_HINT))
        checked = 0
        for fx in (recorded or {}).get("fixtures", []):
            subject = f"app {fx['client_id']}"
            try:
                scopes = client.policies(fx["client_id"])["scopes"]
            except AnvilAPIError as e:
                findings.append(self.finding("error", subject, f"policies unreadable: {e.code}: {e.message}"))
                continue
            for what, decision, want in (("allowed", fx.get("allowed"), True), ("denied", fx.get("denied"), False)):
                if decision and any(allows(s, *decision) for s in scopes) != want:
                    findings.append(self.finding("error", subject, f"{decision[0]} on {decision[1]} was recorded "
                                                                   f"{what}, the restored policy decides otherwise"))
            checked += 1
        disabled = (recorded or {}).get("disabled_fixtures") or []
        if disabled:
            try:
                status = {a["client_id"]: a.get("status") for a in client.list_apps()}
            except AnvilAPIError as e:
                status = {}
                findings.append(self.finding("error", "apps", f"applications unreadable: {e.code}: {e.message}"))
            for d in disabled:
                if status and status.get(d) != "disabled":
                    findings.append(self.finding("error", f"app {d}", f"recorded disabled, the restored server "
                                                                      f"says {status.get(d, 'missing')}",
                                                 "identity.app_status"))
        if not findings:
            findings.append(self.finding("info", "identity",
                                         f"token exchange and whoami for {cid}; server validated every envelope; "
                                         f"{checked} recorded authorisation fixtures decide the same; "
                                         f"{len(disabled)} recorded disabled applications stay disabled"))
        return findings
