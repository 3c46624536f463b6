"""Identity and access: tenants, applications, secret envelopes, tokens, scopes, the gate."""

from anvil.identity.gate import BucketAccess, authorize, install_bucket_lookup
from anvil.identity.participant import summary, validate
from anvil.identity.service import IdentityService

__all__ = ["BucketAccess", "IdentityService", "authorize", "install_bucket_lookup", "summary",
           "validate"]
