/*
 * Threads hammering ioctls on one iommufd: each thread allocates an IOAS, maps and unmaps a
 * 64 KiB buffer and destroys the IOAS, ITERS times. Prints "model <threads> <ops> <seconds>".
 * With "reference" it does as many real kernel ioctls (FIONREAD on a pipe) instead: the cost
 * of a syscall round trip with no model behind it.
 *
 *   iommufd-model run -- ./hammer THREADS ITERS
 *   ./hammer THREADS ITERS reference
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define IOAS_ALLOC _IO(';', 0x81)
#define IOAS_MAP _IO(';', 0x85)
#define IOAS_UNMAP _IO(';', 0x86)
#define DESTROY _IO(';', 0x80)
#define OPS_PER_ITER 4

struct ioas_alloc { uint32_t size, flags, out_ioas_id; };
struct ioas_map { uint32_t size, flags, ioas_id, reserved; uint64_t user_va, length, iova; };
struct ioas_unmap { uint32_t size, ioas_id; uint64_t iova, length; };
struct destroy { uint32_t size, id; };

static int fd, pipefd[2];
static long iters;
static int reference;

static void *worker(void *arg)
{
	char *buf = mmap(NULL, 1 << 16, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	long i;

	(void)arg;
	for (i = 0; i < iters; i++) {
		struct ioas_alloc a = { .size = sizeof(a) };
		struct ioas_map m = { .size = sizeof(m), .flags = 6, .user_va = (uintptr_t)buf,
				      .length = 1 << 16 };
		struct ioas_unmap u = { .size = sizeof(u) };
		struct destroy d = { .size = sizeof(d) };
		int n, k;

		if (reference) {
			for (k = 0; k < OPS_PER_ITER; k++)
				if (ioctl(pipefd[0], FIONREAD, &n))
					abort();
			continue;
		}
		if (ioctl(fd, IOAS_ALLOC, &a))
			abort();
		m.ioas_id = a.out_ioas_id;
		if (ioctl(fd, IOAS_MAP, &m))
			abort();
		u.ioas_id = a.out_ioas_id;
		u.iova = m.iova;
		u.length = 1 << 16;
		if (ioctl(fd, IOAS_UNMAP, &u))
			abort();
		d.id = a.out_ioas_id;
		if (ioctl(fd, DESTROY, &d))
			abort();
	}
	return NULL;
}

int main(int argc, char **argv)
{
	int threads = argc > 1 ? atoi(argv[1]) : 1, i;
	pthread_t th[64];
	struct timespec t0, t1;
	double secs;

	iters = argc > 2 ? atol(argv[2]) : 1000;
	reference = argc > 3 && !strcmp(argv[3], "reference");
	if (threads < 1 || threads > 64)
		return 2;
	if (reference ? pipe(pipefd) : (fd = open("/dev/iommu", O_RDWR)) < 0) {
		perror("open");
		return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (i = 0; i < threads; i++)
		pthread_create(&th[i], NULL, worker, NULL);
	for (i = 0; i < threads; i++)
		pthread_join(th[i], NULL);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
	printf("%s %d %ld %.6f\n", reference ? "reference" : "model", threads,
	       threads * iters * OPS_PER_ITER, secs);
	return 0;
}
