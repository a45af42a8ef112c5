/* test_autograd.c — the backward engine: accumulation, retain_graph,
 * no_grad, detach, hooks and the grad-ready callback, shared subgraphs,
 * errors, very long chains, release of saved tensors; saved-tensor version
 * checks and the in-place gate (tracked tensors, destinations whose
 * elements share memory); recording and accumulation failures (forced
 * with the failure-injection hook) and nodes saving many tensors; plus
 * gradient checks of the view ops, whose backward runs through sum_to_shape
 * and copies; and the wider-dtype gradient offer (ml_grad_dtype_hint). */
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

/* Activations go as backward passes them: when the first op of a chain runs
 * its backward, the ops after it have already released what they saved. */
static ml_tensor *g_watch;          /* a tensor a later op saved */
static int g_watch_refs = -1;       /* its storage's references seen from the first op's backward */
static int watch_backward(ml_node *n, ml_tensor *g, ml_tensor **gin) {
    g_watch_refs = g_watch->refcount + g_watch->storage->refcount;
    gin[0] = ml_retain(g);
    return 0;
}

static void test_saved_freed_during_backward(void) {
    for (int retain = 0; retain <= 1; retain++) {
        ml_tensor *x = leaf(3, (double[]){0.1, 0.2, 0.3});
        bool prev = ml_set_grad_enabled(false);
        ml_tensor *w = ml_clone(x);
        ml_set_grad_enabled(prev);
        ml_node *n = ml_node_begin_custom("watch", watch_backward, 1, &x);
        if (n) ml_node_finish(n, w);
        ml_tensor *a = ml_unary(ML_EXP, w), *b = ml_mul(a, a);   /* mul saves two aliases of a */
        ml_tensor *s = ml_sum(b, 0, NULL, false);
        g_watch = a;
        int before = a->refcount + a->storage->refcount;   /* ours + what the nodes saved of a */
        g_watch_refs = -1;
        CHECK(ml_backward(s, NULL, retain) == 0, "backward: %s", ml_last_error());
        if (retain)
            CHECK(g_watch_refs == before, "retain_graph keeps what mul saved (%d of %d refs)",
                  g_watch_refs, before);
        else
            CHECK(g_watch_refs == before - 2, "mul freed its two saved aliases of a before the first op's "
                  "backward ran (%d of %d refs)", g_watch_refs, before);
        ml_release(s); ml_release(b); ml_release(a); ml_release(w); ml_release(x);
    }
}

/* ---- saved-tensor versions and the in-place gate ------------------------ */

static bool has(const char *s, const char *part) { return s && strstr(s, part); }

static ml_tensor *constant(int n, double v) {
    int64_t s = n;
    return ml_full(1, &s, v, ML_F64, ml_cpu());
}

/* sum(w * x) with w a leaf and x a constant: mul saves x (w's gradient
 * reads it; w is saved only when x needs a gradient too). */
static ml_tensor *weighted_sum(ml_tensor *w, ml_tensor *x) {
    ml_tensor *y = ml_mul(w, x), *s = ml_sum(y, 0, NULL, false);
    ml_release(y);
    return s;
}

static void test_saved_versions(void) {
    /* the PyTorch example: x is modified after mul saved it */
    ml_tensor *w = leaf(3, (double[]){1, 1, 1}), *x = constant(3, 1);
    ml_tensor *s = weighted_sum(w, x);
    CHECK(ml_add_scalar_(x, 10) == 0, "in-place add on a constant is allowed in grad mode");
    CHECK(ml_backward(s, NULL, false) < 0, "backward after the saved input changed fails");
    const char *e = ml_last_error();
    CHECK(has(e, "modified by an inplace operation") && has(e, "'mul'") && has(e, "is at version 1") &&
          has(e, "expected version 0"), "the error names the op and the versions: %s", e);
    CHECK(!w->grad, "no gradient was written");
    ml_release(s);

    /* unmodified: the gradient is x (11 after the add) */
    s = weighted_sum(w, x);
    CHECK(ml_backward(s, NULL, false) == 0, "backward with the saved input intact: %s", ml_last_error());
    expect("gradient uses the values at save time", w->grad, (double[]){11, 11, 11}, 3, 0);
    ml_release(s); ml_release(x);

    /* two independent branches, one with a modified saved tensor: the
     * check runs before any node, so neither leaf gets a gradient */
    ml_release(w->grad); w->grad = NULL;
    ml_tensor *w1 = leaf(3, (double[]){1, 2, 3}), *c1 = constant(3, 1), *c2 = constant(3, 1);
    ml_tensor *s1 = weighted_sum(w1, c1), *s2 = weighted_sum(w, c2), *both = ml_add(s1, s2);
    CHECK(ml_mul_scalar_(c2, 3) == 0, "modify the second branch's constant");
    CHECK(ml_backward(both, NULL, false) < 0 && has(ml_last_error(), "modified by an inplace operation"),
          "two branches: %s", ml_last_error());
    CHECK(!w1->grad && !w->grad, "no partial gradients");
    ml_release(both); ml_release(s1); ml_release(s2); ml_release(c1); ml_release(c2); ml_release(w1);

    /* views share the version: a write through one view of x's storage
     * (or through x itself) is seen by a tensor saved through another */
    x = ml_zeros(2, (int64_t[]){2, 3}, ML_F64, ml_cpu());
    ml_tensor *row0 = ml_select(x, 0, 0), *row1 = ml_select(x, 0, 1);
    s = weighted_sum(w, row0);
    CHECK(ml_fill_(row1, 0) == 0 && ml_backward(s, NULL, true) == 0, "ml_fill_ alone is no in-place op: no bump");
    CHECK(ml_add_scalar_(row1, 1) == 0, "write through another view");
    CHECK(ml_backward(s, NULL, false) < 0 && has(ml_last_error(), "saved tensor 2 of 'mul'"),
          "a write through a sibling view is caught: %s", ml_last_error());
    ml_release(s);
    s = weighted_sum(w, row0);
    ml_tensor *all = ml_view(x, 1, (int64_t[]){6});
    CHECK(ml_mul_scalar_(all, 2) == 0, "write through a reshaped view of the base");
    CHECK(ml_backward(s, NULL, false) < 0 && has(ml_last_error(), "modified by an inplace operation"),
          "a write through the base is caught: %s", ml_last_error());
    ml_release(s); ml_release(all); ml_release(row0); ml_release(row1); ml_release(x);

    /* retain_graph, an optimizer-style update of the leaf, a second backward.
     * With x a constant, mul saves only x (w's gradient reads x, nothing
     * reads w), so stepping w leaves the graph valid, as in PyTorch; with
     * x needing a gradient too, w is saved and the step invalidates it. */
    ml_release(w->grad); w->grad = NULL;
    x = constant(3, 2);
    s = weighted_sum(w, x);
    CHECK(ml_backward(s, NULL, true) == 0, "first backward with retain_graph");
    ml_tensor *m = constant(3, 0), *v = constant(3, 0);
    bool prev = ml_set_grad_enabled(false);
    CHECK(ml_adamw_step_(w, w->grad, m, v, 0.1, 0.9, 0.999, 1e-8, 0, 1, 0, 0) == 0, "adamw step");
    ml_set_grad_enabled(prev);
    CHECK(ml_backward(s, NULL, false) == 0, "w is not saved when x needs no gradient: %s", ml_last_error());
    ml_release(s);
    x->requires_grad = true;
    ml_release(w->grad); w->grad = NULL;
    s = weighted_sum(w, x);
    CHECK(ml_backward(s, NULL, true) == 0, "first backward with retain_graph (x needs a gradient)");
    prev = ml_set_grad_enabled(false);
    CHECK(ml_adamw_step_(w, w->grad, m, v, 0.1, 0.9, 0.999, 1e-8, 0, 2, 0, 0) == 0, "adamw step");
    ml_set_grad_enabled(prev);
    ml_error("(no error)");
    CHECK(ml_backward(s, NULL, false) < 0 && has(ml_last_error(), "saved tensor 1 of 'mul'"),
          "second backward after the parameter was stepped fails: %s", ml_last_error());
    ml_release(s); ml_release(m); ml_release(v); ml_release(x); ml_release(w);
}

static void test_inplace_ops_bump(void) {
    ml_tensor *t = constant(4, 0.5), *o = constant(4, 1), *m = constant(4, 0), *v = constant(4, 0);
    ml_generator g = {1, 0};
    int64_t ver = t->storage->version;
    struct { const char *name; int rc; } ops[] = {
        {"add_", ml_add_(t, o, 1.0)},           {"add_ alpha", ml_add_(t, o, -2.0)},
        {"mul_", ml_mul_(t, o)},                {"mul_scalar_", ml_mul_scalar_(t, 0.5)},
        {"add_scalar_", ml_add_scalar_(t, 1)},  {"clamp_", ml_clamp_(t, -1, 1)},
        {"normal_", ml_normal_(t, 0, 1, &g)},   {"uniform_", ml_uniform_(t, 0, 1, &g)},
        {"adamw_step_", ml_adamw_step_(t, o, m, v, 0.1, 0.9, 0.999, 1e-8, 0, 1, 0, 0)},
    };
    for (size_t k = 0; k < sizeof ops / sizeof *ops; k++) {
        ver++;
        CHECK(ops[k].rc == 0, "%s ran", ops[k].name);
    }
    CHECK(t->storage->version == ver, "each in-place op bumped the version once (%lld, want %lld)",
          (long long)t->storage->version, (long long)ver);
    CHECK(m->storage->version == 1 && v->storage->version == 1 && o->storage->version == 0,
          "adamw bumps its moments; read-only operands stay");
    CHECK(ml_inplace_begin("fill_", t) == 0 && t->storage->version == ver + 1, "the shared gate bumps too");

    /* the gate refuses tracked tensors in grad mode and bumps nothing then */
    ml_tensor *w = leaf(2, (double[]){1, 2});
    int64_t wv = w->storage->version;
    CHECK(ml_add_scalar_(w, 1) < 0 && has(ml_last_error(), "add_: in-place op on a leaf"), "leaf refused: %s",
          ml_last_error());
    ml_tensor *y = ml_mul_scalar(w, 2);
    CHECK(ml_inplace_begin("copy_", y) < 0 && has(ml_last_error(), "copy_: in-place op on a tensor that is part"),
          "graph tensor refused: %s", ml_last_error());
    CHECK(w->storage->version == wv, "a refused write bumps nothing");
    bool prev = ml_set_grad_enabled(false);
    CHECK(ml_clamp_(w, 0, 1) == 0 && w->storage->version == wv + 1, "allowed under no_grad, and bumped");
    ml_set_grad_enabled(prev);
    ml_release(y); ml_release(w);
    ml_release(t); ml_release(o); ml_release(m); ml_release(v);
}

/* A layout for ml_check_no_internal_overlap, which reads shape and strides
 * only: no storage behind it. */
static int overlap_of(int nd, const int64_t *shape, const int64_t *strides) {
    ml_tensor t = {.ndim = nd};
    memcpy(t.shape, shape, (size_t)nd * sizeof *shape);
    memcpy(t.strides, strides, (size_t)nd * sizeof *strides);
    return ml_check_no_internal_overlap("probe", &t);
}

static void test_inplace_overlap(void) {
    /* every row of e is base's one row: an in-place write through e would
     * hit each element four times (add_(1) gave 5s) */
    ml_tensor *base = ml_full(2, (int64_t[]){1, 3}, 1, ML_F32, ml_cpu());
    ml_tensor *e = ml_expand(base, 2, (int64_t[]){4, 3});
    ml_tensor *src = ml_full(2, (int64_t[]){4, 3}, 2, ML_F32, ml_cpu());
    ml_generator g = {1, 0};
    int64_t ver = base->storage->version;
    /* each refusal names the op called: sub_ and div_ run as add_ and mul_ */
#define REFUSED(name, call) do { \
        const char *want_ = name ": more than one element of the written-to tensor refers to a single memory location"; \
        CHECK((call) < 0 && strncmp(ml_last_error(), want_, strlen(want_)) == 0, \
              "%s into expand(4, 3) refused: %s", #call, ml_last_error()); \
    } while (0)
    REFUSED("add_", ml_add_scalar_(e, 1));
    REFUSED("add_", ml_add_(e, src, 1.0));
    REFUSED("add_", ml_add_(e, src, 2.0));
    REFUSED("sub_", ml_sub_scalar_(e, 1));
    REFUSED("sub_", ml_sub_(e, src, 1.0));
    REFUSED("mul_", ml_mul_scalar_(e, 2));
    REFUSED("mul_", ml_mul_(e, src));
    REFUSED("div_", ml_div_scalar_(e, 2));
    REFUSED("clamp_", ml_clamp_(e, 0, 0.5));
    REFUSED("fill_", ml_inplace_fill_(e, 7));
    REFUSED("zero_", ml_inplace_zero_(e));
    REFUSED("copy_", ml_inplace_copy_(e, src));
    REFUSED("normal_", ml_normal_(e, 0, 1, &g));
    REFUSED("uniform_", ml_uniform_(e, 0, 1, &g));
#undef REFUSED
    bool prev = ml_set_grad_enabled(false);
    CHECK(ml_add_scalar_(e, 1) < 0, "refused under no_grad too");
    ml_set_grad_enabled(prev);
    CHECK(ml_add_scalar_(e, 1) < 0 && has(ml_last_error(), "shape [4, 3], strides [0, 1]") &&
          has(ml_last_error(), ":clone()") && has(ml_last_error(), ":contiguous()"),
          "the message names shape, strides and the way out: %s", ml_last_error());
    CHECK(base->storage->version == ver, "refused writes bump nothing");
    expect("base unchanged", base, (double[]){1, 1, 1}, 3, 0);

    /* layouts: dims of size 1 and empty tensors never overlap; a stride 0
     * of size > 1 always does; the others by the span of the smaller strides */
    CHECK(overlap_of(2, (int64_t[]){2, 3}, (int64_t[]){3, 1}) == 0, "contiguous");
    CHECK(overlap_of(2, (int64_t[]){3, 2}, (int64_t[]){1, 3}) == 0, "transposed");
    CHECK(overlap_of(3, (int64_t[]){4, 2, 3}, (int64_t[]){1, 12, 4}) == 0, "permuted");
    CHECK(overlap_of(2, (int64_t[]){2, 2}, (int64_t[]){3, 2}) == 0, "interleaved (2 * 2 > 3, yet 3 > span 2)");
    CHECK(overlap_of(1, (int64_t[]){5}, (int64_t[]){-1}) == 0, "negative stride");
    CHECK(overlap_of(2, (int64_t[]){3, 1}, (int64_t[]){1, 0}) == 0, "stride 0 on a size-1 dim");
    CHECK(overlap_of(2, (int64_t[]){0, 5}, (int64_t[]){0, 0}) == 0, "empty");
    CHECK(overlap_of(0, NULL, NULL) == 0, "0-dim");
    CHECK(overlap_of(2, (int64_t[]){3, 5}, (int64_t[]){1, 0}) < 0 && has(ml_last_error(), "probe: ") &&
          has(ml_last_error(), "shape [3, 5], strides [1, 0]"), "stride 0 last: %s", ml_last_error());
    CHECK(overlap_of(2, (int64_t[]){3, 2}, (int64_t[]){1, 2}) < 0, "steps of 1 and 2 meet ((2, 0) and (0, 1))");
    CHECK(overlap_of(2, (int64_t[]){2, 2}, (int64_t[]){1, 1}) < 0, "equal strides");
    CHECK(overlap_of(2, (int64_t[]){4, 2}, (int64_t[]){INT64_MAX / 2, INT64_MAX}) < 0,
          "a span past INT64_MAX saturates instead of wrapping");

    /* views that share no element are written as before */
    ml_tensor *x = ml_arange(0, 6, 1, ML_F32, ml_cpu());
    ml_tensor *x2 = ml_view(x, 2, (int64_t[]){2, 3}), *xt = ml_transpose(x2, 0, 1), *row = ml_narrow(xt, 0, 2, 1);
    CHECK(ml_add_scalar_(xt, 10) == 0 && ml_inplace_fill_(row, -1) == 0,
          "writes through a transpose and its narrow: %s", ml_last_error());
    expect("through the transpose", x, (double[]){10, 11, -1, 13, 14, -1}, 6, 0);
    ml_release(row); ml_release(xt); ml_release(x2); ml_release(x);
    ml_release(src); ml_release(e); ml_release(base);
}

/* ---- nodes built by hand ----------------------------------------------- */

/* "scale_by_saved": out = x * (sum of the n saved constants); backward
 * multiplies by the same sum read from the saved tensors. */
static int scale_by_saved_backward(ml_node *n, ml_tensor *gout, ml_tensor **gin) {
    double k = 0;
    for (int i = 0; i < n->n_saved; i++) {
        double v;
        if (ml_item(n->saved[i], &v) < 0) return -1;
        k += v;
    }
    gin[0] = ml_mul_scalar(gout, k);
    return gin[0] ? 0 : -1;
}

/* x (shape [n]) scaled by 1 + 2 + ... + count; the node saves `count`
 * constants (count > ML_NODE_SAVED_INLINE reaches the heap-held list).  If
 * fail_at >= 0 the saved list fails to grow at that save. */
static ml_tensor *scale_by_saved(ml_tensor *x, int count, int fail_at, ml_tensor **consts) {
    bool prev = ml_set_grad_enabled(false);
    double k = count * (count + 1) / 2.0;
    ml_tensor *out = ml_mul_scalar(x, k);
    ml_set_grad_enabled(prev);
    ml_node *n = ml_node_begin_custom("scale_by_saved", scale_by_saved_backward, 1, &x);
    for (int i = 0; n && i < count; i++) {
        if (i == fail_at) ml_autograd_fail_alloc_after(0);
        ml_node_save(n, consts[i]);
    }
    ml_autograd_fail_alloc_after(-1);
    if (n) ml_node_finish(n, out);
    return out;
}

static void test_many_saved(void) {
    enum { N = 20 };
    ml_tensor *consts[N];
    for (int i = 0; i < N; i++) consts[i] = ml_scalar(i + 1, ML_F64, ml_cpu());
    ml_tensor *x = leaf(2, (double[]){1, 2});
    ml_tensor *y = scale_by_saved(x, N, -1, consts), *s = ml_sum(y, 0, NULL, false);
    CHECK(y->grad_fn && y->grad_fn->n_saved == N, "twenty tensors saved (%d)", y->grad_fn ? y->grad_fn->n_saved : -1);
    CHECK(ml_backward(s, NULL, true) == 0, "backward reading all saved tensors: %s", ml_last_error());
    expect("gradient uses every saved tensor", x->grad, (double[]){210, 210}, 2, 0);
    /* the last one lives in the heap-held list: its version is checked too */
    CHECK(ml_add_scalar_(consts[N - 1], 1) == 0, "modify the 20th saved tensor");
    CHECK(ml_backward(s, NULL, false) < 0 && has(ml_last_error(), "saved tensor 20 of 'scale_by_saved'"),
          "the 20th saved tensor is version-checked: %s", ml_last_error());
    ml_release(s); ml_release(y);
    for (int i = 0; i < N; i++) ml_release(consts[i]);
    ml_release(x);
}

/* Gradient of the wrong shape: [2] for an input of shape [3]. */
static int wrong_shape_backward(ml_node *n, ml_tensor *gout, ml_tensor **gin) {
    gin[0] = ml_zeros(1, (int64_t[]){2}, ML_F64, ml_cpu());
    return gin[0] ? 0 : -1;
}

static void test_recording_errors(void) {
    /* a node asked for more inputs than it can hold */
    ml_tensor *ins[ML_NODE_MAX_INPUTS + 1];
    for (int i = 0; i <= ML_NODE_MAX_INPUTS; i++) ins[i] = leaf(1, (double[]){i});
    ml_tensor *out = ml_scalar(0, ML_F64, ml_cpu());
    ml_node *n = ml_node_begin_custom("nine_inputs", wrong_shape_backward, ML_NODE_MAX_INPUTS + 1, ins);
    CHECK(n != NULL, "a node is recorded");
    if (n) ml_node_finish(n, out);
    CHECK(ml_backward(out, NULL, false) < 0 && has(ml_last_error(), "'nine_inputs'") &&
          has(ml_last_error(), "more than"), "backward refuses it: %s", ml_last_error());
    ml_release(out);
    for (int i = 0; i <= ML_NODE_MAX_INPUTS; i++) ml_release(ins[i]);

    /* a backward returning a gradient of the wrong shape for an inner node */
    ml_tensor *x = leaf(3, (double[]){1, 2, 3});
    ml_tensor *u = ml_mul_scalar(x, 2);
    bool prev = ml_set_grad_enabled(false);
    ml_tensor *v = ml_clone(u);
    ml_set_grad_enabled(prev);
    n = ml_node_begin_custom("bad_shape", wrong_shape_backward, 1, &u);
    ml_node_finish(n, v);
    ml_tensor *s = ml_sum(v, 0, NULL, false);
    CHECK(ml_backward(s, NULL, false) < 0 && has(ml_last_error(), "backward of 'bad_shape' returned a gradient of "
          "shape [2] for input 1 of shape [3]"), "wrong gradient shape: %s", ml_last_error());
    CHECK(!x->grad, "no gradient written");
    ml_release(s); ml_release(v); ml_release(u); ml_release(x);
}

static void test_injected_failures(void) {
    ml_tensor *w = leaf(3, (double[]){1, 2, 3}), *x = constant(3, 2);

    /* the node of mul cannot be allocated: the op succeeds, backward says so */
    ml_autograd_fail_alloc_after(0);
    ml_tensor *y = ml_mul(w, x);
    ml_autograd_fail_alloc_after(-1);
    CHECK(y && y->requires_grad && y->grad_fn, "the result still requires grad");
    ml_tensor *z = ml_add_scalar(y, 1), *s = ml_sum(z, 0, NULL, false);
    CHECK(ml_backward(s, NULL, false) < 0 && has(ml_last_error(), "out of memory while recording") &&
          has(ml_last_error(), "'mul'"), "backward through the unrecorded node fails: %s", ml_last_error());
    CHECK(!w->grad, "no partial gradient");
    ml_tensor *ones = ml_full(1, (int64_t[]){3}, 1, ML_F64, ml_cpu());
    CHECK(ml_backward(y, ones, false) < 0 && has(ml_last_error(), "out of memory while recording"),
          "the unrecorded node as root is refused too: %s", ml_last_error());
    ml_release(ones); ml_release(s); ml_release(z); ml_release(y);
    /* the placeholder is shared: many failures and releases leave it usable */
    for (int k = 0; k < 3; k++) {
        ml_autograd_fail_alloc_after(0);
        y = ml_mul(w, x);
        ml_autograd_fail_alloc_after(-1);
        ml_release(y);
    }
    s = weighted_sum(w, x);
    CHECK(ml_backward(s, NULL, false) == 0, "recording works again afterwards: %s", ml_last_error());
    expect("and gives the gradient", w->grad, (double[]){2, 2, 2}, 3, 0);
    ml_release(s);
    ml_release(w->grad); w->grad = NULL;

    /* the saved list cannot grow past its inline part */
    ml_tensor *consts[12];
    for (int i = 0; i < 12; i++) consts[i] = ml_scalar(1, ML_F64, ml_cpu());
    y = scale_by_saved(w, 12, ML_NODE_SAVED_INLINE, consts);
    s = ml_sum(y, 0, NULL, false);
    CHECK(ml_backward(s, NULL, false) < 0 && has(ml_last_error(), "'scale_by_saved' was not fully recorded") &&
          has(ml_last_error(), "out of memory saving"), "a node missing saved tensors is refused: %s", ml_last_error());
    CHECK(!w->grad, "no gradient");
    ml_release(s); ml_release(y);
    for (int i = 0; i < 12; i++) ml_release(consts[i]);

    /* summing two gradients of a leaf fails */
    ml_tensor *a = ml_mul_scalar(w, 2), *b = ml_mul_scalar(w, 3), *c = ml_add(a, b);
    s = ml_sum(c, 0, NULL, false);
    ml_autograd_fail_alloc_after(0);
    int rc = ml_backward(s, NULL, true);
    ml_autograd_fail_alloc_after(-1);
    CHECK(rc < 0 && has(ml_last_error(), "summing the gradients for a leaf tensor of shape [3] failed") &&
          has(ml_last_error(), "out of memory"), "leaf accumulation failure: %s", ml_last_error());
    CHECK(!w->grad, "the gradient is not silently partial");
    CHECK(ml_backward(s, NULL, false) == 0, "the retained graph still works: %s", ml_last_error());
    expect("full gradient", w->grad, (double[]){5, 5, 5}, 3, 0);
    ml_release(s); ml_release(a); ml_release(b); ml_release(c);
    ml_release(w->grad); w->grad = NULL;

    /* summing two gradients of an inner node (u used twice) fails */
    ml_tensor *u = ml_add_scalar(w, 0), *uu = ml_mul(u, u);
    s = ml_sum(uu, 0, NULL, false);
    ml_autograd_fail_alloc_after(0);
    rc = ml_backward(s, NULL, false);
    ml_autograd_fail_alloc_after(-1);
    CHECK(rc < 0 && has(ml_last_error(), "summing the gradients for the output of 'add' failed"),
          "inner accumulation failure: %s", ml_last_error());
    CHECK(!w->grad, "no gradient");
    ml_release(s); ml_release(uu); ml_release(u);
    ml_release(x); ml_release(w);
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

/* ---- gradients written in the wider dtype (ml_grad_dtype_hint) ------------ */

/* "triple": out = 3 x.  Its backward writes the gradient in the dtype the
 * hint offers and records what it was offered and the storage it wrote. */
static ml_dtype hints_seen[4];
static int n_hints;
static const ml_storage *written[4];

static int triple_backward(ml_node *n, ml_tensor *gout, ml_tensor **gin) {
    ml_dtype dt = ml_grad_dtype_hint(n, 0, gout->dtype);
    ml_tensor *g = ml_mul_scalar(gout, 3);
    if (!g) return -1;
    gin[0] = dt == gout->dtype ? g : ml_to_dtype(g, dt);
    if (gin[0] != g) ml_release(g);
    if (!gin[0]) return -1;
    if (n_hints < 4) { written[n_hints] = gin[0]->storage; hints_seen[n_hints++] = dt; }
    return 0;
}

static ml_tensor *triple(ml_tensor *x) {
    bool prev = ml_set_grad_enabled(false);
    ml_tensor *out = ml_mul_scalar(x, 3);
    ml_set_grad_enabled(prev);
    ml_node *n = ml_node_begin_custom("triple", triple_backward, 1, &x);
    if (n) ml_node_finish(n, out);
    return out;
}

/* sum of the given tensors' sums, then backward; 0 / -1 */
static int backward_of_sums(int k, ml_tensor **ys) {
    ml_tensor *total = NULL;
    for (int i = 0; i < k; i++) {
        ml_tensor *s = ml_sum(ys[i], 0, NULL, false);
        ml_tensor *t = total ? ml_add(total, s) : ml_retain(s);
        ml_release(s); ml_release(total);
        total = t;
    }
    int rc = ml_backward(total, NULL, false);
    ml_release(total);
    return rc;
}

/* a plain (untracked) copy of t in dtype dt */
static ml_tensor *plain_copy(ml_tensor *t, ml_dtype dt) {
    ml_tensor *d = ml_detach(t), *c = ml_to_dtype(d, dt);
    ml_release(d);
    return c;
}

static void test_grad_dtype_hint(void) {
    const double v[4] = {1, -2, 0.5, 4}, three[4] = {3, 3, 3, 3}, six[4] = {6, 6, 6, 6};
    /* An f64 leaf seen in f32 by one consumer: offered f64, and the f64
     * gradient it wrote becomes the leaf's grad as is (no conversion). */
    ml_tensor *p = leaf(4, v), *c = ml_to_dtype(p, ML_F32), *y = triple(c);
    n_hints = 0;
    CHECK(backward_of_sums(1, &y) == 0, "hint: backward: %s", ml_last_error());
    CHECK(n_hints == 1 && hints_seen[0] == ML_F64, "hint: a conversion's only consumer is offered the wider f64");
    CHECK(p->grad && p->grad->dtype == ML_F64 && p->grad->storage == written[0],
          "hint: the gradient written in f64 is the leaf's grad itself (the conversion passed it on)");
    expect("hint: gradient values", p->grad, three, 4, 0);
    ml_release(y); ml_release(c);

    /* The same through cast_as (autocast's kept shadow). */
    ml_release(p->grad); p->grad = NULL;
    ml_tensor *shadow = plain_copy(p, ML_F32);
    c = ml_cast_as(p, shadow);
    y = triple(c);
    n_hints = 0;
    CHECK(backward_of_sums(1, &y) == 0 && n_hints == 1 && hints_seen[0] == ML_F64,
          "hint: cast_as's only consumer is offered f64");
    expect("hint: cast_as gradient values", p->grad, three, 4, 0);
    ml_release(y); ml_release(c);

    /* Two consumers of one conversion: neither is offered f64 (the second
     * would have its gradient summed with the first's f32 one). */
    ml_release(p->grad); p->grad = NULL;
    c = ml_to_dtype(p, ML_F32);
    ml_tensor *ys[2] = {triple(c), triple(c)};
    n_hints = 0;
    CHECK(backward_of_sums(2, ys) == 0 && n_hints == 2 && hints_seen[0] == ML_F32 && hints_seen[1] == ML_F32,
          "hint: a conversion with two consumers offers its own dtype to both");
    expect("hint: two consumers' gradient", p->grad, six, 4, 0);
    CHECK(p->grad && p->grad->dtype == ML_F64, "hint: two consumers: the leaf's grad is f64");
    ml_release(ys[0]); ml_release(ys[1]); ml_release(c);

    /* No conversion, or a narrower source: the input's own dtype. */
    ml_release(p->grad); p->grad = NULL;
    y = triple(p);
    n_hints = 0;
    CHECK(backward_of_sums(1, &y) == 0 && n_hints == 1 && hints_seen[0] == ML_F64,
          "hint: a leaf consumed directly: its own dtype");
    ml_release(y);
    ml_tensor *q = plain_copy(p, ML_F32);
    q->requires_grad = true;
    c = ml_to_dtype(q, ML_F64);
    y = triple(c);
    n_hints = 0;
    CHECK(backward_of_sums(1, &y) == 0 && n_hints == 1 && hints_seen[0] == ML_F64 && q->grad &&
          q->grad->dtype == ML_F32, "hint: a widening conversion offers nothing wider; the f32 leaf gets f32");
    expect("hint: widened leaf's gradient", q->grad, three, 4, 0);
    ml_release(y); ml_release(c); ml_release(q); ml_release(shadow); ml_release(p);
}

int main(void) {
    test_accumulation_and_retain();
    test_no_grad_detach_errors();
    test_hooks();
    test_diamond();
    test_long_chain();
    test_saved_release();
    test_saved_freed_during_backward();
    test_saved_versions();
    test_inplace_ops_bump();
    test_inplace_overlap();
    test_many_saved();
    test_recording_errors();
    test_injected_failures();
    test_view_gradchecks();
    test_grad_dtype_hint();
    return check_summary();
}
