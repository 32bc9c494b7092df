/* Matrix-vector kernels for decoding on x86-64 CPUs with AVX-512 BF16 (gemma2.cpu_kernels).
 *
 * Decoding reads every weight once per token, so its speed is the memory bandwidth. PyTorch's
 * bf16 GEMM reaches about 60 % of it for one row, and its int8/int4 weight-only kernels less;
 * these kernels read each weight row once for up to MAX_ROWS activation rows and stay close to
 * the bandwidth of a plain reduction.
 *
 * Every kernel computes y[m, n] = sum_k x[m, k] * w[n, k] and writes bf16 (round to nearest even),
 * like torch.nn.functional.linear in bf16: float32 accumulation for bf16 weights; for quantized
 * weights, exact integer accumulation against activations quantized per row to int16 (int8
 * weights) or per block of 64 to int8 (int4 weights, see below). Layouts:
 *   x      bf16 [M, K]
 *   bf16   w bf16 [N, K]
 *   int8   q int8 [N, K], one float32 scale per row: w = q * scale[n]
 *   int4   q uint8 [N, K / 2], float32 scales [N, K / G]: w = (nibble - 8) * scale[n, k / G].
 *          Each block of 64 weights is 32 bytes; byte j holds weight j in its low nibble and
 *          weight j + 32 in its high nibble.
 * Rows are split across OpenMP threads (the caller passes torch's thread count; the library
 * links the same libgomp torch loaded, so both share one thread pool).
 * Requirements checked by the Python side: K % 32 == 0, G % 64 == 0, M <= MAX_ROWS.
 */
#ifndef GEMMA2_KERNELS_AVX512_H
#define GEMMA2_KERNELS_AVX512_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels_common.h" /* MAX_ROWS, to_bf16, from_bf16, round_bf16 */

#define INLINE static inline __attribute__((always_inline))

INLINE __m512 load_bf16x16(const uint16_t *x) {
    return _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)x));
}

/* 16 floats to bf16, rounded to nearest even like to_bf16. (VCVTNEPS2BF16 would flush subnormal
 * results to zero, which PyTorch's bf16 ops do not.) */
INLINE __m256i to_bf16x16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

INLINE void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* Entry points of kernels_avx512.c that the decode layer (kernels_avx512_decode.c) calls. */
void gemma2_linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K,
                        int threads);
int gemma2_linear_int8(const uint16_t *x, const int8_t *q, const float *scale, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int threads);
int gemma2_linear_int4(const uint16_t *x, const uint8_t *q, const float *scale, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int64_t G, int threads);

#endif
