/* random.h — CPU random fill kernels following the Philox stream of
 * kernels/philox.h exactly (the CUDA twins in kernels/cuda/random.h, same
 * signatures with _cuda, must produce the same values).
 *
 * Each fills all of `out` (any strides: value i goes to the i-th element in
 * row-major order) from generator state (seed, offset); the caller advances
 * its offset by ml_philox_blocks(numel, 4) — or (numel, 2) for randint with
 * high - low > 2^32.  Return 0 / -1. */
#ifndef ML_KERNELS_CPU_RANDOM_H
#define ML_KERNELS_CPU_RANDOM_H

#include "tensor.h"

/* lo + (hi - lo) * u, u uniform in [0, 1).  Float dtypes. */
int ml_uniform_cpu(ml_tensor *out, uint64_t seed, uint64_t offset, double lo, double hi);
/* mean + std * z, z standard normal (Box-Muller).  Float dtypes. */
int ml_normal_cpu(ml_tensor *out, uint64_t seed, uint64_t offset, double mean, double std);
/* Integers uniform in [low, high) (low < high).  Integer and float dtypes. */
int ml_randint_cpu(ml_tensor *out, uint64_t seed, uint64_t offset, int64_t low, int64_t high);

#endif
