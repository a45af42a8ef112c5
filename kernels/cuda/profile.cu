// profile.cu — the CUDA side of host/profile.c: a growing pool of events
// recorded on the current device's compute stream.
#include <cuda_runtime.h>
#include <vector>
#include "common.cuh"
#include "runtime.h"
extern "C" {
#include "profile.h"
}

static std::vector<cudaEvent_t> g_events;

extern "C" int ml_cuda_profile_record(int slot) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return ml_error("profile: no current CUDA device");
    ml_cuda_stream_t s;
    if (ml_cuda_enter(dev, &s) < 0) return -1;
    while ((int)g_events.size() <= slot) {
        cudaEvent_t e;
        if (cudaEventCreate(&e) != cudaSuccess) return ml_error("profile: cannot create a CUDA event");
        g_events.push_back(e);
    }
    if (cudaEventRecord(g_events[slot], (cudaStream_t)s) != cudaSuccess)
        return ml_error("profile: cannot record a CUDA event");
    return 0;
}

extern "C" int ml_cuda_profile_elapsed(int a, int b, float *ms) {
    if (a < 0 || b < 0 || a >= (int)g_events.size() || b >= (int)g_events.size()) return -1;
    return cudaEventElapsedTime(ms, g_events[a], g_events[b]) == cudaSuccess ? 0 : -1;
}

extern "C" int ml_cuda_profile_sync(void) {
    if (cudaDeviceSynchronize() != cudaSuccess) return ml_error("profile: synchronising the GPU failed");
    return 0;
}
