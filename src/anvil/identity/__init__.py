"""Identity and access. For now: the single authorisation gate every route calls."""

from anvil.identity.gate import authorize

__all__ = ["authorize"]
