/* Decode attention, norms, rotary, the fused decoder layer and the logits ops of the AVX-512 variant. */
#include "kernels_avx512.h"

/* ---- attention of one new token over the cache ------------------------------------------------
 *
 * What eager attention computes for a single query, reading each cached key and value once, with
 * the reference's roundings: scores are bf16 (the bf16 matmul's output), scaled, divided by the cap,
 * tanh'd and multiplied back each in bf16; softmax in float32 over the visible keys; probabilities
 * rounded to bf16 before the float32-accumulated weighted sum of values.
 *   q [B, H, D], keys/values [rows, K, S, D] with element strides (row, head) given, slots dense;
 *   batch row b reads cache row rows[b] (rows NULL: row b); out [B, H, D]. Query head h reads
 *   key/value head h / (H / K).
 * Which keys row b's query at position query[b] sees, as attention.MaskSpec: slot positions
 * [B, S] at positions_stride per row (-1 for an empty slot) up to query[b], within `window` of it
 * when window > 0, and where padding (uint8 [B or 1, S] at padding_stride per row, or NULL) is
 * nonzero.
 * Rows with no visible key get zeros (the reference's fully masked rows are padding). */

/* bf16(tanh(x)) for every bf16 x, by its bits: the soft-cap's tanh takes bf16 inputs, and a table
 * is exact and much faster than tanhf per score. Filled once when the library is loaded. */
static uint16_t tanh_of_bf16[65536 + 2]; /* + 2: room for the 32-bit gathers of soft_cap16 */

__attribute__((constructor)) static void fill_tanh_table(void) {
    for (uint32_t bits = 0; bits < 65536; bits++) tanh_of_bf16[bits] = to_bf16(tanhf(from_bf16((uint16_t)bits)));
}

/* out[g, d0:d0 + 16 * DN] = sum_s probs[g, s] * value[s, d0:...] for GN query heads at once, the
 * float32 sums in registers (literal GN and DN keep them there). */
INLINE void weighted_values(const float *probs, const uint16_t *value, const uint8_t *seen, uint16_t *out,
                            int64_t S, int64_t D, int64_t d0, const int GN, const int DN) {
    __m512 acc[4][4];
    for (int g = 0; g < GN; g++)
        for (int j = 0; j < DN; j++) acc[g][j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; s++) {
        if (!seen[s]) continue;
        __m512 v[4];
        for (int j = 0; j < DN; j++)
            v[j] = load_bf16x16(value + s * D + d0 + 16 * j);
        for (int g = 0; g < GN; g++) {
            __m512 p = _mm512_set1_ps(probs[g * S + s]);
            for (int j = 0; j < DN; j++) acc[g][j] = _mm512_fmadd_ps(p, v[j], acc[g][j]);
        }
    }
    for (int g = 0; g < GN; g++)
        for (int j = 0; j < DN; j++)
            _mm256_storeu_si256((__m256i *)(out + g * D + d0 + 16 * j), to_bf16x16(acc[g][j]));
}

/* q . k of each of the G query heads (rows of q, D apart) against every visible key, into
 * scores[g * S + s]; each key is read once for all G heads. */
INLINE void raw_scores_of(const uint16_t *q, const uint16_t *key, const uint8_t *seen, float *scores, int64_t S,
                          int64_t D, const int G) {
    for (int64_t s = 0; s < S; s++) {
        if (!seen[s]) continue;
        __m512 acc[8];
        for (int g = 0; g < G; g++) acc[g] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 32) {
            __m512bh k = (__m512bh)_mm512_loadu_si512(key + s * D + d);
            for (int g = 0; g < G; g++)
                acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)_mm512_loadu_si512(q + g * D + d), k);
        }
        for (int g = 0; g < G; g++) scores[g * S + s] = _mm512_reduce_add_ps(acc[g]);
    }
}

static void raw_scores(const uint16_t *q, const uint16_t *key, const uint8_t *seen, float *scores, int64_t S,
                       int64_t D, int64_t G) {
    switch (G) { /* literal head counts keep the accumulators in registers */
    case 1: raw_scores_of(q, key, seen, scores, S, D, 1); break;
    case 2: raw_scores_of(q, key, seen, scores, S, D, 2); break;
    case 4: raw_scores_of(q, key, seen, scores, S, D, 4); break;
    default:
        for (int64_t g0 = 0; g0 < G; g0 += 8)
            raw_scores_of(q + g0 * D, key, seen, scores + g0 * S, S, D, G - g0 < 8 ? (int)(G - g0) : 8);
    }
}

/* bf16 rounding of 16 floats, as float32. */
INLINE __m512 round_bf16x16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16x16(v)), 16));
}

/* e^x for 16 floats to about 1 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial on r),
 * NaN staying NaN, 0 below the smallest subnormal. */
INLINE __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(88.72f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x)); /* NaN passes */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

/* Lanes s0..s0+15 that are inside a row of S. */
INLINE __mmask16 lanes_inside(int64_t s0, int64_t S) {
    return S - s0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (S - s0)) - 1);
}

/* Lanes s0..s0+15 of the row that are visible (and inside S). */
INLINE __mmask16 seen_lanes(const uint8_t *seen, int64_t s0, int64_t S) {
    const __mmask16 inside = lanes_inside(s0, S);
    return _mm_mask_cmpneq_epi8_mask(inside, _mm_maskz_loadu_epi8(inside, seen + s0), _mm_setzero_si128());
}

/* bf16(tanh(bf16(v / cap)) * cap) of 16 bf16 values (as floats), as the reference's soft-cap rounds
 * it; tanh from the table, by 32-bit gathers at 2-byte steps (each lane's low half is its entry). */
INLINE __m512 soft_cap16(__m512 v, float cap) {
    const __m512i index = _mm512_cvtepu16_epi32(to_bf16x16(_mm512_div_ps(v, _mm512_set1_ps(cap))));
    const __m512i entries = _mm512_i32gather_epi32(index, (const void *)tanh_of_bf16, 2);
    const __m512 tanh = _mm512_castsi512_ps(_mm512_slli_epi32(entries, 16));
    return round_bf16x16(_mm512_mul_ps(tanh, _mm512_set1_ps(cap)));
}

/* One query head's raw scores [S] -> bf16-rounded probabilities, as eager attention rounds them:
 * bf16(bf16(score) * scaling), the soft-cap bf16(tanh(bf16(s / cap)) * cap), float32 softmax
 * over the visible keys, each probability rounded to bf16; 0 for the others. */
static void softmax_of_scores(float *p, const uint8_t *seen, int64_t S, float scaling, float softcap) {
    __m512 largest = _mm512_set1_ps(-INFINITY);
    for (int64_t s0 = 0; s0 < S; s0 += 16) {
        const __mmask16 lanes = seen_lanes(seen, s0, S);
        __m512 v = round_bf16x16(_mm512_mul_ps(round_bf16x16(_mm512_maskz_loadu_ps(lanes, p + s0)),
                                               _mm512_set1_ps(scaling)));
        if (softcap > 0) v = soft_cap16(v, softcap);
        _mm512_mask_storeu_ps(p + s0, lanes, v);
        largest = _mm512_mask_max_ps(largest, lanes, largest, v);
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(largest));
    __m512 sums = _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < S; s0 += 16) {
        const __mmask16 lanes = seen_lanes(seen, s0, S);
        __m512 e = _mm512_maskz_mov_ps(lanes, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, p + s0), top)));
        _mm512_mask_storeu_ps(p + s0, lanes, e);
        sums = _mm512_add_ps(sums, e);
    }
    const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sums));
    for (int64_t s0 = 0; s0 < S; s0 += 16) {
        const __mmask16 lanes = seen_lanes(seen, s0, S);
        const __m512 probability = round_bf16x16(_mm512_div_ps(_mm512_maskz_loadu_ps(lanes, p + s0), total));
        _mm512_mask_storeu_ps(p + s0, lanes_inside(s0, S), _mm512_maskz_mov_ps(lanes, probability));
    }
}

/* Attention of each row's query heads over the slots it sees (seen [B, S], nonzero where visible). */
static void attend(const uint16_t *q, const uint16_t *keys, const uint16_t *values, const int64_t *rows,
                   const uint8_t *seen_rows, uint16_t *out, int64_t B, int64_t H, int64_t K, int64_t S, int64_t D,
                   int64_t batch_stride, int64_t head_stride, float scaling, float softcap, int threads) {
    const int64_t G = H / K;
    float *scratch = alloc64(sizeof(float) * (size_t)(B * K * G * S));
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bk = 0; bk < B * K; bk++) {
        const int64_t b = bk / K, kv = bk % K, row = rows ? rows[b] : b;
        const uint16_t *key = keys + row * batch_stride + kv * head_stride;
        const uint16_t *value = values + row * batch_stride + kv * head_stride;
        const uint16_t *query_heads = q + (b * H + kv * G) * D; /* the G query heads of this key head */
        const uint8_t *seen = seen_rows + b * S;
        float *probs = scratch + bk * G * S; /* [G, S] */
        raw_scores(query_heads, key, seen, probs, S, D, G);
        for (int64_t g = 0; g < G; g++) softmax_of_scores(probs + g * S, seen, S, scaling, softcap);
        /* Rows with no visible key: largest stays -inf and every probability 0, so zeros come out. */
        uint16_t *heads_out = out + (b * H + kv * G) * D;
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
            const int64_t gn = G - g0 < 4 ? G - g0 : 4;
            for (int64_t d0 = 0; d0 < D; d0 += 64) {
                const float *pg = probs + g0 * S;
                uint16_t *o = heads_out + g0 * D;
                const int64_t dn = D - d0 < 64 ? (D - d0) / 16 : 4;
#define WEIGHTED_VALUES_CASE(GN, DN) \
    case GN * 8 + DN:                \
        weighted_values(pg, value, seen, o, S, D, d0, GN, DN); \
        break;
                switch (gn * 8 + dn) {
                    WEIGHTED_VALUES_CASE(1, 2) WEIGHTED_VALUES_CASE(1, 4) WEIGHTED_VALUES_CASE(2, 2)
                    WEIGHTED_VALUES_CASE(2, 4) WEIGHTED_VALUES_CASE(3, 2) WEIGHTED_VALUES_CASE(3, 4)
                    WEIGHTED_VALUES_CASE(4, 2) WEIGHTED_VALUES_CASE(4, 4)
                }
#undef WEIGHTED_VALUES_CASE
            }
        }
    }
    free(scratch);
}

/* Scratch of the fused decoder layer (kernels_decode_layer.h): 64-byte aligned, as the vector loads like. */
INLINE void *scratch_alloc(size_t bytes) { return alloc64(bytes); }

#include "kernels_decode_layer.h" /* visible, the ABI structs, the fused decoder layer */

/* Padding here is per slot: uint8 [B or 1, S] at padding_stride per row, or NULL. */
void gemma2_decode_attention(const uint16_t *q, const uint16_t *keys, const uint16_t *values, const int64_t *rows,
                             const int64_t *positions, int64_t positions_stride, const uint8_t *padding,
                             int64_t padding_stride, const int64_t *query, int64_t window, uint16_t *out, int64_t B,
                             int64_t H, int64_t K, int64_t S, int64_t D, int64_t batch_stride, int64_t head_stride,
                             float scaling, float softcap, int threads) {
    uint8_t *seen = malloc((size_t)(B * S));
    for (int64_t b = 0; b < B; b++)
        for (int64_t s = 0; s < S; s++)
            seen[b * S + s] = visible(positions[b * positions_stride + s], query[b], window) &&
                              (padding == NULL || padding[b * padding_stride + s]);
    attend(q, keys, values, rows, seen, out, B, H, K, S, D, batch_stride, head_stride, scaling, softcap, threads);
    free(seen);
}

/* ---- the small per-layer operations of a decode step -------------------------------------------
 *
 * Each is a handful of PyTorch ops on a few thousand numbers, where dispatching the ops costs more
 * than the arithmetic; a decode step runs them hundreds of times. They round exactly where the
 * reference rounds, one thread. */

/* Gemma's RMSNorm of rows x [M, D] (bf16) with weight w [D] (bf16):
 * bf16(x * (1 / sqrt(mean(x^2) + eps)) * (1 + w)), all in float32 as the reference; only the order
 * of the sum of squares differs from PyTorch's. */
void gemma2_rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t M, int64_t D, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *row = x + m * D;
        __m512 squares = _mm512_setzero_ps();
        int64_t d = 0;
        for (; d + 16 <= D; d += 16) {
            __m512 v = load_bf16x16(row + d);
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        float sum = _mm512_reduce_add_ps(squares);
        for (; d < D; d++) {
            float v = from_bf16(row[d]);
            sum += v * v;
        }
        const float inverse = 1.0f / sqrtf(sum / (float)D + eps);
        for (d = 0; d < D; d++) {
            float normed = from_bf16(row[d]) * inverse;
            out[m * D + d] = to_bf16(normed * (1.0f + from_bf16(w[d])));
        }
    }
}

/* Rotary embedding of one token's heads: x, out [B, heads, D] (bf16), cos/sin [B, D] (bf16,
 * row b at b * cos_stride: 0 when all rows share one position).
 * out = x * cos + rotate_half(x) * sin with each product and the sum rounded to bf16, as the
 * reference's bf16 ops do; rotate_half(x) = (-x[D/2:], x[:D/2]). */
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

/* ---- the logits of a decode step ---------------------------------------------------------------
 *
 * Gemma 2's final soft-cap and greedy decoding's argmax each touch all 256,000 logits of a step;
 * PyTorch takes about 0.3 ms and 0.9 ms for them in bf16, native code a few tens of microseconds. */

/* out = bf16(tanh(bf16(x / cap)) * cap) for n bf16 values: tanh(x / cap) * cap as bf16 tensor ops
 * round it. tanh comes from the table (exact for every bf16 input). */
void gemma2_soft_cap(const uint16_t *x, uint16_t *out, int64_t n, float cap, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t start = 0; start < n; start += 4096) {
        const int64_t stop = start + 4096 < n ? start + 4096 : n;
        int64_t i = start;
        for (; i + 16 <= stop; i += 16)
            _mm256_storeu_si256((__m256i *)(out + i), to_bf16x16(soft_cap16(load_bf16x16(x + i), cap)));
        for (; i < stop; i++) out[i] = to_bf16(from_bf16(tanh_of_bf16[to_bf16(from_bf16(x[i]) / cap)]) * cap);
    }
}

/* Index of the largest of each row's n bf16 values, as torch.argmax: the first of equal largest
 * values (0 and -0 are equal), the first NaN if there is one. */
void gemma2_argmax_bf16(const uint16_t *x, int64_t rows, int64_t n, int64_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * n;
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i best_index = _mm512_set1_epi32(-1), index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                                               12, 13, 14, 15);
        __mmask16 nan = 0;
        int64_t i = 0;
        for (; i + 16 <= n && i + 16 <= INT32_MAX; i += 16) {
            __m512 v = load_bf16x16(row + i);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            __mmask16 greater = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | (_mm512_cmpeq_epi32_mask(best_index, _mm512_set1_epi32(-1)));
            best = _mm512_mask_mov_ps(best, greater, v);
            best_index = _mm512_mask_mov_epi32(best_index, greater, index);
            index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
        }
        float values[16];
        int32_t indices[16];
        _mm512_storeu_ps(values, best);
        _mm512_storeu_si512(indices, best_index);
        int64_t winner = -1;
        float largest = -INFINITY;
        for (int lane = 0; lane < 16; lane++) {
            if (indices[lane] < 0) continue;
            if (winner < 0 || values[lane] > largest || (values[lane] == largest && indices[lane] < winner)) {
                largest = values[lane];
                winner = indices[lane];
            }
        }
        for (; i < n; i++) { /* the tail */
            const float v = from_bf16(row[i]);
            if (v != v) nan = 1;
            if (winner < 0 || v > largest) {
                largest = v;
                winner = i;
            }
        }
        if (nan)
            for (i = 0; i < n; i++)
                if (from_bf16(row[i]) != from_bf16(row[i])) {
                    winner = i;
                    break;
                }
        out[r] = winner;
    }
}
