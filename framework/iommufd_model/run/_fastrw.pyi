"""Types of the C extension ``_fastrw.c`` (the run server's compiled ACCESS_RW short path)."""

from collections.abc import Callable

class Table:
    served: int
    served_frames: int
    checks: int
    def __init__(
        self,
        *,
        req_size: int,
        inline_size: int,
        op_ioctl: int,
        test_cmd: int,
        cmd_size_min: int,
        cmd_size_max: int,
        rw_op: int,
        rw_write: int,
        rw_slow: int,
        max_length: int,
        frames: dict[int, object] | None = None,
        memory: object = None,
        acquire: Callable[[], object] | None = None,
        release: Callable[[], object] | None = None,
    ) -> None: ...
    def serve(self, conn_fd: int, /) -> bytes | bool: ...
    def learn(
        self,
        conn_fd: int,
        file_id: int,
        access_fd: int,
        dev: int,
        ino: int,
        fd_gen: int,
        pid: int,
        pidfd: int,
        src_pid: int,
        first: int,
        last: int,
        va: int,
        readable: bool,
        writable: bool,
        direct: bool,
        page: bool,
        start_byte: int,
        frame_first: int,
        frames: bytes,
        /,
    ) -> None: ...
    def invalidate(self) -> None: ...
