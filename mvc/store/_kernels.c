/* One-pass kernels for the chunk codecs (mvc/store/codec.py, docs/format.md §5, §5.1).
 *
 * split:  k-byte elements -> k byte planes, top byte first, optionally rotated left by one bit
 * merge:  the inverse
 * diff:   zigzag(order(new) - order(base)) of k-byte elements, written as k planes (no rotation)
 * undiff: the inverse, given the base
 * gather: the elements of new that differ from base: a little-endian bit mask and their values
 * scatter: the inverse: base with the masked elements replaced by the values, in order
 *
 * order() maps float bits to value order (negative: all bits flipped; else: sign bit set).
 * Every function checks its buffer sizes, releases the GIL while it runs, and computes exactly
 * what the numpy code in codec.py computes (tests/test_kernels.py compares them byte for byte).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline uint64_t le64(uint64_t w) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return __builtin_bswap64(w);
#else
    return w;
#endif
}

static inline int ctz64(uint64_t w) { /* w != 0 */
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctzll(w);
#else
    int n = 0;
    while (!(w & 1)) { w >>= 1; n++; }
    return n;
#endif
}

static inline int popcount64(uint64_t w) {
    w = w - ((w >> 1) & 0x5555555555555555ULL);
    w = (w & 0x3333333333333333ULL) + ((w >> 2) & 0x3333333333333333ULL);
    w = (w + (w >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (int)((w * 0x0101010101010101ULL) >> 56);
}

#define KERNELS(T, K)                                                                          \
    static inline T order_##K(T u) {                                                           \
        T top = (T)1 << (8 * K - 1);                                                           \
        return (u & top) ? (T)~u : (T)(u | top);                                               \
    }                                                                                          \
    static inline T unorder_##K(T m) {                                                         \
        T top = (T)1 << (8 * K - 1);                                                           \
        return (m & top) ? (T)(m & ~top) : (T)~m;                                              \
    }                                                                                          \
    static void split_##K(const uint8_t *src, uint8_t *dst, Py_ssize_t n, int rot) {          \
        const T *u = (const T *)src;                                                           \
        for (Py_ssize_t i = 0; i < n; i++) {                                                   \
            T v = u[i];                                                                        \
            if (rot) v = (T)((v << 1) | (v >> (8 * K - 1)));                                   \
            for (int j = 0; j < K; j++) dst[(Py_ssize_t)j * n + i] = (uint8_t)(v >> (8 * (K - 1 - j))); \
        }                                                                                      \
    }                                                                                          \
    static void merge_##K(const uint8_t *const *src, uint8_t *dst, Py_ssize_t n, int rot) {   \
        T *u = (T *)dst;                                                                       \
        for (Py_ssize_t i = 0; i < n; i++) {                                                   \
            T v = 0;                                                                           \
            for (int j = 0; j < K; j++) v = (T)((v << 8) | src[j][i]);                         \
            if (rot) v = (T)((v >> 1) | (v << (8 * K - 1)));                                   \
            u[i] = v;                                                                          \
        }                                                                                      \
    }                                                                                          \
    static void diff_##K(const uint8_t *a, const uint8_t *b, uint8_t *dst, Py_ssize_t n, int fl) { \
        const T *x = (const T *)a, *y = (const T *)b;                                          \
        for (Py_ssize_t i = 0; i < n; i++) {                                                   \
            T p = x[i], q = y[i];                                                              \
            if (fl) { p = order_##K(p); q = order_##K(q); }                                    \
            T d = (T)(p - q);                                                                  \
            T z = (T)((T)(d << 1) ^ (T)(0 - (d >> (8 * K - 1))));                              \
            for (int j = 0; j < K; j++) dst[(Py_ssize_t)j * n + i] = (uint8_t)(z >> (8 * (K - 1 - j))); \
        }                                                                                      \
    }                                                                                          \
    static void undiff_##K(const uint8_t *const *src, const uint8_t *b, uint8_t *dst, Py_ssize_t n, \
                           int fl) {                                                           \
        const T *y = (const T *)b;                                                             \
        T *u = (T *)dst;                                                                       \
        for (Py_ssize_t i = 0; i < n; i++) {                                                   \
            T z = 0;                                                                           \
            for (int j = 0; j < K; j++) z = (T)((z << 8) | src[j][i]);                         \
            T d = (T)((z >> 1) ^ (T)(0 - (z & 1)));                                            \
            T q = fl ? order_##K(y[i]) : y[i];                                                 \
            T p = (T)(q + d);                                                                  \
            u[i] = fl ? unorder_##K(p) : p;                                                    \
        }                                                                                      \
    }

#define SPARSE(T, K)                                                                           \
    static Py_ssize_t gather_##K(const uint8_t *a, const uint8_t *b, uint8_t *mask, uint8_t *vals, \
                                 Py_ssize_t n) {                                               \
        const T *x = (const T *)a, *y = (const T *)b;                                          \
        T *v = (T *)vals;                                                                      \
        Py_ssize_t m = 0, i = 0;                                                               \
        for (; i + 8 <= n; i += 8) {  /* one mask byte: write every element, keep the changed */ \
            unsigned bits = 0;                                                                 \
            for (int j = 0; j < 8; j++) {                                                      \
                unsigned c = x[i + j] != y[i + j];                                             \
                v[m] = x[i + j];                                                               \
                m += c;                                                                        \
                bits |= c << j;                                                                \
            }                                                                                  \
            mask[i >> 3] = (uint8_t)bits;                                                      \
        }                                                                                      \
        for (; i < n; i++) {                                                                   \
            if (x[i] != y[i]) {                                                                \
                mask[i >> 3] |= (uint8_t)(1u << (i & 7));                                      \
                v[m++] = x[i];                                                                 \
            }                                                                                  \
        }                                                                                      \
        return m;                                                                              \
    }                                                                                          \
    static Py_ssize_t scatter_##K(const uint8_t *b, const uint8_t *mask, const uint8_t *vals,  \
                                  Py_ssize_t nvals, uint8_t *dst, Py_ssize_t n) {              \
        const T *y = (const T *)b, *v = (const T *)vals;                                       \
        T *u = (T *)dst;                                                                       \
        Py_ssize_t m = 0, i = 0;                                                               \
        for (; i + 64 <= n; i += 64) {  /* 64 elements per mask word: runs copy whole */       \
            uint64_t w;                                                                        \
            memcpy(&w, mask + (i >> 3), 8);                                                    \
            w = le64(w);                                                                       \
            if (w == 0) {                                                                      \
                memcpy(u + i, y + i, 64 * K);                                                  \
            } else if (w == ~(uint64_t)0) {                                                    \
                if (nvals - m < 64) return -1;                                                 \
                memcpy(u + i, v + m, 64 * K);                                                  \
                m += 64;                                                                       \
            } else {  /* copy the run, then patch the set bits, lowest first */                \
                if (nvals - m < popcount64(w)) return -1;                                      \
                memcpy(u + i, y + i, 64 * K);                                                  \
                while (w) {                                                                    \
                    u[i + ctz64(w)] = v[m++];                                                  \
                    w &= w - 1;                                                                \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (; i < n; i++) {                                                                   \
            if (mask[i >> 3] & (1u << (i & 7))) {                                              \
                if (m == nvals) return -1;                                                     \
                u[i] = v[m++];                                                                 \
            } else {                                                                           \
                u[i] = y[i];                                                                   \
            }                                                                                  \
        }                                                                                      \
        return m;                                                                              \
    }

SPARSE(uint8_t, 1)
SPARSE(uint16_t, 2)
SPARSE(uint32_t, 4)
SPARSE(uint64_t, 8)

KERNELS(uint8_t, 1)
KERNELS(uint16_t, 2)
KERNELS(uint32_t, 4)
KERNELS(uint64_t, 8)

typedef void (*one_fn)(const uint8_t *, uint8_t *, Py_ssize_t, int);
typedef void (*two_fn)(const uint8_t *, const uint8_t *, uint8_t *, Py_ssize_t, int);
typedef void (*merge_fn)(const uint8_t *const *, uint8_t *, Py_ssize_t, int);
typedef void (*undiff_fn)(const uint8_t *const *, const uint8_t *, uint8_t *, Py_ssize_t, int);

static int pick(int k) {
    return k == 1 ? 0 : k == 2 ? 1 : k == 4 ? 2 : k == 8 ? 3 : -1;
}

static PyObject *one(PyObject *args, one_fn *table) {
    Py_buffer src, dst;
    int k, flag;
    if (!PyArg_ParseTuple(args, "y*w*ip", &src, &dst, &k, &flag)) return NULL;
    int t = pick(k);
    PyObject *ret = NULL;
    if (t < 0 || src.len % k || dst.len != src.len) {
        PyErr_SetString(PyExc_ValueError, "bad element size or buffer length");
    } else {
        Py_ssize_t n = src.len / k;
        Py_BEGIN_ALLOW_THREADS
        table[t]((const uint8_t *)src.buf, (uint8_t *)dst.buf, n, flag);
        Py_END_ALLOW_THREADS
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return ret;
}

static PyObject *two(PyObject *args, two_fn *table) {
    Py_buffer a, b, dst;
    int k, flag;
    if (!PyArg_ParseTuple(args, "y*y*w*ip", &a, &b, &dst, &k, &flag)) return NULL;
    int t = pick(k);
    PyObject *ret = NULL;
    if (t < 0 || a.len % k || b.len != a.len || dst.len != a.len) {
        PyErr_SetString(PyExc_ValueError, "bad element size or buffer length");
    } else {
        Py_ssize_t n = a.len / k;
        Py_BEGIN_ALLOW_THREADS
        table[t]((const uint8_t *)a.buf, (const uint8_t *)b.buf, (uint8_t *)dst.buf, n, flag);
        Py_END_ALLOW_THREADS
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&dst);
    return ret;
}

static one_fn SPLIT[] = {split_1, split_2, split_4, split_8};
static merge_fn MERGE[] = {merge_1, merge_2, merge_4, merge_8};
static two_fn DIFF[] = {diff_1, diff_2, diff_4, diff_8};
static undiff_fn UNDIFF[] = {undiff_1, undiff_2, undiff_4, undiff_8};

/* merge(planes, dst, k, rotate) and undiff(planes, base, dst, k, is_float): *planes* is a sequence
 * of k buffers of n bytes each (separate buffers: a decoder hands over what zstd returned, no copy). */
static PyObject *planar(PyObject *args, int with_base) {
    PyObject *seq, *ret = NULL, *fast = NULL;
    Py_buffer base = {0}, dst = {0}, planes[8];
    const uint8_t *ptrs[8];
    int k, flag, got = 0, ok;
    if (with_base ? !PyArg_ParseTuple(args, "Oy*w*ip", &seq, &base, &dst, &k, &flag)
                  : !PyArg_ParseTuple(args, "Ow*ip", &seq, &dst, &k, &flag))
        return NULL;
    int t = pick(k);
    Py_ssize_t n = t >= 0 ? dst.len / k : 0;
    ok = t >= 0 && dst.len % k == 0 && (!with_base || base.len == dst.len);
    if (ok) {
        fast = PySequence_Fast(seq, "planes must be a sequence of buffers");
        ok = fast != NULL && PySequence_Fast_GET_SIZE(fast) == k;
    }
    for (; ok && got < k; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, got), &planes[got], PyBUF_SIMPLE) < 0) {
            ok = 0;
            break;
        }
        ptrs[got] = (const uint8_t *)planes[got].buf;
        ok = planes[got].len == n;
    }
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        if (with_base)
            UNDIFF[t](ptrs, (const uint8_t *)base.buf, (uint8_t *)dst.buf, n, flag);
        else
            MERGE[t](ptrs, (uint8_t *)dst.buf, n, flag);
        Py_END_ALLOW_THREADS
        ret = Py_None;
        Py_INCREF(ret);
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "bad element size, plane count or buffer length");
    }
    for (int j = 0; j < got; j++) PyBuffer_Release(&planes[j]);
    Py_XDECREF(fast);
    if (with_base) PyBuffer_Release(&base);
    PyBuffer_Release(&dst);
    return ret;
}

typedef Py_ssize_t (*gather_fn)(const uint8_t *, const uint8_t *, uint8_t *, uint8_t *, Py_ssize_t);
typedef Py_ssize_t (*scatter_fn)(const uint8_t *, const uint8_t *, const uint8_t *, Py_ssize_t, uint8_t *,
                                 Py_ssize_t);
static gather_fn GATHER[] = {gather_1, gather_2, gather_4, gather_8};
static scatter_fn SCATTER[] = {scatter_1, scatter_2, scatter_4, scatter_8};

/* gather(new, base, mask, values, k) -> number of values; mask must be zeroed, ceil(n/8) bytes.
 * scatter(base, mask, values, dst, k): dst = base with the masked elements taken from values;
 * every value must be used exactly once (ValueError otherwise). */
static PyObject *sparse(PyObject *args, int scatter) {
    Py_buffer x, mask, vals, out;  /* gather: x = new, out = base; scatter: x = base, out = dst */
    int k;
    if (!PyArg_ParseTuple(args, scatter ? "y*y*y*w*i" : "y*y*w*w*i", &x, scatter ? &mask : &out,
                          scatter ? &vals : &mask, scatter ? &out : &vals, &k)) return NULL;
    int t = pick(k);
    Py_ssize_t n = x.len / (k > 0 ? k : 1), m = -1, nv = vals.len / (k > 0 ? k : 1);
    int ok = t >= 0 && x.len % k == 0 && out.len == x.len && mask.len == (n + 7) / 8 &&
             (scatter ? vals.len % k == 0 : vals.len >= x.len);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "bad element size or buffer length");
    } else {
        Py_BEGIN_ALLOW_THREADS
        if (scatter)
            m = SCATTER[t]((const uint8_t *)x.buf, (const uint8_t *)mask.buf, (const uint8_t *)vals.buf, nv,
                           (uint8_t *)out.buf, n);
        else
            m = GATHER[t]((const uint8_t *)x.buf, (const uint8_t *)out.buf, (uint8_t *)mask.buf,
                          (uint8_t *)vals.buf, n);
        Py_END_ALLOW_THREADS
        if (scatter && m != nv) {
            PyErr_SetString(PyExc_ValueError, "sparse values do not fit the mask");
            m = -1;
        }
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&mask);
    PyBuffer_Release(&vals);
    PyBuffer_Release(&out);
    if (m < 0) return NULL;
    if (scatter) Py_RETURN_NONE;
    return PyLong_FromSsize_t(m);
}

static PyObject *k_gather(PyObject *self, PyObject *args) { return sparse(args, 0); }
static PyObject *k_scatter(PyObject *self, PyObject *args) { return sparse(args, 1); }

static PyObject *k_split(PyObject *self, PyObject *args) { return one(args, SPLIT); }
static PyObject *k_merge(PyObject *self, PyObject *args) { return planar(args, 0); }
static PyObject *k_diff(PyObject *self, PyObject *args) { return two(args, DIFF); }
static PyObject *k_undiff(PyObject *self, PyObject *args) { return planar(args, 1); }

static PyMethodDef methods[] = {
    {"split", k_split, METH_VARARGS, "split(src, dst, k, rotate): elements -> planes"},
    {"merge", k_merge, METH_VARARGS, "merge(planes, dst, k, rotate): k plane buffers -> elements"},
    {"diff", k_diff, METH_VARARGS, "diff(new, base, dst, k, is_float): zigzag differences as planes"},
    {"undiff", k_undiff, METH_VARARGS, "undiff(planes, base, dst, k, is_float): elements from k plane buffers of differences"},
    {"gather", k_gather, METH_VARARGS, "gather(new, base, mask, values, k) -> count: what changed"},
    {"scatter", k_scatter, METH_VARARGS, "scatter(base, mask, values, dst, k): base with the changes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
