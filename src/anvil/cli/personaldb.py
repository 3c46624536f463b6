"""`anvil pdb`: PersonalDB groups (create, ls, show, migrate, snapshot, compact, bind, unbind, binding, keys,
key rotate, verify)."""

from __future__ import annotations

import json
import sys

import click

from anvil.cli.common import client_command, emit, err_console
from anvil.client import AnvilClient


@click.group("pdb")
def pdb() -> None:
    """PersonalDB: a witness for local-first SQLite (see docs/personaldb.md)."""


@pdb.command("create")
@click.argument("name")
@click.option("--schema", "schema_file", type=click.File("r"), required=True, help="The schema SQL file ('-': stdin).")
@click.option("--snapshot-every", type=int, default=None, help="Build a snapshot every N commits.")
@client_command
def pdb_create(client: AnvilClient, as_json: bool, name: str, schema_file, snapshot_every: int | None) -> None:
    """Create PersonalDB group NAME from a schema SQL file."""
    res = client.pdb_create(name, schema_file.read(), snapshot_every=snapshot_every)
    emit(as_json, res, text=f"created group {name}: tables {', '.join(res['tables'])}; "
                            f"schema sha256 {res['schema_sha256']}")


@pdb.command("ls")
@client_command
def pdb_ls(client: AnvilClient, as_json: bool) -> None:
    """List PersonalDB groups."""
    items = client.pdb_list()
    rows = [(g["name"], g["tenant"], g["head_index"], g["head_hash"][:16], g["schema_version"]) for g in items]
    emit(as_json, items, table=(("group", "tenant", "head", "hash", "schema"), rows))


@pdb.command("show")
@click.argument("name")
@client_command
def pdb_show(client: AnvilClient, as_json: bool, name: str) -> None:
    """Show group NAME: log head, snapshots and settings."""
    g = client.pdb_get(name)
    rows = [(k, g[k]) for k in ("name", "tenant", "head_index", "head_hash", "genesis", "schema_version",
                                "snapshot_every", "max_changeset", "compacted_through")]
    rows.append(("tables", ", ".join(sorted(g["tables"]))))
    rows.append(("snapshots", ", ".join(str(s["index"]) for s in g["snapshots"]) or "-"))
    emit(as_json, g, table=(("field", "value"), rows))


@pdb.command("migrate")
@click.argument("name")
@click.option("--sql", "sql_file", type=click.File("r"), required=True, help="The migration SQL file.")
@client_command
def pdb_migrate(client: AnvilClient, as_json: bool, name: str, sql_file) -> None:
    """Apply a schema migration to group NAME."""
    res = client.pdb_migrate(name, sql_file.read())
    emit(as_json, res, text=f"{name}: schema version {res['schema_version']} at index {res['index']}")


@pdb.command("snapshot")
@click.argument("name")
@client_command
def pdb_snapshot(client: AnvilClient, as_json: bool, name: str) -> None:
    """Build a snapshot of group NAME now."""
    res = client.pdb_build_snapshot(name)
    emit(as_json, res, text=f"{name}: snapshot at index {res['index']}, {res['size']} bytes "
                            f"({res['raw_size']} uncompressed), state {res['state_hash'][:16]}")


@pdb.command("compact")
@click.argument("name")
@client_command
def pdb_compact(client: AnvilClient, as_json: bool, name: str) -> None:
    """Drop log entries of group NAME already covered by a snapshot."""
    res = client.pdb_compact(name)
    emit(as_json, res, text=f"{name}: changesets compacted through index {res['compacted_through']}")


def _binding_text(name: str, b: dict) -> str:
    return (f"{name}: rows are {b['resource_type']}:{b['resource']} insert={b['insert']} update={b['update']} "
            f"delete={b['delete']} without_subject={b['without_subject']}")


@pdb.command("bind")
@click.argument("name")
@click.option("--resource-type", required=True, help="The authz schema definition rows are (e.g. note).")
@click.option("--resource", default=None, metavar="TEMPLATE",
              help="The row's id: {group}, {table}, {pk} or primary-key columns (default {table}/{pk}).")
@click.option("--update", "update_", required=True, metavar="PERMISSION", help="Permission to update a row.")
@click.option("--insert", "insert_", default=None, metavar="PERMISSION", help="To insert one (default: --update).")
@click.option("--delete", "delete_", default=None, metavar="PERMISSION", help="To delete one (default: --update).")
@click.option("--without-subject", type=click.Choice(["deny", "scopes"]), default="deny", show_default=True,
              help="What a token acting for no subject gets: refused, or scopes alone.")
@client_command
def pdb_bind(client: AnvilClient, as_json: bool, name: str, resource_type: str, resource: str | None,
             update_: str, insert_: str | None, delete_: str | None, without_subject: str) -> None:
    """Decide group NAME's row changes by relationships (docs/personaldb.md)."""
    body = {"resource_type": resource_type, "update": update_, "without_subject": without_subject}
    for k, v in (("resource", resource), ("insert", insert_), ("delete", delete_)):
        if v:
            body[k] = v
    res = client.pdb_bind(name, body)
    emit(as_json, res, text="bound " + _binding_text(name, res["binding"]))


@pdb.command("unbind")
@click.argument("name")
@client_command
def pdb_unbind(client: AnvilClient, as_json: bool, name: str) -> None:
    """Remove group NAME's row binding: scopes alone decide again."""
    emit(as_json, client.pdb_unbind(name), text=f"unbound {name}: scopes alone decide")


@pdb.command("binding")
@click.argument("name")
@client_command
def pdb_binding(client: AnvilClient, as_json: bool, name: str) -> None:
    """Show group NAME's row binding."""
    res = client.pdb_binding(name)
    emit(as_json, res, text=_binding_text(name, res["binding"]))


@pdb.command("keys")
@client_command
def pdb_keys(client: AnvilClient, as_json: bool) -> None:
    """The witness's public keys, with rotation history."""
    items = client.pdb_keys()
    rows = [(k["key_id"], k["public"], "retired" if k["retired"] else "current") for k in items]
    emit(as_json, items, table=(("key id", "public key (base64)", "state"), rows))


@pdb.group("key")
def pdb_key() -> None:
    """The witness key (its public keys are listed by `anvil pdb keys`)."""


@pdb_key.command("rotate")
@client_command
def pdb_key_rotate(client: AnvilClient, as_json: bool) -> None:
    """Retire the current witness key and start a new one (admin). Old certificates keep verifying."""
    res = client.pdb_rotate_key()
    emit(as_json, res, text=f"the witness now signs with {res['key_id']}; earlier keys stay published as retired")


@pdb.command("verify")
@click.argument("name")
@client_command
def pdb_verify(client: AnvilClient, as_json: bool, name: str) -> None:
    """Check GROUP's whole certificate chain and its snapshots offline with the published keys."""
    from anvil.personaldb.certs import CertificateInvalid, verify_group

    try:
        res = verify_group(client, name)
    except CertificateInvalid as e:
        if as_json:
            click.echo(json.dumps({"error": {"code": e.code, "message": e.message}}))
        else:
            err_console.print(f"[red]error[/red] {e.code}: {e.message}")
        sys.exit(1)
    emit(as_json, res, text=f"{name}: {res['entries']} certificates verify, head {res['head_index']} "
                            f"{res['head_hash'][:16]}; snapshots verified: {len(res['snapshots_verified'])}")


@pdb.group("projection")
def projection() -> None:
    """Read-only databases derived from a group for another audience."""


@projection.command("create")
@click.argument("name")
@click.option("--source", required=True, help="The source group.")
@click.option("--spec", "spec_file", type=click.File("r"), required=True, help="The projection spec (JSON).")
@client_command
def projection_create(client: AnvilClient, as_json: bool, name: str, source: str, spec_file) -> None:
    """Create projection NAME of a source group from a JSON spec."""
    res = client.pdb_create_projection(name, source, json.load(spec_file))
    emit(as_json, res, text=f"created projection {name} of {source} at source index {res['source_index']}")


@projection.command("show")
@click.argument("name")
@client_command
def projection_show(client: AnvilClient, as_json: bool, name: str) -> None:
    """Show projection NAME and how far it has caught up."""
    res = client.pdb_projection(name)
    emit(as_json, res, table=(("field", "value"), [(k, res.get(k)) for k in (
        "name", "source", "source_index", "state_hash", "relation_filters", "authz_revision")]))
