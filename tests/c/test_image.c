/* test_image.c — host/image.c: decoding every supported kind of file,
 * save/load round trips, PNG/JPEG metadata, errors on bad files, atomic
 * saves, and the resampler against Pillow's own output. */
#include <dirent.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "error.h"
#include "image.h"

#define FIX "tests/fixtures/images/"

static char tmpdir[256];

static const char *tmp_path(const char *name) {
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmpdir, name);
    return buf[k];
}

static uint8_t *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *d = malloc(len > 0 ? (size_t)len : 1);
    *n = fread(d, 1, (size_t)len, f);
    fclose(f);
    return d;
}

static void spit(const char *path, const void *d, size_t n) {
    FILE *f = fopen(path, "wb");
    if (n) fwrite(d, 1, n, f);
    fclose(f);
}

/* Number of entries in tmpdir (besides . and ..) whose name contains `part`. */
static int count_files(const char *dir, const char *part) {
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && strstr(e->d_name, part)) n++;
    }
    closedir(d);
    return n;
}

static bool has(const char *s, const char *part) { return strstr(s, part) != NULL; }

static uint8_t *load(const char *path, int *h, int *w) {
    uint8_t *p = NULL;
    int rc = ml_image_load(path, &p, h, w);
    CHECK(rc == 0 && p, "load %s: %s", path, ml_last_error());
    return rc == 0 ? p : NULL;
}

/* The pattern of rgb.* and rgba.png (see make_images.py). */
static void expect_rgb(int x, int y, uint8_t *e) {
    e[0] = (uint8_t)(x * 30); e[1] = (uint8_t)(y * 40); e[2] = (uint8_t)((x + y) * 10 + 5);
}

/* Largest |difference| between a loaded image and the rgb pattern. */
static int pattern_err(const uint8_t *p, int h, int w, bool gray) {
    int worst = 0;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < 3; c++) {
                uint8_t e[3];
                if (gray) e[0] = e[1] = e[2] = (uint8_t)(x * 30 + y);
                else expect_rgb(x, y, e);
                int d = abs(p[(y * w + x) * 3 + c] - e[c]);
                if (d > worst) worst = d;
            }
    return worst;
}

static void test_formats(void) {
    static const struct { const char *file; bool gray; int tol; } cases[] = {
        {FIX "rgb.png", false, 0},         {FIX "rgb.bmp", false, 0},
        {FIX "rgba.png", false, 0},        {FIX "gray.png", true, 0},
        {FIX "gray_alpha.png", true, 0},
        /* JPEG: the encoder's own loss (Pillow decodes these with the same errors) */
        {FIX "rgb.jpg", false, 24}, {FIX "rgb_progressive.jpg", false, 24}, {FIX "gray.jpg", true, 3},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int h = 0, w = 0;
        uint8_t *p = load(cases[i].file, &h, &w);
        if (!p) continue;
        CHECK(h == 6 && w == 8, "%s: size %dx%d", cases[i].file, h, w);
        int err = pattern_err(p, h, w, cases[i].gray);
        CHECK(err <= cases[i].tol, "%s: max error %d > %d", cases[i].file, err, cases[i].tol);
        free(p);
    }
    /* 16-bit PNG keeps the high byte of each sample. */
    int h, w;
    uint8_t *p = load(FIX "rgb16.png", &h, &w);
    if (p) {
        int bad = 0;
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++) {
                const uint8_t *q = p + (y * w + x) * 3;
                bad += q[0] != (x * 8000 + y) >> 8 || q[1] != (y * 9000 + 255) >> 8 ||
                       q[2] != (65535 - x * 300) >> 8;
            }
        CHECK(bad == 0, "rgb16.png: %d pixels differ from the high bytes", bad);
        free(p);
    }
}

static void test_exif_orientation(void) {
    /* Stored 16 high x 32 wide (red, green / blue, white quadrants); shown
     * upright by Pillow's exif_transpose as below. */
    static const struct { const char *file; uint8_t tl[3], tr[3], bl[3], br[3]; } cases[] = {
        {FIX "exif_rot6.jpg", {0, 0, 255}, {255, 0, 0}, {255, 255, 255}, {0, 255, 0}},
        {FIX "exif_rot8.png", {0, 255, 0}, {255, 255, 255}, {255, 0, 0}, {0, 0, 255}},
    };
    for (int i = 0; i < 2; i++) {
        int h, w;
        uint8_t *p = load(cases[i].file, &h, &w);
        if (!p) continue;
        CHECK(h == 32 && w == 16, "%s: upright size %dx%d, want 32x16", cases[i].file, h, w);
        const uint8_t *want[4] = {cases[i].tl, cases[i].tr, cases[i].bl, cases[i].br};
        int at[4][2] = {{2, 2}, {2, w - 3}, {h - 3, 2}, {h - 3, w - 3}};
        for (int k = 0; k < 4; k++) {
            const uint8_t *q = p + (at[k][0] * w + at[k][1]) * 3;
            CHECK(abs(q[0] - want[k][0]) < 8 && abs(q[1] - want[k][1]) < 8 && abs(q[2] - want[k][2]) < 8,
                  "%s corner %d: %d %d %d", cases[i].file, k, q[0], q[1], q[2]);
        }
        free(p);
    }
}

/* The real photo decodes as Pillow (libjpeg) decodes it, up to the small
 * IDCT/upsampling differences between decoders. */
static void test_photo(void) {
    int h, w, h2, w2;
    uint8_t *j = load(FIX "photo.jpg", &h, &w), *p = load(FIX "photo_jpg_decoded_by_pil.png", &h2, &w2);
    if (j && p) {
        CHECK(h == 64 && w == 64 && h2 == 64 && w2 == 64, "photo sizes");
        double sum = 0;
        int worst = 0;
        for (int i = 0; i < 64 * 64 * 3; i++) {
            int d = abs(j[i] - p[i]);
            sum += d;
            if (d > worst) worst = d;
        }
        CHECK(worst <= 4 && sum / (64 * 64 * 3) < 0.3, "photo.jpg vs Pillow's decode: max %d, mean %.3f",
              worst, sum / (64 * 64 * 3));
    }
    free(j); free(p);
}

static void test_roundtrip(void) {
    int h, w;
    uint8_t *p = load(FIX "photo.png", &h, &w);
    if (!p) return;
    /* PNG is lossless for 1 to 4 channels; loading gives RGB. */
    for (int c = 1; c <= 4; c++) {
        uint8_t *src = malloc((size_t)h * w * c);
        for (int i = 0; i < h * w; i++)
            for (int k = 0; k < c; k++) src[i * c + k] = c >= 3 ? (k < 3 ? p[i * 3 + k] : (uint8_t)i) : p[i * 3 + 1];
        const char *path = tmp_path("round.png");
        CHECK(ml_image_save(path, src, h, w, c, NULL, NULL, 0, 0) == 0, "save c=%d: %s", c, ml_last_error());
        int h2, w2;
        uint8_t *q = load(path, &h2, &w2);
        if (q) {
            int bad = 0;
            for (int i = 0; i < h * w; i++)
                for (int k = 0; k < 3; k++) bad += q[i * 3 + k] != (c >= 3 ? p[i * 3 + k] : p[i * 3 + 1]);
            CHECK(h2 == h && w2 == w && bad == 0, "PNG round trip c=%d: %d values differ", c, bad);
        }
        free(q); free(src);
    }
    /* JPEG: close, and higher quality is closer. */
    double err[2];
    int quality[2] = {50, 95};
    for (int k = 0; k < 2; k++) {
        const char *path = tmp_path(k ? "round.JPEG" : "round.jpg");
        CHECK(ml_image_save(path, p, h, w, 3, NULL, NULL, 0, quality[k]) == 0, "save jpg: %s", ml_last_error());
        int h2, w2;
        uint8_t *q = load(path, &h2, &w2);
        double s = 0;
        if (q) for (int i = 0; i < h * w * 3; i++) s += abs(q[i] - p[i]);
        err[k] = s / (h * w * 3);
        free(q);
    }
    CHECK(err[1] < 3.0 && err[0] < 9.0 && err[1] < err[0], "JPEG errors q50 %.2f q95 %.2f", err[0], err[1]);
    /* Saving over an existing file replaces it. */
    const char *path = tmp_path("over.png");
    uint8_t black[12] = {0}, white[12];
    memset(white, 255, sizeof white);
    CHECK(ml_image_save(path, black, 2, 2, 3, NULL, NULL, 0, 0) == 0, "save black");
    CHECK(ml_image_save(path, white, 2, 2, 3, NULL, NULL, 0, 0) == 0, "save white");
    uint8_t *q = load(path, &h, &w);
    CHECK(q && q[0] == 255 && q[11] == 255, "overwritten file has the new pixels");
    struct stat st;
    mode_t mask = umask(0);
    umask(mask);
    CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == (0666 & ~mask), "saved file mode %o", st.st_mode & 0777);
    free(q); free(p);
}

static void test_metadata(void) {
    CHECK(ml_crc32(0, "123456789", 9) == 0xCBF43926u, "CRC-32 check value");
    CHECK(ml_crc32(ml_crc32(0, "1234", 4), "56789", 5) == 0xCBF43926u, "CRC-32 continues");

    const char *keys[] = {"prompt", "negative_prompt", "seed", "steps", "scheduler", "guidance",
                          "note", "Title With Space"};
    const char *vals[] = {"a photo of sks dog, \"quoted\"\nsecond line", "", "42", "50", "DDIM", "7.5",
                          "caf\xc3\xa9 \xe7\x8a\xac \xf0\x9f\x90\xb6", "x"};
    int n = 8;
    uint8_t px[4 * 5 * 3];
    for (int i = 0; i < 60; i++) px[i] = (uint8_t)(i * 4);
    const char *path = tmp_path("meta.png");
    CHECK(ml_image_save(path, px, 4, 5, 3, keys, vals, n, 0) == 0, "save meta: %s", ml_last_error());
    ml_image_text *t = NULL;
    int got = ml_image_png_text(path, &t);
    CHECK(got == n, "read back %d entries, want %d (%s)", got, n, ml_last_error());
    for (int i = 0; i < n && i < got; i++)
        CHECK(strcmp(t[i].key, keys[i]) == 0 && strcmp(t[i].value, vals[i]) == 0,
              "entry %d: '%s' = '%s'", i, t[i].key, t[i].value);
    ml_image_text_free(t, got);
    /* Pixels are intact and every CRC checks (the loader verifies them). */
    int h, w;
    uint8_t *q = load(path, &h, &w);
    CHECK(q && h == 4 && w == 5 && memcmp(q, px, 60) == 0, "pixels of the PNG with text");
    free(q);
    /* ASCII goes in tEXt right after IHDR, other text in iTXt. */
    size_t len;
    uint8_t *d = slurp(path, &len);
    CHECK(d && memcmp(d + 37, "tEXtprompt", 10) == 0, "first text chunk follows IHDR");
    CHECK(d && memmem(d, len, "iTXtnote", 8) && !memmem(d, len, "tEXtnote", 8), "non-ASCII value in iTXt");
    free(d);

    /* Chunks written by Pillow: tEXt (Latin-1), zTXt, compressed iTXt. */
    got = ml_image_png_text(FIX "pil_text.png", &t);
    CHECK(got == 4, "pil_text.png: %d entries (%s)", got, ml_last_error());
    if (got == 4) {
        char zipped[300] = "";
        for (int i = 0; i < 40; i++) strcat(zipped, "zipped ");
        CHECK(!strcmp(t[0].key, "prompt") && !strcmp(t[0].value, "a photo of sks dog"), "tEXt");
        CHECK(!strcmp(t[1].key, "long") && !strcmp(t[1].value, zipped), "zTXt: %s", t[1].value);
        CHECK(!strcmp(t[2].key, "unicode") && !strcmp(t[2].value, "caf\xc3\xa9 \xe7\x8a\xac \xf0\x9f\x90\xb6"),
              "compressed iTXt: %s", t[2].value);
        CHECK(!strcmp(t[3].key, "latin") && !strcmp(t[3].value, "na\xc3\xafve"), "Latin-1 tEXt: %s", t[3].value);
    }
    ml_image_text_free(t, got);
    CHECK(ml_image_png_text(FIX "rgb.png", &t) == 0 && t == NULL, "no text chunks");

    /* JPEG metadata goes into a comment segment. */
    path = tmp_path("meta.jpg");
    CHECK(ml_image_save(path, px, 4, 5, 3, keys, vals, 3, 90) == 0, "save jpg meta: %s", ml_last_error());
    d = slurp(path, &len);
    static const char com[] = "prompt: a photo of sks dog, \"quoted\"\nsecond line\nnegative_prompt: \nseed: 42";
    size_t cl = sizeof com - 1;
    uint8_t *at = d ? memmem(d, len, com, cl) : NULL;
    CHECK(at && at[-4] == 0xFF && at[-3] == 0xFE && (size_t)(at[-2] << 8 | at[-1]) == cl + 2,
          "JPEG COM segment with the metadata");
    free(d);
    q = load(path, &h, &w);
    CHECK(q && h == 4 && w == 5, "JPEG with a comment decodes");
    free(q);
}

/* Every bad file gives an error naming the file and the problem. */
static void expect_load_error(const char *path, const char *part) {
    uint8_t *p = (uint8_t *)1;
    int h, w;
    int rc = ml_image_load(path, &p, &h, &w);
    const char *e = ml_last_error();
    CHECK(rc == -1 && p == NULL, "loading %s should fail", path);
    CHECK(has(e, path) && has(e, part), "error for %s: '%s' (want '%s')", path, e, part);
}

static void test_bad_files(void) {
    expect_load_error(FIX "does_not_exist.jpg", "No such file");
    expect_load_error(tmpdir, "directory");
    spit(tmp_path("empty.png"), "", 0);
    expect_load_error(tmp_path("empty.png"), "empty");
    spit(tmp_path("notes.png"), "hello, this is text\n", 20);
    expect_load_error(tmp_path("notes.png"), "looks like text: \"hello, this is t");
    spit(tmp_path("anim.png"), "GIF89a\x01\0\x01\0\0\0\0", 13);
    expect_load_error(tmp_path("anim.png"), "GIF images are not supported");
    spit(tmp_path("bin.jpg"), "\x00\x01\x02\x03\x04", 5);
    expect_load_error(tmp_path("bin.jpg"), "starts with bytes 00 01 02 03 04");

    size_t n;
    uint8_t *d = slurp(FIX "photo.jpg", &n);
    spit(tmp_path("half.jpg"), d, n / 2);
    expect_load_error(tmp_path("half.jpg"), "truncated JPEG");
    spit(tmp_path("head.jpg"), d, 100);                 /* inside the header segments */
    expect_load_error(tmp_path("head.jpg"), "truncated JPEG");
    spit(tmp_path("noeoi.jpg"), d, n - 2);              /* only the end marker missing */
    expect_load_error(tmp_path("noeoi.jpg"), "truncated JPEG");
    /* A Huffman table claiming more than 256 codes (stb would overrun). */
    uint8_t *dht = memmem(d, n, "\xff\xc4", 2);
    CHECK(dht != NULL, "photo.jpg has a DHT segment");
    if (dht) {
        memset(dht + 5, 0x20, 16);
        spit(tmp_path("dht.jpg"), d, n);
        expect_load_error(tmp_path("dht.jpg"), "bad Huffman table");
    }
    free(d);

    d = slurp(FIX "photo.png", &n);
    spit(tmp_path("half.png"), d, n / 2);
    expect_load_error(tmp_path("half.png"), "truncated PNG");
    spit(tmp_path("noend.png"), d, n - 12);             /* IEND chunk cut off */
    expect_load_error(tmp_path("noend.png"), "truncated PNG");
    d[n / 2] ^= 0x40;                                   /* a flipped bit in IDAT */
    spit(tmp_path("flipped.png"), d, n);
    expect_load_error(tmp_path("flipped.png"), "CRC mismatch in chunk 'IDAT'");
    free(d);

    d = slurp(FIX "rgb.bmp", &n);
    spit(tmp_path("half.bmp"), d, n - 20);
    expect_load_error(tmp_path("half.bmp"), "truncated BMP");
    free(d);

    ml_image_text *t = (ml_image_text *)1;
    CHECK(ml_image_png_text(FIX "rgb.jpg", &t) == -1 && t == NULL && has(ml_last_error(), "rgb.jpg") &&
          has(ml_last_error(), "not a PNG"), "png_text on a JPEG: %s", ml_last_error());
    CHECK(ml_image_png_text(FIX "nope.png", &t) == -1 && has(ml_last_error(), "nope.png"),
          "png_text on a missing file: %s", ml_last_error());
    CHECK(ml_image_png_text(tmp_path("flipped.png"), &t) == -1 && has(ml_last_error(), "CRC"),
          "png_text on a corrupt file: %s", ml_last_error());
}

static void expect_save_error(const char *path, const uint8_t *px, int h, int w, int c,
                              const char **k, const char **v, int nkv, int q, const char *part) {
    int rc = ml_image_save(path, px, h, w, c, k, v, nkv, q);
    const char *e = ml_last_error();
    CHECK(rc == -1 && has(e, path) && has(e, part), "save %s: rc %d, '%s' (want '%s')", path, rc, e, part);
}

static void test_save_errors(void) {
    uint8_t px[2 * 2 * 3] = {0};
    const char *k1[] = {"prompt"}, *v1[] = {"x"};
    expect_save_error(tmp_path("rej.bmp"), px, 2, 2, 3, NULL, NULL, 0, 0, "unknown image extension '.bmp'");
    expect_save_error(tmp_path("rej"), px, 2, 2, 3, NULL, NULL, 0, 0, "no file extension");
    expect_save_error(tmp_path("rej.png"), px, 0, 2, 3, NULL, NULL, 0, 0, "empty image");
    expect_save_error(tmp_path("rej.png"), px, 2, 2, 5, NULL, NULL, 0, 0, "5 channels");
    expect_save_error(tmp_path("rej.jpg"), px, 2, 2, 3, NULL, NULL, 0, 101, "quality 101");
    const char *bad_keys[] = {"", "two  spaces", " lead", "caf\xc3\xa9"};
    for (int i = 0; i < 4; i++)
        expect_save_error(tmp_path("rej.png"), px, 2, 2, 3, &bad_keys[i], v1, 1, 0, "not a valid PNG keyword");
    const char *bad_val[] = {"\xff\xfe"};
    expect_save_error(tmp_path("rej.png"), px, 2, 2, 3, k1, bad_val, 1, 0, "not valid UTF-8");
    CHECK(count_files(tmpdir, "rej") == 0, "nothing written by rejected saves");

    /* Failures while writing leave nothing behind. */
    expect_save_error(tmp_path("missing_dir/out.png"), px, 2, 2, 3, NULL, NULL, 0, 0, "No such file");
    mkdir(tmp_path("a_dir.png"), 0755);
    expect_save_error(tmp_path("a_dir.png"), px, 2, 2, 3, NULL, NULL, 0, 0, "cannot replace");
    CHECK(count_files(tmpdir, ".tmp") == 0, "no temporary file left behind");
    rmdir(tmp_path("a_dir.png"));
}

/* Resampling: bit-exact with Pillow's 8-bit resize, float within rounding. */
static void check_against_pil(const uint8_t *src, int h, int w, const char *ref, ml_resize_mode mode) {
    int rh, rw;
    uint8_t *want = load(ref, &rh, &rw);
    if (!want) return;
    uint8_t *got = malloc((size_t)rh * rw * 3);
    CHECK(ml_image_resize_u8(got, rh, rw, src, h, w, 3, mode) == 0, "resize u8");
    int diff = 0;
    for (int i = 0; i < rh * rw * 3; i++) diff += got[i] != want[i];
    CHECK(diff == 0, "%s: %d of %d u8 values differ from Pillow", ref, diff, rh * rw * 3);

    float *fs = malloc(sizeof(float) * h * w * 3), *fd = malloc(sizeof(float) * rh * rw * 3);
    for (int i = 0; i < h * w * 3; i++) fs[i] = src[i];
    CHECK(ml_image_resize_f32(fd, rh, rw, fs, h, w, 3, mode) == 0, "resize f32");
    double worst = 0;
    for (int i = 0; i < rh * rw * 3; i++) {
        double v = fd[i] < 0 ? 0 : fd[i] > 255 ? 255 : fd[i];
        if (fabs(v - want[i]) > worst) worst = fabs(v - want[i]);
    }
    CHECK(worst <= 1.0, "%s: float resize differs from Pillow's 8-bit by %.3f", ref, worst);
    free(fs); free(fd); free(got); free(want);
}

static void test_resize(void) {
    int h, w;
    uint8_t *p = load(FIX "photo.png", &h, &w);
    if (p) {
        check_against_pil(p, h, w, FIX "photo_ref_bilinear_27x40.png", ML_RESIZE_BILINEAR);
        check_against_pil(p, h, w, FIX "photo_ref_bicubic_27x40.png", ML_RESIZE_BICUBIC);
        uint8_t crop[16 * 16 * 3];
        for (int y = 0; y < 16; y++) memcpy(crop + y * 48, p + ((20 + y) * w + 20) * 3, 48);
        check_against_pil(crop, 16, 16, FIX "photo_ref_bilinear_up_23x37.png", ML_RESIZE_BILINEAR);
        check_against_pil(crop, 16, 16, FIX "photo_ref_bicubic_up_23x37.png", ML_RESIZE_BICUBIC);
        free(p);
    }

    /* nearest and area follow torch.nn.functional.interpolate. */
    float row[5] = {0, 10, 20, 30, 40}, out[3];
    CHECK(ml_image_resize_f32(out, 1, 3, row, 1, 5, 1, ML_RESIZE_NEAREST) == 0 &&
          out[0] == 0 && out[1] == 10 && out[2] == 30, "nearest 5->3: %g %g %g", out[0], out[1], out[2]);
    CHECK(ml_image_resize_f32(out, 1, 3, row, 1, 5, 1, ML_RESIZE_AREA) == 0, "area");
    CHECK_NEAR(out[0], 5, 1e-6, "area bin [0,2)");
    CHECK_NEAR(out[1], 20, 1e-6, "area bin [1,4)");
    CHECK_NEAR(out[2], 35, 1e-6, "area bin [3,5)");
    float col[4] = {1, 3, 5, 9}, o2[2];
    CHECK(ml_image_resize_f32(o2, 2, 1, col, 4, 1, 1, ML_RESIZE_AREA) == 0 && o2[0] == 2 && o2[1] == 7,
          "area 4->2 vertical: %g %g", o2[0], o2[1]);
    /* Bilinear 4->2 reduces with the widened [1,3,3,1] triangle, cut at the border. */
    CHECK(ml_image_resize_f32(o2, 1, 2, col, 1, 4, 1, ML_RESIZE_BILINEAR) == 0, "bilinear 4->2");
    CHECK_NEAR(o2[0], (1 * 3 + 3 * 3 + 5 * 1) / 7.0, 1e-6, "bilinear 4->2 left");
    CHECK_NEAR(o2[1], (3 * 1 + 5 * 3 + 9 * 3) / 7.0, 1e-6, "bilinear 4->2 right");
    /* Enlarging bilinear is the plain align_corners=False interpolation. */
    float up[8];
    CHECK(ml_image_resize_f32(up, 1, 8, col, 1, 4, 1, ML_RESIZE_BILINEAR) == 0, "bilinear 4->8");
    static const float up_want[8] = {1, 1.5f, 2.5f, 3.5f, 4.5f, 6, 8, 9};
    for (int i = 0; i < 8; i++) CHECK_NEAR(up[i], up_want[i], 1e-6, "bilinear 4->8");

    /* Every mode keeps a constant image constant and a same-size resize exact. */
    float cst[7 * 9 * 2], res[5 * 13 * 2];
    for (int i = 0; i < 7 * 9 * 2; i++) cst[i] = 0.25f;
    for (int m = 0; m <= ML_RESIZE_AREA; m++) {
        CHECK(ml_image_resize_f32(res, 5, 13, cst, 7, 9, 2, m) == 0, "resize mode %d", m);
        double worst = 0;
        for (int i = 0; i < 5 * 13 * 2; i++) worst = fmax(worst, fabs(res[i] - 0.25));
        CHECK(worst < 1e-6, "mode %d: constant image changed by %g", m, worst);
        float same[7 * 9 * 2];
        for (int i = 0; i < 7 * 9 * 2; i++) cst[i] = (float)i / 7;
        CHECK(ml_image_resize_f32(same, 7, 9, cst, 7, 9, 2, m) == 0 && !memcmp(same, cst, sizeof same),
              "mode %d: same size is a copy", m);
        for (int i = 0; i < 7 * 9 * 2; i++) cst[i] = 0.25f;
    }
    CHECK(ml_resize_mode_parse("bicubic") == ML_RESIZE_BICUBIC && ml_resize_mode_parse("area") == ML_RESIZE_AREA,
          "mode names");
    CHECK(ml_resize_mode_parse("lanczos") == -1 && has(ml_last_error(), "'lanczos'"), "unknown mode");
    CHECK(ml_image_resize_f32(out, 0, 3, row, 1, 5, 1, ML_RESIZE_AREA) == -1 && has(ml_last_error(), "0 x 3"),
          "zero output size: %s", ml_last_error());
}

/* Dataset loader threads decode concurrently: same pixels, same errors. */
typedef struct { const uint8_t *want[2]; int bad; } thread_job;

static void *load_many(void *arg) {
    thread_job *j = arg;
    static const char *files[2] = {FIX "photo.png", FIX "photo.jpg"};
    for (int it = 0; it < 20; it++) {
        uint8_t *p;
        int h, w;
        if (ml_image_load(files[it & 1], &p, &h, &w) < 0) { j->bad++; continue; }
        j->bad += memcmp(p, j->want[it & 1], 64 * 64 * 3) != 0;
        free(p);
        if (ml_image_load(FIX "missing.png", &p, &h, &w) == 0 || !has(ml_last_error(), "missing.png")) j->bad++;
    }
    return NULL;
}

static void test_threads(void) {
    int h, w;
    uint8_t *png = load(FIX "photo.png", &h, &w), *jpg = load(FIX "photo.jpg", &h, &w);
    if (!png || !jpg) { free(png); free(jpg); return; }
    pthread_t th[4];
    thread_job jobs[4];
    for (int i = 0; i < 4; i++) {
        jobs[i] = (thread_job){{png, jpg}, 0};
        pthread_create(&th[i], NULL, load_many, &jobs[i]);
    }
    int bad = 0;
    for (int i = 0; i < 4; i++) { pthread_join(th[i], NULL); bad += jobs[i].bad; }
    CHECK(bad == 0, "%d wrong results from concurrent loads", bad);
    free(png); free(jpg);
}

static void cleanup(void) {
    DIR *d = opendir(tmpdir);
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) unlink(tmp_path(e->d_name));
    }
    if (d) closedir(d);
    rmdir(tmpdir);
}

int main(void) {
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/ml-image-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmpdir)) { printf("cannot make a temporary directory\n"); return 1; }
    test_formats();
    test_exif_orientation();
    test_photo();
    test_roundtrip();
    test_metadata();
    test_bad_files();
    test_save_errors();
    test_resize();
    test_threads();
    cleanup();
    return check_summary();
}
