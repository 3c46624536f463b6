"""Durable storage core: layout, catalog (SQLite), blobs and the journal.

The names below are imported on first use (PEP 562), not with the package: a command that needs
one submodule (`anvil fsck --deep` starts its checking children from `catalogcheck` and
`blobwalk` before anything else) does not pay for the catalog, the blob store and their
imports (~85 ms) first."""

from __future__ import annotations

import importlib

if False:  # for the annotations only: `typing` costs ~7 ms before fsck's children can start
    from typing import Any

    from anvil.storage.blobs import BlobInfo, BlobStore, BlobWriter
    from anvil.storage.catalog import Catalog, Txn
    from anvil.storage.journal import Event
    from anvil.storage.layout import FormatInfo, Layout
    from anvil.storage.store import Storage

_HOMES = {
    "BlobInfo": "blobs", "BlobStore": "blobs", "BlobWriter": "blobs", "Catalog": "catalog", "Txn": "catalog",
    "Event": "journal", "FormatInfo": "layout", "Layout": "layout", "Storage": "store",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:  # a submodule not imported yet: `from anvil.storage import x` imports it
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


__all__ = ["BlobInfo", "BlobStore", "BlobWriter", "Catalog", "Event", "FormatInfo", "Layout", "Storage", "Txn"]
