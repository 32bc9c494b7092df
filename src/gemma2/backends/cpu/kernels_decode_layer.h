/* The fused decoder layer of a decode step, shared by every variant of the native kernels.
 *
 * Included once by each variant's C file (kernels_avx512_decode.c, kernels_scalar.c) after it has
 * defined to_bf16 / from_bf16, attend() (decode attention over the slots a row sees),
 * and scratch_alloc(); the entry points it calls are declared here and defined by the variant:
 * the layer is the same composition of those kernels in every variant, and the structs below are
 * the ABI that gemma2.backends.cpu.decode fills in with ctypes. Plain C99. */
#ifndef GEMMA2_KERNELS_DECODE_LAYER_H
#define GEMMA2_KERNELS_DECODE_LAYER_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The entry points the layer is made of (each variant defines them). */
void gemma2_linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K,
                        int threads);
int gemma2_linear_int8(const uint16_t *x, const int8_t *q, const float *scale, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int threads);
int gemma2_linear_int4(const uint16_t *x, const uint8_t *q, const float *scale, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int64_t G, int threads);
void gemma2_rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t M, int64_t D, float eps);
void gemma2_rotary(const uint16_t *x, uint16_t *out, const uint16_t *cos, const uint16_t *sin, int64_t B,
                   int64_t heads, int64_t D, int64_t cos_stride);

/* Whether the query at position `query` sees a key at slot position p (-1: an empty slot). */
static inline int visible(int64_t p, int64_t query, int64_t window) {
    return p >= 0 && p <= query && (window <= 0 || p > query - window);
}

/* ---- a whole decoder layer for one new token per row -------------------------------------------
 *
 * The layer's dozens of small PyTorch ops cost more than their arithmetic in a decode step (and
 * their Python runs with caches cold from the weight streams), so the native path runs all of it
 * in one call, with the same kernels and roundings as the op-by-op path (gemma2.backends.cpu.decode):
 *   x = norm(h); q, k, v = linear(x); rotary(q, k); write k, v to the cache; attend;
 *   h1 = h + norm(o_proj(attention)); x2 = norm(h1); a = act(gate(x2)) * up(x2) (each rounded);
 *   out = h1 + norm(down(a)).
 * Nothing outside `out` and the cache slot changes; a nonzero return (non-finite activations
 * reached a quantized linear layer) asks the caller to run the op-by-op path, which rewrites the
 * slot with the same values. */

typedef struct {
    int64_t kind;           /* 0 bf16 [N, K], 1 int8 [N, K] + scale [N], 2 int4 [N, K / 2] + scale [N, K / G] */
    const void *weight;
    const float *scale;
    const uint16_t *bias;   /* bf16 [N] or NULL */
    int64_t N, K, group;
} Gemma2Linear;

typedef struct {
    Gemma2Linear q, k, v, o, gate, up, down;
    const uint16_t *input_norm, *post_attention_norm, *pre_feedforward_norm, *post_feedforward_norm;
    const uint16_t *activation; /* bf16 -> bf16 by bits [65536]: the reference's activation of each value */
    float eps, scaling, softcap;
    int64_t heads, kv_heads, head_dim, window;
} Gemma2DecodeLayer;

typedef struct {
    const uint16_t *cos, *sin; /* [B or 1, D] */
    int64_t cos_stride;        /* D, or 0 when every row shares them */
    const uint8_t *padding;    /* [B or 1, positions] by key position (nonzero: a real token), or NULL */
    int64_t padding_stride;
    const int64_t *query;      /* [B] each row's new token's position */
} Gemma2DecodeStep;

typedef struct {
    uint16_t *keys, *values;   /* [rows, kv_heads, slots, D] at these element strides */
    int64_t batch_stride, head_stride;
    const int64_t *rows;       /* [B] the cache row of each batch row, or NULL: row b */
    const int64_t *positions;  /* [rows, positions_stride] position of each slot (-1 empty) by cache row,
                                  or NULL: slot s holds position s */
    int64_t positions_stride;
    int64_t slots;             /* slots to attend over */
    const int64_t *slot;       /* [B] where each row's new key and value go */
} Gemma2DecodeCache;

/* out = bf16(a + b) elementwise, as a bf16 tensor add. */
static void add_bf16(const uint16_t *a, const uint16_t *b, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = to_bf16(from_bf16(a[i]) + from_bf16(b[i]));
}

static int run_linear(const Gemma2Linear *l, const uint16_t *x, uint16_t *y, int64_t M, int threads) {
    int non_finite = 0;
    if (l->kind == 0)
        gemma2_linear_bf16(x, l->weight, y, M, l->N, l->K, threads);
    else if (l->kind == 1)
        non_finite = gemma2_linear_int8(x, l->weight, l->scale, y, M, l->N, l->K, threads);
    else
        non_finite = gemma2_linear_int4(x, l->weight, l->scale, y, M, l->N, l->K, l->group, threads);
    if (!non_finite && l->bias)
        for (int64_t m = 0; m < M; m++) add_bf16(y + m * l->N, l->bias, y + m * l->N, l->N);
    return non_finite;
}

static int decode_layer(const Gemma2DecodeLayer *L, const Gemma2DecodeStep *step, const Gemma2DecodeCache *cache,
                        const uint16_t *h, uint16_t *out, int64_t B, int threads) {
    const int64_t d = L->o.N, D = L->head_dim, HD = L->heads * D, KD = L->kv_heads * D, F = L->gate.N;
    const int64_t S = cache->slots;
    /* bf16 scratch: x, q, q_rotated, k, k_rotated, v, attention, o, h1, gate, up, act */
    uint16_t *x = scratch_alloc(sizeof(uint16_t) * (size_t)(B * (4 * d + 3 * HD + 3 * KD + 3 * F)));
    uint16_t *q = x + B * d, *q_rot = q + B * HD, *k = q_rot + B * HD, *k_rot = k + B * KD, *v = k_rot + B * KD;
    uint16_t *att = v + B * KD, *o = att + B * HD, *h1 = o + B * d, *gate = h1 + B * d, *up = gate + B * F;
    uint16_t *act = up + B * F, *normed = act + B * F;
    uint8_t *seen = scratch_alloc((size_t)(B * S));
    int failed = 0;

    gemma2_rms_norm(h, L->input_norm, x, B, d, L->eps);
    failed = run_linear(&L->q, x, q, B, threads) || run_linear(&L->k, x, k, B, threads) ||
             run_linear(&L->v, x, v, B, threads);
    if (failed) goto done;
    gemma2_rotary(q, q_rot, step->cos, step->sin, B, L->heads, D, step->cos_stride);
    gemma2_rotary(k, k_rot, step->cos, step->sin, B, L->kv_heads, D, step->cos_stride);
    for (int64_t b = 0; b < B; b++)
        for (int64_t kv = 0; kv < L->kv_heads; kv++) {
            const int64_t row = cache->rows ? cache->rows[b] : b;
            const int64_t at = row * cache->batch_stride + kv * cache->head_stride + cache->slot[b] * D;
            memcpy(cache->keys + at, k_rot + (b * L->kv_heads + kv) * D, sizeof(uint16_t) * (size_t)D);
            memcpy(cache->values + at, v + (b * L->kv_heads + kv) * D, sizeof(uint16_t) * (size_t)D);
        }
    for (int64_t b = 0; b < B; b++) {
        const int64_t row = cache->rows ? cache->rows[b] : b, query = step->query[b];
        const int64_t *positions = cache->positions ? cache->positions + row * cache->positions_stride : NULL;
        for (int64_t s = 0; s < S; s++) {
            const int64_t p = s == cache->slot[b] ? query : positions ? positions[s] : s;
            seen[b * S + s] = visible(p, query, L->window) &&
                              (step->padding == NULL || step->padding[b * step->padding_stride + p]);
        }
    }
    attend(q_rot, cache->keys, cache->values, cache->rows, seen, att, B, L->heads, L->kv_heads, S, D,
           cache->batch_stride, cache->head_stride, L->scaling, L->softcap, threads);
    if ((failed = run_linear(&L->o, att, o, B, threads))) goto done;
    gemma2_rms_norm(o, L->post_attention_norm, normed, B, d, L->eps);
    add_bf16(h, normed, h1, B * d);

    gemma2_rms_norm(h1, L->pre_feedforward_norm, x, B, d, L->eps);
    if ((failed = run_linear(&L->gate, x, gate, B, threads) || run_linear(&L->up, x, up, B, threads))) goto done;
    for (int64_t i = 0; i < B * F; i++)
        act[i] = to_bf16(from_bf16(L->activation[gate[i]]) * from_bf16(up[i]));
    if ((failed = run_linear(&L->down, act, o, B, threads))) goto done;
    gemma2_rms_norm(o, L->post_feedforward_norm, normed, B, d, L->eps);
    add_bf16(h1, normed, out, B * d);
done:
    free(x);
    free(seen);
    return failed;
}

/* The first `count` layers of a decode step, one after another (h -> out). Python code between
 * layers would run with caches the weight streams just flushed: a whole step of it took 1.2 ms
 * warm and about 8 ms between layers. Returns how many layers ran; fewer than count means layer
 * [returned] met non-finite activations in a quantized linear layer, and out then holds the
 * output of the layers before it (h itself when it is the first). */
int64_t gemma2_decode_layers(int64_t count, const Gemma2DecodeLayer *const *layers,
                             const Gemma2DecodeCache *const *caches, const Gemma2DecodeStep *step, const uint16_t *h,
                             uint16_t *out, int64_t B, int threads) {
    const int64_t size = B * layers[0]->o.N;
    uint16_t *other = scratch_alloc(sizeof(uint16_t) * (size_t)size);
    const uint16_t *in = h;
    int64_t done = 0;
    for (; done < count; done++) {
        uint16_t *into = (count - 1 - done) % 2 == 0 ? out : other; /* the last layer writes out */
        if (decode_layer(layers[done], step, caches[done], in, into, B, threads)) break;
        in = into;
    }
    if (in != out) memcpy(out, in, sizeof(uint16_t) * (size_t)size);
    free(other);
    return done;
}

#endif
