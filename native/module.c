/* pccl._native: CPython binding of the kernels in kernels.c.
 *
 * Argument parsing, buffer-protocol checks and GIL release live here; kernels.c knows
 * nothing of Python. Every entry point validates what memory safety needs on its own
 * (element sizes and kinds, lengths, writability, overlap, codes) because it may be called
 * directly, bypassing pccl/kernels.py; bad input raises TypeError or ValueError, never
 * crashes. Kernels run with the GIL released, on buffers held for the whole call.
 *
 * The environment variable PCCL_SIMD (generic, avx2 or avx512) caps the instruction-set
 * level chosen at import; the tests use it to check every level against the reference.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* Element kinds a buffer may have, as a set of letters: 'f' float, 'i' signed int,
 * 'u' unsigned int. */
static char format_kind(const char *fmt) {
    if (fmt == NULL) return 'u'; /* PyBUF_FORMAT not honoured: plain bytes */
    if (*fmt == '@' || *fmt == '=') fmt++;
#if PY_LITTLE_ENDIAN
    else if (*fmt == '<') fmt++;
#else
    else if (*fmt == '>' || *fmt == '!') fmt++;
#endif
    if (fmt[0] == '\0' || fmt[1] != '\0') return '?';
    if (strchr("efd", fmt[0])) return 'f';
    if (strchr("bhilqn", fmt[0])) return 'i';
    if (strchr("BHILQNc", fmt[0])) return 'u';
    return '?';
}

/* Acquire a C-contiguous buffer of itemsize-byte elements whose kind is one of `kinds`.
 * Sets *n to the element count. On failure raises and holds nothing. */
static int get_buf(PyObject *obj, Py_buffer *view, const char *name, Py_ssize_t itemsize,
                   const char *kinds, int writable, Py_ssize_t *n) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        /* PyType_GetName: stable ABI (3.11+), unlike Py_TYPE(obj)->tp_name */
        PyObject *tname = PyType_GetName(Py_TYPE(obj));
        PyErr_Format(PyExc_TypeError, "%s: expected a C-contiguous buffer, got %S", name,
                     tname ? tname : Py_None);
        Py_XDECREF(tname);
        return -1;
    }
    char kind = format_kind(view->format);
    if (view->itemsize != itemsize || strchr(kinds, kind) == NULL) {
        PyErr_Format(PyExc_TypeError,
                     "%s: expected %zd-byte elements of kind '%s', got format '%s' (%zd bytes)",
                     name, itemsize, kinds, view->format ? view->format : "B",
                     view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    if (writable && view->readonly) {
        PyErr_Format(PyExc_ValueError, "%s: buffer is read-only", name);
        PyBuffer_Release(view);
        return -1;
    }
    *n = view->len / itemsize;
    return 0;
}

static int overlap(const Py_buffer *a, const Py_buffer *b) {
    uintptr_t a0 = (uintptr_t)a->buf, b0 = (uintptr_t)b->buf;
    if (a->len == 0 || b->len == 0) return 0;
    return a0 < b0 + (uintptr_t)b->len && b0 < a0 + (uintptr_t)a->len;
}

static int check_disjoint(const Py_buffer *a, const char *an, const Py_buffer *b,
                          const char *bn) {
    if (overlap(a, b)) {
        PyErr_Format(PyExc_ValueError, "%s and %s overlap in memory", an, bn);
        return -1;
    }
    return 0;
}

static int check_nargs(const char *fname, Py_ssize_t nargs, Py_ssize_t want) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", fname, want,
                     nargs);
        return -1;
    }
    return 0;
}

static int get_block(PyObject *obj, Py_ssize_t *block) {
    *block = PyLong_AsSsize_t(obj);
    if (*block == -1 && PyErr_Occurred()) return -1;
    if (*block < 1) {
        PyErr_SetString(PyExc_ValueError, "block must be >= 1");
        return -1;
    }
    return 0;
}

static Py_ssize_t num_blocks(Py_ssize_t n, Py_ssize_t block) {
    return n == 0 ? 0 : (n - 1) / block + 1;
}

/* Kinds accepted per dtype code; fp16 storage may also be viewed as uint16. */
static const char *dtype_kinds(int dtype) {
    switch (dtype) {
    case PCCL_F32: case PCCL_F64: return "f";
    case PCCL_F16: return "fu";
    case PCCL_BF16: case PCCL_U8: return "u";
    default: return "i";
    }
}

static int get_dtype(PyObject *obj, int *dtype) {
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0 || v >= PCCL_NDTYPES) {
        PyErr_Format(PyExc_ValueError, "unknown dtype code %ld", v);
        return -1;
    }
    *dtype = (int)v;
    return 0;
}

PyDoc_STRVAR(reduce_doc,
             "reduce(dst, src, dtype, op)\n--\n\n"
             "dst[i] = dst[i] (op) src[i]; dtype and op are DType/ReduceOp codes\n"
             "(SUM, MIN, MAX, PROD).");

static PyObject *py_reduce(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer d, s;
    Py_ssize_t nd, ns;
    int dtype;
    long op;
    (void)self;
    if (check_nargs("reduce", nargs, 4) < 0 || get_dtype(args[2], &dtype) < 0) return NULL;
    op = PyLong_AsLong(args[3]);
    if (op == -1 && PyErr_Occurred()) return NULL;
    if (op != PCCL_SUM && op != PCCL_MIN && op != PCCL_MAX && op != PCCL_PROD) {
        PyErr_Format(PyExc_ValueError,
                     "unsupported op code %ld (AVG is SUM followed by divide)", op);
        return NULL;
    }
    Py_ssize_t isz = (Py_ssize_t)pccl_itemsize(dtype);
    const char *kinds = dtype_kinds(dtype);
    if (get_buf(args[0], &d, "dst", isz, kinds, 1, &nd) < 0) return NULL;
    if (get_buf(args[1], &s, "src", isz, kinds, 0, &ns) < 0) {
        PyBuffer_Release(&d);
        return NULL;
    }
    PyObject *ret = NULL;
    if (nd != ns) {
        PyErr_Format(PyExc_ValueError, "dst has %zd elements, src %zd", nd, ns);
    } else if (check_disjoint(&d, "dst", &s, "src") == 0) {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = pccl_reduce(d.buf, s.buf, (size_t)nd, dtype, (int)op);
        Py_END_ALLOW_THREADS
        if (rc == 0) ret = Py_NewRef(Py_None);
        else PyErr_SetString(PyExc_ValueError, "unsupported dtype/op");
    }
    PyBuffer_Release(&s);
    PyBuffer_Release(&d);
    return ret;
}

PyDoc_STRVAR(divide_doc,
             "divide(dst, dtype, divisor)\n--\n\n"
             "dst[i] /= divisor (floats: IEEE division; integers: truncate toward zero).");

static PyObject *py_divide(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer d;
    Py_ssize_t n;
    int dtype, overflow = 0;
    (void)self;
    if (check_nargs("divide", nargs, 3) < 0 || get_dtype(args[1], &dtype) < 0) return NULL;
    long long divisor = PyLong_AsLongLongAndOverflow(args[2], &overflow);
    if (divisor == -1 && PyErr_Occurred()) return NULL;
    if (overflow || divisor < 1) {
        PyErr_SetString(PyExc_ValueError, "divisor must be in [1, 2**63 - 1]");
        return NULL;
    }
    if (get_buf(args[0], &d, "dst", (Py_ssize_t)pccl_itemsize(dtype), dtype_kinds(dtype), 1,
                &n) < 0)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pccl_divide(d.buf, (size_t)n, dtype, (int64_t)divisor);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&d);
    if (rc != 0) {
        PyErr_SetString(PyExc_ValueError, "unsupported dtype/divisor");
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(quantize_doc,
             "quantize_u8(src, q_out, meta_out, block)\n--\n\n"
             "Block-wise min-max uint8 quantisation of float32 src; meta_out holds\n"
             "(min, scale) float32 pairs, one per block.");

static PyObject *py_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer s, q, m;
    Py_ssize_t ns, nq, nm, block;
    PyObject *ret = NULL;
    (void)self;
    if (check_nargs("quantize_u8", nargs, 4) < 0 || get_block(args[3], &block) < 0)
        return NULL;
    if (get_buf(args[0], &s, "src", 4, "f", 0, &ns) < 0) return NULL;
    if (get_buf(args[1], &q, "q_out", 1, "u", 1, &nq) < 0) goto release_s;
    if (get_buf(args[2], &m, "meta_out", 4, "f", 1, &nm) < 0) goto release_q;
    if (nq != ns) {
        PyErr_Format(PyExc_ValueError, "q_out has %zd elements, src %zd", nq, ns);
    } else if (nm != 2 * num_blocks(ns, block)) {
        PyErr_Format(PyExc_ValueError, "meta_out has %zd elements, expected %zd", nm,
                     2 * num_blocks(ns, block));
    } else if (check_disjoint(&s, "src", &q, "q_out") == 0 &&
               check_disjoint(&s, "src", &m, "meta_out") == 0 &&
               check_disjoint(&q, "q_out", &m, "meta_out") == 0) {
        Py_BEGIN_ALLOW_THREADS
        pccl_quantize_u8(s.buf, q.buf, m.buf, (size_t)ns, (size_t)block);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&m);
release_q:
    PyBuffer_Release(&q);
release_s:
    PyBuffer_Release(&s);
    return ret;
}

/* dequantize_u8 and dequantize_accumulate_u8 share their checks. */
static PyObject *dequant_common(PyObject *const *args, Py_ssize_t nargs, const char *fname,
                                const char *outname, int accumulate) {
    Py_buffer q, m, o;
    Py_ssize_t nq, nm, no, block;
    PyObject *ret = NULL;
    if (check_nargs(fname, nargs, 4) < 0 || get_block(args[3], &block) < 0) return NULL;
    if (get_buf(args[0], &q, "q", 1, "u", 0, &nq) < 0) return NULL;
    if (get_buf(args[1], &m, "meta", 4, "f", 0, &nm) < 0) goto release_q;
    if (get_buf(args[2], &o, outname, 4, "f", 1, &no) < 0) goto release_m;
    if (no != nq) {
        PyErr_Format(PyExc_ValueError, "%s has %zd elements, q %zd", outname, no, nq);
    } else if (nm != 2 * num_blocks(nq, block)) {
        PyErr_Format(PyExc_ValueError, "meta has %zd elements, expected %zd", nm,
                     2 * num_blocks(nq, block));
    } else if (check_disjoint(&o, outname, &q, "q") == 0 &&
               check_disjoint(&o, outname, &m, "meta") == 0) {
        Py_BEGIN_ALLOW_THREADS
        if (accumulate)
            pccl_dequantize_accumulate_u8(q.buf, m.buf, o.buf, (size_t)nq, (size_t)block);
        else
            pccl_dequantize_u8(q.buf, m.buf, o.buf, (size_t)nq, (size_t)block);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&o);
release_m:
    PyBuffer_Release(&m);
release_q:
    PyBuffer_Release(&q);
    return ret;
}

PyDoc_STRVAR(dequantize_doc,
             "dequantize_u8(q, meta, out, block)\n--\n\n"
             "out[i] = min + q[i] * scale of q's block (two fp32 roundings).");

static PyObject *py_dequantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return dequant_common(args, nargs, "dequantize_u8", "out", 0);
}

PyDoc_STRVAR(dequantize_accumulate_doc,
             "dequantize_accumulate_u8(q, meta, acc, block)\n--\n\n"
             "acc[i] += dequantize_u8(q, meta)[i], without a temporary.");

static PyObject *py_dequantize_accumulate(PyObject *self, PyObject *const *args,
                                          Py_ssize_t nargs) {
    (void)self;
    return dequant_common(args, nargs, "dequantize_accumulate_u8", "acc", 1);
}

PyDoc_STRVAR(dequantize_add_doc,
             "dequantize_add_u8(q, meta, base, out, block)\n--\n\n"
             "out[i] = base[i] + dequantize_u8(q, meta)[i] in one pass; the bytes of\n"
             "dequantize_u8 into out followed by reduce(out, base, FLOAT32, SUM).");

static PyObject *py_dequantize_add(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer q, m, b, o;
    Py_ssize_t nq, nm, nb, no, block;
    PyObject *ret = NULL;
    (void)self;
    if (check_nargs("dequantize_add_u8", nargs, 5) < 0 || get_block(args[4], &block) < 0)
        return NULL;
    if (get_buf(args[0], &q, "q", 1, "u", 0, &nq) < 0) return NULL;
    if (get_buf(args[1], &m, "meta", 4, "f", 0, &nm) < 0) goto release_q;
    if (get_buf(args[2], &b, "base", 4, "f", 0, &nb) < 0) goto release_m;
    if (get_buf(args[3], &o, "out", 4, "f", 1, &no) < 0) goto release_b;
    if (no != nq || nb != nq) {
        PyErr_Format(PyExc_ValueError, "out has %zd elements, base %zd, q %zd", no, nb, nq);
    } else if (nm != 2 * num_blocks(nq, block)) {
        PyErr_Format(PyExc_ValueError, "meta has %zd elements, expected %zd", nm,
                     2 * num_blocks(nq, block));
    } else if (check_disjoint(&o, "out", &q, "q") == 0 &&
               check_disjoint(&o, "out", &m, "meta") == 0 &&
               check_disjoint(&o, "out", &b, "base") == 0) {
        Py_BEGIN_ALLOW_THREADS
        pccl_dequantize_add_u8(q.buf, m.buf, b.buf, o.buf, (size_t)nq, (size_t)block);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&o);
release_b:
    PyBuffer_Release(&b);
release_m:
    PyBuffer_Release(&m);
release_q:
    PyBuffer_Release(&q);
    return ret;
}

PyDoc_STRVAR(ring_hop_doc,
             "ring_hop_u8(q, meta, base, acc, q_out, meta_out, block, keep)\n--\n\n"
             "sum = (base if base is not None else acc) + dequantize_u8(q, meta);\n"
             "quantize_u8(sum, q_out, meta_out); keep 0: acc untouched, 1: acc = sum,\n"
             "2: acc = dequantize_u8(q_out, meta_out). Fused per block; the bytes of the\n"
             "separate kernels in turn.");

static PyObject *py_ring_hop(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer q, m, b, a, qo, mo;
    Py_ssize_t nq, nm, nb = 0, na, nqo, nmo, block;
    PyObject *ret = NULL;
    int have_base, overflow = 0;
    (void)self;
    if (check_nargs("ring_hop_u8", nargs, 8) < 0 || get_block(args[6], &block) < 0) return NULL;
    long keep = PyLong_AsLongAndOverflow(args[7], &overflow);
    if (keep == -1 && PyErr_Occurred()) return NULL;
    if (overflow || keep < 0 || keep > 2) {
        PyErr_SetString(PyExc_ValueError, "keep must be 0 (discard), 1 (sum) or 2 (adopt)");
        return NULL;
    }
    have_base = args[2] != Py_None;
    if (get_buf(args[0], &q, "q", 1, "u", 0, &nq) < 0) return NULL;
    if (get_buf(args[1], &m, "meta", 4, "f", 0, &nm) < 0) goto release_q;
    if (have_base && get_buf(args[2], &b, "base", 4, "f", 0, &nb) < 0) goto release_m;
    if (get_buf(args[3], &a, "acc", 4, "f", 1, &na) < 0) goto release_b;
    if (get_buf(args[4], &qo, "q_out", 1, "u", 1, &nqo) < 0) goto release_a;
    if (get_buf(args[5], &mo, "meta_out", 4, "f", 1, &nmo) < 0) goto release_qo;
    Py_ssize_t want_meta = 2 * num_blocks(nq, block);
    if (na != nq || nqo != nq || (have_base && nb != nq)) {
        PyErr_Format(PyExc_ValueError, "acc, q_out%s must have q's %zd elements",
                     have_base ? " and base" : "", nq);
    } else if (nm != want_meta || nmo != want_meta) {
        PyErr_Format(PyExc_ValueError, "meta and meta_out must have %zd elements (%zd, %zd)",
                     want_meta, nm, nmo);
    } else if (check_disjoint(&a, "acc", &q, "q") == 0 &&
               check_disjoint(&a, "acc", &m, "meta") == 0 &&
               (!have_base || check_disjoint(&a, "acc", &b, "base") == 0) &&
               check_disjoint(&qo, "q_out", &q, "q") == 0 &&
               check_disjoint(&qo, "q_out", &m, "meta") == 0 &&
               check_disjoint(&qo, "q_out", &a, "acc") == 0 &&
               (!have_base || check_disjoint(&qo, "q_out", &b, "base") == 0) &&
               check_disjoint(&mo, "meta_out", &q, "q") == 0 &&
               check_disjoint(&mo, "meta_out", &m, "meta") == 0 &&
               check_disjoint(&mo, "meta_out", &a, "acc") == 0 &&
               check_disjoint(&mo, "meta_out", &qo, "q_out") == 0 &&
               (!have_base || check_disjoint(&mo, "meta_out", &b, "base") == 0)) {
        const void *bp = have_base ? b.buf : NULL;
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = pccl_ring_hop_u8(q.buf, m.buf, bp, a.buf, qo.buf, mo.buf, (size_t)nq, (size_t)block,
                              (int)keep);
        Py_END_ALLOW_THREADS
        if (rc == 0) ret = Py_NewRef(Py_None);
        else PyErr_NoMemory();
    }
    PyBuffer_Release(&mo);
release_qo:
    PyBuffer_Release(&qo);
release_a:
    PyBuffer_Release(&a);
release_b:
    if (have_base) PyBuffer_Release(&b);
release_m:
    PyBuffer_Release(&m);
release_q:
    PyBuffer_Release(&q);
    return ret;
}

/* ---- packed 4-bit / 2-bit codes ------------------------------------------------------- */

static int get_bits_block(PyObject *bits_obj, PyObject *block_obj, int *bits, Py_ssize_t *block) {
    long v = PyLong_AsLong(bits_obj);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v != 4 && v != 2) {
        PyErr_Format(PyExc_ValueError, "bits must be 4 or 2, got %ld", v);
        return -1;
    }
    *bits = (int)v;
    if (get_block(block_obj, block) < 0) return -1;
    if (*block % (8 / v)) {
        PyErr_Format(PyExc_ValueError, "block must be a multiple of %ld for %ld-bit codes",
                     8 / v, v);
        return -1;
    }
    return 0;
}

static Py_ssize_t packed_len(Py_ssize_t n, int bits) {
    Py_ssize_t per = 8 / bits;
    return n == 0 ? 0 : (n - 1) / per + 1;
}

/* q: uint8[packed_len(n)], meta: float32[2 * num_blocks(n)]. */
static int check_packed(Py_ssize_t n, Py_ssize_t nq, const char *qname, Py_ssize_t nm,
                        const char *mname, int bits, Py_ssize_t block) {
    if (nq != packed_len(n, bits)) {
        PyErr_Format(PyExc_ValueError, "%s has %zd bytes, expected %zd for %zd %d-bit codes",
                     qname, nq, packed_len(n, bits), n, bits);
        return -1;
    }
    if (nm != 2 * num_blocks(n, block)) {
        PyErr_Format(PyExc_ValueError, "%s has %zd elements, expected %zd", mname, nm,
                     2 * num_blocks(n, block));
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(quantize_packed_doc,
             "quantize_packed(src, q_out, meta_out, bits, block)\n--\n\n"
             "Block-wise min-max quantisation of float32 src to 2**bits - 1 levels (bits 4 or\n"
             "2), codes packed 8 // bits per byte; meta_out holds (min, scale) per block.");

static PyObject *py_quantize_packed(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer s, q, m;
    Py_ssize_t ns, nq, nm, block;
    int bits;
    PyObject *ret = NULL;
    (void)self;
    if (check_nargs("quantize_packed", nargs, 5) < 0 ||
        get_bits_block(args[3], args[4], &bits, &block) < 0)
        return NULL;
    if (get_buf(args[0], &s, "src", 4, "f", 0, &ns) < 0) return NULL;
    if (get_buf(args[1], &q, "q_out", 1, "u", 1, &nq) < 0) goto release_s;
    if (get_buf(args[2], &m, "meta_out", 4, "f", 1, &nm) < 0) goto release_q;
    if (check_packed(ns, nq, "q_out", nm, "meta_out", bits, block) == 0 &&
        check_disjoint(&s, "src", &q, "q_out") == 0 &&
        check_disjoint(&s, "src", &m, "meta_out") == 0 &&
        check_disjoint(&q, "q_out", &m, "meta_out") == 0) {
        Py_BEGIN_ALLOW_THREADS
        pccl_quantize_packed(s.buf, q.buf, m.buf, (size_t)ns, (size_t)block, bits);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&m);
release_q:
    PyBuffer_Release(&q);
release_s:
    PyBuffer_Release(&s);
    return ret;
}

/* dequantize_packed (mode 0), dequantize_accumulate_packed (1), dequantize_add_packed (2):
 * (q, meta, [base,] out, bits, block); out's length is the element count. */
static PyObject *dequant_packed_common(PyObject *const *args, Py_ssize_t nargs, const char *fname,
                                       const char *outname, int mode) {
    Py_buffer q, m, b, o;
    Py_ssize_t nq, nm, nb = 0, no, block;
    int bits;
    PyObject *ret = NULL;
    int ib = mode == 2 ? 1 : 0; /* index shift past base */
    if (check_nargs(fname, nargs, 5 + ib) < 0 ||
        get_bits_block(args[3 + ib], args[4 + ib], &bits, &block) < 0)
        return NULL;
    if (get_buf(args[0], &q, "q", 1, "u", 0, &nq) < 0) return NULL;
    if (get_buf(args[1], &m, "meta", 4, "f", 0, &nm) < 0) goto release_q;
    if (ib && get_buf(args[2], &b, "base", 4, "f", 0, &nb) < 0) goto release_m;
    if (get_buf(args[2 + ib], &o, outname, 4, "f", 1, &no) < 0) goto release_b;
    if (ib && nb != no) {
        PyErr_Format(PyExc_ValueError, "base has %zd elements, %s %zd", nb, outname, no);
    } else if (check_packed(no, nq, "q", nm, "meta", bits, block) == 0 &&
               check_disjoint(&o, outname, &q, "q") == 0 &&
               check_disjoint(&o, outname, &m, "meta") == 0 &&
               (!ib || check_disjoint(&o, outname, &b, "base") == 0)) {
        const void *bp = ib ? b.buf : NULL;
        Py_BEGIN_ALLOW_THREADS
        pccl_dequantize_packed(q.buf, m.buf, bp, o.buf, (size_t)no, (size_t)block, bits, mode);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&o);
release_b:
    if (ib) PyBuffer_Release(&b);
release_m:
    PyBuffer_Release(&m);
release_q:
    PyBuffer_Release(&q);
    return ret;
}

PyDoc_STRVAR(dequantize_packed_doc,
             "dequantize_packed(q, meta, out, bits, block)\n--\n\n"
             "out[i] = min + code[i] * scale of its block; len(out) codes are read.");
PyDoc_STRVAR(dequantize_accumulate_packed_doc,
             "dequantize_accumulate_packed(q, meta, acc, bits, block)\n--\n\n"
             "acc[i] += dequantize_packed(q, meta)[i].");
PyDoc_STRVAR(dequantize_add_packed_doc,
             "dequantize_add_packed(q, meta, base, out, bits, block)\n--\n\n"
             "out[i] = base[i] + dequantize_packed(q, meta)[i] in one pass.");

static PyObject *py_dequantize_packed(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return dequant_packed_common(args, nargs, "dequantize_packed", "out", 0);
}

static PyObject *py_dequantize_accumulate_packed(PyObject *self, PyObject *const *args,
                                                 Py_ssize_t nargs) {
    (void)self;
    return dequant_packed_common(args, nargs, "dequantize_accumulate_packed", "acc", 1);
}

static PyObject *py_dequantize_add_packed(PyObject *self, PyObject *const *args,
                                          Py_ssize_t nargs) {
    (void)self;
    return dequant_packed_common(args, nargs, "dequantize_add_packed", "out", 2);
}

PyDoc_STRVAR(ring_hop_packed_doc,
             "ring_hop_packed(q, meta, base, acc, q_out, meta_out, bits, block, keep)\n--\n\n"
             "ring_hop_u8 for packed bits-bit codes; len(acc) is the element count.");

static PyObject *py_ring_hop_packed(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer q, m, b, a, qo, mo;
    Py_ssize_t nq, nm, nb = 0, na, nqo, nmo, block;
    PyObject *ret = NULL;
    int bits, have_base, overflow = 0;
    (void)self;
    if (check_nargs("ring_hop_packed", nargs, 9) < 0 ||
        get_bits_block(args[6], args[7], &bits, &block) < 0)
        return NULL;
    long keep = PyLong_AsLongAndOverflow(args[8], &overflow);
    if (keep == -1 && PyErr_Occurred()) return NULL;
    if (overflow || keep < 0 || keep > 2) {
        PyErr_SetString(PyExc_ValueError, "keep must be 0 (discard), 1 (sum) or 2 (adopt)");
        return NULL;
    }
    have_base = args[2] != Py_None;
    if (get_buf(args[0], &q, "q", 1, "u", 0, &nq) < 0) return NULL;
    if (get_buf(args[1], &m, "meta", 4, "f", 0, &nm) < 0) goto release_q;
    if (have_base && get_buf(args[2], &b, "base", 4, "f", 0, &nb) < 0) goto release_m;
    if (get_buf(args[3], &a, "acc", 4, "f", 1, &na) < 0) goto release_b;
    if (get_buf(args[4], &qo, "q_out", 1, "u", 1, &nqo) < 0) goto release_a;
    if (get_buf(args[5], &mo, "meta_out", 4, "f", 1, &nmo) < 0) goto release_qo;
    if (have_base && nb != na) {
        PyErr_Format(PyExc_ValueError, "base has %zd elements, acc %zd", nb, na);
    } else if (check_packed(na, nq, "q", nm, "meta", bits, block) == 0 &&
               check_packed(na, nqo, "q_out", nmo, "meta_out", bits, block) == 0 &&
               check_disjoint(&a, "acc", &q, "q") == 0 &&
               check_disjoint(&a, "acc", &m, "meta") == 0 &&
               (!have_base || check_disjoint(&a, "acc", &b, "base") == 0) &&
               check_disjoint(&qo, "q_out", &q, "q") == 0 &&
               check_disjoint(&qo, "q_out", &m, "meta") == 0 &&
               check_disjoint(&qo, "q_out", &a, "acc") == 0 &&
               (!have_base || check_disjoint(&qo, "q_out", &b, "base") == 0) &&
               check_disjoint(&mo, "meta_out", &q, "q") == 0 &&
               check_disjoint(&mo, "meta_out", &m, "meta") == 0 &&
               check_disjoint(&mo, "meta_out", &a, "acc") == 0 &&
               check_disjoint(&mo, "meta_out", &qo, "q_out") == 0 &&
               (!have_base || check_disjoint(&mo, "meta_out", &b, "base") == 0)) {
        const void *bp = have_base ? b.buf : NULL;
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = pccl_ring_hop_packed(q.buf, m.buf, bp, a.buf, qo.buf, mo.buf, (size_t)na,
                                  (size_t)block, bits, (int)keep);
        Py_END_ALLOW_THREADS
        if (rc == 0) ret = Py_NewRef(Py_None);
        else PyErr_NoMemory();
    }
    PyBuffer_Release(&mo);
release_qo:
    PyBuffer_Release(&qo);
release_a:
    PyBuffer_Release(&a);
release_b:
    if (have_base) PyBuffer_Release(&b);
release_m:
    PyBuffer_Release(&m);
release_q:
    PyBuffer_Release(&q);
    return ret;
}

/* add_f16 / add_bf16: out = base + decode(src), three arrays of one length. */
static PyObject *add16_common(const char *name, void (*fn)(const void *, const void *, void *,
                                                           size_t),
                              const char *src_kinds, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer s, b, o;
    Py_ssize_t ns, nb, no;
    PyObject *ret = NULL;
    if (check_nargs(name, nargs, 3) < 0) return NULL;
    if (get_buf(args[0], &s, "src", 2, src_kinds, 0, &ns) < 0) return NULL;
    if (get_buf(args[1], &b, "base", 4, "f", 0, &nb) < 0) goto release_s;
    if (get_buf(args[2], &o, "out", 4, "f", 1, &no) < 0) goto release_b;
    if (no != ns || nb != ns) {
        PyErr_Format(PyExc_ValueError, "out has %zd elements, base %zd, src %zd", no, nb, ns);
    } else if (check_disjoint(&o, "out", &s, "src") == 0 &&
               check_disjoint(&o, "out", &b, "base") == 0) {
        Py_BEGIN_ALLOW_THREADS
        fn(s.buf, b.buf, o.buf, (size_t)ns);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&o);
release_b:
    PyBuffer_Release(&b);
release_s:
    PyBuffer_Release(&s);
    return ret;
}

PyDoc_STRVAR(add_f16_doc, "add_f16(src, base, out)\n--\n\nout = base + decode_f16(src).");
PyDoc_STRVAR(add_bf16_doc, "add_bf16(src, base, out)\n--\n\nout = base + decode_bf16(src).");

static PyObject *py_add_f16(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return add16_common("add_f16", pccl_add_f16, "fu", args, nargs);
}

static PyObject *py_add_bf16(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return add16_common("add_bf16", pccl_add_bf16, "u", args, nargs);
}

/* Element-wise kernels from one array into (or onto) another of the same length. */
struct unary {
    const char *name;
    void (*fn)(const void *, void *, size_t);
    Py_ssize_t in_size;
    const char *in_kinds;
    Py_ssize_t out_size;
    const char *out_kinds;
};

static const struct unary unaries[] = {
    {"encode_f16", pccl_encode_f16, 4, "f", 2, "fu"},
    {"decode_f16", pccl_decode_f16, 2, "fu", 4, "f"},
    {"encode_bf16", pccl_encode_bf16, 4, "f", 2, "u"},
    {"decode_bf16", pccl_decode_bf16, 2, "u", 4, "f"},
    {"accumulate_f16", pccl_accumulate_f16, 2, "fu", 4, "f"},
    {"accumulate_bf16", pccl_accumulate_bf16, 2, "u", 4, "f"},
};

static PyObject *unary_common(const struct unary *u, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer s, o;
    Py_ssize_t ns, no;
    PyObject *ret = NULL;
    const char *outname = strncmp(u->name, "accumulate", 10) == 0 ? "acc" : "out";
    if (check_nargs(u->name, nargs, 2) < 0) return NULL;
    if (get_buf(args[0], &s, "src", u->in_size, u->in_kinds, 0, &ns) < 0) return NULL;
    if (get_buf(args[1], &o, outname, u->out_size, u->out_kinds, 1, &no) < 0) {
        PyBuffer_Release(&s);
        return NULL;
    }
    if (ns != no) {
        PyErr_Format(PyExc_ValueError, "src has %zd elements, %s %zd", ns, outname, no);
    } else if (check_disjoint(&s, "src", &o, outname) == 0) {
        Py_BEGIN_ALLOW_THREADS
        u->fn(s.buf, o.buf, (size_t)ns);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&o);
    PyBuffer_Release(&s);
    return ret;
}

#define UNARY_ENTRY(IDX, NAME, DOC)                                                        \
    PyDoc_STRVAR(NAME##_doc, DOC);                                                         \
    static PyObject *py_##NAME(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {  \
        (void)self;                                                                        \
        return unary_common(&unaries[IDX], args, nargs);                                   \
    }

UNARY_ENTRY(0, encode_f16, "encode_f16(src, out)\n--\n\nfloat32 -> float16 bits, RNE.")
UNARY_ENTRY(1, decode_f16, "decode_f16(src, out)\n--\n\nfloat16 bits -> float32, exact.")
UNARY_ENTRY(2, encode_bf16, "encode_bf16(src, out)\n--\n\nfloat32 -> bfloat16 bits, RNE.")
UNARY_ENTRY(3, decode_bf16, "decode_bf16(src, out)\n--\n\nbfloat16 bits -> float32, exact.")
UNARY_ENTRY(4, accumulate_f16, "accumulate_f16(src, acc)\n--\n\nacc += decode_f16(src).")
UNARY_ENTRY(5, accumulate_bf16, "accumulate_bf16(src, acc)\n--\n\nacc += decode_bf16(src).")

#define FASTCALL(NAME) {#NAME, (PyCFunction)(void (*)(void))py_##NAME, METH_FASTCALL, NAME##_doc}

static PyMethodDef methods[] = {
    FASTCALL(reduce),
    FASTCALL(divide),
    {"quantize_u8", (PyCFunction)(void (*)(void))py_quantize, METH_FASTCALL, quantize_doc},
    {"dequantize_u8", (PyCFunction)(void (*)(void))py_dequantize, METH_FASTCALL,
     dequantize_doc},
    {"dequantize_accumulate_u8", (PyCFunction)(void (*)(void))py_dequantize_accumulate,
     METH_FASTCALL, dequantize_accumulate_doc},
    FASTCALL(encode_f16),
    FASTCALL(decode_f16),
    FASTCALL(encode_bf16),
    FASTCALL(decode_bf16),
    FASTCALL(accumulate_f16),
    FASTCALL(accumulate_bf16),
    {"dequantize_add_u8", (PyCFunction)(void (*)(void))py_dequantize_add, METH_FASTCALL,
     dequantize_add_doc},
    FASTCALL(add_f16),
    FASTCALL(add_bf16),
    {"ring_hop_u8", (PyCFunction)(void (*)(void))py_ring_hop, METH_FASTCALL, ring_hop_doc},
    FASTCALL(quantize_packed),
    FASTCALL(dequantize_packed),
    FASTCALL(dequantize_accumulate_packed),
    FASTCALL(dequantize_add_packed),
    FASTCALL(ring_hop_packed),
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *mod) {
    int cap = PCCL_SIMD_AVX512;
    const char *env = getenv("PCCL_SIMD");
    if (env != NULL && *env != '\0') {
        if (strcmp(env, "generic") == 0) cap = PCCL_SIMD_GENERIC;
        else if (strcmp(env, "avx2") == 0) cap = PCCL_SIMD_AVX2;
        else if (strcmp(env, "avx512") == 0) cap = PCCL_SIMD_AVX512;
        else {
            PyErr_Format(PyExc_ImportError,
                         "PCCL_SIMD=%.50s: expected generic, avx2 or avx512", env);
            return -1;
        }
    }
    int level = pccl_simd_select(cap);
    return PyModule_AddStringConstant(mod, "SIMD", pccl_simd_name(level));
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, (void *)module_exec},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pccl._native",
    .m_doc = "Native pccl kernels; see pccl/kernels.py for the documented front-end.",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModuleDef_Init(&moduledef); }
