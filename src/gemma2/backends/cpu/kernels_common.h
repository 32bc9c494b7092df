/* The bf16 conversions every variant of the native kernels shares (plain C99).
 *
 * to_bf16 rounds to nearest even like PyTorch's float -> bf16: NaN made quiet, subnormals kept (not
 * flushed), so a kernel's bf16 outputs are the bits a bf16 tensor op writes. */
#ifndef GEMMA2_KERNELS_COMMON_H
#define GEMMA2_KERNELS_COMMON_H

#include <stdint.h>
#include <string.h>

#define MAX_ROWS 8 /* activation rows per call of a linear kernel: the ABI's limit (library.py MAX_ROWS) */

static inline uint16_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float from_bf16(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

static inline float round_bf16(float value) { return from_bf16(to_bf16(value)); }

#endif
