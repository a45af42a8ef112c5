/* upsample.c — CPU nearest 2-D upsampling, NHWC: every output pixel is a
 * run of C contiguous values copied from its source pixel. */
#include "upsample.h"
#include <string.h>

int ml_upsample_nearest2d_forward_cpu(ml_ktensor *out, const ml_ktensor *x, int scale) {
    int64_t N = x->shape[0], H = x->shape[1], W = x->shape[2], C = x->shape[3], s = scale;
    size_t run = (size_t)C * ml_dtype_size(x->dtype);
    const char *src = x->data;
    char *dst = out->data;
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++) {
            /* Build one output row, then repeat it s - 1 times. */
            char *row = dst + (size_t)(((n * H + h) * s) * W * s) * run;
            for (int64_t w = 0; w < W; w++) {
                const char *p = src + (size_t)((n * H + h) * W + w) * run;
                for (int64_t k = 0; k < s; k++) memcpy(row + (size_t)(w * s + k) * run, p, run);
            }
            for (int64_t k = 1; k < s; k++) memcpy(row + (size_t)(k * W * s) * run, row, (size_t)(W * s) * run);
        }
    return 0;
}

int ml_upsample_nearest2d_backward_cpu(ml_ktensor *dx, const ml_ktensor *dout, int scale) {
    if (dx->dtype != ML_F32 && dx->dtype != ML_F64)
        return ml_error("upsample_nearest2d backward: the CPU computes in float32 or float64, not %s",
                        ml_dtype_name(dx->dtype));
    int64_t N = dx->shape[0], H = dx->shape[1], W = dx->shape[2], C = dx->shape[3], s = scale;
    memset(dx->data, 0, (size_t)ml_kt_numel(dx) * ml_dtype_size(dx->dtype));
    /* Walk dout in memory order, adding each pixel's run into its source. */
    for (int64_t n = 0; n < N; n++)
        for (int64_t oh = 0; oh < H * s; oh++)
            for (int64_t ow = 0; ow < W * s; ow++) {
                int64_t o = ((n * H * s + oh) * W * s + ow) * C, d = ((n * H + oh / s) * W + ow / s) * C;
                if (dx->dtype == ML_F32) {
                    const float *g = (const float *)dout->data + o;
                    float *q = (float *)dx->data + d;
                    for (int64_t c = 0; c < C; c++) q[c] += g[c];
                } else {
                    const double *g = (const double *)dout->data + o;
                    double *q = (double *)dx->data + d;
                    for (int64_t c = 0; c < C; c++) q[c] += g[c];
                }
            }
    return 0;
}
