/* test_data_loader.c — host/data_loader.c without Lua: the same batches for
 * any thread count and prefetch depth, per-batch errors naming the file,
 * freeing a loader mid-epoch, and the hash draws. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "data_loader.h"
#include "error.h"

static const char *FILES[] = {
    "tests/fixtures/transforms/a_37x50.png", "tests/fixtures/transforms/b_64x33.png",
    "tests/fixtures/images/photo.jpg", "tests/fixtures/images/exif_rot6.jpg",
    "tests/fixtures/images/rgb16.png",
};
#define NFILES 5

/* Run the whole plan (batches of 2, one column) and return the batches'
 * pixels concatenated (malloc'd), or NULL if anything failed. */
static float *run_plan(int threads, int prefetch, uint64_t epoch, size_t *n_out) {
    ml_data_transform tf = {.resize = 20, .crop = ML_CROP_RANDOM, .size = 16, .hflip = 0.5, .normalize = true, .seed = 3};
    ml_data_sample s[NFILES];
    for (int i = 0; i < NFILES; i++) s[i] = (ml_data_sample){FILES[i], 0, i, 0};
    int rows[3] = {2, 2, 1};
    ml_data_loader_config cfg = {.ncols = 1, .nbatches = 3, .batch_rows = rows, .samples = s,
                                 .transforms = &tf, .ntransforms = 1, .epoch = epoch,
                                 .threads = threads, .prefetch = prefetch, .device = ml_cpu()};
    ml_data_loader *L = ml_data_loader_new(&cfg);
    if (!L) { printf("loader: %s\n", ml_last_error()); return NULL; }
    size_t per = 16 * 16 * 3, n = per * NFILES, at = 0;
    float *all = malloc(n * sizeof(float));
    ml_data_batch b;
    int rc, got = 0;
    while ((rc = ml_data_loader_next(L, &b)) == 1) {
        CHECK(b.col[0].h == 16 && b.col[0].w == 16 && b.index == got, "batch %d shape", got);
        memcpy(all + at, b.col[0].data, (size_t)b.rows * per * sizeof(float));
        at += (size_t)b.rows * per;
        ml_data_loader_release(L, &b);
        got++;
    }
    CHECK(rc == 0 && got == 3, "3 batches then the end (rc %d, %d batches): %s", rc, got, ml_last_error());
    ml_data_loader_free(L);
    *n_out = n;
    return all;
}

static void test_thread_count_independence(void) {
    size_t n1, n4, n2;
    float *a = run_plan(1, 1, 1, &n1), *b = run_plan(4, 3, 1, &n4), *c = run_plan(2, 1, 2, &n2);
    CHECK(a && b && c, "plans ran");
    if (a && b && c) {
        CHECK(memcmp(a, b, n1 * sizeof(float)) == 0, "1 thread / prefetch 1 == 4 threads / prefetch 3");
        CHECK(memcmp(a, c, n1 * sizeof(float)) != 0, "epoch 2 draws differently");
        float lo = 1, hi = -1;
        for (size_t i = 0; i < n1; i++) { if (a[i] < lo) lo = a[i]; if (a[i] > hi) hi = a[i]; }
        CHECK(lo >= -1 && hi <= 1 && lo < 0 && hi > 0, "normalised range [%g, %g]", lo, hi);
    }
    free(a); free(b); free(c);
    CHECK(ml_data_live_threads() == 0, "no threads left: %d", ml_data_live_threads());
}

static void test_errors_per_batch(void) {
    ml_data_sample s[3] = {
        {FILES[0], -1, 0, 0}, {"tests/fixtures/no-such-image.png", -1, 1, 0}, {FILES[0], -1, 2, 0},
    };
    int rows[3] = {1, 1, 1};
    ml_data_loader_config cfg = {.ncols = 1, .nbatches = 3, .batch_rows = rows, .samples = s,
                                 .threads = 2, .prefetch = 2, .device = ml_cpu()};
    ml_data_loader *L = ml_data_loader_new(&cfg);
    CHECK(L != NULL, "loader");
    if (!L) return;
    ml_data_batch b;
    CHECK(ml_data_loader_next(L, &b) == 1 && b.col[0].h == 50 && b.col[0].w == 37, "batch 1 at the file's size");
    ml_data_loader_release(L, &b);
    CHECK(ml_data_loader_next(L, &b) == -1 && strstr(ml_last_error(), "no-such-image.png"),
          "batch 2 fails naming the file: %s", ml_last_error());
    CHECK(ml_data_loader_next(L, &b) == 1, "batch 3 still comes");
    ml_data_loader_release(L, &b);
    CHECK(ml_data_loader_next(L, &b) == 0, "then the end");
    ml_data_loader_free(L);

    /* Two sizes in one batch without a crop. */
    ml_data_sample m[2] = {{FILES[0], -1, 0, 0}, {FILES[1], -1, 1, 0}};
    int two[1] = {2};
    ml_data_loader_config c2 = {.ncols = 1, .nbatches = 1, .batch_rows = two, .samples = m, .device = ml_cpu()};
    L = ml_data_loader_new(&c2);
    CHECK(L && ml_data_loader_next(L, &b) == -1 && strstr(ml_last_error(), "b_64x33.png") &&
          strstr(ml_last_error(), "one size"), "mixed sizes named: %s", ml_last_error());
    ml_data_loader_free(L);

    ml_data_transform bad = {.crop = ML_CROP_CENTER, .size = 0};
    ml_data_loader_config c3 = {.ncols = 1, .nbatches = 1, .batch_rows = two, .samples = m,
                                .transforms = &bad, .ntransforms = 1, .device = ml_cpu()};
    CHECK(ml_data_loader_new(&c3) == NULL && strstr(ml_last_error(), "transform 1"), "bad transform: %s",
          ml_last_error());
}

static void test_free_mid_epoch(void) {
    enum { N = 40 };
    ml_data_sample s[N];
    int rows[N];
    ml_data_transform tf = {.resize = 16, .crop = ML_CROP_CENTER, .size = 16};
    for (int i = 0; i < N; i++) { s[i] = (ml_data_sample){FILES[i % NFILES], 0, i, 0}; rows[i] = 1; }
    ml_data_loader_config cfg = {.ncols = 1, .nbatches = N, .batch_rows = rows, .samples = s,
                                 .transforms = &tf, .ntransforms = 1, .threads = 3, .prefetch = 4,
                                 .device = ml_cpu()};
    ml_data_loader *L = ml_data_loader_new(&cfg);
    ml_data_batch b;
    CHECK(L && ml_data_loader_next(L, &b) == 1, "first batch");
    ml_data_loader_release(L, &b);
    CHECK(ml_data_live_threads() == 3, "3 workers while batches remain: %d", ml_data_live_threads());
    ml_data_loader_free(L);
    CHECK(ml_data_live_threads() == 0, "joined: %d", ml_data_live_threads());
}

static void test_hash(void) {
    CHECK(ml_data_hash(1, 2, 3, 4) == ml_data_hash(1, 2, 3, 4), "deterministic");
    CHECK(ml_data_hash(1, 2, 3, 4) != ml_data_hash(1, 3, 3, 4), "epoch matters");
    int hist[5] = {0};
    for (uint64_t i = 0; i < 5000; i++) {
        uint64_t v = ml_data_hash_below(7, 1, i, 1, 5);
        if (v < 5) hist[v]++;
    }
    int sum = 0;
    for (int i = 0; i < 5; i++) { CHECK(hist[i] > 850 && hist[i] < 1150, "bucket %d: %d of 5000", i, hist[i]); sum += hist[i]; }
    CHECK(sum == 5000, "all draws below n");
}

int main(void) {
    test_hash();
    test_thread_count_independence();
    test_errors_per_batch();
    test_free_mid_epoch();
    return check_summary();
}
