/* VmPin/VmLck of /proc/<pid>/status include the pages the model pinned (the model's view of
 * the kernel's mm->pinned_vm and mm->locked_vm): read with fopen (glibc's own open), open +
 * read, through /proc/self, /proc/PID and /proc/PID/task/TID, from the process and from a
 * forked child. Prints "done". */
#include "prelude.h"

#include <sys/syscall.h>

#define NPAGES 16

/* the same through open() and read(), checking the layout the kernel gives the line */
static long fd_kb(const char *path, const char *tag)
{
	static char buf[16384];
	ssize_t n, len = 0;
	char *p;
	int f = open(path, O_RDONLY | O_CLOEXEC);

	CHECK(f >= 0);
	while ((n = read(f, buf + len, sizeof(buf) - 1 - len)) > 0)
		len += n;
	close(f);
	buf[len] = 0;
	CHECK(strstr(buf, "Name:\t") == buf); /* the rest of the host's file is there */
	p = strstr(buf, tag);
	CHECK(p && p[strlen(tag)] == '\t' && strstr(p, " kB\n") == p + strlen(tag) + 9);
	return strtol(p + strlen(tag), NULL, 10);
}

int main(void)
{
	char self_task[64], by_pid[64];
	long pin0, lck0;
	char *buf = mmap(NULL, NPAGES * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			 -1, 0);
	uint32_t ioas;
	pid_t child, parent = getpid();
	int fd, status;

	snprintf(self_task, sizeof(self_task), "/proc/%d/task/%d/status", (int)getpid(),
		 (int)syscall(SYS_gettid));
	snprintf(by_pid, sizeof(by_pid), "/proc/%d/status", (int)parent);
	pin0 = stdio_kb("/proc/self/status", "VmPin:");
	lck0 = stdio_kb("/proc/self/status", "VmLck:");
	CHECK(pin0 >= 0 && lck0 >= 0);

	fd = open("/dev/iommu", O_RDWR);
	CHECK(fd >= 0);
	ioas = ioas_alloc(fd);
	mock_domain(fd, ioas); /* a domain: every mapped page is pinned */
	memset(buf, 1, NPAGES * 4096);
	CHECK(map_fixed(fd, ioas, buf, NPAGES * 4096, T_MOCK_APERTURE) == 0);

	CHECK(stdio_kb("/proc/self/status", "VmPin:") == pin0 + NPAGES * 4);
	CHECK(fd_kb("/proc/self/status", "VmPin:") == pin0 + NPAGES * 4);
	CHECK(fd_kb(self_task, "VmPin:") == pin0 + NPAGES * 4);
	CHECK(fd_kb("/proc/thread-self/status", "VmPin:") == pin0 + NPAGES * 4);
	/* RLIMIT_MODE per user (the default): nothing in the mm's locked_vm */
	CHECK(fd_kb("/proc/self/status", "VmLck:") == lck0);

	child = fork();
	CHECK(child >= 0);
	if (!child) {
		/* the parent's mm holds the pins, the child's holds none */
		CHECK(stdio_kb(by_pid, "VmPin:") == pin0 + NPAGES * 4);
		CHECK(stdio_kb("/proc/self/status", "VmPin:") < pin0 + NPAGES * 4);
		_exit(0);
	}
	CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && !WEXITSTATUS(status));

	close(fd); /* every pin goes with the iommufd */
	CHECK(stdio_kb("/proc/self/status", "VmPin:") == pin0);
	CHECK(fd_kb("/proc/self/status", "VmPin:") == pin0);
	puts("done");
	return 0;
}
