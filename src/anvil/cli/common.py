"""Options and output helpers shared by every client command."""

from __future__ import annotations

import functools
import importlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

import click

from anvil import DEFAULT_ENDPOINT

if TYPE_CHECKING:
    from rich.console import Console

# The SDK (anvil.client: httpx and the pydantic models of anvil.api_models, ~0.2 s to import) is
# imported by the commands that talk to a server, when they run: offline commands (fsck, restore,
# backup of a stopped store, verify) never load it.


class LazyConsole:
    """A rich `Console`, made (and rich imported, ~30 ms of CPU) on first use: a command that prints
    JSON, such as `anvil fsck --json`, never needs it. Attributes are the console's; `real` is the
    console itself, for rich objects that take one."""

    def __init__(self, **options: Any):
        self._options = options
        self._console: Console | None = None

    @property
    def real(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


console = LazyConsole()
err_console = LazyConsole(stderr=True)


class LazyGroup(click.Group):
    """A command group whose subcommands living in other modules are imported only when one of them
    is named, or when --help lists them all: `anvil fsck` does not import every other group's code.
    `lazy` maps a subcommand's name to "module:attribute"."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module, _, attribute = self.lazy[cmd_name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)


def loaded_sdk() -> Any:
    """anvil.client if a command has loaded it, else None: an error can be one of the SDK's only then
    (and checking must not import it)."""
    return sys.modules.get("anvil.client")


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


AUTH_HINT = ("authenticate with --client-id/--client-secret, ANVIL_CLIENT_ID/ANVIL_CLIENT_SECRET, or a profile "
             "saved by `anvil configure`")
ADMIN_HINT = ("admin commands need an admin credential: the first admin's is STORAGE_PATH/bootstrap/first-admin.json; "
              "pass --storage-path STORAGE_PATH, or export its client_id and client_secret as "
              "ANVIL_CLIENT_ID/ANVIL_CLIENT_SECRET")


def hint_for(err: BaseException, *, admin: bool = False, authenticated: bool = True) -> str | None:
    """How to fix a connection or authentication error, in one sentence (None: nothing to add)."""
    client = loaded_sdk()
    if client is None:
        return None
    if isinstance(err, client.Unreachable):
        return "is `anvil serve` running there? Set --endpoint or ANVIL_ENDPOINT (or the profile's endpoint)"
    if isinstance(err, client.AnvilAPIError):
        if err.code == "Unauthenticated":
            return AUTH_HINT if not authenticated else f"check the credentials: {AUTH_HINT}"
        if err.code == "PermissionDenied" and admin:
            return ADMIN_HINT
    return None


def describe_error(err: BaseException, *, admin: bool = False, authenticated: bool = True) -> str:
    """One line: what failed (naming the endpoint for connection errors) and how to fix it."""
    client = loaded_sdk()
    if client is not None and isinstance(err, client.Unreachable):
        text = f"cannot reach {err.endpoint}: {err.reason}"
    elif client is not None and isinstance(err, client.ConnectionError):
        text = f"the connection to {err.endpoint} failed: {err.reason}"
    elif client is not None and isinstance(err, client.AnvilAPIError):
        text = f"{err.code}: {err.message}"
    else:
        text = str(err)
    hint = hint_for(err, admin=admin, authenticated=authenticated)
    return f"{text}; {hint}" if hint else text


def _fail(as_json: bool, err: BaseException, code: str, *, admin: bool, authenticated: bool) -> None:
    from anvil.client import AnvilAPIError
    from anvil.client import ConnectionError as ClientConnectionError

    message = describe_error(err, admin=admin, authenticated=authenticated)
    if as_json:
        body: dict[str, Any] = {"code": code, "message": message, "status": None}
        if isinstance(err, AnvilAPIError):
            body.update(code=err.code, request_id=err.request_id, status=err.status)
        elif isinstance(err, ClientConnectionError):
            body["endpoint"] = err.endpoint
        click.echo(json.dumps({"error": body}))
    else:
        err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(1)


def _make_command(fn: Callable[..., Any], *, admin: bool) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(endpoint: str | None, profile: str | None, client_id: str | None, client_secret: str | None,
            as_json: bool, admin_storage_path: str | None = None, **kwargs: Any) -> None:
        from anvil.cli.profiles import ProfileError, resolve_credentials
        from anvil.client import AnvilAPIError, AnvilClient, InvalidEndpoint
        from anvil.client import ConnectionError as ClientConnectionError

        try:
            creds = resolve_credentials(endpoint=endpoint, profile=profile, client_id=client_id,
                                        client_secret=client_secret, storage_path=admin_storage_path)
            client = AnvilClient(creds.endpoint, client_id=creds.client_id, client_secret=creds.client_secret)
        except (ProfileError, InvalidEndpoint) as e:
            err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(2)
        authenticated = bool(creds.client_id)
        with client:
            try:
                fn(client, as_json, **kwargs)
            except AnvilAPIError as e:
                _fail(as_json, e, e.code, admin=admin, authenticated=authenticated)
            except ClientConnectionError as e:
                _fail(as_json, e, "ConnectionError", admin=admin, authenticated=authenticated)
            except OSError as e:  # local file errors: a message, not a traceback
                _fail(as_json, e, "LocalError", admin=admin, authenticated=authenticated)

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
        cells = [["" if c is None else str(c) for c in row] for row in rows]
        if not console.is_terminal:
            # Piped or redirected: plain aligned columns, never cut or wrapped, whatever the width
            # (ids and keys are what scripts grep and cut for).
            click.echo(plain_table(columns, cells), nl=False)
            return
        # On a terminal: the terminal's width; a cell too wide wraps onto more lines, never "…".
        from rich.table import Column, Table

        t = Table(*(Column(c, overflow="fold") for c in columns))
        for row in cells:
            t.add_row(*row)
        console.print(t)
    elif text is not None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    else:
        console.print_json(data=data, default=jsonable)


def jsonable(value: Any) -> Any:
    """json.dumps's `default` for SDK results (anvil.api_models.jsonable, imported when first needed:
    a result that is a model means the models are loaded already)."""
    from anvil.api_models import jsonable as to_json

    return to_json(value)


def plain_table(columns: Sequence[str], rows: list[list[str]]) -> str:
    """Columns separated by two spaces, each as wide as its widest cell; the last one unpadded."""
    widths = [max([len(c), *(len(r[i]) for r in rows if i < len(r))]) for i, c in enumerate(columns)]
    out = []
    for row in [list(columns), *rows]:
        out.append("  ".join(cell.ljust(widths[i]) if i < len(row) - 1 else cell
                             for i, cell in enumerate(row)).rstrip() + "\n")
    return "".join(out)


@contextmanager
def transfer_progress(enabled: bool, label: str, total: int | None) -> Iterator[Callable[[int], None] | None]:
    """A bytes / rate / ETA bar on stderr, yielding `advance(n)`; None (no bar) when disabled or when
    stderr is not a terminal, so pipes, logs and CI stay quiet."""
    if not enabled or not err_console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err_console.real, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


class CountingReader:
    """A file whose reads advance a progress bar."""

    def __init__(self, f: IO[bytes], advance: Callable[[int], None]):
        self._f, self._advance = f, advance

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._advance(len(data))
        return data


class CountingWriter:
    """A file whose writes advance a progress bar."""

    def __init__(self, f: IO[bytes], advance: Callable[[int], None]):
        self._f, self._advance = f, advance

    def write(self, data: bytes) -> int:
        n = self._f.write(data)
        self._advance(len(data))
        return n


def parse_meta(items: Sequence[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"metadata must be NAME=VALUE, got {item!r}")
        meta[name] = value
    return meta
