"""The few Linux system calls the run server needs that ``os`` lacks (C: ``_uaccess.c``).

``vm_read``/``vm_write`` are ``process_vm_readv``/``process_vm_writev`` on the program's pid:
how the server does ``copy_from_user`` and ``copy_to_user`` (None/False when a byte cannot be
moved: the caller's EFAULT). ``vm_readable_pages`` faults in one byte of each page, as
pinning does. ``pidfd_getfd`` gives the server its own reference to a file the program names
by fd number (IOAS_MAP_FILE's memfd, an IRQ eventfd), as ``fget()`` does; ``fd_ident`` tells
which file (device, inode, mode) a program's fd number names now, through a pidfd.
``Waiter`` is the server's wait for its next event: epoll's, spun for first while the program
runs on another CPU (the model's own design: preload.c ``recv_reply``).
"""

from __future__ import annotations

from iommufd_model.run._uaccess import (
    Waiter,
    fd_ident,
    pidfd_getfd,
    vm_read,
    vm_readable_pages,
    vm_write,
)

__all__ = ["Waiter", "fd_ident", "pidfd_getfd", "vm_read", "vm_readable_pages", "vm_write"]
