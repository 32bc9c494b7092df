/* AVX2 + FMA variant of the native kernels (gemma2.backends.cpu, variant "avx2", x86-64-v3).
 *
 * Built together with kernels_scalar.c, whose entry points it reuses: the scalar file declares
 * gemma2_linear_bf16 weak, and the strong definition here wins at link time (also for the calls of
 * the scalar decode layers), so everything but the bf16 linear layer is the scalar code, bit for bit.
 * Opt-in only (GEMMA2_CPU_KERNELS=avx2): "auto" keeps choosing the AVX-512 variant or PyTorch.
 *
 * gemma2_linear_bf16: y[m, n] = bf16(sum_k x[m, k] * w[n, k]) with float32 FMA sums and one
 * rounding, as the scalar and AVX-512 variants (only the order of the float32 sums differs).
 * Each weight row is read once for all M <= MAX_ROWS activation rows. A 32-bit lane of 16 bf16
 * weights holds elements 2i (low half) and 2i + 1 (high half): shifting left by 16 gives the even
 * elements as float32, masking the high half the odd ones, so no lane-crossing shuffle is needed.
 * The activations are widened once per call into the same even/odd order. Every output is summed
 * by one thread in a fixed order, so the result does not depend on the thread count.
 * Requirements checked by the Python side: K % 32 == 0, M <= MAX_ROWS.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8
#define GROUP 2 /* activation rows per pass over a weight row: 8 accumulators + 4 weight registers */

/* As to_bf16 in kernels_scalar.c: nearest even, NaN made quiet, subnormals kept. */
static inline uint16_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

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

/* out[r] = dot(xf row r, w) for R <= GROUP rows (a constant after inlining), 4 accumulators per row
 * (the FMA latency). Each row is summed in the same order whatever rows come with it, so a row's
 * result does not depend on the batch it is in either. */
static inline __attribute__((always_inline)) void dot_rows(const float *xf, int64_t K, const uint16_t *w, int R,
                                                           float *out) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[GROUP][4];
    for (int r = 0; r < R; r++)
        for (int a = 0; a < 4; a++) acc[r][a] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + k));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + k + 16));
        const __m256 v[4] = {
            _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(w0, high)),
            _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(w1, high)),
        };
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 4; j++)
                acc[r][j] = _mm256_fmadd_ps(v[j], _mm256_loadu_ps(xf + r * K + k + 8 * j), acc[r][j]);
    }
    for (int r = 0; r < R; r++) {
        const __m256 pairs = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]));
        out[r] = horizontal_sum(pairs);
    }
}

void gemma2_linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K,
                        int threads) {
    (void)threads; /* only read by the OpenMP pragma */
    if (M <= 0 || N <= 0) return;
    float *xf = aligned_alloc(64, sizeof(float) * (size_t)(M * K > 0 ? (M * K + 15) / 16 * 16 : 16));
    if (xf == NULL) return;
    widen_rows(x, xf, M * K);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *row = w + n * K;
        float sums[MAX_ROWS];
        for (int64_t m = 0; m < M; m += GROUP) {
            const int64_t left = M - m;
            const float *rows = xf + m * K;
            if (left >= 2)
                dot_rows(rows, K, row, 2, sums + m);
            else
                dot_rows(rows, K, row, 1, sums + m);
        }
        for (int64_t m = 0; m < M; m++) y[m * N + n] = to_bf16(sums[m]);
    }
    free(xf);
}
