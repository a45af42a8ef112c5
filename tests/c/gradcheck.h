/* gradcheck.h — finite-difference gradient check for the C op tests.
 *
 * f maps n f64 inputs to one output y.  We check d<y, w>/dx_i for a fixed
 * random projection w: the analytic gradient from backward against central
 * differences (eps 1e-6) element by element, with |a - n| <= atol + rtol*|n|.
 * Inputs must be CPU f64 leaves; this sets requires_grad on those listed in
 * `check_mask` (bit i = input i) and clears their .grad. */
#ifndef ML_GRADCHECK_H
#define ML_GRADCHECK_H
#include "check.h"
#include "ops.h"
#include <stdlib.h>

typedef ml_tensor *(*gc_fn)(ml_tensor **x, void *ctx);

static ml_tensor *gc_project(gc_fn f, ml_tensor **x, void *ctx, const ml_tensor *w, double *val) {
    ml_tensor *y = f(x, ctx);
    if (!y) return NULL;
    ml_tensor *p = ml_mul(y, (ml_tensor *)w);
    ml_release(y);
    if (!p) return NULL;
    ml_tensor *s = ml_sum(p, 0, NULL, false);
    ml_release(p);
    if (s && val) ml_item(s, val);
    return s;
}

/* Returns 1 if every checked gradient matches. */
static int gradcheck(const char *name, gc_fn f, int n, ml_tensor **x, unsigned check_mask, void *ctx) {
    double atol = 1e-6, rtol = 1e-4, eps = 1e-6;
    for (int i = 0; i < n; i++) {
        if (!(check_mask >> i & 1)) continue;
        x[i]->requires_grad = true;
        ml_release(x[i]->grad); x[i]->grad = NULL;
    }
    ml_tensor *y0 = f(x, ctx);
    if (!y0) { CHECK(0, "%s: forward failed: %s", name, ml_last_error()); return 0; }
    ml_tensor *w = ml_randn(y0->ndim, y0->shape, ML_F64, ml_cpu(), NULL);
    ml_release(y0);
    ml_tensor *s = gc_project(f, x, ctx, w, NULL);
    if (!s) { CHECK(0, "%s: forward failed: %s", name, ml_last_error()); ml_release(w); return 0; }
    int rc = ml_backward(s, NULL, false);
    ml_release(s);
    if (rc < 0) { CHECK(0, "%s: backward failed: %s", name, ml_last_error()); ml_release(w); return 0; }
    int ok = 1;
    bool prev = ml_set_grad_enabled(false);
    for (int i = 0; i < n && ok; i++) {
        if (!(check_mask >> i & 1)) continue;
        if (!x[i]->grad) { CHECK(0, "%s: input %d got no gradient", name, i); ok = 0; break; }
        double *ga = ml_to_doubles(x[i]->grad);
        double *data = (double *)ml_data(x[i]);
        int64_t m = ml_numel(x[i]);
        for (int64_t k = 0; k < m && ok; k++) {
            double orig = data[k], vp, vm;
            data[k] = orig + eps;
            ml_tensor *sp = gc_project(f, x, ctx, w, &vp);
            data[k] = orig - eps;
            ml_tensor *sm = gc_project(f, x, ctx, w, &vm);
            data[k] = orig;
            ml_release(sp); ml_release(sm);
            double num = (vp - vm) / (2 * eps);
            if (!(fabs(ga[k] - num) <= atol + rtol * fabs(num))) {
                CHECK(0, "%s: d/dinput%d[%lld] analytic %.10g numeric %.10g", name, i, (long long)k, ga[k], num);
                ok = 0;
            }
        }
        free(ga);
    }
    ml_set_grad_enabled(prev);
    for (int i = 0; i < n; i++) { x[i]->requires_grad = false; ml_release(x[i]->grad); x[i]->grad = NULL; }
    ml_release(w);
    if (ok) CHECK(1, "%s", name);
    return ok;
}
#endif
