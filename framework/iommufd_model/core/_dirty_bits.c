/*
 * The dirty runs of IOMMU_HWPT_GET_DIRTY_BITMAP as the bitmap bits they set (the model's own
 * code; core/dirty_bits.py has the same in Python, which runs when this extension is not
 * built, and says what the bits are; tests/core/test_dirty_bits.py compares the two).
 *
 * A driver reports tens of thousands of runs for a large dirty range of small pages; one
 * Python step per run was most of the ioctl's cost. Built at install time with gcc
 * (setup.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

typedef unsigned __int128 u128;

/* an int of at most 64 bits: 0, or -1 (no exception) when it is negative or wider */
static int as_u64(PyObject *o, uint64_t *out)
{
	unsigned long long v;

	if (!PyLong_Check(o))
		return -1;
	v = PyLong_AsUnsignedLongLong(o);
	if (v == (unsigned long long)-1 && PyErr_Occurred()) {
		PyErr_Clear();
		return -1;
	}
	*out = v;
	return 0;
}

/* the span of run ``item`` (an (iova, size) tuple): 0, or -1 when it is not one we take */
static int span_of(PyObject *item, uint64_t start, uint64_t last, unsigned shift, uint64_t *first_bit,
		   uint64_t *last_bit)
{
	uint64_t iova, size;
	u128 end;

	if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2)
		return -1;
	if (as_u64(PyTuple_GET_ITEM(item, 0), &iova) || as_u64(PyTuple_GET_ITEM(item, 1), &size))
		return -1;
	if (!size)
		return -1;
	end = (u128)iova + size - 1;
	if (iova > last || end < start)
		return -1;
	*first_bit = ((iova > start ? iova : start) - start) >> shift;
	*last_bit = ((end < last ? (uint64_t)end : last) - start) >> shift;
	return 0;
}

/*
 * span_bits(runs, start, last, shift, max_bytes) -> (first byte, bytes) | None: bit
 * ``(max(iova, start) - start) >> shift`` to bit ``(min(iova + size - 1, last) - start) >>
 * shift`` of every run set, in bytes from the first run's first byte to the last run's last;
 * None when the runs are not in IOVA order (each span starting and ending no earlier than
 * the one before), a run is empty, outside ``[start, last]`` or wider than 64 bits, or the
 * bytes would be more than ``max_bytes``.
 */
static PyObject *span_bits(PyObject *self, PyObject *args)
{
	PyObject *runs, *out, *ret;
	unsigned long long start, last;
	unsigned int shift;
	Py_ssize_t max_bytes, i, n;
	uint64_t prev_first = 0, prev_last = 0, lo = 0, hi = 0, base;
	unsigned char *bits;
	size_t nbytes;

	if (!PyArg_ParseTuple(args, "O!KKIn", &PyList_Type, &runs, &start, &last, &shift,
			      &max_bytes))
		return NULL;
	n = PyList_GET_SIZE(runs);
	if (!n || shift > 63 || last < start)
		Py_RETURN_NONE;
	for (i = 0; i < n; i++) {
		uint64_t f, l;

		if (span_of(PyList_GET_ITEM(runs, i), start, last, shift, &f, &l))
			Py_RETURN_NONE;
		if (i && (f < prev_first || l < prev_last))
			Py_RETURN_NONE;
		if (!i)
			lo = f;
		prev_first = f;
		prev_last = l;
	}
	hi = prev_last;
	base = lo >> 3;
	nbytes = (size_t)((hi >> 3) - base + 1);
	if (nbytes > (size_t)max_bytes)
		Py_RETURN_NONE;
	out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)nbytes);
	if (!out)
		return NULL;
	bits = (unsigned char *)PyBytes_AS_STRING(out);
	memset(bits, 0, nbytes);
	for (i = 0; i < n; i++) {
		uint64_t f, l, b, e;

		span_of(PyList_GET_ITEM(runs, i), start, last, shift, &f, &l);
		f -= base << 3;
		l -= base << 3;
		b = f >> 3;
		e = l >> 3;
		if (b == e) {
			bits[b] |= (unsigned char)(((1u << ((l & 7) + 1)) - 1) & ~((1u << (f & 7)) - 1));
			continue;
		}
		bits[b] |= (unsigned char)(0xFFu << (f & 7));
		if (e > b + 1)
			memset(bits + b + 1, 0xFF, (size_t)(e - b - 1));
		bits[e] |= (unsigned char)((1u << ((l & 7) + 1)) - 1);
	}
	ret = Py_BuildValue("(KN)", (unsigned long long)base, out);
	return ret;
}

static PyMethodDef methods[] = {
	{ "span_bits", span_bits, METH_VARARGS, "dirty_bits.span_bits() in C." },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "iommufd_model.core._dirty_bits", NULL, -1, methods,
};

PyMODINIT_FUNC PyInit__dirty_bits(void)
{
	return PyModule_Create(&module);
}
