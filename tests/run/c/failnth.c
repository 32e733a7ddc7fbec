/* The fail-nth file of a task (path format in argv[1]) drives the model's fault
 * injection, with fs/proc/base.c's read and write rules. */
#include "prelude.h"

#include <sys/syscall.h>
int main(int argc, char **argv)
{
	char path[128], buf[32];
	int f, fd;
	uint32_t ioas;
	struct t_ioas_alloc a = { .size = sizeof(a) };

	(void)argc;
	snprintf(path, sizeof(path), argv[1], (int)syscall(SYS_gettid));
	f = open(path, O_RDWR);
	CHECK(f >= 0);
	CHECK(pread(f, buf, sizeof(buf), 0) == 2 && !memcmp(buf, "0\n", 2));
	fd = open("/dev/iommu", O_RDWR);
	ioas = ioas_alloc(fd);
	(void)ioas;
	CHECK(pwrite(f, "1", 1, 0) == 1);
	CHECK(ioctl(fd, T_IOAS_ALLOC, &a) == -1);
	CHECK(pread(f, buf, sizeof(buf), 0) == 2 && !memcmp(buf, "0\n", 2));
	CHECK(ioctl(fd, T_IOAS_ALLOC, &a) == 0);
	CHECK(pwrite(f, "1000", 4, 0) == 4);
	CHECK(ioctl(fd, T_IOAS_ALLOC, &a) == 0);
	CHECK(pread(f, buf, sizeof(buf), 0) > 2 && strtoul(buf, NULL, 10) < 1000);
	CHECK(pwrite(f, "x", 1, 0) == -1 && errno == EINVAL);
	puts("done");
	return 0;
}
