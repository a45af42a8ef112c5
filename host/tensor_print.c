/* tensor_print.c — tensors as text (ml_tensor_repr): PyTorch's layout,
 * values abbreviated past 1000 elements, then shape, dtype, device and the
 * autograd state. */
#include "tensor.h"
#include "autograd.h"
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct { char *buf; size_t len, cap; } sbuf;

static void sb_put(sbuf *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_put(sbuf *s, const char *fmt, ...) {
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int k = vsnprintf(s->buf + s->len, s->cap - s->len, fmt, ap);
        va_end(ap);
        if (k < 0) return;
        if (s->len + (size_t)k < s->cap) { s->len += k; return; }
        size_t nc = s->cap * 2 + (size_t)k + 64;
        char *nb = realloc(s->buf, nc);
        if (!nb) return;
        s->buf = nb; s->cap = nc;
    }
}

typedef struct {
    const double *v;
    const ml_tensor *t;
    int64_t cstride[ML_MAX_DIMS];
    bool summarize, is_float, sci, intlike;
    int width;
} print_ctx;

static int fmt_value(const print_ctx *p, double x, char *b, size_t n) {
    if (!p->is_float) {
        if (p->t->dtype == ML_BOOL) return snprintf(b, n, "%s", x != 0 ? "true" : "false");
        return snprintf(b, n, "%.0f", x);
    }
    if (isnan(x)) return snprintf(b, n, "nan");
    if (isinf(x)) return snprintf(b, n, x > 0 ? "inf" : "-inf");
    if (p->sci) return snprintf(b, n, "%.4e", x);
    if (p->intlike) return snprintf(b, n, "%.0f.", x);
    return snprintf(b, n, "%.4f", x);
}

static void print_rec(const print_ctx *p, sbuf *s, int d, int64_t base, int indent) {
    const ml_tensor *t = p->t;
    int64_t n = t->shape[d];
    const int edge = 3;
    sb_put(s, "[");
    for (int64_t i = 0; i < n; i++) {
        if (p->summarize && n > 2 * edge && i == edge) {
            if (d == t->ndim - 1) sb_put(s, " ..., ");
            else {
                sb_put(s, "...,");
                for (int k = 0; k < t->ndim - d - 1; k++) sb_put(s, "\n");
                sb_put(s, "%*s", indent + 1, "");
            }
            i = n - edge - 1;
            continue;
        }
        int64_t off = base + i * p->cstride[d];
        if (d == t->ndim - 1) {
            char b[64];
            fmt_value(p, p->v[off], b, sizeof b);
            sb_put(s, "%*s", p->width, b);
            if (i < n - 1) sb_put(s, ", ");
        } else {
            print_rec(p, s, d + 1, off, indent + 1);
            if (i < n - 1) {
                sb_put(s, ",");
                for (int k = 0; k < t->ndim - d - 1; k++) sb_put(s, "\n");
                sb_put(s, "%*s", indent + 1, "");
            }
        }
    }
    sb_put(s, "]");
}

char *ml_tensor_repr(const ml_tensor *t) {
    sbuf s = {malloc(256), 0, 256};
    if (!s.buf) return NULL;
    s.buf[0] = 0;
    double *v = ml_to_doubles(t);
    if (!v) { free(s.buf); return NULL; }
    int64_t n = ml_numel(t);
    print_ctx p = {.v = v, .t = t, .summarize = n > 1000, .is_float = ml_dtype_is_float(t->dtype)};
    ml_contiguous_strides(t->ndim, t->shape, p.cstride);
    if (p.is_float) {
        double mx = 0, mn = INFINITY;
        bool all_int = true;
        for (int64_t i = 0; i < n; i++) {
            double a = fabs(v[i]);
            if (!isfinite(a)) continue;
            if (a > mx) mx = a;
            if (a > 0 && a < mn) mn = a;
            if (v[i] != floor(v[i])) all_int = false;
        }
        p.intlike = all_int && mx < 1e8;
        p.sci = !p.intlike && (mx >= 1e8 || (mn < 1e-4 && mn > 0) || (mx / (mn > 0 ? mn : 1)) > 1e6);
    }
    for (int64_t i = 0; i < n; i++) {
        char b[64];
        int w = fmt_value(&p, v[i], b, sizeof b);
        if (w > p.width) p.width = w;
    }
    sb_put(&s, "tensor(");
    if (t->ndim == 0) {
        char b[64];
        fmt_value(&p, v[0], b, sizeof b);
        sb_put(&s, "%s", b);
    } else if (n == 0) sb_put(&s, "[]");
    else print_rec(&p, &s, 0, 0, 7);
    char shp[160], dev[32];
    ml_device_str(t->device, dev, sizeof dev);
    sb_put(&s, ", shape=%s, dtype=%s, device=%s", ml_shape_str(t, shp, sizeof shp), ml_dtype_name(t->dtype), dev);
    if (t->grad_fn) sb_put(&s, ", grad_fn=%s", t->grad_fn->name);
    else if (t->requires_grad) sb_put(&s, ", requires_grad=true");
    sb_put(&s, ")");
    free(v);
    return s.buf;
}
