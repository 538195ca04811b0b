/* What the CPU kernels share: bf16 as raw bits, and the fp32 and bf16 dot products (dpbf16 where the
 * build has AVX512-BF16; kernels/cpu_kernels.py builds with -march=native). */
#ifndef LDMOLE_CPU_COMMON_H
#define LDMOLE_CPU_COMMON_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512BF16__) && !defined(LDMOLE_PORTABLE_BF16)
#include <immintrin.h>
#define LDMOLE_DPBF16 1
#endif

static inline float dot(const float *a, const float *b, int n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int j = 0; j < n; j++) acc += a[j] * b[j];
    return acc;
}

typedef uint16_t bf16; /* the top half of an fp32: torch.bfloat16's bits */

static inline float bf16_to_f32(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* round to nearest even, as torch rounds fp32 to bf16 */
static inline bf16 f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float dot_bf16(const bf16 *a, const bf16 *b, int n) {
    float acc = 0.0f;
#ifdef LDMOLE_DPBF16
    int j = 0;
    __m512 v = _mm512_setzero_ps();
    for (; j + 32 <= n; j += 32)
        v = _mm512_dpbf16_ps(v, (__m512bh)_mm512_loadu_si512(a + j), (__m512bh)_mm512_loadu_si512(b + j));
    acc = _mm512_reduce_add_ps(v);
    for (; j < n; j++) acc += bf16_to_f32(a[j]) * bf16_to_f32(b[j]);
#else
#pragma omp simd reduction(+ : acc)
    for (int j = 0; j < n; j++) acc += bf16_to_f32(a[j]) * bf16_to_f32(b[j]);
#endif
    return acc;
}

#endif
