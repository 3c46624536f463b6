"""Diagnostics: findings (source records), fsck, gc and repair, all over the recovery participants."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# name -> the submodule that defines it. Loaded on first use (PEP 562): `anvil fsck` imports
# `anvil.diagnostics.fsck`, which must not pull in gc, repair and the service (and through
# them the object service) just because this package's __init__ runs first.
_WHERE = {
    **dict.fromkeys(["SEVERITIES", "FindingRecord", "list_findings", "make_finding", "record", "redact_for",
                     "resolve", "summary", "validate"], "findings"),
    **dict.fromkeys(["FsckReport", "Target", "run_fsck"], "fsck"),
    **dict.fromkeys(["GcReport", "run_gc"], "gc"),
    "run_repair": "repair",
    **dict.fromkeys(["Diagnostics", "open_offline_target"], "service"),
}

__all__ = [
    "SEVERITIES", "Diagnostics", "FindingRecord", "FsckReport", "GcReport", "Target", "list_findings",
    "make_finding", "open_offline_target", "record", "redact_for", "resolve", "run_fsck", "run_gc", "run_repair",
    "summary", "validate",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"anvil.diagnostics.{where}"), name)
