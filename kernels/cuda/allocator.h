/* allocator.h — the CUDA caching allocator: statistics and cache control.
 * (ml_cuda_malloc / ml_cuda_free themselves are declared in host/device.h.)
 *
 * How it works (kernels/cuda/allocator.cu):
 * - Sizes are rounded up to 512 bytes.  Requests up to 1 MiB come from a
 *   "small" pool of 2 MiB segments; larger ones from a "large" pool whose
 *   segments are the request rounded up to 2 MiB.  A cached block bigger than
 *   needed is split (the rest stays cached); neighbours merge again when
 *   both are free.  Best fit: the smallest cached block that is big enough.
 * - Stream-ordered reuse: a freed block goes straight back to the cache and
 *   the next allocation on the same device may take it at once, without any
 *   synchronisation.  This is safe because all of moonlit's GPU work on a
 *   device runs on that device's single compute stream (runtime.h): a kernel
 *   writing the new owner's data is queued after every kernel that used the
 *   old owner.  Code that uses device memory from another stream must order
 *   that stream against the compute stream (events) before freeing.
 * - cudaMalloc happens only when no cached block fits.  When it fails, the
 *   whole-segment free blocks are returned to the driver and the call is
 *   retried once; a second failure is reported as "out of GPU memory on
 *   cuda:N: asked for X MiB, Y MiB free (Z reserved by moonlit's cache)".
 * - Thread-safe (one mutex). */
#ifndef ML_CUDA_ALLOCATOR_H
#define ML_CUDA_ALLOCATOR_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    uint64_t allocated;        /* bytes in live blocks (rounded sizes) */
    uint64_t peak;             /* max of `allocated` since start / last reset */
    uint64_t reserved;         /* bytes obtained from cudaMalloc and not yet returned */
    uint64_t active_blocks;    /* live blocks */
    uint64_t num_allocs;       /* ml_cuda_malloc calls, cumulative */
    uint64_t num_cudamalloc;   /* cudaMalloc calls, cumulative: flat in a steady state */
    uint64_t num_cudafree;     /* cudaFree calls, cumulative */
} ml_cuda_mem_stats;

int ml_cuda_memory_stats(int dev, ml_cuda_mem_stats *out);
/* peak <- allocated. */
int ml_cuda_reset_peak(int dev);
/* Give every cached segment that is entirely free back to the driver
 * (synchronises the device first). */
int ml_cuda_empty_cache(int dev);

#ifdef __cplusplus
}
#endif
#endif
