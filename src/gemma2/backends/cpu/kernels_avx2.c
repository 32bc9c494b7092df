/* AVX2 + FMA + F16C variant of the native kernels (gemma2.backends.cpu, variant "avx2", x86-64-v3:
 * Intel Haswell and later, AMD Zen 1 to 3, and the AVX-512 CPUs without BF16).
 *
 * These CPUs have no bf16 or int8 dot-product instructions: bf16 weights are widened to float32 and
 * multiplied with FMA; int8 weights are sign-extended to int16 and multiplied with the int16
 * activations by vpmaddwd (exact, as the scalar variant's int64 sums); int4 nibbles go through
 * vpmaddubsw against int8 activation blocks (ggml's AVX2 Q4_0 dot product, ggml-org/llama.cpp
 * ggml-cpu/arch/x86/quants.c). Each weight row is read once for all M <= MAX_ROWS activation rows.
 * The entry points defined here are marked GEMMA2_OWN_*; kernels_scalar.c, included first, supplies
 * the conversions, the activation quantization, the other entry points and the fused decoder layer
 * (which calls the kernels below), so what is not here is the scalar code, bit for bit.
 * Requirements checked by the Python side: K % 32 == 0, G % 64 == 0, M <= MAX_ROWS.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GEMMA2_OWN_LINEAR_BF16
#define GEMMA2_OWN_LINEAR_INT8
#define GEMMA2_OWN_LINEAR_INT4
#define GEMMA2_OWN_ATTEND
static void attend(const uint16_t *q, const uint16_t *keys, const uint16_t *values, const int64_t *rows,
                   const uint8_t *seen_rows, uint16_t *out, int64_t B, int64_t H, int64_t K, int64_t S, int64_t D,
                   int64_t batch_stride, int64_t head_stride, float scaling, float softcap, int threads);
#include "kernels_scalar.c" /* to_bf16, the quantization helpers, every entry point not defined below */

#define INLINE static inline __attribute__((always_inline))

static inline float horizontal_sum(__m256 v) {
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

/* x [M, K] bf16 -> float32, each 16 elements as the 8 even ones then the 8 odd ones. */
static void widen_rows(const uint16_t *x, float *xf, int64_t count) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t k = 0; k < count; k += 16) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(x + k));
        _mm256_storeu_ps(xf + k, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
        _mm256_storeu_ps(xf + k + 8, _mm256_castsi256_ps(_mm256_and_si256(v, high)));
    }
}

/* How far ahead (bytes) the first pass over a chunk asks for its weights into L2: the loop bodies
 * (more so with more activation rows) leave too few misses in flight for the demand loads and the
 * short prefetch alone to stream at full bandwidth (Little's law). A/B on a 55296 x 2304 matrix,
 * 2 threads on a Zen 4 running this variant: 1 row 24.8 -> 32.8 GB/s, 2 rows 23.0 -> 33.2, 3 rows
 * 21.7 -> 32.9, 4 rows 20.2 -> 29.7, 8 rows 17.0 -> 20.6; at K = 9216 unchanged. */
#define FAR_AHEAD 16384

/* Sums for the outputs of R weight rows (starting at w, K apart) and MM activation rows (xf, K
 * apart): one float32 accumulator per output, taking the even elements of each 16 and then the odd
 * ones, summed across lanes at the end. Every output is summed in this order whatever R and MM are,
 * so a row's result depends neither on the rows that come with it in the batch nor on the thread
 * count. One pass reads the R weight rows once for MM activation rows: each weight load and
 * widening is shared by MM rows and each activation load by R rows (R * MM = 8 accumulators, the
 * chains FMA latency wants in flight, plus the weights and activations in the 16 registers). */
INLINE void bf16_tile(const float *xf, const uint16_t *w, int64_t K, int64_t k0, int64_t k1, const int R,
                      const int MM, const int far, __m256 *sums) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[4][2];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MM; m++) acc[r][m] = sums[m * 4 + r];
    for (int64_t k = k0; k < k1; k += 16) {
        const __m256 x_even[2] = {_mm256_loadu_ps(xf + k), _mm256_loadu_ps(xf + (MM - 1) * K + k)};
        const __m256 x_odd[2] = {_mm256_loadu_ps(xf + k + 8), _mm256_loadu_ps(xf + (MM - 1) * K + k + 8)};
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(w + r * K + k + 256), _MM_HINT_T0);
            if (far) _mm_prefetch((const char *)(w + r * K + k) + FAR_AHEAD, _MM_HINT_T1);
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w + r * K + k));
            const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
            for (int m = 0; m < MM; m++) acc[r][m] = _mm256_fmadd_ps(even, x_even[m], acc[r][m]);
            for (int m = 0; m < MM; m++) acc[r][m] = _mm256_fmadd_ps(odd, x_odd[m], acc[r][m]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MM; m++) sums[m * 4 + r] = acc[r][m];
}

/* (Each weight load is preceded by a prefetch half a kilobyte ahead in its row: the hardware
 * prefetcher alone left the M = 1 kernels 11-19 % short on a Zen 3, bf16 / int8 / int4.)
 * Weight rows n .. n + R - 1 against all M activation rows, in passes of two over K_CHUNK columns at a
 * time: the chunk of the R weight rows and of all M activation rows (float32) then stays in L1 while
 * every pass reads it (the whole rows of 8 activations, 74 KB at K = 2304, would come from L2 each
 * pass). The accumulators carry over between chunks, so the sums are the same as in one sweep. */
#define K_CHUNK 512
INLINE void bf16_rows(const float *xf, const uint16_t *w, uint16_t *y, int64_t n, int64_t M, int64_t N, int64_t K,
                      const int R) {
    __m256 sums[MAX_ROWS * 4];
    for (int i = 0; i < MAX_ROWS * 4; i++) sums[i] = _mm256_setzero_ps();
    const uint16_t *rows = w + n * K;
    for (int64_t k0 = 0; k0 < K; k0 += K_CHUNK) {
        const int64_t k1 = k0 + K_CHUNK < K ? k0 + K_CHUNK : K;
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) bf16_tile(xf + m * K, rows, K, k0, k1, R, 2, m == 0, sums + m * 4);
        if (m < M) bf16_tile(xf + m * K, rows, K, k0, k1, R, 1, m == 0, sums + m * 4);
    }
    for (int64_t m = 0; m < M; m++)
        for (int r = 0; r < R; r++) y[m * N + n + r] = to_bf16(horizontal_sum(sums[m * 4 + r]));
}

void gemma2_linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K,
                        int threads) {
    (void)threads; /* only read by the OpenMP pragma */
    if (M <= 0 || N <= 0) return;
    float *xf = aligned_alloc(64, sizeof(float) * (size_t)(M * K > 0 ? (M * K + 15) / 16 * 16 : 16));
    if (xf == NULL) return;
    widen_rows(x, xf, M * K);
    const int64_t blocks = N / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t block = 0; block < blocks; block++) bf16_rows(xf, w, y, 4 * block, M, N, K, 4);
    for (int64_t n = blocks * 4; n < N; n++) bf16_rows(xf, w, y, n, M, N, K, 1);
    free(xf);
}

/* ---- int8 weights: exact integer dot products ----------------------------------------------------
 *
 * vpmaddwd adds two int16 * int16 products into an int32 lane, at most 2 * 128 * 32767 < 2^23 per
 * instruction; FLUSH weights (128 instructions per lane) stay below 2^31, then the lanes are added
 * into int64. So the dot product is the exact integer one, scaled as the scalar variant scales it. */

#define FLUSH 2048

INLINE int64_t sum_int64x4(__m256i v) {
    int64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, v);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

/* Exact dots of R weight rows (w, K apart) with MM activation rows (xq, K apart) into out[m * 4 + r]:
 * R * MM = 8 int32 accumulators share each weight's widening and each activation load. */
INLINE void int8_tile(const int16_t *xq, const int8_t *w, int64_t K, const int R, const int MM, int64_t *out) {
    __m256i total[4][2];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MM; m++) total[r][m] = _mm256_setzero_si256();
    for (int64_t start = 0; start < K; start += FLUSH) {
        const int64_t stop = start + FLUSH < K ? start + FLUSH : K;
        __m256i acc[4][2];
        for (int r = 0; r < R; r++)
            for (int m = 0; m < MM; m++) acc[r][m] = _mm256_setzero_si256();
        for (int64_t k = start; k < stop; k += 16) {
            const __m256i x[2] = {_mm256_loadu_si256((const __m256i *)(xq + k)),
                                  _mm256_loadu_si256((const __m256i *)(xq + (MM - 1) * K + k))};
            for (int r = 0; r < R; r++) {
                const __m256i weights = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + r * K + k)));
                for (int m = 0; m < MM; m++) acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(weights, x[m]));
            }
        }
        for (int r = 0; r < R; r++)
            for (int m = 0; m < MM; m++) {
                const __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(acc[r][m])),
                                                      _mm256_cvtepi32_epi64(_mm256_extracti128_si256(acc[r][m], 1)));
                total[r][m] = _mm256_add_epi64(total[r][m], wide);
            }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MM; m++) out[m * 4 + r] = sum_int64x4(total[r][m]);
}

INLINE void int8_rows(const int16_t *xq, const float *x_scale, const int8_t *q, const float *scale, uint16_t *y,
                      int64_t n, int64_t M, int64_t N, int64_t K, const int R) {
    int64_t dots[MAX_ROWS * 4];
    const int8_t *rows = q + n * K;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) int8_tile(xq + m * K, rows, K, R, 2, dots + m * 4);
    if (m < M) int8_tile(xq + m * K, rows, K, R, 1, dots + m * 4);
    for (m = 0; m < M; m++)
        for (int r = 0; r < R; r++)
            y[m * N + n + r] = to_bf16((float)((double)dots[m * 4 + r] * x_scale[m] * scale[n + r]));
}

/* One weight row against one activation row, front to back in 32-byte loads (one stream per thread). */
INLINE int64_t int8_dot1(const int16_t *xq, const int8_t *w, int64_t K) {
    __m256i total = _mm256_setzero_si256();
    for (int64_t start = 0; start < K; start += FLUSH) {
        const int64_t stop = start + FLUSH < K ? start + FLUSH : K;
        __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
        for (int64_t k = start; k < stop; k += 32) {
            _mm_prefetch((const char *)(w + k + 512), _MM_HINT_T0);
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w + k));
            const __m256i lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
            const __m256i hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
            acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)(xq + k))));
            acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + k + 16))));
        }
        const __m256i both = _mm256_add_epi64(
            _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(acc0)),
                             _mm256_cvtepi32_epi64(_mm256_extracti128_si256(acc0, 1))),
            _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(acc1)),
                             _mm256_cvtepi32_epi64(_mm256_extracti128_si256(acc1, 1))));
        total = _mm256_add_epi64(total, both);
    }
    return sum_int64x4(total);
}

/* Returns 1 (and computes nothing) for non-finite activations, else 0. */
int gemma2_linear_int8(const uint16_t *x, const int8_t *q, const float *scale, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int threads) {
    (void)threads;
    if (any_non_finite(x, M * K)) return 1;
    if (M <= 0 || N <= 0) return 0;
    int16_t *xq = aligned_alloc(64, sizeof(int16_t) * (size_t)((M * K + 31) / 32 * 32));
    float x_scale[MAX_ROWS];
    quantize_rows16(x, M, K, xq, x_scale);
    if (M == 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++)
            y[n] = to_bf16((float)((double)int8_dot1(xq, q + n * K, K) * x_scale[0] * scale[n]));
        free(xq);
        return 0;
    }
    const int64_t blocks = N / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t block = 0; block < blocks; block++) int8_rows(xq, x_scale, q, scale, y, 4 * block, M, N, K, 4);
    for (int64_t n = blocks * 4; n < N; n++) int8_rows(xq, x_scale, q, scale, y, n, M, N, K, 1);
    free(xq);
    return 0;
}

/* ---- int4 weights, one scale per group of G weights ---------------------------------------------
 *
 * Activations as the scalar variant quantizes them: int8 per block of 64 with its scale and level
 * sum. A block of 32 bytes holds weights j (low nibble) and j + 32 (high nibble) in byte j, so the
 * low nibbles meet activations 0-31 and the high ones 32-63. vpmaddubsw multiplies the unsigned
 * nibbles (0..15) with the signed levels and adds pairs (at most 2 * 15 * 128, no saturation), the
 * two halves add as int16, vpmaddwd by ones gives 8 exact int32 partial sums, the block's -8 * sum of
 * levels goes into lane 0; the lanes are then converted, scaled by weight scale * activation scale
 * and summed in float32 lanes (another order of float32 sums than the scalar variant's). */

INLINE void int4_rows(const int8_t *xq, const float *block_scale, const __m256i *correction, const uint8_t *q,
                      const float *scale, uint16_t *y, int64_t n, int64_t N, int64_t K, int64_t G, const int M) {
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int64_t blocks = K / 64, groups = K / G, per_group = G / 64;
    const uint8_t *row = q + n * K / 2;
    const float *row_scale = scale + n * groups;
    __m256 acc[MAX_ROWS];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256 group[MAX_ROWS];
        for (int m = 0; m < M; m++) group[m] = _mm256_setzero_ps();
        for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) {
            _mm_prefetch((const char *)(row + 32 * b + 512), _MM_HINT_T0);
            const __m256i packed = _mm256_loadu_si256((const __m256i *)(row + 32 * b));
            const __m256i low = _mm256_and_si256(packed, nibble);
            const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
            for (int m = 0; m < M; m++) {
                const int8_t *a = xq + m * K + 64 * b;
                const __m256i pairs =
                    _mm256_add_epi16(_mm256_maddubs_epi16(low, _mm256_loadu_si256((const __m256i *)a)),
                                     _mm256_maddubs_epi16(high, _mm256_loadu_si256((const __m256i *)(a + 32))));
                const __m256i exact = _mm256_add_epi32(_mm256_madd_epi16(pairs, ones), correction[m * blocks + b]);
                const __m256 dots = _mm256_cvtepi32_ps(exact);
                group[m] = _mm256_fmadd_ps(dots, _mm256_broadcast_ss(block_scale + m * blocks + b), group[m]);
            }
        }
        for (int m = 0; m < M; m++) acc[m] = _mm256_fmadd_ps(group[m], _mm256_broadcast_ss(row_scale + g), acc[m]);
    }
    for (int m = 0; m < M; m++) y[m * N + n] = to_bf16(horizontal_sum(acc[m]));
}

#define INT4_ROWS(M)                                                                                              \
    static void int4_rows_##M(const int8_t *xq, const float *block_scale, const __m256i *correction,              \
                              const uint8_t *q, const float *scale, uint16_t *y, int64_t N, int64_t K, int64_t G,  \
                              int threads) {                                                                      \
        (void)threads;                                                                                            \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                         \
        for (int64_t n = 0; n < N; n++) int4_rows(xq, block_scale, correction, q, scale, y, n, N, K, G, M);       \
    }
INT4_ROWS(1)
INT4_ROWS(2)
INT4_ROWS(3)
INT4_ROWS(4)
INT4_ROWS(5)
INT4_ROWS(6)
INT4_ROWS(7)
INT4_ROWS(8)

/* Returns 1 (and computes nothing) for non-finite activations, else 0. */
int gemma2_linear_int4(const uint16_t *x, const uint8_t *q, const float *scale, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int64_t G, int threads) {
    static void (*const rows[MAX_ROWS + 1])(const int8_t *, const float *, const __m256i *, const uint8_t *,
                                            const float *, uint16_t *, int64_t, int64_t, int64_t, int) = {
        0, int4_rows_1, int4_rows_2, int4_rows_3, int4_rows_4, int4_rows_5, int4_rows_6, int4_rows_7, int4_rows_8};
    if (any_non_finite(x, M * K)) return 1;
    if (M <= 0 || N <= 0) return 0;
    const int64_t blocks = K / 64;
    int8_t *xq = aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
    float *block_scale = malloc(sizeof(float) * (size_t)(M * blocks + 1));
    int32_t *block_sum = malloc(sizeof(int32_t) * (size_t)(M * blocks + 1));
    __m256i *correction = aligned_alloc(32, sizeof(__m256i) * (size_t)(M * blocks + 1));
    quantize_blocks64(x, M * blocks, xq, block_scale, block_sum);
    for (int64_t mb = 0; mb < M * blocks; mb++) correction[mb] = _mm256_setr_epi32(-8 * block_sum[mb], 0, 0, 0, 0, 0, 0, 0);
    rows[M](xq, block_scale, correction, q, scale, y, N, K, G, threads);
    free(xq);
    free(block_scale);
    free(block_sum);
    free(correction);
    return 0;
}

/* ---- attention of one new token over the cache ---------------------------------------------------
 *
 * The scalar variant's attend with its roundings (bf16 scores, scaled and soft-capped in bf16, expf
 * softmax in float32, bf16 probabilities), vectorized where the work is: each cached key is read once
 * for the G query heads that share it, its dot products summed in float32 lanes (another order than
 * the scalar sum), and the weighted sum of values runs 8 dimensions at a time, summed over the slots
 * in the scalar order with separate multiply and add (no FMA), so given the same probabilities it is
 * the scalar variant's output bit for bit. */

#define HEADS_AT_ONCE 4

/* q . k for up to HEADS_AT_ONCE query heads (float32 rows of qf, D apart) against visible keys. */
INLINE void raw_scores(const float *qf, const uint16_t *key, const uint8_t *seen, float *scores, int64_t S,
                       int64_t D, const int G) {
    for (int64_t s = 0; s < S; s++) {
        if (!seen[s]) continue;
        __m256 acc[HEADS_AT_ONCE];
        for (int g = 0; g < G; g++) acc[g] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(key + s * D + d));
            const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
            for (int g = 0; g < G; g++) {
                acc[g] = _mm256_fmadd_ps(even, _mm256_loadu_ps(qf + g * D + d), acc[g]);
                acc[g] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(qf + g * D + d + 8), acc[g]);
            }
        }
        for (int g = 0; g < G; g++) scores[g * S + s] = horizontal_sum(acc[g]);
    }
}

/* out[d0 : d0 + 32] = bf16(sum_s p[s] * value[s, d0 : d0 + 32]) over the visible slots, in slot order. */
INLINE void weighted_values(const float *p, const uint16_t *value, const uint8_t *seen, uint16_t *out, int64_t S,
                            int64_t D, int64_t d0) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t s = 0; s < S; s++) {
        if (!seen[s]) continue;
        const __m256 probability = _mm256_set1_ps(p[s]);
        for (int j = 0; j < 4; j++) {
            const __m128i v = _mm_loadu_si128((const __m128i *)(value + s * D + d0 + 8 * j));
            const __m256 wide = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
            acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(probability, wide));
        }
    }
    float sums[32];
    for (int j = 0; j < 4; j++) _mm256_storeu_ps(sums + 8 * j, acc[j]);
    for (int j = 0; j < 32; j++) out[d0 + j] = to_bf16(sums[j]);
}

static void attend(const uint16_t *q, const uint16_t *keys, const uint16_t *values, const int64_t *rows,
                   const uint8_t *seen_rows, uint16_t *out, int64_t B, int64_t H, int64_t K, int64_t S, int64_t D,
                   int64_t batch_stride, int64_t head_stride, float scaling, float softcap, int threads) {
    (void)threads;
    const int64_t G = H / K;
    float *scratch = malloc(sizeof(float) * (size_t)(B * H * (S > 0 ? S : 1)));
    float *qf = malloc(sizeof(float) * (size_t)(B * H * D + 16));
    fill_tanh_table();
    widen_rows(q, qf, B * H * D); /* each 16 as the even elements, then the odd ones, as the keys widen */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bk = 0; bk < B * K; bk++) {
        const int64_t b = bk / K, kv = bk % K, row = rows ? rows[b] : b;
        const uint16_t *key = keys + row * batch_stride + kv * head_stride;
        const uint16_t *value = values + row * batch_stride + kv * head_stride;
        const uint8_t *seen = seen_rows + b * S;
        const int64_t first = b * H + kv * G; /* this key head's query heads: first .. first + G - 1 */
        float *probs = scratch + first * S;
        for (int64_t g0 = 0; g0 < G; g0 += HEADS_AT_ONCE) {
            const float *heads = qf + (first + g0) * D;
            switch (G - g0 < HEADS_AT_ONCE ? G - g0 : HEADS_AT_ONCE) { /* literal counts keep sums in registers */
            case 1: raw_scores(heads, key, seen, probs + g0 * S, S, D, 1); break;
            case 2: raw_scores(heads, key, seen, probs + g0 * S, S, D, 2); break;
            case 3: raw_scores(heads, key, seen, probs + g0 * S, S, D, 3); break;
            default: raw_scores(heads, key, seen, probs + g0 * S, S, D, 4); break;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float *p = probs + g * S;
            probabilities_of_scores(p, seen, S, scaling, softcap);
            for (int64_t d0 = 0; d0 < D; d0 += 32) weighted_values(p, value, seen, out + (first + g) * D, S, D, d0);
        }
    }
    free(qf);
    free(scratch);
}
