// attention.cu — CUDA twins of kernels/cpu/attention.c (contract in
// kernels/attention.h), two paths:
// - f16 / bf16 whose score matrices fit a memory budget: the "math path" at
//   the end of the file, cuBLAS GEMMs on the tensor cores around explicit
//   [Sq, Sk] score buffers (float32 scores, half-type probabilities);
// - everything else (always float32, so its results do not depend on the
//   size): flash-attention-style kernels on the CUDA cores, below.
//
// Forward, one block per R query rows of one (batch, head): the queries stay
// in shared memory while the keys stream through in tiles of C.  A tile's
// scores live in registers and are folded into a running softmax (row max m,
// row sum l, the output accumulator rescaled by exp(m_old - m_new)), so no
// [Sq, Sk] matrix ever exists; lse = m + log l is saved for the backward.
//
// The backward rebuilds the probabilities from lse, in three kernels so that
// each gradient element is written by exactly one thread (no atomics: the
// same inputs give the same bits every run):
//   delta  D_i = rowsum(dO_i * O_i), one warp per row;
//   dk/dv  one block per R keys, streaming over query tiles:
//          dV += P^T dO,  dS = P (dO V^T - D),  dK += scale dS^T Q;
//   dq     one block per R query rows, streaming over key tiles:
//          dQ += scale dS K, recomputing P and dS (two more products
//          instead of atomic adds across blocks).
//
// Every kernel runs 256 threads seen as TY x TX: thread (ty, tx) owns the
// block's rows ty*RM .. ty*RM + RM-1, tile columns tx, tx + TX, ... and
// accumulator columns tx, tx + TX, ... (strided so that a warp reads
// consecutive shared-memory words).  Row statistics are reduced over the TX
// threads of a row with warp shuffles.  Tiles are staged in shared memory as
// float32 with an odd row stride (threads reading down a column hit distinct
// banks), zero past the sequence end and the head width, so padding rows and
// columns add nothing.  The tiling depends on the head width rounded up to
// DM = 64, 128, 256 or 512: wider heads get fewer rows per block so that the
// tiles fit in shared memory.
//
// Letters: B batch, Sq / Sk query / key positions, H heads, D query/key width,
// Dv value width; every tensor is BSHD ([B, S, H, width]) and contiguous.
#include "common.cuh"
#include "attention.h"
#include "attention_cudnn.h"
#include "blas.h"
#include <climits>
#include <cmath>
#include <cstdio>
#include <type_traits>

namespace {

constexpr int kThreads = 256;

// R rows per block, C columns per streamed tile, TX threads across a row.
template <int DM> struct tiling;
template <> struct tiling<64> { static constexpr int R = 64, C = 64, TX = 16; };
template <> struct tiling<128> { static constexpr int R = 64, C = 64, TX = 16; };
template <> struct tiling<256> { static constexpr int R = 32, C = 64, TX = 32; };
template <> struct tiling<512> { static constexpr int R = 16, C = 32, TX = 32; };

template <int DM> struct geom {
    static constexpr int R = tiling<DM>::R, C = tiling<DM>::C, TX = tiling<DM>::TX;
    static constexpr int TY = kThreads / TX;
    static constexpr int RM = R / TY;    // rows per thread
    static constexpr int SN = C / TX;    // tile columns per thread
    static constexpr int ON = DM / TX;   // accumulator columns per thread
    static constexpr int LD = DM + 1;    // row stride of a [rows][DM] tile
    static constexpr int LP = C + 1;     // row stride of an [R][C] score tile
    static_assert(R % TY == 0 && C % TX == 0 && DM % TX == 0, "the tiling must divide evenly");
    // shared memory of each kernel, in floats (layouts in the kernels)
    static constexpr size_t fwd_floats = (size_t)R * LD + (size_t)C * LD + (size_t)R * LP;
    static constexpr size_t dkv_floats = 2 * (size_t)R * LD + 2 * (size_t)C * LD + 2 * (size_t)R * LP + 2 * (size_t)C;
    static constexpr size_t dq_floats = 2 * (size_t)R * LD + 2 * (size_t)C * LD + (size_t)R * LP;
};

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// Max / sum over the W consecutive lanes that share a row (W divides 32).
template <int W> __device__ __forceinline__ float group_max(float x) {
#pragma unroll
    for (int o = W / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
template <int W> __device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int o = W / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Rows s0 .. s0+n-1 of head h, batch b of a [B, S, H, W] tensor into an
// [n][DM + 1] float tile, zero past row S and past column W.  Consecutive
// threads take consecutive columns (coalesced reads).
template <int DM, typename T>
__device__ void load_rows(float *dst, const T *src, int64_t b, int s0, int n, int S, int H, int h, int W) {
    constexpr int LD = DM + 1;
    for (int i = threadIdx.x; i < n * DM; i += kThreads) {
        int r = i / DM, c = i - r * DM, s = s0 + r;
        float x = 0.0f;
        if (s < S && c < W) x = ml_ld(src[((b * S + s) * H + h) * (int64_t)W + c]);
        dst[r * LD + c] = x;
    }
}

// Whether query qi sees key kj.
__device__ __forceinline__ bool visible(int qi, int kj, int Sq, int Sk, bool causal) {
    return qi < Sq && kj < Sk && !(causal && kj > qi);
}

// ---- forward ----------------------------------------------------------------

// Grid: nqb query blocks x B x H (blockIdx.x = (b * H + h) * nqb + query block).
template <typename T, int DM>
__global__ void __launch_bounds__(kThreads)
    sdpa_fwd(T *out, float *lse, const T *q, const T *k, const T *v, int Sq, int Sk, int H, int D, int Dv,
             int nqb, bool causal, float scale) {
    using G = geom<DM>;
    constexpr int R = G::R, C = G::C, TX = G::TX, RM = G::RM, SN = G::SN, ON = G::ON, LD = G::LD, LP = G::LP;
    extern __shared__ float smem[];
    float *sq = smem;            // [R][LD]  the block's queries
    float *skv = sq + R * LD;    // [C][LD]  a tile of keys, then of values
    float *sp = skv + C * LD;    // [R][LP]  the tile's probabilities (unnormalised)
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
    const int q0 = (int)(blockIdx.x % nqb) * R;
    const int64_t bh = blockIdx.x / nqb, b = bh / H;
    const int h = (int)(bh % H);

    load_rows<DM>(sq, q, b, q0, R, Sq, H, h, D);
    float m[RM], l[RM], acc[RM][ON];
#pragma unroll
    for (int i = 0; i < RM; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < ON; c++) acc[i][c] = 0.0f;
    }
    // keys past the block's last query are masked for every row of it
    const int kend = causal ? imin(Sk, q0 + R) : Sk;
    for (int k0 = 0; k0 < kend; k0 += C) {
        __syncthreads();   // the previous tile's values and probabilities are consumed
        load_rows<DM>(skv, k, b, k0, C, Sk, H, h, D);
        __syncthreads();
        float s[RM][SN];
#pragma unroll
        for (int i = 0; i < RM; i++)
#pragma unroll
            for (int j = 0; j < SN; j++) s[i][j] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < D; d++) {
            float a[RM], kk[SN];
#pragma unroll
            for (int i = 0; i < RM; i++) a[i] = sq[(ty * RM + i) * LD + d];
#pragma unroll
            for (int j = 0; j < SN; j++) kk[j] = skv[(tx + TX * j) * LD + d];
#pragma unroll
            for (int i = 0; i < RM; i++)
#pragma unroll
                for (int j = 0; j < SN; j++) s[i][j] = fmaf(a[i], kk[j], s[i][j]);
        }
#pragma unroll
        for (int i = 0; i < RM; i++) {
            const int qi = q0 + ty * RM + i;
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < SN; j++) {
                s[i][j] = visible(qi, k0 + tx + TX * j, Sq, Sk, causal) ? s[i][j] * scale : -INFINITY;
                mx = fmaxf(mx, s[i][j]);
            }
            const float mnew = fmaxf(m[i], group_max<TX>(mx));
            // a row that has seen no key yet stays at zero (exp(-inf - 0)),
            // never exp(-inf + inf)
            const float base = mnew == -INFINITY ? 0.0f : mnew;
            const float alpha = expf(m[i] - base);
            float rs = 0.0f;
#pragma unroll
            for (int j = 0; j < SN; j++) {
                const float p = expf(s[i][j] - base);
                sp[(ty * RM + i) * LP + tx + TX * j] = p;
                rs += p;
            }
            l[i] = l[i] * alpha + group_sum<TX>(rs);
            m[i] = mnew;
#pragma unroll
            for (int c = 0; c < ON; c++) acc[i][c] *= alpha;
        }
        __syncthreads();   // keys consumed, probabilities complete
        load_rows<DM>(skv, v, b, k0, C, Sk, H, h, Dv);
        __syncthreads();
        const int jn = imin(C, kend - k0);
        for (int j = 0; j < jn; j++) {
            float vv[ON];
#pragma unroll
            for (int c = 0; c < ON; c++) vv[c] = skv[j * LD + tx + TX * c];
#pragma unroll
            for (int i = 0; i < RM; i++) {
                const float p = sp[(ty * RM + i) * LP + j];
#pragma unroll
                for (int c = 0; c < ON; c++)
                    if (c * TX < Dv) acc[i][c] = fmaf(p, vv[c], acc[i][c]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < RM; i++) {
        const int qi = q0 + ty * RM + i;
        if (qi >= Sq) continue;
        const float inv = 1.0f / l[i];
        T *o = out + ((b * Sq + qi) * H + h) * (int64_t)Dv;
#pragma unroll
        for (int c = 0; c < ON; c++) {
            const int col = tx + TX * c;
            if (col < Dv) o[col] = ml_st<T>::from(acc[i][c] * inv);
        }
        if (tx == 0) lse[bh * Sq + qi] = m[i] + logf(l[i]);
    }
}

// ---- backward ---------------------------------------------------------------

// delta[b, h, i] = sum_c dout[b, i, h, c] * out[b, i, h, c]: one warp per
// row of dout / out (rows in BSH order), 8 warps per block.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sdpa_delta(float *delta, const T *dout, const T *out, int64_t rows, int Sq, int H, int Dv) {
    const int64_t w = (blockIdx.x * (int64_t)kThreads + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (w >= rows) return;   // whole warps leave together: the shuffles below stay full
    const T *g = dout + w * Dv, *o = out + w * Dv;
    float acc = 0.0f;
    for (int c = lane; c < Dv; c += 32) acc = fmaf(ml_ld(g[c]), ml_ld(o[c]), acc);
    acc = group_sum<32>(acc);
    if (lane == 0) {
        const int64_t h = w % H, bi = w / H, i = bi % Sq, b = bi / Sq;
        delta[(b * H + h) * Sq + i] = acc;
    }
}

// Grid: nkb key blocks x B x H.  dk or dv may be NULL (not wanted).
template <typename T, int DM>
__global__ void __launch_bounds__(kThreads)
    sdpa_bwd_dkv(T *dk, T *dv, const T *dout, const T *q, const T *k, const T *v, const float *lse,
                 const float *delta, int Sq, int Sk, int H, int D, int Dv, int nkb, bool causal, float scale) {
    using G = geom<DM>;
    constexpr int R = G::R, C = G::C, TX = G::TX, RM = G::RM, SN = G::SN, ON = G::ON, LD = G::LD, LP = G::LP;
    extern __shared__ float smem[];
    float *sk = smem;              // [R][LD]  the block's keys
    float *sv = sk + R * LD;       // [R][LD]  and values
    float *sq = sv + R * LD;       // [C][LD]  a tile of queries
    float *sdo = sq + C * LD;      // [C][LD]  and their output gradients
    float *sp = sdo + C * LD;      // [R][LP]  P^T of the tile
    float *sds = sp + R * LP;      // [R][LP]  dS^T of the tile
    float *slse = sds + R * LP;    // [C]      the tile's lse
    float *sdelta = slse + C;      // [C]      and delta
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
    const int k0 = (int)(blockIdx.x % nkb) * R;
    const int64_t bh = blockIdx.x / nkb, b = bh / H;
    const int h = (int)(bh % H);
    const bool want_dk = dk != nullptr, want_dv = dv != nullptr;

    load_rows<DM>(sk, k, b, k0, R, Sk, H, h, D);
    load_rows<DM>(sv, v, b, k0, R, Sk, H, h, Dv);
    float gk[RM][ON], gv[RM][ON];
#pragma unroll
    for (int i = 0; i < RM; i++)
#pragma unroll
        for (int c = 0; c < ON; c++) gk[i][c] = gv[i][c] = 0.0f;
    // under the causal mask queries before k0 see none of the block's keys
    for (int i0 = causal ? k0 : 0; i0 < Sq; i0 += C) {
        __syncthreads();   // the previous tile is consumed
        load_rows<DM>(sq, q, b, i0, C, Sq, H, h, D);
        load_rows<DM>(sdo, dout, b, i0, C, Sq, H, h, Dv);
        for (int t = threadIdx.x; t < C; t += kThreads) {
            const int i = i0 + t;
            slse[t] = i < Sq ? lse[bh * Sq + i] : 0.0f;
            sdelta[t] = i < Sq && want_dk ? delta[bh * Sq + i] : 0.0f;
        }
        __syncthreads();
        // scores S^T = K Q^T and dP^T = V dO^T, rows = keys, columns = queries
        float s[RM][SN], dp[RM][SN];
#pragma unroll
        for (int i = 0; i < RM; i++)
#pragma unroll
            for (int j = 0; j < SN; j++) s[i][j] = dp[i][j] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < D; d++) {
            float a[RM], x[SN];
#pragma unroll
            for (int i = 0; i < RM; i++) a[i] = sk[(ty * RM + i) * LD + d];
#pragma unroll
            for (int j = 0; j < SN; j++) x[j] = sq[(tx + TX * j) * LD + d];
#pragma unroll
            for (int i = 0; i < RM; i++)
#pragma unroll
                for (int j = 0; j < SN; j++) s[i][j] = fmaf(a[i], x[j], s[i][j]);
        }
        if (want_dk) {
#pragma unroll 4
            for (int e = 0; e < Dv; e++) {
                float a[RM], x[SN];
#pragma unroll
                for (int i = 0; i < RM; i++) a[i] = sv[(ty * RM + i) * LD + e];
#pragma unroll
                for (int j = 0; j < SN; j++) x[j] = sdo[(tx + TX * j) * LD + e];
#pragma unroll
                for (int i = 0; i < RM; i++)
#pragma unroll
                    for (int j = 0; j < SN; j++) dp[i][j] = fmaf(a[i], x[j], dp[i][j]);
            }
        }
#pragma unroll
        for (int i = 0; i < RM; i++)
#pragma unroll
            for (int j = 0; j < SN; j++) {
                const int col = tx + TX * j;
                const float p =
                    visible(i0 + col, k0 + ty * RM + i, Sq, Sk, causal) ? expf(s[i][j] * scale - slse[col]) : 0.0f;
                sp[(ty * RM + i) * LP + col] = p;
                sds[(ty * RM + i) * LP + col] = p * (dp[i][j] - sdelta[col]);
            }
        __syncthreads();
        const int jn = imin(C, Sq - i0);
        for (int j = 0; j < jn; j++) {
            float go[ON], qq[ON];
#pragma unroll
            for (int c = 0; c < ON; c++) {
                go[c] = sdo[j * LD + tx + TX * c];
                qq[c] = sq[j * LD + tx + TX * c];
            }
#pragma unroll
            for (int i = 0; i < RM; i++) {
                const float p = sp[(ty * RM + i) * LP + j], ds = sds[(ty * RM + i) * LP + j];
#pragma unroll
                for (int c = 0; c < ON; c++) {
                    if (want_dv && c * TX < Dv) gv[i][c] = fmaf(p, go[c], gv[i][c]);
                    if (want_dk && c * TX < D) gk[i][c] = fmaf(ds, qq[c], gk[i][c]);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < RM; i++) {
        const int kj = k0 + ty * RM + i;
        if (kj >= Sk) continue;
        const int64_t row = (b * Sk + kj) * H + h;
#pragma unroll
        for (int c = 0; c < ON; c++) {
            const int col = tx + TX * c;
            if (want_dv && col < Dv) dv[row * Dv + col] = ml_st<T>::from(gv[i][c]);
            if (want_dk && col < D) dk[row * D + col] = ml_st<T>::from(gk[i][c] * scale);
        }
    }
}

// Grid: nqb query blocks x B x H.
template <typename T, int DM>
__global__ void __launch_bounds__(kThreads)
    sdpa_bwd_dq(T *dq, const T *dout, const T *q, const T *k, const T *v, const float *lse, const float *delta,
                int Sq, int Sk, int H, int D, int Dv, int nqb, bool causal, float scale) {
    using G = geom<DM>;
    constexpr int R = G::R, C = G::C, TX = G::TX, RM = G::RM, SN = G::SN, ON = G::ON, LD = G::LD, LP = G::LP;
    extern __shared__ float smem[];
    float *sq = smem;            // [R][LD]  the block's queries
    float *sdo = sq + R * LD;    // [R][LD]  and their output gradients
    float *sk = sdo + R * LD;    // [C][LD]  a tile of keys
    float *sv = sk + C * LD;     // [C][LD]  and values
    float *sds = sv + C * LD;    // [R][LP]  dS of the tile
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
    const int q0 = (int)(blockIdx.x % nqb) * R;
    const int64_t bh = blockIdx.x / nqb, b = bh / H;
    const int h = (int)(bh % H);

    load_rows<DM>(sq, q, b, q0, R, Sq, H, h, D);
    load_rows<DM>(sdo, dout, b, q0, R, Sq, H, h, Dv);
    float rl[RM], rd[RM], g[RM][ON];
#pragma unroll
    for (int i = 0; i < RM; i++) {
        const int qi = q0 + ty * RM + i;
        rl[i] = qi < Sq ? lse[bh * Sq + qi] : 0.0f;
        rd[i] = qi < Sq ? delta[bh * Sq + qi] : 0.0f;
#pragma unroll
        for (int c = 0; c < ON; c++) g[i][c] = 0.0f;
    }
    const int kend = causal ? imin(Sk, q0 + R) : Sk;
    for (int k0 = 0; k0 < kend; k0 += C) {
        __syncthreads();   // the previous tile is consumed
        load_rows<DM>(sk, k, b, k0, C, Sk, H, h, D);
        load_rows<DM>(sv, v, b, k0, C, Sk, H, h, Dv);
        __syncthreads();
        // S = Q K^T and dP = dO V^T, rows = queries, columns = keys
        float s[RM][SN], dp[RM][SN];
#pragma unroll
        for (int i = 0; i < RM; i++)
#pragma unroll
            for (int j = 0; j < SN; j++) s[i][j] = dp[i][j] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < D; d++) {
            float a[RM], x[SN];
#pragma unroll
            for (int i = 0; i < RM; i++) a[i] = sq[(ty * RM + i) * LD + d];
#pragma unroll
            for (int j = 0; j < SN; j++) x[j] = sk[(tx + TX * j) * LD + d];
#pragma unroll
            for (int i = 0; i < RM; i++)
#pragma unroll
                for (int j = 0; j < SN; j++) s[i][j] = fmaf(a[i], x[j], s[i][j]);
        }
#pragma unroll 4
        for (int e = 0; e < Dv; e++) {
            float a[RM], x[SN];
#pragma unroll
            for (int i = 0; i < RM; i++) a[i] = sdo[(ty * RM + i) * LD + e];
#pragma unroll
            for (int j = 0; j < SN; j++) x[j] = sv[(tx + TX * j) * LD + e];
#pragma unroll
            for (int i = 0; i < RM; i++)
#pragma unroll
                for (int j = 0; j < SN; j++) dp[i][j] = fmaf(a[i], x[j], dp[i][j]);
        }
#pragma unroll
        for (int i = 0; i < RM; i++)
#pragma unroll
            for (int j = 0; j < SN; j++) {
                const int col = tx + TX * j;
                const float p =
                    visible(q0 + ty * RM + i, k0 + col, Sq, Sk, causal) ? expf(s[i][j] * scale - rl[i]) : 0.0f;
                sds[(ty * RM + i) * LP + col] = p * (dp[i][j] - rd[i]);
            }
        __syncthreads();
        const int jn = imin(C, kend - k0);
        for (int j = 0; j < jn; j++) {
            float kk[ON];
#pragma unroll
            for (int c = 0; c < ON; c++) kk[c] = sk[j * LD + tx + TX * c];
#pragma unroll
            for (int i = 0; i < RM; i++) {
                const float ds = sds[(ty * RM + i) * LP + j];
#pragma unroll
                for (int c = 0; c < ON; c++)
                    if (c * TX < D) g[i][c] = fmaf(ds, kk[c], g[i][c]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < RM; i++) {
        const int qi = q0 + ty * RM + i;
        if (qi >= Sq) continue;
        T *o = dq + ((b * Sq + qi) * H + h) * (int64_t)D;
#pragma unroll
        for (int c = 0; c < ON; c++) {
            const int col = tx + TX * c;
            if (col < D) o[col] = ml_st<T>::from(g[i][c] * scale);
        }
    }
}

// ---- host side ------------------------------------------------------------------

struct dims {
    int64_t B, Sq, Sk, H, D, Dv;
};

// Sizes from q, k, v (4-D BSHD, as the host op checked), checked to fit the
// kernels' 32-bit row and column indices (element offsets are 64-bit): a
// limit of these kernels, not of the arguments, so it is reported here.
int get_dims(const char *what, const ml_ktensor *q, const ml_ktensor *k, const ml_ktensor *v, dims *d) {
    *d = {q->shape[0], q->shape[1], k->shape[1], q->shape[2], q->shape[3], v->shape[3]};
    const int64_t lim = INT_MAX / 2;
    if (d->Sq > lim || d->Sk > lim || d->H > lim)
        return ml_error("%s (cuda): %lld queries, %lld keys, %lld heads: too many for the kernels' indices", what,
                        (long long)d->Sq, (long long)d->Sk, (long long)d->H);
    return 0;
}

// The element types the kernels take.
int check_type(const char *what, ml_dtype dt) {
    if (dt == ML_F32 || dt == ML_F16 || dt == ML_BF16) return 0;
    if (dt == ML_F64) return ml_error("%s: f64 is not supported on CUDA (use f32, f16 or bf16)", what);
    return ml_error("%s (cuda): dtype %s is not supported (expected f32, f16 or bf16)", what, ml_dtype_name(dt));
}

template <typename F> int with_type(ml_dtype dt, F &&f) {
    switch (dt) {
    case ML_F32: return f(float());
    case ML_F16: return f(ml_f16_t());
    default: return f(ml_bf16_t());   // ML_BF16, after check_type
    }
}

// The tiling for head width w (the wider of D and Dv).
template <typename F> int with_width(int64_t w, F &&f) {
    if (w <= 64) return f(std::integral_constant<int, 64>());
    if (w <= 128) return f(std::integral_constant<int, 128>());
    if (w <= 256) return f(std::integral_constant<int, 256>());
    if (w <= 512) return f(std::integral_constant<int, 512>());
    return ml_error("sdpa (cuda): head width %lld is wider than 512, the widest the CUDA kernels take", (long long)w);
}

// Lets kern use smem bytes of dynamic shared memory (above the default 48 KiB).
template <typename K> int allow_smem(K *kern, size_t smem, int dev) {
    int optin = 0;
    ML_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (smem > (size_t)optin)
        return ml_error("sdpa (cuda): this head width needs %zu bytes of shared memory per block; cuda:%d allows %d",
                        smem, dev, optin);
    ML_CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    return 0;
}

// Blocks for `tiles` row blocks of each (batch, head).
int grid_for(const char *what, int64_t tiles, const dims &d, unsigned *grid) {
    int64_t n = tiles * d.B * d.H;
    if (n > INT_MAX) return ml_error("%s (cuda): %lld thread blocks exceed the grid limit", what, (long long)n);
    *grid = (unsigned)n;
    return 0;
}

template <typename T, int DM>
int launch_forward(T *out, float *lse, const T *q, const T *k, const T *v, const dims &d, bool causal, float scale,
                   int dev, cudaStream_t s) {
    using G = geom<DM>;
    const size_t smem = G::fwd_floats * sizeof(float);
    const int64_t nqb = (d.Sq + G::R - 1) / G::R;
    unsigned grid;
    if (grid_for("sdpa", nqb, d, &grid) < 0 || allow_smem(sdpa_fwd<T, DM>, smem, dev) < 0) return -1;
    sdpa_fwd<T, DM><<<grid, kThreads, smem, s>>>(out, lse, q, k, v, (int)d.Sq, (int)d.Sk, (int)d.H, (int)d.D,
                                                 (int)d.Dv, (int)nqb, causal, scale);
    ML_CUDA_LAUNCHED("sdpa forward");
    return 0;
}

// Blocks of kThreads for one warp per row.
int warp_grid(const char *what, int64_t rows, unsigned *grid) {
    const int64_t blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
    if (blocks > INT_MAX) return ml_error("%s (cuda): %lld rows exceed the grid limit", what, (long long)rows);
    *grid = (unsigned)blocks;
    return 0;
}

template <typename T>
int launch_delta(float *delta, const T *dout, const T *out, const dims &d, cudaStream_t s) {
    const int64_t rows = d.B * d.Sq * d.H;
    unsigned grid;
    if (warp_grid("sdpa backward", rows, &grid) < 0) return -1;
    sdpa_delta<T><<<grid, kThreads, 0, s>>>(delta, dout, out, rows, (int)d.Sq, (int)d.H, (int)d.Dv);
    ML_CUDA_LAUNCHED("sdpa backward (delta)");
    return 0;
}

template <typename T, int DM>
int launch_backward(T *dq, T *dk, T *dv, const T *dout, const T *q, const T *k, const T *v, const T *out,
                    const float *lse, float *delta, const dims &d, bool causal, float scale, int dev, cudaStream_t s) {
    using G = geom<DM>;
    const int Sq = (int)d.Sq, Sk = (int)d.Sk, H = (int)d.H, D = (int)d.D, Dv = (int)d.Dv;
    unsigned grid;
    if (delta && launch_delta(delta, dout, out, d, s) < 0) return -1;
    if ((dk || dv) && d.Sk > 0) {
        const size_t smem = G::dkv_floats * sizeof(float);
        const int64_t nkb = (d.Sk + G::R - 1) / G::R;
        if (grid_for("sdpa backward", nkb, d, &grid) < 0 || allow_smem(sdpa_bwd_dkv<T, DM>, smem, dev) < 0) return -1;
        sdpa_bwd_dkv<T, DM><<<grid, kThreads, smem, s>>>(dk, dv, dout, q, k, v, lse, delta, Sq, Sk, H, D, Dv,
                                                         (int)nkb, causal, scale);
        ML_CUDA_LAUNCHED("sdpa backward (dk, dv)");
    }
    if (dq && d.Sq > 0) {
        const size_t smem = G::dq_floats * sizeof(float);
        const int64_t nqb = (d.Sq + G::R - 1) / G::R;
        if (grid_for("sdpa backward", nqb, d, &grid) < 0 || allow_smem(sdpa_bwd_dq<T, DM>, smem, dev) < 0) return -1;
        sdpa_bwd_dq<T, DM><<<grid, kThreads, smem, s>>>(dq, dout, q, k, v, lse, delta, Sq, Sk, H, D, Dv, (int)nqb,
                                                        causal, scale);
        ML_CUDA_LAUNCHED("sdpa backward (dq)");
    }
    return 0;
}

// ---- math path: the half types on the tensor cores ---------------------------
//
// For f16 / bf16 the products run as cuBLAS GEMMs (inputs in the half type,
// float32 accumulation) around whole [Sq, Sk] score matrices, a chunk of
// batches at a time.  Per batch b of the chunk, the H heads are one
// strided-batched GEMM: head h of a BSHD tensor is a row-major [S, width]
// matrix at offset h * width with leading dimension H * width, so no
// operand is copied or transposed, and the results are written straight
// into the BSHD outputs and gradients.
//   forward   S = scale Q K^T (f32)  ->  P = softmax(S) (the half type), lse
//             O = P V
//   backward  S = scale Q K^T  ->  P = exp(S - lse)
//             dV = P^T dO,  dP = dO V^T (f32),  dS = P (dP - delta) in P's place
//             dQ = scale dS K,  dK = scale dS^T Q
// P and dS are rounded to the half type before their products, as the
// tensor cores need (flash-attention implementations do the same).  Each
// element is written by one thread or one GEMM, so runs are bitwise
// repeatable.  The buffers are [n, H, Sq, LS] with LS = Sk rounded up to 8,
// so that every row of P and dS starts 16-byte aligned for the tensor-core
// kernels; columns past Sk are never read.

// The float32 score buffer of one chunk stays within this many bytes; a
// batch whose scores alone exceed it takes the flash kernels instead.
constexpr double kMathBudget = 2.0 * (1 << 30);

int64_t score_ld(int64_t Sk) { return (Sk + 7) / 8 * 8; }

// Batches per chunk of the math path for dtype dt, 0 for the flash kernels.
int64_t math_chunk(ml_dtype dt, const dims &d) {
    if (dt != ML_F16 && dt != ML_BF16) return 0;
    if (d.B == 0 || d.Sq == 0 || d.Sk == 0 || d.D == 0 || d.Dv == 0) return 0;
    if (d.H * (d.D > d.Dv ? d.D : d.Dv) > INT_MAX) return 0;   // cuBLAS's int leading dimensions
    const double per = (double)d.H * (double)d.Sq * (double)score_ld(d.Sk) * sizeof(float);
    if (per > kMathBudget) return 0;
    const double n = kMathBudget / per;
    return n < (double)d.B ? (int64_t)n : d.B;
}

// Forward softmax, one warp per score row of the chunk (rows in [batch,
// head, query] order, the order of lse): an online max / sum over the
// visible keys, then p = exp(s - lse) rounded to T, zero for masked keys.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    math_softmax(T *p, float *lse, const float *s, int64_t rows, int Sq, int Sk, int64_t ls, bool causal) {
    const int64_t r = (blockIdx.x * (int64_t)kThreads + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (r >= rows) return;   // whole warps leave together
    const int i = (int)(r % Sq);
    const int n = causal ? imin(Sk, i + 1) : Sk;   // key 0 is always visible
    const float *sr = s + r * ls;
    float m = -INFINITY, l = 0.0f;
    for (int j = lane; j < n; j += 32) {
        const float x = sr[j];
        if (x > m) {
            l = l * expf(m - x) + 1.0f;
            m = x;
        } else {
            l += expf(x - m);
        }
    }
    const float mw = group_max<32>(m);
    l = group_sum<32>(m == -INFINITY ? 0.0f : l * expf(m - mw));   // lanes that saw no key add nothing
    const float lr = mw + logf(l);
    T *pr = p + r * ls;
    for (int j = lane; j < Sk; j += 32) pr[j] = ml_st<T>::from(j < n ? expf(sr[j] - lr) : 0.0f);
    if (lane == 0) lse[r] = lr;
}

// Backward: p = exp(s - lse) from the saved lse, one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    math_probs(T *p, const float *s, const float *lse, int64_t rows, int Sq, int Sk, int64_t ls, bool causal) {
    const int64_t r = (blockIdx.x * (int64_t)kThreads + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (r >= rows) return;
    const int i = (int)(r % Sq);
    const int n = causal ? imin(Sk, i + 1) : Sk;
    const float lr = lse[r];
    const float *sr = s + r * ls;
    T *pr = p + r * ls;
    for (int j = lane; j < Sk; j += 32) pr[j] = ml_st<T>::from(j < n ? expf(sr[j] - lr) : 0.0f);
}

// dS = P (dP - delta), written over P (masked keys have P = 0, so dS = 0).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    math_dscores(T *pds, const float *dp, const float *delta, int64_t rows, int Sk, int64_t ls) {
    const int64_t r = (blockIdx.x * (int64_t)kThreads + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (r >= rows) return;
    const float dl = delta[r];
    const float *dr = dp + r * ls;
    T *pr = pds + r * ls;
    for (int j = lane; j < Sk; j += 32) pr[j] = ml_st<T>::from(ml_ld(pr[j]) * (dr[j] - dl));
}

template <typename T> cudaDataType_t cuda_type();
template <> cudaDataType_t cuda_type<ml_f16_t>() { return CUDA_R_16F; }
template <> cudaDataType_t cuda_type<ml_bf16_t>() { return CUDA_R_16BF; }

// A GEMM operand: `batch` row-major matrices `stride` elements apart, rows
// `ld` elements apart.
struct mat {
    const void *p;
    cudaDataType_t type;
    int64_t ld, stride;
};

// Row-major c[M, N] = alpha op(a) op(b) (op transposes where ta / tb) for
// each of `batch` matrices, f32 accumulation.  Column-major cuBLAS sees
// c^T = op(b)^T op(a)^T, so b is its A operand and a its B.
int gemm(cublasHandle_t h, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const mat &a,
         const mat &b, const mat &c, int64_t batch) {
    const float beta = 0.0f;
    cublasStatus_t st = cublasGemmStridedBatchedEx(
        h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)N, (int)M, (int)K, &alpha, b.p,
        b.type, (int)b.ld, b.stride, a.p, a.type, (int)a.ld, a.stride, &beta, (void *)c.p, c.type, (int)c.ld, c.stride,
        (int)batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS)
        return ml_error("sdpa (cuda): cuBLAS GEMM [%lld x %lld x %lld] x %lld failed: %s [%s]", (long long)M,
                        (long long)N, (long long)K, (long long)batch, cublasGetStatusString(st),
                        cublasGetStatusName(st));
    return 0;
}

// The two score buffers of a chunk, float32 scores and half-type
// probabilities, as the two parts of one ml_cuda_workspace.  The first
// part's size is rounded up to 512 bytes so that the second starts 512-byte
// aligned, as each did when they were separate allocations: cuBLAS picks
// its GEMM kernel partly by the operands' alignment, and the same choice
// keeps the same bits.
size_t scores_part_bytes(size_t n) { return (n * sizeof(float) + 511) & ~(size_t)511; }

// The pieces of one chunk: batch b's head matrices of a BSHD tensor, and of
// the chunk's score buffers.
struct math_geom {
    dims d;
    int64_t ls, hm;   // score row stride, elements of one head's scores
    cudaDataType_t dt;
    template <typename T> mat bshd(const T *t, int64_t b, int64_t S, int64_t W) const {
        return {t + b * S * d.H * W, dt, d.H * W, W};
    }
    mat scores(const void *buf, int64_t i, cudaDataType_t t, size_t es) const {
        return {(const char *)buf + (size_t)(i * d.H * hm) * es, t, ls, hm};
    }
};

template <typename T>
int math_forward(T *out, float *lse, const T *q, const T *k, const T *v, const dims &d, bool causal, float scale,
                 int64_t chunk, int dev, cudaStream_t s) {
    cublasHandle_t h = ml_cublas_handle(dev);
    if (!h) return -1;
    const math_geom g{d, score_ld(d.Sk), d.Sq * score_ld(d.Sk), cuda_type<T>()};
    const size_t n = (size_t)(chunk * d.H * g.hm);
    ml_cuda_workspace ws(dev, {scores_part_bytes(n), n * sizeof(T)});
    if (!ws.ok()) return -1;
    float *sbuf = ws.part<float>(0);
    T *pbuf = ws.part<T>(1);
    for (int64_t b0 = 0; b0 < d.B; b0 += chunk) {
        const int64_t nb = chunk < d.B - b0 ? chunk : d.B - b0;
        for (int64_t b = b0; b < b0 + nb; b++)   // S = scale Q K^T
            if (gemm(h, false, true, d.Sq, d.Sk, d.D, scale, g.bshd(q, b, d.Sq, d.D), g.bshd(k, b, d.Sk, d.D),
                     g.scores(sbuf, b - b0, CUDA_R_32F, sizeof(float)), d.H) < 0)
                return -1;
        const int64_t rows = nb * d.H * d.Sq;
        unsigned grid;
        if (warp_grid("sdpa", rows, &grid) < 0) return -1;
        math_softmax<T><<<grid, kThreads, 0, s>>>(pbuf, lse + b0 * d.H * d.Sq, sbuf, rows,
                                                  (int)d.Sq, (int)d.Sk, g.ls, causal);
        ML_CUDA_LAUNCHED("sdpa forward (softmax)");
        for (int64_t b = b0; b < b0 + nb; b++)   // O = P V
            if (gemm(h, false, false, d.Sq, d.Dv, d.Sk, 1.0f, g.scores(pbuf, b - b0, g.dt, sizeof(T)),
                     g.bshd(v, b, d.Sk, d.Dv), g.bshd(out, b, d.Sq, d.Dv), d.H) < 0)
                return -1;
    }
    return 0;
}

template <typename T>
int math_backward(T *dq, T *dk, T *dv, const T *dout, const T *q, const T *k, const T *v, const float *lse,
                  const float *delta, const dims &d, bool causal, float scale, int64_t chunk, int dev,
                  cudaStream_t s) {
    cublasHandle_t h = ml_cublas_handle(dev);
    if (!h) return -1;
    const math_geom g{d, score_ld(d.Sk), d.Sq * score_ld(d.Sk), cuda_type<T>()};
    const size_t n = (size_t)(chunk * d.H * g.hm);
    ml_cuda_workspace ws(dev, {scores_part_bytes(n), n * sizeof(T)});
    if (!ws.ok()) return -1;
    float *sbuf = ws.part<float>(0);
    T *pbuf = ws.part<T>(1);
    for (int64_t b0 = 0; b0 < d.B; b0 += chunk) {
        const int64_t nb = chunk < d.B - b0 ? chunk : d.B - b0;
        for (int64_t b = b0; b < b0 + nb; b++)   // S = scale Q K^T
            if (gemm(h, false, true, d.Sq, d.Sk, d.D, scale, g.bshd(q, b, d.Sq, d.D), g.bshd(k, b, d.Sk, d.D),
                     g.scores(sbuf, b - b0, CUDA_R_32F, sizeof(float)), d.H) < 0)
                return -1;
        const int64_t rows = nb * d.H * d.Sq, r0 = b0 * d.H * d.Sq;
        unsigned grid;
        if (warp_grid("sdpa backward", rows, &grid) < 0) return -1;
        math_probs<T><<<grid, kThreads, 0, s>>>(pbuf, sbuf, lse + r0, rows, (int)d.Sq,
                                                (int)d.Sk, g.ls, causal);
        ML_CUDA_LAUNCHED("sdpa backward (probabilities)");
        if (dv)
            for (int64_t b = b0; b < b0 + nb; b++)   // dV = P^T dO
                if (gemm(h, true, false, d.Sk, d.Dv, d.Sq, 1.0f, g.scores(pbuf, b - b0, g.dt, sizeof(T)),
                         g.bshd(dout, b, d.Sq, d.Dv), g.bshd(dv, b, d.Sk, d.Dv), d.H) < 0)
                    return -1;
        if (!dq && !dk) continue;
        for (int64_t b = b0; b < b0 + nb; b++)   // dP = dO V^T, over S
            if (gemm(h, false, true, d.Sq, d.Sk, d.Dv, 1.0f, g.bshd(dout, b, d.Sq, d.Dv), g.bshd(v, b, d.Sk, d.Dv),
                     g.scores(sbuf, b - b0, CUDA_R_32F, sizeof(float)), d.H) < 0)
                return -1;
        math_dscores<T><<<grid, kThreads, 0, s>>>(pbuf, sbuf, delta + r0, rows, (int)d.Sk,
                                                  g.ls);
        ML_CUDA_LAUNCHED("sdpa backward (dS)");
        for (int64_t b = b0; b < b0 + nb; b++) {
            const mat ds = g.scores(pbuf, b - b0, g.dt, sizeof(T));
            if (dq && gemm(h, false, false, d.Sq, d.D, d.Sk, scale, ds, g.bshd(k, b, d.Sk, d.D),
                           g.bshd(dq, b, d.Sq, d.D), d.H) < 0)   // dQ = scale dS K
                return -1;
            if (dk && gemm(h, true, false, d.Sk, d.D, d.Sq, scale, ds, g.bshd(q, b, d.Sq, d.D),
                           g.bshd(dk, b, d.Sk, d.D), d.H) < 0)   // dK = scale dS^T Q
                return -1;
        }
    }
    return 0;
}

}  // namespace

// ---- entry points -----------------------------------------------------------------

extern "C" int ml_sdpa_forward_cuda(ml_ktensor *out, ml_ktensor *lse, const ml_ktensor *q, const ml_ktensor *k,
                                    const ml_ktensor *v, bool causal, double scale) {
    dims d;
    if (check_type("sdpa", q->dtype) < 0 || get_dims("sdpa", q, k, v, &d) < 0) return -1;
    cudaStream_t s;
    if (ml_cuda_prepare(q, "sdpa", &s) < 0) return -1;
    if (d.B * d.H * d.Sq == 0) return 0;
    const int dev = q->device.index;
    // f16 / bf16: cuDNN's fused kernels first (1 done, 0 not supported
    // there: ours below, -1 error); contiguous BSHD tensors, lse [B, H, Sq]
    if (q->dtype == ML_F16 || q->dtype == ML_BF16) {
        ml_cudnn_sdpa_shape cs;
        ml_cudnn_sdpa_shape_contiguous(&cs, dev, q->dtype, d.B, d.H, d.Sq, d.Sk, d.D, d.Dv, causal, scale);
        const int rc = ml_cudnn_sdpa_forward(out->data, lse ? ml_ptr<float>(lse) : nullptr, q->data, k->data,
                                             v->data, &cs);
        if (rc != 0) return rc < 0 ? -1 : 0;
    }
    if (const int64_t chunk = math_chunk(q->dtype, d)) {
        if (q->dtype == ML_F16)
            return math_forward(ml_ptr<ml_f16_t>(out), ml_ptr<float>(lse), ml_ptr<ml_f16_t>(q), ml_ptr<ml_f16_t>(k),
                                ml_ptr<ml_f16_t>(v), d, causal, (float)scale, chunk, dev, s);
        return math_forward(ml_ptr<ml_bf16_t>(out), ml_ptr<float>(lse), ml_ptr<ml_bf16_t>(q), ml_ptr<ml_bf16_t>(k),
                            ml_ptr<ml_bf16_t>(v), d, causal, (float)scale, chunk, dev, s);
    }
    return with_type(q->dtype, [&](auto tag) -> int {
        typedef decltype(tag) T;
        return with_width(d.D > d.Dv ? d.D : d.Dv, [&](auto w) -> int {
            return launch_forward<T, decltype(w)::value>(ml_ptr<T>(out), ml_ptr<float>(lse), ml_ptr<T>(q),
                                                         ml_ptr<T>(k), ml_ptr<T>(v), d, causal, (float)scale, dev, s);
        });
    });
}

extern "C" int ml_sdpa_backward_cuda(ml_ktensor *dq, ml_ktensor *dk, ml_ktensor *dv, const ml_ktensor *dout,
                                     const ml_ktensor *q, const ml_ktensor *k, const ml_ktensor *v,
                                     const ml_ktensor *out, const ml_ktensor *lse, bool causal, double scale) {
    dims d;
    if (check_type("sdpa backward", q->dtype) < 0 || get_dims("sdpa backward", q, k, v, &d) < 0) return -1;
    if (!dq && !dk && !dv) return 0;
    cudaStream_t s;
    if (ml_cuda_prepare(q, "sdpa backward", &s) < 0) return -1;
    if (d.B * d.H == 0) return 0;
    const int dev = q->device.index;
    if (q->dtype == ML_F16 || q->dtype == ML_BF16) {   // as in the forward
        ml_cudnn_sdpa_shape cs;
        ml_cudnn_sdpa_shape_contiguous(&cs, dev, q->dtype, d.B, d.H, d.Sq, d.Sk, d.D, d.Dv, causal, scale);
        const int rc = ml_cudnn_sdpa_backward(dq ? dq->data : nullptr, dk ? dk->data : nullptr,
                                              dv ? dv->data : nullptr, dout->data, q->data, k->data, v->data,
                                              out->data, ml_ptr<float>(lse), &cs);
        if (rc != 0) return rc < 0 ? -1 : 0;
    }
    // delta is read by the dS of dq and dk only; B*H*Sq is lse's element
    // count, so its byte size fits
    const size_t delta_bytes = (dq || dk) ? (size_t)(d.B * d.H * d.Sq) * sizeof(float) : 0;
    ml_cuda_workspace ws(dev, {delta_bytes});
    if (!ws.ok()) return -1;
    float *delta = delta_bytes > 0 ? ws.part<float>(0) : NULL;
    const int64_t chunk = math_chunk(q->dtype, d);
    int rc = with_type(q->dtype, [&](auto tag) -> int {
        typedef decltype(tag) T;
        if constexpr (!std::is_same<T, float>::value) {
            if (chunk) {
                if (delta && launch_delta(delta, ml_ptr<T>(dout), ml_ptr<T>(out), d, s) < 0) return -1;
                return math_backward(dq ? ml_ptr<T>(dq) : nullptr, dk ? ml_ptr<T>(dk) : nullptr,
                                     dv ? ml_ptr<T>(dv) : nullptr, ml_ptr<T>(dout), ml_ptr<T>(q), ml_ptr<T>(k),
                                     ml_ptr<T>(v), ml_ptr<float>(lse), delta, d, causal, (float)scale, chunk, dev, s);
            }
        }
        return with_width(d.D > d.Dv ? d.D : d.Dv, [&](auto w) -> int {
            return launch_backward<T, decltype(w)::value>(
                dq ? ml_ptr<T>(dq) : nullptr, dk ? ml_ptr<T>(dk) : nullptr, dv ? ml_ptr<T>(dv) : nullptr,
                ml_ptr<T>(dout), ml_ptr<T>(q), ml_ptr<T>(k), ml_ptr<T>(v), ml_ptr<T>(out), ml_ptr<float>(lse), delta,
                d, causal, (float)scale, dev, s);
        });
    });
    // ws goes back to the cache here, stream-ordered after the kernels above
    return rc;
}
