// elementwise.cu — CUDA twins of kernels/cpu/elementwise.c (contract in
// elementwise.h).
//
// One launcher (ew_run) serves every op: it merges the dims of all operands
// (common.cuh's indexer), then runs one of three kernels:
//   contiguous  every operand contiguous and 16-byte aligned: each thread
//               moves 16 bytes of the widest operand per step;
//   inner-vec   the innermost dim is contiguous in the output and either
//               contiguous or broadcast (stride 0) in each input — a bias
//               [C] or a per-image embedding [N,1,1,C] added to [N,H,W,C]:
//               the same vectors along rows, one index division per vector;
//   strided     anything else, element by element (32-bit index arithmetic
//               when the element count allows).
// The arithmetic and activation ops are template parameters (one compact
// kernel each: a runtime switch inlined into the vectorised loops made
// large kernels that ran compute-bound); comparisons, bool ops and integer
// unary ops, which are cold, take the op at run time.
//
// Arithmetic follows the CPU kernels expression for expression; f16/bf16
// compute in f32.  Transcendental functions come from CUDA's libdevice, so
// results may differ from glibc's in the last bits.
#include "common.cuh"
#include "elementwise.h"
extern "C" {
#include "cpu/elementwise.h"
}
#include <cmath>
#include <type_traits>
#include <utility>

namespace {

constexpr int kThreads = 256;

// ---- the launcher --------------------------------------------------------

template <typename T, int V> struct alignas(sizeof(T) * V) vec_t { T v[V]; };

template <typename T> constexpr size_t max_size() { return sizeof(T); }
template <typename T, typename U, typename... R> constexpr size_t max_size() {
    return sizeof(T) > max_size<U, R...>() ? sizeof(T) : max_size<U, R...>();
}

template <int V, typename Op, typename TO, typename... TI>
__device__ __forceinline__ void apply_vec(const Op &op, vec_t<TO, V> &r, const vec_t<TI, V> &...v) {
#pragma unroll
    for (int k = 0; k < V; k++) r.v[k] = op(v.v[k]...);
}

template <int V, typename Op, typename TO, typename... TI>
__global__ void __launch_bounds__(kThreads) ew_contig(Op op, int64_t n, TO *o, const TI *...in) {
    int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    int64_t step = (int64_t)gridDim.x * blockDim.x;
    int64_t nv = n / V;
    for (int64_t i = t; i < nv; i += step) {
        vec_t<TO, V> r;
        apply_vec<V>(op, r, reinterpret_cast<const vec_t<TI, V> *>(in)[i]...);
        reinterpret_cast<vec_t<TO, V> *>(o)[i] = r;
    }
    for (int64_t i = nv * V + t; i < n; i += step) o[i] = op(in[i]...);
}

template <typename Op, typename... TI, size_t... Is>
__device__ __forceinline__ auto call_at(const Op &op, const int64_t *off, std::index_sequence<Is...>,
                                        const TI *...in) {
    return op(in[off[Is + 1]]...);
}

template <typename Idx, typename Op, typename TO, typename... TI>
__global__ void __launch_bounds__(kThreads)
    ew_strided(Op op, ml_indexer<1 + sizeof...(TI)> ix, Idx n, TO *o, const TI *...in) {
    for (Idx i = blockIdx.x * (Idx)blockDim.x + threadIdx.x; i < n; i += (Idx)gridDim.x * blockDim.x) {
        int64_t off[1 + sizeof...(TI)];
        ix.offsets(i, off);
        o[off[0]] = call_at(op, off, std::index_sequence_for<TI...>{}, in...);
    }
}

// A vector of V elements at p + off, or one element repeated (broadcast).
template <int V, typename T>
__device__ __forceinline__ vec_t<T, V> load_or_bcast(const T *p, int64_t off, bool bcast) {
    vec_t<T, V> r;
    if (bcast) {
        T x = p[off];
#pragma unroll
        for (int k = 0; k < V; k++) r.v[k] = x;
    } else {
        r = *reinterpret_cast<const vec_t<T, V> *>(p + off);
    }
    return r;
}

template <int V, typename Op, typename TO, typename... TI, size_t... Is>
__device__ __forceinline__ void inner_vec_step(const Op &op, const int64_t *off, unsigned bcast, TO *o,
                                               std::index_sequence<Is...>, const TI *...in) {
    vec_t<TO, V> r;
    apply_vec<V>(op, r, load_or_bcast<V>(in, off[Is + 1], (bcast >> Is) & 1u)...);
    *reinterpret_cast<vec_t<TO, V> *>(o + off[0]) = r;
}

// nvec vectors of V elements along the innermost dim (its size is a
// multiple of V); bit k of bcast: input k has stride 0 there.
template <int V, typename Op, typename TO, typename... TI>
__global__ void __launch_bounds__(kThreads)
    ew_inner_vec(Op op, ml_indexer<1 + sizeof...(TI)> ix, uint32_t nvec, unsigned bcast, TO *o, const TI *...in) {
    for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < nvec; j += gridDim.x * blockDim.x) {
        int64_t off[1 + sizeof...(TI)];
        ix.offsets(j * (uint32_t)V, off);
        inner_vec_step<V>(op, off, bcast, o, std::index_sequence_for<TI...>{}, in...);
    }
}

template <typename T> bool aligned(const T *p, int v) { return (uintptr_t)p % (sizeof(T) * v) == 0; }

// Whether the inner-vec kernel applies: the innermost dim's size is a
// multiple of V and it has stride 1 in the output and stride 0 or 1 in each
// input; every operand read or written as vectors starts V-aligned at each
// row (aligned pointer, other strides multiples of V).  Sets the bits of
// the broadcast inputs in *bcast.
template <int N, typename T> bool row_aligned(const ml_indexer<N> &ix, int k, const T *p, int v) {
    if (!aligned(p, v)) return false;
    for (int d = 0; d < ix.ndim; d++)
        if (ix.stride[k][d] % v != 0 && d != ix.ndim - 1) return false;
    return true;
}

template <int N, typename TO, typename... TI>
bool inner_vec_ok(const ml_indexer<N> &ix, int v, const TO *o, unsigned *bcast, const TI *...in) {
    int last = ix.ndim - 1;
    if (last < 0 || ix.size[last] % v != 0 || ix.stride[0][last] != 1 || !row_aligned(ix, 0, o, v)) return false;
    bool ok = true;
    int k = 1;
    // Each input: broadcast (stride 0: any alignment) or unit stride (aligned rows).
    auto check = [&](auto p) {
        int64_t st = ix.stride[k][last];
        if (st == 0) *bcast |= 1u << (k - 1);
        else if (st != 1 || !row_aligned(ix, k, p, v)) ok = false;
        k++;
    };
    (check(in), ...);
    return ok;
}

// out[i] = op(in_0[i], in_1[i], ...) over out's shape.  ins: the input
// tensors (for device, shape and strides), in: their typed data pointers.
template <typename Op, typename TO, typename... TI>
int ew_run(const char *name, const Op &op, const ml_tensor *out, const ml_tensor *const *ins, TO *o,
           const TI *...in) {
    constexpr int N = 1 + (int)sizeof...(TI);
    cudaStream_t s;
    if (ml_cuda_prepare(out, name, &s) < 0) return -1;
    const int64_t *strides[N];
    strides[0] = out->strides;
    for (int k = 0; k < N - 1; k++) {
        const ml_tensor *t = ins[k];
        if (!ml_device_eq(t->device, out->device))
            return ml_error("%s (cuda): operand %d is on another device than the output", name, k + 1);
        if (!ml_same_shape(t, out)) {
            char b1[128], b2[128];
            return ml_error("%s (cuda): operand %d has shape %s, expected the output's %s", name, k + 1,
                            ml_shape_str(t, b1, sizeof b1), ml_shape_str(out, b2, sizeof b2));
        }
        strides[k + 1] = t->strides;
    }
    int64_t n = ml_numel(out);
    if (n == 0) return 0;
    ml_indexer<N> ix;
    ml_indexer_make(&ix, out->ndim, out->shape, strides);
    int dev = out->device.index;
    constexpr int V = (int)(16 / max_size<TO, TI...>()) > 0 ? (int)(16 / max_size<TO, TI...>()) : 1;
    bool al = aligned(o, V);
    bool ins_al[] = {aligned(in, V)...};
    for (bool b : ins_al) al = al && b;
    unsigned bcast = 0;
    if (ml_indexer_contiguous(ix) && al) {
        ew_contig<V><<<ml_grid_for((n + V - 1) / V, kThreads, dev), kThreads, 0, s>>>(op, n, o, in...);
    } else if (V > 1 && ml_fits_u32(n) && inner_vec_ok(ix, V, o, &bcast, in...)) {
        ew_inner_vec<V><<<ml_grid_for(n / V, kThreads, dev), kThreads, 0, s>>>(op, ix, (uint32_t)(n / V), bcast,
                                                                              o, in...);
    } else if (ml_fits_u32(n)) {
        ew_strided<uint32_t><<<ml_grid_for(n, kThreads, dev), kThreads, 0, s>>>(op, ix, (uint32_t)n, o, in...);
    } else {
        ew_strided<int64_t><<<ml_grid_for(n, kThreads, dev), kThreads, 0, s>>>(op, ix, n, o, in...);
    }
    ML_CUDA_LAUNCHED(name);
    return 0;
}

// ---- device math for f32 and f64 ------------------------------------------

#define ML_MATH1(name, f32fn, f64fn)                                              \
    __device__ __forceinline__ float name(float x) { return f32fn(x); }           \
    __device__ __forceinline__ double name(double x) { return f64fn(x); }
ML_MATH1(d_exp, expf, exp)
ML_MATH1(d_log, logf, log)
ML_MATH1(d_sqrt, sqrtf, sqrt)
ML_MATH1(d_sin, sinf, sin)
ML_MATH1(d_cos, cosf, cos)
ML_MATH1(d_tanh, tanhf, tanh)
ML_MATH1(d_erf, erff, erf)
ML_MATH1(d_rint, rintf, rint)
ML_MATH1(d_floor, floorf, floor)
ML_MATH1(d_fabs, fabsf, fabs)
#undef ML_MATH1
__device__ __forceinline__ float d_pow(float x, float y) { return powf(x, y); }
__device__ __forceinline__ double d_pow(double x, double y) { return pow(x, y); }

// Integer power by squaring with wrap-around; negative exponents give 0
// except for bases 1 and -1 (as the CPU's ipow64).
__device__ __forceinline__ int64_t d_ipow64(int64_t x, int64_t y) {
    if (y < 0) return x == 1 ? 1 : x == -1 ? ((y & 1) ? -1 : 1) : 0;
    uint64_t r = 1, b = (uint64_t)x;
    for (uint64_t e = (uint64_t)y; e; e >>= 1) {
        if (e & 1) r *= b;
        b *= b;
    }
    return (int64_t)r;
}

// ---- binary ---------------------------------------------------------------

// Unsigned twin for wrap-around integer arithmetic (no signed overflow).
template <typename C> struct uwrap { typedef C t; };
template <> struct uwrap<int32_t> { typedef uint32_t t; };
template <> struct uwrap<int64_t> { typedef uint64_t t; };
template <> struct uwrap<uint8_t> { typedef uint32_t t; };

template <typename C> __device__ __forceinline__ C bin_pow(C x, C y) { return (C)d_ipow64((int64_t)x, (int64_t)y); }
__device__ __forceinline__ float bin_pow(float x, float y) { return d_pow(x, y); }
__device__ __forceinline__ double bin_pow(double x, double y) { return d_pow(x, y); }

// Arithmetic binary op OP on storage type T (not for bool).
template <typename T, int OP> struct bin_arith {
    typedef T out_t;
    __device__ __forceinline__ T operator()(T a, T b) const {
        typedef typename ml_ctype<T>::type C;
        typedef typename uwrap<C>::t U;
        C x = ml_to_c(a), y = ml_to_c(b), r;
        switch (OP) {
        case ML_ADD: r = (C)((U)x + (U)y); break;
        case ML_SUB: r = (C)((U)x - (U)y); break;
        case ML_MUL: r = (C)((U)x * (U)y); break;
        case ML_DIV: r = x / y; break;   // floats only (checked on the host)
        case ML_POW: r = bin_pow(x, y); break;
        case ML_MAXIMUM: r = (x > y || x != x) ? x : y; break;   // NaN propagates
        default: r = (x < y || x != x) ? x : y; break;           // ML_MINIMUM
        }
        return ml_from_c<T>(r);
    }
};

// bool: add/maximum are "or", mul/minimum are "and".
struct bin_bool {
    typedef ml_bool_t out_t;
    int op;
    __device__ __forceinline__ ml_bool_t operator()(ml_bool_t a, ml_bool_t b) const {
        bool any = op == ML_ADD || op == ML_MAXIMUM;
        return ml_bool_t{(uint8_t)(any ? (a.x | b.x) : (a.x & b.x))};
    }
};

template <typename T> struct bin_compare {
    typedef ml_bool_t out_t;
    int op;
    __device__ __forceinline__ ml_bool_t operator()(T a, T b) const {
        typename ml_ctype<T>::type x = ml_to_c(a), y = ml_to_c(b);
        bool r;
        switch (op) {
        case ML_EQ: r = x == y; break;
        case ML_NE: r = x != y; break;
        case ML_LT: r = x < y; break;
        case ML_LE: r = x <= y; break;
        case ML_GT: r = x > y; break;
        default: r = x >= y; break;   // ML_GE
        }
        return ml_bool_t{(uint8_t)r};
    }
};

// A binary functor with one operand fixed (a scalar already in T).
template <typename F, typename T> struct with_scalar {
    typedef typename F::out_t out_t;
    F f;
    T s;
    bool first;
    __device__ __forceinline__ out_t operator()(T a) const { return first ? f(s, a) : f(a, s); }
};

bool is_compare(ml_binop op) { return op >= ML_EQ && op <= ML_GE; }

template <int V> using op_c = std::integral_constant<int, V>;

// Calls run(functor) with the binary functor for (op, T); errors for
// combinations the CPU does not support either.
template <typename T, typename Run> int with_binop(ml_binop op, Run &&run) {
    if ((unsigned)op > ML_GE) return ml_error("binary kernel (cuda): bad op %d", (int)op);
    if (is_compare(op)) return run(bin_compare<T>{(int)op});
    if constexpr (std::is_same<T, ml_bool_t>::value) {
        if (op == ML_ADD || op == ML_MUL || op == ML_MAXIMUM || op == ML_MINIMUM) return run(bin_bool{(int)op});
    } else {
        switch (op) {
        case ML_ADD: return run(bin_arith<T, ML_ADD>{});
        case ML_SUB: return run(bin_arith<T, ML_SUB>{});
        case ML_MUL: return run(bin_arith<T, ML_MUL>{});
        case ML_DIV:
            if constexpr (ml_is_floating<T>::v) return run(bin_arith<T, ML_DIV>{});
            break;
        case ML_POW: return run(bin_arith<T, ML_POW>{});
        case ML_MAXIMUM: return run(bin_arith<T, ML_MAXIMUM>{});
        case ML_MINIMUM: return run(bin_arith<T, ML_MINIMUM>{});
        default: break;
        }
    }
    return ml_error("%s (cuda): dtype %s is not supported", ml_binop_name(op),
                    ml_dtype_name(ml_dtype_of<T>::v));
}

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

int check_binary_out(ml_binop op, const ml_tensor *out, ml_dtype in) {
    ml_dtype want = is_compare(op) ? ML_BOOL : in;
    if (out->dtype != want)
        return ml_error("%s (cuda): output dtype %s, expected %s", ml_binop_name(op), ml_dtype_name(out->dtype),
                        ml_dtype_name(want));
    return 0;
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

template <typename U> struct where_sel {
    __device__ __forceinline__ U operator()(uint8_t c, U a, U b) const { return c ? a : b; }
};

template <typename F> int dispatch_int(ml_dtype t, const char *what, F &&f) {
    switch (t) {
    case ML_I32: return f(int32_t());
    case ML_I64: return f(int64_t());
    case ML_U8: return f(uint8_t());
    default: return ml_error("%s (cuda): dtype %s is not supported", what, ml_dtype_name(t));
    }
}

bool is_float_dtype(ml_dtype t) { return t == ML_F32 || t == ML_F64 || t == ML_F16 || t == ML_BF16; }

int same_dtype3(const char *what, const ml_tensor *a, const ml_tensor *b, const ml_tensor *c) {
    if (a->dtype != b->dtype || a->dtype != c->dtype)
        return ml_error("%s (cuda): tensors must share one dtype (got %s, %s, %s)", what, ml_dtype_name(a->dtype),
                        ml_dtype_name(b->dtype), ml_dtype_name(c->dtype));
    return 0;
}

}  // namespace

// ---- entry points -----------------------------------------------------------

extern "C" int ml_binary_cuda(ml_binop op, ml_tensor *out, const ml_tensor *a, const ml_tensor *b) {
    if (a->dtype != b->dtype)
        return ml_error("%s (cuda): operands must share a dtype (got %s and %s)", ml_binop_name(op),
                        ml_dtype_name(a->dtype), ml_dtype_name(b->dtype));
    if (check_binary_out(op, out, a->dtype) < 0) return -1;
    const ml_tensor *ins[2] = {a, b};
    return ml_dispatch_all(a->dtype, [&](auto tag) -> int {
        typedef decltype(tag) T;
        return with_binop<T>(op, [&](auto f) -> int {
            typedef typename decltype(f)::out_t TO;
            return ew_run(ml_binop_name(op), f, out, ins, ml_ptr<TO>(out), ml_ptr<T>(a), ml_ptr<T>(b));
        });
    });
}

extern "C" int ml_binary_scalar_cuda(ml_binop op, ml_tensor *out, const ml_tensor *a, double s,
                                     bool scalar_first) {
    if (check_binary_out(op, out, a->dtype) < 0) return -1;
    const ml_tensor *ins[1] = {a};
    // The scalar is converted to a's dtype on the host, as the CPU does.
    uint64_t bits = 0;
    ml_store_from_double(&bits, a->dtype, 0, s);
    return ml_dispatch_all(a->dtype, [&](auto tag) -> int {
        typedef decltype(tag) T;
        T sv;
        memcpy(&sv, &bits, sizeof sv);
        return with_binop<T>(op, [&](auto f) -> int {
            typedef decltype(f) F;
            typedef typename F::out_t TO;
            with_scalar<F, T> g{f, sv, scalar_first};
            return ew_run(ml_binop_name(op), g, out, ins, ml_ptr<TO>(out), ml_ptr<T>(a));
        });
    });
}

extern "C" int ml_unary_cuda(ml_unop op, ml_tensor *out, const ml_tensor *x) {
    if ((unsigned)op >= ML_NUM_UNOPS) return ml_error("unary kernel (cuda): bad op %d", (int)op);
    if (out->dtype != x->dtype)
        return ml_error("%s (cuda): output dtype %s differs from input dtype %s", ml_unop_name(op),
                        ml_dtype_name(out->dtype), ml_dtype_name(x->dtype));
    const ml_tensor *ins[1] = {x};
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

extern "C" int ml_unary_backward_cuda(ml_unop op, ml_tensor *dx, const ml_tensor *dy, const ml_tensor *x) {
    if ((unsigned)op >= ML_NUM_UNOPS) return ml_error("unary backward kernel (cuda): bad op %d", (int)op);
    if (same_dtype3(ml_unop_name(op), dx, dy, x) < 0) return -1;
    const ml_tensor *ins[2] = {dy, x};
    const char *name = ml_unop_name(op);
    return ml_dispatch_float(x->dtype, name, [&](auto tag) -> int {
        typedef decltype(tag) T;
        return with_unop(op, [&](auto c) -> int {
            return ew_run(name, unary_backward_float<T, decltype(c)::value>{}, dx, ins, ml_ptr<T>(dx),
                          ml_ptr<T>(dy), ml_ptr<T>(x));
        });
    });
}

extern "C" int ml_clamp_cuda(ml_tensor *out, const ml_tensor *x, double lo, double hi) {
    if (out->dtype != x->dtype)
        return ml_error("clamp (cuda): output dtype %s differs from input dtype %s", ml_dtype_name(out->dtype),
                        ml_dtype_name(x->dtype));
    const ml_tensor *ins[1] = {x};
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

extern "C" int ml_clamp_backward_cuda(ml_tensor *dx, const ml_tensor *dy, const ml_tensor *x, double lo,
                                      double hi) {
    if (same_dtype3("clamp backward", dx, dy, x) < 0) return -1;
    const ml_tensor *ins[2] = {dy, x};
    return ml_dispatch_float(x->dtype, "clamp backward", [&](auto tag) -> int {
        typedef decltype(tag) T;
        typedef typename ml_ctype<T>::type C;
        return ew_run("clamp backward", clamp_backward_float<T>{(C)lo, (C)hi}, dx, ins, ml_ptr<T>(dx),
                      ml_ptr<T>(dy), ml_ptr<T>(x));
    });
}

extern "C" int ml_where_cuda(ml_tensor *out, const ml_tensor *cond, const ml_tensor *a, const ml_tensor *b) {
    if (cond->dtype != ML_BOOL && cond->dtype != ML_U8)
        return ml_error("where (cuda): condition must be bool or uint8, got %s", ml_dtype_name(cond->dtype));
    if (a->dtype != out->dtype || b->dtype != out->dtype)
        return ml_error("where (cuda): a, b and out must share a dtype (got %s, %s, %s)", ml_dtype_name(a->dtype),
                        ml_dtype_name(b->dtype), ml_dtype_name(out->dtype));
    const ml_tensor *ins[3] = {cond, a, b};
    auto run = [&](auto u) -> int {
        typedef decltype(u) U;
        return ew_run("where", where_sel<U>{}, out, ins, ml_ptr<U>(out), ml_ptr<uint8_t>(cond), ml_ptr<U>(a),
                      ml_ptr<U>(b));
    };
    switch (ml_dtype_size(out->dtype)) {
    case 1: return run(uint8_t());
    case 2: return run(uint16_t());
    case 4: return run(uint32_t());
    default: return run(uint64_t());
    }
}
