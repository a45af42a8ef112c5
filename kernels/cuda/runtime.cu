// runtime.cu — devices, the one compute stream per device, and the error
// reporting every CUDA file uses (see runtime.h and common.cuh).  Nothing
// here exits: failures become ml_error messages and -1.
#include "common.cuh"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <dirent.h>
#include <mutex>

namespace {

struct device_state {
    std::atomic<cudaStream_t> stream{nullptr};   // created on first use
    std::atomic<int> sm_count{0};                // 0 until queried
};

std::once_flag g_count_once;
int g_count = 0;
char g_unavailable[256] = "";
std::mutex g_mu;
device_state *g_dev = nullptr;   // g_count entries; never freed (outlives static destructors)

void count_devices() {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        snprintf(g_unavailable, sizeof g_unavailable, "%s (%s)", cudaGetErrorString(e),
                 cudaGetErrorName(e));
        cudaGetLastError();
        n = 0;
    } else if (n == 0) {
        snprintf(g_unavailable, sizeof g_unavailable, "no CUDA device found");
    }
    g_count = n;
    if (n > 0) g_dev = new device_state[n];
}

bool is_sticky(cudaError_t e) {
    switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorHardwareStackError:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
        return true;
    default:
        return false;
    }
}

// The runtime's own guard, not a kernel's argument check: device indices
// reach ml_cuda_set_device from scripts and worker environments, and
// "cuda:7" on a one-GPU machine must be an error naming what exists.
int require_device(int dev) {
    int n = ml_cuda_device_count();
    if (n == 0) return ml_error("cuda:%d requested but CUDA is not available: %s", dev, g_unavailable);
    if (dev < 0 || dev >= n)
        return ml_error("cuda:%d does not exist (this machine has %d CUDA device%s: cuda:0..cuda:%d)",
                        dev, n, n == 1 ? "" : "s", n - 1);
    return 0;
}

}  // namespace

int ml_cuda_fail(cudaError_t e, const char *what, const char *file, int line) {
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    // Clear the non-sticky error so the next call starts clean.
    cudaGetLastError();
    return ml_error("CUDA error in %s:%d (%s): %s [%s]%s", base, line, what, cudaGetErrorString(e),
                    cudaGetErrorName(e),
                    is_sticky(e) ? "; the CUDA context is now unusable, restart moonlit" : "");
}

int ml_cuda_launch_fail(cudaError_t e, const char *kernel, const char *file, int line) {
    char what[160];
    snprintf(what, sizeof what, "launch of %s", kernel ? kernel : "a kernel");
    return ml_cuda_fail(e, what, file, line);
}

extern "C" int ml_cuda_device_count(void) {
    std::call_once(g_count_once, count_devices);
    return g_count;
}

extern "C" const char *ml_cuda_unavailable_reason(void) {
    ml_cuda_device_count();
    return g_unavailable;
}

extern "C" int ml_cuda_peek_device_count(void) {
    DIR *d = opendir("/proc/driver/nvidia/gpus");
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) != nullptr;)
        if (e->d_name[0] != '.') n++;
    closedir(d);
    const char *vis = getenv("CUDA_VISIBLE_DEVICES");
    if (vis) {
        // The runtime stops at the first invalid entry; count the entries
        // up to there, capped by the GPUs present.
        int listed = 0;
        for (const char *p = vis; *p;) {
            while (*p == ' ') p++;
            if (!*p) break;
            if (*p == '-') break;   // "-1" and friends hide everything after
            listed++;
            while (*p && *p != ',') p++;
            if (*p == ',') p++;
        }
        if (listed < n) n = listed;
    }
    return n;
}

// cudaGetDevice is a cheap thread-local read; asking it (rather than
// caching our own idea of the current device) stays right when a library
// switches devices behind our back.
extern "C" int ml_cuda_set_device(int dev) {
    if (require_device(dev) < 0) return -1;
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur == dev) return 0;
    ML_CUDA_TRY(cudaSetDevice(dev));
    return 0;
}

extern "C" int ml_cuda_current_device(void) {
    int dev = 0;
    if (ml_cuda_device_count() == 0 || cudaGetDevice(&dev) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return dev;
}

extern "C" int ml_cuda_enter(int dev, ml_cuda_stream_t *stream) {
    if (ml_cuda_set_device(dev) < 0) return -1;
    cudaStream_t s = g_dev[dev].stream.load(std::memory_order_acquire);
    if (!s) {
        std::lock_guard<std::mutex> lock(g_mu);
        s = g_dev[dev].stream.load();
        if (!s) {
            // A blocking stream (not cudaStreamNonBlocking): it stays ordered
            // with the legacy default stream, so a library call that forgot
            // to take our stream is still correct, only slower.
            ML_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamDefault));
            g_dev[dev].stream.store(s, std::memory_order_release);
        }
    }
    if (stream) *stream = s;
    return 0;
}

extern "C" int ml_cuda_synchronize(int dev) {
    if (dev >= 0) {
        cudaStream_t s;
        if (ml_cuda_enter(dev, &s) < 0) return -1;
        ML_CUDA_TRY(cudaStreamSynchronize(s));
        return 0;
    }
    int n = ml_cuda_device_count();
    int back = ml_cuda_current_device();
    for (int i = 0; i < n; i++) {
        cudaStream_t s = g_dev[i].stream.load();
        if (!s) continue;
        if (ml_cuda_set_device(i) < 0) return -1;
        ML_CUDA_TRY(cudaStreamSynchronize(s));
    }
    return n > 0 ? ml_cuda_set_device(back) : 0;
}

int ml_cuda_sm_count(int dev) {
    if (dev < 0 || dev >= ml_cuda_device_count()) return 1;
    int n = g_dev[dev].sm_count.load(std::memory_order_relaxed);
    if (n > 0) return n;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n < 1) {
        cudaGetLastError();
        return 132;   // an H100 SXM's count: only sizes launches, never correctness
    }
    g_dev[dev].sm_count.store(n, std::memory_order_relaxed);
    return n;
}

extern "C" int ml_cuda_get_device_info(int dev, ml_cuda_device_info *out) {
    if (ml_cuda_set_device(dev) < 0) return -1;
    cudaDeviceProp p;
    ML_CUDA_TRY(cudaGetDeviceProperties(&p, dev));
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%s", p.name);
    out->cc_major = p.major;
    out->cc_minor = p.minor;
    out->sm_count = p.multiProcessorCount;
    ML_CUDA_TRY(cudaMemGetInfo(&out->free_mem, &out->total_mem));
    return 0;
}

int ml_cuda_prepare(const ml_ktensor *t, const char *op, cudaStream_t *stream) {
    if (t->device.type != ML_CUDA) return ml_error("%s: expected a cuda tensor, got a cpu one", op);
    return ml_cuda_enter(t->device.index, stream);
}

// ---- pinned memory, async uploads and events for host/data_loader.c ----

extern "C" void *ml_cuda_host_alloc(size_t nbytes) {
    if (ml_cuda_device_count() == 0) return ml_error_null("pinned memory: CUDA is not available: %s", g_unavailable);
    void *p = nullptr;
    cudaError_t e = cudaHostAlloc(&p, nbytes ? nbytes : 1, cudaHostAllocPortable);
    if (e != cudaSuccess) {
        ml_cuda_fail(e, "cudaHostAlloc", __FILE__, __LINE__);
        return nullptr;
    }
    return p;
}

extern "C" void ml_cuda_host_free(void *p) {
    if (p && cudaFreeHost(p) != cudaSuccess) cudaGetLastError();
}

extern "C" int ml_cuda_memcpy_h2d_async(int dev, void *dst, const void *src, size_t n) {
    cudaStream_t s;
    if (ml_cuda_enter(dev, &s) < 0) return -1;
    ML_CUDA_TRY(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, s));
    return 0;
}

extern "C" void *ml_cuda_event_record(int dev) {
    cudaStream_t s;
    if (ml_cuda_enter(dev, &s) < 0) return nullptr;
    cudaEvent_t ev;
    cudaError_t e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (e != cudaSuccess) { ml_cuda_fail(e, "cudaEventCreate", __FILE__, __LINE__); return nullptr; }
    e = cudaEventRecord(ev, s);
    if (e != cudaSuccess) {
        cudaEventDestroy(ev);
        ml_cuda_fail(e, "cudaEventRecord", __FILE__, __LINE__);
        return nullptr;
    }
    return (void *)ev;
}

extern "C" int ml_cuda_event_query(void *event) {
    cudaError_t e = cudaEventQuery((cudaEvent_t)event);
    if (e == cudaSuccess) return 1;
    if (e == cudaErrorNotReady) { cudaGetLastError(); return 0; }
    return ml_cuda_fail(e, "cudaEventQuery", __FILE__, __LINE__);
}

extern "C" int ml_cuda_event_sync(void *event) {
    ML_CUDA_TRY(cudaEventSynchronize((cudaEvent_t)event));
    return 0;
}

extern "C" void ml_cuda_event_destroy(void *event) {
    if (event && cudaEventDestroy((cudaEvent_t)event) != cudaSuccess) cudaGetLastError();
}
