// softmax.cu — CUDA twins of kernels/cpu/softmax.c (contract in softmax.h).
//
// Tensors are [outer, D, inner] around the softmax dim.  Two kernel shapes:
//   rows     inner == 1 (the last dim): a warp per row, or a whole block
//            for rows over 1024 values; three sweeps of the row (max, sum
//            of exp, write), the later ones mostly from cache.
//   columns  inner > 1: a thread per (outer, inner) position walking D
//            with stride inner, so neighbouring threads read neighbouring
//            values.
// The arithmetic is the CPU's: max and exp in the element's compute type
// (f32 for f32/f16/bf16), the sum in double, log-sum-exp in double; the
// backward combines in double.  Products the CPU rounds separately are
// spelled with _rn intrinsics so nvcc does not fuse them.
#include "nn_util.cuh"
#include "softmax.h"
#include <cmath>
#include <type_traits>

namespace {

__device__ __forceinline__ float ex(float v) { return expf(v); }
__device__ __forceinline__ double ex(double v) { return exp(v); }

// G threads per row, rows grid-strided.
template <int G, bool LOG, typename T>
__global__ void __launch_bounds__(kBlock) sm_rows(const T *__restrict__ x, T *__restrict__ y, int64_t rows, int64_t D) {
    typedef typename ml_ctype<T>::type A;
    int lane = threadIdx.x % G;
    int64_t step = (int64_t)gridDim.x * (kBlock / G);
    for (int64_t row = (int64_t)blockIdx.x * (kBlock / G) + threadIdx.x / G; row < rows; row += step) {
        const T *p = x + row * D;
        T *q = y + row * D;
        A mx = (A)-INFINITY;
        for (int64_t d = lane; d < D; d += G) {
            A v = ml_to_c(p[d]);
            if (v > mx) mx = v;
        }
        mx = group_allmax<G>(mx);
        double s = 0;
        for (int64_t d = lane; d < D; d += G) s += (double)ex(ml_to_c(p[d]) - mx);
        s = group_allsum<G>(s);
        if (LOG) {
            A lse = (A)((double)mx + log(s));
            for (int64_t d = lane; d < D; d += G) q[d] = ml_from_c<T>(ml_to_c(p[d]) - lse);
        } else {
            A inv = (A)(1.0 / s);
            for (int64_t d = lane; d < D; d += G) q[d] = ml_from_c<T>(ex(ml_to_c(p[d]) - mx) * inv);
        }
    }
}

// A thread per (outer, inner) position.
template <bool LOG, typename T>
__global__ void __launch_bounds__(kBlock) sm_cols(const T *__restrict__ x, T *__restrict__ y, int64_t outer, int64_t D,
                                                  int64_t inner) {
    typedef typename ml_ctype<T>::type A;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < outer * inner;
         t += (int64_t)gridDim.x * blockDim.x) {
        int64_t o = t / inner, base = o * D * inner + (t - o * inner);
        A mx = (A)-INFINITY;
        for (int64_t d = 0; d < D; d++) {
            A v = ml_to_c(x[base + d * inner]);
            if (v > mx) mx = v;
        }
        double s = 0;
        for (int64_t d = 0; d < D; d++) s += (double)ex(ml_to_c(x[base + d * inner]) - mx);
        if (LOG) {
            A lse = (A)((double)mx + log(s));
            for (int64_t d = 0; d < D; d++) y[base + d * inner] = ml_from_c<T>(ml_to_c(x[base + d * inner]) - lse);
        } else {
            A inv = (A)(1.0 / s);
            for (int64_t d = 0; d < D; d++)
                y[base + d * inner] = ml_from_c<T>(ex(ml_to_c(x[base + d * inner]) - mx) * inv);
        }
    }
}

// dx from dy and the forward's output y at one element, given the row sum
// s (of dy for log_softmax, of dy*y for softmax).
template <bool LOG, typename T> __device__ __forceinline__ T sm_grad(T gt, T yt, double s) {
    double g = (double)ml_to_c(gt);
    if (LOG) return ml_st<T>::from(__dsub_rn(g, __dmul_rn((double)ex(ml_to_c(yt)), s)));
    return ml_st<T>::from(__dmul_rn((double)ml_to_c(yt), __dsub_rn(g, s)));
}

template <bool LOG, typename T> __device__ __forceinline__ double sm_term(T gt, T yt) {
    double g = (double)ml_to_c(gt);
    return LOG ? g : g * (double)ml_to_c(yt);
}

template <int G, bool LOG, typename T>
__global__ void __launch_bounds__(kBlock) sm_rows_bwd(const T *__restrict__ dy, const T *__restrict__ y,
                                                      T *__restrict__ dx, int64_t rows, int64_t D) {
    int lane = threadIdx.x % G;
    int64_t step = (int64_t)gridDim.x * (kBlock / G);
    for (int64_t row = (int64_t)blockIdx.x * (kBlock / G) + threadIdx.x / G; row < rows; row += step) {
        const T *g = dy + row * D, *p = y + row * D;
        T *q = dx + row * D;
        double s = 0;
        for (int64_t d = lane; d < D; d += G) s += sm_term<LOG>(g[d], p[d]);
        s = group_allsum<G>(s);
        for (int64_t d = lane; d < D; d += G) q[d] = sm_grad<LOG>(g[d], p[d], s);
    }
}

template <bool LOG, typename T>
__global__ void __launch_bounds__(kBlock) sm_cols_bwd(const T *__restrict__ dy, const T *__restrict__ y,
                                                      T *__restrict__ dx, int64_t outer, int64_t D, int64_t inner) {
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < outer * inner;
         t += (int64_t)gridDim.x * blockDim.x) {
        int64_t o = t / inner, base = o * D * inner + (t - o * inner);
        double s = 0;
        for (int64_t d = 0; d < D; d++) s += sm_term<LOG>(dy[base + d * inner], y[base + d * inner]);
        for (int64_t d = 0; d < D; d++) {
            int64_t k = base + d * inner;
            dx[k] = sm_grad<LOG>(dy[k], y[k], s);
        }
    }
}

void split_dims(const ml_ktensor *t, int dim, int64_t *outer, int64_t *D, int64_t *inner) {
    *outer = *inner = 1;
    *D = t->ndim ? t->shape[dim] : 1;
    for (int i = 0; i < dim; i++) *outer *= t->shape[i];
    for (int i = dim + 1; i < t->ndim; i++) *inner *= t->shape[i];
}

// Runs f(G, LOG) for the row kernels' G threads per row and the log flag.
template <typename F> void pick(int64_t D, bool log, F &&f) {
    if (D > 1024) {
        if (log) f(std::integral_constant<int, kBlock>(), std::true_type());
        else f(std::integral_constant<int, kBlock>(), std::false_type());
    } else {
        if (log) f(std::integral_constant<int, 32>(), std::true_type());
        else f(std::integral_constant<int, 32>(), std::false_type());
    }
}

}  // namespace

extern "C" int ml_softmax_forward_cuda(ml_ktensor *out, const ml_ktensor *x, int dim, bool log) {
    const char *op = log ? "log_softmax" : "softmax";
    cudaStream_t s;
    if (ml_cuda_prepare(x, op, &s) < 0) return -1;
    int64_t outer, D, inner;
    split_dims(x, dim, &outer, &D, &inner);
    if (ml_kt_numel(x) == 0) return 0;
    int dev = x->device.index;
    return ml_dispatch_float(x->dtype, op, [&](auto tag) -> int {
        typedef decltype(tag) T;
        const T *xp = ml_ptr<T>(x);
        T *yp = ml_ptr<T>(out);
        if (inner == 1) {
            pick(D, log, [&](auto g, auto lg) {
                constexpr int G = decltype(g)::value;
                sm_rows<G, decltype(lg)::value, T><<<row_grid(outer, G), kBlock, 0, s>>>(xp, yp, outer, D);
            });
        } else {
            unsigned grid = ml_grid_for(outer * inner, kBlock, dev);
            if (log) sm_cols<true, T><<<grid, kBlock, 0, s>>>(xp, yp, outer, D, inner);
            else sm_cols<false, T><<<grid, kBlock, 0, s>>>(xp, yp, outer, D, inner);
        }
        ML_CUDA_LAUNCHED(inner == 1 ? "sm_rows" : "sm_cols");
        return 0;
    });
}

extern "C" int ml_softmax_backward_cuda(ml_ktensor *dx, const ml_ktensor *dout, const ml_ktensor *out, int dim, bool log) {
    const char *op = log ? "log_softmax backward" : "softmax backward";
    cudaStream_t s;
    if (ml_cuda_prepare(out, op, &s) < 0) return -1;
    int64_t outer, D, inner;
    split_dims(out, dim, &outer, &D, &inner);
    if (ml_kt_numel(out) == 0) return 0;
    int dev = out->device.index;
    return ml_dispatch_float(out->dtype, op, [&](auto tag) -> int {
        typedef decltype(tag) T;
        const T *gp = ml_ptr<T>(dout), *yp = ml_ptr<T>(out);
        T *dp = ml_ptr<T>(dx);
        if (inner == 1) {
            pick(D, log, [&](auto g, auto lg) {
                constexpr int G = decltype(g)::value;
                sm_rows_bwd<G, decltype(lg)::value, T><<<row_grid(outer, G), kBlock, 0, s>>>(gp, yp, dp, outer, D);
            });
        } else {
            unsigned grid = ml_grid_for(outer * inner, kBlock, dev);
            if (log) sm_cols_bwd<true, T><<<grid, kBlock, 0, s>>>(gp, yp, dp, outer, D, inner);
            else sm_cols_bwd<false, T><<<grid, kBlock, 0, s>>>(gp, yp, dp, outer, D, inner);
        }
        ML_CUDA_LAUNCHED(inner == 1 ? "sm_rows_bwd" : "sm_cols_bwd");
        return 0;
    });
}
