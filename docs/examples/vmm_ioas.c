/*
 * A VMM's first steps with iommufd, as run on the model:
 *
 *   gcc -O2 -o vmm_ioas docs/examples/vmm_ioas.c
 *   iommufd-model run --iommu amd -- ./vmm_ioas
 *
 * Guest RAM is a memfd (as QEMU's memory-backend-memfd); the VMM allocates an IOAS, asks
 * which IOVAs it may use, maps guest RAM at its guest-physical addresses with
 * IOMMU_IOAS_MAP_FILE, maps a bounce buffer from its own heap with IOMMU_IOAS_MAP, copies a
 * mapping into a second IOAS (what a second vIOMMU domain would need), and unmaps. Every
 * call is the uAPI of include/uapi/linux/iommufd.h; errors are checked against the kernel's
 * errno. Binding a device needs the VFIO cdev (docs/running-programs.md).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/iommufd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define GUEST_RAM (64UL << 20)
#define RW (IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE)

static void die(const char *what)
{
	/* (errno is stale when a call meant to fail succeeded) */
	fprintf(stderr, "vmm_ioas: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint32_t ioas_alloc(int fd)
{
	struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };

	if (ioctl(fd, IOMMU_IOAS_ALLOC, &alloc))
		die("IOMMU_IOAS_ALLOC");
	return alloc.out_ioas_id;
}

int main(void)
{
	struct iommu_iova_range ranges[8];
	struct iommu_ioas_iova_ranges query = { .size = sizeof(query) };
	struct iommu_ioas_map_file map_ram = { .size = sizeof(map_ram) };
	struct iommu_ioas_map map_bounce = { .size = sizeof(map_bounce) };
	struct iommu_ioas_copy copy = { .size = sizeof(copy) };
	struct iommu_ioas_unmap unmap = { .size = sizeof(unmap) };
	uint32_t ioas, ioas2, i;
	void *bounce;
	int fd, ram;

	fd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("open /dev/iommu");
	ioas = ioas_alloc(fd);

	/* Too small an array: EMSGSIZE, and num_iovas says how many there are. */
	query.ioas_id = ioas;
	query.num_iovas = 0;
	if (ioctl(fd, IOMMU_IOAS_IOVA_RANGES, &query) == 0 || errno != EMSGSIZE)
		die("IOMMU_IOAS_IOVA_RANGES with no room");
	printf("IOAS %u: %u usable IOVA range(s)\n", ioas, query.num_iovas);
	query.allowed_iovas = (uintptr_t)ranges;
	if (query.num_iovas > 8 || ioctl(fd, IOMMU_IOAS_IOVA_RANGES, &query))
		die("IOMMU_IOAS_IOVA_RANGES");
	for (i = 0; i < query.num_iovas; i++)
		printf("  [%#llx, %#llx]\n", (unsigned long long)ranges[i].start,
		       (unsigned long long)ranges[i].last);

	/* Guest RAM: a memfd mapped at guest-physical 0 (the IOVA the device will use). */
	ram = memfd_create("guest-ram", MFD_CLOEXEC);
	if (ram < 0 || ftruncate(ram, GUEST_RAM))
		die("memfd");
	map_ram.ioas_id = ioas;
	map_ram.flags = IOMMU_IOAS_MAP_FIXED_IOVA | RW;
	map_ram.fd = ram;
	map_ram.start = 0;
	map_ram.length = GUEST_RAM;
	map_ram.iova = 0;
	if (ioctl(fd, IOMMU_IOAS_MAP_FILE, &map_ram))
		die("IOMMU_IOAS_MAP_FILE");
	printf("guest RAM: %lu MiB at IOVA 0\n", GUEST_RAM >> 20);

	/* Mapping the same IOVA twice is EEXIST; a closed fd is EBADF. */
	if (ioctl(fd, IOMMU_IOAS_MAP_FILE, &map_ram) == 0 || errno != EEXIST)
		die("double map");
	map_ram.iova = GUEST_RAM;
	map_ram.fd = 1000;
	if (ioctl(fd, IOMMU_IOAS_MAP_FILE, &map_ram) == 0 || errno != EBADF)
		die("map of a closed fd");

	/* A bounce buffer from the VMM's heap, IOVA chosen by the kernel. */
	if (posix_memalign(&bounce, 1 << 21, 1 << 21))
		die("posix_memalign");
	memset(bounce, 0, 1 << 21);
	map_bounce.ioas_id = ioas;
	map_bounce.flags = RW;
	map_bounce.user_va = (uintptr_t)bounce;
	map_bounce.length = 1 << 21;
	if (ioctl(fd, IOMMU_IOAS_MAP, &map_bounce))
		die("IOMMU_IOAS_MAP");
	printf("bounce buffer: 2 MiB at IOVA %#llx\n", (unsigned long long)map_bounce.iova);

	/* The same pages in a second IOAS, without pinning them twice. */
	ioas2 = ioas_alloc(fd);
	copy.dst_ioas_id = ioas2;
	copy.src_ioas_id = ioas;
	copy.flags = IOMMU_IOAS_MAP_FIXED_IOVA | RW;
	copy.src_iova = map_bounce.iova;
	copy.dst_iova = 1UL << 32;
	copy.length = 1 << 21;
	if (ioctl(fd, IOMMU_IOAS_COPY, &copy))
		die("IOMMU_IOAS_COPY");
	printf("copied into IOAS %u at IOVA %#llx\n", ioas2, (unsigned long long)copy.dst_iova);

	/* Unmap everything: length and iova 0 mean all (unmap.length says how much went). */
	unmap.ioas_id = ioas;
	unmap.iova = 0;
	unmap.length = UINT64_MAX;
	if (ioctl(fd, IOMMU_IOAS_UNMAP, &unmap))
		die("IOMMU_IOAS_UNMAP");
	printf("unmapped %llu MiB\n", (unsigned long long)unmap.length >> 20);
	close(fd);
	puts("ok");
	return 0;
}
