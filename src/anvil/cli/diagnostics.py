"""`anvil fsck`, `anvil gc`, `anvil repair` and `anvil findings ...`.

fsck, gc and repair run either offline on a stopped STORAGE_PATH (`--storage-path`, the
store's lock keeps a server from starting meanwhile) or inside a running server through the
admin API (`--endpoint`/ANVIL_ENDPOINT). Exit status: 0 clean (warnings allowed), 1 an
error-severity finding, 2 refused (bad usage, store in use, not a store).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from anvil.cli.common import client_command, console, describe_error, emit, err_console, jsonable

if TYPE_CHECKING:
    from anvil.client import AnvilClient


def _ts(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _refuse(as_json: bool, code: str, message: str) -> None:
    if as_json:
        click.echo(json.dumps({"error": {"code": code, "message": message}}))
    else:
        from rich.markup import escape

        err_console.print(f"[red]error[/red] {code}: {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


def target_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--storage-path (offline) or --endpoint (online), and --json; resolves which one."""

    @click.option("--storage-path", type=click.Path(file_okay=False), default=None,
                  help="Offline: a STORAGE_PATH whose server is stopped.")
    @click.option("--endpoint", envvar="ANVIL_ENDPOINT", default=None,
                  help="Online: a running server's URL (or ANVIL_ENDPOINT).")
    @click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
    @click.pass_context
    @functools.wraps(fn)
    def run(ctx: click.Context, storage_path: str | None, endpoint: str | None, as_json: bool, **kw: Any) -> None:
        from_env = ctx.get_parameter_source("endpoint") == click.core.ParameterSource.ENVIRONMENT
        if storage_path and endpoint and not from_env:
            raise click.UsageError("give either --storage-path (offline) or --endpoint (online), not both")
        if storage_path:
            endpoint = None
        if not storage_path and not endpoint:
            raise click.UsageError("give --storage-path DIR (server stopped) or --endpoint URL (server running)")
        fn(storage_path=storage_path, endpoint=endpoint, as_json=as_json, **kw)

    return run


def _offline(as_json: bool, storage_path: str, action: Callable[[Any], dict[str, Any]],
             opener: Callable[[str], Any]) -> dict[str, Any]:
    from anvil.errors import AnvilError

    try:
        with opener(storage_path) as handle:
            return action(handle)
    except AnvilError as e:
        message = e.message
        if e.code == "StorageLocked":
            message += "; stop the server, or run this through it with --endpoint"
        _refuse(as_json, e.code, message)
    raise AssertionError("unreachable")


def _online(as_json: bool, endpoint: str, action: Callable[[AnvilClient], dict[str, Any]], what: str) -> dict:
    from anvil.client import AnvilAPIError, AnvilClient, InvalidEndpoint

    try:
        client = AnvilClient(endpoint)
    except InvalidEndpoint as e:
        _refuse(as_json, "InvalidArgument", str(e))
    with client:
        try:
            if as_json or not sys.stderr.isatty():
                return action(client)
            with err_console.status(f"{what} running in the server at {endpoint} ..."):
                return action(client)
        except AnvilAPIError as e:
            _refuse(as_json, e.code, describe_error(e, admin=True).partition(": ")[2])
        except OSError as e:  # the SDK's ConnectionError too: name the endpoint and the fix
            _refuse(as_json, "Unavailable", describe_error(e))
    raise AssertionError("unreachable")


class NullProgress:
    """The `anvil.diagnostics.fsck.Progress` interface, doing nothing (kept here so the CLI
    does not import the storage stack just to start)."""

    def phase(self, name: str, total: int | None = None) -> Callable[[int], None]:
        return lambda n: None


class RichProgress(NullProgress):
    """One bar per phase; each phase's advance function moves only its own bar."""

    def __init__(self, bar: Any):
        self._bar = bar

    def phase(self, name: str, total: int | None = None) -> Callable[[int], None]:
        task = self._bar.add_task(name, total=total)
        return lambda n: self._bar.advance(task, n)


@contextmanager
def _progress(as_json: bool) -> Iterator[NullProgress]:
    """A rich progress bar on a terminal; nothing when piped or printing JSON."""
    if as_json or not sys.stderr.isatty():
        yield NullProgress()
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed} done"),
                  TimeElapsedColumn(), console=err_console.real, transient=True) as bar:
        yield RichProgress(bar)


def _affected_summary(a: dict[str, Any]) -> str:
    for k in ("blob", "seq", "file", "upload_id", "consumer", "manifest", "family"):
        if k in a:
            return f"{k}={a[k]}"
    return ""


def _print_findings(found: list[dict[str, Any]]) -> None:
    """One line per finding (a table squeezes long invariants and hashes into ellipses)."""
    from rich.markup import escape

    colours = {"error": "red", "warning": "yellow", "info": "cyan"}
    if not found:
        console.print("no findings")
    for f in found:
        colour = colours.get(f["severity"], "white")
        resolved = f"  [green](resolved {_ts(f['resolved_at'])})[/]" if f["resolved_at"] else ""
        console.print(
            f"{_ts(f['time'])}  [{colour}]{f['severity']:<7}[/]  {escape(f['invariant'])}  "
            f"{escape(_affected_summary(f['affected']))}  {escape(f['detail'])}  [dim]{f['id']}[/]{resolved}",
            soft_wrap=True, highlight=False,
        )


# ------------------------------------------------------------------ fsck


@click.command()
@click.option("--deep", is_flag=True, help="Also re-hash every blob (and derived file) against its SHA-256.")
@target_options
def fsck(storage_path: str | None, endpoint: str | None, as_json: bool, deep: bool) -> None:
    """Check the journal chain, blobs, references, multipart state, FORMAT, catalog.db,
    watch cursors and derived manifests; record findings. Exit 1 on any error finding."""
    if storage_path:
        from anvil.cli import FSCK_HASH_THREADS, start_deep_fsck_children
        from anvil.storage import blobwalk, catalogcheck

        hash_threads = FSCK_HASH_THREADS
        if deep:
            # A large catalog's deep checks (integrity, inline bodies) and the hashing of many blob files
            # run in child processes: start them before the imports below and the opening of the store,
            # so they work on the other core meanwhile (`anvil.cli` started them already when it found
            # this command on the line: then this finds them).
            start_deep_fsck_children(storage_path)
        try:
            from anvil.diagnostics.fsck import run_fsck
            from anvil.diagnostics.service import OFFLINE_PRINCIPAL, open_offline_target
            from anvil.participants import recovery_participants  # not anvil.runtime: no service is needed

            def action(target: Any) -> dict[str, Any]:
                with _progress(as_json) as progress:
                    return run_fsck(target, recovery_participants(), deep=deep, mode="offline", progress=progress,
                                    actor=OFFLINE_PRINCIPAL.actor, hash_threads=hash_threads).to_dict()

            report = _offline(as_json, storage_path, action, open_offline_target)
        finally:
            # Ones nothing took: the store was locked, or not a store.
            catalogcheck.discard_early()
            blobwalk.discard_early()
    else:
        assert endpoint is not None
        report = _online(as_json, endpoint, lambda c: c.fsck(deep=deep), "fsck")
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False, default=jsonable))
    else:
        if report["findings"]:
            _print_findings(report["findings"])
        c = report["counts"]
        status = "[green]ok[/]" if report["ok"] else "[red]FAILED[/]"
        console.print(f"fsck {'--deep ' if deep else ''}{status}: {c['error']} error(s), {c['warning']} warning(s); "
                      f"{report['new_findings']} new finding(s) recorded, {len(report['resolved'])} resolved",
                      soft_wrap=True)
        for name, stats in report["checks"].items():
            console.print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in stats.items()), highlight=False,
                          soft_wrap=True)
        if report["unresolved_earlier"]:
            console.print(f"{report['unresolved_earlier']} unresolved finding(s) from earlier runs were not "
                          "re-detected by this run (see anvil findings ls --unresolved)", soft_wrap=True)
        if report["record_error"]:
            err_console.print(f"[red]{report['record_error']}[/]")
    sys.exit(0 if report["ok"] else 1)


# ------------------------------------------------------------------ gc


@click.command()
@click.option("--grace", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="Only remove orphan blobs unmodified for this many seconds.")
@click.option("--upload-expiry", type=click.FloatRange(min=0), default=7 * 24 * 3600.0, show_default=True,
              help="Abort multipart uploads older than this many seconds.")
@click.option("--dry-run", is_flag=True, help="Report what would be removed; change nothing.")
@target_options
def gc(storage_path: str | None, endpoint: str | None, as_json: bool, grace: float, upload_expiry: float,
       dry_run: bool) -> None:
    """Remove orphan blobs older than --grace and multipart uploads older than --upload-expiry."""
    if storage_path:
        from anvil.context import RequestContext
        from anvil.diagnostics.service import OFFLINE_PRINCIPAL
        from anvil.runtime import open_offline

        def action(anvil: Any) -> dict[str, Any]:
            return anvil.diagnostics.gc(RequestContext(OFFLINE_PRINCIPAL), grace=grace, upload_expiry=upload_expiry,
                                        dry_run=dry_run).to_dict()

        report = _offline(as_json, storage_path, action, open_offline)
    else:
        assert endpoint is not None
        report = _online(as_json, endpoint, lambda c: c.gc(grace_seconds=grace, upload_expiry_seconds=upload_expiry,
                                                           dry_run=dry_run), "gc")
    verb = "would remove" if dry_run else "removed"
    emit(as_json, report, text=(
        f"gc {verb} {report['blob_count']} orphan blob(s) ({report['bytes_removed']} bytes), "
        f"{len(report['uploads_expired'])} expired upload(s), {report['tmp_files_removed']} temporary file(s); "
        f"kept {report['young_orphans_kept']} orphan(s) younger than {grace:g} s"))


# ------------------------------------------------------------------ repair


def _repair_index(storage_path: str | None, endpoint: str | None, as_json: bool, bucket: str, name: str) -> None:
    """Rebuild one index from its bucket's objects: offline on a stopped store, or by the server."""
    if storage_path:
        from anvil.context import RequestContext
        from anvil.diagnostics.service import OFFLINE_PRINCIPAL
        from anvil.runtime import open_offline

        def run(anvil: Any) -> Any:
            anvil.indexes.start()
            return anvil.indexes.rebuild(RequestContext(OFFLINE_PRINCIPAL), bucket, name)

        report = _offline(as_json, storage_path, run, open_offline)
    else:
        assert endpoint is not None
        report = _online(as_json, endpoint, lambda c: c.rebuild_index(bucket, name), "repair index")
    emit(as_json, report, text=f"repair index {bucket}/{name}: rebuilt, generation {report.get('generation')}, "
                               f"{report.get('documents')} documents at cursor {report.get('cursor')}")


@click.command()
@click.argument("families", nargs=-1)
@click.option("--from-backup", "from_backup", default=None, metavar="REPO",
              help="Family blobs: restore every missing or quarantined blob from this backup repository "
                   "(file:///path or s3://bucket/prefix; passphrase from ANVIL_BACKUP_PASSPHRASE or --key-file).")
@click.option("--snapshot", default=None,
              help="With --from-backup: search only this snapshot (id, unique prefix or 'latest'); "
                   "default: every snapshot, newest first.")
@click.option("--key-file", default=None, type=click.Path(dir_okay=False),
              help="With --from-backup: file holding the repository passphrase (else ANVIL_BACKUP_PASSPHRASE).")
@click.option("--s3-endpoint", envvar="ANVIL_BACKUP_S3_ENDPOINT", default=None,
              help="With --from-backup: S3 endpoint URL for s3:// repositories.")
@target_options
def repair(storage_path: str | None, endpoint: str | None, as_json: bool, families: tuple[str, ...],
           from_backup: str | None, snapshot: str | None, key_file: str | None, s3_endpoint: str | None) -> None:
    """Rebuild derived FAMILIES (default: all registered) from source records; always records a finding.

    `anvil repair blobs --from-backup REPO` instead restores every missing or quarantined blob
    from the newest snapshot holding it, re-verifies it and resolves the findings about it.
    Exit 1 if some blob could not be healed."""
    if families and families[0] == "index":  # anvil repair index BUCKET NAME (anvil.indexes)
        if len(families) != 3:
            raise click.UsageError("usage: anvil repair index BUCKET NAME")
        _repair_index(storage_path, endpoint, as_json, families[1], families[2])
        return
    if from_backup is not None:
        if list(families) != ["blobs"]:
            raise click.UsageError("--from-backup heals the family 'blobs' only: anvil repair blobs --from-backup REPO")
        _heal(storage_path, endpoint, as_json, from_backup, snapshot, key_file, s3_endpoint)
        return
    if snapshot or key_file:
        raise click.UsageError("--snapshot and --key-file apply to --from-backup only")
    if "blobs" in families:
        raise click.UsageError("blobs are source data, healed from a backup: anvil repair blobs --from-backup REPO")
    names = list(families) or None
    if storage_path:
        from anvil.context import RequestContext
        from anvil.diagnostics.service import OFFLINE_PRINCIPAL
        from anvil.runtime import open_offline

        report = _offline(as_json, storage_path,
                          lambda anvil: anvil.diagnostics.repair(RequestContext(OFFLINE_PRINCIPAL), names),
                          open_offline)
    else:
        assert endpoint is not None
        report = _online(as_json, endpoint, lambda c: c.repair(names), "repair")
    if not report["families"]:
        text = "repair: no derived families are registered; nothing to rebuild (recorded as a finding)"
    else:
        text = "\n".join(f"repair {r['family']}: " + ("rebuilt" if r["ok"] else f"FAILED: {r['error']}")
                         for r in report["results"])
    emit(as_json, report, text=text)
    sys.exit(0 if report["ok"] else 1)


def _heal(storage_path: str | None, endpoint: str | None, as_json: bool, repo_url: str, snapshot: str | None,
          key_file: str | None, s3_endpoint: str | None) -> None:
    """`repair blobs --from-backup`: offline on a stopped store, or by the running server (which
    opens the repository itself). A bad repository or passphrase is refused before anything changes."""
    from anvil.backup.crypto import read_passphrase
    from anvil.backup.errors import BackupError

    try:
        passphrase = read_passphrase(key_file)
    except BackupError as e:
        _refuse(as_json, "InvalidArgument", str(e))
    if storage_path:
        from anvil.backup.ops import open_repo
        from anvil.context import RequestContext
        from anvil.diagnostics.service import OFFLINE_PRINCIPAL, check_storage_path
        from anvil.errors import AnvilError
        from anvil.runtime import open_offline

        try:
            check_storage_path(storage_path)
            repo = open_repo(repo_url, passphrase=passphrase, s3_endpoint=s3_endpoint, storage_path=storage_path)
        except BackupError as e:
            _refuse(as_json, "InvalidArgument", str(e))
        except AnvilError as e:
            _refuse(as_json, e.code, e.message)

        def action(anvil: Any) -> dict[str, Any]:
            try:
                return anvil.heal_blobs(RequestContext(OFFLINE_PRINCIPAL), repo, snapshot=snapshot)
            except BackupError as e:
                raise AnvilError("InvalidArgument", str(e)) from None

        report = _offline(as_json, storage_path, action, open_offline)
    else:
        assert endpoint is not None
        report = _online(as_json, endpoint, lambda c: c.heal_blobs(repo_url, passphrase=passphrase,
                                                                   s3_endpoint=s3_endpoint, snapshot=snapshot),
                         "repair blobs")
    if as_json:
        emit(True, report)
    else:
        _print_heal(report)
    sys.exit(0 if report["ok"] else 1)


def _print_heal(report: dict[str, Any]) -> None:
    from rich.markup import escape

    where = report["repository"] + (f" snapshot {report['snapshot']}" if report["snapshot"] else "")
    console.print(f"repair blobs from {escape(where)}: {report['missing']} missing, "
                  f"{report['healed_count']} healed ({report['bytes']} bytes), "
                  f"{len(report['unrecoverable'])} unrecoverable; "
                  f"{len(report['findings_resolved'])} finding(s) resolved", soft_wrap=True, highlight=False)
    for h in report["healed"]:
        console.print(f"  [green]healed[/]  {h['sha256']}  from snapshot {h['snapshot']}  "
                      f"affects {escape(', '.join(h['affects']))}", soft_wrap=True, highlight=False)
    for u in report["unrecoverable"]:
        console.print(f"  [red]UNRECOVERABLE[/]  {u['sha256']}  {escape(u['reason'])}  "
                      f"affects {escape(', '.join(u['affects']))}", soft_wrap=True, highlight=False)
        for p in u["problems"]:
            console.print(f"      {escape(p)}", soft_wrap=True, highlight=False)


# ------------------------------------------------------------------ findings


@click.group()
def findings() -> None:
    """List and resolve diagnostic findings."""


@findings.command("ls")
@click.option("--subsystem", default=None)
@click.option("--severity", type=click.Choice(["error", "warning", "info"]), default=None)
@click.option("--unresolved", is_flag=True, help="Only findings not yet resolved.")
@click.option("--limit", type=click.IntRange(1, 10000), default=1000, show_default=True)
@client_command
def findings_ls(client: AnvilClient, as_json: bool, subsystem: str | None, severity: str | None, unresolved: bool,
                limit: int) -> None:
    """List findings (newest first), filtered by subsystem, severity or state."""
    found = client.list_findings(subsystem=subsystem, severity=severity, unresolved=unresolved, limit=limit)
    if as_json:
        emit(True, found)
    else:
        _print_findings(found)


@findings.command("resolve")
@click.argument("finding_id")
@click.argument("resolution")
@client_command
def findings_resolve(client: AnvilClient, as_json: bool, finding_id: str, resolution: str) -> None:
    """Mark finding FINDING_ID resolved, with the resolution text."""
    emit(as_json, client.resolve_finding(finding_id, resolution), text=f"resolved {finding_id}")
