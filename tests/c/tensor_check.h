/* tensor_check.h — assertions on tensors and host errors shared by the C op
 * tests (on top of check.h). */
#ifndef ML_TENSOR_CHECK_H
#define ML_TENSOR_CHECK_H
#include "check.h"
#include "tensor.h"
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* t (any dtype/layout) equals want[0..n) elementwise within
 * tol * (1 + |want|); NaN matches NaN. */
static inline void expect(const char *what, ml_tensor *t, const double *want, int64_t n, double tol) {
    if (!t) { CHECK(0, "%s: got NULL: %s", what, ml_last_error()); return; }
    if (ml_numel(t) != n) { CHECK(0, "%s: %lld elements, want %lld", what, (long long)ml_numel(t), (long long)n); return; }
    double *v = ml_to_doubles(t);
    int bad = 0;
    for (int64_t i = 0; i < n && !bad; i++) {
        bool ok = (isnan(want[i]) && isnan(v[i])) || fabs(v[i] - want[i]) <= tol * (1 + fabs(want[i]));
        if (!ok) { CHECK(0, "%s[%lld]: %.9g, want %.9g", what, (long long)i, v[i], want[i]); bad = 1; }
    }
    if (!bad) CHECK(1, "%s", what);
    free(v);
}

/* The op returned NULL and its message contains n1 (and n2 when given);
 * releases r if it wrongly succeeded. */
static inline void expect_error(const char *what, ml_tensor *r, const char *n1, const char *n2) {
    CHECK(r == NULL, "%s: expected an error", what);
    const char *e = ml_last_error();
    CHECK(strstr(e, n1) && (!n2 || strstr(e, n2)), "%s: message '%s' lacks '%s' / '%s'", what, e, n1, n2 ? n2 : "");
    ml_release(r);
}
#endif
