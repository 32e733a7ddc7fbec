/*
 * The mock page table's dirty loops in C (the model's own code; mock/iommupt.py holds the
 * table, the rules and the pure-Python loops these mirror step for step, which run when this
 * extension is not built: tests/core/test_mock_iommupt.py compares both with a literal
 * per-leaf table on random tables).
 *
 * The table is the dict ``entries`` (2 KiB page number -> pa | R/W | D | size log2 << 3) and
 * the set ``dirty`` of the keys whose D bit is set. The kernel's selftest marks and reads
 * tens of thousands of 4 KiB leaves per GET_DIRTY_BITMAP; one Python iteration per leaf was
 * the largest cost of those calls. Built at install time with gcc (setup.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#define GRANULE_SHIFT 11
#define ITEMS_LG2 9
#define TOP_LEVEL 2
#define VASZ_LG2 38
#define ENTRY_DIRTY 4
#define SIZE_SHIFT 3
#define SIZE_MASK (0x3F << SIZE_SHIFT)

/* LEAF_ITEMS of iommupt.py: log2 of a leaf's item size and of its item count */
static int leaf_items(int64_t lg2, int *isz, int *contig)
{
	int64_t level;

	if (lg2 < GRANULE_SHIFT)
		return -1; /* never written by map(): a broken table */
	level = (lg2 - GRANULE_SHIFT) / ITEMS_LG2;
	if (level > TOP_LEVEL)
		level = TOP_LEVEL;
	*isz = GRANULE_SHIFT + ITEMS_LG2 * (int)level;
	*contig = (int)(lg2 - *isz);
	return 0;
}

/* entries[key]; -1 with KeyError when it is missing */
static int get_entry(PyObject *entries, int64_t key, int64_t *out)
{
	PyObject *k = PyLong_FromLongLong(key);
	PyObject *v;

	if (!k)
		return -1;
	v = PyDict_GetItemWithError(entries, k);
	if (!v) {
		if (!PyErr_Occurred())
			PyErr_SetObject(PyExc_KeyError, k);
		Py_DECREF(k);
		return -1;
	}
	Py_DECREF(k);
	*out = PyLong_AsLongLong(v);
	return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* entries[key] (present, value ``value``) |= D or &= ~D, and ``key`` into or out of dirty */
static int mark_obj(PyObject *entries, PyObject *dirty, PyObject *key, int64_t value, int set)
{
	PyObject *v = PyLong_FromLongLong(set ? value | ENTRY_DIRTY : value & ~(int64_t)ENTRY_DIRTY);
	int rc;

	if (!v)
		return -1;
	rc = PyDict_SetItem(entries, key, v);
	Py_DECREF(v);
	if (rc == 0)
		rc = set ? PySet_Add(dirty, key) : (PySet_Discard(dirty, key) < 0 ? -1 : 0);
	return rc;
}

static int mark(PyObject *entries, PyObject *dirty, int64_t key, int64_t value, int set)
{
	PyObject *k = PyLong_FromLongLong(key);
	int rc;

	if (!k)
		return -1;
	rc = mark_obj(entries, dirty, k, value, set);
	Py_DECREF(k);
	return rc;
}

/* entries[key] for a key object; -1 with KeyError when it is missing */
static int get_entry_obj(PyObject *entries, PyObject *key, int64_t *out)
{
	PyObject *v = PyDict_GetItemWithError(entries, key);

	if (!v) {
		if (!PyErr_Occurred())
			PyErr_SetObject(PyExc_KeyError, key);
		return -1;
	}
	*out = PyLong_AsLongLong(v);
	return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* the size object of the last run, reused while runs have that size (most runs of a walk do) */
struct size_cache {
	int64_t size;
	PyObject *obj;
};

static int append_run(PyObject *runs, int64_t va, int64_t size, struct size_cache *sizes)
{
	PyObject *run = PyTuple_New(2);
	PyObject *a;
	int rc;

	if (!run)
		return -1;
	if (!sizes->obj || sizes->size != size) {
		Py_XDECREF(sizes->obj);
		sizes->size = size;
		sizes->obj = PyLong_FromLongLong(size);
		if (!sizes->obj) {
			Py_DECREF(run);
			return -1;
		}
	}
	a = PyLong_FromLongLong(va);
	if (!a) {
		Py_DECREF(run);
		return -1;
	}
	Py_INCREF(sizes->obj);
	PyTuple_SET_ITEM(run, 0, a);
	PyTuple_SET_ITEM(run, 1, sizes->obj);
	rc = PyList_Append(runs, run);
	Py_DECREF(run);
	return rc;
}

/*
 * visit(entries, dirty, keys, iova, end, clear) -> [(iova, bytes), ...]: MockPageTable's
 * _visit_dirty() over the sorted dirty ``keys``. ``iova`` < ``end`` <= 2**38 (the caller
 * clips); ValueError, before any change, for a range or a key outside the table.
 */
static PyObject *visit(PyObject *self, PyObject *args)
{
	PyObject *entries, *dirty, *keys, *runs;
	struct size_cache sizes = { 0, NULL };
	long long iova_arg, end_arg;
	int clear;
	int64_t iova, end, done_to;
	Py_ssize_t i, j, n;

	if (!PyArg_ParseTuple(args, "O!O!O!LLp", &PyDict_Type, &entries, &PySet_Type, &dirty,
			      &PyList_Type, &keys, &iova_arg, &end_arg, &clear))
		return NULL;
	iova = iova_arg;
	end = end_arg;
	if (iova < 0 || end <= iova || end > (1LL << VASZ_LG2)) {
		PyErr_SetString(PyExc_ValueError, "range outside the table");
		return NULL;
	}
	n = PyList_GET_SIZE(keys);
	/* check every key first: nothing changes when the Python loop has to take over */
	for (i = 0; i < n; i++) {
		int64_t key = PyLong_AsLongLong(PyList_GET_ITEM(keys, i));

		if (key == -1 && PyErr_Occurred())
			return NULL;
		if (key < 0 || key >= (1LL << (VASZ_LG2 - GRANULE_SHIFT))) {
			PyErr_SetString(PyExc_ValueError, "key outside the table");
			return NULL;
		}
	}
	runs = PyList_New(0);
	if (!runs)
		return NULL;
	done_to = iova;
	for (i = 0; i < n; i++) {
		PyObject *key_obj = PyList_GET_ITEM(keys, i);
		int64_t key = PyLong_AsLongLong(key_obj);
		int64_t entry, start, va, item, index, stop, range_end, k;
		int isz, contig, lg2;

		if (get_entry_obj(entries, key_obj, &entry) < 0)
			goto fail;
		if (leaf_items((entry & SIZE_MASK) >> SIZE_SHIFT, &isz, &contig) < 0) {
			PyErr_SetString(PyExc_SystemError, "a leaf below the granule");
			goto fail;
		}
		if (!contig) {
			start = key << GRANULE_SHIFT;
			va = start > iova ? start : iova;
			if (va < done_to)
				continue;
			done_to = start + (1LL << isz);
			if (append_run(runs, va, 1LL << isz, &sizes) < 0)
				goto fail;
			if (clear && mark_obj(entries, dirty, key_obj, entry, 0) < 0)
				goto fail;
			continue;
		}
		lg2 = isz + contig;
		start = ((key << GRANULE_SHIFT) >> lg2) << lg2;
		va = start > iova ? start : iova;
		if (va < done_to)
			continue;
		done_to = start + (1LL << lg2);
		item = va >> isz;
		index = item & ((1 << ITEMS_LG2) - 1);
		stop = index | ((1LL << contig) - 1);
		range_end = ((end - 1) >> isz) + 1 - (item - index);
		if (range_end < stop)
			stop = range_end;
		if (stop > index && append_run(runs, va, (stop - index) << isz, &sizes) < 0)
			goto fail;
		if (!clear)
			continue;
		/* the leaf's dirty items: this key and the next ones of ``keys`` inside it */
		for (j = i; j < n; j++) {
			PyObject *ko = PyList_GET_ITEM(keys, j);

			k = PyLong_AsLongLong(ko);
			if (k >= done_to >> GRANULE_SHIFT)
				break;
			if (j > i && get_entry_obj(entries, ko, &entry) < 0)
				goto fail;
			if (mark_obj(entries, dirty, ko, entry, 0) < 0)
				goto fail;
		}
	}
	Py_XDECREF(sizes.obj);
	return runs;
fail:
	Py_XDECREF(sizes.obj);
	Py_DECREF(runs);
	return NULL;
}

/*
 * set_dirty_bits(entries, dirty, iova, page_size, bitmap, nbits) -> set bits counted: the
 * selftest's DIRTY op, MockPageTable.set_dirty() at ``iova + i * page_size`` for every set
 * bit ``i`` < ``nbits`` of ``bitmap`` (bit 0 = bit 0 of byte 0), in order.
 */
static PyObject *set_dirty_bits(PyObject *self, PyObject *args)
{
	PyObject *entries, *dirty, *iova_obj, *page_obj;
	Py_buffer bitmap;
	Py_ssize_t nbits, byte;
	unsigned long long iova, page_size;
	long long count = 0;

	if (!PyArg_ParseTuple(args, "O!O!O!O!y*n", &PyDict_Type, &entries, &PySet_Type, &dirty,
			      &PyLong_Type, &iova_obj, &PyLong_Type, &page_obj, &bitmap, &nbits))
		return NULL;
	iova = PyLong_AsUnsignedLongLong(iova_obj);
	page_size = iova == (unsigned long long)-1 && PyErr_Occurred()
			    ? 0
			    : PyLong_AsUnsignedLongLong(page_obj);
	if (PyErr_Occurred())
		goto fail;
	if (nbits < 0 || (nbits + 7) / 8 > bitmap.len) {
		PyErr_SetString(PyExc_ValueError, "bitmap shorter than nbits");
		goto fail;
	}
	for (byte = 0; byte < (nbits + 7) / 8; byte++) {
		unsigned int bits = ((const unsigned char *)bitmap.buf)[byte];

		while (bits) {
			int low = __builtin_ctz(bits);
			Py_ssize_t bit = byte * 8 + low;
			unsigned __int128 va;
			int64_t entry, key, lg2;
			int isz, contig, rc;
			PyObject *ko, *v;

			bits &= bits - 1;
			if (bit >= nbits)
				break;
			count++;
			va = (unsigned __int128)iova + (unsigned __int128)bit * page_size;
			if (va >= ((unsigned __int128)1 << VASZ_LG2))
				continue; /* beyond the table: nothing mapped there */
			ko = PyLong_FromLongLong((int64_t)(va >> GRANULE_SHIFT));
			if (!ko)
				goto fail;
			v = PyDict_GetItemWithError(entries, ko);
			if (!v) {
				Py_DECREF(ko);
				if (PyErr_Occurred())
					goto fail;
				continue; /* set_dirty() is False: ENOENT, counted all the same */
			}
			entry = PyLong_AsLongLong(v);
			if (entry == -1 && PyErr_Occurred()) {
				Py_DECREF(ko);
				goto fail;
			}
			lg2 = (entry & SIZE_MASK) >> SIZE_SHIFT;
			if (leaf_items(lg2, &isz, &contig) < 0) {
				Py_DECREF(ko);
				PyErr_SetString(PyExc_SystemError, "a leaf below the granule");
				goto fail;
			}
			key = (int64_t)((va >> isz) << (isz - GRANULE_SHIFT));
			if (key == (int64_t)(va >> GRANULE_SHIFT)) {
				rc = mark_obj(entries, dirty, ko, entry, 1); /* the item's first 2 KiB */
			} else {
				rc = get_entry(entries, key, &entry);
				if (rc == 0)
					rc = mark(entries, dirty, key, entry, 1);
			}
			Py_DECREF(ko);
			if (rc < 0)
				goto fail;
		}
	}
	PyBuffer_Release(&bitmap);
	return PyLong_FromLongLong(count);
fail:
	PyBuffer_Release(&bitmap);
	return NULL;
}

static PyMethodDef methods[] = {
	{ "visit", visit, METH_VARARGS, "MockPageTable._visit_dirty() in C." },
	{ "set_dirty_bits", set_dirty_bits, METH_VARARGS,
	  "MockPageTable.set_dirty_bits() in C." },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "iommufd_model.mock._dirty", NULL, -1, methods,
};

PyMODINIT_FUNC PyInit__dirty(void)
{
	return PyModule_Create(&module);
}
