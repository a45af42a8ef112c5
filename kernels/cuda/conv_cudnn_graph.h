/* conv_cudnn_graph.h — NHWC 2-D convolutions through the cuDNN frontend's
 * graph API (conv_fprop with the bias add fused, conv_dgrad, conv_wgrad),
 * with the built execution plans kept per shape.  A pointer-level interface
 * (no tensors): kernels/cuda/conv2d.cu, on arguments the host op checked,
 * tries these first and runs cuDNN's legacy convolution API when they
 * answer "unsupported".
 *
 * Contract, the one of kernels/conv2d.h seen from cuDNN:
 * - x [N, H, W, C], w [O, kh, kw, C], y / dy [N, Ho, Wo, O], all contiguous,
 *   one dtype (float32, float16 or bfloat16), bias [O] of that dtype.  H and
 *   W are the input as cuDNN sees it: already padded by the caller when the
 *   padding is asymmetric (pad_h = pad_w = 0 then).  Padding is symmetric,
 *   dilation 1; Ho = (H + 2 pad_h - kh) / stride_h + 1, likewise Wo.
 * - half types compute in float32 on tensor cores; float32 runs only on
 *   plans cuDNN marks neither TENSOR_CORE nor DOWN_CONVERT_INPUTS (FMA
 *   kernels, no TF32), so it agrees with the CPU to summation order.
 * - Outputs are written (=), never accumulated.
 *
 * Return value of every call:
 *    1  done (queued on the device's compute stream);
 *    0  not supported (runtime, shape, dtype, alignment, no plan): nothing
 *       was written, the caller runs the legacy path.  The first time a
 *       reason comes up, one line on stderr says so;
 *   -1  a real error (cuDNN failed while running a built plan, out of
 *       memory): ml_error holds the message.
 * Built without the cuDNN frontend headers, every call answers 0 with one
 * notice.  Implemented in kernels/cuda/conv_cudnn_graph.cu. */
#ifndef ML_KERNELS_CUDA_CONV_CUDNN_GRAPH_H
#define ML_KERNELS_CUDA_CONV_CUDNN_GRAPH_H

#include <stdbool.h>
#include <stdint.h>
#include "kernel.h"   /* ml_dtype */

#ifdef __cplusplus
extern "C" {
#endif

/* How a shape's plan is chosen, once (MOONLIT_CONV_ALGO, read by conv2d.cu). */
typedef enum {
    ML_CONV_GRAPH_HEURISTIC, /* the first plan of cuDNN's ranking, deterministic ones preferred */
    ML_CONV_GRAPH_MEASURE,   /* the fastest deterministic plan, timed on the first call's buffers */
    ML_CONV_GRAPH_FASTEST    /* the fastest plan, deterministic or not */
} ml_conv_graph_choice;

/* One convolution as cuDNN sees it. */
typedef struct {
    int device;     /* CUDA device index of every pointer */
    ml_dtype dtype; /* of every operand */
    int64_t N, H, W, C, O, kh, kw;
    int64_t pad_h, pad_w, stride_h, stride_w;
    ml_conv_graph_choice choice;
} ml_conv_graph_shape;

/* y = conv(x, w) (+ bias when bias is not NULL).  *bias_added says whether
 * the bias is in y: false when cuDNN takes the convolution but not the
 * fused add (the caller then adds it itself). */
int ml_conv_graph_forward(void *y, const void *x, const void *w, const void *bias, const ml_conv_graph_shape *s,
                          bool *bias_added);
/* dx [N, H, W, C] from dy and w. */
int ml_conv_graph_backward_data(void *dx, const void *dy, const void *w, const ml_conv_graph_shape *s);
/* dw [O, kh, kw, C] from x and dy. */
int ml_conv_graph_backward_filter(void *dw, const void *x, const void *dy, const ml_conv_graph_shape *s);

#ifdef __cplusplus
}
#endif
#endif
