"""The model server of one ``iommufd-model run``: every process and thread of the program.

One Python thread serves every request, one at a time (the model is single-threaded; the
program's threads each wait on their own connection, so their ioctls are serialized as if
under one lock). The wire format is the preload's (``preload.c``): fixed-size requests
(``struct req``: op and six u64 arguments) and replies (``struct rep``). Bytes never travel
on the wire, but for the inline structs below: the server reads and writes the program's
memory itself.

Files. Every file the model hands out (the iommufd, FAULT and vEVENTQ fds, the selftest's
access and dma-buf fds, fail-nth) is one end of a socketpair bound to
``\\0iommufd-model/<run>/<id>``, sent to the program with SCM_RIGHTS in the middle of the
request that creates it; the server keeps the other end and sees its hangup when the
program's last descriptor closes, then releases the file as the kernel's ``release()``
would. Hangups are taken before the requests of the same wait (see ``serve_once``), so a
close is complete before any later request of any process is served (the kernel releases
before close() returns).

Small ioctl structs travel inline (the preload's sendmsg copies MIN_READ bytes from the
struct, exactly the bytes the server would read when the struct's size fits in them) and what
the model changes in them comes back in the reply; larger structs, and every other user
pointer, the server reads and writes itself.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import stat
import struct
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from iommufd_model.core.eventq import EventFile, Fault, Veventq
from iommufd_model.core.main import FAST_OPS, IommuFd
from iommufd_model.core.vfio_compat import (
    VFIO_CHECK_EXTENSION,
    VFIO_GET_API_VERSION,
    VFIO_SET_IOMMU,
)
from iommufd_model.errors import err
from iommufd_model.failnth import fail_nth
from iommufd_model.hw.memory import PAGE_MASK
from iommufd_model.machine import Machine
from iommufd_model.run import fastrw, native
from iommufd_model.run.process import (
    DmaCoherence,
    Mirrors,
    MmioWindow,
    RealMemFile,
    RealProcess,
)

#: ``opener(machine, path, flags, proc)``: the model file for a path under one of the run's
#: model prefixes, None when it has none (ENOENT), OSError when it refuses (``vfio.open_path``)
Opener = Callable[[Machine, str, int, RealProcess], Any]

REQ = struct.Struct("<II6Q")
REP = struct.Struct("<IiqII")
#: OP_STATUS's reply body: pages pinned (pinned_vm) and locked (locked_vm) for an mm
STATUS = struct.Struct("<QQ")

OP_HELLO, OP_OPEN, OP_IOCTL, OP_READ, OP_WRITE = 1, 2, 3, 4, 5
OP_MAP_SHARED, OP_MUNMAP, OP_MMAP, OP_INSTALLED, OP_MMIO = 6, 7, 8, 9, 10
OP_STATUS, OP_CREDS = 11, 12
#: the longest spin of either side of a request, microseconds (preload.c's SPIN_MAX_US)
SPIN_MAX_US = 100
#: the spin page's size (preload.c's struct spin_page, in one page)
SPIN_PAGE_SIZE = 4096
#: the spin page's first contents: server_cpu and client_cpu unknown (preload.c's
#: SPIN_CPU_UNKNOWN), no thread spinning
SPIN_PAGE_START = struct.pack("<I60xI60xq", 0xFFFF_FFFF, 0xFFFF_FFFF, 0)
OPEN_IOMMU, OPEN_FAILNTH, OPEN_PATH = 1, 2, 3
REP_DONE, REP_INSTALL = 0, 1
REP_DRAIN, REP_MMIO = 1, 2
#: the longest path an OPEN_PATH request names (PATH_MAX)
PATH_MAX = 4096
O_CLOEXEC = os.O_CLOEXEC
#: a size field above this is not read whole (the kernel would fail on such a struct too)
MAX_STRUCT = 1 << 24
#: bytes read from an ioctl argument at least (the largest fixed VFIO/iommufd struct fits)
MIN_READ = 256
_INT_ARG = (VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU)


class FailNthFile:
    """``/proc/<pid>/task/<tid>/fail-nth`` of one task (fs/proc/base.c semantics)."""

    def __init__(self, server: Server, tid: int) -> None:
        self.server = server
        self.tid = tid
        self.pos = 0

    def read(self, count: int, offset: int | None) -> bytes:
        text = f"{self.server.failnth.get(self.tid, 0)}\n".encode()
        pos = self.pos if offset is None else offset
        out = text[pos : pos + count] if pos < len(text) else b""
        if offset is None:
            self.pos += len(out)
        return out

    def write(self, data: bytes) -> int:
        # kstrtouint_from_user(): base 0, an optional trailing newline, u32 range
        text = data.decode("ascii", "replace")
        text = text[:-1] if text.endswith("\n") else text
        try:
            n = int(text, 0)
        except ValueError:
            raise err(errno.EINVAL, "fail-nth takes an unsigned integer") from None
        if not 0 <= n < 1 << 32:
            raise err(errno.ERANGE if n >= 0 else errno.EINVAL, "fail-nth out of range")
        self.server.failnth[self.tid] = n
        return len(data)

    def release(self) -> None:
        pass


@attrs.define(eq=False)
class ModelFile:
    id: int
    sock: socket.socket
    obj: Any
    inode: tuple[int, int]  # of the program's end: how fget() finds it
    token: bool = False
    pos: int = 0  # f_pos: where read()/write() without an offset start


@attrs.define(eq=False)
class Conn:
    sock: socket.socket
    pid: int = 0
    tid: int = 0
    proc: RealProcess | None = None


def spin_us_of(env: dict[str, str]) -> int:
    """The longest spin of a run's waits, in microseconds, from its environment's
    ``IOMMUFD_MODEL_SPIN_US`` (default :data:`SPIN_MAX_US`; 0 or less: no spin);
    ValueError when it is not a whole number."""
    text = env.get("IOMMUFD_MODEL_SPIN_US", str(SPIN_MAX_US))
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"IOMMUFD_MODEL_SPIN_US={text!r}: not a whole number of microseconds"
        ) from None


class Server:
    """Serves one run; ``serve_until(pred)`` loops until ``pred()`` is true."""

    def __init__(
        self,
        machine: Machine,
        run: str,
        name: str,
        log: Any = None,
        openers: Sequence[Opener] = (),
    ) -> None:
        self.machine = machine
        self.run = run
        self.openers = list(openers)
        self.mirrors = Mirrors(machine.memory)
        self.dma = DmaCoherence(machine.memory, self.mirrors)
        self.log = log if log is not None else sys.stderr
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.listener.bind(b"\0" + name.encode())
        self.listener.listen(64)
        self.listener.setblocking(False)
        # what the one epoll set watches, by descriptor: the listener (None), each
        # connection (Conn) and the server's end of each model file (ModelFile)
        self._epoll = select.epoll()
        # the wait for the next event: epoll's, or the spinning one once the run shares its
        # spin page (share_spin_page)
        self._wait: Callable[[float], list[tuple[int, int]]] = self._epoll.poll
        self._waiter: native.Waiter | None = None
        self._spun = (0, 0, 0)  # the waiter's last figures, once closed
        self._watched: dict[int, Conn | ModelFile | None] = {}
        self._watch(self.listener, None)
        self.files: dict[int, ModelFile] = {}
        self.queues: dict[int, ModelFile] = {}  # the FAULT and vEVENTQ files (poll tokens)
        self.procs: dict[int, RealProcess] = {}
        self.memfiles: dict[tuple[int, int], RealMemFile] = {}
        self.by_inode: dict[tuple[int, int], ModelFile] = {}
        self.failnth: dict[int, int] = {}
        self.current: Conn | None = None
        self._inline = b""  # the current request's inline ioctl struct
        # bytes the reply carries (an inline struct's copy-back, at offset _reply_at of it;
        # OP_STATUS's counters)
        self._reply_body = b""
        self._reply_at = 0
        self._next_id = 1
        self._conns: dict[int, int] = {}  # pid -> open request connections
        self._exiting: set[int] = set()  # pids whose connections all closed
        self._requests = 0
        # moved by OP_CREDS: credentials a process read before may have changed since
        # (RealProcess keeps what it read while this stays)
        self.creds_generation = 0
        self.internal_errors: list[str] = []
        # the compiled ACCESS_RW short path (run/fastrw.py), None when off or not built
        self._short = fastrw.enabled()
        self._fastrw = (
            fastrw.make_table(OP_IOCTL, REQ.size, MIN_READ, machine.memory) if self._short else None
        )

    @property
    def requests(self) -> int:
        """Requests served so far (by Python and by the compiled short path)."""
        return self._requests + (self._fastrw.served if self._fastrw is not None else 0)

    # -- the loop -------------------------------------------------------------------------
    def share_spin_page(self, path: str, spin_us: int = SPIN_MAX_US) -> dict[str, str]:
        """Create the run's spin page at ``path`` and wait on it from now on; the program's
        environment entries that name it to the preload.

        A request is a synchronous round trip: where the program and the server run on two
        CPUs, each side spins a while for the other before it sleeps, unless the other last
        ran on its own CPU (the model's own design; run/spin_page.h says why, preload.c
        ``recv_reply`` how). ``spin_us`` is the longest spin (:func:`spin_us_of`), 0 none:
        the preload is given the same value, so both sides follow one setting."""
        env = {"IOMMUFD_MODEL_SPIN_US": str(max(spin_us, 0))}
        if spin_us <= 0:
            return env
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # the run's directory is the launcher's user's alone (0700): a program that
            # changed its uid cannot open the page, and then never spins (nothing else)
            os.ftruncate(fd, SPIN_PAGE_SIZE)
            os.pwrite(fd, SPIN_PAGE_START, 0)  # neither side's CPU is known yet
            self._waiter = native.Waiter(self._epoll.fileno(), fd, spin_us * 1000)
        finally:
            os.close(fd)
        self._wait = self._waiter.wait
        env["IOMMUFD_MODEL_SPIN"] = path
        return env

    def spin_stats(self) -> tuple[int, int, int]:
        """The server's spins so far, those that caught an event, and its budget now (ns)."""
        return self._waiter.stats() if self._waiter is not None else self._spun

    def serve_until(self, done: Any, poll: float = 0.05) -> None:
        """Serve until ``done()``, asked whenever a wait served no request and at least
        every ``poll`` seconds (not per request: it is a ``waitpid`` for the launcher)."""
        asked = time.monotonic()
        while True:
            served = self.serve_once(poll)
            now = time.monotonic()
            if not served or now - asked >= poll:
                if done():
                    return
                asked = now

    def serve_once(self, timeout: float) -> int:
        """One wait, then what it reported: file hangups first, then new connections, then
        requests in turn; returns the number of requests served.

        A close the program made before sending a request is in the same wait's report as
        the request (the hangup is queued when close() returns, before the program's next
        call), so releasing first keeps the kernel's order: a file is released before any
        later request of any process is served."""
        events = self._wait(timeout)
        watched = self._watched
        requests: list[Conn] = []
        accept = False
        table = self._fastrw
        for fd, _ in events:
            data = watched.get(fd, False)
            if isinstance(data, Conn):
                requests.append(data)
            elif isinstance(data, ModelFile):
                if table is not None:
                    table.invalidate()
                self._on_file(data)
            elif data is None:
                accept = True
        if accept:
            if table is not None:
                table.invalidate()
            self._accept()
        for conn in requests:
            fd = conn.sock.fileno()
            if watched.get(fd) is not conn:  # dropped meanwhile
                continue
            if table is None:
                self._on_request(conn, self._recv(conn))
                continue
            got = table.serve(fd)  # the compiled short path, or the request's bytes
            if got is True:
                continue
            table.invalidate()  # what follows may change any state the table relies on
            if got is False:
                self._drop_conn(conn)
            else:
                self._on_request(conn, got)
        return len(requests)

    def _watch(self, sock: socket.socket, data: Conn | ModelFile | None) -> None:
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        self._watched[sock.fileno()] = data

    def _unwatch(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._watched.pop(fd, False) is not False:
            self._epoll.unregister(fd)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(True)
        self._watch(sock, Conn(sock))

    def _drop_conn(self, conn: Conn) -> None:
        self._unwatch(conn.sock)
        conn.sock.close()
        if conn.proc is not None:
            left = self._conns.get(conn.pid, 1) - 1
            self._conns[conn.pid] = left
            if left <= 0:
                self._exiting.add(conn.pid)

    def has_connections(self, pid: int) -> bool:
        return self._conns.get(pid, 0) > 0

    def reap_processes(self) -> None:
        """Forget processes whose mm is gone (their page references go, as at exit_mm)."""
        for pid in list(self._exiting):
            proc = self.procs.get(pid)
            if proc is None or self._conns.get(pid, 0) > 0:
                self._exiting.discard(pid)
            elif not proc.alive():
                self._exiting.discard(pid)
                del self.procs[pid]
                proc.forget()
                self.collect_memfiles()

    def collect_memfiles(self) -> None:
        """Close the files that only mappings held, once no process maps them and no page
        of theirs is pinned (a program's shared anonymous mappings: one memfd each)."""
        mapped = {id(v.file) for proc in self.procs.values() for v in proc._vmas}
        for key, file in list(self.memfiles.items()):
            if file.fget_used or id(file) in mapped or file.pinned():
                continue
            del self.memfiles[key]
            file.close()

    def _on_file(self, mf: ModelFile) -> None:
        if self.files.get(mf.id) is not mf:  # released since select() reported it
            return
        try:
            data = mf.sock.recv(64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._release(mf)

    def _release(self, mf: ModelFile) -> None:
        self.files.pop(mf.id, None)
        self.queues.pop(mf.id, None)
        self.by_inode.pop(mf.inode, None)
        self._unwatch(mf.sock)
        mf.sock.close()
        try:
            mf.obj.release()
        except Exception as exc:  # a model bug must not take the run down
            self._internal(f"release of {mf.obj!r}", exc)

    def _internal(self, what: str, exc: BaseException) -> None:
        text = f"iommufd-model run: internal error in {what}: {type(exc).__name__}: {exc}"
        self.internal_errors.append(text)
        print(text, file=self.log)
        if os.environ.get("IOMMUFD_MODEL_STRICT"):
            traceback.print_exc(file=self.log)

    # -- requests -------------------------------------------------------------------------
    @staticmethod
    def _recv(conn: Conn) -> bytes:
        """The connection's next request (empty at its end or on an error)."""
        try:
            return conn.sock.recv(REQ.size + MIN_READ)
        except OSError:
            return b""

    def _on_request(self, conn: Conn, data: bytes) -> None:
        if len(data) < REQ.size:
            self._drop_conn(conn)
            return
        op, _pad, *a = REQ.unpack_from(data)
        # an ioctl's struct when the preload sent it inline (MIN_READ bytes, all of what
        # _read_struct would read when the leading size fits); what the model changes in
        # it goes back in the reply
        inline = len(data) == REQ.size + MIN_READ
        if inline and int.from_bytes(data[REQ.size : REQ.size + 4], "little") > MIN_READ:
            inline = False  # a larger struct: _read_struct reads it whole
        self._inline = data[REQ.size :] if inline else b""
        if (
            op == OP_IOCTL
            and a[1] in FAST_OPS
            and self._inline
            and self._short
            and self._fast_ioctl(conn, a)
        ):
            return
        self._reply_body = b""
        self._reply_at = 0
        if self._exiting:
            self.reap_processes()
        self._requests += 1
        self.mirrors.epoch += 1
        self.current = conn
        ret, error, flags = 0, 0, 0
        try:
            ret, flags = self._dispatch(conn, op, a)
        except OSError as exc:
            error = exc.errno or errno.EIO
        except Exception as exc:
            self._internal(f"request {op}", exc)
            error = errno.EIO
        finally:
            self.current = None
        if self.queues:
            self._update_tokens()
        reply = REP.pack(REP_DONE, error, ret, flags, self._reply_at) + self._reply_body
        try:
            conn.sock.send(reply, socket.MSG_NOSIGNAL)
        except OSError:
            self._drop_conn(conn)  # killed mid-request: its effect stays, as in the kernel

    def _fast_ioctl(self, conn: Conn, a: list[int]) -> bool:
        """An ioctl on an iommufd served by its command's short path (``IommuFd.fast_ioctl``),
        replied to here: True when served. Only in the plain case, where the general path
        would do nothing more around the model's call: a process that said hello, no
        fail-nth armed for the thread, no process exit to reap first, an inline struct
        (the whole of it, as the general path would read it) and nothing to copy back."""
        proc = conn.proc
        mf = self.files.get(a[0])
        if proc is None or mf is None or self._exiting or self.failnth.get(conn.tid):
            return False
        ictx = mf.obj
        if not isinstance(ictx, IommuFd):
            return False
        error = 0
        # a request begins, as on the general path: a memfd's size and the pages probed are
        # asked again (the program may have truncated or unmapped since the last request)
        self.mirrors.epoch += 1
        proc.new_request()
        try:
            done = ictx.fast_ioctl(a[1], self._inline, proc)
            if done is None:
                return False
            if self._fastrw is not None:
                self._learn(conn, a[0], a[3], done, proc)
        except OSError as exc:
            error = exc.errno or errno.EIO
        self._requests += 1
        if self.queues:
            self._update_tokens()
        try:
            conn.sock.send(REP.pack(REP_DONE, error, 0, 0, 0), socket.MSG_NOSIGNAL)
        except OSError:
            self._drop_conn(conn)
        return True

    def _learn(
        self, conn: Conn, file_id: int, fd_gen: int, done: object, proc: RealProcess
    ) -> None:
        """Let the compiled table take this connection's next requests like the one just
        served (an ACCESS_RW inside one area: through an mm's addresses or, for the pages
        near it that are pinned, through their frames), until the next event. The access
        fd named the file the request used while the caller's fd generation was ``fd_gen``
        (the request's, preload.c: 0 for none)."""
        if not isinstance(done, fastrw.DirectAccessRw) or done.window is None:
            return
        inode = next((mf.inode for mf in self.files.values() if mf.obj is done.file), None)
        if inode is None or self._fastrw is None:
            return
        w = done.window
        src = w.src.pid if w.src is not None else 0
        index, frames = fastrw.frame_records(w, done.iova, self.mirrors)
        self._fastrw.learn(
            conn.sock.fileno(), file_id, done.fd, inode[0], inode[1], fd_gen, proc.pid, proc.pidfd,
            src, w.first, w.last, w.va, w.readable, w.writable, w.direct, w.page,
            w.start_byte, index, frames,
        )  # fmt: skip

    def _proc(self, conn: Conn) -> RealProcess:
        if conn.proc is None:
            raise err(errno.EPROTO, "no hello on this connection")
        return conn.proc

    def _file(self, fid: int) -> ModelFile:
        mf = self.files.get(fid)
        if mf is None:
            raise err(errno.EBADF, f"model file {fid} is closed")
        return mf

    def _dispatch(self, conn: Conn, op: int, a: list[int]) -> tuple[int, int]:
        if op == OP_HELLO:
            self._hello(conn, a[0], a[1], a[2], bool(a[3]))
            return 0, 0
        proc = self._proc(conn)
        proc.new_request()
        if op == OP_IOCTL and not self.failnth.get(conn.tid):
            # the commonest request, when on a model file and without fault injection: what
            # the general path below comes to
            mf = self.files.get(a[0])
            if mf is not None and not isinstance(mf.obj, FailNthFile):
                return self._ioctl(proc, mf, a[1], a[2]), 0
        if op == OP_MUNMAP:
            proc.unmap_range(a[0], a[1])
            return 0, 0
        if op == OP_MAP_SHARED:
            file = self._memfile(proc, a[2])
            if file is not None:
                file.huge = file.huge or bool(a[4])
                proc.map_shared(a[0], a[1], file, a[3])
            return 0, 0
        if op == OP_CREDS:  # the program may have changed what creds.py reads of a process
            self.creds_generation += 1
            return 0, 0
        if op == OP_STATUS:  # what iommufd accounted to a process (/proc/<pid>/status)
            self._reply_body = self.accounted(a[0])
            return 0, 0
        if op == OP_MMIO:  # a CPU access, not a system call: no fault injection
            return self._mmio(proc, a[0], a[1], bool(a[2]), a[3], a[4]), 0
        if op == OP_OPEN and a[0] == OPEN_FAILNTH:
            return self.install(FailNthFile(self, a[1]), cloexec=bool(a[2] & O_CLOEXEC)), 0
        target = self.files.get(a[0]) if op in (OP_IOCTL, OP_READ, OP_WRITE, OP_MMAP) else None
        if target is not None and isinstance(target.obj, FailNthFile):
            return self._rw(proc, target, op, a)
        n = self.failnth.get(conn.tid, 0)
        if not n:
            return self._model_op(conn, proc, op, a)
        with fail_nth(n) as fp:
            try:
                return self._model_op(conn, proc, op, a)
            finally:
                self.failnth[conn.tid] = 0 if fp.fired else n - fp.count

    def _model_op(self, conn: Conn, proc: RealProcess, op: int, a: list[int]) -> tuple[int, int]:
        if op == OP_OPEN:
            if a[0] == OPEN_IOMMU:
                ictx = IommuFd(self.machine, proc)
                try:
                    ictx.fd = self.install(ictx, cloexec=bool(a[2] & O_CLOEXEC))
                except OSError:
                    ictx.release()
                    raise
                return ictx.fd, 0
            if a[0] == OPEN_PATH:
                return self._open_path(proc, a[1], a[3], a[2]), 0
            raise err(errno.ENOENT, "no such model device")
        mf = self._file(a[0])
        if op == OP_IOCTL:
            return self._ioctl(proc, mf, a[1], a[2]), 0
        if op in (OP_READ, OP_WRITE):
            return self._rw(proc, mf, op, a)
        if op == OP_MMAP:
            return self._mmap(proc, mf, a)
        raise err(errno.EPROTO, f"unknown request {op}")

    def _open_path(self, proc: RealProcess, uptr: int, length: int, flags: int) -> int:
        """``open(path)`` of a path under the model's prefixes: the first opener that knows it."""
        if length >= PATH_MAX:
            raise err(errno.ENAMETOOLONG, "path too long")
        raw = native.vm_read(proc.pid, uptr, length)
        if raw is None:
            raise err(errno.EFAULT, "path not readable")
        path = raw.decode("utf-8", "surrogateescape")
        for opener in self.openers:
            obj = opener(self.machine, path, flags, proc)
            if obj is not None:
                try:
                    fd = self.install(obj, cloexec=bool(flags & O_CLOEXEC))
                except OSError:
                    obj.release()
                    raise
                if isinstance(obj, IommuFd):  # /dev/vfio/vfio: an iommufd knows its fd
                    obj.fd = fd
                return fd
        raise err(errno.ENOENT, f"{path}: no such model file")

    def _hello(self, conn: Conn, pid: int, tid: int, lineage: int, fresh: bool) -> None:
        creds = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer_pid = struct.unpack("3i", creds)[0]
        if peer_pid != pid:
            raise err(errno.EPERM, "hello from another pid than the peer's")
        conn.pid, conn.tid = pid, tid
        self._conns[pid] = self._conns.get(pid, 0) + 1
        proc = self.procs.get(pid)
        if proc is None or fresh or not proc.alive():
            if proc is not None:  # exec'd (a new mm) or a reused pid
                proc.gone = True
                proc.forget()
            proc = RealProcess(self.machine, pid, self)
            parent = self.procs.get(lineage)
            if not fresh and parent is not None:
                proc.inherit(parent)
            self.procs[pid] = proc
        conn.proc = proc

    def accounted(self, pid: int) -> bytes:
        """The pages iommufd accounted to the mm of ``pid`` (a process or one of its
        threads): ``pinned_vm`` (VmPin) and ``locked_vm`` (VmLck), two u64 in pages."""
        proc = self.procs.get(pid)
        if proc is None:  # a thread's id: its process
            for data in self._watched.values():
                if isinstance(data, Conn) and data.tid == pid:
                    proc = data.proc
                    break
        if proc is None or proc.gone:
            return STATUS.pack(0, 0)
        # unsigned, as the kernel's counters (7.2's CHANGE_PROCESS can leave one below zero)
        return STATUS.pack(proc.locked_pages % (1 << 64), proc.locked_vm % (1 << 64))

    # -- fds ------------------------------------------------------------------------------
    def install(self, obj: Any, *, cloexec: bool = True) -> int:
        """Give the program making the current request a new fd for ``obj``."""
        conn = self.current
        if conn is None:
            raise err(errno.EBADF, "no request to install a file into")
        fid = self._next_id
        self._next_id += 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            theirs.bind(f"\0iommufd-model/{self.run}/{fid}".encode())
            st = os.fstat(theirs.fileno())
            inode = (st.st_dev, st.st_ino)
            fds = array.array("i", [theirs.fileno()])
            conn.sock.sendmsg(
                [REP.pack(REP_INSTALL, 0, 0, 0, int(cloexec))],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())],
            )
        except OSError:
            ours.close()
            raise err(errno.EMFILE, "could not pass the file") from None
        finally:
            theirs.close()
        ack = conn.sock.recv(REQ.size)
        got = REQ.unpack(ack)[2] if len(ack) == REQ.size else -1
        fd = got - (1 << 64) if got >= 1 << 63 else got
        if fd < 0:
            ours.close()
            raise err(errno.EMFILE, "the program could not take a new fd")
        mf = ModelFile(fid, ours, obj, inode)
        self.files[fid] = mf
        if isinstance(obj, EventFile):
            self.queues[fid] = mf
        self.by_inode[inode] = mf
        ours.setblocking(False)
        self._watch(ours, mf)
        return fd

    def resolve_fd(self, proc: RealProcess, fd: int) -> Any:
        """``fget(fd)`` in ``proc``: the model file, a :class:`RealMemFile`, or None.

        The file is known by its inode, asked of the program's descriptor table at every
        call (``native.fd_ident``: pidfd_getfd, fstat, close), so a number closed and reused
        for another file since the last call names the new file, as in the kernel; a
        regular file seen for the first time is taken with ``pidfd_getfd``.
        """
        if not 0 <= fd < 1 << 31:
            return None
        ident = native.fd_ident(proc.pidfd, fd)
        if ident is None:
            return None
        key = (ident[0], ident[1])
        mf = self.by_inode.get(key)
        if mf is not None:
            return mf.obj
        if not stat.S_ISREG(ident[2]):
            return None
        file = self.memfiles.get(key)
        if file is not None:
            return file
        try:
            mine = native.pidfd_getfd(proc.pid, fd)
        except OSError:
            return None
        st = os.fstat(mine)
        if (st.st_dev, st.st_ino) != key or not stat.S_ISREG(st.st_mode):
            os.close(mine)  # the fd changed under us
            return None
        file = self.memfiles[key] = RealMemFile(self.machine.memory, mine, self.mirrors)
        return file

    def fget(self, proc: RealProcess, fd: int) -> Any:
        """``resolve_fd`` for the core (``files.get``): a file the core took may be held by
        its objects, so it stays open for the rest of the run."""
        got = self.resolve_fd(proc, fd)
        if isinstance(got, RealMemFile):
            got.fget_used = True
        return got

    def _memfile(self, proc: RealProcess, fd: int) -> RealMemFile | None:
        got = self.resolve_fd(proc, fd)
        return got if isinstance(got, RealMemFile) else None

    # -- file operations ------------------------------------------------------------------
    def _ioctl(self, proc: RealProcess, mf: ModelFile, cmd: int, arg: int) -> int:
        obj = mf.obj
        if not hasattr(obj, "ioctl"):
            raise err(errno.ENOTTY, "this file has no ioctls")
        if cmd in _INT_ARG:
            return int(obj.ioctl(cmd, arg, caller=proc))
        if cmd == VFIO_GET_API_VERSION:
            return int(obj.ioctl(cmd, 0, caller=proc))
        inline = self._inline
        buf = bytearray(inline) if inline else self._read_struct(proc, arg)
        orig = bytes(buf)
        try:
            return int(obj.ioctl(cmd, buf, caller=proc))
        finally:
            changed = self._changes(orig, buf)
            if changed is not None:
                lo, data = changed
                if inline and lo + len(data) <= MIN_READ:
                    self._reply_at, self._reply_body = lo, data
                else:
                    native.vm_write(proc.pid, arg + lo, data)

    def _read_struct(self, proc: RealProcess, arg: int) -> bytearray:
        """The user's struct as far as it is readable, at least its size field's bytes.

        iommufd reads ``size`` bytes, VFIO a fixed minimum whatever ``argsz`` says; reading
        at least ``MIN_READ`` bytes serves both. A bad pointer leaves a shorter buffer, so
        the core fails where the kernel's ``get_user``/``copy_struct_from_user`` would
        (EFAULT after the size checks).
        """
        first = native.vm_read(proc.pid, arg, MIN_READ)
        if first is not None:
            size = min(int.from_bytes(first[:4], "little"), MAX_STRUCT)
            if size <= MIN_READ:
                return bytearray(first)
            body = native.vm_read(proc.pid, arg, size)
            return bytearray(first if body is None else body)
        head = native.vm_read(proc.pid, arg, 4)
        if head is None:
            return bytearray()
        size = min(int.from_bytes(head, "little"), MAX_STRUCT)
        for n in (size, ((arg | PAGE_MASK) + 1) - arg):
            body = native.vm_read(proc.pid, arg, n) if n > 4 else None
            if body is not None:
                return bytearray(body)
        return bytearray(head)

    @staticmethod
    def _changes(orig: bytes, buf: bytearray) -> tuple[int, bytes] | None:
        """What the core wrote into the struct, to copy back even when the ioctl failed:
        (offset, bytes) from the first to the last changed byte, None if nothing changed."""
        if buf == orig:
            return None
        # the changed bits of the struct as one little-endian integer: byte i is bits 8i..
        diff = int.from_bytes(buf, "little") ^ int.from_bytes(orig, "little")
        lo = ((diff & -diff).bit_length() - 1) >> 3
        hi = ((diff.bit_length() - 1) >> 3) + 1
        return lo, bytes(buf[lo:hi])

    def _rw(self, proc: RealProcess, mf: ModelFile, op: int, a: list[int]) -> tuple[int, int]:
        obj = mf.obj
        uptr, count = a[1], a[2]
        if count >= 1 << 63:
            raise err(errno.EINVAL, "count too large")
        if op == OP_READ:
            if isinstance(obj, FailNthFile):
                data = obj.read(count, a[3] if a[4] else None)
            elif isinstance(obj, EventFile):
                data = obj.read(min(count, 1 << 20))
            elif hasattr(obj, "read"):  # a device file: pread of its regions
                data = obj.read(min(count, 1 << 20), a[3] if a[4] else mf.pos)
                if not a[4]:
                    mf.pos += len(data)
            else:
                raise err(errno.EINVAL, "this file cannot be read")
            if data and not native.vm_write(proc.pid, uptr, data):
                raise err(errno.EFAULT, "read buffer not writable")
            flags = REP_DRAIN if mf.token and not self._pending(obj) else 0
            if flags:
                mf.token = False
            return len(data), flags
        if isinstance(obj, (FailNthFile, EventFile)):
            data = native.vm_read(proc.pid, uptr, min(count, 1 << 20)) or b""
            if len(data) != min(count, 1 << 20):
                raise err(errno.EFAULT, "write buffer not readable")
            return obj.write(data), 0
        if hasattr(obj, "write"):  # a device file: pwrite of its regions
            data = native.vm_read(proc.pid, uptr, min(count, 1 << 20)) or b""
            if len(data) != min(count, 1 << 20):
                raise err(errno.EFAULT, "write buffer not readable")
            done = int(obj.write(data, a[3] if a[4] else mf.pos))
            if not a[4]:
                mf.pos += done
            return done, 0
        raise err(errno.EINVAL, "this file cannot be written")

    def _mmap(self, proc: RealProcess, mf: ModelFile, a: list[int]) -> tuple[int, int]:
        """``mmap(addr, length, prot, flags, fd, offset)`` of a model file.

        A device file's region (``mmap_region``: a BAR) becomes a trapped window: the reply
        tells the preload to make the range inaccessible, and each access comes back as an
        OP_MMIO request. The iommufd's regions get the core's checks and VMA, and the
        program's mapping at ``addr`` the region's bytes (RAM pages)."""
        obj = mf.obj
        offset, length, addr, prot, flags = a[1], a[2], a[3], a[4], a[5]
        if hasattr(obj, "mmap_region"):
            bar, bar_offset = obj.mmap_region(offset, length, prot, flags)
            length = (length + PAGE_MASK) & ~PAGE_MASK
            device = obj.device if hasattr(obj, "device") else obj.vdev.fn
            proc.add_mmio(MmioWindow(addr, length, device, bar, bar_offset, obj))
            return 0, REP_MMIO
        if not isinstance(obj, IommuFd):
            raise err(errno.ENODEV, "this file cannot be mmapped")
        vma = obj.mmap(offset, length, prot, flags)
        try:
            if not native.vm_write(proc.pid, addr, vma.read(0, vma.length)):
                raise err(errno.EFAULT, "could not fill the mapping")
        except OSError:
            vma.close()
            raise
        proc.add_vma(addr, vma)
        return 0, 0

    def _mmio(
        self, proc: RealProcess, addr: int, size: int, store: bool, value: int, src: int
    ) -> int:
        """One CPU access to trapped device registers, in program order (see preload.c):
        a load returns the register's value now, each store is one write, a 64-byte store
        (MOVDIR64B) one submission of the 64 bytes at ``src``."""
        if size not in (1, 2, 4, 8, 64):
            raise err(errno.EINVAL, f"MMIO access of {size} bytes")
        win = proc.mmio_at(addr, size)
        at = win.offset + addr - win.start
        if size == 64:
            data = native.vm_read(proc.pid, src, 64)
            if data is None:
                raise err(errno.EFAULT, "MOVDIR64B source not readable")
            win.device.mmio_write64b(win.bar, at, data)
            return 0
        mask = (1 << (size * 8)) - 1
        if store:
            win.device.mmio_write(win.bar, at, size, value & mask)
            return 0
        got = win.device.mmio_read(win.bar, at, size) & mask
        return got - (1 << 64) if got >= 1 << 63 else got

    # -- poll readiness -------------------------------------------------------------------
    @staticmethod
    def _pending(obj: Any) -> bool:
        if isinstance(obj, EventFile):
            owner = obj.owner
            if isinstance(owner, Fault):
                return bool(owner.deliver)
            if isinstance(owner, Veventq):
                return bool(owner.events)
        return False

    def _update_tokens(self) -> None:
        """One byte waits in a queue's socket while it has events: poll() sees POLLIN."""
        for mf in self.queues.values():
            if not mf.token and self._pending(mf.obj):
                try:
                    mf.sock.send(b"!", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                    mf.token = True
                except OSError:
                    pass

    # -- end of the run -------------------------------------------------------------------
    def close(self) -> None:
        """Release whatever the program left open, newest first, then every process."""
        for mf in sorted(self.files.values(), key=lambda m: -m.id):
            self._release(mf)
        for data in list(self._watched.values()):
            if isinstance(data, Conn):
                self._drop_conn(data)
        for proc in self.procs.values():
            proc.forget()
        for file in self.memfiles.values():
            file.close()
        if self._waiter is not None:  # its figures outlive it (spin_stats)
            self._spun = self._waiter.stats()
        self._wait = self._epoll.poll
        self._waiter = None
        self._epoll.close()
        self.listener.close()
        self.dma.close()
