/* Decode attention over the paged KV cache: one query token per sequence, on the CPU.
 *
 * For each sequence b and query head h, over the ctx_lens[b] cached positions of its block table:
 *     out[row_b, h] = Σ_p softmax_p(scale · q·k_p) v_p       (k, v of the head's KV head, GQA)
 * reading the keys and values where they lie in the cache, without the gather into a padded batch
 * that torch's scaled_dot_product_attention needs (ldmole_runtime/model/attention.py, the
 * reference the tests compare with). fp32 or bf16 (q, cache and out of one dtype; every sum in
 * fp32, one rounding into out). One program per (sequence, head); softmax in two passes over a
 * per-thread score buffer.
 */
#include "common.h"

/*
 * bf           1: q, the cache and out hold bf16; 0: fp32
 * B, rows      decode sequences and the row of each one's token in q and out
 * q, out       [N, H, D]
 * k_cache, v_cache   one layer's [num_blocks, block_size, H_kv, D]
 * tables       [B, width] block ids; ctx_lens [B] positions to attend (the new token included)
 */
void ldmole_paged_decode(int bf, int B, const int64_t *rows, const void *q, int H, int D,
                         const void *k_cache, const void *v_cache, int block_size, int H_kv,
                         const int64_t *tables, int width, const int64_t *ctx_lens, float scale, void *out) {
    int max_ctx = 0;
    for (int b = 0; b < B; b++) if (ctx_lens[b] > max_ctx) max_ctx = (int)ctx_lens[b];
    const int group = H / H_kv;
    const size_t esz = bf ? sizeof(bf16) : sizeof(float);
#pragma omp parallel if (B * H > 1)
    {
        float *score = malloc(sizeof(float) * (size_t)(max_ctx > 0 ? max_ctx : 1));
        float *qf = malloc(sizeof(float) * (size_t)D), *acc = malloc(sizeof(float) * (size_t)D);
#pragma omp for schedule(static)
        for (int w = 0; w < B * H; w++) {
            if (!score || !qf || !acc) continue;
            const int b = w / H, h = w % H, kvh = h / group;
            const int n = (int)ctx_lens[b];
            const int64_t *table = tables + (int64_t)b * width;
            const char *qr = (const char *)q + ((rows[b] * H + h) * (int64_t)D) * esz;
            for (int d = 0; d < D; d++) qf[d] = bf ? bf16_to_f32(((const bf16 *)qr)[d]) : ((const float *)qr)[d];
            float m = -INFINITY;
            for (int p = 0; p < n; p++) {
                const int64_t at = ((table[p / block_size] * block_size + p % block_size) * H_kv + kvh) * (int64_t)D;
                float s;
                if (bf) {
                    const bf16 *k = (const bf16 *)k_cache + at;
                    s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int d = 0; d < D; d++) s += qf[d] * bf16_to_f32(k[d]);
                } else {
                    s = dot(qf, (const float *)k_cache + at, D);
                }
                score[p] = s * scale;
                if (score[p] > m) m = score[p];
            }
            float total = 0.0f;
            for (int d = 0; d < D; d++) acc[d] = 0.0f;
            for (int p = 0; p < n; p++) {
                const float e = expf(score[p] - m);
                total += e;
                const int64_t at = ((table[p / block_size] * block_size + p % block_size) * H_kv + kvh) * (int64_t)D;
                if (bf) {
                    const bf16 *v = (const bf16 *)v_cache + at;
#pragma omp simd
                    for (int d = 0; d < D; d++) acc[d] += e * bf16_to_f32(v[d]);
                } else {
                    const float *v = (const float *)v_cache + at;
#pragma omp simd
                    for (int d = 0; d < D; d++) acc[d] += e * v[d];
                }
            }
            char *o = (char *)out + ((rows[b] * H + h) * (int64_t)D) * esz;
            const float inv = n > 0 ? 1.0f / total : 0.0f;
            for (int d = 0; d < D; d++) {
                if (bf) ((bf16 *)o)[d] = f32_to_bf16(acc[d] * inv);
                else ((float *)o)[d] = acc[d] * inv;
            }
        }
        free(score);
        free(qf);
        free(acc);
    }
}
