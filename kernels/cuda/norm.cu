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
// two passes in double as on the CPU; dw/db are column sums over the rows
// with the partial pass and a finishing kernel.
//
// Every split and every reduction order depends only on the shapes and
// the GPU model: no atomics, the same bits on every run.  Products that the
// CPU rounds separately are spelled with _rn intrinsics so nvcc does not
// fuse them into FMAs.
#include "nn_util.cuh"
#include "norm.h"
#include <cmath>
#include <type_traits>

namespace {

constexpr int kCX = 32, kRY = 8;   // partial pass: channels x row lanes per block

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

// ---- the partial pass: per-channel sums over slices of rows ----------------

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
        p1[ty][tx] = a1;
        p2[ty][tx] = a2;
        __syncthreads();
        if (ty == 0 && c < C) {
#pragma unroll
            for (int k = 1; k < kRY; k++) { a1 += p1[k][tx]; a2 += p2[k][tx]; }
            ws1[(n * S + s) * C + c] = a1;
            ws2[(n * S + s) * C + c] = a2;
        }
        __syncthreads();
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
    __device__ void add(const state &st, int64_t i, int64_t, double &a1, double &a2) const {
        double v = ld<double>(x[i]) - st.k;
        a1 += v;
        a2 += v * v;
    }
};

// A warp per (n, g): mean, rstd and the scale/shift pairs ss[n][c][2].
template <typename T, typename F, typename SS>
__global__ void gn_stats(const T *x, const T *w, const T *b, gn_dims d, int64_t S, double eps, const double *ws1,
                         const double *ws2, SS *mean, SS *rstd, F *ss) {
    int64_t ng = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (ng >= d.N * d.G) return;   // whole warps leave together
    int64_t n = ng / d.G, g = ng % d.G, c0 = g * d.cg;
    double a1 = 0, a2 = 0;
    for (int64_t k = lane; k < S * d.cg; k += 32) {
        int64_t s = k / d.cg, at = (n * S + s) * d.C + c0 + (k - s * d.cg);
        a1 += ws1[at];
        a2 += ws2[at];
    }
    a1 = warp_allsum(a1);
    a2 = warp_allsum(a2);
    double cnt = (double)d.L * (double)d.cg, m = 0, var = 0;
    if (cnt > 0) {
        double dm = a1 / cnt;
        m = ld<double>(x[n * d.L * d.C + c0]) + dm;
        var = fmax(a2 / cnt - dm * dm, 0.0);
    }
    double r = 1.0 / sqrt(var + eps);
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
        for (int k = 0; k < V; k++) {
            F v = add_rn(mul_rn(ld<F>(xv.v[k]), p[2 * k]), p[2 * k + 1]);
            if (SILU) v = silu(v);
            yv.v[k] = ml_st<T>::from(v);
        }
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
    __device__ void add(const state &st, int64_t i, int64_t, double &a1, double &a2) const {
        B p = ld<B>(x[i]), q = ld<B>(dy[i]);
        if (SILU) q = silu_grad(q, add_rn(mul_rn(p, st.sc), st.sh));
        a1 += (double)q;
        a2 += (double)q * (double)p;
    }
};

// A thread per (n, c): the slices' totals tot1/tot2[n][c] (sums of dy and
// dy*x) and the affine ss[n][c][2] that dx needs.
template <typename T, typename B, typename SS>
__global__ void gn_bwd_totals(gn_affine<T, B, SS> af, int64_t S, const double *ws1, const double *ws2, double *tot1,
                              double *tot2, B *ss) {
    const gn_dims &d = af.d;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < d.N * d.C; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t n = i / d.C, c = i % d.C;
        double t1 = 0, t2 = 0;
        for (int64_t s = 0; s < S; s++) {
            t1 += ws1[(n * S + s) * d.C + c];
            t2 += ws2[(n * S + s) * d.C + c];
        }
        tot1[i] = t1;
        tot2[i] = t2;
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
    if (lane == 0) {
        double m = mean[ng], r = rstd[ng], cnt = (double)d.L * (double)d.cg;
        double sxh = mul_rn(r, sub_rn(s2, mul_rn(m, s1)));   // sum(w dy xhat)
        double c2 = cnt > 0 ? mul_rn(-r, r) * sxh / cnt : 0;
        double c3 = sub_rn(cnt > 0 ? mul_rn(-r, s1) / cnt : 0, mul_rn(c2, m));
        coef[2 * ng] = c2;
        coef[2 * ng + 1] = c3;
    }
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
            double r = rstd[g], m = mean[g], t1 = tot1[n * d.C + c], t2 = tot2[n * d.C + c];
            aw = add_rn(aw, mul_rn(r, sub_rn(t2, mul_rn(m, t1))));
            ab += t1;
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
            B sc = ss[2 * at], p = ld<B>(xv.v[k]), q = ld<B>(gv.v[k]);
            if (SILU) q = silu_grad(q, add_rn(mul_rn(p, sc), ss[2 * at + 1]));
            B v = add_rn(add_rn(mul_rn(sc, q), mul_rn((B)coef[2 * g], p)), (B)coef[2 * g + 1]);
            ov.v[k] = ml_st<T>::from(v);
        }
        reinterpret_cast<vec_t<T, V> *>(dx)[i] = ov;
    }
}

// ---- layer norm ----------------------------------------------------------------

// G threads per row (32 or kBlock): mean, rstd, then the affine in F.
template <int G, typename T, typename F, typename SS>
__global__ void __launch_bounds__(kBlock) ln_fwd(const T *__restrict__ x, const T *w, const T *b, T *__restrict__ y,
                                                   SS *mean, SS *rstd, int64_t M, int64_t C, double eps) {
    int64_t row = (int64_t)blockIdx.x * (kBlock / G) + threadIdx.x / G;
    int lane = threadIdx.x % G;
    if (G == 32 && row >= M) return;   // a warp per row: no block-wide sync below
    const T *xr = x + row * C;
    double s = 0;
    for (int64_t c = lane; c < C; c += G) s += ld<double>(xr[c]);
    s = group_allsum<G>(s);
    double m = C > 0 ? s / (double)C : 0;
    double q = 0;
    for (int64_t c = lane; c < C; c += G) {
        double v = ld<double>(xr[c]) - m;
        q += v * v;
    }
    q = group_allsum<G>(q);
    double r = 1.0 / sqrt((C > 0 ? q / (double)C : 0) + eps);
    if (lane == 0) {
        mean[row] = (SS)m;
        rstd[row] = (SS)r;
    }
    T *yr = y + row * C;
    for (int64_t c = lane; c < C; c += G) {
        double wc = w ? ld<double>(w[c]) : 1.0, bc = b ? ld<double>(b[c]) : 0.0;
        F sc = (F)affine_scale(r, wc), sh = (F)affine_shift(m, r, wc, bc);
        yr[c] = ml_st<T>::from(add_rn(mul_rn(ld<F>(xr[c]), sc), sh));
    }
}

// G threads per row: dx = r w dy + k2 x + k3.
template <int G, typename T, typename B, typename SS>
__global__ void __launch_bounds__(kBlock) ln_bwd_dx(const T *__restrict__ dy, const T *__restrict__ x, const T *w,
                                                      const SS *mean, const SS *rstd, T *__restrict__ dx, int64_t M,
                                                      int64_t C) {
    int64_t row = (int64_t)blockIdx.x * (kBlock / G) + threadIdx.x / G;
    int lane = threadIdx.x % G;
    if (G == 32 && row >= M) return;
    const T *xr = x + row * C, *gr = dy + row * C;
    double s1 = 0, s2 = 0;
    for (int64_t c = lane; c < C; c += G) {
        double wc = w ? ld<double>(w[c]) : 1.0, q = ld<double>(gr[c]);
        s1 = add_rn(s1, mul_rn(wc, q));
        s2 = add_rn(s2, mul_rn(wc, q * ld<double>(xr[c])));   // f32 x f32 is exact in double
    }
    s1 = group_allsum<G>(s1);
    s2 = group_allsum<G>(s2);
    double m = mean[row], r = rstd[row], cnt = (double)C;
    double sxh = mul_rn(r, sub_rn(s2, mul_rn(m, s1)));
    double c2 = cnt > 0 ? mul_rn(-r, r) * sxh / cnt : 0;
    double c3 = sub_rn(cnt > 0 ? mul_rn(-r, s1) / cnt : 0, mul_rn(c2, m));
    B k2 = (B)c2, k3 = (B)c3;
    T *or_ = dx + row * C;
    for (int64_t c = lane; c < C; c += G) {
        B sc = (B)affine_scale(r, w ? ld<double>(w[c]) : 1.0);
        B v = add_rn(add_rn(mul_rn(sc, ld<B>(gr[c])), mul_rn(k2, ld<B>(xr[c]))), k3);
        or_[c] = ml_st<T>::from(v);
    }
}

// dw: r (dy x - m dy) and db: dy, summed down the rows (L = M, one sample).
template <typename T, typename SS> struct ln_param_map {
    const T *dy, *x;
    const SS *mean, *rstd;
    struct state {};
    __device__ state start(int64_t, int64_t) const { return {}; }
    __device__ void add(const state &, int64_t i, int64_t row, double &a1, double &a2) const {
        double q = ld<double>(dy[i]), p = ld<double>(x[i]), r = rstd[row], m = mean[row];
        a1 = add_rn(a1, mul_rn(r, sub_rn(q * p, mul_rn(m, q))));
        a2 += q;
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
        ml_cuda_workspace ws(dev, {nws * sizeof(double), nws * sizeof(double), nss * sizeof(F)});
        if (!ws.ok()) return -1;
        double *ws1 = ws.part<double>(0), *ws2 = ws.part<double>(1);
        F *ss = ws.part<F>(2);
        const T *xp = ml_ptr<T>(x);
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
        T *yp = ml_ptr<T>(out);
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
        ml_cuda_workspace ws(dev, {nws * D8, nws * D8, nc * D8, nc * D8, ncoef * D8, 2 * nc * sizeof(B)});
        if (!ws.ok()) return -1;
        double *ws1 = ws.part<double>(0), *ws2 = ws.part<double>(1);
        double *tot1 = ws.part<double>(2), *tot2 = ws.part<double>(3);
        double *coef = ws.part<double>(4);
        B *ss = ws.part<B>(5);
        const T *xp = ml_ptr<T>(x), *gp = ml_ptr<T>(dout);
        const SS *mp = ml_ptr<SS>(mean), *rp = ml_ptr<SS>(rstd);
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
        if (!dx || n == 0) return 0;
        gn_bwd_coef<<<warp_grid(d.N * d.G), kBlock, 0, s>>>(opt_ptr<T>(w), mp, rp, d, tot1, tot2, coef);
        ML_CUDA_LAUNCHED("gn_bwd_coef");
        T *dxp = ml_ptr<T>(dx);
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
        if (C > 1024)
            ln_fwd<kBlock, T, F, SS><<<(unsigned)M, kBlock, 0, s>>>(xp, wp, bp, ml_ptr<T>(out), ml_ptr<SS>(mean),
                                                                       ml_ptr<SS>(rstd), M, C, eps);
        else
            ln_fwd<32, T, F, SS><<<warp_grid(M), kBlock, 0, s>>>(xp, wp, bp, ml_ptr<T>(out), ml_ptr<SS>(mean),
                                                                  ml_ptr<SS>(rstd), M, C, eps);
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
        if (dx && M > 0) {
            if (C > 1024)
                ln_bwd_dx<kBlock, T, B, SS><<<(unsigned)M, kBlock, 0, s>>>(gp, xp, wp, mp, rp, ml_ptr<T>(dx), M, C);
            else
                ln_bwd_dx<32, T, B, SS><<<warp_grid(M), kBlock, 0, s>>>(gp, xp, wp, mp, rp, ml_ptr<T>(dx), M, C);
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
