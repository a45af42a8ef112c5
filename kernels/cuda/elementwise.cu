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
#include "ew.cuh"
#include "elementwise.h"

namespace {

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

template <typename U> struct where_sel {
    __device__ __forceinline__ U operator()(uint8_t c, U a, U b) const { return c ? a : b; }
};
}  // namespace

// ---- entry points -----------------------------------------------------------

extern "C" int ml_binary_cuda(ml_binop op, ml_ktensor *out, const ml_ktensor *a, const ml_ktensor *b) {
    const ml_ktensor *ins[2] = {a, b};
    return ml_dispatch_all(a->dtype, [&](auto tag) -> int {
        typedef decltype(tag) T;
        return with_binop<T>(op, [&](auto f) -> int {
            typedef typename decltype(f)::out_t TO;
            return ew_run(ml_binop_name(op), f, out, ins, ml_ptr<TO>(out), ml_ptr<T>(a), ml_ptr<T>(b));
        });
    });
}

extern "C" int ml_binary_scalar_cuda(ml_binop op, ml_ktensor *out, const ml_ktensor *a, double s,
                                     bool scalar_first) {
    const ml_ktensor *ins[1] = {a};
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

extern "C" int ml_where_cuda(ml_ktensor *out, const ml_ktensor *cond, const ml_ktensor *a, const ml_ktensor *b) {
    const ml_ktensor *ins[3] = {cond, a, b};
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

// ---- geglu ----------------------------------------------------------------
//
// out = a * gelu(b) over the two halves of each row of h [rows, 2n], and its
// backward writing both halves of dh in one pass.  The GELU and its gradient
// are elementwise_unary.cu's ML_GELU expressions (unary_f, unary_backward_f)
// with erf computed once, in the order of the unfused ops (hidden * gelu(gate)
// forward; g * gelu(b) and (g * a) * gelu'(b) backward), so f32 gives what the
// unfused kernels give; f16/bf16 compute in f32 and round each result once
// (the unfused form rounds gelu(gate) to the half type before the product).
// Each thread moves V elements of each half (16 bytes of the widest) when a
// half-row is a multiple of V and the buffers are 16-byte aligned, else one.

namespace {

template <int V, typename Idx, typename T>
__global__ void __launch_bounds__(kThreads) geglu_forward_k(Idx nvec, Idx row_vecs, T *out, const T *h) {
    typedef typename ml_ctype<T>::type C;
    for (Idx j = blockIdx.x * (Idx)blockDim.x + threadIdx.x; j < nvec; j += (Idx)gridDim.x * blockDim.x) {
        Idx r = j / row_vecs, c = j - r * row_vecs;
        int64_t n = (int64_t)row_vecs * V;
        const T *a = h + (int64_t)r * 2 * n + (int64_t)c * V;
        vec_t<T, V> va = *reinterpret_cast<const vec_t<T, V> *>(a);
        vec_t<T, V> vb = *reinterpret_cast<const vec_t<T, V> *>(a + n);
        vec_t<T, V> vo;
#pragma unroll
        for (int k = 0; k < V; k++) {
            C x = ml_to_c(vb.v[k]);
            C gelu = (C)0.5 * x * ((C)1 + d_erf(x * (C)0.7071067811865476));
            vo.v[k] = ml_from_c<T>(ml_to_c(va.v[k]) * gelu);
        }
        // out is [rows, n] contiguous: vector j starts at element j * V
        *reinterpret_cast<vec_t<T, V> *>(out + (int64_t)j * V) = vo;
    }
}

template <int V, typename Idx, typename T>
__global__ void __launch_bounds__(kThreads)
    geglu_backward_k(Idx nvec, Idx row_vecs, T *dh, const T *dout, const T *h) {
    typedef typename ml_ctype<T>::type C;
    for (Idx j = blockIdx.x * (Idx)blockDim.x + threadIdx.x; j < nvec; j += (Idx)gridDim.x * blockDim.x) {
        Idx r = j / row_vecs, c = j - r * row_vecs;
        int64_t n = (int64_t)row_vecs * V, at = (int64_t)r * 2 * n + (int64_t)c * V;
        vec_t<T, V> va = *reinterpret_cast<const vec_t<T, V> *>(h + at);
        vec_t<T, V> vb = *reinterpret_cast<const vec_t<T, V> *>(h + at + n);
        vec_t<T, V> vg = *reinterpret_cast<const vec_t<T, V> *>(dout + (int64_t)j * V);
        vec_t<T, V> da, db;
#pragma unroll
        for (int k = 0; k < V; k++) {
            C x = ml_to_c(vb.v[k]), g = ml_to_c(vg.v[k]);
            C e = d_erf(x * (C)0.7071067811865476);
            C gelu = (C)0.5 * x * ((C)1 + e);
            C cdf = (C)0.5 * ((C)1 + e);
            C pdf = d_exp((C)-0.5 * x * x) * (C)0.3989422804014327;
            da.v[k] = ml_from_c<T>(g * gelu);
            db.v[k] = ml_from_c<T>((g * ml_to_c(va.v[k])) * (cdf + x * pdf));
        }
        *reinterpret_cast<vec_t<T, V> *>(dh + at) = da;
        *reinterpret_cast<vec_t<T, V> *>(dh + at + n) = db;
    }
}

template <int V, typename Idx, typename T>
void geglu_start(unsigned grid, cudaStream_t s, Idx nvec, Idx row_vecs, T *o, const T *dout, const T *h) {
    if (dout) geglu_backward_k<V, Idx><<<grid, kThreads, 0, s>>>(nvec, row_vecs, o, dout, h);
    else geglu_forward_k<V, Idx><<<grid, kThreads, 0, s>>>(nvec, row_vecs, o, h);
}

// Forward (dout NULL: o is out) or backward (o is dh).  half: the [..., n]
// operand (out, or dout), whose shape gives the rows and n.
template <typename T>
int geglu_run(const char *name, const ml_ktensor *half, T *o, const T *dout, const T *h) {
    cudaStream_t s;
    if (ml_cuda_prepare(half, name, &s) < 0) return -1;
    int64_t n = half->ndim > 0 ? half->shape[half->ndim - 1] : 1;
    int64_t total = ml_kt_numel(half);
    if (total == 0 || n == 0) return 0;
    int dev = half->device.index;
    constexpr int VW = (int)(16 / sizeof(T));
    bool wide = n % VW == 0 && aligned(o, VW) && aligned(h, VW) && (!dout || aligned(dout, VW));
    int v = wide ? VW : 1;
    int64_t nvec = total / v, row_vecs = n / v;
    unsigned grid = ml_grid_for(nvec, kThreads, dev);
    if (ml_fits_u32(nvec)) {
        if (wide) geglu_start<VW, uint32_t>(grid, s, (uint32_t)nvec, (uint32_t)row_vecs, o, dout, h);
        else geglu_start<1, uint32_t>(grid, s, (uint32_t)nvec, (uint32_t)row_vecs, o, dout, h);
    } else {
        if (wide) geglu_start<VW, int64_t>(grid, s, nvec, row_vecs, o, dout, h);
        else geglu_start<1, int64_t>(grid, s, nvec, row_vecs, o, dout, h);
    }
    ML_CUDA_LAUNCHED(name);
    return 0;
}
}  // namespace

extern "C" int ml_geglu_cuda(ml_ktensor *out, const ml_ktensor *h) {
    return ml_dispatch_float(h->dtype, "geglu", [&](auto tag) -> int {
        typedef decltype(tag) T;
        return geglu_run<T>("geglu", out, ml_ptr<T>(out), (const T *)nullptr, ml_ptr<T>(h));
    });
}

extern "C" int ml_geglu_backward_cuda(ml_ktensor *dh, const ml_ktensor *dout, const ml_ktensor *h) {
    return ml_dispatch_float(h->dtype, "geglu backward", [&](auto tag) -> int {
        typedef decltype(tag) T;
        return geglu_run<T>("geglu backward", dout, ml_ptr<T>(dh), ml_ptr<T>(dout), ml_ptr<T>(h));
    });
}
