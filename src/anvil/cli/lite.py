"""A small stdlib HTTP client for the CLI's online backup: `anvil backup create --endpoint` makes one
token exchange and one request, and loading the SDK for them (httpx, pydantic and the API models,
~0.2-0.4 s of CPU) cost more than a whole no-change snapshot on the server.

Only the success path is handled here. An error answer or a failed connection is raised as the
SDK's own exception (`AnvilAPIError`, `Unreachable`, `ConnectionError`, `InvalidEndpoint`; the SDK
is imported then), so messages, hints and exit codes are the SDK path's.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from typing import Any

TOKEN_PATH = "/anvil/v1/auth/token"


class LiteClient:
    """POST JSON to an Anvil server with client credentials (ANVIL_CLIENT_ID / ANVIL_CLIENT_SECRET)."""

    def __init__(self, endpoint: str, *, timeout: float = 60.0):
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.hostname is None:
            from anvil.client import check_endpoint

            check_endpoint(endpoint)  # raises InvalidEndpoint, worded as the SDK words it
            raise ValueError(f"endpoint {endpoint!r} is not a URL this client can use")
        self.endpoint = endpoint.rstrip("/")
        self._parts = parts
        self._base = parts.path.rstrip("/")
        self.timeout = timeout
        self.client_id = os.environ.get("ANVIL_CLIENT_ID") or None
        self._secret = os.environ.get("ANVIL_CLIENT_SECRET") or None
        self._token: str | None = None

    def _connection(self) -> Any:
        import http.client

        port = self._parts.port
        if self._parts.scheme == "https":
            return http.client.HTTPSConnection(self._parts.hostname, port, timeout=self.timeout)
        return http.client.HTTPConnection(self._parts.hostname, port, timeout=self.timeout)

    def _send(self, method: str, path: str, body: Any,
              headers: dict[str, str]) -> tuple[int, str, dict[str, str], bytes]:
        data = json.dumps(body).encode()
        conn = self._connection()
        try:
            try:
                conn.connect()
            except (ConnectionRefusedError, socket.gaierror, TimeoutError, OSError) as e:
                raise _unreachable(self.endpoint, e) from e
            try:
                conn.request(method, self._base + path, body=data,
                             headers={"content-type": "application/json", "accept": "application/json", **headers})
                resp = conn.getresponse()
                payload = resp.read()
            except TimeoutError as e:
                from anvil.client import ConnectionError as ClientConnectionError

                raise ClientConnectionError(self.endpoint, f"timed out ({type(e).__name__})") from e
            except OSError as e:
                from anvil.client import ConnectionError as ClientConnectionError

                raise ClientConnectionError(self.endpoint, str(e) or type(e).__name__) from e
            return resp.status, resp.reason, {k.lower(): v for k, v in resp.getheaders()}, payload
        finally:
            conn.close()

    def _token_value(self, force: bool = False) -> str | None:
        if self.client_id is None or self._secret is None:
            return None  # unauthenticated: the server's 401 says what is missing
        if self._token is None or force:
            status, reason, headers, payload = self._send(
                "POST", TOKEN_PATH, {"client_id": self.client_id, "client_secret": self._secret}, {})
            _raise_for(status, reason, headers, payload)
            self._token = json.loads(payload)["access_token"]
        return self._token

    def post(self, path: str, body: Any) -> Any:
        """The answer's JSON; an error answer raises the SDK's AnvilAPIError. A token the server no
        longer takes is exchanged again once (as the SDK does)."""
        token = self._token_value()
        for attempt in (0, 1):
            headers = {"authorization": f"Bearer {token}"} if token else {}
            status, reason, resp_headers, payload = self._send("POST", path, body, headers)
            if status == 401 and token and attempt == 0:
                token = self._token_value(force=True)
                continue
            _raise_for(status, reason, resp_headers, payload)
            return json.loads(payload)
        raise AssertionError("unreachable")


def _unreachable(endpoint: str, exc: BaseException) -> Exception:
    from anvil.client import ConnectionError as ClientConnectionError
    from anvil.client import Unreachable

    if isinstance(exc, TimeoutError):
        return ClientConnectionError(endpoint, f"timed out ({type(exc).__name__})")
    reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else (str(exc) or type(exc).__name__)
    return Unreachable(endpoint, reason)


def _raise_for(status: int, reason: str, headers: dict[str, str], payload: bytes) -> None:
    """The SDK's `_raise_for`, on a stdlib answer."""
    if status < 400 and status != 304:
        return
    from anvil.client import AnvilAPIError

    code, message, request_id = "Unknown", reason, headers.get("x-request-id")
    if status == 304:
        code, message = "NotModified", "not modified"
    elif headers.get("x-anvil-error-code"):
        code = headers["x-anvil-error-code"]
    else:
        try:
            err = json.loads(payload)["error"]
            code, message, request_id = err["code"], err["message"], err.get("request_id")
        except (ValueError, KeyError, TypeError):
            pass
    raise AnvilAPIError(status, code, message, request_id, None)
