/* dispatch.h — how host ops call a CUDA kernel twin.
 *
 * Every CPU kernel `ml_<op>_cpu(...)` (kernels/cpu) has a CUDA twin
 * `ml_<op>_cuda(...)` with the identical signature (kernels/cuda, extern
 * "C").  Host ops dispatch on the output's device:
 *
 *     if (out->device.type == ML_CPU) rc = ml_binary_cpu(op, out, a, b);
 *     else rc = CUDA_CALL(ml_binary_cuda, op, out, a, b);
 *
 * Host files declare the twins they use with ML_CUDA_TWIN (a weak reference)
 * inside #ifdef ML_WITH_CUDA: a CUDA build whose kernels/cuda does not (yet)
 * define a twin still links, and calling it reports which kernel is missing
 * instead of crashing.  Without CUDA the call reports that the build has no
 * CUDA (normally unreachable: no tensor can live on a cuda device then). */
#ifndef ML_DISPATCH_H
#define ML_DISPATCH_H

#include "error.h"
#include "profile.h"

/* A kernel call, timed under its name while profiling is on (profile.h). */
#define ML_TIMED(name, cuda, call) __extension__({                      \
    int tok_ = ml_profile_on ? ml_profile_begin(name, cuda) : -1;         \
    int rc_ = (call);                                                     \
    if (tok_ >= 0) ml_profile_end(tok_);                                  \
    rc_; })

/* A CPU kernel call, timed while profiling. */
#define CPU_CALL(fn, ...) ML_TIMED(#fn, false, fn(__VA_ARGS__))

#ifdef ML_WITH_CUDA
#define ML_CUDA_TWIN __attribute__((weak))
#define CUDA_CALL(fn, ...) \
    ((fn) ? ML_TIMED(#fn, true, (fn)(__VA_ARGS__)) \
          : ml_error("%s: this op has no CUDA kernel in this build", #fn))
#else
#define CUDA_CALL(fn, ...) ml_error("%s: moonlit was built without CUDA", #fn)
#endif

#endif
