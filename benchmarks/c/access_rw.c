/*
 * The kernel iommufd selftest's hot loop (check_access_rw() in
 * tools/testing/selftests/iommu/iommufd.c, Linux 7.2), alone: one access on an IOAS mapping
 * 16 pages of MAP_SHARED anonymous memory, then N IOMMU_TEST_OP_ACCESS_RW requests around a
 * page boundary, a read and a write in turn, each checked against the buffer.
 *
 *     access_rw N [slow [pinned]]  # prints "access_rw <requests> <seconds> <program CPU seconds>"
 *
 * "slow" sets MOCK_ACCESS_RW_SLOW_PATH (the pinned-page path: a request across the page
 * boundary pins its pages for the copy and unpins them); "pinned" attaches a mock domain to
 * the IOAS first, so the pages stay pinned and such a request only copies through them (the
 * selftest's mock_domain variants). The struct layouts are written here from
 * include/uapi/linux/iommufd.h and iommufd_test.h of Linux 7.2 (the bench's own).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>

#define IOMMU_IOAS_ALLOC _IO(';', 0x81)
#define IOMMU_IOAS_MAP _IO(';', 0x85)
#define IOMMU_TEST_CMD _IO(';', 0xa0)
#define OP_MOCK_DOMAIN 2
#define OP_CREATE_ACCESS 5
#define OP_ACCESS_RW 8
#define RW_WRITE 1
#define RW_SLOW_PATH 4
#define PAGE 4096UL
#define NPAGES 16

struct ioas_alloc { uint32_t size, flags, out_ioas_id; };
struct ioas_map { uint32_t size, flags, ioas_id, reserved; uint64_t user_va, length, iova; };
struct test_cmd {
	uint32_t size, op, id, reserved;
	union {
		struct { uint32_t out_access_fd, flags; } create_access;
		struct { uint64_t iova, length, uptr; uint32_t flags; } access_rw;
		uint64_t raw[6];
	};
	uint32_t last;
};

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "%d: %s (errno %d)\n", __LINE__, #c, errno); exit(1); } } while (0)

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 10000;
	uint32_t def = argc > 2 && !strcmp(argv[2], "slow") ? RW_SLOW_PATH : 0;
	int pinned = argc > 3 && !strcmp(argv[3], "pinned");
	struct ioas_alloc a = { .size = sizeof(a) };
	struct ioas_map m = { .size = sizeof(m), .flags = 2 | 4 };
	struct test_cmd c = { .size = sizeof(c), .op = OP_CREATE_ACCESS };
	struct timespec t0, t1, c0, c1;
	unsigned char tmp[64];
	unsigned char *buf;
	int fd = open("/dev/iommu", O_RDWR);

	CHECK(fd >= 0);
	CHECK(ioctl(fd, IOMMU_IOAS_ALLOC, &a) == 0);
	buf = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(buf != MAP_FAILED);
	for (unsigned long i = 0; i < NPAGES * PAGE; i++)
		buf[i] = (unsigned char)rand();
	if (pinned) { /* before the map: the domain's aperture places it */
		struct test_cmd d = { .size = sizeof(d), .op = OP_MOCK_DOMAIN, .id = a.out_ioas_id };

		CHECK(ioctl(fd, IOMMU_TEST_CMD, &d) == 0);
	}
	m.ioas_id = a.out_ioas_id;
	m.user_va = (uintptr_t)buf;
	m.length = NPAGES * PAGE;
	CHECK(ioctl(fd, IOMMU_IOAS_MAP, &m) == 0);
	c.id = a.out_ioas_id;
	CHECK(ioctl(fd, IOMMU_TEST_CMD, &c) == 0);
	c = (struct test_cmd){ .size = sizeof(c), .op = OP_ACCESS_RW,
			       .id = c.create_access.out_access_fd };
	c.access_rw.uptr = (uintptr_t)tmp;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
	for (long i = 0; i < n; i++) {
		uint64_t off = PAGE - 50 + (uint64_t)(i % 100);
		uint64_t len = 1 + (uint64_t)(i % 63);

		c.access_rw.iova = m.iova + off;
		c.access_rw.length = len;
		c.access_rw.flags = def | ((i & 1) ? RW_WRITE : 0);
		if (i & 1)
			for (uint64_t k = 0; k < len; k++)
				tmp[k] = (unsigned char)rand();
		CHECK(ioctl(fd, IOMMU_TEST_CMD, &c) == 0);
		CHECK(memcmp(buf + off, tmp, len) == 0);
	}
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("access_rw %ld %.6f %.6f\n", n,
	       (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9,
	       (double)(c1.tv_sec - c0.tv_sec) + (double)(c1.tv_nsec - c0.tv_nsec) / 1e9);
	return 0;
}
