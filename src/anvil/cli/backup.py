"""`anvil backup ...`, `anvil restore`, `anvil recovery ...` and `anvil drill`."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from anvil.cli.common import LazyConsole, describe_error, emit, loaded_sdk

# Messages name paths, chunk ids and objects: never wrap them across lines. Made on first use: an
# online `backup create --json` prints no rich text (rich's import was ~0.02 s of its ~0.1 s of CPU).
console = LazyConsole(soft_wrap=True)
err_console = LazyConsole(stderr=True, soft_wrap=True)


def _ts(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# backup.pack.PACK_TARGET (a test checks they agree): importing pack here loaded zstandard and
# cryptography into every `anvil backup` command, the online create included.
PACK_TARGET = 16 * 1024 * 1024

# How `engine.verify` words a pack that no readable index names (an orphan).
ORPHAN_WARNING = "is not referenced by any readable index"


def fail(as_json: bool, message: str, code: int = 1, extra: dict[str, Any] | None = None) -> None:
    if as_json:
        click.echo(json.dumps({"error": {"message": message, **(extra or {})}}, indent=2))
    else:
        click.echo(f"error: {message}", err=True)  # never wrapped: scripts and people grep it
    sys.exit(code)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Backup and storage errors become one clear line (or JSON) and exit status 1."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from anvil.backup.errors import BackupError
        from anvil.errors import AnvilError

        as_json = kwargs.get("as_json", False)
        try:
            return fn(*args, **kwargs)
        except BackupError as e:
            fail(as_json, str(e))
        except AnvilError as e:
            fail(as_json, f"{e.code}: {e.message}")
        except Exception as e:  # noqa: BLE001 - the SDK's errors (loaded by online commands only) or OSError
            client = loaded_sdk()
            if client is not None and isinstance(e, client.AnvilAPIError):
                fail(as_json, describe_error(e, admin=True))
            # The SDK's connection errors are OSErrors too: describe_error names the endpoint and the fix.
            if client is not None and isinstance(e, (client.ConnectionError, client.InvalidEndpoint)):
                fail(as_json, describe_error(e))
            if isinstance(e, OSError):
                fail(as_json, str(e))
            raise

    return run


LOCK_STALE_ENV = "ANVIL_BACKUP_LOCK_STALE"
ORPHAN_GRACE_ENV = "ANVIL_BACKUP_ORPHAN_GRACE"


def lock_stale_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--lock-stale", envvar=LOCK_STALE_ENV, default=None, metavar="DURATION",
                        help="Take over repository locks with no heartbeat for this long (600, 90s, 15m, 1h; "
                             "or ANVIL_BACKUP_LOCK_STALE; default 30m).")(fn)


def orphan_grace_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--orphan-grace", envvar=ORPHAN_GRACE_ENV, default=None, metavar="DURATION",
                        help="Remove packs no index names only once older than this (or "
                             "ANVIL_BACKUP_ORPHAN_GRACE; default 30m).")(fn)


def apply_thresholds(lock_stale: str | None = None, orphan_grace: str | None = None) -> None:
    """Hand the options to the backup engine, which reads its thresholds from these variables at the
    moment it needs them; a malformed value is refused here, before any work, naming the option."""
    from anvil.backup.errors import BackupError
    from anvil.backup.repository import env_seconds

    for option, env, value in (("--lock-stale", LOCK_STALE_ENV, lock_stale),
                               ("--orphan-grace", ORPHAN_GRACE_ENV, orphan_grace)):
        if value is None:
            continue
        os.environ[env] = value
        try:
            env_seconds(env, 0)
        except BackupError:
            raise BackupError(f"{option} must be a finite duration like 600, 90s, 15m or 1h, got {value!r}") from None


def _given_on_command_line(*names: str) -> list[str]:
    ctx = click.get_current_context()
    return [n for n in names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]


def _orphans_text(orphans: dict[str, Any] | None) -> str:
    """The orphan-pack part of a create or prune report (`stats.orphans` / `prune.orphans` in JSON)."""
    if not orphans:
        return ""
    if orphans.get("skipped"):
        return f"; orphan packs not checked ({orphans['skipped']})"
    text = f"; removed {orphans.get('packs', 0)} orphan pack(s) ({_size(orphans.get('bytes', 0))})"
    if orphans.get("kept"):
        text += f", kept {orphans['kept']} younger than the grace period"
    return text


def repo_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(fn)
    fn = click.option("--key-file", default=None, type=click.Path(dir_okay=False),
                      help="File holding the passphrase (else ANVIL_BACKUP_PASSPHRASE).")(fn)
    fn = click.option("--s3-endpoint", envvar="ANVIL_BACKUP_S3_ENDPOINT", default=None,
                      help="S3 endpoint URL for s3:// repositories (credentials: AWS_ACCESS_KEY_ID/...).")(fn)
    fn = click.option("--repo", envvar="ANVIL_BACKUP_REPO", required=True,
                      help="file:///path or s3://bucket/prefix (or ANVIL_BACKUP_REPO).")(fn)
    return fn


def _open(repo: str, key_file: str | None, s3_endpoint: str | None, storage_path: str | None = None):
    from anvil.backup.ops import open_repo

    return open_repo(repo, key_file=key_file, s3_endpoint=s3_endpoint, storage_path=storage_path)


@contextmanager
def progress_bar(enabled: bool, label: str) -> Iterator[Callable[[int, int, str], None] | None]:
    """Bytes, rate and ETA on stderr; nothing when stderr is not a terminal (logs, pipes, CI)."""
    if not enabled or not err_console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                  console=err_console.real, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextmanager
def server_progress(endpoint: str, label: str) -> Iterator[None]:
    """A progress bar fed by the server's `backup.running` (in /anvil/health/ready, polled twice a
    second) while this process waits for its answer; a spinner until the server knows the total."""
    import threading
    import urllib.request

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    stop = threading.Event()
    with Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                  console=err_console.real, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def poll() -> None:
            # The stdlib, not httpx: the command starts faster without it.
            while not stop.wait(0.5):
                try:
                    with urllib.request.urlopen(endpoint.rstrip("/") + "/anvil/health/ready", timeout=5) as resp:
                        running = json.loads(resp.read()).get("backup", {}).get("running")
                except (OSError, ValueError, AttributeError):
                    continue  # the answer to the backup itself says what went wrong
                if running and running.get("bytes_total"):
                    bar.update(task, completed=running["bytes_done"], total=running["bytes_total"])

        poller = threading.Thread(target=poll, name="anvil-backup-progress", daemon=True)
        poller.start()
        try:
            yield
        finally:
            stop.set()
            poller.join(timeout=2)


# ------------------------------------------------------------------ anvil backup


@click.group()
def backup() -> None:
    """Encrypted, deduplicated backups of a STORAGE_PATH (see docs/backup.md)."""


@backup.command("init")
@repo_options
@click.option("--storage-path", envvar="STORAGE_PATH", default=None,
              help="Refuse the repository if it lies inside this STORAGE_PATH.")
@click.option("--pack-size", type=click.IntRange(min=64 * 1024, max=256 * 1024 * 1024), default=PACK_TARGET,
              show_default=True, help="Target pack file size in bytes.")
@handles_errors
def backup_init(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool,
                storage_path: str | None, pack_size: int) -> None:
    """Create a new, empty repository."""
    from anvil.backup.backends import open_backend
    from anvil.backup.crypto import read_passphrase
    from anvil.backup.repository import Repository

    backend = open_backend(repo, s3_endpoint=s3_endpoint, storage_path=storage_path)
    r = Repository.init(backend, read_passphrase(key_file), pack_target=pack_size)
    emit(as_json, {"repository": backend.url, "repo_id": r.repo_id, "key_id": r.key_id,
                   "format_version": r.config["format_version"]},
         text=f"initialised repository {backend.url} (id {r.repo_id}, key {r.key_id})")


@backup.command("create")
@repo_options
@click.option("--storage-path", default=None, help="Back up a stopped STORAGE_PATH directly (offline).")
@click.option("--endpoint", default=None, help="Back up the running server at this URL (online, consistent).")
@click.option("--tag", default=None, help="A label stored in the snapshot.")
@click.option("--escrow-secrets/--no-escrow-secrets", default=None,
              help="Store (or not) STORAGE_PATH/secrets/ key material, encrypted, so a restore can decrypt "
                   "application secrets. Default: escrowed in development mode (the keys exist nowhere else), "
                   "not in production. Key ids are always recorded. See docs/backup.md.")
@click.option("--incremental", is_flag=True,
              help="A journal delta: only the events (and new blobs) since the newest snapshot; restored as "
                   "that snapshot's base rolled forward. Costs what changed, not the store's size.")
@lock_stale_option
@orphan_grace_option
@handles_errors
def backup_create(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool,
                  storage_path: str | None, endpoint: str | None, tag: str | None, escrow_secrets: bool | None,
                  incremental: bool, lock_stale: str | None, orphan_grace: str | None) -> None:
    """Take a snapshot: offline (--storage-path) or through a running server (--endpoint)."""
    from anvil.backup.errors import BackupError
    from anvil.backup.passphrase import read_passphrase

    if bool(storage_path) == bool(endpoint):
        raise BackupError("give exactly one of --storage-path (offline) or --endpoint (online)")
    started = time.time()
    if endpoint:
        # A stdlib client (`cli.lite`): the SDK (httpx, pydantic, the API models) cost this command
        # more CPU than a no-change snapshot costs the server. Errors are raised as the SDK's.
        from anvil.cli.lite import LiteClient

        given = _given_on_command_line("lock_stale", "orphan_grace")
        if given:
            # The server takes the snapshot, with its own ANVIL_BACKUP_* settings.
            raise BackupError(f"--{given[0].replace('_', '-')} applies to offline backups (--storage-path); "
                              "a server uses its own ANVIL_BACKUP_LOCK_STALE / ANVIL_BACKUP_ORPHAN_GRACE")
        client = LiteClient(endpoint, timeout=3600)
        body: dict[str, Any] = {"repo": repo, "passphrase": read_passphrase(key_file)}
        for name, value in (("s3_endpoint", s3_endpoint), ("tag", tag)):
            if value:
                body[name] = value
        if escrow_secrets is not None:
            body["escrow_secrets"] = escrow_secrets
        if incremental:
            body["incremental"] = True
        try:
            if not as_json:
                with server_progress(endpoint, "server backing up"):
                    result = client.post("/anvil/v1/admin/backup", body)
            else:
                result = client.post("/anvil/v1/admin/backup", body)
        except OSError as e:
            sdk = loaded_sdk()  # loaded by the lite client to raise its error
            if sdk is not None and isinstance(e, sdk.Unreachable):
                raise BackupError(describe_error(e)) from None
            if sdk is not None and isinstance(e, sdk.ConnectionError):
                # The server died or dropped us mid-snapshot: no traceback, one line saying what is known.
                raise BackupError(f"server at {endpoint} closed the connection during backup create "
                                  f"({e.reason or 'no detail'}); the snapshot may not have been "
                                  "written: check the server, then `anvil backup list`") from None
            raise
    else:
        apply_thresholds(lock_stale, orphan_grace)
        from anvil.backup import engine, ops
        from anvil.runtime import Anvil

        if not (Path(storage_path) / "FORMAT").exists():  # type: ignore[arg-type]
            raise BackupError(f"{storage_path} is not an Anvil storage path (no FORMAT)")
        r = _open(repo, key_file, s3_endpoint, storage_path)
        anvil = Anvil(storage_path)  # takes the lock: refuses a path a server is using
        try:
            with progress_bar(not as_json, "backing up") as prog:
                manifest = ops.backup_storage(anvil.storage, anvil.participants(), r, progress=prog, tag=tag,
                                              run_mode="offline", escrow_secrets=escrow_secrets,
                                              incremental=incremental)
        finally:
            anvil.close()
        result = {**engine.snapshot_row(manifest), "stats": manifest["stats"], "problems": manifest["problems"]}
    result["wall_seconds"] = round(time.time() - started, 3)
    st = result["stats"]
    if result.get("kind") == "delta":
        text = (f"journal delta {result['id']} at journal seq {result['journal_seq']} on base {result['base']}: "
                f"{st.get('events', 0)} events, new {_size(st['new_bytes'])}, {st['duration']:.2f}s")
    else:
        text = (f"snapshot {result['id']} at journal seq {result['journal_seq']}: logical "
                f"{_size(st['logical_bytes'])}, new {_size(st['new_bytes'])}, {st['blobs']} blobs "
                f"({st['blobs_reused_from_parent']} unchanged), {st['duration']:.2f}s"
                + _orphans_text(st.get("orphans")))
    emit(as_json, result, text=text)
    warn_default_escrow(result)
    if result["problems"]:
        for p in result["problems"]:
            err_console.print(f"[yellow]problem[/yellow] {p}", highlight=False)
        sys.exit(1)


def warn_default_escrow(result: dict[str, Any]) -> None:
    """Say loudly (on stderr, also with --json) that key material went into the snapshot by default."""
    policy = str(result.get("escrow_policy", ""))
    if result.get("secrets_escrowed") and policy.startswith("default"):
        banner = "!" * 78
        # Plain text (no markup to render): without rich's console, whose import was a fifth of the
        # CPU of an online `backup create` in development mode.
        click.echo(f"{banner}\nWARNING: this snapshot ESCROWS key material ({policy[len('default: '):]}).\n"
                   "Whoever holds the repository passphrase can decrypt every application secret. "
                   "Pass --no-escrow-secrets to leave the keys out (then supply them at restore), "
                   f"and use production mode with keys in the environment for real deployments.\n{banner}",
                   err=True)


@backup.command("status")
@click.option("--repo", envvar="ANVIL_BACKUP_REPO", default=None,
              help="Also (or only) show what this repository holds: snapshots and archived journal ranges.")
@click.option("--endpoint", envvar="ANVIL_ENDPOINT", default=None,
              help="The running server whose continuous archiving to show (cursor, lag, last error).")
@click.option("--flush", is_flag=True, help="Ask the server to ship everything up to its head now.")
@click.option("--key-file", default=None, type=click.Path(dir_okay=False))
@click.option("--s3-endpoint", envvar="ANVIL_BACKUP_S3_ENDPOINT", default=None)
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def backup_status(repo: str | None, endpoint: str | None, flush: bool, key_file: str | None,
                  s3_endpoint: str | None, as_json: bool) -> None:
    """Continuous archiving of a server (--endpoint) and the archive a repository holds (--repo)."""
    from anvil.backup.errors import BackupError
    from anvil.backup.pitr import iso

    if not repo and not endpoint:
        raise BackupError("give --endpoint (a running server) and/or --repo (a repository)")
    out: dict[str, Any] = {}
    if endpoint:
        from anvil.client import AnvilClient, Unreachable

        with AnvilClient(endpoint, timeout=600) as client:
            try:
                out["server"] = (client._json("POST", "/anvil/v1/admin/archive/flush", json={}) if flush
                                 else client._json("GET", "/anvil/v1/admin/archive"))
            except Unreachable as e:
                raise BackupError(describe_error(e)) from None
    if repo:
        from anvil.backup import engine
        from anvil.backup.archive import archive_summary

        r = _open(repo, key_file, s3_endpoint)
        out["repository"] = {"url": r.backend.url, "format_version": r.config["format_version"],
                             "snapshots": [engine.snapshot_row(m) for m in r.snapshot_rows()],
                             "archive": archive_summary(r)}
    if as_json:
        emit(True, out)
        return
    s = out.get("server")
    if s is not None:
        if not s.get("enabled"):
            console.print("server: continuous archiving is off (anvil serve --archive-repo URL)", highlight=False)
        else:
            state = "[green]ok[/green]" if s.get("ok") else "[red]failing[/red]"
            console.print(f"server: archiving to {s['repository']} every {s['interval_seconds']:g}s: {state}")
            console.print(f"  archived seq {s['archived_seq']} of head {s['head_seq']}: lag {s['lag_events']} "
                          f"events, {s['lag_seconds']:.1f}s; {s['segments_written']} segments written",
                          highlight=False)
            if s.get("last_error"):
                console.print(f"  last error ({iso(s['last_error_at'])}): {s['last_error']}", highlight=False,
                              markup=False)
            if s.get("gap"):
                console.print(f"  [red]gap[/red] {s['gap']}", highlight=False)
    rep = out.get("repository")
    if rep is not None:
        console.print(f"repository {rep['url']} (format {rep['format_version']}): {len(rep['snapshots'])} "
                      "snapshots", highlight=False)
        for a in rep["archive"] or [{}]:
            if not a:
                console.print("  no archived journal", highlight=False)
                continue
            console.print(f"  archive of deployment {a['deployment_id']}: seq {a['first_seq']}..{a['last_seq']} "
                          f"({iso(a['first_ts'])} .. {iso(a['last_ts'])}), {a['segments']} segments"
                          + (f"; GAPS {', '.join(a['gaps'])}" if a["gaps"] else ""), highlight=False)


@backup.command("list")
@repo_options
@handles_errors
def backup_list(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool) -> None:
    """List snapshots, oldest first."""
    from anvil.backup import engine

    # A damaged snapshot must not hide the others: listing is how an operator finds one to restore.
    # The readable ones are listed, each damaged one named on stderr, and the exit status is 1.
    damaged: list[tuple[str, str]] = []
    rows = [engine.snapshot_row(m) for m in _open(repo, key_file, s3_endpoint).snapshot_rows(damaged=damaged)]
    emit(as_json, rows, table=(("id", "time", "kind", "journal seq", "logical", "new", "tag"),
                               [(r["id"], _ts(r["time"]), r["kind"], r["journal_seq"], _size(r["logical_bytes"]),
                                 _size(r["new_bytes"]), r["tag"] or "") for r in rows]))
    if damaged:
        for _sid, problem in damaged:
            click.echo(f"error: {problem}; run `anvil backup verify` for the whole report", err=True)
        sys.exit(1)


@backup.command("inspect")
@repo_options
@click.argument("snapshot", default="latest")
@handles_errors
def backup_inspect(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool, snapshot: str) -> None:
    """Show a snapshot's manifest and the backup coverage checklist."""
    from anvil.backup import engine

    m = _open(repo, key_file, s3_endpoint).resolve_snapshot(snapshot)
    rows = engine.inspect_rows(m)
    if as_json:
        out = {k: v for k, v in m.items() if k != "tree"}
        out["checklist"] = rows
        out["tree"] = {"files": list(m["tree"]["files"]), "blobs": len(m["tree"]["blobs"])}
        emit(True, out)
        return
    import textwrap

    c = m["consistency"]
    header = [("snapshot", f"{m['id']} ({m.get('kind') or 'full'}, parent {m['parent']})"),
              ("taken", f"{_ts(m['started'])} UTC"), ("deployment", str(m["deployment_id"])),
              ("journal", f"seq {c['journal_seq']}, hash {c['journal_hash'][:16]}…"), ("method", c["method"]),
              ("versions", f"anvil {m['anvil_version']}, repository format {m['repository_format']}, storage "
                           f"format {m['storage_format']}"),
              ("key", str(m["key_ids"].get("repository_key")))]
    for label, value in header:
        for i, line in enumerate(textwrap.wrap(value, 68) or [""]):
            console.print(f"{label if i == 0 else '':<11} {line}", highlight=False, markup=False)
    if m.get("kind") == "delta":
        console.print(f"journal delta on base {m['base']}: {m['stats'].get('events', 0)} events archived;\n"
                      "restored as its base rolled forward to this seq", highlight=False)

    # One row per checklist item (who covers it), then one row per participant (its figures): a
    # participant covering three items is not repeated three times, and both fit 80 columns.
    from rich.table import Table

    cov = Table(title="coverage checklist", title_justify="left", expand=False)
    cov.add_column("item", overflow="fold", max_width=42)
    cov.add_column("participants", overflow="fold", max_width=30)
    for item in m["coverage"]:
        cov.add_row(item["label"], ", ".join(item["participants"]) or "not present in this deployment")
    console.print(cov)
    parts = Table(title="participant summaries", title_justify="left", expand=False)
    parts.add_column("participant", max_width=14)
    parts.add_column("counts / digests", overflow="fold", max_width=60)
    for name, entry in m["participants"].items():
        parts.add_row(name, _brief(entry.get("summary", {})))
    console.print(parts)


def _brief(summary: Any, limit: int = 6) -> str:
    """The scalar figures of a summary, shortest first: what fits a line; digests cut to 12."""
    if isinstance(summary, str):
        return summary
    scalars = [(k, v) for k, v in summary.items() if isinstance(v, int | float | str | bool) or v is None]
    scalars.sort(key=lambda kv: (not isinstance(kv[1], int | float) or isinstance(kv[1], bool), len(str(kv[1]))))
    text = ", ".join(f"{k}={str(v)[:12]}" for k, v in scalars[:limit])
    return text + (f" (+{len(scalars) - limit} more in --json)" if len(scalars) > limit else "")


@backup.command("verify")
@repo_options
@click.option("--read-data", is_flag=True, help="Download, decrypt and re-hash every chunk.")
@lock_stale_option
@orphan_grace_option
@handles_errors
def backup_verify(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool, read_data: bool,
                  lock_stale: str | None, orphan_grace: str | None) -> None:
    """Check the repository's structure (and with --read-data every byte); exit 1 on any problem."""
    from anvil.backup import engine

    apply_thresholds(lock_stale, orphan_grace)
    r = _open(repo, key_file, s3_endpoint)
    with progress_bar(not as_json and read_data, "reading packs") as prog:
        result = engine.verify(r, read_data=read_data, progress=prog)
    if as_json:
        emit(True, result)
    else:
        console.print(f"{result['snapshots']} snapshots, {result['packs']} packs, {result['chunks']} chunks"
                      + (f", {result['chunks_read']} chunks read and re-hashed" if read_data else ""), highlight=False)
        orphans = [w for w in result["warnings"] if ORPHAN_WARNING in w]
        console.print(f"{len(orphans)} orphan pack(s) found (in no readable index; removed by the next "
                      f"`backup create` or `forget --prune` once older than {engine.orphan_grace():g}s)"
                      if orphans else "no orphan packs found", highlight=False)
        for w in result["warnings"]:
            console.print(f"[yellow]warning[/yellow] {w}", highlight=False)
        for e in result["errors"]:
            console.print(f"[red]error[/red] {e['what']}: {e['problem']}", highlight=False)
            for a in e.get("affects", []):
                console.print(f"    affects {a}", highlight=False, markup=False)
        console.print("[green]no errors found[/green]" if result["ok"] else
                      f"[red]{len(result['errors'])} errors[/red]")
    if not result["ok"]:
        sys.exit(1)


@backup.command("forget")
@repo_options
@click.option("--keep-last", type=click.IntRange(min=0), default=0)
@click.option("--keep-daily", type=click.IntRange(min=0), default=0)
@click.option("--keep-weekly", type=click.IntRange(min=0), default=0)
@click.option("--prune", is_flag=True, help="Also delete data no remaining snapshot uses.")
@lock_stale_option
@orphan_grace_option
@handles_errors
def backup_forget(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool, keep_last: int,
                  keep_daily: int, keep_weekly: int, prune: bool, lock_stale: str | None,
                  orphan_grace: str | None) -> None:
    """Remove snapshots outside the retention policy (and with --prune, their unused data)."""
    from anvil.backup import engine

    apply_thresholds(lock_stale, orphan_grace)
    res = engine.forget(_open(repo, key_file, s3_endpoint), keep_last=keep_last, keep_daily=keep_daily,
                        keep_weekly=keep_weekly, prune=prune)
    text = f"kept {len(res['kept'])}, removed {len(res['removed'])} snapshots"
    if prune:
        p = res["prune"]
        text += (f"; pruned {p['packs_deleted']} packs, repacked {p['packs_repacked']}, "
                 f"freed {_size(p['bytes_freed'])}" + _orphans_text(p.get("orphans")))
    emit(as_json, res, text=text)


@backup.command("unlock")
@repo_options
@handles_errors
def backup_unlock(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool) -> None:
    """Remove every lock (only when no backup, restore, verify or prune is running)."""
    removed = _open(repo, key_file, s3_endpoint).unlock()
    emit(as_json, {"removed": removed}, text=f"removed {len(removed)} locks")


@backup.group("key")
def key() -> None:
    """Add, remove or change passphrases (the data is never re-encrypted)."""


def _new_passphrase(new_key_file: str | None) -> str:
    from anvil.backup.crypto import read_passphrase

    return read_passphrase(new_key_file, env="ANVIL_BACKUP_NEW_PASSPHRASE")


@key.command("list")
@repo_options
@handles_errors
def key_list(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool) -> None:
    """List the repository's key ids (passphrases that open it)."""
    r = _open(repo, key_file, s3_endpoint)
    ids = r.key_ids()
    emit(as_json, {"keys": ids, "current": r.key_id},
         table=(("key id", "current"), [(k, "yes" if k == r.key_id else "") for k in ids]))


@key.command("add")
@repo_options
@click.option("--new-key-file", default=None, help="New passphrase file (else ANVIL_BACKUP_NEW_PASSPHRASE).")
@handles_errors
def key_add(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool, new_key_file: str | None) -> None:
    """Add a passphrase to the repository (the new one from --new-key-file or ANVIL_BACKUP_NEW_PASSPHRASE)."""
    r = _open(repo, key_file, s3_endpoint)
    kid = r.add_key(_new_passphrase(new_key_file))
    emit(as_json, {"added": kid}, text=f"added key {kid}")


@key.command("remove")
@repo_options
@click.argument("key_id")
@handles_errors
def key_remove(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool, key_id: str) -> None:
    """Remove passphrase KEY_ID from the repository (the last one cannot be removed)."""
    r = _open(repo, key_file, s3_endpoint)
    r.remove_key(key_id)
    emit(as_json, {"removed": key_id}, text=f"removed key {key_id}")


@key.command("passwd")
@repo_options
@click.option("--new-key-file", default=None, help="New passphrase file (else ANVIL_BACKUP_NEW_PASSPHRASE).")
@handles_errors
def key_passwd(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool,
               new_key_file: str | None) -> None:
    """Replace the key the current passphrase opens with one for a new passphrase."""
    r = _open(repo, key_file, s3_endpoint)
    kid = r.add_key(_new_passphrase(new_key_file))
    r.remove_key(r.key_id)
    emit(as_json, {"added": kid, "removed": r.key_id}, text=f"changed passphrase: key {r.key_id} -> {kid}")


@backup.command("get")
@repo_options
@click.option("--snapshot", default="latest")
@click.option("--version", "version_id", default=None, help="A version id (default: the latest version).")
@click.option("-o", "--output", default="-", help="Write here instead of stdout.")
@click.argument("bucket_name")
@click.argument("object_key")
@handles_errors
def backup_get(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool, snapshot: str,
               version_id: str | None, output: str, bucket_name: str, object_key: str) -> None:
    """Pull one object version out of a snapshot without restoring anything else."""
    from anvil.backup.restore import get_object

    r = _open(repo, key_file, s3_endpoint)
    from anvil.participants import recovery_participants

    info, body = get_object(r, r.resolve_snapshot(snapshot), recovery_participants(), bucket_name, object_key,
                            version_id)
    if output == "-":
        sys.stdout.buffer.write(body)
        sys.stdout.buffer.flush()
    else:
        Path(output).write_bytes(body)
        emit(as_json, info, text=f"wrote {info['size']} bytes of {bucket_name}/{object_key} "
                                 f"version {info['version_id']} to {output}")


# ------------------------------------------------------------------ anvil restore


@click.command("restore")
@repo_options
@click.option("--snapshot", default="latest", show_default=True)
@click.option("--target", required=True, type=click.Path(file_okay=False), help="The STORAGE_PATH to write.")
@click.option("--bucket", "buckets", multiple=True, help="Restore only this bucket (repeatable).")
@click.option("--force", is_flag=True, help="Restore into a non-empty target.")
@click.option("--to-time", default=None, metavar="TIME",
              help="Point in time (ISO 8601, e.g. 2026-12-01T10:15:00Z, or unix seconds): the newest snapshot "
                   "before it, then the archived journal up to it.")
@click.option("--to-seq", type=int, default=None, metavar="N",
              help="Point in time as a journal sequence number (the last event to include).")
@click.option("--records", default=None, metavar="URL",
              help="Load the records into this empty, migrated PostgreSQL store (postgresql://...) instead of "
                   "catalog.db; --target is then the node's STORAGE_PATH (blobs, secrets, FORMAT).")
@lock_stale_option
@handles_errors
def restore_cmd(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool, snapshot: str,
                target: str, buckets: tuple[str, ...], force: bool, to_time: str | None, to_seq: int | None,
                lock_stale: str | None, records: str | None = None) -> None:
    """Restore a snapshot (or a point in time) into a STORAGE_PATH that then starts in recovery mode."""
    apply_thresholds(lock_stale)
    if records is None:
        _restore(repo, s3_endpoint, key_file, as_json, snapshot, target, buckets, force, to_time, to_seq)
        return
    from anvil.backup.pgcapture import restore_into_records
    from anvil.cli.records import check_records_url
    from anvil.participants import recovery_participants

    try:
        check_records_url(records)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    # The catalog the restore writes into --target moves into PostgreSQL afterwards (backup.pgcapture);
    # every message below names the validation to run, with --records.
    def run() -> dict[str, Any]:
        return _restore(repo, s3_endpoint, key_file, as_json, snapshot, target, buckets, force, to_time, to_seq,
                        report=False)

    res = restore_into_records(records, Path(target), recovery_participants(), run)
    from anvil.storage.pg import redact_url

    url = redact_url(records)
    loaded = res["records_loaded"]
    text = (f"restored snapshot {res['snapshot']} into {res['target']} and its records ({loaded['rows']} rows, "
            f"journal seq {loaded['journal_seq']}) into {url}; the node starts in RECOVERY MODE — run "
            f"`anvil recovery validate --storage-path {res['target']} --records URL` then `anvil recovery resume`")
    _report_restore(as_json, res, text)


def _open_while_importing(repo: str, key_file: str | None, s3_endpoint: str | None):
    """`_open` for a restore: the passphrase's key derivation (argon2id, ~0.1 s of native work that
    releases the GIL) runs on a thread while this one imports the restore and the participants (~0.2 s
    of Python), instead of one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    import argon2.low_level  # noqa: F401 - imported here, not by the thread: one importer at a time

    from anvil.backup.backends import open_backend
    from anvil.backup.passphrase import read_passphrase
    from anvil.backup.repository import Repository

    backend = open_backend(repo, s3_endpoint=s3_endpoint)
    passphrase = read_passphrase(key_file)
    with ThreadPoolExecutor(1, thread_name_prefix="anvil-open-repo") as ex:
        opening = ex.submit(Repository.open, backend, passphrase)
        import anvil.backup.restore
        import anvil.participants  # noqa: F401 - recovery_participants, next (not anvil.runtime: no service)
        return opening.result()


def _report_restore(as_json: bool, res: dict[str, Any], text: str) -> None:
    emit(as_json, res, text=text)
    for w in (res.get("point_in_time") or {}).get("warnings", []):
        err_console.print(f"[yellow]warning[/yellow] {w}", highlight=False)
    if not res["ok"]:
        for p in res["problems"]:
            err_console.print(f"[red]problem[/red] {p}", highlight=False)
        sys.exit(1)


def _restore(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool, snapshot: str,
             target: str, buckets: tuple[str, ...], force: bool, to_time: str | None, to_seq: int | None, *,
             report: bool = True) -> dict[str, Any]:
    """The embedded restore (`report`: print the outcome and exit 1 on problems, else return it)."""
    from anvil.backup.errors import BackupError
    from anvil.backup.restore import restore
    from anvil.participants import recovery_participants

    if to_time is not None or to_seq is not None:
        from anvil.backup.pitr import iso, parse_time, restore_to_point

        if to_time is not None and to_seq is not None:
            raise BackupError("give one of --to-time or --to-seq, not both")
        if buckets or _given_on_command_line("snapshot"):
            raise BackupError("a point-in-time restore picks its snapshot itself and restores every bucket: "
                              "--snapshot and --bucket do not apply with --to-time/--to-seq")
        when = parse_time(to_time) if to_time is not None else None
        r = _open(repo, key_file, s3_endpoint)
        with progress_bar(not as_json, "restoring") as prog:
            res = restore_to_point(r, Path(target), recovery_participants(), to_seq=to_seq, to_time=when,
                                   force=force, progress=prog)
        pit = res["point_in_time"]
        text = (f"restored snapshot {res['snapshot']} (journal seq {pit['snapshot_seq']}) and replayed "
                f"{pit['events_replayed']} archived events up to seq {pit['head_seq']}"
                + (f" ({iso(pit['head_ts'])})" if pit["head_ts"] else "")
                + f" into {res['target']} in {res['duration']:.2f}s; the path starts in RECOVERY MODE — run "
                f"`anvil recovery validate --storage-path {res['target']}` then `anvil recovery resume`")
        if report:
            _report_restore(as_json, res, text)
        return res
    r = _open_while_importing(repo, key_file, s3_endpoint)
    manifest = r.resolve_snapshot(snapshot)
    if manifest.get("kind") == "delta":
        from anvil.backup.pitr import restore_any

        if buckets:
            raise BackupError(f"snapshot {manifest['id']} is a journal delta: --bucket restores need a full snapshot")
        with progress_bar(not as_json, "restoring") as prog:
            res = restore_any(r, manifest, Path(target), recovery_participants(), force=force, progress=prog)
        if report:
            _report_restore(as_json, res, f"restored journal delta {res['snapshot']} (base {res['base']} + "
                            f"{res['point_in_time']['events_replayed']} events) into {res['target']} in "
                            f"{res['duration']:.2f}s; the path starts in RECOVERY MODE — run `anvil recovery "
                            f"validate --storage-path {res['target']}` then `anvil recovery resume`")
        return res
    with progress_bar(not as_json, "restoring") as prog:
        res = restore(r, manifest, Path(target), recovery_participants(), buckets=list(buckets) or None,
                      force=force, progress=prog)
    text = (f"restored snapshot {res['snapshot']} into {res['target']}: {res['blobs_restored']} blobs "
            f"({_size(res['bytes'])}) in {res['duration']:.2f}s; the path starts in RECOVERY MODE — run "
            f"`anvil recovery validate --storage-path {res['target']}` then `anvil recovery resume`")
    if report:
        _report_restore(as_json, res, text)
    return res


# ------------------------------------------------------------------ anvil recovery


@click.group()
def recovery() -> None:
    """Recovery mode of a restored STORAGE_PATH: status, validate, resume."""


def _storage_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--json", "as_json", is_flag=True)(fn)
    return click.option("--storage-path", envvar="STORAGE_PATH", required=True,
                        help="The restored STORAGE_PATH (the server must be stopped).")(fn)


def _path_or_endpoint(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--json", "as_json", is_flag=True)(fn)
    fn = click.option("--endpoint", default=None,
                      help="A running server (admin credential: ANVIL_CLIENT_ID/ANVIL_CLIENT_SECRET).")(fn)
    return click.option("--storage-path", default=None,
                        help="The restored STORAGE_PATH (the server must be stopped); or STORAGE_PATH.")(fn)


def _one_of(storage_path: str | None, endpoint: str | None) -> tuple[str | None, str | None]:
    from anvil.backup.errors import BackupError

    if not storage_path and not endpoint:
        storage_path = os.environ.get("STORAGE_PATH") or None
    if bool(storage_path) == bool(endpoint):
        raise BackupError("give exactly one of --storage-path (a stopped restored path) or --endpoint (a running "
                          "server)")
    return storage_path, endpoint


@recovery.command("status")
@_path_or_endpoint
@handles_errors
def recovery_status(storage_path: str | None, endpoint: str | None, as_json: bool) -> None:
    """Whether a restored path (or a running server) is in recovery mode, and its last validation."""
    from anvil.backup import mode as rec

    storage_path, endpoint = _one_of(storage_path, endpoint)
    if endpoint:
        from anvil.client import AnvilClient

        with AnvilClient(endpoint) as client:
            out = client.recovery_status()
    else:
        out = {"recovery_mode": rec.in_recovery(Path(storage_path)), "marker": rec.read_marker(Path(storage_path)),
               "last_validation_ok": (rec.last_validation(Path(storage_path)) or {}).get("ok")}
    emit(as_json, out)


def _records_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--records", default=None, metavar="URL",
                        help="The PostgreSQL store `anvil restore --records` loaded this path's records into.")(fn)


@recovery.command("validate")
@_storage_option
@_records_option
@handles_errors
def recovery_validate(storage_path: str, as_json: bool, records: str | None = None) -> None:
    """Run the restore validation sequence (docs/backup.md); writes recovery/validation.{json,md}; exit 1 on failure."""
    from anvil.backup import mode as rec
    from anvil.backup import ops
    from anvil.participants import recovery_participants

    report = ops.validate_path(storage_path, recovery_participants(), records=records)
    if as_json:
        emit(True, report)
    else:
        console.print(rec.render_markdown(report, "Recovery validation"), markup=False, highlight=False)
        console.print(f"report: {Path(storage_path) / rec.REPORT_DIR / 'validation.md'}", highlight=False)
    if not report["ok"]:
        sys.exit(1)


@recovery.command("resume")
@_path_or_endpoint
@click.option("--force", is_flag=True, help="Resume without a passing validation (needs --reason).")
@click.option("--reason", default=None, help="Why; recorded in the journal.")
@_records_option
@handles_errors
def recovery_resume(storage_path: str | None, endpoint: str | None, as_json: bool, force: bool,
                    reason: str | None, records: str | None = None) -> None:
    """Leave recovery mode (only after a passing validation, or --force --reason)."""
    from anvil.backup import ops

    storage_path, endpoint = _one_of(storage_path, endpoint)
    if endpoint:
        from anvil.client import AnvilClient

        with AnvilClient(endpoint) as client:
            if force:
                res = client.recovery_resume(force=True, reason=reason)
            else:
                client.recovery_validate()  # the server resumes only after a passing validation at its head
                res = client.recovery_resume()
        emit(as_json, res, text=f"resumed normal traffic (journal seq {res.get('journal_seq')})")
        return
    res = ops.resume_path(storage_path, force=force, reason=reason, records=records)
    emit(as_json, res, text=f"resumed normal traffic (journal seq {res['journal_seq']})")


# ------------------------------------------------------------------ anvil drill


@click.command("drill")
@repo_options
@click.option("--snapshot", default="latest", show_default=True)
@click.option("--report-dir", default=".", type=click.Path(file_okay=False), show_default=True,
              help="Where drill-report.json and drill-report.md are written.")
@click.option("--keep", is_flag=True, help="Keep the temporary restore (for inspection).")
@click.option("--to-time", default=None, metavar="TIME",
              help="Prove a point-in-time restore to TIME (ISO 8601 or unix seconds) instead of a snapshot.")
@click.option("--to-seq", type=int, default=None, metavar="N", help="Prove a point-in-time restore to seq N.")
@lock_stale_option
@handles_errors
def drill_cmd(repo: str, s3_endpoint: str | None, key_file: str | None, as_json: bool, snapshot: str,
              report_dir: str, keep: bool, to_time: str | None, to_seq: int | None, lock_stale: str | None) -> None:
    """Restore into a temporary directory, start an isolated server, prove the backup; exit 1 on any failure."""
    from anvil.backup.drill import run_drill
    from anvil.backup.errors import BackupError
    from anvil.participants import recovery_participants

    apply_thresholds(lock_stale)
    point = None
    if to_time is not None or to_seq is not None:
        from anvil.backup.pitr import parse_time

        if to_time is not None and to_seq is not None:
            raise BackupError("give one of --to-time or --to-seq, not both")
        if _given_on_command_line("snapshot"):
            raise BackupError("--snapshot does not apply with --to-time/--to-seq (the snapshot is chosen for you)")
        point = {"to_seq": to_seq, "to_time": parse_time(to_time) if to_time is not None else None}
    r = _open(repo, key_file, s3_endpoint)
    with progress_bar(not as_json, "drill: restoring") as prog:
        report = run_drill(r, snapshot, recovery_participants(), Path(report_dir), keep=keep, point=point,
                           log=None if as_json else lambda msg: console.print(msg, highlight=False, markup=False),
                           progress=prog)
    if as_json:
        emit(True, report)
    else:
        console.print(("[green]DRILL PASSED[/green]" if report["ok"] else "[red]DRILL FAILED[/red]")
                      + f" — {Path(report_dir) / 'drill-report.md'}")
    if not report["ok"]:
        sys.exit(1)
