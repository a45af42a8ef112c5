/* test_op_registry.c — the op registry (host/op_registry.h) as each node's
 * identity: its rows, the node every kernel op code and every other op
 * records, nodes built outside the registry; and the host semantics the
 * Lua bindings rely on: the in-place gate of copy_/fill_/zero_, the
 * arithmetic of a tensor with a number, indices counted from 1. */
#include "check.h"
#include "ops.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

static ml_tensor *leaf(int n, const double *v) {
    int64_t s = n;
    ml_tensor *t = ml_from_doubles(v, 1, &s, ML_F64);
    t->requires_grad = true;
    return t;
}

static ml_tensor *ints(int n, const double *v, ml_dtype dt) {
    int64_t s = n;
    return ml_from_doubles(v, 1, &s, dt);
}

static bool has(const char *s, const char *part) { return s && strstr(s, part) != NULL; }

static void expect(const char *what, ml_tensor *t, const double *want, int64_t n) {
    if (!t) { CHECK(0, "%s: got NULL: %s", what, ml_last_error()); return; }
    double *v = ml_to_doubles(t);
    int bad = ml_numel(t) != n;
    for (int64_t i = 0; i < n && !bad; i++)
        if (v[i] != want[i]) { CHECK(0, "%s[%lld]: %.12g, want %.12g", what, (long long)i, v[i], want[i]); bad = 1; }
    if (!bad) CHECK(1, "%s", what);
    free(v);
}

/* t's node is registry op `want` and prints its name. */
static void expect_node(const char *what, ml_tensor *t, const char *want) {
    if (!t) { CHECK(0, "%s: got NULL: %s", what, ml_last_error()); return; }
    const ml_node *n = t->grad_fn;
    CHECK(n && (unsigned)n->op < ML_OP_COUNT && strcmp(ml_op_name(n->op), want) == 0 && strcmp(n->name, want) == 0,
          "%s records registry op '%s' (got %s)", what, want, n ? n->name : "no node");
    ml_release(t);
}

static int find_op(const char *name) {
    for (int k = 0; k < ML_OP_COUNT; k++)
        if (strcmp(ml_op_info_of((ml_op)k)->name, name) == 0) return k;
    return -1;
}

static void test_rows(void) {
    int dup = 0;
    for (int a = 0; a < ML_OP_COUNT; a++) {
        const ml_op_info *o = ml_op_info_of((ml_op)a);
        CHECK(o && o->name && o->lua && o->name[0] && o->lua[0], "row %d has a name and a Lua name", a);
        CHECK(strcmp(ml_op_name((ml_op)a), o->name) == 0, "ml_op_name of row %d", a);
        for (int b = a + 1; b < ML_OP_COUNT; b++) dup += strcmp(o->name, ml_op_info_of((ml_op)b)->name) == 0;
    }
    CHECK(dup == 0, "op names are unique (%d duplicates)", dup);
    CHECK(!ml_op_info_of(ML_NODE_CUSTOM) && !ml_op_info_of(ML_NODE_UNRECORDED), "node kinds are no registry rows");
    CHECK(strcmp(ml_op_name(ML_NODE_CUSTOM), "custom") == 0 && strcmp(ml_op_name(ML_NODE_UNRECORDED), "unrecorded") == 0,
          "node kinds have names");
    CHECK(strcmp(ml_op_info_of(ML_OP_sdpa)->lua, "scaled_dot_product_attention") == 0 &&
          ml_op_info_of(ML_OP_sdpa)->where == (ML_LUA_CORE | ML_LUA_IN_F), "sdpa is F.scaled_dot_product_attention");
    CHECK(ml_op_info_of(ML_OP_add)->where == (ML_LUA_CORE | ML_LUA_AS_METHOD), "add is a core function and a method");
    CHECK(ml_op_info_of(ML_OP_view)->where == ML_LUA_AS_METHOD, "view is a method only");
    /* the ops that once escaped the registry */
    static const char *once_missing[] = {"floor", "round", "sign", "argmax", "unsqueeze", "to_device", "clone"};
    for (size_t k = 0; k < sizeof once_missing / sizeof *once_missing; k++)
        CHECK(find_op(once_missing[k]) >= 0, "%s is a registry op", once_missing[k]);
    CHECK(ml_op_info_of(ML_OP_argmax)->grad == ML_NO_GRAD && ml_op_info_of(ML_OP_argmax)->cuda, "argmax: no gradient, CUDA");
    CHECK(ml_op_info_of(ML_OP_to_device)->grad == ML_GRAD_BY_PARITY, "to_device's gradient is the parity suite's");
    CHECK(ml_op_info_of(ML_OP_floor)->grad == ML_GRAD && ml_op_info_of(ML_OP_floor)->cuda, "floor: gradient, CUDA");
}

/* Every unary kernel op code records the registry op of its own name. */
static void test_unary_nodes(void) {
    static const struct { ml_unop op; const char *name; } u[] = {
        {ML_NEG, "neg"}, {ML_SQRT, "sqrt"}, {ML_RSQRT, "rsqrt"}, {ML_EXP, "exp"}, {ML_LOG, "log"},
        {ML_ABS, "abs"}, {ML_SIN, "sin"}, {ML_COS, "cos"}, {ML_SILU, "silu"}, {ML_GELU, "gelu"},
        {ML_GELU_TANH, "gelu_tanh"}, {ML_QUICK_GELU, "quick_gelu"}, {ML_SIGMOID, "sigmoid"}, {ML_TANH, "tanh"},
        {ML_RELU, "relu"}, {ML_SQUARE, "square"}, {ML_ROUND, "round"}, {ML_FLOOR, "floor"}, {ML_SIGN, "sign"},
    };
    CHECK(sizeof u / sizeof *u == ML_NUM_UNOPS, "every unary op code is listed here");
    ml_tensor *x = leaf(2, (double[]){0.5, 1.25});
    for (size_t k = 0; k < sizeof u / sizeof *u; k++) expect_node(u[k].name, ml_unary(u[k].op, x), u[k].name);
    ml_release(x);
}

static void test_binary_nodes(void) {
    static const struct { ml_binop op; const char *name; } b[] = {
        {ML_ADD, "add"}, {ML_SUB, "sub"}, {ML_MUL, "mul"}, {ML_DIV, "div"}, {ML_POW, "pow"},
        {ML_MAXIMUM, "maximum"}, {ML_MINIMUM, "minimum"},
    };
    ml_tensor *x = leaf(2, (double[]){0.5, 1.25}), *y = leaf(2, (double[]){2, 0.75});
    for (size_t k = 0; k < sizeof b / sizeof *b; k++) expect_node(b[k].name, ml_binary(b[k].op, x, y), b[k].name);
    ml_tensor *c = ml_binary(ML_GT, x, y);
    CHECK(c && !c->grad_fn && c->dtype == ML_BOOL, "a comparison records nothing");
    ml_release(c);

    /* a tensor with a number: a - s is a + (-s), a / s is a * (1/s) */
    ml_tensor *r = ml_binary_scalar(ML_SUB, x, 2, false);
    expect("x - 2", r, (double[]){-1.5, -0.75}, 2);
    expect_node("x - 2", r, "add");
    r = ml_binary_scalar(ML_DIV, x, 4, false);
    expect("x / 4", r, (double[]){0.125, 0.3125}, 2);
    expect_node("x / 4", r, "mul");
    r = ml_sub_scalar(x, 0.5);
    expect("ml_sub_scalar", r, (double[]){0, 0.75}, 2);
    expect_node("ml_sub_scalar", r, "add");
    r = ml_div_scalar(x, 0.5);
    expect("ml_div_scalar", r, (double[]){1, 2.5}, 2);
    expect_node("ml_div_scalar", r, "mul");
    r = ml_binary_scalar(ML_SUB, x, 2, true);
    expect("2 - x", r, (double[]){1.5, 0.75}, 2);
    expect_node("2 - x", r, "sub");
    r = ml_binary_scalar(ML_DIV, x, 1, true);
    expect("1 / x", r, (double[]){2, 0.8}, 2);
    expect_node("1 / x", r, "div");
    r = ml_binary_scalar(ML_POW, x, 4, true);
    expect("4 ^ x", r, (double[]){2, pow(4, 1.25)}, 2);
    expect_node("4 ^ x", r, "pow");
    expect_node("x + 1", ml_binary_scalar(ML_ADD, x, 1, false), "add");
    expect_node("3 * x", ml_binary_scalar(ML_MUL, x, 3, true), "mul");
    expect_node("x ^ 3", ml_binary_scalar(ML_POW, x, 3, false), "pow");
    r = ml_binary_scalar(ML_GT, x, 1, false);
    CHECK(!r && has(ml_last_error(), "gt is not an arithmetic op"), "a comparison is refused: %s", ml_last_error());

    /* the rewritten forms still backpropagate: d(x/4 - x*2)/dx = 0.25 - 2 */
    ml_tensor *q = ml_div_scalar(x, 4), *p = ml_binary_scalar(ML_MUL, x, 2, false), *d = ml_sub(q, p);
    ml_tensor *s = ml_sum(d, 0, NULL, false);
    CHECK(s && ml_backward(s, NULL, false) == 0, "backward: %s", ml_last_error());
    expect("gradient through the rewritten ops", x->grad, (double[]){-1.75, -1.75}, 2);
    ml_release(s); ml_release(d); ml_release(p); ml_release(q);
    ml_release(x); ml_release(y);
}

static int passthrough_backward(ml_node *n, ml_tensor *gout, ml_tensor **gin) {
    gin[0] = ml_retain(gout);
    return 0;
}

static void test_other_nodes(void) {
    ml_tensor *x = leaf(4, (double[]){1, -2, 3, 0.5});
    int64_t s22[2] = {2, 2};
    expect_node("sum", ml_sum(x, 0, NULL, false), "sum");
    expect_node("mean", ml_mean(x, 0, NULL, false), "mean");
    expect_node("softmax", ml_softmax(x, 0), "softmax");
    expect_node("log_softmax", ml_log_softmax(x, 0), "log_softmax");
    expect_node("clamp", ml_clamp(x, 0, 1), "clamp");
    expect_node("to_dtype", ml_to_dtype(x, ML_F32), "to_dtype");
    expect_node("clone", ml_clone(x), "clone");
    expect_node("unsqueeze", ml_unsqueeze(x, 0), "unsqueeze");
    ml_tensor *v = ml_view(x, 2, s22);
    expect_node("view", ml_retain(v), "view");
    ml_tensor *t = ml_transpose(v, 0, 1);
    expect_node("transpose", ml_retain(t), "permute");
    expect_node("contiguous", ml_contiguous(t), "contiguous");
    expect_node("max", ml_max(v, 1, false), "max");
    ml_tensor *i = ml_argmax(v, 1, false);
    CHECK(i && !i->grad_fn, "argmax records nothing");
    ml_release(i); ml_release(t); ml_release(v);

    /* a node built outside the registry keeps its caller's name */
    ml_tensor *out = ml_mul_scalar(x, 1);
    ml_node *n = ml_node_begin_custom("my_backward", passthrough_backward, 1, &x);
    CHECK(n && n->op == ML_NODE_CUSTOM && strcmp(n->name, "my_backward") == 0, "custom node");
    if (n) ml_node_finish(n, out);
    ml_tensor *sum = ml_sum(out, 0, NULL, false);
    CHECK(sum && ml_backward(sum, NULL, false) == 0, "backward through the custom node: %s", ml_last_error());
    expect("its gradient", x->grad, (double[]){1, 1, 1, 1}, 4);
    ml_release(sum); ml_release(out); ml_release(x);
}

static void test_inplace_ops(void) {
    ml_tensor *w = leaf(2, (double[]){1, 2}), *src = ints(2, (double[]){5, 6}, ML_F64);
    int64_t v0 = w->storage->version;
    CHECK(ml_inplace_copy_(w, src) < 0 && has(ml_last_error(), "copy_: in-place op on a leaf"),
          "copy_ into a leaf requiring grad: %s", ml_last_error());
    CHECK(ml_inplace_fill_(w, 3) < 0 && has(ml_last_error(), "fill_: in-place op on a leaf"), "fill_: %s",
          ml_last_error());
    CHECK(ml_inplace_zero_(w) < 0 && has(ml_last_error(), "zero_: in-place op on a leaf"), "zero_: %s",
          ml_last_error());
    CHECK(w->storage->version == v0, "refused writes bump nothing");
    ml_tensor *y = ml_mul_scalar(w, 2);
    CHECK(ml_inplace_zero_(y) < 0 && has(ml_last_error(), "zero_: in-place op on a tensor that is part"),
          "a graph tensor: %s", ml_last_error());
    ml_release(y);

    bool prev = ml_set_grad_enabled(false);
    CHECK(ml_inplace_copy_(w, src) == 0 && w->storage->version == v0 + 1, "copy_ under no_grad, bumped");
    expect("copied", w, (double[]){5, 6}, 2);
    CHECK(ml_inplace_fill_(w, 7) == 0 && w->storage->version == v0 + 2, "fill_ bumped");
    expect("filled", w, (double[]){7, 7}, 2);
    CHECK(ml_inplace_zero_(w) == 0 && w->storage->version == v0 + 3, "zero_ bumped");
    expect("zeroed", w, (double[]){0, 0}, 2);
    ml_set_grad_enabled(prev);

    /* sub_ and div_ are add_ and mul_ with -alpha, -s and 1/s */
    ml_tensor *d = ints(2, (double[]){10, 20}, ML_F64);
    CHECK(ml_sub_(d, src, 2) == 0, "sub_ with alpha");
    expect("d - 2 src", d, (double[]){0, 8}, 2);
    CHECK(ml_sub_scalar_(d, 1) == 0 && ml_div_scalar_(d, 4) == 0, "sub_ and div_ by numbers");
    expect("(d - 1) / 4", d, (double[]){-0.25, 1.75}, 2);
    CHECK(ml_inplace_copy_(NULL, src) < 0 && has(ml_last_error(), "copy_: missing"), "missing tensor");
    ml_release(d); ml_release(src); ml_release(w);
}

static void test_index_base(void) {
    int64_t s23[2] = {2, 3};
    ml_tensor *x = ml_from_doubles((double[]){1, 2, 3, 4, 5, 6}, 2, s23, ML_F64);
    x->requires_grad = true;
    int64_t s12[2] = {1, 3};
    ml_tensor *i1 = ml_from_doubles((double[]){2, 1, 2}, 2, s12, ML_I64);
    ml_tensor *i0 = ml_from_doubles((double[]){1, 0, 1}, 2, s12, ML_I64);
    ml_tensor *a = ml_gather_ex(x, 0, i1, 1), *b = ml_gather(x, 0, i0);
    expect("gather from 1", a, (double[]){4, 2, 6}, 3);
    expect("gather from 0", b, (double[]){4, 2, 6}, 3);
    CHECK(i1->dtype == ML_I64 && i1->storage->version == 0, "the caller's index is left as it was");
    expect("the caller's index values", i1, (double[]){2, 1, 2}, 3);
    ml_tensor *s = ml_sum(a, 0, NULL, false);
    CHECK(s && ml_backward(s, NULL, false) == 0, "backward of gather from 1: %s", ml_last_error());
    expect("its gradient scatters to the 1-based rows", x->grad, (double[]){0, 1, 0, 1, 0, 1}, 6);
    ml_release(s); ml_release(a); ml_release(b);

    ml_tensor *sel = ints(3, (double[]){3, 1, 3}, ML_I32);
    a = ml_index_select_ex(x, 1, sel, 1);
    expect("index_select from 1, int32", a, (double[]){3, 1, 3, 6, 4, 6}, 6);
    ml_release(a);
    ml_tensor *zero = ints(1, (double[]){0}, ML_I64);
    a = ml_index_select_ex(x, 1, zero, 1);
    CHECK(!a && has(ml_last_error(), "out of range"), "index 0 counted from 1 is out of range: %s", ml_last_error());
    ml_tensor *fi = ints(1, (double[]){1}, ML_F32);
    a = ml_gather_ex(x, 0, fi, 1);
    CHECK(!a && has(ml_last_error(), "int32 or int64"), "a float index is refused before any shift: %s",
          ml_last_error());

    ml_tensor *am = ml_argmax_ex(x, 1, false, 1), *am0 = ml_argmax(x, 1, false);
    expect("argmax from 1", am, (double[]){3, 3}, 2);
    expect("argmax from 0", am0, (double[]){2, 2}, 2);
    CHECK(am && am->dtype == ML_I64 && !am->grad_fn, "int64 indices, no node");
    ml_release(am); ml_release(am0); ml_release(fi); ml_release(zero); ml_release(sel);
    ml_release(i0); ml_release(i1); ml_release(x);
}

int main(void) {
    test_rows();
    test_unary_nodes();
    test_binary_nodes();
    test_other_nodes();
    test_inplace_ops();
    test_index_base();
    return check_summary();
}
