"""Bounded hypothesis fuzz of every harness: random bytes and mutations of the seeds. Any
FuzzBug or non-OSError exception fails; the outcome itself is free (replay pins those)."""

from __future__ import annotations

import pytest
from all_harnesses import REGISTRY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

#: examples per harness: 32 harnesses x 40 examples stay under a minute on 2 cores
EXAMPLES = 40
_SEEDS: dict[str, list[bytes]] = {}


def _seeds(key: str) -> list[bytes]:
    if key not in _SEEDS:
        _SEEDS[key] = REGISTRY[key].seeds() or [b""]
    return _SEEDS[key]


def _mutate(seed: bytes, flips: list[tuple[int, int]], tail: bytes) -> bytes:
    out = bytearray(seed)
    for pos, val in flips:
        if out:
            out[pos % len(out)] = val
    return bytes(out) + tail


@pytest.mark.parametrize("key", sorted(REGISTRY))
def test_fuzz(key: str) -> None:
    h = REGISTRY[key]
    seeds = _seeds(key)
    mutated = st.builds(
        _mutate, st.sampled_from(seeds),
        st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), max_size=6),
        st.sampled_from([b"", b"\0" * 8, b"\xff" * 8]),
    )  # fmt: skip
    inputs = st.one_of(mutated, st.binary(max_size=2 * h.size))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(inputs)
    def run(data: bytes) -> None:
        h.run(data)

    run()
