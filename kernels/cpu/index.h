/* index.h — CPU embedding, gather and index_select, forward and backward.
 *
 * Indices are int32 or int64 and bounds-checked here (the message names the
 * bad index and the valid range).  Forwards copy elements of any dtype;
 * backwards scatter-add and need float32 or float64.  Tensors contiguous,
 * with at least one dim; gradients are written (=).  Return 0 / -1. */
#ifndef ML_KERNELS_CPU_INDEX_H
#define ML_KERNELS_CPU_INDEX_H

#include "tensor.h"

/* weight [V, D], ids [n] -> out [n, D]. */
int ml_embedding_forward_cpu(ml_tensor *out, const ml_tensor *weight, const ml_tensor *ids);
/* dweight [V, D] = scatter-add of dout [n, D] rows at ids. */
int ml_embedding_backward_cpu(ml_tensor *dweight, const ml_tensor *dout, const ml_tensor *ids);

/* out[i] = x[i with coordinate `dim` replaced by index[i]]; index and out
 * have one shape, no larger than x's in the dims other than `dim`. */
int ml_gather_forward_cpu(ml_tensor *out, const ml_tensor *x, int dim, const ml_tensor *index);
int ml_gather_backward_cpu(ml_tensor *dx, const ml_tensor *dout, int dim, const ml_tensor *index);

/* x [.., X, ..] with X at `dim`, index [n] -> out [.., n, ..]. */
int ml_index_select_forward_cpu(ml_tensor *out, const ml_tensor *x, int dim, const ml_tensor *index);
int ml_index_select_backward_cpu(ml_tensor *dx, const ml_tensor *dout, int dim, const ml_tensor *index);

#endif
