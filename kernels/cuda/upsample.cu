// upsample.cu — CUDA twins of kernels/cpu/upsample.c (contract in
// upsample.h).  NHWC keeps each pixel's C values contiguous: the forward
// copies them as machine words (up to 16 bytes) from the source pixel; the
// backward gives each dx element a thread that adds its s x s block row by
// row, the order in which the CPU's walk over dout meets them.
#include "nn_util.cuh"
#include "upsample.h"

namespace {

// y[n, oh, ow, :] = x[n, oh / s, ow / s, :] in words of U, `units` per pixel.
template <typename U, typename Idx>
__global__ void __launch_bounds__(kBlock) up_fwd(U *__restrict__ y, const U *__restrict__ x, Idx H, Idx W, Idx s,
                                                 Idx units, Idx total) {
    Idx Ws = W * s, Hs = H * s;
    for (Idx t = blockIdx.x * (Idx)blockDim.x + threadIdx.x; t < total; t += (Idx)gridDim.x * blockDim.x) {
        Idx p = t / units, k = t - p * units;
        Idx q = p / Ws, ow = p - q * Ws;
        Idx n = q / Hs, oh = q - n * Hs;
        y[t] = x[((n * H + oh / s) * W + ow / s) * units + k];
    }
}

template <typename T, typename Idx>
__global__ void __launch_bounds__(kBlock) up_bwd(T *__restrict__ dx, const T *__restrict__ dy, Idx H, Idx W, Idx C,
                                                 Idx s, Idx total) {
    typedef typename ml_ctype<T>::type A;
    Idx Ws = W * s;
    for (Idx t = blockIdx.x * (Idx)blockDim.x + threadIdx.x; t < total; t += (Idx)gridDim.x * blockDim.x) {
        Idx p = t / C, c = t - p * C;
        Idx q = p / W, w = p - q * W;
        Idx n = q / H, h = q - n * H;
        const T *blk = dy + (((n * H + h) * s) * Ws + w * s) * C + c;
        A acc = 0;
        for (Idx a = 0; a < s; a++)
            for (Idx b = 0; b < s; b++) acc += ml_to_c(blk[(a * Ws + b) * C]);
        dx[t] = ml_from_c<T>(acc);
    }
}

}  // namespace

extern "C" int ml_upsample_nearest2d_forward_cuda(ml_ktensor *out, const ml_ktensor *x, int scale) {
    const char *op = "upsample_nearest2d";
    cudaStream_t st;
    if (ml_cuda_prepare(x, op, &st) < 0) return -1;
    int64_t s = scale, N = x->shape[0], H = x->shape[1], W = x->shape[2], C = x->shape[3];
    if (ml_kt_numel(out) == 0) return 0;
    size_t rb = (size_t)C * ml_dtype_size(x->dtype);
    int dev = x->device.index;
    return with_unit(rb, {out->data, x->data}, [&](auto u) -> int {
        typedef decltype(u) U;
        int64_t units = (int64_t)(rb / sizeof(U)), total = N * H * s * W * s * units;
        unsigned grid = ml_grid_for(total, kBlock, dev);
        U *yp = ml_ptr<U>(out);
        const U *xp = ml_ptr<U>(x);
        if (ml_fits_u32(total))
            up_fwd<U, uint32_t><<<grid, kBlock, 0, st>>>(yp, xp, (uint32_t)H, (uint32_t)W, (uint32_t)s,
                                                         (uint32_t)units, (uint32_t)total);
        else
            up_fwd<U, int64_t><<<grid, kBlock, 0, st>>>(yp, xp, H, W, s, units, total);
        ML_CUDA_LAUNCHED("up_fwd");
        return 0;
    });
}

extern "C" int ml_upsample_nearest2d_backward_cuda(ml_ktensor *dx, const ml_ktensor *dout, int scale) {
    const char *op = "upsample_nearest2d backward";
    cudaStream_t st;
    if (ml_cuda_prepare(dx, op, &st) < 0) return -1;
    int64_t s = scale, H = dx->shape[1], W = dx->shape[2], C = dx->shape[3];
    int64_t total = ml_kt_numel(dx);
    if (total == 0) return 0;
    int dev = dx->device.index;
    auto run = [&](auto tag) -> int {
        typedef decltype(tag) T;
        unsigned grid = ml_grid_for(total, kBlock, dev);
        if (ml_fits_u32(ml_kt_numel(dout)))
            up_bwd<T, uint32_t><<<grid, kBlock, 0, st>>>(ml_ptr<T>(dx), ml_ptr<T>(dout), (uint32_t)H, (uint32_t)W,
                                                         (uint32_t)C, (uint32_t)s, (uint32_t)total);
        else
            up_bwd<T, int64_t><<<grid, kBlock, 0, st>>>(ml_ptr<T>(dx), ml_ptr<T>(dout), H, W, C, s, total);
        ML_CUDA_LAUNCHED("up_bwd");
        return 0;
    };
    switch (dx->dtype) {
    case ML_F32: return run(float());
    case ML_F64: return run(double());
    case ML_F16: return run(ml_f16_t());
    case ML_BF16: return run(ml_bf16_t());
    default:
        return ml_error("upsample_nearest2d backward (cuda): gradients must be float32, float64, float16 or bfloat16, "
                        "not %s", ml_dtype_name(dx->dtype));
    }
}
