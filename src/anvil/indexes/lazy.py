"""A module imported on first use, for heavy optional libraries (see indexes.engine)."""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands for a module until an attribute is read, then imports it once."""

    def __init__(self, name: str):
        self._name = name
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        # Only called for names the proxy itself lacks, i.e. the module's.
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)
