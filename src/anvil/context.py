"""Who is asking, on whose behalf, under which request id: passed down to every mutation."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from anvil.frozen import fast_init


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Principal:
    tenant: str
    subject: str
    admin: bool = False
    scopes: tuple[str, ...] = ()
    anonymous: bool = False
    # The end user an application's token acts for (`user:amy`), from the token exchange's `subject`;
    # checks on buckets bound to relationships are made for it (docs/authz.md, "Object access").
    acting_for: str = ""

    @property
    def actor(self) -> str:
        return f"{self.tenant}/{self.subject}"


# Until identity fills the gate in, every request is this principal.
DEV_PRINCIPAL = Principal(tenant="default", subject="dev", admin=True, scopes=("*",))


@fast_init
@dataclass(frozen=True)
class RequestContext:
    principal: Principal
    request_id: str = field(default_factory=new_request_id)
    idempotency_key: str | None = None

    @property
    def actor(self) -> str:
        return self.principal.actor

    @property
    def tenant(self) -> str:
        return self.principal.tenant
