/* ops_reduce.c — reductions (sum, mean, var, norm over any set of dims;
 * max/argmax along one dim) with their autograd nodes.
 *
 * The kernels (kernels/reduce.h) write the keepdim layout: x's dims
 * with size 1 where reduced.  The result is that buffer viewed with or
 * without the reduced dims; backward views the incoming gradient back in
 * the keepdim layout and broadcasts it over x. */
#include "ops.h"
#include "checked_math.h"
#include "dispatch.h"
#include "ew_common.h"
#include "reduce.h"
#include <math.h>
#include <string.h>

/* Which dims a reduction covers, x's shape in keepdim layout, and the
 * result's shape. */
typedef struct {
    bool red[ML_MAX_DIMS];
    int64_t kshape[ML_MAX_DIMS];
    int ond;
    int64_t oshape[ML_MAX_DIMS];
    int64_t count;                     /* elements reduced into each output */
} red_spec;

static int make_spec(const char *op, const ml_tensor *x, int ndims, const int *dims, bool keepdim,
                     red_spec *s) {
    memset(s, 0, sizeof *s);
    if (ndims < 0 || ndims > ML_MAX_DIMS) return ml_error("%s: bad number of dims %d", op, ndims);
    for (int k = 0; k < ndims; k++) {
        int d = ml_wrap_dim(dims[k], x->ndim);
        if (d < 0) return oc_prefix_error(op);
        if (x->ndim == 0) continue;     /* dim 0 / -1 of a 0-dim tensor: nothing to reduce */
        if (s->red[d]) return ml_error("%s: dim %d appears more than once", op, dims[k]);
        s->red[d] = true;
    }
    if (ndims == 0)
        for (int d = 0; d < x->ndim; d++) s->red[d] = true;
    s->count = 1;
    for (int d = 0; d < x->ndim; d++) {
        s->kshape[d] = s->red[d] ? 1 : x->shape[d];
        if (s->red[d]) s->count *= x->shape[d];
        if (!s->red[d] || keepdim) s->oshape[s->ond++] = s->kshape[d];
    }
    return 0;
}

/* The keepdim buffer k seen with the result's shape (k is contiguous). */
static ml_tensor *result_view(ml_tensor *k, const red_spec *s) {
    return ml_from_storage(k->storage, k->offset, s->ond, s->oshape, NULL, k->dtype);
}

/* The incoming gradient (result's shape) in keepdim layout. */
static ml_tensor *grad_keepdim(ml_tensor *g, int ndim, const int64_t *kshape) {
    return ml_view(g, ndim, kshape);
}

/* Run one of the float reductions: x is cast to the kernel dtype, the
 * keepdim result returned in the compute dtype `ct`.  New reference. */
typedef enum { RED_SUM, RED_VAR, RED_NORM } red_kind;

static ml_tensor *run_reduce(red_kind kind, ml_tensor *x, const red_spec *s, ml_dtype ct, double prm) {
    ml_dtype kt = oc_kernel_dtype(ct, x->device);
    ml_dtype ot = ml_dtype_is_float(kt) ? kt : ML_I64;
    ml_tensor *cx = oc_cast(x, ml_dtype_is_float(kt) ? kt : x->dtype, x->device);
    ml_tensor *k = cx ? ml_empty(x->ndim, s->kshape, ot, x->device) : NULL;
    int rc = -1;
    if (k) {
        switch (kind) {
        case RED_SUM: rc = ML_RUN(x->device, ml_sum, ML_KT(k), ML_KT(cx), prm); break;
        case RED_VAR: rc = ML_RUN(x->device, ml_var, ML_KT(k), ML_KT(cx), prm); break;
        case RED_NORM: rc = ML_RUN(x->device, ml_norm, ML_KT(k), ML_KT(cx), prm); break;
        }
    }
    ml_release(cx);
    if (rc < 0) { ml_release(k); return NULL; }
    if (ot == ct || !ml_dtype_is_float(ct)) return k;
    ml_tensor *c = oc_cast(k, ct, x->device);
    ml_release(k);
    return c;
}

/* Finish a float reduction: the result view, with node n (may be NULL)
 * attached and the keepdim shape stored in n->i. */
static ml_tensor *finish(ml_tensor *k, const red_spec *s, ml_node *n, int ndim) {
    ml_tensor *out = result_view(k, s);
    ml_release(k);
    if (!out) { ml_node_release(n); return NULL; }
    if (n) {
        memcpy(n->i, s->kshape, (size_t)ndim * sizeof *s->kshape);
        ml_node_finish(n, out);
    }
    return out;
}

/* ---- sum / mean --------------------------------------------------------- */

/* i[] = keepdim shape; f[0] = scale (1 for sum, 1/N for mean). */
static int sum_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    const ml_edge *e = &n->next[0];
    ml_tensor *gk = grad_keepdim(g, e->ndim, n->i);
    ml_tensor *gs = gk && n->f[0] != 1.0 ? ml_mul_scalar(gk, n->f[0]) : ml_retain(gk);
    ml_tensor *ge = gs ? ml_expand(gs, e->ndim, e->shape) : NULL;
    ml_release(gk); ml_release(gs);
    if (!ge) return -1;
    gin[0] = oc_grad_for_input(n, 0, ge);
    ml_release(ge);
    return gin[0] ? 0 : -1;
}

static ml_tensor *sum_mean(const char *op, ml_tensor *x, int ndims, const int *dims, bool keepdim, bool mean) {
    if (!x) return ml_error_null("%s: missing tensor", op);
    red_spec s;
    if (make_spec(op, x, ndims, dims, keepdim, &s) < 0) return NULL;
    bool fl = ml_dtype_is_float(x->dtype);
    if (mean && !fl)
        return ml_error_null("mean: needs a float tensor (got %s); convert it first", ml_dtype_name(x->dtype));
    double scale = mean ? 1.0 / (double)s.count : 1.0;
    ml_tensor *k = run_reduce(RED_SUM, x, &s, fl ? x->dtype : ML_I64, scale);
    if (!k) return NULL;
    ml_node *n = fl ? ml_node_begin(mean ? ML_OP_mean : ML_OP_sum, sum_backward, 1, &x) : NULL;
    if (n) n->f[0] = scale;
    return finish(k, &s, n, x->ndim);
}

ml_tensor *ml_sum(ml_tensor *x, int ndims, const int *dims, bool keepdim) {
    return sum_mean("sum", x, ndims, dims, keepdim, false);
}

ml_tensor *ml_mean(ml_tensor *x, int ndims, const int *dims, bool keepdim) {
    return sum_mean("mean", x, ndims, dims, keepdim, true);
}

/* ---- var ---------------------------------------------------------------- */

/* d var / dx = 2 (x - mean) / (N - correction).  saved: x; f[0] = 2/(N-c);
 * i[] keepdim shape; the reduced dims are those where it is 1 and x is not. */
static int var_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    const ml_edge *e = &n->next[0];
    ml_tensor *x = n->saved[0];
    int dims[ML_MAX_DIMS], nd = 0;
    for (int d = 0; d < e->ndim; d++) if (n->i[d] == 1) dims[nd++] = d;
    ml_tensor *m = ml_mean(x, nd, dims, true);
    ml_tensor *c = m ? ml_sub(x, m) : NULL;
    ml_tensor *gk = c ? grad_keepdim(g, e->ndim, n->i) : NULL;
    ml_tensor *t = gk ? ml_mul(c, gk) : NULL;
    ml_tensor *r = t ? ml_mul_scalar(t, n->f[0]) : NULL;
    ml_release(m); ml_release(c); ml_release(gk); ml_release(t);
    if (!r) return -1;
    gin[0] = oc_grad_for_input(n, 0, r);
    ml_release(r);
    return gin[0] ? 0 : -1;
}

ml_tensor *ml_var(ml_tensor *x, int ndims, const int *dims, int correction, bool keepdim) {
    if (!x) return ml_error_null("var: missing tensor");
    if (!ml_dtype_is_float(x->dtype))
        return ml_error_null("var: needs a float tensor (got %s)", ml_dtype_name(x->dtype));
    red_spec s;
    if (make_spec("var", x, ndims, dims, keepdim, &s) < 0) return NULL;
    ml_tensor *k = run_reduce(RED_VAR, x, &s, x->dtype, correction);
    if (!k) return NULL;
    ml_node *n = ml_node_begin(ML_OP_var, var_backward, 1, &x);
    if (n) {
        n->f[0] = 2.0 / fmax(0.0, (double)s.count - correction);
        ml_node_save(n, x);
    }
    return finish(k, &s, n, x->ndim);
}

/* ---- norm --------------------------------------------------------------- */

/* saved: x, the norm in keepdim layout; f[0] = p.
 * d|x|_p / dx = sign(x) |x|^(p-1) / |x|_p^(p-1), and 0 where the norm is 0
 * (PyTorch's choice at the kink). */
static int norm_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    const ml_edge *e = &n->next[0];
    ml_tensor *x = n->saved[0], *nk = n->saved[1];
    double p = n->f[0];
    ml_tensor *gk = grad_keepdim(g, e->ndim, n->i), *r = NULL;
    if (!gk) return -1;
    if (p == 1) {
        ml_tensor *sg = ml_unary(ML_SIGN, x);
        r = sg ? ml_mul(sg, gk) : NULL;
        ml_release(sg);
    } else {
        /* scale = g / norm^(p-1), zeroed where norm == 0 */
        ml_tensor *den = p == 2 ? ml_retain(nk) : ml_pow_scalar(nk, p - 1);
        ml_tensor *q = den ? ml_div(gk, den) : NULL;
        ml_tensor *zm = q ? ml_scalar_op(ML_EQ, nk, 0, false) : NULL;
        ml_tensor *z = zm ? ml_scalar(0, q->dtype, ml_cpu()) : NULL;
        ml_tensor *scale = z ? ml_where(zm, z, q) : NULL;
        ml_tensor *num = NULL;
        if (scale) {
            if (p == 2) num = ml_retain(x);
            else {
                ml_tensor *ax = ml_unary(ML_ABS, x), *pw = ax ? ml_pow_scalar(ax, p - 1) : NULL;
                ml_tensor *sg = pw ? ml_unary(ML_SIGN, x) : NULL;
                num = sg ? ml_mul(sg, pw) : NULL;
                ml_release(ax); ml_release(pw); ml_release(sg);
            }
        }
        r = num ? ml_mul(num, scale) : NULL;
        ml_release(den); ml_release(q); ml_release(zm); ml_release(z); ml_release(scale); ml_release(num);
    }
    ml_release(gk);
    if (!r) return -1;
    gin[0] = oc_grad_for_input(n, 0, r);
    ml_release(r);
    return gin[0] ? 0 : -1;
}

ml_tensor *ml_norm(ml_tensor *x, double p, int ndims, const int *dims, bool keepdim) {
    if (!x) return ml_error_null("norm: missing tensor");
    if (!ml_dtype_is_float(x->dtype))
        return ml_error_null("norm: needs a float tensor (got %s)", ml_dtype_name(x->dtype));
    if (!(p > 0) || !isfinite(p)) return ml_error_null("norm: p must be finite and > 0 (got %g)", p);
    red_spec s;
    if (make_spec("norm", x, ndims, dims, keepdim, &s) < 0) return NULL;
    ml_tensor *k = run_reduce(RED_NORM, x, &s, x->dtype, p);
    if (!k) return NULL;
    ml_node *n = ml_node_begin(ML_OP_norm, norm_backward, 1, &x);
    if (n) {
        n->f[0] = p;
        ml_node_save(n, x);
        ml_node_save(n, k);
    }
    return finish(k, &s, n, x->ndim);
}

/* ---- max / argmax along a dim ------------------------------------------- */

/* saved: indices (keepdim layout); f[0] = dim (i[] holds the keepdim shape).  The gradient goes to the
 * first maximal element: a one-hot mask from comparing positions along
 * dim with the index. */
static int max_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    const ml_edge *e = &n->next[0];
    ml_tensor *idx = n->saved[0];
    int dim = (int)n->f[0];
    ml_tensor *gk = grad_keepdim(g, idx->ndim, idx->shape);
    ml_tensor *pos = gk ? ml_arange(0, (double)e->shape[dim], 1, ML_I64, g->device) : NULL;
    int64_t ps[ML_MAX_DIMS];
    for (int d = 0; d < e->ndim; d++) ps[d] = d == dim ? e->shape[dim] : 1;
    ml_tensor *pv = pos ? ml_view(pos, e->ndim, ps) : NULL;
    ml_tensor *mask = pv ? ml_binary(ML_EQ, pv, idx) : NULL;
    ml_tensor *z = mask ? ml_scalar(0, g->dtype, ml_cpu()) : NULL;
    ml_tensor *r = z ? ml_where(mask, gk, z) : NULL;
    ml_release(gk); ml_release(pos); ml_release(pv); ml_release(mask); ml_release(z);
    if (!r) return -1;
    gin[0] = oc_grad_for_input(n, 0, r);
    ml_release(r);
    return gin[0] ? 0 : -1;
}

/* values and/or indices of the max along dim (values NULL for argmax), the
 * indices counted from index_base, which the kernel adds as it writes
 * them.  The max node saves the indices and compares them with positions
 * from 0, so a call asking for values passes 0. */
static int max_dim(const char *op, ml_tensor *x, int dim, bool keepdim, int64_t index_base, ml_tensor **values,
                   ml_tensor **indices) {
    if (!x) return ml_error("%s: missing tensor", op);
    if (dim == ML_ALL_DIMS || x->ndim == 0) {
        /* over all elements: reduce the flattened tensor */
        int64_t all = -1;
        ml_tensor *flat = ml_view(x, 1, &all);
        if (!flat) return -1;
        int rc = max_dim(op, flat, 0, false, index_base, values, indices);
        ml_release(flat);
        if (rc < 0 || !keepdim || x->ndim == 0) return rc;
        int64_t ones[ML_MAX_DIMS];
        for (int d = 0; d < x->ndim; d++) ones[d] = 1;
        for (int k = 0; k < 2; k++) {
            ml_tensor **t = k ? indices : values;
            if (!t || !*t) continue;
            ml_tensor *v = ml_view(*t, x->ndim, ones);
            ml_release(*t);
            if (!(*t = v)) rc = -1;
        }
        return rc;
    }
    int d = ml_wrap_dim(dim, x->ndim);
    if (d < 0) return oc_prefix_error(op);
    if (x->shape[d] == 0) {
        char b[128];
        return ml_error("%s: cannot reduce dim %d of size 0 (shape %s)", op, dim, ml_shape_str(x, b, sizeof b));
    }
    if (x->dtype == ML_BOOL && values) return ml_error("%s: not supported for bool tensors", op);
    int64_t end;
    if (!ml_add_i64(index_base, x->shape[d], &end))
        return ml_error("%s: index_base %lld is too large for a dim of size %lld", op, (long long)index_base,
                        (long long)x->shape[d]);
    red_spec s;
    if (make_spec(op, x, 1, &d, keepdim, &s) < 0) return -1;
    ml_dtype kt = oc_kernel_dtype(x->dtype, x->device);
    ml_tensor *cx = oc_cast(x, kt, x->device);
    ml_tensor *ik = cx ? ml_empty(x->ndim, s.kshape, ML_I64, x->device) : NULL;
    ml_tensor *vk = ik && values ? ml_empty(x->ndim, s.kshape, kt, x->device) : NULL;
    int rc = -1;
    if (ik && (vk || !values))
        rc = ML_RUN(x->device, ml_max_dim, ML_KT(vk), ML_KT(ik), ML_KT(cx), d, index_base);
    ml_release(cx);
    if (rc == 0 && vk && kt != x->dtype) {
        ml_tensor *c = oc_cast(vk, x->dtype, x->device);
        ml_release(vk);
        if (!(vk = c)) rc = -1;
    }
    if (rc < 0) { ml_release(ik); ml_release(vk); return -1; }
    if (indices && !(*indices = result_view(ik, &s))) rc = -1;
    if (values && rc == 0) {
        ml_node *n = ml_dtype_is_float(x->dtype) ? ml_node_begin(ML_OP_max, max_backward, 1, &x) : NULL;
        if (n) {
            n->f[0] = d;
            ml_node_save(n, ik);
        }
        *values = finish(ml_retain(vk), &s, n, x->ndim);
        if (!*values) rc = -1;
    }
    ml_release(ik);
    ml_release(vk);
    return rc;
}

ml_tensor *ml_max(ml_tensor *x, int dim, bool keepdim) {
    ml_tensor *v = NULL;
    if (max_dim("max", x, dim, keepdim, 0, &v, NULL) < 0) { ml_release(v); return NULL; }
    return v;
}

ml_tensor *ml_argmax(ml_tensor *x, int dim, bool keepdim) { return ml_argmax_ex(x, dim, keepdim, 0); }

ml_tensor *ml_argmax_ex(ml_tensor *x, int dim, bool keepdim, int64_t index_base) {
    ml_tensor *i = NULL;
    if (max_dim("argmax", x, dim, keepdim, index_base, NULL, &i) < 0) { ml_release(i); return NULL; }
    return i;
}
