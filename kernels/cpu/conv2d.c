/* conv2d.c — CPU NHWC convolution as im2col + GEMM.
 *
 * In NHWC the patch of one output pixel is kh*kw runs of C contiguous input
 * values, so im2col is a series of memcpy, and the product
 * col [rows, K] @ w [O, K]^T is already the NHWC output [rows, O] (rows =
 * N*Ho*Wo).  The rows are processed in chunks so the column buffer stays
 * under COL_BUDGET bytes whatever the image size; a 1x1 stride-1 unpadded
 * convolution is a plain GEMM over x itself. */
#include "conv2d.h"
#include "matmul.h"
#include "checked_math.h"
#include <stdlib.h>
#include <string.h>

#define COL_BUDGET ((size_t)64 << 20)

typedef struct {
    int64_t N, H, W, C, O, kh, kw, Ho, Wo, K, rows;
    size_t es;
    const ml_conv2d_params *p;
} geom;

static geom make_geom(const ml_ktensor *x, const ml_ktensor *w, const ml_conv2d_params *p) {
    geom g = {.N = x->shape[0], .H = x->shape[1], .W = x->shape[2], .C = x->shape[3],
              .O = w->shape[0], .kh = w->shape[1], .kw = w->shape[2], .p = p};
    g.Ho = (g.H + p->pad_top + p->pad_bottom - g.kh) / p->stride_h + 1;
    g.Wo = (g.W + p->pad_left + p->pad_right - g.kw) / p->stride_w + 1;
    g.K = g.kh * g.kw * g.C;
    g.rows = g.N * g.Ho * g.Wo;
    g.es = ml_dtype_size(x->dtype);
    return g;
}

static bool is_pointwise(const geom *g) {
    const ml_conv2d_params *p = g->p;
    return g->kh == 1 && g->kw == 1 && p->stride_h == 1 && p->stride_w == 1 &&
           !p->pad_top && !p->pad_bottom && !p->pad_left && !p->pad_right;
}

/* Output rows per chunk of the column buffer. */
static int64_t chunk_rows(const geom *g) {
    int64_t r = (int64_t)(COL_BUDGET / ((size_t)(g->K ? g->K : 1) * g->es));
    if (r < 1) r = 1;
    return r < g->rows ? r : g->rows;
}

/* pix[i*kw + j] = the flat input pixel (n*H + ih)*W + iw read by patch
 * element (i, j) of output row r, or -1 where it reads padding. */
static void patch_pixels(const geom *g, int64_t r, int64_t *pix) {
    int64_t n = r / (g->Ho * g->Wo), rem = r % (g->Ho * g->Wo), oh = rem / g->Wo, ow = rem % g->Wo;
    for (int64_t i = 0; i < g->kh; i++) {
        int64_t ih = oh * g->p->stride_h - g->p->pad_top + i;
        for (int64_t j = 0; j < g->kw; j++) {
            int64_t iw = ow * g->p->stride_w - g->p->pad_left + j;
            bool inside = ih >= 0 && ih < g->H && iw >= 0 && iw < g->W;
            pix[i * g->kw + j] = inside ? (n * g->H + ih) * g->W + iw : -1;
        }
    }
}

/* col [nr, K] <- the patches of output rows [r0, r0 + nr). */
static void im2col(const geom *g, const char *x, int64_t r0, int64_t nr, char *col, int64_t *pix) {
    size_t run = (size_t)g->C * g->es;
    for (int64_t r = r0; r < r0 + nr; r++) {
        patch_pixels(g, r, pix);
        char *dst = col + (size_t)((r - r0) * g->K) * g->es;
        for (int64_t k = 0; k < g->kh * g->kw; k++, dst += run) {
            if (pix[k] < 0) memset(dst, 0, run);
            else memcpy(dst, x + (size_t)pix[k] * run, run);
        }
    }
}

/* dx += the columns of rows [r0, r0 + nr) added back to their pixels. */
static void col2im(const geom *g, const char *col, int64_t r0, int64_t nr, char *dx, int64_t *pix) {
    int64_t C = g->C;
    for (int64_t r = r0; r < r0 + nr; r++) {
        patch_pixels(g, r, pix);
        for (int64_t k = 0; k < g->kh * g->kw; k++) {
            if (pix[k] < 0) continue;
            size_t src = (size_t)((r - r0) * g->K + k * C), dst = (size_t)(pix[k] * C);
            if (g->es == sizeof(float)) {
                const float *s = (const float *)col + src;
                float *d = (float *)dx + dst;
                for (int64_t c = 0; c < C; c++) d[c] += s[c];
            } else {
                const double *s = (const double *)col + src;
                double *d = (double *)dx + dst;
                for (int64_t c = 0; c < C; c++) d[c] += s[c];
            }
        }
    }
}

/* One allocation: the column buffer of `step` rows, then the patch pixel list. */
static char *col_buffer(const geom *g, int64_t step, int64_t **pix, const char *op) {
    /* every product checked: step * K elements can pass size_t where the
     * output itself was small enough to allocate */
    size_t cb = 0, pb = 0, total = 0;
    bool ok = step >= 0 && g->K >= 0 && ml_mul_size((size_t)step, (size_t)g->K, &cb) &&
              ml_mul_size(cb, (size_t)g->es, &cb) && ml_round_up_size(cb, 64, &cb) &&
              ml_mul_size((size_t)g->kh, (size_t)g->kw, &pb) && ml_mul_size(pb, sizeof **pix, &pb) &&
              ml_add_size(cb, pb, &total);
    char *col = ok ? malloc(total) : NULL;
    if (!col) return ml_error_null("%s: out of CPU memory for a %lld x %lld column buffer", op,
                                   (long long)step, (long long)g->K);
    *pix = (int64_t *)(col + cb);
    return col;
}

int ml_conv2d_forward_cpu(ml_ktensor *out, const ml_ktensor *x, const ml_ktensor *w, const ml_ktensor *b,
                          const ml_conv2d_params *p) {
    geom g = make_geom(x, w, p);
    ml_dtype dt = x->dtype;
    char *o = out->data;
    const char *xp = x->data;
    if (b) ml_fill_rows_cpu(dt, o, b->data, g.rows, g.O);
    double beta = b ? 1 : 0;
    if (is_pointwise(&g))
        return ml_gemm_cpu(dt, false, true, g.rows, g.O, g.C, 1, xp, g.C, w->data, g.C, beta, o, g.O);
    int64_t step = chunk_rows(&g), *pix;
    char *col = col_buffer(&g, step, &pix, "conv2d");
    if (!col) return -1;
    int rc = 0;
    for (int64_t r0 = 0; r0 < g.rows && rc == 0; r0 += step) {
        int64_t nr = g.rows - r0 < step ? g.rows - r0 : step;
        im2col(&g, xp, r0, nr, col, pix);
        rc = ml_gemm_cpu(dt, false, true, nr, g.O, g.K, 1, col, g.K, w->data, g.K, beta,
                         o + (size_t)(r0 * g.O) * g.es, g.O);
    }
    free(col);
    return rc;
}

/* dw = dout^T col;  dcol = dout w, scattered into dx;  db = column sums. */
int ml_conv2d_backward_cpu(ml_ktensor *dx, ml_ktensor *dw, ml_ktensor *db, const ml_ktensor *dout,
                           const ml_ktensor *x, const ml_ktensor *w, const ml_conv2d_params *p) {
    geom g = make_geom(x, w, p);
    ml_dtype dt = x->dtype;
    const char *go = dout->data, *xp = x->data, *wp = w->data;
    if (db && ml_colsum_cpu(dt, db->data, go, g.rows, g.O, false) < 0) return -1;
    if (is_pointwise(&g)) {
        if (dw && ml_gemm_cpu(dt, true, false, g.O, g.C, g.rows, 1, go, g.O, xp, g.C, 0, dw->data, g.C) < 0)
            return -1;
        if (dx && ml_gemm_cpu(dt, false, false, g.rows, g.C, g.O, 1, go, g.O, wp, g.C, 0, dx->data, g.C) < 0)
            return -1;
        return 0;
    }
    if (!dx && !dw) return 0;
    int64_t step = chunk_rows(&g), *pix;
    char *col = col_buffer(&g, step, &pix, "conv2d backward");
    if (!col) return -1;
    if (dx) memset(dx->data, 0, (size_t)ml_kt_numel(dx) * g.es);
    if (dw && g.rows == 0) memset(dw->data, 0, (size_t)ml_kt_numel(dw) * g.es);
    int rc = 0;
    for (int64_t r0 = 0; r0 < g.rows && rc == 0; r0 += step) {
        int64_t nr = g.rows - r0 < step ? g.rows - r0 : step;
        const char *gchunk = go + (size_t)(r0 * g.O) * g.es;
        if (dw) {
            im2col(&g, xp, r0, nr, col, pix);
            rc = ml_gemm_cpu(dt, true, false, g.O, g.K, nr, 1, gchunk, g.O, col, g.K, r0 ? 1 : 0,
                             dw->data, g.K);
        }
        if (dx && rc == 0) {
            /* The buffer is free again once dw has consumed it. */
            rc = ml_gemm_cpu(dt, false, false, nr, g.K, g.O, 1, gchunk, g.O, wp, g.K, 0, col, g.K);
            if (rc == 0) col2im(&g, col, r0, nr, dx->data, pix);
        }
    }
    free(col);
    return rc;
}
