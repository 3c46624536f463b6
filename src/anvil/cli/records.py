"""`anvil admin migrate --records URL`: apply the schema of every subsystem to a PostgreSQL store.

A node never migrates a PostgreSQL store itself (two nodes starting at once, or an old node
beside a new one, must not race on DDL): it checks the versions and refuses to start when they
differ from its own. The embedded catalog.db keeps migrating itself when it is opened.
"""

from __future__ import annotations

import json
import sys

import click


def check_records_url(url: str) -> None:
    from anvil.storage.pg import is_url

    if not is_url(url):
        raise ValueError("--records must be a postgresql:// URL (the embedded default needs no --records)")


@click.command("migrate")
@click.option("--records", envvar="ANVIL_RECORDS_URL", required=True,
              help="The PostgreSQL record store, postgresql://user@host/db (also ANVIL_RECORDS_URL).")
@click.option("--json", "as_json", is_flag=True, help="Print component -> schema version as JSON.")
def migrate(records: str, as_json: bool) -> None:
    """Create or upgrade the record store's schema (every subsystem's numbered migrations)."""
    from anvil.errors import AnvilError
    from anvil.participants import recovery_participants
    from anvil.storage.pg import apply_all, redact_url
    from anvil.storage.recovery import Replayer

    try:
        check_records_url(records)
        migrations: dict[str, list[str]] = {}
        # The Replayers own the schema (recovery contract): their migrations are every table.
        for participant in recovery_participants():
            if isinstance(participant, Replayer):
                migrations.update(participant.migrations())
        versions = apply_all(records, migrations)
    except (AnvilError, ValueError) as e:
        click.echo(f"anvil admin migrate: {e}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps({"records": redact_url(records), "versions": versions}))
        return
    click.echo(f"{redact_url(records)}: schema up to date")
    for component, version in versions.items():
        click.echo(f"  {component:<14} {version}")
