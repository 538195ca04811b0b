/* Routing of one token over a set's experts, shared by the per-set entries (ldmole_cpu.c) and the
 * unit call (units.c): sparsegen and softmax, in fp32, mirroring ldmole_runtime/lora/routing.py. */
#ifndef LDMOLE_CPU_ROUTING_H
#define LDMOLE_CPU_ROUTING_H
#include "common.h"

#define MAX_E 64
#define MAX_R 256

/* the numbering of RouterKind in router_kinds.py */
enum { ROUTER_SPARSEGEN = 0, ROUTER_SOFTMAX = 1, ROUTER_SINGLE = 2 };

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

#endif
