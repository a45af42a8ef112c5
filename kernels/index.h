/* index.h — embedding, gather and index_select, forward and backward:
 * kernels/cpu/index.c and kernels/cuda/index.cu.
 *
 * The host op has checked shapes, dtypes and devices: contiguous tensors
 * with at least one dim, int32 or int64 indices, outputs of the input's
 * dtype, gradients of dx's dtype, dim in range.  Embedding ids count from
 * 0.  Gather and index_select indices count from index_base: the value
 * index_base names the first element along dim (1 for Lua, whose indices
 * are 1-based), and the host checked that index_base plus the dim's size
 * and plus the index count fit in int64.  The base is applied as each
 * index is read, so a caller counting from 1 costs no extra pass.
 *
 * The index values are data, so the kernels check them: an index outside
 * the dim is an error naming the bad index, its position and the valid
 * range, raised before anything is written.  The message speaks in the
 * caller's base (a Lua user reads "element 1" for the first index and a
 * range "1..X").  On the GPU that check reads one word back, so each call
 * waits for the work queued before it.
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

/* The error both twins raise for the first bad index: value v at position
 * i of the indices, for a dim of `size` counted from `base` (0 for
 * embedding).  `what` names the dim ("a dim of size", "a vocabulary of"). */
static inline int ml_index_range_error(const char *op, int64_t v, int64_t i, const char *what, int64_t size,
                                       int64_t base) {
    if (size == 0)
        return ml_error("%s: index %lld (element %lld of the indices) is out of range for %s 0 (no index is valid)",
                        op, (long long)v, (long long)(base + i), what);
    return ml_error("%s: index %lld (element %lld of the indices) is out of range for %s %lld (valid: %lld..%lld)",
                    op, (long long)v, (long long)(base + i), what, (long long)size, (long long)base,
                    (long long)(base + size - 1));
}

/* weight [V, D], ids [n] -> out [n, D]. */
ML_KERNEL(ml_embedding_forward, (ml_ktensor *out, const ml_ktensor *weight, const ml_ktensor *ids));
/* dweight [V, D] = scatter-add of dout [n, D] rows at ids. */
ML_KERNEL(ml_embedding_backward, (ml_ktensor *dweight, const ml_ktensor *dout, const ml_ktensor *ids));

/* out[i] = x[i with coordinate `dim` replaced by index[i] - index_base];
 * index and out have one shape, no larger than x's in the dims other than
 * `dim`.  The backward scatters dout back through the same map. */
ML_KERNEL(ml_gather_forward, (ml_ktensor *out, const ml_ktensor *x, int dim, const ml_ktensor *index,
                               int64_t index_base));
ML_KERNEL(ml_gather_backward, (ml_ktensor *dx, const ml_ktensor *dout, int dim, const ml_ktensor *index,
                                int64_t index_base));

/* x [.., X, ..] with X at `dim`, index [n] -> out [.., n, ..]:
 * out[.., i, ..] = x[.., index[i] - index_base, ..]. */
ML_KERNEL(ml_index_select_forward, (ml_ktensor *out, const ml_ktensor *x, int dim, const ml_ktensor *index,
                                     int64_t index_base));
ML_KERNEL(ml_index_select_backward, (ml_ktensor *dx, const ml_ktensor *dout, int dim, const ml_ktensor *index,
                                      int64_t index_base));

#endif
