/* ops_nn.c — the NHWC network ops: conv2d, group norm (with fused SiLU),
 * layer norm, softmax / log_softmax and scaled dot-product attention, with
 * their autograd nodes.
 *
 * Each op checks its arguments, hands contiguous inputs to the kernel of
 * the output's device (kernels/cpu, kernels/cuda) and saves what the
 * backward needs: the contiguous inputs, the norms' mean/rstd, softmax's
 * output, attention's output and log-sum-exp. */
#include "ops.h"
#include "ops_common.h"
#include "conv2d.h"
#include "norm.h"
#include "softmax.h"
#include "attention.h"
#include <math.h>
#include <string.h>

/* Statistics (norm mean/rstd, attention log-sum-exp) are kept in float32
 * for every compute dtype but float64. */
static ml_dtype stats_dtype(ml_dtype dt) { return dt == ML_F64 ? ML_F64 : ML_F32; }

/* The gradient kernel tensor g as a tensor of the node input's shape. */
static ml_tensor *as_input_shape(ml_tensor *g, const ml_node *n, int i, int *rc) {
    if (!g || *rc < 0) return NULL;
    ml_tensor *o = ml_header_as(g, n->next[i].ndim, n->next[i].shape);
    if (!o) *rc = -1;
    return o;
}

/* ---- conv2d ------------------------------------------------------------- */

static ml_conv2d_params conv_params(const ml_node *n) {
    ml_conv2d_params p = {(int)n->i[0], (int)n->i[1], (int)n->i[2], (int)n->i[3], (int)n->i[4], (int)n->i[5]};
    return p;
}

/* saved: x, w (contiguous). */
static int conv2d_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_tensor *x = n->saved[0], *w = n->saved[1];
    ml_conv2d_params p = conv_params(n);
    int rc = 0;
    int64_t O = w->shape[0];
    ml_tensor *gc = ml_kernel_input(g, &rc);
    ml_tensor *dx = ml_grad_buffer(n, 0, 4, x->shape, g, &rc);
    ml_tensor *dw = ml_grad_buffer(n, 1, 4, w->shape, g, &rc);
    ml_tensor *db = ml_grad_buffer(n, 2, 1, &O, g, &rc);
    if (rc == 0) rc = ML_RUN(g->device, ml_conv2d_backward, ML_KT(dx), ML_KT(dw), ML_KT(db), ML_KT(gc), ML_KT(x),
                                 ML_KT(w), &p);
    ml_release(gc);
    if (rc < 0) { ml_release(dx); ml_release(dw); ml_release(db); return -1; }
    gin[0] = dx; gin[1] = dw; gin[2] = db;
    return 0;
}

ml_tensor *ml_conv2d_ex(ml_tensor *x, ml_tensor *w, ml_tensor *b, int stride_h, int stride_w,
                        int pad_top, int pad_bottom, int pad_left, int pad_right) {
    char sx[128], sw[128], sb[128];
    if (ml_check_float("conv2d", "input", x) < 0 || ml_check_like("conv2d", "input", x, "weight", w) < 0 ||
        ml_check_like("conv2d", "input", x, "bias", b) < 0)
        return NULL;
    if (x->ndim != 4 || w->ndim != 4 || x->shape[3] != w->shape[3])
        return ml_error_null("conv2d: input %s and weight %s do not fit (expected NHWC input [N, H, W, C] "
                             "and weight [O, kh, kw, C] with the same C)",
                             ml_shape_str(x, sx, sizeof sx), ml_shape_str(w, sw, sizeof sw));
    int64_t N = x->shape[0], H = x->shape[1], W = x->shape[2], O = w->shape[0], kh = w->shape[1], kw = w->shape[2];
    if (b && (b->ndim != 1 || b->shape[0] != O))
        return ml_error_null("conv2d: bias %s does not match weight %s (expected [%lld])",
                             ml_shape_str(b, sb, sizeof sb), ml_shape_str(w, sw, sizeof sw), (long long)O);
    if (stride_h < 1 || stride_w < 1 || pad_top < 0 || pad_bottom < 0 || pad_left < 0 || pad_right < 0)
        return ml_error_null("conv2d: strides must be >= 1 and padding >= 0 (got stride %d,%d padding %d,%d,%d,%d)",
                             stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right);
    if (H + pad_top + pad_bottom < kh || W + pad_left + pad_right < kw)
        return ml_error_null("conv2d: kernel %lldx%lld is larger than the padded input (input %s, padding %d,%d,%d,%d)",
                             (long long)kh, (long long)kw, ml_shape_str(x, sx, sizeof sx),
                             pad_top, pad_bottom, pad_left, pad_right);
    if (kh == 1 && kw == 1 && stride_h == 1 && stride_w == 1 && !pad_top && !pad_bottom && !pad_left && !pad_right) {
        /* In NHWC a 1x1 convolution with stride 1 and no padding is a GEMM
         * over the pixels: out [N, H, W, O] = x [N, H, W, C] . w [O, C]^T + b,
         * and the linear kernels run it (bias in the GEMM's epilogue) several
         * times faster than cuDNN's convolution does at SD's 1x1 shapes
         * (proj_in/proj_out, shortcuts: 0.03-0.04 ms against ~0.2 ms per
         * pass on an H200).  Autograd records a linear node over a view of
         * the weight, so gradients reach w and b as from the convolution. */
        int64_t w2shape[2] = {O, x->shape[3]};
        ml_tensor *w2 = ml_view(w, 2, w2shape);
        if (!w2) return NULL;
        ml_tensor *out = ml_linear(x, w2, b);
        ml_release(w2);
        return out;
    }
    ml_conv2d_params p = {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right};
    int64_t oshape[4] = {N, (H + pad_top + pad_bottom - kh) / stride_h + 1,
                         (W + pad_left + pad_right - kw) / stride_w + 1, O};
    int rc = 0;
    ml_tensor *xc = ml_kernel_input(x, &rc), *wc = ml_kernel_input(w, &rc), *bc = ml_kernel_input(b, &rc);
    ml_tensor *out = rc == 0 ? ml_empty(4, oshape, x->dtype, x->device) : NULL;
    if (!out || ML_RUN(x->device, ml_conv2d_forward, ML_KT(out), ML_KT(xc), ML_KT(wc), ML_KT(bc), &p) < 0) {
        ml_release(xc); ml_release(wc); ml_release(bc); ml_release(out);
        return NULL;
    }
    ml_tensor *ins[3] = {x, w, b};
    ml_node *n = ml_node_begin(ML_OP_conv2d, conv2d_backward, 3, ins);
    if (n) {
        ml_node_save(n, xc);
        ml_node_save_input(n, wc, w);
        int64_t pv[6] = {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right};
        memcpy(n->i, pv, sizeof pv);
        ml_node_finish(n, out);
    }
    ml_release(xc); ml_release(wc); ml_release(bc);
    return out;
}

ml_tensor *ml_conv2d(ml_tensor *x, ml_tensor *w, ml_tensor *b, int stride_h, int stride_w, int pad_h, int pad_w) {
    return ml_conv2d_ex(x, w, b, stride_h, stride_w, pad_h, pad_h, pad_w, pad_w);
}

/* ---- group norm / layer norm -------------------------------------------- */

/* weight / bias of a norm over C channels: NULL or [C]. */
static int check_affine(const char *op, const ml_tensor *x, const ml_tensor *t, const char *arg, int64_t C) {
    if (!t) return 0;
    char sx[128], st[128];
    if (ml_check_like(op, "input", x, arg, t) < 0) return -1;
    if (t->ndim != 1 || t->shape[0] != C)
        return ml_error("%s: %s %s does not match the %lld channels of input %s", op, arg,
                        ml_shape_str(t, st, sizeof st), (long long)C, ml_shape_str(x, sx, sizeof sx));
    return 0;
}

/* saved: x [N, L, C], w, b, mean, rstd; i[0] groups, i[1] fuse_silu. */
static int group_norm_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_tensor *x = n->saved[0], *w = n->saved[1], *b = n->saved[2], *mean = n->saved[3], *rstd = n->saved[4];
    int rc = 0;
    int64_t C = x->shape[2];
    ml_tensor *gc = ml_kernel_input(g, &rc);
    ml_tensor *dx = ml_grad_buffer(n, 0, 3, x->shape, g, &rc);
    ml_tensor *dw = ml_grad_buffer(n, 1, 1, &C, g, &rc);
    ml_tensor *db = ml_grad_buffer(n, 2, 1, &C, g, &rc);
    ml_tensor *gcl = gc ? ml_header_as(gc, 3, x->shape) : NULL;
    if (gc && !gcl) rc = -1;
    if (rc == 0)
        rc = ML_RUN(g->device, ml_group_norm_backward, ML_KT(dx), ML_KT(dw), ML_KT(db), ML_KT(gcl), ML_KT(x),
                    ML_KT(w), ML_KT(b), ML_KT(mean), ML_KT(rstd), (int)n->i[0], n->i[1]);
    gin[0] = as_input_shape(dx, n, 0, &rc);
    ml_release(gc); ml_release(gcl); ml_release(dx);
    if (rc < 0) { ml_release(gin[0]); gin[0] = NULL; ml_release(dw); ml_release(db); return -1; }
    gin[1] = dw; gin[2] = db;
    return 0;
}

ml_tensor *ml_group_norm(ml_tensor *x, int groups, ml_tensor *w, ml_tensor *b, double eps, bool fuse_silu) {
    char sx[128];
    if (ml_check_float("group_norm", "input", x) < 0) return NULL;
    if (x->ndim < 2)
        return ml_error_null("group_norm: input %s needs a batch and a channel dim ([N, ..., C])",
                             ml_shape_str(x, sx, sizeof sx));
    int64_t N = x->shape[0], C = x->shape[x->ndim - 1], L = 1;
    for (int i = 1; i < x->ndim - 1; i++) L *= x->shape[i];
    if (groups < 1 || C % groups)
        return ml_error_null("group_norm: %d groups do not divide the %lld channels of input %s",
                             groups, (long long)C, ml_shape_str(x, sx, sizeof sx));
    if (check_affine("group_norm", x, w, "weight", C) < 0 || check_affine("group_norm", x, b, "bias", C) < 0)
        return NULL;
    int rc = 0;
    int64_t s3[3] = {N, L, C}, sg[2] = {N, groups};
    ml_tensor *xc = ml_kernel_input(x, &rc), *wc = ml_kernel_input(w, &rc), *bc = ml_kernel_input(b, &rc);
    ml_tensor *x3 = xc ? ml_header_as(xc, 3, s3) : NULL;
    ml_tensor *out = ml_empty(x->ndim, x->shape, x->dtype, x->device);
    ml_tensor *o3 = out ? ml_header_as(out, 3, s3) : NULL;
    ml_tensor *mean = ml_empty(2, sg, stats_dtype(x->dtype), x->device);
    ml_tensor *rstd = ml_empty(2, sg, stats_dtype(x->dtype), x->device);
    if (rc == 0 && (!x3 || !o3 || !mean || !rstd)) rc = -1;
    if (rc == 0)
        rc = ML_RUN(x->device, ml_group_norm_forward, ML_KT(o3), ML_KT(mean), ML_KT(rstd), ML_KT(x3), ML_KT(wc),
                    ML_KT(bc), groups, eps, fuse_silu);
    ml_release(xc); ml_release(o3);
    if (rc == 0) {
        ml_tensor *ins[3] = {x, w, b};
        ml_node *n = ml_node_begin(ML_OP_group_norm, group_norm_backward, 3, ins);
        if (n) {
            ml_node_save(n, x3); ml_node_save_input(n, wc, w); ml_node_save_input(n, bc, b);
            ml_node_save(n, mean); ml_node_save(n, rstd);
            n->i[0] = groups; n->i[1] = fuse_silu;
            ml_node_finish(n, out);
        }
    } else {
        ml_release(out);
        out = NULL;
    }
    ml_release(x3); ml_release(wc); ml_release(bc); ml_release(mean); ml_release(rstd);
    return out;
}

/* saved: x [M, C], w, mean, rstd. */
static int layer_norm_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_tensor *x = n->saved[0], *w = n->saved[1], *mean = n->saved[2], *rstd = n->saved[3];
    int rc = 0;
    int64_t C = x->shape[1];
    ml_tensor *gc = ml_kernel_input(g, &rc);
    ml_tensor *dx = ml_grad_buffer(n, 0, 2, x->shape, g, &rc);
    ml_tensor *dw = ml_grad_buffer(n, 1, 1, &C, g, &rc);
    ml_tensor *db = ml_grad_buffer(n, 2, 1, &C, g, &rc);
    ml_tensor *g2 = gc ? ml_header_as(gc, 2, x->shape) : NULL;
    if (gc && !g2) rc = -1;
    if (rc == 0)
        rc = ML_RUN(g->device, ml_layer_norm_backward, ML_KT(dx), ML_KT(dw), ML_KT(db), ML_KT(g2), ML_KT(x),
                    ML_KT(w), ML_KT(mean), ML_KT(rstd));
    gin[0] = as_input_shape(dx, n, 0, &rc);
    ml_release(gc); ml_release(g2); ml_release(dx);
    if (rc < 0) { ml_release(gin[0]); gin[0] = NULL; ml_release(dw); ml_release(db); return -1; }
    gin[1] = dw; gin[2] = db;
    return 0;
}

ml_tensor *ml_layer_norm(ml_tensor *x, ml_tensor *w, ml_tensor *b, double eps) {
    char sx[128];
    if (ml_check_float("layer_norm", "input", x) < 0) return NULL;
    if (x->ndim < 1)
        return ml_error_null("layer_norm: input %s has no dim to normalise", ml_shape_str(x, sx, sizeof sx));
    int64_t C = x->shape[x->ndim - 1], M = C ? ml_numel(x) / C : 0;
    if (C == 0) for (int i = 0; i < x->ndim - 1; i++) M *= x->shape[i];
    if (check_affine("layer_norm", x, w, "weight", C) < 0 || check_affine("layer_norm", x, b, "bias", C) < 0)
        return NULL;
    int rc = 0;
    int64_t s2[2] = {M, C};
    ml_tensor *xc = ml_kernel_input(x, &rc), *wc = ml_kernel_input(w, &rc), *bc = ml_kernel_input(b, &rc);
    ml_tensor *x2 = xc ? ml_header_as(xc, 2, s2) : NULL;
    ml_tensor *out = ml_empty(x->ndim, x->shape, x->dtype, x->device);
    ml_tensor *o2 = out ? ml_header_as(out, 2, s2) : NULL;
    ml_tensor *mean = ml_empty(1, &M, stats_dtype(x->dtype), x->device);
    ml_tensor *rstd = ml_empty(1, &M, stats_dtype(x->dtype), x->device);
    if (rc == 0 && (!x2 || !o2 || !mean || !rstd)) rc = -1;
    if (rc == 0)
        rc = ML_RUN(x->device, ml_layer_norm_forward, ML_KT(o2), ML_KT(mean), ML_KT(rstd), ML_KT(x2), ML_KT(wc),
                    ML_KT(bc), eps);
    ml_release(xc); ml_release(o2); ml_release(bc);
    if (rc == 0) {
        ml_tensor *ins[3] = {x, w, b};
        ml_node *n = ml_node_begin(ML_OP_layer_norm, layer_norm_backward, 3, ins);
        if (n) {
            ml_node_save(n, x2); ml_node_save_input(n, wc, w); ml_node_save(n, mean); ml_node_save(n, rstd);
            ml_node_finish(n, out);
        }
    } else {
        ml_release(out);
        out = NULL;
    }
    ml_release(x2); ml_release(wc); ml_release(mean); ml_release(rstd);
    return out;
}

/* ---- softmax / log_softmax ---------------------------------------------- */

/* saved: the output; i[0] dim, i[1] log. */
static int softmax_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_tensor *y = n->saved[0];
    int rc = 0;
    ml_tensor *gc = ml_kernel_input(g, &rc);
    ml_tensor *dx = ml_grad_buffer(n, 0, y->ndim, y->shape, g, &rc);
    if (rc == 0) rc = ML_RUN(g->device, ml_softmax_backward, ML_KT(dx), ML_KT(gc), ML_KT(y), (int)n->i[0], n->i[1]);
    ml_release(gc);
    if (rc < 0) { ml_release(dx); return -1; }
    gin[0] = dx;
    return 0;
}

static ml_tensor *softmax_op(ml_tensor *x, int dim, bool log) {
    const char *name = log ? "log_softmax" : "softmax";
    if (ml_check_float(name, "input", x) < 0) return NULL;
    if ((dim = ml_wrap_dim(dim, x->ndim)) < 0) return NULL;
    if (x->ndim == 0) dim = 0;
    int rc = 0;
    ml_tensor *xc = ml_kernel_input(x, &rc);
    ml_tensor *out = rc == 0 ? ml_empty(x->ndim, x->shape, x->dtype, x->device) : NULL;
    if (out && x->ndim == 0) {
        /* A single value: softmax 1, log_softmax 0. */
        rc = ml_fill_(out, log ? 0.0 : 1.0);
    } else if (!out || ML_RUN(x->device, ml_softmax_forward, ML_KT(out), ML_KT(xc), dim, log) < 0) rc = -1;
    ml_release(xc);
    if (rc < 0) { ml_release(out); return NULL; }
    ml_node *n = ml_node_begin(log ? ML_OP_log_softmax : ML_OP_softmax, softmax_backward, 1, &x);
    if (n) {
        ml_node_save(n, out);
        n->i[0] = dim; n->i[1] = log;
        ml_node_finish(n, out);
    }
    return out;
}

ml_tensor *ml_softmax(ml_tensor *x, int dim) { return softmax_op(x, dim, false); }
ml_tensor *ml_log_softmax(ml_tensor *x, int dim) { return softmax_op(x, dim, true); }

/* ---- scaled dot-product attention --------------------------------------- */

/* saved: q, k, v (contiguous), out, lse; f[0] scale, i[0] causal.  The
 * saved tensors are the forward's, checked there; the incoming gradient is
 * checked here, since the kernels read it as out's dtype and shape and the
 * gradients they write take its dtype. */
static int sdpa_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_tensor *q = n->saved[0], *k = n->saved[1], *v = n->saved[2], *out = n->saved[3], *lse = n->saved[4];
    if (ml_check_like("sdpa backward", "out", out, "the output's gradient", g) < 0) return -1;
    if (!ml_same_shape(g, out)) {
        char sg[128], so[128];
        return ml_error("sdpa backward: the output's gradient has shape %s, the output %s",
                        ml_shape_str(g, sg, sizeof sg), ml_shape_str(out, so, sizeof so));
    }
    int rc = 0;
    ml_tensor *gc = ml_kernel_input(g, &rc);
    ml_tensor *dq = ml_grad_buffer(n, 0, 4, q->shape, g, &rc);
    ml_tensor *dk = ml_grad_buffer(n, 1, 4, k->shape, g, &rc);
    ml_tensor *dv = ml_grad_buffer(n, 2, 4, v->shape, g, &rc);
    if (rc == 0)
        rc = ML_RUN(g->device, ml_sdpa_backward, ML_KT(dq), ML_KT(dk), ML_KT(dv), ML_KT(gc), ML_KT(q), ML_KT(k),
                    ML_KT(v), ML_KT(out), ML_KT(lse), n->i[0], n->f[0]);
    ml_release(gc);
    if (rc < 0) { ml_release(dq); ml_release(dk); ml_release(dv); return -1; }
    gin[0] = dq; gin[1] = dk; gin[2] = dv;
    return 0;
}

ml_tensor *ml_sdpa(ml_tensor *q, ml_tensor *k, ml_tensor *v, bool causal, double scale) {
    char sq[128], sk[128], sv[128];
    if (ml_check_float("sdpa", "q", q) < 0 || ml_check_like("sdpa", "q", q, "k", k) < 0 ||
        ml_check_like("sdpa", "q", q, "v", v) < 0)
        return NULL;
    if (q->ndim != 4 || k->ndim != 4 || v->ndim != 4 || k->shape[0] != q->shape[0] || v->shape[0] != q->shape[0] ||
        k->shape[2] != q->shape[2] || v->shape[2] != q->shape[2] || k->shape[3] != q->shape[3] ||
        v->shape[1] != k->shape[1] || k->shape[1] == 0)
        return ml_error_null("sdpa: q %s, k %s, v %s do not fit (expected q [B, Sq, H, D], k [B, Sk, H, D], "
                             "v [B, Sk, H, Dv] with Sk > 0)",
                             ml_shape_str(q, sq, sizeof sq), ml_shape_str(k, sk, sizeof sk), ml_shape_str(v, sv, sizeof sv));
    if (!(scale > 0)) scale = 1.0 / sqrt((double)(q->shape[3] ? q->shape[3] : 1));
    int64_t B = q->shape[0], Sq = q->shape[1], H = q->shape[2];
    int64_t oshape[4] = {B, Sq, H, v->shape[3]}, lshape[3] = {B, H, Sq};
    int rc = 0;
    ml_tensor *qc = ml_kernel_input(q, &rc), *kc = ml_kernel_input(k, &rc), *vc = ml_kernel_input(v, &rc);
    ml_tensor *out = ml_empty(4, oshape, q->dtype, q->device);
    ml_tensor *lse = ml_empty(3, lshape, stats_dtype(q->dtype), q->device);
    if (rc == 0 && (!out || !lse)) rc = -1;
    if (rc == 0)
        rc = ML_RUN(q->device, ml_sdpa_forward, ML_KT(out), ML_KT(lse), ML_KT(qc), ML_KT(kc), ML_KT(vc), causal,
                    scale);
    if (rc == 0) {
        ml_tensor *ins[3] = {q, k, v};
        ml_node *n = ml_node_begin(ML_OP_sdpa, sdpa_backward, 3, ins);
        if (n) {
            ml_node_save(n, qc); ml_node_save(n, kc); ml_node_save(n, vc);
            ml_node_save(n, out); ml_node_save(n, lse);
            n->f[0] = scale; n->i[0] = causal;
            ml_node_finish(n, out);
        }
    } else {
        ml_release(out);
        out = NULL;
    }
    ml_release(qc); ml_release(kc); ml_release(vc); ml_release(lse);
    return out;
}
