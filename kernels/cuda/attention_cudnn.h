/* attention_cudnn.h — scaled dot-product attention through cuDNN's fused
 * flash-attention graphs (the cuDNN frontend's sdpa / sdpa_backward nodes),
 * for float16 and bfloat16 only.  A pointer-level interface (no tensors):
 * the caller (kernels/cuda/attention.cu, on arguments the host op checked)
 * tries these first and runs its own kernels when they answer
 * "unsupported".
 *
 * Contract, the same as ml_sdpa_forward_cuda / ml_sdpa_backward_cuda
 * (kernels/attention.h):
 * - q [B, Sq, H, D], k [B, Sk, H, D], v [B, Sk, H, Dv]; out and dout
 *   [B, Sq, H, Dv]; dq, dk, dv shaped like q, k, v.  Every tensor is seen
 *   in BSHD order through its own element strides (batch, seq, head; the
 *   width dimension is contiguous), so projection outputs are used in place.
 * - lse [B, H, Sq] float32, contiguous: the natural-log log-sum-exp of each
 *   row of the SCALED, masked scores, m + log(sum_j exp(s_j - m)) with
 *   s = scale q.k.  That is what moonlit's own forward writes and what
 *   cuDNN's softmax Stats are, so a forward by one path and a backward by
 *   the other agree (no conversion).
 * - causal masks key j > query i (the top-left diagonal, whatever Sq and
 *   Sk); scale multiplies q k^T.
 * - Gradients are written (=), never accumulated; a NULL gradient is not
 *   wanted (cuDNN computes all three: the unwanted ones go to scratch).
 *
 * Return value of both calls:
 *    1  done (queued on the device's compute stream);
 *    0  not supported for this shape, dtype, layout or runtime: nothing was
 *       written, the caller runs its own kernel.  The first time a reason
 *       comes up, one line on stderr says so ("moonlit: cuDNN 9.14.0 SDPA
 *       ...; using moonlit's attention kernel").  float32 / float64 always
 *       answer 0, silently;
 *   -1  a real error (cuDNN failed while running, out of memory): ml_error
 *       holds the message.
 *
 * Built without the cuDNN frontend headers (scripts/fetch_cudnn_frontend.sh
 * fetches them; the Makefile defines ML_WITH_CUDNN_FRONTEND when they are
 * there) both calls always answer 0, with one notice saying why.
 * Implemented in kernels/cuda/attention_cudnn.cu. */
#ifndef ML_KERNELS_CUDA_ATTENTION_CUDNN_H
#define ML_KERNELS_CUDA_ATTENTION_CUDNN_H

#include <stdbool.h>
#include <stdint.h>
#include "kernel.h"   /* ml_dtype; no ml_tensor: pointers only */

#ifdef __cplusplus
extern "C" {
#endif

/* Element strides of one BSHD tensor; the width dimension has stride 1. */
typedef struct {
    int64_t batch, seq, head;
} ml_sdpa_layout;

/* One attention call as cuDNN sees it. */
typedef struct {
    int device;                  /* CUDA device index of every pointer */
    ml_dtype dtype;              /* of q, k, v, out, dout and the gradients */
    int64_t B, H, Sq, Sk, D, Dv; /* batch, heads, query / key positions, q.k and v widths */
    ml_sdpa_layout q, k, v, out; /* read by both calls */
    ml_sdpa_layout dout, dq, dk, dv; /* backward only (a NULL gradient's layout is ignored) */
    bool causal;
    double scale;
    /* Backward: ask for cuDNN's deterministic algorithm (the same bits every
     * run).  On Hopper with cuDNN < 9.25 that algorithm keeps a
     * [B, H, Sq, Sk] half-precision dP matrix in its workspace: with
     * deterministic false, dq is accumulated with float32 atomics instead
     * (workspace linear in Sq, results that may differ in the last bits
     * between runs). */
    bool deterministic;
} ml_cudnn_sdpa_shape;

/* Fills s with the sizes given and every layout contiguous BSHD
 * (batch = S*H*W, seq = H*W, head = W for width W), deterministic false. */
void ml_cudnn_sdpa_shape_contiguous(ml_cudnn_sdpa_shape *s, int device, ml_dtype dtype, int64_t B, int64_t H,
                                    int64_t Sq, int64_t Sk, int64_t D, int64_t Dv, bool causal, double scale);

/* out <- softmax(scale q k^T [masked]) v; lse as above (NULL: not wanted,
 * an inference-only graph). */
int ml_cudnn_sdpa_forward(void *out, float *lse, const void *q, const void *k, const void *v,
                          const ml_cudnn_sdpa_shape *s);

/* dq, dk, dv from dout and the forward's out and lse. */
int ml_cudnn_sdpa_backward(void *dq, void *dk, void *dv, const void *dout, const void *q, const void *k,
                           const void *v, const void *out, const float *lse, const ml_cudnn_sdpa_shape *s);

#ifdef __cplusplus
}
#endif
#endif
