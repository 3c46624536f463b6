"""Anvil: an object store with a complete recovery model."""

__version__ = "0.1.0"
