"""Anvil: an object store with a complete recovery model."""

__version__ = "0.1.0"

# Where `anvil serve` listens by default, and so where the SDK and the CLI look without --endpoint
# (here, not in anvil.client, so that the CLI knows it without importing the SDK).
DEFAULT_ENDPOINT = "http://127.0.0.1:9000"
