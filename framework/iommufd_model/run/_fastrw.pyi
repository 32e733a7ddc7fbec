"""Types of the C extension ``_fastrw.c`` (the run server's compiled ACCESS_RW short path)."""

class Table:
    served: int
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
    ) -> None: ...
    def serve(self, conn_fd: int, /) -> bytes | bool: ...
    def learn(
        self,
        conn_fd: int,
        file_id: int,
        access_fd: int,
        dev: int,
        ino: int,
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
        /,
    ) -> None: ...
    def invalidate(self) -> None: ...
