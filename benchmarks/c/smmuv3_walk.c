/* C reference walks for bench_smmuv3_walk.py: the VMSAv8-64 stage-1 walk (4 KiB granule) and
 * the nested walk (every stage-1 descriptor address and the output through stage 2, which
 * starts at level 0), over a flat copy of physical memory (physical address = offset). Rules
 * of plugins/arm_smmuv3/iommufd_arm_smmuv3/walk.py for read walks without AF/dirty updates:
 * valid, table/page/block, output address size, AF, APTable and AP[2:1] (stage 1), S2AP
 * (stage 2). A walk returns the physical address, or ~0 on any fault. Built with cc -O2. */
#include "walk_ref.h"

static const uint64_t OA = ((1ULL << 48) - 1) & ~0xFFFULL;

static uint64_t walk_s2(const uint8_t *mem, uint64_t size, uint64_t ttb, int ia_bits,
                        uint64_t ipa) {
    uint64_t table = ttb;
    if (ipa >> ia_bits) return FAULT;
    for (int level = 0;; level++) {
        int shift = 12 + 9 * (3 - level);
        int bits = level == 0 ? ia_bits - shift : 9;
        uint64_t slot = table + ((ipa >> shift) & mask(bits)) * 8;
        uint64_t d;
        if (!entry_at(mem, size, slot, &d)) return FAULT;
        if (!(d & 1)) return FAULT;
        if (level < 3 && (d & 2)) {
            table = d & OA;
            if (table >> 48) return FAULT;
            continue;
        }
        if ((level == 3 && !(d & 2)) || level == 0) return FAULT;
        uint64_t out = d & OA & ~mask(shift);
        if (!(d & (1 << 10)) || !(d & (1 << 6))) return FAULT;
        return out | (ipa & mask(shift));
    }
}

static uint64_t walk_s1(const uint8_t *mem, uint64_t size, uint64_t ttb, int ia_bits,
                        int nested, uint64_t s2_ttb, uint64_t va) {
    int start = 4 - (ia_bits - 12 + 8) / 9, unpriv = 1;
    uint64_t table = ttb;
    if (va >> ia_bits) return FAULT;
    for (int level = start;; level++) {
        int shift = 12 + 9 * (3 - level);
        int bits = level == start ? ia_bits - shift : 9;
        uint64_t slot = table + ((va >> shift) & mask(bits)) * 8;
        if (nested && (slot = walk_s2(mem, size, s2_ttb, 48, slot)) == FAULT) return FAULT;
        uint64_t d;
        if (!entry_at(mem, size, slot, &d)) return FAULT;
        if (!(d & 1)) return FAULT;
        if (level < 3 && (d & 2)) {
            table = d & OA;
            if (table >> 48) return FAULT;
            if (d >> 61 & 1) unpriv = 0;
            continue;
        }
        if ((level == 3 && !(d & 2)) || level == 0 || !(d & (1 << 10))) return FAULT;
        if (!unpriv || !(d & (1 << 6))) return FAULT;
        uint64_t ipa = (d & OA & ~mask(shift)) | (va & mask(shift));
        return nested ? walk_s2(mem, size, s2_ttb, 48, ipa) : ipa;
    }
}

uint64_t bench_s1(const uint8_t *mem, uint64_t size, const uint64_t *vas, uint64_t n,
                  uint64_t rounds, uint64_t ttb, uint64_t ia_bits) {
    BENCH_LOOP(vas, n, rounds, x, walk_s1(mem, size, ttb, (int)ia_bits, 0, 0, x));
}

uint64_t bench_nested(const uint8_t *mem, uint64_t size, const uint64_t *vas, uint64_t n,
                      uint64_t rounds, uint64_t ttb, uint64_t s2_ttb, uint64_t ia_bits) {
    BENCH_LOOP(vas, n, rounds, x, walk_s1(mem, size, ttb, (int)ia_bits, 1, s2_ttb, x));
}
