/* Portable scalar C99 variant of kernels_avx512*.c (gemma2.backends.cpu, variant "scalar").
 *
 * The same entry points, arguments, struct layouts and semantics as the AVX-512 kernels, written
 * as plain loops so that they build with any C compiler on any CPU. It is a correctness reference
 * (and a fallback that can be forced with GEMMA2_CPU_KERNELS=scalar), not a fast path: only the
 * order of float32 sums may differ from the AVX-512 variant, everything that variant computes
 * exactly (integer dot products, activation quantization, dequantization, rotary, soft-cap,
 * argmax) it computes bit for bit the same way. See kernels_avx512*.c for the layouts and the
 * reasoning behind each rounding; comments here only say where the two differ.
 * `#pragma omp` splits rows across threads when built with -fopenmp and is ignored otherwise.
 *
 * The other variants (kernels_avx2.c, kernels_neon.c) define the entry points they make faster,
 * each with a GEMMA2_OWN_<NAME> macro, and then #include this file, which supplies the rest (and
 * the fused decoder layer, built on whichever attend() and linear kernels are in the unit): one
 * definition of each scalar step, however many variants reuse it.
 * Requirements checked by the Python side: K % 32 == 0, G % 64 == 0, M <= MAX_ROWS.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels_common.h" /* MAX_ROWS, to_bf16, from_bf16, round_bf16 */

/* ---- bf16 weights: float32 accumulation, one rounding ----------------------------------------- */

#ifndef GEMMA2_OWN_LINEAR_BF16
void gemma2_linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K,
                        int threads) {
    (void)threads; /* only read by the OpenMP pragma */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += from_bf16(x[m * K + k]) * from_bf16(w[n * K + k]);
            y[m * N + n] = to_bf16(acc);
        }
}

#endif

/* ---- quantized weights: the AVX-512 variant's activation quantization, exact integer dots ------ */

/* The activation quantization below is the same in every variant (so their integer dot products are
 * the same numbers); static inline, as a variant that replaces both linear kernels still calls it. */
#define INT16_RANGE 32767.0f

/* Whether any of the n bf16 activations is NaN or infinite (exponent all ones). */
static inline int any_non_finite(const uint16_t *x, int64_t n) {
    for (int64_t k = 0; k < n; k++)
        if ((x[k] & 0x7f80u) == 0x7f80u) return 1;
    return 0;
}

/* The largest |x| of n bf16 values (none of them NaN). */
static inline float peak_of(const uint16_t *x, int64_t n) {
    float largest = 0.0f;
    for (int64_t k = 0; k < n; k++) {
        const float v = fabsf(from_bf16(x[k]));
        if (v > largest) largest = v;
    }
    return largest;
}

/* round(v * levels / largest) to nearest even for n values, 0 when largest is 0: as to_levels in
 * kernels_avx512*.c, float32 `v * (levels / largest)` unless levels / largest overflows (subnormal
 * activations), then float64 `v * levels / largest`. lrintf rounds like vcvtps2dq (nearest even). */
static inline void to_levels(const uint16_t *x, int64_t n, float levels, float largest, int32_t *out) {
    const float inverse = largest > 0 ? levels / largest : 0.0f;
    for (int64_t k = 0; k < n; k++) {
        const float v = from_bf16(x[k]), scaled = v * inverse; /* assigned: float32 even with x87 */
        out[k] = !isinf(inverse) ? (int32_t)lrintf(scaled) : (int32_t)lrint((double)v * levels / largest);
    }
}

/* Rows x [M, K] -> int16 levels xq [M, K] (|level| <= 32767) and the rows' scales max|x| / 32767
 * (1 for a zero row): the activations of the int8 kernels. */
static inline void quantize_rows16(const uint16_t *x, int64_t M, int64_t K, int16_t *xq, float *x_scale) {
    int32_t levels[256];
    for (int64_t m = 0; m < M; m++) {
        const float largest = peak_of(x + m * K, K);
        x_scale[m] = largest > 0 ? largest / INT16_RANGE : 1.0f;
        for (int64_t k = 0; k < K; k += 256) {
            const int64_t n = K - k < 256 ? K - k : 256;
            to_levels(x + m * K + k, n, INT16_RANGE, largest, levels);
            for (int64_t j = 0; j < n; j++) xq[m * K + k + j] = (int16_t)levels[j];
        }
    }
}

/* Blocks of 64 activations (count of them, x contiguous) -> int8 levels xq, each block's scale
 * max|x_block| / 127 (0 for a zero block) and the sum of its unsaturated levels: the activations
 * of the int4 kernels. */
static inline void quantize_blocks64(const uint16_t *x, int64_t count, int8_t *xq, float *block_scale,
                                     int32_t *block_sum) {
    for (int64_t mb = 0; mb < count; mb++) {
        const float largest = peak_of(x + 64 * mb, 64);
        int32_t levels[64], sum = 0;
        to_levels(x + 64 * mb, 64, 127.0f, largest, levels);
        for (int j = 0; j < 64; j++) {
            sum += levels[j]; /* of the unsaturated levels, as the AVX-512 code sums them */
            xq[64 * mb + j] = (int8_t)(levels[j] > 127 ? 127 : levels[j] < -128 ? -128 : levels[j]);
        }
        block_scale[mb] = largest > 0 ? largest / 127.0f : 0.0f;
        block_sum[mb] = sum;
    }
}

#if !defined(GEMMA2_OWN_LINEAR_INT8)
/* int8 weights q [N, K] with row scales: activations quantized per row to int16 with scale
 * max|x| / 32767 (1 for a zero row). The AVX-512 code splits each int16 into bytes for VNNI; the
 * integer dot product it reassembles is the plain one summed here in int64. Returns 1 (and computes
 * nothing) for non-finite activations, else 0. */
int gemma2_linear_int8(const uint16_t *x, const int8_t *q, const float *scale, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int threads) {
    (void)threads;
    if (any_non_finite(x, M * K)) return 1;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(M * K));
    float x_scale[MAX_ROWS];
    quantize_rows16(x, M, K, xq, x_scale);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            int64_t dot = 0;
            for (int64_t k = 0; k < K; k++) dot += (int64_t)q[n * K + k] * xq[m * K + k];
            y[m * N + n] = to_bf16((float)((double)dot * x_scale[m] * scale[n]));
        }
    free(xq);
    return 0;
}

#endif

#if !defined(GEMMA2_OWN_LINEAR_INT4)
/* int4 weights: activations quantized to int8 per block of 64 (scale max|x_block| / 127, 0 for a
 * zero block). Each block's dot product with the nibbles is exact in int32 (at most 64 * 15 * 127
 * plus the -8 * sum(x_q) correction); as in the AVX-512 code it is converted to float32, multiplied
 * by the float32 product (weight scale * activation scale) and summed in float32. */
int gemma2_linear_int4(const uint16_t *x, const uint8_t *q, const float *scale, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int64_t G, int threads) {
    (void)threads;
    if (any_non_finite(x, M * K)) return 1;
    const int64_t blocks = K / 64, groups = K / G;
    int8_t *xq = malloc((size_t)(M * K));
    float *block_scale = malloc(sizeof(float) * (size_t)(M * blocks));
    int32_t *block_sum = malloc(sizeof(int32_t) * (size_t)(M * blocks));
    quantize_blocks64(x, M * blocks, xq, block_scale, block_sum);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            float total = 0.0f;
            for (int64_t b = 0; b < blocks; b++) {
                /* byte j of a block: weight j in its low nibble, weight j + 32 in its high one */
                const uint8_t *bytes = q + (n * K + 64 * b) / 2;
                const int8_t *a = xq + m * K + 64 * b;
                int32_t dot = -8 * block_sum[m * blocks + b];
                for (int j = 0; j < 32; j++) dot += (bytes[j] & 0xF) * a[j] + (bytes[j] >> 4) * a[j + 32];
                const float both = scale[n * groups + 64 * b / G] * block_scale[m * blocks + b];
                total += (float)dot * both;
            }
            y[m * N + n] = to_bf16(total);
        }
    free(xq);
    free(block_scale);
    free(block_sum);
    return 0;
}

#endif

#if !defined(GEMMA2_OWN_DEQUANTIZE)
/* Whole int4 matrix to bf16 [N, K]: w = bf16((nibble - 8) * scale[n, k / G]). */
void gemma2_dequantize_int4(const uint8_t *q, const float *scale, uint16_t *out, int64_t N, int64_t K, int64_t G,
                            int threads) {
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) {
            const uint8_t byte = q[(n * K + k / 64 * 64) / 2 + k % 32];
            const int nibble = k % 64 < 32 ? byte & 0xF : byte >> 4;
            out[n * K + k] = to_bf16((float)(nibble - 8) * scale[n * (K / G) + k / G]);
        }
}

/* Whole int8 matrix to bf16 [N, K]: w = bf16(q * scale[n]). */
void gemma2_dequantize_int8(const int8_t *q, const float *scale, uint16_t *out, int64_t N, int64_t K, int threads) {
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) out[n * K + k] = to_bf16((float)q[n * K + k] * scale[n]);
}

#endif

/* ---- attention of one new token over the cache (see kernels_avx512*.c for the layout and mask) ---- */

/* bf16(tanh(x)) for every bf16 x, by its bits, as the AVX-512 code's table. Filled on first use
 * (outside any parallel region) instead of by a load-time constructor, which C99 does not have;
 * racing fillers would write the same values. */
static uint16_t tanh_of_bf16[65536];
static volatile int tanh_filled = 0;

static void fill_tanh_table(void) {
    if (tanh_filled) return;
    for (uint32_t bits = 0; bits < 65536; bits++) tanh_of_bf16[bits] = to_bf16(tanhf(from_bf16((uint16_t)bits)));
    tanh_filled = 1;
}

/* bf16(tanh(bf16(v / cap)) * cap), the reference's soft-cap roundings. */
static inline float soft_cap1(float v, float cap) {
    return round_bf16(from_bf16(tanh_of_bf16[to_bf16(v / cap)]) * cap);
}

/* One query head's raw scores p[S] (q . k of the visible slots) -> its probabilities, rounded as eager
 * attention rounds them: bf16(bf16(score) * scaling), the soft-cap, float32 softmax (expf) over the
 * visible slots, each probability rounded to bf16; 0 for the others. Every variant's attend calls it
 * (after fill_tanh_table), so they differ at most in how they sum the dot products. */
static inline void probabilities_of_scores(float *p, const uint8_t *seen, int64_t S, float scaling, float softcap) {
    float largest = -INFINITY, total = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        if (!seen[s]) {
            p[s] = 0.0f;
            continue;
        }
        float score = round_bf16(round_bf16(p[s]) * scaling);
        if (softcap > 0) score = soft_cap1(score, softcap);
        p[s] = score;
        if (score > largest) largest = score;
    }
    for (int64_t s = 0; s < S; s++)
        if (seen[s]) total += p[s] = expf(p[s] - largest);
    for (int64_t s = 0; s < S; s++)
        if (seen[s]) p[s] = round_bf16(p[s] / total);
}

/* Scratch of the fused decoder layer (kernels_decode_layer.h); never a zero-byte allocation. */
static void *scratch_alloc(size_t bytes) { return malloc(bytes ? bytes : 1); }

#if !defined(GEMMA2_OWN_ATTEND)
/* Attention of each row's query heads over the slots it sees (seen [B, S], nonzero where visible):
 * scores bf16, times scaling in bf16, soft-capped, float32 softmax over the visible keys (expf),
 * probabilities rounded to bf16, float32 weighted sum of values rounded to bf16. A row that sees
 * no key sums nothing and gets zeros. */
static void attend(const uint16_t *q, const uint16_t *keys, const uint16_t *values, const int64_t *rows,
                   const uint8_t *seen_rows, uint16_t *out, int64_t B, int64_t H, int64_t K, int64_t S, int64_t D,
                   int64_t batch_stride, int64_t head_stride, float scaling, float softcap, int threads) {
    (void)threads;
    const int64_t G = H / K;
    float *scratch = malloc(sizeof(float) * (size_t)(B * H * (S > 0 ? S : 1)));
    fill_tanh_table();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H, kv = h / G, row = rows ? rows[b] : b;
        const uint16_t *key = keys + row * batch_stride + kv * head_stride;
        const uint16_t *value = values + row * batch_stride + kv * head_stride;
        const uint16_t *query = q + bh * D;
        const uint8_t *seen = seen_rows + b * S;
        float *p = scratch + bh * S;
        for (int64_t s = 0; s < S; s++) {
            float dot = 0.0f;
            if (seen[s])
                for (int64_t d = 0; d < D; d++) dot += from_bf16(query[d]) * from_bf16(key[s * D + d]);
            p[s] = dot;
        }
        probabilities_of_scores(p, seen, S, scaling, softcap);
        for (int64_t d = 0; d < D; d++) {
            float acc = 0.0f;
            for (int64_t s = 0; s < S; s++)
                if (seen[s]) acc += p[s] * from_bf16(value[s * D + d]);
            out[bh * D + d] = to_bf16(acc);
        }
    }
    free(scratch);
}
#endif

#include "kernels_decode_layer.h" /* visible, the ABI structs, the fused decoder layer */

/* Padding here is per slot: uint8 [B or 1, S] at padding_stride per row, or NULL. */
void gemma2_decode_attention(const uint16_t *q, const uint16_t *keys, const uint16_t *values, const int64_t *rows,
                             const int64_t *positions, int64_t positions_stride, const uint8_t *padding,
                             int64_t padding_stride, const int64_t *query, int64_t window, uint16_t *out, int64_t B,
                             int64_t H, int64_t K, int64_t S, int64_t D, int64_t batch_stride, int64_t head_stride,
                             float scaling, float softcap, int threads) {
    uint8_t *seen = malloc((size_t)(B * S > 0 ? B * S : 1));
    for (int64_t b = 0; b < B; b++)
        for (int64_t s = 0; s < S; s++)
            seen[b * S + s] = visible(positions[b * positions_stride + s], query[b], window) &&
                              (padding == NULL || padding[b * padding_stride + s]);
    attend(q, keys, values, rows, seen, out, B, H, K, S, D, batch_stride, head_stride, scaling, softcap, threads);
    free(seen);
}

/* ---- the small per-layer operations of a decode step (one thread, the reference's roundings) ---- */

#if !defined(GEMMA2_OWN_RMS_NORM)
/* Gemma's RMSNorm: bf16(x * (1 / sqrt(mean(x^2) + eps)) * (1 + w)) in float32. */
void gemma2_rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t M, int64_t D, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *row = x + m * D;
        float sum = 0.0f;
        for (int64_t d = 0; d < D; d++) sum += from_bf16(row[d]) * from_bf16(row[d]);
        const float inverse = 1.0f / sqrtf(sum / (float)D + eps);
        for (int64_t d = 0; d < D; d++) {
            float normed = from_bf16(row[d]) * inverse;
            out[m * D + d] = to_bf16(normed * (1.0f + from_bf16(w[d])));
        }
    }
}

#endif

/* out = x * cos + rotate_half(x) * sin, each product and the sum rounded to bf16. */
void gemma2_rotary(const uint16_t *x, uint16_t *out, const uint16_t *cos, const uint16_t *sin, int64_t B,
                   int64_t heads, int64_t D, int64_t cos_stride) {
    const int64_t half = D / 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *v = x + (b * heads + h) * D;
            uint16_t *o = out + (b * heads + h) * D;
            const uint16_t *c = cos + b * cos_stride, *s = sin + b * cos_stride;
            for (int64_t d = 0; d < half; d++) {
                float first = from_bf16(v[d]), second = from_bf16(v[d + half]);
                float a = round_bf16(first * from_bf16(c[d])) + round_bf16(-second * from_bf16(s[d]));
                float z = round_bf16(second * from_bf16(c[d + half])) + round_bf16(first * from_bf16(s[d + half]));
                o[d] = to_bf16(a);
                o[d + half] = to_bf16(z);
            }
        }
}

/* ---- the logits of a decode step --------------------------------------------------------------- */

#if !defined(GEMMA2_OWN_SOFT_CAP)
/* out = bf16(tanh(bf16(x / cap)) * cap) for n bf16 values, tanh from the table. */
void gemma2_soft_cap(const uint16_t *x, uint16_t *out, int64_t n, float cap, int threads) {
    (void)threads;
    fill_tanh_table();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++) out[i] = to_bf16(soft_cap1(from_bf16(x[i]), cap));
}

#endif

#if !defined(GEMMA2_OWN_ARGMAX)
/* Index of the largest of each row's n bf16 values, as torch.argmax: the first of equal largest
 * values (0 and -0 are equal), the first NaN if there is one (-1 for an empty row, as AVX-512). */
void gemma2_argmax_bf16(const uint16_t *x, int64_t rows, int64_t n, int64_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        int64_t winner = -1;
        float largest = -INFINITY;
        for (int64_t i = 0; i < n; i++) {
            const float v = from_bf16(x[r * n + i]);
            if (v != v) {
                winner = i;
                break;
            }
            if (winner < 0 || v > largest) {
                largest = v;
                winner = i;
            }
        }
        out[r] = winner;
    }
}
#endif
