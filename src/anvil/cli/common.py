"""Options and output helpers shared by every client command."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click
import httpx
from rich.console import Console
from rich.table import Table

from anvil.client import AnvilAPIError, AnvilClient

console = Console()
err_console = Console(stderr=True)


def client_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --endpoint (or ANVIL_ENDPOINT) and --json, builds the client, maps API errors."""

    @click.option("--endpoint", envvar="ANVIL_ENDPOINT", default="http://127.0.0.1:9000", show_default=True,
                  help="Anvil endpoint URL (or ANVIL_ENDPOINT).")
    @click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
    @functools.wraps(fn)
    def run(endpoint: str, as_json: bool, **kwargs: Any) -> None:
        with AnvilClient(endpoint) as client:
            try:
                fn(client, as_json, **kwargs)
            except AnvilAPIError as e:
                if as_json:
                    click.echo(json.dumps({"error": {"code": e.code, "message": e.message,
                                                     "request_id": e.request_id, "status": e.status}}))
                else:
                    err_console.print(f"[red]error[/red] {e.code}: {e.message}")
                sys.exit(1)
            except (OSError, httpx.HTTPError) as e:
                # Unreachable endpoint, timeouts, local file errors: a message, not a traceback.
                if as_json:
                    click.echo(json.dumps({"error": {"code": "ConnectionError" if isinstance(e, httpx.HTTPError)
                                                     else "LocalError", "message": str(e), "status": None}}))
                else:
                    err_console.print(f"error: {e}", markup=False, highlight=False)
                sys.exit(1)

    return run


def emit(as_json: bool, data: Any, *, table: tuple[Sequence[str], list[Sequence[Any]]] | None = None,
         text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    if table is not None:
        columns, rows = table
        t = Table(*columns)
        for row in rows:
            t.add_row(*("" if c is None else str(c) for c in row))
        console.print(t)
    elif text is not None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    else:
        console.print_json(data=data)


def parse_meta(items: Sequence[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"metadata must be NAME=VALUE, got {item!r}")
        meta[name] = value
    return meta
