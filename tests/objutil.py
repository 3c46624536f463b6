"""Small assertions shared by the object-store tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from anvil.client import AnvilAPIError, AnvilClient


def journal_seq(client: AnvilClient) -> int:
    return client.health()["journal"]["seq"]


def api_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> AnvilAPIError:
    """Call fn, which must fail with an API error; return the error."""
    with pytest.raises(AnvilAPIError) as info:
        fn(*args, **kwargs)
    return info.value


def expect_error(code: str, status: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> AnvilAPIError:
    err = api_error(fn, *args, **kwargs)
    assert (err.code, err.status) == (code, status), f"{err.code} {err.status}: {err.message}"
    return err


def unchanged(client: AnvilClient, code: str, status: int, fn: Callable[..., Any], *args: Any,
              **kwargs: Any) -> AnvilAPIError:
    """The call fails with (code, status) and appends nothing to the journal (no state change)."""
    before = journal_seq(client)
    err = expect_error(code, status, fn, *args, **kwargs)
    assert journal_seq(client) == before, "a refused request changed state"
    return err


def all_keys(client: AnvilClient, bucket: str, prefix: str = "") -> list[str]:
    return [o["key"] for o in client.iter_objects(bucket, prefix=prefix) if "key" in o]


def events_since(client: AnvilClient, seq: int) -> list[dict[str, Any]]:
    return client.journal(after=seq, limit=1000)
