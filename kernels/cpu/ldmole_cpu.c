/* LD-MoLE mixture of one projection group, fused on the CPU.
 *
 * For every token row: λ from the λ-network's hidden pre-activations, sparsegen (or softmax) over
 * the router logits of each projection of the group, then only the experts with p > 0:
 *     y[row, cols_i] += (p_e * alpha / r) * B_i,e (A_i,e x_row)
 * written straight into the fused base output. The torch reference is
 * the torch backend (ldmole_runtime/lora/ops/torch_ref.py); tests compare the two.
 *
 * Plain C with OpenMP, no torch headers: built in a second by kernels/cpu_kernels.py, called
 * through ctypes. Entry points here: one set's many tokens (prefill, scoring) in fp32 and in bf16
 * (activations, y and the bank's A and B in bf16; routing inputs and every sum in fp32); units.c
 * has every few-token set of a step in one call (decode; either dtype). The bf16 dot products use
 * AVX512-BF16's dpbf16 where the CPU has it (the build is -march=native), else widen to fp32.
 */
#include "common.h"
#include "routing.h"

/* 1 when dpbf16 computes the bf16 dot products in this build (reported to Python) */
int ldmole_has_dpbf16(void) {
#ifdef LDMOLE_DPBF16
    return 1;
#else
    return 0;
#endif
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

/* Router logits [n, ER] of tokens [0, n) from ER bf16 router rows (expert-major, as the bank stores
 * them), summed in fp32, four tokens by four rows per tile; shared among the enclosing threads. */
static void router_logits_bf16(int n, const int64_t *rows, const bf16 *x, int x_stride, int in,
                               const bf16 *router, int ER, float *logits) {
#pragma omp for schedule(static)
    for (int tb = 0; tb < (n + 3) / 4; tb++) {
        const int t0 = tb * 4, nt = n - t0 < 4 ? n - t0 : 4;
        const bf16 *xt[4];
        for (int b = 0; b < 4; b++) xt[b] = x + (rows ? rows[t0 + (b < nt ? b : 0)] : t0 + (b < nt ? b : 0)) * (int64_t)x_stride;
        for (int q = 0; q < ER; q += 4) {
            const bf16 *w[4];
            float s[16];
            for (int a = 0; a < 4; a++) w[a] = router + (int64_t)(q + a < ER ? q + a : q) * in;
            lam_tile(w, 4, xt, 4, in, s);
            for (int a = 0; a < 4 && q + a < ER; a++)
                for (int b = 0; b < nt; b++) logits[(int64_t)(t0 + b) * ER + q + a] = s[a * 4 + b];
        }
    }
}

/* The same in bf16: x, y, A, B hold bf16; hid, logits (fp32, from BLAS), p and λ are fp32. A
 * token's delta of one projection is summed over its experts in fp32 and added to y with a single
 * rounding. logits NULL: summed here from `router`, the group's bf16 router rows [G, P, in]. */
void ldmole_group_decode_bf16(int n, const int64_t *rows, const bf16 *x, int x_stride, int in,
                              const float *hid, int h, const float *w2, float b2, float eps,
                              const float *logits, int kind, int E, int P,
                              const bf16 *A, int r_max, int r, const bf16 *const *B, int G, int g_offset,
                              const int *outs, const int *cols, const float *mask, float scale,
                              bf16 *y, int y_stride, float *p, float *lam_out, const bf16 *router) {
    int max_out = 0;
    for (int i = 0; i < P; i++) if (outs[i] > max_out) max_out = outs[i];
    float *own = NULL; /* logits summed here from the bank's bf16 router rows, when not given */
    if (!logits && router && kind != ROUTER_SINGLE) logits = own = malloc(sizeof(float) * (size_t)n * E * P);
    if (!logits && kind != ROUTER_SINGLE) return; /* out of memory: y keeps the base output */
#pragma omp parallel if (n > 1)
    {
        if (own) router_logits_bf16(n, rows, x, x_stride, in, router + (int64_t)g_offset * P * in, E * P, own);
        route_tokens(n, hid, h, w2, b2, eps, logits, kind, E, P, mask, p, lam_out);
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
                const bf16 *xt[4];
                float w[4], *at[4];
                int nt = 0;
                for (int t = t0; t <= t1; t++) { /* the expert's tokens, four at a time */
                    if (t < t1) {
                        const float pe = p[((int64_t)t * P + i) * E + e];
                        if (pe <= 0.0f) continue;
                        const int64_t row = rows ? rows[t] : t;
                        xt[nt] = x + row * (int64_t)x_stride;
                        w[nt] = pe * scale;
                        at[nt++] = acc + (int64_t)(t - t0) * out;
                        if (nt < 4) continue;
                    }
                    if (nt) expert_tile_bf16(Ae, Be, xt, nt, in, out, r, w, at);
                    nt = 0;
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
    free(own);
}
