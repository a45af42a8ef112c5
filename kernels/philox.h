/* philox.h — the Philox4x32-10 counter-based generator and the one stream
 * definition both backends follow, so the same (seed, offset) gives the same
 * numbers on the CPU and on any GPU.  Usable from C and CUDA (ML_HD).
 *
 * Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel Random Numbers: As
 * Easy as 1, 2, 3", SC 2011): a 128-bit counter and a 64-bit key go through
 * 10 rounds of two 32x32->64 multiplications (0xD2511F53, 0xCD9E8D57) with
 * the key bumped by the Weyl constants (0x9E3779B9, 0xBB67AE85) between
 * rounds.
 *
 * Stream.  A generator is (seed, offset).  A call producing n values uses
 * counter blocks b = 0, 1, ..., each block being
 *     counter = {lo32(offset + b), hi32(offset + b), 0, 0}
 *     key     = {lo32(seed), hi32(seed)}
 * and its four 32-bit lanes x0..x3.  Afterwards offset += number of blocks.
 *
 *   uniform [lo, hi): value i from block i/4, lane i%4:
 *       u = (x >> 8) * 2^-24                     (exact in f32, in [0, 1))
 *       v = lo + (hi - lo) * u                   (double, no FMA)
 *   normal (mean, std): block b gives values 4b..4b+3 by Box-Muller on
 *   lanes (x0, x1) -> values 4b, 4b+1 and (x2, x3) -> 4b+2, 4b+3:
 *       u1 = (xa + 1) * 2^-32 in (0, 1]   u2 = xb * 2^-32 in [0, 1)
 *       r = sqrt(-2 log u1);  z0 = r cos(2 pi u2);  z1 = r sin(2 pi u2)
 *       v = mean + std * z                       (double, no FMA)
 *   randint [low, high), range r = high - low:
 *       r <= 2^32: value i from block i/4, lane i%4: low + x % r
 *       r >  2^32: value i from block i/2, lanes 2(i%2) (low word) and
 *                  2(i%2)+1 (high word) of a 64-bit x: low + x % r
 *       (the modulo bias is at most r/2^32 resp. r/2^64: negligible for the
 *       timestep and index ranges this is used for)
 *   Value i is the i-th element in row-major (logical) order of the output,
 *   whatever its strides.  v is rounded to the output dtype: f32/f64
 *   directly, f16/bf16 through f32, integer dtypes by truncation.
 *
 * Cross-device identity: everything before the final rounding is exact
 * integer or IEEE double arithmetic, except log/cos/sin in Box-Muller whose
 * last double bit may differ between libm and CUDA's libdevice.  Uniform and
 * randint outputs are therefore bit-identical on both devices; normal f32
 * outputs are identical except when a double result lies within an ulp of
 * an f32 rounding boundary (a few values per billion).  CUDA code must not
 * let the compiler contract lo + (hi-lo)*u into an FMA: use the ml_philox_*
 * helpers below, which spell the rounding steps out. */
#ifndef ML_PHILOX_H
#define ML_PHILOX_H

#include <stdint.h>
#include <math.h>

#ifdef __CUDACC__
#define ML_HD static inline __host__ __device__
#if defined(__CUDA_ARCH__)
#define ML_DMUL(a, b) __dmul_rn((a), (b))
#define ML_DADD(a, b) __dadd_rn((a), (b))
#else
#define ML_DMUL(a, b) ((a) * (b))
#define ML_DADD(a, b) ((a) + (b))
#endif
#else
#define ML_HD static inline
#define ML_DMUL(a, b) ((a) * (b))
#define ML_DADD(a, b) ((a) + (b))
#endif

#define ML_PHILOX_M0 0xD2511F53u
#define ML_PHILOX_M1 0xCD9E8D57u
#define ML_PHILOX_W0 0x9E3779B9u
#define ML_PHILOX_W1 0xBB67AE85u

/* One application of the bijection: out = Philox4x32-10(ctr, key). */
ML_HD void ml_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)ML_PHILOX_M0 * c0;
        uint64_t p1 = (uint64_t)ML_PHILOX_M1 * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1;
        c3 = (uint32_t)p0;
        c0 = n0;
        c2 = n2;
        k0 += ML_PHILOX_W0;
        k1 += ML_PHILOX_W1;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* Block b of the stream of generator (seed, offset). */
ML_HD void ml_philox_block(uint64_t seed, uint64_t offset, uint64_t b, uint32_t out[4]) {
    uint64_t c = offset + b;
    uint32_t ctr[4] = {(uint32_t)c, (uint32_t)(c >> 32), 0u, 0u};
    uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    ml_philox4x32_10(ctr, key, out);
}

/* Blocks a call of n values consumes (values_per_block: 4, or 2 for wide
 * randint). */
ML_HD uint64_t ml_philox_blocks(uint64_t n, unsigned values_per_block) {
    return (n + values_per_block - 1) / values_per_block;
}

/* lo + (hi - lo) * u with u = (x >> 8) * 2^-24. */
ML_HD double ml_philox_uniform(uint32_t x, double lo, double hi) {
    double u = (double)(x >> 8) * (1.0 / 16777216.0);
    return ML_DADD(lo, ML_DMUL(hi - lo, u));
}

/* Box-Muller on two lanes: z0 = r cos(theta), z1 = r sin(theta). */
ML_HD void ml_philox_box_muller(uint32_t xa, uint32_t xb, double *z0, double *z1) {
    const double two_pi = 6.283185307179586476925286766559;
    double u1 = ((double)xa + 1.0) * (1.0 / 4294967296.0);
    double u2 = (double)xb * (1.0 / 4294967296.0);
    double r = sqrt(-2.0 * log(u1));
    double th = ML_DMUL(two_pi, u2);
    *z0 = ML_DMUL(r, cos(th));
    *z1 = ML_DMUL(r, sin(th));
}

/* mean + std * z. */
ML_HD double ml_philox_affine(double mean, double std, double z) {
    return ML_DADD(mean, ML_DMUL(std, z));
}

#endif
