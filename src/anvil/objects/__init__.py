"""Buckets, objects, versions, preconditions, idempotency, copy and multipart."""

from anvil.objects.service import Bucket, Conditions, ListResult, ObjectService, ObjectVersion

__all__ = ["Bucket", "Conditions", "ListResult", "ObjectService", "ObjectVersion"]
