/* random.h — random fills following the Philox stream of kernels/philox.h:
 * kernels/cpu/random.c and kernels/cuda/random.cu.
 *
 * Each fills all of `out` (any strides: value i goes to the i-th element in
 * row-major order) from generator state (seed, offset); the caller advances
 * its offset by ml_philox_blocks(numel, 4), or (numel, 2) for randint with
 * high - low > 2^32.  The host op has checked: a float dtype for uniform
 * and normal, any but bool for randint, low < high.  For one generator
 * state both devices write the same values, element for element (uniform
 * and randint bit for bit; normal up to the rare last-bit difference of
 * log/cos/sin that philox.h describes).  Return 0 / -1. */
#ifndef ML_KERNELS_RANDOM_H
#define ML_KERNELS_RANDOM_H

#include "kernel.h"

/* lo + (hi - lo) * u, u uniform in [0, 1). */
ML_KERNEL(ml_uniform, (ml_ktensor *out, uint64_t seed, uint64_t offset, double lo, double hi));
/* mean + std * z, z standard normal (Box-Muller). */
ML_KERNEL(ml_normal, (ml_ktensor *out, uint64_t seed, uint64_t offset, double mean, double std));
/* Integers uniform in [low, high). */
ML_KERNEL(ml_randint, (ml_ktensor *out, uint64_t seed, uint64_t offset, int64_t low, int64_t high));

#endif
