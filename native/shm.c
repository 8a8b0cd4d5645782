/* pccl._shm: the cross-process signalling of a same-host shared-memory ring link.
 *
 * A link's segment starts with a 64-byte control block shared by exactly two processes, the
 * writer (the sending peer) and the reader (its ring successor on the same host):
 *
 *   [0, 4)   seq      u32, bumped by the reader after every publish (the futex word)
 *   [4, 8)   waiting  u32, non-zero while the writer sleeps on seq
 *   [8, 16)  consumed u64, ring bytes the reader has finished with (monotonic)
 *
 * Payload bytes are ordered by the TCP frame header that announces them (the writer copies,
 * then sends the header; a system call on each side orders the memory accesses); the control
 * words use C11 atomics. Waiting is a futex on seq with a timeout, so a writer never sleeps
 * past its deadline and never spins. Every function releases the GIL around its work and
 * allocates nothing. Linux only: elsewhere AVAILABLE is False and pccl keeps TCP.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#ifdef __linux__
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#define HAVE_FUTEX 1
#else
#define HAVE_FUTEX 0
#endif

#define CTRL_BYTES 64

typedef struct {
    uint32_t seq;
    uint32_t waiting;
    uint64_t consumed;
} ctrl_t;

static int get_ctrl(PyObject *obj, Py_buffer *view, ctrl_t **ctrl) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0) return -1;
    if (view->len < CTRL_BYTES || ((uintptr_t)view->buf % 8) != 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "control block: 64 writable bytes, 8-byte aligned");
        return -1;
    }
    *ctrl = (ctrl_t *)view->buf;
    return 0;
}

PyDoc_STRVAR(publish_doc,
             "publish(ctrl, consumed)\n--\n\n"
             "Reader: store ``consumed`` and wake the writer if it sleeps.");

static PyObject *py_publish(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "publish(ctrl, consumed)");
        return NULL;
    }
    unsigned long long value = PyLong_AsUnsignedLongLong(args[1]);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    Py_buffer view;
    ctrl_t *c;
    if (get_ctrl(args[0], &view, &c) < 0) return NULL;
    __atomic_store_n(&c->consumed, (uint64_t)value, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&c->seq, 1, __ATOMIC_SEQ_CST);
#if HAVE_FUTEX
    if (__atomic_load_n(&c->waiting, __ATOMIC_SEQ_CST)) {
        Py_BEGIN_ALLOW_THREADS
        syscall(SYS_futex, &c->seq, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
        Py_END_ALLOW_THREADS
    }
#endif
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(wait_doc,
             "wait(ctrl, need, timeout_ms) -> bool\n--\n\n"
             "Writer: True once the reader's consumed count is >= need; False after\n"
             "timeout_ms milliseconds without that (the caller checks its own deadline).");

static PyObject *py_wait(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "wait(ctrl, need, timeout_ms)");
        return NULL;
    }
    unsigned long long need = PyLong_AsUnsignedLongLong(args[1]);
    if (need == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    long timeout_ms = PyLong_AsLong(args[2]);
    if (timeout_ms == -1 && PyErr_Occurred()) return NULL;
    if (timeout_ms < 0) timeout_ms = 0;
    Py_buffer view;
    ctrl_t *c;
    if (get_ctrl(args[0], &view, &c) < 0) return NULL;
    int ok = 0;
    Py_BEGIN_ALLOW_THREADS
#if HAVE_FUTEX
    struct timespec now, end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_sec += timeout_ms / 1000;
    end.tv_nsec += (timeout_ms % 1000) * 1000000L;
    if (end.tv_nsec >= 1000000000L) {
        end.tv_sec += 1;
        end.tv_nsec -= 1000000000L;
    }
    for (;;) {
        uint32_t seq = __atomic_load_n(&c->seq, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&c->consumed, __ATOMIC_SEQ_CST) >= need) {
            ok = 1;
            break;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        long long left_ns = (long long)(end.tv_sec - now.tv_sec) * 1000000000LL +
                            (end.tv_nsec - now.tv_nsec);
        if (left_ns <= 0) break;
        struct timespec rel = {(time_t)(left_ns / 1000000000LL), (long)(left_ns % 1000000000LL)};
        __atomic_store_n(&c->waiting, 1, __ATOMIC_SEQ_CST);
        /* Re-check after announcing the wait: a publish between the two loads bumped seq,
         * so FUTEX_WAIT returns at once (EAGAIN) instead of missing the wake. */
        if (__atomic_load_n(&c->consumed, __ATOMIC_SEQ_CST) < need)
            syscall(SYS_futex, &c->seq, FUTEX_WAIT, seq, &rel, NULL, 0);
        __atomic_store_n(&c->waiting, 0, __ATOMIC_SEQ_CST);
    }
#else
    ok = __atomic_load_n(&c->consumed, __ATOMIC_SEQ_CST) >= need;
#endif
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

PyDoc_STRVAR(copy_doc,
             "copy(dst, src)\n--\n\n"
             "memcpy between two buffers of equal length, GIL released.");

static PyObject *py_copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "copy(dst, src)");
        return NULL;
    }
    Py_buffer dst, src;
    if (PyObject_GetBuffer(args[0], &dst, PyBUF_WRITABLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[1], &src, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    if (dst.len != src.len) {
        PyBuffer_Release(&dst);
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "copy: dst and src differ in length");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    memcpy(dst.buf, src.buf, (size_t)src.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

#define FASTCALL(NAME) {#NAME, (PyCFunction)(void (*)(void))py_##NAME, METH_FASTCALL, NAME##_doc}

static PyMethodDef methods[] = {
    FASTCALL(publish),
    FASTCALL(wait),
    FASTCALL(copy),
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *mod) {
    if (PyModule_AddIntConstant(mod, "CTRL_BYTES", CTRL_BYTES) < 0) return -1;
    return PyModule_AddObjectRef(mod, "AVAILABLE", HAVE_FUTEX ? Py_True : Py_False);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, (void *)module_exec},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pccl._shm",
    .m_doc = "Futex signalling for same-host shared-memory ring links (pccl.peer.shm_link).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__shm(void) { return PyModuleDef_Init(&moduledef); }
