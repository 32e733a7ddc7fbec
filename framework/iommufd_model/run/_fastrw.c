/*
 * The run server's compiled short path for IOMMU_TEST_OP_ACCESS_RW (the model's own design;
 * run/fastrw.py says how the server uses it; without it the server serves every request in
 * Python, through IommuFd.fast_ioctl or the general path).
 *
 * The kernel's iommufd selftest makes about 240,000 ACCESS_RW requests, nearly all of them a
 * read or a write of a few bytes of one area. The server serves the first of a kind in Python
 * (IommuFd.fast_ioctl) and then tells this table what it found (`learn`): for one connection,
 * one access fd and one iommufd file, the area's IOVA window, its permissions, the process
 * whose addresses back it and its address at the window's first byte, which requests Linux
 * 7.2 copies through those addresses (DirectWindow in core/io_pagetable.py: without
 * SLOW_PATH any range when the mm is the caller's, copy_to_user; a range within one page of
 * a live mm, iopt_pages_rw_page), and, for every other request (iopt_pages_rw_slow: a
 * memfd's pages, a gone mm, another mm across a page boundary, SLOW_PATH), the pinned
 * frames of up to FRAMES_MAX pages of the area and where each frame's bytes live in the
 * program (run/process.py Mirrors.where). `serve` then takes the next request of that
 * connection itself when it is such a request inside the window: it checks that the fd
 * number still names the same access file (pidfd_getfd + fstat: an fd closed and reused
 * names another file, and the request goes back to Python; not asked again while the
 * request carries the caller's fd generation of the last check, preload.c
 * fd_generation(): the same fd table), makes the copies the general
 * path makes and replies. Through an mm's addresses: the user's buffer through the caller,
 * the area's bytes through the backing process (process_vm_readv/writev). Through the
 * pinned pages, under the model lock, as Pages.copy_out/copy_in do with frames that are
 * all pinned already (Pages.use/unuse then only count users): a read refreshes each frame
 * from the program's bytes where they live (Mirrors.pull: process_vm_readv of the process's
 * page or pread of the file, kept only when whole), copies the frames out and writes the
 * user's buffer; a write reads the user's buffer first (EFAULT before anything), copies it
 * into the frames and writes them back where they live (Mirrors.push), counting the frame
 * reads and writes PhysicalMemory counts. A request that needs a frame with no storage yet
 * (the model makes it on the first write) or a page not pinned goes to Python. Anything
 * else is handed back to Python as the request's bytes.
 *
 * Validity: every entry carries the table's generation when learned. The server bumps it
 * (`invalidate`) before every event it handles in Python (a request, a hangup, a new
 * connection), so an entry only lives across requests this table served itself, which
 * change no model state but the bytes of pinned frames (and the memory's counters), under
 * the model lock as any entry point changes them. Built at install time with gcc
 * (setup.py), like _uaccess.c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stddef.h>
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
/* pinned pages learned per entry (run/fastrw.py FRAMES_MAX, checked by learn) */
#define FRAMES_MAX 64

/* where a frame's bytes live in the program (run/process.py MIRROR_*) */
enum { MIRROR_NONE = 0, MIRROR_ANON = 1, MIRROR_FILE = 2 };

/* struct rep of preload.c: kind, err, ret, flags, arg (REP_DONE is 0) */
struct rep {
	uint32_t kind;
	int32_t err;
	int64_t ret;
	uint32_t flags;
	uint32_t arg;
};

/* one pinned page as learned ("<QIiQ" in run/fastrw.py): its frame, and where the frame's
 * bytes live (a process's page: id is the pid, addr its address; a file's: id is the
 * server's fd, addr the page's offset) */
struct frame_rec {
	uint64_t pfn; /* 0: not pinned */
	uint32_t kind;
	int32_t id;
	uint64_t addr;
};

struct entry {
	uint64_t gen; /* 0: empty */
	int conn_fd;
	uint64_t file_id; /* the iommufd's model file (the request's a[0]) */
	uint32_t access_fd;
	uint64_t dev, ino; /* the access file's identity */
	uint64_t fd_gen; /* the caller's fd generation when that was last checked (0: none) */
	int pid, pidfd; /* the caller */
	int src_pid; /* the process whose addresses back the area */
	uint64_t first, last; /* the area's IOVA window */
	uint64_t va; /* src_pid's address of the byte at `first` */
	int readable, writable;
	int direct; /* without SLOW_PATH, any range: copy_to_user in the caller's own mm */
	int page; /* a range within one page: iopt_pages_rw_page() */
	uint64_t start_byte; /* the pages' offset of the byte at `first` */
	uint64_t frame_first; /* the pages' index of frames[0] */
	Py_ssize_t nframes;
	struct frame_rec frames[FRAMES_MAX];
};

typedef struct {
	PyObject_HEAD
	uint64_t gen;
	unsigned long long served, served_frames, checks;
	/* the wire and uAPI numbers, from the server (run/fastrw.py) */
	Py_ssize_t req_size, inline_size;
	uint32_t op_ioctl, cmd_size_min, cmd_size_max, rw_op, rw_write, rw_slow;
	uint64_t test_cmd, max_length;
	/* the pinned pages' path (all NULL: off): the memory's frames (pfn -> frame, a dict),
	 * the memory (its read and write counters) and the model lock's acquire and release */
	PyObject *frames, *memory, *acquire, *release;
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

/* Mirrors.pull of one page's bytes [off, off+n) into out: 0 when they are to be kept (a
 * process's bytes read whole; a file's read, zeros past its end), -1 otherwise. */
static int mirror_pull(const struct frame_rec *r, unsigned char *out, uint64_t off, size_t n)
{
	ssize_t got;

	if (r->kind == MIRROR_ANON)
		return copy(0, r->id, out, r->addr + off, n);
	if (r->kind != MIRROR_FILE)
		return -1;
	do
		got = pread(r->id, out, n, (off_t)(r->addr + off));
	while (got < 0 && errno == EINTR);
	if (got < 0)
		return -1;
	memset(out + got, 0, n - (size_t)got);
	return 0;
}

/* Mirrors.push of one page's bytes [off, off+n) from src (failures ignored, as there). */
static void mirror_push(const struct frame_rec *r, const unsigned char *src, uint64_t off,
			size_t n)
{
	ssize_t got;

	if (r->kind == MIRROR_ANON) {
		(void)copy(1, r->id, (void *)src, r->addr + off, n);
	} else if (r->kind == MIRROR_FILE) {
		do
			got = pwrite(r->id, src, n, (off_t)(r->addr + off));
		while (got < 0 && errno == EINTR);
	}
}

/* memory.<name> += n, as PhysicalMemory.read/write count (-1 with an exception set) */
static int count(PyObject *memory, const char *name, long n)
{
	PyObject *old, *by, *sum;
	int rc;

	if (!n)
		return 0;
	old = PyObject_GetAttrString(memory, name);
	if (old == NULL)
		return -1;
	by = PyLong_FromLong(n);
	sum = by ? PyNumber_Add(old, by) : NULL;
	Py_DECREF(old);
	Py_XDECREF(by);
	if (sum == NULL)
		return -1;
	rc = PyObject_SetAttrString(memory, name, sum);
	Py_DECREF(sum);
	return rc;
}

static int call_lock(PyObject *method)
{
	PyObject *got = PyObject_CallNoArgs(method);

	Py_XDECREF(got);
	return got ? 0 : -1;
}

/* iopt_pages_rw_slow() through frames all pinned already (see the top): 0 served (errno in
 * *err), 1 not ours, -1 an exception (the lock or a counter failed). buf holds length bytes. */
static int serve_frames(Table *t, struct entry *e, int write, uint64_t iova, uint64_t length,
			uint64_t uptr, unsigned char *buf, int *err)
{
	uint64_t sb = e->start_byte + (iova - e->first);
	uint64_t fi = sb / PAGE, li = (sb + length - 1) / PAGE, off = sb % PAGE, o;
	PyObject *frames[FRAMES_MAX] = { 0 };
	Py_buffer views[FRAMES_MAX];
	unsigned char page[PAGE];
	const struct frame_rec *recs;
	long reads = 0, writes = 0;
	Py_ssize_t n, k, got = 0;
	size_t pos, chunk;
	int rc = 1;

	if (t->frames == NULL || fi < e->frame_first || li - e->frame_first >= (uint64_t)e->nframes)
		return 1;
	recs = e->frames + (fi - e->frame_first);
	n = (Py_ssize_t)(li - fi + 1);
	for (k = 0; k < n; k++)
		if (!recs[k].pfn)
			return 1; /* Pages.use would pin it: Python's */
	/* copy_from_user of the buffer comes first (access_rw_fast) */
	if (write && copy(0, e->pid, buf, uptr, length)) {
		*err = EFAULT;
		return 0;
	}
	if (call_lock(t->acquire))
		return -1;
	for (got = 0; got < n; got++) { /* the frames, each held for the copy */
		PyObject *key = PyLong_FromUnsignedLongLong(recs[got].pfn);
		PyObject *frame = key ? PyDict_GetItemWithError(t->frames, key) : NULL;

		Py_XDECREF(key);
		if (frame == NULL && PyErr_Occurred()) {
			rc = -1;
			goto out;
		}
		if (frame == NULL) {
			/* a frame never written: reads as zeros; the first write makes it (Python) */
			if (write || recs[got].kind != MIRROR_NONE)
				goto out;
			continue;
		}
		if (PyObject_GetBuffer(frame, &views[got], PyBUF_SIMPLE) < 0) {
			rc = -1;
			goto out;
		}
		Py_INCREF(frame);
		frames[got] = frame;
		if (views[got].len != (Py_ssize_t)PAGE)
			goto out;
	}
	if (write) { /* Pages.copy_in: into the frames, then back where they live */
		for (pos = 0, o = off, k = 0; k < n; k++, o = 0, pos += chunk) {
			chunk = length - pos < PAGE - o ? length - pos : PAGE - o;
			memcpy((unsigned char *)views[k].buf + o, buf + pos, chunk);
			writes++;
		}
		for (pos = 0, o = off, k = 0; k < n; k++, o = 0, pos += chunk) {
			chunk = length - pos < PAGE - o ? length - pos : PAGE - o;
			reads++;
			mirror_push(&recs[k], (unsigned char *)views[k].buf + o, o, chunk);
		}
	} else { /* Pages.copy_out: the frames refreshed from where they live, then copied */
		for (pos = 0, o = off, k = 0; k < n; k++, o = 0, pos += chunk) {
			chunk = length - pos < PAGE - o ? length - pos : PAGE - o;
			if (recs[k].kind != MIRROR_NONE && !mirror_pull(&recs[k], page, o, chunk)) {
				memcpy((unsigned char *)views[k].buf + o, page, chunk);
				writes++;
			}
		}
		for (pos = 0, o = off, k = 0; k < n; k++, o = 0, pos += chunk) {
			chunk = length - pos < PAGE - o ? length - pos : PAGE - o;
			reads++;
			if (frames[k])
				memcpy(buf + pos, (unsigned char *)views[k].buf + o, chunk);
			else
				memset(buf + pos, 0, chunk);
		}
	}
	rc = count(t->memory, "reads", reads) || count(t->memory, "writes", writes) ? -1 : 0;
out:
	for (k = 0; k < n; k++) {
		if (frames[k]) {
			PyBuffer_Release(&views[k]);
			Py_DECREF(frames[k]);
		}
	}
	if (rc == -1) { /* keep the first exception across the release */
		PyObject *type, *value, *tb;

		PyErr_Fetch(&type, &value, &tb);
		call_lock(t->release);
		PyErr_Restore(type, value, tb);
		return -1;
	}
	if (call_lock(t->release))
		return -1;
	if (rc == 0 && !write && copy(1, e->pid, buf, uptr, length)) /* copy_to_user */
		*err = EFAULT;
	return rc;
}

/* 0: an eligible request within `e`, served (errno in *err); 1: not ours; -1: an exception */
static int try_serve(Table *t, struct entry *e, const unsigned char *req, int *err)
{
	const unsigned char *cmd = req + t->req_size;
	uint32_t op, size, top, id, flags;
	uint64_t file_id, ioctl_cmd, fd_gen, iova, length, uptr, last, va;
	unsigned char stack[STACK_COPY];
	unsigned char *buf = stack;
	struct stat st;
	int write, fd, rc, through_mm;

	le32(req, &op);
	le64(req + 8, &file_id);
	le64(req + 16, &ioctl_cmd);
	le64(req + 32, &fd_gen);
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
	/* iopt_pages_rw_access(): copy_to_user in the caller's own mm, one page of a live mm,
	 * else the pinned pages */
	through_mm = (e->direct && !(flags & t->rw_slow)) ||
		     (e->page && va / PAGE == (va + length - 1) / PAGE);
	if (!through_mm && (e->nframes == 0 || length > FRAMES_MAX * PAGE))
		return 1;
	/* fget(): the number must still name the access file learned. Unless the caller's fd
	 * table is the one it was checked in (the same nonzero generation: preload.c), ask
	 * the kernel. */
	if (!fd_gen || fd_gen != e->fd_gen) {
		t->checks++;
		fd = (int)syscall(SYS_pidfd_getfd, e->pidfd, (int)e->access_fd, 0U);
		if (fd < 0)
			return 1;
		rc = fstat(fd, &st);
		close(fd);
		if (rc < 0 || (uint64_t)st.st_dev != e->dev || (uint64_t)st.st_ino != e->ino)
			return 1;
		e->fd_gen = fd_gen;
	}
	if (length > STACK_COPY) {
		buf = PyMem_RawMalloc(length);
		if (buf == NULL)
			return 1;
	}
	*err = 0;
	rc = 0;
	if (!through_mm) {
		rc = serve_frames(t, e, write, iova, length, uptr, buf, err);
		t->served_frames += rc == 0;
	} else if (write) { /* copy_from_user of the buffer, then the copy into the area */
		if (copy(0, e->pid, buf, uptr, length) || copy(1, e->src_pid, buf, va, length))
			*err = EFAULT;
	} else { /* the copy out of the area, then copy_to_user into the buffer */
		if (copy(0, e->src_pid, buf, va, length) || copy(1, e->pid, buf, uptr, length))
			*err = EFAULT;
	}
	if (buf != stack)
		PyMem_RawFree(buf);
	return rc;
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
	int err = 0, rc = 1;

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
	if (got == t->req_size + t->inline_size && e->gen == t->gen && e->conn_fd == conn_fd)
		rc = try_serve(t, e, req, &err);
	if (rc < 0) {
		/* an error of the model lock or the memory's counters, before anything was sent:
		 * reported, and the request goes to Python (which answers it, EIO at worst);
		 * KeyboardInterrupt and the like stop the server as anywhere else */
		if (!PyErr_ExceptionMatches(PyExc_Exception))
			return NULL;
		PyErr_WriteUnraisable((PyObject *)t);
		rc = 1;
	}
	if (rc)
		return PyBytes_FromStringAndSize((const char *)req, got);
	t->served++;
	rep.err = err;
	do
		got = send((int)conn_fd, &rep, sizeof(rep), MSG_NOSIGNAL);
	while (got < 0 && errno == EINTR);
	return PyBool_FromLong(got == (ssize_t)sizeof(rep));
}

PyDoc_STRVAR(learn_doc, "learn(conn_fd, file_id, access_fd, dev, ino, fd_gen, pid, pidfd, src_pid, "
			"first, last, va, readable, writable, direct, page, start_byte, "
			"frame_first, frames)\n\n"
			"Let `serve` take the connection's ACCESS_RW requests on access_fd (the file "
			"(dev, ino) while the caller's fd generation is fd_gen) inside the IOVA window [first, last] (bytes start_byte on of its "
			"pages), until the next `invalidate`: those Linux 7.2 copies through src_pid's "
			"bytes from va (direct, page), and those it copies through the pinned pages "
			"when `frames` (one \"<QIiQ\" record per page from index frame_first: pfn, "
			"where its bytes live) has each of their pages pinned.");

static PyObject *learn(Table *t, PyObject *args)
{
	struct entry *n;
	unsigned long long file_id, dev, ino, fd_gen, first, last, va, start_byte, frame_first;
	unsigned int access_fd;
	int conn_fd, pid, pidfd, src_pid, readable, writable, direct, page;
	Py_buffer frames;

	if (!PyArg_ParseTuple(args, "iKIKKKiiiKKKppppKKy*", &conn_fd, &file_id, &access_fd, &dev,
			      &ino, &fd_gen, &pid, &pidfd, &src_pid, &first, &last, &va, &readable,
			      &writable, &direct, &page, &start_byte, &frame_first, &frames))
		return NULL;
	if (frames.len % (Py_ssize_t)sizeof(struct frame_rec) ||
	    frames.len / (Py_ssize_t)sizeof(struct frame_rec) > FRAMES_MAX) {
		PyBuffer_Release(&frames);
		PyErr_SetString(PyExc_ValueError, "learn(): frames are FRAMES_MAX records at most");
		return NULL;
	}
	if (conn_fd < 0 || pidfd < 0 || first > last) {
		PyBuffer_Release(&frames);
		Py_RETURN_NONE;
	}
	n = &t->slots[conn_fd % SLOTS];
	memset(n, 0, offsetof(struct entry, frames));
	n->gen = t->gen;
	n->conn_fd = conn_fd;
	n->file_id = file_id;
	n->access_fd = access_fd;
	n->dev = dev;
	n->ino = ino;
	n->fd_gen = fd_gen;
	n->pid = pid;
	n->pidfd = pidfd;
	n->src_pid = src_pid;
	n->first = first;
	n->last = last;
	n->va = va;
	n->readable = readable;
	n->writable = writable;
	n->direct = direct;
	n->page = page;
	n->start_byte = start_byte;
	n->frame_first = frame_first;
	n->nframes = t->frames ? frames.len / (Py_ssize_t)sizeof(struct frame_rec) : 0;
	memcpy(n->frames, frames.buf, (size_t)n->nframes * sizeof(struct frame_rec));
	PyBuffer_Release(&frames);
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

static PyObject *served_frames_get(Table *t, void *closure)
{
	(void)closure;
	return PyLong_FromUnsignedLongLong(t->served_frames);
}

static PyObject *checks_get(Table *t, void *closure)
{
	(void)closure;
	return PyLong_FromUnsignedLongLong(t->checks);
}

static int table_init(Table *t, PyObject *args, PyObject *kwds)
{
	static char *kw[] = { "req_size", "inline_size", "op_ioctl", "test_cmd", "cmd_size_min",
			      "cmd_size_max", "rw_op", "rw_write", "rw_slow", "max_length",
			      "frames", "memory", "acquire", "release", NULL };
	unsigned int op_ioctl, size_min, size_max, rw_op, rw_write, rw_slow;
	unsigned long long test_cmd, max_length;
	Py_ssize_t req_size, inline_size;
	PyObject *frames = Py_None, *memory = Py_None, *acquire = Py_None, *release = Py_None;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "nnIKIIIIIK|OOOO", kw, &req_size,
					 &inline_size, &op_ioctl, &test_cmd, &size_min, &size_max,
					 &rw_op, &rw_write, &rw_slow, &max_length, &frames, &memory,
					 &acquire, &release))
		return -1;
	if (req_size < 24 || inline_size < 48 || req_size + inline_size > REQ_MAX) {
		PyErr_SetString(PyExc_ValueError, "request layout outside the table's buffer");
		return -1;
	}
	if (frames != Py_None && (!PyDict_Check(frames) || memory == Py_None ||
				  !PyCallable_Check(acquire) || !PyCallable_Check(release))) {
		PyErr_SetString(PyExc_TypeError, "frames must be a dict, with the memory and the "
						 "model lock's acquire and release");
		return -1;
	}
	memset(t->slots, 0, sizeof(t->slots));
	t->gen = 1;
	t->served = 0;
	t->served_frames = 0;
	t->checks = 0;
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
	Py_CLEAR(t->frames);
	Py_CLEAR(t->memory);
	Py_CLEAR(t->acquire);
	Py_CLEAR(t->release);
	if (frames != Py_None) {
		Py_INCREF(frames);
		Py_INCREF(memory);
		Py_INCREF(acquire);
		Py_INCREF(release);
		t->frames = frames;
		t->memory = memory;
		t->acquire = acquire;
		t->release = release;
	}
	return 0;
}

static void table_dealloc(Table *t)
{
	Py_CLEAR(t->frames);
	Py_CLEAR(t->memory);
	Py_CLEAR(t->acquire);
	Py_CLEAR(t->release);
	Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyMethodDef table_methods[] = {
	{ "serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL, serve_doc },
	{ "learn", (PyCFunction)learn, METH_VARARGS, learn_doc },
	{ "invalidate", (PyCFunction)invalidate, METH_NOARGS, invalidate_doc },
	{ NULL, NULL, 0, NULL },
};

static PyGetSetDef table_getset[] = {
	{ "served", (getter)served_get, NULL, "requests served here", NULL },
	{ "served_frames", (getter)served_frames_get, NULL,
	  "of which through the pinned pages (iopt_pages_rw_slow)", NULL },
	{ "checks", (getter)checks_get, NULL,
	  "access fd identities asked of the kernel (pidfd_getfd, fstat, close)", NULL },
	{ NULL, NULL, NULL, NULL, NULL },
};

static PyTypeObject TableType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "iommufd_model.run._fastrw.Table",
	.tp_basicsize = sizeof(Table),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "ACCESS_RW windows learned per connection (see _fastrw.c).",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)table_init,
	.tp_dealloc = (destructor)table_dealloc,
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
