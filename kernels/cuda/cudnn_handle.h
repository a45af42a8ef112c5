/* cudnn_handle.h — the per-device cuDNN handle, bound to the device's
 * compute stream (runtime.h), and checked cuDNN calls that report through
 * ml_error.  Handles are created on first use and live until the process
 * ends.  Implemented in kernels/cuda/cudnn_handle.cu. */
#ifndef ML_CUDA_CUDNN_HANDLE_H
#define ML_CUDA_CUDNN_HANDLE_H

#include <cudnn.h>

#ifdef __cplusplus
extern "C" {
#endif

/* NULL + ml_error on failure. */
cudnnHandle_t ml_cudnn_handle(int device);
/* Records "cuDNN error in <file>:<line> (<what>): <message>"; returns -1. */
int ml_cudnn_fail(cudnnStatus_t st, const char *what, const char *file, int line);

#define ML_CUDNN_TRY(call)                                                  \
    do {                                                                    \
        cudnnStatus_t ml_st_ = (call);                                      \
        if (ml_st_ != CUDNN_STATUS_SUCCESS)                                 \
            return ml_cudnn_fail(ml_st_, #call, __FILE__, __LINE__);        \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif
