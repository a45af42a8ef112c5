// random.cu — CUDA twins of kernels/cpu/random.c (contract in random.h):
// each thread computes one Philox block of the stream in kernels/philox.h
// (4 values, or 2 for wide randint) with the same helpers the CPU uses, and
// rounds to the output dtype as ml_store_from_double does.
#include "common.cuh"
#include "random.h"
#include "philox.h"

namespace {

constexpr int kThreads = 256;

// Where value i goes: contiguous outputs skip the indexer, and aligned
// ones take a block's four values in one 4-element store (a warp then
// writes one unbroken span instead of four strided ones).
struct dest {
    ml_indexer<1> ix;
    bool contiguous, small, vec4;
    __device__ __forceinline__ int64_t at(int64_t i) const {
        if (contiguous) return i;
        int64_t off;
        if (small) ix.offsets((uint32_t)i, &off);
        else ix.offsets(i, &off);
        return off;
    }
};

template <typename T> struct alignas(4 * sizeof(T)) quad { T v[4]; };

// out[4b .. 4b+3] <- v, as one store when allowed, else one by one.
template <typename T>
__device__ __forceinline__ void put4(T *o, const dest &d, int64_t b, int64_t n, const T *v) {
    if (d.vec4 && 4 * b + 3 < n) {
        quad<T> q;
#pragma unroll
        for (int k = 0; k < 4; k++) q.v[k] = v[k];
        reinterpret_cast<quad<T> *>(o)[b] = q;
        return;
    }
    for (int k = 0; k < 4 && 4 * b + k < n; k++) o[d.at(4 * b + k)] = v[k];
}

dest make_dest(const ml_ktensor *t) {
    dest d;
    const int64_t *st[1] = {t->strides};
    ml_indexer_make(&d.ix, t->ndim, t->shape, st);
    d.contiguous = ml_indexer_contiguous(d.ix);
    d.small = ml_fits_u32(ml_kt_numel(t));
    d.vec4 = d.contiguous && (uintptr_t)t->data % (4 * ml_dtype_size(t->dtype)) == 0;
    return d;
}

template <typename T>
__global__ void uniform_kernel(T *o, dest d, int64_t n, uint64_t seed, uint64_t offset, double lo, double hi) {
    int64_t blocks = (n + 3) / 4;
    for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < blocks; b += (int64_t)gridDim.x * blockDim.x) {
        uint32_t x[4];
        T v[4];
        ml_philox_block(seed, offset, (uint64_t)b, x);
#pragma unroll
        for (int k = 0; k < 4; k++) v[k] = ml_st<T>::from(ml_philox_uniform(x[k], lo, hi));
        put4(o, d, b, n, v);
    }
}

template <typename T>
__global__ void normal_kernel(T *o, dest d, int64_t n, uint64_t seed, uint64_t offset, double mean, double std) {
    int64_t blocks = (n + 3) / 4;
    for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < blocks; b += (int64_t)gridDim.x * blockDim.x) {
        uint32_t x[4];
        double z[4];
        ml_philox_block(seed, offset, (uint64_t)b, x);
        ml_philox_box_muller(x[0], x[1], &z[0], &z[1]);
        ml_philox_box_muller(x[2], x[3], &z[2], &z[3]);
        T v[4];
#pragma unroll
        for (int k = 0; k < 4; k++) v[k] = ml_st<T>::from(ml_philox_affine(mean, std, z[k]));
        put4(o, d, b, n, v);
    }
}

// The CPU's stores: integer dtypes take the wrapped integer directly,
// float dtypes get it through double.
template <typename T> __device__ __forceinline__ T int_value(int64_t v) { return ml_st<T>::from((double)v); }
template <> __device__ __forceinline__ int64_t int_value<int64_t>(int64_t v) { return v; }
template <> __device__ __forceinline__ int32_t int_value<int32_t>(int64_t v) { return (int32_t)v; }
template <> __device__ __forceinline__ uint8_t int_value<uint8_t>(int64_t v) { return (uint8_t)v; }

template <typename T>
__global__ void randint_kernel(T *o, dest d, int64_t n, uint64_t seed, uint64_t offset, int64_t low, uint64_t range,
                               bool wide) {
    int per = wide ? 2 : 4;
    int64_t blocks = (n + per - 1) / per;
    for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < blocks; b += (int64_t)gridDim.x * blockDim.x) {
        uint32_t x[4];
        ml_philox_block(seed, offset, (uint64_t)b, x);
        for (int k = 0; k < per; k++) {
            int64_t i = per * b + k;
            if (i >= n) break;
            uint64_t u = wide ? ((uint64_t)x[2 * k] | (uint64_t)x[2 * k + 1] << 32) : (uint64_t)x[k];
            o[d.at(i)] = int_value<T>((int64_t)((uint64_t)low + u % range));
        }
    }
}

}  // namespace

extern "C" int ml_uniform_cuda(ml_ktensor *out, uint64_t seed, uint64_t offset, double lo, double hi) {
    cudaStream_t s;
    if (ml_cuda_prepare(out, "uniform", &s) < 0) return -1;
    int64_t n = ml_kt_numel(out);
    if (n == 0) return 0;
    dest d = make_dest(out);
    unsigned grid = ml_grid_for((n + 3) / 4, kThreads, out->device.index);
    return ml_dispatch_float(out->dtype, "uniform", [&](auto tag) -> int {
        typedef decltype(tag) T;
        uniform_kernel<T><<<grid, kThreads, 0, s>>>(ml_ptr<T>(out), d, n, seed, offset, lo, hi);
        ML_CUDA_LAUNCHED("uniform_kernel");
        return 0;
    });
}

extern "C" int ml_normal_cuda(ml_ktensor *out, uint64_t seed, uint64_t offset, double mean, double std) {
    cudaStream_t s;
    if (ml_cuda_prepare(out, "normal", &s) < 0) return -1;
    int64_t n = ml_kt_numel(out);
    if (n == 0) return 0;
    dest d = make_dest(out);
    unsigned grid = ml_grid_for((n + 3) / 4, kThreads, out->device.index);
    return ml_dispatch_float(out->dtype, "normal", [&](auto tag) -> int {
        typedef decltype(tag) T;
        normal_kernel<T><<<grid, kThreads, 0, s>>>(ml_ptr<T>(out), d, n, seed, offset, mean, std);
        ML_CUDA_LAUNCHED("normal_kernel");
        return 0;
    });
}

extern "C" int ml_randint_cuda(ml_ktensor *out, uint64_t seed, uint64_t offset, int64_t low, int64_t high) {
    cudaStream_t s;
    if (ml_cuda_prepare(out, "randint", &s) < 0) return -1;
    int64_t n = ml_kt_numel(out);
    if (n == 0) return 0;
    uint64_t range = (uint64_t)high - (uint64_t)low;
    bool wide = range > 0x100000000ull;
    dest d = make_dest(out);
    unsigned grid = ml_grid_for((n + 3) / 4, kThreads, out->device.index);
    return ml_dispatch_all(out->dtype, [&](auto tag) -> int {
        typedef decltype(tag) T;
        randint_kernel<T><<<grid, kThreads, 0, s>>>(ml_ptr<T>(out), d, n, seed, offset, low, range, wide);
        ML_CUDA_LAUNCHED("randint_kernel");
        return 0;
    });
}
