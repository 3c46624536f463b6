"""`anvil watch`: follow a bucket's changes, manage durable consumers, compact the journal."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click

from anvil.cli.common import client_command, console, emit
from anvil.client import AnvilClient


class _WatchGroup(click.Group):
    """`anvil watch BUCKET ...` streams; `anvil watch consumer|compact|status ...` are subcommands.

    A first argument that is not a subcommand is taken as the bucket of `anvil watch stream`.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["stream", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_WatchGroup)
def watch() -> None:
    """Follow changes: anvil watch BUCKET [--prefix P] [--after CURSOR] [--json] [--limit N]."""


def _line(ev: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(ev["time"], UTC).strftime("%H:%M:%S.%f")[:-3] if ev.get("time") else ""
    where = ev.get("bucket") or ""
    if ev.get("key") is not None:
        where += "/" + ev["key"]
    extra = []
    if ev.get("version_id"):
        extra.append(f"version={ev['version_id']}")
    if ev.get("size") is not None:
        extra.append(f"size={ev['size']}")
    if ev.get("etag"):
        extra.append(f"etag={ev['etag']}")
    return f"{ev['seq']:>8} {when} {ev['kind']:<18} {where} {' '.join(extra)}".rstrip()


@watch.command("stream")
@click.argument("bucket_name")
@click.option("--prefix", default="")
@click.option("--after", type=int, default=None, help="Resume after this cursor (default: only new events).")
@click.option("--kinds", default=None, help="Comma-separated kinds, e.g. object.*,bucket.delete.")
@click.option("--limit", type=int, default=None, help="Stop after this many events.")
@client_command
def watch_stream(client: AnvilClient, as_json: bool, bucket_name: str, prefix: str, after: int | None,
                 kinds: str | None, limit: int | None) -> None:
    """Print BUCKET's change events as they happen (one JSON object per line with --json)."""
    count = 0
    if limit is not None and limit <= 0:
        return
    with client.watch(bucket_name, prefix=prefix, after=after, kinds=kinds) as stream:
        try:
            for ev in stream:
                if as_json:
                    click.echo(json.dumps(ev.to_dict(), ensure_ascii=False), nl=True)
                else:
                    console.print(_line(ev), markup=False, highlight=False, soft_wrap=True)
                count += 1
                if limit is not None and count >= limit:
                    return
        except KeyboardInterrupt:
            return


@watch.group("consumer")
def consumer() -> None:
    """Durable named consumers: a scope and a cursor that only moves forward."""


@consumer.command("create")
@click.argument("name")
@click.option("--bucket", default=None)
@click.option("--prefix", default="")
@click.option("--kinds", default=None, help="Comma-separated kinds.")
@click.option("--after", type=int, default=None, help="Start cursor (default: the current head).")
@client_command
def consumer_create(client: AnvilClient, as_json: bool, name: str, bucket: str | None, prefix: str,
                    kinds: str | None, after: int | None) -> None:
    """Create durable consumer NAME that resumes from its checkpointed cursor."""
    res = client.create_consumer(name, bucket=bucket, prefix=prefix,
                                 kinds=kinds.split(",") if kinds else None, after=after)
    emit(as_json, res, text=f"created consumer {name} at cursor {res['cursor']}")


@consumer.command("ls")
@client_command
def consumer_ls(client: AnvilClient, as_json: bool) -> None:
    """List durable consumers with their cursor and lag."""
    items = client.list_consumers()
    rows = [(c["name"], c.get("bucket") or "*", c.get("prefix") or "", ",".join(c["kinds"]), c["cursor"],
             c["lag"], f"{c['age_seconds']:.1f}s") for c in items]
    emit(as_json, items, table=(("name", "bucket", "prefix", "kinds", "cursor", "lag", "age"), rows))


@consumer.command("rm")
@click.argument("name")
@client_command
def consumer_rm(client: AnvilClient, as_json: bool, name: str) -> None:
    """Delete durable consumer NAME."""
    emit(as_json, client.delete_consumer(name), text=f"deleted consumer {name}")


@consumer.command("checkpoint")
@click.argument("name")
@click.argument("cursor", type=int)
@client_command
def consumer_checkpoint(client: AnvilClient, as_json: bool, name: str, cursor: int) -> None:
    """Record that consumer NAME has processed every event up to CURSOR."""
    res = client.checkpoint(name, cursor)
    emit(as_json, res, text=f"{name}: cursor {res['cursor']} (lag {res['lag']})")


@watch.command("compact")
@click.option("--retention", "retention_seconds", type=float, default=None,
              help="Override the server's retention window (seconds).")
@client_command
def watch_compact(client: AnvilClient, as_json: bool, retention_seconds: float | None) -> None:
    """Compact journal events every consumer has passed and the retention window has aged out."""
    res = client.compact_journal(retention_seconds)
    emit(as_json, res, text=f"compacted {res['deleted']} events; oldest available cursor is {res['base']}")


@watch.command("status")
@client_command
def watch_status(client: AnvilClient, as_json: bool) -> None:
    """Journal head, oldest available cursor and consumer cursors."""
    res = client.watch_status()
    emit(as_json, res, table=(("field", "value"), [(k, v) for k, v in res.items() if k != "consumers"]))
