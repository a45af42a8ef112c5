/* bf16_sr.h — stochastic rounding of f32 to bf16, and which Philox bits the
 * AdamW step spends on it: one definition for the CPU kernel and its CUDA
 * twin, so the same (seed, offset) gives the same bf16 bits on both.
 *
 * Why: bf16 keeps 8 significand bits, so near 1.0 its spacing is 2^-7.
 * Round-to-nearest drops any update under 2^-8 (lr 5e-6 steps vanish);
 * rounding up with probability (x - floor) / ulp keeps E[result] = x, so
 * tiny updates accumulate in expectation.
 *
 * Rounding: add a uniform 16-bit integer r to the low 16 bits of the f32
 * bit pattern, then drop them.  The f32 is sign-magnitude, so this rounds
 * the magnitude up with the right probability for either sign.  NaN stays a
 * quiet NaN (the carry could otherwise turn a signalling NaN into an
 * infinity); an infinity stays infinite (its low bits are zero); a finite
 * value above bf16's largest finite may round to infinity, as it must.
 *
 * Bits (AdamW with bf16 param or moments): element i of the step uses block
 * i/2 of the Philox stream (seed, offset) of kernels/philox.h — lane 0 for
 * the parameter, lane 1 for exp_avg, lane 2 for exp_avg_sq — taking the
 * upper 16 bits of the lane for even i and the lower 16 bits for odd i
 * (ml_adamw_sr_lane).  A step thus consumes ceil(numel / 2) blocks.  Why
 * two elements per block: the rounding needs 16 bits per value, and the
 * 10 rounds of Philox are most of the bf16-sr step's arithmetic, which
 * made it bound by the GPU's integer pipes rather than by memory. */
#ifndef ML_BF16_SR_H
#define ML_BF16_SR_H

#include "philox.h"
#include <string.h>

ML_HD uint16_t ml_f32_to_bf16_sr(float f, uint32_t lane) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + (lane >> 16)) >> 16);
}

/* The draw of element i from lane x of its block (block i/2): the lane's
 * upper half for even i, its lower half for odd i, placed where
 * ml_f32_to_bf16_sr reads it (the upper 16 bits). */
ML_HD uint32_t ml_adamw_sr_lane(uint32_t x, uint64_t i) { return (i & 1) ? x << 16 : x; }

#endif
