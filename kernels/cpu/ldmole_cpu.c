/* LD-MoLE mixture of one projection group for a few tokens (decode), fused on the CPU.
 *
 * For every token row: λ from the λ-network's hidden pre-activations, sparsegen (or softmax) over
 * the router logits of each projection of the group, then only the experts with p > 0:
 *     y[row, cols_i] += (p_e * alpha / r) * B_i,e (A_i,e x_row)
 * written straight into the fused base output. The torch reference is
 * ldmole_runtime/lora/mixture.py (route + sparse_expert_delta); tests compare the two.
 *
 * Plain C with OpenMP, no torch headers: built in a second by kernels/cpu_kernels.py, called
 * through ctypes. Two entry points: fp32, and bf16 (activations, y and the bank's A and B in
 * bf16; routing inputs and every sum in fp32). The bf16 dot products use AVX512-BF16's
 * dpbf16 where the CPU has it (the build is -march=native), else widen to fp32 in plain C.
 */
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

#define MAX_E 64
#define MAX_R 256

/* the numbering of RouterKind in router_kinds.py */
enum { ROUTER_SPARSEGEN = 0, ROUTER_SOFTMAX = 1, ROUTER_SINGLE = 2 };

static float dot(const float *a, const float *b, int n) {
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

/* 1 when dpbf16 computes the bf16 dot products in this build (reported to Python) */
int ldmole_has_dpbf16(void) {
#ifdef LDMOLE_DPBF16
    return 1;
#else
    return 0;
#endif
}

static float dot_bf16(const bf16 *a, const bf16 *b, int n) {
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

/* p over E experts from logits u[e * stride]; mirrors routing.sparsegen_lin step by step */
static void sparsegen(const float *u, int stride, float lam, float eps, int E, float *p) {
    float s[MAX_E], c[MAX_E];
    for (int e = 0; e < E; e++) {
        float v = u[e * stride];
        int k = e;
        while (k > 0 && s[k - 1] < v) { s[k] = s[k - 1]; k--; }
        s[k] = v;
    }
    float run = 0.0f;
    for (int k = 0; k < E; k++) { run += s[k]; c[k] = run; }
    int count = 0;
    float one_minus = 1.0f - lam;
    for (int k = 0; k < E; k++)
        if (one_minus + (float)(k + 1) * s[k] > c[k]) count++;
    if (count < 1) count = 1;
    float tau = (c[count - 1] - 1.0f + lam) / (float)count;
    float denom = one_minus > eps ? one_minus : eps;
    for (int e = 0; e < E; e++) {
        float d = u[e * stride] - tau;
        p[e] = (d > 0.0f ? d : 0.0f) / denom;
    }
}

static void softmax(const float *u, int stride, int E, float *p) {
    float m = u[0];
    for (int e = 1; e < E; e++) if (u[e * stride] > m) m = u[e * stride];
    float total = 0.0f;
    for (int e = 0; e < E; e++) { p[e] = expf(u[e * stride] - m); total += p[e]; }
    for (int e = 0; e < E; e++) p[e] /= total;
}

/* Routing of tokens [0, n), shared among the threads of the enclosing parallel region: λ from the
 * λ-network's hidden pre-activations, then p [n, P, E] per projection. */
static void route_tokens(int n, const float *hid, int h, const float *w2, float b2, float eps,
                         const float *logits, int kind, int E, int P, const float *mask, float *p, float *lam_out) {
#pragma omp for schedule(static)
    for (int t = 0; t < n; t++) {
        float lam = 0.0f;
        if (h > 0) {
            const float *hr = hid + (int64_t)t * h;
            float v = b2;
            for (int j = 0; j < h; j++) v += (hr[j] > 0.0f ? hr[j] : 0.0f) * w2[j];
            /* logsigmoid(v) = min(v, 0) - log1p(exp(-|v|)) */
            lam = (v < 0.0f ? v : 0.0f) - log1pf(expf(-fabsf(v))) + (1.0f - eps);
            if (lam_out) lam_out[t] = lam;
        }
        for (int i = 0; i < P; i++) {
            float *pt = p + ((int64_t)t * P + i) * E;
            const float *u = logits + (int64_t)t * E * P + i;
            if (kind == ROUTER_SPARSEGEN) sparsegen(u, P, lam, eps, E, pt);
            else if (kind == ROUTER_SOFTMAX) softmax(u, P, E, pt);
            else for (int e = 0; e < E; e++) pt[e] = 1.0f;
            if (mask && mask[i] == 0.0f) for (int e = 0; e < E; e++) pt[e] = 0.0f;
        }
    }
}

/* this thread's share [t0, t1) of n token rows (threads own disjoint rows of y) */
static void thread_rows(int n, int *t0, int *t1) {
    int nthreads = 1, tid = 0;
#ifdef _OPENMP
    nthreads = omp_get_num_threads();
    tid = omp_get_thread_num();
#endif
    *t0 = (int)((int64_t)n * tid / nthreads);
    *t1 = (int)((int64_t)n * (tid + 1) / nthreads);
}

/*
 * n            tokens of this adapter set in the step
 * rows         [n] row of each token in x and y (NULL: row t is token t)
 * x, x_stride  activations entering the group, [*, in]
 * hid, h       λ-network hidden pre-activations [n, h] (h = 0: the router needs no λ)
 * w2, b2       λ-network output layer
 * logits       router logits [n, E * P], expert-major ([E][P]) as the bank stores routers
 * A            the bank's A [G, P, r_max, in]; this set's experts are g_offset .. g_offset + E - 1
 * B            P pointers to the bank's B_i [G, r_max, out_i]
 * outs, cols   output width and first column of each projection in y
 * mask         [P] 1 for projections this set adapts (NULL: all)
 * y            fused base output [*, y_stride], updated in place
 * p            scratch and output: expert weights [n, P, E]
 * lam_out      optional output: λ [n]
 */
void ldmole_group_decode(int n, const int64_t *rows, const float *x, int x_stride, int in,
                         const float *hid, int h, const float *w2, float b2, float eps,
                         const float *logits, int kind, int E, int P,
                         const float *A, int r_max, int r, const float *const *B, int G, int g_offset,
                         const int *outs, const int *cols, const float *mask, float scale,
                         float *y, int y_stride, float *p, float *lam_out) {
#pragma omp parallel if (n > 1)
    {
        route_tokens(n, hid, h, w2, b2, eps, logits, kind, E, P, mask, p, lam_out);
        /* Experts, expert-major within each thread's tokens: an expert's A and B are read once
         * for all the tokens that chose it. */
        int t0, t1;
        thread_rows(n, &t0, &t1);
        for (int i = 0; i < P; i++) {
            const int out = outs[i];
            for (int e = 0; e < E; e++) {
                const int g = g_offset + e;
                const float *Ae = A + (((int64_t)g * P + i) * r_max) * in;
                const float *Be = B[i] + (int64_t)g * r_max * out;
                for (int t = t0; t < t1; t++) {
                    const float pe = p[((int64_t)t * P + i) * E + e];
                    if (pe <= 0.0f) continue;
                    const int64_t row = rows ? rows[t] : t;
                    const float *xr = x + row * (int64_t)x_stride;
                    float *yo = y + row * (int64_t)y_stride + cols[i];
                    const float w = pe * scale;
                    for (int k = 0; k < r; k++) {
                        const float hk = dot(Ae + (int64_t)k * in, xr, in) * w;
                        const float *Bk = Be + (int64_t)k * out;
#pragma omp simd
                        for (int o = 0; o < out; o++) yo[o] += hk * Bk[o];
                    }
                }
            }
        }
    }
}

/* Routing for the bf16 entry, in fp32: the λ-network's hidden layer and the router logits come
 * either precomputed (hid, logits: BLAS does many tokens best) or are computed here from the
 * fp32 λ-network (w1, b1) and the bank's bf16 router rows, with fp32 sums (a decode step's few
 * tokens: no small matmuls to launch). */
static void route_tokens_bf16(int n, const int64_t *rows, const bf16 *x, int x_stride, int in,
                              const float *hid, const float *w1, const float *b1, int h, const float *w2,
                              float b2, float eps, const float *logits, const bf16 *router, int g_offset,
                              int kind, int E, int P, const float *mask, float *p, float *lam_out) {
    float *xf = (h > 0 && !hid) ? malloc(sizeof(float) * (size_t)in) : NULL;
    float u[MAX_E * 8];
#pragma omp for schedule(static)
    for (int t = 0; t < n; t++) {
        const int64_t row = rows ? rows[t] : t;
        const bf16 *xr = x + row * (int64_t)x_stride;
        float lam = 0.0f;
        if (h > 0) {
            float v = b2;
            if (hid) {
                const float *hr = hid + (int64_t)t * h;
                for (int j = 0; j < h; j++) v += (hr[j] > 0.0f ? hr[j] : 0.0f) * w2[j];
            } else {
                for (int j = 0; j < in; j++) xf[j] = bf16_to_f32(xr[j]);
                for (int j = 0; j < h; j++) {
                    const float a = b1[j] + dot(w1 + (int64_t)j * in, xf, in);
                    v += (a > 0.0f ? a : 0.0f) * w2[j];
                }
            }
            lam = (v < 0.0f ? v : 0.0f) - log1pf(expf(-fabsf(v))) + (1.0f - eps);
            if (lam_out) lam_out[t] = lam;
        }
        const float *ut = logits ? logits + (int64_t)t * E * P : u;
        if (!logits && kind != ROUTER_SINGLE)
            for (int e = 0; e < E; e++)
                for (int i = 0; i < P; i++)
                    u[e * P + i] = dot_bf16(router + ((int64_t)(g_offset + e) * P + i) * in, xr, in);
        for (int i = 0; i < P; i++) {
            float *pt = p + ((int64_t)t * P + i) * E;
            if (kind == ROUTER_SPARSEGEN) sparsegen(ut + i, P, lam, eps, E, pt);
            else if (kind == ROUTER_SOFTMAX) softmax(ut + i, P, E, pt);
            else for (int e = 0; e < E; e++) pt[e] = 1.0f;
            if (mask && mask[i] == 0.0f) for (int e = 0; e < E; e++) pt[e] = 0.0f;
        }
    }
    free(xf);
}

/* The same in bf16: x, y, A, B and the router rows hold bf16; the λ-network, hid, logits, p and λ
 * are fp32. hid (or w1, b1) and logits (or router): see route_tokens_bf16. A token's delta of one
 * projection is summed over its experts in fp32 and added to y with a single rounding. */
void ldmole_group_decode_bf16(int n, const int64_t *rows, const bf16 *x, int x_stride, int in,
                              const float *hid, const float *w1, const float *b1, int h, const float *w2,
                              float b2, float eps, const float *logits, const bf16 *router, int kind, int E, int P,
                              const bf16 *A, int r_max, int r, const bf16 *const *B, int G, int g_offset,
                              const int *outs, const int *cols, const float *mask, float scale,
                              bf16 *y, int y_stride, float *p, float *lam_out) {
    int max_out = 0;
    for (int i = 0; i < P; i++) if (outs[i] > max_out) max_out = outs[i];
    if (E * P > MAX_E * 8) return; /* cpu.py sends no such group (E <= 64 and P <= 3 there) */
#pragma omp parallel if (n > 1)
    {
        route_tokens_bf16(n, rows, x, x_stride, in, hid, w1, b1, h, w2, b2, eps, logits, router, g_offset, kind, E,
                          P, mask, p, lam_out);
        int t0, t1;
        thread_rows(n, &t0, &t1);
        float *acc = t1 > t0 ? malloc(sizeof(float) * (size_t)(t1 - t0) * (size_t)max_out) : NULL;
        for (int i = 0; i < P && acc; i++) {
            if (mask && mask[i] == 0.0f) continue;
            const int out = outs[i];
            memset(acc, 0, sizeof(float) * (size_t)(t1 - t0) * (size_t)out);
            for (int e = 0; e < E; e++) {
                const int g = g_offset + e;
                const bf16 *Ae = A + (((int64_t)g * P + i) * r_max) * in;
                const bf16 *Be = B[i] + (int64_t)g * r_max * out;
                for (int t = t0; t < t1; t++) {
                    const float pe = p[((int64_t)t * P + i) * E + e];
                    if (pe <= 0.0f) continue;
                    const int64_t row = rows ? rows[t] : t;
                    const bf16 *xr = x + row * (int64_t)x_stride;
                    float *ao = acc + (int64_t)(t - t0) * out;
                    const float w = pe * scale;
                    for (int k = 0; k < r; k++) {
                        const float hk = dot_bf16(Ae + (int64_t)k * in, xr, in) * w;
                        const bf16 *Bk = Be + (int64_t)k * out;
#pragma omp simd
                        for (int o = 0; o < out; o++) ao[o] += hk * bf16_to_f32(Bk[o]);
                    }
                }
            }
            for (int t = t0; t < t1; t++) {
                const int64_t row = rows ? rows[t] : t;
                bf16 *yo = y + row * (int64_t)y_stride + cols[i];
                const float *ao = acc + (int64_t)(t - t0) * out;
#pragma omp simd
                for (int o = 0; o < out; o++) yo[o] = f32_to_bf16(bf16_to_f32(yo[o]) + ao[o]);
            }
        }
        free(acc);
    }
}
