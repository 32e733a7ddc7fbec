/* The credentials pinned-page accounting reads (Linux 7.2 pages.c: capable(CAP_IPC_LOCK) when
 * the pages are made, RLIMIT_MEMLOCK and the real uid's user when they are charged) are read
 * afresh after each call that changes them, although the server keeps what it read between
 * calls (docs/running-programs.md): every map below follows a change that flips its result.
 * Needs CAP_IPC_LOCK and CAP_SETUID at the start (root). Prints what it checked. */
#include "prelude.h"

#include <linux/capability.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>

#define T_IOAS_UNMAP T_IO(0x86)
#define PG 4096
#define NOBODY 65534

struct t_ioas_unmap { uint32_t size, ioas_id; uint64_t iova, length; };

int capset(cap_user_header_t hdr, const cap_user_data_t data);

static int fd;
static uint32_t ioas;
static char *buf;

/* pages [first, first+n) of buf at the same pages of the aperture (pinned: a mock domain) */
static int map(int first, int n)
{
	return map_fixed(fd, ioas, buf + first * PG, (uint64_t)n * PG,
			 T_MOCK_APERTURE + (uint64_t)first * PG);
}

static void unmap_all(void)
{
	struct t_ioas_unmap u = { .size = sizeof(u), .ioas_id = ioas, .length = ~0ULL };

	CHECK(ioctl(fd, T_IOAS_UNMAP, &u) == 0);
}

/* CAP_IPC_LOCK in or out of the effective set, through libc's capset() */
static void ipc_lock(int on)
{
	struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3 };
	struct __user_cap_data_struct data[2];

	CHECK(syscall(SYS_capget, &hdr, data) == 0);
	if (on)
		data[0].effective |= 1u << CAP_IPC_LOCK;
	else
		data[0].effective &= ~(1u << CAP_IPC_LOCK);
	CHECK(capset(&hdr, data) == 0);
}

static rlim_t hard; /* the hard limit stays (raising it needs CAP_SYS_RESOURCE) */

static struct rlimit pages(int n)
{
	struct rlimit rl = { (rlim_t)n * PG, hard };

	return rl;
}

int main(void)
{
	struct rlimit rl;
	pid_t child;
	int status;

	CHECK(getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_max >= 16 * PG);
	hard = rl.rlim_max;
	rl = pages(16);

	buf = mmap(NULL, 64 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memset(buf, 1, 64 * PG);
	fd = open("/dev/iommu", O_RDWR);
	CHECK(fd >= 0);
	ioas = ioas_alloc(fd);
	mock_domain(fd, ioas);
	CHECK(setrlimit(RLIMIT_MEMLOCK, &rl) == 0);

	/* with CAP_IPC_LOCK nothing is charged; without, 20 pages are over 16 */
	CHECK(map(0, 20) == 0);
	unmap_all();
	ipc_lock(0);
	CHECK(map(0, 20) == -1 && errno == ENOMEM);
	ipc_lock(1);
	CHECK(map(0, 20) == 0);
	unmap_all();
	ipc_lock(0);
	puts("capset: CAP_IPC_LOCK seen at each map");

	/* the limit, each way a program sets its own */
	CHECK(map(0, 8) == 0);
	rl = pages(8);
	CHECK(setrlimit(RLIMIT_MEMLOCK, &rl) == 0);
	CHECK(map(8, 1) == -1 && errno == ENOMEM);
	rl = pages(12);
	CHECK(prlimit(0, RLIMIT_MEMLOCK, &rl, NULL) == 0);
	CHECK(map(8, 4) == 0);
	rl = pages(12);
	CHECK(syscall(SYS_prlimit64, 0, RLIMIT_MEMLOCK, NULL, &rl) == 0); /* a read changes nothing */
	rl = pages(8);
	CHECK(syscall(SYS_prlimit64, 0, RLIMIT_MEMLOCK, &rl, NULL) == 0);
	CHECK(map(12, 1) == -1 && errno == ENOMEM);
	puts("rlimit: setrlimit, prlimit and syscall(SYS_prlimit64) seen at each map");

	/* another process of the run raises this one's limit */
	child = fork();
	CHECK(child >= 0);
	if (!child) {
		rl = pages(16);
		_exit(prlimit(getppid(), RLIMIT_MEMLOCK, &rl, NULL) ? 1 : 0);
	}
	CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && !WEXITSTATUS(status));
	CHECK(map(12, 4) == 0);
	CHECK(map(16, 1) == -1 && errno == ENOMEM);
	puts("rlimit: a child's prlimit of its parent seen at the parent's map");

	/* another real uid is another user, with nothing charged yet (the effective uid stays 0,
	 * so the capabilities stay) */
	CHECK(setreuid(NOBODY, -1) == 0);
	CHECK(map(16, 4) == 0);
	CHECK(setreuid(0, -1) == 0);
	CHECK(map(20, 1) == -1 && errno == ENOMEM);
	puts("setreuid: the real uid's user seen at each map");
	unmap_all();

	/* a user namespace of its own: every capability there, none that capable() counts */
	ipc_lock(1);
	CHECK(map(0, 20) == 0);
	unmap_all();
	if (unshare(CLONE_NEWUSER) == 0) {
		CHECK(map(0, 20) == -1 && errno == ENOMEM);
		puts("unshare: a new user namespace seen at the next map");
	} else {
		puts("unshare: no user namespace here");
	}
	close(fd);
	return 0;
}
