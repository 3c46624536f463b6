"""`anvil index create|update|ls|status|disable|enable|rm` and `anvil search BUCKET INDEX`."""

from __future__ import annotations

import json
from typing import Any

import click

from anvil.cli.common import client_command, emit
from anvil.client import AnvilClient


def _definition(spec: str) -> dict[str, Any]:
    """A definition given inline as JSON, or as @FILE."""
    try:
        if spec.startswith("@"):
            with open(spec[1:]) as f:
                return json.load(f)
        return json.loads(spec)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f"the definition must be JSON or @FILE: {e}") from None


def _json_option(value: str | None, what: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError as e:
        raise click.BadParameter(f"{what} must be JSON: {e}") from None


@click.group()
def index() -> None:
    """Manage a bucket's indexes (definitions are versioned source records)."""


@index.command("create")
@click.argument("bucket_name")
@click.argument("definition")
@client_command
def index_create(client: AnvilClient, as_json: bool, bucket_name: str, definition: str) -> None:
    """Create an index in BUCKET from DEFINITION (JSON or @FILE)."""
    d = client.create_index(bucket_name, _definition(definition))
    emit(as_json, d, text=f"created index {d['name']} (version {d['version']}) in {bucket_name}")


@index.command("update")
@click.argument("bucket_name")
@click.argument("name")
@click.argument("definition")
@client_command
def index_update(client: AnvilClient, as_json: bool, bucket_name: str, name: str, definition: str) -> None:
    """Replace index NAME's definition (its version increases; it is rebuilt)."""
    d = client.update_index(bucket_name, name, _definition(definition))
    emit(as_json, d, text=f"updated index {name} to version {d['version']}")


@index.command("ls")
@click.argument("bucket_name")
@client_command
def index_ls(client: AnvilClient, as_json: bool, bucket_name: str) -> None:
    """List BUCKET's indexes with their state."""
    items = client.list_indexes(bucket_name)
    rows = [(d["name"], d["definition"]["kind"], d["version"], d["status"].get("state"),
             d["status"].get("documents"), d["status"].get("cursor"), d["status"].get("lag_events")) for d in items]
    emit(as_json, items, table=(("name", "kind", "version", "state", "documents", "cursor", "lag"), rows))


@index.command("status")
@click.argument("bucket_name")
@click.argument("name")
@client_command
def index_status(client: AnvilClient, as_json: bool, bucket_name: str, name: str) -> None:
    """Show index NAME's definition version, generation, cursor, lag, documents and diagnostics."""
    d = client.get_index(bucket_name, name)
    s = d["status"]
    lines = [f"index {name} ({d['definition']['kind']}), version {d['version']}: {s.get('state')}"]
    if s.get("generation") is not None:
        lines.append(f"generation {s['generation']}, cursor {s['cursor']} of {s['head']}, lag {s['lag_events']} "
                     f"events / {s['lag_seconds']} s, {s['documents']} documents")
    for diag in s.get("diagnostics") or []:
        lines.append(f"  {diag['code']} {diag['key']}: {diag['message']}")
    emit(as_json, d, text="\n".join(lines))


def _simple(action: str):  # noqa: ANN202 - a click command factory
    @index.command(action, help={"disable": "Stop building and querying index NAME (its version increases).",
                                 "enable": "Enable index NAME again (it is rebuilt; its version increases).",
                                 "rm": "Drop index NAME: its definition and generations are removed."}[action])
    @click.argument("bucket_name")
    @click.argument("name")
    @client_command
    def run(client: AnvilClient, as_json: bool, bucket_name: str, name: str) -> None:
        fn = {"disable": client.disable_index, "enable": client.enable_index, "rm": client.drop_index}[action]
        d = fn(bucket_name, name)
        emit(as_json, d, text=f"{action} index {name}: done (version {d['version']})")

    return run


index_disable = _simple("disable")
index_enable = _simple("enable")
index_rm = _simple("rm")


@click.command("search")
@click.argument("bucket_name")
@click.argument("index_name")
@click.option("--text", default=None, help="Full-text query (phrases, AND/OR/NOT, field:term, term^2).")
@click.option("--vector", default=None, help="Query vector as a JSON array.")
@click.option("--filter", "filter_", default=None, help="Filter as JSON: {field, op, value}, {and: [...]}, ...")
@click.option("--sort", default=None, help="Sort as JSON {field, order} (default: score).")
@click.option("--limit", type=int, default=10)
@click.option("--min-cursor", type=int, default=None, help="Wait until the index has reached this journal cursor.")
@click.option("--page-token", default=None)
@client_command
def search(client: AnvilClient, as_json: bool, bucket_name: str, index_name: str, text: str | None,
           vector: str | None, filter_: str | None, sort: str | None, limit: int, min_cursor: int | None,
           page_token: str | None) -> None:
    """Query INDEX of BUCKET: full text, vector kNN, hybrid, or a filter alone."""
    q: dict[str, Any] = {"limit": limit}
    for name, value in (("text", text), ("min_cursor", min_cursor), ("page_token", page_token)):
        if value is not None:
            q[name] = value
    for name, value in (("vector", vector), ("filter", filter_), ("sort", sort)):
        parsed = _json_option(value, f"--{name}")
        if parsed is not None:
            q[name] = parsed
    res = client.search(bucket_name, index_name, **q)
    rows = []
    for h in res["hits"]:
        snippet = next(iter((h.get("snippets") or {}).values()), {}).get("fragment", "")
        rows.append((h["key"], h["version"], f"{h['score']:.4f}", snippet[:80]))
    emit(as_json, res, table=(("key", "version", "score", "snippet"), rows))
