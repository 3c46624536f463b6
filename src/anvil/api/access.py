"""Object access through relationships, composed above objects and authz (docs/authz.md, "Object access").

`BindingAccess` is installed into the identity gate (`install_object_access`) by `create_app`:
every `authorize(principal, "object:*", "bucket:B/KEY")` then also asks the bucket's binding, if
it has one, for the principal's subject; listings, watch streams and index search ask
`object_filter` for the keys a subject may see. Artefact routes ask `artefact_check` and
`artefact_filter` (the binding's artefact part) directly. The caller's address and the time are given to
caveats as `client_ip` and `now`.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from anvil import jsontext
from anvil.authz import binding as bnd
from anvil.authz.engine import HAS
from anvil.context import Principal
from anvil.errors import AnvilError
from anvil.objects.service import ListResult, VersionListResult, token_after_prefix
from anvil.runtime import Anvil


def _denied(message: str) -> AnvilError:
    err = AnvilError("PermissionDenied", message)
    err.denied = True  # type: ignore[attr-defined]  # the audit log records it as a denial
    err.binding = True  # type: ignore[attr-defined]  # refused by a bucket binding (public-read cannot override)
    return err


def request_facts() -> dict[str, Any]:
    """Caveat context from the request: `client_ip` (the peer address) and `now` (whole seconds, so
    answers stay cacheable for a second)."""
    facts: dict[str, Any] = {"now": datetime.fromtimestamp(int(time.time()), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    ip = bnd.CLIENT_ADDRESS.get()
    if ip:
        facts["client_ip"] = ip
    return facts


class VisibleKeys:
    """The keys of one bucket a subject may see, from one lookup (sorted, for prefix questions)."""

    def __init__(self, keys: set[str]):
        self._set = keys
        self._sorted = sorted(keys)

    def allows(self, key: str) -> bool:
        return key in self._set

    def any_under(self, prefix: str) -> bool:
        i = bisect.bisect_left(self._sorted, prefix)
        return i < len(self._sorted) and self._sorted[i].startswith(prefix)

    def __len__(self) -> int:
        return len(self._set)


class CheckedKeys:
    """Per-key checks (a lookup too large to hold). A common prefix is shown only when some key under
    it is allowed: its name alone would tell a subject what exists where it may not look. Deciding
    that walks the keys under it (`keys_under`), until the first allowed one."""

    def __init__(self, check: Callable[[str], bool], keys_under: Callable[[str], Iterator[str]]):
        self._check = check
        self._keys_under = keys_under

    def allows(self, key: str) -> bool:
        return self._check(key)

    def any_under(self, prefix: str) -> bool:
        return any(self._check(key) for key in self._keys_under(prefix))


class NoKeys:
    def allows(self, key: str) -> bool:
        return False

    def any_under(self, prefix: str) -> bool:
        return False


class BindingAccess:
    def __init__(self, anvil: Anvil, *, listing: str = "lookup"):
        self.anvil = anvil
        self.listing = listing  # "lookup" (one lookup-resources per question) or "check" (per key; bench)

    def _binding(self, principal: Principal, bucket: str) -> tuple[str, bnd.Binding] | None:
        authz = self.anvil.authz
        if not authz.has_binding(bucket):  # the common case: no binding, no bucket read
            return None
        b = self.anvil.objects.find_bucket(bucket)
        return authz.binding_of(bucket, b.created) if b is not None else None

    def _subject(self, principal: Principal, tenant: str, binding: bnd.Binding, bucket: str) -> str | None:
        """The subject to check for; None when scopes alone decide; raises when refused outright."""
        subject = principal.acting_for
        if subject and (principal.tenant == tenant or principal.admin):
            return subject
        if binding.without_subject == "scopes" or (principal.admin and not subject):
            return None
        raise _denied(f"bucket {bucket} decides access by relationships: use a token acting for a subject "
                      "(the token exchange's subject)")

    def check(self, principal: Principal, action: str, bucket: str, key: str) -> None:
        found = self._binding(principal, bucket)
        if found is None:
            return
        tenant, binding = found
        self._decide(principal, tenant, binding, binding, bnd.ACTION_OPS[action], bucket, key)

    def artefact_check(self, principal: Principal, action: str, bucket: str, name: str) -> None:
        """`artefact:*` on artefact `name` of a bound bucket: the binding's artefact part (or the one its
        object part implies) decides for the principal's subject, as for objects."""
        found = self._binding(principal, bucket)
        if found is None:
            return
        tenant, binding = found
        self._decide(principal, tenant, binding, binding.for_artefacts(), bnd.ARTEFACT_ACTION_OPS[action], bucket,
                     name)

    def _decide(self, principal: Principal, tenant: str, binding: bnd.Binding, part: bnd.Binding | bnd.ArtefactPart,
                op: str, bucket: str, key: str) -> None:
        subject = self._subject(principal, tenant, binding, bucket)
        if subject is None:
            return
        try:
            r = self.anvil.authz.object_check(tenant, part, op, bucket, key, subject, request_facts())
        except AnvilError as e:
            if e.code in ("InvalidArgument", "NotFound", "MaxDepthExceeded"):
                # A binding the schema no longer supports, a subject of an unknown type: fail closed.
                raise _denied(f"bucket {bucket}'s binding cannot decide for {subject}: {e.message}") from None
            raise
        if r.state != HAS:
            why = f" (missing caveat context: {', '.join(sorted(r.missing))})" if r.missing else ""
            raise _denied(f"{subject} has no {part.permission(op)} on "
                          f"{part.resource_type}:{bnd.object_id(bucket, key)}{why}")

    def key_filter(self, principal: Principal, action: str, bucket: str) -> Any:
        found = self._binding(principal, bucket)
        if found is None:
            return None
        tenant, binding = found
        objects = self.anvil.objects

        def keys_under(prefix: str) -> Iterator[str]:
            token = None
            while True:
                page = objects.list_objects(bucket, prefix=prefix, max_keys=1000, token=token)
                yield from (o.key for o in page.objects)
                if not page.truncated or not page.next_token:
                    return
                token = page.next_token

        return self._filter(principal, tenant, binding, binding, bnd.ACTION_OPS[action], bucket, keys_under)

    def artefact_filter(self, principal: Principal, action: str, bucket: str) -> Any:
        """The artefact names of `bucket` a principal may `action` by its binding (None: scopes alone)."""
        found = self._binding(principal, bucket)
        if found is None:
            return None
        tenant, binding = found
        return self._filter(principal, tenant, binding, binding.for_artefacts(), bnd.ARTEFACT_ACTION_OPS[action],
                            bucket, lambda prefix: iter(()))  # names have no common prefixes to decide

    def _filter(self, principal: Principal, tenant: str, binding: bnd.Binding, part: bnd.Binding | bnd.ArtefactPart,
                op: str, bucket: str, keys_under: Callable[[str], Iterator[str]]) -> Any:
        try:
            subject = self._subject(principal, tenant, binding, bucket)
        except AnvilError:
            return NoKeys()
        if subject is None:
            return None
        facts = request_facts()
        authz = self.anvil.authz
        try:
            ids = authz.object_lookup(tenant, part, op, subject, facts) if self.listing == "lookup" else None
        except AnvilError:
            return NoKeys()  # fail closed, as check does
        if ids is not None:
            keys = {k for rid in ids if (k := bnd.key_of(bucket, rid)) is not None}
            return VisibleKeys(keys)
        try:
            engine, _ = authz.object_engine(tenant, facts)
        except AnvilError:
            return NoKeys()

        def one(key: str) -> bool:
            try:
                return authz.object_check(tenant, part, op, bucket, key, subject, facts, engine).state == HAS
            except AnvilError:
                return False

        return CheckedKeys(one, keys_under)


# ------------------------------------------------------------------ filtered listings
# A listing of a bound bucket walks the catalog's pages and keeps the entries the filter allows,
# until the page is full. Continuation tokens of filtered listings are Anvil's own (`f1...`): a
# position after a key or after a whole common prefix.

_PAGE = 1000


def encode_after(name: str, is_prefix: bool) -> str:
    raw = json.dumps({"p" if is_prefix else "k": name}, separators=(",", ":")).encode()
    return "f1" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_after(token: str) -> tuple[str, bool]:
    try:
        if not token.startswith("f1"):
            raise ValueError
        body = token[2:]
        d = jsontext.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        if not isinstance(d, dict) or len(d) != 1 or not isinstance(next(iter(d.values())), str):
            raise ValueError
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise AnvilError("InvalidArgument", "malformed continuation token") from None
    return (d["p"], True) if "p" in d else (d["k"], False)


def list_objects_filtered(objects: Any, kf: Any, bucket: str, *, prefix: str, delimiter: str, start_after: str,
                          max_keys: int, token: str | None = None, after_prefix: str | None = None) -> ListResult:
    if token:
        name, is_prefix = decode_after(token)
        start_after, after_prefix = ("", name) if is_prefix else (name, None)
    svc_token = token_after_prefix(after_prefix) if after_prefix else None
    taken: list[Any] = []
    truncated = False
    while True:
        res = objects.list_objects(bucket, prefix=prefix, delimiter=delimiter, start_after="" if svc_token else
                                   start_after, max_keys=_PAGE, token=svc_token)
        entries = sorted([(o.key, o) for o in res.objects] + [(p, p) for p in res.common_prefixes],
                         key=lambda e: e[0])
        for name, e in entries:
            if len(taken) == max_keys:
                truncated = True
                break
            if kf.any_under(e) if isinstance(e, str) else kf.allows(name):
                taken.append(e)
        if truncated or not res.truncated or not res.next_token:
            if len(taken) == max_keys and res.truncated:
                truncated = True
            break
        svc_token = res.next_token
    out = ListResult(objects=[e for e in taken if not isinstance(e, str)],
                     common_prefixes=[e for e in taken if isinstance(e, str)], truncated=truncated)
    if truncated and taken:
        last = taken[-1]
        out.next_token = encode_after(last, True) if isinstance(last, str) else encode_after(last.key, False)
    return out


def list_versions_filtered(objects: Any, kf: Any, bucket: str, *, prefix: str, delimiter: str, key_marker: str,
                           version_marker: str, max_keys: int) -> VersionListResult:
    taken: list[Any] = []
    truncated = False
    km, vm = key_marker, version_marker
    while True:
        res = objects.list_versions(bucket, prefix=prefix, delimiter=delimiter, key_marker=km, version_marker=vm,
                                    max_keys=_PAGE)
        entries = sorted([((o.key, i), o) for i, o in enumerate(res.versions)]
                         + [((p, -1), p) for p in res.common_prefixes], key=lambda e: e[0])
        for (name, _), e in entries:
            if len(taken) == max_keys:
                truncated = True
                break
            if kf.any_under(e) if isinstance(e, str) else kf.allows(name):
                taken.append(e)
        if truncated or not res.truncated:
            if len(taken) == max_keys and res.truncated:
                truncated = True
            break
        km, vm = res.next_key_marker or "", res.next_version_marker or ""
    out = VersionListResult(versions=[e for e in taken if not isinstance(e, str)],
                            common_prefixes=[e for e in taken if isinstance(e, str)], truncated=truncated)
    if truncated and taken:
        last = taken[-1]
        if isinstance(last, str):
            out.next_key_marker = last
        else:
            out.next_key_marker, out.next_version_marker = last.key, last.version_id
    return out
