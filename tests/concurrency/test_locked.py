"""The lock wrapper itself: it holds the model lock for the call and keeps the wrapped
method's parameters (names, kinds, defaults), errors and results exactly."""

from __future__ import annotations

import inspect

import pytest

from iommufd_model.locking import MODEL_LOCK, locked, serialized


def _owned() -> bool:
    return MODEL_LOCK._is_owned()  # type: ignore[attr-defined]


@serialized()
class Target:
    def plain(self, a: int, b: int = 2) -> tuple[int, int, bool]:
        return a, b, _owned()

    def kinds(
        self, a: int, /, b: int, *rest: int, c: int = 3, d: int, **more: int
    ) -> tuple[object, ...]:
        return a, b, rest, c, d, more, _owned()

    def keyword_only(self, *, flag: bool = False) -> tuple[bool, bool]:
        return flag, _owned()

    def fails(self) -> None:
        assert _owned()
        raise OSError(22, "bad")


def test_calls_hold_the_lock_and_pass_every_argument_kind() -> None:
    t = Target()
    assert t.plain(1) == (1, 2, True)
    assert t.plain(b=5, a=4) == (4, 5, True)
    assert t.kinds(1, 2, 7, 8, d=4, e=9) == (1, 2, (7, 8), 3, 4, {"e": 9}, True)
    assert t.kinds(1, b=2, d=4, c=0) == (1, 2, (), 0, 4, {}, True)
    assert t.keyword_only() == (False, True)
    assert t.keyword_only(flag=True) == (True, True)
    assert not _owned()


def test_signature_errors_and_release_match_the_wrapped_function() -> None:
    t = Target()
    for wrapped in (Target.plain, Target.kinds, Target.keyword_only):
        assert getattr(wrapped, "__model_locked__", False)
        assert inspect.signature(wrapped) == inspect.signature(wrapped.__wrapped__)  # type: ignore[attr-defined]
        assert wrapped.__name__ == wrapped.__wrapped__.__name__  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        t.kinds(1, 2)  # type: ignore[call-arg]  # d is required
    with pytest.raises(TypeError):
        t.kinds(a=1, b=2, d=3)  # type: ignore[call-arg]  # a is positional-only
    with pytest.raises(OSError):
        t.fails()
    assert not _owned()  # released on the way out of an error


def test_locked_wraps_callables_without_python_code() -> None:
    wrapped = locked(len)
    assert wrapped([1, 2]) == 2
    assert not _owned()
