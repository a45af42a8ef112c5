// norm.cu — CUDA twins of kernels/cpu/norm.c (contract in norm.h).
//
// Group norm, x [N, L, C] channels last.  A group's values are C/G
// neighbouring channels of every row, so reading one group alone would
// touch a few bytes of each row; instead all passes walk whole rows:
//   partial  blocks of 32 channels x 8 row lanes sum, per channel, over a
//            slice of one sample's rows (reads coalesced along C); slices
//            (gridDim.y) are sized to fill the GPU.  Forward sums x - k and
//            (x - k)^2 in double, k the group's first value: with that
//            shift the one-pass variance is as exact as the CPU's two
//            passes even when the mean is large against the spread.
//   stats    a warp per (n, g) adds its channels' slices in a fixed order,
//            writes mean/rstd and every channel's scale and shift.
//   apply    y = x*scale + shift (then SiLU), vectorised.
// The backward uses the same partial pass for the per-channel sums of dy
// and dy*x (dy taken through SiLU when fused), then small kernels fold them
// into per-group coefficients of dx = scale*dy + k2*x + k3 (see norm_t.h),
// the parameter gradients (summed over n in order) and dx itself.
//
// Layer norm, x [M, C]: a warp per row (a block for rows over 1024 values),
// two passes in double as on the CPU; dw/db are column sums over the rows.
//
// Paths and launches per pass (which one runs depends only on the shapes,
// the dtype, the pointers' alignment and the GPU model):
//   group norm forward   fused: 1 cooperative kernel.  Its blocks are the
//                        partial pass's blocks (same slices, so the same
//                        sums); each copies its tile of x (32 channels x
//                        one slice of rows) into shared memory, writes its
//                        partial sums, waits at a grid-wide barrier, forms
//                        the statistics of the groups it touches from all
//                        slices (the stats kernel's arithmetic) and writes
//                        y from the tile: x is read once.  Runs when every
//                        block is resident at once (about 4 per SM, so the
//                        whole tensor must fit in the SMs' shared memory:
//                        the UNet's norms at 64x64 latents do, bf16 and
//                        f32) and the device can launch cooperatively.
//                        Else 3 kernels: partial, stats, apply.
//   group norm backward  fused: 1 cooperative kernel as above, with tiles
//                        of x and dy (bf16 fits at every UNet shape, f32
//                        not at 64x64); after the barrier each block forms
//                        its groups' coefficients and writes dx, and the
//                        blocks of slice 0 of sample 0 write dw/db.  Else
//                        up to 5 kernels: partial, totals, params, coef, dx.
//   layer norm forward   1 kernel; each thread keeps its values of the row
//                        in registers across the two passes (rows up to
//                        2048 values; longer rows re-read memory), and a
//                        warp per row widens w and b once per block.
//   layer norm backward  dx only: 1 kernel like the forward.  With dw/db:
//                        fused, 1 cooperative kernel: a block per R >= 8
//                        rows (about 2 blocks per SM) copies their x and dy
//                        into shared memory, writes dx row by row, sums its
//                        rows' dw/db terms per channel, and after the
//                        barrier the blocks add those partials per channel
//                        in a fixed order (rows up to 2048 values, blocks
//                        fitting as above: bf16 at every SD shape, f32 not
//                        on [B*4096, 320]).  Else 3 kernels: dx, partial,
//                        finish (x and dy read twice).
// The VAE's group norms at 512x512 (1M values per group) exceed the shared
// memory and take the multi-kernel paths.  Which one-kernel paths run by
// default, and MOONLIT_NORM_FUSED's say over it: fused_on() below.
//
// Every split and every reduction order depends only on the shapes and
// the GPU model: no atomics (the grid barrier's own counter aside), the
// same bits on every run.  Products that the CPU rounds separately are
// spelled with _rn intrinsics so nvcc does not fuse them into FMAs.  The
// fused group norm passes and the layer norm forward and dx reproduce the
// multi-kernel paths' bits: they add the same values in the same order,
// through the same helpers below.  The fused layer norm dw/db split the
// rows differently (by block instead of by slice), so their last bits may
// differ from the multi-kernel path's.
#include "nn_util.cuh"
#include "norm.h"
#include <atomic>
#include <cmath>
#include <cooperative_groups.h>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace {

namespace cg = cooperative_groups;

constexpr int kCX = 32, kRY = 8;   // partial pass: channels x row lanes per block (kCX * kRY == kBlock)

// Arithmetic types per storage type: fwd for the forward's affine (the
// CPU's T), bwd for the backward's per-element math (the CPU's double;
// f32 for the 16-bit types), stat for mean/rstd.
template <typename T> struct ntypes { typedef float fwd; typedef double bwd; typedef float stat; };
template <> struct ntypes<double> { typedef double fwd; typedef double bwd; typedef double stat; };
template <> struct ntypes<ml_f16_t> { typedef float fwd; typedef float bwd; typedef float stat; };
template <> struct ntypes<ml_bf16_t> { typedef float fwd; typedef float bwd; typedef float stat; };

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float ex(float v) { return expf(v); }
__device__ __forceinline__ double ex(double v) { return exp(v); }

template <typename A, typename T> __device__ __forceinline__ A ld(T v) { return (A)ml_ld(v); }

// y = v / (1 + exp(-v)), as the CPU writes it.
template <typename F> __device__ __forceinline__ F silu(F v) { return v / ((F)1 + ex(-v)); }

// The gradient through SiLU at pre-activation v: g s(v) (1 + v (1 - s(v))).
template <typename B> __device__ __forceinline__ B silu_grad(B g, B v) {
    B s = (B)1 / ((B)1 + ex(-v));
    return mul_rn(mul_rn(g, s), add_rn((B)1, mul_rn(v, sub_rn((B)1, s))));
}

// A channel's affine as the CPU forms it from its group's statistics:
// scale = r w, shift = b - m r w.
template <typename B> __device__ __forceinline__ B affine_scale(B r, B w) { return mul_rn(r, w); }
template <typename B> __device__ __forceinline__ B affine_shift(B m, B r, B w, B b) {
    return sub_rn(b, mul_rn(mul_rn(m, r), w));
}

template <typename T> const T *opt_ptr(const ml_ktensor *t) { return t ? ml_ptr<T>(t) : nullptr; }

// ---- arithmetic shared by the multi-kernel and the fused paths ------------
// Each helper is the one place its formula is written, so both paths
// round alike.

// Mean and rstd of cnt values from their sums of x - k and (x - k)^2, k
// the first value (*first, read only when there are values).
template <typename T>
__device__ __forceinline__ void shifted_moments(double a1, double a2, const T *first, double cnt, double eps,
                                                double *mean, double *rstd) {
    double m = 0, var = 0;
    if (cnt > 0) {
        double dm = a1 / cnt;
        m = ld<double>(*first) + dm;
        var = fmax(a2 / cnt - dm * dm, 0.0);
    }
    *mean = m;
    *rstd = 1.0 / sqrt(var + eps);
}

// dx = scale*dy + k2*x + k3 over cnt values with statistics m, r, from
// s1 = sum(w dy) and s2 = sum(w dy x).
__device__ __forceinline__ void dx_coef(double s1, double s2, double m, double r, double cnt, double *k2,
                                        double *k3) {
    double sxh = mul_rn(r, sub_rn(s2, mul_rn(m, s1)));   // sum(w dy xhat)
    double c2 = cnt > 0 ? mul_rn(-r, r) * sxh / cnt : 0;
    *k3 = sub_rn(cnt > 0 ? mul_rn(-r, s1) / cnt : 0, mul_rn(c2, m));
    *k2 = c2;
}

// One group norm output: x*scale + shift (then SiLU) in F.
template <typename F, bool SILU, typename T> __device__ __forceinline__ T gn_y(T xv, F sc, F sh) {
    F v = add_rn(mul_rn(ld<F>(xv), sc), sh);
    if (SILU) v = silu(v);
    return ml_st<T>::from(v);
}

// One group norm input gradient: scale*dy' + k2*x + k3, dy' the gradient
// through SiLU when fused.
template <typename B, bool SILU, typename T> __device__ __forceinline__ T gn_dx(T xv, T gv, B sc, B sh, B k2, B k3) {
    B p = ld<B>(xv), q = ld<B>(gv);
    if (SILU) q = silu_grad(q, add_rn(mul_rn(p, sc), sh));
    return ml_st<T>::from(add_rn(add_rn(mul_rn(sc, q), mul_rn(k2, p)), k3));
}

// One sample's term of dw (r (sum dy x - m sum dy)) and db (sum dy).
__device__ __forceinline__ void gn_param_add(double &aw, double &ab, double r, double m, double t1, double t2) {
    aw = add_rn(aw, mul_rn(r, sub_rn(t2, mul_rn(m, t1))));
    ab += t1;
}

// One row's term of layer norm's dw (r (dy x - m dy)) and db (dy).
__device__ __forceinline__ void ln_param_add(double &a1, double &a2, double q, double p, double r, double m) {
    a1 = add_rn(a1, mul_rn(r, sub_rn(q * p, mul_rn(m, q))));
    a2 += q;
}

// ---- the partial pass: per-channel sums over slices of rows ----------------

// Adds the kRY row lanes' sums of channel threadIdx.x in lane order and
// stores the total at *o1, *o2 (when `valid`).  Ends synchronised.
__device__ __forceinline__ void col_combine(double (*p1)[kCX], double (*p2)[kCX], double a1, double a2, bool valid,
                                            double *o1, double *o2) {
    int tx = threadIdx.x, ty = threadIdx.y;
    p1[ty][tx] = a1;
    p2[ty][tx] = a2;
    __syncthreads();
    if (ty == 0 && valid) {
#pragma unroll
        for (int k = 1; k < kRY; k++) { a1 += p1[k][tx]; a2 += p2[k][tx]; }
        *o1 = a1;
        *o2 = a2;
    }
    __syncthreads();
}

// Sums map(.) over rows [s*chunk, (s+1)*chunk) of sample n for channel c
// into ws1/ws2[(n*S + s)*C + c]; blockIdx.x: 32 channels, blockIdx.y: the
// slice s, blockIdx.z (grid-stride): the sample n.  Map provides
// start(n, c) -> state and add(state, element index, row, a1, a2).
template <typename Map>
__global__ void __launch_bounds__(kCX *kRY)
    col_partial(Map map, int64_t N, int64_t L, int64_t C, int64_t chunk, double *ws1, double *ws2) {
    __shared__ double p1[kRY][kCX], p2[kRY][kCX];
    int tx = threadIdx.x, ty = threadIdx.y;
    int64_t c = (int64_t)blockIdx.x * kCX + tx, s = blockIdx.y, S = gridDim.y;
    int64_t l0 = s * chunk, l1 = min(L, l0 + chunk);
    for (int64_t n = blockIdx.z; n < N; n += gridDim.z) {
        double a1 = 0, a2 = 0;
        if (c < C && l0 < l1) {
            typename Map::state st = map.start(n, c);
#pragma unroll 4
            for (int64_t l = l0 + ty; l < l1; l += kRY) map.add(st, (n * L + l) * C + c, l, a1, a2);
        }
        int64_t at = (n * S + s) * C + c;
        col_combine(p1, p2, a1, a2, c < C, ws1 + at, ws2 + at);
    }
}

// Slices of `rows` so that about four blocks per SM run, each thread
// walking at least 8 rows; *chunk rows per slice.
int64_t pick_slices(int64_t rows, int64_t other_blocks, int dev, int64_t *chunk) {
    int64_t target = (int64_t)ml_cuda_sm_count(dev) * 4;
    int64_t s = target / (other_blocks > 0 ? other_blocks : 1);
    int64_t most = rows / (kRY * 8);
    if (s > most) s = most;
    if (s > 65535) s = 65535;
    if (s < 1) s = 1;
    *chunk = (rows + s - 1) / s;
    return *chunk > 0 ? (rows + *chunk - 1) / *chunk : 1;
}

dim3 partial_grid(int64_t C, int64_t S, int64_t N) {
    return dim3((unsigned)((C + kCX - 1) / kCX), (unsigned)S, (unsigned)(N < 65535 ? N : 65535));
}

// ---- group norm forward ------------------------------------------------------

struct gn_dims { int64_t N, L, C, G, cg; };

// x - k and (x - k)^2, k the first value of the channel's group in sample n.
template <typename T> struct gn_fwd_map {
    const T *x;
    gn_dims d;
    struct state { double k; };
    __device__ state start(int64_t n, int64_t c) const { return {ld<double>(x[n * d.L * d.C + c / d.cg * d.cg])}; }
    __device__ void add_v(const state &st, T xv, double &a1, double &a2) const {
        double v = ld<double>(xv) - st.k;
        a1 += v;
        a2 += v * v;
    }
    __device__ void add(const state &st, int64_t i, int64_t, double &a1, double &a2) const { add_v(st, x[i], a1, a2); }
};

// The slices' sums of group (n, c0 / cg) in the order of a warp whose
// lanes take (slice, channel) pairs in turn, then the butterfly: the
// totals in every lane.
__device__ __forceinline__ void gn_group_sums(const double *ws1, const double *ws2, const gn_dims &d, int64_t S,
                                              int64_t n, int64_t c0, int lane, double *t1, double *t2) {
    double a1 = 0, a2 = 0;
    for (int64_t k = lane; k < S * d.cg; k += 32) {
        int64_t s = k / d.cg, at = (n * S + s) * d.C + c0 + (k - s * d.cg);
        a1 += __ldcg(ws1 + at);
        a2 += __ldcg(ws2 + at);
    }
    *t1 = warp_allsum(a1);
    *t2 = warp_allsum(a2);
}

// A warp per (n, g): mean, rstd and the scale/shift pairs ss[n][c][2].
template <typename T, typename F, typename SS>
__global__ void gn_stats(const T *x, const T *w, const T *b, gn_dims d, int64_t S, double eps, const double *ws1,
                         const double *ws2, SS *mean, SS *rstd, F *ss) {
    int64_t ng = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (ng >= d.N * d.G) return;   // whole warps leave together
    int64_t n = ng / d.G, g = ng % d.G, c0 = g * d.cg;
    double a1, a2, m, r;
    gn_group_sums(ws1, ws2, d, S, n, c0, lane, &a1, &a2);
    shifted_moments(a1, a2, x + n * d.L * d.C + c0, (double)d.L * (double)d.cg, eps, &m, &r);
    if (lane == 0) {
        mean[ng] = (SS)m;
        rstd[ng] = (SS)r;
    }
    for (int64_t j = lane; j < d.cg; j += 32) {
        int64_t c = c0 + j;
        double wc = w ? ld<double>(w[c]) : 1.0, bc = b ? ld<double>(b[c]) : 0.0;
        ss[(n * d.C + c) * 2] = (F)affine_scale(r, wc);
        ss[(n * d.C + c) * 2 + 1] = (F)affine_shift(m, r, wc, bc);
    }
}

// y = x*scale + shift (then SiLU) in F, V elements at a time (C % V == 0).
template <typename T, typename F, int V, bool SILU, typename Idx>
__global__ void __launch_bounds__(kBlock) gn_apply(const T *__restrict__ x, T *__restrict__ y, const F *__restrict__ ss,
                                                     Idx nvec, Idx C, Idx LC) {
    for (Idx i = blockIdx.x * (Idx)blockDim.x + threadIdx.x; i < nvec; i += (Idx)gridDim.x * blockDim.x) {
        Idx e = i * V, n = e / LC, c = e % C;
        vec_t<T, V> xv = reinterpret_cast<const vec_t<T, V> *>(x)[i], yv;
        const F *p = ss + (n * C + c) * 2;
#pragma unroll
        for (int k = 0; k < V; k++) yv.v[k] = gn_y<F, SILU>(xv.v[k], p[2 * k], p[2 * k + 1]);
        reinterpret_cast<vec_t<T, V> *>(y)[i] = yv;
    }
}

// ---- group norm backward -----------------------------------------------------

// The affine of channel c of sample n in B, from the stored statistics.
template <typename T, typename B, typename SS> struct gn_affine {
    const T *w, *b;
    const SS *mean, *rstd;
    gn_dims d;
    __device__ void at(int64_t n, int64_t c, B *sc, B *sh) const {
        int64_t g = n * d.G + c / d.cg;
        B r = (B)rstd[g], m = (B)mean[g], wc = w ? ld<B>(w[c]) : (B)1, bc = b ? ld<B>(b[c]) : (B)0;
        *sc = affine_scale(r, wc);
        *sh = affine_shift(m, r, wc, bc);
    }
};

// dy (through SiLU when fused) and dy*x per channel.
template <typename T, typename B, typename SS, bool SILU> struct gn_bwd_map {
    const T *dy, *x;
    gn_affine<T, B, SS> af;
    struct state { B sc, sh; };
    __device__ state start(int64_t n, int64_t c) const {
        state st;
        af.at(n, c, &st.sc, &st.sh);
        return st;
    }
    __device__ void add_v(const state &st, T xv, T gv, double &a1, double &a2) const {
        B p = ld<B>(xv), q = ld<B>(gv);
        if (SILU) q = silu_grad(q, add_rn(mul_rn(p, st.sc), st.sh));
        a1 += (double)q;
        a2 += (double)q * (double)p;
    }
    __device__ void add(const state &st, int64_t i, int64_t, double &a1, double &a2) const {
        add_v(st, x[i], dy[i], a1, a2);
    }
};

// Channel c of sample n summed over the S slices, in slice order.
__device__ __forceinline__ double gn_total(const double *ws, int64_t n, int64_t c, int64_t S, int64_t C) {
    double t = 0;
    for (int64_t s = 0; s < S; s++) t += __ldcg(ws + (n * S + s) * C + c);
    return t;
}

// A thread per (n, c): the slices' totals tot1/tot2[n][c] (sums of dy and
// dy*x) and the affine ss[n][c][2] that dx needs.
template <typename T, typename B, typename SS>
__global__ void gn_bwd_totals(gn_affine<T, B, SS> af, int64_t S, const double *ws1, const double *ws2, double *tot1,
                              double *tot2, B *ss) {
    const gn_dims &d = af.d;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < d.N * d.C; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t n = i / d.C, c = i % d.C;
        tot1[i] = gn_total(ws1, n, c, S, d.C);
        tot2[i] = gn_total(ws2, n, c, S, d.C);
        af.at(n, c, &ss[2 * i], &ss[2 * i + 1]);
    }
}

// A warp per (n, g): dx = scale*dy + k2*x + k3 with k2, k3 per group
// (coef[n][g][2]), as norm_t.h derives them.
template <typename T, typename SS>
__global__ void gn_bwd_coef(const T *w, const SS *mean, const SS *rstd, gn_dims d, const double *tot1,
                            const double *tot2, double *coef) {
    int64_t ng = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (ng >= d.N * d.G) return;
    int64_t n = ng / d.G, c0 = (ng % d.G) * d.cg;
    double s1 = 0, s2 = 0;
    for (int64_t j = lane; j < d.cg; j += 32) {
        int64_t c = c0 + j;
        double wc = w ? ld<double>(w[c]) : 1.0;
        s1 = add_rn(s1, mul_rn(wc, tot1[n * d.C + c]));
        s2 = add_rn(s2, mul_rn(wc, tot2[n * d.C + c]));
    }
    s1 = warp_allsum(s1);
    s2 = warp_allsum(s2);
    if (lane == 0) dx_coef(s1, s2, mean[ng], rstd[ng], (double)d.L * (double)d.cg, &coef[2 * ng], &coef[2 * ng + 1]);
}

// A thread per channel: dw = sum over n of r (sum dy x - m sum dy),
// db = sum over n of sum dy, in the order of n.
template <typename T, typename SS>
__global__ void gn_bwd_params(const SS *mean, const SS *rstd, gn_dims d, const double *tot1, const double *tot2,
                              T *dw, T *db) {
    for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < d.C; c += (int64_t)gridDim.x * blockDim.x) {
        double aw = 0, ab = 0;
        for (int64_t n = 0; n < d.N; n++) {
            int64_t g = n * d.G + c / d.cg;
            gn_param_add(aw, ab, rstd[g], mean[g], tot1[n * d.C + c], tot2[n * d.C + c]);
        }
        if (dw) dw[c] = ml_st<T>::from(aw);
        if (db) db[c] = ml_st<T>::from(ab);
    }
}

template <typename T, typename B, int V, bool SILU, typename Idx>
__global__ void __launch_bounds__(kBlock)
    gn_bwd_dx(const T *__restrict__ dy, const T *__restrict__ x, T *__restrict__ dx, const B *__restrict__ ss,
              const double *__restrict__ coef, Idx nvec, Idx C, Idx LC, Idx cg, Idx G) {
    for (Idx i = blockIdx.x * (Idx)blockDim.x + threadIdx.x; i < nvec; i += (Idx)gridDim.x * blockDim.x) {
        Idx e = i * V, n = e / LC, c = e % C;
        vec_t<T, V> xv = reinterpret_cast<const vec_t<T, V> *>(x)[i];
        vec_t<T, V> gv = reinterpret_cast<const vec_t<T, V> *>(dy)[i], ov;
#pragma unroll
        for (int k = 0; k < V; k++) {
            Idx ch = c + k, at = n * C + ch, g = n * G + ch / cg;
            ov.v[k] = gn_dx<B, SILU>(xv.v[k], gv.v[k], ss[2 * at], ss[2 * at + 1], (B)coef[2 * g], (B)coef[2 * g + 1]);
        }
        reinterpret_cast<vec_t<T, V> *>(dx)[i] = ov;
    }
}

// ---- the fused group norm passes ---------------------------------------------
//
// Grid = the partial pass's grid (channel tiles x slices x samples), all
// blocks resident (cooperative launch).  Block (t, s, n) owns the tile of
// sample n, rows [s*chunk, ...) of that sample, channels [32t, 32t + 32):
// it copies the tile to shared memory ([rows][32], in kStages groups of
// rows so the sums of the first rows start while the last are in flight),
// sums it exactly as col_partial would, and after the barrier rebuilds
// what the multi-kernel path's later kernels computed for its channels.

constexpr int kStages = 4;

// 16-byte copies global -> shared that bypass registers and L1 (sm_80+);
// a block issues all of its tile's copies before waiting for any.
__device__ __forceinline__ void cp_async16(void *dst, const void *src) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait_n() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Waits until at most `pending` (0 .. kStages - 1) committed groups are outstanding.
__device__ __forceinline__ void cp_async_wait(int pending) {
    static_assert(kStages == 4, "one case per stage");
    switch (pending) {
    case 0: cp_async_wait_n<0>(); break;
    case 1: cp_async_wait_n<1>(); break;
    case 2: cp_async_wait_n<2>(); break;
    default: cp_async_wait_n<3>(); break;
    }
}

template <typename T, typename SS> struct gn_fused_args {
    const T *x, *dy, *w, *b;   // dy: backward only; b: forward, and backward with SiLU
    T *out;                    // forward: y; backward: dx or NULL
    T *dw, *db;                // backward only, or NULL
    SS *mean, *rstd;           // [N, G]: written by the forward, read by the backward
    double *ws1, *ws2;         // [N, S, C] partial sums
    gn_dims d;
    int64_t S, chunk;
    double eps;
    bool vec;                  // C % (16 / sizeof(T)) == 0 and every tensor 16-byte aligned
};

// Where a block's tile lies.
struct gn_tile {
    int64_t n, s, c0, row0, nr;   // sample, slice, first channel, first row of [N*L], rows
    int w;                        // channels (<= kCX)
};

__device__ __forceinline__ gn_tile gn_tile_of(const gn_dims &d, int64_t chunk) {
    gn_tile t;
    t.n = blockIdx.z;
    t.s = blockIdx.y;
    t.c0 = (int64_t)blockIdx.x * kCX;
    int64_t l0 = t.s * chunk;
    t.nr = max((int64_t)0, min(d.L, l0 + chunk) - l0);
    t.row0 = t.n * d.L + l0;
    t.w = (int)min((int64_t)kCX, d.C - t.c0);
    return t;
}

// Rows [lo, hi) of stage k of a tile of nr rows.
__device__ __forceinline__ void stage_rows(int64_t nr, int k, int64_t *lo, int64_t *hi) {
    *lo = nr * k / kStages;
    *hi = nr * (k + 1) / kStages;
}

// Starts copying stage k's rows of the tile of src into dst [nr][kCX]
// (cp.async when vec, committed by the caller; else plain loads, complete
// on return).
template <typename T>
__device__ void gn_tile_load(T *dst, const T *__restrict__ src, const gn_tile &t, int64_t C, bool vec, int k) {
    constexpr int V = 16 / sizeof(T), P = kCX / V;
    int tid = threadIdx.y * kCX + threadIdx.x;
    int64_t lo, hi;
    stage_rows(t.nr, k, &lo, &hi);
    if (vec) {
        int wp = t.w / V;
        for (int64_t i = lo * P + tid; i < hi * P; i += kBlock) {
            int64_t r = i / P;
            int j = (int)(i - r * P);
            if (j < wp) cp_async16(dst + r * kCX + j * V, src + (t.row0 + r) * C + t.c0 + j * V);
        }
    } else {
        for (int64_t i = lo * kCX + tid; i < hi * kCX; i += kBlock) {
            int64_t r = i / kCX;
            int j = (int)(i - r * kCX);
            if (j < t.w) dst[r * kCX + j] = src[(t.row0 + r) * C + t.c0 + j];
        }
    }
}

// The first row >= lo of row lane ty (rows ty, ty + kRY, ...).
__device__ __forceinline__ int64_t lane_first(int64_t lo, int ty) { return lo + ((ty - lo % kRY) % kRY + kRY) % kRY; }

// Calls f(r, j, V) for each 16-byte piece of the tile (row r, channels
// j .. j+V-1 of the tile) when vec, else f(r, j, 1) for each value.
template <typename T, typename Fn> __device__ __forceinline__ void gn_tile_for(const gn_tile &t, bool vec, Fn f) {
    constexpr int V = 16 / sizeof(T), P = kCX / V;
    int tid = threadIdx.y * kCX + threadIdx.x;
    if (vec) {
        int wp = t.w / V;
        for (int64_t i = tid; i < t.nr * P; i += kBlock) {
            int64_t r = i / P;
            int j = (int)(i - r * P);
            if (j < wp) f(r, j * V, std::integral_constant<int, V>());
        }
    } else {
        for (int64_t i = tid; i < t.nr * kCX; i += kBlock) {
            int64_t r = i / kCX;
            int j = (int)(i - r * kCX);
            if (j < t.w) f(r, j, std::integral_constant<int, 1>());
        }
    }
}

template <typename T, typename F, typename SS, bool SILU>
__global__ void __launch_bounds__(kCX *kRY, 4) gn_fwd_fused(gn_fused_args<T, SS> a) {
    extern __shared__ __align__(16) unsigned char dsm[];
    __shared__ double p1[kRY][kCX], p2[kRY][kCX];
    __shared__ F ss[kCX][2];
    const gn_dims &d = a.d;
    const gn_tile t = gn_tile_of(d, a.chunk);
    T *tile = reinterpret_cast<T *>(dsm);
    int tx = threadIdx.x, ty = threadIdx.y;
    for (int k = 0; k < kStages; k++) {
        gn_tile_load(tile, a.x, t, d.C, a.vec, k);
        cp_async_commit();
    }

    // Partial sums of the tile, as col_partial adds them.
    {
        gn_fwd_map<T> map{a.x, d};
        double a1 = 0, a2 = 0;
        bool valid = tx < t.w;
        typename gn_fwd_map<T>::state st{0};
        if (valid && t.nr > 0) st = map.start(t.n, t.c0 + tx);
        for (int k = 0; k < kStages; k++) {
            int64_t lo, hi;
            stage_rows(t.nr, k, &lo, &hi);
            cp_async_wait(kStages - 1 - k);
            __syncthreads();
            if (valid)
                for (int64_t r = lane_first(lo, ty); r < hi; r += kRY) map.add_v(st, tile[r * kCX + tx], a1, a2);
        }
        int64_t at = (t.n * a.S + t.s) * d.C + t.c0 + tx;
        col_combine(p1, p2, a1, a2, valid, a.ws1 + at, a.ws2 + at);
    }
    cg::this_grid().sync();

    // Statistics of the groups the tile touches, as gn_stats forms them (a
    // warp per group); the blocks of slice 0 write mean/rstd of the groups
    // that start in their tile.
    int64_t g0 = t.c0 / d.cg, g1 = (t.c0 + t.w - 1) / d.cg;
    for (int64_t g = g0 + ty; g <= g1; g += kRY) {
        int64_t gc0 = g * d.cg;
        double a1, a2, m, r;
        gn_group_sums(a.ws1, a.ws2, d, a.S, t.n, gc0, tx, &a1, &a2);
        shifted_moments(a1, a2, a.x + t.n * d.L * d.C + gc0, (double)d.L * (double)d.cg, a.eps, &m, &r);
        if (tx == 0 && t.s == 0 && gc0 >= t.c0) {
            a.mean[t.n * d.G + g] = (SS)m;
            a.rstd[t.n * d.G + g] = (SS)r;
        }
        for (int64_t c = max(gc0, t.c0) + tx; c < min(gc0 + d.cg, t.c0 + t.w); c += 32) {
            double wc = a.w ? ld<double>(a.w[c]) : 1.0, bc = a.b ? ld<double>(a.b[c]) : 0.0;
            ss[c - t.c0][0] = (F)affine_scale(r, wc);
            ss[c - t.c0][1] = (F)affine_shift(m, r, wc, bc);
        }
    }
    __syncthreads();

    gn_tile_for<T>(t, a.vec, [&](int64_t r, int j, auto vtag) {
        constexpr int V = decltype(vtag)::value;
        vec_t<T, V> xv = *reinterpret_cast<const vec_t<T, V> *>(tile + r * kCX + j), yv;
#pragma unroll
        for (int k = 0; k < V; k++) yv.v[k] = gn_y<F, SILU>(xv.v[k], ss[j + k][0], ss[j + k][1]);
        *reinterpret_cast<vec_t<T, V> *>(a.out + (t.row0 + r) * d.C + t.c0 + j) = yv;
    });
}

template <typename T, typename B, typename SS, bool SILU>
__global__ void __launch_bounds__(kCX *kRY, 4) gn_bwd_fused(gn_fused_args<T, SS> a) {
    extern __shared__ __align__(16) unsigned char dsm[];
    __shared__ double p1[kRY][kCX], p2[kRY][kCX];
    __shared__ B ss[kCX][2], coef[kCX][2];
    const gn_dims &d = a.d;
    const gn_tile t = gn_tile_of(d, a.chunk);
    T *xs = reinterpret_cast<T *>(dsm), *gs = xs + a.chunk * kCX;
    int tx = threadIdx.x, ty = threadIdx.y;
    gn_affine<T, B, SS> af{a.w, SILU ? a.b : nullptr, a.mean, a.rstd, d};
    for (int k = 0; k < kStages; k++) {
        gn_tile_load(xs, a.x, t, d.C, a.vec, k);
        gn_tile_load(gs, a.dy, t, d.C, a.vec, k);
        cp_async_commit();
    }

    // Partial sums of the tile, as col_partial adds them.
    {
        gn_bwd_map<T, B, SS, SILU> map{a.dy, a.x, af};
        double a1 = 0, a2 = 0;
        bool valid = tx < t.w;
        typename gn_bwd_map<T, B, SS, SILU>::state st{};
        if (valid && t.nr > 0) st = map.start(t.n, t.c0 + tx);
        for (int k = 0; k < kStages; k++) {
            int64_t lo, hi;
            stage_rows(t.nr, k, &lo, &hi);
            cp_async_wait(kStages - 1 - k);
            __syncthreads();
            if (valid)
                for (int64_t r = lane_first(lo, ty); r < hi; r += kRY)
                    map.add_v(st, xs[r * kCX + tx], gs[r * kCX + tx], a1, a2);
        }
        int64_t at = (t.n * a.S + t.s) * d.C + t.c0 + tx;
        col_combine(p1, p2, a1, a2, valid, a.ws1 + at, a.ws2 + at);
    }
    cg::this_grid().sync();

    if (a.out) {
        // Each group's k2, k3 as gn_bwd_totals + gn_bwd_coef form them (a
        // warp per group), and the tile's channels' affines.
        int64_t g0 = t.c0 / d.cg, g1 = (t.c0 + t.w - 1) / d.cg;
        for (int64_t g = g0 + ty; g <= g1; g += kRY) {
            int64_t gc0 = g * d.cg, ng = t.n * d.G + g;
            double s1 = 0, s2 = 0;
            for (int64_t j = tx; j < d.cg; j += 32) {
                int64_t c = gc0 + j;
                double wc = a.w ? ld<double>(a.w[c]) : 1.0;
                s1 = add_rn(s1, mul_rn(wc, gn_total(a.ws1, t.n, c, a.S, d.C)));
                s2 = add_rn(s2, mul_rn(wc, gn_total(a.ws2, t.n, c, a.S, d.C)));
            }
            s1 = warp_allsum(s1);
            s2 = warp_allsum(s2);
            if (tx == 0) {
                double k2, k3;
                dx_coef(s1, s2, a.mean[ng], a.rstd[ng], (double)d.L * (double)d.cg, &k2, &k3);
                coef[g - g0][0] = (B)k2;
                coef[g - g0][1] = (B)k3;
            }
        }
        int tid = ty * kCX + tx;
        if (tid < t.w) af.at(t.n, t.c0 + tid, &ss[tid][0], &ss[tid][1]);
        __syncthreads();
        gn_tile_for<T>(t, a.vec, [&](int64_t r, int j, auto vtag) {
            constexpr int V = decltype(vtag)::value;
            vec_t<T, V> xv = *reinterpret_cast<const vec_t<T, V> *>(xs + r * kCX + j);
            vec_t<T, V> gv = *reinterpret_cast<const vec_t<T, V> *>(gs + r * kCX + j), ov;
#pragma unroll
            for (int k = 0; k < V; k++) {
                int gi = (int)((t.c0 + j + k) / d.cg - g0);
                ov.v[k] = gn_dx<B, SILU>(xv.v[k], gv.v[k], ss[j + k][0], ss[j + k][1], coef[gi][0], coef[gi][1]);
            }
            *reinterpret_cast<vec_t<T, V> *>(a.out + (t.row0 + r) * d.C + t.c0 + j) = ov;
        });
    }

    // dw/db of the tile's channels, as gn_bwd_params adds them: row lane ty
    // forms the totals of sample n0 + ty, lane 0 adds them in the order of n.
    if ((a.dw || a.db) && t.s == 0 && t.n == 0) {
        double aw = 0, ab = 0;
        int64_t c = t.c0 + tx;
        for (int64_t n0 = 0; n0 < d.N; n0 += kRY) {
            int64_t n = n0 + ty;
            if (tx < t.w && n < d.N) {
                p1[ty][tx] = gn_total(a.ws1, n, c, a.S, d.C);
                p2[ty][tx] = gn_total(a.ws2, n, c, a.S, d.C);
            }
            __syncthreads();
            if (ty == 0 && tx < t.w)
                for (int k = 0; k < kRY && n0 + k < d.N; k++) {
                    int64_t g = (n0 + k) * d.G + c / d.cg;
                    gn_param_add(aw, ab, a.rstd[g], a.mean[g], p1[k][tx], p2[k][tx]);
                }
            __syncthreads();
        }
        if (ty == 0 && tx < t.w) {
            if (a.dw) a.dw[c] = ml_st<T>::from(aw);
            if (a.db) a.db[c] = ml_st<T>::from(ab);
        }
    }
}

// ---- layer norm ----------------------------------------------------------------

// Calls f(c, k) for the channels of a row that thread `lane` of G takes:
// c = lane + k*G.  K > 0: k < K, unrolled (so values indexed by k stay in
// registers; C <= K*G); K == 0: any C.
template <int G, int K, typename Fn> __device__ __forceinline__ void row_for(int64_t C, int lane, Fn f) {
    if constexpr (K > 0) {
#pragma unroll
        for (int k = 0; k < K; k++) {
            int64_t c = lane + (int64_t)k * G;
            if (c < C) f(c, k);
        }
    } else {
        for (int64_t c = lane; c < C; c += G) f(c, 0);
    }
}

// Threads per row G (32 or kBlock) and values each keeps in registers K
// (0: none, every pass reads memory), for rows of C values: the smallest
// of a few K that holds the row, so registers stay few (SD's 320, 640,
// 768 and 1280 channels take 12, 20, 24 and 6).
template <int N> using ic = std::integral_constant<int, N>;
template <typename Launch> void with_row_shape(int64_t C, bool cache, const Launch &launch) {
    if (C > 1024) {
        if (!cache || C > 8 * kBlock) launch(ic<kBlock>(), ic<0>());
        else if (C <= 6 * kBlock) launch(ic<kBlock>(), ic<6>());
        else launch(ic<kBlock>(), ic<8>());
    } else if (!cache) launch(ic<32>(), ic<0>());
    else if (C <= 4 * 32) launch(ic<32>(), ic<4>());
    else if (C <= 8 * 32) launch(ic<32>(), ic<8>());
    else if (C <= 12 * 32) launch(ic<32>(), ic<12>());
    else if (C <= 16 * 32) launch(ic<32>(), ic<16>());
    else if (C <= 20 * 32) launch(ic<32>(), ic<20>());
    else if (C <= 24 * 32) launch(ic<32>(), ic<24>());
    else launch(ic<32>(), ic<32>());
}

// G threads per row (32 or kBlock): mean, rstd, then the affine in F.  With
// K > 0 each thread keeps its K values in registers; a warp per row also
// widens w and b once per block into shared memory.
template <int G, int K, typename T, typename F, typename SS>
__global__ void __launch_bounds__(kBlock) ln_fwd(const T *__restrict__ x, const T *w, const T *b, T *__restrict__ y,
                                                   SS *mean, SS *rstd, int64_t M, int64_t C, double eps) {
    constexpr bool kWide = G == 32 && K > 0;
    __shared__ double wb[kWide ? 2 * 32 * K : 1];
    if constexpr (kWide) {
        for (int64_t c = threadIdx.x; c < C; c += kBlock) {
            wb[c] = w ? ld<double>(w[c]) : 1.0;
            wb[32 * K + c] = b ? ld<double>(b[c]) : 0.0;
        }
        __syncthreads();
    }
    auto wd = [&](int64_t c) -> double {
        if constexpr (kWide) return wb[c];
        else return w ? ld<double>(w[c]) : 1.0;
    };
    auto bd = [&](int64_t c) -> double {
        if constexpr (kWide) return wb[32 * K + c];
        else return b ? ld<double>(b[c]) : 0.0;
    };
    int64_t row = (int64_t)blockIdx.x * (kBlock / G) + threadIdx.x / G;
    int lane = threadIdx.x % G;
    if (G == 32 && row >= M) return;   // a warp per row: no block-wide sync below
    const T *xr = x + row * C;
    T v[K > 0 ? K : 1];
    if constexpr (K > 0) row_for<G, K>(C, lane, [&](int64_t c, int k) { v[k] = xr[c]; });
    auto xv = [&](int64_t c, int k) -> T {
        if constexpr (K > 0) return v[k];
        else return xr[c];
    };
    double s = 0;
    row_for<G, K>(C, lane, [&](int64_t c, int k) { s += ld<double>(xv(c, k)); });
    s = group_allsum<G>(s);
    double m = C > 0 ? s / (double)C : 0;
    double q = 0;
    row_for<G, K>(C, lane, [&](int64_t c, int k) {
        double e = ld<double>(xv(c, k)) - m;
        q += e * e;
    });
    q = group_allsum<G>(q);
    double r = 1.0 / sqrt((C > 0 ? q / (double)C : 0) + eps);
    if (lane == 0) {
        mean[row] = (SS)m;
        rstd[row] = (SS)r;
    }
    T *yr = y + row * C;
    row_for<G, K>(C, lane, [&](int64_t c, int k) {
        double wc = wd(c), bc = bd(c);
        F sc = (F)affine_scale(r, wc), sh = (F)affine_shift(m, r, wc, bc);
        yr[c] = ml_st<T>::from(add_rn(mul_rn(ld<F>(xv(c, k)), sc), sh));
    });
}

// dx of one row from its G threads: dx = r w dy + k2 x + k3, wd(c) the
// weight of channel c as a double.  gr/xr may point to global or shared
// memory; with K > 0 the row's values are kept in registers.
template <int G, int K, typename B, typename T, typename WD>
__device__ __forceinline__ void ln_dx_row(const T *gr, const T *xr, const WD &wd, double m, double r, T *or_, int64_t C,
                                          int lane) {
    T gv[K > 0 ? K : 1], xv[K > 0 ? K : 1];
    if constexpr (K > 0) row_for<G, K>(C, lane, [&](int64_t c, int k) { gv[k] = gr[c]; xv[k] = xr[c]; });
    auto gval = [&](int64_t c, int k) -> T {
        if constexpr (K > 0) return gv[k];
        else return gr[c];
    };
    auto xval = [&](int64_t c, int k) -> T {
        if constexpr (K > 0) return xv[k];
        else return xr[c];
    };
    double s1 = 0, s2 = 0;
    row_for<G, K>(C, lane, [&](int64_t c, int k) {
        double wc = wd(c), q = ld<double>(gval(c, k));
        s1 = add_rn(s1, mul_rn(wc, q));
        s2 = add_rn(s2, mul_rn(wc, q * ld<double>(xval(c, k))));   // f32 x f32 is exact in double
    });
    s1 = group_allsum<G>(s1);
    s2 = group_allsum<G>(s2);
    double c2, c3;
    dx_coef(s1, s2, m, r, (double)C, &c2, &c3);
    B k2 = (B)c2, k3 = (B)c3;
    row_for<G, K>(C, lane, [&](int64_t c, int k) {
        B sc = (B)affine_scale(r, wd(c));
        B v = add_rn(add_rn(mul_rn(sc, ld<B>(gval(c, k))), mul_rn(k2, ld<B>(xval(c, k)))), k3);
        or_[c] = ml_st<T>::from(v);
    });
}

// G threads per row: dx = r w dy + k2 x + k3 (K, and w widened once per
// block for a warp per row, as in ln_fwd).
template <int G, int K, typename T, typename B, typename SS>
__global__ void __launch_bounds__(kBlock) ln_bwd_dx(const T *__restrict__ dy, const T *__restrict__ x, const T *w,
                                                      const SS *mean, const SS *rstd, T *__restrict__ dx, int64_t M,
                                                      int64_t C) {
    constexpr bool kWide = G == 32 && K > 0;
    __shared__ double wsm[kWide ? 32 * K : 1];
    if constexpr (kWide) {
        for (int64_t c = threadIdx.x; c < C; c += kBlock) wsm[c] = w ? ld<double>(w[c]) : 1.0;
        __syncthreads();
    }
    auto wd = [&](int64_t c) -> double {
        if constexpr (kWide) return wsm[c];
        else return w ? ld<double>(w[c]) : 1.0;
    };
    int64_t row = (int64_t)blockIdx.x * (kBlock / G) + threadIdx.x / G;
    int lane = threadIdx.x % G;
    if (G == 32 && row >= M) return;
    ln_dx_row<G, K, B>(dy + row * C, x + row * C, wd, mean[row], rstd[row], dx + row * C, C, lane);
}

// dw: r (dy x - m dy) and db: dy, summed down the rows (L = M, one sample).
template <typename T, typename SS> struct ln_param_map {
    const T *dy, *x;
    const SS *mean, *rstd;
    struct state {};
    __device__ state start(int64_t, int64_t) const { return {}; }
    __device__ void add(const state &, int64_t i, int64_t row, double &a1, double &a2) const {
        ln_param_add(a1, a2, ld<double>(dy[i]), ld<double>(x[i]), rstd[row], mean[row]);
    }
};

template <typename T>
__global__ void ln_param_finish(const double *ws1, const double *ws2, int64_t S, int64_t C, T *dw, T *db) {
    for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < C; c += (int64_t)gridDim.x * blockDim.x) {
        double a1 = 0, a2 = 0;
        for (int64_t s = 0; s < S; s++) {
            a1 += ws1[s * C + c];
            a2 += ws2[s * C + c];
        }
        if (dw) dw[c] = ml_st<T>::from(a1);
        if (db) db[c] = ml_st<T>::from(a2);
    }
}

// ---- the fused layer norm backward -----------------------------------------------
//
// Block b owns rows [b*R, b*R + R): it copies their x and dy (contiguous)
// into shared memory in kStages groups of rows and, stage by stage as the
// copies land, writes dx row by row (ln_dx_row, G threads per row as
// ln_bwd_dx: the same bits) and adds its rows' dw/db terms per channel,
// in row order (nl row lanes per channel when C < kBlock, added in lane
// order), into ws[b][C].  After the barrier, each 32-channel tile adds the
// blocks' partials with 8 block lanes (lane j: blocks j, j + 8, ...) and
// then the lanes in order.  A thread keeps at most kLnItems (channel, lane)
// sums, so rows up to kLnItems * kBlock values.

constexpr int kLnItems = 8;

template <typename T, typename SS> struct ln_fused_args {
    const T *dy, *x, *w;
    const SS *mean, *rstd;   // [M]
    T *dx, *dw, *db;         // dx may be NULL; dw or db may be NULL
    double *ws1, *ws2;       // [gridDim.x, C] partial sums
    int64_t M, C, R;
    bool vec;                // C % (16 / sizeof(T)) == 0 and x, dy 16-byte aligned
};

__host__ __device__ __forceinline__ size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }

// Shared memory of a block of R rows of C values of es bytes.
size_t ln_fused_smem(int64_t R, int64_t C, size_t es) {
    return 2 * align16((size_t)(R * C) * es) + (size_t)C * sizeof(double) + 2 * (size_t)R * sizeof(double);
}

template <int G, typename T, typename B, typename SS>
__global__ void __launch_bounds__(kBlock, 2) ln_bwd_fused(ln_fused_args<T, SS> a) {
    extern __shared__ __align__(16) unsigned char dsm[];
    __shared__ double q1[kBlock], q2[kBlock];
    const int64_t C = a.C, r0 = (int64_t)blockIdx.x * a.R, nr = min(a.M - r0, a.R);
    const size_t span = align16((size_t)(a.R * C) * sizeof(T));
    T *xs = reinterpret_cast<T *>(dsm), *gs = reinterpret_cast<T *>(dsm + span);
    double *wsm = reinterpret_cast<double *>(dsm + 2 * span), *ms = wsm + C, *rs = ms + a.R;
    const int tid = threadIdx.x;
    const T *xsrc = a.x + r0 * C, *gsrc = a.dy + r0 * C;
    for (int k = 0; k < kStages; k++) {
        int64_t lo, hi;
        stage_rows(nr, k, &lo, &hi);
        if (a.vec) {
            constexpr int V = 16 / sizeof(T);
            for (int64_t i = lo * C / V + tid; i < hi * C / V; i += kBlock) {
                cp_async16(xs + i * V, xsrc + i * V);
                cp_async16(gs + i * V, gsrc + i * V);
            }
        } else {
            for (int64_t i = lo * C + tid; i < hi * C; i += kBlock) {
                xs[i] = xsrc[i];
                gs[i] = gsrc[i];
            }
        }
        cp_async_commit();
    }
    for (int64_t c = tid; c < C; c += kBlock) wsm[c] = a.w ? ld<double>(a.w[c]) : 1.0;
    for (int64_t r = tid; r < nr; r += kBlock) {
        ms[r] = a.mean[r0 + r];
        rs[r] = a.rstd[r0 + r];
    }
    auto wd = [&](int64_t c) -> double { return wsm[c]; };
    const int nl = C < kBlock ? (int)(kBlock / C) : 1;
    const int64_t items = nl * C;   // (channel, row lane) pairs; item i: channel i % C, lane i / C
    double a1[kLnItems], a2[kLnItems];
#pragma unroll
    for (int i = 0; i < kLnItems; i++) a1[i] = a2[i] = 0;
    for (int k = 0; k < kStages; k++) {
        int64_t lo, hi;
        stage_rows(nr, k, &lo, &hi);
        cp_async_wait(kStages - 1 - k);
        __syncthreads();
        if (a.dx) {
            if constexpr (G == 32) {
                for (int64_t r = lo + tid / 32; r < hi; r += kBlock / 32)
                    ln_dx_row<32, 0, B>(gs + r * C, xs + r * C, wd, ms[r], rs[r], a.dx + (r0 + r) * C, C, tid % 32);
            } else {
                for (int64_t r = lo; r < hi; r++)
                    ln_dx_row<kBlock, 0, B>(gs + r * C, xs + r * C, wd, ms[r], rs[r], a.dx + (r0 + r) * C, C, tid);
            }
        }
#pragma unroll
        for (int i = 0; i < kLnItems; i++) {
            int64_t it = tid + (int64_t)i * kBlock;
            if (it < items) {
                int64_t c = it % C, j = it / C;
                for (int64_t r = lo + ((j - lo % nl) % nl + nl) % nl; r < hi; r += nl)
                    ln_param_add(a1[i], a2[i], ld<double>(gs[r * C + c]), ld<double>(xs[r * C + c]), rs[r], ms[r]);
            }
        }
    }
    if (nl == 1) {
#pragma unroll
        for (int i = 0; i < kLnItems; i++) {
            int64_t c = tid + (int64_t)i * kBlock;
            if (c < C) {
                a.ws1[blockIdx.x * C + c] = a1[i];
                a.ws2[blockIdx.x * C + c] = a2[i];
            }
        }
    } else {
        q1[tid] = a1[0];   // items <= kBlock: item tid
        q2[tid] = a2[0];
        __syncthreads();
        if (tid < C) {
            double t1 = q1[tid], t2 = q2[tid];
            for (int j = 1; j < nl; j++) {
                t1 += q1[j * C + tid];
                t2 += q2[j * C + tid];
            }
            a.ws1[blockIdx.x * C + tid] = t1;
            a.ws2[blockIdx.x * C + tid] = t2;
        }
    }
    cg::this_grid().sync();

    const int tx = tid % kCX, ty = tid / kCX;
    const int64_t ctiles = (C + kCX - 1) / kCX, nb = gridDim.x;
    for (int64_t t = blockIdx.x; t < ctiles; t += gridDim.x) {
        int64_t c = t * kCX + tx;
        double t1 = 0, t2 = 0;
        if (c < C)
            for (int64_t b = ty; b < nb; b += kRY) {
                t1 += __ldcg(a.ws1 + b * C + c);
                t2 += __ldcg(a.ws2 + b * C + c);
            }
        q1[ty * kCX + tx] = t1;
        q2[ty * kCX + tx] = t2;
        __syncthreads();
        if (ty == 0 && c < C) {
            for (int k = 1; k < kRY; k++) {
                t1 += q1[k * kCX + tx];
                t2 += q2[k * kCX + tx];
            }
            if (a.dw) a.dw[c] = ml_st<T>::from(t1);
            if (a.db) a.db[c] = ml_st<T>::from(t2);
        }
        __syncthreads();
    }
}

// ---- host side -------------------------------------------------------------------

template <typename T> bool aligned_to(const T *p, int v) { return (uintptr_t)p % (sizeof(T) * v) == 0; }

// Launches an elementwise kernel over n elements of rows of C: vectors of
// V = 16 bytes when C and the pointers allow, 32-bit indices when n fits.
// launch(vec_tag, idx_tag, nvec, grid) runs the kernel.
template <typename T, typename Launch>
void run_rows(int64_t n, int64_t C, bool ptrs_aligned, int dev, const Launch &launch) {
    constexpr int V = 16 / sizeof(T) > 0 ? (int)(16 / sizeof(T)) : 1;
    bool vec = V > 1 && C % V == 0 && ptrs_aligned;
    int64_t nvec = vec ? n / V : n;
    unsigned grid = ml_grid_for(nvec, kBlock, dev);
    if (vec) {
        if (ml_fits_u32(n)) launch(std::integral_constant<int, V>(), uint32_t(), nvec, grid);
        else launch(std::integral_constant<int, V>(), int64_t(), nvec, grid);
    } else {
        if (ml_fits_u32(n)) launch(std::integral_constant<int, 1>(), uint32_t(), nvec, grid);
        else launch(std::integral_constant<int, 1>(), int64_t(), nvec, grid);
    }
}

unsigned warp_grid(int64_t warps) { return (unsigned)((warps * 32 + kBlock - 1) / kBlock); }

// Rows of C values of T whose every row starts 16-byte aligned in each of
// ps (NULL pointers aside): the fused kernels' 16-byte copies.
template <typename T> bool rows_vec_ok(int64_t C, std::initializer_list<const void *> ps) {
    if (C % (int64_t)(16 / sizeof(T))) return false;
    for (const void *p : ps)
        if (p && (uintptr_t)p % 16) return false;
    return true;
}

// Which one-kernel (cooperative) paths run, from MOONLIT_NORM_FUSED, read
// once.  Unset: GroupNorm's, forward and backward (on an H100 they beat
// the multi-kernel paths at every SD 1.4 shape, 1.2-1.8x in bf16;
// docs/PERFORMANCE.md).  "1": LayerNorm's as well (its backward wins
// at 16k rows but loses below 4k, its forward is no faster).  "0": none.
enum norm_family { kGroupNorm, kLayerNorm };
bool fused_on(norm_family f) {
    static const int mode = [] {
        const char *e = getenv("MOONLIT_NORM_FUSED");
        if (!e || !*e) return 1;
        if (strcmp(e, "0") == 0) return 0;
        if (strcmp(e, "1") == 0) return 2;
        fprintf(stderr, "moonlit: MOONLIT_NORM_FUSED=%s is neither 0 nor 1; using the default (GroupNorm fused)\n", e);
        return 1;
    }();
    return f == kGroupNorm ? mode >= 1 : mode == 2;
}

constexpr int kDevCache = 64;   // devices whose attributes are cached (more are asked each time)

// A per-device integer attribute, cached.
int dev_attr(cudaDeviceAttr what, int dev, std::atomic<int> *cache) {
    if (dev >= 0 && dev < kDevCache) {
        int v = cache[dev].load(std::memory_order_relaxed);
        if (v > 0) return v - 1;
    }
    int v = 0;
    if (cudaDeviceGetAttribute(&v, what, dev) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    if (dev >= 0 && dev < kDevCache) cache[dev].store(v + 1, std::memory_order_relaxed);
    return v;
}
std::atomic<int> g_coop[kDevCache], g_optin[kDevCache];

// Blocks of K (kBlock threads, smem bytes of dynamic shared memory each)
// that one SM of dev holds at once, 0 when K cannot have that much shared
// memory.  The first query of a (device, size) pair sets K's attributes
// (dynamic shared memory up to the device's limit, the carveout that gives
// shared memory the most) and asks the occupancy calculator; later ones
// are a lookup.
template <auto K> int coop_per_sm(int dev, size_t smem) {
    struct entry { int dev; size_t smem; int per_sm; };
    static std::mutex mu;
    static std::vector<entry> seen;
    std::lock_guard<std::mutex> lock(mu);
    for (const entry &e : seen)
        if (e.dev == dev && e.smem == smem) return e.per_sm;
    int per_sm = 0;
    cudaFuncAttributes fa;
    size_t optin = (size_t)dev_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev, g_optin);
    if (cudaFuncGetAttributes(&fa, K) != cudaSuccess || smem + fa.sharedSizeBytes > optin ||
        cudaFuncSetAttribute(K, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(optin - fa.sharedSizeBytes)) !=
            cudaSuccess ||
        cudaFuncSetAttribute(K, cudaFuncAttributePreferredSharedMemoryCarveout, (int)cudaSharedmemCarveoutMaxShared) !=
            cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, K, kBlock, smem) != cudaSuccess) {
        cudaGetLastError();
        per_sm = 0;
    }
    if (seen.size() < 256) seen.push_back({dev, smem, per_sm});
    return per_sm;
}

// Whether a cooperative launch of `blocks` blocks of K can run on dev:
// fused paths on, the device able, every block resident at once.
template <auto K> bool coop_fits(int64_t blocks, size_t smem, int dev, norm_family f) {
    if (!fused_on(f) || blocks < 1 || dev_attr(cudaDevAttrCooperativeLaunch, dev, g_coop) != 1) return false;
    return (int64_t)coop_per_sm<K>(dev, smem) * ml_cuda_sm_count(dev) >= blocks;
}

// Launches K cooperatively with argument p.  1: launched; 0: it cannot
// run so here (nothing launched, no error left behind: take the
// multi-kernel path); -1: a launch error, reported.
template <auto K, typename P>
int coop_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t s, int dev, const P &p, const char *name,
                norm_family f) {
    if (!coop_fits<K>((int64_t)grid.x * grid.y * grid.z, smem, dev, f)) return 0;
    void *args[] = {const_cast<P *>(&p)};
    cudaError_t e = cudaLaunchCooperativeKernel((const void *)K, grid, block, args, smem, s);
    if (e == cudaSuccess) return 1;
    if (e == cudaErrorCooperativeLaunchTooLarge || e == cudaErrorNotSupported || e == cudaErrorInvalidConfiguration) {
        cudaGetLastError();
        return 0;
    }
    return ml_cuda_launch_fail(e, name, __FILE__, __LINE__);
}

}  // namespace

// ---- entry points -------------------------------------------------------------------

extern "C" int ml_group_norm_forward_cuda(ml_ktensor *out, ml_ktensor *mean, ml_ktensor *rstd, const ml_ktensor *x,
                                          const ml_ktensor *w, const ml_ktensor *b, int groups, double eps,
                                          bool fuse_silu) {
    const char *op = "group_norm";
    cudaStream_t s;
    if (ml_cuda_prepare(x, op, &s) < 0) return -1;
    gn_dims d = {x->shape[0], x->shape[1], x->shape[2], groups, 0};
    d.cg = d.C / d.G;
    if (d.N == 0) return 0;
    int dev = x->device.index;
    return ml_dispatch_float(x->dtype, "group_norm (cuda)", [&](auto tag) -> int {
        typedef decltype(tag) T;
        typedef typename ntypes<T>::fwd F;
        typedef typename ntypes<T>::stat SS;
        int64_t ctiles = (d.C + kCX - 1) / kCX, chunk;
        int64_t S = pick_slices(d.L, ctiles * d.N, dev, &chunk);
        size_t nws = (size_t)(d.N * S * d.C), nss = (size_t)(2 * d.N * d.C);
        const T *xp = ml_ptr<T>(x);
        T *yp = ml_ptr<T>(out);
        if (d.L > 0 && ctiles > 0 && d.N <= 65535) {
            ml_cuda_workspace ws(dev, {nws * sizeof(double), nws * sizeof(double)});
            if (!ws.ok()) return -1;
            gn_fused_args<T, SS> p{xp, nullptr, opt_ptr<T>(w), opt_ptr<T>(b), yp, nullptr, nullptr,
                                   ml_ptr<SS>(mean), ml_ptr<SS>(rstd), ws.part<double>(0), ws.part<double>(1),
                                   d, S, chunk, eps, rows_vec_ok<T>(d.C, {xp, yp})};
            dim3 grid((unsigned)ctiles, (unsigned)S, (unsigned)d.N), block(kCX, kRY);
            size_t smem = (size_t)(chunk * kCX) * sizeof(T);
            int rc = fuse_silu ? coop_launch<gn_fwd_fused<T, F, SS, true>>(grid, block, smem, s, dev, p,
                                                                              "gn_fwd_fused", kGroupNorm)
                               : coop_launch<gn_fwd_fused<T, F, SS, false>>(grid, block, smem, s, dev, p,
                                                                               "gn_fwd_fused", kGroupNorm);
            if (rc != 0) return rc < 0 ? -1 : 0;
        }
        ml_cuda_workspace ws(dev, {nws * sizeof(double), nws * sizeof(double), nss * sizeof(F)});
        if (!ws.ok()) return -1;
        double *ws1 = ws.part<double>(0), *ws2 = ws.part<double>(1);
        F *ss = ws.part<F>(2);
        if (ctiles > 0) {
            col_partial<<<partial_grid(d.C, S, d.N), dim3(kCX, kRY), 0, s>>>(gn_fwd_map<T>{xp, d}, d.N, d.L, d.C,
                                                                              chunk, ws1, ws2);
            ML_CUDA_LAUNCHED("col_partial");
        }
        gn_stats<<<warp_grid(d.N * d.G), kBlock, 0, s>>>(xp, opt_ptr<T>(w), opt_ptr<T>(b), d, S, eps, ws1, ws2,
                                                           ml_ptr<SS>(mean), ml_ptr<SS>(rstd), ss);
        ML_CUDA_LAUNCHED("gn_stats");
        int64_t n = ml_kt_numel(x);
        if (n == 0) return 0;
        bool al = aligned_to(xp, 16 / sizeof(T)) && aligned_to(yp, 16 / sizeof(T));
        run_rows<T>(n, d.C, al, dev, [&](auto vtag, auto itag, int64_t nvec, unsigned grid) {
            constexpr int V = decltype(vtag)::value;
            typedef decltype(itag) Idx;
            if (fuse_silu)
                gn_apply<T, F, V, true, Idx><<<grid, kBlock, 0, s>>>(xp, yp, ss, (Idx)nvec, (Idx)d.C, (Idx)(d.L * d.C));
            else
                gn_apply<T, F, V, false, Idx><<<grid, kBlock, 0, s>>>(xp, yp, ss, (Idx)nvec, (Idx)d.C, (Idx)(d.L * d.C));
        });
        ML_CUDA_LAUNCHED("gn_apply");
        return 0;
    });
}

extern "C" int ml_group_norm_backward_cuda(ml_ktensor *dx, ml_ktensor *dw, ml_ktensor *db, const ml_ktensor *dout,
                                           const ml_ktensor *x, const ml_ktensor *w, const ml_ktensor *b,
                                           const ml_ktensor *mean, const ml_ktensor *rstd, int groups, bool fuse_silu) {
    const char *op = "group_norm backward";
    if (!dx && !dw && !db) return 0;
    cudaStream_t s;
    if (ml_cuda_prepare(x, op, &s) < 0) return -1;
    gn_dims d = {x->shape[0], x->shape[1], x->shape[2], groups, 0};
    d.cg = d.C / d.G;
    int64_t n = ml_kt_numel(x);
    if (d.C == 0) return 0;
    int dev = x->device.index;
    return ml_dispatch_float(x->dtype, "group_norm backward (cuda)", [&](auto tag) -> int {
        typedef decltype(tag) T;
        typedef typename ntypes<T>::bwd B;
        typedef typename ntypes<T>::stat SS;
        int64_t ctiles = (d.C + kCX - 1) / kCX, chunk;
        int64_t S = pick_slices(d.L, ctiles * d.N, dev, &chunk);
        size_t nws = (size_t)(d.N * S * d.C), nc = (size_t)(d.N * d.C);
        size_t D8 = sizeof(double), ncoef = (size_t)(2 * d.N * d.G);
        const T *xp = ml_ptr<T>(x), *gp = ml_ptr<T>(dout);
        const SS *mp = ml_ptr<SS>(mean), *rp = ml_ptr<SS>(rstd);
        T *dxp = dx && n > 0 ? ml_ptr<T>(dx) : nullptr;
        if (d.N > 0 && d.L > 0 && d.N <= 65535) {
            ml_cuda_workspace ws(dev, {nws * D8, nws * D8});
            if (!ws.ok()) return -1;
            gn_fused_args<T, SS> p{xp, gp, opt_ptr<T>(w), fuse_silu ? opt_ptr<T>(b) : nullptr, dxp,
                                   dw ? ml_ptr<T>(dw) : nullptr, db ? ml_ptr<T>(db) : nullptr,
                                   const_cast<SS *>(mp), const_cast<SS *>(rp), ws.part<double>(0), ws.part<double>(1),
                                   d, S, chunk, 0.0, rows_vec_ok<T>(d.C, {xp, gp, dxp})};
            dim3 grid((unsigned)ctiles, (unsigned)S, (unsigned)d.N), block(kCX, kRY);
            size_t smem = 2 * (size_t)(chunk * kCX) * sizeof(T);
            int rc = fuse_silu ? coop_launch<gn_bwd_fused<T, B, SS, true>>(grid, block, smem, s, dev, p,
                                                                              "gn_bwd_fused", kGroupNorm)
                               : coop_launch<gn_bwd_fused<T, B, SS, false>>(grid, block, smem, s, dev, p,
                                                                               "gn_bwd_fused", kGroupNorm);
            if (rc != 0) return rc < 0 ? -1 : 0;
        }
        ml_cuda_workspace ws(dev, {nws * D8, nws * D8, nc * D8, nc * D8, ncoef * D8, 2 * nc * sizeof(B)});
        if (!ws.ok()) return -1;
        double *ws1 = ws.part<double>(0), *ws2 = ws.part<double>(1);
        double *tot1 = ws.part<double>(2), *tot2 = ws.part<double>(3);
        double *coef = ws.part<double>(4);
        B *ss = ws.part<B>(5);
        gn_affine<T, B, SS> af{opt_ptr<T>(w), fuse_silu ? opt_ptr<T>(b) : nullptr, mp, rp, d};
        if (d.N > 0) {
            dim3 grid = partial_grid(d.C, S, d.N), block(kCX, kRY);
            if (fuse_silu)
                col_partial<<<grid, block, 0, s>>>(gn_bwd_map<T, B, SS, true>{gp, xp, af}, d.N, d.L, d.C, chunk, ws1, ws2);
            else
                col_partial<<<grid, block, 0, s>>>(gn_bwd_map<T, B, SS, false>{gp, xp, af}, d.N, d.L, d.C, chunk, ws1, ws2);
            ML_CUDA_LAUNCHED("col_partial");
            gn_bwd_totals<<<ml_grid_for((int64_t)nc, kBlock, dev), kBlock, 0, s>>>(af, S, ws1, ws2, tot1, tot2, ss);
            ML_CUDA_LAUNCHED("gn_bwd_totals");
        }
        if (dw || db) {
            gn_bwd_params<<<ml_grid_for(d.C, kBlock, dev), kBlock, 0, s>>>(mp, rp, d, tot1, tot2, dw ? ml_ptr<T>(dw) : nullptr,
                                                                               db ? ml_ptr<T>(db) : nullptr);
            ML_CUDA_LAUNCHED("gn_bwd_params");
        }
        if (!dxp) return 0;
        gn_bwd_coef<<<warp_grid(d.N * d.G), kBlock, 0, s>>>(opt_ptr<T>(w), mp, rp, d, tot1, tot2, coef);
        ML_CUDA_LAUNCHED("gn_bwd_coef");
        constexpr int VV = (int)(16 / sizeof(T));
        bool al = aligned_to(xp, VV) && aligned_to(gp, VV) && aligned_to((const T *)dxp, VV);
        run_rows<T>(n, d.C, al, dev, [&](auto vtag, auto itag, int64_t nvec, unsigned grid) {
            constexpr int V = decltype(vtag)::value;
            typedef decltype(itag) Idx;
            Idx C = (Idx)d.C, LC = (Idx)(d.L * d.C), cg = (Idx)d.cg, G = (Idx)d.G;
            if (fuse_silu)
                gn_bwd_dx<T, B, V, true, Idx><<<grid, kBlock, 0, s>>>(gp, xp, dxp, ss, coef, (Idx)nvec, C, LC, cg, G);
            else
                gn_bwd_dx<T, B, V, false, Idx><<<grid, kBlock, 0, s>>>(gp, xp, dxp, ss, coef, (Idx)nvec, C, LC, cg, G);
        });
        ML_CUDA_LAUNCHED("gn_bwd_dx");
        return 0;
    });
}

extern "C" int ml_layer_norm_forward_cuda(ml_ktensor *out, ml_ktensor *mean, ml_ktensor *rstd, const ml_ktensor *x,
                                          const ml_ktensor *w, const ml_ktensor *b, double eps) {
    const char *op = "layer_norm";
    cudaStream_t s;
    if (ml_cuda_prepare(x, op, &s) < 0) return -1;
    int64_t M = x->shape[0], C = x->shape[1];
    if (M == 0) return 0;
    return ml_dispatch_float(x->dtype, "layer_norm (cuda)", [&](auto tag) -> int {
        typedef decltype(tag) T;
        typedef typename ntypes<T>::fwd F;
        typedef typename ntypes<T>::stat SS;
        const T *xp = ml_ptr<T>(x), *wp = opt_ptr<T>(w), *bp = opt_ptr<T>(b);
        with_row_shape(C, fused_on(kLayerNorm), [&](auto gtag, auto ktag) {
            constexpr int G = decltype(gtag)::value, K = decltype(ktag)::value;
            unsigned grid = G == 32 ? warp_grid(M) : (unsigned)M;
            ln_fwd<G, K, T, F, SS><<<grid, kBlock, 0, s>>>(xp, wp, bp, ml_ptr<T>(out), ml_ptr<SS>(mean),
                                                            ml_ptr<SS>(rstd), M, C, eps);
        });
        ML_CUDA_LAUNCHED("ln_fwd");
        return 0;
    });
}

extern "C" int ml_layer_norm_backward_cuda(ml_ktensor *dx, ml_ktensor *dw, ml_ktensor *db, const ml_ktensor *dout,
                                           const ml_ktensor *x, const ml_ktensor *w,
                                           const ml_ktensor *mean, const ml_ktensor *rstd) {
    const char *op = "layer_norm backward";
    if (!dx && !dw && !db) return 0;
    cudaStream_t s;
    if (ml_cuda_prepare(x, op, &s) < 0) return -1;
    int64_t M = x->shape[0], C = x->shape[1];
    int dev = x->device.index;
    return ml_dispatch_float(x->dtype, "layer_norm backward (cuda)", [&](auto tag) -> int {
        typedef decltype(tag) T;
        typedef typename ntypes<T>::bwd B;
        typedef typename ntypes<T>::stat SS;
        const T *xp = ml_ptr<T>(x), *gp = ml_ptr<T>(dout), *wp = opt_ptr<T>(w);
        const SS *mp = ml_ptr<SS>(mean), *rp = ml_ptr<SS>(rstd);
        T *dxp = dx && M > 0 ? ml_ptr<T>(dx) : nullptr;
        if ((dw || db) && M > 0 && C > 0 && C <= kLnItems * kBlock) {
            // Blocks of R >= 8 rows, about two per SM (one when two do not fit).
            int sms = ml_cuda_sm_count(dev);
            for (int per_sm = 2; per_sm >= 1; per_sm--) {
                int64_t want = (int64_t)sms * per_sm, R = (M + want - 1) / want;
                if (R < 8) R = 8;
                int64_t nb = (M + R - 1) / R;
                size_t smem = ln_fused_smem(R, C, sizeof(T));
                bool fits = C > 1024 ? coop_fits<ln_bwd_fused<kBlock, T, B, SS>>(nb, smem, dev, kLayerNorm)
                                     : coop_fits<ln_bwd_fused<32, T, B, SS>>(nb, smem, dev, kLayerNorm);
                if (!fits) continue;
                ml_cuda_workspace ws(dev, {(size_t)(nb * C) * sizeof(double), (size_t)(nb * C) * sizeof(double)});
                if (!ws.ok()) return -1;
                ln_fused_args<T, SS> p{gp, xp, wp, mp, rp, dxp, dw ? ml_ptr<T>(dw) : nullptr, db ? ml_ptr<T>(db) : nullptr,
                                       ws.part<double>(0), ws.part<double>(1), M, C, R, rows_vec_ok<T>(C, {xp, gp})};
                int rc = C > 1024 ? coop_launch<ln_bwd_fused<kBlock, T, B, SS>>(dim3((unsigned)nb), dim3(kBlock), smem, s,
                                                                                  dev, p, "ln_bwd_fused", kLayerNorm)
                                  : coop_launch<ln_bwd_fused<32, T, B, SS>>(dim3((unsigned)nb), dim3(kBlock), smem, s,
                                                                             dev, p, "ln_bwd_fused", kLayerNorm);
                if (rc != 0) return rc < 0 ? -1 : 0;
                break;
            }
        }
        if (dxp) {
            with_row_shape(C, fused_on(kLayerNorm), [&](auto gtag, auto ktag) {
                constexpr int G = decltype(gtag)::value, K = decltype(ktag)::value;
                unsigned grid = G == 32 ? warp_grid(M) : (unsigned)M;
                ln_bwd_dx<G, K, T, B, SS><<<grid, kBlock, 0, s>>>(gp, xp, wp, mp, rp, dxp, M, C);
            });
            ML_CUDA_LAUNCHED("ln_bwd_dx");
        }
        if ((!dw && !db) || C == 0) return 0;
        int64_t ctiles = (C + kCX - 1) / kCX, chunk;
        int64_t S = pick_slices(M, ctiles, dev, &chunk);
        size_t nws = (size_t)(S * C);
        ml_cuda_workspace ws(dev, {nws * sizeof(double), nws * sizeof(double)});
        if (!ws.ok()) return -1;
        double *ws1 = ws.part<double>(0), *ws2 = ws.part<double>(1);
        col_partial<<<partial_grid(C, S, 1), dim3(kCX, kRY), 0, s>>>(ln_param_map<T, SS>{gp, xp, mp, rp}, 1, M, C,
                                                                      chunk, ws1, ws2);
        ML_CUDA_LAUNCHED("col_partial");
        ln_param_finish<<<ml_grid_for(C, kBlock, dev), kBlock, 0, s>>>(ws1, ws2, S, C, dw ? ml_ptr<T>(dw) : nullptr,
                                                                           db ? ml_ptr<T>(db) : nullptr);
        ML_CUDA_LAUNCHED("ln_param_finish");
        return 0;
    });
}
