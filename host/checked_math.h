/* checked_math.h — size arithmetic that reports overflow instead of wrapping.
 *
 * Every product and sum of sizes, strides, offsets and byte counts in the
 * tensor core goes through these, so a shape such as [2^32, 2^32] is refused
 * instead of silently becoming a zero-element (or a 16-byte) tensor that
 * later writes past its storage.  Each returns true when the exact result
 * fits and stores it in *out; on overflow it returns false and *out is
 * unspecified.  The callers turn false into an ml_error naming the shape. */
#ifndef ML_CHECKED_MATH_H
#define ML_CHECKED_MATH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

static inline bool ml_mul_i64(int64_t a, int64_t b, int64_t *out) { return !__builtin_mul_overflow(a, b, out); }
static inline bool ml_add_i64(int64_t a, int64_t b, int64_t *out) { return !__builtin_add_overflow(a, b, out); }
static inline bool ml_mul_size(size_t a, size_t b, size_t *out) { return !__builtin_mul_overflow(a, b, out); }
static inline bool ml_add_size(size_t a, size_t b, size_t *out) { return !__builtin_add_overflow(a, b, out); }

/* n rounded up to a multiple of `align` (a power of two). */
static inline bool ml_round_up_size(size_t n, size_t align, size_t *out) {
    if (!ml_add_size(n, align - 1, out)) return false;
    *out &= ~(align - 1);
    return true;
}

/* The element count of a shape: false on a negative size or an overflowing
 * product. */
static inline bool ml_shape_numel_ok(int ndim, const int64_t *shape, int64_t *out) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0 || !ml_mul_i64(n, shape[i], &n)) return false;
    *out = n;
    return true;
}

#endif
