/* attention_t.h — the type-generic row operations of attention.c, included
 * once per float type with T and SFX(name) defined (so no include guard).
 * A block holds the scores of qb query rows, starting at query i0, against
 * the first kc keys; under the causal mask row r sees keys j <= i0 + r. */

static int64_t SFX(visible)(int64_t kc, int64_t i, bool causal) {
    return causal && i + 1 < kc ? i + 1 : kc;
}

/* Scores -> probabilities in place; lse[r] = log sum exp of row r. */
static void SFX(attn_softmax)(T *S, int64_t qb, int64_t kc, int64_t i0, bool causal, T *lse) {
    for (int64_t r = 0; r < qb; r++) {
        T *row = S + r * kc;
        int64_t lim = SFX(visible)(kc, i0 + r, causal);
        T mx = -INFINITY;
        for (int64_t j = 0; j < lim; j++) if (row[j] > mx) mx = row[j];
        double s = 0;
        for (int64_t j = 0; j < lim; j++) { row[j] = exp(row[j] - mx); s += row[j]; }
        T inv = (T)(1.0 / s);
        for (int64_t j = 0; j < lim; j++) row[j] *= inv;
        for (int64_t j = lim; j < kc; j++) row[j] = 0;
        lse[r] = (T)(mx + log(s));
    }
}

/* Scores -> the forward's probabilities, from its log-sum-exp. */
static void SFX(attn_probs)(T *S, int64_t qb, int64_t kc, int64_t i0, bool causal, const T *lse) {
    for (int64_t r = 0; r < qb; r++) {
        T *row = S + r * kc;
        int64_t lim = SFX(visible)(kc, i0 + r, causal);
        for (int64_t j = 0; j < lim; j++) row[j] = exp(row[j] - lse[r]);
        for (int64_t j = lim; j < kc; j++) row[j] = 0;
    }
}

/* dP -> dS = P (dP - rowsum(dO O)) in place; dO/O rows have stride ld. */
static void SFX(attn_dscores)(T *dP, const T *P, int64_t qb, int64_t kc, const T *dO, const T *O,
                              int64_t ld, int64_t Dv) {
    for (int64_t r = 0; r < qb; r++) {
        double di = 0;
        for (int64_t d = 0; d < Dv; d++) di += (double)dO[r * ld + d] * O[r * ld + d];
        T *row = dP + r * kc;
        const T *p = P + r * kc;
        for (int64_t j = 0; j < kc; j++) row[j] = (T)(p[j] * (row[j] - di));
    }
}
