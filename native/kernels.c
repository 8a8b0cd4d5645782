/* Kernel loops for pccl._native (see kernels.h for the contract, pccl/_reference.py for the
 * specification they match byte for byte).
 *
 * Every loop is written once, as a plain always_inline C function the compiler vectorises,
 * and instantiated per instruction-set level by wrapping it in a function carrying a
 * target attribute (generic x86-64/SSE2 or any other architecture, AVX2, AVX-512). The
 * inlined body is compiled for the wrapper's target, so one source gives three builds
 * without -march=native. pccl_simd_select() picks one at import time.
 *
 * Element pointers use typedefs with alignment 1: Python hands us views at any byte offset,
 * and an ordinary float* would let the compiler assume 4-byte alignment (and, after peeling
 * for alignment, use instructions that fault on a misaligned address).
 */
#include "kernels.h"

#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__)
#define K static inline __attribute__((always_inline))
#else
#define K static inline
#endif

typedef float f32u __attribute__((aligned(1)));
typedef double f64u __attribute__((aligned(1)));
typedef uint16_t u16u __attribute__((aligned(1)));
typedef int16_t i16u __attribute__((aligned(1)));
typedef uint32_t u32u __attribute__((aligned(1)));
typedef int32_t i32u __attribute__((aligned(1)));
typedef uint64_t u64u __attribute__((aligned(1)));
typedef int64_t i64u __attribute__((aligned(1)));
typedef uint8_t u8u;
typedef int8_t i8u;

#define F32_CANON 0x7FC00000u
#define F64_CANON UINT64_C(0x7FF8000000000000)
#define F16_CANON 0x7E00u
#define BF16_CANON 0x7FC0u

/* ---- bit helpers ------------------------------------------------------------------------ */

K uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

K float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

K double u2d(uint64_t u) {
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

K float canon_f32(float r) { return r != r ? u2f(F32_CANON) : r; }

K double canon_f64(double r) { return r != r ? u2d(F64_CANON) : r; }

/* The conversions below are branch-free selections between values computed
 * unconditionally: the compiler will not speculate a floating-point operation out of a
 * branch (-ftrapping-math), so a ternary around one stops the loop from vectorising. */

K uint32_t select_u32(int c, uint32_t a, uint32_t b) {
    uint32_t m = 0u - (uint32_t)(c != 0);
    return (a & m) | (b & ~m);
}

/* fp16 word -> fp32, exact; NaN -> canonical fp32 NaN. */
K float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu;
    uint32_t m = h & 0x3FFu;
    /* Subnormal halves are m * 2^-24: exact in fp32 (m < 2^10) and normal there. */
    uint32_t sub = f2u((float)(int32_t)m * 0x1p-24f);
    uint32_t norm = ((e + 112u) << 23) | (m << 13);
    uint32_t r = select_u32(e == 0, sub, select_u32(e == 31, 0x7F800000u, norm)) | sign;
    return u2f(select_u32(e == 31 && m != 0, F32_CANON, r));
}

/* fp32 -> fp16 word, round to nearest even, overflow -> inf; NaN -> 0x7E00. */
K uint16_t f32_to_f16(float f) {
    uint32_t u = f2u(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    /* |x| >= 2^-14 (normal half): rebias the exponent, round the 13 dropped bits to nearest
     * even; a carry runs into the exponent and, at the top, into 0x7C00 (inf). */
    uint32_t norm = (a - 0x38000000u + 0x0FFFu + ((a >> 13) & 1u)) >> 13;
    norm = select_u32(norm > 0x7C00u, 0x7C00u, norm);
    /* |x| < 2^-14: adding 0.5 (ulp 2^-24 = the half subnormal step) rounds to nearest even
     * in hardware; the low bits of the sum are the half's bits (0x400 when it rounds up to
     * the smallest normal). a is clamped so the addition never sees inf or NaN. */
    float small = u2f(select_u32(a < 0x38800000u, a, 0));
    uint32_t sub = f2u(small + 0.5f) - 0x3F000000u;
    uint32_t r = select_u32(a < 0x38800000u, sub, norm) | sign;
    return (uint16_t)select_u32(a > 0x7F800000u, F16_CANON, r);
}

/* bf16 word -> fp32: exact (shift); NaN -> canonical fp32 NaN. */
K float bf16_to_f32(uint16_t w) {
    return u2f(select_u32((w & 0x7FFFu) > 0x7F80u, F32_CANON, (uint32_t)w << 16));
}

/* fp32 -> bf16 word, round to nearest even (subnormals included), overflow -> inf;
 * NaN -> 0x7FC0. */
K uint16_t f32_to_bf16(float f) {
    uint32_t u = f2u(f);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)select_u32((u & 0x7FFFFFFFu) > 0x7F800000u, BF16_CANON, r);
}

/* ---- reduce ----------------------------------------------------------------------------- */

/* Floats: SUM/PROD as IEEE ops; MIN/MAX pick src only when strictly smaller/larger (ties,
 * including -0/+0, keep dst); any NaN operand or result gives the canonical NaN. */
#define FLOAT_REDUCE(NAME, T, TU, CANON, NANV)                                             \
    K void sum_##NAME(TU *restrict d, const TU *restrict s, size_t n) {                    \
        for (size_t i = 0; i < n; i++) d[i] = CANON(d[i] + s[i]);                          \
    }                                                                                      \
    K void prod_##NAME(TU *restrict d, const TU *restrict s, size_t n) {                   \
        for (size_t i = 0; i < n; i++) d[i] = CANON(d[i] * s[i]);                          \
    }                                                                                      \
    K void min_##NAME(TU *restrict d, const TU *restrict s, size_t n) {                    \
        for (size_t i = 0; i < n; i++) {                                                   \
            T a = d[i], b = s[i];                                                          \
            T r = b < a ? b : a;                                                           \
            d[i] = (a != a) | (b != b) ? NANV : r;                                         \
        }                                                                                  \
    }                                                                                      \
    K void max_##NAME(TU *restrict d, const TU *restrict s, size_t n) {                    \
        for (size_t i = 0; i < n; i++) {                                                   \
            T a = d[i], b = s[i];                                                          \
            T r = b > a ? b : a;                                                           \
            d[i] = (a != a) | (b != b) ? NANV : r;                                         \
        }                                                                                  \
    }

FLOAT_REDUCE(f32, float, f32u, canon_f32, u2f(F32_CANON))
FLOAT_REDUCE(f64, double, f64u, canon_f64, u2d(F64_CANON))

/* fp16/bf16: widen to fp32, combine, round back. MIN/MAX return one input word unchanged
 * (the widening is exact), or the canonical NaN. */
#define HALF_REDUCE(NAME, TO32, FROM32, CANON16)                                           \
    K void sum_##NAME(u16u *restrict d, const u16u *restrict s, size_t n) {                \
        for (size_t i = 0; i < n; i++) d[i] = FROM32(TO32(d[i]) + TO32(s[i]));             \
    }                                                                                      \
    K void prod_##NAME(u16u *restrict d, const u16u *restrict s, size_t n) {               \
        for (size_t i = 0; i < n; i++) d[i] = FROM32(TO32(d[i]) * TO32(s[i]));             \
    }                                                                                      \
    K void min_##NAME(u16u *restrict d, const u16u *restrict s, size_t n) {                \
        for (size_t i = 0; i < n; i++) {                                                   \
            uint16_t wa = d[i], wb = s[i];                                                 \
            float a = TO32(wa), b = TO32(wb);                                              \
            uint32_t r = select_u32(b < a, wb, wa);                                        \
            d[i] = (uint16_t)select_u32((a != a) | (b != b), CANON16, r);                  \
        }                                                                                  \
    }                                                                                      \
    K void max_##NAME(u16u *restrict d, const u16u *restrict s, size_t n) {                \
        for (size_t i = 0; i < n; i++) {                                                   \
            uint16_t wa = d[i], wb = s[i];                                                 \
            float a = TO32(wa), b = TO32(wb);                                              \
            uint32_t r = select_u32(b > a, wb, wa);                                        \
            d[i] = (uint16_t)select_u32((a != a) | (b != b), CANON16, r);                  \
        }                                                                                  \
    }

HALF_REDUCE(f16, f16_to_f32, f32_to_f16, F16_CANON)
HALF_REDUCE(bf16, bf16_to_f32, f32_to_bf16, BF16_CANON)

/* Integers: SUM/PROD in an unsigned type at least as wide as int (no signed overflow, no
 * promotion to signed int), truncated back: two's-complement wrap-around. */
#define INT_REDUCE(NAME, T, TU, UTU, WIDE)                                                 \
    K void sum_##NAME(UTU *restrict d, const UTU *restrict s, size_t n) {                  \
        for (size_t i = 0; i < n; i++) d[i] = (WIDE)d[i] + (WIDE)s[i];                     \
    }                                                                                      \
    K void prod_##NAME(UTU *restrict d, const UTU *restrict s, size_t n) {                 \
        for (size_t i = 0; i < n; i++) d[i] = (WIDE)d[i] * (WIDE)s[i];                     \
    }                                                                                      \
    K void min_##NAME(TU *restrict d, const TU *restrict s, size_t n) {                    \
        for (size_t i = 0; i < n; i++) d[i] = s[i] < d[i] ? s[i] : d[i];                   \
    }                                                                                      \
    K void max_##NAME(TU *restrict d, const TU *restrict s, size_t n) {                    \
        for (size_t i = 0; i < n; i++) d[i] = s[i] > d[i] ? s[i] : d[i];                   \
    }

INT_REDUCE(i8, int8_t, i8u, u8u, uint32_t)
INT_REDUCE(i16, int16_t, i16u, u16u, uint32_t)
INT_REDUCE(i32, int32_t, i32u, u32u, uint32_t)
INT_REDUCE(i64, int64_t, i64u, u64u, uint64_t)
INT_REDUCE(u8, uint8_t, u8u, u8u, uint32_t)

#define DISPATCH_OP(NAME, TD, TS)                                                          \
    switch (op) {                                                                          \
    case PCCL_SUM: sum_##NAME((TD *)dst, (const TS *)src, n); return 0;                    \
    case PCCL_PROD: prod_##NAME((TD *)dst, (const TS *)src, n); return 0;                  \
    case PCCL_MIN: min_##NAME((TD *)dst, (const TS *)src, n); return 0;                    \
    case PCCL_MAX: max_##NAME((TD *)dst, (const TS *)src, n); return 0;                    \
    default: return -1;                                                                    \
    }

/* Integer SUM/PROD run on the unsigned view, MIN/MAX on the signed one. */
#define DISPATCH_INT(NAME, TS, TU)                                                         \
    switch (op) {                                                                          \
    case PCCL_SUM: sum_##NAME((TU *)dst, (const TU *)src, n); return 0;                    \
    case PCCL_PROD: prod_##NAME((TU *)dst, (const TU *)src, n); return 0;                  \
    case PCCL_MIN: min_##NAME((TS *)dst, (const TS *)src, n); return 0;                    \
    case PCCL_MAX: max_##NAME((TS *)dst, (const TS *)src, n); return 0;                    \
    default: return -1;                                                                    \
    }

K int reduce_body(void *dst, const void *src, size_t n, int dtype, int op) {
    switch (dtype) {
    case PCCL_F32: DISPATCH_OP(f32, f32u, f32u)
    case PCCL_F64: DISPATCH_OP(f64, f64u, f64u)
    case PCCL_F16: DISPATCH_OP(f16, u16u, u16u)
    case PCCL_BF16: DISPATCH_OP(bf16, u16u, u16u)
    case PCCL_I8: DISPATCH_INT(i8, i8u, u8u)
    case PCCL_I16: DISPATCH_INT(i16, i16u, u16u)
    case PCCL_I32: DISPATCH_INT(i32, i32u, u32u)
    case PCCL_I64: DISPATCH_INT(i64, i64u, u64u)
    case PCCL_U8: DISPATCH_INT(u8, u8u, u8u)
    default: return -1;
    }
}

/* ---- divide (AVG finaliser) ------------------------------------------------------------- */

/* Integers up to 32 bits divide in double: for |x| < 2^53 the double quotient truncates to
 * the exact C quotient (its rounding error is below the distance 1/divisor to the next
 * integer), and the loop vectorises. int64 needs real integer division. */
#define INT_DIVIDE(NAME, T, TU)                                                            \
    K void div_##NAME(TU *restrict d, size_t n, double dd) {                               \
        for (size_t i = 0; i < n; i++) d[i] = (T)((double)d[i] / dd);                      \
    }

INT_DIVIDE(i8, int8_t, i8u)
INT_DIVIDE(i16, int16_t, i16u)
INT_DIVIDE(i32, int32_t, i32u)
INT_DIVIDE(u8, uint8_t, u8u)

K void div_i64(i64u *restrict d, size_t n, int64_t v) {
    for (size_t i = 0; i < n; i++) d[i] = d[i] / v;
}

K void div_f32(f32u *restrict d, size_t n, float v) {
    for (size_t i = 0; i < n; i++) d[i] = canon_f32(d[i] / v);
}

K void div_f64(f64u *restrict d, size_t n, double v) {
    for (size_t i = 0; i < n; i++) d[i] = canon_f64(d[i] / v);
}

K void div_f16(u16u *restrict d, size_t n, float v) {
    for (size_t i = 0; i < n; i++) d[i] = f32_to_f16(f16_to_f32(d[i]) / v);
}

K void div_bf16(u16u *restrict d, size_t n, float v) {
    for (size_t i = 0; i < n; i++) d[i] = f32_to_bf16(bf16_to_f32(d[i]) / v);
}

K int divide_body(void *dst, size_t n, int dtype, int64_t divisor) {
    /* Via double, like the reference's float(divisor): the same rounding for huge values. */
    double dd = (double)divisor;
    float fd = (float)dd;
    if (divisor < 1) return -1;
    switch (dtype) {
    case PCCL_F32: div_f32((f32u *)dst, n, fd); return 0;
    case PCCL_F64: div_f64((f64u *)dst, n, dd); return 0;
    case PCCL_F16: div_f16((u16u *)dst, n, fd); return 0;
    case PCCL_BF16: div_bf16((u16u *)dst, n, fd); return 0;
    case PCCL_I8: div_i8((i8u *)dst, n, dd); return 0;
    case PCCL_I16: div_i16((i16u *)dst, n, dd); return 0;
    case PCCL_I32: div_i32((i32u *)dst, n, dd); return 0;
    case PCCL_I64: div_i64((i64u *)dst, n, divisor); return 0;
    case PCCL_U8: div_u8((u8u *)dst, n, dd); return 0;
    default: return -1;
    }
}

/* ---- uint8 block quantisation ----------------------------------------------------------- */

/* Order-preserving map of fp32 bits onto uint32 (-NaN < -inf < ... < -0 < +0 < ... < +inf
 * < +NaN), so the block min/max is an integer reduction the compiler vectorises (a float
 * ternary min is not vectorised without -ffast-math). */
K uint32_t f32_key(uint32_t u) { return u & 0x80000000u ? ~u : u | 0x80000000u; }
K uint32_t key_f32(uint32_t k) { return k & 0x80000000u ? k & 0x7FFFFFFFu : ~k; }

#define KEY_POS_INF 0xFF800000u /* f32_key(+inf) */
#define KEY_NEG_INF 0x007FFFFFu /* f32_key(-inf) */

/* The meta of one block for codes in [0, levels]: writes (mn, scale) and returns 0 when codes
 * are to be computed; returns 1 when every code is 0 (scale 0, or a NaN/inf block whose meta
 * is the canonical NaN pair). */
K int block_meta(const f32u *restrict x, f32u *restrict meta, size_t m, float levels, float *mn_out,
                 float *scale_out) {
    uint32_t kmin = UINT32_MAX, kmax = 0;
    for (size_t i = 0; i < m; i++) {
        uint32_t k = f32_key(f2u(x[i]));
        kmin = k < kmin ? k : kmin;
        kmax = k > kmax ? k : kmax;
    }
    if (kmax < KEY_POS_INF && kmin > KEY_NEG_INF) {
        /* + 0.0f turns a -0 min/max into +0, so the choice between zeros cannot matter. */
        float mn = u2f(key_f32(kmin)) + 0.0f;
        float mx = u2f(key_f32(kmax)) + 0.0f;
        float d = mx - mn;
        if (d <= FLT_MAX) {
            float scale = d / levels;
            meta[0] = mn;
            meta[1] = scale;
            *mn_out = mn;
            *scale_out = scale;
            return scale == 0.0f;
        }
    }
    /* NaN/inf in the block, or a range that overflows fp32: the block decodes to NaN. */
    meta[0] = u2f(F32_CANON);
    meta[1] = u2f(F32_CANON);
    return 1;
}

/* Codes of m finite values of a block with scale > 0: rint(min((x - mn) / scale, levels)). */
K void block_codes(const f32u *restrict x, uint8_t *restrict q, size_t m, float mn, float scale,
                   float levels) {
    for (size_t i = 0; i < m; i++) {
        float t = (x[i] - mn) / scale;
        t = u2f(select_u32(t < levels, f2u(t), f2u(levels)));
        /* t is in [0, levels <= 255]: adding 2^23 rounds it to an integer, nearest-even,
         * which then sits in the low mantissa bits. */
        q[i] = (uint8_t)f2u(t + 0x1p23f);
    }
}

K void quantize_block(const f32u *restrict x, u8u *restrict q, f32u *restrict meta, size_t m) {
    float mn = 0.0f, scale = 0.0f;
    if (block_meta(x, meta, m, 255.0f, &mn, &scale)) {
        memset(q, 0, m);
        return;
    }
    block_codes(x, q, m, mn, scale, 255.0f);
}

K void dequantize_block(const u8u *restrict q, float mn, float scale, f32u *restrict out,
                        size_t m) {
    for (size_t i = 0; i < m; i++) out[i] = canon_f32(mn + (float)q[i] * scale);
}

K void dequantize_accumulate_block(const u8u *restrict q, float mn, float scale,
                                   f32u *restrict acc, size_t m) {
    /* One final canonicalisation suffices: NaN-ness does not depend on NaN payloads. */
    for (size_t i = 0; i < m; i++) acc[i] = canon_f32(acc[i] + (mn + (float)q[i] * scale));
}

/* out = base + dequantised q: the bits of dequantising into out and then adding base (fp32
 * addition commutes; one canonicalisation covers both, as NaN-ness ignores payloads). */
K void dequantize_add_block(const u8u *restrict q, float mn, float scale,
                            const f32u *restrict base, f32u *restrict out, size_t m) {
    for (size_t i = 0; i < m; i++) out[i] = canon_f32(base[i] + (mn + (float)q[i] * scale));
}

K void quantize_body(const void *src, void *q, void *meta, size_t n, size_t block) {
    const f32u *x = (const f32u *)src;
    f32u *mt = (f32u *)meta;
    for (size_t lo = 0, b = 0; lo < n; lo += block, b++) {
        size_t m = n - lo < block ? n - lo : block;
        quantize_block(x + lo, (u8u *)q + lo, mt + 2 * b, m);
    }
}

K void dequantize_body(const void *q, const void *meta, void *out, size_t n, size_t block) {
    const f32u *mt = (const f32u *)meta;
    for (size_t lo = 0, b = 0; lo < n; lo += block, b++) {
        size_t m = n - lo < block ? n - lo : block;
        dequantize_block((const u8u *)q + lo, mt[2 * b], mt[2 * b + 1], (f32u *)out + lo, m);
    }
}

K void dequantize_accumulate_body(const void *q, const void *meta, void *acc, size_t n,
                                  size_t block) {
    const f32u *mt = (const f32u *)meta;
    for (size_t lo = 0, b = 0; lo < n; lo += block, b++) {
        size_t m = n - lo < block ? n - lo : block;
        dequantize_accumulate_block((const u8u *)q + lo, mt[2 * b], mt[2 * b + 1],
                                    (f32u *)acc + lo, m);
    }
}

K void dequantize_add_body(const void *q, const void *meta, const void *base, void *out,
                           size_t n, size_t block) {
    const f32u *mt = (const f32u *)meta;
    for (size_t lo = 0, b = 0; lo < n; lo += block, b++) {
        size_t m = n - lo < block ? n - lo : block;
        dequantize_add_block((const u8u *)q + lo, mt[2 * b], mt[2 * b + 1],
                             (const f32u *)base + lo, (f32u *)out + lo, m);
    }
}

/* One reduce-scatter hop of the uint8 ring, block by block so each block is re-read from L1:
 * sum = (base or acc) + dequant(q, meta); (q_out, meta_out) = quantize(sum); then keep = 0
 * leaves acc alone (the partial sum is only needed on the wire), 1 stores sum into acc, 2 stores
 * dequant(q_out, meta_out) into acc. Bytes equal those of the separate kernels in turn.
 * Returns 0, or -1 when the scratch block cannot be allocated (block > 4096, keep = 0). */
#define HOP_STACK 4096
K int ring_hop_body(const void *q, const void *meta, const void *base, void *acc, void *q_out,
                    void *meta_out, size_t n, size_t block, int keep) {
    float stack[HOP_STACK];
    float *heap = NULL;
    f32u *tmp = stack;
    if (keep == 0 && block > HOP_STACK) {
        heap = (float *)malloc(block * sizeof(float));
        if (heap == NULL) return -1;
        tmp = heap;
    }
    const f32u *mt = (const f32u *)meta;
    f32u *mo = (f32u *)meta_out;
    for (size_t lo = 0, b = 0; lo < n; lo += block, b++) {
        size_t m = n - lo < block ? n - lo : block;
        const u8u *qb = (const u8u *)q + lo;
        f32u *ab = (f32u *)acc + lo;
        u8u *qo = (u8u *)q_out + lo;
        const f32u *in = base != NULL ? (const f32u *)base + lo : ab;
        f32u *sum = keep == 0 ? tmp : ab;
        if (in == sum)
            dequantize_accumulate_block(qb, mt[2 * b], mt[2 * b + 1], sum, m);
        else
            dequantize_add_block(qb, mt[2 * b], mt[2 * b + 1], in, sum, m);
        quantize_block(sum, qo, mo + 2 * b, m);
        if (keep == 2) dequantize_block(qo, mo[2 * b], mo[2 * b + 1], ab, m);
    }
    free(heap);
    return 0;
}

/* ---- packed 4-bit / 2-bit block quantisation ---------------------------------------------- */

/* Codes are the uint8 ones with 2^bits - 1 levels, packed 8 / bits per byte, least significant
 * first; a short last byte has zero high bits. Blocks are multiples of 8 / bits elements (the
 * binding checks), so each block starts on a byte. Codes go through a stack buffer of
 * CODE_TMP elements (a multiple of 4; 1 KiB, so a fused hop stays near the uint8 hop's stack):
 * the per-element loops stay the uint8 ones. */
#define CODE_TMP 1024

K size_t packed_bytes(size_t m, int bits) { return bits == 4 ? (m + 1) / 2 : (m + 3) / 4; }

/* Packing works on whole words of codes (2 codes in a uint16, 4 in a uint32, read and written
 * through memcpy), so the loops are plain shifts and masks on one lane type and vectorise;
 * the word order is the byte order, hence the little-endian guard (a big-endian build takes
 * the byte-wise tail loops for everything). */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define PCCL_LE 1
#else
#define PCCL_LE 0
#endif

K void pack_codes(const uint8_t *restrict c, u8u *restrict q, size_t m, int bits) {
    size_t j = 0;
    if (bits == 4) {
        size_t h = PCCL_LE ? m / 2 : 0;
        for (; j < h; j++) {
            uint16_t w;
            memcpy(&w, c + 2 * j, 2);
            q[j] = (uint8_t)((w & 15u) | ((w >> 4) & 0xF0u));
        }
        for (; 2 * j + 1 < m; j++) q[j] = (uint8_t)(c[2 * j] | (c[2 * j + 1] << 4));
        if (m & 1) q[m / 2] = c[m - 1];
    } else {
        size_t h = PCCL_LE ? m / 4 : 0;
        for (; j < h; j++) {
            uint32_t w;
            memcpy(&w, c + 4 * j, 4);
            q[j] = (uint8_t)((w & 3u) | ((w >> 6) & 0xCu) | ((w >> 12) & 0x30u) |
                             ((w >> 18) & 0xC0u));
        }
        for (; 4 * j + 3 < m; j++)
            q[j] = (uint8_t)(c[4 * j] | (c[4 * j + 1] << 2) | (c[4 * j + 2] << 4) |
                             (c[4 * j + 3] << 6));
        if (m & 3) {
            uint8_t v = 0;
            for (size_t k = 0; k < (m & 3); k++) v = (uint8_t)(v | (c[4 * j + k] << (2 * k)));
            q[j] = v;
        }
    }
}

K void unpack_codes(const u8u *restrict q, uint8_t *restrict c, size_t m, int bits) {
    size_t j = 0;
    if (bits == 4) {
        size_t h = PCCL_LE ? m / 2 : 0;
        for (; j < h; j++) {
            uint32_t v = q[j];
            uint16_t w = (uint16_t)((v & 15u) | ((v << 4) & 0xF00u));
            memcpy(c + 2 * j, &w, 2);
        }
        for (; 2 * j + 1 < m; j++) {
            c[2 * j] = q[j] & 15u;
            c[2 * j + 1] = q[j] >> 4;
        }
        if (m & 1) c[m - 1] = q[m / 2] & 15u;
    } else {
        size_t h = PCCL_LE ? m / 4 : 0;
        for (; j < h; j++) {
            uint32_t v = q[j];
            uint32_t w = (v & 3u) | ((v << 6) & 0x300u) | ((v << 12) & 0x30000u) |
                         ((v << 18) & 0x3000000u);
            memcpy(c + 4 * j, &w, 4);
        }
        for (; 4 * j + 3 < m; j++) {
            uint8_t v = q[j];
            c[4 * j] = v & 3u;
            c[4 * j + 1] = (v >> 2) & 3u;
            c[4 * j + 2] = (v >> 4) & 3u;
            c[4 * j + 3] = v >> 6;
        }
        for (size_t k = 0; k < (m & 3); k++) c[4 * j + k] = (q[j] >> (2 * k)) & 3u;
    }
}

K void quantize_packed_block(const f32u *restrict x, u8u *restrict q, f32u *restrict meta,
                             size_t m, int bits) {
    float levels = (float)((1 << bits) - 1);
    float mn = 0.0f, scale = 0.0f;
    if (block_meta(x, meta, m, levels, &mn, &scale)) {
        memset(q, 0, packed_bytes(m, bits));
        return;
    }
    uint8_t c[CODE_TMP];
    size_t per = (size_t)(8 / bits);
    for (size_t lo = 0; lo < m; lo += CODE_TMP) {
        size_t k = m - lo < CODE_TMP ? m - lo : CODE_TMP;
        block_codes(x + lo, c, k, mn, scale, levels);
        pack_codes(c, q + lo / per, k, bits);
    }
}

/* mode 0: out = dequant; 1: out += dequant; 2: out = base + dequant. */
K void dequantize_packed_block(const u8u *restrict q, float mn, float scale,
                               const f32u *restrict base, f32u *restrict out, size_t m, int bits,
                               int mode) {
    uint8_t c[CODE_TMP];
    size_t per = (size_t)(8 / bits);
    for (size_t lo = 0; lo < m; lo += CODE_TMP) {
        size_t k = m - lo < CODE_TMP ? m - lo : CODE_TMP;
        unpack_codes(q + lo / per, c, k, bits);
        if (mode == 0) dequantize_block(c, mn, scale, out + lo, k);
        else if (mode == 1) dequantize_accumulate_block(c, mn, scale, out + lo, k);
        else dequantize_add_block(c, mn, scale, base + lo, out + lo, k);
    }
}

K void quantize_packed_body(const void *src, void *q, void *meta, size_t n, size_t block,
                            int bits) {
    const f32u *x = (const f32u *)src;
    f32u *mt = (f32u *)meta;
    size_t per = (size_t)(8 / bits);
    for (size_t lo = 0, b = 0; lo < n; lo += block, b++) {
        size_t m = n - lo < block ? n - lo : block;
        quantize_packed_block(x + lo, (u8u *)q + lo / per, mt + 2 * b, m, bits);
    }
}

K void dequantize_packed_body(const void *q, const void *meta, const void *base, void *out,
                              size_t n, size_t block, int bits, int mode) {
    const f32u *mt = (const f32u *)meta;
    size_t per = (size_t)(8 / bits);
    for (size_t lo = 0, b = 0; lo < n; lo += block, b++) {
        size_t m = n - lo < block ? n - lo : block;
        const f32u *bs = mode == 2 ? (const f32u *)base + lo : NULL;
        dequantize_packed_block((const u8u *)q + lo / per, mt[2 * b], mt[2 * b + 1], bs,
                                (f32u *)out + lo, m, bits, mode);
    }
}

/* ring_hop_body for packed codes: same steps, same keep values, same scratch rule. */
K int ring_hop_packed_body(const void *q, const void *meta, const void *base, void *acc,
                           void *q_out, void *meta_out, size_t n, size_t block, int bits,
                           int keep) {
    float stack[HOP_STACK];
    float *heap = NULL;
    f32u *tmp = stack;
    if (keep == 0 && block > HOP_STACK) {
        heap = (float *)malloc(block * sizeof(float));
        if (heap == NULL) return -1;
        tmp = heap;
    }
    const f32u *mt = (const f32u *)meta;
    f32u *mo = (f32u *)meta_out;
    size_t per = (size_t)(8 / bits);
    for (size_t lo = 0, b = 0; lo < n; lo += block, b++) {
        size_t m = n - lo < block ? n - lo : block;
        const u8u *qb = (const u8u *)q + lo / per;
        f32u *ab = (f32u *)acc + lo;
        u8u *qo = (u8u *)q_out + lo / per;
        const f32u *in = base != NULL ? (const f32u *)base + lo : ab;
        f32u *sum = keep == 0 ? tmp : ab;
        if (in == sum)
            dequantize_packed_block(qb, mt[2 * b], mt[2 * b + 1], NULL, sum, m, bits, 1);
        else
            dequantize_packed_block(qb, mt[2 * b], mt[2 * b + 1], in, sum, m, bits, 2);
        quantize_packed_block(sum, qo, mo + 2 * b, m, bits);
        if (keep == 2) dequantize_packed_block(qo, mo[2 * b], mo[2 * b + 1], NULL, ab, m, bits, 0);
    }
    free(heap);
    return 0;
}

/* ---- fp16 / bf16 conversion ------------------------------------------------------------- */

K void encode_f16_body(const f32u *restrict s, u16u *restrict o, size_t n) {
    for (size_t i = 0; i < n; i++) o[i] = f32_to_f16(s[i]);
}

K void decode_f16_body(const u16u *restrict s, f32u *restrict o, size_t n) {
    for (size_t i = 0; i < n; i++) o[i] = f16_to_f32(s[i]);
}

K void encode_bf16_body(const f32u *restrict s, u16u *restrict o, size_t n) {
    for (size_t i = 0; i < n; i++) o[i] = f32_to_bf16(s[i]);
}

K void decode_bf16_body(const u16u *restrict s, f32u *restrict o, size_t n) {
    for (size_t i = 0; i < n; i++) o[i] = bf16_to_f32(s[i]);
}

K void accumulate_f16_body(const u16u *restrict s, f32u *restrict acc, size_t n) {
    for (size_t i = 0; i < n; i++) acc[i] = canon_f32(acc[i] + f16_to_f32(s[i]));
}

K void accumulate_bf16_body(const u16u *restrict s, f32u *restrict acc, size_t n) {
    for (size_t i = 0; i < n; i++) acc[i] = canon_f32(acc[i] + bf16_to_f32(s[i]));
}

K void add_f16_body(const u16u *restrict s, const f32u *restrict base, f32u *restrict out,
                    size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = canon_f32(base[i] + f16_to_f32(s[i]));
}

K void add_bf16_body(const u16u *restrict s, const f32u *restrict base, f32u *restrict out,
                     size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = canon_f32(base[i] + bf16_to_f32(s[i]));
}

/* ---- per-ISA instantiation and dispatch ------------------------------------------------- */

struct impl {
    int (*reduce)(void *, const void *, size_t, int, int);
    int (*divide)(void *, size_t, int, int64_t);
    void (*quantize)(const void *, void *, void *, size_t, size_t);
    void (*dequantize)(const void *, const void *, void *, size_t, size_t);
    void (*dequantize_accumulate)(const void *, const void *, void *, size_t, size_t);
    void (*encode_f16)(const void *, void *, size_t);
    void (*decode_f16)(const void *, void *, size_t);
    void (*encode_bf16)(const void *, void *, size_t);
    void (*decode_bf16)(const void *, void *, size_t);
    void (*accumulate_f16)(const void *, void *, size_t);
    void (*accumulate_bf16)(const void *, void *, size_t);
    void (*dequantize_add)(const void *, const void *, const void *, void *, size_t, size_t);
    void (*add_f16)(const void *, const void *, void *, size_t);
    void (*add_bf16)(const void *, const void *, void *, size_t);
    int (*ring_hop)(const void *, const void *, const void *, void *, void *, void *, size_t,
                    size_t, int);
    void (*quantize_packed)(const void *, void *, void *, size_t, size_t, int);
    void (*dequantize_packed)(const void *, const void *, const void *, void *, size_t, size_t,
                              int, int);
    int (*ring_hop_packed)(const void *, const void *, const void *, void *, void *, void *,
                           size_t, size_t, int, int);
};

#define INSTANTIATE(SFX, ATTR)                                                             \
    ATTR static int reduce_##SFX(void *d, const void *s, size_t n, int dt, int op) {       \
        return reduce_body(d, s, n, dt, op);                                               \
    }                                                                                      \
    ATTR static int divide_##SFX(void *d, size_t n, int dt, int64_t v) {                   \
        return divide_body(d, n, dt, v);                                                   \
    }                                                                                      \
    ATTR static void quantize_##SFX(const void *s, void *q, void *m, size_t n, size_t b) { \
        quantize_body(s, q, m, n, b);                                                      \
    }                                                                                      \
    ATTR static void dequantize_##SFX(const void *q, const void *m, void *o, size_t n,     \
                                      size_t b) {                                          \
        dequantize_body(q, m, o, n, b);                                                    \
    }                                                                                      \
    ATTR static void dequantize_accumulate_##SFX(const void *q, const void *m, void *a,    \
                                                 size_t n, size_t b) {                     \
        dequantize_accumulate_body(q, m, a, n, b);                                         \
    }                                                                                      \
    ATTR static void encode_f16_##SFX(const void *s, void *o, size_t n) {                  \
        encode_f16_body((const f32u *)s, (u16u *)o, n);                                    \
    }                                                                                      \
    ATTR static void decode_f16_##SFX(const void *s, void *o, size_t n) {                  \
        decode_f16_body((const u16u *)s, (f32u *)o, n);                                    \
    }                                                                                      \
    ATTR static void encode_bf16_##SFX(const void *s, void *o, size_t n) {                 \
        encode_bf16_body((const f32u *)s, (u16u *)o, n);                                   \
    }                                                                                      \
    ATTR static void decode_bf16_##SFX(const void *s, void *o, size_t n) {                 \
        decode_bf16_body((const u16u *)s, (f32u *)o, n);                                   \
    }                                                                                      \
    ATTR static void accumulate_f16_##SFX(const void *s, void *a, size_t n) {              \
        accumulate_f16_body((const u16u *)s, (f32u *)a, n);                                \
    }                                                                                      \
    ATTR static void accumulate_bf16_##SFX(const void *s, void *a, size_t n) {             \
        accumulate_bf16_body((const u16u *)s, (f32u *)a, n);                               \
    }                                                                                      \
    ATTR static void dequantize_add_##SFX(const void *q, const void *m, const void *bs,    \
                                          void *o, size_t n, size_t b) {                   \
        dequantize_add_body(q, m, bs, o, n, b);                                            \
    }                                                                                      \
    ATTR static void add_f16_##SFX(const void *s, const void *bs, void *o, size_t n) {     \
        add_f16_body((const u16u *)s, (const f32u *)bs, (f32u *)o, n);                     \
    }                                                                                      \
    ATTR static void add_bf16_##SFX(const void *s, const void *bs, void *o, size_t n) {    \
        add_bf16_body((const u16u *)s, (const f32u *)bs, (f32u *)o, n);                    \
    }                                                                                      \
    ATTR static int ring_hop_##SFX(const void *q, const void *m, const void *bs, void *a,   \
                                   void *qo, void *mo, size_t n, size_t b, int kp) {       \
        return ring_hop_body(q, m, bs, a, qo, mo, n, b, kp);                               \
    }                                                                                      \
    /* bits is a literal in each call, so each width gets its own specialised loops. */   \
    ATTR static void quantize_packed_##SFX(const void *s, void *q, void *m, size_t n,      \
                                           size_t b, int bits) {                           \
        if (bits == 4) quantize_packed_body(s, q, m, n, b, 4);                             \
        else quantize_packed_body(s, q, m, n, b, 2);                                       \
    }                                                                                      \
    ATTR static void dequantize_packed_##SFX(const void *q, const void *m, const void *bs, \
                                             void *o, size_t n, size_t b, int bits,        \
                                             int mode) {                                   \
        if (bits == 4) {                                                                   \
            if (mode == 0) dequantize_packed_body(q, m, bs, o, n, b, 4, 0);                \
            else if (mode == 1) dequantize_packed_body(q, m, bs, o, n, b, 4, 1);           \
            else dequantize_packed_body(q, m, bs, o, n, b, 4, 2);                          \
        } else {                                                                           \
            if (mode == 0) dequantize_packed_body(q, m, bs, o, n, b, 2, 0);                \
            else if (mode == 1) dequantize_packed_body(q, m, bs, o, n, b, 2, 1);           \
            else dequantize_packed_body(q, m, bs, o, n, b, 2, 2);                          \
        }                                                                                  \
    }                                                                                      \
    ATTR static int ring_hop_packed_##SFX(const void *q, const void *m, const void *bs,    \
                                          void *a, void *qo, void *mo, size_t n, size_t b, \
                                          int bits, int kp) {                              \
        if (bits == 4) return ring_hop_packed_body(q, m, bs, a, qo, mo, n, b, 4, kp);      \
        return ring_hop_packed_body(q, m, bs, a, qo, mo, n, b, 2, kp);                     \
    }                                                                                      \
    static const struct impl impl_##SFX = {                                                \
        reduce_##SFX,          divide_##SFX,          quantize_##SFX,                      \
        dequantize_##SFX,      dequantize_accumulate_##SFX,                                \
        encode_f16_##SFX,      decode_f16_##SFX,      encode_bf16_##SFX,                   \
        decode_bf16_##SFX,     accumulate_f16_##SFX,  accumulate_bf16_##SFX,               \
        dequantize_add_##SFX,  add_f16_##SFX,         add_bf16_##SFX,                      \
        ring_hop_##SFX,        quantize_packed_##SFX, dequantize_packed_##SFX,             \
        ring_hop_packed_##SFX,                                                             \
    };

INSTANTIATE(generic, )

#if defined(__x86_64__) && defined(__GNUC__)
#define PCCL_X86 1
#if defined(__clang__)
#define ATTR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#else
/* gcc's generic tuning would otherwise stay at 256-bit vectors. */
#define ATTR_AVX512                                                                        \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")))
#endif
INSTANTIATE(avx2, __attribute__((target("avx2"))))
INSTANTIATE(avx512, ATTR_AVX512)
#endif

static const struct impl *impl = &impl_generic;
static int impl_level = PCCL_SIMD_GENERIC;

static int cpu_level(void) {
#ifdef PCCL_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return PCCL_SIMD_AVX512;
    if (__builtin_cpu_supports("avx2")) return PCCL_SIMD_AVX2;
#endif
    return PCCL_SIMD_GENERIC;
}

int pccl_simd_select(int max_level) {
    int level = cpu_level();
    if (level > max_level) level = max_level < PCCL_SIMD_GENERIC ? PCCL_SIMD_GENERIC : max_level;
    impl = &impl_generic;
#ifdef PCCL_X86
    if (level == PCCL_SIMD_AVX2) impl = &impl_avx2;
    if (level == PCCL_SIMD_AVX512) impl = &impl_avx512;
#endif
    impl_level = level;
    return level;
}

int pccl_simd_level(void) { return impl_level; }

const char *pccl_simd_name(int level) {
    switch (level) {
    case PCCL_SIMD_AVX2: return "avx2";
    case PCCL_SIMD_AVX512: return "avx512";
    default: return "generic";
    }
}

size_t pccl_itemsize(int dtype) {
    switch (dtype) {
    case PCCL_F32: case PCCL_I32: return 4;
    case PCCL_F64: case PCCL_I64: return 8;
    case PCCL_F16: case PCCL_BF16: case PCCL_I16: return 2;
    case PCCL_I8: case PCCL_U8: return 1;
    default: return 0;
    }
}

int pccl_reduce(void *dst, const void *src, size_t n, int dtype, int op) {
    return impl->reduce(dst, src, n, dtype, op);
}

int pccl_divide(void *dst, size_t n, int dtype, int64_t divisor) {
    return impl->divide(dst, n, dtype, divisor);
}

void pccl_quantize_u8(const void *src, void *q, void *meta, size_t n, size_t block) {
    impl->quantize(src, q, meta, n, block);
}

void pccl_dequantize_u8(const void *q, const void *meta, void *out, size_t n, size_t block) {
    impl->dequantize(q, meta, out, n, block);
}

void pccl_dequantize_accumulate_u8(const void *q, const void *meta, void *acc, size_t n,
                                   size_t block) {
    impl->dequantize_accumulate(q, meta, acc, n, block);
}

void pccl_encode_f16(const void *src, void *out, size_t n) { impl->encode_f16(src, out, n); }
void pccl_decode_f16(const void *src, void *out, size_t n) { impl->decode_f16(src, out, n); }
void pccl_encode_bf16(const void *src, void *out, size_t n) { impl->encode_bf16(src, out, n); }
void pccl_decode_bf16(const void *src, void *out, size_t n) { impl->decode_bf16(src, out, n); }
void pccl_accumulate_f16(const void *src, void *acc, size_t n) {
    impl->accumulate_f16(src, acc, n);
}
void pccl_accumulate_bf16(const void *src, void *acc, size_t n) {
    impl->accumulate_bf16(src, acc, n);
}
void pccl_dequantize_add_u8(const void *q, const void *meta, const void *base, void *out,
                            size_t n, size_t block) {
    impl->dequantize_add(q, meta, base, out, n, block);
}
void pccl_add_f16(const void *src, const void *base, void *out, size_t n) {
    impl->add_f16(src, base, out, n);
}
void pccl_add_bf16(const void *src, const void *base, void *out, size_t n) {
    impl->add_bf16(src, base, out, n);
}
int pccl_ring_hop_u8(const void *q, const void *meta, const void *base, void *acc,
                     void *q_out, void *meta_out, size_t n, size_t block, int keep) {
    return impl->ring_hop(q, meta, base, acc, q_out, meta_out, n, block, keep);
}

void pccl_quantize_packed(const void *src, void *q, void *meta, size_t n, size_t block, int bits) {
    impl->quantize_packed(src, q, meta, n, block, bits);
}
void pccl_dequantize_packed(const void *q, const void *meta, const void *base, void *out,
                            size_t n, size_t block, int bits, int mode) {
    impl->dequantize_packed(q, meta, base, out, n, block, bits, mode);
}
int pccl_ring_hop_packed(const void *q, const void *meta, const void *base, void *acc,
                         void *q_out, void *meta_out, size_t n, size_t block, int bits,
                         int keep) {
    return impl->ring_hop_packed(q, meta, base, acc, q_out, meta_out, n, block, bits, keep);
}
