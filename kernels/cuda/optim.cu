// optim.cu — the fused AdamW step on the GPU (contract in optim.h).
//
// The element arithmetic is kernels/cpu/optim.c's, step for step:
//     p = p * (1 - lr*wd)
//     m = lerp(m, g, 1 - b1)
//     v = v * b2 + (1 - b2) * g * g
//     denom = sqrt(v) / sqrt(1 - b2^t) + eps
//     p = p + (-lr / (1 - b1^t)) * (m / denom)
// spelled with the _rn intrinsics so nvcc cannot fuse a multiply and an add
// (the CPU build never does), and the scalars computed on the host in
// double exactly as the CPU computes them.  The bf16-sr step (bf16 param or
// moments) runs the same f32 arithmetic and stores bf16 results with
// kernels/bf16_sr.h's stochastic rounding and Philox bits, so it too gives
// the CPU's bits for the same seed and offset.
#include "common.cuh"
#include "optim.h"
#include "bf16_sr.h"
#include <cmath>

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float r_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float r_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float r_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float r_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float r_sqrt(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double r_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double r_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double r_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double r_div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double r_sqrt(double a) { return __dsqrt_rn(a); }

template <typename T> struct adamw_scalars {
    T decay, w1, w1c, beta2, w2, eps, neg_step, bc2_sqrt;
    bool small_w, do_decay;
};

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(int64_t n, T *__restrict__ p, const G *__restrict__ g, T *__restrict__ m, T *__restrict__ v,
                 adamw_scalars<T> c) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        T pi = p[i], gi = (T)ml_ld(g[i]), mi = m[i], vi = v[i];
        if (c.do_decay) pi = r_mul(pi, c.decay);
        mi = c.small_w ? r_add(mi, r_mul(c.w1, r_sub(gi, mi))) : r_sub(gi, r_mul(r_sub(gi, mi), c.w1c));
        vi = r_add(r_mul(vi, c.beta2), r_mul(r_mul(c.w2, gi), gi));
        T denom = r_add(r_div(r_sqrt(vi), c.bc2_sqrt), c.eps);
        p[i] = r_add(pi, r_mul(c.neg_step, r_div(mi, denom)));
        m[i] = mi;
        v[i] = vi;
    }
}

__device__ __forceinline__ void st_sr(float *b, int64_t i, float x, uint32_t) { b[i] = x; }
__device__ __forceinline__ void st_sr(ml_bf16_t *b, int64_t i, float x, uint32_t lane) {
    b[i].x = ml_f32_to_bf16_sr(x, lane);
}

// adamw_kernel's f32 arithmetic with each operand f32 or bf16; P is the
// param's element type, S the moments', G the gradient's.
template <typename P, typename G, typename S>
__global__ void __launch_bounds__(kThreads)
    adamw_sr_kernel(int64_t n, P *__restrict__ p, const G *__restrict__ g, S *__restrict__ m, S *__restrict__ v,
                    adamw_scalars<float> c, uint64_t seed, uint64_t offset) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        uint32_t x[4];
        ml_philox_block(seed, offset, (uint64_t)i, x);
        float pi = ml_ld(p[i]), gi = ml_ld(g[i]), mi = ml_ld(m[i]), vi = ml_ld(v[i]);
        if (c.do_decay) pi = r_mul(pi, c.decay);
        mi = c.small_w ? r_add(mi, r_mul(c.w1, r_sub(gi, mi))) : r_sub(gi, r_mul(r_sub(gi, mi), c.w1c));
        vi = r_add(r_mul(vi, c.beta2), r_mul(r_mul(c.w2, gi), gi));
        float denom = r_add(r_div(r_sqrt(vi), c.bc2_sqrt), c.eps);
        st_sr(p, i, r_add(pi, r_mul(c.neg_step, r_div(mi, denom))), x[0]);
        st_sr(m, i, mi, x[1]);
        st_sr(v, i, vi, x[2]);
    }
}

template <typename T>
adamw_scalars<T> scalars(double lr, double b1, double b2, double eps, double wd, int64_t step) {
    adamw_scalars<T> c;
    c.decay = (T)(1.0 - lr * wd);
    c.w1 = (T)(1.0 - b1);
    c.w1c = (T)1 - c.w1;
    c.beta2 = (T)b2;
    c.w2 = (T)(1.0 - b2);
    c.eps = (T)eps;
    double bc1 = 1.0 - pow(b1, (double)step), bc2 = 1.0 - pow(b2, (double)step);
    c.neg_step = (T)(-(lr / bc1));
    c.bc2_sqrt = (T)sqrt(bc2);
    c.small_w = c.w1 < (T)0.5;
    c.do_decay = wd != 0;
    return c;
}

template <typename T, typename G>
int launch(ml_tensor *p, const ml_tensor *g, ml_tensor *m, ml_tensor *v, const adamw_scalars<T> &c, cudaStream_t s) {
    int64_t n = ml_numel(p);
    if (n == 0) return 0;
    adamw_kernel<T, G><<<ml_grid_for(n, kThreads, p->device.index), kThreads, 0, s>>>(
        n, ml_ptr<T>(p), ml_ptr<G>(g), ml_ptr<T>(m), ml_ptr<T>(v), c);
    ML_CUDA_LAUNCHED("adamw");
    return 0;
}

template <typename P, typename G, typename S>
int launch_sr(ml_tensor *p, const ml_tensor *g, ml_tensor *m, ml_tensor *v, const adamw_scalars<float> &c,
              uint64_t seed, uint64_t offset, cudaStream_t s) {
    int64_t n = ml_numel(p);
    if (n == 0) return 0;
    adamw_sr_kernel<P, G, S><<<ml_grid_for(n, kThreads, p->device.index), kThreads, 0, s>>>(
        n, ml_ptr<P>(p), ml_ptr<G>(g), ml_ptr<S>(m), ml_ptr<S>(v), c, seed, offset);
    ML_CUDA_LAUNCHED("adamw");
    return 0;
}

template <typename P, typename S>
int launch_sr_g(ml_tensor *p, const ml_tensor *g, ml_tensor *m, ml_tensor *v, const adamw_scalars<float> &c,
                uint64_t seed, uint64_t offset, cudaStream_t s) {
    switch (g->dtype) {
    case ML_F32: return launch_sr<P, float, S>(p, g, m, v, c, seed, offset, s);
    case ML_BF16: return launch_sr<P, ml_bf16_t, S>(p, g, m, v, c, seed, offset, s);
    case ML_F16: return launch_sr<P, ml_f16_t, S>(p, g, m, v, c, seed, offset, s);
    default: return 1;
    }
}

}  // namespace

extern "C" int ml_adamw_cuda(ml_tensor *p, const ml_tensor *g, ml_tensor *m, ml_tensor *v, double lr, double b1,
                             double b2, double eps, double wd, int64_t step, uint64_t seed, uint64_t offset) {
    const ml_tensor *all[4] = {p, g, m, v};
    for (int k = 0; k < 4; k++) {
        if (!ml_is_contiguous(all[k]) || ml_numel(all[k]) != ml_numel(p) || !ml_device_eq(all[k]->device, p->device))
            return ml_error("adamw (cuda): param, grad and moments must be contiguous, of one size, on one device");
    }
    bool sr = p->dtype == ML_BF16 || m->dtype == ML_BF16;
    if (sr) {
        // The bf16-sr step: p f32 or bf16; m, v both f32 or both bf16.
        bool p_ok = p->dtype == ML_F32 || p->dtype == ML_BF16;
        bool s_ok = m->dtype == v->dtype && (m->dtype == ML_F32 || m->dtype == ML_BF16);
        int rc = 1;
        cudaStream_t s;
        if (p_ok && s_ok) {
            if (ml_cuda_prepare(p, "adamw", &s) < 0) return -1;
            adamw_scalars<float> c = scalars<float>(lr, b1, b2, eps, wd, step);
            if (p->dtype == ML_BF16 && m->dtype == ML_BF16)
                rc = launch_sr_g<ml_bf16_t, ml_bf16_t>(p, g, m, v, c, seed, offset, s);
            else if (p->dtype == ML_BF16)
                rc = launch_sr_g<ml_bf16_t, float>(p, g, m, v, c, seed, offset, s);
            else
                rc = launch_sr_g<float, ml_bf16_t>(p, g, m, v, c, seed, offset, s);
        }
        if (rc <= 0) return rc;
        return ml_error("adamw (cuda): unsupported dtypes (param %s, grad %s, exp_avg %s, exp_avg_sq %s): a bf16 "
                        "step takes an f32 or bf16 param, an f32, bf16 or f16 grad and f32 or bf16 moments of one "
                        "dtype",
                        ml_dtype_name(p->dtype), ml_dtype_name(g->dtype), ml_dtype_name(m->dtype),
                        ml_dtype_name(v->dtype));
    }
    if (m->dtype != p->dtype || v->dtype != p->dtype)
        return ml_error("adamw (cuda): moments must have the param's dtype (param %s, m %s, v %s)",
                        ml_dtype_name(p->dtype), ml_dtype_name(m->dtype), ml_dtype_name(v->dtype));
    cudaStream_t s;
    if (ml_cuda_prepare(p, "adamw", &s) < 0) return -1;
    if (p->dtype == ML_F32) {
        adamw_scalars<float> c = scalars<float>(lr, b1, b2, eps, wd, step);
        switch (g->dtype) {
        case ML_F32: return launch<float, float>(p, g, m, v, c, s);
        case ML_BF16: return launch<float, ml_bf16_t>(p, g, m, v, c, s);
        case ML_F16: return launch<float, ml_f16_t>(p, g, m, v, c, s);
        default: break;
        }
    } else if (p->dtype == ML_F64 && g->dtype == ML_F64) {
        return launch<double, double>(p, g, m, v, scalars<double>(lr, b1, b2, eps, wd, step), s);
    }
    return ml_error("adamw (cuda): unsupported dtypes (param %s, grad %s): use f32 params with an f32, f16 or "
                    "bf16 grad, or f64 throughout",
                    ml_dtype_name(p->dtype), ml_dtype_name(g->dtype));
}
