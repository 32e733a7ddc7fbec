"""The runner itself: small C programs under ``run_program`` (bad pointers, fd semantics,
poll on a vEVENTQ fd, a client killed mid-ioctl, leaks), and the server's state after them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from iommufd_model.machine import Machine
from iommufd_model.run.launch import build_machine, preload_path, run_program
from iommufd_model.run.server import Server

Build = Callable[[str, str], Path]

PRELUDE = r"""
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
"""


def run(binary: Path, *args: str, machine: Machine | None = None) -> tuple[int, Server]:
    return run_program([str(binary), *args], machine=machine)


def assert_clean(server: Server, machine: Machine, frames_before: int) -> None:
    """Nothing of the run is left: no file, no internal error, every frame returned."""
    assert server.internal_errors == []
    assert server.files == {}
    assert machine.memory.frames_in_use == frames_before


def test_preload_is_built() -> None:
    lib = preload_path()
    assert lib.exists()
    syms = subprocess.run(
        ["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    for name in ("open", "openat", "ioctl", "read", "pwrite", "mmap", "munmap", "opendir"):
        assert f" T {name}\n" in syms, name


def test_bad_pointers_are_efault(cc: Build) -> None:
    prog = cc(
        "efault",
        PRELUDE
        + r"""
int main(void)
{
	int fd = open("/dev/iommu", O_RDWR);
	char *p = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct t_ioas_alloc *edge = (void *)(p + 4096 - 8);
	uint32_t ioas;

	CHECK(fd >= 0);
	CHECK(ioctl(fd, T_IOAS_ALLOC, (void *)16) == -1 && errno == EFAULT);
	CHECK(ioctl(fd, T_IOAS_ALLOC, (void *)-1L) == -1 && errno == EFAULT);
	/* the size field is readable, the rest of the struct is not */
	CHECK(munmap(p + 4096, 4096) == 0);
	edge->size = sizeof(*edge);
	edge->flags = 0;
	CHECK(ioctl(fd, T_IOAS_ALLOC, edge) == -1 && errno == EFAULT);
	CHECK(ioctl(fd, _IO(';', 0x7f), 0) == -1 && errno == ENOTTY);
	CHECK(write(fd, "x", 1) == -1 && errno == EINVAL);
	ioas = ioas_alloc(fd);
	mock_domain(fd, ioas);
	/* pinning a garbage user range fails as pin_user_pages does */
	CHECK(map_fixed(fd, ioas, (void *)0x1000, 4096, T_MOCK_APERTURE) == -1 && errno == EFAULT);
	CHECK(map_fixed(fd, ioas, p, 8192, T_MOCK_APERTURE) == -1 && errno == EFAULT);
	CHECK(map_fixed(fd, ioas, p, 4096, T_MOCK_APERTURE) == 0);
	puts("done");
	return 0;
}
""",
    )
    machine = build_machine(["mock"], 0)
    before = machine.memory.frames_in_use
    rc, server = run(prog, machine=machine)
    assert rc == 0
    assert_clean(server, machine, before)


def test_dup_fork_close_follow_the_kernel(cc: Build) -> None:
    prog = cc(
        "fdsem",
        PRELUDE
        + r"""
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
""",
    )
    machine = build_machine(["mock"], 0)
    before = machine.memory.frames_in_use
    rc, server = run(prog, machine=machine)
    assert rc == 0
    assert_clean(server, machine, before)


POLL = (
    PRELUDE
    + r"""
static int qfd, fd;
static uint32_t idev;

static void trigger(void)
{
	struct t_test_cmd c = { .size = sizeof(c), .op = T_OP_TRIGGER_VEVENT,
				.trigger_vevent = { .dev_id = idev } };

	CHECK(ioctl(fd, T_TEST_CMD, &c) == 0);
}

static void *later(void *arg)
{
	struct timespec ts = { 0, 200 * 1000 * 1000 };

	(void)arg;
	nanosleep(&ts, NULL);
	trigger();
	return NULL;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(void)
{
	struct t_hwpt_alloc parent = { .size = sizeof(parent), .flags = T_HWPT_NEST_PARENT };
	struct t_viommu_alloc viommu = { .size = sizeof(viommu), .type = T_VIOMMU_TYPE_SELFTEST };
	struct t_vdevice_alloc vdev = { .size = sizeof(vdev), .virt_id = 0x99 };
	struct t_veventq_alloc q = { .size = sizeof(q), .type = T_VEVENTQ_TYPE_SELFTEST, .depth = 4 };
	struct pollfd pfd;
	struct { struct t_vevent_header h; uint32_t virt_id; } ev;
	struct t_hwpt_alloc nested = { .size = sizeof(nested) };
	struct t_test_cmd md, replace = { .size = sizeof(replace), .op = T_OP_MOCK_DOMAIN_REPLACE };
	uint32_t iotlb = 0;
	pthread_t th;
	uint32_t ioas;
	double t0;

	fd = open("/dev/iommu", O_RDWR);
	CHECK(fd >= 0);
	ioas = ioas_alloc(fd);
	md = mock_domain(fd, ioas);
	idev = md.mock_domain.out_idev_id;
	replace.id = md.mock_domain.out_stdev_id;
	parent.dev_id = idev;
	parent.pt_id = ioas;
	CHECK(ioctl(fd, T_HWPT_ALLOC, &parent) == 0);
	viommu.dev_id = idev;
	viommu.hwpt_id = parent.out_hwpt_id;
	CHECK(ioctl(fd, T_VIOMMU_ALLOC, &viommu) == 0);
	vdev.viommu_id = viommu.out_viommu_id;
	vdev.dev_id = idev;
	CHECK(ioctl(fd, T_VDEVICE_ALLOC, &vdev) == 0);
	/* the device reports through the vIOMMU once attached to one of its nested HWPTs */
	nested.dev_id = idev;
	nested.pt_id = viommu.out_viommu_id;
	nested.data_type = T_HWPT_DATA_SELFTEST;
	nested.data_len = sizeof(iotlb);
	nested.data_uptr = (uintptr_t)&iotlb;
	CHECK(ioctl(fd, T_HWPT_ALLOC, &nested) == 0);
	replace.mock_domain_replace.pt_id = nested.out_hwpt_id;
	CHECK(ioctl(fd, T_TEST_CMD, &replace) == 0);
	q.viommu_id = viommu.out_viommu_id;
	CHECK(ioctl(fd, T_VEVENTQ_ALLOC, &q) == 0);
	qfd = (int)q.out_veventq_fd;
	pfd.fd = qfd;
	pfd.events = POLLIN;
	CHECK(poll(&pfd, 1, 0) == 0);
	/* another thread's ioctl queues an event: a waiting poll wakes */
	t0 = now();
	CHECK(pthread_create(&th, NULL, later, NULL) == 0);
	CHECK(poll(&pfd, 1, 10000) == 1 && (pfd.revents & POLLIN));
	CHECK(now() - t0 > 0.1);
	pthread_join(th, NULL);
	CHECK(read(qfd, &ev, sizeof(ev)) == sizeof(ev));
	CHECK(ev.h.flags == 0 && ev.h.sequence == 0 && ev.virt_id == 0x99);
	/* drained: not readable any more */
	CHECK(poll(&pfd, 1, 0) == 0);
	CHECK(read(qfd, &ev, sizeof(ev)) == 0);
	/* a bad buffer is EFAULT */
	trigger();
	CHECK(poll(&pfd, 1, 0) == 1);
	CHECK(read(qfd, (void *)16, sizeof(ev)) == -1 && errno == EFAULT);
	puts("done");
	return 0;
}
"""
)


def test_veventq_fd_polls_and_reads(cc: Build) -> None:
    prog = cc("vevent_poll", POLL)
    machine = build_machine(["mock"], 0)
    before = machine.memory.frames_in_use
    rc, server = run(prog, machine=machine)
    assert rc == 0
    assert_clean(server, machine, before)


def test_killed_and_leaking_clients_leave_nothing(cc: Build) -> None:
    """Children killed in an ioctl loop, or exiting with every object open, clean up."""
    prog = cc(
        "killed",
        PRELUDE
        + r"""
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
""",
    )
    machine = build_machine(["mock"], 0)
    before = machine.memory.frames_in_use
    rc, server = run(prog, machine=machine)
    assert rc == 0
    assert_clean(server, machine, before)
    # the next run starts from nothing
    rc, server2 = run(prog, machine=machine)
    assert rc == 0
    assert_clean(server2, machine, before)


def test_cli_runs_a_program_and_passes_its_status(cc: Build) -> None:
    prog = cc("status", "#include <stdlib.h>\nint main(int c, char **v) { return atoi(v[1]); }\n")
    cli = Path(sys.executable).parent / "iommufd-model"
    done = subprocess.run([str(cli), "run", "--", str(prog), "7"], capture_output=True)
    assert done.returncode == 7
    done = subprocess.run([str(cli), "run", "--", "/nonexistent/program"], capture_output=True)
    assert done.returncode == 127
    assert b"nonexistent" in done.stderr


@pytest.mark.parametrize("path", ["/proc/self/task/{tid}/fail-nth", "/proc/thread-self/fail-nth"])
def test_fail_nth_file_is_served(cc: Build, path: str) -> None:
    prog = cc(
        "failnth",
        PRELUDE
        + r"""
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
""",
    )
    rc, server = run(prog, path.replace("{tid}", "%d"))
    assert rc == 0
    assert server.internal_errors == []
