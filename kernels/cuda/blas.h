/* blas.h — per-device cuBLAS and cuBLASLt handles, bound to the device's
 * compute stream (see runtime.h).  Handles are created on first use and
 * live until the process ends.  NULL + ml_error on failure. */
#ifndef ML_CUDA_BLAS_H
#define ML_CUDA_BLAS_H

#include <cublas_v2.h>
#include <cublasLt.h>

#ifdef __cplusplus
extern "C" {
#endif

cublasHandle_t ml_cublas_handle(int device);
cublasLtHandle_t ml_cublaslt_handle(int device);
/* The GEMM workspace of device dev (from the caching allocator, shared by
 * cuBLAS and cuBLASLt, lives as long as the process): kernels/cuda/blas.cu.
 * NULL + error on failure. */
void *ml_cublas_workspace(int device, size_t *nbytes);

#ifdef __cplusplus
}
#endif
#endif
