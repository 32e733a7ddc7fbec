/* dup, fork and close behave as the kernel's: a dup keeps the context, a fork child
 * shares it, the last close releases it. */
#include "prelude.h"

int main(void)
{
	size_t len = 16 * 4096;
	char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	int fd = open("/dev/iommu", O_RDWR), d, fd2, status;
	struct t_destroy destroy = { .size = sizeof(destroy) };
	uint32_t ioas;
	pid_t child;

	CHECK(fd >= 0);
	ioas = ioas_alloc(fd);
	mock_domain(fd, ioas);
	memset(buf, 0x5a, len);
	CHECK(map_fixed(fd, ioas, buf, len, T_MOCK_APERTURE) == 0);
	CHECK(check_refs(fd, buf, len, 1) == 0);
	/* a dup keeps the context alive after the first fd closes */
	d = dup(fd);
	CHECK(d >= 0 && close(fd) == 0);
	CHECK(check_refs(d, buf, len, 1) == 0);
	/* a fork child shares the context: what it creates, the parent can destroy */
	child = fork();
	if (!child) {
		uint32_t id = ioas_alloc(d);

		close(d);
		_exit((int)id);
	}
	CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status));
	destroy.id = (uint32_t)WEXITSTATUS(status);
	CHECK(ioctl(d, T_DESTROY, &destroy) == 0);
	CHECK(ioctl(d, T_DESTROY, &destroy) == -1 && errno == ENOENT);
	/* the last close releases everything: the pins are gone */
	CHECK(close(d) == 0);
	fd2 = open("/dev/iommu", O_RDWR);
	CHECK(fd2 >= 0 && check_refs(fd2, buf, len, 0) == 0);
	puts("done");
	return 0;
}
