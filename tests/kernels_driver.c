/* Test driver of the NEON variant of the native kernels (tests/test_cpu_kernels_neon.py).
 *
 * Linked into one static AArch64 executable with kernels_neon.c (the library under test, which
 * includes the scalar file for the entry points it does not define) and run under qemu-aarch64 on
 * x86-64 hosts. This file includes kernels_scalar.c a second time with every entry point renamed
 * reference_*, so both are in one process: the integer linear kernels and every entry point the
 * NEON file takes from the scalar one must match the reference bit for bit, the bf16 linear kernel
 * must be within bf16 tolerance of float64 math and independent of thread count and batch.
 * Prints one line per check group and "neon: P of N checks passed"; exits 0 when all pass, 1 on a
 * failure, 3 (before running any NEON code) on a CPU without the dot-product extension.
 * Build (see the pytest file for the exact flags):
 *   aarch64-linux-gnu-gcc -O3 -march=armv8.2-a+dotprod -ffp-contract=off -fopenmp -static
 *       -I src/gemma2/backends/cpu tests/kernels_driver.c src/gemma2/backends/cpu/kernels_neon.c -lm */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>

#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20) /* Linux arch/arm64/include/uapi/asm/hwcap.h */
#endif

#define gemma2_linear_bf16 reference_linear_bf16
#define gemma2_linear_int8 reference_linear_int8
#define gemma2_linear_int4 reference_linear_int4
#define gemma2_dequantize_int4 reference_dequantize_int4
#define gemma2_dequantize_int8 reference_dequantize_int8
#define gemma2_decode_attention reference_decode_attention
#define gemma2_rms_norm reference_rms_norm
#define gemma2_rotary reference_rotary
#define gemma2_soft_cap reference_soft_cap
#define gemma2_argmax_bf16 reference_argmax_bf16
#define gemma2_decode_layers reference_decode_layers
#include "kernels_scalar.c" /* the reference; also MAX_ROWS, to_bf16, from_bf16 and the ABI structs */
#undef gemma2_linear_bf16
#undef gemma2_linear_int8
#undef gemma2_linear_int4
#undef gemma2_dequantize_int4
#undef gemma2_dequantize_int8
#undef gemma2_decode_attention
#undef gemma2_rms_norm
#undef gemma2_rotary
#undef gemma2_soft_cap
#undef gemma2_argmax_bf16
#undef gemma2_decode_layers

/* The library under test (kernels_neon.c); the linear and norm/rotary prototypes came with the
 * decode layer header, under the reference names, so all are declared here. */
void gemma2_linear_bf16(const uint16_t *, const uint16_t *, uint16_t *, int64_t, int64_t, int64_t, int);
int gemma2_linear_int8(const uint16_t *, const int8_t *, const float *, uint16_t *, int64_t, int64_t, int64_t, int);
int gemma2_linear_int4(const uint16_t *, const uint8_t *, const float *, uint16_t *, int64_t, int64_t, int64_t,
                       int64_t, int);
void gemma2_dequantize_int4(const uint8_t *, const float *, uint16_t *, int64_t, int64_t, int64_t, int);
void gemma2_dequantize_int8(const int8_t *, const float *, uint16_t *, int64_t, int64_t, int);
void gemma2_decode_attention(const uint16_t *, const uint16_t *, const uint16_t *, const int64_t *, const int64_t *,
                             int64_t, const uint8_t *, int64_t, const int64_t *, int64_t, uint16_t *, int64_t, int64_t,
                             int64_t, int64_t, int64_t, int64_t, int64_t, float, float, int);
void gemma2_rms_norm(const uint16_t *, const uint16_t *, uint16_t *, int64_t, int64_t, float);
void gemma2_rotary(const uint16_t *, uint16_t *, const uint16_t *, const uint16_t *, int64_t, int64_t, int64_t,
                   int64_t);
void gemma2_soft_cap(const uint16_t *, uint16_t *, int64_t, float, int);
void gemma2_argmax_bf16(const uint16_t *, int64_t, int64_t, int64_t *);
int64_t gemma2_decode_layers(int64_t, const Gemma2DecodeLayer *const *, const Gemma2DecodeCache *const *,
                             const Gemma2DecodeStep *, const uint16_t *, uint16_t *, int64_t, int);

/* ---- inputs and bookkeeping -------------------------------------------------------------------- */

static uint64_t lcg_state = 1;
static uint32_t next_u32(void) { /* Knuth's MMIX LCG, high bits */
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(lcg_state >> 32);
}
static float uniform(void) { return (float)next_u32() / 4294967296.0f * 2.0f - 1.0f; } /* [-1, 1) */

/* n bf16 values of scale * uniform, with a few 20x outliers. */
static void fill_bf16(uint16_t *x, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) x[i] = to_bf16(scale * uniform() * (next_u32() % 100 == 0 ? 20.0f : 1.0f));
}
static void fill_bytes(void *p, int64_t n) {
    for (int64_t i = 0; i < n; i++) ((uint8_t *)p)[i] = (uint8_t)(next_u32() >> 24);
}
static void fill_scales(float *s, int64_t n) {
    for (int64_t i = 0; i < n; i++) s[i] = (0.5f + 0.5f * uniform()) * 0.01f;
}

static int passed = 0, total = 0, group_passed, group_total;
static void group_begin(void) { group_passed = group_total = 0; }
static void group_end(const char *name) {
    printf("%-34s %3d of %3d passed\n", name, group_passed, group_total);
    passed += group_passed;
    total += group_total;
}
static void check(int ok, const char *what) {
    group_total++;
    if (ok) group_passed++;
    else printf("  FAILED: %s\n", what);
}

/* Bit for bit equal bf16 arrays, any NaN matching any NaN. */
static int same_bits(const uint16_t *a, const uint16_t *b, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (a[i] != b[i] && !(isnan(from_bf16(a[i])) && isnan(from_bf16(b[i])))) return 0;
    return 1;
}

static char label[160];

/* ---- linear kernels ---------------------------------------------------------------------------- */

static const int64_t SIZES_N[] = {1, 7, 33, 257};

/* x [M, K] of a kind: 0 random, 1 with a zero row, 2 tiny (subnormal scale), 3 large, 4 mixed. */
static void activations(uint16_t *x, int64_t M, int64_t K, int kind) {
    fill_bf16(x, M * K, 1.0f);
    for (int64_t m = 0; m < M; m++) {
        const int row_kind = kind == 4 ? (int)(m % 4) : kind;
        for (int64_t k = 0; k < K; k++) {
            float v = from_bf16(x[m * K + k]);
            if (row_kind == 1) v = 0.0f;
            if (row_kind == 2) v *= k % 3 ? 1e-39f : 1e-38f; /* subnormal bf16 and levels / largest = inf */
            if (row_kind == 3) v *= 1.5e37f; /* up to 3e38 with the outliers: near FLT_MAX, finite */
            x[m * K + k] = to_bf16(v);
        }
    }
}

static void check_int_linears(void) {
    static const int64_t SIZES_K[] = {64, 96, 192, 2304};
    group_begin();
    for (int ni = 0; ni < 4; ni++)
        for (int ki = 0; ki < 4; ki++)
            for (int64_t M = 1; M <= MAX_ROWS; M++) {
                const int64_t N = SIZES_N[ni], K = SIZES_K[ki];
                if (N * K > 33 * 2304 && M != 1 && M != 5 && M != 8) continue; /* qemu time */
                const int kind = (int)((N + K + M) % 5);
                uint16_t *x = malloc(2 * M * K), *y = malloc(2 * M * N), *r = malloc(2 * M * N);
                int8_t *q = malloc(N * K);
                float *scale = malloc(4 * N);
                activations(x, M, K, kind);
                fill_bytes(q, N * K);
                fill_scales(scale, N);
                const int got = gemma2_linear_int8(x, q, scale, y, M, N, K, 2);
                const int want = reference_linear_int8(x, q, scale, r, M, N, K, 1);
                snprintf(label, sizeof label, "int8 M=%lld N=%lld K=%lld kind %d", (long long)M, (long long)N,
                         (long long)K, kind);
                check(got == 0 && want == 0 && memcmp(y, r, 2 * M * N) == 0, label);
                free(x), free(y), free(r), free(q), free(scale);
            }
    { /* all levels at the int16 extremes and K long enough (2^20) to overflow int32 lanes unflushed */
        const int64_t M = 5, N = 3, K = 1 << 20;
        uint16_t *x = malloc(2 * M * K), y[15], r[15];
        int8_t *q = malloc(N * K);
        float scale[3] = {1e-3f, 2e-3f, 3e-3f};
        for (int64_t i = 0; i < M * K; i++) x[i] = to_bf16(i % 97 ? 1.0f : -1.0f);
        for (int64_t i = 0; i < N * K; i++) q[i] = i % 89 ? -128 : 127; /* sums of one sign */
        const int got = gemma2_linear_int8(x, q, scale, y, M, N, K, 2);
        const int want = reference_linear_int8(x, q, scale, r, M, N, K, 1);
        check(got == 0 && want == 0 && memcmp(y, r, sizeof y) == 0, "int8 K=2^20 extremes");
        free(x), free(q);
    }
    group_end("int8 bit-identical to scalar");

    static const int64_t INT4_K[] = {64, 192, 256, 2304}, INT4_G[] = {64, 128, 256};
    group_begin();
    for (int ni = 0; ni < 4; ni++)
        for (int ki = 0; ki < 4; ki++)
            for (int gi = 0; gi < 3; gi++)
                for (int64_t M = 1; M <= MAX_ROWS; M++) {
                    const int64_t N = SIZES_N[ni], K = INT4_K[ki], G = INT4_G[gi];
                    if (K % G || (N * K > 33 * 2304 && M != 1 && M != 6 && M != 8) || (gi && M % 3)) continue;
                    const int kind = (int)((N + K + M + G / 64) % 5);
                    uint16_t *x = malloc(2 * M * K), *y = malloc(2 * M * N), *r = malloc(2 * M * N);
                    uint8_t *q = malloc(N * K / 2);
                    float *scale = malloc(4 * N * (K / G));
                    activations(x, M, K, kind);
                    fill_bytes(q, N * K / 2);
                    fill_scales(scale, N * (K / G));
                    const int got = gemma2_linear_int4(x, q, scale, y, M, N, K, G, 2);
                    const int want = reference_linear_int4(x, q, scale, r, M, N, K, G, 1);
                    snprintf(label, sizeof label, "int4 M=%lld N=%lld K=%lld G=%lld kind %d", (long long)M,
                             (long long)N, (long long)K, (long long)G, kind);
                    check(got == 0 && want == 0 && memcmp(y, r, 2 * M * N) == 0, label);
                    free(x), free(y), free(r), free(q), free(scale);
                }
    group_end("int4 bit-identical to scalar");

    /* Blocks in cancelling pairs (block 2i + 1 the negation of block 2i, same weights and group
     * scale): each pair's float32 sum leaves only rounding residue, so any other order or an FMA
     * in the block sums changes the bf16 result. */
    group_begin();
    for (int64_t M = 1; M <= MAX_ROWS; M++) {
        const int64_t N = 33, K = 2304, G = 128, blocks = K / 64;
        uint16_t *x = malloc(2 * M * K), *y = malloc(2 * M * N), *r = malloc(2 * M * N);
        uint8_t *q = malloc(N * K / 2);
        float *scale = malloc(4 * N * (K / G));
        fill_bf16(x, M * K, 1.0f), fill_bytes(q, N * K / 2), fill_scales(scale, N * (K / G));
        for (int64_t b = 1; b < blocks; b += 2) {
            for (int64_t m = 0; m < M; m++)
                for (int j = 0; j < 64; j++) x[m * K + 64 * b + j] = x[m * K + 64 * (b - 1) + j] ^ 0x8000;
            for (int64_t n = 0; n < N; n++) memcpy(q + (n * K + 64 * b) / 2, q + (n * K + 64 * (b - 1)) / 2, 32);
        }
        x[0] ^= 1; /* not quite: the residue plus one small term */
        const int got = gemma2_linear_int4(x, q, scale, y, M, N, K, G, 2);
        const int want = reference_linear_int4(x, q, scale, r, M, N, K, G, 1);
        snprintf(label, sizeof label, "int4 cancelling blocks M=%lld", (long long)M);
        check(got == 0 && want == 0 && memcmp(y, r, 2 * M * N) == 0, label);
        free(x), free(y), free(r), free(q), free(scale);
    }
    group_end("int4 float order (cancelling)");

    /* NaN or an infinity anywhere: both refuse (1) and leave y alone. */
    group_begin();
    const float bad[] = {NAN, INFINITY, -INFINITY};
    for (int b = 0; b < 3; b++)
        for (int64_t M = 1; M <= MAX_ROWS; M += 3) {
            const int64_t N = 7, K = 128;
            uint16_t x[MAX_ROWS * 128], y[MAX_ROWS * 7];
            int8_t q8[7 * 128];
            uint8_t q4[7 * 64];
            float scale[7 * 2];
            fill_bf16(x, M * K, 1.0f);
            x[(M - 1) * K + 77] = to_bf16(bad[b]);
            fill_bytes(q8, N * K), fill_bytes(q4, N * K / 2), fill_scales(scale, 14);
            memset(y, 0x5a, sizeof y);
            const int r8 = gemma2_linear_int8(x, q8, scale, y, M, N, K, 2);
            const int r4 = gemma2_linear_int4(x, q4, scale, y, M, N, K, 64, 2);
            int untouched = 1;
            for (size_t i = 0; i < sizeof y / 2; i++) untouched &= y[i] == 0x5a5a;
            snprintf(label, sizeof label, "non-finite %g in row %lld", bad[b], (long long)M - 1);
            check(r8 == 1 && r4 == 1 && untouched, label);
        }
    group_end("int8/int4 refuse NaN/inf");
}

/* |got - ref| <= 2^-7 |ref| + 2^-16 sum |x||w| + (subnormal steps); NaN and inf as float64 gives. */
static int bf16_close(const uint16_t *x, const uint16_t *w, const uint16_t *y, int64_t M, int64_t N, int64_t K) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double ref = 0, magnitude = 0;
            for (int64_t k = 0; k < K; k++) {
                const double p = (double)from_bf16(x[m * K + k]) * from_bf16(w[n * K + k]);
                ref += p;
                magnitude += fabs(p);
            }
            const double got = from_bf16(y[m * N + n]);
            if (isnan(ref) || isinf(ref)) {
                if (isnan(ref) ? !isnan(got) : got != ref) return 0;
                continue;
            }
            if (!(fabs(got - ref) <= 0x1p-7 * fabs(ref) + 0x1p-16 * magnitude + 0x1p-133 + (double)K * 0x1p-149))
                return 0;
        }
    return 1;
}

static void check_bf16_linear(void) {
    static const int64_t SIZES_K[] = {32, 96, 192, 2304};
    group_begin();
    for (int ni = 0; ni < 4; ni++)
        for (int ki = 0; ki < 4; ki++)
            for (int64_t M = 1; M <= MAX_ROWS; M++) {
                const int64_t N = SIZES_N[ni], K = SIZES_K[ki];
                if (N * K > 33 * 2304 && M != 1 && M != 4 && M != 7) continue;
                const int kind = (int)((N + K + M) % 5) % 3; /* random, zero rows, subnormal rows */
                uint16_t *x = malloc(2 * M * K), *w = malloc(2 * N * K), *y = malloc(2 * M * N);
                activations(x, M, K, kind);
                fill_bf16(w, N * K, kind == 2 && N % 2 ? 1000.0f : 1.0f); /* subnormal and normal products */
                gemma2_linear_bf16(x, w, y, M, N, K, 2);
                snprintf(label, sizeof label, "bf16 M=%lld N=%lld K=%lld kind %d", (long long)M, (long long)N,
                         (long long)K, kind);
                check(bf16_close(x, w, y, M, N, K), label);
                free(x), free(w), free(y);
            }
    group_end("bf16 within tolerance of float64");

    /* Non-finite values propagate as in float64 (inf * 0 = NaN, inf - inf = NaN, inf + finite = inf). */
    group_begin();
    for (int c = 0; c < 4; c++) {
        const int64_t M = 4, N = 9, K = 96;
        uint16_t x[4 * 96], w[9 * 96], y[4 * 9];
        fill_bf16(x, M * K, 1.0f), fill_bf16(w, N * K, 1.0f);
        x[1 * K + 5] = to_bf16(c % 2 ? -INFINITY : NAN);
        w[3 * K + 70] = to_bf16(c < 2 ? INFINITY : NAN);
        w[6 * K + 10] = 0;
        x[2 * K + 10] = to_bf16(INFINITY); /* inf * 0 at (2, 6) */
        x[3 * K + 1] = to_bf16(INFINITY), w[8 * K + 1] = to_bf16(-1.0f), w[8 * K + 2] = to_bf16(INFINITY);
        x[3 * K + 2] = to_bf16(1.0f);                                          /* inf - inf at (3, 8) */
        gemma2_linear_bf16(x, w, y, M, N, K, 2);
        snprintf(label, sizeof label, "bf16 non-finite case %d", c);
        check(bf16_close(x, w, y, M, N, K), label);
    }
    group_end("bf16 NaN/inf propagate");

    /* A row's result is the same whatever the thread count and whichever rows share the call. */
    group_begin();
    for (int ki = 0; ki < 4; ki++) {
        const int64_t N = 257, K = SIZES_K[ki], M = MAX_ROWS;
        uint16_t *x = malloc(2 * M * K), *w = malloc(2 * N * K), *a = malloc(2 * M * N), *b = malloc(2 * M * N);
        fill_bf16(x, M * K, 1.0f), fill_bf16(w, N * K, 1.0f);
        int same = 1;
        gemma2_linear_bf16(x, w, a, M, N, K, 1);
        for (int threads = 2; threads <= 3; threads++) {
            gemma2_linear_bf16(x, w, b, M, N, K, threads);
            same &= memcmp(a, b, 2 * M * N) == 0;
        }
        for (int64_t m = 0; m < M; m++) {
            const int64_t rows = 1 + m % 3 < M - m ? 1 + m % 3 : M - m; /* alone or with the next rows */
            gemma2_linear_bf16(x + m * K, w, b, rows, N, K, 2);
            same &= memcmp(a + m * N, b, 2 * N) == 0;
        }
        snprintf(label, sizeof label, "bf16 K=%lld threads and batch", (long long)K);
        check(same, label);
        free(x), free(w), free(a), free(b);
    }
    group_end("bf16 independent of threads/batch");
}

/* ---- the entry points taken from the scalar file ----------------------------------------------- */

static void check_small_ops(void) {
    group_begin();
    for (int64_t D = 32; D <= 2304; D *= 6) { /* 32, 192, 1152 */
        const int64_t M = 3;
        uint16_t *x = malloc(2 * M * D), *w = malloc(2 * D), *a = malloc(2 * M * D), *b = malloc(2 * M * D);
        fill_bf16(x, M * D, 4.0f), fill_bf16(w, D, 1.0f);
        gemma2_rms_norm(x, w, a, M, D, 1e-6f);
        reference_rms_norm(x, w, b, M, D, 1e-6f);
        snprintf(label, sizeof label, "rms_norm D=%lld", (long long)D);
        check(same_bits(a, b, M * D), label);
        free(x), free(w), free(a), free(b);
    }
    for (int64_t B = 1; B <= 2; B++) {
        const int64_t H = 3, D = 64, n = B * H * D;
        uint16_t x[2 * 3 * 64], cs[2 * 64], sn[2 * 64], a[2 * 3 * 64], b[2 * 3 * 64];
        fill_bf16(x, n, 3.0f), fill_bf16(cs, B * D, 1.0f), fill_bf16(sn, B * D, 1.0f);
        gemma2_rotary(x, a, cs, sn, B, H, D, B > 1 ? D : 0);
        reference_rotary(x, b, cs, sn, B, H, D, B > 1 ? D : 0);
        snprintf(label, sizeof label, "rotary B=%lld", (long long)B);
        check(same_bits(a, b, n), label);
    }
    {
        uint16_t *x = malloc(2 << 16), *a = malloc(2 << 16), *b = malloc(2 << 16);
        for (uint32_t i = 0; i < 65536; i++) x[i] = (uint16_t)i; /* every bf16 value */
        gemma2_soft_cap(x, a, 65536, 30.0f, 2);
        reference_soft_cap(x, b, 65536, 30.0f, 1);
        check(same_bits(a, b, 65536), "soft_cap every bf16 value");
        free(x), free(a), free(b);
    }
    for (int c = 0; c < 4; c++) {
        const int64_t rows = 3, n = 1000;
        uint16_t x[3 * 1000];
        int64_t a[3], b[3];
        fill_bf16(x, rows * n, 1.0f);
        if (c >= 1) x[500] = x[100] = to_bf16(25.0f);        /* ties: the first */
        if (c >= 2) x[1000 + 7] = 0x8000, x[1000 + 3] = 0; /* signed zeros among negatives */
        if (c >= 2) for (int i = 0; i < 1000; i++) x[1000 + i] |= 0x8000;
        if (c == 3) x[2000 + 600] = to_bf16(NAN), x[2000 + 900] = to_bf16(NAN);
        gemma2_argmax_bf16(x, rows, n, a);
        reference_argmax_bf16(x, rows, n, b);
        snprintf(label, sizeof label, "argmax case %d", c);
        check(memcmp(a, b, sizeof a) == 0, label);
    }
    for (int64_t G = 64; G <= 128; G += 64) {
        const int64_t N = 7, K = 256;
        uint8_t q[7 * 128];
        int8_t q8[7 * 256];
        float scale[7 * 4];
        uint16_t a[7 * 256], b[7 * 256];
        fill_bytes(q, N * K / 2), fill_bytes(q8, N * K), fill_scales(scale, N * (K / G));
        gemma2_dequantize_int4(q, scale, a, N, K, G, 2);
        reference_dequantize_int4(q, scale, b, N, K, G, 1);
        int ok = same_bits(a, b, N * K);
        gemma2_dequantize_int8(q8, scale, a, N, K, 2);
        reference_dequantize_int8(q8, scale, b, N, K, 1);
        snprintf(label, sizeof label, "dequantize G=%lld", (long long)G);
        check(ok && same_bits(a, b, N * K), label);
    }
    group_end("small ops bit-identical to scalar");
}

static void check_attention(void) {
    group_begin();
    static const int64_t SHAPES[3][2] = {{40, 64}, {41, 36}, {13, 30}}; /* S, D: vector and leftover paths */
    for (int c = 0; c < 20; c++) {
        const int cancel = c >= 18, shape = cancel ? 0 : c / 6;
        const int64_t B = 3, H = 4, KV = 2, S = SHAPES[shape][0], D = SHAPES[shape][1], rows_total = 4;
        const int64_t head_stride = S * D, batch_stride = KV * S * D;
        uint16_t *q = malloc(2 * B * H * D), *keys = malloc(2 * rows_total * batch_stride);
        uint16_t *values = malloc(2 * rows_total * batch_stride);
        uint16_t *a = malloc(2 * B * H * D), *b = malloc(2 * B * H * D);
        int64_t rows[3] = {2, 0, 3}, positions[3 * 41], query[3] = {S - 1, 17 % S, 25 % S};
        uint8_t padding[3 * 41];
        fill_bf16(q, B * H * D, 2.0f), fill_bf16(keys, rows_total * batch_stride, 2.0f);
        fill_bf16(values, rows_total * batch_stride, 1.0f);
        if (cancel) { /* float32 sums that round differently in any other order than the scalar one */
            for (int64_t i = 0; i < B * H; i++) q[i * D] = q[i * D + D - 1] = to_bf16(4096.0f);
            for (int64_t i = 0; i < rows_total * KV; i++) {
                uint16_t *k = keys + i * S * D, *v = values + i * S * D;
                for (int64_t s = 0; s < S; s++) /* q . k = 2^25 + small terms - 2^25 */
                    k[s * D] = to_bf16(8192.0f), k[s * D + D - 1] = to_bf16(-8192.0f);
                memcpy(k + 2 * D, k, 2 * D); /* slots 0 and 2 equally likely, with opposite huge values */
                for (int64_t d = 0; d < D; d++) v[d] = to_bf16(from_bf16(v[d]) * 0x1p24f), v[2 * D + d] = v[d] ^ 0x8000;
            }
        }
        for (int64_t i = 0; i < B * S; i++) {
            positions[i] = c % 2 && i % 7 == 3 ? -1 : i % S; /* some empty slots */
            padding[i] = (uint8_t)(i % 11 != 5);
        }
        if (c % 6 == 5) query[1] = -1; /* a row that sees nothing */
        const int64_t window = c % 6 >= 2 ? 16 : 0;
        const float softcap = c % 3 == 1 ? 50.0f : 0.0f, scaling = 0.125f;
        const uint8_t *pad = c % 6 >= 4 ? padding : NULL;
        gemma2_decode_attention(q, keys, values, c % 2 ? rows : NULL, positions, S, pad, S, query, window, a, B, H,
                                KV, S, D, batch_stride, head_stride, scaling, softcap, 2);
        reference_decode_attention(q, keys, values, c % 2 ? rows : NULL, positions, S, pad, S, query, window, b, B, H,
                                   KV, S, D, batch_stride, head_stride, scaling, softcap, 1);
        snprintf(label, sizeof label, "decode_attention S=%lld D=%lld case %d%s", (long long)S, (long long)D, c % 6,
                 cancel ? " cancelling" : "");
        check(same_bits(a, b, B * H * D), label);
        free(q), free(keys), free(values), free(a), free(b);
    }
    group_end("decode attention bit-identical");
}

/* Two decoder layers of int8/int4 projections (the bf16 ones sum in another order): the output, the
 * cache and the count of layers run equal the reference's, and non-finite input stops both at 0. */
static void check_decode_layers(void) {
    enum { B = 2, d = 128, H = 2, KV = 1, D = 64, F = 192, S = 12 };
    static uint16_t activation[65536];
    for (uint32_t i = 0; i < 65536; i++) activation[i] = to_bf16(tanhf(from_bf16((uint16_t)i)) * 0.5f);
    Gemma2DecodeLayer layers[2];
    const Gemma2DecodeLayer *layer_list[2] = {&layers[0], &layers[1]};
    void *owned[64];
    int owned_count = 0;
    uint16_t norms[2][4][d];
    for (int l = 0; l < 2; l++) {
        Gemma2DecodeLayer *L = &layers[l];
        Gemma2Linear *projections[7] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        const int64_t shapes[7][2] = {{H * D, d}, {KV * D, d}, {KV * D, d}, {d, H * D}, {F, d}, {F, d}, {d, F}};
        for (int p = 0; p < 7; p++) {
            Gemma2Linear *lin = projections[p];
            lin->kind = 1 + (p + l) % 2, lin->N = shapes[p][0], lin->K = shapes[p][1], lin->group = 64;
            void *weight = owned[owned_count++] = malloc(lin->N * lin->K);
            float *scale = owned[owned_count++] = malloc(4 * lin->N * (lin->K / 64));
            fill_bytes(weight, lin->N * lin->K), fill_scales(scale, lin->N * (lin->K / 64));
            lin->weight = weight, lin->scale = scale, lin->bias = NULL;
            if (p == 0) {
                uint16_t *bias = owned[owned_count++] = malloc(2 * lin->N);
                fill_bf16(bias, lin->N, 0.1f);
                lin->bias = bias;
            }
        }
        for (int i = 0; i < 4; i++) fill_bf16(norms[l][i], d, 0.5f);
        L->input_norm = norms[l][0], L->post_attention_norm = norms[l][1];
        L->pre_feedforward_norm = norms[l][2], L->post_feedforward_norm = norms[l][3];
        L->activation = activation, L->eps = 1e-6f, L->scaling = 0.125f, L->softcap = l ? 50.0f : 0.0f;
        L->heads = H, L->kv_heads = KV, L->head_dim = D, L->window = l ? 0 : 4;
    }
    uint16_t cos[D], sin[D], h[B * d], out[2][B * d];
    const int64_t layer_cache = 2 * B * KV * S * D, cache_size = 2 * layer_cache; /* keys, values per layer */
    uint16_t *initial = malloc(2 * cache_size), *cache[2] = {malloc(2 * cache_size), malloc(2 * cache_size)};
    fill_bf16(cos, D, 1.0f), fill_bf16(sin, D, 1.0f), fill_bf16(h, B * d, 2.0f), fill_bf16(initial, cache_size, 1.0f);
    int64_t query[B] = {9, 5}, slot[B] = {9, 5};
    const Gemma2DecodeStep step = {cos, sin, 0, NULL, 0, query};
    group_begin();
    for (int c = 0; c < 2; c++) {
        if (c == 1) h[d + 3] = to_bf16(NAN);
        int64_t ran[2];
        for (int run = 0; run < 2; run++) { /* 0: NEON, 1: reference, each on its copy of the cache */
            memcpy(cache[run], initial, 2 * cache_size);
            Gemma2DecodeCache caches[2];
            const Gemma2DecodeCache *cache_list[2] = {&caches[0], &caches[1]};
            for (int l = 0; l < 2; l++) {
                uint16_t *keys = cache[run] + l * layer_cache;
                caches[l] = (Gemma2DecodeCache){keys, keys + B * KV * S * D, KV * S * D, S * D, NULL, NULL, 0, S, slot};
            }
            ran[run] = run ? reference_decode_layers(2, layer_list, cache_list, &step, h, out[1], B, 1)
                           : gemma2_decode_layers(2, layer_list, cache_list, &step, h, out[0], B, 2);
        }
        snprintf(label, sizeof label, "decode_layers %s (ran %lld, %lld)", c ? "NaN input" : "int8/int4",
                 (long long)ran[0], (long long)ran[1]);
        check(ran[0] == ran[1] && ran[0] == (c ? 0 : 2) && same_bits(out[0], out[1], B * d) &&
                  memcmp(cache[0], cache[1], 2 * cache_size) == 0,
              label);
    }
    group_end("decode layers bit-identical");
    free(initial), free(cache[0]), free(cache[1]);
    while (owned_count) free(owned[--owned_count]);
}

int main(void) {
    if (!(getauxval(AT_HWCAP) & HWCAP_ASIMDDP)) {
        printf("neon: this CPU has no dot-product instructions (HWCAP_ASIMDDP); nothing run\n");
        return 3;
    }
    check_int_linears();
    check_bf16_linear();
    check_small_ops();
    check_attention();
    check_decode_layers();
    printf("neon: %d of %d checks passed\n", passed, total);
    return passed == total ? 0 : 1;
}
