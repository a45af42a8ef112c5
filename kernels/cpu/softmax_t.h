/* softmax_t.h — the type-generic body of softmax.c, included once per float
 * type with T and SFX(name) defined (so no include guard).  Rows are the
 * D values of one (outer, inner) position; sums run in double and the
 * maximum is subtracted first so exp never overflows. */

static void SFX(softmax_rows)(T *y, const T *x, int64_t outer, int64_t D, int64_t inner, bool lg, double *buf) {
    if (inner == 1) {
        for (int64_t o = 0; o < outer; o++) {
            const T *p = x + o * D;
            T *q = y + o * D;
            T mx = -INFINITY;
            for (int64_t d = 0; d < D; d++) if (p[d] > mx) mx = p[d];
            double s = 0;
            if (lg) {
                for (int64_t d = 0; d < D; d++) s += exp(p[d] - mx);
                T lse = (T)(mx + log(s));
                for (int64_t d = 0; d < D; d++) q[d] = p[d] - lse;
            } else {
                for (int64_t d = 0; d < D; d++) { q[d] = exp(p[d] - mx); s += q[d]; }
                T inv = (T)(1.0 / s);
                for (int64_t d = 0; d < D; d++) q[d] *= inv;
            }
        }
        return;
    }
    /* Strided rows: walk D outside, the contiguous inner positions inside. */
    double *mx = buf, *s = buf + inner;
    for (int64_t o = 0; o < outer; o++) {
        const T *p = x + o * D * inner;
        T *q = y + o * D * inner;
        for (int64_t j = 0; j < inner; j++) { mx[j] = -INFINITY; s[j] = 0; }
        for (int64_t d = 0; d < D; d++)
            for (int64_t j = 0; j < inner; j++) if (p[d * inner + j] > mx[j]) mx[j] = p[d * inner + j];
        for (int64_t d = 0; d < D; d++)
            for (int64_t j = 0; j < inner; j++) {
                T e = exp(p[d * inner + j] - (T)mx[j]);
                s[j] += e;
                if (!lg) q[d * inner + j] = e;
            }
        for (int64_t j = 0; j < inner; j++) s[j] = lg ? mx[j] + log(s[j]) : 1.0 / s[j];
        for (int64_t d = 0; d < D; d++)
            for (int64_t j = 0; j < inner; j++) {
                if (lg) q[d * inner + j] = p[d * inner + j] - (T)s[j];
                else q[d * inner + j] *= (T)s[j];
            }
    }
}

static void SFX(softmax_rows_backward)(T *dx, const T *dy, const T *y, int64_t outer, int64_t D, int64_t inner,
                                       bool lg, double *buf) {
    for (int64_t o = 0; o < outer; o++) {
        const T *g = dy + o * D * inner, *p = y + o * D * inner;
        T *q = dx + o * D * inner;
        for (int64_t j = 0; j < inner; j++) buf[j] = 0;
        for (int64_t d = 0; d < D; d++)
            for (int64_t j = 0; j < inner; j++)
                buf[j] += lg ? (double)g[d * inner + j] : (double)g[d * inner + j] * p[d * inner + j];
        for (int64_t d = 0; d < D; d++)
            for (int64_t j = 0; j < inner; j++) {
                int64_t k = d * inner + j;
                q[k] = lg ? (T)(g[k] - exp(p[k]) * buf[j]) : (T)(p[k] * (g[k] - buf[j]));
            }
    }
}
