/* Children killed in an ioctl loop, or exiting with every object open, leave nothing. */
#include "prelude.h"

int main(void)
{
	size_t len = 64 * 4096;
	char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	int i, status;

	for (i = 0; i < 4; i++) {
		pid_t child = fork();

		if (!child) {
			int fd = open("/dev/iommu", O_RDWR), k;
			uint32_t ioas = ioas_alloc(fd);

			mock_domain(fd, ioas);
			for (k = 0;; k++) {
				struct t_destroy d = { .size = sizeof(d) };

				CHECK(map_fixed(fd, ioas, buf, len, T_MOCK_APERTURE) == 0);
				d.id = ioas_alloc(dup(fd));  /* leaks an fd each time */
				if (i == 3 && k == 5)
					_exit(0);  /* leaks everything */
			}
		}
		if (i < 3) {
			struct timespec ts = { 0, 50 * 1000 * 1000 };

			nanosleep(&ts, NULL);
			kill(child, SIGKILL);
		}
		CHECK(waitpid(child, &status, 0) == child);
	}
	{
		int fd = open("/dev/iommu", O_RDWR);

		CHECK(check_refs(fd, buf, len, 0) == 0);
	}
	puts("done");
	return 0;
}
