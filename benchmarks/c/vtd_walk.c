/* C reference walks for bench_vtd_walk.py: the VT-d first stage (x86-64 rules, as the
 * framework's walk_x86), the second stage and the nested walk (first stage with every table
 * pointer and the output through the second stage), over a flat copy of physical memory
 * (physical address = offset). Rules of plugins/intel_vtd/iommufd_intel_vtd/walk.py for read
 * walks without A/D updates: first stage P, R/W, PS leaves at levels 1-2; second stage R|W
 * present, PS leaves where large_mask allows. A walk returns the physical address, or ~0 on
 * any fault. Built with cc -O2 at bench time. */
#include "walk_ref.h"

static const uint64_t ADDR = ((1ULL << 52) - 1) & ~0xFFFULL;

static uint64_t walk_fs(const uint8_t *mem, uint64_t size, uint64_t root, int levels,
                        uint64_t iova) {
    uint64_t table = root;
    if (iova >> (12 + 9 * levels)) return FAULT;
    for (int level = levels - 1; level >= 0; level--) {
        int shift = 12 + 9 * level;
        uint64_t slot = table + ((iova >> shift) & 0x1FF) * 8;
        uint64_t e;
        if (!entry_at(mem, size, slot, &e)) return FAULT;
        if (!(e & 1)) return FAULT;
        if (level == 0 || ((e & 0x80) && level <= 2))
            return ((e & ADDR) & ~mask(shift)) | (iova & mask(shift));
        if (e & 0x80) return FAULT;
        table = e & ADDR;
    }
    return FAULT;
}

static uint64_t walk_ss(const uint8_t *mem, uint64_t size, uint64_t root, int levels,
                        uint64_t addr, int large_mask) {
    uint64_t table = root;
    int allowed = 3;
    if (addr >> (12 + 9 * levels)) return FAULT;
    for (int level = levels - 1; level >= 0; level--) {
        int shift = 12 + 9 * level;
        uint64_t slot = table + ((addr >> shift) & 0x1FF) * 8;
        uint64_t e;
        if (!entry_at(mem, size, slot, &e)) return FAULT;
        if (!(e & 3)) return FAULT;
        allowed &= e & 3;
        int leaf = level == 0;
        if ((e & 0x80) && level > 0) {
            if (!(large_mask >> level & 1)) return FAULT;
            leaf = 1;
        }
        if (leaf) {
            if (!(allowed & 1)) return FAULT;
            return ((e & ADDR) & ~mask(shift)) | (addr & mask(shift));
        }
        table = e & ADDR;
    }
    return FAULT;
}

static uint64_t walk_nested(const uint8_t *mem, uint64_t size, uint64_t fs_root, int fs_levels,
                            uint64_t ss_root, int ss_levels, uint64_t iova) {
    uint64_t table = fs_root;
    if (iova >> (12 + 9 * fs_levels)) return FAULT;
    for (int level = fs_levels - 1; level >= 0; level--) {
        int shift = 12 + 9 * level;
        uint64_t slot = walk_ss(mem, size, ss_root, ss_levels,
                                table + ((iova >> shift) & 0x1FF) * 8, 0);
        uint64_t e;
        if (!entry_at(mem, size, slot, &e)) return FAULT;
        if (!(e & 1)) return FAULT;
        if (level > 2 && (e & 0x80)) return FAULT;
        if (level == 0 || (e & 0x80)) {
            uint64_t out = ((e & ADDR) & ~mask(shift)) | (iova & mask(shift));
            return walk_ss(mem, size, ss_root, ss_levels, out, 0);
        }
        table = e & ADDR;
    }
    return FAULT;
}

uint64_t bench_fs(const uint8_t *mem, uint64_t size, const uint64_t *iovas, uint64_t n,
                  uint64_t rounds, uint64_t root, uint64_t levels) {
    BENCH_LOOP(iovas, n, rounds, x, walk_fs(mem, size, root, (int)levels, x));
}

uint64_t bench_ss(const uint8_t *mem, uint64_t size, const uint64_t *addrs, uint64_t n,
                  uint64_t rounds, uint64_t root, uint64_t levels) {
    BENCH_LOOP(addrs, n, rounds, x, walk_ss(mem, size, root, (int)levels, x, 0));
}

uint64_t bench_nested(const uint8_t *mem, uint64_t size, const uint64_t *iovas, uint64_t n,
                      uint64_t rounds, uint64_t fs_root, uint64_t fs_levels, uint64_t ss_root,
                      uint64_t ss_levels) {
    BENCH_LOOP(iovas, n, rounds, x, walk_nested(mem, size, fs_root, (int)fs_levels, ss_root, (int)ss_levels, x));
}
