/* ops_elementwise.c — elementwise ops: dtype promotion, broadcasting,
 * device dispatch and autograd for binary/unary/clamp/where, and the
 * in-place ops (the fused AdamW step is in ops_optim.c).
 *
 * Promotion follows PyTorch for the common cases: categories bool < integer
 * < float; the higher category wins; within a category a dimensioned
 * tensor's dtype wins over a 0-dim tensor's (so f32 * 0-dim f64 stays f32),
 * else the wider type (f16 with bf16 gives f32).  Python-number scalars
 * (the *_scalar ops) keep a float tensor's dtype.  Integer true division
 * gives f32.  On the CPU, f16/bf16 are computed in f32 and rounded back. */
#include "ops.h"
#include "dispatch.h"
#include "ew_common.h"
#include "elementwise.h"
#include <math.h>
#include <string.h>

/* ---- dtype promotion ---------------------------------------------------- */

static int category(ml_dtype t) { return t == ML_BOOL ? 0 : ml_dtype_is_float(t) ? 2 : 1; }

static ml_dtype wider(ml_dtype a, ml_dtype b) {
    if (a == b) return a;
    switch (category(a)) {
    case 2:
        if (a == ML_F64 || b == ML_F64) return ML_F64;
        return ML_F32;                     /* f32 with a half, or f16 with bf16 */
    case 1:
        if (a == ML_I64 || b == ML_I64) return ML_I64;
        return ML_I32;                     /* i32 with u8 */
    default: return ML_BOOL;
    }
}

static ml_dtype result_dtype(const ml_tensor *a, const ml_tensor *b) {
    int ca = category(a->dtype), cb = category(b->dtype);
    if (ca != cb) return ca > cb ? a->dtype : b->dtype;
    bool za = a->ndim == 0, zb = b->ndim == 0;
    if (za != zb) return za ? b->dtype : a->dtype;
    return wider(a->dtype, b->dtype);
}

static bool is_compare(ml_binop op) { return op >= ML_EQ && op <= ML_GE; }

/* ---- the registry op of a kernel op code -------------------------------- */

/* What a node of each kernel op code is in the registry (host/op_registry.h).
 * Every code is listed without a default, so a new code is a -Wswitch
 * warning until it has its op. */
static ml_op binop_registry_op(ml_binop op) {
    switch (op) {
    case ML_ADD: return ML_OP_add;
    case ML_SUB: return ML_OP_sub;
    case ML_MUL: return ML_OP_mul;
    case ML_DIV: return ML_OP_div;
    case ML_POW: return ML_OP_pow;
    case ML_MAXIMUM: return ML_OP_maximum;
    case ML_MINIMUM: return ML_OP_minimum;
    case ML_EQ: return ML_OP_eq;
    case ML_NE: return ML_OP_ne;
    case ML_LT: return ML_OP_lt;
    case ML_LE: return ML_OP_le;
    case ML_GT: return ML_OP_gt;
    case ML_GE: return ML_OP_ge;
    }
    return ML_NODE_CUSTOM;   /* not reached: the callers check the code */
}

static ml_op unop_registry_op(ml_unop op) {
    switch (op) {
    case ML_NEG: return ML_OP_neg;
    case ML_SQRT: return ML_OP_sqrt;
    case ML_RSQRT: return ML_OP_rsqrt;
    case ML_EXP: return ML_OP_exp;
    case ML_LOG: return ML_OP_log;
    case ML_ABS: return ML_OP_abs;
    case ML_SIN: return ML_OP_sin;
    case ML_COS: return ML_OP_cos;
    case ML_SILU: return ML_OP_silu;
    case ML_GELU: return ML_OP_gelu;
    case ML_GELU_TANH: return ML_OP_gelu_tanh;
    case ML_QUICK_GELU: return ML_OP_quick_gelu;
    case ML_SIGMOID: return ML_OP_sigmoid;
    case ML_TANH: return ML_OP_tanh;
    case ML_RELU: return ML_OP_relu;
    case ML_SQUARE: return ML_OP_square;
    case ML_ROUND: return ML_OP_round;
    case ML_FLOOR: return ML_OP_floor;
    case ML_SIGN: return ML_OP_sign;
    case ML_NUM_UNOPS: break;
    }
    return ML_NODE_CUSTOM;   /* not reached: the callers check the code */
}

/* ---- dispatch wrappers -------------------------------------------------- */

/* The callers have given a and b out's shape and device, and the compute
 * dtype (out is bool for comparisons). */
static int run_binary(ml_binop op, ml_tensor *out, const ml_tensor *a, const ml_tensor *b) {
    return ML_RUN(out->device, ml_binary, op, ML_KT(out), ML_KT(a), ML_KT(b));
}

static int run_binary_scalar(ml_binop op, ml_tensor *out, const ml_tensor *a, double s, bool first) {
    return ML_RUN(out->device, ml_binary_scalar, op, ML_KT(out), ML_KT(a), s, first);
}

/* ---- binary ------------------------------------------------------------- */

/* Which operands op's backward reads, given which inputs need a gradient:
 * bit 0 a, bit 1 b.  add and sub read neither (their inputs' shapes and
 * dtypes are on the edges): saving them would keep every residual sum's
 * operands alive until backward, most of a UNet's activations. */
static int binary_saves(ml_binop op, bool need_a, bool need_b) {
    switch (op) {
    case ML_ADD: case ML_SUB: return 0;
    case ML_MUL: return (need_a ? 2 : 0) | (need_b ? 1 : 0);
    case ML_DIV: return 2 | (need_b ? 1 : 0);
    default: return 3;
    }
}

/* saved: a, b, each NULL where binary_saves says backward does not read
 * it (the slots stay put so errors name "saved tensor 2" for b whatever
 * was saved), and the output for pow; i[0] = op. */
static int binary_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_binop op = (ml_binop)n->i[0];
    ml_tensor *a = n->saved[0], *b = n->saved[1];
    bool need_a = ml_node_needs_grad(n, 0), need_b = ml_node_needs_grad(n, 1);
    ml_tensor *ga = NULL, *gb = NULL, *t = NULL, *u = NULL, *z = NULL;
    int rc = -1;
    switch (op) {
    case ML_ADD:
        ga = ml_retain(g);
        gb = ml_retain(g);
        break;
    case ML_SUB:
        ga = ml_retain(g);
        if (need_b && !(gb = ml_unary(ML_NEG, g))) goto out;
        break;
    case ML_MUL:
        if (need_a && !(ga = ml_mul(g, b))) goto out;
        if (need_b && !(gb = ml_mul(g, a))) goto out;
        break;
    case ML_DIV:                                  /* d/da = g/b, d/db = -g a / b^2 */
        if (!(ga = ml_div(g, b))) goto out;
        if (need_b) {
            if (!(t = ml_div(a, b)) || !(u = ml_mul(ga, t)) || !(gb = ml_unary(ML_NEG, u))) goto out;
        }
        break;
    case ML_POW: {
        /* d/da = g b a^(b-1), 0 where b == 0; d/db = g a^b log a, 0 where a == 0 and b >= 0
         * (PyTorch's masks: no NaN from 0 * log 0). */
        ml_tensor *y = n->saved[2];
        if (!(z = ml_scalar(0, g->dtype, ml_cpu()))) goto out;
        if (need_a) {
            ml_tensor *bm1 = ml_add_scalar(b, -1), *p = bm1 ? ml_pow(a, bm1) : NULL;
            ml_tensor *q = p ? ml_mul(p, b) : NULL, *r = q ? ml_mul(q, g) : NULL;
            ml_tensor *m = r ? ml_scalar_op(ML_EQ, b, 0, false) : NULL;
            ga = m ? ml_where(m, z, r) : NULL;
            ml_release(bm1); ml_release(p); ml_release(q); ml_release(r); ml_release(m);
            if (!ga) goto out;
        }
        if (need_b) {
            ml_tensor *la = ml_unary(ML_LOG, a), *p = la ? ml_mul(y, la) : NULL;
            ml_tensor *r = p ? ml_mul(p, g) : NULL;
            ml_tensor *m1 = r ? ml_scalar_op(ML_EQ, a, 0, false) : NULL;
            ml_tensor *m2 = m1 ? ml_scalar_op(ML_GE, b, 0, false) : NULL;
            ml_tensor *m = m2 ? ml_binary(ML_MUL, m1, m2) : NULL;
            gb = m ? ml_where(m, z, r) : NULL;
            ml_release(la); ml_release(p); ml_release(r); ml_release(m1); ml_release(m2); ml_release(m);
            if (!gb) goto out;
        }
        break;
    }
    case ML_MAXIMUM:
    case ML_MINIMUM: {
        /* The larger (smaller) input takes the gradient; ties split it in
         * half, as PyTorch does. */
        ml_tensor *win = ml_binary(op == ML_MAXIMUM ? ML_GT : ML_LT, a, b);
        ml_tensor *tie = win ? ml_binary(ML_EQ, a, b) : NULL;
        ml_tensor *wf = tie ? oc_cast(win, g->dtype, g->device) : NULL;
        ml_tensor *tf = wf ? oc_cast(tie, g->dtype, g->device) : NULL;
        ml_tensor *th = tf ? ml_mul_scalar(tf, 0.5) : NULL;
        ml_tensor *w = th ? ml_add(wf, th) : NULL;
        ga = w ? ml_mul(g, w) : NULL;
        gb = ga && need_b ? ml_sub(g, ga) : NULL;
        ml_release(win); ml_release(tie); ml_release(wf); ml_release(tf); ml_release(th); ml_release(w);
        if (!ga || (need_b && !gb)) goto out;
        break;
    }
    default:
        ml_error("%s has no gradient", ml_binop_name(op));
        goto out;
    }
    if (need_a && !(gin[0] = oc_grad_for_input(n, 0, ga))) goto out;
    if (need_b && !(gin[1] = oc_grad_for_input(n, 1, gb))) goto out;
    rc = 0;
out:
    ml_release(ga); ml_release(gb); ml_release(t); ml_release(u); ml_release(z);
    return rc;
}

ml_tensor *ml_binary(ml_binop op, ml_tensor *a, ml_tensor *b) {
    if ((unsigned)op > ML_GE) return ml_error_null("binary: unknown op %d", (int)op);
    const char *name = ml_binop_name(op);
    if (!a || !b) return ml_error_null("%s: missing operand", name);
    ml_tensor *ab[2] = {a, b};
    ml_device dev;
    if (oc_common_device(name, 2, ab, &dev) < 0) return NULL;
    int nd;
    int64_t shape[ML_MAX_DIMS];
    if (ml_broadcast_shape(a->ndim, a->shape, b->ndim, b->shape, &nd, shape) < 0) {
        oc_prefix_error(name);
        return NULL;
    }
    ml_dtype ct = result_dtype(a, b);
    if (op == ML_DIV && !ml_dtype_is_float(ct)) ct = ML_F32;
    if (ct == ML_BOOL && (op == ML_SUB || op == ML_POW))
        return ml_error_null("%s: not supported for bool tensors", name);
    ml_dtype kt = oc_kernel_dtype(ct, dev);
    ml_tensor *ca = oc_cast(a, kt, dev), *cb = ca ? oc_cast(b, kt, dev) : NULL;
    ml_tensor *out = cb ? ml_empty(nd, shape, is_compare(op) ? ML_BOOL : kt, dev) : NULL;
    ml_tensor va, vb;
    int rc = out ? run_binary(op, out, oc_bcast(ca, nd, shape, &va), oc_bcast(cb, nd, shape, &vb)) : -1;
    ml_release(ca);
    ml_release(cb);
    if (rc < 0) { ml_release(out); return NULL; }
    if (!is_compare(op) && kt != ct) {
        ml_tensor *o = oc_cast(out, ct, dev);
        ml_release(out);
        if (!(out = o)) return NULL;
    }
    if (is_compare(op) || !ml_dtype_is_float(ct)) return out;
    ml_node *n = ml_node_begin(binop_registry_op(op), binary_backward, 2, ab);
    if (n) {
        int saves = binary_saves(op, ml_node_needs_grad(n, 0), ml_node_needs_grad(n, 1));
        n->i[0] = op;
        ml_node_save(n, saves & 1 ? a : NULL);
        ml_node_save(n, saves & 2 ? b : NULL);
        if (op == ML_POW) ml_node_save(n, out);
        ml_node_finish(n, out);
    }
    return out;
}

ml_tensor *ml_add(ml_tensor *a, ml_tensor *b) { return ml_binary(ML_ADD, a, b); }
ml_tensor *ml_sub(ml_tensor *a, ml_tensor *b) { return ml_binary(ML_SUB, a, b); }
ml_tensor *ml_mul(ml_tensor *a, ml_tensor *b) { return ml_binary(ML_MUL, a, b); }
ml_tensor *ml_div(ml_tensor *a, ml_tensor *b) { return ml_binary(ML_DIV, a, b); }
ml_tensor *ml_pow(ml_tensor *a, ml_tensor *b) { return ml_binary(ML_POW, a, b); }

/* ---- tensor (op) python-number ------------------------------------------ */

/* The dtype a op s computes in: a float tensor keeps its dtype; an integer
 * or bool tensor stays integer (bool becomes int64) when s is a whole
 * number, except for true division; otherwise f32. */
static ml_dtype scalar_dtype(ml_binop op, ml_dtype t, double s) {
    if (ml_dtype_is_float(t)) return t;
    bool whole = s == floor(s) && fabs(s) < 9.2e18;
    if (op == ML_DIV || !whole) return ML_F32;
    if (t == ML_BOOL && !is_compare(op)) return ML_I64;
    return t;
}

/* Whether a op s (s op a when first) reads a in backward: only s / a
 * and a ^ s do; s ^ a reads its output. */
static bool scalar_saves_input(ml_binop op, bool first) {
    return (op == ML_DIV && first) || (op == ML_POW && !first);
}

/* f[0] = s; i[0] = op; i[1] = scalar_first; saved: a (NULL where
 * scalar_saves_input says backward does not read it), the output for s^a. */
static int scalar_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_binop op = (ml_binop)n->i[0];
    bool first = n->i[1];
    double s = n->f[0];
    ml_tensor *a = n->saved[0], *gx = NULL;
    switch (op) {
    case ML_ADD: gx = ml_retain(g); break;
    case ML_SUB: gx = first ? ml_unary(ML_NEG, g) : ml_retain(g); break;
    case ML_MUL: gx = ml_mul_scalar(g, s); break;
    case ML_DIV:
        if (!first) gx = ml_scalar_op(ML_DIV, g, s, false);
        else {                                        /* d(s/a) = -s g / a^2 */
            ml_tensor *a2 = ml_mul(a, a), *q = a2 ? ml_div(g, a2) : NULL;
            gx = q ? ml_mul_scalar(q, -s) : NULL;
            ml_release(a2); ml_release(q);
        }
        break;
    case ML_POW:
        if (!first) {                                 /* d(a^s) = s a^(s-1) g */
            if (s == 0) { gx = ml_zeros_like(g); break; }
            ml_tensor *p = ml_pow_scalar(a, s - 1), *q = p ? ml_mul(p, g) : NULL;
            gx = q ? ml_mul_scalar(q, s) : NULL;
            ml_release(p); ml_release(q);
        } else {                                      /* d(s^a) = s^a log(s) g */
            if (s == 0) { gx = ml_zeros_like(g); break; }
            ml_tensor *q = ml_mul(n->saved[1], g);
            gx = q ? ml_mul_scalar(q, log(s)) : NULL;
            ml_release(q);
        }
        break;
    default:
        return ml_error("%s with a scalar has no gradient", ml_binop_name(op));
    }
    if (!gx) return -1;
    gin[0] = oc_grad_for_input(n, 0, gx);
    ml_release(gx);
    return gin[0] ? 0 : -1;
}

static ml_tensor *binary_scalar(ml_binop op, ml_tensor *a, double s, bool first, bool record) {
    const char *name = ml_binop_name(op);
    if (!a) return ml_error_null("%s: missing operand", name);
    ml_dtype ct = scalar_dtype(op, a->dtype, s);
    ml_dtype kt = oc_kernel_dtype(ct, a->device);
    ml_tensor *ca = oc_cast(a, kt, a->device);
    ml_tensor *out = ca ? ml_empty(a->ndim, a->shape, is_compare(op) ? ML_BOOL : kt, a->device) : NULL;
    int rc = out ? run_binary_scalar(op, out, ca, s, first) : -1;
    ml_release(ca);
    if (rc < 0) { ml_release(out); return NULL; }
    if (!is_compare(op) && kt != ct) {
        ml_tensor *o = oc_cast(out, ct, a->device);
        ml_release(out);
        if (!(out = o)) return NULL;
    }
    if (!record || op > ML_POW || !ml_dtype_is_float(ct)) return out;   /* no grad for max/min/compare */
    ml_node *n = ml_node_begin(binop_registry_op(op), scalar_backward, 1, &a);
    if (n) {
        n->i[0] = op;
        n->i[1] = first;
        n->f[0] = s;
        ml_node_save(n, scalar_saves_input(op, first) ? a : NULL);
        if (op == ML_POW && first) ml_node_save(n, out);
        ml_node_finish(n, out);
    }
    return out;
}

ml_tensor *ml_scalar_op(ml_binop op, ml_tensor *a, double s, bool scalar_first) {
    return binary_scalar(op, a, s, scalar_first, true);
}

ml_tensor *ml_add_scalar(ml_tensor *a, double s) { return binary_scalar(ML_ADD, a, s, false, true); }
ml_tensor *ml_mul_scalar(ml_tensor *a, double s) { return binary_scalar(ML_MUL, a, s, false, true); }
ml_tensor *ml_pow_scalar(ml_tensor *a, double p) { return binary_scalar(ML_POW, a, p, false, true); }
ml_tensor *ml_rsub_scalar(ml_tensor *a, double s) { return binary_scalar(ML_SUB, a, s, true, true); }
ml_tensor *ml_rdiv_scalar(ml_tensor *a, double s) { return binary_scalar(ML_DIV, a, s, true, true); }

/* Subtracting s is adding -s and dividing by s multiplying by 1/s: one
 * kernel and one backward each, and the results the Lua operators have
 * always given. */
ml_tensor *ml_sub_scalar(ml_tensor *a, double s) { return ml_add_scalar(a, -s); }
ml_tensor *ml_div_scalar(ml_tensor *a, double s) { return ml_mul_scalar(a, 1.0 / s); }

ml_tensor *ml_binary_scalar(ml_binop op, ml_tensor *a, double s, bool scalar_first) {
    switch (op) {
    case ML_ADD: return ml_add_scalar(a, s);
    case ML_MUL: return ml_mul_scalar(a, s);
    case ML_SUB: return scalar_first ? ml_rsub_scalar(a, s) : ml_sub_scalar(a, s);
    case ML_DIV: return scalar_first ? ml_rdiv_scalar(a, s) : ml_div_scalar(a, s);
    case ML_POW: return scalar_first ? binary_scalar(ML_POW, a, s, true, true) : ml_pow_scalar(a, s);
    default:
        return ml_error_null("binary_scalar: %s is not an arithmetic op (add, sub, mul, div, pow); compare a "
                             "tensor with a number through ml_binary and ml_scalar", ml_binop_name(op));
    }
}

/* ---- where -------------------------------------------------------------- */

/* saved: cond.  The gradient goes to a where cond holds, to b elsewhere. */
static int where_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_tensor *cond = n->saved[0];
    ml_tensor *z = ml_scalar(0, g->dtype, ml_cpu());
    if (!z) return -1;
    int rc = 0;
    for (int i = 0; i < 2 && rc == 0; i++) {
        if (!ml_node_needs_grad(n, i)) continue;
        ml_tensor *w = i == 0 ? ml_where(cond, g, z) : ml_where(cond, z, g);
        if (!w || !(gin[i] = oc_grad_for_input(n, i, w))) rc = -1;
        ml_release(w);
    }
    ml_release(z);
    return rc;
}

ml_tensor *ml_where(ml_tensor *cond, ml_tensor *a, ml_tensor *b) {
    if (!cond || !a || !b) return ml_error_null("where: missing argument");
    if (cond->dtype != ML_BOOL && cond->dtype != ML_U8)
        return ml_error_null("where: condition must be a bool tensor (got %s)", ml_dtype_name(cond->dtype));
    ml_tensor *all[3] = {cond, a, b};
    ml_device dev;
    if (oc_common_device("where", 3, all, &dev) < 0) return NULL;
    int nd, nd2;
    int64_t s1[ML_MAX_DIMS], shape[ML_MAX_DIMS];
    if (ml_broadcast_shape(a->ndim, a->shape, b->ndim, b->shape, &nd, s1) < 0 ||
        ml_broadcast_shape(cond->ndim, cond->shape, nd, s1, &nd2, shape) < 0) {
        oc_prefix_error("where");
        return NULL;
    }
    ml_dtype ct = result_dtype(a, b);
    ml_tensor *cc = oc_cast(cond, cond->dtype, dev);
    ml_tensor *ca = cc ? oc_cast(a, ct, dev) : NULL, *cb = ca ? oc_cast(b, ct, dev) : NULL;
    ml_tensor *out = cb ? ml_empty(nd2, shape, ct, dev) : NULL;
    ml_tensor vc, va, vb;
    int rc = -1;
    if (out) {
        oc_bcast(cc, nd2, shape, &vc);
        oc_bcast(ca, nd2, shape, &va);
        oc_bcast(cb, nd2, shape, &vb);
        rc = ML_RUN(dev, ml_where, ML_KT(out), ML_KT(&vc), ML_KT(&va), ML_KT(&vb));
    }
    ml_release(cc); ml_release(ca); ml_release(cb);
    if (rc < 0) { ml_release(out); return NULL; }
    if (!ml_dtype_is_float(ct)) return out;
    ml_tensor *ab[2] = {a, b};
    ml_node *n = ml_node_begin(ML_OP_where, where_backward, 2, ab);
    if (n) {
        ml_node_save(n, cond);
        ml_node_finish(n, out);
    }
    return out;
}

/* ---- unary -------------------------------------------------------------- */

static bool int_unop(ml_unop op) {
    return op == ML_NEG || op == ML_ABS || op == ML_SQUARE || op == ML_RELU || op == ML_SIGN ||
           op == ML_ROUND || op == ML_FLOOR;
}

/* i[0] = op; saved: x. */
static int unary_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_unop op = (ml_unop)n->i[0];
    ml_tensor *x = n->saved[0];
    ml_dtype kt = oc_kernel_dtype(x->dtype, x->device);
    ml_tensor *gk = oc_cast(g, kt, x->device), *xk = gk ? oc_cast(x, kt, x->device) : NULL;
    ml_tensor *dx = xk ? ml_empty(x->ndim, x->shape, kt, x->device) : NULL;
    int rc = -1;
    if (dx) rc = ML_RUN(dx->device, ml_unary_backward, op, ML_KT(dx), ML_KT(gk), ML_KT(xk));
    ml_release(gk); ml_release(xk);
    if (rc == 0) gin[0] = oc_grad_for_input(n, 0, dx);
    ml_release(dx);
    return rc == 0 && gin[0] ? 0 : -1;
}

ml_tensor *ml_unary(ml_unop op, ml_tensor *x) {
    if ((unsigned)op >= ML_NUM_UNOPS) return ml_error_null("unary: unknown op %d", (int)op);
    const char *name = ml_unop_name(op);
    if (!x) return ml_error_null("%s: missing operand", name);
    ml_dtype ct = x->dtype;
    if (ct == ML_BOOL) return ml_error_null("%s: not supported for bool tensors", name);
    if (!ml_dtype_is_float(ct) && !int_unop(op)) ct = ML_F32;   /* exp(int) is a float, as in PyTorch */
    ml_dtype kt = oc_kernel_dtype(ct, x->device);
    ml_tensor *cx = oc_cast(x, kt, x->device);
    ml_tensor *out = cx ? ml_empty(x->ndim, x->shape, kt, x->device) : NULL;
    int rc = -1;
    if (out) rc = ML_RUN(out->device, ml_unary, op, ML_KT(out), ML_KT(cx));
    ml_release(cx);
    if (rc < 0) { ml_release(out); return NULL; }
    if (kt != ct) {
        ml_tensor *o = oc_cast(out, ct, x->device);
        ml_release(out);
        if (!(out = o)) return NULL;
    }
    if (!ml_dtype_is_float(ct)) return out;
    ml_node *n = ml_node_begin(unop_registry_op(op), unary_backward, 1, &x);
    if (n) {
        n->i[0] = op;
        ml_node_save(n, x);
        ml_node_finish(n, out);
    }
    return out;
}

/* ---- clamp -------------------------------------------------------------- */

static int run_clamp(ml_tensor *out, const ml_tensor *x, double lo, double hi) {
    return ML_RUN(out->device, ml_clamp, ML_KT(out), ML_KT(x), lo, hi);
}

/* f[0], f[1] = lo, hi; saved: x. */
static int clamp_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_tensor *x = n->saved[0];
    ml_dtype kt = oc_kernel_dtype(x->dtype, x->device);
    ml_tensor *gk = oc_cast(g, kt, x->device), *xk = gk ? oc_cast(x, kt, x->device) : NULL;
    ml_tensor *dx = xk ? ml_empty(x->ndim, x->shape, kt, x->device) : NULL;
    int rc = -1;
    if (dx) rc = ML_RUN(dx->device, ml_clamp_backward, ML_KT(dx), ML_KT(gk), ML_KT(xk), n->f[0], n->f[1]);
    ml_release(gk); ml_release(xk);
    if (rc == 0) gin[0] = oc_grad_for_input(n, 0, dx);
    ml_release(dx);
    return rc == 0 && gin[0] ? 0 : -1;
}

ml_tensor *ml_clamp(ml_tensor *x, double lo, double hi) {
    if (!x) return ml_error_null("clamp: missing operand");
    if (isnan(lo) || isnan(hi)) return ml_error_null("clamp: bounds must not be NaN");
    if (x->dtype == ML_BOOL) return ml_error_null("clamp: not supported for bool tensors");
    ml_dtype kt = oc_kernel_dtype(x->dtype, x->device);
    ml_tensor *cx = oc_cast(x, kt, x->device);
    ml_tensor *out = cx ? ml_empty(x->ndim, x->shape, kt, x->device) : NULL;
    int rc = out ? run_clamp(out, cx, lo, hi) : -1;
    ml_release(cx);
    if (rc < 0) { ml_release(out); return NULL; }
    if (kt != x->dtype) {
        ml_tensor *o = oc_cast(out, x->dtype, x->device);
        ml_release(out);
        if (!(out = o)) return NULL;
    }
    if (!ml_dtype_is_float(x->dtype)) return out;
    ml_node *n = ml_node_begin(ML_OP_clamp, clamp_backward, 1, &x);
    if (n) {
        n->f[0] = lo;
        n->f[1] = hi;
        ml_node_save(n, x);
        ml_node_finish(n, out);
    }
    return out;
}

/* ---- geglu -------------------------------------------------------------- */

/* t as a kernel operand: in dtype kt on dev, contiguous, never recorded.
 * New reference (t itself when it is all that already). */
static ml_tensor *geglu_operand(ml_tensor *t, ml_dtype kt, ml_device dev) {
    ml_tensor *c = oc_cast(t, kt, dev);
    if (!c || ml_is_contiguous(c)) return c;
    bool prev = ml_set_grad_enabled(false);
    ml_tensor *k = ml_contiguous(c);
    ml_set_grad_enabled(prev);
    ml_release(c);
    return k;
}

/* saved: h as the kernel took it (contiguous, kernel dtype).  One kernel
 * writes both halves of dh: the narrow backwards of the unfused form (two
 * zero-filled full-size gradients and their sum) do not happen. */
static int geglu_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    ml_tensor *h = n->saved[0];
    ml_tensor *gk = geglu_operand(g, h->dtype, h->device);
    ml_tensor *dh = gk ? ml_empty(h->ndim, h->shape, h->dtype, h->device) : NULL;
    int rc = -1;
    if (dh) rc = ML_RUN(dh->device, ml_geglu_backward, ML_KT(dh), ML_KT(gk), ML_KT(h));
    ml_release(gk);
    if (rc == 0) gin[0] = oc_grad_for_input(n, 0, dh);
    ml_release(dh);
    return rc == 0 && gin[0] ? 0 : -1;
}

/* The kernel computes in f32 for f16/bf16 and rounds the product once,
 * where the unfused hidden * gelu(gate) rounds twice: gelu(gate) to the
 * half type, then the product (PyTorch's unfused form rounds the same
 * way).  So in half types the fused result is the closer one to the f32
 * result, and may differ from the unfused one by an ulp; in f32 and f64
 * the two are the same bits. */
ml_tensor *ml_geglu(ml_tensor *h) {
    if (!h) return ml_error_null("geglu: missing operand");
    char sh[128];
    if (!ml_dtype_is_float(h->dtype))
        return ml_error_null("geglu: input must be a float tensor (got %s)", ml_dtype_name(h->dtype));
    if (h->ndim == 0 || h->shape[h->ndim - 1] % 2 != 0)
        return ml_error_null("geglu: input of shape %s must have an even last dim (its halves are the value and "
                             "the gate)", ml_shape_str(h, sh, sizeof sh));
    int64_t oshape[ML_MAX_DIMS];
    memcpy(oshape, h->shape, (size_t)h->ndim * sizeof *oshape);
    oshape[h->ndim - 1] /= 2;
    ml_dtype kt = oc_kernel_dtype(h->dtype, h->device);
    ml_tensor *hk = geglu_operand(h, kt, h->device);
    ml_tensor *out = hk ? ml_empty(h->ndim, oshape, kt, h->device) : NULL;
    int rc = out ? ML_RUN(out->device, ml_geglu, ML_KT(out), ML_KT(hk)) : -1;
    if (rc < 0) { ml_release(hk); ml_release(out); return NULL; }
    if (kt != h->dtype) {
        ml_tensor *o = oc_cast(out, h->dtype, h->device);
        ml_release(out);
        if (!(out = o)) { ml_release(hk); return NULL; }
    }
    ml_node *n = ml_node_begin(ML_OP_geglu, geglu_backward, 1, &h);
    if (n) {
        ml_node_save(n, hk);
        ml_node_finish(n, out);
    }
    ml_release(hk);
    return out;
}

/* ---- sum_to_shape ------------------------------------------------------- */

ml_tensor *ml_sum_to_shape(ml_tensor *g, int ndim, const int64_t *shape) {
    int lead = g->ndim - ndim;
    bool same = lead == 0;
    for (int i = 0; i < ndim && lead >= 0; i++) {
        int64_t gs = g->shape[lead + i];
        if (gs != shape[i]) {
            same = false;
            if (shape[i] != 1) lead = -1;
        }
    }
    if (lead < 0) {
        char b1[128], b2[128];
        ml_tensor tmp = {.ndim = ndim};
        memcpy(tmp.shape, shape, (size_t)ndim * sizeof *shape);
        return ml_error_null("sum_to_shape: gradient of shape %s cannot be reduced to shape %s",
                             ml_shape_str(g, b1, sizeof b1), ml_shape_str(&tmp, b2, sizeof b2));
    }
    if (same) return ml_retain(g);
    int dims[ML_MAX_DIMS], nd = 0;
    for (int d = 0; d < g->ndim; d++)
        if (g->shape[d] != 1 && (d < lead || shape[d - lead] == 1)) dims[nd++] = d;
    ml_tensor *s = nd ? ml_sum(g, nd, dims, true) : ml_retain(g);
    if (!s) return NULL;
    ml_tensor *r = ml_view(s, ndim, shape);
    ml_release(s);
    return r;
}

/* ---- in-place ----------------------------------------------------------- */

/* Runs f on dst, or on an f32 copy written back afterwards when dst is a
 * CPU half tensor. */
typedef int (*inplace_fn)(ml_tensor *dst, void *ctx);

static int with_kernel_dtype(ml_tensor *dst, inplace_fn f, void *ctx) {
    ml_dtype kt = oc_kernel_dtype(dst->dtype, dst->device);
    if (kt == dst->dtype) return f(dst, ctx);
    ml_tensor *w = ml_empty(dst->ndim, dst->shape, kt, dst->device);
    int rc = w ? ml_copy_(w, dst) : -1;
    if (rc == 0) rc = f(w, ctx);
    if (rc == 0) rc = ml_copy_(dst, w);
    ml_release(w);
    return rc;
}

typedef struct { ml_binop op; ml_tensor *src; } inplace_bin;

static int inplace_binary_run(ml_tensor *dst, void *ctx) {
    inplace_bin *c = ctx;
    ml_tensor *s = oc_cast(c->src, dst->dtype, dst->device);
    if (!s) return -1;
    ml_tensor v;
    int rc = run_binary(c->op, dst, dst, oc_bcast(s, dst->ndim, dst->shape, &v));
    ml_release(s);
    return rc;
}

static int inplace_binary(const char *name, ml_binop op, ml_tensor *dst, ml_tensor *src) {
    if (!dst || !src) return ml_error("%s: missing operand", name);
    ml_tensor *ds[2] = {dst, src};
    ml_device dev;
    if (oc_common_device(name, 2, ds, &dev) < 0) return -1;
    if (!ml_device_eq(dev, dst->device)) return ml_error("%s: the source is on another device than the destination", name);
    int nd;
    int64_t shape[ML_MAX_DIMS];
    if (ml_broadcast_shape(dst->ndim, dst->shape, src->ndim, src->shape, &nd, shape) < 0 || nd != dst->ndim ||
        memcmp(shape, dst->shape, (size_t)nd * sizeof *shape) != 0) {
        char b1[128], b2[128];
        return ml_error("%s: source of shape %s cannot be broadcast to the destination's shape %s", name,
                        ml_shape_str(src, b1, sizeof b1), ml_shape_str(dst, b2, sizeof b2));
    }
    if (category(src->dtype) > category(dst->dtype))
        return ml_error("%s: result type %s cannot be stored in a %s destination", name,
                        ml_dtype_name(src->dtype), ml_dtype_name(dst->dtype));
    if (dst->dtype == ML_BOOL && op != ML_MUL) return ml_error("%s: not supported for bool tensors", name);
    if (ml_inplace_begin(name, dst) < 0) return -1;
    inplace_bin c = {op, src};
    return with_kernel_dtype(dst, inplace_binary_run, &c);
}

/* add_ and sub_ (alpha negated): name is the op the caller called. */
static int inplace_add(const char *name, ml_tensor *dst, ml_tensor *src, double alpha) {
    if (alpha == 1.0) return inplace_binary(name, ML_ADD, dst, src);
    if (!src) return ml_error("%s: missing operand", name);
    bool prev = ml_set_grad_enabled(false);
    ml_tensor *s = binary_scalar(ML_MUL, src, alpha, false, false);
    ml_set_grad_enabled(prev);
    if (!s) return -1;
    int rc = inplace_binary(name, ML_ADD, dst, s);
    ml_release(s);
    return rc;
}

int ml_add_(ml_tensor *dst, ml_tensor *src, double alpha) { return inplace_add("add_", dst, src, alpha); }

int ml_mul_(ml_tensor *dst, ml_tensor *src) { return inplace_binary("mul_", ML_MUL, dst, src); }

typedef struct { ml_binop op; double s; } inplace_sc;

static int inplace_scalar_run(ml_tensor *dst, void *ctx) {
    inplace_sc *c = ctx;
    return run_binary_scalar(c->op, dst, dst, c->s, false);
}

/* sub_ and div_ run as add_ and mul_ with -s and 1/s; given is the scalar
 * the caller passed, for the message. */
static int inplace_scalar(const char *name, ml_binop op, ml_tensor *dst, double s, double given) {
    if (!dst) return ml_error("%s: missing operand", name);
    if (scalar_dtype(op, dst->dtype, s) != dst->dtype)
        return ml_error("%s: the result of a %s tensor and %g cannot be stored in place", name,
                        ml_dtype_name(dst->dtype), given);
    if (ml_inplace_begin(name, dst) < 0) return -1;
    inplace_sc c = {op, s};
    return with_kernel_dtype(dst, inplace_scalar_run, &c);
}

int ml_mul_scalar_(ml_tensor *dst, double s) { return inplace_scalar("mul_", ML_MUL, dst, s, s); }
int ml_add_scalar_(ml_tensor *dst, double s) { return inplace_scalar("add_", ML_ADD, dst, s, s); }

typedef struct { double lo, hi; } inplace_clamp;

static int inplace_clamp_run(ml_tensor *dst, void *ctx) {
    inplace_clamp *c = ctx;
    return run_clamp(dst, dst, c->lo, c->hi);
}

int ml_clamp_(ml_tensor *dst, double lo, double hi) {
    if (!dst) return ml_error("clamp_: missing operand");
    if (isnan(lo) || isnan(hi)) return ml_error("clamp_: bounds must not be NaN");
    if (dst->dtype == ML_BOOL) return ml_error("clamp_: not supported for bool tensors");
    if (ml_inplace_begin("clamp_", dst) < 0) return -1;
    inplace_clamp c = {lo, hi};
    return with_kernel_dtype(dst, inplace_clamp_run, &c);
}

int ml_sub_(ml_tensor *dst, ml_tensor *src, double alpha) { return inplace_add("sub_", dst, src, -alpha); }
int ml_sub_scalar_(ml_tensor *dst, double s) { return inplace_scalar("sub_", ML_ADD, dst, -s, s); }
/* Division is true division (ml_div makes integer operands float), so its
 * result never fits an integer or bool destination, whatever the divisor:
 * refused as PyTorch does, instead of multiplying by 1/s where that happens
 * to be whole (div_(0.5) doubled an int tensor). */
static int div_dst_check(const ml_tensor *dst) {
    if (!dst) return ml_error("div_: missing operand");
    if (!ml_dtype_is_float(dst->dtype))
        return ml_error("div_: result type float32 (true division) cannot be stored in place in a tensor of dtype %s; "
                        "divide a float copy instead (t:float():div_(x))", ml_dtype_name(dst->dtype));
    return 0;
}

int ml_div_scalar_(ml_tensor *dst, double s) {
    if (div_dst_check(dst) < 0) return -1;
    return inplace_scalar("div_", ML_MUL, dst, 1.0 / s, s);
}

int ml_div_(ml_tensor *dst, ml_tensor *src) {
    if (div_dst_check(dst) < 0) return -1;
    return inplace_binary("div_", ML_DIV, dst, src);
}

int ml_inplace_copy_(ml_tensor *dst, const ml_tensor *src) {
    if (!dst || !src) return ml_error("copy_: missing tensor");
    if (ml_inplace_begin("copy_", dst) < 0) return -1;
    return ml_copy_(dst, src);   /* its messages name copy */
}

static int inplace_fill(const char *name, ml_tensor *dst, double v) {
    if (!dst) return ml_error("%s: missing tensor", name);
    if (ml_inplace_begin(name, dst) < 0) return -1;
    return ml_fill_(dst, v) < 0 ? oc_prefix_error(name) : 0;
}

int ml_inplace_fill_(ml_tensor *dst, double v) { return inplace_fill("fill_", dst, v); }
int ml_inplace_zero_(ml_tensor *dst) { return inplace_fill("zero_", dst, 0); }
