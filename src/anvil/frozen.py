"""Frozen dataclasses that cost one call to build: `fast_init`.

A frozen dataclass's generated `__init__` sets each field through `object.__setattr__` (its own
`__setattr__` refuses), one call per field: ~6 k instructions for three fields, ~8 k for five (callgrind,
CPython 3.11), and a small PUT made four or five such objects on its way (the request's context, its
body's digests, the bucket row, the journal event). `fast_init` gives the class an `__init__` with the
same parameters (names, order, defaults, default factories) that sets the instance's `__dict__` in one
call. The object is the same: equal, hashed, printed, copied by `dataclasses.replace`, pickled and frozen
as before. Imports nothing of Anvil: any layer may use it.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, TypeVar

C = TypeVar("C", bound=type)


def fast_init(cls: C) -> C:
    """Replace a frozen dataclass's `__init__` by one that sets all its fields at once (decorate above
    `@dataclass(frozen=True)`). Refuses (TypeError) what it would not reproduce exactly: a class that is
    not a frozen dataclass, has `__post_init__` or `__slots__`, or whose `__init__` takes anything but its
    fields as plain parameters (InitVar, `init=False`, keyword-only fields)."""
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} is not a frozen dataclass")
    if hasattr(cls, "__post_init__") or "__slots__" in cls.__dict__:
        raise TypeError(f"{cls.__name__} has __post_init__ or __slots__: its own __init__ is kept")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    expected = [p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"]
    if [p.name for p in expected] != names or "self" in names or \
            any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in expected):
        raise TypeError(f"{cls.__name__}.__init__ does not take exactly its fields")
    namespace: dict[str, Any] = {"_set": object.__setattr__, "_MISSING": dataclasses.MISSING}
    params, lines = [], []
    for i, f in enumerate(fields):
        if f.default is not dataclasses.MISSING:
            namespace[f"_default_{i}"] = f.default
            params.append(f"{f.name}=_default_{i}")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory_{i}"] = f.default_factory
            params.append(f"{f.name}=_MISSING")
            lines.append(f"    if {f.name} is _MISSING:\n        {f.name} = _factory_{i}()\n")
        else:
            params.append(f.name)
    values = ", ".join(f"{name!r}: {name}" for name in names)
    source = (f"def __init__(self, {', '.join(params)}):\n" + "".join(lines)
              + f"    _set(self, '__dict__', {{{values}}})\n")
    exec(source, namespace)  # noqa: S102 - generated from the field names, as dataclasses does
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[misc]
    return cls
