/* norm_t.h — the type-generic body of norm.c.  norm.c includes it once per
 * float type with T (the element type) and SFX(name) (name_f32, name_f64)
 * defined, so there is deliberately no include guard.  Letters as in
 * norm.h; layer norm is the case L = 1, G = 1. */

static int SFX(gn_forward)(T *y, T *mean, T *rstd, const T *x, const T *w, const T *b,
                           int64_t N, int64_t L, int64_t C, int64_t G, double eps, bool silu) {
    int64_t cg = C / G;
    double cnt = (double)L * (double)cg;
    double *sum = malloc((size_t)(2 * G + 1) * sizeof *sum);
    T *scale = malloc((size_t)(2 * C + 1) * sizeof *scale);
    if (!sum || !scale) {
        free(sum); free(scale);
        return ml_error("norm: out of CPU memory for %lld channels", (long long)C);
    }
    double *sq = sum + G;
    T *shift = scale + C;
    for (int64_t n = 0; n < N; n++) {
        const T *xn = x + n * L * C;
        T *yn = y + n * L * C;
        for (int64_t g = 0; g < G; g++) sum[g] = sq[g] = 0;
        for (int64_t l = 0; l < L; l++)
            for (int64_t g = 0; g < G; g++) {
                const T *p = xn + l * C + g * cg;
                double t = 0;
                for (int64_t j = 0; j < cg; j++) t += p[j];
                sum[g] += t;
            }
        for (int64_t g = 0; g < G; g++) sum[g] = cnt > 0 ? sum[g] / cnt : 0;
        /* Two passes: the variance of activations with a large mean stays exact. */
        for (int64_t l = 0; l < L; l++)
            for (int64_t g = 0; g < G; g++) {
                const T *p = xn + l * C + g * cg;
                double t = 0, m = sum[g];
                for (int64_t j = 0; j < cg; j++) t += (p[j] - m) * (p[j] - m);
                sq[g] += t;
            }
        for (int64_t g = 0; g < G; g++) {
            double r = 1.0 / sqrt((cnt > 0 ? sq[g] / cnt : 0) + eps);
            mean[n * G + g] = (T)sum[g];
            rstd[n * G + g] = (T)r;
            for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
                double wc = w ? w[c] : 1;
                scale[c] = (T)(r * wc);
                shift[c] = (T)((b ? b[c] : 0) - sum[g] * r * wc);
            }
        }
        for (int64_t l = 0; l < L; l++) {
            const T *p = xn + l * C;
            T *q = yn + l * C;
            if (silu)
                for (int64_t c = 0; c < C; c++) { T v = p[c] * scale[c] + shift[c]; q[c] = v / (1 + exp(-v)); }
            else
                for (int64_t c = 0; c < C; c++) q[c] = p[c] * scale[c] + shift[c];
        }
    }
    free(sum); free(scale);
    return 0;
}

/* With xhat = (x - mean) rstd, dy the gradient at xhat*w + b (through SiLU
 * when fused) and sums over the (n, g) group of cnt values:
 *   dx = rstd (w dy - sum(w dy)/cnt - xhat sum(w dy xhat)/cnt)
 * which per channel is dx = k1 dy + k2 x + k3.  Per-channel sums of dy and
 * dy*x are all the group sums need. */
static int SFX(gn_backward)(T *dx, T *dw, T *db, const T *dy, const T *x, const T *w, const T *b,
                            const T *mean, const T *rstd, int64_t N, int64_t L, int64_t C, int64_t G,
                            bool silu) {
    int64_t cg = C / G;
    double cnt = (double)L * (double)cg;
    double *acc = calloc((size_t)(8 * C + 1), sizeof *acc);
    if (!acc) return ml_error("norm backward: out of CPU memory for %lld channels", (long long)C);
    double *sdy = acc, *sdyx = acc + C, *dwacc = acc + 2 * C, *dbacc = acc + 3 * C;
    double *k2 = acc + 4 * C, *k3 = acc + 5 * C;
    double *scale = acc + 6 * C, *shift = acc + 7 * C;   /* the affine: k1 of dx, and SiLU's input */
    for (int64_t n = 0; n < N; n++) {
        const T *xn = x + n * L * C, *gn = dy + n * L * C;
        const T *mn = mean + n * G, *rn = rstd + n * G;
        for (int64_t c = 0; c < C; c++) {
            double r = rn[c / cg], wc = w ? w[c] : 1;
            scale[c] = r * wc;
            shift[c] = (b ? b[c] : 0) - mn[c / cg] * r * wc;
            sdy[c] = sdyx[c] = 0;
        }
        for (int64_t l = 0; l < L; l++) {
            const T *p = xn + l * C, *q = gn + l * C;
            if (silu)
                for (int64_t c = 0; c < C; c++) {
                    double g = silu_grad(q[c], p[c] * scale[c] + shift[c]);
                    sdy[c] += g;
                    sdyx[c] += g * p[c];
                }
            else
                for (int64_t c = 0; c < C; c++) { sdy[c] += q[c]; sdyx[c] += (double)q[c] * p[c]; }
        }
        for (int64_t g = 0; g < G; g++) {
            double m = mn[g], r = rn[g], s1 = 0, s2 = 0;
            for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
                double wc = w ? w[c] : 1;
                s1 += wc * sdy[c];
                s2 += wc * sdyx[c];
                dwacc[c] += r * (sdyx[c] - m * sdy[c]);
                dbacc[c] += sdy[c];
            }
            double sxh = r * (s2 - m * s1);           /* sum(w dy xhat) */
            double c2 = cnt > 0 ? -r * r * sxh / cnt : 0;
            double c3 = (cnt > 0 ? -r * s1 / cnt : 0) - c2 * m;
            for (int64_t c = g * cg; c < (g + 1) * cg; c++) { k2[c] = c2; k3[c] = c3; }
        }
        if (!dx) continue;
        for (int64_t l = 0; l < L; l++) {
            const T *p = xn + l * C, *q = gn + l * C;
            T *o = dx + n * L * C + l * C;
            if (silu)
                for (int64_t c = 0; c < C; c++)
                    o[c] = (T)(scale[c] * silu_grad(q[c], p[c] * scale[c] + shift[c]) + k2[c] * p[c] + k3[c]);
            else
                for (int64_t c = 0; c < C; c++) o[c] = (T)(scale[c] * q[c] + k2[c] * p[c] + k3[c]);
        }
    }
    if (dw) for (int64_t c = 0; c < C; c++) dw[c] = (T)dwacc[c];
    if (db) for (int64_t c = 0; c < C; c++) db[c] = (T)dbacc[c];
    free(acc);
    return 0;
}
