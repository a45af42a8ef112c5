/* random.c — CPU random fills: the Philox stream of kernels/philox.h,
 * written to any dtype and any strides. */
#include "random.h"
#include "philox.h"
#include <string.h>

/* Walks the elements of t in row-major order. */
typedef struct {
    char *base;
    int64_t es, off, idx[ML_MAX_DIMS];
    const ml_ktensor *t;
    bool contiguous;
} cursor;

static void cursor_init(cursor *c, ml_ktensor *t) {
    memset(c, 0, sizeof *c);
    c->t = t;
    c->base = t->data;
    c->es = (int64_t)ml_dtype_size(t->dtype);
    c->contiguous = ml_kt_is_contiguous(t);
}

/* Address of element i (called with i = 0, 1, 2, ... in order). */
static char *cursor_at(cursor *c, int64_t i) {
    if (c->contiguous) return c->base + i * c->es;
    if (i > 0) {
        const ml_ktensor *t = c->t;
        for (int d = t->ndim - 1; d >= 0; d--) {
            if (++c->idx[d] < t->shape[d]) { c->off += t->strides[d]; break; }
            c->idx[d] = 0;
            c->off -= t->strides[d] * (t->shape[d] - 1);
        }
    }
    return c->base + c->off * c->es;
}

static void store(char *p, ml_dtype t, double v) { ml_store_from_double(p, t, 0, v); }

int ml_uniform_cpu(ml_ktensor *out, uint64_t seed, uint64_t offset, double lo, double hi) {
    int64_t n = ml_kt_numel(out);
    cursor c;
    cursor_init(&c, out);
    uint32_t x[4];
    if (c.contiguous && out->dtype == ML_F32) {
        float *o = (float *)c.base;
        for (int64_t i = 0; i < n; i += 4) {
            ml_philox_block(seed, offset, (uint64_t)(i / 4), x);
            for (int k = 0; k < 4 && i + k < n; k++) o[i + k] = (float)ml_philox_uniform(x[k], lo, hi);
        }
        return 0;
    }
    for (int64_t i = 0; i < n; i++) {
        if (i % 4 == 0) ml_philox_block(seed, offset, (uint64_t)(i / 4), x);
        store(cursor_at(&c, i), out->dtype, ml_philox_uniform(x[i % 4], lo, hi));
    }
    return 0;
}

int ml_normal_cpu(ml_ktensor *out, uint64_t seed, uint64_t offset, double mean, double std) {
    int64_t n = ml_kt_numel(out);
    cursor c;
    cursor_init(&c, out);
    uint32_t x[4];
    double z[4];
    for (int64_t i = 0; i < n; i++) {
        if (i % 4 == 0) {
            ml_philox_block(seed, offset, (uint64_t)(i / 4), x);
            ml_philox_box_muller(x[0], x[1], &z[0], &z[1]);
            ml_philox_box_muller(x[2], x[3], &z[2], &z[3]);
        }
        store(cursor_at(&c, i), out->dtype, ml_philox_affine(mean, std, z[i % 4]));
    }
    return 0;
}

int ml_randint_cpu(ml_ktensor *out, uint64_t seed, uint64_t offset, int64_t low, int64_t high) {
    uint64_t r = (uint64_t)high - (uint64_t)low;
    bool wide = r > 0x100000000ull;
    int64_t n = ml_kt_numel(out);
    cursor c;
    cursor_init(&c, out);
    uint32_t x[4];
    for (int64_t i = 0; i < n; i++) {
        uint64_t u;
        if (wide) {
            if (i % 2 == 0) ml_philox_block(seed, offset, (uint64_t)(i / 2), x);
            int k = (int)(i % 2) * 2;
            u = (uint64_t)x[k] | (uint64_t)x[k + 1] << 32;
        } else {
            if (i % 4 == 0) ml_philox_block(seed, offset, (uint64_t)(i / 4), x);
            u = x[i % 4];
        }
        int64_t v = (int64_t)((uint64_t)low + u % r);
        char *p = cursor_at(&c, i);
        switch (out->dtype) {
        case ML_I64: *(int64_t *)p = v; break;
        case ML_I32: *(int32_t *)p = (int32_t)v; break;
        case ML_U8: *(uint8_t *)p = (uint8_t)v; break;
        default: store(p, out->dtype, (double)v); break;
        }
    }
    return 0;
}
