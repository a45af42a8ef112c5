// matmul.cu — CUDA twins of kernels/cpu/matmul.c over cuBLASLt (contract
// in matmul.h).
//
// Row-major products are handed to column-major cuBLASLt as their
// transposes: c = op(a) op(b) is c^T = op(b)^T op(a)^T, so b becomes the
// library's A operand, a its B, and a transposed operand is a transpose
// flag, never a copy.  Batches follow the CPU kernel: folded into one GEMM
// where the layout allows (a shared right operand is just more rows; a
// batch-summed gradient with a^T is just more of K), otherwise one
// strided-batched call with batch stride 0 for a shared operand.  A product
// summed over the batch that cannot fold is computed per batch into a
// scratch buffer (f32 for the half types) and reduced in double by the
// column-sum kernel, so the sum is rounded once.
//
// The algorithm of each distinct call (shapes, strides, alignment, dtype,
// epilogue) is chosen once by cuBLASLt's heuristic and cached.  Linear's
// bias is the BIAS epilogue; where no algorithm offers it, the rows of the
// output are filled with the bias and the GEMM adds onto them.
#include "common.cuh"
#include "blas.h"
#include "matmul.h"
#include "gemm.h"
#include "checked_math.h"

#include <algorithm>
#include <climits>
#include <map>
#include <mutex>

namespace {

constexpr int kThreads = 256;

// ---- small kernels -------------------------------------------------------

// c[p, i, j] = beta c[p, i, j] + bias[j] (bias may be NULL; beta 0 ignores
// what c held, NaN included, as BLAS does).
template <typename T>
__global__ void scale_add_rows(T *c, int64_t ldc, int64_t sc, int64_t batch, int64_t m, int64_t n,
                               double beta, const T *bias) {
    typedef typename ml_ctype<T>::type C;
    int64_t total = batch * m * n;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t j = i % n, r = (i / n) % m, p = i / (m * n);
        T *e = c + p * sc + r * ldc + j;
        C v = beta == 0 ? C(0) : ml_to_c(*e) * (C)beta;
        if (bias) v += ml_to_c(bias[j]);
        *e = ml_from_c<T>(v);
    }
}

// Column sums, pass 1: block (32, kRowLanes) sums rows [y*chunk, (y+1)*chunk)
// of 32 columns into ws[y, col]; lanes along x read consecutive columns.
constexpr int kRowLanes = 8;

template <typename T>
__global__ void colsum_partial(const T *__restrict__ a, int64_t m, int64_t n, int64_t chunk, double *ws) {
    __shared__ double part[kRowLanes][33];
    int64_t j = blockIdx.x * 32 + threadIdx.x;
    int64_t r0 = blockIdx.y * chunk, r1 = min(m, r0 + chunk);
    double acc = 0;
    if (j < n)
        for (int64_t i = r0 + threadIdx.y; i < r1; i += kRowLanes) acc += (double)ml_ld(a[i * n + j]);
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < n) {
        double t = 0;
        for (int y = 0; y < kRowLanes; y++) t += part[y][threadIdx.x];
        ws[blockIdx.y * n + j] = t;
    }
}

// Pass 2: s[j] (+)= sum over the splits, rounded once.
template <typename T>
__global__ void colsum_finish(const double *ws, int64_t splits, int64_t n, T *s, bool accumulate) {
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n; j += (int64_t)gridDim.x * blockDim.x) {
        double t = 0;
        for (int64_t y = 0; y < splits; y++) t += ws[y * n + j];
        if (accumulate) t += (double)ml_ld(s[j]);
        s[j] = ml_st<T>::from(t);
    }
}

// ---- cuBLASLt --------------------------------------------------------------

int lt_fail(cublasStatus_t st, const char *what) {
    return ml_error("cuBLASLt error (%s): %s [%s]", what, cublasGetStatusString(st), cublasGetStatusName(st));
}

#define LT_TRY(call)                                                   \
    do {                                                               \
        cublasStatus_t lt_st_ = (call);                                \
        if (lt_st_ != CUBLAS_STATUS_SUCCESS) return lt_fail(lt_st_, #call); \
    } while (0)

struct lt_types {
    cudaDataType_t data, scale;
    cublasComputeType_t compute;
};

// True f32 compute for f32 (no TF32), f32 accumulation for the half types.
lt_types types_of(ml_dtype dt) {
    switch (dt) {
    case ML_F64: return {CUDA_R_64F, CUDA_R_64F, CUBLAS_COMPUTE_64F};
    case ML_F16: return {CUDA_R_16F, CUDA_R_32F, CUBLAS_COMPUTE_32F};
    case ML_BF16: return {CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F};
    default: return {CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F};
    }
}

// The alignment cuBLASLt may assume of a buffer: the largest power of two
// (up to its default of 256) dividing the address and, for a batched
// operand, the batch stride in bytes.
uint32_t alignment(const void *p, int64_t stride_bytes) {
    uintptr_t v = (uintptr_t)p | (uintptr_t)stride_bytes;
    if (v == 0) return 256;
    uintptr_t low = v & (~v + 1);
    return low >= 256 ? 256u : (uint32_t)low;
}

// One call, in cuBLASLt's column-major terms.
struct lt_call {
    int dev;
    ml_dtype dt, ct;               // dtype of a and b, of c
    bool ta, tb;                   // row-major flags of the caller's a and b
    int64_t m, n, k;               // row-major sizes of the caller
    double alpha, beta;
    const void *a; int64_t lda, sa;
    const void *b; int64_t ldb, sb;
    void *c; int64_t ldc, sc;
    int64_t batch;
    const void *bias;              // used only through the epilogue
};

struct algo_key {
    int64_t v[20];
    bool operator<(const algo_key &o) const { return std::lexicographical_compare(v, v + 20, o.v, o.v + 20); }
};

struct algo_entry {
    bool found;
    cublasLtMatmulHeuristicResult_t result;
};

std::mutex g_algo_mu;
std::map<algo_key, algo_entry> g_algos;

// Descriptors of one call, destroyed with the object.
struct lt_descs {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
    ~lt_descs() {
        if (lc) cublasLtMatrixLayoutDestroy(lc);
        if (lb) cublasLtMatrixLayoutDestroy(lb);
        if (la) cublasLtMatrixLayoutDestroy(la);
        if (op) cublasLtMatmulDescDestroy(op);
    }
};

int make_layout(cublasLtMatrixLayout_t *l, cudaDataType_t t, int64_t rows, int64_t cols, int64_t ld,
                int64_t batch, int64_t stride) {
    LT_TRY(cublasLtMatrixLayoutCreate(l, t, (uint64_t)rows, (uint64_t)cols, ld));
    if (batch > 1) {
        int32_t count = (int32_t)batch;
        LT_TRY(cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count));
        LT_TRY(cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                sizeof stride));
    }
    return 0;
}

// Runs the call with the bias epilogue when `epilogue`.  Returns 1 (nothing
// done, no error) when cuBLASLt has no algorithm for it.
int lt_run(const lt_call &g, bool epilogue, cudaStream_t stream) {
    cublasLtHandle_t lt = ml_cublaslt_handle(g.dev);
    size_t ws_bytes = 0;
    void *ws = lt ? ml_cublas_workspace(g.dev, &ws_bytes) : nullptr;
    if (!ws) return -1;
    lt_types ty = types_of(g.dt);
    size_t es = ml_dtype_size(g.dt), esc = ml_dtype_size(g.ct);

    // The library's A is our b, its B our a; D = C is our c transposed.
    lt_descs d;
    cublasOperation_t opa = g.tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = g.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    LT_TRY(cublasLtMatmulDescCreate(&d.op, ty.compute, ty.scale));
    LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
    LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
    if (epilogue) {
        cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
        LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep));
        LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof g.bias));
    }
    if (make_layout(&d.la, ty.data, g.tb ? g.k : g.n, g.tb ? g.n : g.k, g.ldb, g.batch, g.sb) < 0 ||
        make_layout(&d.lb, ty.data, g.ta ? g.m : g.k, g.ta ? g.k : g.m, g.lda, g.batch, g.sa) < 0 ||
        make_layout(&d.lc, types_of(g.ct).data, g.n, g.m, g.ldc, g.batch, g.sc) < 0)
        return -1;

    bool batched = g.batch > 1;
    uint32_t al_a = alignment(g.b, batched ? g.sb * (int64_t)es : 0);
    uint32_t al_b = alignment(g.a, batched ? g.sa * (int64_t)es : 0);
    uint32_t al_c = alignment(g.c, batched ? g.sc * (int64_t)esc : 0);
    uint32_t al_bias = epilogue ? alignment(g.bias, 0) : 0;
    algo_key key = {{g.dev, (int64_t)g.dt * 16 + g.ct, g.ta, g.tb, g.m, g.n, g.k, g.lda, g.ldb, g.ldc, g.batch,
                     batched ? g.sa : 0, batched ? g.sb : 0, batched ? g.sc : 0, epilogue, al_a, al_b, al_c,
                     al_bias, (int64_t)ws_bytes}};
    algo_entry entry;
    {
        std::lock_guard<std::mutex> lock(g_algo_mu);
        auto it = g_algos.find(key);
        if (it != g_algos.end()) {
            entry = it->second;
        } else {
            cublasLtMatmulPreference_t pref;
            LT_TRY(cublasLtMatmulPreferenceCreate(&pref));
            uint64_t max_ws = ws_bytes;
            cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                                     &max_ws, sizeof max_ws);
            const cublasLtMatmulPreferenceAttributes_t attr[4] = {
                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
            const uint32_t al[4] = {al_a, al_b, al_c, al_c};
            for (int i = 0; i < 4 && st == CUBLAS_STATUS_SUCCESS; i++)
                st = cublasLtMatmulPreferenceSetAttribute(pref, attr[i], &al[i], sizeof al[i]);
            int found = 0;
            if (st == CUBLAS_STATUS_SUCCESS)
                st = cublasLtMatmulAlgoGetHeuristic(lt, d.op, d.la, d.lb, d.lc, d.lc, pref, 1, &entry.result, &found);
            cublasLtMatmulPreferenceDestroy(pref);
            // An epilogue the library cannot do for these types may be
            // refused with other codes than NOT_SUPPORTED: the caller then
            // falls back to the plain product.
            if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED && !epilogue)
                return lt_fail(st, "cublasLtMatmulAlgoGetHeuristic");
            entry.found = st == CUBLAS_STATUS_SUCCESS && found > 0;
            g_algos[key] = entry;
        }
    }
    if (!entry.found) return 1;

    float alpha_f = (float)g.alpha, beta_f = (float)g.beta;
    const void *alpha = ty.scale == CUDA_R_64F ? (const void *)&g.alpha : (const void *)&alpha_f;
    const void *beta = ty.scale == CUDA_R_64F ? (const void *)&g.beta : (const void *)&beta_f;
    LT_TRY(cublasLtMatmul(lt, d.op, alpha, g.b, d.la, g.a, d.lb, beta, g.c, d.lc, g.c, d.lc, &entry.result.algo, ws,
                          entry.result.workspaceSize, stream));
    return 0;
}

int launch_scale_add_rows(int dev, cudaStream_t s, ml_dtype dt, void *c, int64_t ldc, int64_t sc, int64_t batch,
                          int64_t m, int64_t n, double beta, const void *bias) {
    if (batch == 0 || m == 0 || n == 0) return 0;
    return ml_dispatch_float(dt, "gemm", [&](auto tag) -> int {
        typedef decltype(tag) T;
        scale_add_rows<T><<<ml_grid_for(batch * m * n, kThreads, dev), kThreads, 0, s>>>(
            (T *)c, ldc, sc, batch, m, n, beta, (const T *)bias);
        ML_CUDA_LAUNCHED("scale_add_rows");
        return 0;
    });
}

bool is_float(ml_dtype dt) { return dt == ML_F32 || dt == ML_F64 || dt == ML_F16 || dt == ML_BF16; }

int not_float(const char *op, ml_dtype dt) {
    return ml_error("%s: dtype %s is not supported on cuda (expected f32, f64, f16 or bf16)", op, ml_dtype_short(dt));
}

// ml_cuda_gemm with c (and bias) of dtype ct: dt, or f32 for f16/bf16
// operands (the products a batch sum reduces, rounded once at the end).
int gemm(int dev, ml_dtype dt, ml_dtype ct, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
         double alpha, const void *a, int64_t lda, int64_t stride_a, const void *b, int64_t ldb, int64_t stride_b,
         double beta, void *c, int64_t ldc, int64_t stride_c, int64_t batch, const void *bias) {
    if (!is_float(dt)) return not_float("gemm", dt);
    if (m < 0 || n < 0 || k < 0 || batch < 0)
        return ml_error("gemm: negative size (m=%lld n=%lld k=%lld batch=%lld)", (long long)m, (long long)n,
                        (long long)k, (long long)batch);
    if (batch > INT32_MAX)
        return ml_error("gemm: %lld batches exceed cuBLASLt's limit of %d", (long long)batch, INT32_MAX);
    cudaStream_t s;
    if (ml_cuda_enter(dev, &s) < 0) return -1;
    if (m == 0 || n == 0 || batch == 0) return 0;
    // An empty product: cuBLASLt rejects k = 0 layouts; c = beta c (+ bias).
    if (k == 0) return launch_scale_add_rows(dev, s, ct, c, ldc, stride_c, batch, m, n, beta, bias);
    lt_call g = {dev, dt, ct, trans_a, trans_b, m, n, k, alpha, beta, a, lda, stride_a, b, ldb, stride_b,
                 c, ldc, stride_c, batch, bias};
    int rc = lt_run(g, bias != nullptr, s);
    if (rc <= 0) return rc;
    if (bias) {
        // No epilogue algorithm for this call: the rows start as the bias
        // and the product is added onto them.
        if (beta != 0)
            return ml_error("gemm: cuBLASLt has no bias epilogue for this %s product and beta is not 0",
                            ml_dtype_short(dt));
        if (launch_scale_add_rows(dev, s, ct, c, ldc, stride_c, batch, m, n, 0, bias) < 0) return -1;
        g.beta = 1;
        rc = lt_run(g, false, s);
        if (rc <= 0) return rc;
    }
    return ml_error("gemm: cuBLASLt found no algorithm for a %s product [%lld x %lld] @ [%lld x %lld]%s, "
                    "batch %lld (leading dims %lld, %lld, %lld)",
                    ml_dtype_short(dt), (long long)m, (long long)k, (long long)k, (long long)n,
                    trans_a || trans_b ? " with transposed operands" : "", (long long)batch, (long long)lda,
                    (long long)ldb, (long long)ldc);
}

// ml_cuda_colsum reading a of dtype at, writing s of dtype st.
int colsum(int dev, ml_dtype at, ml_dtype st, void *s, const void *a, int64_t m, int64_t n, bool accumulate) {
    if (!is_float(at)) return not_float("column sum", at);
    if (!is_float(st)) return not_float("column sum", st);
    cudaStream_t stream;
    if (ml_cuda_enter(dev, &stream) < 0) return -1;
    if (n == 0) return 0;
    int64_t bx = (n + 31) / 32;
    // Split the rows while the grid is too small to fill the GPU, keeping at
    // least 64 rows of work per block.
    int64_t splits = (int64_t)ml_cuda_sm_count(dev) * 4 / bx;
    splits = std::min(splits, m / 64);
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
    int64_t chunk = m > 0 ? (m + splits - 1) / splits : 0;
    if (chunk > 0) splits = (m + chunk - 1) / chunk;
    ml_cuda_workspace scratch(dev, {(size_t)(splits * n) * sizeof(double)});
    if (!scratch.ok()) return -1;
    double *ws = scratch.part<double>(0);
    int rc = ml_dispatch_float(at, "column sum", [&](auto atag) -> int {
        typedef decltype(atag) TA;
        colsum_partial<TA><<<dim3((unsigned)bx, (unsigned)splits), dim3(32, kRowLanes), 0, stream>>>(
            (const TA *)a, m, n, chunk, ws);
        ML_CUDA_LAUNCHED("colsum_partial");
        return 0;
    });
    if (rc == 0)
        rc = ml_dispatch_float(st, "column sum", [&](auto stag) -> int {
            typedef decltype(stag) TS;
            colsum_finish<TS><<<ml_grid_for(n, kThreads, dev), kThreads, 0, stream>>>(ws, splits, n, (TS *)s,
                                                                                      accumulate);
            ML_CUDA_LAUNCHED("colsum_finish");
            return 0;
        });
    return rc;   // the workspace goes back stream-ordered: both passes are queued first
}

// ---- batched products as the CPU kernel forms them ---------------------------

// c[p] = op(a[p]) op(b[p]) for p < nb with element strides sa/sb/sc between
// batches.  Stride 0 on a or b: one operand shared by every batch; stride 0
// on c: the nb products are summed into one c.
int bgemm(int dev, ml_dtype dt, int64_t nb, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
          const void *a, int64_t sa, const void *b, int64_t sb, void *c, int64_t sc) {
    int64_t lda = ta ? M : K, ldb = tb ? K : N;
    if (nb == 0) {
        if (sc != 0) return 0;
        cudaStream_t s;
        if (ml_cuda_enter(dev, &s) < 0) return -1;
        ML_CUDA_TRY(cudaMemsetAsync(c, 0, (size_t)(M * N) * ml_dtype_size(dt), s));
        return 0;
    }
    if (nb > 1 && sb == 0 && sc == M * N && !ta && sa == M * K)
        return gemm(dev, dt, dt, false, tb, nb * M, N, K, 1, a, lda, 0, b, ldb, 0, 0, c, N, 0, 1, nullptr);
    if (nb > 1 && sc == 0 && ta && !tb && sa == K * M && sb == K * N)
        return gemm(dev, dt, dt, true, false, M, N, nb * K, 1, a, lda, 0, b, ldb, 0, 0, c, N, 0, 1, nullptr);
    if (nb == 1 || sc != 0)
        return gemm(dev, dt, dt, ta, tb, M, N, K, 1, a, lda, sa, b, ldb, sb, 0, c, N, sc, nb, nullptr);
    // Summed over the batch: every product apart (f32 for the half types, so
    // the sum is rounded once), then their sum.
    ml_dtype pt = dt == ML_F16 || dt == ML_BF16 ? ML_F32 : dt;
    size_t bytes;
    if (!ml_mul_size((size_t)(nb * M), (size_t)N * ml_dtype_size(pt), &bytes))
        return ml_error("matmul: %lld products of [%lld x %lld] would need more than 2^64 bytes of workspace",
                        (long long)nb, (long long)M, (long long)N);
    ml_cuda_workspace ws(dev, {bytes});
    if (!ws.ok()) return -1;
    void *tmp = ws.part<void>(0);
    int rc = gemm(dev, dt, pt, ta, tb, M, N, K, 1, a, lda, sa, b, ldb, sb, 0, tmp, N, M * N, nb, nullptr);
    if (rc == 0) rc = colsum(dev, pt, dt, c, tmp, nb, M * N, false);
    return rc;   // the workspace goes back stream-ordered: the sum is queued first
}

}  // namespace

// ---- services ------------------------------------------------------------------

extern "C" int ml_cuda_gemm(int dev, ml_dtype dt, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                            double alpha, const void *a, int64_t lda, int64_t stride_a,
                            const void *b, int64_t ldb, int64_t stride_b,
                            double beta, void *c, int64_t ldc, int64_t stride_c, int64_t batch, const void *bias) {
    return gemm(dev, dt, dt, trans_a, trans_b, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc,
                stride_c, batch, bias);
}

extern "C" int ml_cuda_colsum(int dev, ml_dtype dt, void *s, const void *a, int64_t m, int64_t n, bool accumulate) {
    return colsum(dev, dt, dt, s, a, m, n, accumulate);
}

extern "C" int ml_gemm_cuda(ml_dtype dt, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                            double alpha, const void *a, int64_t lda, const void *b, int64_t ldb,
                            double beta, void *c, int64_t ldc) {
    return gemm(ml_cuda_current_device(), dt, dt, trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c,
                ldc, 0, 1, nullptr);
}

extern "C" int ml_colsum_cuda(ml_dtype dt, void *s, const void *a, int64_t m, int64_t n, bool accumulate) {
    return colsum(ml_cuda_current_device(), dt, dt, s, a, m, n, accumulate);
}

// ---- the twins -----------------------------------------------------------------

extern "C" int ml_matmul_forward_cuda(ml_ktensor *out, const ml_ktensor *a, const ml_ktensor *b,
                                      bool trans_a, bool trans_b) {
    cudaStream_t s;
    if (ml_cuda_prepare(out, "matmul", &s) < 0) return -1;
    int64_t B = out->shape[0], M = out->shape[1], N = out->shape[2];
    int64_t K = trans_a ? a->shape[1] : a->shape[2];
    return bgemm(out->device.index, out->dtype, B, trans_a, trans_b, M, N, K,
                 a->data, a->shape[0] == 1 ? 0 : M * K,
                 b->data, b->shape[0] == 1 ? 0 : K * N,
                 out->data, M * N);
}

// With C = op(A) op(B):
//   dA = dC op(B)^T, or op(B) dC^T when A is stored transposed;
//   dB = op(A)^T dC, or dC^T op(A) when B is stored transposed.
extern "C" int ml_matmul_backward_cuda(ml_ktensor *da, ml_ktensor *db, const ml_ktensor *dout,
                                       const ml_ktensor *a, const ml_ktensor *b, bool trans_a, bool trans_b) {
    cudaStream_t s;
    if (ml_cuda_prepare(dout, "matmul backward", &s) < 0) return -1;
    int dev = dout->device.index;
    ml_dtype dt = dout->dtype;
    int64_t B = dout->shape[0], M = dout->shape[1], N = dout->shape[2];
    int64_t K = trans_a ? a->shape[1] : a->shape[2];
    int64_t sa = a->shape[0] == 1 ? 0 : M * K, sb = b->shape[0] == 1 ? 0 : K * N, sc = M * N;
    if (da) {
        int rc = trans_a
            ? bgemm(dev, dt, B, trans_b, true, K, M, N, b->data, sb, dout->data, sc, da->data, sa)
            : bgemm(dev, dt, B, false, !trans_b, M, K, N, dout->data, sc, b->data, sb, da->data, sa);
        if (rc < 0) return -1;
    }
    if (db) {
        int rc = trans_b
            ? bgemm(dev, dt, B, true, trans_a, N, K, M, dout->data, sc, a->data, sa, db->data, sb)
            : bgemm(dev, dt, B, !trans_a, false, K, N, M, a->data, sa, dout->data, sc, db->data, sb);
        if (rc < 0) return -1;
    }
    return 0;
}

extern "C" int ml_linear_forward_cuda(ml_ktensor *out, const ml_ktensor *x, const ml_ktensor *w, const ml_ktensor *b) {
    cudaStream_t s;
    if (ml_cuda_prepare(out, "linear", &s) < 0) return -1;
    int64_t M = out->shape[0], O = out->shape[1], K = x->shape[1];
    ml_dtype dt = out->dtype;
    return gemm(out->device.index, dt, dt, false, true, M, O, K, 1, x->data, K, 0, w->data, K, 0, 0,
                out->data, O, 0, 1, b ? b->data : nullptr);
}

extern "C" int ml_linear_backward_cuda(ml_ktensor *dx, ml_ktensor *dw, ml_ktensor *db, const ml_ktensor *dout,
                                       const ml_ktensor *x, const ml_ktensor *w) {
    cudaStream_t s;
    if (ml_cuda_prepare(dout, "linear backward", &s) < 0) return -1;
    int dev = dout->device.index;
    ml_dtype dt = dout->dtype;
    int64_t M = dout->shape[0], O = dout->shape[1], K = x->shape[1];
    // Each gradient is written in its own dtype (dout's, or f32: matmul.h).
    if (dx && gemm(dev, dt, dx->dtype, false, false, M, K, O, 1, dout->data, O, 0, w->data, K, 0, 0, dx->data, K,
                   0, 1, nullptr) < 0)
        return -1;
    if (dw && gemm(dev, dt, dw->dtype, true, false, O, K, M, 1, dout->data, O, 0, x->data, K, 0, 0, dw->data, K,
                   0, 1, nullptr) < 0)
        return -1;
    return db ? colsum(dev, dt, db->dtype, db->data, dout->data, M, O, false) : 0;
}
