/* op_registry.h — the list of ops, one line each: the single place that says
 * which ops exist, whether they are differentiable and whether they have a
 * CUDA kernel.  Tests are driven from it (exposed to Lua as
 * moonlit.core.op_registry()): every differentiable op must have a gradient
 * check case and every op with CUDA must have a CPU-vs-GPU parity case, or
 * the suite fails.
 *
 * ML_OP(name, differentiable, cuda) */
#ifndef ML_OP_REGISTRY_H
#define ML_OP_REGISTRY_H

#define ML_OP_LIST(ML_OP)          \
    ML_OP(add, 1, 1)               \
    ML_OP(sub, 1, 1)               \
    ML_OP(mul, 1, 1)               \
    ML_OP(div, 1, 1)               \
    ML_OP(pow, 1, 1)               \
    ML_OP(maximum, 1, 1)           \
    ML_OP(minimum, 1, 1)           \
    ML_OP(compare, 0, 1)           \
    ML_OP(where, 1, 1)             \
    ML_OP(neg, 1, 1)               \
    ML_OP(sqrt, 1, 1)              \
    ML_OP(rsqrt, 1, 1)             \
    ML_OP(exp, 1, 1)               \
    ML_OP(log, 1, 1)               \
    ML_OP(abs, 1, 1)               \
    ML_OP(sin, 1, 1)               \
    ML_OP(cos, 1, 1)               \
    ML_OP(square, 1, 1)            \
    ML_OP(clamp, 1, 1)             \
    ML_OP(silu, 1, 1)              \
    ML_OP(gelu, 1, 1)              \
    ML_OP(gelu_tanh, 1, 1)         \
    ML_OP(quick_gelu, 1, 1)        \
    ML_OP(sigmoid, 1, 1)           \
    ML_OP(tanh, 1, 1)              \
    ML_OP(relu, 1, 1)              \
    ML_OP(sum, 1, 1)               \
    ML_OP(mean, 1, 1)              \
    ML_OP(var, 1, 1)               \
    ML_OP(max, 1, 1)               \
    ML_OP(norm, 1, 1)              \
    ML_OP(matmul, 1, 1)            \
    ML_OP(linear, 1, 1)            \
    ML_OP(conv2d, 1, 1)            \
    ML_OP(group_norm, 1, 1)        \
    ML_OP(layer_norm, 1, 1)        \
    ML_OP(softmax, 1, 1)           \
    ML_OP(log_softmax, 1, 1)       \
    ML_OP(sdpa, 1, 1)              \
    ML_OP(embedding, 1, 1)         \
    ML_OP(cat, 1, 1)               \
    ML_OP(stack, 1, 1)             \
    ML_OP(gather, 1, 1)            \
    ML_OP(index_select, 1, 1)      \
    ML_OP(upsample_nearest2d, 1, 1)\
    ML_OP(mse_loss, 1, 1)          \
    ML_OP(dropout, 1, 1)           \
    ML_OP(view, 1, 1)              \
    ML_OP(permute, 1, 1)           \
    ML_OP(narrow, 1, 1)            \
    ML_OP(select, 1, 1)            \
    ML_OP(expand, 1, 1)            \
    ML_OP(contiguous, 1, 1)        \
    ML_OP(to_dtype, 1, 1)          \
    ML_OP(randn, 0, 1)             \
    ML_OP(rand, 0, 1)              \
    ML_OP(randint, 0, 1)           \
    ML_OP(adamw_step, 0, 1)

#endif
