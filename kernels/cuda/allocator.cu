// allocator.cu — the stream-ordered caching allocator behind ml_cuda_malloc /
// ml_cuda_free (design and guarantees in allocator.h).
#include "common.cuh"
#include "allocator.h"

#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>

namespace {

constexpr size_t kRound = 512;               // every block is a multiple of this
constexpr size_t kSmallMax = 1u << 20;       // requests up to here use the small pool
constexpr size_t kSmallSegment = 2u << 20;   // cudaMalloc size of a small-pool segment
constexpr size_t kLargeRound = 2u << 20;     // large segments are multiples of this
constexpr double kMiB = 1024.0 * 1024.0;
// The pressure hook's rate limit (allocator.h): a cache miss calls it only
// once kHookMinBytes, or g_hook_share of the reserve if more, have been
// handed out on the device since it last ran there (1/8 unless
// ml_cuda_set_pressure_share said otherwise).  Warm-up fills an empty cache
// with nothing dead in it, each miss asking for memory that no collection
// could give back: the floor keeps a full collection (about a millisecond
// for moonlit's Lua heap) to one per 64 MiB handed out, and the share of
// the reserve to a fixed number per doubling of the cache.
constexpr uint64_t kHookMinBytes = 64ull << 20;

// A piece of a cudaMalloc'd segment.  prev/next link the pieces of one
// segment in address order, so freed neighbours can merge; a block with
// neither is a whole segment and may go back to the driver.
struct block {
    char *ptr;
    size_t size;
    bool live;
    bool small;
    block *prev, *next;
};

struct by_size {
    bool operator()(const block *a, const block *b) const {
        if (a->size != b->size) return a->size < b->size;
        return a->ptr < b->ptr;
    }
};

struct dev_cache {
    std::set<block *, by_size> free_small, free_large;
    std::unordered_map<void *, block *> live;
    ml_cuda_mem_stats st;
    uint64_t handed_since_hook;   // bytes of blocks handed out since the hook last ran here
    uint64_t freed_total;         // bytes of blocks given back, cumulative (pressure_freed)
};

std::mutex g_mu;
// The pressure hook and the thread that registered it (under g_mu).
ml_cuda_pressure_fn g_hook = nullptr;
void *g_hook_ctx = nullptr;
std::thread::id g_hook_thread;
double g_hook_share = 0.125;
// True on a thread while its hook runs: an allocation the hook makes (a
// finalizer that allocates) goes straight to cudaMalloc.
thread_local bool t_in_hook = false;
dev_cache **g_cache = nullptr;   // one per device, made on first use, never destroyed
int g_ncache = 0;

size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

// Caller holds g_mu and has checked dev.
dev_cache *cache_of(int dev) {
    if (!g_cache) {
        int n = ml_cuda_device_count();
        g_cache = new dev_cache *[n]();
        g_ncache = n;
    }
    if (!g_cache[dev]) {
        g_cache[dev] = new dev_cache();
        memset(&g_cache[dev]->st, 0, sizeof g_cache[dev]->st);
        g_cache[dev]->handed_since_hook = 0;
        g_cache[dev]->freed_total = 0;
    }
    return g_cache[dev];
}

std::set<block *, by_size> &pool_of(dev_cache *c, bool small) {
    return small ? c->free_small : c->free_large;
}

// Return whole free segments to the driver.  Caller holds g_mu and has made
// dev current.  Waits for the device first: a freed block may still be read
// by queued kernels (stream-ordered reuse never waits, but the driver must).
int release_cached(dev_cache *c) {
    ML_CUDA_TRY(cudaDeviceSynchronize());
    for (int small = 0; small < 2; small++) {
        auto &pool = pool_of(c, small != 0);
        for (auto it = pool.begin(); it != pool.end();) {
            block *b = *it;
            if (b->prev || b->next) { ++it; continue; }
            ML_CUDA_TRY(cudaFree(b->ptr));
            c->st.reserved -= b->size;
            c->st.num_cudafree++;
            it = pool.erase(it);
            delete b;
        }
    }
    return 0;
}

int out_of_memory(int dev, dev_cache *c, size_t asked) {
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) cudaGetLastError();
    return ml_error("out of GPU memory on cuda:%d: asked for %.1f MiB, %.1f MiB free "
                    "(%.1f MiB reserved by moonlit's cache, %.1f MiB of it in live tensors; "
                    "%.1f MiB total)",
                    dev, asked / kMiB, free_b / kMiB, c->st.reserved / kMiB,
                    c->st.allocated / kMiB, total_b / kMiB);
}

// A new segment of seg bytes, as one free block (not yet in a pool).
// *oom tells a plain out-of-memory (reported by the caller) from other errors.
block *new_segment(dev_cache *c, size_t seg, bool small, bool *oom) {
    *oom = false;
    void *p = nullptr;
    cudaError_t e = cudaMalloc(&p, seg);
    if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        if (release_cached(c) < 0) return nullptr;
        e = cudaMalloc(&p, seg);
    }
    if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        *oom = true;
        return nullptr;
    }
    if (e != cudaSuccess) {
        ml_cuda_fail(e, "cudaMalloc", __FILE__, __LINE__);
        return nullptr;
    }
    c->st.reserved += seg;
    c->st.num_cudamalloc++;
    return new block{(char *)p, seg, false, small, nullptr, nullptr};
}

// The smallest cached block of the pool that holds size bytes, taken out
// of the pool; NULL when none fits.  Caller holds g_mu.
block *take_cached(dev_cache *c, size_t size, bool small) {
    auto &pool = pool_of(c, small);
    block key{nullptr, size, false, small, nullptr, nullptr};
    auto it = pool.lower_bound(&key);
    if (it == pool.end()) return nullptr;
    block *b = *it;
    pool.erase(it);
    return b;
}

// Whether this request may call the pressure hook: one is registered, this
// is its thread, it is not running already (no recursion), and -- unless
// `out_of_memory` -- the rate limit of allocator.h allows it.  Caller holds
// g_mu.
bool hook_may_run(const dev_cache *c, bool out_of_memory) {
    if (!g_hook || t_in_hook || std::this_thread::get_id() != g_hook_thread) return false;
    if (out_of_memory) return true;
    uint64_t share = (uint64_t)((double)c->st.reserved * g_hook_share);
    return c->handed_since_hook >= (share > kHookMinBytes ? share : kHookMinBytes);
}

// Runs the hook with g_mu released (it frees through ml_cuda_free, which
// takes g_mu), then takes the cache's block for the request if one fits now.
// `lock` holds g_mu on entry and on return.  *failed: the device could not
// be selected again (ml_error says why), so nothing may be cudaMalloc'd.
block *run_hook_then_retry(std::unique_lock<std::mutex> &lock, dev_cache *c, int device, size_t size,
                           bool small, bool *failed) {
    ml_cuda_pressure_fn fn = g_hook;
    void *ctx = g_hook_ctx;
    c->handed_since_hook = 0;
    c->st.num_pressure_hooks++;
    uint64_t freed_before = c->freed_total;
    lock.unlock();
    t_in_hook = true;
    fn(ctx, device);
    t_in_hook = false;
    // The hook may run any code, selecting another device on the way.
    int set = ml_cuda_set_device(device);
    lock.lock();
    c->st.pressure_freed += c->freed_total - freed_before;
    *failed = set < 0;
    if (*failed) return nullptr;
    block *b = take_cached(c, size, small);
    if (b) c->st.pressure_reused += size;
    return b;
}

}  // namespace

extern "C" void ml_cuda_set_pressure_hook(ml_cuda_pressure_fn fn, void *ctx) {
    std::lock_guard<std::mutex> lock(g_mu);
    g_hook = fn;
    g_hook_ctx = fn ? ctx : nullptr;
    g_hook_thread = std::this_thread::get_id();
}

extern "C" double ml_cuda_set_pressure_share(double share) {
    std::lock_guard<std::mutex> lock(g_mu);
    double was = g_hook_share;
    if (share >= 0 && share <= 1) g_hook_share = share;
    return was;
}

extern "C" void *ml_cuda_pressure_hook_ctx(void) {
    std::lock_guard<std::mutex> lock(g_mu);
    return g_hook_ctx;
}

extern "C" void *ml_cuda_malloc(int device, size_t nbytes) {
    // Also checks that the device exists; cudaMalloc allocates on the current one.
    if (ml_cuda_set_device(device) < 0) return nullptr;
    // Both roundings below must not wrap to a small size.
    if (nbytes > SIZE_MAX - kLargeRound) {
        ml_error("cannot allocate %zu bytes on cuda:%d: the size overflows", nbytes, device);
        return nullptr;
    }
    size_t size = round_up(nbytes ? nbytes : 1, kRound);
    bool small = size <= kSmallMax;

    std::unique_lock<std::mutex> lock(g_mu);
    dev_cache *c = cache_of(device);
    auto &pool = pool_of(c, small);
    block *b = take_cached(c, size, small);
    bool hook_ran = false, failed = false;
    if (!b && hook_may_run(c, false)) {
        hook_ran = true;
        b = run_hook_then_retry(lock, c, device, size, small, &failed);
        if (failed) return nullptr;
    }
    if (!b) {
        size_t seg = small ? kSmallSegment : round_up(size, kLargeRound);
        bool oom;
        b = new_segment(c, seg, small, &oom);
        // Out of memory even after the cache gave back its free segments:
        // dead tensors not collected yet may hold what is missing.
        if (!b && oom && !hook_ran && hook_may_run(c, true)) {
            b = run_hook_then_retry(lock, c, device, size, small, &failed);
            if (failed) return nullptr;
            if (!b) b = new_segment(c, seg, small, &oom);
        }
        if (!b) {
            if (oom) out_of_memory(device, c, nbytes);
            return nullptr;
        }
    }
    // Split off the tail when it is worth keeping: any 512-byte rest in the
    // small pool; in the large pool only a rest that is itself large, so
    // large segments are not ground into slivers.
    size_t rest = b->size - size;
    if ((small && rest >= kRound) || (!small && rest > kSmallMax)) {
        block *r = new block{b->ptr + size, rest, false, small, b, b->next};
        if (b->next) b->next->prev = r;
        b->next = r;
        b->size = size;
        pool.insert(r);
    }
    b->live = true;
    c->live[b->ptr] = b;
    c->st.allocated += b->size;
    if (c->st.allocated > c->st.peak) c->st.peak = c->st.allocated;
    c->st.active_blocks++;
    c->st.num_allocs++;
    c->handed_since_hook += b->size;
    return b->ptr;
}

// Makes no CUDA call, so tensors can still be released after a fault broke
// the context (or while the process exits).  Pointers this allocator did not
// hand out are ignored: storages that wrap foreign memory have their own
// release function and never come here.
extern "C" void ml_cuda_free(int device, void *p, size_t nbytes) {
    (void)nbytes;
    if (!p) return;
    std::lock_guard<std::mutex> lock(g_mu);
    if (!g_cache || device < 0 || device >= g_ncache || !g_cache[device]) return;
    dev_cache *c = g_cache[device];
    auto it = c->live.find(p);
    if (it == c->live.end()) return;
    block *b = it->second;
    c->live.erase(it);
    b->live = false;
    c->st.allocated -= b->size;
    c->st.active_blocks--;
    c->freed_total += b->size;
    auto &pool = pool_of(c, b->small);
    if (b->prev && !b->prev->live) {
        block *pr = b->prev;
        pool.erase(pr);
        pr->size += b->size;
        pr->next = b->next;
        if (b->next) b->next->prev = pr;
        delete b;
        b = pr;
    }
    if (b->next && !b->next->live) {
        block *nx = b->next;
        pool.erase(nx);
        b->size += nx->size;
        b->next = nx->next;
        if (nx->next) nx->next->prev = b;
        delete nx;
    }
    pool.insert(b);
}

extern "C" int ml_cuda_memory_stats(int dev, ml_cuda_mem_stats *out) {
    if (ml_cuda_set_device(dev) < 0) return -1;
    std::lock_guard<std::mutex> lock(g_mu);
    *out = cache_of(dev)->st;
    return 0;
}

extern "C" int ml_cuda_reset_peak(int dev) {
    if (ml_cuda_set_device(dev) < 0) return -1;
    std::lock_guard<std::mutex> lock(g_mu);
    dev_cache *c = cache_of(dev);
    c->st.peak = c->st.allocated;
    return 0;
}

extern "C" int ml_cuda_empty_cache(int dev) {
    if (ml_cuda_set_device(dev) < 0) return -1;
    std::lock_guard<std::mutex> lock(g_mu);
    return release_cached(cache_of(dev));
}
