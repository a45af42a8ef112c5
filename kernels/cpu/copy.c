/* copy.c — CPU strided copy with dtype conversion, and fill (contract in
 * kernels/copy.h).  Contiguous same-dtype copies are one memmove and
 * contiguous fills one memset or loop; everything else walks the elements
 * in row-major order with an odometer over the shape. */
#include "copy.h"
#include <string.h>

/* The next row-major position: advances the offsets of up to two strided
 * operands together (ob may be NULL). */
typedef struct { int ndim; int64_t shape[ML_MAX_DIMS]; int64_t idx[ML_MAX_DIMS]; } odometer;

static inline void odometer_next(odometer *it, const int64_t *sa, int64_t *oa, const int64_t *sb, int64_t *ob) {
    for (int d = it->ndim - 1; d >= 0; d--) {
        if (++it->idx[d] < it->shape[d]) { *oa += sa[d]; if (ob) *ob += sb[d]; return; }
        *oa -= sa[d] * (it->shape[d] - 1);
        if (ob) *ob -= sb[d] * (it->shape[d] - 1);
        it->idx[d] = 0;
    }
}

static odometer odometer_of(const ml_ktensor *t) {
    odometer it = {.ndim = t->ndim};
    memcpy(it.shape, t->shape, (size_t)t->ndim * sizeof it.shape[0]);
    return it;
}

int ml_copy_cpu(ml_ktensor *dst, const ml_ktensor *src) {
    int64_t n = ml_kt_numel(dst);
    if (n == 0) return 0;
    size_t es = ml_dtype_size(dst->dtype);
    if (dst->dtype == src->dtype && ml_kt_is_contiguous(dst) && ml_kt_is_contiguous(src)) {
        memmove(dst->data, src->data, (size_t)n * es);
        return 0;
    }
    odometer it = odometer_of(dst);
    int64_t od = 0, os = 0;
    char *pd = dst->data;
    const char *ps = src->data;
    if (dst->dtype == src->dtype) {
        for (int64_t i = 0; i < n; i++) {
            memcpy(pd + od * es, ps + os * es, es);
            odometer_next(&it, dst->strides, &od, src->strides, &os);
        }
    } else if (dst->dtype == ML_F32 && src->dtype == ML_F64) {
        for (int64_t i = 0; i < n; i++) {
            ((float *)pd)[od] = (float)((const double *)ps)[os];
            odometer_next(&it, dst->strides, &od, src->strides, &os);
        }
    } else if (dst->dtype == ML_F64 && src->dtype == ML_F32) {
        for (int64_t i = 0; i < n; i++) {
            ((double *)pd)[od] = ((const float *)ps)[os];
            odometer_next(&it, dst->strides, &od, src->strides, &os);
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            ml_store_from_double(pd, dst->dtype, od, ml_load_as_double(ps, src->dtype, os));
            odometer_next(&it, dst->strides, &od, src->strides, &os);
        }
    }
    return 0;
}

int ml_fill_cpu(ml_ktensor *t, double v) {
    int64_t n = ml_kt_numel(t);
    if (n == 0) return 0;
    size_t es = ml_dtype_size(t->dtype);
    char elem[8];
    ml_store_from_double(elem, t->dtype, 0, v);
    char *p = t->data;
    if (ml_kt_is_contiguous(t)) {
        if (v == 0.0) memset(p, 0, (size_t)n * es);
        else if (t->dtype == ML_F32) { float f = (float)v; for (int64_t i = 0; i < n; i++) ((float *)p)[i] = f; }
        else for (int64_t i = 0; i < n; i++) memcpy(p + i * es, elem, es);
        return 0;
    }
    odometer it = odometer_of(t);
    int64_t o = 0;
    for (int64_t i = 0; i < n; i++) { memcpy(p + o * es, elem, es); odometer_next(&it, t->strides, &o, NULL, NULL); }
    return 0;
}
