/* AArch64 Advanced SIMD variant of the native kernels (gemma2.backends.cpu, variant "neon").
 *
 * For ARMv8.2-A CPUs with the dot-product extension (HWCAP asimddp): Apple M1 and later, AWS
 * Graviton 2 and later, Neoverse N1/V1/N2/V2, Cortex-A76 and later. Built by library.py with
 * -O3 -march=armv8.2-a+dotprod -ffp-contract=off -fopenmp. -ffp-contract=off matters twice: the
 * scalar code included below must not be fused into FMAs (it would no longer be the scalar variant
 * bit for bit), and arm_neon.h writes vmulq_f32 / vaddq_f32 as plain `*` / `+`, which GCC would
 * otherwise contract into the one FMLA that breaks the int4 kernel's bit-exact float order.
 *
 * Defined here (GEMMA2_OWN_*), then `#include "kernels_scalar.c"` for every other entry point and
 * the fused decoder layer (which thereby runs on these linear kernels):
 *   gemma2_linear_bf16  y[m, n] = bf16(sum_k x[m, k] * w[n, k]): float32 FMLA sums, one rounding. Only
 *                       the order of the float32 sums differs from the scalar variant, and that order
 *                       is fixed per output (8 accumulators per activation row, same whatever rows share
 *                       the pass or however many threads run), so results do not depend on either.
 *   gemma2_linear_int8  bit for bit the scalar result: the same int16 activation quantization and the
 *                       exact integer dot product, here from SDOT (ARM ARM, "SDOT (vector)") on bytes.
 *   gemma2_linear_int4  bit for bit the scalar result: the same int8 block quantization, exact int32
 *                       block dots from SDOT on unpacked nibbles, float32 block sums in block order.
 *   attend (decode attention, static)
 *                       bit for bit the scalar result: the same float32 sums in the same order, four
 *                       independent ones per vector; scores, expf softmax and roundings as scalar.
 * Each weight row is streamed from memory once per call for all M <= MAX_ROWS activation rows (the
 * bf16 kernel takes rows in pairs: the later pairs reread the weight row from L1).
 * Requirements checked by the Python side: K % 32 == 0, G % 64 == 0, M <= MAX_ROWS.
 */
#include <arm_neon.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels_common.h" /* MAX_ROWS, to_bf16, from_bf16, round_bf16 */

#if !defined(__aarch64__) || !defined(__ARM_FEATURE_DOTPROD)
#error "kernels_neon.c needs AArch64 with the dot-product extension (-march=armv8.2-a+dotprod)"
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* bf16 -> float32 is the bf16 bits in the high half of a float32. */
ALWAYS_INLINE float32x4_t widen_low(uint16x8_t v) { return vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16)); }
ALWAYS_INLINE float32x4_t widen_high(uint16x8_t v) { return vreinterpretq_f32_u32(vshll_high_n_u16(v, 16)); }

/* ---- bf16 weights ------------------------------------------------------------------------------ */

#define BF16_GROUP 2 /* activation rows per pass over a weight row: 16 accumulators + 8 weight registers */

/* out[r] = dot(xf row r, w) for R <= BF16_GROUP rows (a constant after inlining). 8 accumulators
 * per row cover the FMLA latency times its two pipes (Arm Neoverse N1/V1 software optimization
 * guides: latency 4, throughput 2) even for one row; each row is summed the same way whatever rows
 * come with it. */
ALWAYS_INLINE void bf16_dot_rows(const float *xf, int64_t K, const uint16_t *w, const int R, float *out) {
    float32x4_t acc[BF16_GROUP][8];
    for (int r = 0; r < R; r++)
        for (int a = 0; a < 8; a++) acc[r][a] = vdupq_n_f32(0.0f);
    for (int64_t k = 0; k < K; k += 32) {
        float32x4_t v[8];
        for (int j = 0; j < 4; j++) {
            const uint16x8_t raw = vld1q_u16(w + k + 8 * j);
            v[2 * j] = widen_low(raw);
            v[2 * j + 1] = widen_high(raw);
        }
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 8; j++) acc[r][j] = vfmaq_f32(acc[r][j], v[j], vld1q_f32(xf + r * K + k + 4 * j));
    }
    for (int r = 0; r < R; r++) {
        for (int a = 0; a < 4; a++) acc[r][a] = vaddq_f32(acc[r][a], acc[r][a + 4]);
        out[r] = vaddvq_f32(vaddq_f32(vaddq_f32(acc[r][0], acc[r][1]), vaddq_f32(acc[r][2], acc[r][3])));
    }
}

#define GEMMA2_OWN_LINEAR_BF16
void gemma2_linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K,
                        int threads) {
    (void)threads; /* only read by the OpenMP pragma */
    if (M <= 0 || N <= 0) return;
    float *xf = malloc(sizeof(float) * (size_t)(M * K > 0 ? M * K : 1));
    if (xf == NULL) return;
    int64_t i = 0;
    for (; i + 8 <= M * K; i += 8) {
        const uint16x8_t raw = vld1q_u16(x + i);
        vst1q_f32(xf + i, widen_low(raw));
        vst1q_f32(xf + i + 4, widen_high(raw));
    }
    for (; i < M * K; i++) xf[i] = from_bf16(x[i]);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        float sums[MAX_ROWS];
        for (int64_t m = 0; m < M; m += BF16_GROUP) {
            if (M - m >= 2)
                bf16_dot_rows(xf + m * K, K, w + n * K, 2, sums + m);
            else
                bf16_dot_rows(xf + m * K, K, w + n * K, 1, sums + m);
        }
        for (int64_t m = 0; m < M; m++) y[m * N + n] = to_bf16(sums[m]);
    }
    free(xf);
}

/* ---- activation quantization --------------------------------------------------------------------
 * The scalar file's, so that every variant quantizes the same way from one definition: declared here
 * and defined (static inline) in kernels_scalar.c, included at the end of this unit. */

static inline int any_non_finite(const uint16_t *x, int64_t n);
static inline void quantize_rows16(const uint16_t *x, int64_t M, int64_t K, int16_t *xq, float *x_scale);
static inline void quantize_blocks64(const uint16_t *x, int64_t count, int8_t *xq, float *block_scale,
                                     int32_t *block_sum);

/* ---- int8 weights -------------------------------------------------------------------------------
 * x_q (|x_q| <= 32767) = 256 * hi + lo with hi in -128..127 and lo in 0..255; SDOT multiplies
 * signed bytes only, so lo is stored as lo - 128 and
 *     sum w * x_q = 256 * sum w * hi + sum w * (lo - 128) + 128 * sum w
 * with sum w (per weight row, shared by all activation rows) from one more SDOT against ones.
 * Each SDOT adds at most 4 * 128 * 128 = 2^16 to a lane, so lanes are flushed to int64 every
 * INT8_CHUNK elements (at most 2^12 SDOTs per lane: 2^28) and any K is exact. */

#define INT8_CHUNK 65536

/* y[m, n] for R activation rows (a constant after inlining) against weight row n. */
ALWAYS_INLINE void int8_rows(const int8_t *high, const int8_t *low, const float *x_scale, const int8_t *q,
                             const float *scale, uint16_t *y, int64_t n, int64_t N, int64_t K, const int R) {
    const int8_t *row = q + n * K;
    const int8x16_t ones = vdupq_n_s8(1);
    int64_t hi_total[MAX_ROWS] = {0}, lo_total[MAX_ROWS] = {0}, w_total = 0;
    const int U = R <= 4 ? 2 : 1; /* independent chains per sum (SDOT latency) while registers last */
    for (int64_t start = 0; start < K; start += INT8_CHUNK) {
        const int64_t end = K - start < INT8_CHUNK ? K : start + INT8_CHUNK;
        int32x4_t hi[MAX_ROWS][2], lo[MAX_ROWS][2], ws[2] = {vdupq_n_s32(0), vdupq_n_s32(0)};
        for (int r = 0; r < R; r++)
            for (int u = 0; u < 2; u++) hi[r][u] = lo[r][u] = vdupq_n_s32(0);
        for (int64_t k = start; k < end; k += 16 * U)
            for (int u = 0; u < U; u++) {
                const int8x16_t wv = vld1q_s8(row + k + 16 * u);
                ws[u] = vdotq_s32(ws[u], wv, ones);
                for (int r = 0; r < R; r++) {
                    hi[r][u] = vdotq_s32(hi[r][u], wv, vld1q_s8(high + r * K + k + 16 * u));
                    lo[r][u] = vdotq_s32(lo[r][u], wv, vld1q_s8(low + r * K + k + 16 * u));
                }
            }
        w_total += vaddlvq_s32(ws[0]) + vaddlvq_s32(ws[1]);
        for (int r = 0; r < R; r++) {
            hi_total[r] += vaddlvq_s32(hi[r][0]) + vaddlvq_s32(hi[r][1]);
            lo_total[r] += vaddlvq_s32(lo[r][0]) + vaddlvq_s32(lo[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        const int64_t dot = 256 * hi_total[r] + lo_total[r] + 128 * w_total;
        y[r * N + n] = to_bf16((float)((double)dot * x_scale[r] * scale[n]));
    }
}

#define GEMMA2_OWN_LINEAR_INT8
/* Returns 1 (and computes nothing) for non-finite activations, else 0, as the scalar variant. */
int gemma2_linear_int8(const uint16_t *x, const int8_t *q, const float *scale, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int threads) {
    (void)threads;
    if (M <= 0 || N <= 0) return 0;
    if (any_non_finite(x, M * K)) return 1;
    int16_t *levels = malloc(sizeof(int16_t) * (size_t)(M * K > 0 ? M * K : 1));
    int8_t *high = malloc((size_t)(2 * M * K > 0 ? 2 * M * K : 1)), *low = high + M * K;
    float x_scale[MAX_ROWS];
    quantize_rows16(x, M, K, levels, x_scale);
    for (int64_t i = 0; i < M * K; i++) { /* |level| <= 32767, so the offset level is 1..65535 */
        const int32_t offset = levels[i] + 32768;
        high[i] = (int8_t)(offset / 256 - 128);
        low[i] = (int8_t)(offset % 256 - 128);
    }
    free(levels);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) switch (M) {
#define INT8_CASE(R)                                                                                            \
    case R: int8_rows(high, low, x_scale, q, scale, y, n, N, K, R); break;
            INT8_CASE(1) INT8_CASE(2) INT8_CASE(3) INT8_CASE(4) INT8_CASE(5) INT8_CASE(6) INT8_CASE(7)
            default: int8_rows(high, low, x_scale, q, scale, y, n, N, K, 8); break;
#undef INT8_CASE
        }
    free(high);
    return 0;
}

/* ---- int4 weights -------------------------------------------------------------------------------
 * Byte j of a 64-weight block holds weight j in its low nibble and weight j + 32 in its high one
 * (unsigned 0..15, the -8 offset applied through -8 * sum(x_q) as in the scalar code). The nibbles
 * are valid signed bytes, so SDOT takes them as they are (llama.cpp's ggml_vec_dot_q4_0_q8_0 for
 * NEON unpacks the same way). Four rows' block dots are reduced into one vector (ADDP), so their
 * float32 steps `total += (float)dot * (scale * x_scale)` run lane-wise in the scalar code's
 * order, block by block, with the same roundings. */

#define INT4_LANES 8 /* the per-block activation data is stored [block][MAX_ROWS] for vector loads */

/* y[m, n] for R activation rows (a constant after inlining) against weight row n. */
ALWAYS_INLINE void int4_rows(const int8_t *xq, const float *block_scale, const int32_t *correction, const uint8_t *q,
                             const float *scale, uint16_t *y, int64_t n, int64_t N, int64_t K, int64_t G,
                             const int R) {
    const int64_t blocks = K / 64, groups = K / G;
    const uint8x16_t nibble = vdupq_n_u8(0x0F);
    const uint8_t *row = q + n * K / 2;
    float32x4_t total[2] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
    for (int64_t b = 0; b < blocks; b++) {
        const uint8x16_t b0 = vld1q_u8(row + 32 * b), b1 = vld1q_u8(row + 32 * b + 16);
        const int8x16_t w[4] = {vreinterpretq_s8_u8(vandq_u8(b0, nibble)), vreinterpretq_s8_u8(vandq_u8(b1, nibble)),
                                vreinterpretq_s8_u8(vshrq_n_u8(b0, 4)), vreinterpretq_s8_u8(vshrq_n_u8(b1, 4))};
        int32x4_t acc[INT4_LANES];
        for (int r = 0; r < INT4_LANES; r++) acc[r] = vdupq_n_s32(0);
        for (int r = 0; r < R; r++) {
            const int8_t *a = xq + r * K + 64 * b;
            const int32x4_t low = vdotq_s32(vdotq_s32(vdupq_n_s32(0), w[0], vld1q_s8(a)), w[1], vld1q_s8(a + 16));
            const int32x4_t high = vdotq_s32(vdupq_n_s32(0), w[2], vld1q_s8(a + 32)); /* two chains: latency */
            acc[r] = vaddq_s32(low, vdotq_s32(high, w[3], vld1q_s8(a + 48)));
        }
        const float32x4_t weight_scale = vdupq_n_f32(scale[n * groups + 64 * b / G]);
        for (int g = 0; g < (R + 3) / 4; g++) {
            const int32x4_t *a = acc + 4 * g;
            int32x4_t dot = vpaddq_s32(vpaddq_s32(a[0], a[1]), vpaddq_s32(a[2], a[3]));
            dot = vaddq_s32(dot, vld1q_s32(correction + b * INT4_LANES + 4 * g));
            const float32x4_t both = vmulq_f32(weight_scale, vld1q_f32(block_scale + b * INT4_LANES + 4 * g));
            total[g] = vaddq_f32(total[g], vmulq_f32(vcvtq_f32_s32(dot), both));
        }
    }
    float sums[INT4_LANES];
    vst1q_f32(sums, total[0]);
    vst1q_f32(sums + 4, total[1]);
    for (int r = 0; r < R; r++) y[r * N + n] = to_bf16(sums[r]);
}

#define GEMMA2_OWN_LINEAR_INT4
/* Returns 1 (and computes nothing) for non-finite activations, else 0, as the scalar variant. */
int gemma2_linear_int4(const uint16_t *x, const uint8_t *q, const float *scale, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int64_t G, int threads) {
    (void)threads;
    if (M <= 0 || N <= 0) return 0;
    if (any_non_finite(x, M * K)) return 1;
    const int64_t blocks = K / 64, slots = (blocks > 0 ? blocks : 1) * INT4_LANES;
    int8_t *xq = malloc((size_t)(M * K > 0 ? M * K : 1));
    float *row_scale = malloc(sizeof(float) * (size_t)(M * blocks > 0 ? M * blocks : 1));
    int32_t *row_sum = malloc(sizeof(int32_t) * (size_t)(M * blocks > 0 ? M * blocks : 1));
    quantize_blocks64(x, M * blocks, xq, row_scale, row_sum);
    /* [block][INT4_LANES]: activation scales and -8 * sum(levels), zero for absent rows */
    float *block_scale = calloc((size_t)slots, sizeof(float));
    int32_t *correction = calloc((size_t)slots, sizeof(int32_t));
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < blocks; b++) {
            block_scale[b * INT4_LANES + m] = row_scale[m * blocks + b];
            correction[b * INT4_LANES + m] = -8 * row_sum[m * blocks + b];
        }
    free(row_scale);
    free(row_sum);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) switch (M) {
#define INT4_CASE(R)                                                                                            \
    case R: int4_rows(xq, block_scale, correction, q, scale, y, n, N, K, G, R); break;
            INT4_CASE(1) INT4_CASE(2) INT4_CASE(3) INT4_CASE(4) INT4_CASE(5) INT4_CASE(6) INT4_CASE(7)
            default: int4_rows(xq, block_scale, correction, q, scale, y, n, N, K, G, 8); break;
#undef INT4_CASE
        }
    free(xq);
    free(block_scale);
    free(correction);
    return 0;
}

/* ---- decode attention ---------------------------------------------------------------------------
 * The scalar attend's arithmetic, bit for bit: each float32 sum still runs sequentially in the
 * scalar order, the lanes only hold independent sums. q . k runs 4 keys per vector (lane i sums
 * key s + i over d = 0, 1, ..., after a 4 x 4 transpose of the keys' elements) and the weighted
 * value sum 4 output elements per vector (each over s in order); scores, expf and the
 * probabilities stay scalar. The products (bf16 by bf16, and bf16 probabilities by bf16 values) are
 * exact in float32, so only the order of the additions has to match. */

static void fill_tanh_table(void); /* the scalar file's bf16 tanh table and softmax of the scores */
static inline void probabilities_of_scores(float *p, const uint8_t *seen, int64_t S, float scaling, float softcap);

/* dots[i] = sum_d q[d] * key[(s + i) * D + d] for 4 keys, D % 4 == 0. */
ALWAYS_INLINE void four_dots(const float *q, const uint16_t *key, int64_t D, float *dots) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int64_t d = 0; d < D; d += 4) {
        const float32x4_t k0 = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(key + d), 16));
        const float32x4_t k1 = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(key + D + d), 16));
        const float32x4_t k2 = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(key + 2 * D + d), 16));
        const float32x4_t k3 = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(key + 3 * D + d), 16));
        const float32x4_t t0 = vtrn1q_f32(k0, k1), t1 = vtrn2q_f32(k0, k1);
        const float32x4_t t2 = vtrn1q_f32(k2, k3), t3 = vtrn2q_f32(k2, k3);
        const float32x4_t column[4] = {
            vreinterpretq_f32_f64(vtrn1q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2))),
            vreinterpretq_f32_f64(vtrn1q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3))),
            vreinterpretq_f32_f64(vtrn2q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2))),
            vreinterpretq_f32_f64(vtrn2q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)))};
        for (int j = 0; j < 4; j++) acc = vaddq_f32(acc, vmulq_f32(vdupq_n_f32(q[d + j]), column[j]));
    }
    vst1q_f32(dots, acc);
}

#define GEMMA2_OWN_ATTEND
static void attend(const uint16_t *q, const uint16_t *keys, const uint16_t *values, const int64_t *rows,
                   const uint8_t *seen_rows, uint16_t *out, int64_t B, int64_t H, int64_t K, int64_t S, int64_t D,
                   int64_t batch_stride, int64_t head_stride, float scaling, float softcap, int threads) {
    (void)threads;
    const int64_t G = H / K, per_head = (S > 0 ? S : 1) + D; /* probabilities, then the query in float32 */
    float *scratch = malloc(sizeof(float) * (size_t)(B * H * per_head));
    fill_tanh_table();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H, kv = h / G, row = rows ? rows[b] : b;
        const uint16_t *key = keys + row * batch_stride + kv * head_stride;
        const uint16_t *value = values + row * batch_stride + kv * head_stride;
        const uint8_t *seen = seen_rows + b * S;
        float *p = scratch + bh * per_head, *query = p + (S > 0 ? S : 1);
        for (int64_t d = 0; d < D; d++) query[d] = from_bf16(q[bh * D + d]);
        for (int64_t s = 0; s < S;) {
            float dots[4];
            int count = 1;
            if (D % 4 == 0 && s + 4 <= S && (seen[s] | seen[s + 1] | seen[s + 2] | seen[s + 3])) {
                four_dots(query, key + s * D, D, dots);
                count = 4;
            } else if (seen[s]) {
                dots[0] = 0.0f;
                for (int64_t d = 0; d < D; d++) dots[0] += query[d] * from_bf16(key[s * D + d]);
            }
            for (int i = 0; i < count; i++) p[s + i] = seen[s + i] ? dots[i] : 0.0f;
            s += count;
        }
        probabilities_of_scores(p, seen, S, scaling, softcap);
        int64_t d = 0;
        for (; d + 32 <= D; d += 32) { /* 8 vectors of independent sums over s */
            float32x4_t acc[8];
            for (int j = 0; j < 8; j++) acc[j] = vdupq_n_f32(0.0f);
            for (int64_t s = 0; s < S; s++) {
                if (!seen[s]) continue;
                const float32x4_t weight = vdupq_n_f32(p[s]);
                for (int j = 0; j < 4; j++) {
                    const uint16x8_t raw = vld1q_u16(value + s * D + d + 8 * j);
                    acc[2 * j] = vaddq_f32(acc[2 * j], vmulq_f32(weight, widen_low(raw)));
                    acc[2 * j + 1] = vaddq_f32(acc[2 * j + 1], vmulq_f32(weight, widen_high(raw)));
                }
            }
            for (int j = 0; j < 8; j++) {
                float sums[4];
                vst1q_f32(sums, acc[j]);
                for (int i = 0; i < 4; i++) out[bh * D + d + 4 * j + i] = to_bf16(sums[i]);
            }
        }
        for (; d < D; d++) {
            float acc = 0.0f;
            for (int64_t s = 0; s < S; s++)
                if (seen[s]) acc += p[s] * from_bf16(value[s * D + d]);
            out[bh * D + d] = to_bf16(acc);
        }
    }
    free(scratch);
}

#include "kernels_scalar.c" /* every entry point not defined above, and the fused decoder layer */
