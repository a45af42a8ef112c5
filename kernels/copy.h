/* copy.h — strided copy with dtype conversion, and fill, on one device:
 * kernels/cpu/copy.c and kernels/cuda/copy.cu.  host/tensor.c's ml_copy_
 * and ml_fill_ are their only callers; moving bytes between devices is
 * host/device.c's ml_device_memcpy, not a kernel.
 *
 * ml_copy: dst <- src, element for element in row-major order.  The host
 * has given src dst's shape (broadcast dims have stride 0) and put both on
 * one device; any strides, any dtypes.  A conversion rounds as
 * ml_store_from_double does (narrowing floats through float32, integers
 * truncating toward zero, u8 wrapping, bool as "non-zero"), identically on
 * both devices, so t:to("cuda"):to(dtype):to("cpu") equals t:to(dtype).
 * Overlapping views of one buffer: the CUDA kernel reads everything into
 * workspace first; the CPU kernel handles the overlaps the host makes
 * (a view onto itself, contiguous same-dtype ranges, which it moves with
 * memmove).
 *
 * ml_fill: every element of t (any strides) <- v converted to t's dtype as
 * above.  Return 0 / -1. */
#ifndef ML_KERNELS_COPY_H
#define ML_KERNELS_COPY_H

#include "kernel.h"

ML_KERNEL(ml_copy, (ml_ktensor *dst, const ml_ktensor *src));
ML_KERNEL(ml_fill, (ml_ktensor *t, double v));

#endif
