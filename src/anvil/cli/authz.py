"""`anvil authz ...`: schemas, relationships and permission questions, modelled on `zed`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from anvil.cli.common import client_command, emit
from anvil.client import AnvilClient


@click.group()
def authz() -> None:
    """Relationship-based authorisation: SpiceDB schemas, relationships, check, lookups, expand."""


def _consistency_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """zed's consistency flags; the default is minimize latency."""
    options = [
        click.option("--consistency-full", "full", is_flag=True, help="Answer at the newest revision."),
        click.option("--consistency-at-least", "at_least", default=None, metavar="TOKEN",
                     help="Answer at a revision at least as fresh as TOKEN."),
        click.option("--consistency-at-exact-snapshot", "exact", default=None, metavar="TOKEN",
                     help="Answer at exactly the revision of TOKEN."),
        click.option("--consistency-min-latency", "min_latency", is_flag=True,
                     help="Answer at the newest revision this server knows without asking (default)."),
        click.option("--tenant", default=None, help="Another tenant (admins only)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _consistency(full: bool, at_least: str | None, exact: str | None, min_latency: bool) -> Any:
    chosen = [x for x in (full, at_least, exact, min_latency) if x]
    if len(chosen) > 1:
        raise click.UsageError("give at most one --consistency-* option")
    if full:
        return "fully_consistent"
    if at_least:
        return {"at_least_as_fresh": at_least}
    if exact:
        return {"at_exact_snapshot": exact}
    return None


def _context(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise click.BadParameter("--caveat-context must be a JSON object") from None
    if not isinstance(value, dict):
        raise click.BadParameter("--caveat-context must be a JSON object")
    return value


_CONTEXT = click.option("--caveat-context", "context", default=None, metavar="JSON",
                        help='Caveat context, e.g. \'{"user_ip": "10.0.0.1"}\'.')


# ------------------------------------------------------------------ schema


@authz.group()
def schema() -> None:
    """Write and read the tenant's schema (SpiceDB's schema language)."""


@schema.command("write")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--tenant", default=None, help="Another tenant (admins only).")
@client_command
def schema_write(client: AnvilClient, as_json: bool, file: Any, tenant: str | None) -> None:
    """Write the schema in FILE ('-' for standard input)."""
    res = client.authz_write_schema(file.read(), tenant=tenant)
    emit(as_json, res, text=f"schema written for tenant {res['tenant']}: {len(res['definitions'])} definitions, "
                            f"{len(res['caveats'])} caveats; token {res['written_at']}")


@schema.command("read")
@_consistency_options
@client_command
def schema_read(client: AnvilClient, as_json: bool, full: bool, at_least: str | None, exact: str | None,
                min_latency: bool, tenant: str | None) -> None:
    """Print the tenant's current authorisation schema."""
    res = client.authz_read_schema(tenant=tenant, consistency=_consistency(full, at_least, exact, min_latency))
    if as_json:
        emit(True, res)
    else:
        click.echo(res["schema"])


# ------------------------------------------------------------------ questions


def _permissionship(res: dict[str, Any]) -> str:
    p = res["permissionship"]
    if p == "has_permission":
        return "true"
    if p == "no_permission":
        return "false"
    return "caveated (missing context: " + ", ".join(res.get("missing_context", [])) + ")"


@authz.command("check")
@click.argument("resource")
@click.argument("permission")
@click.argument("subject")
@_CONTEXT
@click.option("--error-on-no-permission", is_flag=True, help="Exit 2 unless the answer is has_permission.")
@_consistency_options
@client_command
def check(client: AnvilClient, as_json: bool, resource: str, permission: str, subject: str, context: str | None,
          error_on_no_permission: bool, full: bool, at_least: str | None, exact: str | None, min_latency: bool,
          tenant: str | None) -> None:
    """Does SUBJECT have PERMISSION on RESOURCE? e.g. `anvil authz check document:readme view user:amy`."""
    res = client.authz_check(resource, permission, subject, context=_context(context),
                             consistency=_consistency(full, at_least, exact, min_latency), tenant=tenant)
    emit(as_json, res, text=_permissionship(res))
    if error_on_no_permission and res["permissionship"] != "has_permission":
        sys.exit(2)


@authz.command("lookup-resources")
@click.argument("resource_type")
@click.argument("permission")
@click.argument("subject")
@_CONTEXT
@click.option("--limit", type=int, default=None)
@_consistency_options
@client_command
def lookup_resources(client: AnvilClient, as_json: bool, resource_type: str, permission: str, subject: str,
                     context: str | None, limit: int | None, full: bool, at_least: str | None, exact: str | None,
                     min_latency: bool, tenant: str | None) -> None:
    """Resources of RESOURCE_TYPE on which SUBJECT has PERMISSION."""
    res = client.authz_lookup_resources(resource_type, permission, subject, context=_context(context), limit=limit,
                                        consistency=_consistency(full, at_least, exact, min_latency), tenant=tenant)
    lines = [f"{resource_type}:{r['resource_id']}" + ("" if r["permissionship"] == "has_permission"
                                                      else f" ({_permissionship(r)})") for r in res["resources"]]
    emit(as_json, res, text="\n".join(lines) if lines else "(none)")


@authz.command("lookup-subjects")
@click.argument("resource")
@click.argument("permission")
@click.argument("subject_type")
@_CONTEXT
@_consistency_options
@client_command
def lookup_subjects(client: AnvilClient, as_json: bool, resource: str, permission: str, subject_type: str,
                    context: str | None, full: bool, at_least: str | None, exact: str | None, min_latency: bool,
                    tenant: str | None) -> None:
    """Subjects of SUBJECT_TYPE (or TYPE#RELATION) with PERMISSION on RESOURCE."""
    stype, _, srel = subject_type.partition("#")
    res = client.authz_lookup_subjects(resource, permission, stype, subject_relation=srel or None,
                                       context=_context(context),
                                       consistency=_consistency(full, at_least, exact, min_latency), tenant=tenant)
    lines = []
    for s in res["subjects"]:
        line = s["subject"]
        if s.get("excluded"):
            line += " - [" + ", ".join(s["excluded"]) + "]"
        if s["permissionship"] != "has_permission":
            line += f" ({_permissionship(s)})"
        lines.append(line)
    emit(as_json, res, text="\n".join(lines) if lines else "(none)")


def _tree_lines(node: dict[str, Any], indent: str = "") -> list[str]:
    out: list[str] = []
    if "object" in node:
        if node.get("cycle"):
            return [f"{indent}{node['object']} (cycle)"]
        out.append(f"{indent}{node['object']}")
        for s in node.get("leaf", []):
            extra = f" [{s['caveat']}]" if s.get("caveat") else ""
            out.append(f"{indent}  └ {s['subject']}{extra}")
        for c in node.get("children", []):
            out += _tree_lines(c, indent + "    ")
        if "expression" in node:
            out += _tree_lines(node["expression"], indent + "  ")
        return out
    if node.get("nil"):
        return [f"{indent}nil"]
    if "arrow" in node:
        out.append(f"{indent}{node['arrow']}")
        for c in node["children"]:
            out += _tree_lines(c, indent + "  ")
        return out
    for op in ("union", "intersection", "exclusion"):
        if op in node:
            out.append(f"{indent}{op}")
            for c in node[op]:
                out += _tree_lines(c, indent + "  ")
    return out


@authz.command("expand")
@click.argument("permission")
@click.argument("resource")
@_consistency_options
@client_command
def expand(client: AnvilClient, as_json: bool, permission: str, resource: str, full: bool, at_least: str | None,
           exact: str | None, min_latency: bool, tenant: str | None) -> None:
    """The tree of PERMISSION on RESOURCE (zed's argument order: `anvil authz expand view document:readme`)."""
    res = client.authz_expand(resource, permission, consistency=_consistency(full, at_least, exact, min_latency),
                              tenant=tenant)
    emit(as_json, res, text="\n".join(_tree_lines(res["tree"])))


# ------------------------------------------------------------------ relationships


@authz.group("rel")
def rel() -> None:
    """Write, read and delete relationships (SpiceDB's text form)."""


def _filter(resource: str, relation: str | None, subject: str | None) -> dict[str, str]:
    rtype, _, rid = resource.partition(":")
    f = {"resource_type": rtype}
    if rid:
        f["resource_id"] = rid
    if relation:
        f["relation"] = relation
    if subject:
        st, _, rest = subject.partition(":")
        f["subject_type"] = st
        sid, _, srel = rest.partition("#")
        if sid:
            f["subject_id"] = sid
        if srel:
            f["subject_relation"] = srel
    return f


@rel.command("write")
@click.argument("relationships", nargs=-1)
@click.option("--file", "file", type=click.File("r", encoding="utf-8"), default=None,
              help="Relationships one per line ('-' for standard input; '#' starts a comment line).")
@click.option("--operation", type=click.Choice(["touch", "create", "delete"]), default="touch", show_default=True)
@click.option("--tenant", default=None, help="Another tenant (admins only).")
@client_command
def rel_write(client: AnvilClient, as_json: bool, relationships: tuple[str, ...], file: Any, operation: str,
              tenant: str | None) -> None:
    """Write RELATIONSHIPS (e.g. document:readme#viewer@user:amy) in one batch."""
    items = list(relationships)
    if file is not None:
        items += [ln.strip() for ln in file.read().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not items:
        raise click.UsageError("give relationships as arguments or with --file")
    res = client.authz_write(items, operation=operation, tenant=tenant)
    emit(as_json, res, text=f"{res['changed']} relationship(s) changed; token {res['written_at']}")


@rel.command("read")
@click.argument("resource")
@click.argument("relation", required=False)
@click.argument("subject", required=False)
@_consistency_options
@client_command
def rel_read(client: AnvilClient, as_json: bool, resource: str, relation: str | None, subject: str | None,
             full: bool, at_least: str | None, exact: str | None, min_latency: bool, tenant: str | None) -> None:
    """Relationships matching RESOURCE (TYPE or TYPE:ID), optional RELATION and SUBJECT (TYPE[:ID[#REL]])."""
    rows = list(client.authz_iter(_filter(resource, relation, subject),
                                  consistency=_consistency(full, at_least, exact, min_latency), tenant=tenant))
    emit(as_json, rows, text="\n".join(r["relationship"] for r in rows) if rows else "(none)")


@rel.command("delete")
@click.argument("resource")
@click.argument("relation", required=False)
@click.argument("subject", required=False)
@click.option("--allow-partial", is_flag=True, help="Delete up to the limit when more match (repeat to finish).")
@click.option("--limit", type=int, default=None)
@click.option("--tenant", default=None, help="Another tenant (admins only).")
@client_command
def rel_delete(client: AnvilClient, as_json: bool, resource: str, relation: str | None, subject: str | None,
               allow_partial: bool, limit: int | None, tenant: str | None) -> None:
    """Delete relationships matching RESOURCE (TYPE or TYPE:ID), optional RELATION and SUBJECT."""
    res = client.authz_delete(_filter(resource, relation, subject), limit=limit, allow_partial=allow_partial,
                              tenant=tenant)
    emit(as_json, res, text=f"{res['deleted']} relationship(s) deleted" + (" (more remain)" if res["partial"] else "")
         + f"; token {res['deleted_at']}")


# ------------------------------------------------------------------ bucket bindings (`anvil bucket bind ...`)
# Attached to the `bucket` group by anvil.cli.main: a binding is a bucket setting.


@click.command("bind")
@click.argument("name")
@click.option("--resource-type", required=True, help="The schema definition objects are (e.g. document).")
@click.option("--read", "read_", required=True, metavar="PERMISSION", help="Permission for GET/HEAD (e.g. view).")
@click.option("--write", "write_", required=True, metavar="PERMISSION", help="Permission for PUT/copy/multipart.")
@click.option("--list", "list_", default=None, metavar="PERMISSION", help="Permission to see a key in listings "
              "(default: --read).")
@click.option("--delete", "delete_", default=None, metavar="PERMISSION", help="Permission for DELETE (default: "
              "--write).")
@click.option("--without-subject", type=click.Choice(["deny", "scopes"]), default="deny", show_default=True,
              help="What a token acting for no subject gets: refused, or scopes alone.")
@click.option("--artefact-type", default=None, metavar="TYPE",
              help="Artefacts of the bucket are TYPE:BUCKET/NAME (default: the objects' type, read/write).")
@click.option("--pull", default=None, metavar="PERMISSION", help="With --artefact-type: permission to pull/verify.")
@click.option("--push", default=None, metavar="PERMISSION", help="With --artefact-type: permission to push/tag.")
@client_command
def bucket_bind(client: AnvilClient, as_json: bool, name: str, resource_type: str, read_: str, write_: str,
                list_: str | None, delete_: str | None, without_subject: str, artefact_type: str | None,
                pull: str | None, push: str | None) -> None:
    """Decide the bucket's object operations by relationships: TYPE:BUCKET/KEY (docs/authz.md)."""
    body: dict[str, Any] = {"resource_type": resource_type, "read": read_, "write": write_,
                            "without_subject": without_subject}
    if list_:
        body["list"] = list_
    if delete_:
        body["delete"] = delete_
    if artefact_type or pull or push:
        if not (artefact_type and pull and push):
            raise click.UsageError("--artefact-type, --pull and --push go together")
        body["artefacts"] = {"resource_type": artefact_type, "pull": pull, "push": push}
    res = client.authz_bind_bucket(name, body)
    b = res["binding"]
    emit(as_json, res, text=f"bound {name}: objects are {b['resource_type']}:{name}/KEY; read={b['read']} "
                            f"write={b['write']} list={b['list']} delete={b['delete']}")


@click.command("unbind")
@click.argument("name")
@client_command
def bucket_unbind(client: AnvilClient, as_json: bool, name: str) -> None:
    """Remove the bucket's binding: scopes alone decide again."""
    emit(as_json, client.authz_unbind_bucket(name), text=f"unbound {name}: scopes alone decide")


@click.command("binding")
@click.argument("name")
@client_command
def bucket_binding(client: AnvilClient, as_json: bool, name: str) -> None:
    """Show the bucket's binding."""
    res = client.authz_bucket_binding(name)
    b = res["binding"]
    emit(as_json, res, text=f"{name}: {b['resource_type']}:{name}/KEY read={b['read']} write={b['write']} "
                            f"list={b['list']} delete={b['delete']} without_subject={b['without_subject']}")

