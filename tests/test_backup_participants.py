"""The participant contract: extra files travel with a snapshot, derived state is rebuilt, coverage is honest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from anvil.backup import engine
from anvil.backup import mode as recovery
from anvil.backup.backends.local import LocalBackend
from anvil.backup.repository import Repository
from anvil.backup.restore import restore
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil, recovery_participants
from anvil.storage import Storage
from anvil.storage.recovery import CHECKLIST_IDS, Finding, Participant, RebuildRefused, RecoveryContext, coverage


class FakeIndexParticipant(Participant):
    """A derived family with one published generation file (stands in for a real index)."""

    name = "test-index"
    kind = "derived"
    covers = ["fulltext"]
    owns = ["derived/test-index/"]

    def __init__(self) -> None:
        self.rebuilt = 0

    def _path(self, ctx: RecoveryContext) -> Path:
        return ctx.root / "derived" / "test-index" / "1" / "MANIFEST.json"

    def files(self, ctx: RecoveryContext) -> list[Path]:
        return [self._path(ctx)]

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        return {"generation": 1}

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        body = json.loads(self._path(ctx).read_text())
        if body.get("cursor") != "ok":
            return [self.finding("error", "generation 1", "manifest does not match its files")]
        return [self.finding("info", "generation 1", "valid")]

    def rebuild(self, ctx: RecoveryContext) -> list[Finding]:
        self.rebuilt += 1
        self._path(ctx).write_text(json.dumps({"cursor": "ok", "files": []}))
        return [self.finding("info", "generation 1", "rebuilt from source records")]


def test_files_restore_and_derived_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    anvil = Anvil(tmp_path / "data")
    fake = FakeIndexParticipant()
    parts = [*recovery_participants(), fake]
    try:
        anvil.objects.create_bucket(RequestContext(DEV_PRINCIPAL), "idx-bucket")
        gen = tmp_path / "data" / "derived" / "test-index" / "1"
        gen.mkdir(parents=True)
        (gen / "MANIFEST.json").write_text(json.dumps({"cursor": "stale", "files": []}))
        repo = Repository.init(LocalBackend(tmp_path / "repo"), "pw")
        m = engine.create_snapshot(anvil.storage.root, anvil.storage.layout.catalog_path, anvil.storage.blobs,
                                   anvil.storage.layout.tmp, anvil.storage.format.deployment_id, parts, repo,
                                   escrow_secrets=True)
    finally:
        anvil.close()
    assert "derived/test-index/1/MANIFEST.json" in m["tree"]["files"]
    cov = {c["item"]: c["participants"] for c in m["coverage"]}
    # The registered `indexes` participant (anvil.indexes) covers full text and vectors too.
    assert cov["fulltext"] == ["indexes", "test-index"] and cov["vector"] == ["indexes"]
    restore(repo, m, tmp_path / "restored", parts)
    restored = tmp_path / "restored" / "derived" / "test-index" / "1" / "MANIFEST.json"
    assert json.loads(restored.read_text()) == {"cursor": "stale", "files": []}
    storage = Storage(tmp_path / "restored")
    try:
        report = recovery.validate(storage, parts)
    finally:
        storage.close()
    assert fake.rebuilt == 1 and report["rebuilt"] == ["test-index"] and report["ok"]
    step = next(s for s in report["steps"] if s["step"] == "validate index generations")
    assert step["participants"] == ["indexes", "test-index"] and step["status"] == "passed"
    assert [f["severity"] for f in step["findings"] if f["participant"] == "test-index"] == ["warning", "info", "info"]
    assert json.loads(restored.read_text()) == {"cursor": "ok", "files": []}


def test_source_participants_cannot_rebuild_and_coverage_lists_every_item() -> None:
    parts = recovery_participants()
    with pytest.raises(RebuildRefused, match="cannot be rebuilt"):
        parts[0].rebuild(None)  # type: ignore[arg-type]
    cov = coverage(p.describe() for p in parts)
    assert [c["item"] for c in cov] == CHECKLIST_IDS
    covered = {c["item"] for c in cov if c["participants"]}
    assert covered == {"object-bodies", "object-journal", "bucket-metadata", "path-indexes", "secrets", "watch",
                       "diagnostics", "authz", "artefacts", "personaldb", "metadata-indexes", "fulltext",
                       "vector"}
