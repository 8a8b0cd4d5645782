/* pccl numeric kernels: reduction, AVG finaliser, block-wise uint8 quantisation, fp16/bf16
 * conversion. Plain C11; no allocation, no Python, callable from any thread.
 *
 * The numpy code in pccl/_reference.py is the specification; every function here produces
 * the same bytes for every input. In short:
 *  - fp16/bf16 arithmetic widens to fp32, computes in fp32, rounds back to nearest-even;
 *  - integers wrap around (two's complement);
 *  - every NaN a kernel writes is the canonical quiet NaN of its output type
 *    (fp32 0x7FC00000, fp64 0x7FF8000000000000, fp16 0x7E00, bf16 0x7FC0);
 *  - subnormals are computed exactly (FTZ/DAZ are never enabled).
 *
 * Pointers may have any alignment (callers pass numpy views at odd byte offsets). Arrays
 * passed to one call must not overlap; the Python binding checks this.
 */
#ifndef PCCL_KERNELS_H
#define PCCL_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* Wire codes shared with pccl.types.DType / ReduceOp; never renumber. */
enum pccl_dtype {
    PCCL_F32 = 0,
    PCCL_F64 = 1,
    PCCL_F16 = 2,
    PCCL_BF16 = 3,
    PCCL_I8 = 4,
    PCCL_I16 = 5,
    PCCL_I32 = 6,
    PCCL_I64 = 7,
    PCCL_U8 = 8,
    PCCL_NDTYPES
};

enum pccl_op { PCCL_SUM = 0, PCCL_AVG = 1, PCCL_MIN = 2, PCCL_MAX = 3, PCCL_PROD = 4 };

/* Instruction-set levels the kernels are compiled for; chosen once at import. */
enum pccl_simd { PCCL_SIMD_GENERIC = 0, PCCL_SIMD_AVX2 = 1, PCCL_SIMD_AVX512 = 2 };

/* Bytes per element of a dtype code, or 0 for an unknown code. */
size_t pccl_itemsize(int dtype);

/* Select the widest level this CPU supports that is <= max_level; returns the level chosen.
 * Call once before any kernel runs (not thread-safe against running kernels). */
int pccl_simd_select(int max_level);
int pccl_simd_level(void);
const char *pccl_simd_name(int level);

/* dst[i] = dst[i] (op) src[i] for op in SUM/MIN/MAX/PROD. Returns 0, or -1 for an unknown
 * dtype or op (AVG included: callers SUM, then pccl_divide). */
int pccl_reduce(void *dst, const void *src, size_t n, int dtype, int op);

/* dst[i] = dst[i] / divisor: floats divide by divisor converted to the compute type,
 * integers truncate toward zero. Returns 0, or -1 for an unknown dtype or divisor < 1. */
int pccl_divide(void *dst, size_t n, int dtype, int64_t divisor);

/* Block-wise min-max uint8 quantisation of n fp32 values; meta holds 2 * ceil(n / block)
 * fp32 values (min, scale) per block. block >= 1. */
void pccl_quantize_u8(const void *src, void *q, void *meta, size_t n, size_t block);
void pccl_dequantize_u8(const void *q, const void *meta, void *out, size_t n, size_t block);
void pccl_dequantize_accumulate_u8(const void *q, const void *meta, void *acc, size_t n,
                                   size_t block);

/* fp32 <-> fp16/bf16 (16-bit words), and fp32 accumulation of fp16/bf16 words. */
void pccl_encode_f16(const void *src, void *out, size_t n);
void pccl_decode_f16(const void *src, void *out, size_t n);
void pccl_encode_bf16(const void *src, void *out, size_t n);
void pccl_decode_bf16(const void *src, void *out, size_t n);
void pccl_accumulate_f16(const void *src, void *acc, size_t n);
void pccl_accumulate_bf16(const void *src, void *acc, size_t n);

/* Out-of-place accumulation: out[i] = base[i] + decoded[i], byte-identical to decoding into out
 * and then pccl_reduce(out, base, n, F32, SUM). base and out must not overlap. */
void pccl_dequantize_add_u8(const void *q, const void *meta, const void *base, void *out,
                            size_t n, size_t block);
void pccl_add_f16(const void *src, const void *base, void *out, size_t n);
void pccl_add_bf16(const void *src, const void *base, void *out, size_t n);

/* One uint8 reduce-scatter hop, fused per block: sum = (base, or acc when base is NULL) +
 * dequantize(q, meta); quantize sum into (q_out, meta_out); keep = 0: acc untouched (sum lives
 * in a scratch block only), 1: acc = sum, 2: acc = dequantize(q_out, meta_out). Byte-identical
 * to the separate kernels in that order; no argument may overlap another (base may be NULL).
 * Returns 0, or -1 if a scratch block could not be allocated (keep 0 with block > 4096). */
int pccl_ring_hop_u8(const void *q, const void *meta, const void *base, void *acc,
                     void *q_out, void *meta_out, size_t n, size_t block, int keep);

/* Packed 4-bit / 2-bit block quantisation (bits 4 or 2): the uint8 rules with 2^bits - 1
 * levels, codes packed 8 / bits per byte (least significant first, unused high bits of a short
 * last byte zero), q holding ceil(n / (8 / bits)) bytes, meta 2 * ceil(n / block) fp32.
 * block >= 1 and a multiple of 8 / bits. Dequantise mode 0: out = decoded, 1: out += decoded,
 * 2: out = base + decoded (base ignored otherwise). The ring hop is pccl_ring_hop_u8's. */
void pccl_quantize_packed(const void *src, void *q, void *meta, size_t n, size_t block, int bits);
void pccl_dequantize_packed(const void *q, const void *meta, const void *base, void *out,
                            size_t n, size_t block, int bits, int mode);
int pccl_ring_hop_packed(const void *q, const void *meta, const void *base, void *acc,
                         void *q_out, void *meta_out, size_t n, size_t block, int bits,
                         int keep);

#endif /* PCCL_KERNELS_H */
