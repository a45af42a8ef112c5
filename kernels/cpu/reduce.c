/* reduce.c — CPU reductions (contract in reduce.h).
 *
 * A plan lists x's non-trivial dims ordered by decreasing x stride (so the
 * innermost loop walks memory in order even for transposed inputs), each
 * with its stride in x and in an accumulator laid out like `out` (stride 0
 * on reduced dims), and merges dims that are contiguous in both.  The
 * innermost dim then is either reduced — a row summed into one accumulator,
 * e.g. the last dim of [N, C] — or kept — a row added element-wise into a
 * row of accumulators, e.g. summing [N, C] over N for a bias gradient.
 * Both inner loops are unit-stride in the common cases and vectorise. */

/* The Makefile's -O2 keeps GCC's "very cheap" vectoriser, which gives up on
 * any loop needing a runtime aliasing check. */
#pragma GCC optimize("O3")

#include "reduce.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int nd;
    bool empty;                       /* x has a zero-size dim */
    int64_t shape[ML_MAX_DIMS];
    int64_t xs[ML_MAX_DIMS];          /* strides in x (elements) */
    int64_t as[ML_MAX_DIMS];          /* strides in the accumulator, 0 if reduced */
} red_plan;

static void red_plan_make(red_plan *p, const ml_ktensor *out, const ml_ktensor *x) {
    int64_t acs[ML_MAX_DIMS];
    ml_kt_contiguous_strides(out->ndim, out->shape, acs);
    memset(p, 0, sizeof *p);
    int nd = 0;
    for (int d = 0; d < x->ndim; d++) {
        if (x->shape[d] == 0) p->empty = true;
        if (x->shape[d] <= 1) continue;
        /* insertion by decreasing x stride (stable) */
        int at = nd;
        while (at > 0 && p->xs[at - 1] < x->strides[d]) at--;
        for (int k = nd; k > at; k--) {
            p->shape[k] = p->shape[k - 1]; p->xs[k] = p->xs[k - 1]; p->as[k] = p->as[k - 1];
        }
        p->shape[at] = x->shape[d];
        p->xs[at] = x->strides[d];
        p->as[at] = out->shape[d] == 1 ? 0 : acs[d];
        nd++;
    }
    int m = 0;
    for (int k = 0; k < nd; k++) {
        if (m > 0 && p->xs[m - 1] == p->xs[k] * p->shape[k] && p->as[m - 1] == p->as[k] * p->shape[k]) {
            p->shape[m - 1] *= p->shape[k];
            p->xs[m - 1] = p->xs[k];
            p->as[m - 1] = p->as[k];
        } else {
            p->shape[m] = p->shape[k]; p->xs[m] = p->xs[k]; p->as[m] = p->as[k];
            m++;
        }
    }
    p->nd = m;
}

/* acc points at the accumulator of this row (reduced innermost dim) or at
 * the first of a row of accumulators `as` apart (kept innermost dim); aux is
 * the matching per-output auxiliary value (the mean, for var). */
typedef void (*row_fn)(void *acc, const double *aux, const char *x, int64_t n, int64_t s, double prm);
typedef void (*col_fn)(void *acc, int64_t as, const double *aux, const char *x, int64_t n, int64_t s,
                       double prm);

static void red_run(const red_plan *pl, const char *x, size_t xes, char *acc, size_t aes,
                    const double *aux, row_fn rf, col_fn cf, double prm) {
    if (pl->empty) return;
    if (pl->nd == 0) { rf(acc, aux, x, 1, 0, prm); return; }
    int in = pl->nd - 1;
    int64_t n = pl->shape[in], sx = pl->xs[in], sa = pl->as[in], rows = 1;
    for (int d = 0; d < in; d++) rows *= pl->shape[d];
    int64_t idx[ML_MAX_DIMS] = {0}, ox = 0, oa = 0;
    for (int64_t r = 0; r < rows; r++) {
        if (sa == 0) rf(acc + oa * aes, aux ? aux + oa : NULL, x + ox * xes, n, sx, prm);
        else cf(acc + oa * aes, sa, aux ? aux + oa : NULL, x + ox * xes, n, sx, prm);
        for (int d = in - 1; d >= 0; d--) {
            if (++idx[d] < pl->shape[d]) { ox += pl->xs[d]; oa += pl->as[d]; break; }
            idx[d] = 0;
            ox -= pl->xs[d] * (pl->shape[d] - 1);
            oa -= pl->as[d] * (pl->shape[d] - 1);
        }
    }
}

/* ---- typed inner loops -------------------------------------------------- */

/* f(v) is what is summed; eight partial sums keep a contiguous row from
 * being one long dependency chain (and the result no less accurate). */
#define DEF_ROW(name, T, AT, F)                                                             \
    static void name(void *accp, const double *aux, const char *xp, int64_t n, int64_t s,  \
                     double prm) {                                                          \
        (void)aux; (void)prm;                                                               \
        const T *x = (const T *)xp;                                                         \
        AT *acc = (AT *)accp;                                                               \
        AT a[8] = {0};                                                                      \
        int64_t i = 0;                                                                      \
        if (s == 1) {                                                                       \
            for (; i + 8 <= n; i += 8)                                                      \
                for (int k = 0; k < 8; k++) { AT v = (AT)x[i + k]; a[k] += F; }             \
            for (; i < n; i++) { AT v = (AT)x[i]; a[0] += F; }                              \
        } else {                                                                            \
            for (; i < n; i++) { AT v = (AT)x[i * s]; a[0] += F; }                          \
        }                                                                                   \
        *acc += ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));         \
    }

#define DEF_COL(name, T, AT, F)                                                             \
    static void name(void *accp, int64_t as, const double *aux, const char *xp, int64_t n, \
                     int64_t s, double prm) {                                               \
        (void)aux; (void)prm;                                                               \
        const T *x = (const T *)xp;                                                         \
        AT *acc = (AT *)accp;                                                               \
        if (as == 1 && s == 1) {                                                            \
            for (int64_t i = 0; i < n; i++) { AT v = (AT)x[i]; acc[i] += F; }               \
        } else {                                                                            \
            for (int64_t i = 0; i < n; i++) { AT v = (AT)x[i * s]; acc[i * as] += F; }      \
        }                                                                                   \
    }

/* Second pass of var: squared deviation from the mean in aux. */
#define DEF_VAR(T, tn)                                                                      \
    static void var_row_##tn(void *accp, const double *aux, const char *xp, int64_t n,     \
                             int64_t s, double prm) {                                       \
        (void)prm;                                                                          \
        const T *x = (const T *)xp;                                                         \
        double m = aux[0], a[4] = {0};                                                      \
        int64_t i = 0;                                                                      \
        if (s == 1)                                                                         \
            for (; i + 4 <= n; i += 4)                                                      \
                for (int k = 0; k < 4; k++) { double d = (double)x[i + k] - m; a[k] += d * d; } \
        for (; i < n; i++) { double d = (double)x[i * s] - m; a[0] += d * d; }              \
        *(double *)accp += (a[0] + a[1]) + (a[2] + a[3]);                                   \
    }                                                                                       \
    static void var_col_##tn(void *accp, int64_t as, const double *aux, const char *xp,    \
                             int64_t n, int64_t s, double prm) {                            \
        (void)prm;                                                                          \
        const T *x = (const T *)xp;                                                         \
        double *acc = (double *)accp;                                                       \
        for (int64_t i = 0; i < n; i++) {                                                   \
            double d = (double)x[i * s] - aux[i * as];                                      \
            acc[i * as] += d * d;                                                           \
        }                                                                                   \
    }

#define DEF_FLOAT_REDUCERS(T, tn)                                   \
    DEF_ROW(sum_row_##tn, T, double, v)                             \
    DEF_COL(sum_col_##tn, T, double, v)                             \
    DEF_ROW(sq_row_##tn, T, double, v * v)                          \
    DEF_COL(sq_col_##tn, T, double, v * v)                          \
    DEF_ROW(abs_row_##tn, T, double, fabs(v))                       \
    DEF_COL(abs_col_##tn, T, double, fabs(v))                       \
    DEF_ROW(pow_row_##tn, T, double, pow(fabs(v), prm))             \
    DEF_COL(pow_col_##tn, T, double, pow(fabs(v), prm))             \
    DEF_VAR(T, tn)

DEF_FLOAT_REDUCERS(float, f32)
DEF_FLOAT_REDUCERS(double, f64)
DEF_ROW(sum_row_i32, int32_t, int64_t, v)
DEF_COL(sum_col_i32, int32_t, int64_t, v)
DEF_ROW(sum_row_i64, int64_t, int64_t, v)
DEF_COL(sum_col_i64, int64_t, int64_t, v)
DEF_ROW(sum_row_u8, uint8_t, int64_t, v)
DEF_COL(sum_col_u8, uint8_t, int64_t, v)
/* bool is stored as 0/1 bytes: the u8 loops sum it. */

/* ---- entry points ------------------------------------------------------- */

static bool is_f(ml_dtype t) { return t == ML_F32 || t == ML_F64; }

/* Per-output element count N = numel(x) / numel(out). */
static int64_t per_output(const ml_ktensor *out, const ml_ktensor *x) {
    int64_t n = 1;
    for (int d = 0; d < x->ndim; d++) if (out->shape[d] == 1) n *= x->shape[d];
    return n;
}

static void store_out(ml_ktensor *out, int64_t i, double v) {
    if (out->dtype == ML_F32) ((float *)out->data)[i] = (float)v;
    else ((double *)out->data)[i] = v;
}

/* One pass over an f32 or f64 x into double accumulators. */
static void float_pass(const ml_ktensor *x, const red_plan *pl, double *acc, const double *aux,
                       row_fn r32, col_fn c32, row_fn r64, col_fn c64, double prm) {
    if (x->dtype == ML_F32)
        red_run(pl, x->data, 4, (char *)acc, sizeof(double), aux, r32, c32, prm);
    else
        red_run(pl, x->data, 8, (char *)acc, sizeof(double), aux, r64, c64, prm);
}

int ml_sum_cpu(ml_ktensor *out, const ml_ktensor *x, double scale) {
    red_plan pl;
    red_plan_make(&pl, out, x);
    int64_t no = ml_kt_numel(out);
    if (is_f(x->dtype)) {
        double *acc = calloc((size_t)(no ? no : 1), sizeof *acc);
        if (!acc) return ml_error("sum (cpu): out of memory");
        float_pass(x, &pl, acc, NULL, sum_row_f32, sum_col_f32, sum_row_f64, sum_col_f64, 0);
        for (int64_t i = 0; i < no; i++) store_out(out, i, acc[i] * scale);
        free(acc);
        return 0;
    }
    row_fn rf;
    col_fn cf;
    size_t es = ml_dtype_size(x->dtype);
    switch (x->dtype) {
    case ML_I32: rf = sum_row_i32; cf = sum_col_i32; break;
    case ML_I64: rf = sum_row_i64; cf = sum_col_i64; break;
    case ML_U8: case ML_BOOL: rf = sum_row_u8; cf = sum_col_u8; break;
    default: return ml_error("sum (cpu): dtype %s is not supported", ml_dtype_name(x->dtype));
    }
    int64_t *acc = out->data;
    memset(acc, 0, (size_t)no * sizeof *acc);
    red_run(&pl, x->data, es, (char *)acc, sizeof *acc, NULL, rf, cf, 0);
    return 0;
}

/* var and norm compute in float32 or float64 on the CPU. */
static int require_cpu_float(const char *what, const ml_ktensor *x) {
    if (!is_f(x->dtype))
        return ml_error("%s (cpu): dtype %s is not supported (float32 or float64)", what, ml_dtype_name(x->dtype));
    return 0;
}

int ml_var_cpu(ml_ktensor *out, const ml_ktensor *x, double correction) {
    red_plan pl;
    if (require_cpu_float("var", x) < 0) return -1;
    red_plan_make(&pl, out, x);
    int64_t no = ml_kt_numel(out), n = per_output(out, x);
    double *mean = calloc((size_t)(no ? no : 1), sizeof *mean);
    double *acc = calloc((size_t)(no ? no : 1), sizeof *acc);
    if (!mean || !acc) { free(mean); free(acc); return ml_error("var (cpu): out of memory"); }
    float_pass(x, &pl, mean, NULL, sum_row_f32, sum_col_f32, sum_row_f64, sum_col_f64, 0);
    for (int64_t i = 0; i < no; i++) mean[i] /= (double)n;
    float_pass(x, &pl, acc, mean, var_row_f32, var_col_f32, var_row_f64, var_col_f64, 0);
    double dof = fmax(0.0, (double)n - correction);
    for (int64_t i = 0; i < no; i++) store_out(out, i, acc[i] / dof);
    free(mean);
    free(acc);
    return 0;
}

int ml_norm_cpu(ml_ktensor *out, const ml_ktensor *x, double p) {
    red_plan pl;
    if (require_cpu_float("norm", x) < 0) return -1;
    red_plan_make(&pl, out, x);
    int64_t no = ml_kt_numel(out);
    double *acc = calloc((size_t)(no ? no : 1), sizeof *acc);
    if (!acc) return ml_error("norm (cpu): out of memory");
    if (p == 2) float_pass(x, &pl, acc, NULL, sq_row_f32, sq_col_f32, sq_row_f64, sq_col_f64, p);
    else if (p == 1) float_pass(x, &pl, acc, NULL, abs_row_f32, abs_col_f32, abs_row_f64, abs_col_f64, p);
    else float_pass(x, &pl, acc, NULL, pow_row_f32, pow_col_f32, pow_row_f64, pow_col_f64, p);
    for (int64_t i = 0; i < no; i++)
        store_out(out, i, p == 2 ? sqrt(acc[i]) : p == 1 ? acc[i] : pow(acc[i], 1.0 / p));
    free(acc);
    return 0;
}

/* ---- max along a dim ---------------------------------------------------- */

#define DEF_MAX_SCAN(T, tn, ISNAN)                                                          \
    static void max_scan_##tn(const char *xp, int64_t L, int64_t s, char *vp, int64_t *ip) { \
        const T *x = (const T *)xp;                                                         \
        T best = x[0];                                                                      \
        int64_t bi = 0;                                                                     \
        if (!ISNAN(best))                                                                   \
            for (int64_t k = 1; k < L; k++) {                                               \
                T v = x[k * s];                                                             \
                if (ISNAN(v)) { best = v; bi = k; break; }                                  \
                if (v > best) { best = v; bi = k; }                                         \
            }                                                                               \
        if (vp) *(T *)vp = best;                                                            \
        *ip = bi;                                                                           \
    }

#define NOT_NAN(v) 0
DEF_MAX_SCAN(float, f32, isnan)
DEF_MAX_SCAN(double, f64, isnan)
DEF_MAX_SCAN(int32_t, i32, NOT_NAN)
DEF_MAX_SCAN(int64_t, i64, NOT_NAN)
DEF_MAX_SCAN(uint8_t, u8, NOT_NAN)

int ml_max_dim_cpu(ml_ktensor *values, ml_ktensor *indices, const ml_ktensor *x, int dim, int64_t index_base) {
    void (*scan)(const char *, int64_t, int64_t, char *, int64_t *);
    switch (x->dtype) {
    case ML_F32: scan = max_scan_f32; break;
    case ML_F64: scan = max_scan_f64; break;
    case ML_I32: scan = max_scan_i32; break;
    case ML_I64: scan = max_scan_i64; break;
    case ML_U8: case ML_BOOL: scan = max_scan_u8; break;
    default: return ml_error("max (cpu): dtype %s is not supported", ml_dtype_name(x->dtype));
    }
    size_t es = ml_dtype_size(x->dtype);
    int64_t L = x->shape[dim], sd = x->strides[dim], no = ml_kt_numel(indices);
    int64_t idx[ML_MAX_DIMS] = {0}, ox = 0;
    const char *xb = x->data;
    char *vb = values ? values->data : NULL;
    int64_t *ib = indices->data;
    for (int64_t i = 0; i < no; i++) {
        scan(xb + ox * (int64_t)es, L, sd, vb ? vb + i * (int64_t)es : NULL, ib + i);
        ib[i] += index_base;
        for (int d = x->ndim - 1; d >= 0; d--) {
            if (d == dim) continue;
            if (++idx[d] < x->shape[d]) { ox += x->strides[d]; break; }
            idx[d] = 0;
            ox -= x->strides[d] * (x->shape[d] - 1);
        }
    }
    return 0;
}
