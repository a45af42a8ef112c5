/* conv2d.h — NHWC 2-D convolution, forward and backward:
 * kernels/cpu/conv2d.c (im2col + GEMM) and kernels/cuda/conv2d.cu (cuDNN).
 *
 * Letters: N batch, H/W input height/width, C input channels, O output
 * channels, kh/kw kernel size, Ho/Wo output size, K = kh*kw*C the reduced
 * dim of the GEMM.
 *   x   [N, H, W, C]     w [O, kh, kw, C]     b [O] or NULL
 *   out [N, Ho, Wo, O]   Ho = (H + pad_top + pad_bottom - kh) / stride_h + 1
 * Zero padding, possibly asymmetric (the VAE encoder's downsampling pads
 * only bottom/right).  The host op has checked: contiguous tensors of one
 * float dtype on one device with these shapes, strides >= 1, padding >= 0,
 * the kernel no larger than the padded input.  Gradients are written (=),
 * NULL when not wanted.
 *
 * The CPU computes float32 and float64.  The GPU takes float32, float16 and
 * bfloat16 (tensor cores with float32 accumulation for the half types;
 * float32 runs on FMA kernels only, no TF32, so results agree with the CPU
 * to summation order), not float64: cuDNN has no NHWC float64 kernels.
 * Return 0 / -1. */
#ifndef ML_KERNELS_CONV2D_H
#define ML_KERNELS_CONV2D_H

#include "kernel.h"

typedef struct {
    int stride_h, stride_w;
    int pad_top, pad_bottom, pad_left, pad_right;
} ml_conv2d_params;

ML_KERNEL(ml_conv2d_forward, (ml_ktensor *out, const ml_ktensor *x, const ml_ktensor *w, const ml_ktensor *b,
                              const ml_conv2d_params *p));
/* dx [N,H,W,C], dw [O,kh,kw,C], db [O] from dout [N,Ho,Wo,O]. */
ML_KERNEL(ml_conv2d_backward, (ml_ktensor *dx, ml_ktensor *dw, ml_ktensor *db, const ml_ktensor *dout,
                               const ml_ktensor *x, const ml_ktensor *w, const ml_conv2d_params *p));

#endif
