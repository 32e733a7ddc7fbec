/*
 * The sysfs view under the runner (tests/run/test_vfio_sysfs.py): the lookups the kernel's
 * VFIO selftests make (lib/sysfs.c, vfio_pci_get_cdev_path), written for this test.
 */
#include "prelude.h"
#include <dirent.h>
#include <libgen.h>
#include <sys/stat.h>

#define DEV "/sys/bus/pci/devices/0000:01:00.0"

static long attr(const char *path)
{
	char buf[32] = { 0 };
	int fd = open(path, O_RDONLY);

	CHECK(fd >= 0);
	CHECK(read(fd, buf, sizeof(buf) - 1) > 0);
	CHECK(close(fd) == 0);
	return strtol(buf, NULL, 0);
}

static void link_base(const char *path, char *out)
{
	char buf[4096];
	ssize_t n = readlink(path, buf, sizeof(buf) - 1);

	CHECK(n > 0);
	buf[n] = 0;
	strcpy(out, basename(buf));
}

int main(void)
{
	char name[256], path[4096];
	struct dirent *e;
	struct stat st;
	DIR *d;
	int fd, found = 0;

	CHECK(attr(DEV "/vendor") == 0x8086);
	/* the device's own directory, whose name holds a ':', is in the view too */
	CHECK(attr("/sys/devices/pci0000:00/0000:01:00.0/vendor") == 0x8086);
	link_base(DEV "/iommu_group", name);
	CHECK(!strcmp(name, "7"));
	link_base(DEV "/driver", name);
	CHECK(!strcmp(name, "vfio-pci"));
	/* the group's device list reaches the device through the links */
	CHECK(attr("/sys/kernel/iommu_groups/7/devices/0000:01:00.0/vendor") == 0x8086);
	d = opendir(DEV "/vfio-dev/");
	CHECK(d != NULL);
	while ((e = readdir(d)))
		found += !strncmp(e->d_name, "vfio", 4) && !strcmp(e->d_name, "vfio3");
	CHECK(closedir(d) == 0 && found == 1);
	CHECK(stat(DEV "/vendor", &st) == 0 && S_ISREG(st.st_mode));
	CHECK(lstat(DEV, &st) == 0 && S_ISLNK(st.st_mode));
	CHECK(access(DEV "/sriov_numvfs", W_OK) == 0);
	CHECK(access(DEV "/virtfn0", F_OK) == -1 && errno == ENOENT);
	/* an attribute without store cannot be opened for writing */
	CHECK(open(DEV "/vendor", O_WRONLY) == -1 && errno == EACCES);
	/* sriov_numvfs: the write reaches the model, its VFs appear */
	CHECK(attr(DEV "/sriov_numvfs") == 0);
	fd = open(DEV "/sriov_numvfs", O_WRONLY);
	CHECK(fd >= 0);
	CHECK(write(fd, "9", 1) == -1 && errno == ERANGE);
	CHECK(write(fd, "2", 1) == 1);
	CHECK(close(fd) == 0);
	CHECK(attr(DEV "/sriov_numvfs") == 2);
	link_base(DEV "/virtfn1", name);
	CHECK(!strcmp(name, "0000:01:00.2"));
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/vendor", name);
	CHECK(attr(path) == 0x8086);
	/* what the model does not have is ENOENT, the host's devices are not seen */
	CHECK(open("/sys/bus/pci/devices/0000:00:00.0/vendor", O_RDONLY) == -1 && errno == ENOENT);
	return 0;
}
