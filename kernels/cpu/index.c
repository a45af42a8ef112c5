/* index.c — CPU embedding, gather and index_select.  Forwards are plain
 * copies (rows for embedding, contiguous inner blocks for index_select);
 * backwards add into a zeroed gradient, so repeated indices accumulate.
 * Gather and index_select subtract the caller's index_base as they read
 * each index, after one pass has checked them all. */
#include "index.h"
#include <string.h>

static int64_t index_at(const ml_ktensor *t, int64_t i) {
    return t->dtype == ML_I32 ? ((const int32_t *)t->data)[i] : ((const int64_t *)t->data)[i];
}

/* Whether v names one of `size` positions counted from base.  The
 * difference is taken in uint64_t, where it is exact once v >= base. */
static bool in_range(int64_t v, int64_t base, int64_t size) {
    return v >= base && (uint64_t)v - (uint64_t)base < (uint64_t)size;
}

/* The 0-based position index[i] names, once require_in_range has passed. */
static int64_t position_at(const ml_ktensor *t, int64_t i, int64_t base) {
    return (int64_t)((uint64_t)index_at(t, i) - (uint64_t)base);
}

/* -1 naming the first index outside base..base+size-1: the values are
 * data, which only the kernel sees (the host checked everything else). */
static int require_in_range(const char *op, const ml_ktensor *index, int64_t size, int64_t base, const char *what) {
    int64_t n = ml_kt_numel(index);
    for (int64_t i = 0; i < n; i++) {
        int64_t v = index_at(index, i);
        if (!in_range(v, base, size)) return ml_index_range_error(op, v, i, what, size, base);
    }
    return 0;
}

/* dst[0..n) += src[0..n) for float32/float64. */
static void add_run(ml_dtype dt, void *dst, const void *src, int64_t n) {
    if (dt == ML_F32) { float *d = dst; const float *s = src; for (int64_t i = 0; i < n; i++) d[i] += s[i]; }
    else { double *d = dst; const double *s = src; for (int64_t i = 0; i < n; i++) d[i] += s[i]; }
}

static int require_cpu_float(const char *op, const ml_ktensor *g) {
    if (g->dtype != ML_F32 && g->dtype != ML_F64)
        return ml_error("%s backward: the CPU computes in float32 or float64, not %s", op, ml_dtype_name(g->dtype));
    return 0;
}

static int64_t prod_range(const ml_ktensor *t, int from, int to) {
    int64_t p = 1;
    for (int i = from; i < to; i++) p *= t->shape[i];
    return p;
}

/* ---- embedding ---------------------------------------------------------- */

int ml_embedding_forward_cpu(ml_ktensor *out, const ml_ktensor *weight, const ml_ktensor *ids) {
    int64_t V = weight->shape[0], D = weight->shape[1], n = ml_kt_numel(ids);
    if (require_in_range("embedding", ids, V, 0, "a vocabulary of") < 0) return -1;
    size_t row = (size_t)D * ml_dtype_size(weight->dtype);
    for (int64_t i = 0; i < n; i++)
        memcpy((char *)out->data + (size_t)i * row, (const char *)weight->data + (size_t)index_at(ids, i) * row, row);
    return 0;
}

int ml_embedding_backward_cpu(ml_ktensor *dweight, const ml_ktensor *dout, const ml_ktensor *ids) {
    if (require_cpu_float("embedding", dweight) < 0 || require_in_range("embedding", ids, dweight->shape[0], 0, "a vocabulary of") < 0)
        return -1;
    int64_t D = dweight->shape[1], n = ml_kt_numel(ids);
    size_t es = ml_dtype_size(dweight->dtype);
    memset(dweight->data, 0, (size_t)ml_kt_numel(dweight) * es);
    for (int64_t i = 0; i < n; i++)
        add_run(dweight->dtype, (char *)dweight->data + (size_t)(index_at(ids, i) * D) * es,
                (const char *)dout->data + (size_t)(i * D) * es, D);
    return 0;
}

/* ---- gather ------------------------------------------------------------- */

/* Calls visit for every element of index (row-major) with the flat offset of
 * the x element it selects. */
static void gather_walk(const ml_ktensor *x, int dim, const ml_ktensor *index, int64_t index_base,
                        void (*visit)(void *ctx, int64_t i, int64_t src), void *ctx) {
    int nd = index->ndim;
    int64_t n = ml_kt_numel(index), xs[ML_MAX_DIMS], pos[ML_MAX_DIMS] = {0}, base = 0;
    ml_kt_contiguous_strides(x->ndim, x->shape, xs);
    for (int64_t i = 0; i < n; i++) {
        visit(ctx, i, base + position_at(index, i, index_base) * xs[dim]);
        for (int d = nd - 1; d >= 0; d--) {
            if (++pos[d] < index->shape[d]) { if (d != dim) base += xs[d]; break; }
            if (d != dim) base -= xs[d] * (index->shape[d] - 1);
            pos[d] = 0;
        }
    }
}

typedef struct { char *dst; const char *src; size_t es; ml_dtype dt; } walk_ctx;

static void gather_copy(void *vc, int64_t i, int64_t src) {
    walk_ctx *c = vc;
    memcpy(c->dst + (size_t)i * c->es, c->src + (size_t)src * c->es, c->es);
}

static void gather_add(void *vc, int64_t i, int64_t src) {
    walk_ctx *c = vc;
    add_run(c->dt, c->dst + (size_t)src * c->es, c->src + (size_t)i * c->es, 1);
}

int ml_gather_forward_cpu(ml_ktensor *out, const ml_ktensor *x, int dim, const ml_ktensor *index,
                          int64_t index_base) {
    if (require_in_range("gather", index, x->shape[dim], index_base, "a dim of size") < 0) return -1;
    walk_ctx c = {out->data, x->data, ml_dtype_size(x->dtype), x->dtype};
    gather_walk(x, dim, index, index_base, gather_copy, &c);
    return 0;
}

int ml_gather_backward_cpu(ml_ktensor *dx, const ml_ktensor *dout, int dim, const ml_ktensor *index,
                           int64_t index_base) {
    if (require_cpu_float("gather", dx) < 0 ||
        require_in_range("gather", index, dx->shape[dim], index_base, "a dim of size") < 0)
        return -1;
    walk_ctx c = {dx->data, dout->data, ml_dtype_size(dx->dtype), dx->dtype};
    memset(c.dst, 0, (size_t)ml_kt_numel(dx) * c.es);
    gather_walk(dx, dim, index, index_base, gather_add, &c);
    return 0;
}

/* ---- index_select ------------------------------------------------------- */

int ml_index_select_forward_cpu(ml_ktensor *out, const ml_ktensor *x, int dim, const ml_ktensor *index,
                                int64_t index_base) {
    int64_t X = x->shape[dim], n = ml_kt_numel(index);
    if (require_in_range("index_select", index, X, index_base, "a dim of size") < 0) return -1;
    int64_t outer = prod_range(x, 0, dim), inner = prod_range(x, dim + 1, x->ndim);
    size_t blk = (size_t)inner * ml_dtype_size(x->dtype);
    const char *src = x->data;
    char *dst = out->data;
    for (int64_t o = 0; o < outer; o++)
        for (int64_t i = 0; i < n; i++) {
            int64_t row = o * X + position_at(index, i, index_base);
            memcpy(dst + (size_t)(o * n + i) * blk, src + (size_t)row * blk, blk);
        }
    return 0;
}

int ml_index_select_backward_cpu(ml_ktensor *dx, const ml_ktensor *dout, int dim, const ml_ktensor *index,
                                 int64_t index_base) {
    int64_t X = dx->shape[dim], n = ml_kt_numel(index);
    if (require_cpu_float("index_select", dx) < 0 ||
        require_in_range("index_select", index, X, index_base, "a dim of size") < 0)
        return -1;
    int64_t outer = prod_range(dx, 0, dim), inner = prod_range(dx, dim + 1, dx->ndim);
    size_t es = ml_dtype_size(dx->dtype);
    memset(dx->data, 0, (size_t)ml_kt_numel(dx) * es);
    for (int64_t o = 0; o < outer; o++)
        for (int64_t i = 0; i < n; i++)
            add_run(dx->dtype, (char *)dx->data + (size_t)((o * X + position_at(index, i, index_base)) * inner) * es,
                    (const char *)dout->data + (size_t)((o * n + i) * inner) * es, inner);
    return 0;
}
