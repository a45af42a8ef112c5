/* device.h — memory of each device, as the tensor core sees it.
 *
 * CPU memory is 64-byte aligned malloc.  CUDA memory comes from the
 * stream-ordered caching allocator (kernels/cuda/allocator.cu); without
 * CUDA support compiled in, asking for a cuda device is an error, never a
 * crash. */
#ifndef ML_DEVICE_H
#define ML_DEVICE_H

#include <stddef.h>
#include <stdint.h>
#include "tensor.h"

void *ml_device_alloc(ml_device dev, size_t nbytes);   /* NULL + error on failure */
void ml_device_free(ml_device dev, void *p, size_t nbytes);
/* Copy n contiguous bytes between any two devices (synchronous w.r.t. the host
 * when the destination is the CPU). */
int ml_device_memcpy(void *dst, ml_device ddev, const void *src, ml_device sdev, size_t n);
/* True if this build has CUDA and the device index exists. */
bool ml_device_available(ml_device dev);

#ifdef ML_WITH_CUDA
/* Implemented in kernels/cuda/ (extern "C"). */
int ml_cuda_device_count(void);
void *ml_cuda_malloc(int device, size_t nbytes);
void ml_cuda_free(int device, void *p, size_t nbytes);
int ml_cuda_memcpy(void *dst, ml_device ddev, const void *src, ml_device sdev, size_t n);
/* dst <- src on one CUDA device: any strides, any dtypes (converting). */
int ml_cuda_copy_strided(ml_tensor *dst, const ml_tensor *src);
int ml_cuda_fill(ml_tensor *t, double v);
#endif

#endif
