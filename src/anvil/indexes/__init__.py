"""Indexes and search: definitions (source), generations built from the journal (derived), queries."""

from anvil.indexes.service import IndexService

__all__ = ["IndexService"]
