/* allocator.h — the CUDA caching allocator: allocation, statistics, cache
 * control, and the workspace helper CUDA kernels take scratch memory from.
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
 * - Memory pressure: before a cache miss turns into a cudaMalloc, the hook
 *   set by ml_cuda_set_pressure_hook may free memory (Lua's collector: dead
 *   tensors only go back to the cache when their boxes are collected), and
 *   the cache is tried once more.  See ml_cuda_set_pressure_hook.
 * - Thread-safe (one mutex). */
#ifndef ML_CUDA_ALLOCATOR_H
#define ML_CUDA_ALLOCATOR_H

#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C++" {   /* C++ even where this header is included inside extern "C" */
#include <initializer_list>
}
extern "C" {
#include "error.h"
}
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* nbytes of device memory on `device` (NULL + error, naming the size and
 * the free memory, on failure); ml_cuda_free gives it back to the cache
 * with the size it was asked for.  host/device.h's ml_device_alloc comes
 * here for cuda devices. */
void *ml_cuda_malloc(int device, size_t nbytes);
void ml_cuda_free(int device, void *p, size_t nbytes);

typedef struct {
    uint64_t allocated;        /* bytes in live blocks (rounded sizes) */
    uint64_t peak;             /* max of `allocated` since start / last reset */
    uint64_t reserved;         /* bytes obtained from cudaMalloc and not yet returned */
    uint64_t active_blocks;    /* live blocks */
    uint64_t num_allocs;       /* ml_cuda_malloc calls, cumulative */
    uint64_t num_cudamalloc;   /* cudaMalloc calls, cumulative: flat in a steady state */
    uint64_t num_cudafree;     /* cudaFree calls, cumulative */
    uint64_t num_pressure_hooks;   /* calls of the pressure hook for this device, cumulative */
    uint64_t pressure_freed;   /* bytes given back to this device's cache while the hook ran */
    uint64_t pressure_reused;  /* bytes of the requests the cache served right after the hook
                                * (each would have been a cudaMalloc without it) */
} ml_cuda_mem_stats;

int ml_cuda_memory_stats(int dev, ml_cuda_mem_stats *out);

/* The memory pressure hook: fn(ctx, device) is asked to free device memory
 * (through ml_cuda_free) when a request on `device` finds no cached block
 * that fits.  The allocator then tries its cache once more before it
 * cudaMallocs a new segment.  Rules:
 * - It is called without the allocator's mutex held, so it may free (and
 *   allocate: such an allocation never calls the hook again, it goes
 *   straight to cudaMalloc).
 * - Only on the thread that registered it: a data loader's worker thread
 *   that allocates never runs the hook (moonlit's hook runs Lua, whose
 *   state belongs to one thread).
 * - Rate limit: a cache miss calls it only once max(64 MiB, reserved / 8)
 *   bytes (the share: ml_cuda_set_pressure_share) have been handed out on
 *   that device since the hook last ran
 *   there, so that warm-up (an empty cache, nothing dead yet, every request
 *   a miss) does not run it on every miss; in a steady state the cache
 *   serves everything and it never runs.  When cudaMalloc itself runs out
 *   of memory, the hook is called whatever the rate limit says (if it did
 *   not run for this request already), before the error is reported.
 * - The current device may have changed when it returns (it may run any
 *   code); the allocator selects `device` again.
 * fn = NULL removes it.  One hook for the process: a second call replaces
 * the first (and its thread). */
typedef void (*ml_cuda_pressure_fn)(void *ctx, int device);
void ml_cuda_set_pressure_hook(ml_cuda_pressure_fn fn, void *ctx);
/* The share of the reserve in the rate limit above (1/8 to start with): a
 * larger one lets the cache grow further before the hook runs, so it runs
 * less often.  Returns the share it replaces; a share outside [0, 1] only
 * reads the current one. */
double ml_cuda_set_pressure_share(double share);
/* The registered hook's context (NULL when none), so an owner can tell
 * whether the hook is still its own before removing it. */
void *ml_cuda_pressure_hook_ctx(void);
/* peak <- allocated. */
int ml_cuda_reset_peak(int dev);
/* Give every cached segment that is entirely free back to the driver
 * (synchronises the device first). */
int ml_cuda_empty_cache(int dev);

#ifdef __cplusplus
}

extern "C++" {
/* Scratch memory for one kernel call: the one way a CUDA kernel gets
 * temporary device memory.  It comes from the caching allocator and goes
 * back when the object goes out of scope.  That is safe as soon as the
 * kernels using it are queued, without waiting for them: all work on a
 * device runs on its one compute stream, so whatever reuses the memory is
 * queued after them.  The sizes of its parts (in bytes) are given up front;
 * each part starts 16-byte aligned:
 *
 *     ml_cuda_workspace ws(dev, {n * sizeof(double), m * sizeof(float)});
 *     if (!ws.ok()) return -1;                  // ml_error says why
 *     double *sums = ws.part<double>(0);
 *     float *rows = ws.part<float>(1);
 *
 * The caller's products (n * sizeof(double)) come from sizes the host
 * checked; the sum and the rounding of the parts are checked here. */
class ml_cuda_workspace {
  public:
    static constexpr int kMaxParts = 8;

    ml_cuda_workspace(int dev, std::initializer_list<size_t> parts) : dev_(dev) {
        if (parts.size() > (size_t)kMaxParts) {
            ml_error("cuda workspace: %zu parts asked for, at most %d", parts.size(), kMaxParts);
            return;
        }
        size_t total = 0;
        for (size_t n : parts) {
            size_t rounded;
            offset_[nparts_++] = total;
            if (__builtin_add_overflow(n, (size_t)15, &rounded) ||
                __builtin_add_overflow(total, rounded & ~(size_t)15, &total)) {
                ml_error("cuda workspace: the sizes asked for overflow (a part of %zu bytes)", n);
                return;
            }
        }
        bytes_ = total < 16 ? 16 : total;
        p_ = (char *)ml_cuda_malloc(dev, bytes_);
    }
    ~ml_cuda_workspace() {
        if (p_) ml_cuda_free(dev_, p_, bytes_);
    }
    ml_cuda_workspace(const ml_cuda_workspace &) = delete;
    ml_cuda_workspace &operator=(const ml_cuda_workspace &) = delete;

    /* False when the memory could not be had (ml_error holds the reason). */
    bool ok() const { return p_ != nullptr; }
    /* Part i (0-based, in the constructor's order) as an array of A. */
    template <typename A> A *part(int i) const { return (A *)(p_ + offset_[i]); }

  private:
    int dev_;
    size_t bytes_ = 0;
    char *p_ = nullptr;
    int nparts_ = 0;
    size_t offset_[kMaxParts] = {};
};
}   /* extern "C++" */
#endif
#endif
