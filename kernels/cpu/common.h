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

/* One expert's down-projection for one token: h[k] = A[k] . x for its r rank rows (row stride `in`).
 * Four rows at a time share each load of x; every row sums in dot_bf16's order, so h is the same. */
static inline void rank_dots_bf16(const bf16 *A, const bf16 *x, int in, int r, float *h) {
    int k = 0;
#ifdef LDMOLE_DPBF16
    const int body = in & ~31;
    for (; k + 4 <= r; k += 4) {
        const bf16 *a0 = A + (int64_t)k * in, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;
        __m512 v0 = _mm512_setzero_ps(), v1 = v0, v2 = v0, v3 = v0;
        for (int j = 0; j < body; j += 32) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + j);
            v0 = _mm512_dpbf16_ps(v0, (__m512bh)_mm512_loadu_si512(a0 + j), xv);
            v1 = _mm512_dpbf16_ps(v1, (__m512bh)_mm512_loadu_si512(a1 + j), xv);
            v2 = _mm512_dpbf16_ps(v2, (__m512bh)_mm512_loadu_si512(a2 + j), xv);
            v3 = _mm512_dpbf16_ps(v3, (__m512bh)_mm512_loadu_si512(a3 + j), xv);
        }
        float s0 = _mm512_reduce_add_ps(v0), s1 = _mm512_reduce_add_ps(v1);
        float s2 = _mm512_reduce_add_ps(v2), s3 = _mm512_reduce_add_ps(v3);
        for (int j = body; j < in; j++) {
            const float xj = bf16_to_f32(x[j]);
            s0 += bf16_to_f32(a0[j]) * xj;
            s1 += bf16_to_f32(a1[j]) * xj;
            s2 += bf16_to_f32(a2[j]) * xj;
            s3 += bf16_to_f32(a3[j]) * xj;
        }
        h[k] = s0, h[k + 1] = s1, h[k + 2] = s2, h[k + 3] = s3;
    }
#endif
    for (; k < r; k++) h[k] = dot_bf16(A + (int64_t)k * in, x, in);
}

/* Its up-projection: acc[o] += sum over k of h[k] * B[k][o] (row stride `out`). Each 16 outputs
 * stay in a register across all r ranks, so acc is read and written once, not r times. */
static inline void rank_axpy_bf16(const bf16 *B, int out, int r, const float *h, float *acc) {
    int o = 0;
#ifdef LDMOLE_DPBF16
    for (; o + 16 <= out; o += 16) {
        __m512 a = _mm512_loadu_ps(acc + o);
        for (int k = 0; k < r; k++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(B + (int64_t)k * out + o));
            const __m512 b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            a = _mm512_fmadd_ps(_mm512_set1_ps(h[k]), b, a);
        }
        _mm512_storeu_ps(acc + o, a);
    }
#endif
    for (int k = 0; k < r; k++) {
        const bf16 *Bk = B + (int64_t)k * out;
#pragma omp simd
        for (int j = o; j < out; j++) acc[j] += h[k] * bf16_to_f32(Bk[j]);
    }
}

#define RANK_CHUNK 64
/* acc += w * B_e (A_e x): one token through one expert (A_e [r, in], B_e [r, out]), bf16 weights and
 * fp32 sums, RANK_CHUNK ranks at a time. */
static inline void expert_delta_bf16(const bf16 *Ae, const bf16 *Be, const bf16 *x, int in, int out, int r,
                                     float w, float *acc) {
    float h[RANK_CHUNK];
    for (int k0 = 0; k0 < r; k0 += RANK_CHUNK) {
        const int rc = r - k0 < RANK_CHUNK ? r - k0 : RANK_CHUNK;
        rank_dots_bf16(Ae + (int64_t)k0 * in, x, in, rc, h);
        for (int k = 0; k < rc; k++) h[k] *= w;
        rank_axpy_bf16(Be + (int64_t)k0 * out, out, rc, h, acc);
    }
}

/* The λ-network's hidden layer for a few tokens (bf16 weights and activations, fp32 sums):
 * out[t] += Σ_j relu(b1[j] + w1[j] . x_t) * w2[j] over hidden units [j0, j1), for tokens t < cnt.
 * Rows whose w2 is 0 (a slot's padding up to the bank's widest λ-network) are skipped. A tile of R
 * rows and T tokens keeps R * T dpbf16 chains in flight and loads each row and each token once per
 * 32 inputs. */
#ifdef LDMOLE_DPBF16
#define LAM_TILE(R, T)                                                                                        \
    static inline void lam_tile_##R##_##T(const bf16 *const *w, const bf16 *const *x, int in, float *s) {  \
        __m512 v[R][T];                                                                                     \
        for (int a = 0; a < R; a++)                                                                         \
            for (int b = 0; b < T; b++) v[a][b] = _mm512_setzero_ps();                                      \
        for (int k = 0; k < in; k += 32) {                                                                  \
            const __mmask32 m = in - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (in - k)) - 1u); \
            __m512bh xv[T];                                                                                 \
            for (int b = 0; b < T; b++) xv[b] = (__m512bh)_mm512_maskz_loadu_epi16(m, x[b] + k);           \
            for (int a = 0; a < R; a++) {                                                                   \
                const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w[a] + k);                       \
                for (int b = 0; b < T; b++) v[a][b] = _mm512_dpbf16_ps(v[a][b], wv, xv[b]);                 \
            }                                                                                               \
        }                                                                                                   \
        for (int a = 0; a < R; a++)                                                                         \
            for (int b = 0; b < T; b++) s[a * T + b] = _mm512_reduce_add_ps(v[a][b]);                       \
    }
LAM_TILE(8, 1)
LAM_TILE(4, 2)
LAM_TILE(4, 4)
#endif

/* R rows (w) by T tokens (x): s[a * T + b] = w[a] . x[b] */
static inline void lam_tile(const bf16 *const *w, int R, const bf16 *const *x, int T, int in, float *s) {
#ifdef LDMOLE_DPBF16
    if (R == 8 && T == 1) { lam_tile_8_1(w, x, in, s); return; }
    if (R == 4 && T == 2) { lam_tile_4_2(w, x, in, s); return; }
    if (R == 4 && T == 4) { lam_tile_4_4(w, x, in, s); return; }
#endif
    for (int a = 0; a < R; a++)
        for (int b = 0; b < T; b++) s[a * T + b] = dot_bf16(w[a], x[b], in);
}

static inline void lambda_hidden_bf16(const bf16 *w1, const float *b1, const float *w2, int j0, int j1,
                                      const bf16 *const *x, int cnt, int in, float *out) {
    const int R = cnt == 1 ? 8 : 4; /* one token: more rows, to keep as many chains in flight */
    int rows[8], nr = 0;
    for (int j = j0; j <= j1; j++) {
        if (j < j1) {
            if (w2[j] == 0.0f) continue;
            rows[nr++] = j;
            if (nr < R) continue;
        }
        if (nr == 0) break;
        const bf16 *w[8];
        for (int a = 0; a < R; a++) w[a] = w1 + (int64_t)rows[a < nr ? a : 0] * in; /* a short tile repeats row 0 */
        for (int t0 = 0; t0 < cnt; t0 += 4) {
            const int nt = cnt - t0 < 4 ? cnt - t0 : 4, T = R == 8 ? 1 : (nt <= 2 ? nt : 4);
            const bf16 *xt[4];
            float s[8 * 4];
            for (int b = 0; b < T; b++) xt[b] = x[t0 + (b < nt ? b : 0)];
            if (T == 1 && R == 4) { /* tile 4 x 1 is not built: pad to 4 x 2 */
                xt[1] = xt[0];
                lam_tile(w, 4, xt, 2, in, s);
                for (int a = 0; a < 4; a++) s[a] = s[a * 2];
            } else {
                lam_tile(w, R, xt, T, in, s);
            }
            for (int a = 0; a < nr; a++) {
                const int j = rows[a];
                for (int b = 0; b < nt; b++) {
                    const float h = b1[j] + s[a * T + b];
                    out[t0 + b] += (h > 0.0f ? h : 0.0f) * w2[j];
                }
            }
        }
        nr = 0;
    }
}

/* Up to four tokens through one expert, in bf16 with fp32 sums: acc[b] += w[b] * B_e (A_e x_b) for
 * b < nt. The down-projection runs as tiles of four rank rows by the four tokens (lam_tile), the
 * up-projection keeps the tokens' 16 outputs in registers while each B row is widened once for all
 * of them. The same numbers as expert_delta_bf16 per token, summed in another order. */
static inline void expert_tile_bf16(const bf16 *Ae, const bf16 *Be, const bf16 *const *x, int nt, int in,
                                    int out, int r, const float *w, float *const *acc) {
#ifdef LDMOLE_DPBF16
    float h[4][RANK_CHUNK];
    const bf16 *xt[4];
    for (int b = 0; b < 4; b++) xt[b] = x[b < nt ? b : 0];
    for (int k0 = 0; k0 < r; k0 += RANK_CHUNK) {
        const int rc = r - k0 < RANK_CHUNK ? r - k0 : RANK_CHUNK;
        for (int k = 0; k < rc; k += 4) {
            const bf16 *rows[4];
            float s[16];
            for (int a = 0; a < 4; a++) rows[a] = Ae + (int64_t)(k0 + (k + a < rc ? k + a : k)) * in;
            lam_tile(rows, 4, xt, 4, in, s);
            for (int a = 0; a < 4 && k + a < rc; a++)
                for (int b = 0; b < 4; b++) h[b][k + a] = s[a * 4 + b] * w[b < nt ? b : 0];
        }
        const bf16 *Bc = Be + (int64_t)k0 * out;
        int o = 0;
        for (; o + 16 <= out; o += 16) {
            __m512 a0 = _mm512_loadu_ps(acc[0] + o), a1 = a0, a2 = a0, a3 = a0;
            if (nt > 1) a1 = _mm512_loadu_ps(acc[1] + o);
            if (nt > 2) a2 = _mm512_loadu_ps(acc[2] + o);
            if (nt > 3) a3 = _mm512_loadu_ps(acc[3] + o);
            for (int k = 0; k < rc; k++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(Bc + (int64_t)k * out + o));
                const __m512 bv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(h[0][k]), bv, a0);
                a1 = _mm512_fmadd_ps(_mm512_set1_ps(h[1][k]), bv, a1);
                a2 = _mm512_fmadd_ps(_mm512_set1_ps(h[2][k]), bv, a2);
                a3 = _mm512_fmadd_ps(_mm512_set1_ps(h[3][k]), bv, a3);
            }
            _mm512_storeu_ps(acc[0] + o, a0);
            if (nt > 1) _mm512_storeu_ps(acc[1] + o, a1);
            if (nt > 2) _mm512_storeu_ps(acc[2] + o, a2);
            if (nt > 3) _mm512_storeu_ps(acc[3] + o, a3);
        }
        for (int b = 0; b < nt; b++)
            for (int k = 0; k < rc; k++) {
                const bf16 *Bk = Bc + (int64_t)k * out;
                for (int j = o; j < out; j++) acc[b][j] += h[b][k] * bf16_to_f32(Bk[j]);
            }
    }
#else
    for (int b = 0; b < nt; b++) expert_delta_bf16(Ae, Be, x[b], in, out, r, w[b], acc[b]);
#endif
}

#endif
