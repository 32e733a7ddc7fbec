/*
 * LD_PRELOAD library of `iommufd-model run`: serves /dev/iommu (and the files it hands out)
 * from the model server of the run, leaving everything else to the real kernel.
 *
 * The model's own design (not the kernel's): every model file is a real AF_UNIX socket of the
 * program, bound to an abstract name "\0iommufd-model/<run>/<file id>" and connected to the
 * server. dup/fork/SCM_RIGHTS/close therefore behave as for any file, getsockname() tells a
 * model fd from any other (its answer kept per fd number: see model_id), poll() works (the
 * server writes one byte while a queue has events) and the server sees the last close as a
 * hangup (the file's release). Requests travel on a per-thread SOCK_SEQPACKET connection
 * (re-opened after fork): one sendmsg and one recvmsg per model call. A small ioctl struct
 * goes with the request, copied by the kernel from the program's memory; every other pointer
 * the server reads and writes itself (process_vm_readv/writev), so a bad pointer is EFAULT,
 * never a crash. New files reach the program as SCM_RIGHTS messages in
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
#include <dlfcn.h>
#include <sched.h>
#include <signal.h>
#include <ucontext.h>
#include <asm/prctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "spin_page.h"

/* System call n with up to six arguments, as libc's syscall() makes it (-1 and errno on
 * failure), made here: the preload's own calls must not go through its syscall() below
 * (which keeps the table of model fds for programs calling libc's syscall()), and this is
 * async-signal-safe for the MMIO fault handler. */
static long syscall6(long n, const long a[6])
{
	register long r10 __asm__("r10") = a[3];
	register long r8 __asm__("r8") = a[4];
	register long r9 __asm__("r9") = a[5];
	long ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a[0]), "S"(a[1]), "d"(a[2]), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	if ((unsigned long)ret > -4096UL) {
		errno = (int)-ret;
		return -1;
	}
	return ret;
}

/* The six arguments of a syscall()-style call (those not passed are whatever the registers
 * and stack hold, as libc's syscall() takes them too). */
#define SIX_ARGS(n, a)                                  \
	do {                                            \
		va_list ap;                             \
		va_start(ap, n);                        \
		for (int i = 0; i < 6; i++)             \
			(a)[i] = va_arg(ap, long);      \
		va_end(ap);                             \
	} while (0)

static long raw_syscall(long n, ...)
{
	long a[6];

	SIX_ARGS(n, a);
	return syscall6(n, a);
}

#define syscall raw_syscall

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
	OP_MMIO = 10,
	OP_STATUS = 11,
	OP_CREDS = 12,
};
enum { OPEN_IOMMU = 1, OPEN_FAILNTH = 2, OPEN_PATH = 3 };
enum { REP_DONE = 0, REP_INSTALL = 1 };
#define REP_DRAIN 1u /* flags: the file's queue is empty, drop its readiness byte */
#define REP_MMIO 2u /* flags (OP_MMAP): the mapping is MMIO, every access is trapped */

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
	uint32_t arg; /* REP_INSTALL: keep O_CLOEXEC; REP_DONE: where the copy-back goes */
};

/* A small ioctl struct travels inline with its request (INLINE_MAX bytes after struct req,
 * which the server uses when the struct's leading size fits in them), and what the model
 * changed in it comes back inline with the reply (see ioctl()): no process_vm_readv/writev
 * by the server for it. The model's own design; the bytes are those the server would read. */
#define INLINE_MAX 256

struct reply {
	struct rep rep;
	uint8_t body[INLINE_MAX]; /* bytes to copy back at offset rep.arg of the struct */
};

static char server_name[108];
static size_t server_len;
static char file_prefix[108];
static size_t file_prefix_len;
static char debugfs[4096];
/* newline-separated path prefixes from the environment (sysfs names such as
 * /sys/devices/pci0000:01 contain ':', so ':' cannot separate them) */
#define MAX_PREFIXES 8
struct prefixes {
	char text[1024];
	const char *p[MAX_PREFIXES];
	size_t len[MAX_PREFIXES];
	int n;
};
/* paths the model serves (IOMMUFD_MODEL_PATHS, e.g. "/dev/vfio/") */
static struct prefixes model_paths;
/* the sysfs view: paths under IOMMUFD_MODEL_VIEW_PREFIXES (e.g. "/sys/bus/pci") are looked up
 * under the directory IOMMUFD_MODEL_VIEW (the run's copy of the model's sysfs tree) */
static struct prefixes view_paths;
static char view_root[1024];
static int enabled = -1;
static void pid_page_init(void);
/* the pid of the last image of this lineage that connected (a fork child inherits it) */
static pid_t lineage_pid;
static int fresh_image = 1;
/* set once this process (or an ancestor) touched the model: munmap is then reported */
static int model_active;

static __thread int ctl_fd = -1;
static __thread pid_t ctl_pid;

/* -- the wait for a reply: spin first, where the server runs on another CPU ------------------
 *
 * The model's own design (spin_page.h says why). The thread waiting for a reply polls for it
 * first, yielding its CPU at every turn, unless the server last ran on this very CPU, and
 * only while no other thread of the program spins (spin_until is the slot: a multi-threaded
 * program leaves the server a CPU). Its budget adapts (spin_adapt). IOMMUFD_MODEL_SPIN names
 * the page (created by the server, MAP_SHARED by every process of the run);
 * IOMMUFD_MODEL_SPIN_US is the longest spin (default SPIN_MAX_US; 0: never spin). */
static struct spin_page *spin_page;
static int64_t spin_max; /* ns */
static __thread int64_t spin_budget = -1;

static int64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void spin_page_init(void)
{
	const char *path = getenv("IOMMUFD_MODEL_SPIN"), *us = getenv("IOMMUFD_MODEL_SPIN_US");
	void *p;
	int fd;

	spin_max = (us ? atol(us) : SPIN_MAX_US) * 1000L;
	if (!path || spin_max <= 0)
		return;
	fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return;
	p = (void *)syscall(SYS_mmap, NULL, 4096UL, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0L);
	syscall(SYS_close, fd);
	if (p != MAP_FAILED)
		spin_page = p;
}

/* recvmsg of the server's next message on fd: spun for first when worth it (above). */
static ssize_t recv_reply(int fd, struct msghdr *mh)
{
	struct spin_page *page = spin_page;
	int64_t start = 0, slot = 0, until;
	int cpu, spun = 0, saved = errno;
	uint32_t other;
	ssize_t n;

	if (page) {
		cpu = sched_getcpu();
		if (spin_budget < 0)
			spin_budget = spin_max;
		other = __atomic_load_n(&page->server_cpu, __ATOMIC_RELAXED);
		if (cpu >= 0 && other != SPIN_CPU_UNKNOWN && (uint32_t)cpu != other)
			start = now_ns();
	}
	until = start + spin_budget;
	if (start && spin_budget > 0 &&
	    __atomic_load_n(&page->spin_until, __ATOMIC_RELAXED) < start &&
	    __atomic_compare_exchange_n(&page->spin_until, &slot, until, 0, __ATOMIC_ACQUIRE,
					__ATOMIC_RELAXED)) {
		spun = 1;
		for (;;) {
			n = syscall(SYS_recvmsg, fd, mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
			if (n >= 0 || (errno != EAGAIN && errno != EINTR) || now_ns() >= until)
				break;
			syscall(SYS_sched_yield);
		}
		__atomic_compare_exchange_n(&page->spin_until, &until, 0, 0, __ATOMIC_RELEASE,
					    __ATOMIC_RELAXED);
		if (n >= 0)
			errno = saved;
		if (n >= 0 || (errno != EAGAIN && errno != EINTR))
			return n;
	} else if (start && spin_budget > 0) {
		start = 0; /* another thread spins: this one sleeps, and learns nothing */
	}
	do
		n = syscall(SYS_recvmsg, fd, mh, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (start)
		spin_budget = spin_adapt(spun ? spin_budget : 0, spin_max, now_ns() - start);
	if (n >= 0)
		errno = saved;
	return n;
}

static void parse_prefixes(const char *env, struct prefixes *out)
{
	char *p;

	if (!env || strlen(env) >= sizeof(out->text))
		return;
	p = strcpy(out->text, env);
	while (*p && out->n < MAX_PREFIXES) {
		char *end = strchr(p, '\n');

		if (end)
			*end = 0;
		if (*p) {
			out->p[out->n] = p;
			out->len[out->n++] = strlen(p);
		}
		if (!end)
			break;
		p = end + 1;
	}
}

/* path is one of the prefixes or lies below one ("/sys/bus/pci" or "/sys/bus/pci/...") */
static int under(const char *path, const struct prefixes *pre)
{
	int i;

	for (i = 0; i < pre->n; i++)
		if (!strncmp(path, pre->p[i], pre->len[i]) &&
		    (path[pre->len[i]] == 0 || path[pre->len[i]] == '/' ||
		     pre->p[i][pre->len[i] - 1] == '/'))
			return 1;
	return 0;
}

static void setup(void)
{
	const char *sock, *run, *dbg, *view;

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
	parse_prefixes(getenv("IOMMUFD_MODEL_PATHS"), &model_paths);
	view = getenv("IOMMUFD_MODEL_VIEW");
	if (view && strlen(view) < sizeof(view_root)) {
		strcpy(view_root, view);
		parse_prefixes(getenv("IOMMUFD_MODEL_VIEW_PREFIXES"), &view_paths);
	}
	pid_page_init();
	spin_page_init();
	enabled = 1;
}

__attribute__((constructor)) static void preload_init(void)
{
	setup();
}

/* -- which fds are model files -------------------------------------------------------------
 *
 * The model's own design. A model file is an AF_UNIX socket bound to the run's prefix: the
 * kernel tells with one getsockname() (ask_kernel). Its answer is kept per fd number in
 * fd_table, so a model call on a known fd makes no system call to find its file. Only
 * positive answers are kept: a number with no entry is asked of the kernel every time, so a
 * model fd the preload never saw created (a raw dup, an fd received some other way) is found
 * all the same. An entry must never outlive the file it names: every libc entry point that
 * closes an fd number or puts another file at it (close, close_range, closefrom, dup2, dup3,
 * fclose, and libc's syscall() for them) brackets its system call with fd_busy()/fd_done(),
 * and every one that returns a new number (open, dup, fcntl F_DUPFD*, recvmsg's SCM_RIGHTS,
 * the server's installs) clears it.
 *
 * An entry is one u64: the model id + 1 (low 32 bits, 0: none), a version (bits 32-47) that
 * every change bumps, and the number of closes of that number in progress (bits 48-63). A
 * lookup uses an entry only when no close is in progress; an answer of the kernel is stored
 * with a compare-and-swap against the entry read before asking, so it is dropped when any
 * close began or ended in between (a close that began before the lookup is still "busy" until
 * its system call is done, so the lookup's answer, taken before that call, is never kept).
 * Numbers from FD_TABLE up are always asked of the kernel. A fork child inherits the table
 * with the fd table it describes; exec starts an empty one. */
#define FD_TABLE 4096
#define FD_ID 0xffffffffULL
#define FD_VERSION (1ULL << 32)
#define FD_VMASK (0xffffULL << 32)
#define FD_BUSY (1ULL << 48)
static uint64_t fd_table[FD_TABLE];

/* The process's fd generation (the model's own design): one word like an fd_table entry
 * without the id, a version (bits 0-47) bumped by every change of any fd number (the same
 * calls: fd_change) and the changes in progress (bits 48-63). Each ioctl request carries
 * fd_generation(): the version when no change is in progress, else 0. Two moments that
 * read the same nonzero value have the same fd table (as far as the calls above change it),
 * so the server may take a check it made for one request carrying it (which fd number names
 * which file) as true for the next one carrying it: run/_fastrw.c keeps the access fd's
 * identity so, instead of asking the kernel again (docs/running-programs.md). */
#define GEN_VMASK ((1ULL << 48) - 1)
#define GEN_BUSY (1ULL << 48)
static uint64_t fd_gen = 1;

static void gen_change(int busy)
{
	uint64_t e = __atomic_load_n(&fd_gen, __ATOMIC_SEQ_CST), n;

	do
		n = ((e & ~GEN_VMASK) + (uint64_t)(int64_t)busy * GEN_BUSY) |
		    (((e & GEN_VMASK) + 1) & GEN_VMASK);
	while (!__atomic_compare_exchange_n(&fd_gen, &e, n, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
}

static uint64_t fd_generation(void)
{
	uint64_t e = __atomic_load_n(&fd_gen, __ATOMIC_SEQ_CST);

	return e < GEN_BUSY ? e : 0;
}

/* Change fd's entry: add busy (+1, -1 or 0) to its closes in progress, bump its version and
 * drop its id. */
static void fd_entry_change(int fd, int busy)
{
	uint64_t e, n;

	if (fd < 0 || fd >= FD_TABLE)
		return;
	e = __atomic_load_n(&fd_table[fd], __ATOMIC_SEQ_CST);
	do
		n = ((e & ~(FD_VMASK | FD_ID)) + (uint64_t)(int64_t)busy * FD_BUSY) |
		    (((e & FD_VMASK) + FD_VERSION) & FD_VMASK);
	while (!__atomic_compare_exchange_n(&fd_table[fd], &e, n, 0, __ATOMIC_SEQ_CST,
					    __ATOMIC_SEQ_CST));
}

/* fd_entry_change, and the process's fd generation likewise, whatever the number. */
static void fd_change(int fd, int busy)
{
	if (fd < 0)
		return;
	gen_change(busy);
	fd_entry_change(fd, busy);
}

/* fd is a new number (or its file is about to change): forget what it was. */
static void fd_forget(int fd)
{
	fd_change(fd, 0);
}

/* A close (or dup2 onto fd) begins and ends. */
static void fd_busy(int fd)
{
	fd_change(fd, 1);
}

static void fd_done(int fd)
{
	fd_change(fd, -1);
}

/* The pid of this process, without a system call: it is kept in a page the kernel empties in
 * every child that gets a copy of this memory (MADV_WIPEONFORK: fork, _Fork, clone without
 * CLONE_VM however made), so a child asks the kernel once. A vfork child (or any task sharing
 * this memory) sees its parent's pid: it shares the parent's connection (docs). */
static pid_t *pid_page;

static pid_t self_pid(void)
{
	pid_t pid = pid_page ? __atomic_load_n(pid_page, __ATOMIC_RELAXED) : 0;

	if (!pid) {
		pid = (pid_t)syscall(SYS_getpid);
		if (pid_page)
			__atomic_store_n(pid_page, pid, __ATOMIC_RELAXED);
	}
	return pid;
}

static void pid_page_init(void)
{
	void *p = (void *)syscall(SYS_mmap, NULL, 4096UL, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0L);

	if (p == MAP_FAILED)
		return;
	if (syscall(SYS_madvise, p, 4096UL, MADV_WIPEONFORK)) {
		syscall(SYS_munmap, p, 4096UL);
		return;
	}
	pid_page = p;
}

/* The model file id of fd by getsockname(), or -1 when fd is no model file. */
static long ask_kernel(int fd)
{
	struct sockaddr_un sa;
	socklen_t len = sizeof(sa);
	long id = -1;

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
	return id;
}

/* The model file id of fd, or -1 when fd is no model file. errno is preserved. */
static long model_id(int fd)
{
	uint64_t e = 0;
	int saved;
	long id;

	setup();
	if (enabled != 1 || fd < 0)
		return -1;
	if (fd < FD_TABLE) {
		e = __atomic_load_n(&fd_table[fd], __ATOMIC_SEQ_CST);
		if (e < FD_BUSY && (e & FD_ID))
			return (long)(e & FD_ID) - 1;
	}
	saved = errno;
	id = ask_kernel(fd);
	/* Keep the answer, unless a close of fd is in progress or happened meanwhile (the CAS
	 * fails), or this memory is another process's (a vfork child's answer is about its own
	 * fd table: the self_pid() of shared memory is the parent's). */
	if (id >= 0 && id < (long)FD_ID - 1 && fd < FD_TABLE && e < FD_BUSY &&
	    self_pid() == (pid_t)syscall(SYS_getpid))
		__atomic_compare_exchange_n(&fd_table[fd], &e, e | (uint64_t)(id + 1), 0,
					    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
	errno = saved;
	return id;
}

/* One request message: r, then (when inl is not NULL) the INLINE_MAX bytes of the program's
 * memory at inl, copied by the kernel as it sends them, as copy_from_user would: memory that
 * cannot be read that far fails the send with EFAULT (no fault here, nothing sent), and the
 * request goes without them (the server then reads what it can itself). */
static int send_req(int fd, const struct req *r, const void *inl)
{
	struct iovec iov[2] = { { (void *)r, sizeof(*r) }, { (void *)inl, INLINE_MAX } };
	struct msghdr mh = { .msg_iov = iov, .msg_iovlen = inl ? 2 : 1 };
	int saved = errno;
	ssize_t n;

	if (spin_page) {
		int cpu = sched_getcpu();

		if (cpu >= 0)
			__atomic_store_n(&spin_page->client_cpu, (uint32_t)cpu, __ATOMIC_RELAXED);
	}
	for (;;) {
		n = syscall(SYS_sendmsg, fd, &mh, MSG_NOSIGNAL);
		if (n == (ssize_t)(sizeof(*r) + (mh.msg_iovlen == 2 ? INLINE_MAX : 0))) {
			errno = saved;
			return 0;
		}
		if (n < 0 && errno == EFAULT && mh.msg_iovlen == 2)
			mh.msg_iovlen = 1;
		else if (n >= 0 || errno != EINTR)
			return -1;
	}
}

/* One request (r and, from inl, its inline struct): answer the server's fd installs until it
 * is done. 0 with *out filled and *body its inline bytes' count, or -1 when the server is
 * gone. Raw system calls only: the MMIO fault handler makes requests. */
static int exchange(int fd, const struct req *r, const void *inl, struct reply *out,
		    size_t *body)
{
	if (send_req(fd, r, inl))
		return -1;
	for (;;) {
		char cbuf[CMSG_SPACE(sizeof(int))];
		struct iovec iov = { out, sizeof(*out) };
		struct msghdr mh = { 0 };
		struct cmsghdr *c;
		ssize_t n;
		int got = -1;

		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = cbuf;
		mh.msg_controllen = sizeof(cbuf);
		n = recv_reply(fd, &mh);
		if (n < (ssize_t)sizeof(out->rep))
			return -1;
		for (c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
			if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
				memcpy(&got, CMSG_DATA(c), sizeof(int));
		if (out->rep.kind == REP_INSTALL) {
			struct req ack = { .op = OP_INSTALLED };

			/* received with CLOEXEC; the kernel's file may not want it */
			if (got >= 0 && !out->rep.arg)
				syscall(SYS_fcntl, got, F_SETFD, 0);
			fd_forget(got); /* a new number: found a model file when first used */
			ack.a[0] = (uint64_t)(int64_t)got;
			if (send_req(fd, &ack, NULL))
				return -1;
			continue;
		}
		if (got >= 0)
			syscall(SYS_close, got);
		*body = (size_t)n - sizeof(out->rep);
		return 0;
	}
}

/* One request on connection fd, its reply in *out. Returns ret or -1/errno. */
static long call_on(int fd, const struct req *r, const void *inl, struct reply *out,
		    size_t *body)
{
	if (exchange(fd, r, inl, out, body)) {
		fprintf(stderr, "iommufd-model preload: lost the model server\n");
		errno = EIO;
		return -1;
	}
	if (out->rep.err) {
		errno = out->rep.err;
		return -1;
	}
	return out->rep.ret;
}

/* This thread's connection to the server (a fork child opens its own). */
static int ctl(void)
{
	pid_t pid = self_pid();
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct req hello = { .op = OP_HELLO };
	struct reply rep;
	size_t body;
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
	fd_forget(s); /* no model file at this number now */
	hello.a[0] = (uint64_t)pid;
	hello.a[1] = (uint64_t)syscall(SYS_gettid);
	hello.a[2] = (uint64_t)lineage_pid;
	hello.a[3] = (uint64_t)fresh_image;
	if (exchange(s, &hello, NULL, &rep, &body) || rep.rep.err) {
		syscall(SYS_close, s);
		return -1;
	}
	fresh_image = 0;
	lineage_pid = pid;
	ctl_fd = s;
	ctl_pid = pid;
	return s;
}

/* A request of len bytes (r and its inline bytes) on this thread's connection. */
static long call_inline(const struct req *r, const void *inl, struct reply *out, size_t *body)
{
	int saved = errno;
	int fd = ctl();

	if (fd < 0) {
		errno = EIO;
		return -1;
	}
	model_active = 1;
	errno = saved;
	return call_on(fd, r, inl, out, body);
}

static long call(const struct req *r, uint32_t *flags)
{
	struct reply out;
	size_t body;
	long ret;

	out.rep.flags = 0;
	ret = call_inline(r, NULL, &out, &body);

	if (flags)
		*flags = out.rep.flags;
	return ret;
}

/* -- paths ---------------------------------------------------------------------------- */

/* A per-task file of procfs: path is /proc/{self,thread-self,PID}/NAME or
 * /proc/{self,PID}/task/TID/NAME. 1 with *pid the process and *tid the task it names (the
 * process itself for /proc/{self,PID}/NAME), 0 when path is none of these. */
static int proc_task_file(const char *p, const char *name, long *pid, long *tid)
{
	char *end;

	if (strncmp(p, "/proc/", 6))
		return 0;
	p += 6;
	if (!strncmp(p, "thread-self/", 12)) {
		*pid = syscall(SYS_getpid);
		*tid = syscall(SYS_gettid);
		return !strcmp(p + 12, name);
	}
	if (!strncmp(p, "self/", 5)) {
		*pid = syscall(SYS_getpid);
		p += 5;
	} else {
		*pid = strtol(p, &end, 10);
		if (end == p || *end != '/' || *pid <= 0)
			return 0;
		p = end + 1;
	}
	*tid = *pid;
	if (!strcmp(p, name))
		return 1;
	if (strncmp(p, "task/", 5))
		return 0;
	*tid = strtol(p + 5, &end, 10);
	return end != p + 5 && *tid > 0 && *end == '/' && !strcmp(end + 1, name);
}

/* The path the kernel should look up for path: the run's debugfs knobs and sysfs view
 * stand in for /sys/kernel/debug and the model's sysfs directories. */
static const char *redirect(const char *path, char *buf, size_t size)
{
	static const char dbg[] = "/sys/kernel/debug";

	setup();
	if (enabled != 1 || !path)
		return path;
	if (view_root[0] && under(path, &view_paths)) {
		snprintf(buf, size, "%s%s", view_root, path);
		return buf;
	}
	if (!debugfs[0] || strncmp(path, dbg, sizeof(dbg) - 1))
		return path;
	if (path[sizeof(dbg) - 1] && path[sizeof(dbg) - 1] != '/')
		return path;
	snprintf(buf, size, "%s%s", debugfs, path + sizeof(dbg) - 1);
	return buf;
}

/* A regular file of the sysfs view: an attribute the server serves (its show/store). */
static int view_file(const char *path, char *buf, size_t size)
{
	struct stat st;

	if (!view_root[0] || !under(path, &view_paths))
		return 0;
	redirect(path, buf, size);
	return syscall(SYS_newfstatat, AT_FDCWD, buf, &st, 0) == 0 && S_ISREG(st.st_mode);
}

/* Open a model file for path, or return -2 when path is not one. */
static int model_open(const char *path, int flags)
{
	struct req r = { .op = OP_OPEN };
	char buf[4096];
	long pid, tid;

	setup();
	if (enabled != 1 || !path)
		return -2;
	if (!strcmp(path, "/dev/iommu")) {
		r.a[0] = OPEN_IOMMU;
	} else if (proc_task_file(path, "fail-nth", &pid, &tid)) {
		r.a[0] = OPEN_FAILNTH;
		r.a[1] = (uint64_t)tid;
	} else if (under(path, &model_paths)) {
		/* the server reads the path from our memory */
		r.a[0] = OPEN_PATH;
		r.a[1] = (uint64_t)(uintptr_t)path;
		r.a[3] = strlen(path);
	} else if (view_file(path, buf, sizeof(buf))) {
		r.a[0] = OPEN_PATH;
		r.a[1] = (uint64_t)(uintptr_t)buf;
		r.a[3] = strlen(buf);
	} else {
		return -2;
	}
	r.a[2] = (uint64_t)(unsigned int)flags;
	return (int)call(&r, NULL);
}

/* -- /proc/<pid>/status: VmPin and VmLck as the kernel would show them ------------------
 *
 * The kernel adds what iommufd pins to the mm's pinned_vm (VmPin) and, in RLIMIT_MODE per
 * process (IOPT_PAGES_ACCOUNT_MM), to its locked_vm (VmLck); the host's counters know nothing
 * of the model's pins. The model's own design: a read-only open of a status file of a process
 * the model accounted pages to gets a copy of the host's file, taken at open, with the
 * model's pages added to those two lines (the program reads it as it would the kernel's). */


/* "Name:\t   N kB" with pages (4 KiB each) added to N, in the kernel's layout (width 8). */
static size_t status_line(char *out, size_t room, const char *line, uint64_t pages)
{
	const char *p = strchr(line, ':') + 1;
	unsigned long long kb = strtoull(p, NULL, 10) + pages * 4;
	int n = snprintf(out, room, "%.*s\t%8llu kB\n", (int)(p - line), line, kb);

	return n > 0 && (size_t)n < room ? (size_t)n : 0;
}

/* An fd of a memfd holding path's status with the model's pages added, or -2 when the model
 * accounted nothing to pid (the caller opens the real file), or -1/errno. */
static int status_view(const char *path, long pid, int cloexec)
{
	struct req r = { .op = OP_STATUS };
	struct reply out;
	size_t body = 0, len = 0, olen = 0;
	uint64_t acc[2];
	char in[16384], res[17408];
	ssize_t n;
	int fd, saved = errno;

	r.a[0] = (uint64_t)pid;
	if (call_inline(&r, NULL, &out, &body) < 0 || body < sizeof(acc)) {
		errno = saved;
		return -2;
	}
	memcpy(acc, out.body, sizeof(acc));
	if (!acc[0] && !acc[1])
		return -2;
	fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	while (len < sizeof(in) - 1 && (n = syscall(SYS_read, fd, in + len, sizeof(in) - 1 - len)) > 0)
		len += (size_t)n;
	syscall(SYS_close, fd);
	in[len] = 0;
	for (const char *line = in; *line;) {
		const char *nl = strchr(line, '\n');
		size_t ll = nl ? (size_t)(nl - line) + 1 : strlen(line), w = 0;

		if (!strncmp(line, "VmPin:", 6))
			w = status_line(res + olen, sizeof(res) - olen, line, acc[0]);
		else if (!strncmp(line, "VmLck:", 6))
			w = status_line(res + olen, sizeof(res) - olen, line, acc[1]);
		if (!w && ll < sizeof(res) - olen) {
			memcpy(res + olen, line, ll);
			w = ll;
		}
		olen += w;
		line += ll;
	}
	fd = (int)syscall(SYS_memfd_create, "iommufd-model-status", cloexec ? MFD_CLOEXEC : 0);
	if (fd < 0)
		return -1;
	if (syscall(SYS_write, fd, res, olen) != (long)olen || syscall(SYS_lseek, fd, 0, SEEK_SET)) {
		saved = errno;
		syscall(SYS_close, fd);
		errno = saved;
		return -1;
	}
	errno = saved;
	return fd;
}

/* The status view for a read-only open of path, or -2 when path is no status file (or the
 * model has nothing to add to it). */
static int status_open(const char *path, int flags)
{
	long pid, tid;

	setup();
	if (enabled != 1 || !path || (flags & O_ACCMODE) != O_RDONLY)
		return -2;
	if (!proc_task_file(path, "status", &pid, &tid)) /* a thread shows its process's mm */
		return -2;
	return status_view(path, pid, flags & O_CLOEXEC);
}

/* f, a stream on a new fd number: forget what the number was. */
static FILE *forget_file(FILE *f)
{
	if (f)
		fd_forget(fileno(f));
	return f;
}

static FILE *status_fopen(const char *path, const char *mode, const char *real_name)
{
	FILE *(*real)(const char *, const char *);
	int fd = -2;

	if (path && mode && mode[0] == 'r' && !strchr(mode, '+'))
		fd = status_open(path, strchr(mode, 'e') ? O_RDONLY | O_CLOEXEC : O_RDONLY);
	if (fd >= 0) {
		FILE *f;

		fd_forget(fd);
		f = fdopen(fd, mode);
		if (!f)
			syscall(SYS_close, fd);
		return f;
	}
	if (fd == -1)
		return NULL;
	real = (FILE * (*)(const char *, const char *)) dlsym(RTLD_NEXT, real_name);
	if (!real) {
		errno = ENOSYS;
		return NULL;
	}
	return forget_file(real(path, mode));
}

/* fopen() opens without the interposable open(): it is interposed for the status view. */
FILE *fopen(const char *path, const char *mode)
{
	return status_fopen(path, mode, "fopen");
}

FILE *fopen64(const char *path, const char *mode)
{
	return status_fopen(path, mode, "fopen64");
}

static int do_openat(int dirfd, const char *path, int flags, mode_t mode)
{
	char buf[4096];
	int fd = model_open(path, flags);

	if (fd == -2)
		fd = status_open(path, flags);
	if (fd == -2)
		fd = (int)syscall(SYS_openat, dirfd, redirect(path, buf, sizeof(buf)), flags, mode);
	fd_forget(fd); /* a new number: no model file until the kernel says so */
	return fd;
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
	fd_forget(fd);
	d = fdopendir(fd);
	if (!d)
		syscall(SYS_close, fd);
	return d;
}

/* -- fd numbers: the calls that close one, put another file at one, or make a new one -------
 *
 * Each keeps fd_table true (see model_id): a close or a dup2 onto a number is bracketed by
 * fd_busy()/fd_done(), a new number is forgotten. Cancellation points (close, fcntl, fclose,
 * recvmsg, recvmmsg) call libc's own definition, the rest make the system call. */

/* libc's definition of name (the next one after this library's), or NULL. */
static void *next_def(void **cache, const char *name)
{
	void *f = __atomic_load_n(cache, __ATOMIC_RELAXED);

	if (!f) {
		f = dlsym(RTLD_NEXT, name);
		__atomic_store_n(cache, f, __ATOMIC_RELAXED);
	}
	return f;
}

int close(int fd)
{
	static void *real;
	int (*f)(int) = (int (*)(int))next_def(&real, "close");
	int ret;

	fd_busy(fd);
	ret = f ? f(fd) : (int)syscall(SYS_close, fd);
	fd_done(fd);
	return ret;
}

int __close(int fd) __attribute__((alias("close")));

/* Every number of [first, last] of the table, busy (delta 1) or done (-1). */
static void fd_range(unsigned int first, unsigned int last, int delta)
{
	gen_change(delta); /* once for the range, numbers beyond the table too */
	for (unsigned int fd = first; fd <= last && fd < FD_TABLE; fd++)
		fd_entry_change((int)fd, delta);
}

int close_range(unsigned int first, unsigned int last, int flags)
{
	int ret;

	if (flags & CLOSE_RANGE_CLOEXEC) /* marks, closes nothing now (exec starts afresh) */
		return (int)syscall(SYS_close_range, first, last, flags);
	fd_range(first, last, 1);
	ret = (int)syscall(SYS_close_range, first, last, flags);
	fd_range(first, last, -1);
	return ret;
}

void closefrom(int lowfd)
{
	static void *real;
	void (*f)(int) = (void (*)(int))next_def(&real, "closefrom");

	if (lowfd < 0)
		lowfd = 0;
	fd_range((unsigned int)lowfd, ~0U, 1);
	if (f)
		f(lowfd);
	else
		syscall(SYS_close_range, lowfd, ~0U, 0);
	fd_range((unsigned int)lowfd, ~0U, -1);
}

int fclose(FILE *stream)
{
	static void *real;
	int (*f)(FILE *) = (int (*)(FILE *))next_def(&real, "fclose");
	int fd = stream ? fileno(stream) : -1, ret;

	if (!f) {
		errno = ENOSYS;
		return EOF;
	}
	fd_busy(fd);
	ret = f(stream);
	fd_done(fd);
	return ret;
}

int dup(int fd)
{
	int ret = (int)syscall(SYS_dup, fd);

	fd_forget(ret);
	return ret;
}

int dup3(int old, int new, int flags)
{
	int ret;

	fd_busy(new);
	ret = (int)syscall(SYS_dup3, old, new, flags);
	fd_done(new);
	return ret;
}

int dup2(int old, int new)
{
	int ret;

	fd_busy(new);
	ret = (int)syscall(SYS_dup2, old, new);
	fd_done(new);
	return ret;
}

int fcntl(int fd, int cmd, ...)
{
	static void *real;
	int (*f)(int, int, ...) = (int (*)(int, int, ...))next_def(&real, "fcntl");
	unsigned long arg;
	va_list ap;
	int ret;

	/* every command's argument is an int or a pointer, one register either way */
	va_start(ap, cmd);
	arg = va_arg(ap, unsigned long);
	va_end(ap);
	ret = f ? f(fd, cmd, arg) : (int)syscall(SYS_fcntl, fd, cmd, arg);
	if (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)
		fd_forget(ret);
	return ret;
}

int fcntl64(int fd, int cmd, ...) __attribute__((alias("fcntl")));

/* The fds a received message carried (SCM_RIGHTS) are new numbers. */
static void forget_passed(const struct msghdr *mh)
{
	struct cmsghdr *c;

	if (!mh->msg_control || mh->msg_controllen < sizeof(struct cmsghdr))
		return;
	for (c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR((struct msghdr *)mh, c)) {
		size_t n, i;

		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (i = 0; i < n; i++) {
			int fd;

			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(fd));
			fd_forget(fd);
		}
	}
}

ssize_t recvmsg(int fd, struct msghdr *mh, int flags)
{
	static void *real;
	ssize_t (*f)(int, struct msghdr *, int) =
		(ssize_t (*)(int, struct msghdr *, int))next_def(&real, "recvmsg");
	ssize_t ret = f ? f(fd, mh, flags) : syscall(SYS_recvmsg, fd, mh, flags);

	if (ret >= 0)
		forget_passed(mh);
	return ret;
}

static int changes_creds(long n, const long a[6]);
static void creds_changed(pid_t target);

/* libc's syscall(), for a program that closes or duplicates fds through it: the same as the
 * libc entry points above, so that the table stays true; every other call goes through. */
long preload_syscall(long n, ...) __asm__("syscall");
long preload_syscall(long n, ...)
{
	long a[6], ret;

	SIX_ARGS(n, a);
	switch (n) {
	case SYS_close:
		return close((int)a[0]);
	case SYS_close_range:
		return close_range((unsigned int)a[0], (unsigned int)a[1], (int)a[2]);
	case SYS_dup:
		return dup((int)a[0]);
	case SYS_dup2:
		return dup2((int)a[0], (int)a[1]);
	case SYS_dup3:
		return dup3((int)a[0], (int)a[1], (int)a[2]);
	case SYS_fcntl:
		return fcntl((int)a[0], (int)a[1], a[2]);
	}
	ret = syscall6(n, a);
	if (ret >= 0 && n == SYS_recvmsg)
		forget_passed((const struct msghdr *)a[1]);
	if (ret >= 0 && changes_creds(n, a))
		creds_changed(n == SYS_prlimit64 ? (pid_t)a[0] : 0);
	return ret;
}

int recvmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags, struct timespec *timeout)
{
	static void *real;
	int (*f)(int, struct mmsghdr *, unsigned int, int, struct timespec *) =
		(int (*)(int, struct mmsghdr *, unsigned int, int, struct timespec *))next_def(
			&real, "recvmmsg");
	int ret = f ? f(fd, v, n, flags, timeout)
		    : (int)syscall(SYS_recvmmsg, fd, v, n, flags, timeout);

	for (int i = 0; i < ret; i++)
		forget_passed(&v[i].msg_hdr);
	return ret;
}

/* -- lookups by path: the sysfs view (readlink, stat, access) ------------------------------ */

ssize_t readlinkat(int dirfd, const char *path, char *out, size_t size)
{
	char buf[4096];

	return syscall(SYS_readlinkat, dirfd, redirect(path, buf, sizeof(buf)), out, size);
}

ssize_t readlink(const char *path, char *out, size_t size)
{
	return readlinkat(AT_FDCWD, path, out, size);
}

int fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
	char buf[4096];

	return (int)syscall(SYS_newfstatat, dirfd, redirect(path, buf, sizeof(buf)), st, flags);
}

int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags)
{
	return fstatat(dirfd, path, (struct stat *)st, flags);
}

int stat(const char *path, struct stat *st)
{
	return fstatat(AT_FDCWD, path, st, 0);
}

int stat64(const char *path, struct stat64 *st)
{
	return fstatat(AT_FDCWD, path, (struct stat *)st, 0);
}

int lstat(const char *path, struct stat *st)
{
	return fstatat(AT_FDCWD, path, st, AT_SYMLINK_NOFOLLOW);
}

int lstat64(const char *path, struct stat64 *st)
{
	return fstatat(AT_FDCWD, path, (struct stat *)st, AT_SYMLINK_NOFOLLOW);
}

/* the stat entry points of programs built against glibc < 2.33 */
int __xstat(int ver, const char *path, struct stat *st)
{
	(void)ver;
	return fstatat(AT_FDCWD, path, st, 0);
}

int __lxstat(int ver, const char *path, struct stat *st)
{
	(void)ver;
	return fstatat(AT_FDCWD, path, st, AT_SYMLINK_NOFOLLOW);
}

int __fxstatat(int ver, int dirfd, const char *path, struct stat *st, int flags)
{
	(void)ver;
	return fstatat(dirfd, path, st, flags);
}

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *stx)
{
	char buf[4096];

	return (int)syscall(SYS_statx, dirfd, redirect(path, buf, sizeof(buf)), flags, mask, stx);
}

int faccessat(int dirfd, const char *path, int mode, int flags)
{
	char buf[4096];

	path = redirect(path, buf, sizeof(buf));
	if (flags)
		return (int)syscall(SYS_faccessat2, dirfd, path, mode, flags);
	return (int)syscall(SYS_faccessat, dirfd, path, mode);
}

int access(const char *path, int mode)
{
	return faccessat(AT_FDCWD, path, mode, 0);
}

/* -- ioctl, read, write ------------------------------------------------------------------ */

/* Write n bytes at va of this process as the kernel would (a bad pointer fails, no fault). */
static void self_write(uintptr_t va, const void *src, size_t n)
{
	struct iovec local = { (void *)src, n }, remote = { (void *)va, n };

	syscall(SYS_process_vm_writev, self_pid(), &local, 1UL, &remote, 1UL, 0UL);
}

int ioctl(int fd, unsigned long request, ...)
{
	va_list ap;
	unsigned long arg;
	long id, ret;
	struct req r = { .op = OP_IOCTL };
	struct reply out;
	size_t body = 0;
	int saved;

	va_start(ap, request);
	arg = va_arg(ap, unsigned long);
	va_end(ap);
	id = model_id(fd);
	if (id < 0)
		return (int)syscall(SYS_ioctl, fd, request, arg);
	r.a[0] = (uint64_t)id;
	r.a[1] = (uint32_t)request;
	r.a[2] = arg;
	r.a[3] = fd_generation(); /* read within the call: what fget() of a number in it sees */
	/* The server reads INLINE_MAX bytes of the struct, and no more when its leading size
	 * field says it fits: those bytes go with the request, straight from the struct, when
	 * they are all readable (the server uses them only when the size fits). Anything else
	 * (a short mapping, a bad pointer, an integer argument that points nowhere) is left to
	 * the server, which reads the program's memory itself. */
	ret = call_inline(&r, (const void *)arg, &out, &body);
	if (body && out.rep.arg < INLINE_MAX && body <= INLINE_MAX - out.rep.arg) {
		/* what the model wrote into the struct, even when the ioctl failed; a struct no
		 * longer writable keeps its bytes, as the server's own copy-back would */
		saved = errno;
		self_write(arg + out.rep.arg, out.body, body);
		errno = saved;
	}
	return (int)ret;
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

/* -- trapped MMIO --------------------------------------------------------------------------
 *
 * A mapping of device registers (a VFIO BAR) must reach the model on every access, in
 * program order: a register read returns the device's state at that moment, every write is
 * one access (two identical writes to a DSA portal are two submissions). The model's own
 * design: such a mapping is PROT_NONE memory here; the fault handler decodes the faulting
 * instruction, makes the access a request to the server (OP_MMIO), writes the destination
 * register of a load and resumes after the instruction. What it decodes: MOV loads and stores
 * of 1, 2, 4 or 8 bytes (88, 89, 8A, 8B, C6 /0, C7 /0 with 66/REX prefixes), MOVZX/MOVSX
 * (0F B6, B7, BE, BF), MOVSXD (63) and MOVDIR64B (66 0F 38 F8 /r, one 64-byte submission;
 * a CPU without it raises #UD, seen as SIGILL, which is emulated the same way). Anything else
 * touching a trapped page is reported on stderr and the program dies of SIGBUS.
 * The handler makes only raw system calls (async-signal-safe).
 */

/* The table of trapped ranges. Writers (mmap, munmap, MAP_FIXED over a trap: any thread)
 * take traps_lock; the fault handler must not (it may interrupt a writer), so it reads under
 * a sequence count instead: a writer makes traps_seq odd, changes the entries, makes it even
 * again; a reader copies the entry it finds and retries when the count was odd or moved, so
 * it never acts on a half-updated entry. Every field is accessed atomically (relaxed) and the
 * count orders them; all of it is async-signal-safe (no lock, no allocation). */
#define MAX_TRAPS 256
struct trap {
	uintptr_t start, end; /* end == 0: a free slot */
	int prot;
};
static struct trap traps[MAX_TRAPS];
static int nr_traps;
static char traps_lock;
static unsigned int traps_seq;
/* this thread is inside a table update (a fault handler on it must not wait for itself) */
static __thread int traps_writing __attribute__((tls_model("initial-exec")));
static char handlers_installed;
static struct sigaction old_segv, old_ill;

static void traps_take(void)
{
	while (__atomic_test_and_set(&traps_lock, __ATOMIC_ACQUIRE))
		;
}

static void traps_drop(void)
{
	__atomic_clear(&traps_lock, __ATOMIC_RELEASE);
}

/* Begin and end a change of the table (traps_lock held). */
static void traps_write_begin(void)
{
	traps_writing = 1;
	__atomic_store_n(&traps_seq, traps_seq + 1, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE); /* the odd count before any entry changes */
}

static void traps_write_end(void)
{
	__atomic_store_n(&traps_seq, traps_seq + 1, __ATOMIC_RELEASE);
	traps_writing = 0;
}

static void trap_set(struct trap *t, uintptr_t start, uintptr_t end, int prot)
{
	__atomic_store_n(&t->start, start, __ATOMIC_RELAXED);
	__atomic_store_n(&t->end, end, __ATOMIC_RELAXED);
	__atomic_store_n(&t->prot, prot, __ATOMIC_RELAXED);
}

/* A copy of the trapped range holding addr, as one consistent entry; 0 when there is none
 * (or when this thread is in the middle of changing the table: no trapped access happens
 * there, so the fault is not one). Async-signal-safe. */
static int trap_at(uintptr_t addr, struct trap *out)
{
	unsigned int seq;
	int i, found;

	if (traps_writing)
		return 0;
	for (;;) {
		seq = __atomic_load_n(&traps_seq, __ATOMIC_ACQUIRE);
		if (seq & 1) { /* another thread is changing it: let it finish */
			syscall(SYS_sched_yield);
			continue;
		}
		found = 0;
		for (i = 0; i < MAX_TRAPS; i++) {
			uintptr_t start = __atomic_load_n(&traps[i].start, __ATOMIC_RELAXED);
			uintptr_t end = __atomic_load_n(&traps[i].end, __ATOMIC_RELAXED);

			if (start <= addr && addr < end) {
				out->start = start;
				out->end = end;
				out->prot = __atomic_load_n(&traps[i].prot, __ATOMIC_RELAXED);
				found = 1;
				break;
			}
		}
		__atomic_thread_fence(__ATOMIC_ACQUIRE); /* the entry read before the recheck */
		if (__atomic_load_n(&traps_seq, __ATOMIC_RELAXED) == seq)
			return found;
	}
}

/* Forget the trapped pages of [addr, addr+len) (munmap, or MAP_FIXED over them). */
static void trap_remove(uintptr_t addr, size_t len)
{
	uintptr_t end = addr + len;
	int i, j;

	if (!__atomic_load_n(&nr_traps, __ATOMIC_RELAXED))
		return;
	traps_take();
	traps_write_begin();
	for (i = 0; i < MAX_TRAPS; i++) {
		struct trap *t = &traps[i];

		if (!t->end || t->end <= addr || end <= t->start)
			continue;
		if (addr <= t->start && t->end <= end) {
			trap_set(t, 0, 0, 0);
			__atomic_store_n(&nr_traps, nr_traps - 1, __ATOMIC_RELAXED);
		} else if (addr <= t->start) {
			trap_set(t, end, t->end, t->prot);
		} else if (t->end <= end) {
			trap_set(t, t->start, addr, t->prot);
		} else { /* a hole in the middle: the tail needs a slot of its own */
			for (j = 0; j < MAX_TRAPS && traps[j].end; j++)
				;
			if (j < MAX_TRAPS) {
				trap_set(&traps[j], end, t->end, t->prot);
				__atomic_store_n(&nr_traps, nr_traps + 1, __ATOMIC_RELAXED);
			}
			trap_set(t, t->start, addr, t->prot);
		}
	}
	traps_write_end();
	traps_drop();
}

static void mmio_fault(int sig, siginfo_t *si, void *ucv);

static int trap_add(uintptr_t start, size_t len, int prot)
{
	struct sigaction sa;
	int i;

	if (!__atomic_load_n(&handlers_installed, __ATOMIC_ACQUIRE)) {
		traps_take();
		if (!handlers_installed) {
			memset(&sa, 0, sizeof(sa));
			sa.sa_sigaction = mmio_fault;
			sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
			sigemptyset(&sa.sa_mask);
			sigaction(SIGSEGV, &sa, &old_segv);
			sigaction(SIGILL, &sa, &old_ill);
			__atomic_store_n(&handlers_installed, 1, __ATOMIC_RELEASE);
		}
		traps_drop();
	}
	traps_take();
	for (i = 0; i < MAX_TRAPS && traps[i].end; i++)
		;
	if (i < MAX_TRAPS) {
		traps_write_begin();
		trap_set(&traps[i], start, start + len, prot);
		__atomic_store_n(&nr_traps, nr_traps + 1, __ATOMIC_RELAXED);
		traps_write_end();
	}
	traps_drop();
	return i < MAX_TRAPS ? 0 : -1;
}

/* One decoded access to trapped memory. */
struct access {
	uintptr_t addr; /* the MMIO address */
	int size;       /* 1, 2, 4, 8, or 64 (MOVDIR64B) */
	int store;
	uint64_t value; /* a store's bytes (size <= 8) */
	uintptr_t src;  /* MOVDIR64B: the 64 source bytes */
	int reg;        /* a load's destination register (0-15) */
	int hi8;        /* ... is AH, CH, DH or BH */
	int dsize;      /* bytes of the destination register written (4: zero-extended to 8) */
	int sext;       /* the loaded value is sign-extended */
	int len;        /* the instruction's length */
};

/* ModRM/SIB register numbers (REX-extended) -> the saved registers of the ucontext */
static const int gregs_of[16] = {
	REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP, REG_RSI, REG_RDI,
	REG_R8,  REG_R9,  REG_R10, REG_R11, REG_R12, REG_R13, REG_R14, REG_R15,
};

static uint64_t reg_get(const greg_t *g, int r)
{
	return (uint64_t)g[gregs_of[r]];
}

static uint64_t mask_of(int size)
{
	return size >= 8 ? ~0ULL : (1ULL << (size * 8)) - 1;
}

static uint64_t seg_base(int seg)
{
	unsigned long base = 0;

	if (seg)
		syscall(SYS_arch_prctl, seg == 0x64 ? ARCH_GET_FS : ARCH_GET_GS, &base);
	return base;
}

static int64_t sdisp(const uint8_t *p, int n)
{
	if (n == 1)
		return (int8_t)p[0];
	return (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
			 (uint32_t)p[3] << 24);
}

/* Decode the instruction at ip; 0 on success, -1 when it is none of the forms above. */
static int decode(const uint8_t *ip, const greg_t *g, struct access *ac)
{
	const uint8_t *p = ip;
	int opsz16 = 0, addr32 = 0, seg = 0, rex = 0, movdir = 0;
	int op, modrm, mod, rm, reg, opsize, imm = 0, riprel = 0;
	uint64_t ea = 0;

	memset(ac, 0, sizeof(*ac));
	for (;; p++) {
		if (p - ip > 10)
			return -1;
		if (*p == 0x66)
			opsz16 = 1;
		else if (*p == 0x67)
			addr32 = 1;
		else if (*p == 0x64 || *p == 0x65)
			seg = *p;
		else if (*p != 0x2e && *p != 0x3e && *p != 0x26 && *p != 0x36)
			break;
	}
	if ((*p & 0xf0) == 0x40)
		rex = *p++;
	op = *p++;
	opsize = rex & 8 ? 8 : opsz16 ? 2 : 4;
	switch (op) {
	case 0x88: /* mov r/m8, r8 */
	case 0x8a: /* mov r8, r/m8 */
	case 0xc6: /* mov r/m8, imm8 */
		ac->size = 1;
		break;
	case 0x89: /* mov r/m, r */
	case 0x8b: /* mov r, r/m */
	case 0xc7: /* mov r/m, imm16/imm32 */
		ac->size = opsize;
		break;
	case 0x63: /* movsxd r64, r/m32 (a plain 32-bit load without REX.W) */
		ac->size = 4;
		ac->sext = !!(rex & 8);
		break;
	case 0x0f:
		op = 0x0f00 | *p++;
		if (op == 0x0f38) {
			op = 0x0f3800 | *p++;
			if (op != 0x0f38f8 || !opsz16 || (rex & 8))
				return -1;
			movdir = 1;
			ac->size = 64;
		} else if (op == 0x0fb6 || op == 0x0fbe) {
			ac->size = 1;
		} else if (op == 0x0fb7 || op == 0x0fbf) {
			ac->size = 2;
		} else {
			return -1;
		}
		ac->sext = op == 0x0fbe || op == 0x0fbf;
		break;
	default:
		return -1;
	}
	modrm = *p++;
	mod = modrm >> 6;
	reg = ((modrm >> 3) & 7) | (rex & 4 ? 8 : 0);
	rm = modrm & 7;
	if (mod == 3)
		return -1; /* a register operand: no memory access */
	if (rm == 4) {
		int sib = *p++;
		int index = ((sib >> 3) & 7) | (rex & 2 ? 8 : 0);
		int base = sib & 7;

		if (index != 4)
			ea += reg_get(g, index) << (sib >> 6);
		if (base == 5 && mod == 0) {
			ea += (uint64_t)sdisp(p, 4);
			p += 4;
		} else {
			ea += reg_get(g, base | (rex & 1 ? 8 : 0));
		}
	} else if (rm == 5 && mod == 0) {
		riprel = 1;
		ea += (uint64_t)sdisp(p, 4);
		p += 4;
	} else {
		ea += reg_get(g, rm | (rex & 1 ? 8 : 0));
	}
	if (mod == 1) {
		ea += (uint64_t)sdisp(p, 1);
		p += 1;
	} else if (mod == 2) {
		ea += (uint64_t)sdisp(p, 4);
		p += 4;
	}
	if (op == 0xc6 || op == 0xc7) {
		if (reg & 7)
			return -1; /* C6/C7 /1-/7 are other instructions */
		imm = op == 0xc6 ? 1 : opsz16 && !(rex & 8) ? 2 : 4;
		ac->value = imm == 1 ? p[0] : imm == 2 ? (uint64_t)(p[0] | p[1] << 8)
						       : (uint64_t)sdisp(p, 4);
		p += imm;
	}
	ac->len = (int)(p - ip);
	if (riprel)
		ea += (uintptr_t)ip + ac->len;
	if (addr32)
		ea &= 0xffffffffULL;
	ea += seg_base(seg);
	if (movdir) {
		/* the destination address is the register operand, the source the memory one */
		ac->store = 1;
		ac->src = ea;
		ac->addr = addr32 ? (uint32_t)reg_get(g, reg) : reg_get(g, reg);
		return 0;
	}
	ac->addr = ea;
	switch (op) {
	case 0x88:
		ac->store = 1;
		if (!rex && reg >= 4 && reg < 8)
			ac->value = reg_get(g, reg - 4) >> 8;
		else
			ac->value = reg_get(g, reg);
		break;
	case 0x89:
		ac->store = 1;
		ac->value = reg_get(g, reg);
		break;
	case 0xc6:
	case 0xc7:
		ac->store = 1;
		break;
	case 0x8a:
		ac->hi8 = !rex && reg >= 4 && reg < 8;
		ac->reg = ac->hi8 ? reg - 4 : reg;
		ac->dsize = 1;
		break;
	case 0x63:
		ac->reg = reg;
		ac->dsize = rex & 8 ? 8 : 4;
		break;
	case 0x8b:
		ac->reg = reg;
		ac->dsize = ac->size;
		break;
	default: /* movzx, movsx */
		ac->reg = reg;
		ac->dsize = opsize;
	}
	ac->value &= mask_of(ac->size);
	return 0;
}

/* Write a load's result into its destination register as the CPU would. */
static void load_result(greg_t *g, const struct access *ac, uint64_t v)
{
	uint64_t *r = (uint64_t *)&g[gregs_of[ac->reg]];
	int bits = ac->size * 8;

	v &= mask_of(ac->size);
	if (ac->sext && bits < 64 && (v >> (bits - 1)) & 1)
		v |= ~mask_of(ac->size);
	if (ac->hi8)
		*r = (*r & ~0xff00ULL) | (v & 0xff) << 8;
	else if (ac->dsize == 4)
		*r = (uint32_t)v; /* a 32-bit destination zero-extends */
	else if (ac->dsize == 8)
		*r = v;
	else
		*r = (*r & ~mask_of(ac->dsize)) | (v & mask_of(ac->dsize));
}

static void say(const char *s)
{
	syscall(SYS_write, 2, s, strlen(s));
}

static void say_hex(uint64_t v)
{
	char buf[19];
	int i = 18;

	buf[i] = 0;
	do {
		buf[--i] = "0123456789abcdef"[v & 15];
		v >>= 4;
	} while (v && i > 2);
	buf[--i] = 'x';
	buf[--i] = '0';
	say(buf + i);
}

/* Report an MMIO access the model cannot make and end the program with SIGBUS. */
static void mmio_fatal(const char *why, uintptr_t rip, uintptr_t addr, int show_bytes)
{
	struct sigaction dfl;
	sigset_t set;
	int i;

	say("iommufd-model preload: ");
	say(why);
	say(" (instruction at ");
	say_hex(rip);
	if (show_bytes) {
		say(":");
		for (i = 0; i < 15; i++) {
			char b[4] = { ' ', "0123456789abcdef"[((const uint8_t *)rip)[i] >> 4],
				      "0123456789abcdef"[((const uint8_t *)rip)[i] & 15], 0 };
			say(b);
		}
	}
	say(", address ");
	say_hex(addr);
	say("); killing the program with SIGBUS\n");
	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	sigaction(SIGBUS, &dfl, NULL);
	sigemptyset(&set);
	sigaddset(&set, SIGBUS);
	sigprocmask(SIG_UNBLOCK, &set, NULL);
	syscall(SYS_tgkill, syscall(SYS_getpid), syscall(SYS_gettid), SIGBUS);
	syscall(SYS_exit_group, 128 + SIGBUS);
}

/* A fault that is not a trapped access: what the program's own disposition does. */
static void chain(int sig, siginfo_t *si, void *uc)
{
	const struct sigaction *old = sig == SIGSEGV ? &old_segv : &old_ill;
	struct sigaction dfl;

	if (old->sa_flags & SA_SIGINFO) {
		old->sa_sigaction(sig, si, uc);
		return;
	}
	if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN) {
		old->sa_handler(sig);
		return;
	}
	/* the default action: the instruction faults again and the program dies of it */
	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	sigaction(sig, &dfl, NULL);
	if (si->si_code <= 0) /* sent by kill(), not a fault: deliver it again */
		syscall(SYS_tgkill, syscall(SYS_getpid), syscall(SYS_gettid), sig);
}

static int mmio_request(const struct access *ac, uint64_t *out)
{
	struct req r = { .op = OP_MMIO };
	struct reply rep;
	size_t body;
	int fd = ctl();

	r.a[0] = ac->addr;
	r.a[1] = (uint64_t)ac->size;
	r.a[2] = (uint64_t)ac->store;
	r.a[3] = ac->value;
	r.a[4] = ac->src;
	if (fd < 0 || exchange(fd, &r, NULL, &rep, &body))
		return EIO;
	*out = (uint64_t)rep.rep.ret;
	return rep.rep.err;
}

static void mmio_fault(int sig, siginfo_t *si, void *ucv)
{
	ucontext_t *uc = ucv;
	greg_t *g = uc->uc_mcontext.gregs;
	uintptr_t rip = (uintptr_t)g[REG_RIP];
	struct trap t;
	struct access ac;
	uint64_t got = 0;
	int saved = errno, e, found;

	if (si->si_code <= 0 || (sig == SIGSEGV && !trap_at((uintptr_t)si->si_addr, &t)))
		goto not_ours;
	if (trap_at(rip, &t))
		mmio_fatal("executing trapped MMIO", rip, rip, 0);
	if (decode((const uint8_t *)rip, g, &ac)) {
		if (sig == SIGILL)
			goto not_ours;
		mmio_fatal("cannot emulate this MMIO access", rip, (uintptr_t)si->si_addr, 1);
	}
	found = trap_at(ac.addr, &t);
	if (sig == SIGILL && (ac.size != 64 || !found))
		goto not_ours; /* #UD of a MOVDIR64B to ordinary memory: the CPU's verdict */
	if (!found)
		mmio_fatal("decoded an access outside the trapped range", rip, ac.addr, 1);
	if (!(t.prot & (ac.store ? PROT_WRITE : PROT_READ)))
		goto not_ours; /* the mapping does not allow it: SIGSEGV as for any page */
	if (ac.addr + ac.size > t.end || (ac.size == 64 && ac.addr & 63))
		mmio_fatal("MMIO access crosses the mapping or is misaligned", rip, ac.addr, 1);
	e = mmio_request(&ac, &got);
	if (e)
		mmio_fatal(e == EIO ? "lost the model server during an MMIO access"
				    : "the model refused an MMIO access",
			   rip, ac.addr, 1);
	if (!ac.store)
		load_result(g, &ac, got);
	g[REG_RIP] = (greg_t)(rip + (uintptr_t)ac.len);
	errno = saved;
	return;
not_ours:
	errno = saved;
	chain(sig, si, ucv);
}

/* -- memory ------------------------------------------------------------------------------ */

#define HUGE_2M (2UL << 20)

static void *raw_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
}

static void report_unmap(void *addr, size_t len)
{
	struct req r = { .op = OP_MUNMAP };

	trap_remove((uintptr_t)addr, len);
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
	uint32_t rflags = 0;
	void *p;
	int saved;

	if (flags & MAP_FIXED)
		report_unmap(addr, len);

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
	if (call(&r, &rflags) < 0) {
		saved = errno;
		syscall(SYS_munmap, p, len);
		errno = saved;
		return MAP_FAILED;
	}
	if (rflags & REP_MMIO) {
		/* device registers: no access rights, every access faults into mmio_fault() */
		if (raw_mmap(p, len, PROT_NONE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
			     -1, 0) == MAP_FAILED ||
		    trap_add((uintptr_t)p, (len + 4095) & ~(size_t)4095, prot)) {
			report_unmap(p, len);
			syscall(SYS_munmap, p, len);
			errno = ENOMEM;
			return MAP_FAILED;
		}
		return p;
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
	/* MAP_PRIVATE (0x02) shares a bit with MAP_SHARED_VALIDATE (0x03): compare the type */
	if ((flags & MAP_TYPE) != MAP_SHARED && (flags & MAP_TYPE) != MAP_SHARED_VALIDATE) {
		if (!huge || !(flags & MAP_ANONYMOUS))
			return raw_mmap(addr, len, prot, flags, fd, off);
		/* Private huge memory becomes a shared memfd too, so that the model backs it
		 * with 2 MiB frame runs as huge pages are (docs: a fork child shares it). */
		flags = (flags & ~MAP_TYPE) | MAP_SHARED;
	}
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

/* -- credentials ------------------------------------------------------------------------
 *
 * The server keeps what it read of a process's credentials (its capabilities and user
 * namespace, RLIMIT_MEMLOCK, real uid: creds.py) until it is told they may have changed.
 * Each call that can change them reports itself once it succeeded, before it returns to
 * the program (OP_CREDS), so the server's next read of any process is fresh. A process that
 * never touched the model has nothing kept (it said no hello), so only its changes to
 * another process (prlimit with a pid) are reported. */

/* System call n with arguments a changes what the server reads of a process (prlimit64
 * only when it sets a limit). */
static int changes_creds(long n, const long a[6])
{
	switch (n) {
	case SYS_prlimit64:
		return a[2] != 0;
	case SYS_setrlimit:
	case SYS_capset:
	case SYS_setuid:
	case SYS_setreuid:
	case SYS_setresuid:
	case SYS_unshare:
	case SYS_setns:
		return 1;
	}
	return 0;
}

/* A call changing the credentials of target (0: this process) succeeded. */
static void creds_changed(pid_t target)
{
	struct req r = { .op = OP_CREDS };
	int saved = errno;

	setup();
	if (enabled != 1 || (!model_active && (target == 0 || target == self_pid())))
		return;
	call(&r, NULL);
	errno = saved;
}

/* libc's name(args), then creds_changed(target) when it succeeded and changed. */
#define CREDS_CALL(name, target, changes, params, args)                         \
	int name params                                                          \
	{                                                                        \
		static void *real;                                               \
		int (*f) params = (int (*) params)next_def(&real, #name);       \
		int ret = f ? f args : (errno = ENOSYS, -1);                     \
                                                                                 \
		if (ret == 0 && (changes))                                       \
			creds_changed(target);                                   \
		return ret;                                                      \
	}

CREDS_CALL(setrlimit, 0, 1, (__rlimit_resource_t res, const struct rlimit *rl), (res, rl))
CREDS_CALL(setrlimit64, 0, 1, (__rlimit_resource_t res, const struct rlimit64 *rl), (res, rl))
CREDS_CALL(prlimit, pid, n != NULL,
	   (pid_t pid, __rlimit_resource_t res, const struct rlimit *n, struct rlimit *o),
	   (pid, res, n, o))
CREDS_CALL(prlimit64, pid, n != NULL,
	   (pid_t pid, __rlimit_resource_t res, const struct rlimit64 *n, struct rlimit64 *o),
	   (pid, res, n, o))
CREDS_CALL(capset, 0, 1, (void *hdr, const void *data), (hdr, data))
CREDS_CALL(setuid, 0, 1, (uid_t uid), (uid))
CREDS_CALL(seteuid, 0, 1, (uid_t uid), (uid))
CREDS_CALL(setreuid, 0, 1, (uid_t r, uid_t e), (r, e))
CREDS_CALL(setresuid, 0, 1, (uid_t r, uid_t e, uid_t s), (r, e, s))
CREDS_CALL(unshare, 0, 1, (int flags), (flags))
CREDS_CALL(setns, 0, 1, (int fd, int type), (fd, type))
