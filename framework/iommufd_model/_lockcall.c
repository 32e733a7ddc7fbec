/*
 * iommufd_model._lockcall: the model lock and its method wrapper, in C (locking.py).
 *
 * Every entry point into the model holds one re-entrant lock (docs/concurrency.md). With
 * threading.RLock and a wrapper generated in Python, a single thread paid for it on every call
 * a second interpreted frame plus two lock methods that parse their arguments as a tuple and
 * keywords -- together 4.5-7.1% of a 4 KiB DMA read. Here:
 *
 * - RLock: a re-entrant lock with threading.RLock's interface (acquire(blocking, timeout),
 *   release, the context manager, and the _is_owned/_release_save/_acquire_restore trio that
 *   threading.Condition uses to wait with the lock fully released). Its owner and count
 *   change only in the thread that holds the underlying lock; a thread reads the owner to
 *   see whether it is itself, which it can only find after having stored it (atomic loads
 *   and stores of the owner: safe without a GIL too). It counts its acquisitions, re-entries
 *   included, for benchmarks/bench_lock.py.
 * - LockedCall(fn, lock): fn called between the lock's acquire and release, in C, with the
 *   arguments it received (vectorcall: no tuple, no dict); it binds like a function (a method
 *   descriptor: `obj.method(...)` calls it with `obj` first without building a bound method)
 *   and has a __dict__, so functools.update_wrapper gives it fn's name, doc and __wrapped__.
 *
 * The model's own code (no kernel source). Built unless IOMMUFD_MODEL_PURE=1; without it
 * locking.py uses threading.RLock and its generated Python wrapper, which behave the same.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pythread.h>
#include <semaphore.h>
#include <stddef.h>
#include <time.h>

/* -- RLock ------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    sem_t sem;           /* the mutex: 1 free, 0 held */
    int sem_ready;       /* sem_init succeeded (sem_destroy at dealloc) */
    unsigned long owner; /* thread ident of the holder (0: none); atomic */
    unsigned long count; /* re-entries of the holder; only the holder touches it */
    unsigned long long acquisitions;
    PyObject *weakrefs;
} RLockObject;

static PyTypeObject RLockType;

static unsigned long owner_of(RLockObject *self) {
    return __atomic_load_n(&self->owner, __ATOMIC_RELAXED);
}

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Take the underlying lock: `timeout` < 0 waits forever, 0 only tries. 1 taken, 0 not, -1
 * error (a signal handler raised while waiting). The GIL is released while waiting.
 *
 * A POSIX semaphore of the object's own rather than a PyThread lock: an uncontended take is
 * one sem_trywait (an atomic compare-and-swap), where PyThread_acquire_lock_timed of Python
 * 3.11 also reads the monotonic clock on every call to compute a deadline, even for a try. */
static int take(RLockObject *self, double timeout) {
    if (sem_trywait(&self->sem) == 0)
        return 1;
    if (timeout == 0)
        return 0;
    double deadline = timeout > 0 ? monotonic() + timeout : 0;
    for (;;) {
        int r, err;
        if (timeout > 0) {
            double left = deadline - monotonic();
            if (left <= 0)
                return 0;
            struct timespec until;
            clock_gettime(CLOCK_MONOTONIC, &until);
            double secs = (double)until.tv_sec + (double)until.tv_nsec * 1e-9 + left;
            until.tv_sec = (time_t)secs;
            until.tv_nsec = (long)((secs - (double)until.tv_sec) * 1e9);
            if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
            }
            Py_BEGIN_ALLOW_THREADS
            r = sem_clockwait(&self->sem, CLOCK_MONOTONIC, &until);
            err = errno;
            Py_END_ALLOW_THREADS
        } else {
            Py_BEGIN_ALLOW_THREADS
            r = sem_wait(&self->sem);
            err = errno;
            Py_END_ALLOW_THREADS
        }
        if (r == 0)
            return 1;
        if (err == ETIMEDOUT)
            return 0;
        if (err != EINTR) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (Py_MakePendingCalls() < 0) /* interrupted: run the signal handlers */
            return -1;
    }
}

/* 1 acquired, 0 not (timeout), -1 error. */
static int rlock_take(RLockObject *self, double timeout) {
    unsigned long me = PyThread_get_thread_ident();
    if (owner_of(self) == me) {
        self->count++;
        self->acquisitions++;
        return 1;
    }
    int r = take(self, timeout);
    if (r == 1) { /* the holder's fields from here on */
        __atomic_store_n(&self->owner, me, __ATOMIC_RELAXED);
        self->count = 1;
        self->acquisitions++;
    }
    return r;
}

static int rlock_give(RLockObject *self) {
    if (owner_of(self) != PyThread_get_thread_ident() || self->count == 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return -1;
    }
    if (--self->count == 0) {
        __atomic_store_n(&self->owner, 0, __ATOMIC_RELAXED);
        sem_post(&self->sem);
    }
    return 0;
}

static PyObject *rlock_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    if (PyTuple_GET_SIZE(args) || (kwargs != NULL && PyDict_GET_SIZE(kwargs))) {
        PyErr_SetString(PyExc_TypeError, "RLock() takes no arguments");
        return NULL;
    }
    RLockObject *self = (RLockObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (sem_init(&self->sem, 0, 1) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    self->sem_ready = 1;
    return (PyObject *)self;
}

static void rlock_dealloc(RLockObject *self) {
    if (self->weakrefs != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->sem_ready)
        sem_destroy(&self->sem);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* acquire(blocking=True, timeout=-1) */
static PyObject *rlock_acquire(RLockObject *self, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames) {
    PyObject *blocking_obj = NULL, *timeout_obj = NULL;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "acquire() takes at most 2 arguments");
        return NULL;
    }
    if (nargs > 0)
        blocking_obj = args[0];
    if (nargs > 1)
        timeout_obj = args[1];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        PyObject **slot;
        if (PyUnicode_CompareWithASCIIString(name, "blocking") == 0)
            slot = &blocking_obj;
        else if (PyUnicode_CompareWithASCIIString(name, "timeout") == 0)
            slot = &timeout_obj;
        else {
            PyErr_Format(PyExc_TypeError, "acquire() got an unexpected keyword argument '%U'",
                         name);
            return NULL;
        }
        if (*slot != NULL) {
            PyErr_Format(PyExc_TypeError, "acquire() got multiple values for argument '%U'",
                         name);
            return NULL;
        }
        *slot = args[nargs + i];
    }
    int blocking = 1;
    if (blocking_obj != NULL && (blocking = PyObject_IsTrue(blocking_obj)) < 0)
        return NULL;
    double timeout = -1;
    if (timeout_obj != NULL) {
        timeout = PyFloat_AsDouble(timeout_obj);
        if (timeout == -1 && PyErr_Occurred())
            return NULL;
    }
    if (!blocking && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
        return NULL;
    }
    if (timeout < 0 && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "timeout value must be a non-negative number");
        return NULL;
    }
    int r = rlock_take(self, blocking ? timeout : 0);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static PyObject *rlock_release(RLockObject *self, PyObject *unused) {
    (void)unused;
    if (rlock_give(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *rlock_enter(RLockObject *self, PyObject *unused) {
    (void)unused;
    int r = rlock_take(self, -1);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static PyObject *rlock_exit(RLockObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)args;
    (void)nargs;
    if (rlock_give(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *rlock_is_owned(RLockObject *self, PyObject *unused) {
    (void)unused;
    return PyBool_FromLong(self->count > 0 && owner_of(self) == PyThread_get_thread_ident());
}

/* Condition.wait: release completely, whatever the depth; returns (count, owner). */
static PyObject *rlock_release_save(RLockObject *self, PyObject *unused) {
    (void)unused;
    if (self->count == 0 || owner_of(self) != PyThread_get_thread_ident()) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return NULL;
    }
    unsigned long count = self->count, owner = owner_of(self);
    self->count = 0;
    __atomic_store_n(&self->owner, 0, __ATOMIC_RELAXED);
    sem_post(&self->sem);
    return Py_BuildValue("(kk)", count, owner);
}

/* ... and take it back at the depth saved. */
static PyObject *rlock_acquire_restore(RLockObject *self, PyObject *state) {
    unsigned long count, owner;
    if (!PyArg_ParseTuple(state, "kk:_acquire_restore", &count, &owner))
        return NULL;
    int r = take(self, -1);
    if (r < 0)
        return NULL;
    __atomic_store_n(&self->owner, owner, __ATOMIC_RELAXED);
    self->count = count;
    Py_RETURN_NONE;
}

static PyObject *rlock_get_acquisitions(RLockObject *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->acquisitions);
}

static PyObject *rlock_repr(RLockObject *self) {
    unsigned long owner = owner_of(self);
    return PyUnicode_FromFormat("<%s %s object owner=%lu count=%lu>",
                                owner ? "locked" : "unlocked", Py_TYPE(self)->tp_name, owner,
                                self->count);
}

static PyMethodDef rlock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))rlock_acquire, METH_FASTCALL | METH_KEYWORDS,
     PyDoc_STR("acquire(blocking=True, timeout=-1): as threading.RLock.acquire")},
    {"release", (PyCFunction)rlock_release, METH_NOARGS,
     PyDoc_STR("release(): as threading.RLock.release")},
    {"__enter__", (PyCFunction)rlock_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))rlock_exit, METH_FASTCALL, NULL},
    {"_is_owned", (PyCFunction)rlock_is_owned, METH_NOARGS, NULL},
    {"_release_save", (PyCFunction)rlock_release_save, METH_NOARGS, NULL},
    {"_acquire_restore", (PyCFunction)rlock_acquire_restore, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef rlock_getset[] = {
    {"acquisitions", (getter)rlock_get_acquisitions, NULL,
     PyDoc_STR("acquisitions so far, re-entries included (for benchmarks)"), NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RLockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "iommufd_model._lockcall.RLock",
    .tp_doc = PyDoc_STR("A re-entrant lock with threading.RLock's interface, in C."),
    .tp_basicsize = sizeof(RLockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = rlock_new,
    .tp_dealloc = (destructor)rlock_dealloc,
    .tp_weaklistoffset = offsetof(RLockObject, weakrefs),
    .tp_methods = rlock_methods,
    .tp_getset = rlock_getset,
    .tp_repr = (reprfunc)rlock_repr,
};

/* -- LockedCall -------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *fn;
    RLockObject *lock;
    PyObject *dict;
    vectorcallfunc vectorcall;
} LockedCall;

static PyObject *locked_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
                                   PyObject *kwnames) {
    LockedCall *lc = (LockedCall *)self;
    if (rlock_take(lc->lock, -1) < 0)
        return NULL;
    PyObject *result = PyObject_Vectorcall(lc->fn, args, nargsf, kwnames);
    if (result != NULL) /* no exception to keep aside: the common case */
        return rlock_give(lc->lock) < 0 ? (Py_DECREF(result), NULL) : result;
    /* The holder releases what it took: only a bug in the model could make this fail. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (rlock_give(lc->lock) < 0) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        Py_XDECREF(result);
        return NULL;
    }
    PyErr_Restore(type, value, tb);
    return result;
}

static PyObject *locked_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *fn, *lock;
    static char *names[] = {"fn", "lock", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!:LockedCall", names, &fn, &RLockType,
                                     &lock))
        return NULL;
    if (!PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "LockedCall(): fn must be callable");
        return NULL;
    }
    LockedCall *lc = (LockedCall *)type->tp_alloc(type, 0);
    if (lc == NULL)
        return NULL;
    Py_INCREF(fn);
    Py_INCREF(lock);
    lc->fn = fn;
    lc->lock = (RLockObject *)lock;
    lc->dict = NULL;
    lc->vectorcall = locked_vectorcall;
    return (PyObject *)lc;
}

static int locked_traverse(LockedCall *lc, visitproc visit, void *arg) {
    Py_VISIT(lc->fn);
    Py_VISIT(lc->lock);
    Py_VISIT(lc->dict);
    return 0;
}

static int locked_clear(LockedCall *lc) {
    Py_CLEAR(lc->fn);
    Py_CLEAR(lc->lock);
    Py_CLEAR(lc->dict);
    return 0;
}

static void locked_dealloc(LockedCall *lc) {
    PyObject_GC_UnTrack(lc);
    locked_clear(lc);
    Py_TYPE(lc)->tp_free((PyObject *)lc);
}

/* Bound to an instance like a function (the interpreter skips building the method object for
 * `obj.method(...)`, thanks to Py_TPFLAGS_METHOD_DESCRIPTOR). */
static PyObject *locked_get(PyObject *self, PyObject *obj, PyObject *type) {
    (void)type;
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(self);
        return self;
    }
    return PyMethod_New(self, obj);
}

static PyObject *locked_repr(LockedCall *lc) {
    return PyUnicode_FromFormat("<model-locked %R>", lc->fn);
}

static PyGetSetDef locked_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LockedCallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "iommufd_model._lockcall.LockedCall",
    .tp_doc = PyDoc_STR("LockedCall(fn, lock): fn called holding lock (an RLock of this "
                        "module), binding as a method (locking.locked)."),
    .tp_basicsize = sizeof(LockedCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
                | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = locked_new,
    .tp_dealloc = (destructor)locked_dealloc,
    .tp_traverse = (traverseproc)locked_traverse,
    .tp_clear = (inquiry)locked_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(LockedCall, vectorcall),
    .tp_descr_get = locked_get,
    .tp_dictoffset = offsetof(LockedCall, dict),
    .tp_getset = locked_getset,
    .tp_repr = (reprfunc)locked_repr,
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "iommufd_model._lockcall",
    .m_doc = "The model lock (RLock) and its method wrapper (LockedCall), in C (locking.py).",
    .m_size = 0,
};

PyMODINIT_FUNC PyInit__lockcall(void) {
    if (PyType_Ready(&RLockType) < 0 || PyType_Ready(&LockedCallType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "RLock", (PyObject *)&RLockType) < 0
        || PyModule_AddObjectRef(module, "LockedCall", (PyObject *)&LockedCallType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
