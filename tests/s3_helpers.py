"""boto3 clients and credentials for the S3 gateway tests."""

from __future__ import annotations

import json

import boto3
from botocore.config import Config

from tests.helpers import AnvilServer

REGION = "us-east-1"


def dev_credentials(server: AnvilServer) -> dict[str, str]:
    """S3 keys of the first admin application: access key = client_id, secret = client_secret."""
    cred = json.loads((server.storage_path / "bootstrap" / "first-admin.json").read_text())
    return {"access_key_id": cred["client_id"], "secret_access_key": cred["client_secret"]}


def s3_client(server: AnvilServer, *, region: str = REGION, secret: str | None = None, **config):
    creds = dev_credentials(server)
    cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                 retries={"max_attempts": 1, "mode": "standard"}, **config)
    return boto3.client(
        "s3", endpoint_url=server.endpoint, region_name=region, config=cfg,
        aws_access_key_id=creds["access_key_id"],
        aws_secret_access_key=secret if secret is not None else creds["secret_access_key"],
    )


def aws_env(server: AnvilServer) -> dict[str, str]:
    """Environment for the aws CLI pointed at this server."""
    import os

    creds = dev_credentials(server)
    return {**os.environ, "AWS_ACCESS_KEY_ID": creds["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": creds["secret_access_key"], "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_ENDPOINT_URL": server.endpoint, "AWS_MAX_ATTEMPTS": "1", "AWS_PAGER": ""}
