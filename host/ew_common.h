/* ew_common.h — small helpers shared by the elementwise, reduction, loss
 * and random ops (host/ops_elementwise.c, ops_reduce.c, ops_loss.c,
 * random.c): dtype promotion, no-grad conversions, broadcast views, and the
 * gradient bookkeeping of broadcasting ops. */
#ifndef ML_EW_COMMON_H
#define ML_EW_COMMON_H

#include "ops.h"
#include <stdio.h>

/* a op s (or s op a), s a number: the general form behind ml_add_scalar
 * and friends, also for comparisons (x > 0.5 gives a bool tensor).
 * Recorded for add/sub/mul/div/pow on float tensors.  (ops_elementwise.c) */
ml_tensor *ml_scalar_op(ml_binop op, ml_tensor *a, double s, bool scalar_first);

/* Conversions the op does for itself (inputs to the compute dtype, results
 * back): never recorded, the op's own node covers them.  New reference. */
static inline ml_tensor *oc_cast(ml_tensor *t, ml_dtype dt, ml_device dev) {
    bool prev = ml_set_grad_enabled(false);
    ml_tensor *a = ml_to_dtype(t, dt);
    ml_tensor *r = a && !ml_device_eq(a->device, dev) ? ml_to_device(a, dev) : ml_retain(a);
    ml_release(a);
    ml_set_grad_enabled(prev);
    return r;
}

/* The CPU kernels compute f16/bf16 in f32. */
static inline ml_dtype oc_kernel_dtype(ml_dtype t, ml_device dev) {
    return dev.type == ML_CPU && (t == ML_F16 || t == ML_BF16) ? ML_F32 : t;
}

/* A stack header viewing t broadcast to `shape` (stride 0 on expanded
 * dims).  The caller has checked broadcastability.  Valid while t lives;
 * only for passing to kernels. */
static inline ml_tensor *oc_bcast(const ml_tensor *t, int nd, const int64_t *shape, ml_tensor *hdr) {
    *hdr = *t;
    int off = nd - t->ndim;
    hdr->ndim = nd;
    for (int i = 0; i < nd; i++) {
        int64_t s = i < off ? 1 : t->shape[i - off];
        int64_t st = i < off ? 0 : t->strides[i - off];
        hdr->shape[i] = shape[i];
        hdr->strides[i] = s == shape[i] ? st : 0;
    }
    return hdr;
}

/* Re-raise the pending error with the op's name in front. */
static inline int oc_prefix_error(const char *op) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", ml_last_error());
    return ml_error("%s: %s", op, msg);
}

/* Pick the device of an op's operands: they must agree, except that a
 * 0-dim CPU tensor (a scalar) may join tensors on any device, as in
 * PyTorch.  Returns 0 and the device, or -1 with an error. */
static inline int oc_common_device(const char *op, int n, ml_tensor *const *ts, ml_device *dev) {
    int pick = -1;
    for (int i = 0; i < n; i++) {
        if (!ts[i]) continue;
        if (pick < 0 || (ts[pick]->ndim == 0 && ts[pick]->device.type == ML_CPU &&
                         ts[i]->device.type != ML_CPU)) pick = i;
    }
    if (pick < 0) return ml_error("%s: no operands", op);
    *dev = ts[pick]->device;
    for (int i = 0; i < n; i++) {
        if (!ts[i] || ml_device_eq(ts[i]->device, *dev)) continue;
        if (ts[i]->ndim == 0 && ts[i]->device.type == ML_CPU) continue;
        char b1[32], b2[32];
        ml_device_str(ts[i]->device, b1, sizeof b1);
        ml_device_str(*dev, b2, sizeof b2);
        return ml_error("%s: expected all tensors on one device, got %s and %s", op, b1, b2);
    }
    return 0;
}

/* The gradient for input i of node n from a gradient of the output's
 * (broadcast) shape: summed down to the input's shape and returned in the
 * input's float dtype and device.  New reference. */
static inline ml_tensor *oc_grad_for_input(ml_node *n, int i, ml_tensor *g) {
    const ml_edge *e = &n->next[i];
    ml_tensor *s = ml_sum_to_shape(g, e->ndim, e->shape);
    if (!s) return NULL;
    ml_dtype dt = ml_dtype_is_float(e->dtype) ? e->dtype : s->dtype;
    if (s->dtype == dt && ml_device_eq(s->device, e->device)) return s;
    ml_tensor *c = oc_cast(s, dt, e->device);
    ml_release(s);
    return c;
}

#endif
