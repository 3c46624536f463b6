"""`anvil artefact`: push, pull, verify, tag and inspect model and source artefacts (docs/artefacts.md)."""

from __future__ import annotations

import base64
from pathlib import Path

import click

from anvil.cli.common import client_command, emit, parse_meta
from anvil.client import AnvilClient


@click.group()
def artefact() -> None:
    """Model and source artefacts: signed manifests, tensor reads, git packs."""


@artefact.group()
def push() -> None:
    """Push a model directory or a git repository."""


def _sign_options(fn):  # type: ignore[no-untyped-def]
    for option in reversed([
        click.option("--tag", default=None, help="Move this tag to the pushed artefact (journaled)."),
        click.option("--sign-key", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Ed25519 private key (PEM) to sign the manifest with."),
        click.option("--key-id", default=None, help="The registered id of --sign-key."),
        click.option("--meta", multiple=True, help="Free metadata NAME=VALUE (repeatable)."),
    ]):
        fn = option(fn)
    return fn


@push.command("model")
@click.argument("bucket")
@click.argument("name")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--base", default=None, help="Id or tag of the base artefact: only changed files are listed.")
@_sign_options
@client_command
def push_model(client: AnvilClient, as_json: bool, bucket: str, name: str, directory: str, base: str | None,
               tag: str | None, sign_key: str | None, key_id: str | None, meta: tuple[str, ...]) -> None:
    """Upload DIRECTORY's files (deduplicated) and record its manifest as artefact NAME in BUCKET."""
    res = client.push_model(bucket, name, directory, tag=tag, base=base, metadata=parse_meta(meta),
                            signing_key=sign_key, key_id=key_id)
    emit(as_json, res, text=f"{name}@{res['id']} ({res['files']} files, {res['uploaded']} uploaded, "
                            f"{res['tensors']} tensors)" + (f" tag {tag}" if tag else ""))


@push.command("source")
@click.argument("bucket")
@click.argument("name")
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@click.option("--ref", "refs", multiple=True, help="Refs to store (default: every branch and tag).")
@_sign_options
@client_command
def push_source(client: AnvilClient, as_json: bool, bucket: str, name: str, repo: str, refs: tuple[str, ...],
                tag: str | None, sign_key: str | None, key_id: str | None, meta: tuple[str, ...]) -> None:
    """Store a git repository's objects for the chosen refs as one pack, and the refs in the manifest."""
    res = client.push_source(bucket, name, repo, refs=list(refs) or None, tag=tag, metadata=parse_meta(meta),
                             signing_key=sign_key, key_id=key_id)
    emit(as_json, res, text=f"{name}@{res['id']}" + (f" tag {tag}" if tag else ""))


@artefact.command("pull")
@click.argument("bucket")
@click.argument("name")
@click.argument("ref")
@click.argument("directory", type=click.Path(file_okay=False))
@client_command
def pull(client: AnvilClient, as_json: bool, bucket: str, name: str, ref: str, directory: str) -> None:
    """Download artefact NAME at REF (id or tag) into DIRECTORY, verifying every file's SHA-256."""
    res = client.pull_artefact(bucket, name, ref, directory)
    emit(as_json, res, text=f"{name}@{res['id']}: {res['files']} files, {res['bytes']} bytes, all verified")


@artefact.command("verify")
@click.argument("bucket")
@click.argument("name")
@click.argument("ref")
@client_command
def verify(client: AnvilClient, as_json: bool, bucket: str, name: str, ref: str) -> None:
    """Check every signature, component hash and tensor index of an artefact (exit 1 on a problem)."""
    res = client.verify_artefact(bucket, name, ref)
    emit(as_json, res, text=f"{name}@{res['id']}: " + ("ok" if res["ok"] else "; ".join(res["problems"]))
         + f" ({len(res['components'])} components, {len(res['signatures'])} signatures)")
    if not res["ok"]:
        raise SystemExit(1)


@artefact.command("tag")
@click.argument("bucket")
@click.argument("name")
@click.argument("tag")
@click.argument("artefact_id", required=False)
@click.option("--require-key", default=None, help="From now on the tag only accepts artefacts signed by this key.")
@client_command
def tag(client: AnvilClient, as_json: bool, bucket: str, name: str, tag: str, artefact_id: str | None,
        require_key: str | None) -> None:
    """Point TAG of NAME at ARTEFACT_ID (and/or set the key it requires)."""
    res = client.tag_artefact(bucket, name, tag, artefact_id, require_key=require_key)
    emit(as_json, res, text=f"{name}:{tag} -> {res['id']}" + (f" (requires {res['required_key']})"
                                                             if res["required_key"] else ""))


@artefact.command("list")
@click.argument("bucket")
@click.argument("name", required=False)
@client_command
def list_(client: AnvilClient, as_json: bool, bucket: str, name: str | None) -> None:
    """List the artefacts of BUCKET (or of NAME, with its tags)."""
    res = client.list_artefacts(bucket, name)
    rows = res if name is None else res["artefacts"]
    emit(as_json, res, table=(["name", "id", "kind", "tags", "signed by"],
                              [[a["name"], a["id"], a["kind"], ",".join(a["tags"]), ",".join(a["signed_by"])]
                               for a in rows]))


@artefact.command("show")
@click.argument("bucket")
@click.argument("name")
@click.argument("ref")
@client_command
def show(client: AnvilClient, as_json: bool, bucket: str, name: str, ref: str) -> None:
    """Print an artefact's manifest and its files."""
    emit(as_json, client.artefact_describe(bucket, name, ref))


@artefact.command("tensors")
@click.argument("bucket")
@click.argument("name")
@click.argument("ref")
@client_command
def tensors(client: AnvilClient, as_json: bool, bucket: str, name: str, ref: str) -> None:
    """List the tensors of an artefact's safetensors files."""
    res = client.list_tensors(bucket, name, ref)
    emit(as_json, res, table=(["name", "dtype", "shape", "file", "offset", "length"],
                              [[t["name"], t["dtype"], "x".join(map(str, t["shape"])), t["file"], t["offset"],
                                t["length"]] for t in res]))


@artefact.group()
def key() -> None:
    """Ed25519 signing keys (registered per tenant)."""


@key.command("generate")
@click.argument("path", type=click.Path(dir_okay=False))
def key_generate(path: str) -> None:
    """Write a new Ed25519 private key (PEM, mode 0600) to PATH; print its public key (base64)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    k = Ed25519PrivateKey.generate()
    p = Path(path)
    p.touch(mode=0o600, exist_ok=False)
    p.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    pub = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    click.echo(base64.b64encode(pub).decode())


@key.command("add")
@click.argument("key_id")
@click.argument("key_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--tenant", default=None, help="Tenant (default: the caller's).")
@client_command
def key_add(client: AnvilClient, as_json: bool, key_id: str, key_file: str, tenant: str | None) -> None:
    """Register the public half of KEY_FILE (a PEM private or public key) as KEY_ID."""
    from cryptography.hazmat.primitives import serialization

    data = Path(key_file).read_bytes()
    try:
        pub = serialization.load_pem_private_key(data, password=None).public_key()
    except (ValueError, TypeError):
        pub = serialization.load_pem_public_key(data)
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    res = client.add_signing_key(key_id, base64.b64encode(raw).decode(), tenant=tenant)
    emit(as_json, res, text=f"key {key_id} registered for tenant {res['tenant']}")


@key.command("list")
@click.option("--tenant", default=None)
@client_command
def key_list(client: AnvilClient, as_json: bool, tenant: str | None) -> None:
    """List the signing keys of a tenant."""
    res = client.list_signing_keys(tenant)
    emit(as_json, res, table=(["tenant", "key id", "public key"], [[k["tenant"], k["key_id"], k["public_key"]]
                                                                  for k in res]))
