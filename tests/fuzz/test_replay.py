"""Replay every corpus input through its harness: the outcome must be the one the manifest
pins (a changed signature is a behaviour change to explain, then re-pin with grow.py)."""

from __future__ import annotations

import pytest
from all_harnesses import REGISTRY
from fuzzlib import corpus_entries, corpus_path

ENTRIES = corpus_entries()


@pytest.mark.parametrize(("key", "name", "expected"), ENTRIES,
                         ids=[f"{k}/{n}" for k, n, _ in ENTRIES])  # fmt: skip
def test_replay(key: str, name: str, expected: str) -> None:
    data = corpus_path(key, name).read_bytes()
    assert REGISTRY[key].run(data) == expected


def test_every_harness_has_a_corpus() -> None:
    keys = {k for k, _, _ in ENTRIES}
    assert set(REGISTRY) <= keys, sorted(set(REGISTRY) - keys)


def test_corpus_files_are_in_the_manifest() -> None:
    from fuzzlib import CORPUS

    listed = {corpus_path(k, n) for k, n, _ in ENTRIES}
    on_disk = set(CORPUS.glob("*/*/*.bin"))
    assert on_disk == listed
