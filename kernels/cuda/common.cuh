// common.cuh — what every CUDA kernel file shares: the C host headers (as
// extern "C"), checked CUDA calls that report through ml_error instead of
// exiting, element types and their conversions (the same rounding as the CPU
// code in host/dtype.h), dtype dispatch, launch sizing and a strided indexer
// for up to ML_MAX_DIMS dims.
#ifndef ML_CUDA_COMMON_CUH
#define ML_CUDA_COMMON_CUH

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cuda_runtime.h>
#include <cuda_fp16.h>

extern "C" {
#include "kernel.h"
#include "error.h"
// No tensor.h: kernels see ml_ktensor only.  nccl.cu, a communication layer
// over tensors rather than a kernel, has ml_tensor from dist.h.
}
#include "runtime.h"
#include "allocator.h"

// ---- checked calls -------------------------------------------------------

// Records "CUDA error in <file>:<line> (<what>): <message>" and returns -1.
// Sticky errors (a kernel faulted) are said to be fatal for the process's
// CUDA context, since every later call will fail too.
int ml_cuda_fail(cudaError_t e, const char *what, const char *file, int line);

#define ML_CUDA_TRY(call)                                                  \
    do {                                                                   \
        cudaError_t ml_e_ = (call);                                        \
        if (ml_e_ != cudaSuccess)                                          \
            return ml_cuda_fail(ml_e_, #call, __FILE__, __LINE__);         \
    } while (0)

// ml_cuda_fail for a kernel launch: "CUDA error in <file>:<line> (launch of
// <kernel>): <message>".
int ml_cuda_launch_fail(cudaError_t e, const char *kernel, const char *file, int line);

// After a <<<...>>> launch: reports a bad configuration or an earlier
// asynchronous fault, naming the kernel (any const char *).
#define ML_CUDA_LAUNCHED(kernel)                                           \
    do {                                                                   \
        cudaError_t ml_e_ = cudaGetLastError();                            \
        if (ml_e_ != cudaSuccess)                                          \
            return ml_cuda_launch_fail(ml_e_, (kernel), __FILE__, __LINE__); \
    } while (0)

// Number of SMs of dev (cached), for sizing grid-stride launches.
int ml_cuda_sm_count(int dev);

// Blocks for a grid-stride loop over n items: enough to fill the GPU a few
// times over, never more than the work needs.
static inline unsigned ml_grid_for(int64_t n, int threads, int dev) {
    int64_t want = (n + threads - 1) / threads;
    int64_t cap = (int64_t)ml_cuda_sm_count(dev) * 8;
    if (want > cap) want = cap;
    return (unsigned)(want < 1 ? 1 : want);
}

// ---- element types -------------------------------------------------------

// 16-bit floats and bool are stored as plain bits; these wrappers keep the
// types distinct for overloading (u8 and bool share a width, not a meaning).
struct ml_f16_t { uint16_t x; };
struct ml_bf16_t { uint16_t x; };
struct ml_bool_t { uint8_t x; };

template <typename T> struct ml_dtype_of;
template <> struct ml_dtype_of<float> { static constexpr ml_dtype v = ML_F32; };
template <> struct ml_dtype_of<double> { static constexpr ml_dtype v = ML_F64; };
template <> struct ml_dtype_of<ml_f16_t> { static constexpr ml_dtype v = ML_F16; };
template <> struct ml_dtype_of<ml_bf16_t> { static constexpr ml_dtype v = ML_BF16; };
template <> struct ml_dtype_of<int32_t> { static constexpr ml_dtype v = ML_I32; };
template <> struct ml_dtype_of<int64_t> { static constexpr ml_dtype v = ML_I64; };
template <> struct ml_dtype_of<uint8_t> { static constexpr ml_dtype v = ML_U8; };
template <> struct ml_dtype_of<ml_bool_t> { static constexpr ml_dtype v = ML_BOOL; };

__host__ __device__ __forceinline__ float ml_bf16_bits_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
// Round to nearest even, NaN kept quiet: the same bits as ml_f32_to_bf16.
__host__ __device__ __forceinline__ uint16_t ml_float_to_bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// An element as a number: f32 for f32/f16/bf16, u8 and bool (exact), f64
// for f64 and the wide integers (the CPU converts those through double;
// doing the same keeps every conversion bit-identical).
__device__ __forceinline__ float ml_ld(float v) { return v; }
__device__ __forceinline__ double ml_ld(double v) { return v; }
__device__ __forceinline__ float ml_ld(ml_f16_t v) { return __half2float(__ushort_as_half(v.x)); }
__device__ __forceinline__ float ml_ld(ml_bf16_t v) { return ml_bf16_bits_to_float(v.x); }
__device__ __forceinline__ double ml_ld(int32_t v) { return (double)v; }
__device__ __forceinline__ double ml_ld(int64_t v) { return (double)v; }
__device__ __forceinline__ float ml_ld(uint8_t v) { return (float)v; }
__device__ __forceinline__ float ml_ld(ml_bool_t v) { return v.x ? 1.0f : 0.0f; }

// Store an f32 or f64 value into type T with the CPU's semantics
// (ml_store_from_double): narrowing floats go through f32, integers
// truncate toward zero, u8 wraps, bool is "non-zero".  Integer targets take
// a double (f32 widens exactly).
template <typename T> struct ml_st;
template <> struct ml_st<float> {
    __device__ static float from(float v) { return v; }
    __device__ static float from(double v) { return (float)v; }
};
template <> struct ml_st<double> {
    __device__ static double from(float v) { return (double)v; }
    __device__ static double from(double v) { return v; }
};
template <> struct ml_st<ml_f16_t> {
    __device__ static ml_f16_t from(float v) { return ml_f16_t{__half_as_ushort(__float2half_rn(v))}; }
    __device__ static ml_f16_t from(double v) { return from((float)v); }
};
template <> struct ml_st<ml_bf16_t> {
    __device__ static ml_bf16_t from(float v) { return ml_bf16_t{ml_float_to_bf16_bits(v)}; }
    __device__ static ml_bf16_t from(double v) { return from((float)v); }
};
// NaN and out-of-range values become the "integer indefinite" value, as the
// x86 conversion instructions behind the CPU's casts produce (the GPU's own
// conversions would saturate instead).
__device__ __forceinline__ int32_t ml_x86_i32(double v) {
    return (v >= -2147483648.0 && v < 2147483648.0) ? (int32_t)v : INT32_MIN;
}
__device__ __forceinline__ int64_t ml_x86_i64(double v) {
    return (v >= -9223372036854775808.0 && v < 9223372036854775808.0) ? (int64_t)v : INT64_MIN;
}
template <> struct ml_st<int32_t> {
    __device__ static int32_t from(double v) { return ml_x86_i32(v); }
};
template <> struct ml_st<int64_t> {
    __device__ static int64_t from(double v) { return ml_x86_i64(v); }
};
// u8 goes through a 32-bit conversion and keeps the low byte, as gcc's
// (uint8_t)double does on x86.
template <> struct ml_st<uint8_t> {
    __device__ static uint8_t from(double v) { return (uint8_t)ml_x86_i32(v); }
};
template <> struct ml_st<ml_bool_t> {
    __device__ static ml_bool_t from(float v) { return ml_bool_t{(uint8_t)(v != 0.0f)}; }
    __device__ static ml_bool_t from(double v) { return ml_bool_t{(uint8_t)(v != 0.0)}; }
};

// dst-type value of a src-type value, as the CPU's copy converts it.
template <typename D, typename S> __device__ __forceinline__ D ml_cvt(S v) {
    return ml_st<D>::from(ml_ld(v));
}

// The arithmetic of elementwise ops: f16/bf16 compute in f32 (rounded back
// once per op, as the CPU path through f32 does), every other type in itself
// (bool as a 0/1 byte).
template <typename T> struct ml_ctype { typedef T type; };
template <> struct ml_ctype<ml_f16_t> { typedef float type; };
template <> struct ml_ctype<ml_bf16_t> { typedef float type; };
template <> struct ml_ctype<ml_bool_t> { typedef uint8_t type; };

template <typename T> __device__ __forceinline__ T ml_to_c(T v) { return v; }
__device__ __forceinline__ float ml_to_c(ml_f16_t v) { return ml_ld(v); }
__device__ __forceinline__ float ml_to_c(ml_bf16_t v) { return ml_ld(v); }
__device__ __forceinline__ uint8_t ml_to_c(ml_bool_t v) { return v.x; }

template <typename T> __device__ __forceinline__ T ml_from_c(typename ml_ctype<T>::type v) { return (T)v; }
template <> __device__ __forceinline__ ml_f16_t ml_from_c<ml_f16_t>(float v) { return ml_st<ml_f16_t>::from(v); }
template <> __device__ __forceinline__ ml_bf16_t ml_from_c<ml_bf16_t>(float v) { return ml_st<ml_bf16_t>::from(v); }
template <> __device__ __forceinline__ ml_bool_t ml_from_c<ml_bool_t>(uint8_t v) { return ml_bool_t{(uint8_t)(v != 0)}; }

template <typename T> struct ml_is_floating { static constexpr bool v = false; };
template <> struct ml_is_floating<float> { static constexpr bool v = true; };
template <> struct ml_is_floating<double> { static constexpr bool v = true; };
template <> struct ml_is_floating<ml_f16_t> { static constexpr bool v = true; };
template <> struct ml_is_floating<ml_bf16_t> { static constexpr bool v = true; };

// ---- dtype dispatch ------------------------------------------------------

// Calls f(T{}) with T the storage type of t.  f returns int (0 / -1).
template <typename F> int ml_dispatch_all(ml_dtype t, F &&f) {
    switch (t) {
    case ML_F32: return f(float());
    case ML_F64: return f(double());
    case ML_F16: return f(ml_f16_t());
    case ML_BF16: return f(ml_bf16_t());
    case ML_I32: return f(int32_t());
    case ML_I64: return f(int64_t());
    case ML_U8: return f(uint8_t());
    case ML_BOOL: return f(ml_bool_t());
    default: return ml_error("cuda: unknown dtype %d", (int)t);
    }
}

// Floating types only; `op` names the caller in the error.
template <typename F> int ml_dispatch_float(ml_dtype t, const char *op, F &&f) {
    switch (t) {
    case ML_F32: return f(float());
    case ML_F64: return f(double());
    case ML_F16: return f(ml_f16_t());
    case ML_BF16: return f(ml_bf16_t());
    default: return ml_error("%s: dtype %s is not supported on cuda (expected f32, f64, f16 or bf16)",
                             op, ml_dtype_short(t));
    }
}

// ---- strided indexing ----------------------------------------------------

// Maps a logical (row-major) element index to element offsets into N
// operands sharing one shape.  Built on the host by ml_indexer_make, which
// drops size-1 dims and merges dims that are contiguous in every operand, so
// a contiguous tensor becomes one dim and the div/mod chain is short.
template <int N> struct ml_indexer {
    int ndim;
    int64_t size[ML_MAX_DIMS];
    int64_t stride[N][ML_MAX_DIMS];

    // Idx is uint32_t when the element count fits (32-bit division is much
    // cheaper on the GPU), else int64_t.
    template <typename Idx> __device__ __forceinline__ void offsets(Idx i, int64_t *off) const {
#pragma unroll
        for (int k = 0; k < N; k++) off[k] = 0;
        for (int d = ndim - 1; d > 0; d--) {
            Idx sz = (Idx)size[d];
            Idx q = i / sz;
            Idx r = i - q * sz;
            i = q;
#pragma unroll
            for (int k = 0; k < N; k++) off[k] += (int64_t)r * stride[k][d];
        }
        if (ndim > 0) {
#pragma unroll
            for (int k = 0; k < N; k++) off[k] += (int64_t)i * stride[k][0];
        }
    }
};

template <int N>
static inline void ml_indexer_make(ml_indexer<N> *ix, int ndim, const int64_t *shape,
                                   const int64_t *const *strides) {
    int out = 0;
    // Walk from the innermost dim outwards, building the merged dims
    // innermost-first, then reverse.
    int64_t sz[ML_MAX_DIMS], st[N][ML_MAX_DIMS];
    for (int d = ndim - 1; d >= 0; d--) {
        if (shape[d] == 1) continue;
        if (out > 0) {
            bool merge = true;
            for (int k = 0; k < N; k++)
                if (strides[k][d] != st[k][out - 1] * sz[out - 1]) merge = false;
            if (merge) { sz[out - 1] *= shape[d]; continue; }
        }
        sz[out] = shape[d];
        for (int k = 0; k < N; k++) st[k][out] = strides[k][d];
        out++;
    }
    ix->ndim = out;
    for (int d = 0; d < out; d++) {
        ix->size[d] = sz[out - 1 - d];
        for (int k = 0; k < N; k++) ix->stride[k][d] = st[k][out - 1 - d];
    }
    for (int d = out; d < ML_MAX_DIMS; d++) {
        ix->size[d] = 1;
        for (int k = 0; k < N; k++) ix->stride[k][d] = 0;
    }
}

// True if every operand of ix walks memory contiguously (stride 1, one dim).
template <int N> static inline bool ml_indexer_contiguous(const ml_indexer<N> &ix) {
    if (ix.ndim == 0) return true;
    if (ix.ndim != 1) return false;
    for (int k = 0; k < N; k++)
        if (ix.stride[k][0] != 1) return false;
    return true;
}

static inline bool ml_fits_u32(int64_t n) { return n < (int64_t)0x7fffffff; }

// Typed pointer to a descriptor's first element.
template <typename T> static inline T *ml_ptr(const ml_ktensor *t) { return (T *)t->data; }

// Selects t's device on this thread and returns its compute stream; t must
// be on a CUDA device (the host op dispatched on that, so failing here
// means a kernel was called from the wrong place).
int ml_cuda_prepare(const ml_ktensor *t, const char *op, cudaStream_t *stream);

#endif
