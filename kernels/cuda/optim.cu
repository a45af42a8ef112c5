// optim.cu — the optimizer kernels on the GPU (declared in kernels/optim.h):
// AdamW over a list of tensors, and the total norm and in-place scaling of
// a list, with the CPU's bits.
//
// One launch for a list.  The host cuts the list into chunks of
// ML_OPTIM_CHUNK elements (kernels/optim.h) and uploads two tables: the
// tensors (pointers, size, Philox offset, per-tensor bias corrections) and
// the chunks (tensor index, chunk index within it).  Block b runs chunk b,
// so one launch covers any number of tensors of any sizes, and small tensors
// (a bias of 320) cost a block, not a launch.  AdamW launches once per
// dtype combination present (a list of one recipe has one); the norm and
// the scale switch on each chunk's dtype inside the block and launch once.
//
// The tables go through pinned host memory and one asynchronous copy on the
// compute stream into an ml_cuda_workspace, given back (stream-ordered) as
// soon as the kernels are queued.  A small ring of pinned
// buffers per device lets the host fill the next call's table while the
// GPU still reads the last one; it waits only if it runs a whole ring
// ahead of the GPU.  Nothing is read back: the norm and the clip
// coefficient are written to device floats, and AdamW reads the
// coefficient from device memory (grad_scale), so clip + step queue
// without a host sync.
//
// AdamW element arithmetic is kernels/cpu/optim.c's, step for step:
//     p = p * (1 - lr*wd)
//     m = lerp(m, g, 1 - b1)
//     v = v * b2 + (1 - b2) * g * g
//     denom = sqrt(v) / sqrt(1 - b2^t) + eps
//     p = p + (-lr / (1 - b1^t)) * (m / denom)
// spelled with the _rn intrinsics so nvcc cannot fuse a multiply and an add
// (the CPU build never does), with the scalars computed on the host in
// double exactly as the CPU computes them (ml_adamw_consts_of,
// ml_adamw_bias).  The bf16-sr step (bf16 param or moments) runs the same
// f32 arithmetic and stores bf16 results with kernels/bf16_sr.h's
// stochastic rounding and Philox bits, so it too gives the CPU's bits for
// the same seed and offsets.
//
// The norm follows kernels/optim.h's reduction order: each block folds its
// chunk's 256 lanes as a tree in shared memory into one double partial, and
// one block of 256 threads folds the partials the same way and finishes
// with ml_clip_finish.  No atomics, so the result is the same every run and
// the CPU's for norm types 2 and infinity.
#include "common.cuh"
#include "optim.h"
#include "bf16_sr.h"
#include "allocator.h"
#include <memory>
#include <mutex>
#include <new>

namespace {

constexpr int kLanes = ML_OPTIM_LANES;
constexpr int64_t kChunk = ML_OPTIM_CHUNK;
static_assert(kLanes == 256, "the tree folds assume 256 lanes (kernels/optim.h)");
static_assert(kChunk % 2 == 0, "a bf16-sr chunk starts on a Philox block (two elements)");

__device__ __forceinline__ float r_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float r_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float r_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float r_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float r_sqrt(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double r_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double r_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double r_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double r_div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double r_sqrt(double a) { return __dsqrt_rn(a); }

// One entry of the chunk table: chunk `chunk` (elements chunk * kChunk ...)
// of tensor `item` of the tensor table.
struct chunk_ref {
    uint32_t item, chunk;
};

// ---- the tables and their upload ------------------------------------------

// Pinned staging buffers of one device, used in turn.
struct staging_slot {
    void *host;
    size_t cap;
    cudaEvent_t uploaded;   // recorded after the copy that read `host`
    bool pending;
};
constexpr int kSlots = 4;
struct staging_ring {
    std::mutex mu;
    staging_slot slot[kSlots];
    int next;
};
// Indexed by device; never freed (pinned memory must outlive every copy,
// and CUDA may be torn down before static destructors run).  This is host
// memory, not scratch of one call, so it does not come from
// ml_cuda_workspace: the asynchronous copy out of a slot may still be
// running after the call returns (nothing waits for it), and the next
// calls reuse the slots, waiting on a slot's event only before refilling
// it.
staging_ring g_rings[128];

// Fills a pinned buffer of `bytes` with fill(host) and copies it to the
// device memory dst (bytes long, from the caller's ml_cuda_workspace) on
// stream s.
template <typename Fill>
int upload(int dev, cudaStream_t s, size_t bytes, void *dst, Fill &&fill) {
    if (dev < 0 || dev >= 128) return ml_error("optim (cuda): device index %d out of range", dev);
    staging_ring &ring = g_rings[dev];
    std::lock_guard<std::mutex> lock(ring.mu);
    staging_slot &sl = ring.slot[ring.next];
    ring.next = (ring.next + 1) % kSlots;
    if (sl.pending) {
        // The copy issued kSlots calls ago must have read the buffer before
        // it is refilled; almost always long done.
        ML_CUDA_TRY(cudaEventSynchronize(sl.uploaded));
        sl.pending = false;
    }
    if (!sl.uploaded) ML_CUDA_TRY(cudaEventCreateWithFlags(&sl.uploaded, cudaEventDisableTiming));
    if (sl.cap < bytes) {
        if (sl.host) ML_CUDA_TRY(cudaFreeHost(sl.host));
        sl.host = nullptr;
        sl.cap = 0;
        size_t want = bytes < (64u << 10) ? (64u << 10) : bytes + bytes / 2;
        if (want < bytes) want = bytes;   // bytes + bytes/2 overflowed
        ML_CUDA_TRY(cudaHostAlloc(&sl.host, want, cudaHostAllocPortable));
        sl.cap = want;
    }
    fill((char *)sl.host);
    ML_CUDA_TRY(cudaMemcpyAsync(dst, sl.host, bytes, cudaMemcpyHostToDevice, s));
    ML_CUDA_TRY(cudaEventRecord(sl.uploaded, s));
    sl.pending = true;
    return 0;
}

// Chunks of a tensor of n elements, checked to fit the table's 32 bits.
int chunks_of(int64_t n, const char *op, uint32_t *out) {
    int64_t c = n / kChunk + (n % kChunk != 0);
    if (c > (int64_t)UINT32_MAX) return ml_error("%s (cuda): a tensor of %lld elements is too large", op, (long long)n);
    *out = (uint32_t)c;
    return 0;
}

// A launch's grid: at most 2^31 - 1 blocks.
int check_grid(int64_t blocks, const char *op) {
    if (blocks > 0x7fffffffLL)
        return ml_error("%s (cuda): %lld chunks of %lld elements in one call, at most 2^31 - 1", op,
                        (long long)blocks, (long long)kChunk);
    return 0;
}

size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }

// ---- element access ---------------------------------------------------------

template <typename T> struct is_bf16 { static constexpr bool v = false; };
template <> struct is_bf16<ml_bf16_t> { static constexpr bool v = true; };

// The gradient times the scale, rounded to the gradient's own dtype (what an
// in-place g *= scale stores), in the compute type.
__device__ __forceinline__ float scaled(float g, float s) { return r_mul(g, s); }
__device__ __forceinline__ double scaled(double g, float s) { return r_mul(g, (double)s); }
__device__ __forceinline__ float scaled(ml_bf16_t g, float s) {
    return ml_ld(ml_st<ml_bf16_t>::from(r_mul(ml_ld(g), s)));
}
__device__ __forceinline__ float scaled(ml_f16_t g, float s) { return ml_ld(ml_st<ml_f16_t>::from(r_mul(ml_ld(g), s))); }

__device__ __forceinline__ void store(float *b, int64_t i, float x, uint32_t) { b[i] = x; }
__device__ __forceinline__ void store(double *b, int64_t i, double x, uint32_t) { b[i] = x; }
__device__ __forceinline__ void store(ml_bf16_t *b, int64_t i, float x, uint32_t lane) {
    b[i].x = ml_f32_to_bf16_sr(x, lane);
}

// ---- AdamW --------------------------------------------------------------------

template <typename C> struct adamw_consts {
    C decay, w1, w1c, beta2, w2, eps;
    bool small_w, do_decay;
};

template <typename C> adamw_consts<C> consts_for(const ml_adamw_hparams *h) {
    ml_adamw_consts d = ml_adamw_consts_of(h, sizeof(C) == 4);
    adamw_consts<C> c;
    c.decay = (C)d.decay;
    c.w1 = (C)d.w1;
    c.w1c = (C)d.w1c;
    c.beta2 = (C)d.beta2;
    c.w2 = (C)d.w2;
    c.eps = (C)d.eps;
    c.small_w = d.small_w;
    c.do_decay = d.do_decay;
    return c;
}

struct adamw_item {
    void *p;
    const void *g;
    void *m, *v;
    void *shadow;                // null, or the autocast shadow to refresh (kernels/optim.h)
    int64_t n;
    uint64_t offset;
    double neg_step, bc2_sqrt;   // this tensor's bias corrections, rounded to the compute type
    int shadow_dtype;            // ml_dtype of shadow
};

// The shadow's element i from the param's new value x as the copy kernel
// converts it (ml_cvt: ml_st<D>::from(ml_ld(stored param))), so a refreshed
// shadow is bit for bit the cast of the stepped param.  One switch per
// element on a value every thread of the launch shares: no divergence.
template <typename X> __device__ __forceinline__ void store_shadow(void *sh, int dt, int64_t i, X x) {
    switch (dt) {
    case ML_BF16: ((ml_bf16_t *)sh)[i] = ml_st<ml_bf16_t>::from(x); break;
    case ML_F16: ((ml_f16_t *)sh)[i] = ml_st<ml_f16_t>::from(x); break;
    case ML_F32: ((float *)sh)[i] = ml_st<float>::from(x); break;
    case ML_F64: ((double *)sh)[i] = ml_st<double>::from(x); break;
    default: break;   // the host op admits floating shadows only
    }
}

// C: the compute type (float, or double for f64 steps); P, G, S: the
// element types of the param, the gradient and the moments.
template <typename C, typename P, typename G, typename S>
__global__ void __launch_bounds__(kLanes)
    adamw_multi_kernel(const adamw_item *__restrict__ items, const chunk_ref *__restrict__ chunks,
                       adamw_consts<C> c, uint64_t seed, const float *__restrict__ grad_scale) {
    constexpr bool kSR = is_bf16<P>::v || is_bf16<S>::v;
    const chunk_ref ref = chunks[blockIdx.x];
    const adamw_item it = items[ref.item];
    const int64_t start = (int64_t)ref.chunk * kChunk;
    const int64_t end = it.n - start < kChunk ? it.n : start + kChunk;
    P *__restrict__ p = (P *)it.p;
    const G *__restrict__ g = (const G *)it.g;
    S *__restrict__ m = (S *)it.m;
    S *__restrict__ v = (S *)it.v;
    const C neg_step = (C)it.neg_step, bc2_sqrt = (C)it.bc2_sqrt;
    const float s = grad_scale ? *grad_scale : 1.0f;
    // Element i's step; lp, lm, lv: its draws for the param and the two
    // moments (bf16-sr), unused otherwise.
    auto step = [&](int64_t i, uint32_t lp, uint32_t lm, uint32_t lv) {
        C pi = (C)ml_ld(p[i]), gi = grad_scale ? (C)scaled(g[i], s) : (C)ml_ld(g[i]);
        C mi = (C)ml_ld(m[i]), vi = (C)ml_ld(v[i]);
        if (c.do_decay) pi = r_mul(pi, c.decay);
        mi = c.small_w ? r_add(mi, r_mul(c.w1, r_sub(gi, mi))) : r_sub(gi, r_mul(r_sub(gi, mi), c.w1c));
        vi = r_add(r_mul(vi, c.beta2), r_mul(r_mul(c.w2, gi), gi));
        C denom = r_add(r_div(r_sqrt(vi), bc2_sqrt), c.eps);
        store(p, i, r_add(pi, r_mul(neg_step, r_div(mi, denom))), lp);
        store(m, i, mi, lm);
        store(v, i, vi, lv);
        // From the stored param (a bf16 param was rounded stochastically):
        // the shadow is the cast of what the step left.
        if (it.shadow) store_shadow(it.shadow, it.shadow_dtype, i, ml_ld(p[i]));
    };
    if (kSR) {
        // A thread takes the two elements of one Philox block (block i/2,
        // kernels/bf16_sr.h); chunks start at multiples of kChunk, so i is
        // even here.
        for (int64_t i = start + 2 * (int64_t)threadIdx.x; i < end; i += 2 * kLanes) {
            uint32_t x[4];
            ml_philox_block(seed, it.offset, (uint64_t)i >> 1, x);
            step(i, x[0], x[1], x[2]);
            if (i + 1 < end)
                step(i + 1, ml_adamw_sr_lane(x[0], (uint64_t)i + 1), ml_adamw_sr_lane(x[1], (uint64_t)i + 1),
                     ml_adamw_sr_lane(x[2], (uint64_t)i + 1));
        }
    } else {
        for (int64_t i = start + threadIdx.x; i < end; i += kLanes) step(i, 0, 0, 0);
    }
}

typedef void (*adamw_kernel_fn)(const adamw_item *, const chunk_ref *, adamw_consts<float>, uint64_t,
                                const float *);

// The kernel of an f32-compute dtype combination, or null.
template <typename P, typename S> adamw_kernel_fn pick_g(ml_dtype g) {
    switch (g) {
    case ML_F32: return adamw_multi_kernel<float, P, float, S>;
    case ML_BF16: return adamw_multi_kernel<float, P, ml_bf16_t, S>;
    case ML_F16: return adamw_multi_kernel<float, P, ml_f16_t, S>;
    default: return nullptr;
    }
}

adamw_kernel_fn pick_f32(ml_dtype p, ml_dtype g, ml_dtype s) {
    if (p == ML_F32 && s == ML_F32) return pick_g<float, float>(g);
    if (p == ML_BF16 && s == ML_BF16) return pick_g<ml_bf16_t, ml_bf16_t>(g);
    if (p == ML_BF16 && s == ML_F32) return pick_g<ml_bf16_t, float>(g);
    if (p == ML_F32 && s == ML_BF16) return pick_g<float, ml_bf16_t>(g);
    return nullptr;
}

bool same_combo(const ml_adamw_tensor &a, const ml_adamw_tensor &b) {
    return a.param_dtype == b.param_dtype && a.grad_dtype == b.grad_dtype && a.state_dtype == b.state_dtype;
}

}  // namespace

extern "C" int ml_adamw_multi_cuda(ml_device dev, const ml_adamw_hparams *h, int64_t n,
                                   const ml_adamw_tensor *list) {
    const char *op = "adamw";
    // Dtype groups in order of first appearance: group[k] for tensor k.
    enum { kMaxGroups = 16 };
    int64_t first[kMaxGroups];
    int64_t group_chunks[kMaxGroups] = {0}, group_items[kMaxGroups] = {0};
    int ngroups = 0;
    std::unique_ptr<int[]> group(new (std::nothrow) int[n > 0 ? n : 1]);
    std::unique_ptr<uint32_t[]> nchunk(new (std::nothrow) uint32_t[n > 0 ? n : 1]);
    if (!group || !nchunk) return ml_error("adamw (cuda): out of host memory for %lld tensors", (long long)n);
    for (int64_t k = 0; k < n; k++) {
        int gi = 0;
        while (gi < ngroups && !same_combo(list[first[gi]], list[k])) gi++;
        if (gi == ngroups) {
            if (ngroups == kMaxGroups) return ml_error("adamw (cuda): more than %d dtype combinations", kMaxGroups);
            first[ngroups++] = k;
        }
        group[k] = gi;
        if (chunks_of(list[k].numel, op, &nchunk[k]) < 0) return -1;
        group_chunks[gi] += nchunk[k];
        group_items[gi]++;
    }
    adamw_kernel_fn fns[kMaxGroups] = {nullptr};
    bool is_f64[kMaxGroups] = {false};
    int64_t total_chunks = 0;
    for (int gi = 0; gi < ngroups; gi++) {
        const ml_adamw_tensor &t = list[first[gi]];
        is_f64[gi] = t.param_dtype == ML_F64 && t.grad_dtype == ML_F64 && t.state_dtype == ML_F64;
        fns[gi] = is_f64[gi] ? nullptr : pick_f32(t.param_dtype, t.grad_dtype, t.state_dtype);
        if (!is_f64[gi] && !fns[gi])
            return ml_error("adamw (cuda): unsupported dtypes (param %s, grad %s, moments %s)",
                            ml_dtype_name(t.param_dtype), ml_dtype_name(t.grad_dtype), ml_dtype_name(t.state_dtype));
        if (check_grid(group_chunks[gi], op) < 0) return -1;
        total_chunks += group_chunks[gi];
    }
    if (total_chunks == 0) return 0;   // every tensor is empty

    // Table layout: the groups' tensor entries one after another, then their
    // chunk entries, each group's part starting where its offsets say.
    int64_t item_at[kMaxGroups], chunk_at[kMaxGroups];
    int64_t ni = 0, nc = 0;
    for (int gi = 0; gi < ngroups; gi++) {
        item_at[gi] = ni;
        chunk_at[gi] = nc;
        ni += group_items[gi];
        nc += group_chunks[gi];
    }
    size_t items_bytes = align16((size_t)n * sizeof(adamw_item));
    size_t bytes = items_bytes + (size_t)total_chunks * sizeof(chunk_ref);
    cudaStream_t s;
    if (ml_cuda_enter(dev.index, &s) < 0) return -1;
    ml_cuda_workspace table(dev.index, {bytes});
    if (!table.ok()) return -1;
    char *table_p = table.part<char>(0);
    int rc = upload(dev.index, s, bytes, table_p, [&](char *host) {
        adamw_item *items = (adamw_item *)host;
        chunk_ref *chunks = (chunk_ref *)(host + items_bytes);
        int64_t next_item[kMaxGroups], next_chunk[kMaxGroups];
        for (int gi = 0; gi < ngroups; gi++) {
            next_item[gi] = item_at[gi];
            next_chunk[gi] = chunk_at[gi];
        }
        // The bias corrections of the last step seen, per compute type (a
        // list's tensors almost always share their step).
        int64_t last_step[2] = {0, 0};
        double neg_step[2], bc2_sqrt[2];
        for (int64_t k = 0; k < n; k++) {
            const ml_adamw_tensor &t = list[k];
            int gi = group[k];
            int f64 = is_f64[gi];
            if (t.step != last_step[f64]) {
                ml_adamw_bias(h, t.step, !f64, &neg_step[f64], &bc2_sqrt[f64]);
                last_step[f64] = t.step;
            }
            int64_t slot = next_item[gi]++;
            adamw_item &e = items[slot];
            e.p = t.param;
            e.g = t.grad;
            e.m = t.exp_avg;
            e.v = t.exp_avg_sq;
            e.shadow = t.shadow;
            e.shadow_dtype = (int)t.shadow_dtype;
            e.n = t.numel;
            e.offset = t.offset;
            e.neg_step = neg_step[f64];
            e.bc2_sqrt = bc2_sqrt[f64];
            for (uint32_t c = 0; c < nchunk[k]; c++) chunks[next_chunk[gi]++] = chunk_ref{(uint32_t)(slot - item_at[gi]), c};
        }
    });
    if (rc < 0) return -1;
    const adamw_item *items = (const adamw_item *)table_p;
    const chunk_ref *chunks = (const chunk_ref *)(table_p + items_bytes);
    for (int gi = 0; gi < ngroups; gi++) {
        if (group_chunks[gi] == 0) continue;
        dim3 grid((unsigned)group_chunks[gi]);
        if (is_f64[gi]) {
            adamw_multi_kernel<double, double, double, double><<<grid, kLanes, 0, s>>>(
                items + item_at[gi], chunks + chunk_at[gi], consts_for<double>(h), h->seed, h->grad_scale);
        } else {
            fns[gi]<<<grid, kLanes, 0, s>>>(items + item_at[gi], chunks + chunk_at[gi], consts_for<float>(h), h->seed,
                                            h->grad_scale);
        }
        ML_CUDA_LAUNCHED("adamw_multi_kernel");
    }
    return 0;
}

// ---- norm and scale -------------------------------------------------------------

namespace {

struct list_item {
    void *x;
    int64_t n;
    int dtype;
};

enum { TERM_SQUARE, TERM_ABS_MAX, TERM_POW };

template <int Term> __device__ __forceinline__ double term(double x, double p) {
    if (Term == TERM_SQUARE) return r_mul(x, x);
    if (Term == TERM_ABS_MAX) return fabs(x);
    return pow(fabs(x), p);
}

// This thread's lane of a chunk: elements start + lane, + 256, ... in order.
template <int Term, typename T>
__device__ double lane_sum(const T *__restrict__ x, int64_t start, int64_t end, double p) {
    double acc = 0;
    for (int64_t i = start + threadIdx.x; i < end; i += kLanes)
        acc = ml_norm_combine(acc, term<Term>((double)ml_ld(x[i]), p), Term == TERM_ABS_MAX);
    return acc;
}

// The tree fold of kernels/optim.h over the block's 256 lanes.
template <int Term> __device__ double fold(double *lanes, double mine) {
    lanes[threadIdx.x] = mine;
    __syncthreads();
    for (int w = kLanes / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w)
            lanes[threadIdx.x] = ml_norm_combine(lanes[threadIdx.x], lanes[threadIdx.x + w], Term == TERM_ABS_MAX);
        __syncthreads();
    }
    return lanes[0];
}

template <int Term>
__global__ void __launch_bounds__(kLanes)
    norm_partials_kernel(const list_item *__restrict__ items, const chunk_ref *__restrict__ chunks, double p,
                         double *__restrict__ partials) {
    __shared__ double lanes[kLanes];
    const chunk_ref ref = chunks[blockIdx.x];
    const list_item it = items[ref.item];
    const int64_t start = (int64_t)ref.chunk * kChunk;
    const int64_t end = it.n - start < kChunk ? it.n : start + kChunk;
    double mine;
    switch (it.dtype) {
    case ML_F64: mine = lane_sum<Term>((const double *)it.x, start, end, p); break;
    case ML_BF16: mine = lane_sum<Term>((const ml_bf16_t *)it.x, start, end, p); break;
    case ML_F16: mine = lane_sum<Term>((const ml_f16_t *)it.x, start, end, p); break;
    default: mine = lane_sum<Term>((const float *)it.x, start, end, p); break;
    }
    double total = fold<Term>(lanes, mine);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <int Term>
__global__ void __launch_bounds__(kLanes)
    norm_finish_kernel(const double *__restrict__ partials, int64_t count, double norm_type, double max_norm,
                       float *norm, float *coef) {
    __shared__ double lanes[kLanes];
    double acc = 0;
    for (int64_t c = threadIdx.x; c < count; c += kLanes)
        acc = ml_norm_combine(acc, partials[c], Term == TERM_ABS_MAX);
    double total = fold<Term>(lanes, acc);
    if (threadIdx.x == 0) ml_clip_finish(total, norm_type, max_norm, norm, coef);
}

template <typename T> __device__ void scale_chunk(T *__restrict__ x, int64_t start, int64_t end, float s) {
    for (int64_t i = start + threadIdx.x; i < end; i += kLanes) x[i] = ml_st<T>::from(r_mul(ml_ld(x[i]), s));
}
__device__ void scale_chunk(double *__restrict__ x, int64_t start, int64_t end, float s) {
    for (int64_t i = start + threadIdx.x; i < end; i += kLanes) x[i] = r_mul(x[i], (double)s);
}

__global__ void __launch_bounds__(kLanes)
    scale_kernel(const list_item *__restrict__ items, const chunk_ref *__restrict__ chunks, const float *scale) {
    const float s = *scale;
    if (s == 1.0f) return;   // the clip did not bite: leave the gradients untouched
    const chunk_ref ref = chunks[blockIdx.x];
    const list_item it = items[ref.item];
    const int64_t start = (int64_t)ref.chunk * kChunk;
    const int64_t end = it.n - start < kChunk ? it.n : start + kChunk;
    switch (it.dtype) {
    case ML_F64: scale_chunk((double *)it.x, start, end, s); break;
    case ML_BF16: scale_chunk((ml_bf16_t *)it.x, start, end, s); break;
    case ML_F16: scale_chunk((ml_f16_t *)it.x, start, end, s); break;
    default: scale_chunk((float *)it.x, start, end, s); break;
    }
}

// The tables of a norm or scale list: `count` chunks; the tensor table
// (items_bytes), then the chunk table, `bytes` in all (0 when every tensor
// is empty: nothing to upload).
struct list_layout {
    int64_t count;
    size_t items_bytes, bytes;
};

int layout_of(int64_t n, const ml_optim_tensor *list, const char *op, list_layout *l) {
    int64_t total = 0;
    for (int64_t k = 0; k < n; k++) {
        uint32_t c = 0;
        if (chunks_of(list[k].numel, op, &c) < 0) return -1;
        total += c;
    }
    if (check_grid(total, op) < 0) return -1;
    l->count = total;
    l->items_bytes = l->bytes = 0;
    if (total == 0) return 0;
    l->items_bytes = align16((size_t)n * sizeof(list_item));
    l->bytes = l->items_bytes + (size_t)total * sizeof(chunk_ref);
    return 0;
}

// Uploads the tensor and chunk tables of a norm or scale list, laid out as
// l says, into table (l.bytes of device memory); *items and *chunks point
// into it.
int upload_list(int dev, cudaStream_t s, int64_t n, const ml_optim_tensor *list, const list_layout &l, char *table,
                const list_item **items, const chunk_ref **chunks) {
    if (l.count == 0) return 0;
    const size_t items_bytes = l.items_bytes;
    int rc = upload(dev, s, l.bytes, table, [&](char *host) {
        list_item *it = (list_item *)host;
        chunk_ref *ch = (chunk_ref *)(host + items_bytes);
        int64_t next = 0;
        for (int64_t k = 0; k < n; k++) {
            it[k] = list_item{list[k].data, list[k].numel, (int)list[k].dtype};
            for (int64_t c = 0; c * kChunk < list[k].numel; c++) ch[next++] = chunk_ref{(uint32_t)k, (uint32_t)c};
        }
    });
    if (rc < 0) return -1;
    *items = (const list_item *)table;
    *chunks = (const chunk_ref *)(table + items_bytes);
    return 0;
}

template <int Term>
int launch_norm(cudaStream_t s, const list_item *items, const chunk_ref *chunks, int64_t count, double *partials,
                double norm_type, double max_norm, float *norm, float *coef) {
    if (count > 0) {
        norm_partials_kernel<Term><<<(unsigned)count, kLanes, 0, s>>>(items, chunks, norm_type, partials);
        ML_CUDA_LAUNCHED("norm_partials_kernel");
    }
    norm_finish_kernel<Term><<<1, kLanes, 0, s>>>(partials, count, norm_type, max_norm, norm, coef);
    ML_CUDA_LAUNCHED("norm_finish_kernel");
    return 0;
}

}  // namespace

extern "C" int ml_grad_norm_multi_cuda(ml_device dev, int64_t n, const ml_optim_tensor *list, double norm_type,
                                       double max_norm, float *norm, float *coef) {
    cudaStream_t s;
    if (ml_cuda_enter(dev.index, &s) < 0) return -1;
    list_layout l;
    if (layout_of(n, list, "grad_norm", &l) < 0) return -1;
    const int64_t count = l.count;
    // the tables, and one double partial per chunk (at least one: the
    // finishing kernel takes a pointer whatever the count)
    ml_cuda_workspace ws(dev.index, {l.bytes, (size_t)(count > 0 ? count : 1) * sizeof(double)});
    if (!ws.ok()) return -1;
    const list_item *items = nullptr;
    const chunk_ref *chunks = nullptr;
    if (upload_list(dev.index, s, n, list, l, ws.part<char>(0), &items, &chunks) < 0) return -1;
    double *pp = ws.part<double>(1);
    if (isinf(norm_type))
        return launch_norm<TERM_ABS_MAX>(s, items, chunks, count, pp, norm_type, max_norm, norm, coef);
    if (norm_type == 2) return launch_norm<TERM_SQUARE>(s, items, chunks, count, pp, norm_type, max_norm, norm, coef);
    return launch_norm<TERM_POW>(s, items, chunks, count, pp, norm_type, max_norm, norm, coef);
}

extern "C" int ml_scale_multi_cuda(ml_device dev, int64_t n, const ml_optim_tensor *list, const float *scale) {
    cudaStream_t s;
    if (ml_cuda_enter(dev.index, &s) < 0) return -1;
    list_layout l;
    if (layout_of(n, list, "scale_", &l) < 0) return -1;
    const int64_t count = l.count;
    if (count == 0) return 0;
    ml_cuda_workspace table(dev.index, {l.bytes});
    if (!table.ok()) return -1;
    const list_item *items = nullptr;
    const chunk_ref *chunks = nullptr;
    if (upload_list(dev.index, s, n, list, l, table.part<char>(0), &items, &chunks) < 0) return -1;
    scale_kernel<<<(unsigned)count, kLanes, 0, s>>>(items, chunks, scale);
    ML_CUDA_LAUNCHED("scale_kernel");
    return 0;
}
