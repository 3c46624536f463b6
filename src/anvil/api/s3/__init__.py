"""The S3 gateway: S3's REST API translated onto `anvil.objects`, authorised through `anvil.identity`."""

from anvil.api.s3.gateway import S3Gateway

__all__ = ["S3Gateway"]
