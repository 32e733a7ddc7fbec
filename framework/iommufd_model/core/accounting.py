"""Pinned-page accounting: ``iopt_pages_update_pinned()`` and its three modes (Linux 7.2).

Every ``struct iopt_pages`` is charged one way, fixed when it is made
(drivers/iommu/iommufd/pages.c ``iopt_alloc_pages()``, io_pagetable.c ``iopt_map_common()``):

* ``ACCOUNT_NONE`` -- the caller had CAP_IPC_LOCK (and every dma-buf): no limit;
* ``ACCOUNT_USER`` -- the default: the caller's *user* (``user_struct->locked_vm``, shared by
  every process of that real uid) against the caller's RLIMIT_MEMLOCK
  (``incr_user_locked_vm()``);
* ``ACCOUNT_MM`` -- IOMMU_OPTION_RLIMIT_MODE 1 (and a USER pages mapped then): the mm's
  ``locked_vm`` (VmLck, which also holds the program's own mlock()ed pages) against
  RLIMIT_MEMLOCK (``__account_locked_vm()``, called by ``update_mm_locked_vm()``).

In every mode a successful charge also moves the mm's ``pinned_vm`` (VmPin): the model's
``Process.locked_pages``; ``Process.locked_vm`` is the mm's locked_vm as far as iommufd
charged it. A refused charge is ENOMEM and changes nothing.

What the model keeps of a user (the model's own): the ``locked_vm`` iommufd charged to
that uid *within one model* (one machine's memory: under ``iommufd-model run``, every
process of the run). The kernel's counter is system-wide and shared with io_uring and RDMA,
which the model cannot see.
"""

from __future__ import annotations

import errno
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SHIFT, PhysicalMemory

if TYPE_CHECKING:
    from iommufd_model.process import Process

#: ``enum iopt_pages_account_mode`` (io_pagetable.h, Linux 7.2)
ACCOUNT_NONE = 0
ACCOUNT_USER = 1
ACCOUNT_MM = 2
ACCOUNT_MODE_NUM = 3


@attrs.define(eq=False)
class UserStruct:
    """``struct user_struct`` as iommufd uses it: the pages charged to one real uid."""

    uid: int
    locked_vm: int = 0


# memory (one model) -> uid -> its user_struct
_USERS: weakref.WeakKeyDictionary[PhysicalMemory, dict[int, UserStruct]] = (
    weakref.WeakKeyDictionary()
)


def user_of(proc: Process) -> UserStruct:
    """``current_user()`` of ``proc`` within its model (``get_uid()``)."""
    users = _USERS.setdefault(proc.memory, {})
    uid = proc.uid
    user = users.get(uid)
    if user is None:
        user = users[uid] = UserStruct(uid)
    return user


def update_pinned(
    mode: int, proc: Process, user: UserStruct | None, npages: int, inc: bool
) -> None:
    """``iopt_pages_update_pinned()``: charge (``inc``) or uncharge ``npages`` pinned pages
    of mm ``proc`` (charged to ``user`` in ACCOUNT_USER). ENOMEM over the limit, nothing
    changed; an uncharge cannot fail."""
    if mode == ACCOUNT_USER:
        assert user is not None  # set with the mode (Pages)
        if inc:
            # incr_user_locked_vm(): the user's total against the source task's limit
            if user.locked_vm + npages > proc.memlock_limit >> PAGE_SHIFT:
                raise err(errno.ENOMEM, "over RLIMIT_MEMLOCK (per user)")
            user.locked_vm += npages
        elif user.locked_vm >= npages:  # decr_user_locked_vm() WARNs and skips otherwise
            user.locked_vm -= npages
    elif mode == ACCOUNT_MM:
        if inc:
            # __account_locked_vm(): the mm's locked_vm against the source task's limit
            if proc.mm_locked_vm() + npages > proc.memlock_limit >> PAGE_SHIFT:
                raise err(errno.ENOMEM, "over RLIMIT_MEMLOCK (per process)")
            proc.locked_vm += npages
        else:
            proc.locked_vm -= npages
    if inc:
        proc.locked_pages += npages
    else:
        proc.locked_pages -= npages


def charge_current(proc: Process, npinned: Sequence[int]) -> None:
    """``charge_current()`` (ioas.c): charge ``npinned[mode]`` pages in each mode to the
    caller ``proc``, in mode order; a refusal undoes the modes charged before it."""
    done: list[int] = []
    try:
        for mode in range(ACCOUNT_MODE_NUM):
            if npinned[mode]:
                user = user_of(proc) if mode == ACCOUNT_USER else None
                update_pinned(mode, proc, user, npinned[mode], True)
                done.append(mode)
    except OSError:
        for mode in reversed(done):
            user = user_of(proc) if mode == ACCOUNT_USER else None
            update_pinned(mode, proc, user, npinned[mode], False)
        raise
