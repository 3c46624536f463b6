"""Checks every JSON answer of the native API that the test suite receives against the OpenAPI document.

Turned on for a whole run with ANVIL_VALIDATE_RESPONSES=1 (`make test` and CI set it): conftest.py
wraps httpx's transport, so the SDK and the tests' own httpx calls are all seen. Each answer is
matched to its operation (method and path template), then to the response of its status (or
`default` for errors), and its body is validated with jsonschema against that response's schema.
A test during which an answer did not match fails at teardown, naming the operation and the field.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from typing import Any

import httpx
import jsonschema

from anvil.api.openapi import document


class ResponseChecker:
    def __init__(self, doc: dict[str, Any] | None = None):
        self.doc = doc or document("http://127.0.0.1:9000")
        self._ops: list[tuple[str, re.Pattern[str], int, str, dict[str, Any]]] = []
        for path, item in self.doc["paths"].items():
            rx = re.sub(r"\\\{(\w+)\\\}", lambda g: f"(?P<{g.group(1)}>{'.+' if g.group(1) == 'path' else '[^/]+'})",
                        re.escape(path))
            for method, op in item.items():
                self._ops.append((method.upper(), re.compile(rx + "$"), path.count("{"), op["operationId"], op))
        self._validators: dict[str, jsonschema.Draft202012Validator] = {}
        self._lock = threading.Lock()
        self.violations: list[str] = []
        self.checked: Counter[tuple[str, int]] = Counter()

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]] | None:
        method = "GET" if method == "HEAD" else method
        found = [(n, op_id, op) for m, rx, n, op_id, op in self._ops if m == method and rx.match(path)]
        if not found:
            return None
        _, op_id, op = min(found, key=lambda f: f[0])  # the most literal template wins
        return op_id, op

    def _validator(self, schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            v = self._validators.get(key)
            if v is None:
                # `#/components/...` references resolve against this root, which carries the components.
                v = jsonschema.Draft202012Validator({**schema, "components": self.doc["components"]})
                self._validators[key] = v
            return v

    def _response(self, op: dict[str, Any], status: int) -> dict[str, Any] | None:
        responses = op["responses"]
        resp = responses.get(str(status))
        if resp is None and status >= 400:
            resp = responses.get("default")
        if resp is not None and "$ref" in resp:
            resp = self.doc["components"]["responses"][resp["$ref"].rsplit("/", 1)[1]]
        return resp

    def check(self, method: str, path: str, status: int, content_type: str, body: bytes) -> list[str]:
        """Problems with one answer (empty: it matches the document)."""
        found = self.operation(method, path)
        if found is None:
            if status >= 400:  # a path no route serves: the common error answer
                found = ("noRoute", {"responses": {"default": {"$ref": "#/components/responses/Error400"}}})
            else:
                return [f"{method} {path}: no operation in the document"]
        op_id, op = found
        self.checked[(op_id, status)] += 1
        resp = self._response(op, status)
        if resp is None:
            return [f"{op_id} {method} {path}: status {status} is not in the document"]
        if method == "HEAD" or status == 304 or not content_type.startswith("application/json"):
            return []
        content = resp.get("content", {})
        if content and all(c.get("schema", {}).get("format") == "binary" for c in content.values()):
            return []  # opaque bytes with a stored content type (an object may well be JSON)
        if "application/json" not in content:
            return [f"{op_id}: answered JSON with {status}, the document declares {sorted(content)}"]
        try:
            data = json.loads(body)
        except ValueError:
            return [f"{op_id}: {status} body is not JSON"]
        errors = sorted(self._validator(content["application/json"]["schema"]).iter_errors(data),
                        key=lambda e: list(e.absolute_path))
        return [f"{op_id} {status} at {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}"
                for e in errors[:5]]

    def record(self, request: httpx.Request, response: httpx.Response) -> None:
        path = request.url.path
        if not (path == "/anvil" or path.startswith("/anvil/")) or path.startswith("/anvil/v1/docs"):
            return
        ctype = response.headers.get("content-type", "")
        body = b""
        if ctype.startswith("application/json"):
            body = response.read()  # JSON answers are small; the caller reads the cached content
        problems = self.check(request.method, path, response.status_code, ctype, body)
        if problems:
            with self._lock:
                self.violations.extend(problems)


_installed: ResponseChecker | None = None


def install() -> ResponseChecker:
    """Wrap httpx's sync transport once per process; every answer passes through the checker."""
    global _installed
    if _installed is not None:
        return _installed
    checker = ResponseChecker()
    original = httpx.HTTPTransport.handle_request

    def handle_request(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        response = original(self, request)
        checker.record(request, response)
        return response

    httpx.HTTPTransport.handle_request = handle_request  # type: ignore[method-assign]
    _installed = checker
    return checker
