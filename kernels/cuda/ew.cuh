// ew.cuh — the elementwise launcher shared by elementwise.cu (binary ops,
// where) and elementwise_unary.cu (unary ops, clamp): see elementwise.cu
// for how it picks a kernel.  Included by those two files only.
#ifndef ML_CUDA_EW_CUH
#define ML_CUDA_EW_CUH

#include "common.cuh"
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
// descriptors (out's shape and device, as the host made them; their strides
// are read here), in: their typed data pointers.
template <typename Op, typename TO, typename... TI>
int ew_run(const char *name, const Op &op, const ml_ktensor *out, const ml_ktensor *const *ins, TO *o,
           const TI *...in) {
    constexpr int N = 1 + (int)sizeof...(TI);
    cudaStream_t s;
    if (ml_cuda_prepare(out, name, &s) < 0) return -1;
    const int64_t *strides[N];
    strides[0] = out->strides;
    for (int k = 0; k < N - 1; k++) strides[k + 1] = ins[k]->strides;
    int64_t n = ml_kt_numel(out);
    if (n == 0) return 0;
    ml_indexer<N> ix;
    ml_indexer_make(&ix, out->ndim, out->shape, strides);
    int dev = out->device.index;
    constexpr int V = (int)(16 / max_size<TO, TI...>()) > 0 ? (int)(16 / max_size<TO, TI...>()) : 1;
    bool al = aligned(o, V);
    bool ins_al[] = {aligned(in, V)...};
    for (bool b : ins_al) al = al && b;
    unsigned bcast = 0;
    const char *kernel;
    if (ml_indexer_contiguous(ix) && al) {
        kernel = "ew_contig";
        ew_contig<V><<<ml_grid_for((n + V - 1) / V, kThreads, dev), kThreads, 0, s>>>(op, n, o, in...);
    } else if (V > 1 && ml_fits_u32(n) && inner_vec_ok(ix, V, o, &bcast, in...)) {
        kernel = "ew_inner_vec";
        ew_inner_vec<V><<<ml_grid_for(n / V, kThreads, dev), kThreads, 0, s>>>(op, ix, (uint32_t)(n / V), bcast,
                                                                              o, in...);
    } else if (ml_fits_u32(n)) {
        kernel = "ew_strided";
        ew_strided<uint32_t><<<ml_grid_for(n, kThreads, dev), kThreads, 0, s>>>(op, ix, (uint32_t)n, o, in...);
    } else {
        kernel = "ew_strided";
        ew_strided<int64_t><<<ml_grid_for(n, kThreads, dev), kThreads, 0, s>>>(op, ix, n, o, in...);
    }
    ML_CUDA_LAUNCHED(kernel);
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

template <int V> using op_c = std::integral_constant<int, V>;

template <typename F> int dispatch_int(ml_dtype t, const char *what, F &&f) {
    switch (t) {
    case ML_I32: return f(int32_t());
    case ML_I64: return f(int64_t());
    case ML_U8: return f(uint8_t());
    default: return ml_error("%s (cuda): dtype %s is not supported", what, ml_dtype_name(t));
    }
}

inline bool is_float_dtype(ml_dtype t) { return t == ML_F32 || t == ML_F64 || t == ML_F16 || t == ML_BF16; }

}  // namespace

#endif
