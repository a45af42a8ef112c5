/* runtime.h — the CUDA runtime as C code sees it: devices, the compute
 * stream of each device, synchronisation.  Plain C (no CUDA headers), so
 * bindings/ and host/ can include it; implemented in kernels/cuda/runtime.cu.
 *
 * Streams: every device has ONE compute stream, created on first use.  All
 * of moonlit's kernels, copies and library calls (cuBLAS, cuDNN) on a device
 * are issued to it, which is what makes the caching allocator's reuse safe
 * without synchronisation (see allocator.h).  Work on any other stream (a
 * future NCCL stream) must be ordered against it with events. */
#ifndef ML_CUDA_RUNTIME_H
#define ML_CUDA_RUNTIME_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Same type as cudaStream_t, without needing the CUDA headers. */
typedef struct CUstream_st *ml_cuda_stream_t;

/* Number of visible GPUs; 0 (not an error) when there is no driver or GPU. */
int ml_cuda_device_count(void);
/* Why ml_cuda_device_count() is 0 ("" when it is not). */
const char *ml_cuda_unavailable_reason(void);
/* Count GPUs WITHOUT initialising CUDA (reads the driver's /proc entries and
 * CUDA_VISIBLE_DEVICES), for a parent process that is about to fork workers:
 * CUDA cannot be used in a child forked after the parent initialised it.
 * -1 if the driver is not loaded. */
int ml_cuda_peek_device_count(void);

/* Make dev the current device of the calling thread. -1 + error if absent. */
int ml_cuda_set_device(int dev);
int ml_cuda_current_device(void);
/* Select dev on this thread and return its compute stream in *stream. */
int ml_cuda_enter(int dev, ml_cuda_stream_t *stream);
/* Wait for all work queued on dev (dev < 0: every device that was used). */
int ml_cuda_synchronize(int dev);

typedef struct {
    char name[256];
    size_t total_mem, free_mem;
    int cc_major, cc_minor, sm_count;
} ml_cuda_device_info;
int ml_cuda_get_device_info(int dev, ml_cuda_device_info *out);

#ifdef __cplusplus
}
#endif
#endif
