/* random.h — CUDA random fills: the twins of kernels/cpu/random.h, same
 * signatures and the same Philox stream (kernels/philox.h): for one
 * generator state they write the same values as the CPU, element for
 * element (uniform and randint bit for bit; normal up to the rare last-bit
 * difference of log/cos/sin that philox.h describes).  Any strides; value i
 * goes to the i-th element in row-major order.
 * Implemented in kernels/cuda/random.cu. */
#ifndef ML_KERNELS_CUDA_RANDOM_H
#define ML_KERNELS_CUDA_RANDOM_H

#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

int ml_uniform_cuda(ml_tensor *out, uint64_t seed, uint64_t offset, double lo, double hi);
int ml_normal_cuda(ml_tensor *out, uint64_t seed, uint64_t offset, double mean, double std);
int ml_randint_cuda(ml_tensor *out, uint64_t seed, uint64_t offset, int64_t low, int64_t high);

#ifdef __cplusplus
}
#endif
#endif
