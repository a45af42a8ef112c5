/* dtype.c — dtype names, sizes and scalar conversions. */
#include "dtype.h"
#include <math.h>
#include <strings.h>

static const size_t k_size[ML_NUM_DTYPES] = {4, 8, 2, 2, 4, 8, 1, 1};
static const char *k_name[ML_NUM_DTYPES] = {"float32", "float64", "float16", "bfloat16",
                                            "int32", "int64", "uint8", "bool"};
static const char *k_short[ML_NUM_DTYPES] = {"f32", "f64", "f16", "bf16", "i32", "i64", "u8", "bool"};

size_t ml_dtype_size(ml_dtype t) { return (unsigned)t < ML_NUM_DTYPES ? k_size[t] : 0; }
const char *ml_dtype_name(ml_dtype t) { return (unsigned)t < ML_NUM_DTYPES ? k_name[t] : "?"; }
const char *ml_dtype_short(ml_dtype t) { return (unsigned)t < ML_NUM_DTYPES ? k_short[t] : "?"; }
int ml_dtype_is_float(ml_dtype t) { return t == ML_F32 || t == ML_F64 || t == ML_F16 || t == ML_BF16; }

int ml_dtype_parse(const char *s) {
    static const struct { const char *n; ml_dtype t; } alias[] = {
        {"f32", ML_F32}, {"float32", ML_F32}, {"float", ML_F32},
        {"f64", ML_F64}, {"float64", ML_F64}, {"double", ML_F64},
        {"f16", ML_F16}, {"float16", ML_F16}, {"half", ML_F16},
        {"bf16", ML_BF16}, {"bfloat16", ML_BF16},
        {"i32", ML_I32}, {"int32", ML_I32}, {"int", ML_I32},
        {"i64", ML_I64}, {"int64", ML_I64}, {"long", ML_I64},
        {"u8", ML_U8}, {"uint8", ML_U8}, {"byte", ML_U8},
        {"bool", ML_BOOL},
    };
    if (!s) return -1;
    for (size_t i = 0; i < sizeof alias / sizeof alias[0]; i++)
        if (strcasecmp(s, alias[i].n) == 0) return alias[i].t;
    return -1;
}

float ml_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        if (man == 0) u = sign;
        else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            man &= 0x3ff;
            u = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) u = sign | 0x7f800000u | (man << 13);
    else u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f; memcpy(&f, &u, 4); return f;
}

uint16_t ml_f32_to_f16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00);          /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);         /* overflow -> inf */
    if (a < 0x38800000u) {                                           /* subnormal or zero */
        if (a < 0x33000000u) return (uint16_t)sign;
        uint32_t e = a >> 23, m = (a & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e;                                   /* 14..24 */
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((a >> 13) - ((127 - 15) << 10));
    uint32_t rem = a & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

double ml_load_as_double(const void *p, ml_dtype t, int64_t i) {
    switch (t) {
    case ML_F32: return ((const float *)p)[i];
    case ML_F64: return ((const double *)p)[i];
    case ML_F16: return ml_f16_to_f32(((const uint16_t *)p)[i]);
    case ML_BF16: return ml_bf16_to_f32(((const uint16_t *)p)[i]);
    case ML_I32: return ((const int32_t *)p)[i];
    case ML_I64: return (double)((const int64_t *)p)[i];
    case ML_U8: return ((const uint8_t *)p)[i];
    case ML_BOOL: return ((const uint8_t *)p)[i] ? 1.0 : 0.0;
    default: return NAN;
    }
}

void ml_store_from_double(void *p, ml_dtype t, int64_t i, double v) {
    switch (t) {
    case ML_F32: ((float *)p)[i] = (float)v; break;
    case ML_F64: ((double *)p)[i] = v; break;
    case ML_F16: ((uint16_t *)p)[i] = ml_f32_to_f16((float)v); break;
    case ML_BF16: ((uint16_t *)p)[i] = ml_f32_to_bf16((float)v); break;
    case ML_I32: ((int32_t *)p)[i] = (int32_t)v; break;
    case ML_I64: ((int64_t *)p)[i] = (int64_t)v; break;
    case ML_U8: ((uint8_t *)p)[i] = (uint8_t)v; break;
    case ML_BOOL: ((uint8_t *)p)[i] = v != 0; break;
    default: break;
    }
}
