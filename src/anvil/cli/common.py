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

from anvil.api_models import jsonable
from anvil.cli.profiles import ProfileError, resolve_credentials
from anvil.client import DEFAULT_ENDPOINT, AnvilAPIError, AnvilClient

console = Console()
err_console = Console(stderr=True)


def _connection_options(fn: Callable[..., Any], *, admin: bool) -> Callable[..., Any]:
    options = [
        click.option("--endpoint", envvar="ANVIL_ENDPOINT", default=None,
                     help=f"Anvil endpoint URL (or ANVIL_ENDPOINT, the profile's, else {DEFAULT_ENDPOINT})."),
        click.option("--profile", envvar="ANVIL_PROFILE", default=None,
                     help="Credentials profile saved by `anvil configure` (or ANVIL_PROFILE; default: 'default')."),
        click.option("--client-id", envvar="ANVIL_CLIENT_ID", default=None, help="Application client id."),
        click.option("--client-secret", envvar="ANVIL_CLIENT_SECRET", default=None,
                     help="Application client secret (prefer ANVIL_CLIENT_SECRET or a profile)."),
        click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON."),
    ]
    if admin:
        options.append(click.option(
            "--storage-path", "admin_storage_path", default=None, type=click.Path(file_okay=False),
            help="Use the server's first admin credential (STORAGE_PATH/bootstrap/first-admin.json)."))
    for option in reversed(options):
        fn = option(fn)
    return fn


def _make_command(fn: Callable[..., Any], *, admin: bool) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(endpoint: str | None, profile: str | None, client_id: str | None, client_secret: str | None,
            as_json: bool, admin_storage_path: str | None = None, **kwargs: Any) -> None:
        try:
            creds = resolve_credentials(endpoint=endpoint, profile=profile, client_id=client_id,
                                        client_secret=client_secret, storage_path=admin_storage_path)
        except ProfileError as e:
            err_console.print(f"[red]error[/red] {e}")
            sys.exit(2)
        with AnvilClient(creds.endpoint, client_id=creds.client_id, client_secret=creds.client_secret) as client:
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

    return _connection_options(run, admin=admin)


def client_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --endpoint, --profile, --client-id/--client-secret (ANVIL_* env) and --json; builds an
    authenticated client; maps API errors."""
    return _make_command(fn, admin=False)


def admin_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A client command that can also take the first admin's credential from --storage-path."""
    return _make_command(fn, admin=True)


def emit(as_json: bool, data: Any, *, table: tuple[Sequence[str], list[Sequence[Any]]] | None = None,
         text: str | None = None) -> None:
    if as_json:
        # SDK results are models (anvil.api_models): `jsonable` prints them as the JSON the server sent.
        click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=jsonable))
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
        console.print_json(data=data, default=jsonable)


def parse_meta(items: Sequence[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"metadata must be NAME=VALUE, got {item!r}")
        meta[name] = value
    return meta
