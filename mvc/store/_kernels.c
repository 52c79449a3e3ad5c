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

/* x86-64 with GCC or clang: SIMD versions built with target attributes, chosen at run time */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define X86_SIMD 1
#endif

static inline uint64_t le64(uint64_t w) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return __builtin_bswap64(w);
#else
    return w;
#endif
}

static inline uint16_t le16(uint16_t w) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return __builtin_bswap16(w);
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
    /* branch-free, so that loops using them vectorize: negative -> all bits flipped, else the */ \
    /* sign bit set; and back */                                                              \
    static inline T order_##K(T u) {                                                           \
        T top = (T)1 << (8 * K - 1);                                                           \
        return (T)(u ^ ((T)(0 - (T)(u >> (8 * K - 1))) | top));                                \
    }                                                                                          \
    static inline T unorder_##K(T m) {                                                         \
        T top = (T)1 << (8 * K - 1);                                                           \
        return (T)(m ^ ((T)((T)(m >> (8 * K - 1)) - 1) | top));                                \
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
            if (memcmp(x + i, y + i, 8 * K) == 0) { /* 8 unchanged (most of a sparse change) */ \
                mask[i >> 3] = 0;                                                              \
                continue;                                                                      \
            }                                                                                  \
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

/* gather of bytes and of two-byte elements, 16 elements at a time: one compare and one movemask
 * give 16 mask bits. Bytes are packed with SSSE3's pshufb where the CPU has it (a table gives,
 * for each mask byte, where its changed bytes lie: no branch per element); two-byte elements
 * (SSE2, every x86-64 CPU has it) are picked bit by bit where few changed, else all 16 written
 * and the changed kept. The same result as the generic loop (tests/test_kernels.py). Measured on
 * a 2 MiB delta plane with 5 % non-zero bytes: 1.8 -> 0.6 ms (docs/benchmarks.md). */
/* The widest SIMD the kernels below may use: 2 AVX2, 1 SSSE3, 0 SSE2 (x86-64's baseline); the
 * CPU's own limits apply too. Lowered by tests only (simd_cap), to run every path on one machine. */
static int simd_cap = 2;

#if defined(__SSE2__)
#include <emmintrin.h>
static Py_ssize_t gather_2_sse2(const uint8_t *a, const uint8_t *b, uint8_t *mask, uint8_t *vals, Py_ssize_t n) {
    const uint16_t *x = (const uint16_t *)a;
    uint16_t *v = (uint16_t *)vals;
    Py_ssize_t m = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m128i *pa = (const __m128i *)(a + 2 * i), *pb = (const __m128i *)(b + 2 * i);
        __m128i e0 = _mm_cmpeq_epi16(_mm_loadu_si128(pa), _mm_loadu_si128(pb));
        __m128i e1 = _mm_cmpeq_epi16(_mm_loadu_si128(pa + 1), _mm_loadu_si128(pb + 1));
        unsigned ne = ~(unsigned)_mm_movemask_epi8(_mm_packs_epi16(e0, e1)) & 0xFFFFu;
        mask[i >> 3] = (uint8_t)ne;
        mask[(i >> 3) + 1] = (uint8_t)(ne >> 8);
        if (__builtin_popcount(ne) <= 4) {
            for (; ne; ne &= ne - 1) v[m++] = x[i + __builtin_ctz(ne)];
        } else {
            for (int j = 0; j < 16; j++) {
                v[m] = x[i + j];
                m += (ne >> j) & 1;
            }
        }
    }
    return m + gather_2(a + 2 * i, b + 2 * i, mask + (i >> 3), vals + 2 * m, n - i);
}
#define GATHER_2 gather_2_sse2
#else
#define GATHER_2 gather_2
#endif

#ifdef X86_SIMD
#include <tmmintrin.h>
/* per mask byte: the places of its set bits, then 0x80 (gather); for each of its 8 places, the
 * rank of its value, 0x80 where none (undiff_parts); the same ranks as the high bytes of 8
 * two-byte words, their low bytes 0x80 (undiff_parts' AVX2 loop); how many bits it has set */
static uint8_t pick_at[256][16] __attribute__((aligned(16)));
static uint8_t put_at[256][16] __attribute__((aligned(16)));
static uint8_t put_hi[256][16] __attribute__((aligned(16)));
static uint8_t bits_in[256];
static int have_ssse3 = 0;

static void simd_tables(void) { /* once, at import (under the GIL) */
    for (int w = 0; w < 256; w++) {
        int c = 0;
        memset(pick_at[w], 0x80, 16);
        memset(put_at[w], 0x80, 16);
        memset(put_hi[w], 0x80, 16);
        for (int j = 0; j < 8; j++) {
            if (w >> j & 1) {
                pick_at[w][c] = (uint8_t)j;
                put_hi[w][2 * j + 1] = (uint8_t)c;
                put_at[w][j] = (uint8_t)c++;
            }
        }
        bits_in[w] = (uint8_t)c;
    }
    have_ssse3 = __builtin_cpu_supports("ssse3") ? 1 : 0;
}

__attribute__((target("ssse3")))
static Py_ssize_t gather_1_ssse3(const uint8_t *a, const uint8_t *b, uint8_t *mask, uint8_t *vals, Py_ssize_t n) {
    Py_ssize_t m = 0, i = 0;
    for (; i + 16 <= n; i += 16) { /* m <= i: the 8 bytes stored at vals + m lie within vals */
        __m128i p = _mm_loadu_si128((const __m128i *)(a + i)), q = _mm_loadu_si128((const __m128i *)(b + i));
        unsigned ne = ~(unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(p, q)) & 0xFFFFu;
        unsigned w0 = ne & 0xFF, w1 = ne >> 8;
        mask[i >> 3] = (uint8_t)w0;
        mask[(i >> 3) + 1] = (uint8_t)w1;
        __m128i s0 = _mm_shuffle_epi8(p, _mm_load_si128((const __m128i *)pick_at[w0]));
        _mm_storel_epi64((__m128i *)(vals + m), s0);
        m += bits_in[w0];
        __m128i s1 = _mm_shuffle_epi8(_mm_srli_si128(p, 8), _mm_load_si128((const __m128i *)pick_at[w1]));
        _mm_storel_epi64((__m128i *)(vals + m), s1);
        m += bits_in[w1];
    }
    return m + gather_1(a + i, b + i, mask + (i >> 3), vals + m, n - i);
}

static Py_ssize_t gather_1_best(const uint8_t *a, const uint8_t *b, uint8_t *mask, uint8_t *vals, Py_ssize_t n) {
    return have_ssse3 && simd_cap >= 1 ? gather_1_ssse3(a, b, mask, vals, n) : gather_1(a, b, mask, vals, n);
}
#define GATHER_1 gather_1_best
#else
#define GATHER_1 gather_1
#endif

typedef Py_ssize_t (*gather_fn)(const uint8_t *, const uint8_t *, uint8_t *, uint8_t *, Py_ssize_t);
typedef Py_ssize_t (*scatter_fn)(const uint8_t *, const uint8_t *, const uint8_t *, Py_ssize_t, uint8_t *,
                                 Py_ssize_t);
static gather_fn GATHER[] = {GATHER_1, GATHER_2, gather_4, gather_8};
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

/* huff(src) -> bytes | None: src as one zstd frame (RFC 8878) whose blocks hold Huffman-coded
 * literals and no sequences: zstd's own entropy stage without its match finder, which finds
 * nothing in an exponent plane or in delta noise but costs as much as the coding (measured:
 * docs/format.md §5). Any zstd decoder reads the frame. One code, from the histogram of all of
 * src, serves every block (each carries it: 1 + ceil(last/2) bytes, or with a symbol above 128 its
 * weights FSE-coded, fse_weights). None when there are fewer than 2 symbols, the FSE-coded
 * weights do not fit their 127 bytes, or src is under HUF_MIN bytes: the caller then asks zstd.
 * A block the code does not shrink is stored raw. */
#define HUF_MAXBITS 11
#define HUF_BLOCK (128 * 1024)
#define HUF_MIN 1024

typedef struct {
    uint64_t elt[256]; /* a symbol's code in the top bits of a word: the container fills from the top */
    uint8_t len[256];
    /* the same for two symbols at once, indexed x << 8 | y (x coded first; the little-endian u16
     * at the pair's first byte when coding backwards); only pairs of present symbols are set */
    uint64_t *elt2;
    uint8_t *len2;
    uint8_t table[1 + 128]; /* the Huffman_Tree_Description: direct weights, or FSE-coded (fse_weights) */
    int table_size;
} huf_code;

/* Exact counts: a code for every byte value that occurs and for no other. (Counting a sample and
 * giving a code to every unseen value between the least and the greatest was tried: one zero
 * among 2 million exponents cost 4 % of the plane.) */
static void histogram(const uint8_t *s, Py_ssize_t n, uint32_t *count) {
    uint32_t c[4][256]; /* four tables: neighbouring equal bytes do not wait on one counter */
    memset(c, 0, sizeof c);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        w = le64(w);
        c[0][w & 255]++; c[1][(w >> 8) & 255]++; c[2][(w >> 16) & 255]++; c[3][(w >> 24) & 255]++;
        c[0][(w >> 32) & 255]++; c[1][(w >> 40) & 255]++; c[2][(w >> 48) & 255]++; c[3][w >> 56]++;
    }
    for (; i < n; i++) c[0][s[i]]++;
    for (int k = 0; k < 256; k++) count[k] = c[0][k] + c[1][k] + c[2][k] + c[3][k];
}

/* Code lengths: Huffman's, then limited to HUF_MAXBITS by moving pairs of the deepest leaves up
 * (JPEG's Annex K.3 procedure: the code stays complete), the shortest lengths to the most
 * frequent symbols. Returns the number of symbols present. */
static int huf_lengths(const uint32_t *count, uint8_t *len) {
    int sym[256], n = 0;
    for (int s = 0; s < 256; s++) {
        len[s] = 0;
        if (count[s]) sym[n++] = s;
    }
    if (n < 2) return n;
    for (int i = 1; i < n; i++) { /* by count, then symbol: insertion sort of at most 256 */
        int s = sym[i], j = i;
        while (j > 0 && (count[sym[j - 1]] > count[s] || (count[sym[j - 1]] == count[s] && sym[j - 1] > s))) {
            sym[j] = sym[j - 1];
            j--;
        }
        sym[j] = s;
    }
    uint64_t w[512];
    int parent[512], depth[512];
    for (int i = 0; i < n; i++) w[i] = count[sym[i]];
    int leaf = 0, inner = n;
    for (int next = n; next < 2 * n - 1; next++) { /* two queues: leaves, then made nodes, both ascending */
        int pick[2];
        for (int k = 0; k < 2; k++) {
            if (leaf < n && (inner >= next || w[leaf] <= w[inner])) pick[k] = leaf++;
            else pick[k] = inner++;
        }
        w[next] = w[pick[0]] + w[pick[1]];
        parent[pick[0]] = parent[pick[1]] = next;
    }
    depth[2 * n - 2] = 0;
    for (int i = 2 * n - 3; i >= 0; i--) depth[i] = depth[parent[i]] + 1;
    int per_len[256] = {0}, maxlen = 0;
    for (int i = 0; i < n; i++) {
        per_len[depth[i]]++;
        if (depth[i] > maxlen) maxlen = depth[i];
    }
    for (int i = maxlen; i > HUF_MAXBITS; i--) {
        while (per_len[i] > 0) {
            int j = i - 2;
            while (per_len[j] == 0) j--;
            per_len[i] -= 2;
            per_len[i - 1] += 1;
            per_len[j + 1] += 2;
            per_len[j] -= 1;
        }
    }
    int l = 1;
    for (int i = n - 1; i >= 0; i--) { /* most frequent first: shortest codes */
        while (per_len[l] == 0) l++;
        len[sym[i]] = (uint8_t)l;
        per_len[l]--;
    }
    return n;
}

/* Bits written forward, least significant first (an FSE table description, and the FSE bitstream
 * that a decoder reads backwards from its end mark). */
typedef struct {
    uint8_t *p, *end;
    uint64_t acc;
    int bits;
} bit_out;

static int bits_put(bit_out *b, uint32_t v, int n) { /* n <= 24; 0 when out of room */
    b->acc |= (uint64_t)v << b->bits;
    b->bits += n;
    while (b->bits >= 8) {
        if (b->p == b->end) return 0;
        *b->p++ = (uint8_t)b->acc;
        b->acc >>= 8;
        b->bits -= 8;
    }
    return 1;
}

static int bits_flush(bit_out *b) { /* the last partial byte, zero-padded */
    if (b->bits > 0) {
        if (b->p == b->end) return 0;
        *b->p++ = (uint8_t)b->acc;
        b->acc = 0;
        b->bits = 0;
    }
    return 1;
}

static int high_bit(uint32_t v) { /* v > 0 */
    int n = 0;
    while (v >>= 1) n++;
    return n;
}

/* The weights of a code with a symbol above 128 (the direct form holds 128 weights at most),
 * FSE-coded as RFC 8878 §4.2.1.2 has it: a table description (§4.1.1, accuracy log 6, every
 * weight present at least 1 in 64), then one bitstream of two interleaved states, weight 0, 2,
 * ... in the first. The coder works from the decoder's own table (built as §4.1.1 says): each
 * weight, last to first, takes the state of its value whose range holds the state after it, and
 * the bits that lead there. The last two weights are the states' final values, each the state of
 * its value that reads the most bits, so that the decoder's update after the next-to-last weight
 * runs past the stream's start, which is how it knows to stop (§4.2.1.2). Returns the length
 * written to out (room: 127 bytes), 0 when it does not fit. */
#define FSE_LOG 6
#define FSE_SIZE (1 << FSE_LOG)
static int fse_weights(const uint8_t *w, int n, uint8_t *out) {
    int count[16] = {0}, norm[16] = {0}, last = 0, present = 0, sum = 0;
    for (int i = 0; i < n; i++) count[w[i]]++;
    for (int s = 0; s < 16; s++) {
        if (!count[s]) continue;
        norm[s] = count[s] * FSE_SIZE / n;
        if (norm[s] < 1) norm[s] = 1;
        present++;
    }
    if (present < 2) /* a table needs two values: give an unused one the least share */
        norm[count[0] ? 1 : 0] = 1;
    for (int s = 0; s < 16; s++) {
        sum += norm[s];
        if (norm[s]) last = s;
    }
    while (sum > FSE_SIZE) { /* rounding up the rare values overshot: take from the largest */
        int big = 0;
        for (int s = 1; s < 16; s++)
            if (norm[s] > norm[big]) big = s;
        norm[big]--;
        sum--;
    }
    if (sum < FSE_SIZE) {
        int big = 0;
        for (int s = 1; s < 16; s++)
            if (count[s] > count[big]) big = s;
        norm[big] += FSE_SIZE - sum;
    }
    bit_out b = {out, out + 127, 0, 0};
    if (!bits_put(&b, FSE_LOG - 5, 4)) return 0;
    int remaining = FSE_SIZE;
    for (int s = 0; s <= last;) {
        int v = norm[s] + 1, nbits = high_bit((uint32_t)remaining + 1) + 1;
        int low = (1 << (nbits - 1)) - 1, thr = (1 << nbits) - 1 - (remaining + 1), ok;
        if (v < thr)
            ok = bits_put(&b, (uint32_t)v, nbits - 1);
        else
            ok = bits_put(&b, (uint32_t)(v <= low ? v : v + thr), nbits);
        if (!ok) return 0;
        remaining -= norm[s];
        if (norm[s++] == 0) { /* a run of zeros after it: 2-bit repeat flags */
            int run = 0;
            while (s + run <= last && norm[s + run] == 0) run++;
            s += run;
            for (; run >= 3; run -= 3)
                if (!bits_put(&b, 3, 2)) return 0;
            if (!bits_put(&b, (uint32_t)run, 2)) return 0;
        }
    }
    if (remaining != 0 || !bits_flush(&b)) return 0;
    /* the decoder's table */
    uint8_t sym[FSE_SIZE], nb[FSE_SIZE];
    int base[FSE_SIZE], next[16], pos = 0;
    for (int s = 0; s <= last; s++) {
        for (int i = 0; i < norm[s]; i++) {
            sym[pos] = (uint8_t)s;
            pos = (pos + (FSE_SIZE >> 1) + (FSE_SIZE >> 3) + 3) & (FSE_SIZE - 1);
        }
        next[s] = norm[s];
    }
    for (int x = 0; x < FSE_SIZE; x++) {
        int d = next[sym[x]]++;
        nb[x] = (uint8_t)(FSE_LOG - high_bit((uint32_t)d));
        base[x] = (d << nb[x]) - FSE_SIZE;
    }
    int state[2];
    for (int j = n - 2; j < n; j++) { /* the final states: the first (most bits) of their value */
        int x = 0;
        while (sym[x] != w[j]) x++;
        state[j & 1] = x;
    }
    for (int j = n - 3; j >= 0; j--) {
        int y = state[j & 1], x = 0;
        while (x < FSE_SIZE && !(sym[x] == w[j] && base[x] <= y && y < base[x] + (1 << nb[x]))) x++;
        if (x == FSE_SIZE || !bits_put(&b, (uint32_t)(y - base[x]), nb[x])) return 0; /* cannot happen */
        state[j & 1] = x;
    }
    if (!bits_put(&b, (uint32_t)state[1], FSE_LOG) || !bits_put(&b, (uint32_t)state[0], FSE_LOG) ||
        !bits_put(&b, 1, 1) || !bits_flush(&b))
        return 0;
    return (int)(b.p - out);
}

/* Weights, codes and the tree description (direct, or FSE-coded with a symbol above 128); 0 when
 * neither form can hold them. */
static int huf_build(const uint32_t *count, huf_code *h) {
    if (huf_lengths(count, h->len) < 2) return 0;
    int maxbits = 0, last = 0;
    for (int s = 0; s < 256; s++) {
        if (h->len[s]) {
            last = s;
            if (h->len[s] > maxbits) maxbits = h->len[s];
        }
    }
    uint8_t weight[256];
    for (int s = 0; s < 256; s++) weight[s] = h->len[s] ? (uint8_t)(maxbits + 1 - h->len[s]) : 0;
    /* canonical codes: by weight, then symbol; each takes the next 2^(weight-1) of 2^maxbits */
    uint32_t start = 0;
    for (int wt = 1; wt <= maxbits; wt++) {
        for (int s = 0; s <= last; s++) {
            if (weight[s] == wt) {
                h->elt[s] = (uint64_t)(start >> (wt - 1)) << (64 - h->len[s]);
                start += 1u << (wt - 1);
            }
        }
    }
    if (start != (1u << maxbits)) return 0; /* not complete: cannot happen; never write a bad table */
    if (last > 128) { /* weights of symbols 0 .. last-1 (last's is implied), FSE-coded */
        int size = fse_weights(weight, last, h->table + 1);
        if (size <= 0 || size > 127) return 0;
        h->table[0] = (uint8_t)size;
        h->table_size = 1 + size;
    } else { /* the same, 4 bits each */
        h->table[0] = (uint8_t)(127 + last);
        memset(h->table + 1, 0, 64);
        for (int s = 0; s < last; s++) h->table[1 + s / 2] |= (uint8_t)(s % 2 ? weight[s] : weight[s] << 4);
        h->table_size = 1 + (last + 1) / 2;
    }
    for (int x = 0; x <= last; x++) {
        if (!h->len[x]) continue;
        for (int y = 0; y <= last; y++) {
            if (!h->len[y]) continue;
            h->elt2[x << 8 | y] = (h->elt[x] >> h->len[y]) | h->elt[y];
            h->len2[x << 8 | y] = (uint8_t)(h->len[x] + h->len[y]);
        }
    }
    return 1;
}

static inline void put_le64(uint8_t *p, uint64_t v) {
    v = le64(v);
    memcpy(p, &v, 8);
}

/* Two of a block's 4 streams, each its segment last symbol to first, interleaved (two
 * independent containers keep the core busy; four would not fit the registers). A container
 * takes codes at its top (acc >> len | elt), so the oldest code lies lowest, as the little-endian
 * stream wants it; after 4 codes (at most 44 bits, plus at most 7 not yet stored) the filled top
 * is stored whole and whole bytes are kept. Stream a is the longer (by at most 3 symbols). The
 * body is compiled twice: with BMI2's shifts where the CPU has them, and plain. */
#define HUF_PUT(acc, bits, c) (acc = (acc >> h->len[c]) | h->elt[c], bits += h->len[c])
#define HUF_PUT2(acc, bits, p) do { /* the symbols p[1], then p[0] */                         \
        uint16_t ix_;                                                                          \
        memcpy(&ix_, p, 2);                                                                    \
        ix_ = le16(ix_);                                                                       \
        acc = (acc >> h->len2[ix_]) | h->elt2[ix_];                                            \
        bits += h->len2[ix_];                                                                  \
    } while (0)
#define HUF_STORE(acc, bits, q) do {                                                          \
        put_le64(q, acc >> (64 - bits));                                                       \
        q += bits >> 3;                                                                        \
        bits &= 7;                                                                             \
    } while (0)
#define HUF_END(acc, bits, q) do { /* the end mark: the decoder starts below the top set bit */ \
        acc = (acc >> 1) | ((uint64_t)1 << 63);                                                \
        bits += 1;                                                                             \
        put_le64(q, acc >> (64 - bits));                                                       \
        q += (bits + 7) >> 3;                                                                  \
    } while (0)
#define HUF_PAIR_BODY                                                                          \
    {                                                                                          \
        uint64_t a = 0, b = 0;                                                                 \
        unsigned na = 0, nb = 0;                                                               \
        uint8_t *qa = pa, *qb = pb;                                                            \
        Py_ssize_t i = ma;                                                                     \
        for (; i > mb; i--) HUF_PUT(a, na, sa[i - 1]);                                         \
        if (na) HUF_STORE(a, na, qa);                                                          \
        for (; i >= 4; i -= 4) {                                                               \
            HUF_PUT2(a, na, sa + i - 2);                                                       \
            HUF_PUT2(b, nb, sb + i - 2);                                                       \
            HUF_PUT2(a, na, sa + i - 4);                                                       \
            HUF_PUT2(b, nb, sb + i - 4);                                                       \
            HUF_STORE(a, na, qa);                                                              \
            HUF_STORE(b, nb, qb);                                                              \
        }                                                                                      \
        for (; i > 0; i--) {                                                                   \
            HUF_PUT(a, na, sa[i - 1]);                                                         \
            HUF_PUT(b, nb, sb[i - 1]);                                                         \
        }                                                                                      \
        HUF_END(a, na, qa);                                                                    \
        HUF_END(b, nb, qb);                                                                    \
        size[0] = qa - pa;                                                                     \
        size[1] = qb - pb;                                                                     \
    }

static void huf_pair_plain(const huf_code *h, const uint8_t *sa, Py_ssize_t ma, const uint8_t *sb, Py_ssize_t mb,
                           uint8_t *pa, uint8_t *pb, Py_ssize_t *size) HUF_PAIR_BODY

#ifdef X86_SIMD
#define HUF_BMI2 1
__attribute__((target("bmi2")))
static void huf_pair_bmi2(const huf_code *h, const uint8_t *sa, Py_ssize_t ma, const uint8_t *sb, Py_ssize_t mb,
                          uint8_t *pa, uint8_t *pb, Py_ssize_t *size) HUF_PAIR_BODY
#endif

/* The 4 streams: stream k at dst[k * room], its length to size[k]. */
static void huf_streams(const huf_code *h, const uint8_t *s, Py_ssize_t n, uint8_t *dst, Py_ssize_t room,
                        Py_ssize_t *size) {
    Py_ssize_t seg = (n + 3) / 4, last = n - 3 * seg;
    void (*pair)(const huf_code *, const uint8_t *, Py_ssize_t, const uint8_t *, Py_ssize_t, uint8_t *, uint8_t *,
                 Py_ssize_t *) = huf_pair_plain;
#ifdef HUF_BMI2
    if (__builtin_cpu_supports("bmi2")) pair = huf_pair_bmi2;
#endif
    pair(h, s, seg, s + seg, seg, dst, dst + room, size);
    pair(h, s + 2 * seg, seg, s + 3 * seg, last, dst + 2 * room, dst + 3 * room, size + 2);
}

/* One block's content (literals section + an empty sequences section) at dst; its length, or -1
 * when it would not be smaller than the block. dst has room for HUF_BLOCK_ROOM(n) bytes. */
#define HUF_ROOM(n) (((n) + 3) / 4 * HUF_MAXBITS / 8 + 16)
#define HUF_BLOCK_ROOM(n) (5 + 129 + 6 + 4 * HUF_ROOM(n) + 8)

static Py_ssize_t huf_block(const huf_code *h, const uint8_t *s, Py_ssize_t n, uint8_t *dst) {
    Py_ssize_t room = HUF_ROOM(n), sizes[4], head = 5 + h->table_size + 6, pos = head;
    memcpy(dst + 5, h->table, (size_t)h->table_size);
    huf_streams(h, s, n, dst + head, room, sizes);
    for (int k = 0; k < 4; k++) { /* close the gaps between the streams */
        if (sizes[k] > 0xFFFF || pos + sizes[k] + 1 >= n) return -1;
        if (k) memmove(dst + pos, dst + head + k * room, (size_t)sizes[k]);
        pos += sizes[k];
    }
    uint8_t *jump = dst + 5 + h->table_size;
    for (int k = 0; k < 3; k++) {
        jump[2 * k] = (uint8_t)sizes[k];
        jump[2 * k + 1] = (uint8_t)(sizes[k] >> 8);
    }
    uint64_t csize = (uint64_t)(pos - 5); /* tree description, jump table and streams */
    uint64_t lhc = 2 | (3 << 2) | ((uint64_t)n << 4) | (csize << 22); /* compressed, 4 streams, 18-bit sizes */
    for (int k = 0; k < 5; k++) dst[k] = (uint8_t)(lhc >> (8 * k));
    dst[pos++] = 0; /* Number_of_Sequences: 0 */
    return pos;
}

static Py_ssize_t huf_frame(const huf_code *h, const uint8_t *s, Py_ssize_t n, uint8_t *dst) {
    uint8_t *p = dst;
    const uint8_t head[5] = {0x28, 0xB5, 0x2F, 0xFD, 0xA0}; /* magic; single segment, 4-byte content size */
    memcpy(p, head, 5);
    for (int k = 0; k < 4; k++) p[5 + k] = (uint8_t)((uint64_t)n >> (8 * k));
    p += 9;
    for (Py_ssize_t at = 0; at < n; at += HUF_BLOCK) {
        Py_ssize_t m = n - at < HUF_BLOCK ? n - at : HUF_BLOCK;
        int last = at + m == n;
        Py_ssize_t got = m >= HUF_MIN ? huf_block(h, s + at, m, p + 3) : -1;
        uint32_t bh;
        if (got < 0) { /* raw block */
            memcpy(p + 3, s + at, (size_t)m);
            got = m;
            bh = (uint32_t)last | (0u << 1) | ((uint32_t)m << 3);
        } else {
            bh = (uint32_t)last | (2u << 1) | ((uint32_t)got << 3);
        }
        p[0] = (uint8_t)bh;
        p[1] = (uint8_t)(bh >> 8);
        p[2] = (uint8_t)(bh >> 16);
        p += 3 + got;
    }
    return p - dst;
}

static PyObject *k_huff(PyObject *self, PyObject *args) {
    Py_buffer src;
    if (!PyArg_ParseTuple(args, "y*", &src)) return NULL;
    Py_ssize_t n = src.len;
    if (n < HUF_MIN || n > ((Py_ssize_t)1 << 31)) {
        PyBuffer_Release(&src);
        Py_RETURN_NONE;
    }
    /* worst case while a block is tried: what came before (at most raw + 3 per block), then the
     * block header and the room its streams are coded in */
    Py_ssize_t cap = 9 + n + 3 * (n / HUF_BLOCK + 1) + HUF_BLOCK_ROOM(HUF_BLOCK);
    uint8_t *buf = (uint8_t *)PyMem_RawMalloc((size_t)cap);
    if (buf == NULL) {
        PyBuffer_Release(&src);
        return PyErr_NoMemory();
    }
    huf_code h;
    h.elt2 = (uint64_t *)PyMem_RawMalloc(65536 * sizeof(uint64_t));
    h.len2 = (uint8_t *)PyMem_RawMalloc(65536);
    if (h.elt2 == NULL || h.len2 == NULL) {
        PyMem_RawFree(h.elt2);
        PyMem_RawFree(h.len2);
        PyMem_RawFree(buf);
        PyBuffer_Release(&src);
        return PyErr_NoMemory();
    }
    uint32_t count[256];
    Py_ssize_t got = -1;
    Py_BEGIN_ALLOW_THREADS
    histogram((const uint8_t *)src.buf, n, count);
    if (huf_build(count, &h)) got = huf_frame(&h, (const uint8_t *)src.buf, n, buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyObject *ret = got < 0 ? (Py_INCREF(Py_None), Py_None) : PyBytes_FromStringAndSize((const char *)buf, got);
    PyMem_RawFree(buf);
    PyMem_RawFree(h.elt2);
    PyMem_RawFree(h.len2);
    return ret;
}

/* merge3_bf16(base, ours, theirs, out, mode, w1, w2) -> conflicts: the three-way merge of bf16
 * elements (mvc/merge/engine.py). An element changed on one side takes that side; changed on both
 * to different values it is a conflict, left as ours (mode 0: no strategy) or computed in
 * float32 exactly as the numpy code does (mode 1: (w1*o + w2*t) / (w1+w2); mode 2: task arithmetic
 * b + w1*(o-b) + w2*(t-b)), each operation rounded to float32 in that order (built with
 * -ffp-contract=off: no fused multiply-add), then rounded to bf16 (nearest even; a NaN stays a
 * quiet NaN). The weights arrive as the float32 values numpy uses. */
static inline float bf16_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_bf16(float f) { /* branch-free: the loops below vectorize */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t nan = (uint16_t)((u >> 16) | 0x40), rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? nan : rounded;
}

/* Every element's strategy value is computed (whole-array math beats a branch per element when
 * most conflict, and costs little when few do: the loop vectorizes), then selected. */
#define MERGE3_LOOP(VALUE)                                                                     \
    for (Py_ssize_t i = 0; i < n; i++) {                                                       \
        uint16_t vb = pb[i], vo = po[i], vt = pt[i];                                           \
        int clash = (vo != vb) & (vt != vb) & (vo != vt);                                      \
        uint16_t keep = vo != vb ? vo : vt;                                                    \
        VALUE;                                                                                 \
        pm[i] = clash ? r : keep;                                                              \
        conflicts += clash;                                                                    \
    }

#define MERGE3_BODY                                                                            \
    {                                                                                          \
        Py_ssize_t conflicts = 0;                                                              \
        if (mode == 0) {                                                                       \
            MERGE3_LOOP(uint16_t r = keep) /* a conflict keeps ours: no --strategy */          \
        } else if (mode == 1) { /* (w1*o + w2*t) / (w1+w2) */                                  \
            MERGE3_LOOP(float x = w1 * bf16_f32(vo); float y = w2 * bf16_f32(vt); float sum = x + y; \
                        uint16_t r = f32_bf16(sum / wsum))                                     \
        } else { /* task arithmetic: b + w1*(o-b) + w2*(t-b) */                                \
            MERGE3_LOOP(float fb = bf16_f32(vb); float x = bf16_f32(vo) - fb; float y = bf16_f32(vt) - fb; \
                        float xo = w1 * x; float yt = w2 * y; float acc = fb + xo; uint16_t r = f32_bf16(acc + yt)) \
        }                                                                                      \
        return conflicts;                                                                      \
    }

typedef Py_ssize_t (*merge3_fn)(const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, Py_ssize_t, int,
                                float, float, float);

static Py_ssize_t merge3_plain(const uint16_t *pb, const uint16_t *po, const uint16_t *pt, uint16_t *pm, Py_ssize_t n,
                               int mode, float w1, float w2, float wsum) MERGE3_BODY

#ifdef X86_SIMD
#define MERGE3_AVX2 1
__attribute__((target("avx2")))
static Py_ssize_t merge3_avx2(const uint16_t *pb, const uint16_t *po, const uint16_t *pt, uint16_t *pm, Py_ssize_t n,
                              int mode, float w1, float w2, float wsum) MERGE3_BODY
#endif

static PyObject *k_merge3_bf16(PyObject *self, PyObject *args) {
    Py_buffer b, o, t, out;
    int mode;
    float w1, w2, wsum;
    if (!PyArg_ParseTuple(args, "y*y*y*w*ifff", &b, &o, &t, &out, &mode, &w1, &w2, &wsum)) return NULL;
    Py_ssize_t n = b.len / 2, conflicts = 0;
    int ok = b.len % 2 == 0 && o.len == b.len && t.len == b.len && out.len == b.len && mode >= 0 && mode <= 2;
    if (ok) {
        const uint16_t *pb = (const uint16_t *)b.buf, *po = (const uint16_t *)o.buf, *pt = (const uint16_t *)t.buf;
        uint16_t *pm = (uint16_t *)out.buf;
        Py_BEGIN_ALLOW_THREADS
        merge3_fn fn = merge3_plain;
#ifdef MERGE3_AVX2
        if (__builtin_cpu_supports("avx2")) fn = merge3_avx2;
#endif
        conflicts = fn(pb, po, pt, pm, n, mode, w1, w2, wsum);
        Py_END_ALLOW_THREADS
    } else {
        PyErr_SetString(PyExc_ValueError, "bad buffer lengths or merge mode");
    }
    PyBuffer_Release(&b);
    PyBuffer_Release(&o);
    PyBuffer_Release(&t);
    PyBuffer_Release(&out);
    return ok ? PyLong_FromSsize_t(conflicts) : NULL;
}

/* rtn8(parent, pdtype, scales, cols, col0, out): the int8 codes that per-row symmetric
 * round-to-nearest gives the parent's floats (bits of F32, F16 or BF16: pdtype 0, 1, 2), the
 * chunk starting at column col0 of rows of cols, one float32 scale per row from that row on:
 * clip(rint(x / scale), -127, 127), NaN -> 0 (codec.predict_rtn8 computes the same in numpy;
 * tests/test_kernels.py compares them). Clipping before rounding gives the same codes (no value
 * between 127 and 127.5 rounds past 127), and then |q| <= 127, so adding and taking away 1.5 *
 * 2^23 rounds it to the nearest integer, ties to even, as rint does, with no call per element.
 * The division is a division (not a product with the reciprocal), as numpy's. */
static inline float half_f32(uint16_t h) { /* exact */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF, u;
    if (e == 0x1F) {
        u = sign | 0x7F800000u | (m << 13);
    } else if (e) {
        u = sign | ((e + 112) << 23) | (m << 13);
    } else if (m) { /* subnormal: normalize */
        uint32_t x = 113;
        while (!(m & 0x400)) {
            m <<= 1;
            x--;
        }
        u = sign | (x << 23) | ((m & 0x3FF) << 13);
    } else {
        u = sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* one row's elements [from, to), each loop on its own kind so that it vectorizes */
#define RTN8_Q(x)                                                                              \
    float q = (x) / sc;                                                                        \
    q = q == q ? q : 0.0f;                                                                     \
    q = q > 127.0f ? 127.0f : q;                                                               \
    q = q < -127.0f ? -127.0f : q;                                                             \
    q = (q + 12582912.0f) - 12582912.0f;                                                       \
    out[i] = (uint8_t)(int8_t)(int32_t)q;
#define RTN8_BODY                                                                              \
    {                                                                                          \
        const uint16_t *restrict h = (const uint16_t *)p;                                      \
        const float *restrict f = (const float *)p;                                            \
        Py_ssize_t from = 0, row = 0, first = (cols - col0 % cols) % cols;                     \
        while (from < n) {                                                                     \
            Py_ssize_t to = row == 0 && first ? first : from + cols;                           \
            if (to > n) to = n;                                                                \
            const float sc = scales[row++];                                                    \
            if (pdtype == 2) {                                                                 \
                for (Py_ssize_t i = from; i < to; i++) {                                       \
                    uint32_t u = (uint32_t)h[i] << 16;                                         \
                    float x;                                                                   \
                    memcpy(&x, &u, 4);                                                         \
                    RTN8_Q(x)                                                                  \
                }                                                                              \
            } else if (pdtype == 1) {                                                          \
                for (Py_ssize_t i = from; i < to; i++) {                                       \
                    RTN8_Q(half_f32(h[i]))                                                     \
                }                                                                              \
            } else {                                                                           \
                for (Py_ssize_t i = from; i < to; i++) {                                       \
                    RTN8_Q(f[i])                                                               \
                }                                                                              \
            }                                                                                  \
            from = to;                                                                         \
        }                                                                                      \
    }
static void rtn8_base(const uint8_t *restrict p, int pdtype, const float *restrict scales, Py_ssize_t cols,
                      Py_ssize_t col0, uint8_t *restrict out, Py_ssize_t n) RTN8_BODY
#ifdef X86_SIMD
#include <immintrin.h>
/* 8 codes at a time: the same operations on 8 lanes (division, NaN -> 0, clip, the rounding
 * addition, truncation of an integer value) */
__attribute__((target("avx2,f16c")))
static inline void rtn8_8(__m256 x, __m256 s, uint8_t *out) {
    __m256 q = _mm256_div_ps(x, s);
    q = _mm256_and_ps(q, _mm256_cmp_ps(q, q, _CMP_ORD_Q));
    q = _mm256_max_ps(_mm256_min_ps(q, _mm256_set1_ps(127.0f)), _mm256_set1_ps(-127.0f));
    q = _mm256_sub_ps(_mm256_add_ps(q, _mm256_set1_ps(12582912.0f)), _mm256_set1_ps(12582912.0f));
    __m256i v = _mm256_cvttps_epi32(q);
    __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i *)out, _mm_packs_epi16(w, w));
}

__attribute__((target("avx2,f16c")))
static void rtn8_avx2(const uint8_t *restrict p, int pdtype, const float *restrict scales, Py_ssize_t cols,
                      Py_ssize_t col0, uint8_t *restrict out, Py_ssize_t n) {
    Py_ssize_t from = 0, row = 0, first = (cols - col0 % cols) % cols;
    while (from < n) {
        Py_ssize_t to = row == 0 && first ? first : from + cols, i = from;
        if (to > n) to = n;
        __m256 s = _mm256_set1_ps(scales[row]);
        for (; i + 8 <= to; i += 8) {
            __m256 x;
            if (pdtype == 2) {
                __m128i b = _mm_loadu_si128((const __m128i *)(p + 2 * i));
                x = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
            } else if (pdtype == 1) {
                x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * i)));
            } else {
                x = _mm256_loadu_ps((const float *)(p + 4 * i));
            }
            rtn8_8(x, s, out + i);
        }
        if (i < to) /* the row's last few: the plain loop */
            rtn8_base(p + (pdtype ? 2 : 4) * i, pdtype, scales + row, cols, 0, out + i, to - i);
        row++;
        from = to;
    }
}
#endif

static PyObject *k_rtn8(PyObject *self, PyObject *args) {
    Py_buffer par, sc, out;
    int pdtype;
    Py_ssize_t cols, col0;
    if (!PyArg_ParseTuple(args, "y*iy*nnw*", &par, &pdtype, &sc, &cols, &col0, &out)) return NULL;
    Py_ssize_t size = pdtype == 0 ? 4 : 2, n = out.len;
    Py_ssize_t rows = cols > 0 && col0 >= 0 ? (col0 % cols + n + cols - 1) / cols : 0; /* rows touched */
    PyObject *ret = NULL;
    if (pdtype < 0 || pdtype > 2 || cols <= 0 || col0 < 0 || par.len != n * size || sc.len % 4 ||
        sc.len / 4 < rows) {
        PyErr_SetString(PyExc_ValueError, "rtn8: parent, scales and codes do not fit");
    } else {
        Py_BEGIN_ALLOW_THREADS
#ifdef X86_SIMD
        if (simd_cap >= 2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
            rtn8_avx2((const uint8_t *)par.buf, pdtype, (const float *)sc.buf, cols, col0, (uint8_t *)out.buf, n);
        else
#endif
            rtn8_base((const uint8_t *)par.buf, pdtype, (const float *)sc.buf, cols, col0, (uint8_t *)out.buf, n);
        Py_END_ALLOW_THREADS
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&par);
    PyBuffer_Release(&sc);
    PyBuffer_Release(&out);
    return ret;
}

/* undiff_parts(out, start, mask, values, nvalues, voff, hi, lo, is_float[, base_hi, base_lo])
 * -> voff: one DIFF level of two-byte elements applied to out (the elements start .. start +
 * len(out) of the chunk) straight from its planes' parts: the top plane NONZERO (the chunk's bit
 * mask, and its nvalues non-zero bytes with 16 bytes to spare after them, voff of them used
 * before start) and the low plane NIBBLES (the chunk's high and low nibble bytes). What merging
 * the planes that scatter and unnibbles make and then undiff would give, without making them
 * (docs/format.md §5.1). The base is out itself (in place), or, given base_hi and base_lo, the
 * planes of a PLANES value (rotated, as merge takes them) for out's elements, merged in the same
 * pass. 16 elements at a time with SSSE3, 32 with AVX2 where the CPU has it: a table gives, for
 * each mask byte, where its values go (pshufb), and the nibbles pair up with shifts. Returns the
 * values used by the end of out; -1 when the mask asks for more values than there are. start
 * must be a multiple of 16 (decode_slices' slices are). */
#if defined(X86_SIMD) && defined(__SSE2__)
#define HAVE_UNDIFF_PARTS 1
/* the last few elements of a chunk, one at a time */
static Py_ssize_t undiff_parts_tail(uint16_t *out, Py_ssize_t start, Py_ssize_t i, Py_ssize_t n, const uint8_t *mask,
                                    const uint8_t *vals, Py_ssize_t nvals, Py_ssize_t voff, const uint8_t *hi,
                                    const uint8_t *lo, int fl, const uint8_t *bh, const uint8_t *bl) {
    for (; i < n; i++) {
        Py_ssize_t e = start + i;
        uint16_t h = 0;
        if (mask[e >> 3] >> (e & 7) & 1) {
            if (voff >= nvals) return -1;
            h = vals[voff++];
        }
        uint8_t hb = hi[e >> 1], lb = lo[e >> 1];
        uint8_t l = e & 1 ? (uint8_t)((hb & 0xF0) | (lb >> 4)) : (uint8_t)((hb << 4) | (lb & 0x0F));
        uint16_t z = (uint16_t)(h << 8 | l), d = (uint16_t)((z >> 1) ^ (uint16_t)(0 - (z & 1)));
        uint16_t y = out[i];
        if (bh) {
            uint16_t v = (uint16_t)(bh[i] << 8 | bl[i]);
            y = (uint16_t)((v >> 1) | (uint16_t)(v << 15));
        }
        out[i] = fl ? unorder_2((uint16_t)(order_2(y) + d)) : (uint16_t)(y + d);
    }
    return voff;
}

/* Whether the mask's bits for elements [start, start + m) (m a multiple of 16) ask for at most
 * the values left after voff: checked once, so that the loops load without a test (the values
 * buffer has 16 bytes to spare past its nvals: a load of 16 at voff <= nvals stays inside it). */
static int values_suffice(const uint8_t *mask, Py_ssize_t start, Py_ssize_t m, Py_ssize_t nvals, Py_ssize_t voff) {
    Py_ssize_t need = 0;
    for (Py_ssize_t j = start >> 3; j < (start + m) >> 3; j++) need += bits_in[mask[j]];
    return need <= nvals - voff;
}

/* the same, eight mask bytes to a popcnt, the last few left to values_suffice (for the AVX2
 * loop: every CPU with AVX2 has popcnt) */
__attribute__((target("popcnt")))
static int values_suffice_popcnt(const uint8_t *mask, Py_ssize_t start, Py_ssize_t m, Py_ssize_t nvals,
                                 Py_ssize_t voff) {
    Py_ssize_t need = 0, j = start >> 3, end = (start + m) >> 3;
    for (; j + 8 <= end; j += 8) {
        uint64_t w;
        memcpy(&w, mask + j, 8);
        need += __builtin_popcountll(w);
    }
    return values_suffice(mask, j << 3, (end - j) << 3, nvals, voff + need);
}

__attribute__((target("ssse3")))
static Py_ssize_t undiff_parts_ssse3(uint16_t *out, Py_ssize_t start, Py_ssize_t n, const uint8_t *mask,
                                     const uint8_t *vals, Py_ssize_t nvals, Py_ssize_t voff, const uint8_t *hi,
                                     const uint8_t *lo, int fl, const uint8_t *bh, const uint8_t *bl) {
    const __m128i f0 = _mm_set1_epi8(0x0F), one = _mm_set1_epi16(1), top = _mm_set1_epi16((short)0x8000);
    Py_ssize_t i = 0;
    if (!values_suffice(mask, start, n & ~(Py_ssize_t)15, nvals, voff)) return -1;
    for (; i + 16 <= n; i += 16) {
        Py_ssize_t e = start + i;
        unsigned w0 = mask[e >> 3], w1 = mask[(e >> 3) + 1];
        Py_ssize_t c0 = bits_in[w0], c1 = bits_in[w1];
        __m128i v0 = _mm_loadu_si128((const __m128i *)(vals + voff));
        __m128i v1 = _mm_loadu_si128((const __m128i *)(vals + voff + c0));
        voff += c0 + c1;
        __m128i h8 = _mm_unpacklo_epi64(_mm_shuffle_epi8(v0, _mm_loadu_si128((const __m128i *)put_at[w0])),
                                        _mm_shuffle_epi8(v1, _mm_loadu_si128((const __m128i *)put_at[w1])));
        __m128i H = _mm_loadl_epi64((const __m128i *)(hi + (e >> 1)));
        __m128i L = _mm_loadl_epi64((const __m128i *)(lo + (e >> 1)));
        __m128i a = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(H, f0), 4), _mm_and_si128(L, f0));
        __m128i b = _mm_or_si128(_mm_andnot_si128(f0, H), _mm_and_si128(_mm_srli_epi16(L, 4), f0));
        __m128i l8 = _mm_unpacklo_epi8(a, b); /* the low plane's 16 bytes */
        __m128i BH = bh ? _mm_loadu_si128((const __m128i *)(bh + i)) : _mm_setzero_si128();
        __m128i BL = bh ? _mm_loadu_si128((const __m128i *)(bl + i)) : _mm_setzero_si128();
        for (int half = 0; half < 2; half++) {
            __m128i z = half ? _mm_unpackhi_epi8(l8, h8) : _mm_unpacklo_epi8(l8, h8);
            __m128i d = _mm_xor_si128(_mm_srli_epi16(z, 1), _mm_sub_epi16(_mm_setzero_si128(), _mm_and_si128(z, one)));
            __m128i *at = (__m128i *)(out + i + 8 * half);
            __m128i y;
            if (bh) {
                __m128i v = half ? _mm_unpackhi_epi8(BL, BH) : _mm_unpacklo_epi8(BL, BH);
                y = _mm_or_si128(_mm_srli_epi16(v, 1), _mm_slli_epi16(v, 15));
            } else {
                y = _mm_loadu_si128(at);
            }
            if (fl) {
                __m128i o = _mm_xor_si128(y, _mm_or_si128(_mm_srai_epi16(y, 15), top));
                __m128i m = _mm_add_epi16(o, d);
                y = _mm_xor_si128(m, _mm_or_si128(_mm_xor_si128(_mm_srai_epi16(m, 15), _mm_set1_epi16(-1)), top));
            } else {
                y = _mm_add_epi16(y, d);
            }
            _mm_storeu_si128(at, y);
        }
    }
    return undiff_parts_tail(out, start, i, n, mask, vals, nvals, voff, hi, lo, fl, bh, bl);
}

/* the AVX2 loops, built once per kind of base (planes or in place) and of element (float or not):
 * no test of either inside them. UNDIFF_PARTS_ELEMS16(BASE, FL, Z, AT) finishes the 16 elements
 * at out + i + AT, whose differences are the words Z (zigzag-coded). */
#define UNDIFF_PARTS_ELEMS16(BASE, FL, Z, AT)                                                  \
    {                                                                                          \
        __m256i d = _mm256_xor_si256(_mm256_srli_epi16(Z, 1),                                  \
                                     _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_and_si256(Z, one))); \
        __m256i y;                                                                             \
        if (BASE) { /* the base's planes, merged here: low byte from bl, high from bh, rotated */ \
            __m256i v = _mm256_or_si256(                                                       \
                _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(bl + i + (AT)))),       \
                _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(bh + i + (AT)))), 8)); \
            y = _mm256_or_si256(_mm256_srli_epi16(v, 1), _mm256_slli_epi16(v, 15));            \
        } else {                                                                               \
            y = _mm256_loadu_si256((const __m256i *)(out + i + (AT)));                         \
        }                                                                                      \
        if (FL) {                                                                              \
            __m256i o = _mm256_xor_si256(y, _mm256_or_si256(_mm256_srai_epi16(y, 15), top));   \
            __m256i m = _mm256_add_epi16(o, d);                                                \
            y = _mm256_xor_si256(m, _mm256_or_si256(_mm256_xor_si256(_mm256_srai_epi16(m, 15), ones), top)); \
        } else {                                                                               \
            y = _mm256_add_epi16(y, d);                                                        \
        }                                                                                      \
        _mm256_storeu_si256((__m256i *)(out + i + (AT)), y);                                   \
    }

/* 32 elements a turn: each 128-bit lane takes one mask byte's top-plane bytes straight into the
 * high bytes of its 8 words (put_hi), the low plane's bytes widen into the low bytes */
#define UNDIFF_PARTS_AVX2(BASE, FL)                                                            \
    for (; i + 32 <= n; i += 32) {                                                             \
        Py_ssize_t e = start + i;                                                              \
        unsigned w0 = mask[e >> 3], w1 = mask[(e >> 3) + 1], w2 = mask[(e >> 3) + 2], w3 = mask[(e >> 3) + 3]; \
        Py_ssize_t c0 = bits_in[w0], c01 = c0 + bits_in[w1], c012 = c01 + bits_in[w2];        \
        __m256i h01 = _mm256_shuffle_epi8(                                                     \
            _mm256_loadu2_m128i((const __m128i *)(vals + voff + c0), (const __m128i *)(vals + voff)), \
            _mm256_loadu2_m128i((const __m128i *)put_hi[w1], (const __m128i *)put_hi[w0]));    \
        __m256i h23 = _mm256_shuffle_epi8(                                                     \
            _mm256_loadu2_m128i((const __m128i *)(vals + voff + c012), (const __m128i *)(vals + voff + c01)), \
            _mm256_loadu2_m128i((const __m128i *)put_hi[w3], (const __m128i *)put_hi[w2]));    \
        voff += c012 + bits_in[w3];                                                            \
        __m128i H = _mm_loadu_si128((const __m128i *)(hi + (e >> 1)));                         \
        __m128i L = _mm_loadu_si128((const __m128i *)(lo + (e >> 1)));                         \
        __m128i a = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(H, f0), 4), _mm_and_si128(L, f0)); \
        __m128i b = _mm_or_si128(_mm_andnot_si128(f0, H), _mm_and_si128(_mm_srli_epi16(L, 4), f0)); \
        __m256i z01 = _mm256_or_si256(h01, _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b)));     \
        __m256i z23 = _mm256_or_si256(h23, _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b)));     \
        UNDIFF_PARTS_ELEMS16(BASE, FL, z01, 0)                                                 \
        UNDIFF_PARTS_ELEMS16(BASE, FL, z23, 16)                                                \
    }

__attribute__((target("avx2")))
static Py_ssize_t undiff_parts_avx2(uint16_t *out, Py_ssize_t start, Py_ssize_t n, const uint8_t *mask,
                                    const uint8_t *vals, Py_ssize_t nvals, Py_ssize_t voff, const uint8_t *hi,
                                    const uint8_t *lo, int fl, const uint8_t *bh, const uint8_t *bl) {
    const __m128i f0 = _mm_set1_epi8(0x0F);
    const __m256i one = _mm256_set1_epi16(1), top = _mm256_set1_epi16((short)0x8000), ones = _mm256_set1_epi16(-1);
    Py_ssize_t i = 0;
    if (!values_suffice_popcnt(mask, start, n & ~(Py_ssize_t)15, nvals, voff)) return -1;
    if (bh && fl) {
        UNDIFF_PARTS_AVX2(1, 1)
    } else if (bh) {
        UNDIFF_PARTS_AVX2(1, 0)
    } else if (fl) {
        UNDIFF_PARTS_AVX2(0, 1)
    } else {
        UNDIFF_PARTS_AVX2(0, 0)
    }
    return undiff_parts_tail(out, start, i, n, mask, vals, nvals, voff, hi, lo, fl, bh, bl);
}

static PyObject *k_undiff_parts(PyObject *self, PyObject *args) {
    Py_buffer out, mask, vals, hi, lo, bh = {0}, bl = {0};
    Py_ssize_t start, nvals, voff;
    int fl;
    if (!PyArg_ParseTuple(args, "w*ny*y*nny*y*p|y*y*", &out, &start, &mask, &vals, &nvals, &voff, &hi, &lo, &fl, &bh,
                          &bl))
        return NULL;
    Py_ssize_t n = out.len / 2, end = start + n, got = -1;
    int ok = have_ssse3 && out.len % 2 == 0 && start >= 0 && start % 16 == 0 && nvals >= 0 &&
             vals.len >= nvals + 16 && voff >= 0 && voff <= nvals &&
             mask.len >= (end + 7) / 8 && hi.len >= (end + 1) / 2 && lo.len == hi.len &&
             (bh.buf == NULL) == (bl.buf == NULL) &&
             (bh.buf == NULL || (bh.len == n && bl.len == n));
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "undiff_parts: buffers do not fit");
    } else {
        const uint8_t *ph = (const uint8_t *)bh.buf, *pl = (const uint8_t *)bl.buf;
        Py_BEGIN_ALLOW_THREADS
        if (simd_cap >= 2 && __builtin_cpu_supports("avx2"))
            got = undiff_parts_avx2((uint16_t *)out.buf, start, n, (const uint8_t *)mask.buf, (const uint8_t *)vals.buf,
                                    nvals, voff, (const uint8_t *)hi.buf, (const uint8_t *)lo.buf, fl, ph, pl);
        else
            got = undiff_parts_ssse3((uint16_t *)out.buf, start, n, (const uint8_t *)mask.buf, (const uint8_t *)vals.buf,
                                     nvals, voff, (const uint8_t *)hi.buf, (const uint8_t *)lo.buf, fl, ph, pl);
        Py_END_ALLOW_THREADS
        if (got < 0) PyErr_SetString(PyExc_ValueError, "undiff_parts: the mask asks for more values than there are");
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&mask);
    PyBuffer_Release(&vals);
    PyBuffer_Release(&hi);
    PyBuffer_Release(&lo);
    if (bh.buf) PyBuffer_Release(&bh);
    if (bl.buf) PyBuffer_Release(&bl);
    return got < 0 ? NULL : PyLong_FromSsize_t(got);
}

static PyObject *k_undiff_parts_ready(PyObject *self, PyObject *args) { return PyBool_FromLong(have_ssse3); }
#endif

static PyObject *k_simd_cap(PyObject *self, PyObject *args) {
    int level, was = simd_cap;
    if (!PyArg_ParseTuple(args, "i", &level)) return NULL;
    simd_cap = level;
    return PyLong_FromLong(was);
}

static PyObject *k_gather(PyObject *self, PyObject *args) { return sparse(args, 0); }
static PyObject *k_scatter(PyObject *self, PyObject *args) { return sparse(args, 1); }

/* nibbles(src, hi, lo): the bytes of src in pairs (the last paired with 0 when there is an odd
 * number): hi[i] = src[2i] >> 4 | (src[2i+1] & 0xf0), lo[i] = (src[2i] & 0x0f) | src[2i+1] << 4.
 * unnibbles(hi, lo, dst): the inverse, len(dst) bytes. A noise plane of deltas (docs/format.md
 * §5.1, NIBBLES) is coded as its hi bytes (zstd) and its lo bytes (raw). */
static void nib(const uint8_t *s, uint8_t *hi, uint8_t *lo, Py_ssize_t n) {
    Py_ssize_t m = n / 2, i = 0;
#if defined(__SSE2__)
    /* 16 pairs at a time: the first bytes of the pairs and the second ones apart (each the low or
     * the high byte of a 16-bit lane), then their nibbles put together */
    const __m128i low8 = _mm_set1_epi16(0x00FF), f0 = _mm_set1_epi8(0x0F);
    for (; i + 16 <= m; i += 16) {
        __m128i x0 = _mm_loadu_si128((const __m128i *)(s + 2 * i)), x1 = _mm_loadu_si128((const __m128i *)(s + 2 * i + 16));
        __m128i a = _mm_packus_epi16(_mm_and_si128(x0, low8), _mm_and_si128(x1, low8));
        __m128i b = _mm_packus_epi16(_mm_srli_epi16(x0, 8), _mm_srli_epi16(x1, 8));
        __m128i h = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(a, 4), f0), _mm_andnot_si128(f0, b));
        __m128i l = _mm_or_si128(_mm_and_si128(a, f0), _mm_andnot_si128(f0, _mm_slli_epi16(b, 4)));
        _mm_storeu_si128((__m128i *)(hi + i), h);
        _mm_storeu_si128((__m128i *)(lo + i), l);
    }
#endif
    for (; i < m; i++) {
        uint8_t a = s[2 * i], b = s[2 * i + 1];
        hi[i] = (uint8_t)((a >> 4) | (b & 0xf0));
        lo[i] = (uint8_t)((a & 0x0f) | (b << 4));
    }
    if (n & 1) {
        hi[m] = (uint8_t)(s[n - 1] >> 4);
        lo[m] = (uint8_t)(s[n - 1] & 0x0f);
    }
}

static void unnib(const uint8_t *hi, const uint8_t *lo, uint8_t *d, Py_ssize_t n) {
    Py_ssize_t m = n / 2;
    for (Py_ssize_t i = 0; i < m; i++) {
        uint8_t h = hi[i], l = lo[i];
        d[2 * i] = (uint8_t)((h << 4) | (l & 0x0f));
        d[2 * i + 1] = (uint8_t)((h & 0xf0) | (l >> 4));
    }
    if (n & 1) d[n - 1] = (uint8_t)((hi[m] << 4) | (lo[m] & 0x0f));
}

/* nibbles(src, hi, lo) and unnibbles(hi, lo, dst): the plane is the one buffer of its own length,
 * hi and lo (len + 1) // 2 bytes each. */
static PyObject *nibbling(PyObject *args, int back) {
    Py_buffer a, b, c; /* forward: plane, hi, lo; back: hi, lo, plane */
    if (!PyArg_ParseTuple(args, back ? "y*y*w*" : "y*w*w*", &a, &b, &c)) return NULL;
    Py_buffer *plane = back ? &c : &a, *hi = back ? &a : &b, *lo = back ? &b : &c;
    PyObject *ret = NULL;
    if (hi->len != (plane->len + 1) / 2 || lo->len != hi->len) {
        PyErr_SetString(PyExc_ValueError, "nibbles: hi and lo must hold (len(plane) + 1) // 2 bytes");
    } else {
        Py_BEGIN_ALLOW_THREADS
        if (back)
            unnib((const uint8_t *)hi->buf, (const uint8_t *)lo->buf, (uint8_t *)plane->buf, plane->len);
        else
            nib((const uint8_t *)plane->buf, (uint8_t *)hi->buf, (uint8_t *)lo->buf, plane->len);
        Py_END_ALLOW_THREADS
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&c);
    return ret;
}

static PyObject *k_nibbles(PyObject *self, PyObject *args) { return nibbling(args, 0); }
static PyObject *k_unnibbles(PyObject *self, PyObject *args) { return nibbling(args, 1); }

static PyObject *k_split(PyObject *self, PyObject *args) { return one(args, SPLIT); }
static PyObject *k_merge(PyObject *self, PyObject *args) { return planar(args, 0); }
static PyObject *k_diff(PyObject *self, PyObject *args) { return two(args, DIFF); }
static PyObject *k_undiff(PyObject *self, PyObject *args) { return planar(args, 1); }

/* ---- tiny tensors: the per-tensor work of ingesting a run of them, in one call ---------------
 *
 * tiny_run(hasher, buf, base, entries, lo, hi, data_start, tails, head, encode, raw_below,
 *          pairs, names, path, locations, scratch) -> bytes stored
 *
 * For entries[lo:hi] (safetensors header entries: name, dtype, shape, begin, end; the data at file
 * offset data_start + begin, which *buf* holds from file offset *base*), each a tensor of one
 * chunk under 4 KiB, does what pipeline.Ingestor does for one tiny tensor: the chunk's id
 * (hasher(b"chunk <n>\0" + data).digest()), the tensor object's canonical JSON
 * (head + chunk id in hex + tails[(dtype, shape)][0]) and its id, and then
 *   - with *pairs* a list: appends (chunk id, stored chunk) and (tensor id, stored tensor), a value
 *     under *raw_below* bytes stored raw (type code, 0, bytes), others as encode(type code, bytes,
 *     float size) returns it (codec.encode; the float size is tails[(dtype, shape)][1]);
 *   - else: locations[chunk hex] = (path, file offset, n) and
 *     scratch[tensor hex] = (dtype, shape, chunk hex) (pipeline.Scratch makes the Tensor when asked);
 * and appends (name, tensor hex) to *names*. Returns the bytes of the values appended to pairs.
 * The hasher is called, not reimplemented: the ids are exactly hash_object's. */
#define TINY_MAX 4096

static PyObject *hex_of(const unsigned char *d, Py_ssize_t n) {
    static const char digits[] = "0123456789abcdef";
    PyObject *s = PyUnicode_New(2 * n, 127);
    if (s == NULL) return NULL;
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(s);
    for (Py_ssize_t i = 0; i < n; i++) {
        out[2 * i] = (Py_UCS1)digits[d[i] >> 4];
        out[2 * i + 1] = (Py_UCS1)digits[d[i] & 15];
    }
    return s;
}

/* hasher(b"<kind> <n>\0" + data).digest(): 32 bytes, or NULL with an exception set */
static PyObject *object_id(PyObject *hasher, const char *kind, const char *data, Py_ssize_t n, char *scratch) {
    int h = 0;
    while (*kind) scratch[h++] = *kind++;
    scratch[h++] = ' ';
    char digits[24];
    int d = 0;
    Py_ssize_t v = n;
    do {
        digits[d++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (d) scratch[h++] = digits[--d];
    scratch[h] = '\0';
    memcpy(scratch + h + 1, data, (size_t)n);
    PyObject *whole = PyBytes_FromStringAndSize(scratch, h + 1 + n);
    if (whole == NULL) return NULL;
    PyObject *hobj = PyObject_CallOneArg(hasher, whole);
    Py_DECREF(whole);
    if (hobj == NULL) return NULL;
    static PyObject *name = NULL;
    if (name == NULL && (name = PyUnicode_InternFromString("digest")) == NULL) {
        Py_DECREF(hobj);
        return NULL;
    }
    PyObject *digest = PyObject_CallMethodNoArgs(hobj, name);
    Py_DECREF(hobj);
    if (digest != NULL && (!PyBytes_Check(digest) || PyBytes_GET_SIZE(digest) != 32)) {
        Py_DECREF(digest);
        PyErr_SetString(PyExc_ValueError, "the hasher's digest is not 32 bytes");
        return NULL;
    }
    return digest;
}

/* the stored value of an object: raw below raw_below bytes, else encode(type_code, bytes, fs) */
static PyObject *stored_value(PyObject *encode, int type_code, const char *data, Py_ssize_t n, long fs,
                              Py_ssize_t raw_below) {
    if (n < raw_below) {
        PyObject *v = PyBytes_FromStringAndSize(NULL, n + 2);
        if (v == NULL) return NULL;
        char *p = PyBytes_AS_STRING(v);
        p[0] = (char)type_code;
        p[1] = 0; /* RAW */
        memcpy(p + 2, data, (size_t)n);
        return v;
    }
    PyObject *b = PyBytes_FromStringAndSize(data, n);
    if (b == NULL) return NULL;
    PyObject *v = PyObject_CallFunction(encode, "iOl", type_code, b, fs);
    Py_DECREF(b);
    if (v != NULL && !PyBytes_Check(v)) {
        Py_DECREF(v);
        PyErr_SetString(PyExc_TypeError, "encode did not return bytes");
        return NULL;
    }
    return v;
}

static int append_pair(PyObject *list, PyObject *a, PyObject *b) {
    PyObject *t = PyTuple_Pack(2, a, b);
    if (t == NULL) return -1;
    int r = PyList_Append(list, t);
    Py_DECREF(t);
    return r;
}

static PyObject *k_tiny_run(PyObject *self, PyObject *args) {
    PyObject *hasher, *entries, *tails, *encode, *pairs, *names, *path, *locations, *scratch;
    Py_buffer buf, head;
    Py_ssize_t base, lo, hi, data_start, raw_below;
    if (!PyArg_ParseTuple(args, "Oy*nO!nnnO!y*OnOO!OOO", &hasher, &buf, &base, &PyTuple_Type, &entries, &lo,
                          &hi, &data_start, &PyDict_Type, &tails, &head, &encode, &raw_below, &pairs,
                          &PyList_Type, &names, &path, &locations, &scratch))
        return NULL;
    PyObject *result = NULL;
    char *meta = NULL, *scratch_buf = NULL;
    Py_ssize_t added = 0;
    int store = PyList_Check(pairs);
    if (!store && !(PyDict_Check(locations) && PyDict_Check(scratch))) {
        PyErr_SetString(PyExc_TypeError, "tiny_run: pairs must be a list, or locations and scratch dicts");
        goto done;
    }
    if (lo < 0 || hi > PyTuple_GET_SIZE(entries) || lo > hi || head.len > 256) {
        PyErr_SetString(PyExc_ValueError, "tiny_run: bad entry range or head");
        goto done;
    }
    meta = (char *)PyMem_Malloc(1024);
    scratch_buf = (char *)PyMem_Malloc(TINY_MAX + 1024 + 64);
    if (meta == NULL || scratch_buf == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(meta, head.buf, (size_t)head.len);
    for (Py_ssize_t i = lo; i < hi; i++) {
        PyObject *e = PyTuple_GET_ITEM(entries, i);
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 5) {
            PyErr_SetString(PyExc_TypeError, "tiny_run: an entry is not a 5-tuple");
            goto done;
        }
        PyObject *name = PyTuple_GET_ITEM(e, 0), *dtype = PyTuple_GET_ITEM(e, 1), *shape = PyTuple_GET_ITEM(e, 2);
        Py_ssize_t begin = PyLong_AsSsize_t(PyTuple_GET_ITEM(e, 3));
        Py_ssize_t end = PyLong_AsSsize_t(PyTuple_GET_ITEM(e, 4));
        if ((begin == -1 || end == -1) && PyErr_Occurred()) goto done;
        Py_ssize_t n = end - begin, at = data_start + begin - base;
        if (begin < 0 || n <= 0 || n >= TINY_MAX || at < 0 || at > buf.len - n) {
            PyErr_SetString(PyExc_ValueError, "tiny_run: an entry is not a tiny tensor inside the buffer");
            goto done;
        }
        const char *data = (const char *)buf.buf + at;
        PyObject *key = PyTuple_Pack(2, dtype, shape);
        if (key == NULL) goto done;
        PyObject *tail_fs = PyDict_GetItemWithError(tails, key); /* borrowed */
        Py_DECREF(key);
        if (tail_fs == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyError, "tiny_run: no tail for a dtype and shape");
            goto done;
        }
        PyObject *tail;
        long fs;
        if (!PyTuple_Check(tail_fs) || PyTuple_GET_SIZE(tail_fs) != 2 || !PyBytes_Check(tail = PyTuple_GET_ITEM(tail_fs, 0))
            || PyBytes_GET_SIZE(tail) > 1024 - 64 - head.len) {
            PyErr_SetString(PyExc_TypeError, "tiny_run: a tail is not (bytes, float size)");
            goto done;
        }
        fs = PyLong_AsLong(PyTuple_GET_ITEM(tail_fs, 1));
        if (fs == -1 && PyErr_Occurred()) goto done;

        PyObject *cid = NULL, *chex = NULL, *tid = NULL, *thex = NULL, *cval = NULL, *tval = NULL, *t = NULL;
        int ok = 0;
        cid = object_id(hasher, "chunk", data, n, scratch_buf);
        if (cid == NULL) goto one_done;
        chex = hex_of((const unsigned char *)PyBytes_AS_STRING(cid), 32);
        if (chex == NULL) goto one_done;
        Py_ssize_t mlen = head.len;
        memcpy(meta + mlen, PyUnicode_1BYTE_DATA(chex), 64);
        mlen += 64;
        memcpy(meta + mlen, PyBytes_AS_STRING(tail), (size_t)PyBytes_GET_SIZE(tail));
        mlen += PyBytes_GET_SIZE(tail);
        tid = object_id(hasher, "tensor", meta, mlen, scratch_buf);
        if (tid == NULL) goto one_done;
        thex = hex_of((const unsigned char *)PyBytes_AS_STRING(tid), 32);
        if (thex == NULL) goto one_done;
        if (store) {
            cval = stored_value(encode, 0, data, n, fs, raw_below);
            if (cval == NULL || append_pair(pairs, cid, cval)) goto one_done;
            tval = stored_value(encode, 1, meta, mlen, 0, raw_below);
            if (tval == NULL || append_pair(pairs, tid, tval)) goto one_done;
            added += PyBytes_GET_SIZE(cval) + PyBytes_GET_SIZE(tval);
        } else {
            t = Py_BuildValue("(Onn)", path, data_start + begin, n);
            if (t == NULL || PyDict_SetItem(locations, chex, t)) goto one_done;
            Py_CLEAR(t);
            t = PyTuple_Pack(3, dtype, shape, chex);
            if (t == NULL || PyDict_SetItem(scratch, thex, t)) goto one_done;
        }
        if (append_pair(names, name, thex)) goto one_done;
        ok = 1;
    one_done:
        Py_XDECREF(cid);
        Py_XDECREF(chex);
        Py_XDECREF(tid);
        Py_XDECREF(thex);
        Py_XDECREF(cval);
        Py_XDECREF(tval);
        Py_XDECREF(t);
        if (!ok) goto done;
    }
    result = PyLong_FromSsize_t(added);
done:
    PyMem_Free(meta);
    PyMem_Free(scratch_buf);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&head);
    return result;
}

/* verified_raw(hasher, kind, type_code, oids, values, head) -> list
 *
 * For stored values read from the store (bytes or None) of objects *oids* (32-byte ids): each
 * value stored raw (type code, 0, content) whose content hashes to its id gives its content; any
 * other (None, another codec or type, a wrong hash) gives None, and the caller decodes it the
 * general way, which also raises the error that names what is wrong. With *head* (bytes, not
 * None) the content must also begin as a tiny tensor's JSON does, head + 64 lowercase hex digits,
 * and gives (those digits, the bytes after them): the caller checks that rest. */
static PyObject *k_verified_raw(PyObject *self, PyObject *args) {
    PyObject *hasher, *kind_obj, *oids, *values, *head;
    int type_code;
    if (!PyArg_ParseTuple(args, "OUiO!O!O", &hasher, &kind_obj, &type_code, &PyList_Type, &oids, &PyList_Type,
                          &values, &head))
        return NULL;
    const char *kind = PyUnicode_AsUTF8(kind_obj);
    if (kind == NULL) return NULL;
    if (strlen(kind) > 16 || PyList_GET_SIZE(oids) != PyList_GET_SIZE(values)
        || (head != Py_None && !PyBytes_Check(head))) {
        PyErr_SetString(PyExc_ValueError, "verified_raw: bad arguments");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(values), hlen = head == Py_None ? 0 : PyBytes_GET_SIZE(head);
    PyObject *out = PyList_New(count);
    char *scratch = (char *)PyMem_Malloc(TINY_MAX + 64);
    if (out == NULL || scratch == NULL) {
        Py_XDECREF(out);
        PyMem_Free(scratch);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *v = PyList_GET_ITEM(values, i), *oid = PyList_GET_ITEM(oids, i), *item = NULL;
        Py_ssize_t n;
        const char *p;
        if (!PyBytes_Check(v) || !PyBytes_Check(oid) || PyBytes_GET_SIZE(oid) != 32 || (n = PyBytes_GET_SIZE(v) - 2) < 0
            || n >= TINY_MAX || (p = PyBytes_AS_STRING(v))[0] != (char)type_code || p[1] != 0)
            goto none;
        p += 2;
        if (head != Py_None) {
            const char *hp = PyBytes_AS_STRING(head);
            if (n < hlen + 64 || memcmp(p, hp, (size_t)hlen) != 0) goto none;
            for (Py_ssize_t j = hlen; j < hlen + 64; j++)
                if (!((p[j] >= '0' && p[j] <= '9') || (p[j] >= 'a' && p[j] <= 'f'))) goto none;
        }
        PyObject *id = object_id(hasher, kind, p, n, scratch);
        if (id == NULL) goto fail;
        int same = memcmp(PyBytes_AS_STRING(id), PyBytes_AS_STRING(oid), 32) == 0;
        Py_DECREF(id);
        if (!same) goto none;
        if (head == Py_None) {
            item = PyBytes_FromStringAndSize(p, n);
            if (item == NULL) goto fail;
        } else {
            PyObject *hex = PyUnicode_DecodeASCII(p + hlen, 64, NULL);
            PyObject *rest = PyBytes_FromStringAndSize(p + hlen + 64, n - hlen - 64);
            if (hex != NULL && rest != NULL) item = PyTuple_Pack(2, hex, rest);
            Py_XDECREF(hex);
            Py_XDECREF(rest);
            if (item == NULL) goto fail;
        }
        PyList_SET_ITEM(out, i, item);
        continue;
    none:
        Py_INCREF(Py_None);
        PyList_SET_ITEM(out, i, Py_None);
    }
    PyMem_Free(scratch);
    return out;
fail:
    PyMem_Free(scratch);
    Py_DECREF(out);
    return NULL;
}

/* safetensors_header(raw, data_size, sizes, entry_type) -> (entries, metadata) | None
 *
 * formats/safetensors.parse_header's common case in one pass: *raw* is the header's JSON, an
 * object of tensors {"dtype": str, "shape": [int, ...], "data_offsets": [int, int]} (those three
 * keys, each once, in any order) and at most one "__metadata__" object of strings. Strings hold
 * no escapes and no control characters, integers are plain digits (at most 18), whitespace is
 * JSON's. Returns the entries as *entry_type* tuples (name, dtype, shape, begin, end) sorted by
 * (begin, end), file order among equals, and the metadata dict or None, when every check of
 * parse_header holds: a known dtype (*sizes*: name -> element size), no repeated key anywhere,
 * begin <= end <= data_size, the shape's running product under 2^64, end - begin = size x
 * elements, and the entries tiling the data region. Anything else, valid or not, gives None and
 * the Python parser decides (and names what is wrong): this never accepts what it refuses
 * (tests/test_kernels.py). No recursion; every size is bounded by the header's length. */
typedef struct {
    const unsigned char *p, *end;
} st_cur;

static inline void st_ws(st_cur *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t')) c->p++;
}

static inline int st_lit(st_cur *c, unsigned char ch) {
    st_ws(c);
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        return 1;
    }
    return 0;
}

/* a string without escapes or control characters: its bytes are [*s, *s + *n) */
static int st_str(st_cur *c, const unsigned char **s, Py_ssize_t *n) {
    st_ws(c);
    if (c->p >= c->end || *c->p != '"') return 0;
    const unsigned char *q = ++c->p;
    while (q < c->end && *q != '"') {
        if (*q == '\\' || *q < 0x20) return 0;
        q++;
    }
    if (q >= c->end) return 0;
    *s = c->p;
    *n = q - c->p;
    c->p = q + 1;
    return 1;
}

/* a non-negative integer of at most 18 digits, no leading zero (JSON's form) */
static int st_num(st_cur *c, int64_t *v) {
    st_ws(c);
    const unsigned char *q = c->p;
    int64_t x = 0;
    while (q < c->end && *q >= '0' && *q <= '9' && q - c->p < 19) x = 10 * x + (*q++ - '0');
    Py_ssize_t digits = q - c->p;
    if (digits == 0 || digits > 18 || (digits > 1 && *c->p == '0')) return 0;
    if (q < c->end && ((*q >= '0' && *q <= '9') || *q == '.' || *q == 'e' || *q == 'E')) return 0;
    c->p = q;
    *v = x;
    return 1;
}

static PyObject *st_decode(const unsigned char *s, Py_ssize_t n) {
    PyObject *u = PyUnicode_DecodeUTF8((const char *)s, n, "strict");
    if (u == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) PyErr_Clear(); /* Python says it */
    return u;
}

typedef struct {
    int64_t begin, end;
    Py_ssize_t index;
} st_span;

static int st_span_cmp(const void *a, const void *b) {
    const st_span *x = (const st_span *)a, *y = (const st_span *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->index < y->index ? -1 : (x->index > y->index);
}

#define ST_DTYPES 64
#define ST_RANK 64

static PyObject *k_safetensors_header(PyObject *self, PyObject *args) {
    Py_buffer raw;
    long long data_size;
    PyObject *sizes, *etype_obj;
    if (!PyArg_ParseTuple(args, "y*LO!O!", &raw, &data_size, &PyDict_Type, &sizes, &PyType_Type, &etype_obj))
        return NULL;
    PyTypeObject *etype = (PyTypeObject *)etype_obj;
    PyObject *names = NULL, *meta = NULL, *rows = NULL, *result = NULL, *entries = NULL;
    st_span *spans = NULL;
    Py_ssize_t count = 0, room = 0;
    /* the dtype names: their str objects are the entries' dtypes */
    const char *dt_name[ST_DTYPES];
    Py_ssize_t dt_len[ST_DTYPES];
    PyObject *dt_obj[ST_DTYPES];
    int64_t dt_size[ST_DTYPES];
    int ndt = 0;
    if (!PyType_IsSubtype(etype, &PyTuple_Type) || etype->tp_basicsize != PyTuple_Type.tp_basicsize
        || etype->tp_itemsize != PyTuple_Type.tp_itemsize || data_size < 0) {
        PyErr_SetString(PyExc_TypeError, "safetensors_header: entry_type must be a plain tuple subclass");
        goto done;
    }
    {
        PyObject *k, *v;
        Py_ssize_t pos = 0;
        while (PyDict_Next(sizes, &pos, &k, &v)) {
            if (ndt == ST_DTYPES || !PyUnicode_Check(k) || !PyLong_Check(v)) {
                PyErr_SetString(PyExc_TypeError, "safetensors_header: sizes must map at most 64 str to int");
                goto done;
            }
            dt_name[ndt] = PyUnicode_AsUTF8AndSize(k, &dt_len[ndt]);
            dt_size[ndt] = PyLong_AsLongLong(v);
            if (dt_name[ndt] == NULL || (dt_size[ndt] == -1 && PyErr_Occurred())) goto done;
            if (dt_size[ndt] < 1 || dt_size[ndt] > 64) {
                PyErr_SetString(PyExc_ValueError, "safetensors_header: an element size out of range");
                goto done;
            }
            dt_obj[ndt++] = k;
        }
    }
    if ((names = PySet_New(NULL)) == NULL || (rows = PyList_New(0)) == NULL) goto done;
    st_cur c = {(const unsigned char *)raw.buf, (const unsigned char *)raw.buf + raw.len};
    const unsigned char *s;
    Py_ssize_t n;
    int seen_meta = 0;
    if (!st_lit(&c, '{')) goto none;
    if (!st_lit(&c, '}')) {
        do {
            if (!st_str(&c, &s, &n) || !st_lit(&c, ':')) goto none;
            if (n == 12 && memcmp(s, "__metadata__", 12) == 0) {
                if (seen_meta++ || (meta = PyDict_New()) == NULL || !st_lit(&c, '{')) goto none_or_error;
                if (!st_lit(&c, '}')) {
                    do {
                        const unsigned char *vs;
                        Py_ssize_t vn;
                        if (!st_str(&c, &s, &n) || !st_lit(&c, ':') || !st_str(&c, &vs, &vn)) goto none;
                        PyObject *k = st_decode(s, n), *v;
                        if (k == NULL) goto none_or_error;
                        if ((v = st_decode(vs, vn)) == NULL) {
                            Py_DECREF(k);
                            goto none_or_error;
                        }
                        int had = PyDict_Contains(meta, k);
                        int bad = had != 0 || PyDict_SetItem(meta, k, v) < 0;
                        Py_DECREF(k);
                        Py_DECREF(v);
                        if (bad) goto none_or_error;
                    } while (st_lit(&c, ','));
                    if (!st_lit(&c, '}')) goto none;
                }
                continue;
            }
            PyObject *name = st_decode(s, n);
            if (name == NULL) goto none_or_error;
            int had = PySet_Contains(names, name); /* a tensor named twice: Python names the error */
            if (had != 0 || PySet_Add(names, name) < 0) {
                Py_DECREF(name);
                goto none_or_error;
            }
            /* the tensor's object: dtype, shape, data_offsets */
            int have = 0, dt = -1, rank = 0;
            int64_t dims[ST_RANK], begin = 0, end = 0;
            if (!st_lit(&c, '{')) {
                Py_DECREF(name);
                goto none;
            }
            do {
                if (!st_str(&c, &s, &n) || !st_lit(&c, ':')) goto bad_tensor;
                if (n == 5 && memcmp(s, "dtype", 5) == 0 && !(have & 1)) {
                    have |= 1;
                    if (!st_str(&c, &s, &n)) goto bad_tensor;
                    for (int j = 0; j < ndt; j++)
                        if (dt_len[j] == n && memcmp(dt_name[j], s, (size_t)n) == 0) dt = j;
                    if (dt < 0) goto bad_tensor;
                } else if (n == 5 && memcmp(s, "shape", 5) == 0 && !(have & 2)) {
                    have |= 2;
                    if (!st_lit(&c, '[')) goto bad_tensor;
                    if (!st_lit(&c, ']')) {
                        do {
                            if (rank == ST_RANK || !st_num(&c, &dims[rank])) goto bad_tensor;
                            rank++;
                        } while (st_lit(&c, ','));
                        if (!st_lit(&c, ']')) goto bad_tensor;
                    }
                } else if (n == 12 && memcmp(s, "data_offsets", 12) == 0 && !(have & 4)) {
                    have |= 4;
                    if (!st_lit(&c, '[') || !st_num(&c, &begin) || !st_lit(&c, ',') || !st_num(&c, &end)
                        || !st_lit(&c, ']'))
                        goto bad_tensor;
                } else {
                    goto bad_tensor;
                }
            } while (st_lit(&c, ','));
            if (have != 7 || !st_lit(&c, '}')) goto bad_tensor;
            /* parse_header's checks: bounds, the running product under 2^64, size x elements */
            uint64_t elements = 1, bytes;
            for (int j = 0; j < rank; j++)
                if (__builtin_mul_overflow(elements, (uint64_t)dims[j], &elements)) goto bad_tensor;
            if (begin > end || end > data_size || __builtin_mul_overflow(elements, (uint64_t)dt_size[dt], &bytes)
                || bytes != (uint64_t)(end - begin))
                goto bad_tensor;
            PyObject *shape = PyTuple_New(rank);
            if (shape == NULL) {
                Py_DECREF(name);
                goto done;
            }
            for (int j = 0; j < rank; j++) {
                PyObject *d = PyLong_FromLongLong(dims[j]);
                if (d == NULL) {
                    Py_DECREF(shape);
                    Py_DECREF(name);
                    goto done;
                }
                PyTuple_SET_ITEM(shape, j, d);
            }
            PyObject *e = etype->tp_alloc(etype, 5), *b = PyLong_FromLongLong(begin), *f = PyLong_FromLongLong(end);
            if (e == NULL || b == NULL || f == NULL) {
                Py_XDECREF(e);
                Py_XDECREF(b);
                Py_XDECREF(f);
                Py_DECREF(shape);
                Py_DECREF(name);
                goto done;
            }
            Py_INCREF(dt_obj[dt]);
            PyTuple_SET_ITEM(e, 0, name);
            PyTuple_SET_ITEM(e, 1, dt_obj[dt]);
            PyTuple_SET_ITEM(e, 2, shape);
            PyTuple_SET_ITEM(e, 3, b);
            PyTuple_SET_ITEM(e, 4, f);
            int r = PyList_Append(rows, e);
            Py_DECREF(e);
            if (r < 0) goto done;
            if (count == room) {
                room = room ? 2 * room : 1024;
                st_span *more = (st_span *)PyMem_Realloc(spans, (size_t)room * sizeof(st_span));
                if (more == NULL) {
                    PyErr_NoMemory();
                    goto done;
                }
                spans = more;
            }
            spans[count].begin = begin;
            spans[count].end = end;
            spans[count].index = count;
            count++;
            continue;
        bad_tensor:
            Py_DECREF(name);
            goto none;
        } while (st_lit(&c, ','));
        if (!st_lit(&c, '}')) goto none;
    }
    st_ws(&c);
    if (c.p != c.end) goto none;
    /* the entries tile the data region: sorted by (begin, end), each begins where the last ended */
    if (count) qsort(spans, (size_t)count, sizeof(st_span), st_span_cmp);
    int64_t at = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (spans[i].begin != at) goto none;
        at = spans[i].end;
    }
    if (at != data_size) goto none;
    if ((entries = PyTuple_New(count)) == NULL) goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *e = PyList_GET_ITEM(rows, spans[i].index);
        Py_INCREF(e);
        PyTuple_SET_ITEM(entries, i, e);
    }
    result = PyTuple_Pack(2, entries, meta ? meta : Py_None);
    goto done;
none_or_error:
    if (PyErr_Occurred()) goto done;
none:
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyMem_Free(spans);
    Py_XDECREF(names);
    Py_XDECREF(meta);
    Py_XDECREF(rows);
    Py_XDECREF(entries);
    PyBuffer_Release(&raw);
    return result;
}

/* file_object(content) -> (chunks, size, tensors) | None
 * file_json(chunks, size, tensors) -> bytes | None
 *
 * The canonical JSON of a safetensors file object (docs/format.md §4: keys sorted, no spaces,
 * UTF-8) for the common case, read and written in one pass (a file object may list 100,000
 * tensors): {"chunks":[ids],"format":"safetensors","size":N,"tensors":[["name","id"],...]}, ids
 * 64 lowercase hex digits, N plain digits, names valid UTF-8 holding neither a quote, a backslash
 * nor a control character (json.dumps writes such a name as it is). file_object accepts exactly
 * those bytes and file_json writes exactly what objects.canonical_json writes; anything else gives
 * None and Python decides (tests/test_kernels.py). */
static int fo_lit(const char **p, const char *end, const char *s, Py_ssize_t n) {
    if (end - *p < n || memcmp(*p, s, (size_t)n) != 0) return 0;
    *p += n;
    return 1;
}

static int fo_hex64(const char *p, const char *end) {
    if (end - p < 66 || p[0] != '"' || p[65] != '"') return 0;
    for (int i = 1; i <= 64; i++)
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f'))) return 0;
    return 1;
}

static PyObject *fo_ascii(const char *s, Py_ssize_t n) {
    PyObject *u = PyUnicode_New(n, 127);
    if (u != NULL) memcpy(PyUnicode_1BYTE_DATA(u), s, (size_t)n);
    return u;
}

static PyObject *k_file_object(PyObject *self, PyObject *args) {
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "y*", &buf)) return NULL;
    const char *p = (const char *)buf.buf, *end = p + buf.len;
    PyObject *chunks = PyList_New(0), *tensors = PyList_New(0), *result = NULL, *ct = NULL, *tt = NULL;
    if (chunks == NULL || tensors == NULL) goto done;
    if (!fo_lit(&p, end, "{\"chunks\":[", 11)) goto none;
    if (!fo_lit(&p, end, "]", 1)) {
        do {
            if (!fo_hex64(p, end)) goto none;
            PyObject *id = fo_ascii(p + 1, 64);
            if (id == NULL || PyList_Append(chunks, id) < 0) {
                Py_XDECREF(id);
                goto done;
            }
            Py_DECREF(id);
            p += 66;
        } while (fo_lit(&p, end, ",", 1));
        if (!fo_lit(&p, end, "]", 1)) goto none;
    }
    if (!fo_lit(&p, end, ",\"format\":\"safetensors\",\"size\":", 31)) goto none;
    const char *d = p;
    long long size = 0;
    while (p < end && *p >= '0' && *p <= '9' && p - d < 19) size = 10 * size + (*p++ - '0');
    if (p == d || p - d > 18 || (p - d > 1 && *d == '0')) goto none;
    if (!fo_lit(&p, end, ",\"tensors\":[", 12)) goto none;
    if (!fo_lit(&p, end, "]", 1)) {
        do {
            if (!fo_lit(&p, end, "[\"", 2)) goto none;
            const char *s = p;
            while (p < end && *p != '"') {
                if (*p == '\\' || (unsigned char)*p < 0x20) goto none;
                p++;
            }
            if (p == end) goto none;
            Py_ssize_t n = p - s;
            p++;
            if (!fo_lit(&p, end, ",", 1) || !fo_hex64(p, end) || end - p < 67 || p[66] != ']') goto none;
            PyObject *name = st_decode((const unsigned char *)s, n);
            if (name == NULL) goto none_or_error;
            PyObject *id = fo_ascii(p + 1, 64), *pair = NULL;
            if (id != NULL) pair = PyTuple_Pack(2, name, id);
            Py_DECREF(name);
            Py_XDECREF(id);
            if (pair == NULL || PyList_Append(tensors, pair) < 0) {
                Py_XDECREF(pair);
                goto done;
            }
            Py_DECREF(pair);
            p += 67;
        } while (fo_lit(&p, end, ",", 1));
        if (!fo_lit(&p, end, "]", 1)) goto none;
    }
    if (!fo_lit(&p, end, "}", 1) || p != end) goto none;
    if ((ct = PyList_AsTuple(chunks)) == NULL || (tt = PyList_AsTuple(tensors)) == NULL) goto done;
    result = Py_BuildValue("(OLO)", ct, size, tt);
    goto done;
none_or_error:
    if (PyErr_Occurred()) goto done;
none:
    Py_INCREF(Py_None);
    result = Py_None;
done:
    Py_XDECREF(chunks);
    Py_XDECREF(tensors);
    Py_XDECREF(ct);
    Py_XDECREF(tt);
    PyBuffer_Release(&buf);
    return result;
}

/* a str json.dumps(ensure_ascii=False) writes as it is: its UTF-8 bytes, else NULL (no error) */
static const char *fo_plain(PyObject *s, Py_ssize_t *n) {
    if (!PyUnicode_Check(s)) return NULL;
    const char *u = PyUnicode_AsUTF8AndSize(s, n);
    if (u == NULL) {
        PyErr_Clear(); /* a lone surrogate: Python says what is wrong */
        return NULL;
    }
    for (Py_ssize_t i = 0; i < *n; i++)
        if (u[i] == '"' || u[i] == '\\' || (unsigned char)u[i] < 0x20) return NULL;
    return u;
}

static PyObject *k_file_json(PyObject *self, PyObject *args) {
    PyObject *chunks, *tensors, *size_obj;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyTuple_Type, &chunks, &PyLong_Type, &size_obj, &PyTuple_Type, &tensors))
        return NULL;
    if (!PyLong_CheckExact(size_obj)) Py_RETURN_NONE;
    long long size = PyLong_AsLongLong(size_obj);
    if (size == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (size < 0) Py_RETURN_NONE;
    Py_ssize_t nc = PyTuple_GET_SIZE(chunks), nt = PyTuple_GET_SIZE(tensors), total = 64 + 24, n;
    for (int pass = 0; pass < 2; pass++) {
        /* pass 0 measures and checks, pass 1 writes */
        PyObject *out = NULL;
        char *w = NULL;
        if (pass) {
            if ((out = PyBytes_FromStringAndSize(NULL, total)) == NULL) return NULL;
            w = PyBytes_AS_STRING(out);
        }
#define FO_PUT(s, len)                          \
        do {                                    \
            if (pass) memcpy(w, (s), (size_t)(len)); \
            if (pass) w += (len);               \
            else total += (len);                \
        } while (0)
        if (!pass) total = 0;
        FO_PUT("{\"chunks\":[", 11);
        for (Py_ssize_t i = 0; i < nc; i++) {
            const char *u = fo_plain(PyTuple_GET_ITEM(chunks, i), &n);
            if (u == NULL) goto decline;
            if (i) FO_PUT(",", 1);
            FO_PUT("\"", 1);
            FO_PUT(u, n);
            FO_PUT("\"", 1);
        }
        char digits[32];
        int nd = snprintf(digits, sizeof digits, "%lld", size);
        FO_PUT("],\"format\":\"safetensors\",\"size\":", 32);
        FO_PUT(digits, nd);
        FO_PUT(",\"tensors\":[", 12);
        for (Py_ssize_t i = 0; i < nt; i++) {
            PyObject *pair = PyTuple_GET_ITEM(tensors, i);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) goto decline;
            Py_ssize_t m;
            const char *a = fo_plain(PyTuple_GET_ITEM(pair, 0), &n), *b = fo_plain(PyTuple_GET_ITEM(pair, 1), &m);
            if (a == NULL || b == NULL) goto decline;
            if (i) FO_PUT(",", 1);
            FO_PUT("[\"", 2);
            FO_PUT(a, n);
            FO_PUT("\",\"", 3);
            FO_PUT(b, m);
            FO_PUT("\"]", 2);
        }
        FO_PUT("]}", 2);
#undef FO_PUT
        if (pass) return out;
        continue;
    decline:
        Py_XDECREF(out);
        Py_RETURN_NONE;
    }
    Py_RETURN_NONE; /* not reached */
}

static PyMethodDef methods[] = {
    {"split", k_split, METH_VARARGS, "split(src, dst, k, rotate): elements -> planes"},
    {"merge", k_merge, METH_VARARGS, "merge(planes, dst, k, rotate): k plane buffers -> elements"},
    {"diff", k_diff, METH_VARARGS, "diff(new, base, dst, k, is_float): zigzag differences as planes"},
    {"undiff", k_undiff, METH_VARARGS, "undiff(planes, base, dst, k, is_float): elements from k plane buffers of differences"},
    {"gather", k_gather, METH_VARARGS, "gather(new, base, mask, values, k) -> count: what changed"},
    {"scatter", k_scatter, METH_VARARGS, "scatter(base, mask, values, dst, k): base with the changes"},
    {"merge3_bf16", k_merge3_bf16, METH_VARARGS,
     "merge3_bf16(base, ours, theirs, out, mode, w1, w2, w1 + w2) -> conflicts: a three-way merge of bf16 elements"},
    {"tiny_run", k_tiny_run, METH_VARARGS,
     "tiny_run(hasher, buf, base, entries, lo, hi, data_start, tails, head, encode, raw_below, pairs, names, "
     "path, locations, scratch) -> bytes stored: a run of tiny tensors ingested"},
    {"verified_raw", k_verified_raw, METH_VARARGS,
     "verified_raw(hasher, kind, type_code, oids, values, head) -> list: raw-stored objects verified"},
    {"safetensors_header", k_safetensors_header, METH_VARARGS,
     "safetensors_header(raw, data_size, sizes, entry_type) -> (entries, metadata) | None: a plain header parsed"},
    {"file_object", k_file_object, METH_VARARGS,
     "file_object(content) -> (chunks, size, tensors) | None: a canonical safetensors file object read"},
    {"file_json", k_file_json, METH_VARARGS,
     "file_json(chunks, size, tensors) -> bytes | None: a safetensors file object's canonical JSON"},
    {"huff", k_huff, METH_VARARGS, "huff(src) -> bytes | None: a zstd frame of Huffman-coded literal blocks"},
#ifdef HAVE_UNDIFF_PARTS
    {"undiff_parts", k_undiff_parts, METH_VARARGS,
     "undiff_parts(out, start, mask, values, nvalues, voff, hi, lo, is_float[, base_hi, base_lo]) -> voff: a NONZERO + "
     "NIBBLES DIFF applied"},
    {"undiff_parts_ready", k_undiff_parts_ready, METH_NOARGS, "undiff_parts_ready() -> bool: this CPU runs undiff_parts"},
#endif
    {"simd_cap", k_simd_cap, METH_VARARGS, "simd_cap(level) -> the level before: 2 AVX2, 1 SSSE3, 0 SSE2 at most (tests)"},
    {"rtn8", k_rtn8, METH_VARARGS,
     "rtn8(parent, pdtype, scales, cols, col0, out): int8 codes predicted from the parent's floats"},
    {"nibbles", k_nibbles, METH_VARARGS, "nibbles(src, hi, lo): the bytes' high and low nibbles, in pairs"},
    {"unnibbles", k_unnibbles, METH_VARARGS, "unnibbles(hi, lo, dst): the bytes from their nibbles"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
#ifdef X86_SIMD
    simd_tables();
#endif
    return PyModule_Create(&module);
}
