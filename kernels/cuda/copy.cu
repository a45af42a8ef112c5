// copy.cu — moving bytes to, from and between GPUs (ml_cuda_memcpy, for
// host/device.c), and the CUDA twins of the copy and fill kernels
// (contract in kernels/copy.h).  Conversions round exactly as the CPU's
// copy does (common.cuh), so t:to("cuda"):to(dtype):to("cpu") equals
// t:to(dtype).
#include "common.cuh"
#include "copy.h"
#include "checked_math.h"

namespace {

constexpr int kThreads = 256;

// ---- kernels ---------------------------------------------------------------

template <typename D, typename S>
__global__ void convert_contig(D *__restrict__ dst, const S *__restrict__ src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = ml_cvt<D, S>(src[i]);
}

// The same with V elements per load and store (16 bytes of the wider
// type): a conversion moves 6 bytes per bf16 -> f32 element, and one
// 2-byte load per thread ran it at a third of the card's bandwidth (the
// weight gradients' bf16 -> f32 conversions of a bf16-mixed step, 882
// calls, 5.6 ms on an H100).  Each element converts as above: same bits.
template <typename T, int V> struct alignas(sizeof(T) * V) cvt_vec { T v[V]; };

template <int V, typename D, typename S>
__global__ void convert_contig_vec(D *__restrict__ dst, const S *__restrict__ src, int64_t n) {
    int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, step = (int64_t)gridDim.x * blockDim.x;
    int64_t nv = n / V;
    for (int64_t i = t; i < nv; i += step) {
        cvt_vec<S, V> a = reinterpret_cast<const cvt_vec<S, V> *>(src)[i];
        cvt_vec<D, V> r;
#pragma unroll
        for (int k = 0; k < V; k++) r.v[k] = ml_cvt<D, S>(a.v[k]);
        reinterpret_cast<cvt_vec<D, V> *>(dst)[i] = r;
    }
    for (int64_t i = nv * V + t; i < n; i += step) dst[i] = ml_cvt<D, S>(src[i]);
}

template <typename D, typename S, typename Idx>
__global__ void convert_strided(D *dst, const S *src, ml_indexer<2> ix, Idx n) {
    for (Idx i = blockIdx.x * (Idx)blockDim.x + threadIdx.x; i < n; i += (Idx)gridDim.x * blockDim.x) {
        int64_t off[2];
        ix.offsets(i, off);
        dst[off[0]] = ml_cvt<D, S>(src[off[1]]);
    }
}

// Same dtype: only the element width matters, which keeps the number of
// kernel instances small.
template <typename U, typename Idx>
__global__ void copy_bits_strided(U *dst, const U *src, ml_indexer<2> ix, Idx n) {
    for (Idx i = blockIdx.x * (Idx)blockDim.x + threadIdx.x; i < n; i += (Idx)gridDim.x * blockDim.x) {
        int64_t off[2];
        ix.offsets(i, off);
        dst[off[0]] = src[off[1]];
    }
}

// A transposing copy: dims a (unit stride in dst) and b (unit stride in
// src) go through a 32x32 tile in shared memory, so both the reads (along
// b) and the writes (along a) are coalesced; the other dims are a batch
// (blockIdx.z, grid-stride).  Used for permute(...):contiguous() and the
// like, which the element-wise strided kernel reads scattered.
constexpr int kTile = 32, kTileRows = 8;

struct transpose_plan {
    ml_indexer<2> rest;      // batch index -> (dst, src) base offsets
    int64_t nrest, na, nb;
    int64_t dst_b, src_a;    // dst stride along b, src stride along a
};

template <typename U> __global__ void __launch_bounds__(kTile *kTileRows) copy_transpose(U *dst, const U *src, transpose_plan p) {
    __shared__ U tile[kTile][kTile + 1];
    int64_t a0 = (int64_t)blockIdx.x * kTile, b0 = (int64_t)blockIdx.y * kTile;
    int tx = threadIdx.x, ty = threadIdx.y;
    for (int64_t r = blockIdx.z; r < p.nrest; r += gridDim.z) {
        int64_t off[2];
        p.rest.offsets(r, off);
        for (int j = ty; j < kTile; j += kTileRows) {
            int64_t a = a0 + j, b = b0 + tx;
            if (a < p.na && b < p.nb) tile[j][tx] = src[off[1] + a * p.src_a + b];
        }
        __syncthreads();
        for (int j = ty; j < kTile; j += kTileRows) {
            int64_t b = b0 + j, a = a0 + tx;
            if (a < p.na && b < p.nb) dst[off[0] + a + b * p.dst_b] = tile[tx][j];
        }
        __syncthreads();
    }
}

template <typename U> __global__ void fill_contig(U *dst, U v, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = v;
}

template <typename U, typename Idx> __global__ void fill_strided(U *dst, U v, ml_indexer<1> ix, Idx n) {
    for (Idx i = blockIdx.x * (Idx)blockDim.x + threadIdx.x; i < n; i += (Idx)gridDim.x * blockDim.x) {
        int64_t off[1];
        ix.offsets(i, off);
        dst[off[0]] = v;
    }
}

// ---- helpers ---------------------------------------------------------------

// Calls f(U{}) with U an unsigned integer type of the given byte width.
template <typename F> int dispatch_width(size_t w, F &&f) {
    switch (w) {
    case 1: return f(uint8_t());
    case 2: return f(uint16_t());
    case 4: return f(uint32_t());
    case 8: return f(uint64_t());
    default: return ml_error("cuda copy: unsupported element size %zu", w);
    }
}

// Byte range [lo, hi) a tensor's elements can touch.
void byte_span(const ml_ktensor *t, uintptr_t *lo, uintptr_t *hi) {
    int64_t es = (int64_t)ml_dtype_size(t->dtype);
    int64_t min_off = 0, max_off = 0;
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] == 0) { *lo = *hi = 0; return; }
        int64_t span = (t->shape[d] - 1) * t->strides[d];
        if (span < 0) min_off += span; else max_off += span;
    }
    uintptr_t base = (uintptr_t)t->data;
    *lo = base + (uintptr_t)(min_off * es);
    *hi = base + (uintptr_t)((max_off + 1) * es);
}

bool same_view(const ml_ktensor *a, const ml_ktensor *b) {
    if (a->data != b->data || a->dtype != b->dtype || a->ndim != b->ndim) return false;
    for (int d = 0; d < a->ndim; d++)
        if (a->shape[d] != b->shape[d] || (a->shape[d] > 1 && a->strides[d] != b->strides[d])) return false;
    return true;
}

// A transpose plan if the merged dims have one with unit stride in dst and
// another with unit stride in src, both long enough to fill tiles.
bool plan_transpose(const ml_indexer<2> &ix, transpose_plan *p) {
    int a = -1, b = -1;
    for (int d = 0; d < ix.ndim; d++) {
        if (ix.stride[0][d] == 1) a = d;
        if (ix.stride[1][d] == 1) b = d;
    }
    if (a < 0 || b < 0 || a == b || ix.size[a] < 16 || ix.size[b] < 16) return false;
    int64_t shape[ML_MAX_DIMS], ds[ML_MAX_DIMS], ss[ML_MAX_DIMS];
    int nd = 0;
    p->nrest = 1;
    for (int d = 0; d < ix.ndim; d++) {
        if (d == a || d == b) continue;
        shape[nd] = ix.size[d];
        ds[nd] = ix.stride[0][d];
        ss[nd] = ix.stride[1][d];
        p->nrest *= ix.size[d];
        nd++;
    }
    const int64_t *st[2] = {ds, ss};
    ml_indexer_make(&p->rest, nd, shape, st);
    p->na = ix.size[a];
    p->nb = ix.size[b];
    p->dst_b = ix.stride[0][b];
    p->src_a = ix.stride[1][a];
    return true;
}

// dst <- src on one device; the two do not overlap in memory.
int copy_disjoint(ml_ktensor *dst, const ml_ktensor *src, cudaStream_t s) {
    int dev = dst->device.index;
    int64_t n = ml_kt_numel(dst);
    const int64_t *strides[2] = {dst->strides, src->strides};
    ml_indexer<2> ix;
    ml_indexer_make(&ix, dst->ndim, dst->shape, strides);
    bool contig = ml_indexer_contiguous(ix);
    unsigned grid = ml_grid_for(n, kThreads, dev);

    if (dst->dtype == src->dtype) {
        size_t es = ml_dtype_size(dst->dtype);
        if (contig) {
            ML_CUDA_TRY(cudaMemcpyAsync(dst->data, src->data, (size_t)n * es,
                                        cudaMemcpyDeviceToDevice, s));
            return 0;
        }
        transpose_plan tp;
        bool transpose = plan_transpose(ix, &tp) && (tp.nb + kTile - 1) / kTile <= 65535;
        return dispatch_width(es, [&](auto u) -> int {
            typedef decltype(u) U;
            if (transpose) {
                dim3 grid3((unsigned)((tp.na + kTile - 1) / kTile), (unsigned)((tp.nb + kTile - 1) / kTile),
                           (unsigned)(tp.nrest < 65535 ? tp.nrest : 65535));
                copy_transpose<U><<<grid3, dim3(kTile, kTileRows), 0, s>>>(ml_ptr<U>(dst), ml_ptr<U>(src), tp);
                ML_CUDA_LAUNCHED("copy_transpose");
                return 0;
            }
            if (ml_fits_u32(n))
                copy_bits_strided<U, uint32_t><<<grid, kThreads, 0, s>>>(
                    ml_ptr<U>(dst), ml_ptr<U>(src), ix, (uint32_t)n);
            else
                copy_bits_strided<U, int64_t><<<grid, kThreads, 0, s>>>(
                    ml_ptr<U>(dst), ml_ptr<U>(src), ix, n);
            ML_CUDA_LAUNCHED("copy_bits_strided");
            return 0;
        });
    }
    return ml_dispatch_all(dst->dtype, [&](auto dtag) -> int {
        typedef decltype(dtag) D;
        return ml_dispatch_all(src->dtype, [&](auto stag) -> int {
            typedef decltype(stag) S;
            constexpr int V = (int)(16 / (sizeof(D) > sizeof(S) ? sizeof(D) : sizeof(S)));
            D *d = ml_ptr<D>(dst);
            const S *sp = ml_ptr<S>(src);
            if (contig && V > 1 && (uintptr_t)d % (sizeof(D) * V) == 0 && (uintptr_t)sp % (sizeof(S) * V) == 0) {
                convert_contig_vec<V, D, S><<<ml_grid_for((n + V - 1) / V, kThreads, dev), kThreads, 0, s>>>(d, sp, n);
                ML_CUDA_LAUNCHED("convert_contig_vec");
                return 0;
            }
            if (contig)
                convert_contig<D, S><<<grid, kThreads, 0, s>>>(d, sp, n);
            else if (ml_fits_u32(n))
                convert_strided<D, S, uint32_t><<<grid, kThreads, 0, s>>>(
                    ml_ptr<D>(dst), ml_ptr<S>(src), ix, (uint32_t)n);
            else
                convert_strided<D, S, int64_t><<<grid, kThreads, 0, s>>>(
                    ml_ptr<D>(dst), ml_ptr<S>(src), ix, n);
            ML_CUDA_LAUNCHED(contig ? "convert_contig" : "convert_strided");
            return 0;
        });
    });
}

}  // namespace

extern "C" int ml_cuda_memcpy(void *dst, ml_device ddev, const void *src, ml_device sdev, size_t n) {
    if (n == 0) return 0;
    cudaStream_t s;
    if (ddev.type == ML_CPU && sdev.type == ML_CPU) {
        memmove(dst, src, n);
        return 0;
    }
    if (sdev.type == ML_CPU) {   // host -> device
        if (ml_cuda_enter(ddev.index, &s) < 0) return -1;
        ML_CUDA_TRY(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, s));
        // From pageable memory the call returns once the bytes are staged, so
        // the caller may reuse its buffer.  From pinned memory the DMA reads
        // the buffer later: wait, or the caller could overwrite it first.
        cudaPointerAttributes a;
        if (cudaPointerGetAttributes(&a, src) != cudaSuccess) cudaGetLastError();
        else if (a.type == cudaMemoryTypeHost) ML_CUDA_TRY(cudaStreamSynchronize(s));
        return 0;
    }
    if (ddev.type == ML_CPU) {   // device -> host: synchronous, as device.h promises
        if (ml_cuda_enter(sdev.index, &s) < 0) return -1;
        ML_CUDA_TRY(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, s));
        ML_CUDA_TRY(cudaStreamSynchronize(s));
        return 0;
    }
    if (ddev.index == sdev.index) {
        if (ml_cuda_enter(sdev.index, &s) < 0) return -1;
        ML_CUDA_TRY(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, s));
        return 0;
    }
    // Between GPUs: the destination's queued users must be done with it, and
    // the source's stream orders the copy after the source was written.
    // Rare (model placement), so plain synchronisation rather than events.
    cudaStream_t ds;
    if (ml_cuda_enter(ddev.index, &ds) < 0) return -1;
    ML_CUDA_TRY(cudaStreamSynchronize(ds));
    if (ml_cuda_enter(sdev.index, &s) < 0) return -1;
    ML_CUDA_TRY(cudaMemcpyPeerAsync(dst, ddev.index, src, sdev.index, n, s));
    ML_CUDA_TRY(cudaStreamSynchronize(s));
    return 0;
}

extern "C" int ml_copy_cuda(ml_ktensor *dst, const ml_ktensor *src) {
    if (ml_kt_numel(dst) == 0 || same_view(dst, src)) return 0;
    cudaStream_t s;
    if (ml_cuda_prepare(dst, "copy", &s) < 0) return -1;

    uintptr_t dlo, dhi, slo, shi;
    byte_span(dst, &dlo, &dhi);
    byte_span(src, &slo, &shi);
    if (dlo < shi && slo < dhi) {
        // Overlapping views of one buffer: read everything before writing.
        size_t bytes;
        if (!ml_mul_size((size_t)ml_kt_numel(src), ml_dtype_size(src->dtype), &bytes)) {
            char b[160];
            return ml_error("copy: a staging copy of %s %s would need more than 2^64 bytes",
                            ml_kt_shape_str(src, b, sizeof b), ml_dtype_name(src->dtype));
        }
        ml_cuda_workspace ws(dst->device.index, {bytes});
        if (!ws.ok()) return -1;
        ml_ktensor tmp = *src;
        tmp.data = ws.part<char>(0);
        ml_kt_contiguous_strides(tmp.ndim, tmp.shape, tmp.strides);
        int rc = copy_disjoint(&tmp, src, s);
        return rc == 0 ? copy_disjoint(dst, &tmp, s) : rc;
    }
    return copy_disjoint(dst, src, s);
}

extern "C" int ml_fill_cuda(ml_ktensor *t, double v) {
    int64_t n = ml_kt_numel(t);
    if (n == 0) return 0;
    cudaStream_t s;
    if (ml_cuda_prepare(t, "fill", &s) < 0) return -1;
    // Encode once on the host with the CPU's conversion; the kernel only
    // stores bits.
    uint64_t bits = 0;
    ml_store_from_double(&bits, t->dtype, 0, v);
    size_t es = ml_dtype_size(t->dtype);
    const int64_t *strides[1] = {t->strides};
    ml_indexer<1> ix;
    ml_indexer_make(&ix, t->ndim, t->shape, strides);
    bool contig = ml_indexer_contiguous(ix);
    if (contig && (bits == 0 || es == 1)) {
        ML_CUDA_TRY(cudaMemsetAsync(t->data, (int)(bits & 0xff), (size_t)n * es, s));
        return 0;
    }
    unsigned grid = ml_grid_for(n, kThreads, t->device.index);
    return dispatch_width(es, [&](auto u) -> int {
        typedef decltype(u) U;
        U val;
        memcpy(&val, &bits, sizeof val);
        if (contig)
            fill_contig<U><<<grid, kThreads, 0, s>>>(ml_ptr<U>(t), val, n);
        else if (ml_fits_u32(n))
            fill_strided<U, uint32_t><<<grid, kThreads, 0, s>>>(ml_ptr<U>(t), val, ix, (uint32_t)n);
        else
            fill_strided<U, int64_t><<<grid, kThreads, 0, s>>>(ml_ptr<U>(t), val, ix, n);
        ML_CUDA_LAUNCHED(contig ? "fill_contig" : "fill_strided");
        return 0;
    });
}
