/* conv2d.h — CUDA NHWC 2-D convolution over cuDNN: the twins of
 * kernels/cpu/conv2d.h (same signatures and contract: x [N,H,W,C],
 * w [O,kh,kw,C], b [O] or NULL, out [N,Ho,Wo,O], zero padding possibly
 * asymmetric, contiguous tensors of one dtype, gradients written, NULL
 * when not wanted).  Unlike the CPU kernels these also take f16 and bf16
 * (tensor cores, f32 accumulation); f32 runs on FMA kernels only (no TF32),
 * so results agree with the CPU to summation order.
 * Implemented in kernels/cuda/conv2d.cu. */
#ifndef ML_KERNELS_CUDA_CONV2D_H
#define ML_KERNELS_CUDA_CONV2D_H

#ifdef __cplusplus
extern "C" {
#endif

#include "tensor.h"
#include "cpu/conv2d.h"

int ml_conv2d_forward_cuda(ml_tensor *out, const ml_tensor *x, const ml_tensor *w, const ml_tensor *b,
                           const ml_conv2d_params *p);
int ml_conv2d_backward_cuda(ml_tensor *dx, ml_tensor *dw, ml_tensor *db, const ml_tensor *dout,
                            const ml_tensor *x, const ml_tensor *w, const ml_conv2d_params *p);

#ifdef __cplusplus
}
#endif
#endif
