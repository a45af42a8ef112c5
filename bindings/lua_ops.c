/* lua_ops.c — Lua bindings of host/ops.h: argument checks, 1-based dims,
 * numbers accepted where a tensor operand is expected.  The functions of
 * the registry's ops (host/op_registry.h) are bound under their Lua names
 * from ML_OP_LIST, and the registry itself is moonlit.core.op_registry(),
 * from which the Lua library (lua/moonlit/init.lua, functional.lua) makes
 * the tensor methods and ml.F. */
#include "mlua.h"
#include "ops.h"
#include "op_registry.h"
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

/* ---- elementwise -------------------------------------------------------- */

/* a op b where either side may be a Lua number.  A number with add, sub,
 * mul or div (either side) or as pow's exponent is the host's arithmetic
 * of a tensor with a number (ml_binary_scalar); any other number becomes a
 * 0-dim tensor of the other operand's kind. */
static int binary_impl(lua_State *L, ml_binop op) {
    bool an = lua_type(L, 1) == LUA_TNUMBER, bn = lua_type(L, 2) == LUA_TNUMBER;
    if (an && bn) return luaL_error(L, "expected at least one tensor operand");
    bool arith = op == ML_ADD || op == ML_SUB || op == ML_MUL || op == ML_DIV;
    if (bn && (arith || op == ML_POW))
        return mlua_push_tensor(L, ml_binary_scalar(op, mlua_check_tensor(L, 1), lua_tonumber(L, 2), false));
    if (an && arith)
        return mlua_push_tensor(L, ml_binary_scalar(op, mlua_check_tensor(L, 2), lua_tonumber(L, 1), true));
    /* check both operands before taking references: an error must not leak one */
    ml_tensor *like = an ? mlua_check_tensor(L, 2) : mlua_check_tensor(L, 1);
    if (!an && !bn) mlua_check_tensor(L, 2);
    ml_tensor *a = mlua_tensor_or_scalar(L, 1, like);
    ml_tensor *b = mlua_tensor_or_scalar(L, 2, like);
    ml_tensor *r = ml_binary(op, a, b);
    ml_release(a);
    ml_release(b);
    return mlua_push_tensor(L, r);
}

static int unary_impl(lua_State *L, ml_unop op) { return mlua_push_tensor(L, ml_unary(op, mlua_check_tensor(L, 1))); }

/* The bindings of the registry's binary and unary ops: each op with its
 * kernel op code.  The names are parenthesised because luaconf.h defines
 * l_floor as a function-like macro. */
#define BINARY_BINDING(lua, code) static int (l_##lua)(lua_State *L) { return binary_impl(L, code); }
#define UNARY_BINDING(lua, code) static int (l_##lua)(lua_State *L) { return unary_impl(L, code); }
BINARY_BINDING(add, ML_ADD)
BINARY_BINDING(sub, ML_SUB)
BINARY_BINDING(mul, ML_MUL)
BINARY_BINDING(div, ML_DIV)
BINARY_BINDING(pow, ML_POW)
BINARY_BINDING(maximum, ML_MAXIMUM)
BINARY_BINDING(minimum, ML_MINIMUM)
BINARY_BINDING(eq, ML_EQ)
BINARY_BINDING(ne, ML_NE)
BINARY_BINDING(lt, ML_LT)
BINARY_BINDING(le, ML_LE)
BINARY_BINDING(gt, ML_GT)
BINARY_BINDING(ge, ML_GE)
UNARY_BINDING(neg, ML_NEG)
UNARY_BINDING(sqrt, ML_SQRT)
UNARY_BINDING(rsqrt, ML_RSQRT)
UNARY_BINDING(exp, ML_EXP)
UNARY_BINDING(log, ML_LOG)
UNARY_BINDING(abs, ML_ABS)
UNARY_BINDING(sin, ML_SIN)
UNARY_BINDING(cos, ML_COS)
UNARY_BINDING(square, ML_SQUARE)
UNARY_BINDING(round, ML_ROUND)
UNARY_BINDING(floor, ML_FLOOR)
UNARY_BINDING(sign, ML_SIGN)
UNARY_BINDING(silu, ML_SILU)
UNARY_BINDING(gelu, ML_GELU)
UNARY_BINDING(gelu_tanh, ML_GELU_TANH)
UNARY_BINDING(quick_gelu, ML_QUICK_GELU)
UNARY_BINDING(sigmoid, ML_SIGMOID)
UNARY_BINDING(tanh, ML_TANH)
UNARY_BINDING(relu, ML_RELU)
#undef BINARY_BINDING
#undef UNARY_BINDING

static int l_clamp(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    double lo = luaL_optnumber(L, 2, -INFINITY), hi = luaL_optnumber(L, 3, INFINITY);
    return mlua_push_tensor(L, ml_clamp(x, lo, hi));
}

/* geglu(h): h[..., :n] * gelu(h[..., n:]) for h [..., 2n] */
static int l_geglu(lua_State *L) { return mlua_push_tensor(L, ml_geglu(mlua_check_tensor(L, 1))); }

static int l_where(lua_State *L) {
    ml_tensor *c = mlua_check_tensor(L, 1);
    ml_tensor *like = lua_type(L, 2) == LUA_TNUMBER ? mlua_check_tensor(L, 3) : mlua_check_tensor(L, 2);
    if (lua_type(L, 3) != LUA_TNUMBER) mlua_check_tensor(L, 3);   /* before any reference is taken */
    ml_tensor *a = mlua_tensor_or_scalar(L, 2, like), *b = mlua_tensor_or_scalar(L, 3, like);
    ml_tensor *r = ml_where(c, a, b);
    ml_release(a);
    ml_release(b);
    return mlua_push_tensor(L, r);
}

/* ---- in-place ----------------------------------------------------------- */

static int l_add_(lua_State *L) {
    ml_tensor *d = mlua_check_tensor(L, 1);
    int rc;
    if (lua_type(L, 2) == LUA_TNUMBER) rc = ml_add_scalar_(d, lua_tonumber(L, 2));
    else rc = ml_add_(d, mlua_check_tensor(L, 2), luaL_optnumber(L, 3, 1.0));
    if (rc < 0) return mlua_error(L, NULL);
    lua_settop(L, 1);
    return 1;
}

static int l_sub_(lua_State *L) {
    ml_tensor *d = mlua_check_tensor(L, 1);
    int rc;
    if (lua_type(L, 2) == LUA_TNUMBER) rc = ml_sub_scalar_(d, lua_tonumber(L, 2));
    else rc = ml_sub_(d, mlua_check_tensor(L, 2), luaL_optnumber(L, 3, 1.0));
    if (rc < 0) return mlua_error(L, NULL);
    lua_settop(L, 1);
    return 1;
}

static int l_mul_(lua_State *L) {
    ml_tensor *d = mlua_check_tensor(L, 1);
    int rc = lua_type(L, 2) == LUA_TNUMBER ? ml_mul_scalar_(d, lua_tonumber(L, 2))
                                           : ml_mul_(d, mlua_check_tensor(L, 2));
    if (rc < 0) return mlua_error(L, NULL);
    lua_settop(L, 1);
    return 1;
}

static int l_div_(lua_State *L) {
    ml_tensor *d = mlua_check_tensor(L, 1);
    int rc = lua_type(L, 2) == LUA_TNUMBER ? ml_div_scalar_(d, lua_tonumber(L, 2))
                                           : ml_div_(d, mlua_check_tensor(L, 2));
    if (rc < 0) return mlua_error(L, NULL);
    lua_settop(L, 1);
    return 1;
}

static int l_clamp_(lua_State *L) {
    ml_tensor *d = mlua_check_tensor(L, 1);
    if (ml_clamp_(d, luaL_optnumber(L, 2, -INFINITY), luaL_optnumber(L, 3, INFINITY)) < 0)
        return mlua_error(L, NULL);
    lua_settop(L, 1);
    return 1;
}

/* adamw_step_(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step [, seed, offset])
 * seed/offset pick the stochastic-rounding bits of a bf16 step; without
 * them the default generator supplies them and moves past what was used. */
static int l_adamw_step_(lua_State *L) {
    ml_tensor *p = mlua_check_tensor(L, 1), *g = mlua_check_tensor(L, 2);
    ml_tensor *m = mlua_check_tensor(L, 3), *v = mlua_check_tensor(L, 4);
    double lr = luaL_checknumber(L, 5), b1 = luaL_checknumber(L, 6), b2 = luaL_checknumber(L, 7);
    double eps = luaL_checknumber(L, 8), wd = luaL_checknumber(L, 9);
    lua_Integer step = mlua_check_integer(L, 10, "adamw_step_: step", 1, LUA_MAXINTEGER);
    ml_generator *gen = NULL;
    uint64_t seed, offset;
    if (lua_isnoneornil(L, 11)) {
        gen = ml_default_generator();
        seed = gen->seed;
        offset = gen->offset;
    } else {
        /* 64-bit patterns: negative integers are the seeds above 2^63 */
        seed = (uint64_t)mlua_check_integer(L, 11, "adamw_step_: seed", LUA_MININTEGER, LUA_MAXINTEGER);
        offset = (uint64_t)mlua_opt_integer(L, 12, "adamw_step_: offset", 0, LUA_MININTEGER, LUA_MAXINTEGER);
    }
    if (ml_adamw_step_(p, g, m, v, lr, b1, b2, eps, wd, step, seed, offset) < 0) return mlua_error(L, NULL);
    if (gen) gen->offset += ml_adamw_random_blocks(p, m, v);
    return 0;
}

/* cast_as(t, shadow): t in shadow's dtype without a copy, recorded as a
 * conversion of t (ml_cast_as; the autocast cache of moonlit.nn). */
static int l_cast_as(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1), *shadow = mlua_check_tensor(L, 2);
    return mlua_push_tensor(L, ml_cast_as(t, shadow));
}

/* storage_version(t): how many in-place writes t's storage has seen (any
 * view, any op, optimizer steps included); the autocast cache compares it
 * with the version a shadow was made from. */
static int l_storage_version(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    lua_pushinteger(L, (lua_Integer)t->storage->version);
    return 1;
}

/* The tensors of the list at idx, borrowed (the list keeps them alive), in
 * a scratch array owned by the Lua stack.  want >= 0: the length it must
 * have (`what`'s length is compared with `against`'s). */
static ml_tensor **check_tensor_list(lua_State *L, int idx, const char *op, const char *what, int64_t want,
                                     const char *against, int64_t *n_out) {
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_Integer n = luaL_len(L, idx);
    if (want >= 0 && n != want)
        luaL_error(L, "%s: %d %s but %d %s", op, (int)want, against, (int)n, what);
    if (n > INT_MAX) luaL_error(L, "%s: %s: too many tensors", op, what);
    ml_tensor **ts = lua_newuserdatauv(L, (size_t)(n > 0 ? n : 1) * sizeof *ts, 0);
    for (lua_Integer i = 0; i < n; i++) {
        lua_geti(L, idx, i + 1);
        mlua_tensor_box *b = luaL_testudata(L, -1, MLUA_TENSOR);
        if (!b || !b->t)
            luaL_error(L, "%s: %s: element %d is not a live tensor (got %s)", op, what, (int)(i + 1),
                       b ? "a freed tensor" : luaL_typename(L, -1));
        ts[i] = b->t;
        lua_pop(L, 1);
    }
    *n_out = n;
    return ts;
}

/* adamw_multi_(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps,
 *              weight_decay, steps [, {seed =, offset =, grad_scale =, shadows =}])
 * One fused AdamW step over lists of equal length; steps is one integer for
 * all or a list (one per parameter).  Without a seed the default generator
 * supplies the stochastic-rounding bits and moves past all of them, as a
 * loop of adamw_step_ calls would.  grad_scale: a one-element f32 tensor on
 * the parameters' device multiplying every gradient (clip_grad_norm's
 * coefficient, never read back to the host).  shadows: per parameter an
 * autocast shadow to refresh with the new weight (ml_adamw_args). */
static int l_adamw_multi_(lua_State *L) {
    const char *op = "adamw_multi_";
    lua_settop(L, 11);   /* the scratch arrays below must not land in the options' slot */
    int64_t n, k;
    ml_tensor **p = check_tensor_list(L, 1, op, "params", -1, NULL, &n);
    ml_tensor **g = check_tensor_list(L, 2, op, "grads", n, "params", &k);
    ml_tensor **m = check_tensor_list(L, 3, op, "exp_avgs", n, "params", &k);
    ml_tensor **v = check_tensor_list(L, 4, op, "exp_avg_sqs", n, "params", &k);
    ml_adamw_args a = {0};
    a.lr = luaL_checknumber(L, 5);
    a.beta1 = luaL_checknumber(L, 6);
    a.beta2 = luaL_checknumber(L, 7);
    a.eps = luaL_checknumber(L, 8);
    a.weight_decay = luaL_checknumber(L, 9);
    int64_t *steps = lua_newuserdatauv(L, (size_t)(n > 0 ? n : 1) * sizeof *steps, 0);
    if (lua_type(L, 10) == LUA_TTABLE) {
        if (luaL_len(L, 10) != n) luaL_error(L, "%s: %d params but %d steps", op, (int)n, (int)luaL_len(L, 10));
        for (int64_t i = 0; i < n; i++) {
            lua_geti(L, 10, i + 1);
            steps[i] = mlua_check_integer(L, -1, "adamw_multi_: step", 1, LUA_MAXINTEGER);
            lua_pop(L, 1);
        }
    } else {
        lua_Integer s = mlua_check_integer(L, 10, "adamw_multi_: step", 1, LUA_MAXINTEGER);
        for (int64_t i = 0; i < n; i++) steps[i] = s;
    }
    int opts = 11;
    if (!lua_isnoneornil(L, opts)) luaL_checktype(L, opts, LUA_TTABLE);
    ml_generator *gen = NULL;
    bool has_seed = false;
    if (lua_istable(L, opts)) {
        lua_getfield(L, opts, "seed");
        has_seed = !lua_isnil(L, -1);
        lua_pop(L, 1);
        /* shadows: a table indexed like params, each entry a tensor or
         * absent (nil or false): the autocast shadows the step refreshes. */
        lua_getfield(L, opts, "shadows");
        if (!lua_isnil(L, -1)) {
            if (!lua_istable(L, -1)) luaL_error(L, "%s: shadows must be a table (got %s)", op, luaL_typename(L, -1));
            ml_tensor **sh = lua_newuserdatauv(L, (size_t)(n > 0 ? n : 1) * sizeof *sh, 0);
            for (int64_t i = 0; i < n; i++) {
                lua_geti(L, -2, i + 1);
                if (lua_isnil(L, -1) || (lua_isboolean(L, -1) && !lua_toboolean(L, -1))) {
                    sh[i] = NULL;
                } else {
                    mlua_tensor_box *b = luaL_testudata(L, -1, MLUA_TENSOR);
                    if (!b || !b->t)
                        luaL_error(L, "%s: shadows: element %d is not a live tensor (got %s)", op, (int)(i + 1),
                                   b ? "a freed tensor" : luaL_typename(L, -1));
                    sh[i] = b->t;   /* the options table keeps it alive */
                }
                lua_pop(L, 1);
            }
            a.shadows = sh;
            /* keep the scratch array below the options: park it in the
             * stack slot after the table, popped only when the call ends */
            lua_insert(L, -2);
        }
        lua_pop(L, 1);
        lua_getfield(L, opts, "grad_scale");
        if (!lua_isnil(L, -1)) {
            mlua_tensor_box *b = luaL_testudata(L, -1, MLUA_TENSOR);
            if (!b || !b->t) luaL_error(L, "%s: grad_scale must be a live tensor (got %s)", op, luaL_typename(L, -1));
            a.grad_scale = b->t;   /* the options table keeps it alive */
        }
        lua_pop(L, 1);
    }
    if (has_seed) {
        /* 64-bit patterns: negative integers are the seeds above 2^63 */
        a.seed = (uint64_t)mlua_opt_field_integer(L, opts, "seed", 0, LUA_MININTEGER, LUA_MAXINTEGER);
        a.offset = (uint64_t)mlua_opt_field_integer(L, opts, "offset", 0, LUA_MININTEGER, LUA_MAXINTEGER);
    } else {
        gen = ml_default_generator();
        a.seed = gen->seed;
        a.offset = gen->offset;
    }
    uint64_t used = 0;
    if (ml_adamw_multi_(n, p, g, m, v, steps, &a, &used) < 0) return mlua_error(L, NULL);
    if (gen) gen->offset += used;
    return 0;
}

/* grad_norm_multi(tensors, norm_type, max_norm) -> norm, coef: the total
 * norm of the list and the clip coefficient min(1, max_norm / (norm +
 * 1e-6)), both 0-dim f32 tensors on the tensors' device (no host sync). */
static int l_grad_norm_multi(lua_State *L) {
    lua_settop(L, 3);
    int64_t n;
    ml_tensor **xs = check_tensor_list(L, 1, "grad_norm_multi", "tensors", -1, NULL, &n);
    double norm_type = luaL_checknumber(L, 2), max_norm = luaL_checknumber(L, 3);
    ml_tensor *norm, *coef;
    if (ml_grad_norm_multi(n, xs, norm_type, max_norm, &norm, &coef) < 0) return mlua_error(L, NULL);
    mlua_push_tensor(L, norm);
    mlua_push_tensor(L, coef);
    return 2;
}

/* scale_multi_(tensors, scale): every tensor *= scale (a one-element f32
 * tensor on their device) in place. */
static int l_scale_multi_(lua_State *L) {
    lua_settop(L, 2);
    int64_t n;
    ml_tensor **xs = check_tensor_list(L, 1, "scale_multi_", "tensors", -1, NULL, &n);
    ml_tensor *s = mlua_check_tensor(L, 2);
    if (ml_scale_multi_(n, xs, s) < 0) return mlua_error(L, NULL);
    return 0;
}

/* ---- reductions --------------------------------------------------------- */

/* dims argument: nil (all), a number, or a table of numbers (1-based). */
static int check_dims(lua_State *L, int idx, int ndim, int *dims) {
    if (lua_isnoneornil(L, idx)) return 0;
    if (lua_type(L, idx) == LUA_TNUMBER) { dims[0] = mlua_check_dim(L, idx, ndim); return 1; }
    luaL_checktype(L, idx, LUA_TTABLE);
    int n = (int)luaL_len(L, idx);
    if (n > ML_MAX_DIMS) luaL_argerror(L, idx, "too many dims");
    for (int i = 0; i < n; i++) {
        lua_geti(L, idx, i + 1);
        dims[i] = mlua_check_dim(L, lua_gettop(L), ndim);
        lua_pop(L, 1);
    }
    return n;
}

static int l_sum(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    int dims[ML_MAX_DIMS], n = check_dims(L, 2, x->ndim, dims);
    return mlua_push_tensor(L, ml_sum(x, n, dims, lua_toboolean(L, 3)));
}

static int l_mean(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    int dims[ML_MAX_DIMS], n = check_dims(L, 2, x->ndim, dims);
    return mlua_push_tensor(L, ml_mean(x, n, dims, lua_toboolean(L, 3)));
}

/* var(x, dims, {correction = 1, keepdim = false}) */
static int l_var(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    int dims[ML_MAX_DIMS], n = check_dims(L, 2, x->ndim, dims);
    int opts = lua_istable(L, 3) ? 3 : 0;
    int corr = (int)mlua_opt_field_integer(L, opts, "correction", 1, 0, INT_MAX);
    bool keep = mlua_opt_field_bool(L, opts, "keepdim", 0);
    return mlua_push_tensor(L, ml_var(x, n, dims, corr, keep));
}

/* max(x) -> value; max(x, dim, keepdim) -> values, indices (1-based) */
static int l_max(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    bool keep = lua_toboolean(L, 3);
    if (lua_isnoneornil(L, 2)) {
        int64_t n = ml_numel(x);
        ml_tensor *flat = ml_view(x, 1, &n);
        if (!flat) return mlua_error(L, "max");
        ml_tensor *r = ml_max(flat, 0, false);
        ml_release(flat);
        return mlua_push_tensor(L, r);
    }
    int d = mlua_check_dim(L, 2, x->ndim);
    mlua_push_tensor(L, ml_max(x, d, keep));
    ml_tensor *idx = ml_argmax_ex(x, d, keep, 1);
    if (!idx) return mlua_error(L, "max");
    mlua_push_tensor(L, idx);
    return 2;
}

static int l_argmax(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    int d = mlua_check_dim(L, 2, x->ndim);
    ml_tensor *idx = ml_argmax_ex(x, d, lua_toboolean(L, 3), 1);   /* 1-based like every Lua index */
    if (!idx) return mlua_error(L, "argmax");
    return mlua_push_tensor(L, idx);
}

/* norm(x, p = 2, dims = all, keepdim = false) */
static int l_norm(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    double p = luaL_optnumber(L, 2, 2.0);
    int dims[ML_MAX_DIMS], n = check_dims(L, 3, x->ndim, dims);
    return mlua_push_tensor(L, ml_norm(x, p, n, dims, lua_toboolean(L, 4)));
}

/* ---- linear algebra and nn ---------------------------------------------- */

static int l_matmul(lua_State *L) { return mlua_push_tensor(L, ml_matmul(mlua_check_tensor(L, 1), mlua_check_tensor(L, 2))); }

static int l_linear(lua_State *L) {
    return mlua_push_tensor(L, ml_linear(mlua_check_tensor(L, 1), mlua_check_tensor(L, 2), mlua_opt_tensor(L, 3)));
}

/* Entry i (1-based) of the table on the top of the stack as an int of
 * [lo, INT_MAX]; errors name the option ("conv2d: padding[2]"). */
static int table_int(lua_State *L, const char *key, int i, int lo) {
    char what[64];
    snprintf(what, sizeof what, "conv2d: %s[%d]", key, i);
    lua_geti(L, -1, i);
    int v = mlua_check_int(L, -1, what, lo, INT_MAX);
    lua_pop(L, 1);
    return v;
}

/* A pair option: a number n -> (n, n); a table {a, b}; each in [lo, INT_MAX]. */
static void pair_opt(lua_State *L, int opts, const char *key, int def, int lo, int *a, int *b) {
    *a = *b = def;
    if (!opts) return;
    lua_getfield(L, opts, key);
    if (lua_type(L, -1) == LUA_TNUMBER) {
        char what[64];
        snprintf(what, sizeof what, "conv2d: %s", key);
        *a = *b = mlua_check_int(L, -1, what, lo, INT_MAX);
    } else if (lua_istable(L, -1)) {
        if (luaL_len(L, -1) != 2)
            luaL_error(L, "option '%s' must be a number or {h, w}%s", key,
                       strcmp(key, "padding") == 0 ? " or {top, bottom, left, right}" : "");
        *a = table_int(L, key, 1, lo);
        *b = table_int(L, key, 2, lo);
    } else if (!lua_isnil(L, -1)) luaL_error(L, "option '%s' must be a number or {h, w}", key);
    lua_pop(L, 1);
}

/* conv2d(x, w, b, {stride = 1, padding = 0}) — NHWC input, [O,kh,kw,I] weight */
static int l_conv2d(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1), *w = mlua_check_tensor(L, 2), *b = mlua_opt_tensor(L, 3);
    int opts = lua_istable(L, 4) ? 4 : 0;
    int sh, sw, ph, pw;
    pair_opt(L, opts, "stride", 1, 1, &sh, &sw);
    if (opts) {   /* padding = {top, bottom, left, right}: asymmetric (the VAE's downsampler) */
        lua_getfield(L, opts, "padding");
        bool four = lua_istable(L, -1) && luaL_len(L, -1) == 4;
        int p[4] = {0, 0, 0, 0};
        for (int i = 0; four && i < 4; i++) p[i] = table_int(L, "padding", i + 1, 0);
        lua_pop(L, 1);
        if (four) return mlua_push_tensor(L, ml_conv2d_ex(x, w, b, sh, sw, p[0], p[1], p[2], p[3]));
    }
    pair_opt(L, opts, "padding", 0, 0, &ph, &pw);
    return mlua_push_tensor(L, ml_conv2d(x, w, b, sh, sw, ph, pw));
}

/* group_norm(x, groups, weight, bias, eps = 1e-5, silu = false) */
static int l_group_norm(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    int g = mlua_check_int(L, 2, "group_norm: groups", 1, INT_MAX);
    return mlua_push_tensor(L, ml_group_norm(x, g, mlua_opt_tensor(L, 3), mlua_opt_tensor(L, 4),
                                             luaL_optnumber(L, 5, 1e-5), lua_toboolean(L, 6)));
}

static int l_layer_norm(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    return mlua_push_tensor(L, ml_layer_norm(x, mlua_opt_tensor(L, 2), mlua_opt_tensor(L, 3), luaL_optnumber(L, 4, 1e-5)));
}

static int l_softmax(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    int d = lua_isnoneornil(L, 2) ? x->ndim - 1 : mlua_check_dim(L, 2, x->ndim);
    return mlua_push_tensor(L, ml_softmax(x, d));
}

static int l_log_softmax(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    int d = lua_isnoneornil(L, 2) ? x->ndim - 1 : mlua_check_dim(L, 2, x->ndim);
    return mlua_push_tensor(L, ml_log_softmax(x, d));
}

/* sdpa(q, k, v, {causal = false, scale = 1/sqrt(D)}) with BSHD tensors */
static int l_scaled_dot_product_attention(lua_State *L) {
    ml_tensor *q = mlua_check_tensor(L, 1), *k = mlua_check_tensor(L, 2), *v = mlua_check_tensor(L, 3);
    int opts = lua_istable(L, 4) ? 4 : 0;
    return mlua_push_tensor(L, ml_sdpa(q, k, v, mlua_opt_field_bool(L, opts, "causal", 0),
                                       mlua_opt_field_number(L, opts, "scale", 0)));
}

static int l_embedding(lua_State *L) {
    return mlua_push_tensor(L, ml_embedding(mlua_check_tensor(L, 1), mlua_check_tensor(L, 2)));
}

/* cat({t1, t2, ...}, dim) / stack(...) */
static int list_op(lua_State *L, bool stack) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 2);   /* the scratch array below must not land in the dim slot */
    int n = (int)luaL_len(L, 1);
    if (n == 0) return luaL_argerror(L, 1, "expected a non-empty list of tensors");
    ml_tensor **ts = lua_newuserdatauv(L, n * sizeof *ts, 0);
    for (int i = 0; i < n; i++) {
        lua_geti(L, 1, i + 1);
        mlua_tensor_box *b = luaL_testudata(L, -1, MLUA_TENSOR);
        if (!b || !b->t)
            return luaL_argerror(L, 1, lua_pushfstring(L, "element %d is not a live tensor (got %s)",
                                                       i + 1, b ? "a freed tensor" : luaL_typename(L, -1)));
        ts[i] = b->t;
        lua_pop(L, 1);   /* the list keeps it alive */
    }
    int nd = ts[0]->ndim + (stack ? 1 : 0);
    int d = lua_isnoneornil(L, 2) ? 0 : mlua_check_dim(L, 2, nd);
    return mlua_push_tensor(L, stack ? ml_stack(n, ts, d) : ml_cat(n, ts, d));
}
static int l_cat(lua_State *L) { return list_op(L, false); }
static int l_stack(lua_State *L) { return list_op(L, true); }

/* gather/index_select take 1-based indices, as every Lua index is. */
static int l_gather(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    int d = mlua_check_dim(L, 2, x->ndim);
    return mlua_push_tensor(L, ml_gather_ex(x, d, mlua_check_tensor(L, 3), 1));
}

static int l_index_select(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    int d = mlua_check_dim(L, 2, x->ndim);
    return mlua_push_tensor(L, ml_index_select_ex(x, d, mlua_check_tensor(L, 3), 1));
}

static int l_upsample_nearest2d(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    return mlua_push_tensor(L, ml_upsample_nearest2d(x, mlua_opt_int(L, 2, "upsample_nearest2d: scale", 2, 1, INT_MAX)));
}

static int l_mse_loss(lua_State *L) {
    ml_tensor *a = mlua_check_tensor(L, 1), *b = mlua_check_tensor(L, 2);
    const char *r = luaL_optstring(L, 3, "mean");
    ml_reduction red = strcmp(r, "mean") == 0 ? ML_REDUCE_MEAN : strcmp(r, "sum") == 0 ? ML_REDUCE_SUM
                     : strcmp(r, "none") == 0 ? ML_REDUCE_NONE : (ml_reduction)-1;
    if ((int)red < 0) return luaL_argerror(L, 3, "reduction must be 'mean', 'sum' or 'none'");
    return mlua_push_tensor(L, ml_mse_loss(a, b, red));
}

static int l_dropout(lua_State *L) {
    ml_tensor *x = mlua_check_tensor(L, 1);
    double p = luaL_optnumber(L, 2, 0.5);
    if (p < 0 || p > 1) return luaL_argerror(L, 2, "dropout probability must be in [0, 1]");
    bool train = lua_isnone(L, 3) ? true : lua_toboolean(L, 3);
    return mlua_push_tensor(L, ml_dropout(x, p, train, NULL));
}

/* ---- random ------------------------------------------------------------- */

static int random_impl(lua_State *L, int kind) {
    int64_t shape[ML_MAX_DIMS];
    int first = 1;
    int64_t lo = 0, hi = 0;
    if (kind == 2) {                    /* randint(low, high, shape, opts) */
        lo = mlua_check_integer(L, 1, "randint: low", LUA_MININTEGER, LUA_MAXINTEGER);
        hi = mlua_check_integer(L, 2, "randint: high", LUA_MININTEGER, LUA_MAXINTEGER);
        if (hi <= lo)
            return luaL_error(L, "randint: high (%I) must be greater than low (%I)", (LUAI_UACINT)hi, (LUAI_UACINT)lo);
        first = 3;
    }
    int n = mlua_check_shape(L, first, shape);
    int next = lua_istable(L, first) ? first + 1 : first + n;
    int opts = lua_istable(L, next) ? next : 0;
    ml_device dev = mlua_opt_device(L, opts, ml_cpu());
    if (kind == 2) return mlua_push_tensor(L, ml_randint(lo, hi, n, shape, mlua_opt_dtype(L, opts, ML_I64), dev, NULL));
    ml_dtype dt = mlua_opt_dtype(L, opts, ML_F32);
    ml_tensor *t = kind == 0 ? ml_randn(n, shape, dt, dev, NULL) : ml_rand(n, shape, dt, dev, NULL);
    if (t && mlua_opt_field_bool(L, opts, "requires_grad", 0)) t->requires_grad = true;
    return mlua_push_tensor(L, t);
}
static int l_randn(lua_State *L) { return random_impl(L, 0); }
static int l_rand(lua_State *L) { return random_impl(L, 1); }
static int l_randint(lua_State *L) { return random_impl(L, 2); }

static int l_normal_(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    if (ml_normal_(t, luaL_optnumber(L, 2, 0), luaL_optnumber(L, 3, 1), NULL) < 0) return mlua_error(L, "normal_");
    lua_settop(L, 1);
    return 1;
}

static int l_uniform_(lua_State *L) {
    ml_tensor *t = mlua_check_tensor(L, 1);
    if (ml_uniform_(t, luaL_optnumber(L, 2, 0), luaL_optnumber(L, 3, 1), NULL) < 0) return mlua_error(L, "uniform_");
    lua_settop(L, 1);
    return 1;
}

static int l_manual_seed(lua_State *L) {
    ml_manual_seed((uint64_t)mlua_check_integer(L, 1, "manual_seed: seed", LUA_MININTEGER, LUA_MAXINTEGER));
    return 0;
}

/* get_rng_state() -> seed, offset; set_rng_state(seed, offset): for resume. */
static int l_get_rng_state(lua_State *L) {
    ml_generator *g = ml_default_generator();
    lua_pushinteger(L, (lua_Integer)g->seed);
    lua_pushinteger(L, (lua_Integer)g->offset);
    return 2;
}

static int l_set_rng_state(lua_State *L) {
    ml_generator *g = ml_default_generator();
    g->seed = (uint64_t)mlua_check_integer(L, 1, "set_rng_state: seed", LUA_MININTEGER, LUA_MAXINTEGER);
    g->offset = (uint64_t)mlua_check_integer(L, 2, "set_rng_state: offset", LUA_MININTEGER, LUA_MAXINTEGER);
    return 0;
}

/* ---- registry ----------------------------------------------------------- */

/* op_registry() -> the registry as a list, in its order, of
 *   {name =, lua =, differentiable =, gradcheck =, cuda =, fn =, method =, F =}
 * gradcheck: the gradient is checked by finite differences (GRAD); an op
 * that is differentiable without it is checked by the parity suite.  fn,
 * method, F: moonlit.core[lua], the tensor method t:<lua>() and ml.F[lua]
 * reach it. */
static int l_op_registry(lua_State *L) {
    lua_createtable(L, ML_OP_COUNT, 0);
    for (int k = 0; k < ML_OP_COUNT; k++) {
        const ml_op_info *op = ml_op_info_of((ml_op)k);
        lua_createtable(L, 0, 8);
        lua_pushstring(L, op->name); lua_setfield(L, -2, "name");
        lua_pushstring(L, op->lua); lua_setfield(L, -2, "lua");
        lua_pushboolean(L, op->grad != ML_NO_GRAD); lua_setfield(L, -2, "differentiable");
        lua_pushboolean(L, op->grad == ML_GRAD); lua_setfield(L, -2, "gradcheck");
        lua_pushboolean(L, op->cuda); lua_setfield(L, -2, "cuda");
        lua_pushboolean(L, (op->where & ML_LUA_CORE) != 0); lua_setfield(L, -2, "fn");
        lua_pushboolean(L, (op->where & ML_LUA_AS_METHOD) != 0); lua_setfield(L, -2, "method");
        lua_pushboolean(L, (op->where & ML_LUA_IN_F) != 0); lua_setfield(L, -2, "F");
        lua_rawseti(L, -2, k + 1);
    }
    return 1;
}

/* The registry's ops bound as moonlit.core functions: l_<lua> under <lua>. */
static const luaL_Reg op_funcs[] = {
#define CORE_FN_OF_OP(name, grad, cuda, lua, where) ML_OP_IF_CORE_FN(where, {#lua, l_##lua},)
    ML_OP_LIST(CORE_FN_OF_OP)
#undef CORE_FN_OF_OP
    {NULL, NULL},
};

/* The in-place writes: not registry ops (nothing is recorded; their
 * kernels are those of the ops above), both core functions and methods. */
static const luaL_Reg inplace_funcs[] = {
    {"add_", l_add_}, {"sub_", l_sub_}, {"mul_", l_mul_}, {"div_", l_div_}, {"clamp_", l_clamp_},
    {"normal_", l_normal_}, {"uniform_", l_uniform_},
    {NULL, NULL},
};

static const luaL_Reg funcs[] = {
    {"adamw_multi_", l_adamw_multi_}, {"grad_norm_multi", l_grad_norm_multi},
    {"storage_version", l_storage_version},
    {"scale_multi_", l_scale_multi_},
    {"manual_seed", l_manual_seed}, {"get_rng_state", l_get_rng_state},
    {"set_rng_state", l_set_rng_state}, {"op_registry", l_op_registry},
    {NULL, NULL},
};

void mlua_open_ops(lua_State *L) {
    luaL_setfuncs(L, op_funcs, 0);
    luaL_setfuncs(L, inplace_funcs, 0);
    luaL_setfuncs(L, funcs, 0);
    luaL_getmetatable(L, MLUA_TENSOR);
    lua_getfield(L, -1, "__methods");
    luaL_setfuncs(L, inplace_funcs, 0);
    lua_pop(L, 2);
}
