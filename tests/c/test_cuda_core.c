/* test_cuda_core.c — the CUDA runtime below the ops: device checks, the
 * caching allocator (reuse without cudaMalloc, split/merge, statistics, the
 * out-of-memory message, the memory pressure hook), host<->device and peer
 * copies, strided copies
 * converting between every pair of dtypes (bit-identical to the CPU's copy),
 * and fill.  Without CUDA, or on a machine without a GPU, it reports that it
 * skipped and passes. */
#include "check.h"
#include "tensor.h"
#include "device.h"
#include <stdlib.h>
#include <string.h>

#ifdef ML_WITH_CUDA
#include <pthread.h>
#include <time.h>
#include <unistd.h>
#include "cuda/runtime.h"
#include "cuda/allocator.h"

static const ml_device GPU0 = {ML_CUDA, 0};

static ml_cuda_mem_stats stats(void) {
    ml_cuda_mem_stats st;
    CHECK(ml_cuda_memory_stats(0, &st) == 0, "memory_stats: %s", ml_last_error());
    return st;
}

/* CPU copy of any tensor, contiguous, with its raw bytes. */
static ml_tensor *to_cpu(ml_tensor *t) {
    ml_tensor *c = ml_empty(t->ndim, t->shape, t->dtype, ml_cpu());
    if (c && ml_copy_(c, t) < 0) { ml_release(c); return NULL; }
    return c;
}

static bool same_bytes(const ml_tensor *a, const ml_tensor *b) {
    return ml_numel(a) == ml_numel(b) && a->dtype == b->dtype &&
           memcmp(ml_data(a), ml_data(b), (size_t)ml_numel(a) * ml_dtype_size(a->dtype)) == 0;
}

static void test_devices(void) {
    int n = ml_cuda_device_count();
    CHECK(ml_cuda_malloc(n, 16) == NULL, "malloc on a missing device must fail");
    CHECK(strstr(ml_last_error(), "does not exist") != NULL, "missing device message: %s", ml_last_error());
    CHECK(ml_cuda_set_device(0) == 0, "set_device(0): %s", ml_last_error());
    CHECK(ml_cuda_current_device() == 0, "current device");
    int peek = ml_cuda_peek_device_count();
    CHECK(peek == n || getenv("CUDA_VISIBLE_DEVICES"), "peek count %d vs runtime %d", peek, n);
    ml_cuda_device_info info;
    CHECK(ml_cuda_get_device_info(0, &info) == 0 && info.total_mem > 0, "device info: %s", ml_last_error());
    printf("cuda:0 = %s, sm_%d%d, %d SMs, %.1f GiB\n", info.name, info.cc_major, info.cc_minor,
           info.sm_count, info.total_mem / 1073741824.0);
}

static void test_allocator(void) {
    CHECK(ml_cuda_empty_cache(0) == 0, "empty_cache: %s", ml_last_error());
    ml_cuda_mem_stats base = stats();

    /* A freed block is handed out again at once, without cudaMalloc. */
    void *p = ml_cuda_malloc(0, 1000);
    CHECK(p != NULL, "malloc 1000: %s", ml_last_error());
    ml_cuda_mem_stats a = stats();
    CHECK(a.allocated == base.allocated + 1024, "1000 bytes round to 1024 (got %llu)",
          (unsigned long long)(a.allocated - base.allocated));
    ml_cuda_free(0, p, 1000);
    void *q = ml_cuda_malloc(0, 1000);
    CHECK(q == p, "same-size reuse returns the same block");
    CHECK(stats().num_cudamalloc == a.num_cudamalloc, "reuse made no cudaMalloc");
    ml_cuda_free(0, q, 1000);

    /* Small blocks split one 2 MiB segment and merge back. */
    void *s[4];
    for (int i = 0; i < 4; i++) s[i] = ml_cuda_malloc(0, 256 << 10);
    ml_cuda_mem_stats b = stats();
    CHECK(b.num_cudamalloc <= a.num_cudamalloc + 1, "four 256 KiB blocks share a segment");
    ml_cuda_free(0, s[1], 0);
    ml_cuda_free(0, s[2], 0);
    ml_cuda_free(0, s[0], 0);
    ml_cuda_free(0, s[3], 0);
    void *big = ml_cuda_malloc(0, 1 << 20);
    CHECK(big != NULL && stats().num_cudamalloc == b.num_cudamalloc, "merged blocks serve 1 MiB");
    ml_cuda_free(0, big, 0);

    /* Large blocks: a cached 64 MiB segment serves a 3 MiB request by
     * splitting; the rest stays cached. */
    void *l = ml_cuda_malloc(0, 64 << 20);
    ml_cuda_free(0, l, 0);
    ml_cuda_mem_stats c = stats();
    void *l2 = ml_cuda_malloc(0, 3 << 20);
    void *l3 = ml_cuda_malloc(0, 5 << 20);
    CHECK(l2 && l3 && stats().num_cudamalloc == c.num_cudamalloc, "splits of a cached large segment");
    CHECK(stats().allocated == c.allocated + (8 << 20), "allocated counts 3 + 5 MiB");
    ml_cuda_free(0, l2, 0);
    ml_cuda_free(0, l3, 0);

    /* Steady state: the same pattern of sizes 100 times makes no cudaMalloc
     * after the first round and returns to the baseline. */
    static const size_t sizes[] = {4, 1000, 4096, 300000, 1 << 20, (1 << 20) + 4, 3000000, 17 << 20};
    enum { NS = sizeof sizes / sizeof sizes[0] };
    uint64_t after_first = 0;
    for (int it = 0; it < 100; it++) {
        void *ptrs[NS];
        for (int i = 0; i < NS; i++) ptrs[i] = ml_cuda_malloc(0, sizes[i]);
        for (int i = NS - 1; i >= 0; i -= 2) ml_cuda_free(0, ptrs[i], sizes[i]);
        for (int i = NS - 2; i >= 0; i -= 2) ml_cuda_free(0, ptrs[i], sizes[i]);
        if (it == 0) after_first = stats().num_cudamalloc;
    }
    ml_cuda_mem_stats d = stats();
    CHECK(d.num_cudamalloc == after_first, "no cudaMalloc in the steady state (%llu -> %llu)",
          (unsigned long long)after_first, (unsigned long long)d.num_cudamalloc);
    CHECK(d.allocated == base.allocated, "allocated back to baseline");
    CHECK(d.active_blocks == base.active_blocks, "no live block leaked");
    CHECK(d.peak >= base.allocated + (17 << 20), "peak saw the 17 MiB block");
    CHECK(ml_cuda_reset_peak(0) == 0 && stats().peak == d.allocated, "reset_peak");

    /* empty_cache gives every wholly free segment back. */
    CHECK(ml_cuda_empty_cache(0) == 0, "empty_cache: %s", ml_last_error());
    ml_cuda_mem_stats e = stats();
    CHECK(e.reserved <= base.reserved, "reserved back to at most the baseline (%llu vs %llu)",
          (unsigned long long)e.reserved, (unsigned long long)base.reserved);
    CHECK(e.num_cudafree > base.num_cudafree, "segments were freed");

    /* Out of memory: a clear message, and the allocator still works. */
    void *huge = ml_cuda_malloc(0, (size_t)1 << 50);
    CHECK(huge == NULL, "a 1 PiB allocation fails");
    CHECK(strncmp(ml_last_error(), "out of GPU memory on cuda:0: asked for ", 39) == 0 &&
          strstr(ml_last_error(), "asked for 1073741824.0 MiB, ") != NULL, "OOM message: %s", ml_last_error());
    CHECK(strstr(ml_last_error(), "reserved by moonlit's cache") != NULL, "OOM names the cache");
    void *after = ml_cuda_malloc(0, 4096);
    CHECK(after != NULL, "allocation after OOM: %s", ml_last_error());
    ml_cuda_free(0, after, 4096);

    /* Zero bytes is a valid, distinct allocation. */
    void *z = ml_cuda_malloc(0, 0);
    CHECK(z != NULL, "malloc(0)");
    ml_cuda_free(0, z, 0);
}

/* ---- the memory pressure hook (allocator.h) ---------------------------- */

#define MiB ((size_t)1 << 20)

/* What the hook saw, and what it is asked to do when called. */
static struct {
    int calls;
    int off_thread;          /* calls on a thread other than the registering one */
    int wrong_args;          /* calls with another context or device */
    int lock_held;           /* calls during which the allocator's mutex was taken */
    int reentered;           /* calls from inside the hook */
    bool running;
    pthread_t owner;
    void *victim;            /* freed by the hook (ml_cuda_free from inside it) */
    size_t victim_bytes;
    bool alloc_inside;       /* the hook allocates (as a finalizer may) */
    bool inner_ok;           /* that allocation succeeded without calling the hook again */
} g_hook;

static void *probe_stats(void *arg) {
    ml_cuda_mem_stats st;
    *(int *)arg = ml_cuda_memory_stats(0, &st) == 0;
    return NULL;
}

/* ml_cuda_memory_stats takes the allocator's mutex: run it on another thread
 * and wait up to 5 s, so a mutex held around the hook fails the test
 * instead of deadlocking it. */
static bool allocator_mutex_free(void) {
    pthread_t th;
    int ok = 0;
    if (pthread_create(&th, NULL, probe_stats, &ok) != 0) return false;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 5;
    if (pthread_timedjoin_np(th, NULL, &until) != 0) {
        printf("FAIL: the allocator's mutex is held while the pressure hook runs\n");
        fflush(stdout);
        _exit(1);   /* the probe stays blocked: nothing after this could finish */
    }
    return ok != 0;
}

static void counting_hook(void *ctx, int device) {
    if (g_hook.running) g_hook.reentered++;
    g_hook.running = true;
    g_hook.calls++;
    if (!pthread_equal(pthread_self(), g_hook.owner)) g_hook.off_thread++;
    if (ctx != &g_hook || device != 0) g_hook.wrong_args++;
    if (!allocator_mutex_free()) g_hook.lock_held++;
    if (g_hook.alloc_inside) {
        /* a miss (the cache holds nothing this big): straight to cudaMalloc */
        int before = g_hook.calls;
        void *inner = ml_cuda_malloc(0, 8 * MiB);
        g_hook.inner_ok = inner != NULL && g_hook.calls == before;
        ml_cuda_free(0, inner, 8 * MiB);
    }
    if (g_hook.victim) {
        ml_cuda_free(0, g_hook.victim, g_hook.victim_bytes);
        g_hook.victim = NULL;
    }
    g_hook.running = false;
}

static void *alloc_misses(void *arg) {
    /* three 100 MiB blocks, each a miss with more than enough handed out */
    void *p[3];
    for (int i = 0; i < 3; i++) p[i] = ml_cuda_malloc(0, 100 * MiB);
    *(int *)arg = p[0] && p[1] && p[2];
    for (int i = 0; i < 3; i++) ml_cuda_free(0, p[i], 100 * MiB);
    return NULL;
}

static void test_pressure_hook(void) {
    CHECK(ml_cuda_empty_cache(0) == 0, "empty_cache: %s", ml_last_error());
    memset(&g_hook, 0, sizeof g_hook);
    g_hook.owner = pthread_self();
    ml_cuda_set_pressure_hook(counting_hook, &g_hook);
    CHECK(ml_cuda_pressure_hook_ctx() == &g_hook, "the hook's context is the one registered");
    ml_cuda_mem_stats s0 = stats();

    /* Rate limit.  The tests before handed out far more than 64 MiB, so the
     * first miss (4 KiB: the small pool is empty after empty_cache) calls it. */
    void *first = ml_cuda_malloc(0, 4096);
    CHECK(first && g_hook.calls == 1, "a miss after > 64 MiB handed out calls the hook (%d calls)", g_hook.calls);
    CHECK(stats().num_pressure_hooks == s0.num_pressure_hooks + 1, "num_pressure_hooks counts it");
    /* Misses right after it, with less than 64 MiB handed out since (and a
     * reserve whose eighth is below 64 MiB): no call. */
    void *a = ml_cuda_malloc(0, 40 * MiB), *b = ml_cuda_malloc(0, 40 * MiB);
    CHECK(a && b && g_hook.calls == 1, "misses within 64 MiB of the last call do not call it (%d calls)", g_hook.calls);
    void *c = ml_cuda_malloc(0, 40 * MiB);   /* 80 MiB handed out since */
    CHECK(c && g_hook.calls == 2, "the miss after 80 MiB handed out calls it (%d calls)", g_hook.calls);
    ml_cuda_free(0, first, 4096);
    ml_cuda_free(0, a, 40 * MiB);
    ml_cuda_free(0, b, 40 * MiB);
    ml_cuda_free(0, c, 40 * MiB);

    /* The reserve's eighth: with 1.5 GiB reserved, 100 MiB handed out since
     * the last call is not enough, 800 MiB is. */
    CHECK(ml_cuda_empty_cache(0) == 0, "empty_cache: %s", ml_last_error());
    void *keep = ml_cuda_malloc(0, 1024 * MiB);
    void *cached = ml_cuda_malloc(0, 512 * MiB);
    ml_cuda_free(0, cached, 512 * MiB);          /* stays cached */
    int before = g_hook.calls;
    void *reset = ml_cuda_malloc(0, 4096);         /* a small miss: the count starts again */
    CHECK(reset && g_hook.calls == before + 1, "a miss after 1.5 GiB handed out calls it");
    void *hit = ml_cuda_malloc(0, 100 * MiB);     /* split from the cached 512 MiB */
    ml_cuda_mem_stats r = stats();
    CHECK(hit && g_hook.calls == before + 1, "a cache hit never calls it");
    CHECK(r.reserved / 8 > 150 * MiB, "a reserve of %llu MiB", (unsigned long long)(r.reserved / MiB));
    void *m1 = ml_cuda_malloc(0, 700 * MiB);      /* a miss, 100 MiB handed out: < reserved / 8 */
    CHECK(m1 && g_hook.calls == before + 1, "a miss within reserved/8 of the last call does not call it");
    void *m2 = ml_cuda_malloc(0, 700 * MiB);      /* a miss, 800 MiB handed out: > reserved / 8 */
    CHECK(m2 && g_hook.calls == before + 2, "the miss past reserved/8 calls it (%d calls)", g_hook.calls - before);
    void *all[] = {keep, reset, hit, m1, m2};
    const size_t sizes[] = {1024 * MiB, 4096, 100 * MiB, 700 * MiB, 700 * MiB};
    for (int i = 0; i < 5; i++) ml_cuda_free(0, all[i], sizes[i]);

    /* The hook frees (through ml_cuda_free, the mutex free) and allocates;
     * the request is then served from the memory it freed. */
    CHECK(ml_cuda_empty_cache(0) == 0, "empty_cache: %s", ml_last_error());
    g_hook.victim_bytes = 256 * MiB;
    g_hook.victim = ml_cuda_malloc(0, g_hook.victim_bytes);   /* may call it: the victim is set after */
    void *victim = g_hook.victim;
    g_hook.alloc_inside = true;
    ml_cuda_mem_stats v0 = stats();
    before = g_hook.calls;
    void *served = ml_cuda_malloc(0, 200 * MiB);   /* a miss: nothing cached, 256 MiB handed out */
    ml_cuda_mem_stats v1 = stats();
    CHECK(served && g_hook.calls == before + 1, "the hook ran for the 200 MiB request");
    CHECK(g_hook.victim == NULL && served == victim, "the request got the block the hook freed");
    CHECK(g_hook.inner_ok, "an allocation inside the hook succeeds without calling it again");
    CHECK(g_hook.reentered == 0 && g_hook.lock_held == 0, "no re-entry, mutex free (%d, %d)", g_hook.reentered,
          g_hook.lock_held);
    CHECK(v1.num_cudamalloc == v0.num_cudamalloc + 1, "only the hook's own 8 MiB was cudaMalloc'd (%llu)",
          (unsigned long long)(v1.num_cudamalloc - v0.num_cudamalloc));
    CHECK(v1.pressure_reused - v0.pressure_reused == 200 * MiB, "pressure_reused counts the 200 MiB (%llu)",
          (unsigned long long)(v1.pressure_reused - v0.pressure_reused));
    CHECK(v1.pressure_freed - v0.pressure_freed == 264 * MiB, "pressure_freed counts 256 + 8 MiB (%llu)",
          (unsigned long long)(v1.pressure_freed - v0.pressure_freed));
    ml_cuda_free(0, served, 200 * MiB);
    g_hook.alloc_inside = false;

    /* Another thread's misses never call it, however much it hands out. */
    CHECK(ml_cuda_empty_cache(0) == 0, "empty_cache: %s", ml_last_error());
    before = g_hook.calls;
    pthread_t th;
    int ok = 0;
    CHECK(pthread_create(&th, NULL, alloc_misses, &ok) == 0 && pthread_join(th, NULL) == 0 && ok,
          "allocations on another thread");
    CHECK(g_hook.calls == before && g_hook.off_thread == 0, "no call from another thread (%d calls, %d off)",
          g_hook.calls - before, g_hook.off_thread);
    CHECK(ml_cuda_empty_cache(0) == 0, "empty_cache: %s", ml_last_error());
    void *after = ml_cuda_malloc(0, 100 * MiB);   /* this thread: the 300 MiB count */
    CHECK(after && g_hook.calls == before + 1, "the registering thread's next miss calls it");

    /* Out of memory calls it whatever the rate limit (it just ran), then fails. */
    void *huge = ml_cuda_malloc(0, (size_t)1 << 50);
    CHECK(huge == NULL && g_hook.calls == before + 2, "out of memory calls the hook first (%d)", g_hook.calls - before);
    CHECK(strncmp(ml_last_error(), "out of GPU memory on cuda:0", 27) == 0, "OOM message: %s", ml_last_error());
    ml_cuda_free(0, after, 100 * MiB);

    /* Removed: misses no longer call it. */
    ml_cuda_set_pressure_hook(NULL, NULL);
    CHECK(ml_cuda_pressure_hook_ctx() == NULL, "no hook after removal");
    CHECK(ml_cuda_empty_cache(0) == 0, "empty_cache: %s", ml_last_error());
    before = g_hook.calls;
    void *x = ml_cuda_malloc(0, 300 * MiB);
    CHECK(x && g_hook.calls == before, "no call once removed");
    ml_cuda_free(0, x, 300 * MiB);
    CHECK(g_hook.off_thread == 0 && g_hook.wrong_args == 0,
          "every call on the registering thread, for cuda:0, with its context");
    CHECK(ml_cuda_empty_cache(0) == 0, "empty_cache: %s", ml_last_error());
}

static void test_memcpy(void) {
    enum { N = 1 << 20 };
    float *h = malloc(N * sizeof *h), *back = malloc(N * sizeof *back);
    for (int i = 0; i < N; i++) h[i] = (float)i * 0.5f;
    void *d1 = ml_cuda_malloc(0, N * 4), *d2 = ml_cuda_malloc(0, N * 4);
    CHECK(ml_cuda_memcpy(d1, GPU0, h, ml_cpu(), N * 4) == 0, "H2D: %s", ml_last_error());
    memset(h, 0, N * sizeof *h);   /* pageable source: reusable right after the call */
    CHECK(ml_cuda_memcpy(d2, GPU0, d1, GPU0, N * 4) == 0, "D2D: %s", ml_last_error());
    CHECK(ml_cuda_memcpy(back, ml_cpu(), d2, GPU0, N * 4) == 0, "D2H: %s", ml_last_error());
    int bad = 0;
    for (int i = 0; i < N; i++) bad += back[i] != (float)i * 0.5f;
    CHECK(bad == 0, "H2D/D2D/D2H round trip (%d wrong)", bad);

    if (ml_cuda_device_count() > 1) {
        ml_device g1 = {ML_CUDA, 1};
        void *p1 = ml_cuda_malloc(1, N * 4);
        CHECK(ml_cuda_memcpy(p1, g1, d2, GPU0, N * 4) == 0, "peer 0->1: %s", ml_last_error());
        memset(back, 0, N * sizeof *back);
        CHECK(ml_cuda_memcpy(back, ml_cpu(), p1, g1, N * 4) == 0, "D2H from cuda:1");
        bad = 0;
        for (int i = 0; i < N; i++) bad += back[i] != (float)i * 0.5f;
        CHECK(bad == 0, "peer copy (%d wrong)", bad);
        ml_cuda_free(1, p1, N * 4);
    } else {
        printf("one GPU: peer copy not tested\n");
    }
    ml_cuda_free(0, d1, N * 4);
    ml_cuda_free(0, d2, N * 4);
    free(h);
    free(back);
}

/* Values every dtype pair converts without undefined behaviour (u8
 * destinations get non-negative values below 256). */
static double value_at(int i, bool for_u8) {
    static const double v[] = {-3.7, 2.5, 300.25, -0.5, 1e-8, 1.5, -129.3, 0.1,
                               3.14159, 70000.0, -2.5, 0.0, 7.0, -1e5, 65519.0, 1.0 / 3.0};
    static const double u[] = {3.7, 2.5, 200.25, 0.5, 1e-8, 1.5, 129.3, 0.1,
                               3.14159, 255.9, 2.5, 0.0, 7.0, 100.0, 65.0, 1.0 / 3.0};
    return for_u8 ? u[i % 16] : v[i % 16];
}

/* Every (dst, src) dtype pair, through a non-contiguous source (permuted and
 * narrowed), a broadcast source and a transposed destination, compared byte
 * for byte with the CPU's copy. */
static void test_copy_strided(void) {
    const int64_t shape[3] = {5, 6, 7};
    int bad_pairs = 0;
    for (int sd = 0; sd < ML_NUM_DTYPES; sd++) {
        for (int dd = 0; dd < ML_NUM_DTYPES; dd++) {
            double vals[5 * 6 * 7];
            for (int i = 0; i < 5 * 6 * 7; i++) vals[i] = value_at(i * 7 + sd, dd == ML_U8);
            ml_tensor *src = ml_from_doubles(vals, 3, shape, (ml_dtype)sd);
            const int perm[3] = {2, 0, 1};
            ml_tensor *p = ml_permute(src, perm);              /* [7,5,6] */
            ml_tensor *v = ml_narrow(p, 2, 1, 4);              /* [7,5,4] */
            ml_tensor *ref = ml_empty(v->ndim, v->shape, (ml_dtype)dd, ml_cpu());
            ml_copy_(ref, v);

            ml_tensor *gsrc = ml_empty(3, shape, (ml_dtype)sd, GPU0);
            ml_copy_(gsrc, src);
            ml_tensor *gp = ml_permute(gsrc, perm);
            ml_tensor *gv = ml_narrow(gp, 2, 1, 4);
            ml_tensor *gdst = ml_empty(gv->ndim, gv->shape, (ml_dtype)dd, GPU0);
            int rc = ml_copy_(gdst, gv);
            ml_tensor *got = rc == 0 ? to_cpu(gdst) : NULL;
            bool ok = got && same_bytes(got, ref);

            /* Broadcast: a [5,1,7] slice expanded over dim 1 into a
             * transposed destination. */
            ml_tensor *row = ml_narrow(src, 1, 2, 1);
            ml_tensor *grow = ml_narrow(gsrc, 1, 2, 1);
            const int64_t bshape[3] = {5, 6, 7};
            ml_tensor *bref = ml_empty(3, bshape, (ml_dtype)dd, ml_cpu());
            ml_copy_(bref, row);
            const int64_t tshape[3] = {7, 6, 5};
            ml_tensor *gt = ml_empty(3, tshape, (ml_dtype)dd, GPU0);
            ml_tensor *gtv = ml_transpose(gt, 0, 2);             /* [5,6,7] view, strides (1,5,30) */
            rc = ml_copy_(gtv, grow);
            ml_tensor *bgot = rc == 0 ? to_cpu(gtv) : NULL;
            ok = ok && bgot && same_bytes(bgot, bref);
            if (!ok) {
                bad_pairs++;
                printf("FAIL copy %s <- %s: %s\n", ml_dtype_short((ml_dtype)dd), ml_dtype_short((ml_dtype)sd),
                       rc < 0 ? ml_last_error() : "values differ");
            }
            ml_tensor *all[] = {src, p, v, ref, gsrc, gp, gv, gdst, got, row, grow, bref, gt, gtv, bgot};
            for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) ml_release(all[i]);
        }
    }
    CHECK(bad_pairs == 0, "strided copies of all %d dtype pairs match the CPU", ML_NUM_DTYPES * ML_NUM_DTYPES);

    /* Overlapping views of one buffer: x[1:] <- x[:-1] reads before writing. */
    int64_t n = 100000;
    ml_tensor *x = ml_arange(0, (double)n, 1, ML_F32, GPU0);
    ml_tensor *dst = ml_narrow(x, 0, 1, n - 1), *src = ml_narrow(x, 0, 0, n - 1);
    CHECK(ml_copy_(dst, src) == 0, "overlapping copy: %s", ml_last_error());
    ml_tensor *h = to_cpu(x);
    int bad = 0;
    for (int64_t i = 1; i < n; i++) bad += ((float *)ml_data(h))[i] != (float)(i - 1);
    CHECK(bad == 0 && ((float *)ml_data(h))[0] == 0.0f, "overlapping copy shifts by one (%d wrong)", bad);
    ml_release(h); ml_release(dst); ml_release(src); ml_release(x);
}

static void test_fill(void) {
    const int64_t shape[2] = {33, 65};
    int bad = 0;
    for (int dt = 0; dt < ML_NUM_DTYPES; dt++) {
        const double vals[] = {0.0, 1.5, -2.25, 200.0};
        for (int k = 0; k < 4; k++) {
            if (dt == ML_U8 && vals[k] < 0) continue;
            ml_tensor *g = ml_zeros(2, shape, (ml_dtype)dt, GPU0);
            ml_tensor *c = ml_zeros(2, shape, (ml_dtype)dt, ml_cpu());
            /* Fill a strided view (every other column, transposed) on both. */
            ml_tensor *gv0 = ml_narrow(g, 1, 3, 40), *cv0 = ml_narrow(c, 1, 3, 40);
            ml_tensor *gv = ml_transpose(gv0, 0, 1), *cv = ml_transpose(cv0, 0, 1);
            int rc = ml_fill_(gv, vals[k]);
            ml_fill_(cv, vals[k]);
            ml_tensor *got = rc == 0 ? to_cpu(g) : NULL;
            if (!got || !same_bytes(got, c)) {
                bad++;
                printf("FAIL fill %s %g: %s\n", ml_dtype_short((ml_dtype)dt), vals[k], rc < 0 ? ml_last_error() : "values differ");
            }
            /* Whole contiguous tensor too. */
            ml_fill_(g, vals[k]);
            ml_fill_(c, vals[k]);
            ml_release(got);
            got = to_cpu(g);
            if (!got || !same_bytes(got, c)) { bad++; printf("FAIL contiguous fill %s %g\n", ml_dtype_short((ml_dtype)dt), vals[k]); }
            ml_tensor *all[] = {g, c, gv0, cv0, gv, cv, got};
            for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) ml_release(all[i]);
        }
    }
    CHECK(bad == 0, "fill of every dtype matches the CPU (%d wrong)", bad);
}

/* permute(...) copies large enough for the tiled transpose kernel, every
 * element width, ragged tile edges and a batch dim. */
static void test_transpose(void) {
    const int64_t shape[4] = {3, 37, 45, 33};
    int bad = 0;
    const ml_dtype dts[] = {ML_F32, ML_BF16, ML_U8, ML_F64};
    for (size_t k = 0; k < sizeof dts / sizeof dts[0]; k++) {
        int64_t n = 3 * 37 * 45 * 33;
        double *vals = malloc((size_t)n * sizeof *vals);
        for (int64_t i = 0; i < n; i++) vals[i] = (double)(i % 251);
        ml_tensor *src = ml_from_doubles(vals, 4, shape, dts[k]);
        free(vals);
        const int perms[2][4] = {{0, 2, 3, 1}, {3, 1, 2, 0}};
        for (int q = 0; q < 2; q++) {
            ml_tensor *p = ml_permute(src, perms[q]);
            ml_tensor *ref = ml_contiguous(p);
            ml_tensor *g = ml_empty(4, shape, dts[k], GPU0);
            ml_copy_(g, src);
            ml_tensor *gp = ml_permute(g, perms[q]);
            ml_tensor *gd = ml_empty(gp->ndim, gp->shape, dts[k], GPU0);
            int rc = ml_copy_(gd, gp);
            ml_tensor *got = rc == 0 ? to_cpu(gd) : NULL;
            if (!got || !same_bytes(got, ref)) {
                bad++;
                printf("FAIL transpose %s perm %d: %s\n", ml_dtype_short(dts[k]), q, rc ? ml_last_error() : "values differ");
            }
            ml_tensor *all[] = {p, ref, g, gp, gd, got};
            for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) ml_release(all[i]);
        }
        ml_release(src);
    }
    CHECK(bad == 0, "tiled transposing copies match the CPU (%d wrong)", bad);
}

/* More than 2^31 elements: the 64-bit index path of the strided kernels. */
static void test_huge(void) {
    int64_t n = ((int64_t)1 << 31) + 64;
    const int64_t shape[2] = {2, n / 2};
    ml_tensor *a = ml_empty(2, shape, ML_U8, GPU0);
    if (!a) { printf("skip huge copy: %s\n", ml_last_error()); return; }
    ml_tensor *b = ml_empty(2, shape, ML_U8, GPU0);
    ml_tensor *row0 = ml_select(a, 0, 0), *row1 = ml_select(a, 0, 1);
    int rc = ml_fill_(row0, 3) | ml_fill_(row1, 9);
    /* b <- a through transposed [n/2, 2] views: no dims merge, so the
     * strided kernel walks all of it with 64-bit indices. */
    ml_tensor *bt = ml_transpose(b, 0, 1);      /* [n/2, 2] strides (1, n/2) */
    ml_tensor *at = ml_transpose(a, 0, 1);
    rc |= ml_copy_(bt, at);
    ml_tensor *tail = ml_narrow(b, 1, n / 2 - 4, 4);
    ml_tensor *h = rc == 0 ? to_cpu(tail) : NULL;
    const uint8_t *p = h ? ml_data(h) : NULL;
    CHECK(p && p[0] == 3 && p[3] == 3 && p[4] == 9 && p[7] == 9, "copy of 2^31+64 elements: %s",
          rc ? ml_last_error() : "values differ");
    ml_tensor *all[] = {a, b, row0, row1, bt, at, tail, h};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) ml_release(all[i]);
}
#endif

/* Without a usable GPU, asking for one must fail with a message that says
 * so, and the CPU side must keep working. */
static void test_no_device(void) {
    int64_t shape[2] = {2, 3};
    ml_device d = {ML_CUDA, 0};
    ml_clear_error();
    ml_tensor *t = ml_empty(2, shape, ML_F32, d);
    CHECK(t == NULL, "cuda tensor without a device must fail");
    CHECK(strstr(ml_last_error(), "cuda") != NULL, "error names the device: '%s'", ml_last_error());
    ml_tensor *c = ml_full(2, shape, 1.5, ML_F32, ml_cpu());
    CHECK(c != NULL, "CPU tensors still work");
    ml_tensor *g = c ? ml_to_device(c, d) : NULL;
    CHECK(g == NULL && ml_last_error()[0], "moving to a missing GPU fails cleanly");
    ml_release(g);
    ml_release(c);
}

int main(void) {
#ifndef ML_WITH_CUDA
    printf("moonlit built without CUDA: checking the errors only\n");
    test_no_device();
#else
    if (ml_cuda_device_count() == 0) {
        printf("no CUDA device (%s): checking the errors only\n", ml_cuda_unavailable_reason());
        test_no_device();
        return check_summary();
    }
    test_devices();
    test_allocator();
    test_pressure_hook();
    test_memcpy();
    test_copy_strided();
    test_fill();
    test_transpose();
    test_huge();
    CHECK(ml_cuda_synchronize(-1) == 0, "final synchronize: %s", ml_last_error());
#endif
    return check_summary();
}
