/* The preload's table of model fds and its pid cache (preload.c: model_id, self_pid) at their
 * edges: a model call on a known fd makes no getsockname(), so the table must never route a
 * real fd to the model nor a model fd to the kernel. Each check asks the fd for IOAS_ALLOC:
 * the model answers it, the kernel's files say ENOTTY. Covers close then reuse of the number
 * (by an interposed open and by eventfd, which the preload does not see), dup2/dup3 over a
 * model fd and of one onto a real fd, F_DUPFD, a close through libc's syscall() (seen) and
 * one the preload cannot see (the syscall instruction itself) followed by an open, an
 * F_DUPFD or a received fd at that number, fds passed with SCM_RIGHTS,
 * exec (inherited fds, a CLOEXEC number reused), fork, _Fork and a raw clone whose children
 * make their own calls (their pins are their own: VmPin), vfork children that dup2 and close
 * before exec, and threads opening and closing model and real fds at once. Prints "done". */
#include "prelude.h"

#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>

#define NPAGES 4
#define THREADS 4
#define ROUNDS 150

pid_t _Fork(void);

static int is_model(int fd)
{
	struct t_ioas_alloc a = { .size = sizeof(a) };

	return ioctl(fd, T_IOAS_ALLOC, &a) == 0 && a.out_ioas_id != 0;
}

static int is_kernel(int fd)
{
	struct t_ioas_alloc a = { .size = sizeof(a) };

	return ioctl(fd, T_IOAS_ALLOC, &a) == -1 && errno == ENOTTY;
}

/* close(2) by the syscall instruction: no libc entry point the preload could interpose */
static long asm_close(int fd)
{
	long ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"((long)SYS_close), "D"((long)fd)
			 : "rcx", "r11", "memory");
	return ret;
}

static int iommu(void)
{
	int fd = open("/dev/iommu", O_RDWR);

	CHECK(fd >= 0);
	return fd;
}

static void send_fd(int sock, int fd)
{
	char cbuf[CMSG_SPACE(sizeof(int))] = { 0 }, byte = 'f';
	struct iovec iov = { &byte, 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);

	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof(int));
	CHECK(sendmsg(sock, &mh, 0) == 1);
}

static int recv_fd(int sock)
{
	char cbuf[CMSG_SPACE(sizeof(int))], byte;
	struct iovec iov = { &byte, 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *c;
	int fd = -1;

	CHECK(recvmsg(sock, &mh, 0) == 1);
	c = CMSG_FIRSTHDR(&mh);
	CHECK(c && c->cmsg_type == SCM_RIGHTS);
	memcpy(&fd, CMSG_DATA(c), sizeof(int));
	return fd;
}

/* In a child: its calls are its own (its own connection, its own pid): pages it maps are
 * pinned from its mm and show in its own VmPin. */
static void child_calls(int fd)
{
	char *buf = mmap(NULL, NPAGES * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			 -1, 0);
	long pin0 = stdio_kb("/proc/self/status", "VmPin:");
	uint32_t ioas;

	CHECK(is_model(fd));
	ioas = ioas_alloc(fd);
	mock_domain(fd, ioas);
	memset(buf, 2, NPAGES * 4096);
	CHECK(map_fixed(fd, ioas, buf, NPAGES * 4096, T_MOCK_APERTURE) == 0);
	CHECK(stdio_kb("/proc/self/status", "VmPin:") == pin0 + NPAGES * 4);
	_exit(0);
}

static void reap(pid_t child)
{
	int status;

	CHECK(child > 0 && waitpid(child, &status, 0) == child);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* Threads open and close model and real fds at once: numbers pass between them all the time,
 * and every ioctl must reach the file its thread holds. */
static void *churn(void *arg)
{
	int p[2];

	for (int i = 0; i < ROUNDS; i++) {
		if ((i + (int)(intptr_t)arg) & 1) {
			int fd = iommu();

			CHECK(is_model(fd));
			CHECK(close(fd) == 0);
		} else {
			CHECK(pipe(p) == 0);
			CHECK(is_kernel(p[0]) && is_kernel(p[1]));
			CHECK(close(p[0]) == 0 && close(p[1]) == 0);
		}
	}
	return NULL;
}

/* The image exec'd by main: fd `model` is an inherited model fd, `gone` a CLOEXEC one. */
static int after_exec(int model, int gone)
{
	int e;

	CHECK(is_model(model));
	e = eventfd(0, 0); /* the lowest free number: the one exec closed */
	CHECK(e == gone && is_kernel(e));
	puts("exec done");
	return 0;
}

int main(int argc, char **argv)
{
	int fd, n, p[2], sv[2], m, k;
	pthread_t th[THREADS];
	char a1[16], a2[16];
	pid_t child;

	if (argc == 4 && !strcmp(argv[1], "exec"))
		return after_exec(atoi(argv[2]), atoi(argv[3]));

	/* exec: an inherited model fd is found again; a CLOEXEC one's number is free */
	k = open("/dev/iommu", O_RDWR | O_CLOEXEC);
	m = iommu();
	CHECK(is_model(k) && is_model(m));
	snprintf(a1, sizeof(a1), "%d", m);
	snprintf(a2, sizeof(a2), "%d", k);
	child = fork();
	if (!child) {
		execl("/proc/self/exe", argv[0], "exec", a1, a2, (char *)NULL);
		_exit(127);
	}
	reap(child);
	/* vfork: a child that replaces and closes model fds of its own fd table before exec
	 * leaves the parent's model fds as they are */
	child = vfork();
	if (!child) {
		dup2(open("/dev/null", O_RDONLY), m);
		close(k);
		execl("/bin/true", "true", (char *)NULL);
		_exit(127);
	}
	reap(child);
	CHECK(is_model(m) && is_model(k));
	close(k);
	close(m);

	/* close, then the number reused by a real file: open() (interposed), eventfd() (not) */
	fd = iommu();
	CHECK(is_model(fd));
	CHECK(close(fd) == 0);
	n = open("/dev/null", O_RDONLY);
	CHECK(n == fd && is_kernel(n));
	CHECK(close(n) == 0);
	fd = iommu();
	CHECK(is_model(fd));
	CHECK(close(fd) == 0);
	n = eventfd(0, 0);
	CHECK(n == fd && is_kernel(n));
	CHECK(close(n) == 0);

	/* dup2 and dup3 over a model fd; a model fd dup2'd onto a real one; F_DUPFD */
	CHECK(pipe(p) == 0);
	fd = iommu();
	CHECK(is_model(fd));
	CHECK(dup2(p[0], fd) == fd && is_kernel(fd));
	m = iommu();
	CHECK(is_model(m));
	CHECK(dup3(p[1], m, O_CLOEXEC) == m && is_kernel(m));
	CHECK(dup2(iommu(), p[1]) == p[1] && is_model(p[1]));
	n = fcntl(p[1], F_DUPFD_CLOEXEC, 100);
	CHECK(n >= 100 && is_model(n));
	CHECK(is_kernel(p[0]));

	/* libc's syscall() closing and duplicating: seen, even when the number is then given
	 * out by a call the preload does not interpose (eventfd) */
	fd = iommu();
	CHECK(is_model(fd));
	CHECK(syscall(SYS_close, fd) == 0);
	n = eventfd(0, 0);
	CHECK(n == fd && is_kernel(n));
	m = iommu();
	CHECK(is_model(m));
	CHECK(syscall(SYS_dup2, n, m) == m && is_kernel(m));
	close(n);
	close(m);

	/* a close the preload cannot see (the syscall instruction), then the number given again
	 * by an interposed call: the table forgets it */
	fd = iommu();
	CHECK(is_model(fd));
	CHECK(asm_close(fd) == 0);
	n = open("/dev/null", O_RDONLY);
	CHECK(n == fd && is_kernel(n));
	close(n);
	fd = fcntl(iommu(), F_DUPFD, 200);
	CHECK(fd >= 200 && is_model(fd));
	CHECK(asm_close(fd) == 0);
	n = fcntl(p[0], F_DUPFD, 200);
	CHECK(n == fd && is_kernel(n));

	/* SCM_RIGHTS: a model fd received is a model fd; a real fd received at the number of a
	 * model fd closed unseen is real */
	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
	fd = iommu();
	send_fd(sv[0], fd);
	n = recv_fd(sv[1]);
	CHECK(n != fd && is_model(n) && is_model(fd));
	CHECK(asm_close(n) == 0);
	send_fd(sv[0], p[0]);
	CHECK(recv_fd(sv[1]) == n && is_kernel(n));

	/* fork, _Fork (no atfork handlers) and a raw clone: each child's calls are its own */
	CHECK(is_model(fd));
	child = fork();
	if (!child)
		child_calls(fd);
	reap(child);
	child = _Fork();
	if (!child)
		child_calls(fd);
	reap(child);
	child = (pid_t)syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
	if (!child)
		child_calls(fd);
	reap(child);
	CHECK(is_model(fd));

	for (long i = 0; i < THREADS; i++)
		CHECK(pthread_create(&th[i], NULL, churn, (void *)i) == 0);
	for (int i = 0; i < THREADS; i++)
		CHECK(pthread_join(th[i], NULL) == 0);
	puts("done");
	return 0;
}
