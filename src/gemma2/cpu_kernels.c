/* Matrix-vector kernels for decoding on x86-64 CPUs with AVX-512 BF16 (gemma2.cpu_kernels).
 *
 * Decoding reads every weight once per token, so its speed is the memory bandwidth. PyTorch's
 * bf16 GEMM reaches about 60 % of it for one row, and its int8/int4 weight-only kernels less;
 * these kernels read each weight row once for up to MAX_ROWS activation rows and stay close to
 * the bandwidth of a plain reduction.
 *
 * Every kernel computes y[m, n] = sum_k x[m, k] * w[n, k] with float32 accumulation and writes
 * bf16 (round to nearest even), like torch.nn.functional.linear in bf16. Layouts:
 *   x      bf16 [M, K] (float32 [M, K] for the int8 kernel, converted once by the caller)
 *   bf16   w bf16 [N, K]
 *   int8   q int8 [N, K], one float32 scale per row: w = q * scale[n]
 *   int4   q uint8 [N, K / 2], float32 scales [N, K / G]: w = bf16((nibble - 8) * scale[n, k / G]).
 *          Each block of 64 weights is 32 bytes; byte j holds weight j in its low nibble and
 *          weight j + 32 in its high nibble.
 * Rows are split across OpenMP threads (the caller passes torch's thread count; the library
 * links the same libgomp torch loaded, so both share one thread pool).
 * Requirements checked by the Python side: K % 32 == 0, G % 64 == 0, M <= MAX_ROWS.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define MAX_ROWS 8
#define INLINE static inline __attribute__((always_inline))

INLINE uint16_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* ---- bf16 weights ------------------------------------------------------------------------ */

/* R weight rows starting at n against all M activation rows. Several rows at once keep several
 * memory streams in flight, which is what reaches full bandwidth on one core. */
INLINE void bf16_block(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t n, int64_t N, int64_t K,
                       const int M, const int R) {
    __m512 acc[MAX_ROWS][8];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    const uint16_t *rows = w + n * K;
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh wv[8];
        for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_loadu_si512(rows + r * K + k);
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
            for (int r = 0; r < R; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) y[m * N + n + r] = to_bf16(_mm512_reduce_add_ps(acc[m][r]));
}

INLINE void bf16_all(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t N, int64_t K, int threads,
                     const int M, const int R) {
    int64_t full = N / R * R;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < full; n += R) bf16_block(x, w, y, n, N, K, M, R);
    for (int64_t n = full; n < N; n++) bf16_block(x, w, y, n, N, K, M, 1);
}

void gemma2_linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K,
                        int threads) {
    switch (M) {
    case 1: bf16_all(x, w, y, N, K, threads, 1, 8); break;
    case 2: bf16_all(x, w, y, N, K, threads, 2, 4); break;
    case 3: bf16_all(x, w, y, N, K, threads, 3, 4); break;
    case 4: bf16_all(x, w, y, N, K, threads, 4, 2); break;
    case 5: bf16_all(x, w, y, N, K, threads, 5, 2); break;
    case 6: bf16_all(x, w, y, N, K, threads, 6, 2); break;
    case 7: bf16_all(x, w, y, N, K, threads, 7, 2); break;
    default: bf16_all(x, w, y, N, K, threads, 8, 2); break;
    }
}

/* ---- int8 weights, one scale per output row ------------------------------------------------ */

INLINE void int8_block(const float *x, const int8_t *q, const float *scale, uint16_t *y, int64_t n, int64_t N,
                       int64_t K, const int M, const int R) {
    __m512 acc[MAX_ROWS][4];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    const int8_t *rows = q + n * K;
    for (int64_t k = 0; k < K; k += 16) {
        __m512 wv[4];
        for (int r = 0; r < R; r++)
            wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(rows + r * K + k))));
        for (int m = 0; m < M; m++) {
            __m512 xv = _mm512_loadu_ps(x + m * K + k);
            for (int r = 0; r < R; r++) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) y[m * N + n + r] = to_bf16(_mm512_reduce_add_ps(acc[m][r]) * scale[n + r]);
}

INLINE void int8_all(const float *x, const int8_t *q, const float *scale, uint16_t *y, int64_t N, int64_t K,
                     int threads, const int M, const int R) {
    int64_t full = N / R * R;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < full; n += R) int8_block(x, q, scale, y, n, N, K, M, R);
    for (int64_t n = full; n < N; n++) int8_block(x, q, scale, y, n, N, K, M, 1);
}

void gemma2_linear_int8(const float *x, const int8_t *q, const float *scale, uint16_t *y, int64_t M, int64_t N,
                        int64_t K, int threads) {
    switch (M) {
    case 1: int8_all(x, q, scale, y, N, K, threads, 1, 4); break;
    case 2: int8_all(x, q, scale, y, N, K, threads, 2, 4); break;
    case 3: int8_all(x, q, scale, y, N, K, threads, 3, 2); break;
    case 4: int8_all(x, q, scale, y, N, K, threads, 4, 2); break;
    case 5: int8_all(x, q, scale, y, N, K, threads, 5, 2); break;
    case 6: int8_all(x, q, scale, y, N, K, threads, 6, 2); break;
    case 7: int8_all(x, q, scale, y, N, K, threads, 7, 2); break;
    default: int8_all(x, q, scale, y, N, K, threads, 8, 2); break;
    }
}

/* ---- int4 weights, one scale per group of G weights ----------------------------------------- */

/* The 16 weights a nibble can stand for in one group, bf16((nibble - 8) * scale), in the low 16
 * words of a vector: one word permute turns 32 nibbles into 32 bf16 weights, so the products are
 * exactly those of the dequantized bf16 matrix. */
INLINE __m512i nibble_table(float scale) {
    const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    __m256i words = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(levels, _mm512_set1_ps(scale)));
    return _mm512_broadcast_i64x4(words);
}

/* 64 weights (32 bytes) -> two vectors of 32 bf16 weights: k..k+31 and k+32..k+63. */
INLINE void unpack64(const uint8_t *bytes, __m512i table, __m512bh *low, __m512bh *high) {
    __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)bytes));
    *low = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(words, _mm512_set1_epi16(0xF)), table);
    *high = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), table);
}

INLINE void int4_block(const uint16_t *x, const uint8_t *q, const float *scale, uint16_t *y, int64_t n, int64_t N,
                       int64_t K, int64_t G, const int M, const int R) {
    __m512 acc[MAX_ROWS][8];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    const int64_t groups = K / G;
    for (int64_t g = 0; g < groups; g++) {
        __m512i table[8];
        for (int r = 0; r < R; r++) table[r] = nibble_table(scale[(n + r) * groups + g]);
        for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
            __m512bh low[8], high[8];
            for (int r = 0; r < R; r++) unpack64(q + ((n + r) * K + k) / 2, table[r], &low[r], &high[r]);
            for (int m = 0; m < M; m++) {
                __m512bh x_low = (__m512bh)_mm512_loadu_si512(x + m * K + k);
                __m512bh x_high = (__m512bh)_mm512_loadu_si512(x + m * K + k + 32);
                for (int r = 0; r < R; r++)
                    acc[m][r] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[m][r], x_low, low[r]), x_high, high[r]);
            }
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) y[m * N + n + r] = to_bf16(_mm512_reduce_add_ps(acc[m][r]));
}

INLINE void int4_all(const uint16_t *x, const uint8_t *q, const float *scale, uint16_t *y, int64_t N, int64_t K,
                     int64_t G, int threads, const int M, const int R) {
    int64_t full = N / R * R;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < full; n += R) int4_block(x, q, scale, y, n, N, K, G, M, R);
    for (int64_t n = full; n < N; n++) int4_block(x, q, scale, y, n, N, K, G, M, 1);
}

void gemma2_linear_int4(const uint16_t *x, const uint8_t *q, const float *scale, uint16_t *y, int64_t M, int64_t N,
                        int64_t K, int64_t G, int threads) {
    switch (M) {
    case 1: int4_all(x, q, scale, y, N, K, G, threads, 1, 8); break;
    case 2: int4_all(x, q, scale, y, N, K, G, threads, 2, 4); break;
    case 3: int4_all(x, q, scale, y, N, K, G, threads, 3, 4); break;
    case 4: int4_all(x, q, scale, y, N, K, G, threads, 4, 2); break;
    case 5: int4_all(x, q, scale, y, N, K, G, threads, 5, 2); break;
    case 6: int4_all(x, q, scale, y, N, K, G, threads, 6, 2); break;
    case 7: int4_all(x, q, scale, y, N, K, G, threads, 7, 2); break;
    default: int4_all(x, q, scale, y, N, K, G, threads, 8, 2); break;
    }
}

/* Whole int4 matrix to bf16 [N, K], for prompts (many rows), where a bf16 matmul is faster. */
void gemma2_dequantize_int4(const uint8_t *q, const float *scale, uint16_t *out, int64_t N, int64_t K, int64_t G,
                            int threads) {
    const int64_t groups = K / G;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < groups; g++) {
            __m512i table = nibble_table(scale[n * groups + g]);
            for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
                __m512bh low, high;
                unpack64(q + (n * K + k) / 2, table, &low, &high);
                _mm512_storeu_si512(out + n * K + k, (__m512i)low);
                _mm512_storeu_si512(out + n * K + k + 32, (__m512i)high);
            }
        }
    }
}
