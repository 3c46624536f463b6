"""Diagnostics: findings (source records), fsck, gc and repair, all over the recovery participants."""

from anvil.diagnostics.findings import (
    SEVERITIES,
    FindingRecord,
    list_findings,
    make_finding,
    record,
    redact_for,
    resolve,
    summary,
    validate,
)
from anvil.diagnostics.fsck import FsckReport, Target, run_fsck
from anvil.diagnostics.gc import GcReport, run_gc
from anvil.diagnostics.repair import run_repair
from anvil.diagnostics.service import Diagnostics, open_offline_target

__all__ = [
    "SEVERITIES", "Diagnostics", "FindingRecord", "FsckReport", "GcReport", "Target", "list_findings",
    "make_finding", "open_offline_target", "record", "redact_for", "resolve", "run_fsck", "run_gc", "run_repair",
    "summary", "validate",
]
