/* bench_matmul.c — CPU matmul throughput: ml_matmul (the tensor op, with
 * its output allocation and argument checks) against cblas_sgemm called
 * directly on the same buffers.  Runs alternate between the two so that
 * noise from other processes hits both alike; reports the median time of
 * each, GFLOP/s and the ratio.
 *
 * Build and run: tests/bench/run_cpu_bench.sh [n] [runs]  (default 1024, 9). */
#include "ops.h"
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1024, runs = argc > 2 ? atoi(argv[2]) : 9;
    if (n < 1 || runs < 1) { fprintf(stderr, "usage: bench_matmul [n >= 1] [runs >= 1]\n"); return 2; }
    int64_t shape[2] = {n, n};
    ml_tensor *a = ml_randn(2, shape, ML_F32, ml_cpu(), NULL), *b = ml_randn(2, shape, ML_F32, ml_cpu(), NULL);
    ml_tensor *c = ml_empty(2, shape, ML_F32, ml_cpu());
    if (!a || !b || !c) { fprintf(stderr, "bench_matmul: %s\n", ml_last_error()); return 1; }
    const float *pa = ml_data(a), *pb = ml_data(b);
    float *pc = ml_data(c);
    double *t_op = malloc(runs * sizeof *t_op), *t_blas = malloc(runs * sizeof *t_blas), diff = 0;
    for (int r = -1; r < runs; r++) {          /* r = -1: warm-up */
        double t0 = now();
        ml_tensor *y = ml_matmul(a, b);
        double t1 = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1, pa, n, pb, n, 0, pc, n);
        double t2 = now();
        if (!y) { fprintf(stderr, "bench_matmul: %s\n", ml_last_error()); return 1; }
        if (r < 0) {
            const float *py = ml_data(y);
            for (int64_t i = 0; i < (int64_t)n * n; i++) if (fabsf(py[i] - pc[i]) > diff) diff = fabsf(py[i] - pc[i]);
        } else {
            t_op[r] = t1 - t0;
            t_blas[r] = t2 - t1;
        }
        ml_release(y);
    }
    qsort(t_op, runs, sizeof *t_op, cmp);
    qsort(t_blas, runs, sizeof *t_blas, cmp);
    double flop = 2.0 * n * (double)n * n, mo = t_op[runs / 2], mb = t_blas[runs / 2];
    printf("matmul %dx%d @ %dx%d f32, %d runs, OpenBLAS threads %d\n", n, n, n, n, runs, openblas_get_num_threads());
    printf("  ml_matmul    median %8.3f ms  %7.1f GFLOP/s\n", mo * 1e3, flop / mo * 1e-9);
    printf("  cblas_sgemm  median %8.3f ms  %7.1f GFLOP/s\n", mb * 1e3, flop / mb * 1e-9);
    printf("  ratio ml_matmul / cblas_sgemm throughput: %.1f%%  (max |difference| %.3g)\n", 100 * mb / mo, diff);
    free(t_op); free(t_blas);
    ml_release(a); ml_release(b); ml_release(c);
    return 0;
}
