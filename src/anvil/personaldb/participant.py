"""PersonalDB's recovery participant.

Source: groups, schema versions, the hash-chained log with its certificates, snapshot records
(their files are blobs this participant references) and the public witness keys. The witness
private key (`secrets/personaldb_witness.json`) is a control-plane secret: its key ids are
always recorded, the file goes into a snapshot only when the backup escrows secrets.

There is a derived participant too, `projections`, for projection files.

Validation checks every group's head against its certificate chain and every snapshot against
its certificate, its chain entry and (deep) its state hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from anvil.personaldb import certs, rowauth
from anvil.personaldb.service import KEY_FILE, chain_problems, public_keys, snapshot_problems
from anvil.storage.records import Connection, table_exists
from anvil.storage.recovery import BlobRef, Finding, Participant, RecoveryContext

TABLES = ("pdb_groups", "pdb_schemas", "pdb_log", "pdb_snapshots", "pdb_keys", "pdb_bindings")
MAX_FINDINGS = 50
MAX_FIXTURES = 5


def summary(conn: Connection) -> dict[str, Any]:
    # A deployment without groups records just that (keeps `backup inspect` tables narrow).
    if not table_exists(conn, "pdb_groups") or conn.execute("SELECT count(*) FROM pdb_groups").fetchone()[0] == 0:
        return {"groups": 0}
    digest = hashlib.sha256()
    fixtures = []
    for name, tenant, genesis, idx, h in conn.execute(
            "SELECT name, tenant, genesis, head_index, head_hash FROM pdb_groups ORDER BY name"):
        digest.update(f"{name}\t{idx}\t{h}\n".encode())
        if len(fixtures) < MAX_FIXTURES:
            fixtures.append({"group": name, "tenant": tenant, "genesis": genesis, "head_index": idx, "head_hash": h})
    bindings = hashlib.sha256()
    n_bindings = 0
    if table_exists(conn, "pdb_bindings"):
        for grp, text in conn.execute("SELECT grp, binding FROM pdb_bindings ORDER BY grp"):
            bindings.update(f"{grp}\t{text}\n".encode())
            n_bindings += 1
    return {
        "groups": int(conn.execute("SELECT count(*) FROM pdb_groups").fetchone()[0]),
        # Row bindings (row permissions by relationship): how many, and a digest of each group's.
        "bindings": n_bindings,
        "bindings_digest": bindings.hexdigest(),
        "entries": int(conn.execute("SELECT count(*) FROM pdb_log").fetchone()[0]),
        "snapshots": int(conn.execute("SELECT count(*) FROM pdb_snapshots").fetchone()[0]),
        "schemas": int(conn.execute("SELECT count(*) FROM pdb_schemas").fetchone()[0]),
        "key_ids": sorted(public_keys(conn)),
        "heads_digest": digest.hexdigest(),
        "fixtures": fixtures,
    }


class PersonalDbParticipant(Participant):
    name = "personaldb"
    kind = "source"
    covers = ["personaldb"]
    owns = [f"catalog.db: {', '.join(TABLES)}", f"secrets/{KEY_FILE} (only when escrowed)"]
    tables = list(TABLES)
    replays = ("pdb.",)

    def __init__(self, binding_problem: Any = None):
        # binding_problem(conn, tenant, resource_type, {op: permission}) -> why a row binding does not fit
        # its tenant's authz schema, or None (composed by the runtime: anvil.authz.rows.binding_problem).
        self.binding_problem = binding_problem

    # -- capabilities ---------------------------------------------------------------------

    def migrations(self) -> dict[str, list[str]]:
        from anvil.personaldb.service import MIGRATIONS

        return {"personaldb": MIGRATIONS}

    def apply(self, ctx: RecoveryContext, event: Any) -> None:
        from anvil.personaldb import replay

        replay.apply(ctx.conn, event)

    def event_blobs(self, event: Any) -> Iterator[tuple[str, int]]:
        """A snapshot's file (continuous archiving ships it with its event)."""
        if event.kind == "pdb.snapshot":
            yield event.payload["sha256"], int(event.payload["size"])

    def blob_references(self, ctx: RecoveryContext) -> Iterator[BlobRef]:
        if not table_exists(ctx.conn, "pdb_snapshots"):
            return
        for grp, idx, sha, size, tenant in ctx.conn.execute(
                "SELECT s.grp, s.idx, s.sha256, s.size, g.tenant FROM pdb_snapshots s "
                "LEFT JOIN pdb_groups g ON g.name = s.grp ORDER BY s.grp, s.idx"):
            yield BlobRef(sha, size, f"personaldb {grp} snapshot {idx}", {"tenant": tenant or "", "group": grp,
                                                                         "snapshot": idx},
                          "personaldb.snapshot_missing")

    def key_ids(self, ctx: RecoveryContext) -> list[str]:
        return sorted(public_keys(ctx.conn)) if table_exists(ctx.conn, "pdb_keys") else []

    def files(self, ctx: RecoveryContext) -> list[Path]:
        p = ctx.root / "secrets" / KEY_FILE
        return [p] if ctx.escrow_secrets and p.is_file() else []

    # -- the six operations -----------------------------------------------------------------

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        return summary(ctx.conn)

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        out: list[Finding] = []
        conn = ctx.conn
        ctx.checked.update({"personaldb.chain", "personaldb.snapshot", "personaldb.orphan",
                            "personaldb.summary_differs"})
        if self.binding_problem is not None:
            ctx.checked.add("personaldb.binding_invalid")
        if not table_exists(conn, "pdb_groups"):
            return out
        with conn:
            groups = [r[0] for r in conn.execute("SELECT name FROM pdb_groups ORDER BY name")]
            for g in groups:
                for p in chain_problems(conn, g):
                    out.append(self.finding("error", f"group {g}", p, "personaldb.chain", {"group": g}))
                for p in snapshot_problems(conn, ctx.blobs, g, deep=ctx.deep):
                    out.append(self.finding("error", f"group {g}", p, "personaldb.snapshot", {"group": g}))
            for table in ("pdb_schemas", "pdb_log", "pdb_snapshots") + (
                    ("pdb_bindings",) if table_exists(conn, "pdb_bindings") else ()):
                for (g,) in conn.execute(f"SELECT DISTINCT t.grp FROM {table} t LEFT JOIN pdb_groups g "
                                         "ON g.name = t.grp WHERE g.name IS NULL"):
                    out.append(self.finding("error", f"group {g}", f"{table} rows of a group that does not exist",
                                            "personaldb.orphan", {"group": g}))
            if self.binding_problem is not None and table_exists(conn, "pdb_bindings"):
                # A binding its schema no longer supports refuses every row (fail closed); say so.
                for grp, tenant, text in conn.execute("SELECT grp, tenant, binding FROM pdb_bindings ORDER BY grp"):
                    b = rowauth.binding_from_json(text)
                    why = self.binding_problem(conn, tenant, b.resource_type, b.permissions())
                    if why:
                        out.append(self.finding("error", f"group {grp}", f"its row binding does not fit the authz "
                                                f"schema: {why}; every row change is refused",
                                                "personaldb.binding_invalid", {"group": grp}))
            if recorded:
                now = summary(conn)
                for field in ("groups", "entries", "snapshots", "schemas", "key_ids", "heads_digest", "bindings",
                              "bindings_digest"):
                    if field in recorded and recorded[field] != now.get(field):
                        out.append(self.finding("error", f"personaldb {field}",
                                                f"restored {now.get(field)!r}, recorded {recorded[field]!r}",
                                                "personaldb.summary_differs", {"field": field}))
        if len(out) > MAX_FINDINGS:
            out = out[:MAX_FINDINGS] + [self.finding("error", "personaldb", f"{len(out) - MAX_FINDINGS} more")]
        if not out:
            s = summary(conn)
            out.append(self.finding("info", "personaldb",
                                    f"{s['groups']} groups: {s.get('entries', 0)} log entries verify against their "
                                    f"certificates up to each head; {s.get('snapshots', 0)} snapshots verified"))
        return out

    def smoke(self, client: Any, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        """Catch up every recorded fixture group from genesis through the API and verify the chain
        with the published keys: it must end exactly at the recorded head."""
        out: list[Finding] = []
        fixtures = (recorded or {}).get("fixtures") or []
        if not fixtures:
            return [self.finding("info", "personaldb", "no group recorded: nothing to catch up")]
        try:
            keys = {k["key_id"]: k["public"] for k in client.pdb_keys()}
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            return [self.finding("error", "personaldb keys", f"the witness keys are unreadable: {e}")]
        for fx in fixtures:
            g = fx["group"]
            try:
                certs_list: list[dict[str, Any]] = []
                after_index, after_hash = 0, fx["genesis"]
                while True:
                    page = client.pdb_catch_up(g, after_index, after_hash, certificates_only=True)
                    certs_list += [e["certificate"] for e in page["entries"]]
                    if page["status"] != "ok" or not page["entries"] or not page["more"]:
                        break
                    after_index, after_hash = page["entries"][-1]["index"], page["entries"][-1]["hash"]
                res = certs.verify_chain(g, fx["genesis"], certs_list, keys)
                if (res["head_index"], res["head_hash"]) != (fx["head_index"], fx["head_hash"]):
                    out.append(self.finding("error", f"group {g}",
                                            f"catch-up ends at {res['head_index']}, recorded head {fx['head_index']}",
                                            "personaldb.smoke"))
            except Exception as e:  # noqa: BLE001
                out.append(self.finding("error", f"group {g}", f"catch-up failed: {e}", "personaldb.smoke"))
        if not out:
            out.append(self.finding("info", "personaldb", f"{len(fixtures)} groups caught up from genesis to their "
                                                          "recorded heads with verified certificates"))
        return out


class ProjectionsParticipant(Participant):
    """Derived: each projection's database and the source mirrors it is derived through
    (`derived/personaldb/`), rebuilt from the projection definitions and the source groups' logs."""

    # Short on purpose: `backup inspect` prints participant names in an 80-column table.
    name = "projections"
    kind = "derived"
    covers = ["personaldb"]
    owns = ["derived/personaldb/"]
    tables: list[str] = []

    def __init__(self, relations: Any = None):
        # relations(conn, tenant): relation filters by relationships (composed by the runtime,
        # anvil.authz.rows.relations_at); without it, or for a tenant without a schema, scopes decide.
        self.relations = relations

    def files(self, ctx: RecoveryContext) -> list[Path]:
        return []  # derived: rebuilt after a restore, never copied

    def _expected(self, ctx: RecoveryContext) -> dict[str, Any]:
        """Rebuild into a scratch root and report the state hashes the files should have."""
        import tempfile

        from anvil.personaldb.projections import Projections
        from anvil.personaldb.service import rebuild_projections

        with tempfile.TemporaryDirectory(prefix="anvil-pdb-check-") as d:
            names = rebuild_projections(ctx.conn, ctx.blobs, Path(d), relations=self.relations)
            scratch = Projections(Path(d))
            out = {n: scratch.state(n) for n in names}
            groups = {p.stem for p in (scratch.dir / "mirrors").glob("*.sqlite")}
            out.update({f"mirror:{g}": _state_of(scratch.mirror_path(g)) for g in groups})
            return out

    def _actual(self, ctx: RecoveryContext, expected: dict[str, Any]) -> dict[str, Any]:
        from anvil.personaldb.projections import Projections

        store = Projections(ctx.root)
        out: dict[str, Any] = {}
        for key in expected:
            if key.startswith("mirror:"):
                out[key] = _state_of(store.mirror_path(key[len("mirror:"):]))
            else:
                try:
                    out[key] = store.state(key)
                except Exception as e:  # noqa: BLE001 - an unreadable file is the finding
                    out[key] = f"unreadable: {e}"
        return out

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        if not table_exists(ctx.conn, "pdb_projections"):
            return {"projections": 0}
        return {"projections": int(ctx.conn.execute("SELECT count(*) FROM pdb_projections").fetchone()[0])}

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        ctx.checked.add("personaldb.projection_stale")
        if not table_exists(ctx.conn, "pdb_projections"):
            return []
        expected = self._expected(ctx)
        actual = self._actual(ctx, expected)
        out = [self.finding("error", f"projection {k}",
                            "missing" if actual[k] is None else "differs from a rebuild from source"
                            + ("" if not str(actual[k]).startswith("unreadable") else f" ({actual[k]})"),
                            "personaldb.projection_stale", {"projection": k})
               for k in sorted(expected) if actual[k] != expected[k]]
        if not out:
            out.append(self.finding("info", "projections",
                                    f"{len(expected)} projection and mirror files match a rebuild from source"))
        return out

    def rebuild(self, ctx: RecoveryContext) -> list[Finding]:
        from anvil.personaldb.service import rebuild_projections

        if not table_exists(ctx.conn, "pdb_projections"):
            return []
        names = rebuild_projections(ctx.conn, ctx.blobs, ctx.root, relations=self.relations)
        return [self.finding("info", "projections", f"rebuilt {len(names)} projections from source")]


def _state_of(path: Path) -> str | None:
    from anvil.storage import sqlitefile as sf

    if not path.exists():
        return None
    try:
        db = sf.Database(path)
        try:
            return db.state_hash()
        finally:
            db.close()
    except Exception as e:  # noqa: BLE001
        return f"unreadable: {e}"
