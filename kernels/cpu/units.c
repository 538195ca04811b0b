/* LD-MoLE mixture of one projection group for every few-token set of a step, in one call. The
 * per-set entries and what the kernels compute are described in ldmole_cpu.c. */
#include "common.h"
#include "routing.h"

/* ---- Every few-token set of a step in one call ----------------------------------------------------
 *
 * A decode step holds one or two tokens of each of up to --max-loras sets. One call per set would
 * pay Python's and ctypes' overhead per set and layer and run single-threaded; here a call takes
 * the whole step's list of units (a set's slot and up to UNIT_TOKENS of its tokens), and the
 * threads share out the units. Everything about a set is read from the bank's tables by its slot
 * (kernel_tables.py), as the Triton kernels do, and a unit routes its own tokens: the λ-network's
 * weights and each router row are read once for the unit's tokens, and a small matrix product
 * through BLAS would cost more in calls than the dot products do.
 */
#define UNIT_TOKENS 8

/* the most tokens a unit may hold (cpu.py's UNIT_TOKENS must not exceed it: tested) */
int ldmole_max_unit_tokens(void) {
    return UNIT_TOKENS;
}
#define LAM_CHUNK 32 /* hidden units per work item of the bf16 λ layer */
#define MAX_P 3 /* projections per group (q/k/v) */

/* set_info columns (KernelTables.set_info) */
enum { INFO_OFFSET = 0, INFO_E = 1, INFO_KIND = 2, INFO_RANK = 4, INFO_COLS = 5 };

typedef struct {
    int bf;                       /* 1: x, y, A, B and router hold bf16; 0: fp32 */
    const int64_t *rows;          /* token rows in x and y, in the step's set-sorted order */
    const void *x; int x_stride; int in;
    const int32_t *set_info; const float *scaling; const float *mask; /* [S, 5], [S], [S, P] */
    const float *w1, *b1, *w2, *b2; int H; float eps; /* λ-networks [S, H, in], [S, H], [S, H], [S] */
    const void *router; const void *A; int r_max; const void *const *B;
    const int *outs, *cols; int P; int emax;
    void *y; int y_stride;
    float *p_out, *lam_out;       /* optional: [M, P, emax] and [M], by position in rows */
    const bf16 *const *w1_bf;     /* in bf16, per slot: its λ first layer in bf16 [H_slot, in] */
    float *lam_part; int chunks;  /* [M, chunks] λ sums over LAM_CHUNK hidden units each */
} Units;

/* λ-layer sums of slot s over hidden units [j0, j1) for cnt tokens (rows xr):
 * out[t] += Σ_j relu(b1[j] + w1[j] . x_t) * w2[j]; in bf16 from the slot's bf16 copy of w1 */
static void lambda_range(const Units *u, int s, const void *const *xr, int cnt, int j0, int j1, float *out) {
    const float *b1 = u->b1 + (int64_t)s * u->H, *w2 = u->w2 + (int64_t)s * u->H;
    if (u->bf) {
        lambda_hidden_bf16(u->w1_bf[s], b1, w2, j0, j1, (const bf16 *const *)xr, cnt, u->in, out);
        return;
    }
    for (int j = j0; j < j1; j++) {
        if (w2[j] == 0.0f) continue; /* a padded hidden unit (the slot's H is the bank's widest) */
        const float *w1j = u->w1 + ((int64_t)s * u->H + j) * u->in;
        for (int t = 0; t < cnt; t++) {
            const float a = b1[j] + dot(w1j, (const float *)xr[t], u->in);
            out[t] += (a > 0.0f ? a : 0.0f) * w2[j];
        }
    }
}

/* whether slot s's tokens need λ in this group (a sparsegen router, a λ-network, a projection adapted) */
static int needs_lambda(const Units *u, int s) {
    if (u->set_info[(int64_t)s * INFO_COLS + INFO_KIND] != ROUTER_SPARSEGEN || !u->w1) return 0;
    for (int i = 0; i < u->P; i++) if (u->mask[(int64_t)s * u->P + i] != 0.0f) return 1;
    return 0;
}

/* the rows in x of tokens [start, start + cnt) */
static void unit_rows(const Units *u, int start, int cnt, const void **xr) {
    const size_t esz = u->bf ? sizeof(bf16) : sizeof(float);
    for (int t = 0; t < cnt; t++) {
        const int64_t row = u->rows ? u->rows[start + t] : start + t;
        xr[t] = (const char *)u->x + row * (int64_t)u->x_stride * esz;
    }
}

/* One work item of the λ layer: hidden units [c * LAM_CHUNK, ...) of one unit's tokens, into
 * lam_part[token, c]. Items of all units are shared among the threads before the units are mixed,
 * so that one unit (a single set's decode) still runs on every core. */
static void lambda_chunk(const Units *u, int s, int start, int cnt, int c) {
    if (!needs_lambda(u, s) || cnt < 1 || cnt > UNIT_TOKENS) return;
    const void *xr[UNIT_TOKENS];
    float out[UNIT_TOKENS] = {0};
    unit_rows(u, start, cnt, xr);
    const int j0 = c * LAM_CHUNK, j1 = j0 + LAM_CHUNK < u->H ? j0 + LAM_CHUNK : u->H;
    lambda_range(u, s, xr, cnt, j0, j1, out);
    for (int t = 0; t < cnt; t++) u->lam_part[(int64_t)(start + t) * u->chunks + c] = out[t];
}

/* tokens [start, start + cnt) of `rows`, all of slot s; acc: [UNIT_TOKENS, max_out] scratch */
static void mix_unit(const Units *u, int s, int start, int cnt, float *acc) {
    const int32_t *info = u->set_info + (int64_t)s * INFO_COLS;
    const int off = info[INFO_OFFSET], E = info[INFO_E], kind = info[INFO_KIND], r = info[INFO_RANK];
    const int P = u->P, in = u->in;
    const float *mask = u->mask + (int64_t)s * P;
    int adapted = 0;
    for (int i = 0; i < P; i++) adapted |= mask[i] != 0.0f;
    if (!adapted || E < 1 || E > MAX_E || cnt < 1 || cnt > UNIT_TOKENS) return;
    const size_t esz = u->bf ? sizeof(bf16) : sizeof(float);
    int64_t row[UNIT_TOKENS];
    const void *xr[UNIT_TOKENS];
    unit_rows(u, start, cnt, xr);
    for (int t = 0; t < cnt; t++) row[t] = u->rows ? u->rows[start + t] : start + t;
    float lam[UNIT_TOKENS] = {0};
    if (needs_lambda(u, s)) {
        float v[UNIT_TOKENS];
        for (int t = 0; t < cnt; t++) v[t] = u->b2[s];
        if (u->lam_part) /* lambda_chunk summed its share; add the shares in a fixed order */
            for (int t = 0; t < cnt; t++)
                for (int c = 0; c < u->chunks; c++) v[t] += u->lam_part[(int64_t)(start + t) * u->chunks + c];
        else /* no scratch (out of memory): the unit's own thread, in one pass */
            lambda_range(u, s, xr, cnt, 0, u->H, v);
        for (int t = 0; t < cnt; t++) {
            lam[t] = (v[t] < 0.0f ? v[t] : 0.0f) - log1pf(expf(-fabsf(v[t]))) + (1.0f - u->eps);
            if (u->lam_out) u->lam_out[start + t] = lam[t];
        }
    }
    float logit[UNIT_TOKENS][MAX_E * MAX_P], p[UNIT_TOKENS][MAX_P][MAX_E];
    if (kind != ROUTER_SINGLE && u->bf) { /* tiles of four router rows by (up to) four tokens */
        int q[MAX_E * MAX_P], nq = 0; /* the rows e * P + i of adapted projections */
        for (int e = 0; e < E; e++)
            for (int i = 0; i < P; i++) if (mask[i] != 0.0f) q[nq++] = e * P + i;
        const bf16 *router = (const bf16 *)u->router + (int64_t)off * P * in;
        for (int t0 = 0; t0 < cnt; t0 += 4) {
            const int nt = cnt - t0 < 4 ? cnt - t0 : 4;
            const bf16 *xt[4];
            for (int b = 0; b < 4; b++) xt[b] = (const bf16 *)xr[t0 + (b < nt ? b : 0)];
            for (int a0 = 0; a0 < nq; a0 += 4) {
                const bf16 *w[4];
                float sums[16];
                for (int a = 0; a < 4; a++) w[a] = router + (int64_t)q[a0 + a < nq ? a0 + a : a0] * in;
                lam_tile(w, 4, xt, 4, in, sums);
                for (int a = 0; a < 4 && a0 + a < nq; a++)
                    for (int b = 0; b < nt; b++) logit[t0 + b][q[a0 + a]] = sums[a * 4 + b];
            }
        }
    } else if (kind != ROUTER_SINGLE)
        for (int e = 0; e < E; e++)
            for (int i = 0; i < P; i++) {
                if (mask[i] == 0.0f) continue;
                const char *rr = (const char *)u->router + (((int64_t)(off + e) * P + i) * in) * esz;
                for (int t = 0; t < cnt; t++) logit[t][e * P + i] = dot((const float *)rr, (const float *)xr[t], in);
            }
    for (int t = 0; t < cnt; t++)
        for (int i = 0; i < P; i++) {
            if (mask[i] == 0.0f) for (int e = 0; e < E; e++) p[t][i][e] = 0.0f;
            else if (kind == ROUTER_SPARSEGEN) sparsegen(logit[t] + i, P, lam[t], u->eps, E, p[t][i]);
            else if (kind == ROUTER_SOFTMAX) softmax(logit[t] + i, P, E, p[t][i]);
            else for (int e = 0; e < E; e++) p[t][i][e] = 1.0f;
            if (u->p_out) memcpy(u->p_out + ((int64_t)(start + t) * P + i) * u->emax, p[t][i], sizeof(float) * (size_t)E);
        }
    const float scale = u->scaling[s];
    for (int i = 0; i < P; i++) {
        if (mask[i] == 0.0f) continue;
        const int out = u->outs[i];
        memset(acc, 0, sizeof(float) * (size_t)cnt * (size_t)out);
        for (int e = 0; e < E; e++) {
            const int g = off + e;
            const char *Ae = (const char *)u->A + (((int64_t)g * P + i) * u->r_max) * in * esz;
            const char *Be = (const char *)u->B[i] + (int64_t)g * u->r_max * out * esz;
            if (u->bf) { /* the unit's tokens that chose the expert, as one tile */
                const bf16 *xt[UNIT_TOKENS];
                float w[UNIT_TOKENS], *at[UNIT_TOKENS];
                int nt = 0;
                for (int t = 0; t < cnt; t++)
                    if (p[t][i][e] > 0.0f) {
                        xt[nt] = (const bf16 *)xr[t], w[nt] = p[t][i][e] * scale;
                        at[nt++] = acc + (int64_t)t * out;
                    }
                for (int b = 0; b < nt; b += 4)
                    expert_tile_bf16((const bf16 *)Ae, (const bf16 *)Be, xt + b, nt - b < 4 ? nt - b : 4, in, out, r,
                                     w + b, at + b);
                continue;
            }
            for (int t = 0; t < cnt; t++) {
                const float w = p[t][i][e] * scale;
                if (w <= 0.0f) continue;
                float *ao = acc + (int64_t)t * out;
                for (int k = 0; k < r; k++) {
                    const float hk = dot((const float *)Ae + (int64_t)k * in, (const float *)xr[t], in) * w;
                    const float *Bk = (const float *)Be + (int64_t)k * out;
#pragma omp simd
                    for (int o = 0; o < out; o++) ao[o] += hk * Bk[o];
                }
            }
        }
        for (int t = 0; t < cnt; t++) {
            const float *ao = acc + (int64_t)t * out;
            if (u->bf) {
                bf16 *yo = (bf16 *)u->y + row[t] * (int64_t)u->y_stride + u->cols[i];
#pragma omp simd
                for (int o = 0; o < out; o++) yo[o] = f32_to_bf16(bf16_to_f32(yo[o]) + ao[o]);
            } else {
                float *yo = (float *)u->y + row[t] * (int64_t)u->y_stride + u->cols[i];
#pragma omp simd
                for (int o = 0; o < out; o++) yo[o] += ao[o];
            }
        }
    }
}

/* What a unit call reads of one projection group and the bank's tables: the same for every call
 * until the bank is laid out again, so Python builds it once (kernels/cpu_kernels.py: GroupTables)
 * rather than passing twenty arguments 120 times a step. */
typedef struct {
    int32_t bf, in, H, r_max, P, emax; /* bf16?, fan-in, λ hidden width, rank stride, projections, p's last axis */
    float eps;
    int32_t unused;
    const int32_t *set_info;           /* the bank's tables: [S, 5], [S], [S, P] */
    const float *scaling, *mask;
    const float *w1, *b1, *w2, *b2;    /* λ-networks [S, H, in], [S, H], [S, H], [S] (w1 NULL: none) */
    const void *router, *A;            /* the group's bank tensors */
    const void *const *B;
    const int32_t *outs, *cols;        /* as ldmole_group_decode */
} GroupTables;

/*
 * g            the group and the bank's tables (GroupTables)
 * units        [U, 3] int32: (slot, first position in rows, token count <= UNIT_TOKENS); units hold
 *              disjoint tokens, so threads write disjoint rows of y
 * rows         [M] int64 rows of x and y in the step's set-sorted order (NULL: position = row)
 * p_out, lam_out: optional routing outputs [M, P, emax], [M] (a routing capture)
 * w1_bf        in bf16, per slot, its λ-network's first layer in bf16 [H_slot, in] (needed for every
 *              sparsegen slot of the units); ignored in fp32
 */
void ldmole_group_units(const GroupTables *g, int U, const int32_t *units, const int64_t *rows,
                        const void *x, int x_stride, void *y, int y_stride, float *p_out, float *lam_out,
                        const void *const *w1_bf) {
    const int P = g->P, H = g->H, bf = g->bf;
    const int *outs = g->outs;
    if (P < 1 || P > MAX_P) return; /* cpu.py sends no such group */
    int M = 0;
    for (int k = 0; k < U; k++) if (units[3 * k + 1] + units[3 * k + 2] > M) M = units[3 * k + 1] + units[3 * k + 2];
    const int chunks = (H + LAM_CHUNK - 1) / LAM_CHUNK;
    if (bf && g->w1 && !w1_bf) return; /* cpu.py always sends the bf16 copies with a bf16 λ table */
    float *lam_part = g->w1 && M > 0 ? malloc(sizeof(float) * (size_t)M * (size_t)chunks) : NULL;
    const Units u = {bf, rows, x, x_stride, g->in, g->set_info, g->scaling, g->mask, g->w1, g->b1, g->w2, g->b2,
                     H, g->eps, g->router, g->A, g->r_max, g->B, outs, g->cols, P, g->emax, y, y_stride, p_out,
                     lam_out, (const bf16 *const *)w1_bf, lam_part, chunks};
    int max_out = 0;
    for (int i = 0; i < P; i++) if (outs[i] > max_out) max_out = outs[i];
    const int items = lam_part ? U * chunks : 0;
#pragma omp parallel if (U > 1 || items > 1)
    {
        if (lam_part) {
            /* chunk-major and static: each core reads its own share of the λ weights, the same
             * share every call, and uses it for every unit */
#pragma omp for schedule(static)
            for (int it = 0; it < items; it++) {
                const int k = it % U;
                lambda_chunk(&u, units[3 * k], units[3 * k + 1], units[3 * k + 2], it / U);
            }
        }
        float *acc = malloc(sizeof(float) * UNIT_TOKENS * (size_t)max_out);
#pragma omp for schedule(dynamic, 1)
        for (int k = 0; k < U; k++)
            if (acc) mix_unit(&u, units[3 * k], units[3 * k + 1], units[3 * k + 2], acc);
        free(acc);
    }
    free(lam_part);
}
