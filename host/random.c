/* random.c — generators and random tensors (randn, rand, randint, normal_,
 * uniform_, dropout) over the Philox stream defined in kernels/philox.h, so
 * a seed gives the same numbers on the CPU and on the GPU.
 *
 * A generator is (seed, offset); every fill consumes whole counter blocks
 * and advances the offset past them.  The default generator starts at seed
 * 0 (ml_manual_seed resets it); it is process-wide and not locked: threads
 * that draw numbers concurrently should own generators. */
#include "ops.h"
#include "dispatch.h"
#include "ew_common.h"
#include "philox.h"
#include "random.h"

static ml_generator g_default;

ml_generator *ml_default_generator(void) { return &g_default; }

void ml_manual_seed(uint64_t seed) {
    g_default.seed = seed;
    g_default.offset = 0;
}

typedef enum { DIST_UNIFORM, DIST_NORMAL } dist;

static int fill_float(const char *op, dist d, ml_tensor *t, double a, double b, ml_generator *g) {
    if (!ml_dtype_is_float(t->dtype))
        return ml_error("%s: needs a float dtype (got %s)", op, ml_dtype_name(t->dtype));
    if (!g) g = &g_default;
    int rc = d == DIST_UNIFORM ? ML_RUN(t->device, ml_uniform, ML_KT(t), g->seed, g->offset, a, b)
                               : ML_RUN(t->device, ml_normal, ML_KT(t), g->seed, g->offset, a, b);
    if (rc == 0) g->offset += ml_philox_blocks((uint64_t)ml_numel(t), 4);
    return rc;
}

ml_tensor *ml_randn(int ndim, const int64_t *shape, ml_dtype dt, ml_device dev, ml_generator *g) {
    ml_tensor *t = ml_empty(ndim, shape, dt, dev);
    if (t && fill_float("randn", DIST_NORMAL, t, 0.0, 1.0, g) < 0) { ml_release(t); return NULL; }
    return t;
}

ml_tensor *ml_rand(int ndim, const int64_t *shape, ml_dtype dt, ml_device dev, ml_generator *g) {
    ml_tensor *t = ml_empty(ndim, shape, dt, dev);
    if (t && fill_float("rand", DIST_UNIFORM, t, 0.0, 1.0, g) < 0) { ml_release(t); return NULL; }
    return t;
}

ml_tensor *ml_randint(int64_t low, int64_t high, int ndim, const int64_t *shape, ml_dtype dt,
                      ml_device dev, ml_generator *g) {
    if (high <= low)
        return ml_error_null("randint: low (%lld) must be less than high (%lld)", (long long)low, (long long)high);
    if (dt == ML_BOOL) return ml_error_null("randint: bool dtype is not supported");
    ml_tensor *t = ml_empty(ndim, shape, dt, dev);
    if (!t) return NULL;
    if (!g) g = &g_default;
    int rc = ML_RUN(dev, ml_randint, ML_KT(t), g->seed, g->offset, low, high);
    if (rc < 0) { ml_release(t); return NULL; }
    bool wide = (uint64_t)high - (uint64_t)low > 0x100000000ull;
    g->offset += ml_philox_blocks((uint64_t)ml_numel(t), wide ? 2 : 4);
    return t;
}

int ml_normal_(ml_tensor *t, double mean, double std, ml_generator *g) {
    if (!t) return ml_error("normal_: missing tensor");
    if (!(std >= 0)) return ml_error("normal_: std must be >= 0 (got %g)", std);
    if (ml_inplace_begin("normal_", t) < 0) return -1;
    return fill_float("normal_", DIST_NORMAL, t, mean, std, g);
}

int ml_uniform_(ml_tensor *t, double lo, double hi, ml_generator *g) {
    if (!t) return ml_error("uniform_: missing tensor");
    if (!(lo <= hi)) return ml_error("uniform_: expected lo <= hi (got %g, %g)", lo, hi);
    if (ml_inplace_begin("uniform_", t) < 0) return -1;
    return fill_float("uniform_", DIST_UNIFORM, t, lo, hi, g);
}

/* Training: zero each element with probability p, scale the rest by
 * 1/(1-p); the keep mask is drawn as f32 uniforms u (kept where u >= p) so
 * CPU and GPU drop the same elements.  Eval (or p == 0): x itself. */
ml_tensor *ml_dropout(ml_tensor *x, double p, bool train, ml_generator *g) {
    if (!x) return ml_error_null("dropout: missing tensor");
    if (!(p >= 0 && p <= 1)) return ml_error_null("dropout: p must be in [0, 1] (got %g)", p);
    if (!ml_dtype_is_float(x->dtype))
        return ml_error_null("dropout: needs a float tensor (got %s)", ml_dtype_name(x->dtype));
    if (!train || p == 0) return ml_retain(x);
    if (p == 1) return ml_mul_scalar(x, 0.0);
    bool prev = ml_set_grad_enabled(false);
    ml_tensor *u = ml_rand(x->ndim, x->shape, ML_F32, x->device, g);
    ml_tensor *keep = u ? ml_scalar_op(ML_GE, u, p, false) : NULL;
    ml_tensor *mask = keep ? oc_cast(keep, x->dtype, x->device) : NULL;
    int rc = mask ? ml_mul_scalar_(mask, 1.0 / (1.0 - p)) : -1;
    ml_set_grad_enabled(prev);
    ml_release(u);
    ml_release(keep);
    ml_tensor *out = rc == 0 ? ml_mul(x, mask) : NULL;
    ml_release(mask);
    return out;
}
