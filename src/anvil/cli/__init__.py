"""The `anvil` command line."""
