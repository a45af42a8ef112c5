// reduce.cu — CUDA twins of kernels/cpu/reduce.c (contract in reduce.h).
//
// A plan splits x's dims into kept dims (one per output element; out is
// contiguous, so an output's linear index walks them in order) and reduced
// dims (ordered by decreasing stride, then merged), each mapped to x offsets
// by an indexer.  Two kernel shapes:
//   row:    the innermost (smallest-stride) dim is reduced, e.g. a sum over
//           the last dim: a warp (or a whole block, for long rows) per
//           output, lanes striding through the row, then a warp-shuffle sum.
//   column: a kept dim is innermost, e.g. a bias gradient summing [N, C]
//           over N: 32 consecutive outputs per block (coalesced) times 8
//           lanes along the reduced dims, summed through shared memory.
// When there are too few outputs to fill the GPU, the reduced range is
// split over blockIdx.y; partial sums go to a workspace and a second kernel
// adds them in a fixed order, so results never depend on timing.
// Floats accumulate in double (FP64 is nearly free in a memory-bound loop on
// H100/H200, and it keeps results within rounding of the CPU's), integers in
// int64.
#include "common.cuh"
#include "reduce.h"
#include <cmath>

namespace {

constexpr int kThreads = 256;
constexpr int kColX = 32, kColY = 8;

struct plan {
    int64_t no, nr;               // outputs, reduced elements per output
    ml_indexer<1> kept, red;      // output index -> x offset, reduced index -> x offset
    bool row;
    bool small;                   // every index fits 32 bits (cheaper division)
};

void make_plan(plan *p, const ml_ktensor *out, const ml_ktensor *x) {
    int64_t ks[ML_MAX_DIMS], kst[ML_MAX_DIMS], rs[ML_MAX_DIMS], rst[ML_MAX_DIMS];
    int nk = 0, nrd = 0;
    int64_t min_k = INT64_MAX, min_r = INT64_MAX;
    p->no = 1;
    p->nr = 1;
    for (int d = 0; d < x->ndim; d++) {
        int64_t n = x->shape[d], st = x->strides[d];
        if (n == 1) continue;
        if (out->shape[d] == 1) {
            int at = nrd;   // insertion by decreasing stride (stable)
            while (at > 0 && rst[at - 1] < st) at--;
            for (int k = nrd; k > at; k--) { rs[k] = rs[k - 1]; rst[k] = rst[k - 1]; }
            rs[at] = n;
            rst[at] = st;
            nrd++;
            p->nr *= n;
            if (st < min_r) min_r = st;
        } else {
            ks[nk] = n;
            kst[nk] = st;
            nk++;
            p->no *= n;
            if (st < min_k) min_k = st;
        }
    }
    const int64_t *kp[1] = {kst}, *rp[1] = {rst};
    ml_indexer_make(&p->kept, nk, ks, kp);
    ml_indexer_make(&p->red, nrd, rs, rp);
    // Very short rows read better one thread per output (neighbouring
    // threads then read neighbouring bytes) than a mostly idle warp each.
    p->row = nrd > 0 && min_r < min_k && p->nr > 16;
    p->small = ml_fits_u32(p->no) && ml_fits_u32(p->nr);
}

__device__ __forceinline__ int64_t off1(const ml_indexer<1> &ix, int64_t i, bool small) {
    int64_t off;
    if (small) ix.offsets((uint32_t)i, &off);
    else ix.offsets(i, &off);
    return off;
}

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) v += __shfl_down_sync(0xffffffffu, v, s);
    return v;
}

// Sum over groups of G threads (32: one warp; kThreads: the whole block);
// the total ends up in the group's first thread.
template <int G, typename A> __device__ __forceinline__ A group_sum(A v) {
    v = warp_sum(v);
    if constexpr (G == 32) {
        return v;
    } else {
        __shared__ A part[kThreads / 32];
        if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
        __syncthreads();
        v = threadIdx.x < kThreads / 32 ? part[threadIdx.x] : (A)0;
        if (threadIdx.x < 32) v = warp_sum(v);
        return v;
    }
}

// Outputs of a split (gridDim.y > 1) go to ws[split][no] for reduce_finish.
template <int G, typename T, typename A, typename TO, typename Map, typename Fin>
__global__ void __launch_bounds__(kThreads) reduce_row(const T *x, plan pl, int64_t chunk, Map map, Fin fin,
                                                       TO *out, A *ws) {
    constexpr int kPer = kThreads / G;
    int lane = threadIdx.x % G;
    int64_t o = (int64_t)blockIdx.x * kPer + threadIdx.x / G;
    int64_t r0 = (int64_t)blockIdx.y * chunk, r1 = min(pl.nr, r0 + chunk);
    A acc = 0;
    if (o < pl.no) {
        int64_t base = off1(pl.kept, o, pl.small);
#pragma unroll 4
        for (int64_t r = r0 + lane; r < r1; r += G) acc += map(x[base + off1(pl.red, r, pl.small)], o);
    }
    acc = group_sum<G>(acc);
    if (lane == 0 && o < pl.no) {
        if (gridDim.y == 1) out[o] = fin(acc, o);
        else ws[blockIdx.y * pl.no + o] = acc;
    }
}

template <typename T, typename A, typename TO, typename Map, typename Fin>
__global__ void __launch_bounds__(kColX *kColY) reduce_col(const T *x, plan pl, int64_t chunk, Map map, Fin fin,
                                                         TO *out, A *ws) {
    int tx = threadIdx.x, ty = threadIdx.y;
    int64_t o = (int64_t)blockIdx.x * kColX + tx;
    int64_t r0 = (int64_t)blockIdx.y * chunk, r1 = min(pl.nr, r0 + chunk);
    A acc = 0;
    if (o < pl.no) {
        int64_t base = off1(pl.kept, o, pl.small);
#pragma unroll 4
        for (int64_t r = r0 + ty; r < r1; r += kColY) acc += map(x[base + off1(pl.red, r, pl.small)], o);
    }
    __shared__ A part[kColY][kColX + 1];
    part[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && o < pl.no) {
        A t = part[0][tx];
#pragma unroll
        for (int k = 1; k < kColY; k++) t += part[k][tx];
        if (gridDim.y == 1) out[o] = fin(t, o);
        else ws[blockIdx.y * pl.no + o] = t;
    }
}

template <typename A, typename TO, typename Fin>
__global__ void reduce_finish(const A *ws, int64_t splits, int64_t no, Fin fin, TO *out) {
    for (int64_t o = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; o < no; o += (int64_t)gridDim.x * blockDim.x) {
        A t = 0;
        for (int64_t s = 0; s < splits; s++) t += ws[s * no + o];
        out[o] = fin(t, o);
    }
}

// out[o] = fin(sum over the reduced elements e of output o of map(e, o)).
template <typename A, typename T, typename TO, typename Map, typename Fin>
int reduce_run(const char *name, const plan &pl, const T *x, const Map &map, const Fin &fin, TO *out, int dev,
               cudaStream_t s) {
    if (pl.no == 0) return 0;
    int64_t target = (int64_t)ml_cuda_sm_count(dev) * 4;   // blocks that keep every SM busy
    bool whole_block = pl.row && pl.nr >= 4096;
    int64_t per_block = pl.row ? (whole_block ? 1 : kThreads / 32) : kColX;
    int64_t lanes = pl.row ? (whole_block ? kThreads : 32) : kColY;
    int64_t bx = (pl.no + per_block - 1) / per_block;
    // Split the reduced range while the grid is too small, but leave every
    // lane at least 8 elements of work.
    int64_t splits = target / bx;
    int64_t most = pl.nr / (lanes * 8);
    if (splits > most) splits = most;
    if (splits > 4096) splits = 4096;
    if (splits < 1) splits = 1;
    int64_t chunk = (pl.nr + splits - 1) / splits;
    if (chunk > 0) splits = (pl.nr + chunk - 1) / chunk;
    else splits = 1;

    ml_cuda_workspace scratch(dev, {splits > 1 ? (size_t)(splits * pl.no) * sizeof(A) : 0});
    if (!scratch.ok()) return -1;
    A *ws = splits > 1 ? scratch.part<A>(0) : nullptr;
    const char *kernel = !pl.row ? "reduce_col" : "reduce_row";
    dim3 grid((unsigned)bx, (unsigned)splits);
    if (!pl.row)
        reduce_col<T, A, TO><<<grid, dim3(kColX, kColY), 0, s>>>(x, pl, chunk, map, fin, out, ws);
    else if (whole_block)
        reduce_row<kThreads, T, A, TO><<<grid, kThreads, 0, s>>>(x, pl, chunk, map, fin, out, ws);
    else
        reduce_row<32, T, A, TO><<<grid, kThreads, 0, s>>>(x, pl, chunk, map, fin, out, ws);
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess && splits > 1) {
        kernel = "reduce_finish";
        reduce_finish<<<ml_grid_for(pl.no, kThreads, dev), kThreads, 0, s>>>(ws, splits, pl.no, fin, out);
        e = cudaGetLastError();
    }
    // The workspace goes back stream-ordered: the finishing kernel is queued
    // before any reuse.
    (void)name;
    if (e != cudaSuccess) return ml_cuda_launch_fail(e, kernel, __FILE__, __LINE__);
    return 0;
}

// ---- what is summed ----------------------------------------------------------

template <typename A, typename T> __device__ __forceinline__ A to_acc(T v) { return (A)ml_to_c(v); }

template <typename T, typename A> struct map_value {
    __device__ __forceinline__ A operator()(T v, int64_t) const { return to_acc<A>(v); }
};
template <typename T> struct map_square {
    __device__ __forceinline__ double operator()(T v, int64_t) const {
        double a = to_acc<double>(v);
        return a * a;
    }
};
template <typename T> struct map_abs {
    __device__ __forceinline__ double operator()(T v, int64_t) const { return fabs(to_acc<double>(v)); }
};
template <typename T> struct map_pow {
    double p;
    __device__ __forceinline__ double operator()(T v, int64_t) const { return pow(fabs(to_acc<double>(v)), p); }
};
// Squared deviation from the per-output mean (second pass of var).
template <typename T> struct map_dev {
    const double *mean;
    __device__ __forceinline__ double operator()(T v, int64_t o) const {
        double d = to_acc<double>(v) - mean[o];
        return d * d;
    }
};

// ---- what is stored ----------------------------------------------------------

template <typename TO> struct fin_scale {
    double scale;
    __device__ __forceinline__ TO operator()(double a, int64_t) const { return ml_st<TO>::from(a * scale); }
};
template <typename TO> struct fin_div {
    double d;
    __device__ __forceinline__ TO operator()(double a, int64_t) const { return ml_st<TO>::from(a / d); }
};
template <typename TO> struct fin_norm {
    double p;
    __device__ __forceinline__ TO operator()(double a, int64_t) const {
        return ml_st<TO>::from(p == 2 ? sqrt(a) : p == 1 ? a : pow(a, 1.0 / p));
    }
};
struct fin_int {
    __device__ __forceinline__ int64_t operator()(int64_t a, int64_t) const { return a; }
};

bool is_float_dtype(ml_dtype t) { return t == ML_F32 || t == ML_F64 || t == ML_F16 || t == ML_BF16; }

// ---- max along a dim ---------------------------------------------------------

// a (at index ia) beats b (at ib): NaN beats numbers, then the larger value,
// then the earlier index — the first occurrence of the max, NaN counting as
// the max, as the CPU's scan finds it.
template <typename C> __device__ __forceinline__ bool beats(C a, int64_t ia, C b, int64_t ib) {
    bool an = a != a, bn = b != b;
    if (an || bn) return an && (!bn || ia < ib);
    return a > b || (a == b && ia < ib);
}

// A warp per output, for rows contiguous along dim.  Both kernels write
// positions counted from index_base (1 for Lua), so argmax needs no pass
// after them.
template <typename T>
__global__ void max_warp(const T *x, ml_indexer<1> kept, int64_t no, int64_t len, int64_t sd, int64_t index_base,
                         T *values, int64_t *indices) {
    typedef typename ml_ctype<T>::type C;
    int lane = threadIdx.x % 32;
    int64_t o = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
    if (o >= no) return;   // whole warps leave together
    int64_t base;
    kept.offsets(o, &base);
    C best = 0;
    int64_t bi = -1;
    for (int64_t k = lane; k < len; k += 32) {
        C v = ml_to_c(x[base + k * sd]);
        if (bi < 0 || beats(v, k, best, bi)) { best = v; bi = k; }
    }
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) {
        int64_t oi = __shfl_down_sync(0xffffffffu, bi, s);
        if (oi >= 0) {
            C ov = ml_to_c(x[base + oi * sd]);
            if (bi < 0 || beats(ov, oi, best, bi)) { best = ov; bi = oi; }
        }
    }
    if (lane == 0) {
        if (values) values[o] = x[base + bi * sd];
        indices[o] = bi + index_base;
    }
}

// A thread per output, scanning in order like the CPU (rows strided along dim).
template <typename T>
__global__ void max_thread(const T *x, ml_indexer<1> kept, int64_t no, int64_t len, int64_t sd, int64_t index_base,
                           T *values, int64_t *indices) {
    typedef typename ml_ctype<T>::type C;
    for (int64_t o = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; o < no; o += (int64_t)gridDim.x * blockDim.x) {
        int64_t base;
        kept.offsets(o, &base);
        C best = ml_to_c(x[base]);
        int64_t bi = 0;
        if (best == best)
            for (int64_t k = 1; k < len; k++) {
                C v = ml_to_c(x[base + k * sd]);
                if (v != v) { best = v; bi = k; break; }
                if (v > best) { best = v; bi = k; }
            }
        if (values) values[o] = x[base + bi * sd];
        indices[o] = bi + index_base;
    }
}

}  // namespace

// ---- entry points ---------------------------------------------------------------

extern "C" int ml_sum_cuda(ml_ktensor *out, const ml_ktensor *x, double scale) {
    cudaStream_t s;
    plan pl;
    if (ml_cuda_prepare(out, "sum", &s) < 0) return -1;
    make_plan(&pl, out, x);
    int dev = out->device.index;
    if (is_float_dtype(x->dtype)) {
        return ml_dispatch_float(x->dtype, "sum", [&](auto tag) -> int {
            typedef decltype(tag) T;
            return reduce_run<double>("sum", pl, ml_ptr<T>(x), map_value<T, double>{}, fin_scale<T>{scale},
                                      ml_ptr<T>(out), dev, s);
        });
    }
    auto run = [&](auto tag) -> int {
        typedef decltype(tag) T;
        return reduce_run<int64_t>("sum", pl, ml_ptr<T>(x), map_value<T, int64_t>{}, fin_int{},
                                   ml_ptr<int64_t>(out), dev, s);
    };
    switch (x->dtype) {
    case ML_I32: return run(int32_t());
    case ML_I64: return run(int64_t());
    case ML_U8: case ML_BOOL: return run(uint8_t());   // bool is stored as 0/1 bytes
    default: return ml_error("sum (cuda): dtype %s is not supported", ml_dtype_name(x->dtype));
    }
}

extern "C" int ml_var_cuda(ml_ktensor *out, const ml_ktensor *x, double correction) {
    cudaStream_t s;
    plan pl;
    if (ml_cuda_prepare(out, "var", &s) < 0) return -1;
    make_plan(&pl, out, x);
    int dev = out->device.index;
    if (pl.no == 0) return 0;
    ml_cuda_workspace ws(dev, {(size_t)pl.no * sizeof(double)});
    if (!ws.ok()) return -1;
    double *mean = ws.part<double>(0);
    double n = (double)pl.nr, dof = fmax(0.0, n - correction);
    int rc = ml_dispatch_float(x->dtype, "var", [&](auto tag) -> int {
        typedef decltype(tag) T;
        if (reduce_run<double>("var", pl, ml_ptr<T>(x), map_value<T, double>{}, fin_div<double>{n}, mean, dev, s) < 0)
            return -1;
        return reduce_run<double>("var", pl, ml_ptr<T>(x), map_dev<T>{mean}, fin_div<T>{dof}, ml_ptr<T>(out), dev, s);
    });
    return rc;   // the workspace goes back stream-ordered, after both passes
}

extern "C" int ml_norm_cuda(ml_ktensor *out, const ml_ktensor *x, double p) {
    cudaStream_t s;
    plan pl;
    if (ml_cuda_prepare(out, "norm", &s) < 0) return -1;
    make_plan(&pl, out, x);
    int dev = out->device.index;
    return ml_dispatch_float(x->dtype, "norm", [&](auto tag) -> int {
        typedef decltype(tag) T;
        T *o = ml_ptr<T>(out);
        const T *xp = ml_ptr<T>(x);
        if (p == 2) return reduce_run<double>("norm", pl, xp, map_square<T>{}, fin_norm<T>{p}, o, dev, s);
        if (p == 1) return reduce_run<double>("norm", pl, xp, map_abs<T>{}, fin_norm<T>{p}, o, dev, s);
        return reduce_run<double>("norm", pl, xp, map_pow<T>{p}, fin_norm<T>{p}, o, dev, s);
    });
}

extern "C" int ml_max_dim_cuda(ml_ktensor *values, ml_ktensor *indices, const ml_ktensor *x, int dim,
                               int64_t index_base) {
    cudaStream_t s;
    if (ml_cuda_prepare(x, "max", &s) < 0) return -1;
    int64_t ks[ML_MAX_DIMS], kst[ML_MAX_DIMS];
    int nk = 0;
    for (int d = 0; d < x->ndim; d++)
        if (d != dim) { ks[nk] = x->shape[d]; kst[nk] = x->strides[d]; nk++; }
    const int64_t *kp[1] = {kst};
    ml_indexer<1> kept;
    ml_indexer_make(&kept, nk, ks, kp);
    int64_t no = ml_kt_numel(indices), len = x->shape[dim], sd = x->strides[dim];
    if (no == 0) return 0;
    int dev = x->device.index;
    auto run = [&](auto tag) -> int {
        typedef decltype(tag) T;
        T *v = values ? ml_ptr<T>(values) : nullptr;
        if (sd == 1 && len > 16) {
            int64_t blocks = (no * 32 + kThreads - 1) / kThreads;
            max_warp<T><<<(unsigned)blocks, kThreads, 0, s>>>(ml_ptr<T>(x), kept, no, len, sd, index_base, v,
                                                              ml_ptr<int64_t>(indices));
        } else {
            max_thread<T><<<ml_grid_for(no, kThreads, dev), kThreads, 0, s>>>(ml_ptr<T>(x), kept, no, len, sd,
                                                                                index_base, v,
                                                                                ml_ptr<int64_t>(indices));
        }
        ML_CUDA_LAUNCHED(sd == 1 && len > 16 ? "max_warp" : "max_thread");
        return 0;
    };
    if (x->dtype == ML_BOOL) return run(uint8_t());
    return ml_dispatch_all(x->dtype, run);
}
