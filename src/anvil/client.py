"""`AnvilClient`: the Python SDK for the native API (S3 is used through boto3)."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx

DEFAULT_ENDPOINT = "http://127.0.0.1:9000"
UPLOAD_CHUNK = 1024 * 1024
DEFAULT_PART_SIZE = 16 * 1024 * 1024


class AnvilAPIError(Exception):
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
                   expires_in: int | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Client credentials -> `{access_token, expires_in, expires_at, tenant, scopes, ...}`."""
    body: dict[str, Any] = {"client_id": client_id, "client_secret": client_secret}
    if scopes is not None:
        body["scopes"] = scopes
    if expires_in is not None:
        body["expires_in"] = expires_in
    resp = httpx.post(endpoint.rstrip("/") + "/anvil/v1/auth/token", json=body, timeout=timeout)
    _raise_for(resp)
    return resp.json()


class ClientCredentialsAuth(httpx.Auth):
    """Exchanges client credentials for a token, refreshes it before expiry, and retries a
    replayable request once when the server says the token is no longer good."""

    def __init__(self, endpoint: str, client_id: str, client_secret: str, *, scopes: list[str] | None = None):
        self._endpoint, self._client_id, self._secret, self._scopes = endpoint, client_id, client_secret, scopes
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    def token(self, *, force: bool = False) -> str:
        with self._lock:
            if force or self._token is None or time.time() >= self._refresh_at:
                res = exchange_token(self._endpoint, self._client_id, self._secret, scopes=self._scopes)
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

    def __next__(self) -> dict[str, Any]:
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

    def _run(self) -> Iterator[dict[str, Any]]:
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
            except httpx.TransportError as e:
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

    def _parse(self, lines: Iterable[str]) -> Iterator[dict[str, Any]]:
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
                    event = json.loads("\n".join(data))
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
                 scopes: list[str] | None = None):
        self.endpoint = (endpoint or os.environ.get("ANVIL_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        import httpx

        headers = {"authorization": f"Bearer {token}"} if token else {}
        if token is None:
            client_id = client_id or os.environ.get("ANVIL_CLIENT_ID") or None
            client_secret = client_secret or os.environ.get("ANVIL_CLIENT_SECRET") or None
        auth = None
        if token is None and client_id and client_secret:
            auth = ClientCredentialsAuth(self.endpoint, client_id, client_secret, scopes=scopes)
        self.client_id = client_id if auth is not None else None
        self._http = httpx.Client(base_url=self.endpoint, timeout=timeout, headers=headers, auth=auth)

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

    @staticmethod
    def _b(bucket: str) -> str:
        return "/anvil/v1/buckets/" + urllib.parse.quote(bucket, safe="")

    @staticmethod
    def _idem(key: str | None) -> dict[str, str]:
        return {"idempotency-key": key} if key else {}

    # ------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/anvil/health/ready")

    # ------------------------------------------------------------ buckets

    def create_bucket(self, name: str, *, versioning: str | None = None, idempotency_key: str | None = None) -> dict:
        body = {"versioning": versioning} if versioning else {}
        return self._json("PUT", self._b(name), json=body, headers=self._idem(idempotency_key))

    def list_buckets(self) -> list[dict[str, Any]]:
        return self._json("GET", "/anvil/v1/buckets")["buckets"]

    def get_bucket(self, name: str) -> dict[str, Any]:
        return self._json("GET", self._b(name))

    def delete_bucket(self, name: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        return self._json("DELETE", self._b(name), headers=self._idem(idempotency_key))

    def set_versioning(self, name: str, status: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        return self._json("PUT", self._b(name) + "/versioning", json={"status": status},
                          headers=self._idem(idempotency_key))

    # ------------------------------------------------------------ objects

    def put_object(
        self, bucket: str, key: str, data: bytes | IO[bytes] | Iterable[bytes], *,
        content_type: str | None = None, metadata: dict[str, str] | None = None,
        if_match: str | None = None, if_none_match: str | None = None, if_version_match: str | None = None,
        checksum_sha256: str | None = None, content_md5: bytes | None = None,
        idempotency_key: str | None = None, if_version_none_match: str | None = None,
    ) -> dict[str, Any]:
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
        return self._json("PUT", self._b(bucket) + "/object", params={"key": key}, content=content,
                          headers=headers)

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
                             if_version_none_match: str | None = None) -> tuple[bytes, dict[str, Any]]:
        params = {"key": key, **({"version_id": version_id} if version_id else {})}
        headers = _cond_headers(if_match, if_none_match, if_version_match, if_version_none_match)
        if range:
            headers["range"] = range
        resp = self._request("GET", self._b(bucket) + "/object", params=params, headers=headers)
        return resp.content, {**object_info(resp.headers), "status": resp.status_code}

    def download(self, bucket: str, key: str, dest: str | Path | IO[bytes], *,
                 version_id: str | None = None) -> dict[str, Any]:
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
            return object_info(resp.headers)

    def head_object(self, bucket: str, key: str, *, version_id: str | None = None,
                    if_match: str | None = None, if_none_match: str | None = None,
                    if_version_match: str | None = None, if_version_none_match: str | None = None,
                    ) -> dict[str, Any]:
        params = {"key": key, **({"version_id": version_id} if version_id else {})}
        resp = self._request("HEAD", self._b(bucket) + "/object", params=params,
                             headers=_cond_headers(if_match, if_none_match, if_version_match, if_version_none_match))
        return object_info(resp.headers)

    def delete_object(self, bucket: str, key: str, *, version_id: str | None = None,
                      if_match: str | None = None, if_version_match: str | None = None,
                      idempotency_key: str | None = None, if_version_none_match: str | None = None,
                      ) -> dict[str, Any]:
        params = {"key": key, **({"version_id": version_id} if version_id else {})}
        headers = {**self._idem(idempotency_key),
                   **_cond_headers(if_match, None, if_version_match, if_version_none_match)}
        return self._json("DELETE", self._b(bucket) + "/object", params=params, headers=headers)

    def list_objects(self, bucket: str, *, prefix: str = "", delimiter: str = "", start_after: str = "",
                     limit: int = 1000, token: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"prefix": prefix, "delimiter": delimiter, "start_after": start_after,
                                  "limit": limit}
        if token:
            params["token"] = token
        return self._json("GET", self._b(bucket) + "/objects", params=params)

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
                      version_marker: str = "", limit: int = 1000) -> dict[str, Any]:
        params = {"prefix": prefix, "delimiter": delimiter, "key_marker": key_marker,
                  "version_marker": version_marker, "limit": limit}
        return self._json("GET", self._b(bucket) + "/versions", params=params)

    def copy_object(self, bucket: str, key: str, *, source_key: str, source_bucket: str | None = None,
                    source_version_id: str | None = None, metadata_directive: str = "COPY",
                    metadata: dict[str, str] | None = None, content_type: str | None = None,
                    if_none_match: str | None = None, source_if_match: str | None = None,
                    idempotency_key: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"key": key, "source_key": source_key, "metadata_directive": metadata_directive}
        for name, val in (("source_bucket", source_bucket), ("source_version_id", source_version_id),
                          ("metadata", metadata), ("content_type", content_type),
                          ("source_if_match", source_if_match)):
            if val is not None:
                body[name] = val
        headers = {**self._idem(idempotency_key), **_cond_headers(None, if_none_match, None)}
        return self._json("POST", self._b(bucket) + "/copy", json=body, headers=headers)

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
                    data: bytes | IO[bytes] | Iterable[bytes], *, idempotency_key: str | None = None) -> dict:
        content: Any = _file_chunks(data) if hasattr(data, "read") else data  # type: ignore[arg-type]
        path = f"{self._b(bucket)}/uploads/{urllib.parse.quote(upload_id, safe='')}/parts/{part_number}"
        return self._json("PUT", path, content=content, headers=self._idem(idempotency_key))

    def list_parts(self, bucket: str, upload_id: str) -> list[dict[str, Any]]:
        path = f"{self._b(bucket)}/uploads/{urllib.parse.quote(upload_id, safe='')}/parts"
        return self._json("GET", path)["parts"]

    def list_uploads(self, bucket: str, *, prefix: str = "") -> list[dict[str, Any]]:
        return self._json("GET", self._b(bucket) + "/uploads", params={"prefix": prefix})["uploads"]

    def complete_upload(self, bucket: str, upload_id: str, parts: list[tuple[int, str]], *,
                        idempotency_key: str | None = None) -> dict[str, Any]:
        path = f"{self._b(bucket)}/uploads/{urllib.parse.quote(upload_id, safe='')}/complete"
        body = {"parts": [{"part_number": n, "etag": e} for n, e in parts]}
        return self._json("POST", path, json=body, headers=self._idem(idempotency_key))

    def abort_upload(self, bucket: str, upload_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"{self._b(bucket)}/uploads/{urllib.parse.quote(upload_id, safe='')}")

    def upload_file(self, bucket: str, key: str, path: str | Path, *, part_size: int = DEFAULT_PART_SIZE,
                    content_type: str | None = None, metadata: dict[str, str] | None = None) -> dict[str, Any]:
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
                except (AnvilAPIError, httpx.HTTPError):
                    pass
                raise

    # ------------------------------------------------------------ admin

    def journal(self, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        return self._json("GET", "/anvil/v1/admin/journal", params={"after": after, "limit": limit})["events"]

    def verify_journal(self) -> dict[str, Any]:
        return self._json("GET", "/anvil/v1/admin/journal/verify")

    # ------------------------------------------------------------ backup and recovery

    def create_backup(self, repo: str, *, passphrase: str | None = None, s3_endpoint: str | None = None,
                      tag: str | None = None, escrow_secrets: bool = False) -> dict[str, Any]:
        """Ask the server to take a snapshot of itself into `repo` (admin)."""
        body: dict[str, Any] = {"repo": repo}
        for name, value in (("passphrase", passphrase), ("s3_endpoint", s3_endpoint), ("tag", tag)):
            if value:
                body[name] = value
        if escrow_secrets:
            body["escrow_secrets"] = True
        return self._json("POST", "/anvil/v1/admin/backup", json=body)

    def recovery_status(self) -> dict[str, Any]:
        return self._json("GET", "/anvil/v1/admin/recovery")

    def recovery_validate(self) -> dict[str, Any]:
        return self._json("POST", "/anvil/v1/admin/recovery/validate", json={})

    def recovery_resume(self, *, force: bool = False, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"force": True, "reason": reason} if force else {}
        return self._json("POST", "/anvil/v1/admin/recovery/resume", json=body)

    # ------------------------------------------------------------ identity

    def whoami(self) -> dict[str, Any]:
        return self._json("GET", "/anvil/v1/auth/whoami")

    def create_tenant(self, name: str) -> dict[str, Any]:
        return self._json("POST", "/anvil/v1/admin/tenants", json={"name": name})

    def list_tenants(self) -> list[dict[str, Any]]:
        return self._json("GET", "/anvil/v1/admin/tenants")["tenants"]

    def create_app(self, tenant: str, name: str, *, scopes: list[str] | None = None) -> dict[str, Any]:
        """Returns the new application with its `client_secret` (shown this once)."""
        return self._json("POST", "/anvil/v1/admin/apps", json={"tenant": tenant, "name": name, "scopes": scopes})

    def list_apps(self, tenant: str | None = None) -> list[dict[str, Any]]:
        params = {"tenant": tenant} if tenant else {}
        return self._json("GET", "/anvil/v1/admin/apps", params=params)["apps"]

    def rotate_app_secret(self, client_id: str) -> dict[str, Any]:
        return self._json("POST", f"/anvil/v1/admin/apps/{urllib.parse.quote(client_id, safe='')}/rotate-secret")

    def disable_app(self, client_id: str) -> dict[str, Any]:
        """Its tokens and SigV4 requests are refused from the next request on (not at expiry)."""
        return self._json("POST", f"/anvil/v1/admin/apps/{urllib.parse.quote(client_id, safe='')}/disable")

    def enable_app(self, client_id: str) -> dict[str, Any]:
        return self._json("POST", f"/anvil/v1/admin/apps/{urllib.parse.quote(client_id, safe='')}/enable")

    def delete_app(self, client_id: str) -> dict[str, Any]:
        """Delete the application and its grants; its client id can never authenticate again."""
        return self._json("DELETE", f"/anvil/v1/admin/apps/{urllib.parse.quote(client_id, safe='')}")

    def revoke_token(self, jti: str, *, client_id: str | None = None) -> dict[str, Any]:
        """Refuse the token with this `jti` (see `whoami()` or the token exchange) from its next request.
        With `client_id` only that application's token matches (tenant admins must give it)."""
        body: dict[str, Any] = {"jti": jti}
        if client_id is not None:
            body["client_id"] = client_id
        return self._json("POST", "/anvil/v1/admin/tokens/revoke", json=body)

    def policies(self, client_id: str) -> dict[str, Any]:
        return self._json("GET", f"/anvil/v1/admin/apps/{urllib.parse.quote(client_id, safe='')}/policies")

    def grant(self, client_id: str, scopes: list[str]) -> dict[str, Any]:
        return self._json("POST", f"/anvil/v1/admin/apps/{urllib.parse.quote(client_id, safe='')}/policies/grant",
                          json={"scopes": scopes})

    def revoke(self, client_id: str, scopes: list[str]) -> dict[str, Any]:
        return self._json("POST", f"/anvil/v1/admin/apps/{urllib.parse.quote(client_id, safe='')}/policies/revoke",
                          json={"scopes": scopes})

    def set_public_access(self, bucket: str, public: bool) -> dict[str, Any]:
        return self._json("PUT", self._b(bucket) + "/public-access", json={"public": public})

    def audit(self, *, limit: int = 100) -> list[dict[str, Any]]:
        return self._json("GET", "/anvil/v1/admin/audit", params={"limit": limit})["entries"]

    def rotate_secret_key(self, *, dry_run: bool = False) -> dict[str, Any]:
        return self._json("POST", "/anvil/v1/admin/secret-key/rotate", json={"dry_run": dry_run})

    def identity_summary(self) -> dict[str, Any]:
        return self._json("GET", "/anvil/v1/admin/identity/summary")

    def identity_validate(self) -> dict[str, Any]:
        return self._json("GET", "/anvil/v1/admin/identity/validate")


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
                        kinds: str | Iterable[str] | None = None, after: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "prefix": prefix}
        if bucket:
            body["bucket"] = bucket
        if kinds:
            body["kinds"] = [kinds] if isinstance(kinds, str) else list(kinds)
        if after is not None:
            body["after"] = after
        return self._json("POST", "/anvil/v1/watch/consumers", json=body)

    def list_consumers(self) -> list[dict[str, Any]]:
        return self._json("GET", "/anvil/v1/watch/consumers")["consumers"]

    def get_consumer(self, name: str) -> dict[str, Any]:
        return self._json("GET", "/anvil/v1/watch/consumers/" + urllib.parse.quote(name, safe=""))

    def delete_consumer(self, name: str) -> dict[str, Any]:
        return self._json("DELETE", "/anvil/v1/watch/consumers/" + urllib.parse.quote(name, safe=""))

    def checkpoint(self, name: str, cursor: int) -> dict[str, Any]:
        """Move consumer `name` forward to `cursor`; a cursor behind the stored one fails with StaleFence."""
        return self._json("POST", f"/anvil/v1/watch/consumers/{urllib.parse.quote(name, safe='')}/checkpoint",
                          json={"cursor": cursor})

    def compact_journal(self, retention_seconds: float | None = None) -> dict[str, Any]:
        body = {} if retention_seconds is None else {"retention_seconds": retention_seconds}
        return self._json("POST", "/anvil/v1/admin/watch/compact", json=body)

    def watch_status(self) -> dict[str, Any]:
        return self._json("GET", "/anvil/v1/admin/watch/status")

    # ------------------------------------------------------------ diagnostics (admin)

    def list_findings(self, *, subsystem: str | None = None, severity: str | None = None,
                      unresolved: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, "unresolved": "true" if unresolved else "false"}
        if subsystem is not None:
            params["subsystem"] = subsystem
        if severity is not None:
            params["severity"] = severity
        return self._json("GET", "/anvil/v1/admin/findings", params=params)["findings"]

    def resolve_finding(self, finding_id: str, resolution: str) -> dict[str, Any]:
        return self._json("POST", f"/anvil/v1/admin/findings/{urllib.parse.quote(finding_id, safe='')}/resolve",
                          json={"resolution": resolution})

    def fsck(self, *, deep: bool = False) -> dict[str, Any]:
        """Run fsck inside the server; no timeout, a deep check reads every blob."""
        return self._json("POST", "/anvil/v1/admin/fsck", json={"deep": deep}, timeout=None)

    def gc(self, *, grace_seconds: float | None = None, upload_expiry_seconds: float | None = None,
           dry_run: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"dry_run": dry_run}
        if grace_seconds is not None:
            body["grace_seconds"] = grace_seconds
        if upload_expiry_seconds is not None:
            body["upload_expiry_seconds"] = upload_expiry_seconds
        return self._json("POST", "/anvil/v1/admin/gc", json=body, timeout=None)

    def repair(self, families: list[str] | None = None) -> dict[str, Any]:
        return self._json("POST", "/anvil/v1/admin/repair", json={"families": families}, timeout=None)

    def heal_blobs(self, repo: str, *, passphrase: str | None = None, s3_endpoint: str | None = None,
                   snapshot: str | None = None) -> dict[str, Any]:
        """Restore every missing or quarantined blob from the backup repository `repo` (the server
        opens it) and close the findings about them; no timeout, it streams blobs (admin)."""
        body: dict[str, Any] = {"repo": repo}
        for name, value in (("passphrase", passphrase), ("s3_endpoint", s3_endpoint), ("snapshot", snapshot)):
            if value:
                body[name] = value
        return self._json("POST", "/anvil/v1/admin/repair/blobs", json=body, timeout=None)

    # ------------------------------------------------------------------ indexes (anvil.indexes)

    def _ix(self, bucket: str, name: str | None = None) -> str:
        path = f"{self._b(bucket)}/indexes"
        return path if name is None else f"{path}/{urllib.parse.quote(name, safe='')}"

    def create_index(self, bucket: str, definition: dict[str, Any]) -> dict[str, Any]:
        """Create an index from its definition ({name, kind, selector, fields, ...}; docs/indexes.md)."""
        return self._json("POST", self._ix(bucket), json=definition)

    def update_index(self, bucket: str, name: str, definition: dict[str, Any]) -> dict[str, Any]:
        return self._json("PUT", self._ix(bucket, name), json=definition)

    def get_index(self, bucket: str, name: str) -> dict[str, Any]:
        """The definition and its status (generation, cursor, lag, documents, diagnostics)."""
        return self._json("GET", self._ix(bucket, name))

    def list_indexes(self, bucket: str) -> list[dict[str, Any]]:
        return self._json("GET", self._ix(bucket))["indexes"]

    def disable_index(self, bucket: str, name: str) -> dict[str, Any]:
        return self._json("POST", self._ix(bucket, name) + "/disable")

    def enable_index(self, bucket: str, name: str) -> dict[str, Any]:
        return self._json("POST", self._ix(bucket, name) + "/enable")

    def drop_index(self, bucket: str, name: str) -> dict[str, Any]:
        return self._json("DELETE", self._ix(bucket, name))

    def rebuild_index(self, bucket: str, name: str) -> dict[str, Any]:
        """Throw the index's derived state away and rebuild it from the objects (waits until done)."""
        return self._json("POST", self._ix(bucket, name) + "/rebuild", timeout=None)

    def search(self, bucket: str, name: str, **query: Any) -> dict[str, Any]:
        """Query an index: text=, vector=, filter=, sort=, limit=, page_token=, min_cursor=, ...
        (docs/indexes.md "Query API"); returns {hits, count, cursor, generation[, next_page_token]}."""
        return self._json("POST", self._ix(bucket, name) + "/query", json=query)
