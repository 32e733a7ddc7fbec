/*
 * The ACCESS_RW short path's fd generation against a racing dup2 (tests/run/test_fastpath.py;
 * docs/running-programs.md, "Short paths"). Two accesses, on two IOASes that map a page of
 * 0xaa and a page of 0xbb at the same IOVA; a second thread makes one fd number name the
 * one, then the other, with dup2 (no file is released, so the server sees no event), and
 * counts each switch as begun (phase odd) and done (phase even). The main thread reads the
 * IOVA through that number: a read that began and ended with no switch in progress or in
 * between must show the bytes of the access the number named throughout.
 *
 *     fdgen_race N      (prints "checked C of N", exits 1 on a wrong read)
 */
#include "prelude.h"

static int check_refs(int fd, void *va, uint64_t len, uint32_t refs) __attribute__((unused));
static long stdio_kb(const char *path, const char *tag) __attribute__((unused));
static struct t_test_cmd mock_domain(int fd, uint32_t ioas) __attribute__((unused));

#define OP_CREATE_ACCESS 5
#define OP_ACCESS_RW 8
#define PAGE 4096UL

struct rw_cmd {
	uint32_t size, op, id, reserved;
	union {
		struct { uint32_t out_access_fd, flags; } create_access;
		struct { uint64_t iova, length, uptr; uint32_t flags, pad; } access_rw;
		uint64_t raw[6];
	};
	uint32_t last;
};

static int number, sides[2];
static unsigned long phase; /* odd: a switch in progress; phase / 2 % 2: the side named */
static volatile int stop;

static int create_access(int fd, uint32_t ioas)
{
	struct rw_cmd c = { .size = sizeof(c), .op = OP_CREATE_ACCESS, .id = ioas };

	CHECK(ioctl(fd, T_TEST_CMD, &c) == 0);
	return (int)c.create_access.out_access_fd;
}

/* reads made so far: the switcher paces itself on them (one switch per READS_PER_SWITCH
 * reads at the most, however the threads are scheduled), so most reads see no switch and the
 * short path's cached checks outnumber its fresh ones on a loaded machine too */
static long reads;
#define READS_PER_SWITCH 8

static void *switcher(void *unused)
{
	(void)unused;
	for (unsigned long k = 1; !stop; k++) {
		long next = __atomic_load_n(&reads, __ATOMIC_SEQ_CST) + READS_PER_SWITCH;

		while (!stop && __atomic_load_n(&reads, __ATOMIC_SEQ_CST) < next)
			usleep(20);
		if (stop)
			break;
		__atomic_fetch_add(&phase, 1, __ATOMIC_SEQ_CST);
		CHECK(dup2(sides[k % 2], number) == number);
		__atomic_fetch_add(&phase, 1, __ATOMIC_SEQ_CST);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1000, checked = 0;
	unsigned char *pages[2];
	uint32_t ioas[2];
	pthread_t t;
	int fd;

	fd = open("/dev/iommu", O_RDWR);
	CHECK(fd >= 0);
	for (int k = 0; k < 2; k++) {
		pages[k] = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		CHECK(pages[k] != MAP_FAILED);
		memset(pages[k], k ? 0xbb : 0xaa, PAGE);
		ioas[k] = ioas_alloc(fd);
		CHECK(map_fixed(fd, ioas[k], pages[k], PAGE, T_MOCK_APERTURE) == 0);
		sides[k] = create_access(fd, ioas[k]);
	}
	number = fcntl(sides[0], F_DUPFD, 100); /* names side 0 at phase 0 */
	CHECK(number >= 0);
	CHECK(pthread_create(&t, NULL, switcher, NULL) == 0);
	for (long i = 0; i < n; i++) {
		unsigned char got[8] = { 0 };
		struct rw_cmd c = { .size = sizeof(c), .op = OP_ACCESS_RW, .id = (uint32_t)number };
		unsigned long p0, p1;
		int rc;

		c.access_rw.iova = T_MOCK_APERTURE + (uint64_t)(i % 64) * 8;
		c.access_rw.length = sizeof(got);
		c.access_rw.uptr = (uintptr_t)got;
		p0 = __atomic_load_n(&phase, __ATOMIC_SEQ_CST);
		rc = ioctl(fd, T_TEST_CMD, &c);
		p1 = __atomic_load_n(&phase, __ATOMIC_SEQ_CST);
		__atomic_fetch_add(&reads, 1, __ATOMIC_SEQ_CST);
		if (p0 != p1 || p0 % 2)
			continue;
		checked++;
		if (rc || got[0] != (p0 / 2 % 2 ? 0xbb : 0xaa) || got[7] != got[0]) {
			printf("wrong read %ld at phase %lu: rc %d errno %d byte %#x\n", i, p0, rc,
			       rc ? errno : 0, got[0]);
			return 1;
		}
	}
	stop = 1;
	CHECK(pthread_join(t, NULL) == 0);
	printf("checked %ld of %ld, %lu switches\n", checked, n, phase / 2);
	/* a run in which the reads all overlapped a switch would prove nothing */
	CHECK(checked > 0 && phase >= 2);
	return 0;
}
