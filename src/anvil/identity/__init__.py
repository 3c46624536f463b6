"""Identity and access: tenants, applications, secret envelopes, tokens, scopes, the gate."""

from anvil.identity.gate import BucketAccess, authorize, install_bucket_lookup
from anvil.identity.recovery import describe, summary, validate
from anvil.identity.service import IdentityService

__all__ = ["BucketAccess", "IdentityService", "authorize", "describe", "install_bucket_lookup", "summary",
           "validate"]
