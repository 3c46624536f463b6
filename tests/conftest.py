from __future__ import annotations

import os

import pytest

from anvil.client import AnvilClient
from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import s3_client

# Every storage root preallocates a free-space reserve (32 MiB by default); a run creates over a
# hundred roots, so the suite keeps them small. The full-disk tests use the real defaults.
os.environ.setdefault("ANVIL_DISK_RESERVE", "1M")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One real server per test module (each test uses its own buckets)."""
    srv = AnvilServer(tmp_path_factory.mktemp("anvil") / "data").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def s3(server: AnvilServer):
    """A boto3 S3 client of the module's server, signing as the first admin application."""
    return s3_client(server)


@pytest.fixture
def client(server: AnvilServer):
    with server.client() as c:
        yield c


@pytest.fixture
def bucket(client: AnvilClient) -> str:
    name = unique_bucket()
    client.create_bucket(name)
    return name


@pytest.fixture
def versioned_bucket(client: AnvilClient) -> str:
    name = unique_bucket("v")
    client.create_bucket(name, versioning="Enabled")
    return name


# Every native API answer checked against the OpenAPI document (tests/openapi_check.py), when asked.
_RESPONSES = None
if os.environ.get("ANVIL_VALIDATE_RESPONSES") == "1":
    from tests.openapi_check import install

    _RESPONSES = install()


@pytest.fixture(autouse=True)
def _openapi_responses():
    if _RESPONSES is None:
        yield
        return
    before = len(_RESPONSES.violations)
    yield
    new = _RESPONSES.violations[before:]
    if new:
        pytest.fail("answers that do not match the OpenAPI document:\n  " + "\n  ".join(dict.fromkeys(new)),
                    pytrace=False)
