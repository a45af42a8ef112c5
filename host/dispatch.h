/* dispatch.h — how host ops call a kernel.
 *
 * Every kernel pair is declared once, with ML_KERNEL in its family header
 * (kernels/kernel.h): ml_<op>_cpu in kernels/cpu and its CUDA twin
 * ml_<op>_cuda in kernels/cuda, with one signature.  Kernels take plain
 * descriptors (ml_ktensor), which ML_KT makes from tensors at the call.  A
 * host op checks every argument, then runs the kernel on the output's
 * device:
 *
 *     rc = ML_RUN(out->device, ml_layer_norm_forward, ML_KT(out), ML_KT(mean), ...);
 *
 * In a CUDA build the twins are weak references (ML_CUDA_WEAK): a build
 * whose kernels/cuda lacks one still links, and running it reports which
 * kernel is missing instead of crashing.  Without CUDA the CUDA branch
 * reports that the build has no CUDA (normally unreachable: no tensor can
 * live on a cuda device then).  While profiling is on, every call is timed
 * under the kernel's name (profile.h). */
#ifndef ML_DISPATCH_H
#define ML_DISPATCH_H

#include <string.h>
#include "error.h"
#include "profile.h"
#include "tensor.h"

/* The descriptor of t written into *slot and returned; NULL for NULL (an
 * argument the kernel treats as "not wanted"). */
static inline ml_ktensor *ml_kt_of(const ml_tensor *t, ml_ktensor *slot) {
    if (!t) return NULL;
    slot->data = ml_data(t);
    slot->dtype = t->dtype;
    slot->device = t->device;
    slot->ndim = t->ndim;
    memcpy(slot->shape, t->shape, (size_t)t->ndim * sizeof t->shape[0]);
    memcpy(slot->strides, t->strides, (size_t)t->ndim * sizeof t->strides[0]);
    return slot;
}

/* A descriptor of t for one kernel call (a compound literal: it lives until
 * the end of the enclosing block, which outlasts the call). */
#define ML_KT(t) ml_kt_of((t), &(ml_ktensor){0})

/* A kernel call, timed under its name while profiling is on. */
#define ML_TIMED(name, cuda, call) __extension__({                      \
    int tok_ = ml_profile_on ? ml_profile_begin(name, cuda) : -1;         \
    int rc_ = (call);                                                     \
    if (tok_ >= 0) ml_profile_end(tok_);                                  \
    rc_; })

/* A CUDA twin called by name: timed, or an error naming it when this build
 * lacks it (its weak reference is NULL).  ML_RUN's CUDA branch. */
#ifdef ML_WITH_CUDA
#define CUDA_CALL(fn, ...) \
    ((fn) ? ML_TIMED(#fn, true, (fn)(__VA_ARGS__)) \
          : ml_error("%s: this op has no CUDA kernel in this build", #fn))
/* A hand-written weak declaration, for CUDA entry points that are not
 * kernel pairs and so have no ML_KERNEL: only dist's NCCL calls
 * (host/dist.c over kernels/cuda/nccl.cu), a communication layer over
 * tensors with no CPU twin, which host/dist.c tests for NULL itself.  Every
 * kernel is declared with ML_KERNEL and called through ML_RUN. */
#define ML_CUDA_TWIN __attribute__((weak))
#else
#define CUDA_CALL(fn, ...) ml_error("%s: moonlit was built without CUDA", #fn)
#define ML_CUDA_TWIN
#endif

/* Run kernel `fn` on device dev: fn##_cpu(...) or its CUDA twin fn##_cuda. */
#define ML_RUN(dev, fn, ...)                                                  \
    ((dev).type == ML_CPU ? ML_TIMED(#fn "_cpu", false, fn##_cpu(__VA_ARGS__)) \
                          : CUDA_CALL(fn##_cuda, __VA_ARGS__))

#endif
