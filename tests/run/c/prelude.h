/* Helpers of the runner's test programs (tests/run/test_runner.py). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "uapi.h"

static uint32_t ioas_alloc(int fd)
{
	struct t_ioas_alloc a = { .size = sizeof(a) };

	CHECK(ioctl(fd, T_IOAS_ALLOC, &a) == 0);
	return a.out_ioas_id;
}

static struct t_test_cmd mock_domain(int fd, uint32_t ioas)
{
	struct t_test_cmd c = { .size = sizeof(c), .op = T_OP_MOCK_DOMAIN, .id = ioas };

	CHECK(ioctl(fd, T_TEST_CMD, &c) == 0);
	return c;
}

static int map_fixed(int fd, uint32_t ioas, void *va, uint64_t len, uint64_t iova)
{
	struct t_ioas_map m = { .size = sizeof(m), .ioas_id = ioas, .user_va = (uintptr_t)va,
				.length = len, .iova = iova,
				.flags = T_MAP_FIXED_IOVA | T_MAP_READABLE | T_MAP_WRITEABLE };

	return ioctl(fd, T_IOAS_MAP, &m);
}

static int check_refs(int fd, void *va, uint64_t len, uint32_t refs)
{
	struct t_test_cmd c = { .size = sizeof(c), .op = T_OP_MD_CHECK_REFS,
				.check_refs = { .length = len, .uptr = (uintptr_t)va, .refs = refs } };

	return ioctl(fd, T_TEST_CMD, &c);
}

/* kB of a status line read with stdio, or -1 */
static long stdio_kb(const char *path, const char *tag)
{
	char line[256];
	long kb = -1;
	FILE *f = fopen(path, "r");

	CHECK(f != NULL);
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, tag, strlen(tag)))
			kb = strtol(line + strlen(tag), NULL, 10);
	fclose(f);
	return kb;
}
