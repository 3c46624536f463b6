"""Diagnostics: findings (source records), fsck, gc and repair.

Recovery-participant functions for the backup engine: `summary(conn)` and `validate(conn, expected)`.
"""

from anvil.diagnostics.findings import (
    SEVERITIES,
    Finding,
    list_findings,
    make_finding,
    record,
    redact_for,
    resolve,
    summary,
    validate,
)
from anvil.diagnostics.fsck import FsckReport, Progress, Target, run_fsck
from anvil.diagnostics.gc import GcReport, run_gc
from anvil.diagnostics.repair import DerivedFamily, RepairContext, register_family, run_repair, unregister_family
from anvil.diagnostics.service import Diagnostics, open_offline, open_offline_target

__all__ = [
    "SEVERITIES", "DerivedFamily", "Diagnostics", "Finding", "FsckReport", "GcReport", "Progress", "RepairContext",
    "Target", "list_findings", "make_finding", "open_offline", "open_offline_target", "record", "redact_for",
    "register_family", "resolve", "run_fsck", "run_gc", "run_repair", "summary",
    "unregister_family", "validate",
]
