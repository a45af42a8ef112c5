/* softmax.c — CPU softmax / log_softmax over any dim (typed bodies in
 * softmax_t.h, instantiated for float and double). */
#include "softmax.h"
#include "checked_math.h"
#include <stdlib.h>
#include <tgmath.h>

#define ML_TYPED_BODY "softmax_t.h"
#include "typed.h"

static void split_dims(const ml_ktensor *t, int dim, int64_t *outer, int64_t *D, int64_t *inner) {
    *outer = *inner = 1;
    *D = t->ndim ? t->shape[dim] : 1;
    for (int i = 0; i < dim; i++) *outer *= t->shape[i];
    for (int i = dim + 1; i < t->ndim; i++) *inner *= t->shape[i];
}

int ml_softmax_forward_cpu(ml_ktensor *out, const ml_ktensor *x, int dim, bool log) {
    int64_t outer, D, inner;
    split_dims(x, dim, &outer, &D, &inner);
    /* calloc checks the count times the size (inner can be the numel of a broadcast view) */
    double *buf = calloc((size_t)inner, 2 * sizeof *buf);
    if (!buf) return ml_error("softmax: out of CPU memory for a row buffer of %lld elements", (long long)inner);
    if (x->dtype == ML_F32) softmax_rows_f32(out->data, x->data, outer, D, inner, log, buf);
    else softmax_rows_f64(out->data, x->data, outer, D, inner, log, buf);
    free(buf);
    return 0;
}

int ml_softmax_backward_cpu(ml_ktensor *dx, const ml_ktensor *dout, const ml_ktensor *out, int dim, bool log) {
    int64_t outer, D, inner;
    split_dims(out, dim, &outer, &D, &inner);
    double *buf = calloc((size_t)inner, sizeof *buf);
    if (!buf) return ml_error("softmax backward: out of CPU memory for a row buffer of %lld elements", (long long)inner);
    if (out->dtype == ML_F32) softmax_rows_backward_f32(dx->data, dout->data, out->data, outer, D, inner, log, buf);
    else softmax_rows_backward_f64(dx->data, dout->data, out->data, outer, D, inner, log, buf);
    free(buf);
    return 0;
}
