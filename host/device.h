/* device.h — memory of each device, as the tensor core sees it
 * (host/device.c).
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
 * when the destination is the CPU).  Strided copies and conversions on one
 * device are the copy kernel's (kernels/copy.h, through ml_copy_). */
int ml_device_memcpy(void *dst, ml_device ddev, const void *src, ml_device sdev, size_t n);
/* True if this build has CUDA and the device index exists. */
bool ml_device_available(ml_device dev);

#ifdef ML_WITH_CUDA
#include "cuda/allocator.h"   /* ml_cuda_malloc / ml_cuda_free */
/* Implemented in kernels/cuda/ (extern "C"). */
int ml_cuda_device_count(void);
int ml_cuda_memcpy(void *dst, ml_device ddev, const void *src, ml_device sdev, size_t n);
/* Pinned (page-locked, portable) host memory and asynchronous uploads, for
 * the data loader's batch buffers (host/data_loader.c). */
void *ml_cuda_host_alloc(size_t nbytes);            /* NULL + error */
void ml_cuda_host_free(void *p);
/* Host -> device copy queued on dev's compute stream (returns at once). */
int ml_cuda_memcpy_h2d_async(int dev, void *dst, const void *src, size_t n);
/* An event recorded on dev's compute stream (NULL + error); query: 1 when
 * the work before it is done, 0 if not yet, -1 on error. */
void *ml_cuda_event_record(int dev);
int ml_cuda_event_query(void *event);
int ml_cuda_event_sync(void *event);
void ml_cuda_event_destroy(void *event);
int ml_cuda_synchronize(int dev);
#endif

#endif
