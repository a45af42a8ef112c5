/* ops_index.c — indexing and joining ops with their autograd nodes:
 * embedding, cat, stack, gather, index_select and NHWC nearest upsampling.
 *
 * cat/stack copy each input into a slice of the output with ml_copy_, so
 * they take any dtype, any strides and any device without a kernel of their
 * own; their backward hands each input the matching slice of the gradient.
 * The others dispatch to kernels (kernels/cpu/index.c, upsample.c). */
#include "ops.h"
#include "ops_common.h"
#include "index.h"
#include "upsample.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- embedding ---------------------------------------------------------- */

/* saved: ids flattened to [n]. */
static int embedding_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_tensor *ids = n->saved[0];
    int rc = 0;
    int64_t D = n->next[0].shape[1], gs[2] = {ml_numel(ids), D};
    ml_tensor *gc = ml_kernel_input(g, &rc);
    ml_tensor *g2 = gc ? ml_header_as(gc, 2, gs) : NULL;
    ml_tensor *dw = ml_grad_buffer(n, 0, 2, n->next[0].shape, g, &rc);
    if (rc == 0 && !g2) rc = -1;
    if (rc == 0) rc = ML_RUN(g->device, ml_embedding_backward, ML_KT(dw), ML_KT(g2), ML_KT(ids));
    ml_release(gc); ml_release(g2);
    if (rc < 0) { ml_release(dw); return -1; }
    gin[0] = dw;
    return 0;
}

ml_tensor *ml_embedding(ml_tensor *weight, ml_tensor *ids) {
    char sw[128];
    if (ml_check_float("embedding", "weight", weight) < 0 || ml_check_index("embedding", "ids", ids, weight) < 0)
        return NULL;
    if (weight->ndim != 2)
        return ml_error_null("embedding: weight %s must be [num_embeddings, dim]", ml_shape_str(weight, sw, sizeof sw));
    if (ids->ndim + 1 > ML_MAX_DIMS) return ml_error_null("embedding: ids have too many dims (%d)", ids->ndim);
    int64_t n = ml_numel(ids), D = weight->shape[1], oshape[ML_MAX_DIMS], s2[2] = {n, D};
    memcpy(oshape, ids->shape, (size_t)ids->ndim * sizeof *oshape);
    oshape[ids->ndim] = D;
    int rc = 0;
    ml_tensor *wc = ml_kernel_input(weight, &rc), *ic = ml_kernel_input(ids, &rc);
    ml_tensor *flat = ic ? ml_header_as(ic, 1, &n) : NULL;
    ml_tensor *out = ml_empty(ids->ndim + 1, oshape, weight->dtype, weight->device);
    ml_tensor *o2 = out ? ml_header_as(out, 2, s2) : NULL;
    if (rc == 0 && (!flat || !o2)) rc = -1;
    if (rc == 0) rc = ML_RUN(weight->device, ml_embedding_forward, ML_KT(o2), ML_KT(wc), ML_KT(flat));
    ml_release(wc); ml_release(ic); ml_release(o2);
    if (rc < 0) { ml_release(flat); ml_release(out); return NULL; }
    ml_node *nd = ml_node_begin(ML_OP_embedding, embedding_backward, 1, &weight);
    if (nd) { ml_node_save(nd, flat); ml_node_finish(nd, out); }
    ml_release(flat);
    return out;
}

/* ---- cat / stack -------------------------------------------------------- */

/* i[0..n) the inputs' sizes along dim, i[ML_NODE_MAX_INPUTS] the dim. */
static int cat_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    int dim = (int)n->i[ML_NODE_MAX_INPUTS];
    int64_t off = 0;
    for (int k = 0; k < n->n_inputs; k++) {
        if (ml_node_needs_grad(n, k) && !(gin[k] = ml_narrow(g, dim, off, n->i[k]))) return -1;
        off += n->i[k];
    }
    return 0;
}

ml_tensor *ml_cat(int n, ml_tensor *const *ts, int dim) {
    char s0[128], sk[128];
    if (n < 1) return ml_error_null("cat: expected at least one tensor");
    ml_tensor *t0 = ts[0];
    if (t0->ndim == 0) return ml_error_null("cat: zero-dimensional tensors cannot be concatenated");
    if ((dim = ml_wrap_dim(dim, t0->ndim)) < 0) return NULL;
    int64_t total = 0;
    for (int k = 0; k < n; k++) {
        ml_tensor *t = ts[k];
        char what[32];
        snprintf(what, sizeof what, "tensor %d", k + 1);
        if (ml_check_like("cat", "tensor 1", t0, what, t) < 0) return NULL;
        bool fits = t->ndim == t0->ndim;
        for (int d = 0; fits && d < t->ndim; d++) fits = d == dim || t->shape[d] == t0->shape[d];
        if (!fits)
            return ml_error_null("cat: tensor %d of shape %s does not match tensor 1 of shape %s "
                                 "outside dim %d", k + 1, ml_shape_str(t, sk, sizeof sk),
                                 ml_shape_str(t0, s0, sizeof s0), dim + 1);
        if (!ml_add_i64(total, t->shape[dim], &total))
            return ml_error_null("cat: the sizes along dim %d add up past 2^63 (tensor %d has shape %s)", dim + 1,
                                 k + 1, ml_shape_str(t, sk, sizeof sk));
    }
    /* A node has at most ML_NODE_MAX_INPUTS inputs: join larger lists in
     * groups, then join the groups. */
    if (n > ML_NODE_MAX_INPUTS && ml_any_requires_grad(n, ts)) {
        int ng = (n + ML_NODE_MAX_INPUTS - 1) / ML_NODE_MAX_INPUTS;
        ml_tensor **parts = calloc((size_t)ng, sizeof *parts);
        if (!parts) return ml_error_null("cat: out of CPU memory");
        ml_tensor *out = NULL;
        int k = 0;
        for (; k < ng; k++) {
            int m = n - k * ML_NODE_MAX_INPUTS < ML_NODE_MAX_INPUTS ? n - k * ML_NODE_MAX_INPUTS : ML_NODE_MAX_INPUTS;
            if (!(parts[k] = ml_cat(m, ts + k * ML_NODE_MAX_INPUTS, dim))) break;
        }
        if (k == ng) out = ml_cat(ng, parts, dim);
        for (k = 0; k < ng; k++) ml_release(parts[k]);
        free(parts);
        return out;
    }
    int64_t shape[ML_MAX_DIMS];
    memcpy(shape, t0->shape, (size_t)t0->ndim * sizeof *shape);
    shape[dim] = total;
    ml_tensor *out = ml_empty(t0->ndim, shape, t0->dtype, t0->device);
    if (!out) return NULL;
    int64_t off = 0;
    for (int k = 0; k < n; k++) {
        ml_tensor *slice = ml_narrow(out, dim, off, ts[k]->shape[dim]);
        int rc = slice ? ml_copy_(slice, ts[k]) : -1;
        ml_release(slice);
        if (rc < 0) { ml_release(out); return NULL; }
        off += ts[k]->shape[dim];
    }
    ml_node *nd = ml_node_begin(ML_OP_cat, cat_backward, n, ts);
    if (nd) {
        for (int k = 0; k < n; k++) nd->i[k] = ts[k]->shape[dim];
        nd->i[ML_NODE_MAX_INPUTS] = dim;
        ml_node_finish(nd, out);
    }
    return out;
}

ml_tensor *ml_stack(int n, ml_tensor *const *ts, int dim) {
    char s0[128], sk[128];
    if (n < 1) return ml_error_null("stack: expected at least one tensor");
    for (int k = 1; k < n; k++)
        if (!ml_same_shape(ts[k], ts[0]))
            return ml_error_null("stack: tensor %d of shape %s differs from tensor 1 of shape %s", k + 1,
                                 ml_shape_str(ts[k], sk, sizeof sk), ml_shape_str(ts[0], s0, sizeof s0));
    if (dim < 0) dim += ts[0]->ndim + 1;
    if (dim < 0 || dim > ts[0]->ndim)
        return ml_error_null("stack: dim %d out of range for tensors with %d dims", dim, ts[0]->ndim);
    ml_tensor **u = calloc((size_t)n, sizeof *u);
    if (!u) return ml_error_null("stack: out of CPU memory");
    ml_tensor *out = NULL;
    int k = 0;
    for (; k < n; k++) if (!(u[k] = ml_unsqueeze(ts[k], dim))) break;
    if (k == n) out = ml_cat(n, u, dim);
    for (k = 0; k < n; k++) ml_release(u[k]);
    free(u);
    return out;
}

/* ---- gather / index_select ---------------------------------------------- */

/* The kernels take the index as the caller counts it (from index_base, 1
 * from Lua) and subtract the base as they read it, so no pass shifts it
 * first.  They report a bad index in the caller's base, counting positions
 * and dim ranges from index_base: that needs base + size and base + count
 * to fit in int64, which this checks. */
static int check_index_base(const char *op, int64_t index_base, int64_t size, int64_t count) {
    int64_t end;
    if (!ml_add_i64(index_base, size, &end) || !ml_add_i64(index_base, count, &end))
        return ml_error("%s: index_base %lld is too large for a dim of size %lld and %lld indices", op,
                        (long long)index_base, (long long)size, (long long)count);
    return 0;
}

/* saved: the index (contiguous, as the caller counts it); i[0] the dim,
 * i[1] the index_base. */
static int gather_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    int rc = 0;
    ml_tensor *gc = ml_kernel_input(g, &rc);
    ml_tensor *dx = ml_grad_buffer(n, 0, n->next[0].ndim, n->next[0].shape, g, &rc);
    if (rc == 0)
        rc = ML_RUN(g->device, ml_gather_backward, ML_KT(dx), ML_KT(gc), (int)n->i[0], ML_KT(n->saved[0]), n->i[1]);
    ml_release(gc);
    if (rc < 0) { ml_release(dx); return -1; }
    gin[0] = dx;
    return 0;
}

ml_tensor *ml_gather_ex(ml_tensor *x, int dim, ml_tensor *index, int64_t index_base) {
    char sx[128], si[128];
    if (ml_check_index("gather", "index", index, x) < 0) return NULL;
    if (x->ndim == 0) return ml_error_null("gather: the input needs at least one dim");
    if ((dim = ml_wrap_dim(dim, x->ndim)) < 0) return NULL;
    bool fits = index->ndim == x->ndim;
    for (int d = 0; fits && d < x->ndim; d++) fits = d == dim || index->shape[d] <= x->shape[d];
    if (!fits)
        return ml_error_null("gather: index %s does not fit input %s (same number of dims, no larger "
                             "outside dim %d)", ml_shape_str(index, si, sizeof si), ml_shape_str(x, sx, sizeof sx), dim + 1);
    if (check_index_base("gather", index_base, x->shape[dim], ml_numel(index)) < 0) return NULL;
    int rc = 0;
    ml_tensor *xc = ml_kernel_input(x, &rc), *ic = ml_kernel_input(index, &rc);
    ml_tensor *out = rc == 0 ? ml_empty(index->ndim, index->shape, x->dtype, x->device) : NULL;
    if (!out || ML_RUN(x->device, ml_gather_forward, ML_KT(out), ML_KT(xc), dim, ML_KT(ic), index_base) < 0) rc = -1;
    ml_release(xc);
    if (rc < 0) { ml_release(ic); ml_release(out); return NULL; }
    ml_node *n = ml_node_begin(ML_OP_gather, gather_backward, 1, &x);
    if (n) { ml_node_save(n, ic); n->i[0] = dim; n->i[1] = index_base; ml_node_finish(n, out); }
    ml_release(ic);
    return out;
}

ml_tensor *ml_gather(ml_tensor *x, int dim, ml_tensor *index) { return ml_gather_ex(x, dim, index, 0); }

/* saved: the index [n] (as the caller counts it); i[0] the dim, i[1] the
 * index_base. */
static int index_select_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    int rc = 0;
    ml_tensor *gc = ml_kernel_input(g, &rc);
    ml_tensor *dx = ml_grad_buffer(n, 0, n->next[0].ndim, n->next[0].shape, g, &rc);
    if (rc == 0) rc = ML_RUN(g->device, ml_index_select_backward, ML_KT(dx), ML_KT(gc), (int)n->i[0],
                                 ML_KT(n->saved[0]), n->i[1]);
    ml_release(gc);
    if (rc < 0) { ml_release(dx); return -1; }
    gin[0] = dx;
    return 0;
}

ml_tensor *ml_index_select_ex(ml_tensor *x, int dim, ml_tensor *index, int64_t index_base) {
    char si[128];
    if (ml_check_index("index_select", "index", index, x) < 0) return NULL;
    if (x->ndim == 0) return ml_error_null("index_select: the input needs at least one dim");
    if ((dim = ml_wrap_dim(dim, x->ndim)) < 0) return NULL;
    if (index->ndim > 1)
        return ml_error_null("index_select: index must be 1-D (got shape %s)", ml_shape_str(index, si, sizeof si));
    int64_t m = ml_numel(index), shape[ML_MAX_DIMS];
    memcpy(shape, x->shape, (size_t)x->ndim * sizeof *shape);
    shape[dim] = m;
    if (check_index_base("index_select", index_base, x->shape[dim], m) < 0) return NULL;
    int rc = 0;
    ml_tensor *xc = ml_kernel_input(x, &rc), *ic = ml_kernel_input(index, &rc);
    ml_tensor *flat = ic ? ml_header_as(ic, 1, &m) : NULL;
    ml_tensor *out = rc == 0 ? ml_empty(x->ndim, shape, x->dtype, x->device) : NULL;
    if (!out || !flat ||
        ML_RUN(x->device, ml_index_select_forward, ML_KT(out), ML_KT(xc), dim, ML_KT(flat), index_base) < 0)
        rc = -1;
    ml_release(xc); ml_release(ic);
    if (rc < 0) { ml_release(flat); ml_release(out); return NULL; }
    ml_node *n = ml_node_begin(ML_OP_index_select, index_select_backward, 1, &x);
    if (n) { ml_node_save(n, flat); n->i[0] = dim; n->i[1] = index_base; ml_node_finish(n, out); }
    ml_release(flat);
    return out;
}

ml_tensor *ml_index_select(ml_tensor *x, int dim, ml_tensor *index) { return ml_index_select_ex(x, dim, index, 0); }

/* ---- upsample_nearest2d ------------------------------------------------- */

/* i[0] the scale. */
static int upsample_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    int rc = 0;
    ml_tensor *gc = ml_kernel_input(g, &rc);
    ml_tensor *dx = ml_grad_buffer(n, 0, 4, n->next[0].shape, g, &rc);
    if (rc == 0) rc = ML_RUN(g->device, ml_upsample_nearest2d_backward, ML_KT(dx), ML_KT(gc), (int)n->i[0]);
    ml_release(gc);
    if (rc < 0) { ml_release(dx); return -1; }
    gin[0] = dx;
    return 0;
}

ml_tensor *ml_upsample_nearest2d(ml_tensor *x, int scale) {
    char sx[128];
    if (x->ndim != 4)
        return ml_error_null("upsample_nearest2d: input %s must be NHWC [N, H, W, C]", ml_shape_str(x, sx, sizeof sx));
    if (scale < 1) return ml_error_null("upsample_nearest2d: scale must be a positive integer (got %d)", scale);
    int64_t shape[4] = {x->shape[0], 0, 0, x->shape[3]};
    if (!ml_mul_i64(x->shape[1], scale, &shape[1]) || !ml_mul_i64(x->shape[2], scale, &shape[2]))
        return ml_error_null("upsample_nearest2d: input %s scaled by %d is too large", ml_shape_str(x, sx, sizeof sx),
                             scale);
    int rc = 0;
    ml_tensor *xc = ml_kernel_input(x, &rc);
    ml_tensor *out = rc == 0 ? ml_empty(4, shape, x->dtype, x->device) : NULL;
    if (!out || ML_RUN(x->device, ml_upsample_nearest2d_forward, ML_KT(out), ML_KT(xc), scale) < 0) rc = -1;
    ml_release(xc);
    if (rc < 0) { ml_release(out); return NULL; }
    ml_node *n = ml_node_begin(ML_OP_upsample_nearest2d, upsample_backward, 1, &x);
    if (n) { n->i[0] = scale; ml_node_finish(n, out); }
    return out;
}
