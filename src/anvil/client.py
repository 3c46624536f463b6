"""`AnvilClient`: the Python SDK for the native API (S3 is used through boto3)."""

from __future__ import annotations

import base64
import builtins
import json
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx

from anvil import DEFAULT_ENDPOINT
from anvil import api_models as m

M = TypeVar("M", bound=m.AnvilModel)
UPLOAD_CHUNK = 1024 * 1024
DEFAULT_PART_SIZE = 16 * 1024 * 1024


# ------------------------------------------------------------ errors and transport
#
# The SDK raises only its own exceptions, all subclasses of `AnvilError` (docs/cli.md, "Errors"):
# `AnvilAPIError` (the server answered with an error: `.code`, `.status`, `.request_id`),
# `ConnectionError` (no answer, or the connection broke: `.endpoint`, `.reason`) and its subclass
# `Unreachable` (nothing listens there, or the name does not resolve), and `InvalidEndpoint`.
# httpx's errors are translated in one place, the transport (`_Transport`), so every request,
# streamed or not, goes through the same translation.


class AnvilError(Exception):
    """Base of every exception the SDK raises."""


class InvalidEndpoint(AnvilError, ValueError):
    """The endpoint is not an http(s) URL."""


class ConnectionError(AnvilError, builtins.ConnectionError):  # noqa: A001 - anvil.client.ConnectionError
    """No answer from the endpoint, or the connection broke while a request or answer was in flight."""

    def __init__(self, endpoint: str, reason: str):
        super().__init__(f"{endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason


class Unreachable(ConnectionError):
    """Nothing answered at the endpoint (connection refused, unknown host, connect timeout)."""


def check_endpoint(endpoint: str) -> str:
    """`endpoint` without a trailing slash, or InvalidEndpoint naming the fix."""
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        hint = f" (did you mean http://{endpoint}?)" if "://" not in endpoint else ""
        raise InvalidEndpoint(f"endpoint {endpoint!r} must be an http:// or https:// URL{hint}")
    return endpoint.rstrip("/")


def _translate(endpoint: str, exc: BaseException) -> ConnectionError:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | ConnectionRefusedError | socket.gaierror):
        reason = str(exc) or type(exc).__name__
        if "Connection refused" in reason or isinstance(exc, ConnectionRefusedError):
            reason = "connection refused"
        return Unreachable(endpoint, reason)
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return ConnectionError(endpoint, f"timed out ({type(exc).__name__})")
    return ConnectionError(endpoint, str(exc) or type(exc).__name__)


class _TranslatedStream(httpx.SyncByteStream):
    def __init__(self, inner: Any, endpoint: str):
        self._inner, self._endpoint = inner, endpoint

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._inner
        except httpx.TransportError as e:
            raise _translate(self._endpoint, e) from e

    def close(self) -> None:
        try:
            self._inner.close()
        except httpx.TransportError as e:
            raise _translate(self._endpoint, e) from e


class _Transport(httpx.BaseTransport):
    """httpx's transport, with its errors (at connect time and while a body streams) raised as ours."""

    def __init__(self, endpoint: str, inner: httpx.BaseTransport | None = None):
        self._endpoint = endpoint
        self._inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = self._inner.handle_request(request)
        except httpx.TransportError as e:
            raise _translate(self._endpoint, e) from e
        response.stream = _TranslatedStream(response.stream, self._endpoint)
        return response

    def close(self) -> None:
        self._inner.close()


class AnvilAPIError(AnvilError):
    """The server answered with an error: `code` (docs), `message`, HTTP `status`, `request_id`."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None,
                 headers: httpx.Headers | None = None):
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        if headers is None:
            headers = httpx.Headers()
        self.headers = headers


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400 and resp.status_code != 304:
        return
    code, message, request_id = "Unknown", resp.reason_phrase, resp.headers.get("x-request-id")
    if resp.status_code == 304:
        code, message = "NotModified", "not modified"
    elif resp.headers.get("x-anvil-error-code"):
        code = resp.headers["x-anvil-error-code"]
    else:
        try:
            err = resp.json()["error"]
            code, message, request_id = err["code"], err["message"], err.get("request_id")
        except (ValueError, KeyError, TypeError):
            pass
    raise AnvilAPIError(resp.status_code, code, message, request_id, resp.headers)


def _file_chunks(f: IO[bytes]) -> Iterator[bytes]:
    while True:
        data = f.read(UPLOAD_CHUNK)
        if not data:
            return
        yield data


def _cond_headers(if_match: str | None, if_none_match: str | None, if_version_match: str | None,
                  if_version_none_match: str | None = None) -> dict[str, str]:
    h: dict[str, str] = {}
    if if_version_none_match is not None:
        h["x-anvil-if-version-none-match"] = if_version_none_match
    if if_match is not None:
        h["if-match"] = if_match if if_match == "*" else f'"{if_match.strip(chr(34))}"'
    if if_none_match is not None:
        h["if-none-match"] = if_none_match if if_none_match == "*" else f'"{if_none_match.strip(chr(34))}"'
    if if_version_match is not None:
        h["x-anvil-if-version-match"] = if_version_match
    return h


def object_info(headers: httpx.Headers) -> dict[str, Any]:
    """The object description carried in GET/HEAD response headers."""
    meta = {
        k[len("x-anvil-meta-"):]: urllib.parse.unquote(v)
        for k, v in headers.items()
        if k.startswith("x-anvil-meta-")
    }
    parts = headers.get("x-anvil-parts-count")
    return {
        "etag": headers.get("etag", "").strip('"'),
        "version_id": headers.get("x-anvil-version-id"),
        "size": int(headers.get("content-length", "0")),
        "content_type": headers.get("content-type"),
        "last_modified": headers.get("last-modified"),
        "sha256": headers.get("x-anvil-sha256"),
        "metadata": meta,
        "parts_count": int(parts) if parts else None,
        "content_range": headers.get("content-range"),
    }


def exchange_token(endpoint: str, client_id: str, client_secret: str, *, scopes: list[str] | None = None,
                   expires_in: int | None = None, timeout: float = 30.0, subject: str | None = None) -> m.Token:
    """Client credentials -> `{access_token, expires_in, expires_at, tenant, scopes, ...}`. `subject`
    (e.g. `user:amy`): a token acting for that end user (needs `authz:act`; docs/authz.md)."""
    body: dict[str, Any] = {"client_id": client_id, "client_secret": client_secret}
    if subject is not None:
        body["subject"] = subject
    if scopes is not None:
        body["scopes"] = scopes
    if expires_in is not None:
        body["expires_in"] = expires_in
    endpoint = check_endpoint(endpoint)
    with httpx.Client(transport=_Transport(endpoint), timeout=timeout) as http:
        resp = http.post(endpoint + "/anvil/v1/auth/token", json=body)
    _raise_for(resp)
    return m.Token.model_validate(resp.json())


class ClientCredentialsAuth(httpx.Auth):
    """Exchanges client credentials for a token, refreshes it before expiry, and retries a
    replayable request once when the server says the token is no longer good."""

    def __init__(self, endpoint: str, client_id: str, client_secret: str, *, scopes: list[str] | None = None,
                 subject: str | None = None):
        self._endpoint, self._client_id, self._secret, self._scopes = endpoint, client_id, client_secret, scopes
        self._subject = subject
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    def token(self, *, force: bool = False) -> str:
        with self._lock:
            if force or self._token is None or time.time() >= self._refresh_at:
                res = exchange_token(self._endpoint, self._client_id, self._secret, scopes=self._scopes,
                                     subject=self._subject)
                ttl = float(res["expires_in"])
                self._token = res["access_token"]
                self._refresh_at = time.time() + ttl - min(60.0, ttl / 2)
            return self._token

    def auth_flow(self, request: httpx.Request):  # type: ignore[override]
        request.headers["authorization"] = f"Bearer {self.token()}"
        response = yield request
        if response.status_code == 401 and isinstance(request.stream, httpx.ByteStream):
            request.headers["authorization"] = f"Bearer {self.token(force=True)}"
            yield request


class WatchStream:
    """An iterator over watch events that reconnects by itself and resumes from its last cursor.

    `cursor` is the seq of the last event handed out (or the server's scan position, which
    heartbeats advance past filtered events); a reconnect sends it as `Last-Event-ID`, so no
    event is lost or repeated across dropped connections and server restarts.
    """

    def __init__(self, client: AnvilClient, params: dict[str, Any], *, after: int | None,
                 heartbeat: float | None, reconnect: bool, reconnect_timeout: float):
        self._client = client
        self._params = params
        self.cursor: int | None = after
        self.reconnect = reconnect
        self.reconnect_timeout = reconnect_timeout
        self.reconnects = 0
        self._read_timeout = (heartbeat or 15.0) * 3 + 5
        self._resp: httpx.Response | None = None
        self._closed = False
        self._gen = self._run()

    def __iter__(self) -> WatchStream:
        return self

    def __next__(self) -> m.WatchEvent:
        return next(self._gen)

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        resp = self._resp
        if resp is not None:
            try:
                resp.close()
            except Exception:  # noqa: BLE001 - closing an already broken stream
                pass
        try:
            self._gen.close()
        except ValueError:
            pass  # closed from another thread while iterating: the closed response ends the loop

    def _run(self) -> Iterator[m.WatchEvent]:
        failing_since: float | None = None
        delay = 0.05
        connected_once = False
        while not self._closed:
            headers = {"last-event-id": str(self.cursor)} if self.cursor is not None else {}
            try:
                with self._client._http.stream(
                    "GET", "/anvil/v1/watch", params=self._params, headers=headers,
                    timeout=httpx.Timeout(10.0, read=self._read_timeout),
                ) as resp:
                    self._resp = resp
                    if resp.status_code >= 400:
                        resp.read()
                        _raise_for(resp)
                    if connected_once:
                        self.reconnects += 1
                    connected_once = True
                    failing_since, delay = None, 0.05
                    yield from self._parse(resp.iter_lines())
            except AnvilAPIError as e:
                if e.status < 500 or not self.reconnect:
                    raise
                failing_since = self._backoff(failing_since, delay, e)
                delay = min(delay * 2, 1.0)
            except ConnectionError as e:
                if self._closed:
                    return
                if not self.reconnect:
                    raise
                failing_since = self._backoff(failing_since, delay, e)
                delay = min(delay * 2, 1.0)
            finally:
                self._resp = None
            # A clean end of stream (server shutting down) also reconnects from the cursor.

    def _backoff(self, failing_since: float | None, delay: float, exc: Exception) -> float:
        now = time.monotonic()
        since = now if failing_since is None else failing_since
        if now - since > self.reconnect_timeout:
            raise exc
        time.sleep(delay)
        return since

    def _parse(self, lines: Iterable[str]) -> Iterator[m.WatchEvent]:
        event_id: str | None = None
        event_type = ""
        data: list[str] = []
        for line in lines:
            if line == "":
                if event_type == "error":
                    err = json.loads("\n".join(data)).get("error", {})
                    code = err.get("code", "Unknown")
                    raise AnvilAPIError(410 if code == "CursorExpired" else 500, code, err.get("message", ""))
                if data:
                    event = m.WatchEvent.model_validate(json.loads("\n".join(data)))
                    if event_id is not None:
                        self.cursor = int(event_id)
                    yield event
                elif event_id is not None:
                    self.cursor = int(event_id)  # an id-only frame: the server's scan position
                event_id, event_type, data = None, "", []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                event_id = value
            elif name == "data":
                data.append(value)
            elif name == "event":
                event_type = value


class AnvilClient:
    """The native API. Authenticate with `client_id`/`client_secret` (tokens are exchanged and
    refreshed automatically; ANVIL_CLIENT_ID/ANVIL_CLIENT_SECRET are the defaults) or a fixed `token`."""

    def __init__(self, endpoint: str | None = None, *, timeout: float = 60.0, token: str | None = None,
                 client_id: str | None = None, client_secret: str | None = None,
                 scopes: list[str] | None = None, subject: str | None = None):
        # `subject`: act for that end user (token exchange with subject; docs/authz.md, "Object access").
        self.endpoint = check_endpoint(endpoint or os.environ.get("ANVIL_ENDPOINT") or DEFAULT_ENDPOINT)
        import httpx

        headers = {"authorization": f"Bearer {token}"} if token else {}
        if token is None:
            client_id = client_id or os.environ.get("ANVIL_CLIENT_ID") or None
            client_secret = client_secret or os.environ.get("ANVIL_CLIENT_SECRET") or None
        auth = None
        if token is None and client_id and client_secret:
            auth = ClientCredentialsAuth(self.endpoint, client_id, client_secret, scopes=scopes, subject=subject)
        self.client_id = client_id if auth is not None else None
        self._http = httpx.Client(base_url=self.endpoint, timeout=timeout, headers=headers, auth=auth,
                                  transport=_Transport(self.endpoint))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AnvilClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        resp = self._http.request(method, path, **kwargs)
        _raise_for(resp)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # Typed results: the answer read into its model (anvil.api_models), the same class that
    # describes it in the OpenAPI document. The pattern for a method still answering a dict:
    # declare the model, list it in anvil.api.openapi.RESPONSES, and return `self._model(...)`.
    def _model(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate(self._json(method, path, **kwargs))

    def _models(self, model: type[M], field: str, method: str, path: str, **kwargs: Any) -> list[M]:
        return [model.model_validate(item) for item in self._json(method, path, **kwargs)[field]]

    @staticmethod
    def _b(bucket: str) -> str:
        return "/anvil/v1/buckets/" + urllib.parse.quote(bucket, safe="")

    @staticmethod
    def _idem(key: str | None) -> dict[str, str]:
        return {"idempotency-key": key} if key else {}

    # ------------------------------------------------------------ health

    def health(self) -> m.Ready:
        return self._model(m.Ready, "GET", "/anvil/health/ready")

    # ------------------------------------------------------------ buckets

    def create_bucket(self, name: str, *, versioning: str | None = None,
                      idempotency_key: str | None = None) -> m.BucketCreated:
        body = {"versioning": versioning} if versioning else {}
        return self._model(m.BucketCreated, "PUT", self._b(name), json=body, headers=self._idem(idempotency_key))

    def list_buckets(self) -> list[m.Bucket]:
        return self._models(m.Bucket, "buckets", "GET", "/anvil/v1/buckets")

    def get_bucket(self, name: str) -> m.Bucket:
        return self._model(m.Bucket, "GET", self._b(name))

    def delete_bucket(self, name: str, *, idempotency_key: str | None = None) -> m.BucketDeleted:
        return self._model(m.BucketDeleted, "DELETE", self._b(name), headers=self._idem(idempotency_key))

    def set_versioning(self, name: str, status: str, *, idempotency_key: str | None = None) -> m.VersioningSet:
        return self._model(m.VersioningSet, "PUT", self._b(name) + "/versioning", json={"status": status},
                           headers=self._idem(idempotency_key))

    # ------------------------------------------------------------ objects

    def put_object(
        self, bucket: str, key: str, data: bytes | IO[bytes] | Iterable[bytes], *,
        content_type: str | None = None, metadata: dict[str, str] | None = None,
        if_match: str | None = None, if_none_match: str | None = None, if_version_match: str | None = None,
        checksum_sha256: str | None = None, content_md5: bytes | None = None,
        idempotency_key: str | None = None, if_version_none_match: str | None = None,
    ) -> m.ObjectWritten:
        headers = {**self._idem(idempotency_key),
                   **_cond_headers(if_match, if_none_match, if_version_match, if_version_none_match)}
        if content_type:
            headers["content-type"] = content_type
        for k, val in (metadata or {}).items():
            headers[f"x-anvil-meta-{k}"] = urllib.parse.quote(val, safe="")
        if checksum_sha256:
            headers["x-anvil-checksum-sha256"] = checksum_sha256
        if content_md5 is not None:
            headers["content-md5"] = base64.b64encode(content_md5).decode()
        content: Any = data
        if hasattr(data, "read"):
            content = _file_chunks(data)  # type: ignore[arg-type]
        return self._model(m.ObjectWritten, "PUT", self._b(bucket) + "/object", params={"key": key},
                           content=content, headers=headers)

    def get_object(
        self, bucket: str, key: str, *, version_id: str | None = None, range: str | None = None,
        if_match: str | None = None, if_none_match: str | None = None, if_version_match: str | None = None,
        if_version_none_match: str | None = None,
    ) -> bytes:
        return self.get_object_with_info(bucket, key, version_id=version_id, range=range, if_match=if_match,
                                         if_none_match=if_none_match, if_version_match=if_version_match,
                                         if_version_none_match=if_version_none_match)[0]

    def get_object_with_info(self, bucket: str, key: str, *, version_id: str | None = None,
                             range: str | None = None, if_match: str | None = None,
                             if_none_match: str | None = None, if_version_match: str | None = None,
                             if_version_none_match: str | None = None) -> tuple[bytes, m.ObjectHead]:
        params = {"key": key, **({"version_id": version_id} if version_id else {})}
        headers = _cond_headers(if_match, if_none_match, if_version_match, if_version_none_match)
        if range:
            headers["range"] = range
        resp = self._request("GET", self._b(bucket) + "/object", params=params, headers=headers)
        return resp.content, m.ObjectHead.model_validate({**object_info(resp.headers), "status": resp.status_code})

    def download(self, bucket: str, key: str, dest: str | Path | IO[bytes], *,
                 version_id: str | None = None) -> m.ObjectHead:
        """Stream an object to a path or file object without holding it in memory."""
        params = {"key": key, **({"version_id": version_id} if version_id else {})}
        with self._http.stream("GET", self._b(bucket) + "/object", params=params) as resp:
            if resp.status_code >= 400:
                resp.read()
                _raise_for(resp)
            if isinstance(dest, (str, Path)):
                with open(dest, "wb") as f:
                    for chunk in resp.iter_bytes(UPLOAD_CHUNK):
                        f.write(chunk)
            else:
                for chunk in resp.iter_bytes(UPLOAD_CHUNK):
                    dest.write(chunk)
            return m.ObjectHead.model_validate(object_info(resp.headers))

    def head_object(self, bucket: str, key: str, *, version_id: str | None = None,
                    if_match: str | None = None, if_none_match: str | None = None,
                    if_version_match: str | None = None, if_version_none_match: str | None = None,
                    ) -> m.ObjectHead:
        params = {"key": key, **({"version_id": version_id} if version_id else {})}
        resp = self._request("HEAD", self._b(bucket) + "/object", params=params,
                             headers=_cond_headers(if_match, if_none_match, if_version_match, if_version_none_match))
        return m.ObjectHead.model_validate(object_info(resp.headers))

    def delete_object(self, bucket: str, key: str, *, version_id: str | None = None,
                      if_match: str | None = None, if_version_match: str | None = None,
                      idempotency_key: str | None = None, if_version_none_match: str | None = None,
                      ) -> m.ObjectDeleted:
        params = {"key": key, **({"version_id": version_id} if version_id else {})}
        headers = {**self._idem(idempotency_key),
                   **_cond_headers(if_match, None, if_version_match, if_version_none_match)}
        return self._model(m.ObjectDeleted, "DELETE", self._b(bucket) + "/object", params=params, headers=headers)

    def list_objects(self, bucket: str, *, prefix: str = "", delimiter: str = "", start_after: str = "",
                     limit: int = 1000, token: str | None = None) -> m.ObjectList:
        params: dict[str, Any] = {"prefix": prefix, "delimiter": delimiter, "start_after": start_after,
                                  "limit": limit}
        if token:
            params["token"] = token
        return self._model(m.ObjectList, "GET", self._b(bucket) + "/objects", params=params)

    def iter_objects(self, bucket: str, *, prefix: str = "", delimiter: str = "",
                     page_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every object (and, with a delimiter, common prefix as {"prefix": ...}) across pages."""
        token = None
        while True:
            page = self.list_objects(bucket, prefix=prefix, delimiter=delimiter, limit=page_size, token=token)
            yield from page["objects"]
            for cp in page["common_prefixes"]:
                yield {"prefix": cp}
            if not page["truncated"]:
                return
            token = page["next_token"]

    def list_versions(self, bucket: str, *, prefix: str = "", delimiter: str = "", key_marker: str = "",
                      version_marker: str = "", limit: int = 1000) -> m.VersionList:
        params = {"prefix": prefix, "delimiter": delimiter, "key_marker": key_marker,
                  "version_marker": version_marker, "limit": limit}
        return self._model(m.VersionList, "GET", self._b(bucket) + "/versions", params=params)

    def copy_object(self, bucket: str, key: str, *, source_key: str, source_bucket: str | None = None,
                    source_version_id: str | None = None, metadata_directive: str = "COPY",
                    metadata: dict[str, str] | None = None, content_type: str | None = None,
                    if_none_match: str | None = None, source_if_match: str | None = None,
                    idempotency_key: str | None = None) -> m.ObjectWritten:
        body: dict[str, Any] = {"key": key, "source_key": source_key, "metadata_directive": metadata_directive}
        for name, val in (("source_bucket", source_bucket), ("source_version_id", source_version_id),
                          ("metadata", metadata), ("content_type", content_type),
                          ("source_if_match", source_if_match)):
            if val is not None:
                body[name] = val
        headers = {**self._idem(idempotency_key), **_cond_headers(None, if_none_match, None)}
        return self._model(m.ObjectWritten, "POST", self._b(bucket) + "/copy", json=body, headers=headers)

    # ------------------------------------------------------------ multipart

    def create_upload(self, bucket: str, key: str, *, content_type: str | None = None,
                      metadata: dict[str, str] | None = None, idempotency_key: str | None = None) -> str:
        body: dict[str, Any] = {"key": key}
        if content_type:
            body["content_type"] = content_type
        if metadata:
            body["metadata"] = metadata
        return self._json("POST", self._b(bucket) + "/uploads", json=body,
                          headers=self._idem(idempotency_key))["upload_id"]

    def upload_part(self, bucket: str, upload_id: str, part_number: int,
                    data: bytes | IO[bytes] | Iterable[bytes], *, idempotency_key: str | None = None) -> m.PartUploaded:
        content: Any = _file_chunks(data) if hasattr(data, "read") else data  # type: ignore[arg-type]
        path = f"{self._b(bucket)}/uploads/{urllib.parse.quote(upload_id, safe='')}/parts/{part_number}"
        return self._model(m.PartUploaded, "PUT", path, content=content, headers=self._idem(idempotency_key))

    def list_parts(self, bucket: str, upload_id: str) -> list[m.Part]:
        path = f"{self._b(bucket)}/uploads/{urllib.parse.quote(upload_id, safe='')}/parts"
        return self._models(m.Part, "parts", "GET", path)

    def list_uploads(self, bucket: str, *, prefix: str = "") -> list[m.Upload]:
        return self._models(m.Upload, "uploads", "GET", self._b(bucket) + "/uploads", params={"prefix": prefix})

    def complete_upload(self, bucket: str, upload_id: str, parts: list[tuple[int, str]], *,
                        idempotency_key: str | None = None) -> m.ObjectWritten:
        path = f"{self._b(bucket)}/uploads/{urllib.parse.quote(upload_id, safe='')}/complete"
        body = {"parts": [{"part_number": n, "etag": e} for n, e in parts]}
        return self._model(m.ObjectWritten, "POST", path, json=body, headers=self._idem(idempotency_key))

    def abort_upload(self, bucket: str, upload_id: str) -> m.UploadAborted:
        return self._model(m.UploadAborted, "DELETE",
                           f"{self._b(bucket)}/uploads/{urllib.parse.quote(upload_id, safe='')}")

    def upload_file(self, bucket: str, key: str, path: str | Path, *, part_size: int = DEFAULT_PART_SIZE,
                    content_type: str | None = None, metadata: dict[str, str] | None = None) -> m.ObjectWritten:
        """Upload a file, using multipart when it is larger than one part."""
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size <= part_size:
                return self.put_object(bucket, key, f, content_type=content_type, metadata=metadata)
            upload_id = self.create_upload(bucket, key, content_type=content_type, metadata=metadata)
            try:
                parts: list[tuple[int, str]] = []
                number = 1
                while True:
                    data = f.read(part_size)
                    if not data:
                        break
                    parts.append((number, self.upload_part(bucket, upload_id, number, data)["etag"]))
                    number += 1
                return self.complete_upload(bucket, upload_id, parts)
            except BaseException:
                try:
                    self.abort_upload(bucket, upload_id)
                except AnvilError:
                    pass
                raise

    # ------------------------------------------------------------ admin

    def journal(self, *, after: int = 0, limit: int = 100) -> list[m.JournalEvent]:
        return self._models(m.JournalEvent, "events", "GET", "/anvil/v1/admin/journal",
                            params={"after": after, "limit": limit})

    def verify_journal(self) -> m.JournalVerified:
        return self._model(m.JournalVerified, "GET", "/anvil/v1/admin/journal/verify")

    # ------------------------------------------------------------ backup and recovery

    def create_backup(self, repo: str, *, passphrase: str | None = None, s3_endpoint: str | None = None,
                      tag: str | None = None, escrow_secrets: bool | None = None,
                      incremental: bool = False) -> m.Backup:
        """Ask the server to take a snapshot of itself into `repo` (admin); `escrow_secrets` None leaves
        the choice to the server's policy (development-mode keys are escrowed, production ones are not)."""
        body: dict[str, Any] = {"repo": repo}
        for name, value in (("passphrase", passphrase), ("s3_endpoint", s3_endpoint), ("tag", tag)):
            if value:
                body[name] = value
        if escrow_secrets is not None:
            body["escrow_secrets"] = escrow_secrets
        if incremental:
            body["incremental"] = True
        return self._model(m.Backup, "POST", "/anvil/v1/admin/backup", json=body)

    def recovery_status(self) -> m.RecoveryStatus:
        return self._model(m.RecoveryStatus, "GET", "/anvil/v1/admin/recovery")

    def recovery_validate(self) -> m.ValidationReport:
        return self._model(m.ValidationReport, "POST", "/anvil/v1/admin/recovery/validate", json={})

    def recovery_resume(self, *, force: bool = False, reason: str | None = None) -> m.Resumed:
        body: dict[str, Any] = {"force": True, "reason": reason} if force else {}
        return self._model(m.Resumed, "POST", "/anvil/v1/admin/recovery/resume", json=body)

    # ------------------------------------------------------------ identity

    def whoami(self) -> m.WhoAmI:
        return self._model(m.WhoAmI, "GET", "/anvil/v1/auth/whoami")

    def create_tenant(self, name: str) -> m.TenantCreated:
        return self._model(m.TenantCreated, "POST", "/anvil/v1/admin/tenants", json={"name": name})

    def list_tenants(self) -> list[m.Tenant]:
        return self._models(m.Tenant, "tenants", "GET", "/anvil/v1/admin/tenants")

    def create_app(self, tenant: str, name: str, *, scopes: list[str] | None = None) -> m.AppCreated:
        """Returns the new application with its `client_secret` (shown this once)."""
        return self._model(m.AppCreated, "POST", "/anvil/v1/admin/apps",
                           json={"tenant": tenant, "name": name, "scopes": scopes})

    def list_apps(self, tenant: str | None = None) -> list[m.App]:
        params = {"tenant": tenant} if tenant else {}
        return self._models(m.App, "apps", "GET", "/anvil/v1/admin/apps", params=params)

    def rotate_app_secret(self, client_id: str) -> m.SecretRotated:
        return self._model(m.SecretRotated, "POST",
                           f"/anvil/v1/admin/apps/{urllib.parse.quote(client_id, safe='')}/rotate-secret")

    def disable_app(self, client_id: str) -> m.AppStatus:
        """Its tokens and SigV4 requests are refused from the next request on (not at expiry)."""
        return self._model(m.AppStatus, "POST",
                           f"/anvil/v1/admin/apps/{urllib.parse.quote(client_id, safe='')}/disable")

    def enable_app(self, client_id: str) -> m.AppStatus:
        return self._model(m.AppStatus, "POST", f"/anvil/v1/admin/apps/{urllib.parse.quote(client_id, safe='')}/enable")

    def delete_app(self, client_id: str) -> m.AppDeleted:
        """Delete the application and its grants; its client id can never authenticate again."""
        return self._model(m.AppDeleted, "DELETE", f"/anvil/v1/admin/apps/{urllib.parse.quote(client_id, safe='')}")

    def revoke_token(self, jti: str, *, client_id: str | None = None) -> m.TokenRevoked:
        """Refuse the token with this `jti` (see `whoami()` or the token exchange) from its next request.
        With `client_id` only that application's token matches (tenant admins must give it)."""
        body: dict[str, Any] = {"jti": jti}
        if client_id is not None:
            body["client_id"] = client_id
        return self._model(m.TokenRevoked, "POST", "/anvil/v1/admin/tokens/revoke", json=body)

    def policies(self, client_id: str) -> m.Policies:
        return self._model(m.Policies, "GET", f"/anvil/v1/admin/apps/{urllib.parse.quote(client_id, safe='')}/policies")

    def grant(self, client_id: str, scopes: list[str]) -> m.PolicyChanged:
        return self._model(m.PolicyChanged, "POST",
                           f"/anvil/v1/admin/apps/{urllib.parse.quote(client_id, safe='')}/policies/grant",
                           json={"scopes": scopes})

    def revoke(self, client_id: str, scopes: list[str]) -> m.PolicyChanged:
        return self._model(m.PolicyChanged, "POST",
                           f"/anvil/v1/admin/apps/{urllib.parse.quote(client_id, safe='')}/policies/revoke",
                           json={"scopes": scopes})

    def set_public_access(self, bucket: str, public: bool) -> m.PublicAccessSet:
        return self._model(m.PublicAccessSet, "PUT", self._b(bucket) + "/public-access", json={"public": public})

    def audit(self, *, limit: int = 100) -> list[m.AuditEntry]:
        return self._models(m.AuditEntry, "entries", "GET", "/anvil/v1/admin/audit", params={"limit": limit})

    def rotate_secret_key(self, *, dry_run: bool = False) -> m.KeyRotation:
        return self._model(m.KeyRotation, "POST", "/anvil/v1/admin/secret-key/rotate", json={"dry_run": dry_run})

    def identity_summary(self) -> m.IdentitySummary:
        return self._model(m.IdentitySummary, "GET", "/anvil/v1/admin/identity/summary")

    def identity_validate(self) -> m.IdentityValidation:
        return self._model(m.IdentityValidation, "GET", "/anvil/v1/admin/identity/validate")

    # ------------------------------------------------------------ authorisation (docs/authz.md)
    # `consistency`: "minimize_latency" (default), "fully_consistent", {"at_least_as_fresh": TOKEN}
    # or {"at_exact_snapshot": TOKEN}; `tenant`: admins only (default: the caller's tenant).

    @staticmethod
    def _authz_body(**fields: Any) -> dict[str, Any]:
        return {k: v for k, v in fields.items() if v is not None}

    def authz_write_schema(self, schema: str, *, tenant: str | None = None) -> m.AuthzSchemaWritten:
        return self._model(m.AuthzSchemaWritten, "PUT", "/anvil/v1/authz/schema", content=schema.encode(),
                          headers={"content-type": "text/plain; charset=utf-8"},
                          params={"tenant": tenant} if tenant else None)

    def authz_read_schema(self, *, tenant: str | None = None, consistency: Any = None) -> m.AuthzSchema:
        if consistency is not None and not isinstance(consistency, str):
            consistency = json.dumps(consistency)
        params = self._authz_body(tenant=tenant, consistency=consistency)
        return self._model(m.AuthzSchema, "GET", "/anvil/v1/authz/schema", params=params)

    def authz_write(self, updates: list[dict[str, Any] | str], *, preconditions: list[dict[str, Any]] | None = None,
                    operation: str = "touch", tenant: str | None = None) -> m.RelationshipsWritten:
        """Apply one batch. Updates are {operation, relationship} or bare relationship strings (`operation`)."""
        ups = [{"operation": operation, "relationship": u} if isinstance(u, str) else u for u in updates]
        return self._model(m.RelationshipsWritten, "POST", "/anvil/v1/authz/relationships/write",
                          json=self._authz_body(updates=ups, preconditions=preconditions, tenant=tenant))

    def authz_read(self, filter: dict[str, str], *, limit: int | None = None, cursor: str | None = None,
                   consistency: Any = None, tenant: str | None = None) -> m.RelationshipPage:
        return self._model(m.RelationshipPage, "POST", "/anvil/v1/authz/relationships/read", json=self._authz_body(
            filter=filter, limit=limit, cursor=cursor, consistency=consistency, tenant=tenant))

    def authz_iter(self, filter: dict[str, str], *, consistency: Any = None, tenant: str | None = None,
                   page: int = 1000) -> Iterator[m.Relationship]:
        """Every matching relationship, page by page, from one snapshot."""
        cursor = None
        while True:
            res = self.authz_read(filter, limit=page, cursor=cursor, consistency=consistency, tenant=tenant)
            yield from res["relationships"]
            cursor = res["cursor"]
            if not cursor:
                return

    def authz_delete(self, filter: dict[str, str], *, preconditions: list[dict[str, Any]] | None = None,
                     limit: int | None = None, allow_partial: bool = False,
                     tenant: str | None = None) -> m.RelationshipsDeleted:
        return self._model(m.RelationshipsDeleted, "POST", "/anvil/v1/authz/relationships/delete",
                           json=self._authz_body(
            filter=filter, preconditions=preconditions, limit=limit, allow_partial=allow_partial, tenant=tenant))

    def authz_check(self, resource: str, permission: str, subject: str, *, context: dict[str, Any] | None = None,
                    consistency: Any = None, tenant: str | None = None) -> m.CheckResult:
        """{permissionship: has_permission|no_permission|conditional, missing_context?, checked_at}."""
        return self._model(m.CheckResult, "POST", "/anvil/v1/authz/check", json=self._authz_body(
            resource=resource, permission=permission, subject=subject, context=context, consistency=consistency,
            tenant=tenant))

    def authz_bulk_check(self, items: list[dict[str, Any]], *, context: dict[str, Any] | None = None,
                         consistency: Any = None, tenant: str | None = None) -> m.BulkCheckResults:
        return self._model(m.BulkCheckResults, "POST", "/anvil/v1/authz/check/bulk", json=self._authz_body(
            items=items, context=context, consistency=consistency, tenant=tenant))

    def authz_lookup_resources(self, resource_type: str, permission: str, subject: str, *,
                               context: dict[str, Any] | None = None, limit: int | None = None,
                               consistency: Any = None, tenant: str | None = None) -> m.ResourceLookup:
        return self._model(m.ResourceLookup, "POST", "/anvil/v1/authz/lookup-resources", json=self._authz_body(
            resource_type=resource_type, permission=permission, subject=subject, context=context, limit=limit,
            consistency=consistency, tenant=tenant))

    def authz_lookup_subjects(self, resource: str, permission: str, subject_type: str, *,
                              subject_relation: str | None = None, context: dict[str, Any] | None = None,
                              consistency: Any = None, tenant: str | None = None) -> m.SubjectLookup:
        return self._model(m.SubjectLookup, "POST", "/anvil/v1/authz/lookup-subjects", json=self._authz_body(
            resource=resource, permission=permission, subject_type=subject_type, subject_relation=subject_relation,
            context=context, consistency=consistency, tenant=tenant))

    def authz_expand(self, resource: str, permission: str, *, consistency: Any = None,
                     tenant: str | None = None) -> m.Expansion:
        return self._model(m.Expansion, "POST", "/anvil/v1/authz/expand", json=self._authz_body(
            resource=resource, permission=permission, consistency=consistency, tenant=tenant))

    # Bucket bindings: object operations decided by relationships (docs/authz.md, "Object access").

    def authz_bind_bucket(self, bucket: str, binding: dict[str, Any]) -> m.BucketBinding:
        """E.g. `{"resource_type": "document", "read": "view", "write": "edit"}`."""
        return self._model(m.BucketBinding, "PUT", self._b(bucket) + "/authz-binding", json=binding)

    def authz_bucket_binding(self, bucket: str) -> m.BucketBinding:
        return self._model(m.BucketBinding, "GET", self._b(bucket) + "/authz-binding")

    def authz_unbind_bucket(self, bucket: str) -> m.BucketUnbound:
        return self._model(m.BucketUnbound, "DELETE", self._b(bucket) + "/authz-binding")


    # ------------------------------------------------------------ watch

    def watch(self, bucket: str | None = None, *, prefix: str = "", after: int | None = None,
              kinds: str | Iterable[str] | None = None, tenant: str | None = None, consumer: str | None = None,
              heartbeat: float | None = None, reconnect: bool = True,
              reconnect_timeout: float = 60.0) -> WatchStream:
        """Iterate over change events (dicts with seq, kind, bucket, key, version_id, etag, size, ...).

        Starts after `after` (default: the head, i.e. only new events). Dropped connections are
        retried for up to `reconnect_timeout` seconds and resume from the last cursor.
        """
        params: dict[str, Any] = {}
        if bucket:
            params["bucket"] = bucket
        if prefix:
            params["prefix"] = prefix
        if kinds:
            params["kinds"] = kinds if isinstance(kinds, str) else ",".join(kinds)
        if tenant:
            params["tenant"] = tenant
        if consumer:
            params["consumer"] = consumer
        if heartbeat is not None:
            params["heartbeat"] = heartbeat
        return WatchStream(self, params, after=after, heartbeat=heartbeat, reconnect=reconnect,
                           reconnect_timeout=reconnect_timeout)

    def create_consumer(self, name: str, *, bucket: str | None = None, prefix: str = "",
                        kinds: str | Iterable[str] | None = None, after: int | None = None) -> m.Consumer:
        body: dict[str, Any] = {"name": name, "prefix": prefix}
        if bucket:
            body["bucket"] = bucket
        if kinds:
            body["kinds"] = [kinds] if isinstance(kinds, str) else list(kinds)
        if after is not None:
            body["after"] = after
        return self._model(m.Consumer, "POST", "/anvil/v1/watch/consumers", json=body)

    def list_consumers(self) -> list[m.ConsumerStatus]:
        return self._models(m.ConsumerStatus, "consumers", "GET", "/anvil/v1/watch/consumers")

    def get_consumer(self, name: str) -> m.ConsumerStatus:
        return self._model(m.ConsumerStatus, "GET", "/anvil/v1/watch/consumers/" + urllib.parse.quote(name, safe=""))

    def delete_consumer(self, name: str) -> m.ConsumerDeleted:
        return self._model(m.ConsumerDeleted, "DELETE",
                           "/anvil/v1/watch/consumers/" + urllib.parse.quote(name, safe=""))

    def checkpoint(self, name: str, cursor: int) -> m.ConsumerStatus:
        """Move consumer `name` forward to `cursor`; a cursor behind the stored one fails with StaleFence."""
        return self._model(m.ConsumerStatus, "POST",
                           f"/anvil/v1/watch/consumers/{urllib.parse.quote(name, safe='')}/checkpoint",
                           json={"cursor": cursor})

    def compact_journal(self, retention_seconds: float | None = None) -> m.Compacted:
        body = {} if retention_seconds is None else {"retention_seconds": retention_seconds}
        return self._model(m.Compacted, "POST", "/anvil/v1/admin/watch/compact", json=body)

    def watch_status(self) -> m.WatchStatus:
        return self._model(m.WatchStatus, "GET", "/anvil/v1/admin/watch/status")

    # ------------------------------------------------------------ diagnostics (admin)

    def list_findings(self, *, subsystem: str | None = None, severity: str | None = None,
                      unresolved: bool = False, limit: int = 1000) -> list[m.Finding]:
        params: dict[str, Any] = {"limit": limit, "unresolved": "true" if unresolved else "false"}
        if subsystem is not None:
            params["subsystem"] = subsystem
        if severity is not None:
            params["severity"] = severity
        return self._models(m.Finding, "findings", "GET", "/anvil/v1/admin/findings", params=params)

    def resolve_finding(self, finding_id: str, resolution: str) -> m.Finding:
        return self._model(m.Finding, "POST",
                           f"/anvil/v1/admin/findings/{urllib.parse.quote(finding_id, safe='')}/resolve",
                           json={"resolution": resolution})

    def fsck(self, *, deep: bool = False) -> m.FsckReport:
        """Run fsck inside the server; no timeout, a deep check reads every blob."""
        return self._model(m.FsckReport, "POST", "/anvil/v1/admin/fsck", json={"deep": deep}, timeout=None)

    def gc(self, *, grace_seconds: float | None = None, upload_expiry_seconds: float | None = None,
           dry_run: bool = False) -> m.GcReport:
        body: dict[str, Any] = {"dry_run": dry_run}
        if grace_seconds is not None:
            body["grace_seconds"] = grace_seconds
        if upload_expiry_seconds is not None:
            body["upload_expiry_seconds"] = upload_expiry_seconds
        return self._model(m.GcReport, "POST", "/anvil/v1/admin/gc", json=body, timeout=None)

    def repair(self, families: list[str] | None = None) -> m.RepairReport:
        return self._model(m.RepairReport, "POST", "/anvil/v1/admin/repair", json={"families": families}, timeout=None)

    def heal_blobs(self, repo: str, *, passphrase: str | None = None, s3_endpoint: str | None = None,
                   snapshot: str | None = None) -> m.HealReport:
        """Restore every missing or quarantined blob from the backup repository `repo` (the server
        opens it) and close the findings about them; no timeout, it streams blobs (admin)."""
        body: dict[str, Any] = {"repo": repo}
        for name, value in (("passphrase", passphrase), ("s3_endpoint", s3_endpoint), ("snapshot", snapshot)):
            if value:
                body[name] = value
        return self._model(m.HealReport, "POST", "/anvil/v1/admin/repair/blobs", json=body, timeout=None)

    # ------------------------------------------------------------ artefacts (docs/artefacts.md)

    def _bearer(self) -> dict[str, str]:
        auth = self._http.auth
        if isinstance(auth, ClientCredentialsAuth):
            return {"authorization": f"Bearer {auth.token()}"}
        header = self._http.headers.get("authorization")
        return {"authorization": header} if header else {}

    def _raw_conn(self) -> Any:
        import http.client

        local = self.__dict__.setdefault("_raw_local", threading.local())
        conn = getattr(local, "conn", None)
        if conn is None:
            u = urllib.parse.urlsplit(self.endpoint)
            cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
            # blocksize: a file body is sent 4 MiB per sendall, not http.client's default 8 KiB.
            conn = local.conn = cls(u.hostname, u.port, timeout=self._http.timeout.read, blocksize=4 * UPLOAD_CHUNK)
            local.buf = bytearray(4 * UPLOAD_CHUNK)
        return local

    def _raw_put_file(self, path: str, local_path: str, size: int) -> dict[str, Any]:
        """PUT a file's bytes on the per-thread stdlib connection (see `_raw_get`); returns the JSON answer."""
        import http.client

        conn = self._raw_conn().conn
        try:
            with open(local_path, "rb") as fh:
                conn.request("PUT", urllib.parse.urlsplit(self.endpoint).path + path, body=fh,
                             headers={**self._bearer(), "content-length": str(size),
                                      "content-type": "application/octet-stream"})
                resp = conn.getresponse()
                body = resp.read()
        except (http.client.HTTPException, OSError) as e:
            conn.close()
            if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
                raise  # the local file, not the connection
            raise _translate(self.endpoint, e) from e
        err = httpx.Response(resp.status, headers=resp.getheaders(), content=body)
        _raise_for(err)
        return err.json()

    def _raw_get(self, path: str, headers: dict[str, str], sink: Any) -> dict[str, str]:
        """GET `path` on a per-thread stdlib connection, handing the body to `sink(memoryview)` in
        pieces of up to 4 MiB; returns the response headers (lower-cased).

        Used for bulk bytes (pulls, tensors): http.client reads a body with `readinto` into one
        reused buffer, several times faster here than httpx's chunk iteration (measured: 256 MiB
        in ~0.06 s against ~0.2-0.3 s), which is most of a pull's client CPU."""
        import http.client

        local = self._raw_conn()
        conn = local.conn
        for attempt in (0, 1):
            try:
                conn.request("GET", urllib.parse.urlsplit(self.endpoint).path + path,
                             headers={**self._bearer(), **headers})
                resp = conn.getresponse()
                break
            except (http.client.HTTPException, OSError) as e:
                conn.close()  # a kept-alive connection the server closed: reconnect once
                if attempt:
                    raise _translate(self.endpoint, e) from e
        out = {k.lower(): v for k, v in resp.getheaders()}
        if resp.status >= 400:
            body = resp.read()
            err = httpx.Response(resp.status, headers=out, content=body)
            _raise_for(err)
        view = memoryview(local.buf)
        try:
            while True:
                try:
                    n = resp.readinto(view)
                except (http.client.HTTPException, OSError) as e:
                    raise _translate(self.endpoint, e) from e
                if not n:
                    break
                sink(view[:n])
        except BaseException:
            conn.close()  # the rest of the body is unread: this connection cannot be reused
            raise
        return out

    def _a(self, bucket: str, name: str) -> str:
        return self._b(bucket) + "/artefacts/" + urllib.parse.quote(name, safe="")

    @staticmethod
    def _scan_dir(directory: str | Path) -> list[dict[str, Any]]:
        """Every regular file under `directory`: relative POSIX path, size, SHA-256 (read once)."""
        import hashlib
        from concurrent.futures import ThreadPoolExecutor

        root = Path(directory)

        def digest(p: Path) -> dict[str, Any]:
            h = hashlib.sha256()
            size = 0
            with open(p, "rb") as f:
                while data := f.read(4 * UPLOAD_CHUNK):
                    h.update(data)  # releases the GIL: files hash in parallel
                    size += len(data)
            return {"path": p.relative_to(root).as_posix(), "size": size, "sha256": h.hexdigest(), "local": str(p)}

        paths = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()]
        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(digest, paths))

    @staticmethod
    def _signing_key(key: Any) -> Any:
        if key is None or not isinstance(key, str | Path):
            return key
        from cryptography.hazmat.primitives import serialization

        return serialization.load_pem_private_key(Path(key).read_bytes(), password=None)

    def _upload_components(self, bucket: str, name: str, files: list[dict[str, Any]], workers: int) -> int:
        from concurrent.futures import ThreadPoolExecutor

        shas = list(dict.fromkeys(f["sha256"] for f in files))
        missing = set(self._json("POST", self._a(bucket, name) + "/components/missing",
                                 json={"sha256s": shas})["missing"]) if shas else set()
        todo = {f["sha256"]: f for f in files if f["sha256"] in missing}

        def put(f: dict[str, Any]) -> None:
            self._raw_put_file(self._a(bucket, name) + f"/components/{f['sha256']}", f["local"], f["size"])

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(put, todo.values()))
        return len(todo)

    def artefact_push(self, kind: str, bucket: str, name: str, files: list[dict[str, Any]], *,
                      tag: str | None = None, base: str | None = None, metadata: dict[str, Any] | None = None,
                      refs: dict[str, str] | None = None, signing_key: Any = None, key_id: str | None = None,
                      workers: int = 4) -> m.ArtefactPushed:
        """Upload the components the bucket lacks, then the (optionally signed) manifest; `base`: an id or
        tag of an artefact of the same name whose identical files are not listed again (a delta)."""
        from anvil import artefact_format as mf

        uploaded = self._upload_components(bucket, name, files, workers)
        comps = [{"path": f["path"], "size": f["size"], "sha256": f["sha256"]} for f in files]
        removed: list[str] = []
        base_id = None
        if base is not None:
            info = self.artefact_describe(bucket, name, base)
            base_id = info["id"]
            have = {f["path"]: f["sha256"] for f in info["files"]}
            mine = {c["path"] for c in comps}
            comps = [c for c in comps if have.get(c["path"]) != c["sha256"]]
            removed = sorted(set(have) - mine)
        manifest = mf.build_manifest(kind, name, comps, base=base_id, removed=removed, metadata=metadata, refs=refs)
        sigs = []
        if signing_key is not None:
            if not key_id:
                raise ValueError("signing needs a key_id")
            sigs.append(mf.sign(manifest, self._signing_key(signing_key), key_id))
        body: dict[str, Any] = {"manifest": manifest, "signatures": sigs}
        if tag is not None:
            body["tag"] = tag
        res = self._model(m.ArtefactPushed, "POST", self._a(bucket, name), json=body)
        res["uploaded"] = uploaded  # how many components this push sent (added here, not by the server)
        return res

    def push_model(self, bucket: str, name: str, directory: str | Path, **kwargs: Any) -> m.ArtefactPushed:
        """`anvil artefact push model`: the directory's files (safetensors, GGUF, configs, tokenizers)."""
        return self.artefact_push("model", bucket, name, self._scan_dir(directory), **kwargs)

    def push_source(self, bucket: str, name: str, repo: str | Path, *, refs: list[str] | None = None,
                    **kwargs: Any) -> m.ArtefactPushed:
        """A git repository's objects reachable from `refs` (default: HEAD and every branch and tag) as one pack."""
        import hashlib
        import io
        import tempfile

        from dulwich.object_store import MissingObjectFinder
        from dulwich.pack import write_pack_objects
        from dulwich.repo import Repo

        r = Repo(str(repo))
        try:
            all_refs = {k.decode(): v.decode() for k, v in r.get_refs().items()}
            chosen: dict[str, str] = {}
            for want in refs or list(all_refs):
                for cand in (want, f"refs/heads/{want}", f"refs/tags/{want}"):
                    if cand in all_refs:
                        chosen[cand] = all_refs[cand]
                        break
                else:
                    raise ValueError(f"no ref {want!r} in {repo}")
            store = r.object_store
            # Tags may name tag objects: peel them to commits for the manifest, pack both.
            wants = list({v.encode() for v in chosen.values()})
            objs = [store[sha] for sha, _ in MissingObjectFinder(store, [], wants)]
            for k, v in list(chosen.items()):
                obj = store[v.encode()]
                while obj.type_name == b"tag":
                    obj = store[obj.object[1]]
                chosen[k] = obj.id.decode()
            buf = io.BytesIO()
            write_pack_objects(buf, objs, object_format=store.object_format)
        finally:
            r.close()
        data = buf.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "pack"
            local.write_bytes(data)
            f = {"path": f"git/pack-{sha[:40]}.pack", "size": len(data), "sha256": sha, "local": str(local)}
            return self.artefact_push("source", bucket, name, [f], refs=chosen, **kwargs)

    def artefact_describe(self, bucket: str, name: str, ref: str) -> m.ArtefactDescription:
        """{id, name, kind, manifest, signatures, files (effective: base applied), created, seq}."""
        return self._model(m.ArtefactDescription, "GET", self._a(bucket, name) + "/" + urllib.parse.quote(ref, safe=""))

    def list_artefacts(self, bucket: str, name: str | None = None) -> list[m.ArtefactSummary] | m.ArtefactName:
        """Without a name: the bucket's artefacts; with one: that name's artefacts and tags."""
        if name is None:
            return self._models(m.ArtefactSummary, "artefacts", "GET", self._b(bucket) + "/artefacts")
        return self._model(m.ArtefactName, "GET", self._a(bucket, name))

    def tag_artefact(self, bucket: str, name: str, tag: str, artefact_id: str | None, *,
                     require_key: str | None = None) -> m.TagMoved:
        body: dict[str, Any] = {"id": artefact_id}
        if require_key is not None:
            body["require_key"] = require_key
        return self._model(m.TagMoved, "PUT", self._a(bucket, name) + "/tags/" + urllib.parse.quote(tag, safe=""),
                           json=body)

    def verify_artefact(self, bucket: str, name: str, ref: str) -> m.ArtefactVerified:
        """Server-side: every component re-hashed, every signature and tensor index checked."""
        return self._model(m.ArtefactVerified, "POST",
                           self._a(bucket, name) + "/" + urllib.parse.quote(ref, safe="") + "/verify", timeout=None)

    def list_tensors(self, bucket: str, name: str, ref: str) -> list[m.Tensor]:
        return self._models(m.Tensor, "tensors", "GET",
                            self._a(bucket, name) + "/" + urllib.parse.quote(ref, safe="") + "/tensors")

    def get_tensor(self, bucket: str, name: str, ref: str, tensor: str) -> tuple[bytes, str, list[int]]:
        """One tensor's raw bytes (a range read of its file), with its dtype and shape."""
        parts: list[bytes] = []
        headers = self._raw_get(self._a(bucket, name) + "/" + urllib.parse.quote(ref, safe="") + "/tensors/"
                                + urllib.parse.quote(tensor, safe=""), {}, lambda v: parts.append(bytes(v)))
        shape = headers.get("x-anvil-shape", "")
        return b"".join(parts), headers["x-anvil-dtype"], [int(d) for d in shape.split(",") if d]

    def pull_artefact(self, bucket: str, name: str, ref: str, directory: str | Path, *,
                      workers: int = 8, part_size: int = 32 * 1024 * 1024) -> dict[str, Any]:
        """Download every file of an artefact into `directory`, each verified against its SHA-256
        (a mismatch leaves no file behind and raises).

        Large files come in `part_size` ranges on `workers` connections at once (one stream per file
        would leave a few big shards on a few connections). Each file is hashed in order while its
        later parts still download: whichever worker completes the next contiguous part hashes it
        from the page cache. A file is renamed into place only once its SHA-256 matched."""
        import hashlib
        import threading
        from concurrent.futures import ThreadPoolExecutor

        from anvil import artefact_format as mf

        info = self.artefact_describe(bucket, name, ref)
        root = Path(directory)
        files = info["files"]
        # A file list that cannot fit this file system (a path under a file, paths one only on a
        # case-insensitive one) would otherwise leave one path holding another's bytes.
        mf.check_layout([f["path"] for f in files])
        tmps: dict[str, Path] = {}
        fds: dict[str, int] = {}
        tasks: list[tuple[dict[str, Any], int, int]] = []
        # path -> [lock, sha256 object, hashed-up-to offset, {offset: length} of parts done]
        state: dict[str, list[Any]] = {}
        try:
            for f in files:
                target = root / mf.check_path(f["path"])
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".anvil-partial")
                tmps[f["path"]] = tmp
                fds[f["path"]] = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(fds[f["path"]], f["size"])
                state[f["path"]] = [threading.Lock(), hashlib.sha256(), 0, {}]
                tasks += [(f, off, min(part_size, f["size"] - off)) for off in range(0, f["size"], part_size)]

            def advance(f: dict[str, Any], off: int, length: int) -> None:
                st = state[f["path"]]
                with st[0]:
                    st[3][off] = length
                    while st[2] in st[3]:
                        pos, n = st[2], st[3].pop(st[2])
                        end = pos + n
                        while pos < end:
                            data = os.pread(fds[f["path"]], min(4 * UPLOAD_CHUNK, end - pos), pos)
                            if not data:
                                raise AnvilAPIError(0, "BadDigest", f"{f['path']}: short file at {pos}")
                            st[1].update(data)
                            pos += len(data)
                        st[2] = end

            def get(task: tuple[dict[str, Any], int, int]) -> None:
                f, off, length = task
                url = self._a(bucket, name) + f"/{info['id']}/files/{urllib.parse.quote(f['path'])}"
                headers = {"range": f"bytes={off}-{off + length - 1}"} if length < f["size"] else {}
                pos = off

                def write(view: memoryview) -> None:
                    nonlocal pos
                    while view:
                        n = os.pwrite(fds[f["path"]], view, pos)
                        pos += n
                        view = view[n:]

                self._raw_get(url, headers, write)
                if pos != off + length:
                    raise AnvilAPIError(0, "BadDigest", f"{f['path']}: short read at {pos}")
                advance(f, off, length)

            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                # In offset order across files, so every file's hash advances as its parts arrive.
                list(pool.map(get, sorted(tasks, key=lambda t: t[1])))
            for f in files:
                st = state[f["path"]]
                if st[2] != f["size"] or st[1].hexdigest() != f["sha256"]:
                    raise AnvilAPIError(0, "BadDigest", f"{f['path']} does not match its SHA-256 {f['sha256']}")
            for fd in fds.values():
                os.close(fd)
            fds.clear()
            for f in files:
                os.replace(tmps.pop(f["path"]), root / f["path"])
        finally:
            for fd in fds.values():
                os.close(fd)
            for tmp in tmps.values():
                tmp.unlink(missing_ok=True)
        return {"id": info["id"], "files": len(files), "bytes": sum(f["size"] for f in files)}

    def add_signing_key(self, key_id: str, public_key: str, *, tenant: str | None = None) -> m.SigningKeyAdded:
        body = {"key_id": key_id, "public_key": public_key}
        if tenant:
            body["tenant"] = tenant
        return self._model(m.SigningKeyAdded, "POST", "/anvil/v1/artefact-keys", json=body)

    def list_signing_keys(self, tenant: str | None = None) -> list[m.SigningKey]:
        return self._models(m.SigningKey, "keys", "GET", "/anvil/v1/artefact-keys",
                            params={"tenant": tenant} if tenant else None)

    def git_resolve(self, bucket: str, name: str, ref: str, refname: str = "HEAD") -> str:
        return self._json("GET", self._a(bucket, name) + f"/{urllib.parse.quote(ref, safe='')}/git/ref",
                          params={"name": refname})["commit"]

    def git_tree(self, bucket: str, name: str, ref: str, commit: str, path: str = "") -> list[m.GitTreeEntry]:
        return self._models(m.GitTreeEntry, "entries", "GET",
                            self._a(bucket, name) + f"/{urllib.parse.quote(ref, safe='')}/git/tree/{commit}",
                            params={"path": path})

    def git_blob(self, bucket: str, name: str, ref: str, commit: str, path: str) -> bytes:
        return self._request("GET", self._a(bucket, name) + f"/{urllib.parse.quote(ref, safe='')}/git/blob/{commit}",
                             params={"path": path}).content

    def hf_pull_verified(self, bucket: str, name: str, ref: str) -> int:
        """Fetch every file of an artefact through the Hugging Face-compatible routes (revision info,
        then `resolve/{commit}/{path}`) and check each against the manifest's SHA-256 (the drill)."""
        import hashlib

        hf = "/anvil/v1/hf"
        b, n = urllib.parse.quote(bucket, safe=""), urllib.parse.quote(name, safe="")
        info = self._model(m.HfModelInfo, "GET",
                           f"{hf}/api/models/{b}/{n}/revision/{urllib.parse.quote(ref, safe='')}")
        want = {f["path"]: f["sha256"] for f in self.artefact_describe(bucket, name, ref)["files"]}
        got = [s["rfilename"] for s in info["siblings"]]
        if sorted(got) != sorted(want):
            raise ValueError(f"the revision lists {len(got)} files, the manifest {len(want)}")
        for path in got:
            h = hashlib.sha256()
            with self._http.stream("GET", f"{hf}/{b}/{n}/resolve/{info['sha']}/{urllib.parse.quote(path)}",
                                   timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for(r)
                if r.headers.get("x-repo-commit") != info["sha"]:
                    raise ValueError(f"{path}: X-Repo-Commit {r.headers.get('x-repo-commit')} != {info['sha']}")
                for chunk in r.iter_bytes(4 * UPLOAD_CHUNK):
                    h.update(chunk)
            if h.hexdigest() != want[path]:
                raise ValueError(f"{path} does not match its SHA-256")
        return len(got)
    # ------------------------------------------------------------ personaldb (docs/personaldb.md)
    # The replica over a local SQLite file is anvil.personaldb.Replica(path, client, group).

    @staticmethod
    def _g(group: str) -> str:
        return "/anvil/v1/pdb/groups/" + urllib.parse.quote(group, safe="")

    def pdb_create(self, name: str, schema: str, *, snapshot_every: int | None = None,
                   max_changeset: int | None = None) -> m.PdbGroup:
        body: dict[str, Any] = {"name": name, "schema": schema}
        if snapshot_every is not None:
            body["snapshot_every"] = snapshot_every
        if max_changeset is not None:
            body["max_changeset"] = max_changeset
        return self._model(m.PdbGroup, "POST", "/anvil/v1/pdb/groups", json=body)

    def pdb_list(self) -> list[m.PdbGroup]:
        return self._models(m.PdbGroup, "groups", "GET", "/anvil/v1/pdb/groups")

    def pdb_get(self, group: str) -> m.PdbGroup:
        return self._model(m.PdbGroup, "GET", self._g(group))

    def pdb_migrate(self, group: str, sql: str) -> m.PdbEntry:
        return self._model(m.PdbEntry, "POST", self._g(group) + "/migrations", json={"sql": sql})

    def pdb_commit(self, group: str, changeset: bytes, *, base_index: int, base_hash: str,
                   schema_version: int | None = None, idempotency_key: str | None = None) -> m.PdbEntry:
        """Submit one changeset against (base_index, base_hash); PersonalDbStaleBase if that is not the head."""
        headers = {"content-type": "application/octet-stream", "x-anvil-pdb-base-index": str(base_index),
                   "x-anvil-pdb-base-hash": base_hash, **self._idem(idempotency_key)}
        if schema_version is not None:
            headers["x-anvil-pdb-schema-version"] = str(schema_version)
        return self._model(m.PdbEntry, "POST", self._g(group) + "/commits", content=changeset, headers=headers)

    def pdb_commit_batch(self, group: str, changesets: list[tuple[bytes, str | None]], *, base_index: int,
                         base_hash: str, schema_version: int | None = None) -> list[m.PdbEntry]:
        """Submit changesets in order, the first against (base_index, base_hash), each next on the one
        before: one certified entry each, all committed in one transaction (one round trip) or none."""
        body: dict[str, Any] = {"base_index": base_index, "base_hash": base_hash, "changesets": [
            {"changeset": base64.b64encode(cs).decode(), **({"idempotency_key": k} if k else {})}
            for cs, k in changesets]}
        if schema_version is not None:
            body["schema_version"] = schema_version
        return self._models(m.PdbEntry, "entries", "POST", self._g(group) + "/commits/batch", json=body)

    def pdb_catch_up(self, group: str, after_index: int, after_hash: str, *, limit: int = 1000,
                     certificates_only: bool = False) -> m.PdbCatchUp:
        """The entries after (index, hash) with their certificates, or status `snapshot_required`."""
        params: dict[str, Any] = {"after_index": after_index, "after_hash": after_hash, "limit": limit}
        if certificates_only:
            params["certificates_only"] = "true"
        return self._model(m.PdbCatchUp, "GET", self._g(group) + "/log", params=params)

    def pdb_snapshots(self, group: str) -> list[m.PdbSnapshot]:
        return self._models(m.PdbSnapshot, "snapshots", "GET", self._g(group) + "/snapshots")

    def pdb_build_snapshot(self, group: str) -> m.PdbSnapshot:
        return self._model(m.PdbSnapshot, "POST", self._g(group) + "/snapshots", timeout=None)

    def pdb_snapshot_data(self, group: str, index: int) -> bytes:
        return self._request("GET", self._g(group) + f"/snapshots/{int(index)}/data", timeout=None).content

    def pdb_compact(self, group: str) -> m.PdbCompacted:
        return self._model(m.PdbCompacted, "POST", self._g(group) + "/compact")

    def pdb_keys(self) -> list[m.PdbKey]:
        return self._models(m.PdbKey, "keys", "GET", "/anvil/v1/pdb/keys")

    def pdb_rotate_key(self) -> m.PdbKeyRotated:
        return self._model(m.PdbKeyRotated, "POST", "/anvil/v1/admin/pdb/keys/rotate", json={})

    def pdb_bind(self, group: str, binding: dict[str, Any]) -> m.PdbGroupBinding:
        """Decide the group's row changes by relationships, e.g. `{"resource_type": "note", "resource":
        "{table}/{pk}", "insert": "edit", "update": "edit", "delete": "owner"}`."""
        return self._model(m.PdbGroupBinding, "PUT", self._g(group) + "/authz-binding", json=binding)

    def pdb_binding(self, group: str) -> m.PdbGroupBinding:
        return self._model(m.PdbGroupBinding, "GET", self._g(group) + "/authz-binding")

    def pdb_unbind(self, group: str) -> m.PdbUnbound:
        return self._model(m.PdbUnbound, "DELETE", self._g(group) + "/authz-binding")

    def pdb_create_projection(self, name: str, source: str, spec: dict[str, Any]) -> m.PdbProjection:
        return self._model(m.PdbProjection, "POST", "/anvil/v1/pdb/projections",
                           json={"name": name, "source": source, "spec": spec})

    def pdb_projection(self, name: str) -> m.PdbProjection:
        return self._model(m.PdbProjection, "GET", "/anvil/v1/pdb/projections/" + urllib.parse.quote(name, safe=""))

    def pdb_projection_data(self, name: str, *, source_index: int | None = None) -> bytes:
        """The projection's SQLite file, zstd-compressed (once it reflects `source_index`, if given)."""
        params = {"source_index": source_index} if source_index is not None else None
        return self._request("GET", "/anvil/v1/pdb/projections/" + urllib.parse.quote(name, safe="") + "/data",
                             params=params, timeout=None).content

    def pdb_projection_changes(self, name: str, after_index: int, after_hash: str, *,
                               limit: int = 1000) -> m.PdbProjectionChanges:
        """The projection's changesets after source entry (index, hash), or status `snapshot_required`."""
        return self._model(m.PdbProjectionChanges, "GET",
                           "/anvil/v1/pdb/projections/" + urllib.parse.quote(name, safe="") + "/changes",
                           params={"after_index": after_index, "after_hash": after_hash, "limit": limit})

    def pdb_write_back(self, projection: str, changeset: bytes) -> m.PdbEntry:
        """Send a changeset made on a copy of the projection back to its source group (if its policy allows)."""
        return self._model(m.PdbEntry, "POST",
                           "/anvil/v1/pdb/projections/" + urllib.parse.quote(projection, safe="") + "/writeback",
                           content=changeset, headers={"content-type": "application/octet-stream"})
    # ------------------------------------------------------------------ indexes (anvil.indexes)

    def _ix(self, bucket: str, name: str | None = None) -> str:
        path = f"{self._b(bucket)}/indexes"
        return path if name is None else f"{path}/{urllib.parse.quote(name, safe='')}"

    def create_index(self, bucket: str, definition: dict[str, Any]) -> m.Index:
        """Create an index from its definition ({name, kind, selector, fields, ...}; docs/indexes.md)."""
        return self._model(m.Index, "POST", self._ix(bucket), json=definition)

    def update_index(self, bucket: str, name: str, definition: dict[str, Any]) -> m.Index:
        return self._model(m.Index, "PUT", self._ix(bucket, name), json=definition)

    def get_index(self, bucket: str, name: str) -> m.Index:
        """The definition and its status (generation, cursor, lag, documents, diagnostics)."""
        return self._model(m.Index, "GET", self._ix(bucket, name))

    def list_indexes(self, bucket: str) -> list[m.Index]:
        return self._models(m.Index, "indexes", "GET", self._ix(bucket))

    def disable_index(self, bucket: str, name: str) -> m.Index:
        return self._model(m.Index, "POST", self._ix(bucket, name) + "/disable")

    def enable_index(self, bucket: str, name: str) -> m.Index:
        return self._model(m.Index, "POST", self._ix(bucket, name) + "/enable")

    def drop_index(self, bucket: str, name: str) -> m.Index:
        return self._model(m.Index, "DELETE", self._ix(bucket, name))

    def rebuild_index(self, bucket: str, name: str) -> m.IndexRebuilt:
        """Throw the index's derived state away and rebuild it from the objects (waits until done)."""
        return self._model(m.IndexRebuilt, "POST", self._ix(bucket, name) + "/rebuild", timeout=None)

    def search(self, bucket: str, name: str, **query: Any) -> m.IndexResults:
        """Query an index: text=, vector=, filter=, sort=, limit=, page_token=, min_cursor=, ...
        (docs/indexes.md "Query API"); returns {hits, count, cursor, generation[, next_page_token]}."""
        return self._model(m.IndexResults, "POST", self._ix(bucket, name) + "/query", json=query)
