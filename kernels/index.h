/* index.h — embedding, gather and index_select, forward and backward:
 * kernels/cpu/index.c and kernels/cuda/index.cu.
 *
 * The host op has checked shapes, dtypes and devices: contiguous tensors
 * with at least one dim, int32 or int64 indices counted from 0, outputs of
 * the input's dtype, gradients of dx's dtype, dim in range.  The index
 * values are data, so the kernels check them: an index outside the dim is
 * an error naming the bad index, its position and the valid range, raised
 * before anything is written.  On the GPU that check reads one word back,
 * so each call waits for the work queued before it.
 *
 * Forwards copy elements of any dtype.  Backwards scatter-add into dx,
 * which is written (=): float32/float64 on the CPU; float32, float64,
 * float16 and bfloat16 (summing in float32) on the GPU, deterministic
 * without atomics on the values: every gradient element sums its
 * contributions in index order, as the CPU does, so float32 results equal
 * the CPU's bit for bit.  Return 0 / -1. */
#ifndef ML_KERNELS_INDEX_H
#define ML_KERNELS_INDEX_H

#include "kernel.h"

/* weight [V, D], ids [n] -> out [n, D]. */
ML_KERNEL(ml_embedding_forward, (ml_ktensor *out, const ml_ktensor *weight, const ml_ktensor *ids));
/* dweight [V, D] = scatter-add of dout [n, D] rows at ids. */
ML_KERNEL(ml_embedding_backward, (ml_ktensor *dweight, const ml_ktensor *dout, const ml_ktensor *ids));

/* out[i] = x[i with coordinate `dim` replaced by index[i]]; index and out
 * have one shape, no larger than x's in the dims other than `dim`. */
ML_KERNEL(ml_gather_forward, (ml_ktensor *out, const ml_ktensor *x, int dim, const ml_ktensor *index));
ML_KERNEL(ml_gather_backward, (ml_ktensor *dx, const ml_ktensor *dout, int dim, const ml_ktensor *index));

/* x [.., X, ..] with X at `dim`, index [n] -> out [.., n, ..]. */
ML_KERNEL(ml_index_select_forward, (ml_ktensor *out, const ml_ktensor *x, int dim, const ml_ktensor *index));
ML_KERNEL(ml_index_select_backward, (ml_ktensor *dx, const ml_ktensor *dout, int dim, const ml_ktensor *index));

#endif
