/* test_sizes.c — size arithmetic of the tensor core seen from C: the checked
 * helpers of host/checked_math.h, shapes whose byte size overflows, headers
 * that would reach past their storage, narrow bounds that once overflowed,
 * cat/upsample sizes, ml_require_regular_file (and the image and zip readers
 * that call it) and the image pixel cap.
 * Nothing here allocates the sizes it names. */
#include "check.h"
#include "checked_math.h"
#include "fs.h"
#include "image.h"
#include "ops.h"
#include "tensor.h"
#include "zip.h"
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int has(const char *s, const char *part) { return s && strstr(s, part) != NULL; }

static void test_checked_helpers(void) {
    int64_t r;
    size_t z;
    CHECK(ml_mul_i64(1LL << 31, 1LL << 31, &r) && r == 1LL << 62, "2^31 * 2^31");
    CHECK(!ml_mul_i64(1LL << 32, 1LL << 31, &r), "2^32 * 2^31 overflows");
    CHECK(!ml_mul_i64(-1, INT64_MIN, &r), "-1 * INT64_MIN overflows");
    CHECK(!ml_add_i64(INT64_MAX, 1, &r), "INT64_MAX + 1 overflows");
    CHECK(ml_add_i64(INT64_MAX, -1, &r) && r == INT64_MAX - 1, "INT64_MAX - 1");
    CHECK(!ml_mul_size(SIZE_MAX / 2 + 1, 2, &z), "SIZE_MAX product");
    CHECK(ml_round_up_size(65, 64, &z) && z == 128, "round 65 up to 128");
    CHECK(ml_round_up_size(0, 64, &z) && z == 0, "round 0");
    CHECK(!ml_round_up_size(SIZE_MAX - 10, 64, &z), "rounding near SIZE_MAX overflows");
    int64_t s1[2] = {1LL << 32, 1LL << 32}, s2[3] = {2, 0, 5}, s3[2] = {3, -1};
    CHECK(!ml_shape_numel_ok(2, s1, &r), "[2^32, 2^32] has no int64 numel");
    CHECK(ml_shape_numel_ok(3, s2, &r) && r == 0, "[2, 0, 5] has 0 elements");
    CHECK(!ml_shape_numel_ok(2, s3, &r), "a negative size");
}

static void test_shape_check(void) {
    int64_t n;
    int64_t ok[2] = {3, 4}, big[2] = {1LL << 31, 1LL << 31}, wrap[2] = {(1LL << 62) + 1, 4};
    int64_t zero_big[3] = {0, 1LL << 40, 1LL << 40};
    CHECK(ml_shape_check("t", 2, ok, ML_F32, &n) == 0 && n == 12, "[3, 4]");
    CHECK(ml_shape_check("t", 2, big, ML_F32, &n) < 0 && has(ml_last_error(), "[2147483648, 2147483648]"),
          "2^62 float32 elements: %s", ml_last_error());
    CHECK(ml_shape_check("t", 2, big, ML_U8, &n) == 0 && n == 1LL << 62, "2^62 bytes is a valid u8 shape");
    CHECK(ml_shape_check("zeros", 2, wrap, ML_F32, &n) < 0 && has(ml_last_error(), "zeros:"),
          "the op is named: %s", ml_last_error());
    CHECK(ml_shape_check(NULL, 3, zero_big, ML_F32, &n) < 0, "[0, 2^40, 2^40]: its strides overflow");
    CHECK(ml_empty(2, big, ML_F32, ml_cpu()) == NULL && has(ml_last_error(), "too large"), "ml_empty refuses");
    /* bytes that fit but cannot be had: an allocation error, not a wrapped size */
    int64_t huge_u8 = (1LL << 62) - 1;
    CHECK(ml_empty(1, &huge_u8, ML_U8, ml_cpu()) == NULL && has(ml_last_error(), "memory"),
          "2^62 - 1 bytes: %s", ml_last_error());
}

static void test_headers_stay_inside_storage(void) {
    int64_t four = 4;
    ml_tensor *a = ml_zeros(1, &four, ML_F32, ml_cpu());
    int64_t shape[1] = {5}, shape2[1] = {2}, strides3[1] = {3}, strides4[1] = {4}, one = 1;
    CHECK(ml_from_storage(a->storage, 0, 1, shape, NULL, ML_F32) == NULL && has(ml_last_error(), "storage"),
          "5 floats over 16 bytes: %s", ml_last_error());
    CHECK(ml_from_storage(a->storage, 3, 1, shape2, NULL, ML_F32) == NULL, "offset 3 + 2 elements");
    ml_tensor *ends = ml_from_storage(a->storage, 0, 1, shape2, strides3, ML_F32);
    CHECK(ends != NULL, "elements 0 and 3 of 4");
    ml_release(ends);
    CHECK(ml_from_storage(a->storage, 0, 1, shape2, strides4, ML_F32) == NULL, "elements 0 and 4 of 4");
    ml_tensor *ok = ml_from_storage(a->storage, 3, 1, &one, NULL, ML_F32);
    CHECK(ok != NULL, "the last element");
    ml_release(ok);
    CHECK(ml_from_storage(a->storage, -1, 1, &one, NULL, ML_F32) == NULL, "a negative offset");
    int64_t sixteen = 16, seventeen = 17;
    ml_tensor *bytes = ml_from_storage(a->storage, 0, 1, &sixteen, NULL, ML_U8);
    CHECK(bytes != NULL, "16 bytes over 16 bytes: the check counts bytes, not elements");
    ml_release(bytes);
    CHECK(ml_from_storage(a->storage, 0, 1, &seventeen, NULL, ML_U8) == NULL, "17 bytes");
    ml_release(a);
}

static void test_narrow_bounds(void) {
    int64_t s[2] = {3, 3};
    ml_tensor *a = ml_full(2, s, 1.0, ML_F32, ml_cpu());
    CHECK(ml_narrow(a, 0, INT64_MAX, 2) == NULL, "start INT64_MAX");
    CHECK(ml_narrow(a, 0, 2, INT64_MAX) == NULL, "length INT64_MAX (start + length overflowed)");
    CHECK(ml_narrow(a, 0, INT64_MIN, 1) == NULL, "start INT64_MIN");
    ml_tensor *e = ml_narrow(a, 0, 3, 0);
    CHECK(e && e->shape[0] == 0, "an empty slice at the end");
    ml_release(e);
    CHECK(ml_select(a, 0, INT64_MIN) == NULL, "select INT64_MIN");
    int64_t v[2] = {(1LL << 62) + 1, 4};
    int64_t nine = 9;
    ml_tensor *flat = ml_view(a, 1, &nine);
    CHECK(flat != NULL, "a plain view");
    CHECK(ml_view(flat, 2, v) == NULL, "a view whose size product wraps to 4");
    ml_release(flat);
    int64_t ex[3] = {(1LL << 62) + 1, 3, 3}, neg[2] = {-2, 3};
    CHECK(ml_expand(a, 3, ex) == NULL && has(ml_last_error(), "expand"), "expand past 2^63 elements");
    CHECK(ml_expand(a, 2, neg) == NULL, "expand to a negative size");
    ml_release(a);
}

static void test_cat_and_upsample(void) {
    ml_tensor *x = ml_from_doubles((double[]){1}, 1, (int64_t[]){1}, ML_F32);
    int64_t big = 1LL << 60;
    ml_tensor *e = ml_expand(x, 1, &big);
    ml_tensor *list[8] = {e, e, e, e, e, e, e, e};
    CHECK(ml_cat(8, list, 0) == NULL && has(ml_last_error(), "2^63"), "cat past 2^63: %s", ml_last_error());
    ml_release(e);
    ml_release(x);
    int64_t s4[4] = {1, 1, 2, 1}, e4[4] = {1, 1LL << 40, 2, 1};
    ml_tensor *img = ml_full(4, s4, 1.0, ML_F32, ml_cpu());
    ml_tensor *wide = ml_expand(img, 4, e4);
    CHECK(wide && ml_upsample_nearest2d(wide, 1 << 30) == NULL && has(ml_last_error(), "too large"),
          "upsample scale overflow: %s", ml_last_error());
    ml_release(wide);
    ml_release(img);
}

static void test_regular_files(void) {
    char dir[] = "/tmp/ml_sizes_XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    char fifo[256], file[256];
    snprintf(fifo, sizeof fifo, "%s/pipe", dir);
    snprintf(file, sizeof file, "%s/file", dir);
    CHECK(mkfifo(fifo, 0600) == 0, "mkfifo");
    FILE *f = fopen(file, "wb");
    if (f) { fputs("x", f); fclose(f); }
    CHECK(ml_require_regular_file(file, "read") == 0, "a regular file");
    CHECK(ml_require_regular_file(fifo, "read") < 0 && has(ml_last_error(), "FIFO"), "%s", ml_last_error());
    CHECK(ml_require_regular_file("/dev/null", "read") < 0 && has(ml_last_error(), "device"), "%s", ml_last_error());
    CHECK(ml_require_regular_file(dir, "read") < 0 && has(ml_last_error(), "directory"), "%s", ml_last_error());
    CHECK(ml_require_regular_file("", "read") < 0, "empty name");
    uint8_t *px;
    int h, w;
    CHECK(ml_image_load(fifo, &px, &h, &w) < 0 && has(ml_last_error(), "FIFO"), "image from a FIFO: %s",
          ml_last_error());
    /* a torch checkpoint is a zip: its reader waited in open() for a writer */
    CHECK(ml_zip_open(fifo) == NULL && has(ml_last_error(), "FIFO") && has(ml_last_error(), "not a regular file"),
          "zip from a FIFO: %s", ml_last_error());
    CHECK(ml_zip_open(dir) == NULL && has(ml_last_error(), "directory"), "zip from a folder: %s", ml_last_error());
    unlink(fifo);
    unlink(file);
    rmdir(dir);
}

static void test_pixel_cap(void) {
    /* a PNG header declaring 16000 x 16000: the cap is checked before the chunks */
    uint8_t png[33] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R',
                       0, 0, 0x3e, 0x80, 0, 0, 0x3e, 0x80, 8, 2, 0, 0, 0};
    uint8_t *px;
    int h, w;
    CHECK(ml_image_decode(png, sizeof png, "big.png", &px, &h, &w) < 0 && has(ml_last_error(), "16000 x 16000") &&
              has(ml_last_error(), "limit of 64.0"), "%s", ml_last_error());
    CHECK(ml_image_decode_max(png, sizeof png, "big.png", 300000000, &px, &h, &w) < 0 &&
              !has(ml_last_error(), "megapixels"), "a raised cap passes the check: %s", ml_last_error());
}

int main(void) {
    test_checked_helpers();
    test_shape_check();
    test_headers_stay_inside_storage();
    test_narrow_bounds();
    test_cat_and_upsample();
    test_regular_files();
    test_pixel_cap();
    return check_summary();
}
