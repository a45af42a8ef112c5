/* attention.c — CPU scaled dot-product attention, one (batch, head) and a
 * block of QBLOCK query rows at a time: S = scale q k^T (sgemm straight on
 * the BSHD layout, leading dim H*D), softmax rows, O = P v.  Scratch is a
 * [QBLOCK, Sk] block, never [Sq, Sk]; under the causal mask only the keys
 * some row of the block can see are multiplied.  The backward recomputes P
 * from the saved log-sum-exp (typed row operations in attention_t.h). */
#include "attention.h"
#include "matmul.h"
#include <stdlib.h>
#include <string.h>
#include <tgmath.h>

#define QBLOCK 128

#define ML_TYPED_BODY "attention_t.h"
#include "typed.h"

static void attn_softmax(ml_dtype dt, void *S, int64_t qb, int64_t kc, int64_t i0, bool causal, void *lse) {
    if (dt == ML_F32) attn_softmax_f32(S, qb, kc, i0, causal, lse);
    else attn_softmax_f64(S, qb, kc, i0, causal, lse);
}

static void attn_probs(ml_dtype dt, void *S, int64_t qb, int64_t kc, int64_t i0, bool causal, const void *lse) {
    if (dt == ML_F32) attn_probs_f32(S, qb, kc, i0, causal, lse);
    else attn_probs_f64(S, qb, kc, i0, causal, lse);
}

static void attn_dscores(ml_dtype dt, void *dP, const void *P, int64_t qb, int64_t kc, const void *dO,
                         const void *O, int64_t ld, int64_t Dv) {
    if (dt == ML_F32) attn_dscores_f32(dP, P, qb, kc, dO, O, ld, Dv);
    else attn_dscores_f64(dP, P, qb, kc, dO, O, ld, Dv);
}

typedef struct {
    int64_t B, Sq, Sk, H, D, Dv;
    size_t es;
    ml_dtype dt;
} dims;

static dims get_dims(const ml_ktensor *q, const ml_ktensor *k, const ml_ktensor *v) {
    dims d = {q->shape[0], q->shape[1], k->shape[1], q->shape[2], q->shape[3], v->shape[3],
              ml_dtype_size(q->dtype), q->dtype};
    return d;
}

/* The dtypes the typed row operations are instantiated for. */
static int check_dtype(const char *op, ml_dtype dt) {
    if (dt == ML_F32 || dt == ML_F64) return 0;
    return ml_error("%s: the CPU computes in float32 or float64, not %s", op, ml_dtype_name(dt));
}

/* Bytes of `blocks` score blocks of qb x Sk elements of es bytes, each
 * rounded up to 64, in *bytes.  Sk is not bounded by any tensor's size
 * when the head widths are 0 (k and v are then empty), so the product is
 * checked.  -1 (naming op) when it does not fit in size_t. */
static int score_block_bytes(const char *op, int64_t qb, int64_t Sk, size_t es, size_t blocks, size_t *bytes) {
    size_t n;
    if (__builtin_mul_overflow((size_t)qb, (size_t)Sk, &n) || __builtin_mul_overflow(n, es, &n) ||
        __builtin_add_overflow(n, (size_t)63, &n) || __builtin_mul_overflow(n & ~(size_t)63, blocks, &n) ||
        __builtin_add_overflow(n, (size_t)1, &n))
        return ml_error("%s: a %lld x %lld score block does not fit in memory", op, (long long)qb, (long long)Sk);
    *bytes = n;
    return 0;
}

/* Byte pointer to row s, head h of batch b in a [B, S, H, W] tensor. */
static char *at(const ml_ktensor *t, int64_t b, int64_t s, int64_t h) {
    int64_t S = t->shape[1], H = t->shape[2], W = t->shape[3];
    return (char *)t->data + (size_t)(((b * S + s) * H + h) * W) * ml_dtype_size(t->dtype);
}

/* The keys the block [i0, i0 + qb) can see. */
static int64_t block_keys(const dims *d, int64_t i0, int64_t qb, bool causal) {
    return causal && i0 + qb < d->Sk ? i0 + qb : d->Sk;
}

int ml_sdpa_forward_cpu(ml_ktensor *out, ml_ktensor *lse, const ml_ktensor *q, const ml_ktensor *k,
                        const ml_ktensor *v, bool causal, double scale) {
    if (check_dtype("sdpa", q->dtype) < 0) return -1;
    dims d = get_dims(q, k, v);
    int64_t qbmax = d.Sq < QBLOCK ? d.Sq : QBLOCK;
    size_t bytes = 0;
    if (score_block_bytes("sdpa", qbmax, d.Sk, d.es, 1, &bytes) < 0) return -1;
    char *S = malloc(bytes);
    if (!S) return ml_error("sdpa: out of CPU memory for a %lld x %lld score block", (long long)qbmax, (long long)d.Sk);
    int rc = 0;
    for (int64_t b = 0; b < d.B && rc == 0; b++)
        for (int64_t h = 0; h < d.H && rc == 0; h++)
            for (int64_t i0 = 0; i0 < d.Sq && rc == 0; i0 += qbmax) {
                int64_t qb = d.Sq - i0 < qbmax ? d.Sq - i0 : qbmax, kc = block_keys(&d, i0, qb, causal);
                char *l = (char *)lse->data + (size_t)((b * d.H + h) * d.Sq + i0) * d.es;
                rc = ml_gemm_cpu(d.dt, false, true, qb, kc, d.D, scale, at(q, b, i0, h), d.H * d.D,
                                 at(k, b, 0, h), d.H * d.D, 0, S, kc);
                if (rc == 0) {
                    attn_softmax(d.dt, S, qb, kc, i0, causal, l);
                    rc = ml_gemm_cpu(d.dt, false, false, qb, d.Dv, kc, 1, S, kc, at(v, b, 0, h), d.H * d.Dv,
                                     0, at(out, b, i0, h), d.H * d.Dv);
                }
            }
    free(S);
    return rc;
}

/* dV += P^T dO;  dP = dO V^T;  dS = P (dP - rowsum(dO O));
 * dQ = scale dS K;  dK += scale dS^T Q. */
int ml_sdpa_backward_cpu(ml_ktensor *dq, ml_ktensor *dk, ml_ktensor *dv, const ml_ktensor *dout,
                         const ml_ktensor *q, const ml_ktensor *k, const ml_ktensor *v,
                         const ml_ktensor *out, const ml_ktensor *lse, bool causal, double scale) {
    if (check_dtype("sdpa backward", q->dtype) < 0) return -1;
    dims d = get_dims(q, k, v);
    int64_t qbmax = d.Sq < QBLOCK ? d.Sq : QBLOCK, HD = d.H * d.D, HDv = d.H * d.Dv;
    size_t bytes = 0;
    if (score_block_bytes("sdpa backward", qbmax, d.Sk, d.es, 2, &bytes) < 0) return -1;
    size_t blk = (bytes - 1) / 2;
    char *P = malloc(bytes), *dP = P + blk;
    if (!P) return ml_error("sdpa backward: out of CPU memory for %lld x %lld score blocks",
                            (long long)qbmax, (long long)d.Sk);
    if (dk) memset(dk->data, 0, (size_t)ml_kt_numel(dk) * d.es);
    if (dv) memset(dv->data, 0, (size_t)ml_kt_numel(dv) * d.es);
    int rc = 0;
    for (int64_t b = 0; b < d.B && rc == 0; b++)
        for (int64_t h = 0; h < d.H && rc == 0; h++)
            for (int64_t i0 = 0; i0 < d.Sq && rc == 0; i0 += qbmax) {
                int64_t qb = d.Sq - i0 < qbmax ? d.Sq - i0 : qbmax, kc = block_keys(&d, i0, qb, causal);
                const char *l = (const char *)lse->data + (size_t)((b * d.H + h) * d.Sq + i0) * d.es;
                const char *qp = at(q, b, i0, h), *kp = at(k, b, 0, h), *vp = at(v, b, 0, h);
                const char *gp = at(dout, b, i0, h);
                rc = ml_gemm_cpu(d.dt, false, true, qb, kc, d.D, scale, qp, HD, kp, HD, 0, P, kc);
                if (rc < 0) break;
                attn_probs(d.dt, P, qb, kc, i0, causal, l);
                if (dv && (rc = ml_gemm_cpu(d.dt, true, false, kc, d.Dv, qb, 1, P, kc, gp, HDv, 1,
                                            at(dv, b, 0, h), HDv)) < 0)
                    break;
                if (!dq && !dk) continue;
                rc = ml_gemm_cpu(d.dt, false, true, qb, kc, d.Dv, 1, gp, HDv, vp, HDv, 0, dP, kc);
                if (rc < 0) break;
                attn_dscores(d.dt, dP, P, qb, kc, gp, at(out, b, i0, h), HDv, d.Dv);
                if (dq && (rc = ml_gemm_cpu(d.dt, false, false, qb, d.D, kc, scale, dP, kc, kp, HD, 0,
                                            at(dq, b, i0, h), HD)) < 0)
                    break;
                if (dk)
                    rc = ml_gemm_cpu(d.dt, true, false, kc, d.D, qb, scale, dP, kc, qp, HD, 1, at(dk, b, 0, h), HD);
            }
    free(P);
    return rc;
}
