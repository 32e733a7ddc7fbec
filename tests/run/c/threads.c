/* Threads and processes sharing one model (docs/concurrency.md): four threads of this
 * process and of two forked children (one with an iommufd of its own, one sharing its
 * parent's) map, check the mock domain's translation and the pins, and unmap their own
 * windows, while a fifth thread of each sends garbage to every command number. Every
 * worker call must succeed. */
#include "prelude.h"

#define T_IOAS_UNMAP T_IO(0x86)
#define T_OP_MD_CHECK_MAP 3
#define NTHREADS 4
#define ROUNDS 20
#define LEN (16 * 4096)

struct t_ioas_unmap { uint32_t size, ioas_id; uint64_t iova, length; };

static int fd;
static uint32_t ioas, hwpt;

static int check_map(void *va, uint64_t len, uint64_t iova)
{
	struct t_test_cmd c = { .size = sizeof(c), .op = T_OP_MD_CHECK_MAP, .id = hwpt };

	c.raw[0] = iova;
	c.raw[1] = len;
	c.raw[2] = (uintptr_t)va;
	return ioctl(fd, T_TEST_CMD, &c);
}

/* map, check the mock domain's translation against the buffer, check the pins, unmap */
static void *worker(void *arg)
{
	long i = (long)arg;
	uint64_t iova = T_MOCK_APERTURE + (uint64_t)i * (1 << 20);
	char *buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	CHECK(buf != MAP_FAILED);
	memset(buf, (int)i + 1, LEN);
	for (int r = 0; r < ROUNDS; r++) {
		struct t_ioas_unmap u = { .size = sizeof(u), .ioas_id = ioas, .iova = iova };

		u.length = LEN;

		CHECK(map_fixed(fd, ioas, buf, LEN, iova) == 0);
		CHECK(check_map(buf, LEN, iova) == 0);
		CHECK(check_refs(fd, buf, LEN, 1) == 0);
		CHECK(ioctl(fd, T_IOAS_UNMAP, &u) == 0 && u.length == LEN);
	}
	return NULL;
}

/* bad input from one thread: every command number with garbage, wrong ids */
static void *garbage(void *arg)
{
	uint32_t junk[16];

	(void)arg;
	for (int r = 0; r < 400; r++) {
		memset(junk, 0xa5 ^ r, sizeof(junk));
		junk[0] = 8 + r % 56;
		ioctl(fd, T_IO(0x80 + r % 48), junk);
	}
	return NULL;
}

/* this process's threads: NTHREADS workers on windows first.., and one garbage thread */
static void threads(long first)
{
	pthread_t t[NTHREADS + 1];

	for (long i = 0; i < NTHREADS; i++)
		CHECK(pthread_create(&t[i], NULL, worker, (void *)(first + i)) == 0);
	CHECK(pthread_create(&t[NTHREADS], NULL, garbage, NULL) == 0);
	for (int i = 0; i <= NTHREADS; i++)
		CHECK(pthread_join(t[i], NULL) == 0);
}

static void setup(void)
{
	struct t_test_cmd c;

	fd = open("/dev/iommu", O_RDWR);
	CHECK(fd >= 0);
	ioas = ioas_alloc(fd);
	c = mock_domain(fd, ioas);
	hwpt = c.mock_domain.out_hwpt_id;
}

int main(void)
{
	pid_t kids[2];
	int status;

	setup();
	/* one child with an iommufd of its own, one sharing the parent's context */
	for (int k = 0; k < 2; k++) {
		kids[k] = fork();
		CHECK(kids[k] >= 0);
		if (!kids[k]) {
			if (k == 0)
				setup();
			threads(8 + 8 * k);
			_exit(0);
		}
	}
	threads(0);
	for (int k = 0; k < 2; k++) {
		CHECK(waitpid(kids[k], &status, 0) == kids[k]);
		CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	}
	puts("done");
	return 0;
}
