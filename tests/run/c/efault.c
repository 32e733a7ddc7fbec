/* Bad pointers are EFAULT (never a crash), unknown ioctls ENOTTY, writes EINVAL. */
#include "prelude.h"

int main(void)
{
	int fd = open("/dev/iommu", O_RDWR);
	char *p = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct t_ioas_alloc *edge = (void *)(p + 4096 - 8);
	struct t_ioas_alloc *fits = (void *)(p + 4096 - sizeof(struct t_ioas_alloc));
	struct {
		struct t_ioas_alloc a;
		char tail[300 - sizeof(struct t_ioas_alloc)];
	} big = { 0 };
	uint32_t ioas;

	CHECK(fd >= 0);
	CHECK(ioctl(fd, T_IOAS_ALLOC, (void *)16) == -1 && errno == EFAULT);
	CHECK(ioctl(fd, T_IOAS_ALLOC, (void *)-1L) == -1 && errno == EFAULT);
	/* the size field is readable, the rest of the struct is not */
	CHECK(munmap(p + 4096, 4096) == 0);
	edge->size = sizeof(*edge);
	edge->flags = 0;
	CHECK(ioctl(fd, T_IOAS_ALLOC, edge) == -1 && errno == EFAULT);
	/* a struct that ends where the mapping ends is read whole (only its size is read) */
	fits->size = sizeof(*fits);
	fits->flags = 0;
	fits->out_ioas_id = 0;
	CHECK(ioctl(fd, T_IOAS_ALLOC, fits) == 0 && fits->out_ioas_id != 0);
	/* a struct larger than the preload sends inline: read whole, zero tail accepted,
	 * a non-zero byte past what the kernel knows is E2BIG (copy_struct_from_user) */
	big.a.size = sizeof(big);
	CHECK(ioctl(fd, T_IOAS_ALLOC, &big) == 0 && big.a.out_ioas_id != 0);
	big.tail[sizeof(big.tail) - 1] = 1;
	CHECK(ioctl(fd, T_IOAS_ALLOC, &big) == -1 && errno == E2BIG);
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
