"""`anvil.frozen.fast_init`: the same objects as the dataclass's own `__init__` makes, for less."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from dataclasses import dataclass, field

import pytest

from anvil.context import RequestContext
from anvil.frozen import fast_init
from anvil.objects.service import Bucket, ObjectVersion
from anvil.storage.blobs import BlobInfo, InlineBody
from anvil.storage.journal import Event


def _factory() -> list[int]:
    return [0]


@dataclass(frozen=True)
class _Plain:
    a: str
    b: int = 3
    c: list[int] = field(default_factory=_factory)
    d: bytes = field(default=b"", repr=False, compare=False)


@fast_init
@dataclass(frozen=True)
class _Fast:
    a: str
    b: int = 3
    c: list[int] = field(default_factory=_factory)
    d: bytes = field(default=b"", repr=False, compare=False)


def _same(plain: object, fast: object) -> None:
    assert vars(plain) == vars(fast) and list(vars(plain)) == list(vars(fast))  # same fields, same order
    assert repr(plain).split("(", 1)[1] == repr(fast).split("(", 1)[1]


def test_fast_init_makes_what_the_dataclass_makes() -> None:
    assert [p.name for p in inspect.signature(_Fast).parameters.values()] == ["a", "b", "c", "d"]
    for args, kwargs in [(("x",), {}), (("x", 5), {}), (("x",), {"c": [9]}), ((), {"a": "y", "d": b"q", "b": 0})]:
        _same(_Plain(*args, **kwargs), _Fast(*args, **kwargs))
    one, two = _Fast("x"), _Fast("x")
    assert one.c is not two.c  # a default factory runs per object
    assert _Fast("x", 1, [2], b"a") == _Fast("x", 1, [2], b"b") != _Fast("y", 1, [2])  # compare=False kept
    assert hash(_Fast("x", 1, (2,))) == hash(_Fast("x", 1, (2,)))  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.a = "z"  # type: ignore[misc]
    assert dataclasses.replace(one, b=7) == _Fast("x", 7, one.c)
    assert pickle.loads(pickle.dumps(one)) == one
    with pytest.raises(TypeError):
        _Fast()  # type: ignore[call-arg]  # a missing field is refused as before
    with pytest.raises(TypeError):
        _Fast("x", e=1)  # type: ignore[call-arg]


def test_fast_init_refuses_what_it_would_not_reproduce() -> None:
    @dataclass
    class Mutable:
        a: int

    @dataclass(frozen=True)
    class Post:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True)
    class NotInit:
        a: int
        b: int = field(default=0, init=False)

    @dataclass(frozen=True, kw_only=True)
    class KwOnly:
        a: int

    @dataclass(frozen=True)
    class WithInitVar:
        a: int
        b: dataclasses.InitVar[int] = 0

    for cls in (Mutable, Post, NotInit, KwOnly, WithInitVar):
        with pytest.raises(TypeError):
            fast_init(cls)


def test_the_hot_dataclasses_are_built_by_fast_init() -> None:
    """The classes a small PUT makes (and the journal's events, listings' versions): built in one step, and
    equal to what a plain dataclass of the same fields makes."""
    samples = {
        BlobInfo: ("a" * 64, "b" * 32, 5),
        InlineBody: ("a" * 64, "b" * 32, 5, b"hello"),
        Bucket: ("bkt", "t", 1.5, "", False),
        Event: (1, 2.5, "t", "object.put", "b/k", "t/s", "r", {"k": 1}, "0" * 64, "1" * 64),
        ObjectVersion: ("b", "k", "null", 1, True, False, 5, "e", "s", "text/plain", {}, [("s", 5)], 1.0,
                        {"x": 1}),
    }
    for cls, args in samples.items():
        assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"
        assert "_set" in cls.__init__.__globals__  # fast_init's, not the dataclass's own
        plain = dataclass(frozen=True)(type(cls.__name__, (), {"__annotations__": {
            f.name: f.type for f in dataclasses.fields(cls)}, **{
            f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}}))
        made = cls(*args)
        assert vars(made) == vars(plain(*args))
        assert made == cls(*args)
        if cls in (BlobInfo, InlineBody, Bucket):  # (the others hold dicts: unhashable, as before)
            assert hash(made) == hash(cls(*args))
    ctx = RequestContext(principal=None, request_id="r")  # type: ignore[arg-type]
    assert (ctx.request_id, ctx.idempotency_key) == ("r", None)
    assert RequestContext(principal=None).request_id != RequestContext(principal=None).request_id  # type: ignore[arg-type]
