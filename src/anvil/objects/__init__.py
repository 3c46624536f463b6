"""Buckets, objects, versions, preconditions, idempotency, copy and multipart."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anvil.objects.service import Bucket, Conditions, ListResult, ObjectService, ObjectVersion

__all__ = ["Bucket", "Conditions", "ListResult", "ObjectService", "ObjectVersion"]


def __getattr__(name: str) -> Any:
    # Loaded on first use (PEP 562): `anvil fsck` imports this package's participant and
    # references, which need none of the service (~0.1 s of imports).
    if name in __all__:
        from anvil.objects import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
