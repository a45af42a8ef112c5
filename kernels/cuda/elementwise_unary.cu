// elementwise_unary.cu — CUDA twins of the CPU's unary ops, their
// backward, and clamp (contract in elementwise.h; the launcher is ew.cuh,
// described in elementwise.cu).  Same expressions as
// kernels/cpu/elementwise.c; f16/bf16 compute in f32.
#include "ew.cuh"
#include "elementwise.h"

namespace {

// Calls f(op_c<OP>{}) for a float unary op.
template <typename F> int with_unop(ml_unop op, F &&f) {
    switch (op) {
#define ML_UNOP_CASE(o) case o: return f(op_c<o>{});
        ML_UNOP_CASE(ML_NEG) ML_UNOP_CASE(ML_SQRT) ML_UNOP_CASE(ML_RSQRT) ML_UNOP_CASE(ML_EXP)
        ML_UNOP_CASE(ML_LOG) ML_UNOP_CASE(ML_ABS) ML_UNOP_CASE(ML_SIN) ML_UNOP_CASE(ML_COS)
        ML_UNOP_CASE(ML_SILU) ML_UNOP_CASE(ML_GELU) ML_UNOP_CASE(ML_GELU_TANH) ML_UNOP_CASE(ML_QUICK_GELU)
        ML_UNOP_CASE(ML_SIGMOID) ML_UNOP_CASE(ML_TANH) ML_UNOP_CASE(ML_RELU) ML_UNOP_CASE(ML_SQUARE)
        ML_UNOP_CASE(ML_ROUND) ML_UNOP_CASE(ML_FLOOR) ML_UNOP_CASE(ML_SIGN)
#undef ML_UNOP_CASE
    default: return ml_error("unary kernel (cuda): bad op %d", (int)op);
    }
}

// ---- unary ----------------------------------------------------------------

// Float unary ops, computed in C (f32 or f64) exactly as the CPU writes them.
template <int OP, typename C> __device__ __forceinline__ C unary_f(C x) {
    switch (OP) {
    case ML_NEG: return -x;
    case ML_SQRT: return d_sqrt(x);
    case ML_RSQRT: return (C)1 / d_sqrt(x);
    case ML_EXP: return d_exp(x);
    case ML_LOG: return d_log(x);
    case ML_ABS: return d_fabs(x);
    case ML_SIN: return d_sin(x);
    case ML_COS: return d_cos(x);
    case ML_SILU: return x / ((C)1 + d_exp(-x));
    case ML_GELU: return (C)0.5 * x * ((C)1 + d_erf(x * (C)0.7071067811865476));
    case ML_GELU_TANH: {
        C inner = (C)0.7978845608028654 * (x + (C)0.044715 * x * x * x);
        return (C)0.5 * x * ((C)1 + d_tanh(inner));
    }
    case ML_QUICK_GELU: return x / ((C)1 + d_exp((C)-1.702 * x));
    case ML_SIGMOID: return (C)1 / ((C)1 + d_exp(-x));
    case ML_TANH: return d_tanh(x);
    case ML_RELU: return (x > 0 || x != x) ? x : (C)0;
    case ML_SQUARE: return x * x;
    case ML_ROUND: return d_rint(x);
    case ML_FLOOR: return d_floor(x);
    default: return (C)((x > 0) - (x < 0));   // ML_SIGN
    }
}

// dx = g * op'(x), the CPU's closed forms.
template <int OP, typename C> __device__ __forceinline__ C unary_backward_f(C g, C x) {
    switch (OP) {
    case ML_NEG: return -g;
    case ML_SQRT: return g * (C)0.5 / d_sqrt(x);
    case ML_RSQRT: return g * (C)-0.5 / (x * d_sqrt(x));
    case ML_EXP: return g * d_exp(x);
    case ML_LOG: return g / x;
    case ML_ABS: return g * (C)((x > 0) - (x < 0));
    case ML_SIN: return g * d_cos(x);
    case ML_COS: return -g * d_sin(x);
    case ML_SILU: {
        C s = (C)1 / ((C)1 + d_exp(-x));
        return g * (s * ((C)1 + x * ((C)1 - s)));
    }
    case ML_GELU: {
        C cdf = (C)0.5 * ((C)1 + d_erf(x * (C)0.7071067811865476));
        C pdf = d_exp((C)-0.5 * x * x) * (C)0.3989422804014327;
        return g * (cdf + x * pdf);
    }
    case ML_GELU_TANH: {
        C x2 = x * x;
        C t = d_tanh((C)0.7978845608028654 * (x + (C)0.044715 * x2 * x));
        C left = (C)0.5 * x, right = (C)1 + t;
        C dinner = (C)0.7978845608028654 * ((C)1 + (C)3 * (C)0.044715 * x2);
        return g * ((C)0.5 * right + left * ((C)1 - t * t) * dinner);
    }
    case ML_QUICK_GELU: {
        C s = (C)1 / ((C)1 + d_exp(-((C)1.702 * x)));
        return g * (s + (C)1.702 * x * s * ((C)1 - s));
    }
    case ML_SIGMOID: {
        C s = (C)1 / ((C)1 + d_exp(-x));
        return g * s * ((C)1 - s);
    }
    case ML_TANH: {
        C t = d_tanh(x);
        return g * ((C)1 - t * t);
    }
    case ML_RELU: return x > 0 ? g : (C)0;
    case ML_SQUARE: return (C)2 * x * g;
    default: return (C)0;   // ROUND, FLOOR, SIGN
    }
}

template <typename T, int OP> struct unary_float {
    __device__ __forceinline__ T operator()(T a) const { return ml_from_c<T>(unary_f<OP>(ml_to_c(a))); }
};

template <typename T, int OP> struct unary_backward_float {
    __device__ __forceinline__ T operator()(T g, T x) const {
        return ml_from_c<T>(unary_backward_f<OP>(ml_to_c(g), ml_to_c(x)));
    }
};

// Integer unary ops and clamp through int64, as the CPU's generic loop.
template <typename T> struct unary_int {
    int op;   // an ml_unop, or ML_NUM_UNOPS for clamp
    double lo, hi;
    int64_t lo_i, hi_i;   // ceil(lo), floor(hi)
    __device__ __forceinline__ T operator()(T a) const {
        int64_t x = (int64_t)a;
        switch (op) {
        case ML_NEG: x = (int64_t)(0 - (uint64_t)x); break;
        case ML_ABS: x = x < 0 ? (int64_t)(0 - (uint64_t)x) : x; break;
        case ML_SQUARE: x = (int64_t)((uint64_t)x * (uint64_t)x); break;
        case ML_RELU: x = x > 0 ? x : 0; break;
        case ML_SIGN: x = (x > 0) - (x < 0); break;
        case ML_NUM_UNOPS:
            if ((double)x < lo) x = lo_i;
            if ((double)x > hi) x = hi_i;
            break;
        default: break;   // ROUND, FLOOR: integers are whole already
        }
        return (T)x;
    }
};

// max first, then min: with lo > hi every element becomes hi (PyTorch).
template <typename T> struct clamp_float {
    typename ml_ctype<T>::type lo, hi;
    __device__ __forceinline__ T operator()(T a) const {
        typename ml_ctype<T>::type x = ml_to_c(a);
        x = x < lo ? lo : x;
        return ml_from_c<T>(x > hi ? hi : x);
    }
};

template <typename T> struct clamp_backward_float {
    typename ml_ctype<T>::type lo, hi;
    __device__ __forceinline__ T operator()(T g, T a) const {
        typename ml_ctype<T>::type x = ml_to_c(a);
        return (x >= lo && x <= hi) ? g : ml_from_c<T>(0);
    }
};
}  // namespace

extern "C" int ml_unary_cuda(ml_unop op, ml_ktensor *out, const ml_ktensor *x) {
    if ((unsigned)op >= ML_NUM_UNOPS) return ml_error("unary kernel (cuda): bad op %d", (int)op);
    const ml_ktensor *ins[1] = {x};
    const char *name = ml_unop_name(op);
    if (is_float_dtype(x->dtype))
        return ml_dispatch_float(x->dtype, name, [&](auto tag) -> int {
            typedef decltype(tag) T;
            return with_unop(op, [&](auto c) -> int {
                return ew_run(name, unary_float<T, decltype(c)::value>{}, out, ins, ml_ptr<T>(out), ml_ptr<T>(x));
            });
        });
    bool int_ok = op == ML_NEG || op == ML_ABS || op == ML_SQUARE || op == ML_RELU || op == ML_SIGN ||
                  op == ML_ROUND || op == ML_FLOOR;
    if (!int_ok) return ml_error("%s (cuda): dtype %s is not supported", name, ml_dtype_name(x->dtype));
    return dispatch_int(x->dtype, name, [&](auto tag) -> int {
        typedef decltype(tag) T;
        return ew_run(name, unary_int<T>{(int)op, 0, 0, 0, 0}, out, ins, ml_ptr<T>(out), ml_ptr<T>(x));
    });
}

extern "C" int ml_unary_backward_cuda(ml_unop op, ml_ktensor *dx, const ml_ktensor *dy, const ml_ktensor *x) {
    if ((unsigned)op >= ML_NUM_UNOPS) return ml_error("unary backward kernel (cuda): bad op %d", (int)op);
    const ml_ktensor *ins[2] = {dy, x};
    const char *name = ml_unop_name(op);
    return ml_dispatch_float(x->dtype, name, [&](auto tag) -> int {
        typedef decltype(tag) T;
        return with_unop(op, [&](auto c) -> int {
            return ew_run(name, unary_backward_float<T, decltype(c)::value>{}, dx, ins, ml_ptr<T>(dx),
                          ml_ptr<T>(dy), ml_ptr<T>(x));
        });
    });
}

extern "C" int ml_clamp_cuda(ml_ktensor *out, const ml_ktensor *x, double lo, double hi) {
    const ml_ktensor *ins[1] = {x};
    if (is_float_dtype(x->dtype))
        return ml_dispatch_float(x->dtype, "clamp", [&](auto tag) -> int {
            typedef decltype(tag) T;
            typedef typename ml_ctype<T>::type C;
            return ew_run("clamp", clamp_float<T>{(C)lo, (C)hi}, out, ins, ml_ptr<T>(out), ml_ptr<T>(x));
        });
    // The bounds the CPU moves an integer to; an infinite bound is never
    // crossed, so its integer value is unused.
    int64_t lo_i = isfinite(lo) ? (int64_t)ceil(lo) : 0, hi_i = isfinite(hi) ? (int64_t)floor(hi) : 0;
    return dispatch_int(x->dtype, "clamp", [&](auto tag) -> int {
        typedef decltype(tag) T;
        return ew_run("clamp", unary_int<T>{(int)ML_NUM_UNOPS, lo, hi, lo_i, hi_i}, out, ins, ml_ptr<T>(out),
                      ml_ptr<T>(x));
    });
}

extern "C" int ml_clamp_backward_cuda(ml_ktensor *dx, const ml_ktensor *dy, const ml_ktensor *x, double lo,
                                      double hi) {
    const ml_ktensor *ins[2] = {dy, x};
    return ml_dispatch_float(x->dtype, "clamp backward", [&](auto tag) -> int {
        typedef decltype(tag) T;
        typedef typename ml_ctype<T>::type C;
        return ew_run("clamp backward", clamp_backward_float<T>{(C)lo, (C)hi}, dx, ins, ml_ptr<T>(dx),
                      ml_ptr<T>(dy), ml_ptr<T>(x));
    });
}
