/* attention.h — scaled dot-product attention, forward and backward:
 * kernels/cpu/attention.c and kernels/cuda/attention.cu.
 *
 * Letters: B batch, Sq/Sk query/key positions, H heads, D query/key width,
 * Dv value width.  BSHD layout, so the q/k/v projections are used without
 * a transpose:
 *   q [B, Sq, H, D]   k [B, Sk, H, D]   v [B, Sk, H, Dv]   out [B, Sq, H, Dv]
 *   lse [B, H, Sq]: the log-sum-exp of each row of the scaled, masked
 *   scores, written by the forward; the backward rebuilds the
 *   probabilities from it instead of keeping the [Sq, Sk] matrices alive.
 * causal masks key j > query i (top-left aligned, as CLIP's text encoder
 * uses).  scale multiplies q k^T (the host turns <= 0 into 1/sqrt(D)).
 * Gradients are written (=), NULL when not wanted; dout is shaped like
 * out, dq, dk and dv like q, k and v.
 *
 * The host op (ml_sdpa, host/ops_nn.c) has checked: every tensor
 * contiguous with the shapes above, Sk > 0, q, k, v, out, dout and the
 * gradients of one float dtype on one device, lse on that device in
 * float64 for a float64 call and float32 otherwise.
 *
 * The CPU computes float32 and float64 (sgemm / dgemm on the BSHD layout,
 * a [128, Sk] score block at a time).  The CUDA kernels take float32,
 * float16 and bfloat16, not float64, accumulating in float32:
 * - float16 / bfloat16 go to cuDNN's fused SDPA first
 *   (kernels/cuda/attention_cudnn.h), and when the loaded cuDNN refuses
 *   the shape, calls whose float32 scores of one batch, H*Sq*Sk*4 bytes
 *   (Sk rounded up to 8), fit in 2 GiB run as tensor-core GEMMs around
 *   explicit score matrices (probabilities and dS rounded to the half type,
 *   transient buffers of at most 2 GiB + 1 GiB, freed before returning);
 * - the rest, float32 always, run flash-style kernels that keep everything
 *   in float32 and take head widths D and Dv up to 512, and Sq, Sk and H
 *   up to 2^30 - 1 (their row and column indices are 32-bit).
 * Both CUDA paths of moonlit's own are deterministic.  Those limits, and a
 * dtype its device does not compute in, are what the kernels report; the
 * rest was the host's to check.  Return 0 / -1. */
#ifndef ML_KERNELS_ATTENTION_H
#define ML_KERNELS_ATTENTION_H

#include "kernel.h"

ML_KERNEL(ml_sdpa_forward, (ml_ktensor *out, ml_ktensor *lse, const ml_ktensor *q, const ml_ktensor *k,
                            const ml_ktensor *v, bool causal, double scale));
ML_KERNEL(ml_sdpa_backward, (ml_ktensor *dq, ml_ktensor *dk, ml_ktensor *dv, const ml_ktensor *dout,
                             const ml_ktensor *q, const ml_ktensor *k, const ml_ktensor *v,
                             const ml_ktensor *out, const ml_ktensor *lse, bool causal, double scale));

#endif
