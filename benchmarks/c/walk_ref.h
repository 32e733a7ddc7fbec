/* What the C reference walks (amd_walk.c, smmuv3_walk.c, vtd_walk.c) share: the fault marker,
 * bit masks, the bounds-checked read of an 8-byte entry from the flat copy of physical memory,
 * and the timed loop of every bench_* entry point (see c_reference() in benchmarks/_timing.py). */
#ifndef WALK_REF_H
#define WALK_REF_H
#include <stdint.h>

#define FAULT (~0ULL)

static inline uint64_t mask(int bits) { return (1ULL << bits) - 1; }

/* The entry at physical ``slot`` into *e; 0 when it is not inside memory (``slot`` may be
 * FAULT, from a failed walk of the slot's own address). */
static inline int entry_at(const uint8_t *mem, uint64_t size, uint64_t slot, uint64_t *e) {
    if (size < 8 || slot > size - 8) return 0;
    *e = *(const uint64_t *)(mem + slot);
    return 1;
}

/* The body of a bench_* entry point: ``rounds`` passes over the ``n`` inputs ``in``, each
 * bound to ``x`` in ``walk``, summing the results (so that no walk can be optimised away). */
#define BENCH_LOOP(in, n, rounds, x, walk)                                                        \
    uint64_t acc = 0;                                                                             \
    for (uint64_t r = 0; r < (rounds); r++)                                                       \
        for (uint64_t i = 0; i < (n); i++) {                                                      \
            uint64_t x = (in)[i];                                                                 \
            acc += (walk);                                                                        \
        }                                                                                         \
    return acc

#endif
