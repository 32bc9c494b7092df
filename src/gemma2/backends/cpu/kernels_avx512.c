/* The matrix-vector kernels of the AVX-512 variant (see kernels_avx512.h for the conventions). */
#include "kernels_avx512.h"

/* ---- bf16 weights ------------------------------------------------------------------------ */

/* How far ahead (bytes) the kernels for PREFETCH_FROM_ROWS or more activation rows ask for their
 * weights, into L2. With more rows the loop body grows (one weight load, M activation loads and M
 * dot products per 64 bytes), so the out-of-order window covers fewer cache lines than with one
 * row, and the demand loads alone keep too few misses in flight to stream at full bandwidth
 * (Little's law). Asking 16 KB ahead into L2 hides the latency. A/B on a 55296 x 2304 matrix,
 * 2 threads on a Zen 4, 4 rows: bf16 25-28 GB/s without it, 47-53 with it, as fast as one row
 * (16 KB ahead into L1 instead, _MM_HINT_T0, was slower than no prefetch); int8 13-14 -> 23; int4,
 * bound by its instructions, unchanged. */
#define PREFETCH_AHEAD 16384
#define PREFETCH_FROM_ROWS 3

/* One weight row against M activation rows, read front to back with U independent accumulators
 * per activation row. Each thread reads one contiguous stream (its share of the rows), which for
 * one or two activation rows the hardware prefetcher follows at full bandwidth by itself; from three
 * rows on the kernel prefetches PREFETCH_AHEAD bytes ahead. It reloads the M activation rows for
 * every weight row, so it is the kernel while they fit in L1 beside the weight stream. */
INLINE void bf16_stream(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t n, int64_t N, int64_t K,
                        const int M, const int U) {
    __m512 acc[MAX_ROWS][4];
    for (int m = 0; m < M; m++)
        for (int u = 0; u < U; u++) acc[m][u] = _mm512_setzero_ps();
    const uint16_t *row = w + n * K;
    int64_t k = 0;
    for (; k + 32 * U <= K; k += 32 * U)
        for (int u = 0; u < U; u++) {
            if (M >= PREFETCH_FROM_ROWS) _mm_prefetch((const char *)(row + k + 32 * u) + PREFETCH_AHEAD, _MM_HINT_T1);
            __m512bh wv = (__m512bh)_mm512_loadu_si512(row + k + 32 * u);
            for (int m = 0; m < M; m++)
                acc[m][u] = _mm512_dpbf16_ps(acc[m][u], (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * u), wv);
        }
    for (; k < K; k += 32) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512(row + k);
        for (int m = 0; m < M; m++)
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_loadu_si512(x + m * K + k), wv);
    }
    for (int m = 0; m < M; m++) {
        __m512 sum = acc[m][0];
        for (int u = 1; u < U; u++) sum = _mm512_add_ps(sum, acc[m][u]);
        y[m * N + n] = to_bf16(_mm512_reduce_add_ps(sum));
    }
}

/* R weight rows starting at n against all M activation rows, sharing each activation load between
 * the R rows: for activation rows that do not fit in L1 (a wide K, or many rows), and for seven or
 * eight rows, where bf16_stream's 4 * M accumulators would pass the 32 registers. A/B as above:
 * K = 9216, 2 rows 21-24 GB/s streaming, 33 in blocks; 8 rows at K = 2304, 12-14 streaming, 30-40
 * in blocks with the next block prefetched into L2. */
INLINE void bf16_block(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t n, int64_t N, int64_t K,
                       const int M, const int R) {
    __m512 acc[MAX_ROWS][8];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    const uint16_t *rows = w + n * K;
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh wv[8];
        /* The same place in the next block of R rows (a row past the last block is prefetched
         * too; a prefetch never faults). */
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(rows + R * K + r * K + k), _MM_HINT_T1);
        for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_loadu_si512(rows + r * K + k);
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
            for (int r = 0; r < R; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) y[m * N + n + r] = to_bf16(_mm512_reduce_add_ps(acc[m][r]));
}

/* One function per row count and kernel: the loop bounds must be literals inside the OpenMP region,
 * which is outlined into its own function, so that the accumulators stay in registers. */
typedef void (*bf16_rows_fn)(const uint16_t *, const uint16_t *, uint16_t *, int64_t, int64_t, int);
#define BF16_STREAM(M)                                                                                            \
    static void bf16_stream_##M(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t N, int64_t K,          \
                                int threads) {                                                                    \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                         \
        for (int64_t n = 0; n < N; n++) bf16_stream(x, w, y, n, N, K, M, 4);                                      \
    }
#define BF16_BLOCKS(M)                                                                                            \
    static void bf16_blocks_##M(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t N, int64_t K,          \
                                int threads) {                                                                    \
        int64_t full = N / 4 * 4;                                                                                 \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                         \
        for (int64_t n = 0; n < full; n += 4) bf16_block(x, w, y, n, N, K, M, 4);                                 \
        for (int64_t n = full; n < N; n++) bf16_block(x, w, y, n, N, K, M, 1);                                    \
    }
BF16_STREAM(1)
BF16_STREAM(2)
BF16_STREAM(3)
BF16_STREAM(4)
BF16_STREAM(5)
BF16_STREAM(6)
BF16_BLOCKS(2)
BF16_BLOCKS(3)
BF16_BLOCKS(4)
BF16_BLOCKS(5)
BF16_BLOCKS(6)
BF16_BLOCKS(7)
BF16_BLOCKS(8)

/* Activation rows up to this many bytes stream (bf16_stream); more go in blocks. A Zen 4 or
 * Sapphire Rapids core has 32 or 48 KB of L1 data cache. */
#define STREAM_ACTIVATION_BYTES (20 * 1024)
#define STREAM_ROWS 6

void gemma2_linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K,
                        int threads) {
    static const bf16_rows_fn stream[STREAM_ROWS + 1] = {0, bf16_stream_1, bf16_stream_2, bf16_stream_3,
                                                         bf16_stream_4, bf16_stream_5, bf16_stream_6};
    static const bf16_rows_fn blocks[MAX_ROWS + 1] = {0, bf16_stream_1, bf16_blocks_2, bf16_blocks_3, bf16_blocks_4,
                                                      bf16_blocks_5, bf16_blocks_6, bf16_blocks_7, bf16_blocks_8};
    const int streams = M == 1 || (M <= STREAM_ROWS && M * K * 2 <= STREAM_ACTIVATION_BYTES);
    (streams ? stream : blocks)[M](x, w, y, N, K, threads);
}

/* ---- quantized weights: integer dot products ------------------------------------------------
 *
 * int8 weights: the activations are quantized per row to int16 (x = x_q * x_scale, x_scale =
 * max|x| / 32767, finer than bf16's 8-bit mantissa for every element within 1/128 of the row's
 * largest) and the dot products run exactly in integers, then are scaled once. Each int16 is
 * split into its low byte (0..255) and high byte (-128..127), so VNNI `vpdpbusd` (u8 x s8 ->
 * int32) multiplies 64 weights per instruction without widening them:
 *     sum w * x_q = 256 * sum w * hi + sum w * lo,   sum w * hi = sum (w + 128) * hi - 128 * sum hi
 * (w + 128 is the weight byte with its top bit flipped, an unsigned byte). That is 3 instructions
 * per 64 weights, few enough for two cores to keep up with the memory. */

#define INT16_RANGE 32767.0f
/* int32 lanes take 4 * 255 * 128 per instruction at most: flush to int64 every FLUSH weights
 * (64 instructions per lane, and the 16-lane sum still fits int32). */
#define FLUSH 4096


/* Whether any of the n (a multiple of 16) activations is NaN or infinite. */
static int any_non_finite(const uint16_t *x, int64_t n) {
    const int non_finite = 0x01 | 0x08 | 0x10 | 0x80; /* quiet NaN, +inf, -inf, signalling NaN */
    for (int64_t k = 0; k < n; k += 16)
        if (_mm512_fpclass_ps_mask(load_bf16x16(x + k), non_finite)) return 1;
    return 0;
}

/* round(v * levels / largest) to nearest even, for largest > 0 (0 otherwise). Where levels /
 * largest overflows float32 (subnormal activations) it is done in float64. */
INLINE __m512i to_levels(__m512 v, float levels, float largest) {
    const float inverse = largest > 0 ? levels / largest : 0.0f;
    if (!isinf(inverse)) return _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inverse)));
    float elements[16];
    int32_t values[16];
    _mm512_storeu_ps(elements, v);
    for (int j = 0; j < 16; j++) values[j] = (int32_t)lrint((double)elements[j] * levels / largest);
    return _mm512_loadu_si512(values);
}

typedef struct {
    uint8_t *low;    /* [M, K] low bytes of x_q */
    int8_t *high;    /* [M, K] high bytes of x_q */
    int64_t *high_sum; /* [M] */
    float *scale;    /* [M] */
} Int16Rows;

/* x bf16 [M, K] -> Int16Rows. Returns 0, or 1 without finishing when an activation is NaN or
 * infinite (the caller then computes in floating point, which propagates it). */
static int quantize_rows(const uint16_t *x, int64_t M, int64_t K, Int16Rows *out) {
    if (any_non_finite(x, M * K)) return 1;
    for (int64_t m = 0; m < M; m++) {
        __m512 peak = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) peak = _mm512_max_ps(peak, _mm512_abs_ps(load_bf16x16(x + m * K + k)));
        const float largest = _mm512_reduce_max_ps(peak);
        out->scale[m] = largest > 0 ? largest / INT16_RANGE : 1.0f;
        int64_t high_sum = 0;
        for (int64_t k = 0; k < K; k += 16) {
            __m512i q = to_levels(load_bf16x16(x + m * K + k), INT16_RANGE, largest);
            __m512i high = _mm512_srai_epi32(q, 8);
            high_sum += _mm512_reduce_add_epi32(high);
            _mm_storeu_si128((__m128i *)(out->low + m * K + k), _mm512_cvtepi32_epi8(q)); /* truncates: low byte */
            _mm_storeu_si128((__m128i *)(out->high + m * K + k), _mm512_cvtepi32_epi8(high));
        }
        out->high_sum[m] = high_sum;
    }
    return 0;
}

/* One int8 weight row against M activation rows, front to back (see bf16_stream), U steps of 64
 * weights in flight per activation row. */
INLINE void int8_stream(const Int16Rows *x, const int8_t *q, const float *scale, uint16_t *y, int64_t n, int64_t N,
                        int64_t K, const int M, const int U) {
    const __m512i top_bit = _mm512_set1_epi8((char)0x80);
    int64_t low_total[MAX_ROWS] = {0}, high_total[MAX_ROWS] = {0};
    const int8_t *row = q + n * K;
    for (int64_t start = 0; start < K; start += FLUSH) {
        const int64_t stop = start + FLUSH < K ? start + FLUSH : K;
        __m512i low[MAX_ROWS][4], high[MAX_ROWS][4];
        for (int m = 0; m < M; m++)
            for (int u = 0; u < U; u++) low[m][u] = high[m][u] = _mm512_setzero_si512();
        int64_t k = start;
        for (; k + 64 * U <= stop; k += 64 * U)
            for (int u = 0; u < U; u++) {
                if (M >= PREFETCH_FROM_ROWS) _mm_prefetch((const char *)(row + k + 64 * u) + PREFETCH_AHEAD, _MM_HINT_T1);
                __m512i w = _mm512_loadu_si512(row + k + 64 * u), w_unsigned = _mm512_xor_si512(w, top_bit);
                for (int m = 0; m < M; m++) {
                    low[m][u] = _mm512_dpbusd_epi32(low[m][u], _mm512_loadu_si512(x->low + m * K + k + 64 * u), w);
                    high[m][u] =
                        _mm512_dpbusd_epi32(high[m][u], w_unsigned, _mm512_loadu_si512(x->high + m * K + k + 64 * u));
                }
            }
        for (; k < stop; k += 32) { /* K is a multiple of 32 */
            __m256i w = _mm256_loadu_si256((const __m256i *)(row + k));
            __m256i w_unsigned = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
            for (int m = 0; m < M; m++) {
                __m256i lo = _mm256_dpbusd_epi32(_mm256_setzero_si256(),
                                                 _mm256_loadu_si256((const __m256i *)(x->low + m * K + k)), w);
                __m256i hi = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w_unsigned,
                                                 _mm256_loadu_si256((const __m256i *)(x->high + m * K + k)));
                low[m][0] = _mm512_add_epi32(low[m][0], _mm512_zextsi256_si512(lo));
                high[m][0] = _mm512_add_epi32(high[m][0], _mm512_zextsi256_si512(hi));
            }
        }
        for (int m = 0; m < M; m++)
            for (int u = 0; u < U; u++) {
                low_total[m] += _mm512_reduce_add_epi32(low[m][u]);
                high_total[m] += _mm512_reduce_add_epi32(high[m][u]);
            }
    }
    for (int m = 0; m < M; m++) {
        const int64_t dot = 256 * (high_total[m] - 128 * x->high_sum[m]) + low_total[m];
        y[m * N + n] = to_bf16((float)((double)dot * x->scale[m] * scale[n]));
    }
}

#define INT8_ROWS(M, U)                                                                                           \
    static void int8_rows_##M(const Int16Rows *x, const int8_t *q, const float *scale, uint16_t *y, int64_t N,    \
                              int64_t K, int threads) {                                                           \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                         \
        for (int64_t n = 0; n < N; n++) int8_stream(x, q, scale, y, n, N, K, M, U);                               \
    }
INT8_ROWS(1, 4)
INT8_ROWS(2, 2)
INT8_ROWS(3, 1)
INT8_ROWS(4, 1)
INT8_ROWS(5, 1)
INT8_ROWS(6, 1)
INT8_ROWS(7, 1)
INT8_ROWS(8, 1)


/* Returns 1 (and computes nothing) for non-finite activations, else 0. */
int gemma2_linear_int8(const uint16_t *x, const int8_t *q, const float *scale, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int threads) {
    static void (*const rows[MAX_ROWS + 1])(const Int16Rows *, const int8_t *, const float *, uint16_t *, int64_t,
                                            int64_t, int) = {
        0, int8_rows_1, int8_rows_2, int8_rows_3, int8_rows_4, int8_rows_5, int8_rows_6, int8_rows_7, int8_rows_8};
    int64_t high_sum[MAX_ROWS];
    float x_scale[MAX_ROWS];
    Int16Rows rows_q = {alloc64((size_t)(M * K)), alloc64((size_t)(M * K)), high_sum, x_scale};
    int non_finite = quantize_rows(x, M, K, &rows_q);
    if (!non_finite) rows[M](&rows_q, q, scale, y, N, K, threads);
    free(rows_q.low);
    free(rows_q.high);
    return non_finite;
}

/* ---- int4 weights, one scale per group of G weights -----------------------------------------
 *
 * Unpacking nibbles costs instructions, and on two cores the int16 products of the int8 kernel
 * would set the pace below the memory's. So the activations are quantized to int8 instead, with
 * one scale per block of 64 (x = x_q * s, s = max|x_block| / 127, as fine as bf16's mantissa for
 * the block's largest elements), and multiplied with the unsigned nibbles u = w + 8 by VNNI
 * `vpdpbusd` (u8 x s8 -> int32, exact); the -8 * sum(x_q) of each block is the accumulator's start.
 *
 * 64 packed bytes hold 128 weights: low nibbles are weights 0-31 and 64-95, high nibbles 32-63 and
 * 96-127. The quantized activations of each 128-weight chunk are stored in that order (64 bytes for
 * the low nibbles, then 64 for the high), so a chunk is one load of weights and two of activations,
 * and int32 lanes 0-7 sum weights 0-63 (block 0), lanes 8-15 weights 64-127 (block 1). A K that
 * ends in half a chunk (64 weights) keeps its natural order and uses 256-bit instructions. */

/* 64 weights (32 bytes) -> two vectors of 32 int16 weights (nibble - 8): k..k+31 and k+32..k+63. */
INLINE void unpack64(const uint8_t *bytes, __m512i *low, __m512i *high) {
    const __m512i eight = _mm512_set1_epi16(8);
    __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)bytes));
    *low = _mm512_sub_epi16(_mm512_and_si512(words, _mm512_set1_epi16(0xF)), eight);
    *high = _mm512_sub_epi16(_mm512_srli_epi16(words, 4), eight);
}

typedef struct {
    int8_t *x;           /* [M, K], chunk order as above */
    float *scale;        /* [M, chunks, 16]: lanes 0-7 the scale of block 0, lanes 8-15 of block 1 */
    int32_t *correction; /* [M, chunks, 16]: -8 * sum(x_q) of block 0 in lane 0, of block 1 in lane 8 */
    int64_t chunks;      /* ceil(K / 128) */
} Int8Blocks;

/* Quantize 64 activations into x_q; returns their scale. */
static float quantize_block64(const uint16_t *x, int8_t *low, int8_t *high, int32_t *sum) {
    __m512 v[4], peak = _mm512_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = load_bf16x16(x + 16 * i);
        peak = _mm512_max_ps(peak, _mm512_abs_ps(v[i]));
    }
    const float largest = _mm512_reduce_max_ps(peak);
    __m512i total = _mm512_setzero_si512();
    for (int i = 0; i < 4; i++) {
        __m512i q = to_levels(v[i], 127.0f, largest);
        total = _mm512_add_epi32(total, q);
        _mm_storeu_si128((__m128i *)((i < 2 ? low : high) + 16 * (i % 2)), _mm512_cvtsepi32_epi8(q));
    }
    *sum = _mm512_reduce_add_epi32(total);
    return largest > 0 ? largest / 127.0f : 0.0f;
}

/* Returns 1 without finishing when an activation is NaN or infinite, else 0. */
static int quantize_int8_blocks(const uint16_t *x, int64_t M, int64_t K, Int8Blocks *out) {
    if (any_non_finite(x, M * K)) return 1;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < K / 64; b++) {
            const int64_t chunk = b / 2, half = b % 2, base = m * K + chunk * 128;
            const int tail = chunk * 128 + 128 > K; /* half a chunk, natural order */
            int8_t *low = out->x + base + 32 * half, *high = out->x + base + (tail ? 32 : 64) + 32 * half;
            int32_t sum;
            float *scale = out->scale + (m * out->chunks + chunk) * 16 + 8 * half;
            float block_scale = quantize_block64(x + m * K + 64 * b, low, high, &sum);
            for (int i = 0; i < 8; i++) scale[i] = block_scale;
            out->correction[(m * out->chunks + chunk) * 16 + 8 * half] = -8 * sum;
        }
    }
    return 0;
}

/* One packed int4 weight row against M activation rows, front to back (see bf16_stream). */
INLINE void int4_stream(const Int8Blocks *x, const uint8_t *q, const float *scale, uint16_t *y, int64_t n,
                        int64_t N, int64_t K, int64_t G, const int M) {
    const __m512i nibble = _mm512_set1_epi8(0xF);
    const int64_t groups = K / G, full = K / 128;
    const uint8_t *row = q + n * K / 2;
    const float *row_scale = scale + n * groups;
    __m512 total[MAX_ROWS][2];
    for (int m = 0; m < M; m++) total[m][0] = total[m][1] = _mm512_setzero_ps();
    const int group_shift = G == 256 ? 1 : 0; /* chunks of 128 per group, as a shift: no division per chunk */
    for (int64_t c = 0; c < full; c++) {
        if (M >= PREFETCH_FROM_ROWS) _mm_prefetch((const char *)(row + 64 * c) + PREFETCH_AHEAD, _MM_HINT_T1);
        __m512i packed = _mm512_loadu_si512(row + 64 * c);
        __m512i low = _mm512_and_si512(packed, nibble), high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
        __m512 weight_scale = G == 64 ? _mm512_insertf32x8(_mm512_set1_ps(row_scale[2 * c]),
                                                           _mm256_set1_ps(row_scale[2 * c + 1]), 1)
                                      : _mm512_set1_ps(row_scale[c >> group_shift]);
        for (int m = 0; m < M; m++) {
            const int8_t *xq = x->x + m * K + 128 * c;
            const int64_t at = (m * x->chunks + c) * 16;
            __m512i acc = _mm512_dpbusd_epi32(_mm512_loadu_si512(x->correction + at), low, _mm512_loadu_si512(xq));
            acc = _mm512_dpbusd_epi32(acc, high, _mm512_loadu_si512(xq + 64));
            __m512 both = _mm512_mul_ps(weight_scale, _mm512_loadu_ps(x->scale + at));
            total[m][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), both, total[m][c & 1]);
        }
    }
    if (K % 128) { /* the last 64 weights */
        __m256i packed = _mm256_loadu_si256((const __m256i *)(row + 64 * full));
        __m256i low = _mm256_and_si256(packed, _mm256_set1_epi8(0xF));
        __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), _mm256_set1_epi8(0xF));
        __m256 weight_scale = _mm256_set1_ps(row_scale[full * 128 / G]);
        for (int m = 0; m < M; m++) {
            const int8_t *xq = x->x + m * K + 128 * full;
            const int64_t at = (m * x->chunks + full) * 16;
            __m256i acc = _mm256_loadu_si256((const __m256i *)(x->correction + at));
            acc = _mm256_dpbusd_epi32(acc, low, _mm256_loadu_si256((const __m256i *)xq));
            acc = _mm256_dpbusd_epi32(acc, high, _mm256_loadu_si256((const __m256i *)(xq + 32)));
            __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(weight_scale, _mm256_loadu_ps(x->scale + at)));
            total[m][0] = _mm512_add_ps(total[m][0], _mm512_zextps256_ps512(part));
        }
    }
    for (int m = 0; m < M; m++) y[m * N + n] = to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(total[m][0], total[m][1])));
}

#define INT4_ROWS(M)                                                                                              \
    static void int4_rows_##M(const Int8Blocks *x, const uint8_t *q, const float *scale, uint16_t *y, int64_t N,  \
                              int64_t K, int64_t G, int threads) {                                                \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                         \
        for (int64_t n = 0; n < N; n++) int4_stream(x, q, scale, y, n, N, K, G, M);                               \
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
    static void (*const rows[MAX_ROWS + 1])(const Int8Blocks *, const uint8_t *, const float *, uint16_t *, int64_t,
                                            int64_t, int64_t, int) = {
        0, int4_rows_1, int4_rows_2, int4_rows_3, int4_rows_4, int4_rows_5, int4_rows_6, int4_rows_7, int4_rows_8};
    Int8Blocks blocks;
    blocks.chunks = (K + 127) / 128;
    blocks.x = alloc64((size_t)(M * K));
    blocks.scale = alloc64(sizeof(float) * (size_t)(M * blocks.chunks * 16));
    blocks.correction = alloc64(sizeof(int32_t) * (size_t)(M * blocks.chunks * 16));
    memset(blocks.scale, 0, sizeof(float) * (size_t)(M * blocks.chunks * 16));
    memset(blocks.correction, 0, sizeof(int32_t) * (size_t)(M * blocks.chunks * 16));
    int non_finite = quantize_int8_blocks(x, M, K, &blocks);
    if (!non_finite) rows[M](&blocks, q, scale, y, N, K, G, threads);
    free(blocks.x);
    free(blocks.scale);
    free(blocks.correction);
    return non_finite;
}

/* Whole int4 matrix to bf16 [N, K], for prompts (many rows), where a bf16 matmul is faster:
 * w = bf16((nibble - 8) * scale). */
void gemma2_dequantize_int4(const uint8_t *q, const float *scale, uint16_t *out, int64_t N, int64_t K, int64_t G,
                            int threads) {
    const int64_t groups = K / G;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < groups; g++) {
            __m512 group_scale = _mm512_set1_ps(scale[n * groups + g]);
            for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
                __m512i low, high;
                unpack64(q + (n * K + k) / 2, &low, &high);
                __m512i halves[4] = {_mm512_cvtepi16_epi32(_mm512_castsi512_si256(low)),
                                     _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(low, 1)),
                                     _mm512_cvtepi16_epi32(_mm512_castsi512_si256(high)),
                                     _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(high, 1))};
                for (int h = 0; h < 4; h++) {
                    __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(halves[h]), group_scale);
                    _mm256_storeu_si256((__m256i *)(out + n * K + k + 16 * h), to_bf16x16(w));
                }
            }
        }
    }
}

/* Whole int8 matrix to bf16 [N, K]: w = bf16(q * scale[n]). */
void gemma2_dequantize_int8(const int8_t *q, const float *scale, uint16_t *out, int64_t N, int64_t K, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        __m512 row_scale = _mm512_set1_ps(scale[n]);
        for (int64_t k = 0; k < K; k += 16) {
            __m512i ints = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + n * K + k)));
            __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(ints), row_scale);
            _mm256_storeu_si256((__m256i *)(out + n * K + k), to_bf16x16(w));
        }
    }
}
