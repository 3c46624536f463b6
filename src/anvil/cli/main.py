"""`anvil`: serve, and the client commands for buckets and objects."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from anvil import __version__
from anvil.cli.common import (
    CountingReader,
    CountingWriter,
    LazyGroup,
    client_command,
    emit,
    err_console,
    parse_meta,
    transfer_progress,
)

if TYPE_CHECKING:
    from anvil.client import AnvilClient

# The top-level commands defined in the other modules of anvil.cli, imported when named.
COMMANDS = {
    "admin": "anvil.cli.identity:admin",
    "auth": "anvil.cli.identity:auth",
    "configure": "anvil.cli.identity:configure",
    "watch": "anvil.cli.watch:watch",
    "authz": "anvil.cli.authz:authz",
    "pdb": "anvil.cli.personaldb:pdb",
    "index": "anvil.cli.indexes:index",
    "search": "anvil.cli.indexes:search",
    "fsck": "anvil.cli.diagnostics:fsck",
    "gc": "anvil.cli.diagnostics:gc",
    "repair": "anvil.cli.diagnostics:repair",
    "findings": "anvil.cli.diagnostics:findings",
    "backup": "anvil.cli.backup:backup",
    "restore": "anvil.cli.backup:restore_cmd",
    "recovery": "anvil.cli.backup:recovery",
    "drill": "anvil.cli.backup:drill_cmd",
    "artefact": "anvil.cli.artefacts:artefact",
}


def _ts(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


@click.group(cls=LazyGroup, lazy=COMMANDS)
@click.version_option(__version__, prog_name="anvil")
def cli() -> None:
    """Anvil: an object store with a complete recovery model."""


@cli.command()
@click.option("--storage-path", envvar="STORAGE_PATH", default="./anvil-data", show_default=True)
@click.option("--listen", envvar="API_LISTEN_ADDR", default="127.0.0.1:9000", show_default=True)
@click.option("--dev-auth", is_flag=True, default=False,
              help="Development mode only: requests without a token act as the dev admin (benchmarks).")
@click.option("--backup-repo", envvar="ANVIL_BACKUP_REPO", default=None, help="Take scheduled backups into this repo.")
@click.option("--backup-every", default=None, help="Backup interval, e.g. 1h, 30m (needs --backup-repo).")
@click.option("--backup-s3-endpoint", envvar="ANVIL_BACKUP_S3_ENDPOINT", default=None)
@click.option("--backup-key-file", default=None, help="Passphrase file (else ANVIL_BACKUP_PASSPHRASE).")
@click.option("--archive-repo", envvar="ANVIL_ARCHIVE_REPO", default=None,
              help="Archive the journal continuously into this backup repository (point-in-time recovery).")
@click.option("--archive-interval", default="1s", show_default=True,
              help="How often new journal events are shipped (needs --archive-repo).")
@click.option("--access-log", envvar="ANVIL_ACCESS_LOG", default="off", show_default=True, metavar="PATH|-|off",
              help="Write JSON-lines access logs to PATH, to stdout (-), or not at all (off).")
@click.option("--metrics/--no-metrics", envvar="ANVIL_METRICS", default=True, show_default=True,
              help="Serve Prometheus metrics at /anvil/metrics (scope metrics:read; ANVIL_METRICS_PUBLIC=1: open).")
@click.option("--records", envvar="ANVIL_RECORDS_URL", default=None,
              help="Keep the records and journal in PostgreSQL (postgresql://...) instead of catalog.db; "
                   "migrate it first with `anvil admin migrate --records URL`.")
@click.option("--blobs", envvar="ANVIL_BLOBS_URL", default=None, metavar="s3://BUCKET/PREFIX",
              help="Keep blob bodies in an S3-compatible bucket instead of STORAGE_PATH/blobs "
                   "(credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).")
@click.option("--blobs-endpoint", envvar="ANVIL_BLOBS_ENDPOINT", default=None, metavar="URL",
              help="The S3 endpoint of --blobs (MinIO, Ceph RGW, another Anvil); default: AWS.")
def serve(storage_path: str, listen: str, dev_auth: bool, backup_repo: str | None, backup_every: str | None,
          backup_s3_endpoint: str | None, backup_key_file: str | None, archive_repo: str | None = None,
          archive_interval: str = "1s", access_log: str = "off", metrics: bool = True,
          records: str | None = None, blobs: str | None = None, blobs_endpoint: str | None = None) -> None:
    """Run the server (S3 gateway, native API, background work) on one STORAGE_PATH."""
    # From here Ctrl-C is a KeyboardInterrupt again (see anvil.cli): what is open gets closed by the
    # `finally` blocks on the way out, then the command ends quietly with status 0.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if blobs or blobs_endpoint:
        _blob_backend(blobs, blobs_endpoint)
    try:
        _serve(storage_path, listen, dev_auth, backup_repo, backup_every, backup_s3_endpoint, backup_key_file,
               archive_repo, archive_interval, access_log, metrics, records)
    except KeyboardInterrupt:
        click.echo("\nanvil serve: interrupted while starting; stopped", err=True)
        sys.stderr.flush()
        # What was open is closed (the exception came through `_serve`'s `finally` blocks). End here,
        # as the import-time handler does: interrupted ~0.3 s into its start, about one run in four
        # then ended by SIGINT (-2) somewhere in interpreter shutdown instead of with the quiet 0 this
        # promises (tests/test_serve_interrupt.py; not traced further).
        os._exit(0)


def _blob_backend(url: str | None, endpoint: str | None) -> None:
    """Check `--blobs` (the bucket answers) and hand it to every part of this process through the
    environment the storage core reads (storage.blobbackend), as offline tools read it too."""
    from anvil.errors import AnvilError
    from anvil.storage.blobbackend import ENDPOINT_ENV, URL_ENV, open_backend

    try:
        if not url:
            raise AnvilError("InvalidArgument", "--blobs-endpoint needs --blobs s3://bucket/prefix")
        backend = open_backend(url, endpoint)
        backend.check()
    except AnvilError as e:
        click.echo(f"anvil serve: {e.code}: {e.message}", err=True)
        sys.exit(2)
    os.environ[URL_ENV] = url
    if endpoint:
        os.environ[ENDPOINT_ENV] = endpoint
    else:
        os.environ.pop(ENDPOINT_ENV, None)


def _serve(storage_path: str, listen: str, dev_auth: bool, backup_repo: str | None, backup_every: str | None,
           backup_s3_endpoint: str | None, backup_key_file: str | None, archive_repo: str | None,
           archive_interval: str, access_log: str, metrics: bool, records: str | None) -> None:
    from anvil.api.server import serve as run_server
    from anvil.errors import AnvilError

    try:
        schedule = None
        if backup_repo or backup_every:
            from anvil.backup.repository import BackupError, read_passphrase
            from anvil.backup.schedule import ScheduleConfig, parse_interval

            if not (backup_repo and backup_every):
                raise ValueError("--backup-repo and --backup-every go together")
            try:
                passphrase = read_passphrase(backup_key_file)
            except BackupError as e:
                raise ValueError(f"--backup-repo: {e}") from None
            schedule = ScheduleConfig(backup_repo, parse_interval(backup_every), passphrase, backup_s3_endpoint)
        archive = None
        if archive_repo:
            from anvil.backup.archive import ArchiveConfig
            from anvil.backup.repository import BackupError, read_passphrase
            from anvil.backup.schedule import parse_interval

            try:
                archive = ArchiveConfig(archive_repo, parse_interval(archive_interval),
                                        read_passphrase(backup_key_file), backup_s3_endpoint)
            except BackupError as e:
                raise ValueError(f"--archive-repo: {e}") from None
        elif click.get_current_context().get_parameter_source("archive_interval").name == "COMMANDLINE":
            raise ValueError("--archive-interval needs --archive-repo")
        if records:
            from anvil.cli.records import check_records_url

            check_records_url(records)
        from anvil.api import malloc

        malloc.tune()  # before the server's threads start: their arenas are bounded (api.malloc)
        run_server(storage_path, listen, dev_auth=dev_auth, backup=schedule, archive=archive, access_log=access_log,
                   metrics=metrics, records=records)
    except (AnvilError, ValueError) as e:
        click.echo(f"anvil serve: {e}", err=True)
        sys.exit(2)


# ------------------------------------------------------------------ buckets


# Bucket bindings (object access through relationships): `anvil bucket bind|unbind|binding`.
@cli.group(cls=LazyGroup, lazy={name: f"anvil.cli.authz:bucket_{name}" for name in ("bind", "unbind", "binding")})
def bucket() -> None:
    """Create, list, delete buckets and set versioning."""


@bucket.command("create")
@click.argument("name")
@click.option("--versioning", type=click.Choice(["Enabled"]), default=None)
@client_command
def bucket_create(client: AnvilClient, as_json: bool, name: str, versioning: str | None) -> None:
    """Create bucket NAME (versioning off unless --versioning Enabled)."""
    res = client.create_bucket(name, versioning=versioning)
    emit(as_json, res, text=f"created bucket {name}")


@bucket.command("ls")
@client_command
def bucket_ls(client: AnvilClient, as_json: bool) -> None:
    """List the buckets this application can see."""
    buckets = client.list_buckets()
    emit(as_json, buckets, table=(("name", "tenant", "versioning", "created"),
                                  [(b["name"], b["tenant"], b["versioning"], _ts(b["created"])) for b in buckets]))


@bucket.command("rm")
@click.argument("name")
@client_command
def bucket_rm(client: AnvilClient, as_json: bool, name: str) -> None:
    """Delete bucket NAME (it must be empty)."""
    emit(as_json, client.delete_bucket(name), text=f"deleted bucket {name}")


@bucket.command("versioning")
@click.argument("name")
@click.argument("status", required=False, type=click.Choice(["Enabled", "Suspended"]))
@client_command
def bucket_versioning(client: AnvilClient, as_json: bool, name: str, status: str | None) -> None:
    """Show, or with STATUS set, the bucket's versioning state."""
    if status:
        res = client.set_versioning(name, status)
    else:
        b = client.get_bucket(name)
        res = {"bucket": name, "versioning": b["versioning"]}
    emit(as_json, res, text=f"{name}: {res['versioning']}")



# ------------------------------------------------------------------ objects


@cli.group("object")
def object_() -> None:
    """Put, get, inspect, list, copy and delete objects."""


@object_.command("put")
@click.argument("bucket_name")
@click.argument("key")
@click.argument("source", type=click.Path(allow_dash=True, dir_okay=False))
@click.option("--content-type", default=None)
@click.option("--meta", multiple=True, help="User metadata NAME=VALUE (repeatable).")
@click.option("--if-none-match", default=None, help="'*' to create only if absent.")
@click.option("--if-match", default=None, help="Only overwrite this ETag.")
@client_command
def object_put(client: AnvilClient, as_json: bool, bucket_name: str, key: str, source: str,
               content_type: str | None, meta: tuple[str, ...], if_none_match: str | None,
               if_match: str | None) -> None:
    """Upload SOURCE (a file, or - for stdin) as BUCKET/KEY."""
    metadata = parse_meta(meta)
    if source == "-":
        res = client.put_object(bucket_name, key, sys.stdin.buffer, content_type=content_type, metadata=metadata,
                                if_none_match=if_none_match, if_match=if_match)
    elif if_none_match or if_match:
        with open(source, "rb") as f:
            res = client.put_object(bucket_name, key, f, content_type=content_type, metadata=metadata,
                                    if_none_match=if_none_match, if_match=if_match)
    else:
        size = os.path.getsize(source)
        with transfer_progress(not as_json and size >= PROGRESS_MIN_BYTES, f"put {key}", size) as advance:
            if advance is None:
                res = client.upload_file(bucket_name, key, source, content_type=content_type, metadata=metadata)
            else:
                res = _upload_with_progress(client, bucket_name, key, source, size, content_type, metadata, advance)
    emit(as_json, res, text=f"put {bucket_name}/{key} version {res['version_id']} etag {res['etag']}")


# Transfers smaller than this finish before a progress bar would be worth drawing.
PROGRESS_MIN_BYTES = 4 * 1024 * 1024


def _upload_with_progress(client: AnvilClient, bucket_name: str, key: str, source: str, size: int,
                          content_type: str | None, metadata: dict[str, str], advance: Callable[[int], None]) -> Any:
    """`upload_file` (one PUT, or multipart above one part), counting the bytes as they are sent."""
    from anvil.client import DEFAULT_PART_SIZE, AnvilError

    part_size = DEFAULT_PART_SIZE
    with open(source, "rb") as f:
        if size <= part_size:
            return client.put_object(bucket_name, key, CountingReader(f, advance), content_type=content_type,
                                     metadata=metadata)
        upload_id = client.create_upload(bucket_name, key, content_type=content_type, metadata=metadata)
        try:
            parts: list[tuple[int, str]] = []
            while data := f.read(part_size):
                number = len(parts) + 1
                parts.append((number, client.upload_part(bucket_name, upload_id, number, data)["etag"]))
                advance(len(data))
            return client.complete_upload(bucket_name, upload_id, parts)
        except BaseException:
            try:
                client.abort_upload(bucket_name, upload_id)
            except AnvilError:
                pass
            raise


@object_.command("get")
@click.argument("bucket_name")
@click.argument("key")
@click.argument("dest", required=False, default="-", type=click.Path(allow_dash=True, dir_okay=False))
@click.option("--version-id", default=None)
@click.option("--range", "byte_range", default=None, help="bytes=a-b, bytes=a- or bytes=-n")
@client_command
def object_get(client: AnvilClient, as_json: bool, bucket_name: str, key: str, dest: str,
               version_id: str | None, byte_range: str | None) -> None:
    """Download BUCKET/KEY to DEST (default: stdout)."""
    if byte_range:
        data, info = client.get_object_with_info(bucket_name, key, version_id=version_id, range=byte_range)
        if dest == "-":
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            with open(dest, "wb") as f:
                f.write(data)
    elif dest == "-":
        info = client.download(bucket_name, key, sys.stdout.buffer, version_id=version_id)
        sys.stdout.buffer.flush()
    else:
        size = client.head_object(bucket_name, key, version_id=version_id)["size"] if (
            not as_json and err_console.is_terminal) else 0
        with transfer_progress(size >= PROGRESS_MIN_BYTES, f"get {key}", size) as advance:
            if advance is None:
                info = client.download(bucket_name, key, dest, version_id=version_id)
            else:
                with open(dest, "wb") as f:
                    info = client.download(bucket_name, key, CountingWriter(f, advance),  # type: ignore[arg-type]
                                           version_id=version_id)
    if dest != "-":
        emit(as_json, info, text=f"wrote {info['size']} bytes to {dest}")


@object_.command("head")
@click.argument("bucket_name")
@click.argument("key")
@click.option("--version-id", default=None)
@client_command
def object_head(client: AnvilClient, as_json: bool, bucket_name: str, key: str, version_id: str | None) -> None:
    """Show BUCKET/KEY's metadata (size, ETag, version, content type, user metadata)."""
    info = client.head_object(bucket_name, key, version_id=version_id)
    emit(as_json, info, table=(("field", "value"), [(k, v) for k, v in info.items() if k != "content_range"]))


@object_.command("ls")
@click.argument("bucket_name")
@click.option("--prefix", default="")
@click.option("--delimiter", default="")
@click.option("--limit", type=int, default=None, help="Stop after this many entries.")
@client_command
def object_ls(client: AnvilClient, as_json: bool, bucket_name: str, prefix: str, delimiter: str,
              limit: int | None) -> None:
    """List BUCKET's objects (with --delimiter, common prefixes are shown as PRE)."""
    entries = []
    for entry in client.iter_objects(bucket_name, prefix=prefix, delimiter=delimiter):
        entries.append(entry)
        if limit is not None and len(entries) >= limit:
            break
    rows = [("PRE", "", "", e["prefix"]) if "prefix" in e else
            (_ts(e["last_modified"]), e["size"], e["etag"], e["key"]) for e in entries]
    emit(as_json, entries, table=(("modified", "size", "etag", "key"), rows))


@object_.command("versions")
@click.argument("bucket_name")
@click.option("--prefix", default="")
@client_command
def object_versions(client: AnvilClient, as_json: bool, bucket_name: str, prefix: str) -> None:
    """List every version and delete marker in BUCKET."""
    versions: list[dict] = []
    key_marker = version_marker = ""
    while True:
        page = client.list_versions(bucket_name, prefix=prefix, key_marker=key_marker, version_marker=version_marker)
        versions.extend(page["versions"])
        if not page["truncated"]:
            break
        key_marker, version_marker = page["next_key_marker"], page["next_version_marker"] or ""
    rows = [(v["key"], v["version_id"], "yes" if v["is_latest"] else "", "marker" if v["delete_marker"] else v["size"],
             _ts(v["last_modified"])) for v in versions]
    emit(as_json, versions, table=(("key", "version", "latest", "size", "modified"), rows))


@object_.command("rm")
@click.argument("bucket_name")
@click.argument("key")
@click.option("--version-id", default=None)
@client_command
def object_rm(client: AnvilClient, as_json: bool, bucket_name: str, key: str, version_id: str | None) -> None:
    """Delete BUCKET/KEY (a delete marker in a versioned bucket; --version-id removes one version)."""
    res = client.delete_object(bucket_name, key, version_id=version_id)
    what = "delete marker " + str(res["version_id"]) if res.get("delete_marker") and not version_id else "deleted"
    emit(as_json, res, text=f"{bucket_name}/{key}: {what}")


@object_.command("cp")
@click.argument("src_bucket")
@click.argument("src_key")
@click.argument("dst_bucket")
@click.argument("dst_key")
@click.option("--source-version-id", default=None)
@click.option("--meta", multiple=True, help="Replace metadata with NAME=VALUE (repeatable).")
@click.option("--content-type", default=None)
@client_command
def object_cp(client: AnvilClient, as_json: bool, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str,
              source_version_id: str | None, meta: tuple[str, ...], content_type: str | None) -> None:
    """Copy SRC_BUCKET/SRC_KEY to DST_BUCKET/DST_KEY (no bytes are copied)."""
    replace = bool(meta) or content_type is not None
    res = client.copy_object(dst_bucket, dst_key, source_bucket=src_bucket, source_key=src_key,
                             source_version_id=source_version_id,
                             metadata_directive="REPLACE" if replace else "COPY",
                             metadata=parse_meta(meta) if replace else None, content_type=content_type)
    emit(as_json, res, text=f"copied to {dst_bucket}/{dst_key} version {res['version_id']}")


def main() -> None:
    cli(prog_name="anvil", auto_envvar_prefix=None)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
