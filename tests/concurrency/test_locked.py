"""The lock wrapper itself: it holds the model lock for the call and keeps the wrapped
method's parameters (names, kinds, defaults), errors and results exactly -- built (the C
``LockedCall`` around the C ``RLock`` of ``_lockcall.c``) and pure (a wrapper generated in
Python around ``threading.RLock``) alike; and the C lock behaves as ``threading.RLock``."""

from __future__ import annotations

import inspect
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from iommufd_model import locking


@pytest.fixture(params=["C", "pure"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The wrappers ``locked`` makes from here on: the built ones, or the pure build's."""
    if request.param == "C" and locking._C is None:
        pytest.skip("_lockcall is not built in this build")
    if request.param == "pure":
        monkeypatch.setattr(locking, "_C", None)
        monkeypatch.setattr(locking, "MODEL_LOCK", threading.RLock())
    yield str(request.param)


def _owned() -> bool:
    return bool(locking.MODEL_LOCK._is_owned())


def make_target() -> Any:
    @locking.serialized()
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

    return Target


def test_calls_hold_the_lock_and_pass_every_argument_kind(impl: str) -> None:
    target = make_target()
    t = target()
    assert t.plain(1) == (1, 2, True)
    assert t.plain(b=5, a=4) == (4, 5, True)
    assert target.plain(t, 6) == (6, 2, True)  # through the class, self explicit
    assert t.kinds(1, 2, 7, 8, d=4, e=9) == (1, 2, (7, 8), 3, 4, {"e": 9}, True)
    assert t.kinds(1, b=2, d=4, c=0) == (1, 2, (), 0, 4, {}, True)
    assert t.keyword_only() == (False, True)
    assert t.keyword_only(flag=True) == (True, True)
    bound = t.plain
    assert bound(7) == (7, 2, True)
    assert not _owned()


def test_signature_errors_and_release_match_the_wrapped_function(impl: str) -> None:
    target = make_target()
    t = target()
    for wrapped in (target.plain, target.kinds, target.keyword_only):
        assert getattr(wrapped, "__model_locked__", False)
        assert inspect.signature(wrapped) == inspect.signature(wrapped.__wrapped__)
        assert wrapped.__name__ == wrapped.__wrapped__.__name__
        assert wrapped.__doc__ == wrapped.__wrapped__.__doc__
    with pytest.raises(TypeError):
        t.kinds(1, 2)  # d is required
    with pytest.raises(TypeError):
        t.kinds(a=1, b=2, d=3)  # a is positional-only
    with pytest.raises(OSError) as info:
        t.fails()
    assert info.value.errno == 22
    assert not _owned()  # released on the way out of an error


def test_locked_wraps_callables_without_python_code(impl: str) -> None:
    wrapped = locking.locked(len)
    assert wrapped([1, 2]) == 2
    assert not _owned()


def test_another_thread_waits_for_the_holder(impl: str) -> None:
    """A wrapped call in one thread keeps a second thread's wrapped call out until it ends."""
    inside = threading.Event()
    go_on = threading.Event()
    order: list[str] = []

    @locking.locked
    def first() -> None:
        inside.set()
        go_on.wait(5)
        order.append("first")

    @locking.locked
    def second() -> None:
        order.append("second")

    t1 = threading.Thread(target=first)
    t1.start()
    assert inside.wait(5)
    t2 = threading.Thread(target=second)
    t2.start()
    time.sleep(0.05)
    assert order == []  # second is waiting for the lock
    go_on.set()
    t1.join(5)
    t2.join(5)
    assert order == ["first", "second"]


LOCKS = ["threading", "C"]


def new_lock(kind: str) -> Any:
    if kind == "C":
        if locking._C is None:
            pytest.skip("_lockcall is not built in this build")
        return locking._C.RLock()
    return threading.RLock()


def in_thread(fn: Any) -> Any:
    """``fn()`` in a new thread: its result, or its exception raised here."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # handed to the caller's thread
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(5)
    if isinstance(out[0], Exception):
        raise out[0]
    return out[0]


@pytest.mark.parametrize("kind", LOCKS)
def test_the_lock_behaves_as_threading_rlock(kind: str) -> None:
    lock = new_lock(kind)
    with pytest.raises(RuntimeError):
        lock.release()  # not held
    assert lock.acquire() is True
    assert lock.acquire(False) is True  # re-entered
    assert lock.acquire(timeout=0.5) is True
    assert lock._is_owned()
    assert in_thread(lambda: lock._is_owned()) is False
    assert in_thread(lambda: lock.acquire(False)) is False
    start = time.monotonic()
    assert in_thread(lambda: lock.acquire(timeout=0.05)) is False
    assert time.monotonic() - start >= 0.04
    with pytest.raises(RuntimeError):
        in_thread(lambda: lock.release())  # another thread's lock
    for _ in range(3):
        lock.release()
    assert not lock._is_owned()
    with pytest.raises(RuntimeError):
        lock.release()
    assert in_thread(lambda: (lock.acquire(False), lock.release())[0]) is True
    with lock, lock:
        assert lock._is_owned()
    assert not lock._is_owned()
    with pytest.raises(ValueError):
        lock.acquire(False, 1)  # no timeout for a non-blocking call
    with pytest.raises(ValueError):
        lock.acquire(timeout=-2)
    with pytest.raises(TypeError):
        lock.acquire(sometime=1)
    assert not lock._is_owned()


class _Interrupted(Exception):
    pass


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted


@pytest.mark.parametrize("kind", LOCKS)
@pytest.mark.parametrize("timeout", [-1, 5.0], ids=["forever", "timed"])
def test_a_signal_handler_runs_while_a_thread_waits_for_the_lock(kind: str, timeout: float) -> None:
    """The main thread waiting for a lock another thread holds runs its signal handlers, and
    an exception they raise ends the wait (the lock not taken), as with threading.RLock."""
    lock = new_lock(kind)
    held, done = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            held.set()
            done.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    old = signal.signal(signal.SIGALRM, _interrupt)
    try:
        assert held.wait(10)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(_Interrupted):
            lock.acquire(timeout=timeout)
        assert not lock._is_owned()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        done.set()
        thread.join()
    assert lock.acquire(timeout=5) is True
    lock.release()


@pytest.mark.parametrize("kind", LOCKS)
def test_a_condition_wait_releases_every_level_and_restores_them(kind: str) -> None:
    lock = new_lock(kind)
    cond = threading.Condition(lock)
    seen: list[bool] = []

    def other() -> None:
        with cond:  # possible only while the waiter has released every level
            seen.append(True)
            cond.notify_all()

    with lock, cond:  # held twice
        t = threading.Thread(target=other)
        t.start()
        assert cond.wait_for(lambda: bool(seen), 5)
        assert lock._is_owned()
        lock.release()  # one level left after the wait ...
        assert lock._is_owned()
        lock.acquire()
    t.join(5)
    assert seen == [True]
    assert not lock._is_owned()


def test_the_c_lock_counts_its_acquisitions() -> None:
    lock = new_lock("C")
    before = lock.acquisitions
    with lock, lock:
        pass
    assert lock.acquire(False)
    lock.release()
    assert in_thread(lambda: lock.acquire(timeout=0)) is True  # taken by a thread that ends
    assert lock.acquisitions - before == 4
