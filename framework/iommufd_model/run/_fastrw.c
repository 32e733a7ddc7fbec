/*
 * The run server's compiled short path for IOMMU_TEST_OP_ACCESS_RW (the model's own design;
 * run/fastrw.py says how the server uses it; without it the server serves every request in
 * Python, through IommuFd.fast_ioctl or the general path).
 *
 * The kernel's iommufd selftest makes about 240,000 ACCESS_RW requests, nearly all of them a
 * read or a write of a few bytes of one area. The server serves the first of a kind in Python
 * (IommuFd.fast_ioctl) and then tells this table what it found (`learn`): for one connection,
 * one access fd and one iommufd file, the area's IOVA window, its permissions, the process
 * whose addresses back it and its address at the window's first byte, and which requests
 * Linux 7.2 copies through those addresses (DirectWindow in core/io_pagetable.py: without
 * SLOW_PATH any range when the mm is the caller's, copy_to_user; a range within one page of
 * a live mm, iopt_pages_rw_page). `serve` then takes the next request of that connection
 * itself when it is such a request inside the window: it checks that the fd number still
 * names the same access file (pidfd_getfd + fstat: an fd closed and reused names another
 * file, and the request goes back to Python), makes the two copies the general path makes
 * (the user's buffer through the caller, the area's bytes through the backing process, with
 * process_vm_readv/writev) and replies. Anything else is handed back to Python as the
 * request's bytes.
 *
 * Validity: every entry carries the table's generation when learned. The server bumps it
 * (`invalidate`) before every event it handles in Python (a request, a hangup, a new
 * connection), so an entry only lives across requests this table served itself, which
 * change no model state. Built at install time with gcc (setup.py), like _uaccess.c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

#define SLOTS 64
/* the largest request: the fixed part and an inline struct (checked against the server's) */
#define REQ_MAX 512
/* bytes copied through the stack; longer copies use the heap */
#define STACK_COPY 4096
#define PAGE 4096ULL

/* struct rep of preload.c: kind, err, ret, flags, arg (REP_DONE is 0) */
struct rep {
	uint32_t kind;
	int32_t err;
	int64_t ret;
	uint32_t flags;
	uint32_t arg;
};

struct entry {
	uint64_t gen; /* 0: empty */
	int conn_fd;
	uint64_t file_id; /* the iommufd's model file (the request's a[0]) */
	uint32_t access_fd;
	uint64_t dev, ino; /* the access file's identity */
	int pid, pidfd; /* the caller */
	int src_pid; /* the process whose addresses back the area */
	uint64_t first, last; /* the area's IOVA window */
	uint64_t va; /* src_pid's address of the byte at `first` */
	int readable, writable;
	int direct; /* without SLOW_PATH, any range: copy_to_user in the caller's own mm */
	int page; /* a range within one page: iopt_pages_rw_page() */
};

typedef struct {
	PyObject_HEAD
	uint64_t gen;
	unsigned long long served;
	/* the wire and uAPI numbers, from the server (run/fastrw.py) */
	Py_ssize_t req_size, inline_size;
	uint32_t op_ioctl, cmd_size_min, cmd_size_max, rw_op, rw_write, rw_slow;
	uint64_t test_cmd, max_length;
	struct entry slots[SLOTS];
} Table;

static void le32(const unsigned char *p, uint32_t *v)
{
	memcpy(v, p, 4);
}

static void le64(const unsigned char *p, uint64_t *v)
{
	memcpy(v, p, 8);
}

static int copy(int write, int pid, void *local, uint64_t va, size_t n)
{
	struct iovec l = { local, n };
	struct iovec r = { (void *)(uintptr_t)va, n };
	ssize_t got = write ? process_vm_writev(pid, &l, 1, &r, 1, 0)
			    : process_vm_readv(pid, &l, 1, &r, 1, 0);

	return got == (ssize_t)n ? 0 : -1;
}

/* 0: an eligible request within `e`, served (errno in *err); 1: not ours */
static int try_serve(Table *t, struct entry *e, const unsigned char *req, int *err)
{
	const unsigned char *cmd = req + t->req_size;
	uint32_t op, size, top, id, flags;
	uint64_t file_id, ioctl_cmd, iova, length, uptr, last, va;
	unsigned char stack[STACK_COPY];
	unsigned char *buf = stack;
	struct stat st;
	int write, fd, rc;

	le32(req, &op);
	le64(req + 8, &file_id);
	le64(req + 16, &ioctl_cmd);
	if (op != t->op_ioctl || file_id != e->file_id || ioctl_cmd != t->test_cmd)
		return 1;
	le32(cmd, &size);
	le32(cmd + 4, &top);
	le32(cmd + 8, &id);
	le64(cmd + 16, &iova);
	le64(cmd + 24, &length);
	le64(cmd + 32, &uptr);
	le32(cmd + 40, &flags);
	if (top != t->rw_op || size < t->cmd_size_min || size > t->cmd_size_max)
		return 1;
	if (id != e->access_fd || (flags & ~(t->rw_write | t->rw_slow)) || length == 0 ||
	    length > t->max_length)
		return 1;
	write = (flags & t->rw_write) != 0;
	if (write ? !e->writable : !e->readable)
		return 1;
	last = iova + length - 1;
	if (iova < e->first || last < iova || last > e->last)
		return 1;
	va = e->va + (iova - e->first);
	if (!(e->direct && !(flags & t->rw_slow)) &&
	    !(e->page && va / PAGE == (va + length - 1) / PAGE))
		return 1; /* the pinned pages' path: Python's */
	/* fget(): the number must still name the access file learned */
	fd = (int)syscall(SYS_pidfd_getfd, e->pidfd, (int)e->access_fd, 0U);
	if (fd < 0)
		return 1;
	rc = fstat(fd, &st);
	close(fd);
	if (rc < 0 || (uint64_t)st.st_dev != e->dev || (uint64_t)st.st_ino != e->ino)
		return 1;
	if (length > STACK_COPY) {
		buf = PyMem_RawMalloc(length);
		if (buf == NULL)
			return 1;
	}
	*err = 0;
	if (write) { /* copy_from_user of the buffer, then the copy into the area */
		if (copy(0, e->pid, buf, uptr, length) || copy(1, e->src_pid, buf, va, length))
			*err = EFAULT;
	} else { /* the copy out of the area, then copy_to_user into the buffer */
		if (copy(0, e->src_pid, buf, va, length) || copy(1, e->pid, buf, uptr, length))
			*err = EFAULT;
	}
	if (buf != stack)
		PyMem_RawFree(buf);
	return 0;
}

PyDoc_STRVAR(serve_doc, "serve(conn_fd) -> bytes | bool\n\n"
			"Receive the connection's next request. True: served and replied; False: "
			"served, the reply could not be sent (drop the connection); bytes: not "
			"served, the request as received (empty: end or error) for the general path.");

static PyObject *serve(Table *t, PyObject *const *args, Py_ssize_t nargs)
{
	unsigned char req[REQ_MAX];
	struct rep rep = { 0 };
	struct entry *e;
	ssize_t got;
	long conn_fd;
	int err = 0;

	if (nargs != 1) {
		PyErr_SetString(PyExc_TypeError, "serve(conn_fd)");
		return NULL;
	}
	conn_fd = PyLong_AsLong(args[0]);
	if (conn_fd == -1 && PyErr_Occurred())
		return NULL;
	do
		got = recv((int)conn_fd, req, (size_t)(t->req_size + t->inline_size), 0);
	while (got < 0 && errno == EINTR);
	if (got < 0)
		return PyBytes_FromStringAndSize(NULL, 0);
	e = &t->slots[conn_fd % SLOTS];
	if (got != t->req_size + t->inline_size || e->gen != t->gen || e->conn_fd != conn_fd ||
	    try_serve(t, e, req, &err))
		return PyBytes_FromStringAndSize((const char *)req, got);
	t->served++;
	rep.err = err;
	do
		got = send((int)conn_fd, &rep, sizeof(rep), MSG_NOSIGNAL);
	while (got < 0 && errno == EINTR);
	return PyBool_FromLong(got == (ssize_t)sizeof(rep));
}

PyDoc_STRVAR(learn_doc, "learn(conn_fd, file_id, access_fd, dev, ino, pid, pidfd, src_pid, "
			"first, last, va, readable, writable, direct, page)\n\n"
			"Let `serve` take the connection's ACCESS_RW requests on access_fd (the file "
			"(dev, ino)) inside the IOVA window [first, last], backed by src_pid's bytes "
			"from va, that Linux 7.2 copies through them (direct, page), until the next "
			"`invalidate`.");

static PyObject *learn(Table *t, PyObject *args)
{
	struct entry n = { 0 };
	unsigned long long file_id, dev, ino, first, last, va;
	unsigned int access_fd;
	int conn_fd, pid, pidfd, src_pid, readable, writable, direct, page;

	if (!PyArg_ParseTuple(args, "iKIKKiiiKKKpppp", &conn_fd, &file_id, &access_fd, &dev,
			      &ino, &pid, &pidfd, &src_pid, &first, &last, &va, &readable,
			      &writable, &direct, &page))
		return NULL;
	if (conn_fd < 0 || pidfd < 0 || first > last)
		Py_RETURN_NONE;
	n.gen = t->gen;
	n.conn_fd = conn_fd;
	n.file_id = file_id;
	n.access_fd = access_fd;
	n.dev = dev;
	n.ino = ino;
	n.pid = pid;
	n.pidfd = pidfd;
	n.src_pid = src_pid;
	n.first = first;
	n.last = last;
	n.va = va;
	n.readable = readable;
	n.writable = writable;
	n.direct = direct;
	n.page = page;
	t->slots[conn_fd % SLOTS] = n;
	Py_RETURN_NONE;
}

PyDoc_STRVAR(invalidate_doc, "invalidate()\n\nForget every entry (a new generation).");

static PyObject *invalidate(Table *t, PyObject *unused)
{
	(void)unused;
	t->gen++;
	Py_RETURN_NONE;
}

static PyObject *served_get(Table *t, void *closure)
{
	(void)closure;
	return PyLong_FromUnsignedLongLong(t->served);
}

static int table_init(Table *t, PyObject *args, PyObject *kwds)
{
	static char *kw[] = { "req_size", "inline_size", "op_ioctl", "test_cmd", "cmd_size_min",
			      "cmd_size_max", "rw_op", "rw_write", "rw_slow", "max_length", NULL };
	unsigned int op_ioctl, size_min, size_max, rw_op, rw_write, rw_slow;
	unsigned long long test_cmd, max_length;
	Py_ssize_t req_size, inline_size;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "nnIKIIIIIK", kw, &req_size, &inline_size,
					 &op_ioctl, &test_cmd, &size_min, &size_max, &rw_op,
					 &rw_write, &rw_slow, &max_length))
		return -1;
	if (req_size < 24 || inline_size < 48 || req_size + inline_size > REQ_MAX) {
		PyErr_SetString(PyExc_ValueError, "request layout outside the table's buffer");
		return -1;
	}
	memset(t->slots, 0, sizeof(t->slots));
	t->gen = 1;
	t->served = 0;
	t->req_size = req_size;
	t->inline_size = inline_size;
	t->op_ioctl = op_ioctl;
	t->test_cmd = test_cmd;
	t->cmd_size_min = size_min;
	t->cmd_size_max = size_max;
	t->rw_op = rw_op;
	t->rw_write = rw_write;
	t->rw_slow = rw_slow;
	t->max_length = max_length;
	return 0;
}

static PyMethodDef table_methods[] = {
	{ "serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL, serve_doc },
	{ "learn", (PyCFunction)learn, METH_VARARGS, learn_doc },
	{ "invalidate", (PyCFunction)invalidate, METH_NOARGS, invalidate_doc },
	{ NULL, NULL, 0, NULL },
};

static PyGetSetDef table_getset[] = {
	{ "served", (getter)served_get, NULL, "requests served here", NULL },
	{ NULL, NULL, NULL, NULL, NULL },
};

static PyTypeObject TableType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "iommufd_model.run._fastrw.Table",
	.tp_basicsize = sizeof(Table),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "ACCESS_RW windows learned per connection (see _fastrw.c).",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)table_init,
	.tp_methods = table_methods,
	.tp_getset = table_getset,
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_fastrw",
	"The run server's compiled ACCESS_RW short path (see _fastrw.c and run/fastrw.py).", -1,
	NULL,
};

PyMODINIT_FUNC PyInit__fastrw(void)
{
	PyObject *m;

	if (PyType_Ready(&TableType) < 0)
		return NULL;
	m = PyModule_Create(&module);
	if (m == NULL)
		return NULL;
	Py_INCREF(&TableType);
	if (PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0) {
		Py_DECREF(&TableType);
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
