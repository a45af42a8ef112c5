/* conv2d.h — CPU NHWC 2-D convolution (im2col + GEMM), forward and backward.
 *
 * Letters: N batch, H/W input height/width, C input channels, O output
 * channels, kh/kw kernel size, Ho/Wo output size, K = kh*kw*C the reduced
 * dim of the GEMM.
 *   x   [N, H, W, C]     w [O, kh, kw, C]     b [O] or NULL
 *   out [N, Ho, Wo, O]   Ho = (H + pad_top + pad_bottom - kh) / stride_h + 1
 * Zero padding, possibly asymmetric (the VAE encoder's downsampling pads
 * only bottom/right).  Tensors contiguous, float32 or float64, one dtype;
 * gradients are written (=), NULL when not wanted.  Return 0 / -1. */
#ifndef ML_KERNELS_CPU_CONV2D_H
#define ML_KERNELS_CPU_CONV2D_H

#include "tensor.h"

typedef struct {
    int stride_h, stride_w;
    int pad_top, pad_bottom, pad_left, pad_right;
} ml_conv2d_params;

int ml_conv2d_forward_cpu(ml_tensor *out, const ml_tensor *x, const ml_tensor *w, const ml_tensor *b,
                          const ml_conv2d_params *p);
/* dx [N,H,W,C], dw [O,kh,kw,C], db [O] from dout [N,Ho,Wo,O]. */
int ml_conv2d_backward_cpu(ml_tensor *dx, ml_tensor *dw, ml_tensor *db, const ml_tensor *dout,
                           const ml_tensor *x, const ml_tensor *w, const ml_conv2d_params *p);

#endif
