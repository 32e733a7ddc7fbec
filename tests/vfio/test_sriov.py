"""SR-IOV through VFIO: sriov_numvfs in the sysfs view creates VFs bound to vfio-pci, and the
VF token decides who may open a VF (the cases of the 7.2 selftest vfio_pci_sriov_uapi_test:
init_token_match, pf_early_close, override_token, for each token variant and both paths)."""

from __future__ import annotations

import errno
import struct
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import iommufd_model as im
from iommufd_model import vfio
from iommufd_model.core.main import IommuFd
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import vfio as V
from iommufd_model.vfio import sysfs
from iommufd_model.vfio.group import VfioGroupFile

from .conftest import call

UUID_1 = "52ac9bff-3a88-4fbd-901a-0d767c3b6c97"
UUID_2 = "88594674-90a0-47a9-aea8-9d9b352ac08a"


class Env:
    def __init__(self, driver: str) -> None:
        self.machine = im.Machine.build(iommus=[driver])
        self.pf = self.machine.add_pci_function("generic", 0, total_vfs=2)
        self.proc = self.machine.new_process()
        self.iommufd = self.proc.open_iommufd()
        root = f"/sys/bus/pci/devices/{self.pf.bdf}"
        assert sysfs.write(self.machine, f"{root}/sriov_numvfs", b"1\n") == 2
        tree = sysfs.tree(self.machine)
        assert tree[f"{sysfs.device_dir(self.pf)}/sriov_numvfs"].content == b"1\n"  # type: ignore[union-attr]
        self.vf = self.pf.sriov_vfs[0]
        link = tree[f"{sysfs.device_dir(self.pf)}/virtfn0"]
        assert link.target.endswith(self.vf.bdf)  # type: ignore[union-attr]
        assert tree[f"{sysfs.device_dir(self.vf)}/driver"].target.endswith("vfio-pci")  # type: ignore[union-attr]

    def vdev(self, fn: Any) -> Any:
        return vfio.registry(self.machine).by_function(fn)

    def cdev_open(self, fn: Any, token: str | None) -> tuple[int, int]:
        """iommufd_setup(): open the cdev and bind; (fd, 0 or errno)."""
        p = self.proc
        fd = vfio.open_fd(p, f"/dev/vfio/devices/{self.vdev(fn).name}")
        b = V.VfioDeviceBindIommufd(argsz=24, iommufd=self.iommufd.fd)
        if token is not None:
            va = p.mmap(4096)
            p.write(va, uuid.UUID(token).bytes)
            b.flags, b.token_uuid_ptr = V.VFIO_DEVICE_BIND_FLAG_TOKEN, va
        try:
            call(p.files[fd], V.VFIO_DEVICE_BIND_IOMMUFD, b, p)
        except OSError as exc:
            return fd, exc.errno or 0
        return fd, 0

    def group_open(self, fn: Any, token: str | None) -> tuple[int, int]:
        """container_setup(): group + container, GET_DEVICE_FD with ``vf_token=``."""
        p = self.proc
        gfd = vfio.open_fd(p, f"/dev/vfio/{self.vdev(fn).group.id}")
        cfd = vfio.open_fd(p, vfio.CONTAINER_PATH)
        group, container = p.files[gfd], p.files[cfd]
        assert isinstance(group, VfioGroupFile) and isinstance(container, IommuFd)
        group.ioctl(V.VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("<i", cfd)), p)
        container.ioctl(V.VFIO_SET_IOMMU, V.VFIO_TYPE1v2_IOMMU)
        name = fn.bdf + (f" vf_token={token}" if token else "")
        try:
            fd = group.ioctl(V.VFIO_GROUP_GET_DEVICE_FD, bytearray(name.encode() + b"\0"), p)
        except OSError as exc:
            return -1, exc.errno or 0
        return fd, 0


Opener = Callable[[Env, Any, "str | None"], "tuple[int, int]"]
PATHS: dict[str, Opener] = {"iommufd": Env.cdev_open, "container": Env.group_open}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("vf_token", [UUID_1, UUID_2, None], ids=["same", "diff", "null"])
@pytest.mark.parametrize("case", ["init_token_match", "pf_early_close", "override_token"])
def test_sriov_uapi(path: str, vf_token: str | None, case: str) -> None:
    env = Env("mock")
    opener = PATHS[path]
    pf_fd, ret = opener(env, env.pf, UUID_1)
    assert ret == 0
    pf_token = UUID_1
    if case == "pf_early_close":
        env.proc.close(pf_fd)
    elif case == "override_token":
        pf_token = UUID_2
        feat = V.VfioDeviceFeature(
            argsz=24, flags=V.VFIO_DEVICE_FEATURE_SET | V.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN
        )
        call(env.proc.files[pf_fd], V.VFIO_DEVICE_FEATURE, feat, env.proc, uuid.UUID(UUID_2).bytes)
    _vf_fd, ret = opener(env, env.vf, vf_token)
    if vf_token is None or vf_token != pf_token:
        assert ret == errno.EACCES
    else:
        assert ret == 0


def test_pf_needs_token_while_vf_open_and_feature_rules() -> None:
    env = Env("amd")
    pf_fd, ret = env.cdev_open(env.pf, UUID_1)
    assert ret == 0
    df = env.proc.files[pf_fd]
    get = V.VfioDeviceFeature(argsz=24, flags=V.VFIO_DEVICE_FEATURE_GET | 0)
    assert_errno(errno.EINVAL, lambda: call(df, V.VFIO_DEVICE_FEATURE, get, env.proc, bytes(16)))
    probe = V.VfioDeviceFeature(
        argsz=8, flags=V.VFIO_DEVICE_FEATURE_PROBE | V.VFIO_DEVICE_FEATURE_SET
    )
    call(df, V.VFIO_DEVICE_FEATURE, probe, env.proc)
    short = V.VfioDeviceFeature(argsz=16, flags=V.VFIO_DEVICE_FEATURE_SET)
    assert_errno(errno.EINVAL, lambda: call(df, V.VFIO_DEVICE_FEATURE, short, env.proc, bytes(8)))
    vf_fd, ret = env.cdev_open(env.vf, UUID_1)
    assert ret == 0
    env.proc.close(pf_fd)
    _again, ret = env.cdev_open(env.pf, None)  # a VF is open: the PF needs the token
    assert ret == errno.EACCES
    env.proc.close(vf_fd)
    # with every VF closed, sriov_numvfs 0 removes them
    assert sysfs.write(env.machine, f"{sysfs.device_dir(env.pf)}/sriov_numvfs", b"0") == 1
    assert not env.pf.sriov_vfs
    assert not any("virtfn" in path for path in sysfs.tree(env.machine))


def test_sysfs_write_refusals() -> None:
    env = Env("mock")
    d = sysfs.device_dir(env.pf)
    assert_errno(errno.EBUSY, lambda: sysfs.write(env.machine, f"{d}/sriov_numvfs", b"2"))
    assert_errno(errno.ERANGE, lambda: sysfs.write(env.machine, f"{d}/sriov_numvfs", b"3"))
    assert_errno(errno.ERANGE, lambda: sysfs.write(env.machine, f"{d}/sriov_numvfs", b"0x10000"))
    assert_errno(errno.EINVAL, lambda: sysfs.write(env.machine, f"{d}/sriov_numvfs", b"-1"))
    assert_errno(errno.EINVAL, lambda: sysfs.write(env.machine, f"{d}/sriov_numvfs", b"one"))
    assert_errno(errno.EACCES, lambda: sysfs.write(env.machine, f"{d}/vendor", b"1"))
    assert_errno(errno.ENOENT, lambda: sysfs.write(env.machine, f"{d}/nothing", b"1"))
    assert sysfs.kstrtou16(b"010\n") == 8 and sysfs.kstrtou16(b"+0x1f") == 31
