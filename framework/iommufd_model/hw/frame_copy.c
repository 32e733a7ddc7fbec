/*
 * iommufd_model.hw.frame_copy: whole 4 KiB frames filled in place with one memcpy each.
 *
 * A frame (hw/memory.py's Frame) is a librt vec[i64] of 512 words. Its items are mutable
 * storage -- compiled walkers store A/D bits into them and Python's `frame[i] = word` stores
 * too -- but the buffer it exports to Python is marked read-only, because librt offers no
 * writable export. This module writes the bytes that 512 item stores would write, through the
 * exported pointer, so a DMA write copies at memcpy's speed (a loop of native word stores,
 * mypyc's best, ran at about half of a plain copy). The model's own code, no kernel source.
 *
 * Only the DMA engine calls it (PhysicalMemory.write_from), under the model lock, on frames it
 * has just looked up: nothing else can resize or free a frame meanwhile (a vec never changes
 * its item buffer in place; a frame is replaced, not resized). Built unless
 * IOMMUFD_MODEL_PURE=1; without it hw/memory.py rebuilds whole frames from the source instead.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define FRAME_BYTES 4096

PyDoc_STRVAR(fill_frames_doc,
"fill_frames(frames, src, pos, /)\n"
"--\n"
"\n"
"Overwrite every frame of the list ``frames`` (4096-byte vec[i64] frames) with the next\n"
"4096 bytes of ``src`` (any contiguous buffer) from byte ``pos``, in order.");

static PyObject *fill_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "fill_frames() takes exactly 3 arguments");
        return NULL;
    }
    PyObject *frames = args[0];
    if (!PyList_Check(frames)) {
        PyErr_SetString(PyExc_TypeError, "fill_frames(): frames must be a list");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[2]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer src;
    if (PyObject_GetBuffer(args[1], &src, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(frames);
    if (pos < 0 || count > (src.len - pos) / FRAME_BYTES || pos > src.len) {
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "fill_frames(): the source is too short");
        return NULL;
    }
    const char *from = (const char *)src.buf + pos;
    for (Py_ssize_t i = 0; i < count; i++) {
        /* A borrowed item: the list is the caller's and nothing here can change it. */
        PyObject *frame = PyList_GET_ITEM(frames, i);
        Py_buffer view;
        if (PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&src);
            return NULL;
        }
        if (view.len != FRAME_BYTES) {
            PyBuffer_Release(&view);
            PyBuffer_Release(&src);
            PyErr_SetString(PyExc_ValueError, "fill_frames(): a frame is not 4096 bytes");
            return NULL;
        }
        memcpy(view.buf, from, FRAME_BYTES);
        PyBuffer_Release(&view);
        from += FRAME_BYTES;
    }
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fill_frames", (PyCFunction)(void (*)(void))fill_frames, METH_FASTCALL, fill_frames_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "iommufd_model.hw.frame_copy",
    .m_doc = "Whole 4 KiB frames filled in place with one memcpy each (hw/frame_copy.c).",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit_frame_copy(void) {
    return PyModule_Create(&module_def);
}
