/*
 * The run server's access to the program's memory and files: process_vm_readv/writev on the
 * program's pid (copy_from_user/copy_to_user, a short transfer being an unmapped byte, so
 * EFAULT), pidfd_getfd (fget of a file the program names by fd number), and fd_ident (which
 * file a program's fd number names now), and the server's wait for its next event (Waiter:
 * epoll_wait, spun for first where the program runs on another CPU).
 *
 * A CPython extension rather than ctypes because the server makes several of these calls per
 * request (the struct, the user buffer, the pinned frames' bytes): through ctypes each cost
 * about 10 us of Python object building, here well under 1 us. Built at install time with
 * gcc, like the preload library (setup.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "spin_page.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

/* the kernel's UIO_MAXIOV: iovecs per process_vm_* call */
#define IOV_MAX_ 1024
/* bytes per process_vm_* call (below the kernel's MAX_RW_COUNT) */
#define CHUNK (1UL << 30)

/* the range [va, va+n), n > 0, lies inside the 64-bit address space */
static int range_ok(unsigned long long va, unsigned long long n)
{
	return va <= UINT64_MAX - (n - 1);
}

/* Copy n bytes between local and the program's va; 0 when every byte moved. */
static int transfer(int write, pid_t pid, char *local, unsigned long long va,
		    unsigned long long n)
{
	unsigned long long pos = 0;

	while (pos < n) {
		size_t chunk = n - pos < CHUNK ? (size_t)(n - pos) : CHUNK;
		struct iovec l = { local + pos, chunk };
		struct iovec r = { (void *)(uintptr_t)(va + pos), chunk };
		ssize_t got;

		Py_BEGIN_ALLOW_THREADS
		got = write ? process_vm_writev(pid, &l, 1, &r, 1, 0)
			    : process_vm_readv(pid, &l, 1, &r, 1, 0);
		Py_END_ALLOW_THREADS
		if (got != (ssize_t)chunk)
			return -1;
		pos += chunk;
	}
	return 0;
}

PyDoc_STRVAR(vm_read_doc, "vm_read(pid, va, n) -> bytes | None\n\n"
			  "n bytes at va in pid, or None if any of them cannot be read.");

static PyObject *vm_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	long pid;
	unsigned long long va, n;
	PyObject *out;

	(void)self;
	if (nargs != 3) {
		PyErr_SetString(PyExc_TypeError, "vm_read(pid, va, n)");
		return NULL;
	}
	pid = PyLong_AsLong(args[0]);
	if (pid == -1 && PyErr_Occurred())
		return NULL;
	/* negative or oversized addresses are simply unreadable */
	va = PyLong_AsUnsignedLongLong(args[1]);
	if (PyErr_Occurred()) {
		PyErr_Clear();
		Py_RETURN_NONE;
	}
	n = PyLong_AsUnsignedLongLong(args[2]);
	if (PyErr_Occurred() || n > PY_SSIZE_T_MAX) {
		PyErr_Clear();
		Py_RETURN_NONE;
	}
	if (n == 0)
		return PyBytes_FromStringAndSize(NULL, 0);
	if (!range_ok(va, n))
		Py_RETURN_NONE;
	out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
	if (!out)
		return NULL;
	if (transfer(0, (pid_t)pid, PyBytes_AS_STRING(out), va, n)) {
		Py_DECREF(out);
		Py_RETURN_NONE;
	}
	return out;
}

PyDoc_STRVAR(vm_write_doc, "vm_write(pid, va, data) -> bool\n\n"
			   "Write data (any bytes-like object) at va in pid; False if any byte "
			   "could not be written.");

static PyObject *vm_write(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	long pid;
	unsigned long long va;
	Py_buffer buf;
	int bad;

	(void)self;
	if (nargs != 3) {
		PyErr_SetString(PyExc_TypeError, "vm_write(pid, va, data)");
		return NULL;
	}
	pid = PyLong_AsLong(args[0]);
	if (pid == -1 && PyErr_Occurred())
		return NULL;
	if (PyObject_GetBuffer(args[2], &buf, PyBUF_SIMPLE))
		return NULL;
	va = PyLong_AsUnsignedLongLong(args[1]);
	if (PyErr_Occurred()) {
		PyErr_Clear();
		PyBuffer_Release(&buf);
		if (buf.len == 0)
			Py_RETURN_TRUE;
		Py_RETURN_FALSE;
	}
	if (buf.len == 0)
		bad = 0;
	else if (!range_ok(va, (unsigned long long)buf.len))
		bad = 1;
	else
		bad = transfer(1, (pid_t)pid, buf.buf, va, (unsigned long long)buf.len);
	PyBuffer_Release(&buf);
	return PyBool_FromLong(!bad);
}

PyDoc_STRVAR(vm_readable_pages_doc,
	     "vm_readable_pages(pid, vas) -> bool\n\n"
	     "True if one byte at every address of the list vas can be read in pid (each page "
	     "faulted in, as pin_user_pages would).");

static PyObject *vm_readable_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	static struct iovec remote[IOV_MAX_];
	static char one[IOV_MAX_];
	Py_ssize_t total, i, k;
	long pid;
	PyObject *seq;

	(void)self;
	if (nargs != 2 || !PyList_Check(args[1])) {
		PyErr_SetString(PyExc_TypeError, "vm_readable_pages(pid, list of addresses)");
		return NULL;
	}
	pid = PyLong_AsLong(args[0]);
	if (pid == -1 && PyErr_Occurred())
		return NULL;
	seq = args[1];
	total = PyList_GET_SIZE(seq);
	for (i = 0; i < total; i += IOV_MAX_) {
		Py_ssize_t n = total - i < IOV_MAX_ ? total - i : IOV_MAX_;
		struct iovec local = { one, (size_t)n };
		ssize_t got;

		for (k = 0; k < n; k++) {
			unsigned long long va = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(seq, i + k));

			if (PyErr_Occurred()) {
				PyErr_Clear();
				Py_RETURN_FALSE;
			}
			remote[k].iov_base = (void *)(uintptr_t)va;
			remote[k].iov_len = 1;
		}
		got = process_vm_readv((pid_t)pid, &local, 1, remote, (unsigned long)n, 0);
		if (got != n)
			Py_RETURN_FALSE;
	}
	Py_RETURN_TRUE;
}

PyDoc_STRVAR(pidfd_getfd_doc, "pidfd_getfd(pid, fd) -> int\n\n"
			      "A new fd of this process for fd of pid (OSError: EBADF if it is "
			      "not open, the errno of pidfd_open/pidfd_getfd otherwise).");

static PyObject *pidfd_getfd(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	long pid, target;
	int pfd, fd, e;

	(void)self;
	if (nargs != 2) {
		PyErr_SetString(PyExc_TypeError, "pidfd_getfd(pid, fd)");
		return NULL;
	}
	pid = PyLong_AsLong(args[0]);
	if (pid == -1 && PyErr_Occurred())
		return NULL;
	target = PyLong_AsLong(args[1]);
	if ((target == -1 && PyErr_Occurred()) || target < 0 || target > INT32_MAX) {
		PyErr_Clear();
		errno = EBADF;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	pfd = (int)syscall(SYS_pidfd_open, (int)pid, 0U);
	if (pfd < 0)
		return PyErr_SetFromErrno(PyExc_OSError);
	fd = (int)syscall(SYS_pidfd_getfd, pfd, (int)target, 0U);
	e = errno;
	close(pfd);
	if (fd < 0) {
		errno = e;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	return PyLong_FromLong(fd);
}

PyDoc_STRVAR(fd_ident_doc, "fd_ident(pidfd, fd) -> (st_dev, st_ino, st_mode) | None\n\n"
			   "Which file fd of the process behind pidfd names now (None if it is "
			   "not open or the process is gone): one pidfd_getfd, fstat, close.");

static PyObject *fd_ident(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	long pidfd, target;
	struct stat st;
	int fd, rc;

	(void)self;
	if (nargs != 2) {
		PyErr_SetString(PyExc_TypeError, "fd_ident(pidfd, fd)");
		return NULL;
	}
	pidfd = PyLong_AsLong(args[0]);
	if (pidfd == -1 && PyErr_Occurred())
		return NULL;
	target = PyLong_AsLong(args[1]);
	if (target == -1 && PyErr_Occurred())
		return NULL;
	if (pidfd < 0 || pidfd > INT32_MAX || target < 0 || target > INT32_MAX)
		Py_RETURN_NONE;
	fd = (int)syscall(SYS_pidfd_getfd, (int)pidfd, (int)target, 0U);
	if (fd < 0)
		Py_RETURN_NONE;
	rc = fstat(fd, &st);
	close(fd);
	if (rc < 0)
		Py_RETURN_NONE;
	return Py_BuildValue("(KKI)", (unsigned long long)st.st_dev,
			     (unsigned long long)st.st_ino, (unsigned int)st.st_mode);
}

/* -- the server's wait ---------------------------------------------------------------------
 *
 * The model's own design, the server's half of preload.c's recv_reply (spin_page.h says why):
 * the wait for the next event spins (epoll_wait with no timeout, yielding the CPU at every
 * turn) before it sleeps, when the program's last request came from another CPU than this
 * one; the budget adapts as the program's does. */
/* select.epoll.poll's limit on the events of one wait (FD_SETSIZE - 1) */
#define WAIT_EVENTS 1023

typedef struct {
	PyObject_HEAD
	int epfd;
	struct spin_page *page;
	int64_t max, budget; /* ns */
	unsigned long long spins, caught;
} Waiter;

static int64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int Waiter_init(Waiter *self, PyObject *args, PyObject *kwds)
{
	static char *kw[] = { "epfd", "page_fd", "spin_ns", NULL };
	int epfd, page_fd = -1;
	long long spin_ns = 0;
	void *p;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|iL", kw, &epfd, &page_fd, &spin_ns))
		return -1;
	self->epfd = epfd;
	self->max = spin_ns > 0 ? spin_ns : 0;
	self->budget = self->max;
	if (page_fd >= 0 && self->max > 0 && !self->page) {
		p = mmap(NULL, sizeof(struct spin_page), PROT_READ | PROT_WRITE, MAP_SHARED, page_fd,
			 0);
		if (p == MAP_FAILED) {
			PyErr_SetFromErrno(PyExc_OSError);
			return -1;
		}
		self->page = p;
	}
	return 0;
}

static void Waiter_dealloc(Waiter *self)
{
	if (self->page)
		munmap(self->page, sizeof(struct spin_page));
	Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(Waiter_wait_doc, "wait(timeout) -> [(fd, events), ...]\n\n"
			      "select.epoll.poll(timeout) on the server's epoll set (timeout in "
			      "seconds, negative: none), spun for first as _uaccess.c says.");

static PyObject *Waiter_wait(Waiter *self, PyObject *arg)
{
	struct epoll_event ev[WAIT_EVENTS];
	double timeout = PyFloat_AsDouble(arg);
	int64_t start = 0, deadline = 0, until;
	int n, cpu, ms, spun = 0, err = 0;
	uint32_t other;
	PyObject *out;

	if (timeout == -1.0 && PyErr_Occurred())
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	n = epoll_wait(self->epfd, ev, WAIT_EVENTS, 0);
	if (n == 0 && self->page) {
		cpu = sched_getcpu();
		if (cpu >= 0) {
			__atomic_store_n(&self->page->server_cpu, (uint32_t)cpu, __ATOMIC_RELAXED);
			other = __atomic_load_n(&self->page->client_cpu, __ATOMIC_RELAXED);
			if (other != SPIN_CPU_UNKNOWN && (uint32_t)cpu != other)
				start = now_ns();
		}
	}
	if (start && self->budget > 0) {
		spun = 1;
		until = start + self->budget;
		do {
			sched_yield();
			n = epoll_wait(self->epfd, ev, WAIT_EVENTS, 0);
		} while (n == 0 && now_ns() < until);
	}
	if (spun && n != 0)
		self->caught++;
	self->spins += spun;
	if (timeout >= 0)
		deadline = now_ns() + (int64_t)ceil(timeout * 1e9);
	while (n == 0 || (n < 0 && errno == EINTR)) {
		if (n < 0) {
			Py_BLOCK_THREADS
			err = PyErr_CheckSignals();
			Py_UNBLOCK_THREADS
			if (err)
				break;
		}
		ms = -1;
		if (timeout >= 0) {
			int64_t left = deadline - now_ns();

			ms = left <= 0 ? 0 : (int)((left + 999999) / 1000000);
		}
		n = epoll_wait(self->epfd, ev, WAIT_EVENTS, ms);
		if (n == 0 && ms >= 0 && now_ns() >= deadline)
			break;
	}
	if (start && !(spun && n > 0))
		self->budget = spin_adapt(spun ? self->budget : 0, self->max, now_ns() - start);
	Py_END_ALLOW_THREADS
	if (err)
		return NULL;
	if (n < 0)
		return PyErr_SetFromErrno(PyExc_OSError);
	out = PyList_New(n);
	if (!out)
		return NULL;
	for (int i = 0; i < n; i++) {
		PyObject *item = Py_BuildValue("(iI)", ev[i].data.fd, ev[i].events);

		if (!item) {
			Py_DECREF(out);
			return NULL;
		}
		PyList_SET_ITEM(out, i, item);
	}
	return out;
}

static PyObject *Waiter_stats(Waiter *self, PyObject *unused)
{
	(void)unused;
	return Py_BuildValue("(KKL)", self->spins, self->caught, (long long)self->budget);
}

static PyMethodDef Waiter_methods[] = {
	{ "wait", (PyCFunction)Waiter_wait, METH_O, Waiter_wait_doc },
	{ "stats", (PyCFunction)Waiter_stats, METH_NOARGS,
	  "stats() -> (spins, spins that caught an event, the budget now in ns)" },
	{ NULL, NULL, 0, NULL },
};

static PyTypeObject WaiterType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "iommufd_model.run._uaccess.Waiter",
	.tp_basicsize = sizeof(Waiter),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Waiter(epfd, page_fd=-1, spin_ns=0): the run server's wait for its next event.",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Waiter_init,
	.tp_dealloc = (destructor)Waiter_dealloc,
	.tp_methods = Waiter_methods,
};

static PyMethodDef methods[] = {
	{ "vm_read", (PyCFunction)(void (*)(void))vm_read, METH_FASTCALL, vm_read_doc },
	{ "vm_write", (PyCFunction)(void (*)(void))vm_write, METH_FASTCALL, vm_write_doc },
	{ "vm_readable_pages", (PyCFunction)(void (*)(void))vm_readable_pages, METH_FASTCALL,
	  vm_readable_pages_doc },
	{ "pidfd_getfd", (PyCFunction)(void (*)(void))pidfd_getfd, METH_FASTCALL,
	  pidfd_getfd_doc },
	{ "fd_ident", (PyCFunction)(void (*)(void))fd_ident, METH_FASTCALL, fd_ident_doc },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_uaccess",
	"process_vm_readv/writev, pidfd_getfd, fd_ident and the wait for the run server (see _uaccess.c).",
	-1,
	methods,
};

PyMODINIT_FUNC PyInit__uaccess(void)
{
	PyObject *m;

	if (PyType_Ready(&WaiterType) < 0)
		return NULL;
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	Py_INCREF(&WaiterType);
	if (PyModule_AddObject(m, "Waiter", (PyObject *)&WaiterType) < 0) {
		Py_DECREF(&WaiterType);
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
