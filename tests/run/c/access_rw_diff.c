/*
 * Random IOMMU_TEST_OP_ACCESS_RW requests, and changes under them, each result printed
 * (tests/run/test_fastpath.py runs this with the server's short paths on and off: the two
 * outputs must be the same). Changes: an area unmapped and mapped again elsewhere in the
 * buffer, the access moved to another IOAS, the access fd's number taken by a pipe (a
 * non-model file: EBADFD; with another fd of the access kept open, so that nothing is
 * released) and then by the access again or a new one, or by another access and back
 * (dup2: no release, no request), another number closed, the caller's memory unmapped
 * under an area, and a forked child whose pages another area maps. Areas of every kind
 * Linux 7.2's iopt_pages_rw_access() tells apart: the caller's private pages, a live
 * child's (one page through its mm, more through the pinned pages), a gone child's
 * private and shared pages (the pinned pages only), the caller's shared anonymous memory
 * (the model's memfd), an IOAS_MAP_FILE of a memfd (the pinned pages, always) and an IOVA
 * half a mock page off its pages' alignment, with
 * the program writing those shared pages itself between requests (a copy through the
 * pinned pages must see the bytes as they are now) and unmapping one of them (a pin
 * outlives munmap), and MOCK_ACCESS_RW_SLOW_PATH requests of one to three pages.
 *
 *     access_rw_diff SEED N OUT      (the results go to the file OUT)
 */
#include "prelude.h"
#include <sys/wait.h>

static int check_refs(int fd, void *va, uint64_t len, uint32_t refs) __attribute__((unused));

#define T_IOAS_UNMAP T_IO(0x86)
#define T_IOAS_MAP_FILE T_IO(0x8f)
#define OP_CREATE_ACCESS 5
#define OP_ACCESS_RW 8
#define OP_ACCESS_REPLACE_IOAS 11
#define RW_WRITE 1
#define RW_SLOW_PATH 4
#define FLAGS_SYZ (1 << 16)
#define PAGE 4096UL
#define NPAGES 64

struct rw_cmd {
	uint32_t size, op, id, reserved;
	union {
		struct { uint32_t out_access_fd, flags; } create_access;
		struct { uint64_t iova, length, uptr; uint32_t flags, pad; } access_rw;
		struct { uint32_t ioas_id; } replace;
		uint64_t raw[6];
	};
	uint32_t last;
};
struct ioas_unmap { uint32_t size, ioas_id; uint64_t iova, length; };
struct ioas_map_file { uint32_t size, flags, ioas_id; int32_t fd; uint64_t start, length, iova; };

static unsigned long long seed;

static uint64_t rnd(uint64_t n)
{
	seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
	return (seed >> 33) % n;
}

static int map_ro(int fd, uint32_t ioas, void *va, uint64_t len, uint64_t iova)
{
	struct t_ioas_map m = { .size = sizeof(m), .ioas_id = ioas, .user_va = (uintptr_t)va,
				.length = len, .iova = iova,
				.flags = T_MAP_FIXED_IOVA | T_MAP_READABLE };

	return ioctl(fd, T_IOAS_MAP, &m);
}

static int map_file(int fd, uint32_t ioas, int mfd, uint64_t len, uint64_t iova)
{
	struct ioas_map_file m = { .size = sizeof(m), .ioas_id = ioas, .fd = mfd, .length = len,
				   .iova = iova,
				   .flags = T_MAP_FIXED_IOVA | T_MAP_READABLE | T_MAP_WRITEABLE };

	return ioctl(fd, T_IOAS_MAP_FILE, &m);
}

/* a child maps len bytes at va into both IOASes at iova, then exits (its mm gone) */
static void gone_child(int fd, const uint32_t *ioas, unsigned char *va, uint64_t len,
		       uint64_t iova, unsigned char fill)
{
	pid_t pid = fork();

	CHECK(pid >= 0);
	if (pid == 0) {
		memset(va, fill, len);
		for (int k = 0; k < 2; k++)
			CHECK(map_fixed(fd, ioas[k], va, len, iova) == 0);
		_exit(0);
	}
	CHECK(waitpid(pid, NULL, 0) == pid);
}

static int create_access(int fd, uint32_t ioas)
{
	struct rw_cmd c = { .size = sizeof(c), .op = OP_CREATE_ACCESS, .id = ioas };

	CHECK(ioctl(fd, T_TEST_CMD, &c) == 0);
	return (int)c.create_access.out_access_fd;
}

static uint32_t sum(const unsigned char *p, size_t n)
{
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 16777619u;
	return h;
}

int main(int argc, char **argv)
{
	unsigned char *buf, *tmp, *child_buf, *gone_buf, *shared, *gone_shared, *mem;
	uint32_t ioas[2];
	int fd, access, access2, swapped = -1, now = 0, pipefd[2], mfd, shared_pages = 4;
	uint64_t at_page = 0;
	long n;
	pid_t child;
	int to_child[2], to_parent[2];

	CHECK(argc == 4 && freopen(argv[3], "w", stdout) != NULL);
	seed = strtoull(argv[1], NULL, 0);
	n = atol(argv[2]);
	fd = open("/dev/iommu", O_RDWR);
	CHECK(fd >= 0);
	buf = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	tmp = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	child_buf = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	gone_buf = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	shared = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	gone_shared = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	mfd = memfd_create("access_rw_diff", 0);
	CHECK(buf != MAP_FAILED && tmp != MAP_FAILED && child_buf != MAP_FAILED);
	CHECK(gone_buf != MAP_FAILED && shared != MAP_FAILED && gone_shared != MAP_FAILED);
	CHECK(mfd >= 0 && ftruncate(mfd, 4 * PAGE) == 0);
	mem = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	CHECK(mem != MAP_FAILED);
	for (size_t i = 0; i < NPAGES * PAGE; i++)
		buf[i] = (unsigned char)rnd(256);
	for (size_t i = 0; i < 4 * PAGE; i++) {
		shared[i] = (unsigned char)rnd(256);
		mem[i] = (unsigned char)rnd(256);
	}
	memset(child_buf, 0x5a, 4 * PAGE);
	for (int k = 0; k < 2; k++) {
		ioas[k] = ioas_alloc(fd);
		CHECK(map_fixed(fd, ioas[k], buf, 16 * PAGE, T_MOCK_APERTURE) == 0);
		CHECK(map_fixed(fd, ioas[k], buf + 16 * PAGE, 4 * PAGE, T_MOCK_APERTURE + 16 * PAGE) == 0);
		CHECK(map_ro(fd, ioas[k], buf + 20 * PAGE, 4 * PAGE, T_MOCK_APERTURE + 20 * PAGE) == 0);
		CHECK(map_fixed(fd, ioas[k], shared, 4 * PAGE, T_MOCK_APERTURE + 40 * PAGE) == 0);
		CHECK(map_file(fd, ioas[k], mfd, 4 * PAGE, T_MOCK_APERTURE + 44 * PAGE) == 0);
		/* an IOVA half a mock page off the pages' (iommufd_ioas.access_rw_unaligned) */
		CHECK(map_fixed(fd, ioas[k], buf + 60 * PAGE, 4 * PAGE,
				T_MOCK_APERTURE + 56 * PAGE + 2048) == 0);
	}
	mock_domain(fd, ioas[1]); /* the second IOAS's pages are pinned */
	/* children that map their pages and exit: pinned in the second IOAS, unreachable
	 * (EFAULT) in the first; the shared ones still the program's memory */
	gone_child(fd, ioas, gone_buf, 4 * PAGE, T_MOCK_APERTURE + 48 * PAGE, 0x3c);
	gone_child(fd, ioas, gone_shared, 4 * PAGE, T_MOCK_APERTURE + 52 * PAGE, 0x96);
	/* a child maps its own pages (then waits): another mm's area */
	CHECK(pipe(to_child) == 0 && pipe(to_parent) == 0);
	child = fork();
	CHECK(child >= 0);
	if (child == 0) {
		char c;

		memset(child_buf, 0xc3, 4 * PAGE);
		for (int k = 0; k < 2; k++)
			CHECK(map_fixed(fd, ioas[k], child_buf, 4 * PAGE, T_MOCK_APERTURE + 32 * PAGE) == 0);
		CHECK(write(to_parent[1], "r", 1) == 1);
		CHECK(read(to_child[0], &c, 1) == 1); /* until the parent says */
		_exit(0);
	}
	{
		char c;

		CHECK(read(to_parent[0], &c, 1) == 1);
	}
	access = create_access(fd, ioas[0]);
	access2 = create_access(fd, ioas[1]);
	for (long i = 0; i < n; i++) {
		struct rw_cmd c = { .size = sizeof(c), .op = OP_ACCESS_RW, .id = (uint32_t)access };
		uint64_t r = rnd(1000);
		int rc;

		if (r < 4) { /* unmap the first area, map another part of the buffer there */
			struct ioas_unmap u = { .size = sizeof(u), .ioas_id = ioas[now],
						.iova = T_MOCK_APERTURE, .length = 16 * PAGE };

			rc = ioctl(fd, T_IOAS_UNMAP, &u);
			printf("unmap %d\n", rc ? errno : 0);
			rc = map_fixed(fd, ioas[now], buf + (16 + 4 * rnd(8)) * PAGE, 16 * PAGE,
				       T_MOCK_APERTURE);
			printf("map %d\n", rc ? errno : 0);
		} else if (r < 8) { /* the access moves to the other IOAS */
			struct rw_cmd m = { .size = sizeof(m), .op = OP_ACCESS_REPLACE_IOAS,
					    .id = (uint32_t)access };

			now ^= 1;
			m.replace.ioas_id = ioas[now];
			printf("replace %d\n", ioctl(fd, T_TEST_CMD, &m) ? errno : 0);
		} else if (r < 11) { /* the number goes to a pipe, then to the access or a new one */
			int keep = r < 10 ? fcntl(access, F_DUPFD, 100) : -1; /* no release then */

			close(access);
			CHECK(pipe(pipefd) == 0);
			if (pipefd[0] != access)
				CHECK(dup2(pipefd[0], access) == access);
			c.access_rw.iova = T_MOCK_APERTURE;
			c.access_rw.length = 8;
			c.access_rw.uptr = (uintptr_t)tmp;
			printf("on a pipe %d\n", ioctl(fd, T_TEST_CMD, &c) ? errno : 0);
			close(pipefd[0]);
			close(pipefd[1]);
			if (pipefd[0] != access)
				close(access);
			if (keep >= 0) {
				CHECK(dup2(keep, access) == access);
				close(keep);
			} else {
				CHECK(create_access(fd, ioas[now]) == access);
			}
		} else if (r < 12) { /* the caller's memory goes from under the area */
			uint64_t at = rnd(NPAGES);

			munmap(buf + at * PAGE, PAGE);
			CHECK(mmap(buf + at * PAGE, PAGE, PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == buf + at * PAGE);
			printf("remapped page %llu\n", (unsigned long long)at);
		} else if (r < 14) { /* the number names another access (of the other IOAS) and
				      * back, with no release: only the fd generation tells */
			if (swapped < 0) {
				swapped = fcntl(access, F_DUPFD, 200);
				CHECK(swapped >= 0 && dup2(access2, access) == access);
			} else {
				CHECK(dup2(swapped, access) == access && close(swapped) == 0);
				swapped = -1;
			}
			printf("swapped %d\n", swapped >= 0);
		} else if (r < 17) { /* another number changes: a new generation, the same file */
			CHECK(close(dup(0)) == 0);
		} else if (r < 40) { /* the program writes its shared pages itself */
			unsigned char *to = r < 20 ? shared : r < 30 ? mem : gone_shared;
			uint64_t room = (to == shared ? (uint64_t)shared_pages : 4) * PAGE;

			for (int k = 0; k < 16; k++)
				to[rnd(room)] = (unsigned char)rnd(256);
		} else if (r < 41 && shared_pages == 4) { /* a pinned shared page outlives munmap */
			munmap(shared + 3 * PAGE, PAGE);
			shared_pages = 3;
			printf("unmapped a shared page\n");
		}
		if (rnd(4) == 0) /* mostly near the last request: the short path's case */
			at_page = rnd(61);
		c.access_rw.iova = T_MOCK_APERTURE + at_page * PAGE - 64 + rnd(PAGE + 128);
		c.access_rw.length = 1 + rnd(rnd(10) ? 80 : 3 * PAGE);
		if (rnd(40) == 0)
			c.access_rw.length = rnd(2) ? 0 : (16 << 20) + 1;
		c.access_rw.flags = rnd(2) ? RW_WRITE : 0;
		if (rnd(4) == 0)
			c.access_rw.flags |= rnd(6) ? RW_SLOW_PATH : rnd(2) ? FLAGS_SYZ : 1 << 9;
		c.access_rw.uptr = rnd(30) ? (uintptr_t)tmp + rnd(PAGE) : rnd(2) ? 0 : 16;
		if (rnd(50) == 0)
			c.size = rnd(2) ? sizeof(c) - 4 : sizeof(c) - 8; /* the last field cut: ok, EINVAL */
		for (int k = 0; k < 64; k++)
			tmp[k] = (unsigned char)rnd(256);
		rc = ioctl(fd, T_TEST_CMD, &c);
		printf("%ld %d %08x\n", i, rc ? errno : 0, sum(tmp, 2 * PAGE));
	}
	printf("buf %08x\n", sum(buf, NPAGES * PAGE));
	printf("shared %08x\n", sum(shared, (size_t)shared_pages * PAGE));
	printf("memfd %08x gone shared %08x\n", sum(mem, 4 * PAGE), sum(gone_shared, 4 * PAGE));
	CHECK(write(to_child[1], "x", 1) == 1);
	CHECK(waitpid(child, NULL, 0) == child);
	return 0;
}
