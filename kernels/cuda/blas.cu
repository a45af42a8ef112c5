// blas.cu — the per-device cuBLAS and cuBLASLt handles of blas.h, and the
// GEMM workspace they share.
//
// Both libraries get their scratch memory from moonlit's caching allocator
// (one buffer per device, made with the handles and kept for the process),
// so no cudaMalloc happens behind the allocator's back in a training step.
// Sharing one buffer is safe because every call on a device is issued to its
// single compute stream, in order.
#include "common.cuh"
#include "blas.h"
#include "matmul.h"

#include <mutex>

namespace {

constexpr int kMaxDevices = 64;
// What cuBLASLt's heuristics may plan with; Hopper's split-K and stream-K
// kernels use up to this much.
constexpr size_t kWorkspaceBytes = (size_t)32 << 20;

struct blas_state {
    cublasHandle_t blas = nullptr;
    cublasLtHandle_t lt = nullptr;
    void *workspace = nullptr;
};

std::mutex g_mu;
blas_state g_state[kMaxDevices];

int blas_fail(cublasStatus_t st, const char *what, int dev) {
    return ml_error("cuBLAS error on cuda:%d (%s): %s [%s]", dev, what, cublasGetStatusString(st),
                    cublasGetStatusName(st));
}

// Creates the handles and workspace of dev on first use (caller holds g_mu
// and has entered dev).
int init_device(int dev, cudaStream_t stream) {
    blas_state &s = g_state[dev];
    if (s.blas) return 0;
    if (!s.workspace && !(s.workspace = ml_cuda_malloc(dev, kWorkspaceBytes))) return -1;
    cublasStatus_t st;
    if (!s.lt && (st = cublasLtCreate(&s.lt)) != CUBLAS_STATUS_SUCCESS) return blas_fail(st, "cublasLtCreate", dev);
    cublasHandle_t h;
    if ((st = cublasCreate(&h)) != CUBLAS_STATUS_SUCCESS) return blas_fail(st, "cublasCreate", dev);
    if ((st = cublasSetStream(h, stream)) != CUBLAS_STATUS_SUCCESS ||
        (st = cublasSetWorkspace(h, s.workspace, kWorkspaceBytes)) != CUBLAS_STATUS_SUCCESS) {
        cublasDestroy(h);
        return blas_fail(st, "binding the cuBLAS handle to the compute stream", dev);
    }
    s.blas = h;
    return 0;
}

int enter(int device) {
    if (device < 0 || device >= kMaxDevices)
        return ml_error("cuBLAS: cuda:%d is beyond the %d devices moonlit supports", device, kMaxDevices);
    cudaStream_t stream;
    if (ml_cuda_enter(device, &stream) < 0) return -1;
    std::lock_guard<std::mutex> lock(g_mu);
    return init_device(device, stream);
}

}  // namespace

extern "C" cublasHandle_t ml_cublas_handle(int device) {
    return enter(device) < 0 ? nullptr : g_state[device].blas;
}

extern "C" cublasLtHandle_t ml_cublaslt_handle(int device) {
    return enter(device) < 0 ? nullptr : g_state[device].lt;
}

extern "C" void *ml_cublas_workspace(int device, size_t *nbytes) {
    if (enter(device) < 0) return nullptr;
    *nbytes = kWorkspaceBytes;
    return g_state[device].workspace;
}
