/* LD-MoLE mixture of one projection group for a few tokens (decode), fused on the CPU.
 *
 * For every token row: λ from the λ-network's hidden pre-activations, sparsegen (or softmax) over
 * the router logits of each projection of the group, then only the experts with p > 0:
 *     y[row, cols_i] += (p_e * alpha / r) * B_i,e (A_i,e x_row)
 * written straight into the fused base output. The torch reference is
 * ldmole_runtime/lora/mixture.py (route + sparse_expert_delta); tests compare the two.
 *
 * Plain C with OpenMP, no torch headers: built in a second by kernels/cpu_kernels.py, called
 * through ctypes. fp32 only.
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
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
        /* Routing, one token at a time. */
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
        /* Experts, expert-major within each thread's tokens: an expert's A and B are read once
         * for all the tokens that chose it. Threads own disjoint token rows of y. */
        int nthreads = 1, tid = 0;
#ifdef _OPENMP
        nthreads = omp_get_num_threads();
        tid = omp_get_thread_num();
#endif
        const int t0 = (int)((int64_t)n * tid / nthreads), t1 = (int)((int64_t)n * (tid + 1) / nthreads);
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
