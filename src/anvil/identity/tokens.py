"""Short-lived HS256 JWTs and the per-request verification path.

Verification must be cheap (it runs on every request): HS256 plus a small LRU of
token string -> principal. A cached entry is only as good as the token's own `exp`,
which is checked on every hit; the cache holds no secret the token does not already carry.
The cache only answers "is this a well-signed, unexpired token and whose is it": whether
its application is still enabled, or the token revoked, is decided by the identity service
on every request, after this (see `IdentityService.authenticate_token`).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import OrderedDict
from typing import NamedTuple

import jwt

from anvil.context import Principal
from anvil.errors import AnvilError

ALGORITHM = "HS256"
ISSUER = "anvil"
MAX_TOKEN_BYTES = 8192
DEFAULT_TTL = 900
MAX_TTL = 3600
SYSTEM_TENANT = "system"
CACHE_SIZE = 4096


def unauthenticated(message: str = "invalid or missing token") -> AnvilError:
    return AnvilError("Unauthenticated", message, headers={"www-authenticate": "Bearer"})


class TokenInfo(NamedTuple):
    """What the per-request lifecycle checks need from a verified token besides its principal."""

    jti: str
    exp: float
    secret_version: int  # the application's secret version when it was issued (claim `sv`)


class TokenAuthority:
    def __init__(self, secret: bytes):
        self._secret = secret
        self._cache: OrderedDict[str, tuple[float, Principal, TokenInfo]] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, *, tenant: str, subject: str, scopes: list[str], ttl: int,
              secret_version: int = 1, acting_for: str = "") -> tuple[str, dict]:
        now = time.time()
        # NumericDate claims are whole seconds here (clients compare them as integers); exp rounds up
        # so a token lives at least the ttl asked for, never up to a second less. `sv` lets a secret
        # rotation refuse the tokens exchanged with the previous secret (whole seconds could not).
        claims = {
            "iss": ISSUER, "sub": subject, "tenant": tenant, "scopes": scopes,
            "iat": int(now), "exp": math.ceil(now + ttl), "jti": uuid.uuid4().hex, "sv": secret_version,
        }
        if acting_for:
            claims["act_for"] = acting_for  # the end user the application acts for (docs/authz.md)
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM), claims

    def verify(self, token: str) -> Principal:
        return self.verify_full(token)[0]

    def peek(self, token: str) -> tuple[Principal, TokenInfo] | None:
        """A token verified before and still unexpired, from the cache alone (None: not cached, or
        expired: `verify_full` decides). The small GET's path (api/fastget.py): one dict lookup,
        no lock (a single lookup is atomic; recency is not refreshed, so a hot token may be evicted
        and verified again, never accepted wrongly)."""
        hit = self._cache.get(token)
        if hit is not None and hit[0] > time.time():
            return hit[1], hit[2]
        return None

    def verify_full(self, token: str) -> tuple[Principal, TokenInfo]:
        if len(token) > MAX_TOKEN_BYTES:
            raise unauthenticated("token too large")
        now = time.time()
        with self._lock:
            hit = self._cache.get(token)
            if hit is not None:
                self._cache.move_to_end(token)
        if hit is not None:
            if hit[0] > now:
                return hit[1], hit[2]
            raise unauthenticated("token expired")
        try:
            # `algorithms` is named: a token claiming alg none or any other algorithm is refused.
            claims = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "jti", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise unauthenticated("token expired") from None
        except jwt.PyJWTError:
            raise unauthenticated("invalid token") from None
        tenant, scopes = claims.get("tenant"), claims.get("scopes")
        if not isinstance(tenant, str) or not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise unauthenticated("invalid token")
        acting_for = claims.get("act_for", "")
        if not isinstance(acting_for, str):
            raise unauthenticated("invalid token")
        principal = Principal(tenant=tenant, subject=str(claims["sub"]), admin=tenant == SYSTEM_TENANT,
                              scopes=tuple(scopes), acting_for=acting_for)
        sv = claims.get("sv", 1)  # tokens from before `sv` existed count as the first secret's
        info = TokenInfo(str(claims["jti"]), float(claims["exp"]),
                         sv if isinstance(sv, int) and not isinstance(sv, bool) else 0)
        with self._lock:
            self._cache[token] = (info.exp, principal, info)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return principal, info
