/* dtype.h — element types and the half-precision conversions every layer
 * shares (host, kernels, file IO). */
#ifndef ML_DTYPE_H
#define ML_DTYPE_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

typedef enum {
    ML_F32 = 0, ML_F64, ML_F16, ML_BF16, ML_I32, ML_I64, ML_U8, ML_BOOL,
    ML_NUM_DTYPES
} ml_dtype;

size_t ml_dtype_size(ml_dtype t);
const char *ml_dtype_name(ml_dtype t);          /* "float32", "bfloat16", ... */
const char *ml_dtype_short(ml_dtype t);         /* "f32", "bf16", ... */
/* Parse "f32"/"float32"/"float"/"bf16"/"bfloat16"/"half"/...; -1 if unknown. */
int ml_dtype_parse(const char *s);
int ml_dtype_is_float(ml_dtype t);

/* IEEE half and bfloat16 <-> float.  bf16 rounds to nearest even, NaN kept. */
static inline float ml_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t ml_f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
float ml_f16_to_f32(uint16_t h);
uint16_t ml_f32_to_f16(float f);

/* Read element i of a buffer of dtype t as double / write a double into it. */
double ml_load_as_double(const void *p, ml_dtype t, int64_t i);
void ml_store_from_double(void *p, ml_dtype t, int64_t i, double v);

#endif
