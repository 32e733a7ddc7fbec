/* The program's half of the spin page (preload.c recv_reply): pinned to the CPU argv[1]
 * names, the program makes requests; the run's spin page (IOMMUFD_MODEL_SPIN, mapped here
 * too) must then name that CPU as the last requester's and hold no spinner. */
#define _GNU_SOURCE
#include <sched.h>
#include "prelude.h"
#include "spin_page.h"

int main(int argc, char **argv)
{
	const char *path = getenv("IOMMUFD_MODEL_SPIN");
	struct spin_page *page;
	cpu_set_t set;
	int cpu = atoi(argv[1]), fd, pfd;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	CHECK(argc == 2 && sched_setaffinity(0, sizeof(set), &set) == 0);
	fd = open("/dev/iommu", O_RDWR);
	CHECK(fd >= 0);
	for (int i = 0; i < 200; i++) {
		struct t_destroy d = { .size = sizeof(d), .id = ioas_alloc(fd) };

		CHECK(ioctl(fd, T_DESTROY, &d) == 0);
	}
	CHECK(path != NULL);
	pfd = open(path, O_RDONLY);
	CHECK(pfd >= 0);
	page = mmap(NULL, 4096, PROT_READ, MAP_SHARED, pfd, 0);
	CHECK(page != MAP_FAILED);
	CHECK(page->client_cpu == (uint32_t)cpu);
	CHECK(page->spin_until == 0);
	return 0;
}
