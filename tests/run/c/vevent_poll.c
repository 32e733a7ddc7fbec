/* poll() on a vEVENTQ fd wakes when another thread's ioctl queues an event; read()
 * drains it; a bad buffer is EFAULT. */
#include "prelude.h"

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
