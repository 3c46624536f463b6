"""Bucket bindings: object operations of a bucket decided by relationships (docs/authz.md, "Object access").

A binding maps the four object operations to permissions of one resource type of the bucket's
tenant's schema, e.g. `{"resource_type": "document", "read": "view", "write": "edit"}`; `list`
defaults to `read` and `delete` to `write`. An object is the resource `TYPE:BUCKET/ENCODED_KEY`.

Object ids. SpiceDB ids allow `[a-zA-Z0-9/_|\\-=+]` (Anvil also allows `.`); keys may hold any
UTF-8. The key is encoded byte-wise, quoted-printable style with `=` as the escape: the UTF-8
bytes of `A-Z a-z 0-9 / _ - .` stay as they are, every other byte (including `=`, `|`, `+`,
space, and each byte of a non-ASCII character) becomes `=XX` with two upper-case hex digits.
So `reports/q1.pdf` stays readable, `a b=c` is `a=20b=3Dc`, `é` is `=C3=A9`, and decoding
is exact (`decode_key(encode_key(k)) == k`). A key whose id would pass SpiceDB's 1024
characters cannot be named in a relationship; such objects are refused (fail closed).

Artefacts. The optional `artefacts` part maps the four artefact operations (`pull`, `push`, `tag`,
`verify`) to permissions of one resource type, e.g. `{"resource_type": "model", "pull": "view",
"push": "edit"}` (`tag` defaults to `push`, `verify` to `pull`). The artefact `NAME` of bucket
`BUCKET` is the resource `TYPE:BUCKET/ENCODED_NAME` (encoded as keys are). Without the part, the
object part decides artefacts too: its type, `read` for pull and verify, `write` for push and tag.
"""

from __future__ import annotations

import json
import re
import string
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from anvil.errors import AnvilError

OPERATIONS = ("read", "write", "list", "delete")
DEFAULTS = {"list": "read", "delete": "write"}
ARTEFACT_OPERATIONS = ("pull", "push", "tag", "verify")
ARTEFACT_DEFAULTS = {"tag": "push", "verify": "pull"}
# Without an `artefacts` part: artefact operations -> object operations of the object part.
ARTEFACT_AS_OBJECT = {"pull": "read", "verify": "read", "push": "write", "tag": "write"}
WITHOUT_SUBJECT = ("deny", "scopes")
MAX_ID = 1024
_SAFE = frozenset((string.ascii_letters + string.digits + "/_-.").encode())
_ENCODED = re.compile(r"^(?:[A-Za-z0-9/_.\-]|=[0-9A-F]{2})*$")
_NAME = re.compile(r"^[a-z][a-z0-9_]{1,62}[a-z0-9]$")
_TYPE = re.compile(r"^[a-z][a-z0-9_]{1,62}[a-z0-9](?:/[a-z][a-z0-9_]{1,62}[a-z0-9])?$")

# Request facts given to caveats as context (`client_ip`, `now`), set per request by the API.
# A caveat that declares a parameter of that name receives it; others ignore it.
CLIENT_ADDRESS: ContextVar[str | None] = ContextVar("anvil_client_address", default=None)


def _invalid(message: str) -> AnvilError:
    return AnvilError("InvalidArgument", message)


def encode_key(key: str) -> str:
    out = []
    for b in key.encode("utf-8", "surrogatepass"):
        out.append(chr(b) if b in _SAFE else f"={b:02X}")
    return "".join(out)


def decode_key(encoded: str) -> str:
    if not _ENCODED.match(encoded):
        raise _invalid(f"not an encoded object key: {encoded[:80]!r}")
    raw = bytearray()
    i = 0
    while i < len(encoded):
        c = encoded[i]
        if c == "=":
            raw.append(int(encoded[i + 1:i + 3], 16))
            i += 3
        else:
            raw.append(ord(c))
            i += 1
    return raw.decode("utf-8", "surrogatepass")


def object_id(bucket: str, key: str) -> str:
    return f"{bucket}/{encode_key(key)}"


def key_of(bucket: str, rid: str) -> str | None:
    """The key an object id of this bucket names, or None when it is not one of this bucket's."""
    if not rid.startswith(bucket + "/"):
        return None
    try:
        return decode_key(rid[len(bucket) + 1:])
    except (AnvilError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class ArtefactPart:
    """Artefact operations bound to permissions of `resource_type` (same shape of question as objects:
    `resource_type` and `permission(op)`, so the service's object checks and lookups serve it too)."""

    resource_type: str
    pull: str
    push: str
    tag: str
    verify: str

    def permission(self, op: str) -> str:
        return getattr(self, op)

    def to_dict(self) -> dict[str, Any]:
        return {"resource_type": self.resource_type, "pull": self.pull, "push": self.push, "tag": self.tag,
                "verify": self.verify}


@dataclass(frozen=True)
class Binding:
    resource_type: str
    read: str
    write: str
    list: str
    delete: str
    without_subject: str = "deny"
    artefacts: ArtefactPart | None = None

    def permission(self, op: str) -> str:
        return getattr(self, op)

    def for_artefacts(self) -> ArtefactPart:
        """The artefact part, or the one the object part implies when there is none."""
        if self.artefacts is not None:
            return self.artefacts
        p = {op: self.permission(obj) for op, obj in ARTEFACT_AS_OBJECT.items()}
        return ArtefactPart(self.resource_type, p["pull"], p["push"], p["tag"], p["verify"])

    def requirements(self) -> list[tuple[str, str, str]]:
        """(what, resource type, permission) pairs the schema must have, for validation."""
        out = [(op, self.resource_type, self.permission(op)) for op in OPERATIONS]
        if self.artefacts is not None:
            a = self.artefacts
            out += [(f"artefacts.{op}", a.resource_type, a.permission(op)) for op in ARTEFACT_OPERATIONS]
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {"resource_type": self.resource_type, "read": self.read, "write": self.write, "list": self.list,
               "delete": self.delete, "without_subject": self.without_subject}
        # Only when present: bindings without it keep their exact JSON (and the summary digest).
        if self.artefacts is not None:
            out["artefacts"] = self.artefacts.to_dict()
        return out

    def canonical(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def parse_binding(body: Any) -> Binding:
    """A binding from its JSON form; names only (the schema check is the service's)."""
    if not isinstance(body, dict):
        raise _invalid("a binding is a JSON object {resource_type, read, write, list?, delete?, without_subject?, "
                       "artefacts?}")
    unknown = sorted(set(body) - {"resource_type", *OPERATIONS, "without_subject", "artefacts"})
    if unknown:
        raise _invalid(f"unknown binding field {unknown[0][:64]!r}")
    rtype = body.get("resource_type")
    if not isinstance(rtype, str) or not _TYPE.match(rtype):
        raise _invalid("resource_type must name a definition of the schema (e.g. document)")
    perms: dict[str, str] = {}
    for op in ("read", "write"):
        p = body.get(op)
        if not isinstance(p, str) or not _NAME.match(p):
            raise _invalid(f"{op!r} must name a permission or relation of {rtype!r} (e.g. view)")
        perms[op] = p
    for op, default in DEFAULTS.items():
        p = body.get(op, perms[default])
        if not isinstance(p, str) or not _NAME.match(p):
            raise _invalid(f"{op!r} must name a permission or relation of {rtype!r}")
        perms[op] = p
    ws = body.get("without_subject", "deny")
    if ws not in WITHOUT_SUBJECT:
        raise _invalid("without_subject must be deny or scopes")
    arts = _parse_artefacts(body["artefacts"]) if body.get("artefacts") is not None else None
    return Binding(rtype, perms["read"], perms["write"], perms["list"], perms["delete"], ws, arts)


def _parse_artefacts(body: Any) -> ArtefactPart:
    if not isinstance(body, dict):
        raise _invalid("artefacts is a JSON object {resource_type, pull, push, tag?, verify?}")
    unknown = sorted(set(body) - {"resource_type", *ARTEFACT_OPERATIONS})
    if unknown:
        raise _invalid(f"unknown artefacts field {unknown[0][:64]!r}")
    rtype = body.get("resource_type")
    if not isinstance(rtype, str) or not _TYPE.match(rtype):
        raise _invalid("artefacts.resource_type must name a definition of the schema (e.g. model)")
    perms: dict[str, str] = {}
    for op in ("pull", "push"):
        p = body.get(op)
        if not isinstance(p, str) or not _NAME.match(p):
            raise _invalid(f"artefacts.{op} must name a permission or relation of {rtype!r} (e.g. view)")
        perms[op] = p
    for op, default in ARTEFACT_DEFAULTS.items():
        p = body.get(op, perms[default])
        if not isinstance(p, str) or not _NAME.match(p):
            raise _invalid(f"artefacts.{op} must name a permission or relation of {rtype!r}")
        perms[op] = p
    return ArtefactPart(rtype, perms["pull"], perms["push"], perms["tag"], perms["verify"])


def binding_from_json(text: str) -> Binding:
    return parse_binding(json.loads(text))


# Gate actions -> binding operations.
ACTION_OPS = {"object:read": "read", "object:write": "write", "object:list": "list", "object:delete": "delete"}
ARTEFACT_ACTION_OPS = {"artefact:pull": "pull", "artefact:push": "push", "artefact:tag": "tag",
                       "artefact:verify": "verify"}
