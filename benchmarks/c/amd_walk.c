/* C reference walks for bench_amd_walk.py: the AMD v1 host table and the 2-D nested walk
 * (GCR3 table, guest x86-64 table, every guest-physical address through the v1 host table),
 * over a flat copy of physical memory (physical address = offset). The rules are those of
 * plugins/amd/iommufd_amd/walk.py for read walks: present, reserved bits [58:52], IR/IW,
 * NextLevel 0/7 leaves, skipped levels; x86-64 P, R/W and PS leaves at levels 1-2.
 * A walk returns the physical address, or ~0 on any fault. Built with cc -O2 at bench time. */
#include "walk_ref.h"

static const uint64_t ADDR = ((1ULL << 52) - 1) & ~0xFFFULL;

static uint64_t walk_v1(const uint8_t *mem, uint64_t size, uint64_t root, int mode,
                        uint64_t iova, int write) {
    uint64_t table = root;
    int level = mode, prot = 3;
    if (12 + 9 * mode < 64 && iova >> (12 + 9 * mode)) return FAULT;
    for (;;) {
        int shift = 3 + 9 * level;
        uint64_t slot = table + ((iova >> shift) & 0x1FF) * 8;
        uint64_t e;
        if (!entry_at(mem, size, slot, &e)) return FAULT;
        if (!(e & 1) || (e & (0x7FULL << 52))) return FAULT;
        if (!(e >> 61 & 1)) prot &= 2;
        if (!(e >> 62 & 1)) prot &= 1;
        int nl = (e >> 9) & 7;
        uint64_t addr = e & ADDR;
        if (nl == 0 || nl == 7) {
            int lg = shift;
            if (nl == 7) {
                int b = 12;
                while (b < 52 && (addr >> b & 1)) b++;
                lg = b + 1;
                if (lg <= shift || lg >= shift + 9) return FAULT;
            }
            if (!(prot & (write ? 2 : 1))) return FAULT;
            return (addr & ~mask(lg)) | (iova & mask(lg));
        }
        if (nl >= level) return FAULT;
        if (nl < level - 1 && (iova & mask(shift) & ~mask(12 + 9 * nl))) return FAULT;
        table = addr;
        level = nl;
    }
}

/* GCR3[pasid 0] (one level), then the guest's 4- or 5-level x86-64 table; every table pointer
 * and the output are guest-physical and go through the host table. */
static uint64_t walk_nested(const uint8_t *mem, uint64_t size, uint64_t host_root,
                            int host_mode, uint64_t gcr3, int levels, uint64_t gva) {
    uint64_t spa = walk_v1(mem, size, host_root, host_mode, gcr3, 0);
    uint64_t cr3;
    if (!entry_at(mem, size, spa, &cr3)) return FAULT;
    if (!(cr3 & 1)) return FAULT;
    uint64_t table = cr3 & ADDR;
    int prot = 3;
    if (gva >> (12 + 9 * levels)) return FAULT;
    for (int level = levels - 1; level >= 0; level--) {
        int shift = 12 + 9 * level;
        uint64_t slot = walk_v1(mem, size, host_root, host_mode,
                                table + ((gva >> shift) & 0x1FF) * 8, 0);
        uint64_t e;
        if (!entry_at(mem, size, slot, &e)) return FAULT;
        if (!(e & 1)) return FAULT;
        if (!(e & 2)) prot &= 1;
        if (level == 0 || ((e & 0x80) && level <= 2)) {
            uint64_t out = ((e & ADDR) & ~mask(shift)) | (gva & mask(shift));
            return walk_v1(mem, size, host_root, host_mode, out, 0);
        }
        if (e & 0x80) return FAULT;
        table = e & ADDR;
    }
    return FAULT;
}

uint64_t bench_v1(const uint8_t *mem, uint64_t size, const uint64_t *iovas, uint64_t n,
                  uint64_t rounds, uint64_t root, uint64_t mode) {
    BENCH_LOOP(iovas, n, rounds, x, walk_v1(mem, size, root, (int)mode, x, 0));
}

uint64_t bench_nested(const uint8_t *mem, uint64_t size, const uint64_t *gvas, uint64_t n,
                      uint64_t rounds, uint64_t host_root, uint64_t host_mode, uint64_t gcr3,
                      uint64_t levels) {
    BENCH_LOOP(gvas, n, rounds, x, walk_nested(mem, size, host_root, (int)host_mode, gcr3, (int)levels, x));
}
