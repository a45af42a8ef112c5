// cudnn_handle.cu — the per-device cuDNN handles of cudnn_handle.h.  A
// handle is created on its device and bound once to that device's compute
// stream, so every cuDNN call is ordered with moonlit's kernels and the
// caching allocator's stream-ordered reuse stays safe.
#include "common.cuh"
#include "cudnn_handle.h"

#include <mutex>

namespace {

constexpr int kMaxDevices = 64;

std::mutex g_mu;
cudnnHandle_t g_handle[kMaxDevices];

}  // namespace

extern "C" int ml_cudnn_fail(cudnnStatus_t st, const char *what, const char *file, int line) {
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    return ml_error("cuDNN error in %s:%d (%s): %s", base, line, what, cudnnGetErrorString(st));
}

extern "C" cudnnHandle_t ml_cudnn_handle(int device) {
    if (device < 0 || device >= kMaxDevices)
        return (cudnnHandle_t)ml_error_null("cuDNN: cuda:%d is beyond the %d devices moonlit supports", device,
                                            kMaxDevices);
    cudaStream_t stream;
    if (ml_cuda_enter(device, &stream) < 0) return nullptr;
    std::lock_guard<std::mutex> lock(g_mu);
    if (g_handle[device]) return g_handle[device];
    cudnnHandle_t h;
    cudnnStatus_t st = cudnnCreate(&h);
    if (st != CUDNN_STATUS_SUCCESS) {
        ml_cudnn_fail(st, "cudnnCreate", __FILE__, __LINE__);
        return nullptr;
    }
    if ((st = cudnnSetStream(h, stream)) != CUDNN_STATUS_SUCCESS) {
        cudnnDestroy(h);
        ml_cudnn_fail(st, "cudnnSetStream", __FILE__, __LINE__);
        return nullptr;
    }
    g_handle[device] = h;
    return h;
}
