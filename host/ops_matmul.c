/* ops_matmul.c — matmul (torch.matmul semantics: 1-D operands promoted and
 * squeezed, batch dims broadcast) and linear, with their autograd nodes.
 *
 * Operands reach the kernels as 3-D [batch, rows, cols] headers.  A
 * transposed view such as `k:t()` is passed to BLAS as a transposed operand
 * instead of being copied; only layouts BLAS cannot read are made
 * contiguous.  An operand whose batch dims are all 1 is shared by every
 * batch (no copy); one broadcast along some batch dims only is expanded and
 * copied, as PyTorch does. */
#include "ops.h"
#include "ops_common.h"
#include "matmul.h"
#include <string.h>

static int64_t prod(const int64_t *s, int n) {
    int64_t p = 1;
    for (int i = 0; i < n; i++) p *= s[i];
    return p;
}

/* ---- matmul ------------------------------------------------------------- */

enum { SHARED, FULL, EXPANDED };   /* how an operand's batch dims meet the output's */

/* True if t [.., R, C] is the transpose of a contiguous [.., C, R]. */
static bool is_transposed_contiguous(const ml_tensor *t) {
    int nd = t->ndim;
    int64_t R = t->shape[nd - 2], C = t->shape[nd - 1];
    if (R != 1 && t->strides[nd - 2] != 1) return false;
    if (C != 1 && t->strides[nd - 1] != R) return false;
    int64_t expect = R * C;
    for (int i = nd - 3; i >= 0; i--) {
        if (t->shape[i] != 1 && t->strides[i] != expect) return false;
        expect *= t->shape[i];
    }
    return true;
}

/* The kernel operand for t [batch.., R, C] against the output batch dims:
 * a new 3-D header [Bt, R, C] (or [Bt, C, R] with *trans set), *mode set. */
static ml_tensor *matmul_operand(ml_tensor *t, int nbo, const int64_t *bo, bool *trans, int *mode) {
    int nd = t->ndim, nbt = nd - 2;
    int64_t R = t->shape[nd - 2], C = t->shape[nd - 1];
    ml_tensor *src = ml_detach(t);    /* views below must not be recorded */
    if (!src) return NULL;
    if (prod(t->shape, nbt) == 1 && prod(bo, nbo) != 1) *mode = SHARED;
    else {
        /* The same batch, up to leading 1s ([S, R, C] against [1, S, ...]),
         * or a partial broadcast that has to be materialised. */
        *mode = FULL;
        for (int i = 0, off = nbo - nbt; i < nbo; i++)
            if ((i < off ? 1 : t->shape[i - off]) != bo[i]) *mode = EXPANDED;
        if (*mode == EXPANDED) {
            int64_t shape[ML_MAX_DIMS];
            memcpy(shape, bo, (size_t)nbo * sizeof *bo);
            shape[nbo] = R; shape[nbo + 1] = C;
            ml_tensor *e = ml_expand(src, nbo + 2, shape);
            ml_release(src);
            if (!e) return NULL;
            src = e;
        }
    }
    int64_t Bt = *mode == SHARED ? 1 : prod(bo, nbo);
    ml_tensor *out = NULL;
    if (*mode == SHARED) {
        /* Every batch dim has size 1: the offset already points at the matrix. */
        ml_tensor m = *src;
        m.ndim = 2;
        m.shape[0] = R; m.shape[1] = C;
        m.strides[0] = src->strides[nd - 2]; m.strides[1] = src->strides[nd - 1];
        if (ml_is_contiguous(&m) || is_transposed_contiguous(&m)) {
            *trans = !ml_is_contiguous(&m);
            int64_t shape[3] = {1, *trans ? C : R, *trans ? R : C};
            out = ml_header_as(src, 3, shape);
            ml_release(src);
            return out;
        }
    } else if (ml_is_contiguous(src) || is_transposed_contiguous(src)) {
        *trans = !ml_is_contiguous(src);
        int64_t shape[3] = {Bt, *trans ? C : R, *trans ? R : C};
        out = ml_header_as(src, 3, shape);
        ml_release(src);
        return out;
    }
    ml_tensor *c = ml_contiguous(src);
    ml_release(src);
    if (!c) return NULL;
    *trans = false;
    int64_t shape[3] = {Bt, R, C};
    out = ml_header_as(c, 3, shape);
    ml_release(c);
    return out;
}

/* The gradient of one operand from the kernel's gradient in stored layout
 * k [Bt, ., .]: viewed in the operand's logical layout, summed over the
 * broadcast batch dims if the operand was expanded.  i[] = {mode, trans}. */
static ml_tensor *operand_grad(ml_tensor *k, const ml_edge *e, const int64_t *i, int nbo, const int64_t *bo) {
    int mode = (int)i[0];
    bool trans = i[1];
    int nd = mode == EXPANDED ? nbo + 2 : e->ndim;
    int64_t shape[ML_MAX_DIMS], strides[ML_MAX_DIMS];
    if (mode == EXPANDED) memcpy(shape, bo, (size_t)nbo * sizeof *bo);
    else memcpy(shape, e->shape, (size_t)(e->ndim - 2) * sizeof *shape);
    shape[nd - 2] = e->shape[e->ndim - 2];
    shape[nd - 1] = e->shape[e->ndim - 1];
    ml_contiguous_strides(nd, shape, strides);
    if (trans) { strides[nd - 2] = 1; strides[nd - 1] = shape[nd - 2]; }
    ml_tensor *g = ml_from_storage(k->storage, k->offset, nd, shape, strides, k->dtype);
    if (!g || mode != EXPANDED) return g;
    ml_tensor *s = ml_sum_to_shape(g, e->ndim, e->shape);
    ml_release(g);
    return s;
}

/* n->i: [0..1] a's {mode, trans}, [2..3] b's, [4] number of output batch
 * dims, [5..] the output batch shape. */
static int matmul_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_tensor *ka = n->saved[0], *kb = n->saved[1];
    int nbo = (int)n->i[4];
    const int64_t *bo = &n->i[5];
    int64_t gs[3] = {prod(bo, nbo), g->shape[g->ndim - 2], g->shape[g->ndim - 1]};
    int rc = 0;
    ml_tensor *gc = ml_kernel_input(g, &rc);
    ml_tensor *g3 = gc ? ml_header_as(gc, 3, gs) : NULL;
    ml_tensor *da = ml_grad_buffer(n, 0, 3, ka->shape, g, &rc);
    ml_tensor *db = ml_grad_buffer(n, 1, 3, kb->shape, g, &rc);
    if (rc == 0 && !g3) rc = -1;
    if (rc == 0) rc = ML_RUN(g->device, ml_matmul_backward, ML_KT(da), ML_KT(db), ML_KT(g3), ML_KT(ka), ML_KT(kb), n->i[1],
                                 n->i[3]);
    if (rc == 0 && da && !(gin[0] = operand_grad(da, &n->next[0], &n->i[0], nbo, bo))) rc = -1;
    if (rc == 0 && db && !(gin[1] = operand_grad(db, &n->next[1], &n->i[2], nbo, bo))) rc = -1;
    ml_release(gc); ml_release(g3); ml_release(da); ml_release(db);
    return rc;
}

/* Both operands have at least 2 dims. */
static ml_tensor *matmul_nd(ml_tensor *a, ml_tensor *b) {
    char sa[128], sb[128];
    int na = a->ndim, nb = b->ndim;
    if (a->shape[na - 1] != b->shape[nb - 2])
        return ml_error_null("matmul: shapes %s and %s cannot be multiplied (%lld columns vs %lld rows)",
                             ml_shape_str(a, sa, sizeof sa), ml_shape_str(b, sb, sizeof sb),
                             (long long)a->shape[na - 1], (long long)b->shape[nb - 2]);
    int nbo;
    int64_t bo[ML_MAX_DIMS], oshape[ML_MAX_DIMS];
    if (ml_broadcast_shape(na - 2, a->shape, nb - 2, b->shape, &nbo, bo) < 0)
        return ml_error_null("matmul: the batch dims of %s and %s cannot be broadcast together",
                             ml_shape_str(a, sa, sizeof sa), ml_shape_str(b, sb, sizeof sb));
    if (nbo + 2 > ML_MAX_DIMS) return ml_error_null("matmul: result would have more than %d dims", ML_MAX_DIMS);
    memcpy(oshape, bo, (size_t)nbo * sizeof *bo);
    int64_t M = a->shape[na - 2], N = b->shape[nb - 1];
    oshape[nbo] = M; oshape[nbo + 1] = N;

    bool ta = false, tb = false;
    int ma = FULL, mb = FULL;
    ml_tensor *ka = matmul_operand(a, nbo, bo, &ta, &ma);
    ml_tensor *kb = ka ? matmul_operand(b, nbo, bo, &tb, &mb) : NULL;
    ml_tensor *out = kb ? ml_empty(nbo + 2, oshape, a->dtype, a->device) : NULL;
    int64_t s3[3] = {prod(bo, nbo), M, N};
    ml_tensor *o3 = out ? ml_header_as(out, 3, s3) : NULL;
    if (!o3 || ML_RUN(a->device, ml_matmul_forward, ML_KT(o3), ML_KT(ka), ML_KT(kb), ta, tb) < 0) {
        ml_release(ka); ml_release(kb); ml_release(out); ml_release(o3);
        return NULL;
    }
    ml_release(o3);
    ml_tensor *ins[2] = {a, b};
    ml_node *n = ml_node_begin(ML_OP_matmul, matmul_backward, 2, ins);
    if (n) {
        ml_node_save(n, ka);
        ml_node_save(n, kb);
        n->i[0] = ma; n->i[1] = ta; n->i[2] = mb; n->i[3] = tb; n->i[4] = nbo;
        memcpy(&n->i[5], bo, (size_t)nbo * sizeof *bo);
        ml_node_finish(n, out);
    }
    ml_release(ka); ml_release(kb);
    return out;
}

ml_tensor *ml_matmul(ml_tensor *a, ml_tensor *b) {
    char sa[128], sb[128];
    if (ml_check_float("matmul", "first argument", a) < 0 || ml_check_like("matmul", "first argument", a, "second argument", b) < 0)
        return NULL;
    if (a->ndim == 0 || b->ndim == 0)
        return ml_error_null("matmul: both arguments need at least 1 dim (got shapes %s and %s)",
                             ml_shape_str(a, sa, sizeof sa), ml_shape_str(b, sb, sizeof sb));
    if (a->ndim >= 2 && b->ndim >= 2) return matmul_nd(a, b);
    /* 1-D operands: a vector on the left is a row, on the right a column,
     * and the promoted dim is removed from the result. */
    if (a->ndim == 1 && b->ndim == 1 && a->shape[0] != b->shape[0])
        return ml_error_null("matmul: vectors of shapes %s and %s have different lengths",
                             ml_shape_str(a, sa, sizeof sa), ml_shape_str(b, sb, sizeof sb));
    ml_tensor *a2 = a->ndim == 1 ? ml_unsqueeze(a, 0) : ml_retain(a);
    ml_tensor *b2 = b->ndim == 1 ? ml_unsqueeze(b, 1) : ml_retain(b);
    ml_tensor *r = a2 && b2 ? matmul_nd(a2, b2) : NULL;
    ml_release(a2); ml_release(b2);
    if (!r) return NULL;
    int64_t shape[ML_MAX_DIMS];
    int nd = 0;
    for (int i = 0; i < r->ndim; i++) {
        if (i == r->ndim - 2 && a->ndim == 1) continue;
        if (i == r->ndim - 1 && b->ndim == 1) continue;
        shape[nd++] = r->shape[i];
    }
    ml_tensor *o = ml_view(r, nd, shape);
    ml_release(r);
    return o;
}

/* ---- linear ------------------------------------------------------------- */

/* The dtype linear's backward writes input i's gradient in: f32 for a
 * half-precision product on the GPU whose input is autocast's conversion
 * of an f32 tensor (ml_grad_dtype_hint: cuBLASLt accumulates in f32 and
 * writes that, so the f32 parameter's gradient is never rounded to half
 * and widened again by a conversion kernel); else g's dtype. */
static ml_dtype linear_grad_dtype(const ml_node *n, int i, const ml_tensor *g) {
    bool half = g->dtype == ML_BF16 || g->dtype == ML_F16;
    if (!half || g->device.type != ML_CUDA) return g->dtype;
    return ml_grad_dtype_hint(n, i, g->dtype) == ML_F32 ? ML_F32 : g->dtype;
}

/* saved: x as [M, K], w [O, K]. */
static int linear_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_tensor *x2 = n->saved[0], *w = n->saved[1];
    int64_t M = x2->shape[0], O = w->shape[0], gs[2] = {M, O};
    int rc = 0;
    ml_tensor *gc = ml_kernel_input(g, &rc);
    ml_tensor *g2 = gc ? ml_header_as(gc, 2, gs) : NULL;
    ml_tensor *dx = ml_grad_buffer_as(n, 0, 2, x2->shape, linear_grad_dtype(n, 0, g), g->device, &rc);
    ml_tensor *dw = ml_grad_buffer_as(n, 1, 2, w->shape, linear_grad_dtype(n, 1, g), g->device, &rc);
    ml_tensor *db = ml_grad_buffer_as(n, 2, 1, &O, linear_grad_dtype(n, 2, g), g->device, &rc);
    if (rc == 0 && !g2) rc = -1;
    if (rc == 0) rc = ML_RUN(g->device, ml_linear_backward, ML_KT(dx), ML_KT(dw), ML_KT(db), ML_KT(g2), ML_KT(x2), ML_KT(w));
    if (rc == 0 && dx && !(gin[0] = ml_header_as(dx, n->next[0].ndim, n->next[0].shape))) rc = -1;
    if (rc == 0) { gin[1] = dw; gin[2] = db; dw = db = NULL; }
    ml_release(gc); ml_release(g2); ml_release(dx); ml_release(dw); ml_release(db);
    return rc;
}

ml_tensor *ml_linear(ml_tensor *x, ml_tensor *w, ml_tensor *b) {
    char sx[128], sw[128], sb[128];
    if (ml_check_float("linear", "input", x) < 0 || ml_check_like("linear", "input", x, "weight", w) < 0 ||
        ml_check_like("linear", "input", x, "bias", b) < 0)
        return NULL;
    if (w->ndim != 2 || x->ndim < 1 || x->shape[x->ndim - 1] != w->shape[1])
        return ml_error_null("linear: input %s does not fit weight %s (expected input [..., %lld] and weight [out, in])",
                             ml_shape_str(x, sx, sizeof sx), ml_shape_str(w, sw, sizeof sw),
                             (long long)(w->ndim == 2 ? w->shape[1] : -1));
    int64_t O = w->shape[0], K = w->shape[1];
    if (b && (b->ndim != 1 || b->shape[0] != O))
        return ml_error_null("linear: bias %s does not match weight %s (expected [%lld])",
                             ml_shape_str(b, sb, sizeof sb), ml_shape_str(w, sw, sizeof sw), (long long)O);
    int64_t M = prod(x->shape, x->ndim - 1);
    int64_t oshape[ML_MAX_DIMS], xs[2] = {M, K}, os[2] = {M, O};
    memcpy(oshape, x->shape, (size_t)x->ndim * sizeof *oshape);
    oshape[x->ndim - 1] = O;

    int rc = 0;
    ml_tensor *xc = ml_kernel_input(x, &rc), *wc = ml_kernel_input(w, &rc), *bc = ml_kernel_input(b, &rc);
    ml_tensor *x2 = xc ? ml_header_as(xc, 2, xs) : NULL;
    ml_tensor *out = ml_empty(x->ndim, oshape, x->dtype, x->device);
    ml_tensor *o2 = out ? ml_header_as(out, 2, os) : NULL;
    if (rc == 0 && (!x2 || !o2)) rc = -1;
    if (rc == 0) rc = ML_RUN(x->device, ml_linear_forward, ML_KT(o2), ML_KT(x2), ML_KT(wc), ML_KT(bc));
    ml_release(xc); ml_release(bc); ml_release(o2);
    if (rc < 0) { ml_release(x2); ml_release(wc); ml_release(out); return NULL; }
    ml_tensor *ins[3] = {x, w, b};
    ml_node *n = ml_node_begin(ML_OP_linear, linear_backward, 3, ins);
    if (n) {
        ml_node_save(n, x2);
        ml_node_save_input(n, wc, w);
        ml_node_finish(n, out);
    }
    ml_release(x2); ml_release(wc);
    return out;
}
