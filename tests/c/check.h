/* check.h — the tiny assertion kit of the C unit tests.  Each test program
 * ends with check_summary(), which prints "N passed, N failed" (read by
 * tests/run_all.sh) and returns the exit status. */
#ifndef ML_CHECK_H
#define ML_CHECK_H
#include <math.h>
#include <stdio.h>

static int check_pass_, check_fail_;

#define CHECK(cond, ...) do { \
    if (cond) check_pass_++; \
    else { check_fail_++; printf("FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } \
} while (0)

#define CHECK_NEAR(a, b, tol, what) do { \
    double a_ = (a), b_ = (b); \
    CHECK(fabs(a_ - b_) <= (tol), "%s: %.9g vs %.9g (tol %g)", what, a_, b_, (double)(tol)); \
} while (0)

static inline int check_summary(void) {
    printf("%d passed, %d failed\n", check_pass_, check_fail_);
    return check_fail_ ? 1 : 0;
}
#endif
