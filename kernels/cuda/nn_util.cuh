// nn_util.cuh — small pieces shared by norm.cu, softmax.cu, index.cu and
// upsample.cu: row-wise sums and maxima across a warp or a block, vectors
// of elements and the widest machine word a byte-copy can move (scratch
// memory is ml_cuda_workspace, kernels/cuda/allocator.h).  Included by
// those files only.
#ifndef ML_CUDA_NN_UTIL_CUH
#define ML_CUDA_NN_UTIL_CUH

#include "common.cuh"
#include <initializer_list>

namespace {

constexpr int kBlock = 256;   // threads per block of the row kernels

template <typename T, int V> struct alignas(sizeof(T) * V) vec_t { T v[V]; };

// Sum across a warp, the total in every lane (the butterfly adds the same
// pairs in every lane, so all lanes hold identical bits).
__device__ __forceinline__ double warp_allsum(double v) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
    return v;
}

// Sum across groups of G threads (32: a warp; kBlock: the whole block),
// the total in every thread of the group, in an order fixed by G.
template <int G> __device__ __forceinline__ double group_allsum(double v) {
    v = warp_allsum(v);
    if constexpr (G == 32) {
        return v;
    } else {
        __shared__ double part[kBlock / 32];
        if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
        __syncthreads();
        double t = 0;
#pragma unroll
        for (int k = 0; k < kBlock / 32; k++) t += part[k];
        __syncthreads();   // part is reused by the next call
        return t;
    }
}

// The largest of the group's values; NaN never wins (as `v > max` scans).
template <int G, typename A> __device__ __forceinline__ A group_allmax(A v) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) {
        A o = __shfl_xor_sync(0xffffffffu, v, s);
        if (o > v) v = o;
    }
    if constexpr (G == 32) {
        return v;
    } else {
        __shared__ A part[kBlock / 32];
        if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
        __syncthreads();
        A t = part[0];
#pragma unroll
        for (int k = 1; k < kBlock / 32; k++)
            if (part[k] > t) t = part[k];
        __syncthreads();
        return t;
    }
}

// Blocks for G threads per row over `rows` rows, capped (the kernels
// stride over rows).
inline unsigned row_grid(int64_t rows, int G) {
    int64_t per = kBlock / G, b = (rows + per - 1) / per;
    return (unsigned)(b < 1 ? 1 : b > (1 << 30) ? (1 << 30) : b);
}

// Calls f(U()) with the widest of uint4, uint2, uint32_t, uint16_t and
// uint8_t whose size divides `bytes` and aligns every pointer in ps: the
// word a copy of rows of `bytes` bytes can move.
template <typename F> int with_unit(size_t bytes, std::initializer_list<const void *> ps, F &&f) {
    auto fits = [&](size_t u) {
        if (bytes % u) return false;
        for (const void *p : ps)
            if ((uintptr_t)p % u) return false;
        return true;
    };
    if (fits(16)) return f(uint4());
    if (fits(8)) return f(uint2());
    if (fits(4)) return f(uint32_t());
    if (fits(2)) return f(uint16_t());
    return f(uint8_t());
}

}  // namespace

#endif
