"""`anvil admin ...` (tenants, apps, policies, public access, keys, audit), `anvil auth`, `anvil configure`."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

import click

from anvil.cli.common import LazyGroup, admin_command, describe_error, emit, err_console
from anvil.cli.profiles import ProfileError, resolve_credentials, save_profile
from anvil.client import AnvilAPIError, AnvilClient, InvalidEndpoint, exchange_token
from anvil.client import ConnectionError as ClientConnectionError


def _ts(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _show_secret(as_json: bool, res: dict, what: str) -> None:
    if as_json:
        emit(True, res)
        return
    click.echo(f"{what}\n  tenant:        {res['tenant']}\n  client_id:     {res['client_id']}\n"
               f"  client_secret: {res['client_secret']}\n"
               "The secret is shown only this once: store it now (e.g. `anvil configure`).")


@click.group(cls=LazyGroup, lazy={"migrate": "anvil.cli.records:migrate"})
def admin() -> None:
    """Administration: tenants, applications, tokens, policies, public access, secret keys, audit."""


# ------------------------------------------------------------------ tenants


@admin.group()
def tenant() -> None:
    """Create and list tenants (admins only)."""


@tenant.command("create")
@click.argument("name")
@admin_command
def tenant_create(client: AnvilClient, as_json: bool, name: str) -> None:
    """Create tenant NAME (admin)."""
    emit(as_json, client.create_tenant(name), text=f"created tenant {name}")


@tenant.command("ls")
@admin_command
def tenant_ls(client: AnvilClient, as_json: bool) -> None:
    """List tenants (admin)."""
    rows = client.list_tenants()
    emit(as_json, rows, table=(("tenant", "apps", "created"),
                               [(t["tenant"], t["apps"], _ts(t["created"])) for t in rows]))


# ------------------------------------------------------------------ applications


@admin.group()
def app() -> None:
    """Create, list, disable, enable and delete applications; rotate their secrets."""


@app.command("create")
@click.argument("tenant_name")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, help="Grant this scope (repeatable), e.g. object:read|bucket:docs/*")
@admin_command
def app_create(client: AnvilClient, as_json: bool, tenant_name: str, name: str, scopes: tuple[str, ...]) -> None:
    """Create application NAME in TENANT_NAME; prints its client id and secret once."""
    res = client.create_app(tenant_name, name, scopes=list(scopes))
    _show_secret(as_json, res, f"created application {name}")


@app.command("ls")
@click.option("--tenant", "tenant_name", default=None)
@admin_command
def app_ls(client: AnvilClient, as_json: bool, tenant_name: str | None) -> None:
    """List applications, optionally of one tenant (admin)."""
    rows = client.list_apps(tenant_name)
    emit(as_json, rows, table=(("client_id", "tenant", "name", "status", "key", "scopes", "created"),
                               [(a["client_id"], a["tenant"], a["name"], a.get("status", "enabled"), a["key_id"],
                                 " ".join(a["scopes"]), _ts(a["created"])) for a in rows]))


@app.command("rotate-secret")
@click.argument("client_id_arg", metavar="CLIENT_ID")
@admin_command
def app_rotate(client: AnvilClient, as_json: bool, client_id_arg: str) -> None:
    """New secret; tokens exchanged with the previous one are refused from now on."""
    _show_secret(as_json, client.rotate_app_secret(client_id_arg), f"rotated the secret of {client_id_arg}")


@app.command("disable")
@click.argument("client_id_arg", metavar="CLIENT_ID")
@admin_command
def app_disable(client: AnvilClient, as_json: bool, client_id_arg: str) -> None:
    """Refuse the application's tokens, SigV4 requests and token exchanges until enabled again."""
    res = client.disable_app(client_id_arg)
    emit(as_json, res, text=f"{client_id_arg}: disabled" if res["changed"] else f"{client_id_arg}: already disabled")


@app.command("enable")
@click.argument("client_id_arg", metavar="CLIENT_ID")
@admin_command
def app_enable(client: AnvilClient, as_json: bool, client_id_arg: str) -> None:
    """Let a disabled application authenticate again (its unexpired tokens work again too)."""
    res = client.enable_app(client_id_arg)
    emit(as_json, res, text=f"{client_id_arg}: enabled" if res["changed"] else f"{client_id_arg}: already enabled")


@app.command("delete")
@click.argument("client_id_arg", metavar="CLIENT_ID")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@admin_command
def app_delete(client: AnvilClient, as_json: bool, client_id_arg: str, yes: bool) -> None:
    """Delete the application and its grants, for good (its client id is never reused)."""
    if not yes and not as_json:
        click.confirm(f"delete application {client_id_arg} and its grants? This cannot be undone", abort=True,
                      err=True)
    res = client.delete_app(client_id_arg)
    emit(as_json, res, text=f"deleted application {res['client_id']} ({res['tenant']}/{res['name']}) and "
                            f"{len(res['scopes_removed'])} grant(s)")


# ------------------------------------------------------------------ tokens


@admin.group()
def token() -> None:
    """Revoke issued tokens (by jti: `anvil auth token --json` and whoami show it)."""


@token.command("revoke")
@click.argument("jti")
@click.option("--app", "for_client", default=None, metavar="CLIENT_ID",
              help="Only this application's token matches (required of tenant admins).")
@admin_command
def token_revoke(client: AnvilClient, as_json: bool, jti: str, for_client: str | None) -> None:
    """Refuse the token with this JTI from its next request on."""
    res = client.revoke_token(jti, client_id=for_client)
    emit(as_json, res, text=f"token {jti}: revoked" if res["changed"] else f"token {jti}: already revoked")


# ------------------------------------------------------------------ policies


@admin.group()
def policy() -> None:
    """Grant, revoke and list an application's scopes (bounded by the caller's own)."""


@policy.command("grant")
@click.argument("client_id_arg", metavar="CLIENT_ID")
@click.argument("scopes", nargs=-1, required=True)
@admin_command
def policy_grant(client: AnvilClient, as_json: bool, client_id_arg: str, scopes: tuple[str, ...]) -> None:
    """Grant scopes to application CLIENT_ID."""
    res = client.grant(client_id_arg, list(scopes))
    emit(as_json, res, text=f"granted {' '.join(res['changed']) or 'nothing new'}")


@policy.command("revoke")
@click.argument("client_id_arg", metavar="CLIENT_ID")
@click.argument("scopes", nargs=-1, required=True)
@admin_command
def policy_revoke(client: AnvilClient, as_json: bool, client_id_arg: str, scopes: tuple[str, ...]) -> None:
    """Revoke scopes from application CLIENT_ID."""
    res = client.revoke(client_id_arg, list(scopes))
    emit(as_json, res, text=f"revoked {' '.join(res['changed']) or 'nothing'}")


@policy.command("ls")
@click.argument("client_id_arg", metavar="CLIENT_ID")
@admin_command
def policy_ls(client: AnvilClient, as_json: bool, client_id_arg: str) -> None:
    """Show the scopes granted to application CLIENT_ID."""
    res = client.policies(client_id_arg)
    emit(as_json, res, table=(("scope",), [(s,) for s in res["scopes"]]))


# ------------------------------------------------------------------ buckets, keys, audit


@admin.group("bucket")
def admin_bucket() -> None:
    """Bucket access settings."""


@admin_bucket.command("public-access")
@click.argument("bucket_name")
@click.argument("state", type=click.Choice(["on", "off"]))
@admin_command
def bucket_public(client: AnvilClient, as_json: bool, bucket_name: str, state: str) -> None:
    """Allow (on) or stop (off) anonymous GET/HEAD/LIST on BUCKET_NAME."""
    res = client.set_public_access(bucket_name, state == "on")
    emit(as_json, res, text=f"{bucket_name}: anonymous read {'allowed' if res['public'] else 'off'}")


@admin.group("secret-key")
def secret_key() -> None:
    """The key that encrypts application secret envelopes."""


@secret_key.command("rotate")
@click.option("--dry-run", is_flag=True, help="Report what would be re-encrypted; change nothing.")
@admin_command
def secret_key_rotate(client: AnvilClient, as_json: bool, dry_run: bool) -> None:
    """Re-encrypt every envelope under the active key (ANVIL_SECRET_ENCRYPTION_KEY_ID)."""
    res = client.rotate_secret_key(dry_run=dry_run)
    ids = res["would_change"] if dry_run else res["changed"]
    verb = "would re-encrypt" if dry_run else "re-encrypted"
    lines = [f"active key {res['active_key_id']}: {verb} {len(ids)} envelope(s), {res['unchanged']} already current"]
    lines += [f"  {cid}" for cid in ids]
    lines += [f"  UNREADABLE {u['client_id']}: {u['problem']}" for u in res["unreadable"]]
    emit(as_json, res, text="\n".join(lines))
    if res["unreadable"]:
        sys.exit(1)


@admin.command("audit")
@click.option("--limit", type=int, default=100, show_default=True)
@admin_command
def audit(client: AnvilClient, as_json: bool, limit: int) -> None:
    """Recent denied requests (bounded, in memory)."""
    rows = client.audit(limit=limit)
    emit(as_json, rows, table=(("time", "code", "method", "path", "actor", "request_id"),
                               [(_ts(e["ts"]), e["code"], e["method"], e["path"], e.get("actor") or "-",
                                 e["request_id"]) for e in rows]))


@admin.group("identity")
def identity_group() -> None:
    """Identity summary and validation (recovery participant data)."""


@identity_group.command("summary")
@admin_command
def identity_summary(client: AnvilClient, as_json: bool) -> None:
    """Counts and digests of identity records (what a backup records)."""
    emit(as_json, client.identity_summary())


@identity_group.command("validate")
@admin_command
def identity_validate(client: AnvilClient, as_json: bool) -> None:
    """Check identity records (secret envelopes, keys, scopes); exit 1 on an error finding."""
    res = client.identity_validate()
    emit(as_json, res, text="ok: every envelope decrypts" if res["ok"] else
         "\n".join(f"{f['severity']} {f['item']}: {f['problem']}" for f in res["findings"]))
    if not res["ok"]:
        sys.exit(1)


# ------------------------------------------------------------------ auth and profiles


@click.group()
def auth() -> None:
    """Tokens."""


@auth.command("token")
@click.option("--scope", "scopes", multiple=True, help="Ask for this scope (repeatable; default: all granted).")
@click.option("--expires-in", type=int, default=None, help="Lifetime in seconds (at most 3600).")
@click.option("--subject", default=None, metavar="TYPE:ID",
              help="Act for this end user, e.g. user:amy (needs authz:act; docs/authz.md).")
@click.option("--endpoint", envvar="ANVIL_ENDPOINT", default=None)
@click.option("--profile", envvar="ANVIL_PROFILE", default=None)
@click.option("--client-id", envvar="ANVIL_CLIENT_ID", default=None)
@click.option("--client-secret", envvar="ANVIL_CLIENT_SECRET", default=None)
@click.option("--json", "as_json", is_flag=True)
def auth_token(scopes: tuple[str, ...], expires_in: int | None, subject: str | None, endpoint: str | None,
               profile: str | None, client_id: str | None, client_secret: str | None, as_json: bool) -> None:
    """Exchange client credentials for a bearer token (printed on stdout)."""
    try:
        creds = resolve_credentials(endpoint=endpoint, profile=profile, client_id=client_id,
                                    client_secret=client_secret)
        if not creds.client_id:
            raise ProfileError("no credentials: use --client-id/--client-secret, ANVIL_CLIENT_ID/SECRET or a profile")
        res = exchange_token(creds.endpoint, creds.client_id, creds.client_secret or "",
                             scopes=list(scopes) or None, expires_in=expires_in, subject=subject)
    except (ProfileError, InvalidEndpoint) as e:
        err_console.print(f"[red]error[/red] {e}")
        sys.exit(2)
    except AnvilAPIError as e:
        if as_json:
            click.echo(json.dumps({"error": {"code": e.code, "message": e.message, "status": e.status}}))
        else:
            err_console.print(f"[red]error[/red] {describe_error(e)}", markup=False)
        sys.exit(1)
    except ClientConnectionError as e:
        err_console.print(f"error: {describe_error(e)}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    click.echo(json.dumps(res.to_dict(), indent=2) if as_json else res["access_token"])


@click.command()
@click.option("--profile", default="default", show_default=True)
@click.option("--endpoint", default=None)
@click.option("--client-id", default=None)
@click.option("--client-secret", default=None, help="Prompted for (hidden) when --client-id is given without it.")
def configure(profile: str, endpoint: str | None, client_id: str | None, client_secret: str | None) -> None:
    """Save an endpoint and client credentials as a profile (0600, under $XDG_CONFIG_HOME/anvil)."""
    if client_id and not client_secret:
        client_secret = click.prompt("client secret", hide_input=True)
    try:
        path = save_profile(profile, {"endpoint": endpoint or "", "client_id": client_id or "",
                                      "client_secret": client_secret or ""})
    except ProfileError as e:
        err_console.print(f"[red]error[/red] {e}")
        sys.exit(2)
    click.echo(f"saved profile {profile} to {path}")
