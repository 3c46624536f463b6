"""Tenants, applications, secret envelopes, policies, token exchange and the audit log.

Every mutation goes through `Catalog.mutate` and emits one journal event. Identity events
are emitted under the system tenant (scope `tenant/NAME` or `app/CLIENT_ID`) so that
tenant-scoped journal readers (watches) never see envelopes or verifiers; the payload names
the tenant concerned and carries what a replay needs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import string
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from anvil.context import Principal, RequestContext, new_request_id
from anvil.errors import AnvilError
from anvil.identity import envelope as env
from anvil.identity import participant
from anvil.identity import scopes as sc
from anvil.identity.gate import authorize
from anvil.identity.settings import Argon2Params, argon2_params
from anvil.identity.tokens import DEFAULT_TTL, MAX_TTL, SYSTEM_TENANT, TokenAuthority, TokenInfo, unauthenticated
from anvil.storage import Storage, Txn
from anvil.storage.layout import write_file_durably
from anvil.storage.records import Connection

log = logging.getLogger("anvil.identity")

# Client secrets remembered as verified (IdentityService.exchange), at most.
VERIFIED_MAX = 4096

MIGRATIONS = [
    """CREATE TABLE identity_realm(
        id INTEGER PRIMARY KEY CHECK (id = 1),
        created REAL NOT NULL,
        admin_client_id TEXT NOT NULL
    )""",
    """CREATE TABLE identity_tenants(
        name TEXT PRIMARY KEY,
        created REAL NOT NULL,
        created_by TEXT NOT NULL
    )""",
    """CREATE TABLE identity_apps(
        client_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL REFERENCES identity_tenants(name),
        name TEXT NOT NULL,
        created REAL NOT NULL,
        envelope TEXT NOT NULL,
        key_id TEXT NOT NULL,
        verifier TEXT NOT NULL,
        secret_version INTEGER NOT NULL DEFAULT 1,
        rotated REAL
    )""",
    "CREATE INDEX identity_apps_tenant ON identity_apps(tenant, name)",
    """CREATE TABLE identity_policies(
        client_id TEXT NOT NULL REFERENCES identity_apps(client_id),
        scope TEXT NOT NULL,
        granted REAL NOT NULL,
        granted_by TEXT NOT NULL,
        PRIMARY KEY (client_id, scope)
    )""",
    # Lifecycle: an application is enabled or disabled; a deleted one leaves a tombstone so its
    # client id is never issued again and its still-unexpired tokens stay refused.
    "ALTER TABLE identity_apps ADD COLUMN status TEXT NOT NULL DEFAULT 'enabled'",
    "ALTER TABLE identity_apps ADD COLUMN status_changed REAL",
    """CREATE TABLE identity_deleted_apps(
        client_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        deleted REAL NOT NULL,
        deleted_by TEXT NOT NULL
    )""",
    # Revoked token ids, kept until every token they can match has expired (then pruned).
    """CREATE TABLE identity_revoked_tokens(
        jti TEXT PRIMARY KEY,
        client_id TEXT,
        tenant TEXT,
        expires REAL NOT NULL,
        revoked REAL NOT NULL,
        revoked_by TEXT NOT NULL
    )""",
    "CREATE INDEX identity_revoked_tokens_expires ON identity_revoked_tokens(expires)",
]

TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
APP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
CLIENT_ID_RE = re.compile(r"^AN[A-Z2-7]{18}$")
JTI_RE = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex, as TokenAuthority.issue makes them
APP_STATUSES = ("enabled", "disabled")
# No token outlives its revocation by more than MAX_TTL (+1 s: exp is rounded up), so a revocation,
# a tombstone or a rotation matters for that long; the slack covers a clock step on the server.
REVOCATION_LIFETIME = MAX_TTL + 60
_B32 = string.ascii_uppercase + "234567"
AUDIT_SIZE = 1000
# S3 credentials (decrypted secret + principal) are cached per access key for at most this long, so
# the gateway does not open an AES envelope and query policies on every request. Rotation, grants,
# revocations and key rotation through this service drop the entry at once; the TTL bounds how long
# a change made any other way (e.g. a restore underneath a running server) can go unseen.
SIGV4_CACHE_TTL = 30.0
SIGV4_CACHE_SIZE = 1024
BOOTSTRAP_ACTOR = "system/bootstrap"
DEV_TENANT = "dev"
DEV_SCOPES = [
    "bucket:create|tenant:dev", "bucket:list|tenant:dev", "bucket:*|bucket:*", "object:*|bucket:*",
    "policy:grant|tenant:dev", "policy:read|tenant:dev", "app:*|tenant:dev", "authz:*|tenant:dev",
]


# An end user a token may act for: SpiceDB's `type:id` (the authz subject syntax, without wildcard or relation).
SUBJECT_RE = re.compile(r"^[a-z][a-z0-9_]{1,62}[a-z0-9](?:/[a-z][a-z0-9_]{1,62}[a-z0-9])?:[a-zA-Z0-9/_|\-=+.]{1,1024}$")

def new_client_id() -> str:
    # S3 access-key shaped (20 upper-case alphanumerics) so SigV4 clients accept it.
    return "AN" + "".join(secrets.choice(_B32) for _ in range(18))


def new_client_secret() -> str:
    # Never with a leading "-": command-line tools (argparse, shells' option parsing) read such a
    # secret, passed as its own argument, as an option (1 secret in 64 did; a bench run failed on it).
    while (secret := secrets.token_urlsafe(30)).startswith("-"):
        pass
    return secret


@dataclass(frozen=True)
class App:
    client_id: str
    tenant: str
    name: str
    created: float
    key_id: str
    secret_version: int
    rotated: float | None
    status: str = "enabled"

    def to_dict(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "tenant": self.tenant, "name": self.name, "created": self.created,
                "key_id": self.key_id, "secret_version": self.secret_version, "rotated": self.rotated,
                "status": self.status}


_APP_COLUMNS = "client_id, tenant, name, created, key_id, secret_version, rotated, status"


@dataclass(frozen=True)
class Lifecycle:
    """What refuses a well-signed, unexpired token, held in memory for the per-request check.

    Replaced whole after every lifecycle change commits (never mutated), so a request reads one
    consistent value without a lock. Only entries that can still match a live token are loaded:
    tombstones, rotations and revocations younger than REVOCATION_LIFETIME, and disabled apps.
    """

    blocked: dict[str, str]  # client_id -> "disabled" | "deleted"
    min_version: dict[str, int]  # client_id -> secret version a token must carry (rotated apps)
    revoked: dict[str, tuple[str | None, float]]  # jti -> (client_id it is limited to or None, expires)

    @property
    def active(self) -> bool:
        return bool(self.blocked or self.min_version or self.revoked)

    @classmethod
    def load(cls, conn: Connection, now: float) -> Lifecycle:
        since = now - REVOCATION_LIFETIME
        blocked = {cid: "disabled" for (cid,) in conn.execute(
            "SELECT client_id FROM identity_apps WHERE status <> 'enabled'")}
        for (cid,) in conn.execute("SELECT client_id FROM identity_deleted_apps WHERE deleted > ?", (since,)):
            blocked[cid] = "deleted"
        min_version = {cid: int(v) for cid, v in conn.execute(
            "SELECT client_id, secret_version FROM identity_apps WHERE secret_version > 1 AND rotated > ?",
            (since,))}
        revoked = {jti: (cid, float(exp)) for jti, cid, exp in conn.execute(
            "SELECT jti, client_id, expires FROM identity_revoked_tokens WHERE expires > ?", (now,))}
        return cls(blocked, min_version, revoked)

    def refusal(self, subject: str, info: TokenInfo) -> str | None:
        """Why this token must be refused now, or None."""
        state = self.blocked.get(subject)
        if state is not None:
            return f"application {subject} is {state}"
        rev = self.revoked.get(info.jti)
        if rev is not None and (rev[0] is None or rev[0] == subject):
            return f"token {info.jti} has been revoked"
        need = self.min_version.get(subject)
        if need is not None and info.secret_version < need:
            return "token was issued before the application's secret was rotated"
        return None


NO_LIFECYCLE = Lifecycle({}, {}, {})


class AuditLog:
    """Denied requests, newest last; bounded in memory (a flood of denials must cost nothing durable)."""

    def __init__(self, size: int = AUDIT_SIZE):
        self._entries: deque[dict[str, Any]] = deque(maxlen=size)
        self._lock = threading.Lock()
        self._seq = 0

    def record(self, **entry: Any) -> None:
        with self._lock:
            self._seq += 1
            self._entries.append({"seq": self._seq, "ts": time.time(), **entry})

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._entries)
        return items[-limit:]


class IdentityService:
    def __init__(self, storage: Storage, keyring: env.Keyring, jwt_secret: bytes,
                 params: Argon2Params | None = None):
        self.storage = storage
        self.catalog = storage.catalog
        self.keyring = keyring
        self.tokens = TokenAuthority(jwt_secret)
        p = params or argon2_params()
        self._hasher = PasswordHasher(time_cost=p.time_cost, memory_cost=p.memory_cost, parallelism=p.parallelism,
                                      type=Type.ID)
        # Compared against when the client id is unknown, so timing does not reveal which ids exist.
        self._dummy_verifier = self._hasher.hash(secrets.token_urlsafe(16))
        # (client_id, verifier) -> SHA-256 of the secret that verified against it. argon2 (~0.1-0.2 s of
        # CPU) was most of what a CLI command that exchanges one token costs the server (an online
        # `anvil backup create` with nothing to do: 0.18 of its 0.2 s). Secrets are random 240-bit
        # strings (argon2 guards the stored verifier, not a guessable secret), so remembering a
        # digest of one that verified gives nothing away; a rotated secret has a new verifier (a
        # miss), and a wrong secret never matches a digest (it still pays argon2).
        self._verified: dict[tuple[str, str], bytes] = {}
        self._verified_lock = threading.Lock()
        self.audit = AuditLog()
        self._sigv4_cache: dict[str, tuple[float, tuple[str, Principal]]] = {}
        self._sigv4_lock = threading.Lock()
        self._sigv4_generation = 0  # bumped by every invalidation; a lookup that raced one is not cached
        self.catalog.migrate("identity", MIGRATIONS)
        self._lifecycle = NO_LIFECYCLE
        self._lifecycle_lock = threading.Lock()
        self._reload_lifecycle()

    # ---------------------------------------------------------------- reads

    def _conn(self) -> Connection:
        return self.catalog.reader()

    def realm_exists(self) -> bool:
        return self._conn().execute("SELECT 1 FROM identity_realm").fetchone() is not None

    @staticmethod
    def _app_row(conn: Connection, client_id: str) -> App | None:
        row = conn.execute(f"SELECT {_APP_COLUMNS} FROM identity_apps WHERE client_id = ?", (client_id,)).fetchone()
        return App(*row) if row else None

    @staticmethod
    def _tenant_exists(conn: Connection, name: str) -> bool:
        return conn.execute("SELECT 1 FROM identity_tenants WHERE name = ?", (name,)).fetchone() is not None

    @staticmethod
    def _granted(conn: Connection, client_id: str) -> list[str]:
        return [r[0] for r in conn.execute(
            "SELECT scope FROM identity_policies WHERE client_id = ? ORDER BY scope", (client_id,))]

    def _visible_app(self, principal: Principal, client_id: str, conn: Connection | None = None) -> App:
        """The app, if the caller may know of it; otherwise the same NotFound as a missing one."""
        app = self._app_row(conn or self._conn(), client_id) if isinstance(client_id, str) else None
        if app is None or (not principal.admin and app.tenant != principal.tenant):
            raise AnvilError("NotFound", "application not found")
        return app

    # ---------------------------------------------------------------- secrets

    def _seal(self, client_id: str, secret: str) -> tuple[str, str]:
        return env.seal(self.keyring, secret, client_id), self.keyring.active_id

    def app_secret(self, client_id: str) -> str:
        """The plaintext secret (S3 SigV4 signs with it); never returned over the API after creation."""
        row = self._conn().execute("SELECT envelope FROM identity_apps WHERE client_id = ?", (client_id,)).fetchone()
        if row is None:
            raise AnvilError("NotFound", "application not found")
        return env.open_envelope(self.keyring, row[0], client_id)

    def sigv4_credentials(self, client_id: str) -> tuple[str, Principal] | None:
        """For the S3 gateway: an access key id -> (plaintext secret, principal with every granted scope).

        None when the key is unknown (the gateway answers InvalidAccessKeyId without more detail).
        Known keys are cached for SIGV4_CACHE_TTL seconds (unknown ones never, so junk keys cannot
        fill the cache); identity changes made here invalidate at once (`_forget_sigv4`)."""
        self.catalog.sync()  # many nodes: changes committed on another node are in force here too
        now = time.monotonic()
        hit = self._sigv4_cache.get(client_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        with self._sigv4_lock:
            generation = self._sigv4_generation
        found = self._load_sigv4(client_id)
        if found is not None:
            with self._sigv4_lock:
                if generation == self._sigv4_generation:
                    if len(self._sigv4_cache) >= SIGV4_CACHE_SIZE:
                        self._sigv4_cache.clear()  # bounded; refilling costs one lookup per active key
                    self._sigv4_cache[client_id] = (now + SIGV4_CACHE_TTL, found)
        return found

    def _forget_sigv4(self, client_id: str | None = None) -> None:
        """Drop cached S3 credentials (one key, or all) after a change to secrets, scopes or keys."""
        with self._sigv4_lock:
            self._sigv4_generation += 1
            if client_id is None:
                self._sigv4_cache.clear()
            else:
                self._sigv4_cache.pop(client_id, None)

    def _load_sigv4(self, client_id: str) -> tuple[str, Principal] | None:
        conn = self._conn()
        row = conn.execute("SELECT tenant, envelope, status FROM identity_apps WHERE client_id = ?",
                           (client_id,)).fetchone()
        if row is None:
            return None
        if row[2] != "enabled":
            # Raised, not cached: the gateway answers AccessDenied with this message.
            raise unauthenticated(f"application {client_id} is {row[2]}")
        secret = env.open_envelope(self.keyring, row[1], client_id)
        principal = Principal(tenant=row[0], subject=client_id, admin=row[0] == SYSTEM_TENANT,
                              scopes=tuple(self._granted(conn, client_id)))
        return secret, principal

    # ---------------------------------------------------------------- bootstrap

    def bootstrap(self, endpoint: str | None = None) -> dict[str, Any] | None:
        """First start: the system realm and its admin, written to bootstrap/first-admin.json once."""
        if self.realm_exists():
            return None
        client_id, secret = new_client_id(), new_client_secret()
        envelope, kid = self._seal(client_id, secret)
        verifier = self._hasher.hash(secret)

        def fn(txn: Txn) -> bool:
            if txn.conn.execute("SELECT 1 FROM identity_realm").fetchone():
                return False
            now = txn.now
            txn.conn.execute("INSERT INTO identity_tenants(name, created, created_by) VALUES (?,?,?)",
                             (SYSTEM_TENANT, now, BOOTSTRAP_ACTOR))
            txn.conn.execute(
                "INSERT INTO identity_apps(client_id, tenant, name, created, envelope, key_id, verifier) "
                "VALUES (?,?,?,?,?,?,?)", (client_id, SYSTEM_TENANT, "first-admin", now, envelope, kid, verifier))
            txn.conn.execute("INSERT INTO identity_policies(client_id, scope, granted, granted_by) VALUES (?,?,?,?)",
                             (client_id, "*", now, BOOTSTRAP_ACTOR))
            txn.conn.execute("INSERT INTO identity_realm(id, created, admin_client_id) VALUES (1,?,?)",
                             (now, client_id))
            txn.emit(SYSTEM_TENANT, "identity.bootstrap", "realm", {
                "tenant": SYSTEM_TENANT, "client_id": client_id, "name": "first-admin", "scopes": ["*"],
                "key_id": kid, "envelope": envelope, "verifier": verifier,
            })
            return True

        if not self.catalog.mutate(fn, actor=BOOTSTRAP_ACTOR, request_id=new_request_id()):
            return None
        cred = {"client_id": client_id, "client_secret": secret, "tenant": SYSTEM_TENANT,
                "endpoint": endpoint, "created": time.time()}
        write_file_durably(self.storage.layout.bootstrap / "first-admin.json",
                           (json.dumps(cred, indent=2) + "\n").encode(), mode=0o600)
        return cred

    def ensure_dev_app(self, endpoint: str) -> dict[str, Any]:
        """Development mode: a ready `dev` tenant application, created once, kept in bootstrap/dev-app.json."""
        path = self.storage.layout.bootstrap / "dev-app.json"
        if path.exists():
            try:
                cred = json.loads(path.read_text())
                if self._app_row(self._conn(), cred["client_id"]) is not None:
                    if cred.get("endpoint") != endpoint:  # restarted on another port: the README reads it here
                        cred["endpoint"] = endpoint
                        write_file_durably(path, (json.dumps(cred, indent=2) + "\n").encode(), mode=0o600)
                    return cred
            except (ValueError, KeyError, TypeError):
                pass
        admin = Principal(tenant=SYSTEM_TENANT, subject="bootstrap", admin=True, scopes=("*",))
        ctx = RequestContext(principal=admin)
        if not self._tenant_exists(self._conn(), DEV_TENANT):
            self.create_tenant(ctx, DEV_TENANT)
        created = self.create_app(ctx, DEV_TENANT, "dev-app", DEV_SCOPES)
        cred = {"client_id": created["client_id"], "client_secret": created["client_secret"], "tenant": DEV_TENANT,
                "scopes": DEV_SCOPES, "endpoint": endpoint}
        write_file_durably(path, (json.dumps(cred, indent=2) + "\n").encode(), mode=0o600)
        return cred

    # ---------------------------------------------------------------- tenants

    def create_tenant(self, ctx: RequestContext, name: Any) -> dict[str, Any]:
        authorize(ctx.principal, "admin:write", "system")
        if not isinstance(name, str) or not TENANT_RE.match(name):
            raise AnvilError("InvalidArgument", "tenant names are 2-63 of a-z 0-9 -, starting with a letter or digit")

        def fn(txn: Txn) -> dict[str, Any]:
            if self._tenant_exists(txn.conn, name):
                raise AnvilError("AlreadyExists", "tenant already exists")
            txn.conn.execute("INSERT INTO identity_tenants(name, created, created_by) VALUES (?,?,?)",
                             (name, txn.now, ctx.actor))
            txn.emit(SYSTEM_TENANT, "identity.tenant.create", f"tenant/{name}", {"tenant": name})
            return {"tenant": name, "created": txn.now}

        return self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)

    def list_tenants(self, principal: Principal) -> list[dict[str, Any]]:
        authorize(principal, "admin:read", "system")
        conn = self._conn()
        rows = conn.execute(
            "SELECT t.name, t.created, (SELECT count(*) FROM identity_apps a WHERE a.tenant = t.name) "
            "FROM identity_tenants t ORDER BY t.name")
        return [{"tenant": r[0], "created": r[1], "apps": r[2]} for r in rows]

    # ---------------------------------------------------------------- applications

    def _check_grantable(self, principal: Principal, tenant: str, wanted: list[str]) -> None:
        """Bounded grants: policy:grant on the target tenant, and only scopes the caller holds."""
        authorize(principal, "policy:grant", f"tenant:{tenant}")
        for s in wanted:
            if not any(sc.covers(held, s) for held in principal.scopes):
                raise AnvilError("PermissionDenied", "cannot grant a scope the caller does not hold")

    def create_app(self, ctx: RequestContext, tenant: Any, name: Any, scopes: Any = None) -> dict[str, Any]:
        if not isinstance(tenant, str) or not tenant:
            raise AnvilError("InvalidArgument", "'tenant' is required")
        authorize(ctx.principal, "app:create", f"tenant:{tenant}")
        if not isinstance(name, str) or not APP_NAME_RE.match(name):
            raise AnvilError("InvalidArgument", "application names are 1-63 of A-Z a-z 0-9 _ . -")
        wanted = sc.validate(scopes if scopes is not None else [])
        if wanted:
            self._check_grantable(ctx.principal, tenant, wanted)
        client_id, secret = new_client_id(), new_client_secret()
        envelope, kid = self._seal(client_id, secret)
        verifier = self._hasher.hash(secret)

        def fn(txn: Txn) -> dict[str, Any]:
            if not self._tenant_exists(txn.conn, tenant):
                raise AnvilError("NotFound", "tenant not found")
            if txn.conn.execute("SELECT 1 FROM identity_deleted_apps WHERE client_id = ?", (client_id,)).fetchone():
                # 90 random bits make this practically impossible; a deleted id is still never reissued.
                raise AnvilError("AlreadyExists", "generated client id belongs to a deleted application; retry")
            txn.conn.execute(
                "INSERT INTO identity_apps(client_id, tenant, name, created, envelope, key_id, verifier) "
                "VALUES (?,?,?,?,?,?,?)", (client_id, tenant, name, txn.now, envelope, kid, verifier))
            for s in wanted:
                txn.conn.execute(
                    "INSERT INTO identity_policies(client_id, scope, granted, granted_by) VALUES (?,?,?,?)",
                    (client_id, s, txn.now, ctx.actor))
            txn.emit(SYSTEM_TENANT, "identity.app.create", f"app/{client_id}", {
                "tenant": tenant, "client_id": client_id, "name": name, "scopes": wanted,
                "key_id": kid, "envelope": envelope, "verifier": verifier,
            })
            return {"client_id": client_id, "tenant": tenant, "name": name, "scopes": wanted, "created": txn.now}

        result = self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        return {**result, "client_secret": secret}

    def list_apps(self, principal: Principal, tenant: str | None = None) -> list[dict[str, Any]]:
        if tenant is None and not principal.admin:
            tenant = principal.tenant
        if tenant is None:
            authorize(principal, "admin:read", "system")
            rows = self._conn().execute(f"SELECT {_APP_COLUMNS} FROM identity_apps ORDER BY tenant, name")
        else:
            authorize(principal, "app:read", f"tenant:{tenant}")
            rows = self._conn().execute(
                f"SELECT {_APP_COLUMNS} FROM identity_apps WHERE tenant = ? ORDER BY name", (tenant,))
        apps = [App(*r) for r in rows]
        conn = self._conn()
        return [{**a.to_dict(), "scopes": self._granted(conn, a.client_id)} for a in apps]

    def rotate_secret(self, ctx: RequestContext, client_id: Any) -> dict[str, Any]:
        app = self._visible_app(ctx.principal, client_id)
        authorize(ctx.principal, "app:create", f"tenant:{app.tenant}")
        secret = new_client_secret()
        envelope, kid = self._seal(app.client_id, secret)
        verifier = self._hasher.hash(secret)

        def fn(txn: Txn) -> dict[str, Any]:
            cur = self._app_row(txn.conn, app.client_id)
            if cur is None:
                raise AnvilError("NotFound", "application not found")
            version = cur.secret_version + 1
            txn.conn.execute(
                "UPDATE identity_apps SET envelope = ?, key_id = ?, verifier = ?, secret_version = ?, rotated = ? "
                "WHERE client_id = ?", (envelope, kid, verifier, version, txn.now, app.client_id))
            txn.emit(SYSTEM_TENANT, "identity.app.rotate", f"app/{app.client_id}", {
                "tenant": app.tenant, "client_id": app.client_id, "secret_version": version,
                "key_id": kid, "envelope": envelope, "verifier": verifier,
            })
            return {"client_id": app.client_id, "tenant": app.tenant, "secret_version": version}

        try:
            result = self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        finally:
            self._forget_sigv4(app.client_id)
            self._reload_lifecycle()  # tokens exchanged with the previous secret are refused from now on
        return {**result, "client_secret": secret}

    # ---------------------------------------------------------------- policies

    def grant(self, ctx: RequestContext, client_id: Any, scopes: Any) -> dict[str, Any]:
        return self._change_policy(ctx, client_id, scopes, grant=True)

    def revoke(self, ctx: RequestContext, client_id: Any, scopes: Any) -> dict[str, Any]:
        return self._change_policy(ctx, client_id, scopes, grant=False)

    def _change_policy(self, ctx: RequestContext, client_id: Any, scopes: Any, *, grant: bool) -> dict[str, Any]:
        wanted = sc.validate(scopes)
        if not wanted:
            raise AnvilError("InvalidTokenScope", "at least one scope is required")
        app = self._visible_app(ctx.principal, client_id)
        self._check_grantable(ctx.principal, app.tenant, wanted)
        kind = "identity.policy.grant" if grant else "identity.policy.revoke"

        def fn(txn: Txn) -> dict[str, Any]:
            if self._app_row(txn.conn, app.client_id) is None:
                raise AnvilError("NotFound", "application not found")
            before = set(self._granted(txn.conn, app.client_id))
            changed = [s for s in wanted if (s not in before) == grant]
            if grant and len(before) + len(changed) > sc.MAX_SCOPES:
                raise AnvilError("InvalidTokenScope", f"an application holds at most {sc.MAX_SCOPES} scopes")
            for s in changed:
                if grant:
                    txn.conn.execute(
                        "INSERT INTO identity_policies(client_id, scope, granted, granted_by) VALUES (?,?,?,?)",
                        (app.client_id, s, txn.now, ctx.actor))
                else:
                    txn.conn.execute("DELETE FROM identity_policies WHERE client_id = ? AND scope = ?",
                                     (app.client_id, s))
            if changed:
                txn.emit(SYSTEM_TENANT, kind, f"app/{app.client_id}",
                         {"tenant": app.tenant, "client_id": app.client_id, "scopes": changed})
            return {"client_id": app.client_id, "tenant": app.tenant, "changed": changed,
                    "scopes": self._granted(txn.conn, app.client_id)}

        try:
            return self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        finally:
            self._forget_sigv4(app.client_id)

    def policies(self, principal: Principal, client_id: Any) -> dict[str, Any]:
        app = self._visible_app(principal, client_id)
        authorize(principal, "policy:read", f"tenant:{app.tenant}")
        return {"client_id": app.client_id, "tenant": app.tenant, "scopes": self._granted(self._conn(), app.client_id)}

    # ---------------------------------------------------------------- tokens

    def exchange(self, client_id: Any, client_secret: Any, requested: Any = None,
                 expires_in: Any = None, subject: Any = None) -> dict[str, Any]:
        """Client credentials -> a short-lived token. The argon2 verifier is checked here, once.

        `subject` (e.g. `user:amy`): the token acts for that end user; the application needs
        `authz:act` on its tenant (docs/authz.md, "Token exchange for a subject")."""
        if subject is not None and (not isinstance(subject, str) or not SUBJECT_RE.match(subject)):
            raise AnvilError("InvalidArgument", "subject must look like type:id (e.g. user:amy): a definition name "
                                                "and an id of a-z A-Z 0-9 / _ | - = + . (no wildcard, no #relation), "
                                                f"got {str(subject)[:80]!r}")
        if not isinstance(client_id, str) or not isinstance(client_secret, str) or len(client_secret) > 1024:
            raise AnvilError("InvalidArgument", "client_id and client_secret are required strings")
        if requested is None or requested == "*" or requested == ["*"] or requested == []:
            wanted: list[str] | None = None
        else:
            if isinstance(requested, str):
                requested = requested.split()
            wanted = sc.validate(requested)
        ttl = DEFAULT_TTL
        if expires_in is not None:
            if not isinstance(expires_in, int) or isinstance(expires_in, bool) or not 1 <= expires_in <= MAX_TTL:
                raise AnvilError("InvalidArgument", f"expires_in must be an integer from 1 to {MAX_TTL}")
            ttl = expires_in
        conn = self._conn()
        row = conn.execute("SELECT tenant, verifier, status, secret_version FROM identity_apps WHERE client_id = ?",
                           (client_id,)).fetchone()
        digest = hashlib.sha256(client_secret.encode()).digest()
        with self._verified_lock:
            known = self._verified.get((client_id, row[1])) if row else None
        if known is not None and hmac.compare_digest(known, digest):
            ok = True
        else:
            try:
                self._hasher.verify(row[1] if row else self._dummy_verifier, client_secret)
                ok = row is not None
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                ok = False
            if ok:
                with self._verified_lock:
                    if len(self._verified) >= VERIFIED_MAX:
                        self._verified.clear()  # bounded: a burst of distinct apps pays argon2 again
                    self._verified[(client_id, row[1])] = digest
        if not ok:
            raise unauthenticated("invalid client credentials")
        if row[2] != "enabled":
            # Said only to a caller that proved it holds the secret.
            raise unauthenticated(f"application {client_id} is {row[2]}")
        tenant = row[0]
        granted = self._granted(conn, client_id)
        if not granted:
            raise AnvilError("PermissionDenied", "the application has no granted scopes")
        scopes = list(granted) if wanted is None else sc.intersect(wanted, granted)
        if not scopes:
            raise AnvilError("PermissionDenied", "none of the requested scopes is granted")
        if subject is not None and not any(sc.allows(s, "authz:act", f"tenant:{tenant}") for s in granted):
            raise AnvilError("PermissionDenied", f"acting for a subject needs the scope authz:act|tenant:{tenant}, "
                                                 "which the application does not hold")
        token, claims = self.tokens.issue(tenant=tenant, subject=client_id, scopes=scopes, ttl=ttl,
                                          secret_version=int(row[3]), acting_for=subject or "")
        out = {"access_token": token, "token_type": "Bearer", "expires_in": ttl, "expires_at": claims["exp"],
               "tenant": tenant, "scopes": scopes, "jti": claims["jti"]}
        if subject is not None:
            out["subject"] = subject
        return out

    def authenticate_token(self, token: str) -> Principal:
        return self.authenticate_token_full(token)[0]

    def authenticate_token_full(self, token: str) -> tuple[Principal, TokenInfo]:
        """Signature and expiry (cached), then the lifecycle: disabled or deleted application,
        revoked jti, secret rotated since issue. The lifecycle check is a few dict lookups, and
        none at all while nothing is disabled, revoked or recently rotated."""
        self.catalog.sync()  # many nodes: changes committed on another node are in force here too
        principal, info = self.tokens.verify_full(token)
        life = self._lifecycle
        if life.active:
            why = life.refusal(principal.subject, info)
            if why is not None:
                raise unauthenticated(why)
        return principal, info

    # ---------------------------------------------------------------- lifecycle

    def _reload_lifecycle(self) -> None:
        """Re-read the lifecycle state after a change commits. Under a lock, so two reloads racing
        cannot store an older reading over a newer one."""
        with self._lifecycle_lock:
            self._lifecycle = Lifecycle.load(self._conn(), time.time())

    def _lifecycle_target(self, ctx: RequestContext, client_id: Any, what: str) -> App:
        """The app a lifecycle change is for: visible to the caller, app:create on its tenant, not itself."""
        app = self._visible_app(ctx.principal, client_id)
        authorize(ctx.principal, "app:create", f"tenant:{app.tenant}")
        if app.client_id == ctx.principal.subject:
            # Locking oneself out by accident is easy and hard to undo; another admin can do it.
            raise AnvilError("InvalidArgument", f"an application cannot {what} itself")
        return app

    def set_app_enabled(self, ctx: RequestContext, client_id: Any, enabled: bool) -> dict[str, Any]:
        """Disable (its tokens and SigV4 requests are refused at their next request) or enable again."""
        app = self._lifecycle_target(ctx, client_id, "enable" if enabled else "disable")
        status = "enabled" if enabled else "disabled"

        def fn(txn: Txn) -> dict[str, Any]:
            cur = txn.conn.execute("SELECT status FROM identity_apps WHERE client_id = ?",
                                   (app.client_id,)).fetchone()
            if cur is None:
                raise AnvilError("NotFound", "application not found")
            out = {"client_id": app.client_id, "tenant": app.tenant, "status": status, "changed": cur[0] != status}
            if cur[0] != status:
                txn.conn.execute("UPDATE identity_apps SET status = ?, status_changed = ? WHERE client_id = ?",
                                 (status, txn.now, app.client_id))
                txn.emit(SYSTEM_TENANT, "identity.app.enable" if enabled else "identity.app.disable",
                         f"app/{app.client_id}", {"tenant": app.tenant, "client_id": app.client_id, "status": status})
            return out

        try:
            return self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        finally:
            self._forget_sigv4(app.client_id)
            self._reload_lifecycle()

    def delete_app(self, ctx: RequestContext, client_id: Any) -> dict[str, Any]:
        """Delete an application with its grants; a tombstone keeps its client id from being reused."""
        app = self._lifecycle_target(ctx, client_id, "delete")

        def fn(txn: Txn) -> dict[str, Any]:
            cur = self._app_row(txn.conn, app.client_id)
            if cur is None:
                raise AnvilError("NotFound", "application not found")
            scopes = self._granted(txn.conn, app.client_id)
            txn.conn.execute("DELETE FROM identity_policies WHERE client_id = ?", (app.client_id,))
            txn.conn.execute("DELETE FROM identity_apps WHERE client_id = ?", (app.client_id,))
            txn.conn.execute(
                "INSERT INTO identity_deleted_apps(client_id, tenant, name, deleted, deleted_by) VALUES (?,?,?,?,?)",
                (app.client_id, cur.tenant, cur.name, txn.now, ctx.actor))
            txn.emit(SYSTEM_TENANT, "identity.app.delete", f"app/{app.client_id}",
                     {"tenant": cur.tenant, "client_id": app.client_id, "name": cur.name, "scopes": scopes})
            return {"client_id": app.client_id, "tenant": cur.tenant, "name": cur.name, "deleted": txn.now,
                    "scopes_removed": scopes}

        try:
            return self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        finally:
            self._forget_sigv4(app.client_id)
            self._reload_lifecycle()

    def revoke_token(self, ctx: RequestContext, jti: Any, client_id: Any = None) -> dict[str, Any]:
        """Refuse the token with this jti from its next request on.

        With a client id the revocation matches only that application's token, and needs
        app:create on its tenant (a tenant admin revokes within its tenant); without one it
        matches any token and needs admin:write on system."""
        if not isinstance(jti, str) or not JTI_RE.match(jti):
            raise AnvilError("InvalidArgument", "jti must be the 32 hex digits of a token's jti claim")
        if client_id is None:
            authorize(ctx.principal, "admin:write", "system")
            cid, tenant = None, None
        else:
            app = self._visible_app(ctx.principal, client_id)
            authorize(ctx.principal, "app:create", f"tenant:{app.tenant}")
            cid, tenant = app.client_id, app.tenant

        def fn(txn: Txn) -> dict[str, Any]:
            now = txn.now
            if cid is not None and self._app_row(txn.conn, cid) is None:
                raise AnvilError("NotFound", "application not found")
            cur = txn.conn.execute("SELECT client_id, expires FROM identity_revoked_tokens "
                                   "WHERE jti = ? AND expires > ?", (jti, now)).fetchone()
            if cur is not None and not (cid is None and cur[0] is not None):
                # Already revoked (for this application, or for any): nothing to do. A revocation is
                # only ever widened (by a system admin), never narrowed or moved to another app.
                return {"jti": jti, "client_id": cid, "expires": cur[1], "changed": False}
            # Revocations whose tokens have all expired are dropped here, journaled with this one.
            pruned = [r[0] for r in txn.conn.execute(
                "SELECT jti FROM identity_revoked_tokens WHERE expires <= ? OR jti = ? ORDER BY jti", (now, jti))]
            txn.conn.execute("DELETE FROM identity_revoked_tokens WHERE expires <= ? OR jti = ?", (now, jti))
            expires = now + REVOCATION_LIFETIME
            txn.conn.execute(
                "INSERT INTO identity_revoked_tokens(jti, client_id, tenant, expires, revoked, revoked_by) "
                "VALUES (?,?,?,?,?,?)", (jti, cid, tenant, expires, now, ctx.actor))
            txn.emit(SYSTEM_TENANT, "identity.token.revoke", f"app/{cid}" if cid else "tokens",
                     {"tenant": tenant, "client_id": cid, "jti": jti, "expires": expires, "pruned": pruned})
            return {"jti": jti, "client_id": cid, "expires": expires, "changed": True}

        try:
            return self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        finally:
            self._reload_lifecycle()

    # ---------------------------------------------------------------- key rotation

    def rotate_keys(self, ctx: RequestContext, *, dry_run: bool) -> dict[str, Any]:
        """Re-encrypt every envelope not under the active key; report what changed (or would)."""
        authorize(ctx.principal, "admin:write", "system")
        rows = list(self._conn().execute("SELECT client_id, envelope FROM identity_apps ORDER BY client_id"))
        active = self.keyring.active_id
        resealed: dict[str, tuple[str, str]] = {}
        unreadable: list[dict[str, str]] = []
        for client_id, envelope in rows:
            try:
                kid = env.key_id(envelope)
                if kid == active:
                    continue
                plain = env.open_envelope(self.keyring, envelope, client_id)
            except env.EnvelopeError as e:
                unreadable.append({"client_id": client_id, "problem": e.message})
                continue
            resealed[client_id] = (envelope, env.seal(self.keyring, plain, client_id))
        report: dict[str, Any] = {"active_key_id": active, "dry_run": dry_run, "unreadable": unreadable,
                                  "unchanged": len(rows) - len(resealed) - len(unreadable)}
        if dry_run:
            report["would_change"] = sorted(resealed)
            return report
        if not resealed:
            report["changed"] = []
            return report

        def fn(txn: Txn) -> list[str]:
            changed: dict[str, str] = {}
            for client_id, (old, new) in resealed.items():
                cur = txn.conn.execute("SELECT envelope FROM identity_apps WHERE client_id = ?",
                                       (client_id,)).fetchone()
                if cur is None or cur[0] != old:
                    continue  # rotated or removed meanwhile: its envelope is already current
                txn.conn.execute("UPDATE identity_apps SET envelope = ?, key_id = ? WHERE client_id = ?",
                                 (new, active, client_id))
                changed[client_id] = new
            if changed:
                txn.emit(SYSTEM_TENANT, "identity.key.rotate", "keys",
                         {"key_id": active, "envelopes": changed})
            return sorted(changed)

        try:
            report["changed"] = self.catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)
        finally:
            self._forget_sigv4()
        return report

    # ---------------------------------------------------------------- public buckets

    def check_public_access(self, principal: Principal, bucket_tenant: str) -> None:
        """Admins, or holders of policy:grant on the bucket's tenant, may open a bucket to anonymous reads."""
        authorize(principal, "policy:grant", f"tenant:{bucket_tenant}")

    # -- state checks (the admin API's summary/validate; the participant runs the same on any catalog)

    def records_summary(self) -> dict[str, Any]:
        return participant.summary(self.storage.catalog.reader())

    def validate_envelopes(self) -> list[dict[str, Any]]:
        return participant.validate(self.storage.catalog.reader(), self.keyring)


def first_admin_path(storage_path: str | Path) -> Path:
    return Path(storage_path) / "bootstrap" / "first-admin.json"
