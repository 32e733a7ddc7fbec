/* Pinned-page accounting as Linux 7.2 charges it (drivers/iommu/iommufd/pages.c): run with a
 * small RLIMIT_MEMLOCK (`ulimit -l 64`: 16 pages). Unless given "keep", the program first
 * drops CAP_IPC_LOCK from its effective set, as the kernel selftest's drop_cap_ipc_lock()
 * does, so its pages are charged to its user (IOPT_PAGES_ACCOUNT_USER): a map that pins past
 * the limit is ENOMEM and leaves the IOAS, the pins and VmPin/VmLck as they were; a forked
 * child (same user) finds the user's room taken. With RLIMIT_MODE per process (when the
 * program may set it: CAP_SYS_RESOURCE) the mm's locked_vm (VmLck) is charged instead.
 * With "keep" (CAP_IPC_LOCK kept) nothing is charged: 20 pages map. With "granted" (the run
 * grants CAP_IPC_LOCK: `run --cap CAP_IPC_LOCK`) dropping it changes nothing: 20 pages map.
 * Prints what it did. */
#include "prelude.h"

#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>

#define T_IOAS_UNMAP T_IO(0x86)
#define T_OPTION T_IO(0x87)
#define LIMIT 16 /* pages of RLIMIT_MEMLOCK */
#define PG 4096

struct t_ioas_unmap { uint32_t size, ioas_id; uint64_t iova, length; };
struct t_option { uint32_t size, option_id; uint16_t op, reserved; uint32_t object_id; uint64_t val64; };

static long vm_pin(void)
{
	return stdio_kb("/proc/self/status", "VmPin:");
}

static long vm_lck(void)
{
	return stdio_kb("/proc/self/status", "VmLck:");
}

static void drop_cap_ipc_lock(void)
{
	struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3 };
	struct __user_cap_data_struct data[2];

	CHECK(syscall(SYS_capget, &hdr, data) == 0);
	data[CAP_IPC_LOCK / 32].effective &= ~(1u << (CAP_IPC_LOCK % 32));
	CHECK(syscall(SYS_capset, &hdr, data) == 0);
}

static int map_at(int fd, uint32_t ioas, char *buf, int first, int n)
{
	return map_fixed(fd, ioas, buf + first * PG, (uint64_t)n * PG,
			 T_MOCK_APERTURE + (uint64_t)first * PG);
}

static int unmap_at(int fd, uint32_t ioas, int first, int n)
{
	struct t_ioas_unmap u = { .size = sizeof(u), .ioas_id = ioas,
				  .iova = T_MOCK_APERTURE + (uint64_t)first * PG,
				  .length = (uint64_t)n * PG };

	return ioctl(fd, T_IOAS_UNMAP, &u);
}

/* an iommufd with an IOAS that a mock domain fills (every mapped page is pinned) */
static int open_pinning(uint32_t *ioas, int per_mm)
{
	struct t_option o = { .size = sizeof(o), .option_id = 0 /* RLIMIT_MODE */, .op = 0,
			      .val64 = 1 };
	int fd = open("/dev/iommu", O_RDWR);

	CHECK(fd >= 0);
	if (per_mm && ioctl(fd, T_OPTION, &o)) {
		CHECK(errno == EPERM); /* no CAP_SYS_RESOURCE, as on a kernel */
		close(fd);
		return -1;
	}
	*ioas = ioas_alloc(fd);
	mock_domain(fd, *ioas);
	return fd;
}

int main(int argc, char **argv)
{
	int keep = argc > 1 && !strcmp(argv[1], "keep");
	struct rlimit rl;
	char *buf = mmap(NULL, 32 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	long pin0, lck0;
	uint32_t ioas;
	pid_t child;
	int fd, status;

	CHECK(getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur == LIMIT * PG);
	memset(buf, 1, 32 * PG);
	if (keep) {
		fd = open_pinning(&ioas, 0);
		CHECK(map_at(fd, ioas, buf, 0, 20) == 0); /* ACCOUNT_NONE: no limit */
		puts("keep: 20 pages mapped");
		close(fd);
		return 0;
	}
	drop_cap_ipc_lock();
	if (argc > 1 && !strcmp(argv[1], "granted")) {
		fd = open_pinning(&ioas, 0);
		CHECK(map_at(fd, ioas, buf, 0, 20) == 0); /* ACCOUNT_NONE: no limit */
		puts("granted: 20 pages mapped without CAP_IPC_LOCK of its own");
		close(fd);
		return 0;
	}
	pin0 = vm_pin();
	lck0 = vm_lck();

	fd = open_pinning(&ioas, 0);
	CHECK(map_at(fd, ioas, buf, 0, 12) == 0);
	CHECK(vm_pin() == pin0 + 12 * 4 && vm_lck() == lck0);
	/* 12 + 5 > 16: refused after pinning, every pin and IOPTE undone */
	CHECK(map_at(fd, ioas, buf, 12, 5) == -1 && errno == ENOMEM);
	CHECK(vm_pin() == pin0 + 12 * 4 && vm_lck() == lck0);
	CHECK(check_refs(fd, buf + 12 * PG, 5 * PG, 0) == 0);
	CHECK(unmap_at(fd, ioas, 12, 5) == -1 && errno == ENOENT);
	CHECK(map_at(fd, ioas, buf, 12, 4) == 0); /* exactly the limit */
	CHECK(vm_pin() == pin0 + 16 * 4);
	puts("user: ENOMEM past 16 pages");

	child = fork();
	CHECK(child >= 0);
	if (!child) { /* another mm of the same user: the user's room is taken */
		CHECK(map_at(fd, ioas, buf, 20, 1) == -1 && errno == ENOMEM);
		CHECK(vm_pin() == pin0); /* its own mm: nothing of the parent's */
		_exit(0);
	}
	CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && !WEXITSTATUS(status));
	puts("user: a child of the same user gets ENOMEM");
	CHECK(unmap_at(fd, ioas, 0, 12) == 0 && unmap_at(fd, ioas, 12, 4) == 0);
	CHECK(vm_pin() == pin0);
	close(fd);

	fd = open_pinning(&ioas, 1);
	if (fd < 0) {
		puts("mm: RLIMIT_MODE needs CAP_SYS_RESOURCE");
		return 0;
	}
	CHECK(map_at(fd, ioas, buf, 0, 16) == 0);
	CHECK(vm_pin() == pin0 + 16 * 4 && vm_lck() == lck0 + 16 * 4);
	CHECK(map_at(fd, ioas, buf, 16, 1) == -1 && errno == ENOMEM);
	CHECK(vm_lck() == lck0 + 16 * 4);
	close(fd);
	CHECK(vm_pin() == pin0 && vm_lck() == lck0);
	puts("mm: ENOMEM past 16 pages of VmLck");
	return 0;
}
