"""Row permissions by relationship: a group's binding (docs/personaldb.md, "Row permissions by relationship").

A binding maps the three row operations to permissions of one definition of the group's tenant's
authz schema, e.g. `{"resource_type": "note", "resource": "{table}/{pk}", "insert": "edit",
"update": "edit", "delete": "owner"}` (`insert` and `delete` default to `update`, `resource` to
`{table}/{pk}`, `without_subject` to `deny`). The row is the resource `TYPE:ID`, ID being the
template filled from the row: `{group}`, `{table}`, `{pk}` (the primary-key values joined by
`/`) or a primary-key column by name (`{id}`).

Values in ids. Each value is written in SpiceDB's id alphabet, quoted-printable style with `=` as
the escape: the UTF-8 bytes of `A-Z a-z 0-9 _ - .` stay, every other byte (`/`, `=`, space, each
byte of a non-ASCII character) becomes `=XX`; integers and reals as their decimal text, blobs as
lower-case hex, NULL as `=00`. So `{pk}` of (7, 'a/b') is `7/a=2Fb`, and two different keys never
give one id. Projections' relation filters fill their templates the same way, so one relationship
speaks of one row to both. This module knows nothing of authz: the service asks it through the hook
the runtime installs.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from typing import Any

from anvil.errors import AnvilError

OPS = ("insert", "update", "delete")
WITHOUT_SUBJECT = ("deny", "scopes")
DEFAULT_RESOURCE = "{table}/{pk}"
_TYPE = re.compile(r"^[a-z][a-z0-9_]{1,62}[a-z0-9](?:/[a-z][a-z0-9_]{1,62}[a-z0-9])?$")
_NAME = re.compile(r"^[a-z][a-z0-9_]{1,62}[a-z0-9]$")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# Literal parts of a template: SpiceDB's id alphabet (plus `.`), without `{}`.
_LITERAL = re.compile(r"^[A-Za-z0-9/_|\-=+.]*$")
_SAFE = frozenset((string.ascii_letters + string.digits + "_-.").encode())
SPECIAL = ("group", "table", "pk")


def _invalid(message: str) -> AnvilError:
    return AnvilError("InvalidArgument", message)


def id_value(v: Any) -> str:
    """One row value in an id (see the module's docstring)."""
    if v is None:
        return "=00"
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).hex()
    if isinstance(v, bool):
        v = int(v)
    text = v if isinstance(v, str) else repr(v) if isinstance(v, float) else str(v)
    return "".join(chr(b) if b in _SAFE else f"={b:02X}" for b in text.encode("utf-8", "surrogatepass"))


def fill(template: str, values: dict[str, Any]) -> str:
    """`template` with each `{name}` replaced by `id_value(values.get(name))`."""
    return _PLACEHOLDER.sub(lambda m: id_value(values.get(m.group(1))), template)


@dataclass(frozen=True)
class RowBinding:
    resource_type: str
    resource: str
    insert: str
    update: str
    delete: str
    without_subject: str = "deny"

    def permission(self, op: str) -> str:
        """The permission of a changeset op (INSERT, UPDATE, DELETE)."""
        return getattr(self, op.lower())

    def permissions(self) -> dict[str, str]:
        return {op: getattr(self, op) for op in OPS}

    def resource_id(self, group: str, table: str, pk_columns: list[str], pk: tuple[Any, ...]) -> str:
        """The row's resource id; AnvilError naming the placeholder a table cannot fill (fail closed)."""
        parts = {"group": group, "table": table}
        parts.update(zip(pk_columns, pk, strict=False))
        out = []
        pos = 0
        for m in _PLACEHOLDER.finditer(self.resource):
            out.append(self.resource[pos:m.start()])
            name = m.group(1)
            if name == "pk":
                out.append("/".join(id_value(v) for v in pk))
            elif name in parts:
                out.append(id_value(parts[name]))
            else:
                raise AnvilError("PermissionDenied", f"the group's binding names {{{name}}}, which is not a "
                                                     f"primary-key column of table {table}")
            pos = m.end()
        out.append(self.resource[pos:])
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"resource_type": self.resource_type, "resource": self.resource, "insert": self.insert,
                "update": self.update, "delete": self.delete, "without_subject": self.without_subject}

    def canonical(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def parse_binding(body: Any, tables: dict[str, dict[str, Any]]) -> RowBinding:
    """A binding from its JSON form, checked against the group's tables (names only: the authz
    schema check is the hook's)."""
    if not isinstance(body, dict):
        raise _invalid("a binding is a JSON object {resource_type, resource?, insert?, update, delete?, "
                       "without_subject?}")
    unknown = sorted(set(body) - {"resource_type", "resource", *OPS, "without_subject"})
    if unknown:
        raise _invalid(f"unknown binding field {unknown[0][:64]!r}")
    rtype = body.get("resource_type")
    if not isinstance(rtype, str) or not _TYPE.match(rtype):
        raise _invalid("resource_type must name a definition of the tenant's authz schema (e.g. note)")
    perms: dict[str, str] = {}
    update = body.get("update")
    if not isinstance(update, str) or not _NAME.match(update):
        raise _invalid(f"'update' must name a permission or relation of {rtype!r} (e.g. edit)")
    for op in OPS:
        p = body.get(op, update)
        if not isinstance(p, str) or not _NAME.match(p):
            raise _invalid(f"{op!r} must name a permission or relation of {rtype!r}")
        perms[op] = p
    template = body.get("resource", DEFAULT_RESOURCE)
    if not isinstance(template, str) or not template or len(template) > 256:
        raise _invalid("resource is a template of at most 256 characters, e.g. {table}/{pk}")
    if not _LITERAL.match(_PLACEHOLDER.sub("", template)):
        raise _invalid("resource: outside {placeholders} only SpiceDB id characters (a-z A-Z 0-9 / _ | - = + .)")
    names = _PLACEHOLDER.findall(template)
    if not names:
        raise _invalid("resource must name the row: use {pk} or primary-key columns (e.g. {table}/{pk})")
    for name in names:
        if name in SPECIAL:
            continue
        lacking = sorted(t for t, info in tables.items() if name not in info["pk"])
        if lacking:
            raise _invalid(f"resource: {{{name}}} is not a primary-key column of table {lacking[0]} (use {{pk}}, "
                           "{table}, {group} or primary-key columns every table has)")
    if not any(n in ("pk",) or n not in SPECIAL for n in names):
        raise _invalid("resource must name the row: use {pk} or primary-key columns (e.g. {table}/{pk})")
    ws = body.get("without_subject", "deny")
    if ws not in WITHOUT_SUBJECT:
        raise _invalid("without_subject must be deny or scopes")
    return RowBinding(rtype, template, perms["insert"], perms["update"], perms["delete"], ws)


def binding_from_json(text: str) -> RowBinding:
    d = json.loads(text)
    return RowBinding(d["resource_type"], d["resource"], d["insert"], d["update"], d["delete"],
                      d.get("without_subject", "deny"))
