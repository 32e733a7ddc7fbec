/*
 * The few iommufd uAPI records the runner's test programs use, written for these tests from
 * the layouts of include/uapi/linux/iommufd.h and iommufd_test.h (Linux 7.2), so that they
 * build without kernel headers. Names carry a t_ prefix: they are the tests' own.
 */
#include <stdint.h>
#include <sys/ioctl.h>

#define T_IO(nr) _IO(';', nr)
#define T_DESTROY T_IO(0x80)
#define T_IOAS_ALLOC T_IO(0x81)
#define T_IOAS_MAP T_IO(0x85)
#define T_HWPT_ALLOC T_IO(0x89)
#define T_VIOMMU_ALLOC T_IO(0x90)
#define T_VDEVICE_ALLOC T_IO(0x91)
#define T_VEVENTQ_ALLOC T_IO(0x93)
#define T_TEST_CMD T_IO(0xa0)

#define T_MAP_FIXED_IOVA 1
#define T_MAP_WRITEABLE 2
#define T_MAP_READABLE 4
#define T_HWPT_NEST_PARENT 1
#define T_VIOMMU_TYPE_SELFTEST 0xdeadbeef
#define T_VEVENTQ_TYPE_SELFTEST 0xbeefbeef
#define T_OP_MOCK_DOMAIN 2
#define T_OP_MOCK_DOMAIN_REPLACE 10
#define T_HWPT_DATA_SELFTEST 0xdead
#define T_OP_MD_CHECK_REFS 4
#define T_OP_TRIGGER_VEVENT 17
#define T_MOCK_APERTURE (1ULL << 24)

struct t_destroy { uint32_t size, id; };
struct t_ioas_alloc { uint32_t size, flags, out_ioas_id; };
struct t_ioas_map {
	uint32_t size, flags, ioas_id, reserved;
	uint64_t user_va, length, iova;
};
struct t_hwpt_alloc {
	uint32_t size, flags, dev_id, pt_id, out_hwpt_id, reserved, data_type, data_len;
	uint64_t data_uptr;
	uint32_t fault_id, reserved2;
};
struct t_viommu_alloc {
	uint32_t size, flags, type, dev_id, hwpt_id, out_viommu_id, data_len, reserved;
	uint64_t data_uptr;
};
struct t_vdevice_alloc {
	uint32_t size, viommu_id, dev_id, out_vdevice_id;
	uint64_t virt_id;
};
struct t_veventq_alloc {
	uint32_t size, flags, viommu_id, type, depth, out_veventq_id, out_veventq_fd, reserved;
};
struct t_vevent_header { uint32_t flags, sequence; };
struct t_test_cmd {
	uint32_t size, op, id, reserved;
	union {
		struct { uint32_t out_stdev_id, out_hwpt_id, out_idev_id, dev_flags; } mock_domain;
		struct { uint64_t length, uptr; uint32_t refs, pad; } check_refs;
		struct { uint32_t dev_id; } trigger_vevent;
		struct { uint32_t pt_id; } mock_domain_replace;
		uint64_t raw[6];
	};
	uint32_t last;
};

#define CHECK(cond)                                                                  \
	do {                                                                         \
		if (!(cond)) {                                                       \
			fprintf(stderr, "%s:%d: check failed: %s (errno %d)\n", __FILE__, \
				__LINE__, #cond, errno);                             \
			exit(1);                                                     \
		}                                                                    \
	} while (0)
