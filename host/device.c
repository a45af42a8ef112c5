/* device.c — devices as the tensor core sees them: parsing and printing
 * "cpu" / "cuda:N", which devices exist, and the memory of each (64-byte
 * aligned malloc on the CPU, the caching allocator of
 * kernels/cuda/allocator.cu on a GPU).  See device.h. */
#include "device.h"
#include "checked_math.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int ml_device_parse(const char *s, ml_device *out) {
    if (!s) return ml_error("device: expected a string like \"cpu\" or \"cuda:0\"");
    if (strcmp(s, "cpu") == 0) { *out = ml_cpu(); return 0; }
    if (strncmp(s, "cuda", 4) == 0) {
        int idx = 0;
        if (s[4] == ':') {
            char *end;
            long v = strtol(s + 5, &end, 10);
            if (*end || end == s + 5 || v < 0 || v > 127)
                return ml_error("device: bad cuda index in '%s'", s);
            idx = (int)v;
        } else if (s[4]) return ml_error("device: unknown device '%s' (expected cpu, cuda or cuda:N)", s);
        out->type = ML_CUDA; out->index = (int8_t)idx;
        return 0;
    }
    return ml_error("device: unknown device '%s' (expected cpu, cuda or cuda:N)", s);
}

void ml_device_str(ml_device d, char *buf, size_t n) {
    if (d.type == ML_CPU) snprintf(buf, n, "cpu");
    else snprintf(buf, n, "cuda:%d", d.index);
}

bool ml_device_available(ml_device dev) {
    if (dev.type == ML_CPU) return true;
#ifdef ML_WITH_CUDA
    return dev.index < ml_cuda_device_count();
#else
    return false;
#endif
}

#define CPU_ALLOC_MAX ((size_t)1 << 48)

void *ml_device_alloc(ml_device dev, size_t nbytes) {
    if (dev.type == ML_CPU) {
        void *p = NULL;
        size_t n;
        if (!ml_round_up_size(nbytes, 64, &n))
            return ml_error_null("cannot allocate %zu bytes on the CPU: the size overflows", nbytes);
        /* More than a 48-bit address space can never succeed; refusing it
         * here also keeps such requests away from allocators that abort on
         * them (AddressSanitizer's does) instead of returning NULL. */
        if (n > CPU_ALLOC_MAX)
            return ml_error_null("out of CPU memory: could not allocate %zu bytes (more than the %llu-byte "
                                 "address space)", nbytes, (unsigned long long)CPU_ALLOC_MAX);
        if (posix_memalign(&p, 64, n ? n : 64) != 0)
            return ml_error_null("out of CPU memory: could not allocate %zu bytes", nbytes);
        return p;
    }
#ifdef ML_WITH_CUDA
    return ml_cuda_malloc(dev.index, nbytes);
#else
    return ml_error_null("cuda:%d requested but this moonlit was built without CUDA", dev.index);
#endif
}

void ml_device_free(ml_device dev, void *p, size_t nbytes) {
    if (!p) return;
    if (dev.type == ML_CPU) { free(p); return; }
#ifdef ML_WITH_CUDA
    ml_cuda_free(dev.index, p, nbytes);
#endif
}

int ml_device_memcpy(void *dst, ml_device ddev, const void *src, ml_device sdev, size_t n) {
    if (n == 0) return 0;
    if (ddev.type == ML_CPU && sdev.type == ML_CPU) { memcpy(dst, src, n); return 0; }
#ifdef ML_WITH_CUDA
    return ml_cuda_memcpy(dst, ddev, src, sdev, n);
#else
    return ml_error("copy involving a cuda device, but this moonlit was built without CUDA");
#endif
}
