/* op_registry.h — the list of ops, one line each: the one place that says
 * which ops exist, whether they have a gradient, whether they run on CUDA,
 * and how Lua reaches them.  The rest is generated from ML_OP_LIST:
 *
 *   - the op enum ml_op (ML_OP_add, ML_OP_sdpa, ...), each autograd node's
 *     identity; a node's printable name (errors, t.grad_fn) is the op's
 *     name here (ml_op_name);
 *   - the moonlit.core functions bound in bindings/lua_ops.c and the view
 *     methods bound in bindings/lua_tensor.c;
 *   - moonlit.core.op_registry(), from which lua/moonlit/init.lua makes the
 *     tensor methods and lua/moonlit/functional.lua the ml.F functions;
 *   - the tests' enforcement: an op with a gradient must have a
 *     finite-difference check (tests/lua/test_gradcheck.lua) and an op that
 *     runs on CUDA a CPU-vs-GPU parity case (tests/gpu/test_parity.lua), or
 *     the suite fails.
 *
 * ML_OP(name, grad, cuda, lua, where)
 *   name   the op (a C identifier): the enum ML_OP_<name> and the name
 *          autograd nodes print.
 *   grad   GRAD            differentiable; checked by finite differences on
 *                          the CPU in f64.
 *          GRAD_BY_PARITY  differentiable, but its gradient only means
 *                          something between two devices (to_device), so
 *                          the parity suite checks it: the GPU's gradient
 *                          against the CPU's.
 *          NO_GRAD         records no node: integer or bool results, random
 *                          draws, optimizer steps.
 *   cuda   1 if it runs on CUDA tensors (then it needs a parity case).
 *   lua    its Lua name; most ops keep their name (sdpa is
 *          scaled_dot_product_attention in Lua, adamw_step adamw_step_).
 *   where  how Lua reaches it:
 *          FN           moonlit.core.<lua> (so also ml.<lua>), bound in
 *                       bindings/lua_ops.c as l_<lua>;
 *          FN_METHOD    the same, and the tensor method t:<lua>();
 *          FN_F         the same, and ml.F.<lua>;
 *          FN_METHOD_F  all three;
 *          METHOD       only the tensor method t:<lua>(), bound in
 *                       bindings/lua_tensor.c as t_<lua> (views, copies);
 *          VIA_TO       the conversions t:to() and its shorthands
 *                       (t:float(), t:cuda(), ...) in bindings/lua_tensor.c.
 *
 * Nodes that are not ops (a backward written outside this list, the
 * placeholder of a node that could not be allocated) have their own kinds
 * after the ops in ml_op. */
#ifndef ML_OP_REGISTRY_H
#define ML_OP_REGISTRY_H

#include <stdbool.h>

#define ML_OP_LIST(ML_OP)                                                        \
    ML_OP(add,                GRAD,           1, add,                FN_METHOD)   \
    ML_OP(sub,                GRAD,           1, sub,                FN_METHOD)   \
    ML_OP(mul,                GRAD,           1, mul,                FN_METHOD)   \
    ML_OP(div,                GRAD,           1, div,                FN_METHOD)   \
    ML_OP(pow,                GRAD,           1, pow,                FN_METHOD)   \
    ML_OP(maximum,            GRAD,           1, maximum,            FN_METHOD)   \
    ML_OP(minimum,            GRAD,           1, minimum,            FN_METHOD)   \
    ML_OP(eq,                 NO_GRAD,        1, eq,                 FN_METHOD)   \
    ML_OP(ne,                 NO_GRAD,        1, ne,                 FN_METHOD)   \
    ML_OP(lt,                 NO_GRAD,        1, lt,                 FN_METHOD)   \
    ML_OP(le,                 NO_GRAD,        1, le,                 FN_METHOD)   \
    ML_OP(gt,                 NO_GRAD,        1, gt,                 FN_METHOD)   \
    ML_OP(ge,                 NO_GRAD,        1, ge,                 FN_METHOD)   \
    ML_OP(where,              GRAD,           1, where,              FN_F)        \
    ML_OP(neg,                GRAD,           1, neg,                FN_METHOD)   \
    ML_OP(sqrt,               GRAD,           1, sqrt,               FN_METHOD)   \
    ML_OP(rsqrt,              GRAD,           1, rsqrt,              FN_METHOD)   \
    ML_OP(exp,                GRAD,           1, exp,                FN_METHOD)   \
    ML_OP(log,                GRAD,           1, log,                FN_METHOD)   \
    ML_OP(abs,                GRAD,           1, abs,                FN_METHOD)   \
    ML_OP(sin,                GRAD,           1, sin,                FN_METHOD)   \
    ML_OP(cos,                GRAD,           1, cos,                FN_METHOD)   \
    ML_OP(square,             GRAD,           1, square,             FN_METHOD)   \
    ML_OP(round,              GRAD,           1, round,              FN_METHOD)   \
    ML_OP(floor,              GRAD,           1, floor,              FN_METHOD)   \
    ML_OP(sign,               GRAD,           1, sign,               FN_METHOD)   \
    ML_OP(clamp,              GRAD,           1, clamp,              FN_METHOD_F) \
    ML_OP(silu,               GRAD,           1, silu,               FN_METHOD_F) \
    ML_OP(gelu,               GRAD,           1, gelu,               FN_METHOD_F) \
    ML_OP(gelu_tanh,          GRAD,           1, gelu_tanh,          FN_METHOD)   \
    ML_OP(quick_gelu,         GRAD,           1, quick_gelu,         FN_METHOD_F) \
    ML_OP(sigmoid,            GRAD,           1, sigmoid,            FN_METHOD_F) \
    ML_OP(tanh,               GRAD,           1, tanh,               FN_METHOD_F) \
    ML_OP(relu,               GRAD,           1, relu,               FN_METHOD_F) \
    ML_OP(geglu,              GRAD,           1, geglu,              FN_F)        \
    ML_OP(sum,                GRAD,           1, sum,                FN_METHOD)   \
    ML_OP(mean,               GRAD,           1, mean,               FN_METHOD)   \
    ML_OP(var,                GRAD,           1, var,                FN_METHOD)   \
    ML_OP(max,                GRAD,           1, max,                FN_METHOD)   \
    ML_OP(argmax,             NO_GRAD,        1, argmax,             FN_METHOD)   \
    ML_OP(norm,               GRAD,           1, norm,               FN_METHOD)   \
    ML_OP(matmul,             GRAD,           1, matmul,             FN_METHOD_F) \
    ML_OP(linear,             GRAD,           1, linear,             FN_F)        \
    ML_OP(conv2d,             GRAD,           1, conv2d,             FN_F)        \
    ML_OP(group_norm,         GRAD,           1, group_norm,         FN_F)        \
    ML_OP(layer_norm,         GRAD,           1, layer_norm,         FN_F)        \
    ML_OP(softmax,            GRAD,           1, softmax,            FN_METHOD_F) \
    ML_OP(log_softmax,        GRAD,           1, log_softmax,        FN_METHOD_F) \
    ML_OP(sdpa,               GRAD,           1, scaled_dot_product_attention, FN_F) \
    ML_OP(embedding,          GRAD,           1, embedding,          FN_F)        \
    ML_OP(cat,                GRAD,           1, cat,                FN_F)        \
    ML_OP(stack,              GRAD,           1, stack,              FN_F)        \
    ML_OP(gather,             GRAD,           1, gather,             FN_F)        \
    ML_OP(index_select,       GRAD,           1, index_select,       FN_F)        \
    ML_OP(upsample_nearest2d, GRAD,           1, upsample_nearest2d, FN_F)        \
    ML_OP(mse_loss,           GRAD,           1, mse_loss,           FN_F)        \
    ML_OP(dropout,            GRAD,           1, dropout,            FN_F)        \
    ML_OP(view,               GRAD,           1, view,               METHOD)      \
    ML_OP(permute,            GRAD,           1, permute,            METHOD)      \
    ML_OP(narrow,             GRAD,           1, narrow,             METHOD)      \
    ML_OP(select,             GRAD,           1, select,             METHOD)      \
    ML_OP(expand,             GRAD,           1, expand,             METHOD)      \
    ML_OP(unsqueeze,          GRAD,           1, unsqueeze,          METHOD)      \
    ML_OP(contiguous,         GRAD,           1, contiguous,         METHOD)      \
    ML_OP(clone,              GRAD,           1, clone,              METHOD)      \
    ML_OP(to_dtype,           GRAD,           1, to,                 VIA_TO)      \
    ML_OP(to_device,          GRAD_BY_PARITY, 1, to,                 VIA_TO)      \
    ML_OP(cast_as,            GRAD,           1, cast_as,            FN)          \
    ML_OP(randn,              NO_GRAD,        1, randn,              FN)          \
    ML_OP(rand,               NO_GRAD,        1, rand,               FN)          \
    ML_OP(randint,            NO_GRAD,        1, randint,            FN)          \
    ML_OP(adamw_step,         NO_GRAD,        1, adamw_step_,        FN)

/* What an autograd node is: one of the registry's ops, or one of the kinds
 * of node that are not ops. */
typedef enum {
#define ML_OP_ENUM_ENTRY(name, grad, cuda, lua, where) ML_OP_##name,
    ML_OP_LIST(ML_OP_ENUM_ENTRY)
#undef ML_OP_ENUM_ENTRY
    ML_OP_COUNT,                   /* the number of registry ops */
    /* a backward written outside the registry, named by its caller
     * (ml_node_begin_custom): the C tests' hand-made nodes */
    ML_NODE_CUSTOM = ML_OP_COUNT,
    /* the shared node an op gets when its own cannot be allocated */
    ML_NODE_UNRECORDED,
} ml_op;

/* The grad column. */
typedef enum { ML_GRAD, ML_GRAD_BY_PARITY, ML_NO_GRAD } ml_op_gradient;

/* The where column as flags: a moonlit.core function, a tensor method,
 * an ml.F function. */
enum { ML_LUA_CORE = 1, ML_LUA_AS_METHOD = 2, ML_LUA_IN_F = 4 };
#define ML_LUA_FN          ML_LUA_CORE
#define ML_LUA_FN_METHOD   (ML_LUA_CORE | ML_LUA_AS_METHOD)
#define ML_LUA_FN_F        (ML_LUA_CORE | ML_LUA_IN_F)
#define ML_LUA_FN_METHOD_F (ML_LUA_CORE | ML_LUA_AS_METHOD | ML_LUA_IN_F)
#define ML_LUA_METHOD      ML_LUA_AS_METHOD
#define ML_LUA_VIA_TO      ML_LUA_AS_METHOD

typedef struct {
    const char *name;          /* the node's printable name */
    const char *lua;           /* the Lua name */
    ml_op_gradient grad;
    bool cuda;
    int where;                 /* ML_LUA_* flags */
} ml_op_info;

/* The row of a registry op; NULL for the node kinds that are not ops. */
const ml_op_info *ml_op_info_of(ml_op op);
/* The printable name of a registry op or node kind ("add", "custom"). */
const char *ml_op_name(ml_op op);

/* ML_OP_IF_CORE_FN(where, ...) expands to its other arguments for the ops
 * bound as moonlit.core functions (bindings/lua_ops.c) and to nothing for
 * the others; ML_OP_IF_TENSOR_METHOD(where, ...) likewise for the methods
 * bound in bindings/lua_tensor.c.  With them a binding table is generated
 * from ML_OP_LIST. */
#define ML_OP_IF_CORE_FN(where, ...) ML_OP_CORE_FN_IF_##where(__VA_ARGS__)
#define ML_OP_CORE_FN_IF_FN(...) __VA_ARGS__
#define ML_OP_CORE_FN_IF_FN_METHOD(...) __VA_ARGS__
#define ML_OP_CORE_FN_IF_FN_F(...) __VA_ARGS__
#define ML_OP_CORE_FN_IF_FN_METHOD_F(...) __VA_ARGS__
#define ML_OP_CORE_FN_IF_METHOD(...)
#define ML_OP_CORE_FN_IF_VIA_TO(...)

#define ML_OP_IF_TENSOR_METHOD(where, ...) ML_OP_TENSOR_METHOD_IF_##where(__VA_ARGS__)
#define ML_OP_TENSOR_METHOD_IF_FN(...)
#define ML_OP_TENSOR_METHOD_IF_FN_METHOD(...)
#define ML_OP_TENSOR_METHOD_IF_FN_F(...)
#define ML_OP_TENSOR_METHOD_IF_FN_METHOD_F(...)
#define ML_OP_TENSOR_METHOD_IF_METHOD(...) __VA_ARGS__
#define ML_OP_TENSOR_METHOD_IF_VIA_TO(...)

#endif
