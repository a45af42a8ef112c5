/* test_autograd.c — the backward engine: accumulation, retain_graph,
 * no_grad, detach, hooks and the grad-ready callback, shared subgraphs,
 * errors, very long chains, release of saved tensors; plus gradient checks
 * of the view ops, whose backward runs through sum_to_shape and copies. */
#include "check.h"
#include "gradcheck.h"
#include "ops.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

static ml_generator gen = {7, 0};

static ml_tensor *leaf(int n, const double *v) {
    int64_t s = n;
    ml_tensor *t = ml_from_doubles(v, 1, &s, ML_F64);
    t->requires_grad = true;
    return t;
}

static void expect(const char *what, ml_tensor *t, const double *want, int64_t n, double tol) {
    if (!t) { CHECK(0, "%s: got NULL: %s", what, ml_last_error()); return; }
    double *v = ml_to_doubles(t);
    int bad = ml_numel(t) != n;
    for (int64_t i = 0; i < n && !bad; i++)
        if (fabs(v[i] - want[i]) > tol) { CHECK(0, "%s[%lld]: %.12g, want %.12g", what, (long long)i, v[i], want[i]); bad = 1; }
    if (!bad) CHECK(1, "%s", what);
    free(v);
}

/* sum(x * k) */
static ml_tensor *scaled_sum(ml_tensor *x, double k) {
    ml_tensor *y = ml_mul_scalar(x, k), *s = ml_sum(y, 0, NULL, false);
    ml_release(y);
    return s;
}

static void test_accumulation_and_retain(void) {
    ml_tensor *x = leaf(3, (double[]){1, 2, 3});
    for (int k = 0; k < 2; k++) {
        ml_tensor *s = scaled_sum(x, 2);
        CHECK(ml_backward(s, NULL, false) == 0, "backward %d", k);
        ml_release(s);
    }
    expect("grads accumulate over two backward calls", x->grad, (double[]){4, 4, 4}, 3, 0);

    ml_release(x->grad); x->grad = NULL;
    ml_tensor *s = scaled_sum(x, 3);
    CHECK(ml_backward(s, NULL, true) == 0, "backward with retain_graph");
    CHECK(ml_backward(s, NULL, false) == 0, "second backward after retain_graph");
    expect("retained graph ran twice", x->grad, (double[]){6, 6, 6}, 3, 0);
    CHECK(ml_backward(s, NULL, false) < 0 && strstr(ml_last_error(), "second time") &&
          strstr(ml_last_error(), "retain_graph"), "third backward errors clearly: %s", ml_last_error());
    ml_release(s);

    /* a non-scalar root needs an explicit gradient */
    ml_tensor *y = ml_mul_scalar(x, 2);
    CHECK(ml_backward(y, NULL, false) < 0 && strstr(ml_last_error(), "one-element"), "non-scalar root: %s", ml_last_error());
    ml_tensor *gy = ml_from_doubles((double[]){1, 10, 100}, 1, (int64_t[]){3}, ML_F64);
    ml_release(x->grad); x->grad = NULL;
    CHECK(ml_backward(y, gy, false) == 0, "backward with an explicit gradient");
    expect("explicit gradient", x->grad, (double[]){2, 20, 200}, 3, 0);
    ml_release(gy); ml_release(y);

    /* the root is a leaf */
    ml_release(x->grad); x->grad = NULL;
    ml_tensor *one = leaf(1, (double[]){5});
    CHECK(ml_backward(one, NULL, false) == 0, "backward on a leaf");
    expect("leaf root gradient is ones", one->grad, (double[]){1}, 1, 0);
    ml_release(one);
    ml_release(x);
}

static void test_no_grad_detach_errors(void) {
    ml_tensor *x = leaf(2, (double[]){1, 2});
    bool prev = ml_set_grad_enabled(false);
    ml_tensor *y = ml_mul(x, x);
    CHECK(!y->requires_grad && !y->grad_fn, "no_grad records nothing");
    CHECK(ml_backward(y, NULL, false) < 0 && strstr(ml_last_error(), "does not require grad"),
          "backward on a tensor not requiring grad: %s", ml_last_error());
    ml_set_grad_enabled(prev);
    CHECK(ml_grad_enabled(), "grad mode restored");
    ml_release(y);

    y = ml_mul(x, x);
    CHECK(y->requires_grad && y->grad_fn, "grad mode records");
    ml_tensor *d = ml_detach(y);
    CHECK(!d->requires_grad && !d->grad_fn && d->storage == y->storage, "detach: same storage, no history");
    ml_tensor *z = ml_mul(d, x), *s = ml_sum(z, 0, NULL, false);
    CHECK(ml_backward(s, NULL, false) == 0, "backward through a detached factor");
    expect("detached factor is a constant", x->grad, (double[]){1, 4}, 2, 0);
    ml_release(d); ml_release(z); ml_release(s); ml_release(y);

    ml_tensor *c = ml_from_doubles((double[]){1, 2}, 1, (int64_t[]){2}, ML_F64);
    ml_tensor *w = ml_mul(c, c);
    CHECK(!w->requires_grad && !w->grad_fn, "ops on tensors without grad record nothing");
    ml_release(w); ml_release(c);
    ml_release(x);
}

/* ---- hooks -------------------------------------------------------------- */

static ml_tensor *times_ten(void *ctx, ml_tensor *g, int *err) {
    (*(int *)ctx)++;
    return ml_mul_scalar(g, 10);
}

static ml_tensor *failing_hook(void *ctx, ml_tensor *g, int *err) {
    *err = 1;
    ml_error("hook refused");
    return NULL;
}

typedef struct { int calls; ml_tensor *seen[4]; } ready_log;

static void on_ready(void *ctx, ml_tensor *l) {
    ready_log *r = ctx;
    if (r->calls < 4) r->seen[r->calls] = l;
    r->calls++;
}

static void test_hooks(void) {
    ml_tensor *x = leaf(2, (double[]){1, 2}), *w = leaf(2, (double[]){3, 4});
    int hook_calls = 0;
    int id = ml_add_hook(x, times_ten, &hook_calls, NULL);
    CHECK(id > 0, "add_hook");
    ready_log log = {0};
    ml_set_grad_ready_callback(on_ready, &log);
    /* x is used three times: the hook and the callback still run once */
    ml_tensor *a = ml_mul(x, w), *b = ml_mul(x, x), *c = ml_add(a, b), *d = ml_add(c, x);
    ml_tensor *s = ml_sum(d, 0, NULL, false);
    CHECK(ml_backward(s, NULL, false) == 0, "backward with hooks");
    CHECK(hook_calls == 1, "hook ran once (%d)", hook_calls);
    /* d/dx = w + 2x + 1 = {6, 9}, times ten by the hook */
    expect("hook replaced the gradient", x->grad, (double[]){60, 90}, 2, 0);
    expect("other leaf unaffected", w->grad, (double[]){1, 2}, 2, 0);
    int x_ready = 0, w_ready = 0;
    for (int i = 0; i < log.calls && i < 4; i++) { x_ready += log.seen[i] == x; w_ready += log.seen[i] == w; }
    CHECK(log.calls == 2 && x_ready == 1 && w_ready == 1, "grad-ready fires once per leaf (%d calls)", log.calls);
    ml_set_grad_ready_callback(NULL, NULL);
    ml_release(a); ml_release(b); ml_release(c); ml_release(d); ml_release(s);

    ml_remove_hook(x, id);
    ml_release(x->grad); x->grad = NULL;
    s = scaled_sum(x, 1);
    CHECK(ml_backward(s, NULL, false) == 0 && hook_calls == 1, "removed hook does not run");
    expect("gradient without hook", x->grad, (double[]){1, 1}, 2, 0);
    ml_release(s);

    ml_add_hook(x, failing_hook, NULL, NULL);
    s = scaled_sum(x, 1);
    CHECK(ml_backward(s, NULL, false) < 0 && strstr(ml_last_error(), "hook refused"), "a failing hook fails backward: %s", ml_last_error());
    ml_release(s);
    ml_tensor *nl = ml_mul_scalar(x, 2);
    CHECK(ml_add_hook(nl, times_ten, &hook_calls, NULL) < 0, "hooks only on leaves");
    ml_release(nl);
    ml_release(x); ml_release(w);
}

static void test_diamond(void) {
    /* y = x*x + 3x through a shared intermediate u = x + 0: dy/dx = 2x + 3 */
    ml_tensor *x = leaf(3, (double[]){1, -2, 0.5});
    ml_tensor *u = ml_add_scalar(x, 0), *a = ml_mul(u, u), *b = ml_mul_scalar(u, 3), *y = ml_add(a, b);
    ml_tensor *s = ml_sum(y, 0, NULL, false);
    CHECK(ml_backward(s, NULL, false) == 0, "diamond backward");
    expect("diamond gradient", x->grad, (double[]){5, -1, 4}, 3, 1e-12);
    ml_release(u); ml_release(a); ml_release(b); ml_release(y); ml_release(s); ml_release(x);
}

static void test_long_chain(void) {
    ml_tensor *x = leaf(1, (double[]){0.5});
    ml_tensor *y = ml_retain(x);
    for (int i = 0; i < 100000; i++) {
        ml_tensor *n = ml_add_scalar(y, 1e-5);
        ml_release(y);
        y = n;
    }
    CHECK(ml_backward(y, NULL, false) == 0, "backward through 100000 nodes");
    expect("long chain gradient", x->grad, (double[]){1}, 1, 0);
    ml_release(y);      /* releases 100000 nodes iteratively */
    /* a graph dropped without backward is released the same way */
    y = ml_retain(x);
    for (int i = 0; i < 100000; i++) {
        ml_tensor *n = ml_mul_scalar(y, 1.0);
        ml_release(y);
        y = n;
    }
    ml_release(y);
    CHECK(x->refcount == 1, "graph released: the leaf is referenced once (%d)", x->refcount);
    ml_release(x);
}

static void test_saved_release(void) {
    ml_tensor *x = leaf(3, (double[]){1, 2, 3});
    int base = x->storage->refcount;
    ml_tensor *y = ml_mul(x, x);                 /* saves x twice */
    ml_tensor *s = ml_sum(y, 0, NULL, false);
    CHECK(x->storage->refcount == base + 2, "mul holds two saved aliases of x (%d)", x->storage->refcount - base);
    CHECK(ml_backward(s, NULL, true) == 0 && x->storage->refcount == base + 2, "retain_graph keeps saved tensors");
    CHECK(ml_backward(s, NULL, false) == 0 && x->storage->refcount == base, "backward frees saved tensors (%d)",
          x->storage->refcount - base);
    ml_release(s); ml_release(y);
    CHECK(x->refcount == 1 && x->storage->refcount == base, "nothing left referencing x");
    /* dropping the graph without backward frees them too */
    y = ml_mul(x, x);
    ml_tensor *z = ml_unary(ML_EXP, y);
    int with_graph = x->storage->refcount;
    ml_release(y); ml_release(z);
    CHECK(with_graph > base && x->storage->refcount == base, "releasing the output frees the graph");
    ml_release(x);
}

/* ---- view ops ----------------------------------------------------------- */

static ml_tensor *f_views(ml_tensor **x, void *ctx) {
    int which = *(int *)ctx;
    ml_tensor *t = x[0], *a = NULL, *b = NULL, *r = NULL;
    switch (which) {
    case 0: r = ml_view(t, 2, (int64_t[]){4, 6}); break;
    case 1: r = ml_permute(t, (int[]){2, 0, 1}); break;
    case 2: r = ml_narrow(t, 1, 1, 2); break;
    case 3: r = ml_select(t, 2, 3); break;
    case 4: a = ml_narrow(t, 0, 0, 1); r = ml_expand(a, 3, (int64_t[]){5, 3, 4}); break;
    case 5: a = ml_transpose(t, 0, 2); r = ml_contiguous(a); break;
    case 6: a = ml_unsqueeze(t, 1); r = ml_squeeze(a, 1); break;
    case 7: a = ml_to_dtype(t, ML_F32); b = ml_mul(a, a); r = ml_to_dtype(b, ML_F64); break;
    case 8: a = ml_transpose(t, 0, 1); r = ml_view(a, 1, (int64_t[]){-1}); break;
    }
    ml_release(a); ml_release(b);
    return r;
}

static void test_view_gradchecks(void) {
    static const char *names[] = {"view", "permute", "narrow", "select", "expand", "contiguous",
                                  "unsqueeze+squeeze", "to_dtype f32 round trip", "view of transposed"};
    int64_t s[3] = {2, 3, 4};
    for (int k = 0; k < 9; k++) {
        ml_tensor *x[1] = {ml_randn(3, s, ML_F64, ml_cpu(), &gen)};
        char name[64];
        snprintf(name, sizeof name, "grad %s", names[k]);
        if (k == 7) {
            /* f32 round trip: only f32 precision */
            x[0]->requires_grad = true;
            ml_tensor *y = f_views(x, &k), *sum = ml_sum(y, 0, NULL, false);
            CHECK(ml_backward(sum, NULL, false) == 0 && x[0]->grad && x[0]->grad->dtype == ML_F64, "%s", name);
            double *g = ml_to_doubles(x[0]->grad), *v = ml_to_doubles(x[0]);
            int bad = 0;
            for (int i = 0; i < 24; i++) if (fabs(g[i] - 2 * v[i]) > 1e-5 * (1 + fabs(v[i]))) bad++;
            CHECK(!bad, "%s values", name);
            free(g); free(v);
            ml_release(y); ml_release(sum);
        } else {
            gradcheck(name, f_views, 1, x, 1, &k);
        }
        ml_release(x[0]);
    }
}

int main(void) {
    test_accumulation_and_retain();
    test_no_grad_detach_errors();
    test_hooks();
    test_diamond();
    test_long_chain();
    test_saved_release();
    test_view_gradchecks();
    return check_summary();
}
