/*
 * LD_PRELOAD library of `iommufd-model run`: serves /dev/iommu (and the files it hands out)
 * from the model server of the run, leaving everything else to the real kernel.
 *
 * The model's own design (not the kernel's): every model file is a real AF_UNIX socket of the
 * program, bound to an abstract name "\0iommufd-model/<run>/<file id>" and connected to the
 * server. dup/fork/SCM_RIGHTS/close therefore behave as for any file, getsockname() tells a
 * model fd from any other, poll() works (the server writes one byte while a queue has
 * events) and the server sees the last close as a hangup (the file's release).
 * Requests travel on a per-thread SOCK_SEQPACKET connection (re-opened after fork); the
 * server reads and writes the program's memory itself (process_vm_readv/writev), so a bad
 * pointer is EFAULT, never a crash. New files reach the program as SCM_RIGHTS messages in
 * the middle of a request, so the handler learns their fd number as the kernel would.
 * Every call to the kernel here is a raw syscall: no dlsym, no recursion into the wrappers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

enum {
	OP_HELLO = 1,
	OP_OPEN = 2,
	OP_IOCTL = 3,
	OP_READ = 4,
	OP_WRITE = 5,
	OP_MAP_SHARED = 6,
	OP_MUNMAP = 7,
	OP_MMAP = 8,
	OP_INSTALLED = 9,
};
enum { OPEN_IOMMU = 1, OPEN_FAILNTH = 2 };
enum { REP_DONE = 0, REP_INSTALL = 1 };
#define REP_DRAIN 1u /* flags: the file's queue is empty, drop its readiness byte */

struct req {
	uint32_t op;
	uint32_t pad;
	uint64_t a[6];
};

struct rep {
	uint32_t kind;
	int32_t err;
	int64_t ret;
	uint32_t flags;
	uint32_t cloexec;
};

static char server_name[108];
static size_t server_len;
static char file_prefix[108];
static size_t file_prefix_len;
static char debugfs[4096];
static int enabled = -1;
/* the pid of the last image of this lineage that connected (a fork child inherits it) */
static pid_t lineage_pid;
static int fresh_image = 1;
/* set once this process (or an ancestor) touched the model: munmap is then reported */
static int model_active;

static __thread int ctl_fd = -1;
static __thread pid_t ctl_pid;

static void setup(void)
{
	const char *sock, *run, *dbg;

	if (enabled >= 0)
		return;
	sock = getenv("IOMMUFD_MODEL_SOCK");
	run = getenv("IOMMUFD_MODEL_RUN");
	dbg = getenv("IOMMUFD_MODEL_DEBUGFS");
	if (!sock || !run || strlen(sock) + 2 > sizeof(server_name)) {
		enabled = 0;
		return;
	}
	server_name[0] = 0;
	memcpy(server_name + 1, sock, strlen(sock));
	server_len = 1 + strlen(sock);
	file_prefix[0] = 0;
	file_prefix_len = 1 + (size_t)snprintf(file_prefix + 1, sizeof(file_prefix) - 1,
					       "iommufd-model/%s/", run);
	if (dbg && strlen(dbg) < sizeof(debugfs))
		strcpy(debugfs, dbg);
	enabled = 1;
}

__attribute__((constructor)) static void preload_init(void)
{
	setup();
}

/* The model file id of fd, or -1 when fd is no model file. errno is preserved. */
static long model_id(int fd)
{
	struct sockaddr_un sa;
	socklen_t len = sizeof(sa);
	int saved = errno;
	long id = -1;

	setup();
	if (enabled != 1 || fd < 0)
		return -1;
	if (syscall(SYS_getsockname, fd, &sa, &len) == 0 && sa.sun_family == AF_UNIX &&
	    len > offsetof(struct sockaddr_un, sun_path) + file_prefix_len &&
	    memcmp(sa.sun_path, file_prefix, file_prefix_len) == 0) {
		size_t n = len - offsetof(struct sockaddr_un, sun_path) - file_prefix_len;
		char num[24];

		if (n < sizeof(num)) {
			memcpy(num, sa.sun_path + file_prefix_len, n);
			num[n] = 0;
			id = strtol(num, NULL, 10);
		}
	}
	errno = saved;
	return id;
}

static int send_req(int fd, const struct req *r)
{
	ssize_t n;

	do
		n = syscall(SYS_sendto, fd, r, sizeof(*r), MSG_NOSIGNAL, NULL, 0);
	while (n < 0 && errno == EINTR);
	return n == (ssize_t)sizeof(*r) ? 0 : -1;
}

/* One request: answer the server's fd installs until it is done. Returns ret or -1/errno. */
static long call_on(int fd, struct req *r, uint32_t *flags)
{
	if (send_req(fd, r))
		goto dead;
	for (;;) {
		struct rep rep;
		char cbuf[CMSG_SPACE(sizeof(int))];
		struct iovec iov = { &rep, sizeof(rep) };
		struct msghdr mh = { 0 };
		struct cmsghdr *c;
		ssize_t n;
		int got = -1;

		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = cbuf;
		mh.msg_controllen = sizeof(cbuf);
		do
			n = syscall(SYS_recvmsg, fd, &mh, MSG_CMSG_CLOEXEC);
		while (n < 0 && errno == EINTR);
		if (n != (ssize_t)sizeof(rep))
			goto dead;
		for (c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
			if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
				memcpy(&got, CMSG_DATA(c), sizeof(int));
		if (rep.kind == REP_INSTALL) {
			struct req ack = { .op = OP_INSTALLED };

			/* received with CLOEXEC; the kernel's file may not want it */
			if (got >= 0 && !rep.cloexec)
				syscall(SYS_fcntl, got, F_SETFD, 0);
			ack.a[0] = (uint64_t)(int64_t)got;
			if (send_req(fd, &ack))
				goto dead;
			continue;
		}
		if (got >= 0)
			syscall(SYS_close, got);
		if (flags)
			*flags = rep.flags;
		if (rep.err) {
			errno = rep.err;
			return -1;
		}
		return rep.ret;
	}
dead:
	fprintf(stderr, "iommufd-model preload: lost the model server\n");
	errno = EIO;
	return -1;
}

static int ctl(void)
{
	pid_t pid = (pid_t)syscall(SYS_getpid);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct req hello = { .op = OP_HELLO };
	int s, hi;

	if (ctl_fd >= 0 && ctl_pid == pid)
		return ctl_fd;
	if (ctl_fd >= 0) /* inherited through fork: the parent keeps its own */
		syscall(SYS_close, ctl_fd);
	ctl_fd = -1;
	s = (int)syscall(SYS_socket, AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -1;
	memcpy(sa.sun_path, server_name, server_len);
	if (syscall(SYS_connect, s, &sa, offsetof(struct sockaddr_un, sun_path) + server_len)) {
		syscall(SYS_close, s);
		return -1;
	}
	/* keep the program's low fd numbers for the program */
	hi = (int)syscall(SYS_fcntl, s, F_DUPFD_CLOEXEC, 700);
	if (hi >= 0) {
		syscall(SYS_close, s);
		s = hi;
	}
	hello.a[0] = (uint64_t)pid;
	hello.a[1] = (uint64_t)syscall(SYS_gettid);
	hello.a[2] = (uint64_t)lineage_pid;
	hello.a[3] = (uint64_t)fresh_image;
	if (call_on(s, &hello, NULL) < 0) {
		syscall(SYS_close, s);
		return -1;
	}
	fresh_image = 0;
	lineage_pid = pid;
	ctl_fd = s;
	ctl_pid = pid;
	return s;
}

static long call(struct req *r, uint32_t *flags)
{
	int saved = errno;
	int fd = ctl();
	long ret;

	if (fd < 0) {
		errno = EIO;
		return -1;
	}
	model_active = 1;
	errno = saved;
	ret = call_on(fd, r, flags);
	return ret;
}

/* -- paths ---------------------------------------------------------------------------- */

/* The task a fail-nth path names (0: none): /proc/{self,PID}/task/TID/fail-nth,
 * /proc/thread-self/fail-nth, /proc/{self,PID}/fail-nth (the thread group leader). */
static long failnth_tid(const char *p)
{
	const char *rest;
	char *end;
	long pid, tid;

	if (strncmp(p, "/proc/", 6))
		return 0;
	p += 6;
	if (!strcmp(p, "thread-self/fail-nth"))
		return syscall(SYS_gettid);
	if (!strncmp(p, "self/", 5)) {
		pid = syscall(SYS_getpid);
		rest = p + 5;
	} else {
		pid = strtol(p, &end, 10);
		if (end == p || *end != '/')
			return 0;
		rest = end + 1;
	}
	if (!strcmp(rest, "fail-nth"))
		return pid;
	if (strncmp(rest, "task/", 5))
		return 0;
	tid = strtol(rest + 5, &end, 10);
	if (end == rest + 5 || strcmp(end, "/fail-nth"))
		return 0;
	return tid;
}

static const char *redirect(const char *path, char *buf, size_t size)
{
	static const char dbg[] = "/sys/kernel/debug";

	setup();
	if (enabled != 1 || !debugfs[0] || !path || strncmp(path, dbg, sizeof(dbg) - 1))
		return path;
	if (path[sizeof(dbg) - 1] && path[sizeof(dbg) - 1] != '/')
		return path;
	snprintf(buf, size, "%s%s", debugfs, path + sizeof(dbg) - 1);
	return buf;
}

/* Open a model file for path, or return -2 when path is not one. */
static int model_open(const char *path, int flags)
{
	struct req r = { .op = OP_OPEN };
	long tid;

	setup();
	if (enabled != 1 || !path)
		return -2;
	if (!strcmp(path, "/dev/iommu")) {
		r.a[0] = OPEN_IOMMU;
	} else if ((tid = failnth_tid(path)) > 0) {
		r.a[0] = OPEN_FAILNTH;
		r.a[1] = (uint64_t)tid;
	} else {
		return -2;
	}
	r.a[2] = (uint64_t)(unsigned int)flags;
	return (int)call(&r, NULL);
}

static int do_openat(int dirfd, const char *path, int flags, mode_t mode)
{
	char buf[4096];
	int fd = model_open(path, flags);

	if (fd != -2)
		return fd;
	return (int)syscall(SYS_openat, dirfd, redirect(path, buf, sizeof(buf)), flags, mode);
}

#define MODE_ARG(flags, mode)                                   \
	do {                                                    \
		if ((flags) & (O_CREAT | __O_TMPFILE)) {        \
			va_list ap;                             \
			va_start(ap, flags);                    \
			mode = va_arg(ap, mode_t);              \
			va_end(ap);                             \
		}                                               \
	} while (0)

int open(const char *path, int flags, ...)
{
	mode_t mode = 0;

	MODE_ARG(flags, mode);
	return do_openat(AT_FDCWD, path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
	mode_t mode = 0;

	MODE_ARG(flags, mode);
	return do_openat(AT_FDCWD, path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...)
{
	mode_t mode = 0;

	MODE_ARG(flags, mode);
	return do_openat(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...)
{
	mode_t mode = 0;

	MODE_ARG(flags, mode);
	return do_openat(dirfd, path, flags, mode);
}

int __open_2(const char *path, int flags)
{
	return do_openat(AT_FDCWD, path, flags, 0);
}

int __open64_2(const char *path, int flags)
{
	return do_openat(AT_FDCWD, path, flags, 0);
}

int __openat_2(int dirfd, const char *path, int flags)
{
	return do_openat(dirfd, path, flags, 0);
}

int __openat64_2(int dirfd, const char *path, int flags)
{
	return do_openat(dirfd, path, flags, 0);
}

DIR *opendir(const char *path)
{
	char buf[4096];
	int fd = (int)syscall(SYS_openat, AT_FDCWD, redirect(path, buf, sizeof(buf)),
			      O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
	DIR *d;

	if (fd < 0)
		return NULL;
	d = fdopendir(fd);
	if (!d)
		syscall(SYS_close, fd);
	return d;
}

/* -- ioctl, read, write ------------------------------------------------------------------ */

int ioctl(int fd, unsigned long request, ...)
{
	va_list ap;
	unsigned long arg;
	long id;
	struct req r = { .op = OP_IOCTL };

	va_start(ap, request);
	arg = va_arg(ap, unsigned long);
	va_end(ap);
	id = model_id(fd);
	if (id < 0)
		return (int)syscall(SYS_ioctl, fd, request, arg);
	r.a[0] = (uint64_t)id;
	r.a[1] = (uint32_t)request;
	r.a[2] = arg;
	return (int)call(&r, NULL);
}

static ssize_t model_rw(int op, int fd, long id, const void *buf, size_t count, off_t off,
			int has_off)
{
	struct req r = { .op = (uint32_t)op };
	uint32_t flags = 0;
	ssize_t ret;

	r.a[0] = (uint64_t)id;
	r.a[1] = (uint64_t)(uintptr_t)buf;
	r.a[2] = count;
	r.a[3] = (uint64_t)off;
	r.a[4] = (uint64_t)has_off;
	ret = call(&r, &flags);
	if (flags & REP_DRAIN) {
		char c;
		int saved = errno;

		syscall(SYS_recvfrom, fd, &c, 1, MSG_DONTWAIT, NULL, NULL);
		errno = saved;
	}
	return ret;
}

ssize_t read(int fd, void *buf, size_t count)
{
	long id = model_id(fd);

	if (id < 0)
		return syscall(SYS_read, fd, buf, count);
	return model_rw(OP_READ, fd, id, buf, count, 0, 0);
}

ssize_t __read_chk(int fd, void *buf, size_t count, size_t buflen)
{
	(void)buflen;
	return read(fd, buf, count);
}

ssize_t write(int fd, const void *buf, size_t count)
{
	long id = model_id(fd);

	if (id < 0)
		return syscall(SYS_write, fd, buf, count);
	return model_rw(OP_WRITE, fd, id, buf, count, 0, 0);
}

ssize_t pread(int fd, void *buf, size_t count, off_t off)
{
	long id = model_id(fd);

	if (id < 0)
		return syscall(SYS_pread64, fd, buf, count, off);
	return model_rw(OP_READ, fd, id, buf, count, off, 1);
}

ssize_t pread64(int fd, void *buf, size_t count, off_t off) __attribute__((alias("pread")));

ssize_t pwrite(int fd, const void *buf, size_t count, off_t off)
{
	long id = model_id(fd);

	if (id < 0)
		return syscall(SYS_pwrite64, fd, buf, count, off);
	return model_rw(OP_WRITE, fd, id, buf, count, off, 1);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t off) __attribute__((alias("pwrite")));

/* -- memory ------------------------------------------------------------------------------ */

#define HUGE_2M (2UL << 20)

static void *raw_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
}

static void report_unmap(void *addr, size_t len)
{
	struct req r = { .op = OP_MUNMAP };

	if (!model_active)
		return;
	r.a[0] = (uint64_t)(uintptr_t)addr;
	r.a[1] = len;
	call(&r, NULL);
}

static void report_shared(void *addr, size_t len, int fd, off_t off, int huge)
{
	struct req r = { .op = OP_MAP_SHARED };

	r.a[0] = (uint64_t)(uintptr_t)addr;
	r.a[1] = len;
	r.a[2] = (uint64_t)fd;
	r.a[3] = (uint64_t)off;
	r.a[4] = (uint64_t)huge;
	call(&r, NULL);
}

/* A 2 MiB aligned range of len bytes of address space (MAP_HUGETLB stand-in), or NULL. */
static void *aligned_hole(size_t len)
{
	char *p = raw_mmap(NULL, len + HUGE_2M, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *a;

	if (p == MAP_FAILED)
		return NULL;
	a = (char *)(((uintptr_t)p + HUGE_2M - 1) & ~(HUGE_2M - 1));
	if (a > p)
		syscall(SYS_munmap, p, a - p);
	if (a + len < p + len + HUGE_2M)
		syscall(SYS_munmap, a + len, p + len + HUGE_2M - (a + len));
	return a;
}

static void *model_mmap(long id, void *addr, size_t len, int prot, int flags, off_t off)
{
	struct req r = { .op = OP_MMAP };
	void *p;
	int saved;

	/* Shared anonymous memory the server fills with the region's bytes once the core
	 * accepted the mapping (its checks are the kernel's; see docs). */
	p = raw_mmap(addr, len, PROT_READ | PROT_WRITE,
		     (flags & MAP_FIXED) | MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return p;
	r.a[0] = (uint64_t)id;
	r.a[1] = (uint64_t)off;
	r.a[2] = len;
	r.a[3] = (uint64_t)(uintptr_t)p;
	r.a[4] = (uint64_t)(unsigned int)prot;
	r.a[5] = (uint64_t)(unsigned int)flags;
	if (call(&r, NULL) < 0) {
		saved = errno;
		syscall(SYS_munmap, p, len);
		errno = saved;
		return MAP_FAILED;
	}
	syscall(SYS_mprotect, p, len, prot);
	return p;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	long id = model_id(fd);
	void *p;
	int mfd, saved, huge = !!(flags & MAP_HUGETLB);

	if (id >= 0)
		return model_mmap(id, addr, len, prot, flags, off);
	if (enabled != 1)
		return raw_mmap(addr, len, prot, flags, fd, off);
	if (flags & MAP_FIXED)
		report_unmap(addr, len);
	if (flags & MAP_HUGETLB) {
		/* No huge pages are asked of the host: 2 MiB aligned ordinary memory (docs). */
		flags &= ~(MAP_HUGETLB | (0x3f << MAP_HUGE_SHIFT));
		if (!(flags & (MAP_FIXED | MAP_FIXED_NOREPLACE))) {
			len = (len + HUGE_2M - 1) & ~(HUGE_2M - 1);
			addr = aligned_hole(len);
			if (!addr) {
				errno = ENOMEM;
				return MAP_FAILED;
			}
			flags |= MAP_FIXED;
		}
	}
	if (!(flags & (MAP_SHARED | MAP_SHARED_VALIDATE)))
		return raw_mmap(addr, len, prot, flags, fd, off);
	if (!(flags & MAP_ANONYMOUS)) {
		p = raw_mmap(addr, len, prot, flags, fd, off);
		if (p != MAP_FAILED) {
			saved = errno;
			report_shared(p, len, fd, off, 0);
			errno = saved;
		}
		return p;
	}
	/* Shared anonymous memory becomes a memfd, so that the server can reach its pages
	 * from any process of the run, and after the one that pinned them is gone. A
	 * MAP_HUGETLB one is said to be huge: the model backs it with 2 MiB frame runs. */
	mfd = (int)syscall(SYS_memfd_create, "iommufd-model-shm", MFD_CLOEXEC);
	if (mfd < 0)
		return raw_mmap(addr, len, prot, flags, fd, off);
	if (syscall(SYS_ftruncate, mfd, len)) {
		saved = errno;
		syscall(SYS_close, mfd);
		errno = saved;
		return MAP_FAILED;
	}
	p = raw_mmap(addr, len, prot, flags & ~MAP_ANONYMOUS, mfd, 0);
	saved = errno;
	if (p != MAP_FAILED)
		report_shared(p, len, mfd, 0, huge);
	syscall(SYS_close, mfd);
	errno = saved;
	return p;
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
	__attribute__((alias("mmap")));

int munmap(void *addr, size_t len)
{
	setup();
	if (enabled == 1)
		report_unmap(addr, len);
	return (int)syscall(SYS_munmap, addr, len);
}
