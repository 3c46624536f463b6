"""Relationship-based authorisation (Zanzibar, SpiceDB-compatible): schemas, relationships,
caveats, check / lookup / expand with consistency tokens. See docs/authz.md."""

from anvil.authz.service import AuthzService

__all__ = ["AuthzService"]
