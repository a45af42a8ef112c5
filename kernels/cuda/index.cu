// index.cu — CUDA twins of kernels/cpu/index.c (contract in index.h).
//
// Bounds: a kernel finds the first out-of-range index (atomicMin of its
// position, which does not depend on timing) and the host reads it back,
// so a bad index is reported as the CPU reports it, before anything is
// written.  The kernels below still skip invalid indices, so memory stays
// safe whatever happens.
//
// Base: gather and index_select take indices counted from index_base (1
// from Lua).  Every kernel reads an index value v and uses the position
// v - base, computed in uint64_t so that one unsigned compare against the
// dim's size both range-checks it and rejects v < base; embedding passes 0.
//
// Forwards: embedding and index_select copy rows (the block of values
// after `dim`) in the widest word the row size and alignment allow;
// gather copies single elements.
//
// Backwards, deterministic and summing in the CPU's order:
//   rows (embedding, index_select): dx is zeroed; of the indices that point
//     at one row, the first (atomicMin, order-free) sums the dout rows of
//     all of them in index order, stopping once it has met as many as
//     point there (atomicAdd of a count, order-free).  Repeated ids (the
//     padding token of a CLIP prompt) cost one walk over the ids between
//     the first and the last occurrence.
//   gather: a thread per dx element scans the J indices along `dim` of its
//     line and sums the matches in order: O(numel(x) * J), fine for the
//     short index lines gather sees in practice.
#include "nn_util.cuh"
#include "index.h"

namespace {

// The 0-based position an index value names; >= size (as uint64_t) when
// the value is outside base..base+size-1.
__device__ __forceinline__ uint64_t position_of(int64_t v, int64_t base) { return (uint64_t)v - (uint64_t)base; }

template <typename I>
__global__ void find_bad(const I *idx, int64_t n, int64_t size, int64_t base, unsigned long long *first) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t v = idx[i];
        if (v < base || position_of(v, base) >= (uint64_t)size) atomicMin(first, (unsigned long long)i);
    }
}

template <typename U, typename I>
__global__ void __launch_bounds__(kBlock) rows_copy(U *__restrict__ dst, const U *__restrict__ src,
                                                    const I *__restrict__ idx, int64_t base, int64_t n, int64_t X,
                                                    int64_t units, int64_t total) {
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = t / units, k = t - r * units, o = r / n, i = r - o * n;
        uint64_t p = position_of(idx[i], base);
        if (p < (uint64_t)X) dst[t] = src[(o * X + (int64_t)p) * units + k];
    }
}

template <typename I>
__global__ void first_and_count(const I *idx, int64_t base, int64_t n, int64_t X, unsigned *head, unsigned *cnt) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        uint64_t p = position_of(idx[i], base);
        if (p < (uint64_t)X) {
            atomicMin(&head[p], (unsigned)i);
            atomicAdd(&cnt[p], 1u);
        }
    }
}

// dx[o, p, k] = sum over the i whose idx[i] names row p of dy[o, i, k], in
// i order; a thread per (o, i, k) of dy, working only where i is p's first
// index.  Rows are matched by the raw index value v, which is one row's.
template <typename T, typename I>
__global__ void __launch_bounds__(kBlock) rows_sum(T *__restrict__ dx, const T *__restrict__ dy, const I *__restrict__ idx,
                                                   int64_t base, const unsigned *head, const unsigned *cnt, int64_t n,
                                                   int64_t X, int64_t inner, int64_t total) {
    typedef typename ml_ctype<T>::type A;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = t / inner, k = t - r * inner, o = r / n, i = r - o * n;
        int64_t v = idx[i];
        uint64_t p = position_of(v, base);
        if (p >= (uint64_t)X || head[p] != (unsigned)i) continue;
        A acc = 0;
        unsigned left = cnt[p];
        for (int64_t j = i; left > 0 && j < n; j++)
            if (idx[j] == v) {
                acc += ml_to_c(dy[(o * n + j) * inner + k]);
                left--;
            }
        dx[(o * X + (int64_t)p) * inner + k] = ml_from_c<T>(acc);
    }
}

template <typename U, typename I, typename Idx>
__global__ void __launch_bounds__(kBlock) gather_fwd(U *__restrict__ out, const U *__restrict__ x, const I *__restrict__ idx,
                                                     int64_t base, ml_indexer<2> ix, Idx n, int64_t sdim, int64_t X) {
    for (Idx i = blockIdx.x * (Idx)blockDim.x + threadIdx.x; i < n; i += (Idx)gridDim.x * blockDim.x) {
        int64_t off[2];
        ix.offsets(i, off);
        uint64_t p = position_of(idx[off[0]], base);
        if (p < (uint64_t)X) out[off[0]] = x[off[1] + (int64_t)p * sdim];
    }
}

// dx's shape (xs), the index's shape (is) and contiguous strides (ist),
// and the value that names position 0 along dim (base).
struct gather_geo {
    int nd, dim;
    int64_t base;
    int64_t xs[ML_MAX_DIMS], is[ML_MAX_DIMS], ist[ML_MAX_DIMS];
};

template <typename T, typename I>
__global__ void __launch_bounds__(kBlock) gather_bwd(T *__restrict__ dx, const T *__restrict__ dy, const I *__restrict__ idx,
                                                     gather_geo g, int64_t total) {
    typedef typename ml_ctype<T>::type A;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
        int64_t rem = t, base = 0, k = 0;
        bool inside = true;
        for (int d = g.nd - 1; d >= 0; d--) {
            int64_t c = rem % g.xs[d];
            rem /= g.xs[d];
            if (d == g.dim) {
                k = c;
            } else {
                inside = inside && c < g.is[d];
                base += c * g.ist[d];
            }
        }
        A acc = 0;
        int64_t want = k + g.base;   // the index value naming position k (fits: the host checked base + size)
        if (inside)
            for (int64_t j = 0; j < g.is[g.dim]; j++) {
                int64_t at = base + j * g.ist[g.dim];
                if (idx[at] == want) acc += ml_to_c(dy[at]);
            }
        dx[t] = ml_from_c<T>(acc);
    }
}

// ---- host side -------------------------------------------------------------

template <typename F> int dispatch_index(const ml_ktensor *index, const char *op, F &&f) {
    if (index->dtype == ML_I32) return f(int32_t());
    if (index->dtype == ML_I64) return f(int64_t());
    return ml_error("%s (cuda): indices must be int32 or int64 (got %s)", op, ml_dtype_name(index->dtype));
}

// Calls f(T()) for the float dtypes a backward sums in.
template <typename F> int dispatch_grad(const ml_ktensor *g, const char *op, F &&f) {
    switch (g->dtype) {
    case ML_F32: return f(float());
    case ML_F64: return f(double());
    case ML_F16: return f(ml_f16_t());
    case ML_BF16: return f(ml_bf16_t());
    default: return ml_error("%s backward (cuda): gradients must be float32, float64, float16 or bfloat16, not %s", op,
                             ml_dtype_name(g->dtype));
    }
}

// -1 with the CPU's message unless every index is in base..base+size-1:
// the index values are data, which only the kernel sees.
int require_in_range(const char *op, const ml_ktensor *index, int64_t size, int64_t base, const char *what,
                     cudaStream_t s) {
    int64_t n = ml_kt_numel(index);
    if (n == 0) return 0;
    int dev = index->device.index;
    ml_cuda_workspace ws(dev, {sizeof(unsigned long long)});
    if (!ws.ok()) return -1;
    unsigned long long *first = ws.part<unsigned long long>(0);
    unsigned long long at = 0;
    ML_CUDA_TRY(cudaMemsetAsync(first, 0xff, sizeof *first, s));
    if (dispatch_index(index, op, [&](auto tag) -> int {
            typedef decltype(tag) I;
            find_bad<<<ml_grid_for(n, kBlock, dev), kBlock, 0, s>>>(ml_ptr<I>(index), n, size, base, first);
            ML_CUDA_LAUNCHED("find_bad");
            return 0;
        }) < 0)
        return -1;
    ML_CUDA_TRY(cudaMemcpyAsync(&at, first, sizeof at, cudaMemcpyDeviceToHost, s));
    ML_CUDA_TRY(cudaStreamSynchronize(s));
    if (at == ~0ull) return 0;
    int64_t v = 0;
    size_t es = ml_dtype_size(index->dtype);
    char buf[8];
    ML_CUDA_TRY(cudaMemcpyAsync(buf, (const char *)index->data + at * es, es, cudaMemcpyDeviceToHost, s));
    ML_CUDA_TRY(cudaStreamSynchronize(s));
    if (es == 4) {
        int32_t v32;
        memcpy(&v32, buf, 4);
        v = v32;
    } else {
        memcpy(&v, buf, 8);
    }
    return ml_index_range_error(op, v, (int64_t)at, what, size, base);
}

int64_t prod_range(const ml_ktensor *t, int from, int to) {
    int64_t p = 1;
    for (int i = from; i < to; i++) p *= t->shape[i];
    return p;
}

// out[o, i, :] = x[o, index[i] - base, :] for rows of `inner` values; x
// holds X rows per o.
int rows_forward(const char *op, ml_ktensor *out, const ml_ktensor *x, const ml_ktensor *index, int64_t base,
                 int64_t outer, int64_t X, int64_t inner, cudaStream_t s) {
    int64_t n = ml_kt_numel(index);
    size_t rb = (size_t)inner * ml_dtype_size(x->dtype);
    if (outer * n * inner == 0) return 0;
    int dev = x->device.index;
    return with_unit(rb, {out->data, x->data}, [&](auto u) -> int {
        typedef decltype(u) U;
        int64_t units = (int64_t)(rb / sizeof(U)), total = outer * n * units;
        return dispatch_index(index, op, [&](auto tag) -> int {
            typedef decltype(tag) I;
            rows_copy<<<ml_grid_for(total, kBlock, dev), kBlock, 0, s>>>((U *)out->data, (const U *)x->data,
                                                                         ml_ptr<I>(index), base, n, X, units, total);
            ML_CUDA_LAUNCHED("rows_copy");
            return 0;
        });
    });
}

// dx[o, p, :] = sum of dout[o, i, :] over the i with index[i] - base == p.
int rows_backward(const char *op, ml_ktensor *dx, const ml_ktensor *dout, const ml_ktensor *index, int64_t base,
                  int64_t outer, int64_t X, int64_t inner, cudaStream_t s) {
    int64_t n = ml_kt_numel(index);
    int dev = dx->device.index;
    size_t es = ml_dtype_size(dx->dtype);
    if (ml_kt_numel(dx) > 0) ML_CUDA_TRY(cudaMemsetAsync(dx->data, 0, (size_t)ml_kt_numel(dx) * es, s));
    if (outer * n * inner == 0) return 0;
    if (n >= (int64_t)UINT32_MAX) return ml_error("%s backward (cuda): more than 2^32 - 2 indices", op);
    ml_cuda_workspace ws(dev, {(size_t)X * 4, (size_t)X * 4});
    if (!ws.ok()) return -1;
    unsigned *head = ws.part<unsigned>(0), *cnt = ws.part<unsigned>(1);
    ML_CUDA_TRY(cudaMemsetAsync(head, 0xff, (size_t)X * 4, s));
    ML_CUDA_TRY(cudaMemsetAsync(cnt, 0, (size_t)X * 4, s));
    return dispatch_index(index, op, [&](auto itag) -> int {
        typedef decltype(itag) I;
        const I *ip = ml_ptr<I>(index);
        first_and_count<<<ml_grid_for(n, kBlock, dev), kBlock, 0, s>>>(ip, base, n, X, head, cnt);
        ML_CUDA_LAUNCHED("first_and_count");
        return dispatch_grad(dx, op, [&](auto gtag) -> int {
            typedef decltype(gtag) T;
            int64_t total = outer * n * inner;
            rows_sum<<<ml_grid_for(total, kBlock, dev), kBlock, 0, s>>>(ml_ptr<T>(dx), ml_ptr<T>(dout), ip, base, head,
                                                                        cnt, n, X, inner, total);
            ML_CUDA_LAUNCHED("rows_sum");
            return 0;
        });
    });
}

}  // namespace

// ---- embedding ---------------------------------------------------------------

extern "C" int ml_embedding_forward_cuda(ml_ktensor *out, const ml_ktensor *weight, const ml_ktensor *ids) {
    const char *op = "embedding";
    cudaStream_t s;
    if (ml_cuda_prepare(weight, op, &s) < 0) return -1;
    int64_t V = weight->shape[0], D = weight->shape[1];
    if (require_in_range(op, ids, V, 0, "a vocabulary of", s) < 0) return -1;
    return rows_forward(op, out, weight, ids, 0, 1, V, D, s);
}

extern "C" int ml_embedding_backward_cuda(ml_ktensor *dweight, const ml_ktensor *dout, const ml_ktensor *ids) {
    const char *op = "embedding";
    cudaStream_t s;
    if (ml_cuda_prepare(dweight, op, &s) < 0) return -1;
    int64_t V = dweight->shape[0], D = dweight->shape[1];
    if (dispatch_grad(dweight, op, [](auto) { return 0; }) < 0 ||
        require_in_range(op, ids, V, 0, "a vocabulary of", s) < 0)
        return -1;
    return rows_backward(op, dweight, dout, ids, 0, 1, V, D, s);
}

// ---- gather --------------------------------------------------------------------

extern "C" int ml_gather_forward_cuda(ml_ktensor *out, const ml_ktensor *x, int dim, const ml_ktensor *index,
                                      int64_t index_base) {
    const char *op = "gather";
    cudaStream_t s;
    if (ml_cuda_prepare(x, op, &s) < 0) return -1;
    if (require_in_range(op, index, x->shape[dim], index_base, "a dim of size", s) < 0) return -1;
    int64_t n = ml_kt_numel(index);
    if (n == 0) return 0;
    int64_t xs[ML_MAX_DIMS], is[ML_MAX_DIMS];
    ml_kt_contiguous_strides(x->ndim, x->shape, xs);
    ml_kt_contiguous_strides(index->ndim, index->shape, is);
    int64_t sdim = xs[dim];
    xs[dim] = 0;   // the index supplies that coordinate
    const int64_t *strides[2] = {is, xs};
    ml_indexer<2> ix;
    ml_indexer_make(&ix, index->ndim, index->shape, strides);
    int dev = x->device.index;
    auto run = [&](auto u) -> int {
        typedef decltype(u) U;
        return dispatch_index(index, op, [&](auto tag) -> int {
            typedef decltype(tag) I;
            unsigned grid = ml_grid_for(n, kBlock, dev);
            U *o = ml_ptr<U>(out);
            const U *xp = ml_ptr<U>(x);
            if (ml_fits_u32(n))
                gather_fwd<<<grid, kBlock, 0, s>>>(o, xp, ml_ptr<I>(index), index_base, ix, (uint32_t)n, sdim,
                                                   x->shape[dim]);
            else
                gather_fwd<<<grid, kBlock, 0, s>>>(o, xp, ml_ptr<I>(index), index_base, ix, n, sdim, x->shape[dim]);
            ML_CUDA_LAUNCHED("gather_fwd");
            return 0;
        });
    };
    switch (ml_dtype_size(x->dtype)) {
    case 1: return run(uint8_t());
    case 2: return run(uint16_t());
    case 4: return run(uint32_t());
    case 8: return run(uint64_t());
    default: return ml_error("gather (cuda): unsupported element size of %s", ml_dtype_name(x->dtype));
    }
}

extern "C" int ml_gather_backward_cuda(ml_ktensor *dx, const ml_ktensor *dout, int dim, const ml_ktensor *index,
                                       int64_t index_base) {
    const char *op = "gather";
    cudaStream_t s;
    if (ml_cuda_prepare(dx, op, &s) < 0) return -1;
    if (dispatch_grad(dx, op, [](auto) { return 0; }) < 0 ||
        require_in_range(op, index, dx->shape[dim], index_base, "a dim of size", s) < 0)
        return -1;
    int64_t total = ml_kt_numel(dx);
    if (total == 0) return 0;
    gather_geo g;
    g.nd = dx->ndim;
    g.dim = dim;
    g.base = index_base;
    for (int d = 0; d < g.nd; d++) {
        g.xs[d] = dx->shape[d];
        g.is[d] = index->shape[d];
    }
    ml_kt_contiguous_strides(index->ndim, index->shape, g.ist);
    int dev = dx->device.index;
    return dispatch_index(index, op, [&](auto itag) -> int {
        typedef decltype(itag) I;
        return dispatch_grad(dx, op, [&](auto gtag) -> int {
            typedef decltype(gtag) T;
            gather_bwd<<<ml_grid_for(total, kBlock, dev), kBlock, 0, s>>>(ml_ptr<T>(dx), ml_ptr<T>(dout),
                                                                          ml_ptr<I>(index), g, total);
            ML_CUDA_LAUNCHED("gather_bwd");
            return 0;
        });
    });
}

// ---- index_select ----------------------------------------------------------------

extern "C" int ml_index_select_forward_cuda(ml_ktensor *out, const ml_ktensor *x, int dim, const ml_ktensor *index,
                                            int64_t index_base) {
    const char *op = "index_select";
    cudaStream_t s;
    if (ml_cuda_prepare(x, op, &s) < 0) return -1;
    int64_t outer = prod_range(x, 0, dim), inner = prod_range(x, dim + 1, x->ndim);
    if (require_in_range(op, index, x->shape[dim], index_base, "a dim of size", s) < 0) return -1;
    return rows_forward(op, out, x, index, index_base, outer, x->shape[dim], inner, s);
}

extern "C" int ml_index_select_backward_cuda(ml_ktensor *dx, const ml_ktensor *dout, int dim, const ml_ktensor *index,
                                             int64_t index_base) {
    const char *op = "index_select";
    cudaStream_t s;
    if (ml_cuda_prepare(dx, op, &s) < 0) return -1;
    int64_t outer = prod_range(dx, 0, dim), inner = prod_range(dx, dim + 1, dx->ndim);
    if (dispatch_grad(dx, op, [](auto) { return 0; }) < 0 ||
        require_in_range(op, index, dx->shape[dim], index_base, "a dim of size", s) < 0)
        return -1;
    return rows_backward(op, dx, dout, index, index_base, outer, dx->shape[dim], inner, s);
}
