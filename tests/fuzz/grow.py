"""Grow the corpus: mutate inputs for a time budget and keep each input whose outcome
signature is new for its harness (coverage of outcomes, so the corpus stays small).

    python tests/fuzz/grow.py --seconds 60 [--only amd/] [--repin]

``--repin`` re-runs every corpus input and rewrites the manifest with today's signatures
(after a deliberate behaviour change). A FuzzBug or unexpected exception is printed with
the input's hex and the input is saved under ``crashes/`` for triage (never to the corpus).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from all_harnesses import REGISTRY
from fuzzlib import (
    HERE,
    MAX_INPUT,
    add_to_corpus,
    corpus_entries,
    corpus_path,
    digest,
    load_manifest,
    save_manifest,
)

INTERESTING = [0, 1, 3, 7, 0x67, 0x80, 0xE7, 0xFF]


def mutate(rng: random.Random, data: bytes, pool: list[bytes], size: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(7)
        if op == 0 and out:  # flip a bit
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and out:  # an interesting byte
            out[rng.randrange(len(out))] = rng.choice(INTERESTING)
        elif op == 2 and len(out) >= 8:  # copy a word from another input (pointers)
            other = rng.choice(pool)
            if len(other) >= 8:
                j = rng.randrange(len(other) - 7) & ~7
                i = rng.randrange(len(out) - 7) & ~7
                out[i : i + 8] = other[j : j + 8]
        elif op == 3:  # truncate or extend
            out = out[: rng.randrange(len(out) + 1)] if rng.randrange(2) else out + bytes(8)
        elif op == 4:  # random bytes
            out = bytearray(rng.randbytes(rng.randrange(1, 2 * size + 1)))
        elif op == 5 and out:  # set/clear a high bit of a word (reserved bits, addresses)
            i = (rng.randrange(len(out)) & ~7) + rng.randrange(4, 8)
            if i < len(out):
                out[i] ^= 1 << rng.randrange(8)
        elif op == 6 and len(out) >= 16:  # duplicate a word (loops)
            i = rng.randrange(len(out) - 7) & ~7
            out += out[i : i + 8]
    return bytes(out[:MAX_INPUT])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--only", default="")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repin", action="store_true")
    args = ap.parse_args()
    manifest = load_manifest()
    if args.repin:
        for key, name, _ in corpus_entries():
            manifest[key][name] = REGISTRY[key].run(corpus_path(key, name).read_bytes())
        save_manifest(manifest)
    keys = [k for k in sorted(REGISTRY) if k.startswith(args.only)]
    rng = random.Random(args.seed)
    runs = bugs = added = 0
    pools: dict[str, list[bytes]] = {}
    seen: dict[str, set[str]] = {}
    for key in keys:
        pools[key] = [corpus_path(key, n).read_bytes() for n in manifest.get(key, {})]
        seen[key] = set(manifest.get(key, {}).values())
        for seed in REGISTRY[key].seeds():  # seeds always offered first
            pools[key].append(seed)
    crashes = HERE / "crashes"
    start = time.monotonic()
    budget = args.seconds
    queue = [(k, s) for k in keys for s in pools[k]]
    while True:
        if queue:
            key, data = queue.pop(0)
        else:
            if time.monotonic() - start > budget:
                break
            key = rng.choice(keys)
            data = mutate(rng, rng.choice(pools[key]), pools[key], REGISTRY[key].size)
        runs += 1
        try:
            sig = REGISTRY[key].run(data)
        except Exception:
            bugs += 1
            crashes.mkdir(exist_ok=True)
            (crashes / f"{key.replace('/', '_')}-{digest(data)}.bin").write_bytes(data)
            print(f"BUG {key} {data.hex()}\n{traceback.format_exc(limit=4)}", file=sys.stderr)
            continue
        if sig not in seen[key]:
            seen[key].add(sig)
            pools[key].append(data)
            add_to_corpus(manifest, key, data, sig)
            added += 1
    save_manifest(manifest)
    total = sum(len(v) for v in manifest.values())
    print(
        f"{runs} runs in {time.monotonic() - start:.1f} s, {added} added, {bugs} bugs, "
        f"corpus {total} inputs over {len(manifest)} harnesses"
    )
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
