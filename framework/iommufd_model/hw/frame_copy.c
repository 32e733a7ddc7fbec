/*
 * iommufd_model.hw.frame_copy: a DMA write's bytes copied into the frames in place, and a DMA
 * read's translated runs copied out of the frames straight into the bytes it returns.
 *
 * A frame (hw/memory.py's Frame) is a librt vec[i64] of 512 words. Its items are mutable
 * storage -- compiled walkers store A/D bits into them and Python's `frame[i] = word` stores
 * too -- but the buffer it exports to Python is marked read-only, because librt offers no
 * writable export. write_span writes the bytes that item stores would write, through the
 * exported pointer, so a DMA write copies at memcpy's speed (a loop of native word stores,
 * mypyc's best, ran at about half of a plain copy), and finds the frames itself (a list of
 * them looked up from Python, with map, cost an eighth of a plain copy for 4 KiB pages). The
 * model's own code, no kernel source.
 *
 * A read goes the other way (read_runs): the frames' buffers are read-only, which is all it
 * needs, and each byte is copied once, from its frame into a bytes object made here and
 * handed out only when full (a gather of zero-copy frame views joined by b"".join copies the
 * same bytes, but first builds a list of every frame and has the join take each one's buffer
 * again: a DMA read of 16 MiB of 4 KiB pages spent a tenth of a plain copy on that).
 *
 * Only the DMA engine calls it (PhysicalMemory.write_from, PhysicalMemory.read_runs), under the
 * model lock, on frames it has just looked up: nothing else can resize or free a frame
 * meanwhile (a vec never changes its item buffer in place; a frame is replaced, not resized).
 * Built unless IOMMUFD_MODEL_PURE=1; without it hw/memory.py rebuilds frames from the source
 * and gathers and joins frame views instead.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define FRAME_BYTES 4096

PyDoc_STRVAR(write_span_doc,
"write_span(pages, pa, src, pos, n, materialise, /)\n"
"--\n"
"\n"
"Write bytes ``[pos, pos + n)`` of ``src`` (any contiguous buffer) at physical address\n"
"``pa``, into the frames of the dict ``pages`` (pfn -> 4096-byte vec[i64] frame) in place;\n"
"a pfn it does not hold gets its frame from ``materialise(pfn)`` (a new zeroed frame, which\n"
"that call stores in ``pages``). The caller has checked that the span lies in memory.");

/* The frame of ``pfn``, a new reference: the dict's, or a new one from ``materialise``. */
static PyObject *frame_of(PyObject *pages, PyObject *materialise, long long pfn) {
    PyObject *key = PyLong_FromLongLong(pfn);
    if (key == NULL)
        return NULL;
    PyObject *frame = PyDict_GetItemWithError(pages, key); /* borrowed */
    if (frame != NULL)
        Py_INCREF(frame);
    else if (!PyErr_Occurred())
        frame = PyObject_CallOneArg(materialise, key);
    Py_DECREF(key);
    return frame;
}

static PyObject *write_span(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "write_span() takes exactly 6 arguments");
        return NULL;
    }
    PyObject *pages = args[0], *materialise = args[5];
    if (!PyDict_Check(pages) || !PyCallable_Check(materialise)) {
        PyErr_SetString(PyExc_TypeError,
                        "write_span(): pages must be a dict, materialise a callable");
        return NULL;
    }
    long long pa = PyLong_AsLongLong(args[1]);
    if (pa == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t pos = PyLong_AsSsize_t(args[3]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[4]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer src;
    if (PyObject_GetBuffer(args[2], &src, PyBUF_SIMPLE) < 0)
        return NULL;
    if (pa < 0 || pos < 0 || n < 0 || pos > src.len || n > src.len - pos) {
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "write_span(): outside the source or memory");
        return NULL;
    }
    const char *from = (const char *)src.buf + pos;
    while (n > 0) {
        Py_ssize_t off = (Py_ssize_t)(pa & (FRAME_BYTES - 1));
        Py_ssize_t chunk = FRAME_BYTES - off;
        if (chunk > n)
            chunk = n;
        PyObject *frame = frame_of(pages, materialise, pa >> 12);
        if (frame == NULL) {
            PyBuffer_Release(&src);
            return NULL;
        }
        Py_buffer view;
        if (PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE) < 0) {
            Py_DECREF(frame);
            PyBuffer_Release(&src);
            return NULL;
        }
        if (view.len != FRAME_BYTES) {
            PyBuffer_Release(&view);
            Py_DECREF(frame);
            PyBuffer_Release(&src);
            PyErr_SetString(PyExc_ValueError, "write_span(): a frame is not 4096 bytes");
            return NULL;
        }
        memcpy((char *)view.buf + off, from, (size_t)chunk);
        PyBuffer_Release(&view);
        Py_DECREF(frame);
        from += chunk;
        pa += chunk;
        n -= chunk;
    }
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(read_runs_doc,
"read_runs(pages, runs, /)\n"
"--\n"
"\n"
"The bytes of every ``(pa, length)`` of the list ``runs``, in order, as one bytes object:\n"
"copied from the frames of the dict ``pages`` (pfn -> 4096-byte vec[i64] frame); a pfn it\n"
"does not hold reads as zeros. The caller has checked that every run lies in memory.");

/* Copy ``n`` bytes of physical memory from ``pa`` to ``to`` (frame by frame). */
static int copy_out(PyObject *pages, long long pa, Py_ssize_t n, char *to) {
    while (n > 0) {
        Py_ssize_t off = (Py_ssize_t)(pa & (FRAME_BYTES - 1));
        Py_ssize_t chunk = FRAME_BYTES - off;
        if (chunk > n)
            chunk = n;
        PyObject *key = PyLong_FromLongLong(pa >> 12);
        if (key == NULL)
            return -1;
        /* Borrowed: the dict is the memory's and nothing here can change it. */
        PyObject *frame = PyDict_GetItemWithError(pages, key);
        Py_DECREF(key);
        if (frame == NULL) {
            if (PyErr_Occurred())
                return -1;
            memset(to, 0, (size_t)chunk); /* never written: zeros */
        } else {
            Py_buffer view;
            if (PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE) < 0)
                return -1;
            if (view.len != FRAME_BYTES) {
                PyBuffer_Release(&view);
                PyErr_SetString(PyExc_ValueError, "read_runs(): a frame is not 4096 bytes");
                return -1;
            }
            memcpy(to, (const char *)view.buf + off, (size_t)chunk);
            PyBuffer_Release(&view);
        }
        to += chunk;
        pa += chunk;
        n -= chunk;
    }
    return 0;
}

/* One run of the list: ``(pa, length)`` with both non-negative. */
static int run_of(PyObject *item, long long *pa, Py_ssize_t *n) {
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
        !PyLong_Check(PyTuple_GET_ITEM(item, 0)) || !PyLong_Check(PyTuple_GET_ITEM(item, 1))) {
        PyErr_SetString(PyExc_TypeError, "read_runs(): a run is not a (pa, length) tuple");
        return -1;
    }
    *pa = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 0));
    if (*pa == -1 && PyErr_Occurred())
        return -1;
    *n = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 1));
    if (*n == -1 && PyErr_Occurred())
        return -1;
    if (*pa < 0 || *n < 0) {
        PyErr_SetString(PyExc_ValueError, "read_runs(): a negative address or length");
        return -1;
    }
    return 0;
}

static PyObject *read_runs(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "read_runs() takes exactly 2 arguments");
        return NULL;
    }
    PyObject *pages = args[0], *runs = args[1];
    if (!PyDict_Check(pages) || !PyList_Check(runs)) {
        PyErr_SetString(PyExc_TypeError, "read_runs(): pages must be a dict, runs a list");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(runs), total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        long long pa;
        Py_ssize_t n;
        if (run_of(PyList_GET_ITEM(runs, i), &pa, &n) < 0)
            return NULL;
        if (n > PY_SSIZE_T_MAX - total) {
            PyErr_SetString(PyExc_OverflowError, "read_runs(): too many bytes");
            return NULL;
        }
        total += n;
    }
    /* Filled here, then handed out: no Python code sees it before it is whole. */
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    char *to = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < count; i++) {
        long long pa;
        Py_ssize_t n;
        /* The list cannot change meanwhile: nothing above runs Python code. */
        if (run_of(PyList_GET_ITEM(runs, i), &pa, &n) < 0 || copy_out(pages, pa, n, to) < 0) {
            Py_DECREF(out);
            return NULL;
        }
        to += n;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"write_span", (PyCFunction)(void (*)(void))write_span, METH_FASTCALL, write_span_doc},
    {"read_runs", (PyCFunction)(void (*)(void))read_runs, METH_FASTCALL, read_runs_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "iommufd_model.hw.frame_copy",
    .m_doc = "A DMA write's bytes copied into the frames in place, and a DMA read's runs "
             "copied out of them (hw/frame_copy.c).",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit_frame_copy(void) {
    return PyModule_Create(&module_def);
}
