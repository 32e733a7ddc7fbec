/* IOMMU_OPTION RLIMIT_MODE SET needs CAP_SYS_RESOURCE as capable() sees it (Linux 7.2
 * ioas.c): in the initial user namespace. Sets it and exits with the errno (0 on success). */
#include "prelude.h"

struct t_option {
	uint32_t size, option_id;
	uint16_t op, reserved;
	uint32_t object_id;
	uint64_t val64;
};

int main(void)
{
	struct t_option o = { .size = sizeof(o), .option_id = 0, .op = 0, .val64 = 1 };
	int fd = open("/dev/iommu", O_RDWR);

	CHECK(fd >= 0);
	if (ioctl(fd, T_IO(0x87), &o))
		return errno;
	return 0;
}
