/* test_safetensors.c — safetensors reading/writing: fixtures, round trips of
 * every dtype, conversions, the Python library's byte layout, zero-copy
 * lifetime, owned reads and files truncated under an open handle, FIFOs
 * refused, metadata merged over shards, atomic saves, sharded and variant
 * folders, and a fuzz pass that feeds thousands of corrupted files to the
 * reader (errors, never crashes). */
#include "check.h"
#include "safetensors.h"
#include "atomic_file.h"
#include "json_config.h"
#include <dirent.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

static char g_dir[256];

static const char *tmp_path(const char *name) {
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", g_dir, name);
    return buf[k];
}

static int write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = fwrite(p, 1, n, f);
    fclose(f);
    return w == n ? 0 : -1;
}

static unsigned char *read_bytes(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *p = malloc((size_t)len + 1);
    *n = fread(p, 1, (size_t)len, f);
    fclose(f);
    return p;
}

/* A file from header text and data bytes (no padding added). */
static size_t make_file(unsigned char *out, const char *header, const void *data, size_t dlen) {
    uint64_t n = strlen(header);
    for (int i = 0; i < 8; i++) out[i] = (unsigned char)(n >> (8 * i));
    memcpy(out + 8, header, n);
    memcpy(out + 8 + n, data, dlen);
    return 8 + n + dlen;
}

static int count_temp_files(void) {
    DIR *d = opendir(g_dir);
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        if (strstr(e->d_name, ".tmp")) n++;
    if (d) closedir(d);
    return n;
}

/* Open must fail with a message naming the file and containing `want`. */
static void expect_open_error(const char *path, const char *want, const char *what) {
    ml_clear_error();
    ml_st_file *f = ml_st_open(path);
    CHECK(f == NULL, "%s: open should fail", what);
    if (f) { ml_st_close(f); return; }
    const char *e = ml_last_error();
    CHECK(strstr(e, path) != NULL, "%s: error does not name the file: %s", what, e);
    CHECK(!want || strstr(e, want) != NULL, "%s: expected '%s' in: %s", what, want, e);
}

static ml_tensor *tensor_of(ml_dtype dt, int ndim, const int64_t *shape, const double *v) {
    return ml_from_doubles(v, ndim, shape, dt);
}

static int same_values(const ml_tensor *a, const ml_tensor *b) {
    if (!ml_same_shape(a, b) || a->dtype != b->dtype) return 0;
    for (int64_t i = 0; i < ml_numel(a); i++) {
        double x = ml_load_as_double(ml_data(a), a->dtype, i);
        double y = ml_load_as_double(ml_data(b), b->dtype, i);
        if (x != y && !(x != x && y != y)) return 0;
    }
    return 1;
}

/* ---- fixtures ----------------------------------------------------------- */

static void test_fixtures(void) {
    const char *path = "tests/fixtures/sd1-tiny/unet.safetensors";
    ml_st_file *f = ml_st_open(path);
    CHECK(f != NULL, "open %s: %s", path, ml_last_error());
    if (!f) return;
    CHECK(ml_st_count(f) == 4, "4 tensors, got %d", ml_st_count(f));
    CHECK(strcmp(ml_st_info_at(f, 0)->name, "encoder_hidden_states") == 0, "names sorted");
    const ml_st_info *in = ml_st_find(f, "sample");
    CHECK(in && in->dtype == ML_F32 && strcmp(in->st_dtype, "F32") == 0, "sample is F32");
    CHECK(in && in->ndim == 4 && in->shape[0] == 2 && in->shape[1] == 4 && in->shape[2] == 8 &&
          in->shape[3] == 8, "sample is [2,4,8,8]");
    ml_tensor *t = ml_st_get(f, "sample", -1);
    CHECK(t && t->storage->release != NULL, "aligned same-dtype get wraps the mapping");
    /* Compare with the bytes read the plain way. */
    size_t n;
    unsigned char *raw = read_bytes(path, &n);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = (hl << 8) | raw[i];
    CHECK(t && memcmp(ml_data(t), raw + 8 + hl + 21760, 2048) == 0, "sample bytes match the file");
    ml_tensor *ts = ml_st_get(f, "timesteps", -1);
    CHECK(ts && ts->dtype == ML_I32 && ts->ndim == 1 && ts->shape[0] == 2, "timesteps I32 [2]");
    CHECK(ts && memcmp(ml_data(ts), raw + 8 + hl + 23808, 8) == 0, "timesteps bytes");
    ml_tensor *t16 = ml_st_get(f, "sample", ML_F16);
    CHECK(t16 && t16->dtype == ML_F16 && t16->storage->release == NULL, "converted get copies");
    int ok = t16 != NULL;
    for (int64_t i = 0; ok && i < 128; i++) {
        float x;
        memcpy(&x, raw + 8 + hl + 21760 + 4 * i, 4);
        ok = ((uint16_t *)ml_data(t16))[i] == ml_f32_to_f16(x);
    }
    CHECK(ok, "f32 -> f16 on load rounds like ml_f32_to_f16");
    /* The mapping outlives the handle while a tensor uses it. */
    ml_st_close(f);
    CHECK(t && memcmp(ml_data(t), raw + 8 + hl + 21760, 2048) == 0, "tensor readable after close");
    ml_release(t);
    ml_release(ts);
    ml_release(t16);
    free(raw);

    /* Every fixture file opens and every tensor loads. */
    const char *files[] = {"tests/fixtures/sd1-tiny/vae.safetensors",
                           "tests/fixtures/sd1-tiny/text_encoder.safetensors",
                           "tests/fixtures/sd1-tiny/schedulers.safetensors",
                           "tests/fixtures/sd1-tiny/train_step.safetensors",
                           "tests/fixtures/sd1-tiny/pipeline_out.safetensors"};
    for (size_t k = 0; k < sizeof files / sizeof files[0]; k++) {
        f = ml_st_open(files[k]);
        CHECK(f != NULL, "open %s: %s", files[k], ml_last_error());
        int bad = 0;
        for (int i = 0; f && i < ml_st_count(f); i++) {
            ml_tensor *x = ml_st_get(f, ml_st_info_at(f, i)->name, -1);
            if (!x) bad++;
            ml_release(x);
        }
        CHECK(bad == 0, "%s: %d tensors failed to load: %s", files[k], bad, ml_last_error());
        ml_st_close(f);
    }

    f = ml_st_open_model("tests/fixtures/sd1-tiny/pipeline/unet", "diffusion_pytorch_model.safetensors", NULL);
    CHECK(f != NULL, "open_model unet: %s", ml_last_error());
    if (f) {
        CHECK(ml_st_metadata_get(f, "format") && strcmp(ml_st_metadata_get(f, "format"), "pt") == 0,
              "metadata format=pt");
        const ml_st_info *w = ml_st_find(f, "conv_in.weight");
        CHECK(w && w->ndim == 4 && w->shape[0] == 16 && w->shape[1] == 4, "conv_in.weight [16,4,3,3]");
        ml_st_close(f);
    }
    f = ml_st_open("tests/fixtures/sd1-tiny/pipeline/text_encoder");
    CHECK(f != NULL && ml_st_count(f) > 0, "a directory opens its model.safetensors: %s", ml_last_error());
    ml_st_close(f);
    ml_clear_error();
    f = ml_st_open_model("tests/fixtures/sd1-tiny/pipeline/unet", NULL, "fp16");
    CHECK(f == NULL && strstr(ml_last_error(), "diffusion_pytorch_model.fp16.safetensors"),
          "missing variant lists what was tried: %s", ml_last_error());
}

/* ---- round trips -------------------------------------------------------- */

static void test_round_trip(void) {
    const double v[6] = {1.5, -2.25, 0, 3, 100, -7};
    const double vb[6] = {1, 0, 1, 1, 0, 0};
    int64_t s23[2] = {2, 3}, s03[2] = {0, 3};
    const char *names[ML_NUM_DTYPES + 2];
    ml_tensor *ts[ML_NUM_DTYPES + 2];
    char namebuf[ML_NUM_DTYPES][16];
    int n = 0;
    for (int dt = 0; dt < ML_NUM_DTYPES; dt++) {
        snprintf(namebuf[dt], sizeof namebuf[dt], "t_%s", ml_dtype_short((ml_dtype)dt));
        names[n] = namebuf[dt];
        ts[n++] = tensor_of((ml_dtype)dt, 2, s23, dt == ML_BOOL ? vb : (dt == ML_U8 ? vb : v));
    }
    names[n] = "scalar";
    ts[n++] = ml_scalar(4.5, ML_F32, ml_cpu());
    names[n] = "empty";
    ts[n++] = ml_empty(2, s03, ML_F16, ml_cpu());
    const char *mk[2] = {"format", "note"}, *mv[2] = {"pt", "round \"trip\" \xc3\xa9"};
    const char *path = tmp_path("rt.safetensors");
    CHECK(ml_st_save(path, n, names, ts, 2, mk, mv, -1) == 0, "save: %s", ml_last_error());
    ml_st_file *f = ml_st_open(path);
    CHECK(f != NULL, "reopen: %s", ml_last_error());
    if (f) {
        CHECK(ml_st_count(f) == n, "count %d", ml_st_count(f));
        for (int i = 0; i < n; i++) {
            ml_tensor *t = ml_st_get(f, names[i], -1);
            CHECK(t && same_values(t, ts[i]), "round trip of %s", names[i]);
            CHECK(t && (ml_numel(t) == 0 || t->storage->release), "%s is zero-copy", names[i]);
            ml_release(t);
        }
        CHECK(ml_st_metadata_count(f) == 2 && strcmp(ml_st_metadata_value(f, 1), mv[1]) == 0,
              "metadata round trip");
        ml_st_close(f);
    }
    /* Non-contiguous input is written in logical order. */
    ml_tensor *tr = ml_transpose(ts[0], 0, 1);
    const char *tn = "transposed";
    CHECK(ml_st_save(path, 1, &tn, &tr, 0, NULL, NULL, -1) == 0, "save transposed: %s", ml_last_error());
    f = ml_st_open(path);
    ml_tensor *back = f ? ml_st_get(f, tn, -1) : NULL;
    ml_tensor *want = tr ? ml_contiguous(tr) : NULL;
    CHECK(back && want && same_values(back, want), "transposed round trip");
    ml_release(back);
    ml_release(want);
    ml_release(tr);
    ml_st_close(f);
    for (int i = 0; i < n; i++) ml_release(ts[i]);
}

/* The bytes the Python safetensors library writes for the same tensors. */
static void test_python_layout(void) {
    static const char *expect =
        "{\"__metadata__\":{\"format\":\"pt\"},"
        "\"i\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]},"
        "\"z\":{\"dtype\":\"F64\",\"shape\":[5],\"data_offsets\":[16,56]},"
        "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[56,64]},"
        "\"e\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[64,64]},"
        "\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[64,68]},"
        "\"k\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[68,72]},"
        "\"bb\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[72,76]},"
        "\"b\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[76,82]},"
        "\"c\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[82,83]},"
        "\"t\":{\"dtype\":\"BOOL\",\"shape\":[3],\"data_offsets\":[83,86]}}";
    int64_t s2[1] = {2}, s3[1] = {3}, s5[1] = {5}, s1[1] = {1}, s03[2] = {0, 3};
    const char *names[10] = {"b", "a", "z", "c", "e", "s", "i", "bb", "t", "k"};
    ml_tensor *ts[10] = {
        ml_zeros(1, s3, ML_F16, ml_cpu()), ml_zeros(1, s2, ML_F32, ml_cpu()),
        ml_zeros(1, s5, ML_F64, ml_cpu()), ml_zeros(1, s1, ML_U8, ml_cpu()),
        ml_zeros(2, s03, ML_F32, ml_cpu()), ml_scalar(0, ML_F32, ml_cpu()),
        ml_zeros(1, s2, ML_I64, ml_cpu()), ml_zeros(1, s2, ML_BF16, ml_cpu()),
        ml_zeros(1, s3, ML_BOOL, ml_cpu()), ml_zeros(1, s1, ML_I32, ml_cpu())};
    const char *mk = "format", *mv = "pt";
    const char *path = tmp_path("layout.safetensors");
    CHECK(ml_st_save(path, 10, names, ts, 1, &mk, &mv, -1) == 0, "save: %s", ml_last_error());
    size_t n;
    unsigned char *b = read_bytes(path, &n);
    size_t hl = strlen(expect), padded = (hl + 7) / 8 * 8;
    CHECK(b && n == 8 + padded + 86, "file size %zu", n);
    CHECK(b && b[0] == (padded & 0xff) && b[1] == (padded >> 8) && b[2] == 0, "length prefix");
    CHECK(b && memcmp(b + 8, expect, hl) == 0, "header bytes equal the Python library's:\n%.*s",
          (int)hl, b ? (char *)b + 8 : "");
    int spaces = 1;
    for (size_t i = hl; b && i < padded; i++) spaces &= b[8 + i] == ' ';
    CHECK(spaces && padded % 8 == 0, "header padded with spaces to 8 bytes");
    free(b);
    for (int i = 0; i < 10; i++) ml_release(ts[i]);
}

/* ---- conversions -------------------------------------------------------- */

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}


static void test_conversions(void) {
    /* The bulk conversions agree with dtype.c's scalar ones bit for bit. */
    static uint16_t all[65536];
    static float out[65536];
    for (int i = 0; i < 65536; i++) all[i] = (uint16_t)i;
    ml_st_convert(out, ML_F32, all, ML_F16, 65536);
    int bad = 0;
    for (int i = 0; i < 65536; i++) {
        float r = ml_f16_to_f32((uint16_t)i);
        if (memcmp(&r, &out[i], 4) != 0) bad++;
    }
    CHECK(bad == 0, "f16 -> f32: %d mismatches", bad);
    /* f32 -> f16 over a sweep of every exponent with random mantissas, plus
     * the boundaries (subnormals, rounding ties, overflow, inf, NaN). */
    static float src[65536];
    static uint16_t got[65536];
    bad = 0;
    for (int round = 0; round < 64; round++) {
        for (int i = 0; i < 65536; i++) {
            uint32_t u = (uint32_t)i << 16 | (uint32_t)(rnd() & 0xffff);
            if (round == 0) u = (uint32_t)i << 16;
            if (round == 1) u = (uint32_t)i << 16 | 0x1000u;      /* ties at bit 13 */
            if (round == 2) u = 0x38000000u + (uint32_t)i * 64;   /* around the subnormal edge */
            if (round == 3) u = 0x477fe000u + (uint32_t)i;        /* around the overflow edge */
            memcpy(&src[i], &u, 4);
        }
        ml_st_convert(got, ML_F16, src, ML_F32, 65536);
        for (int i = 0; i < 65536; i++) bad += got[i] != ml_f32_to_f16(src[i]);
    }
    CHECK(bad == 0, "f32 -> f16: %d mismatches", bad);
    ml_st_convert(out, ML_F32, all, ML_BF16, 65536);
    bad = 0;
    for (int i = 0; i < 65536; i++) {
        float r = ml_bf16_to_f32((uint16_t)i);
        if (memcmp(&r, &out[i], 4) != 0) bad++;
    }
    CHECK(bad == 0, "bf16 -> f32: %d mismatches", bad);

    const double v[5] = {1.0 / 3, 65504, 1e-6, -2.5e7, 70000};
    int64_t s5[1] = {5};
    ml_tensor *t = tensor_of(ML_F32, 1, s5, v);
    const char *name = "w";
    const char *path = tmp_path("conv.safetensors");
    for (int k = 0; k < 3; k++) {
        ml_dtype dt = k == 0 ? ML_F16 : k == 1 ? ML_BF16 : ML_F64;
        CHECK(ml_st_save(path, 1, &name, &t, 0, NULL, NULL, dt) == 0, "save as %s: %s",
              ml_dtype_short(dt), ml_last_error());
        ml_st_file *f = ml_st_open(path);
        CHECK(f && ml_st_find(f, "w")->dtype == (int)dt, "stored as %s", ml_dtype_short(dt));
        ml_tensor *stored = f ? ml_st_get(f, "w", -1) : NULL;
        ml_tensor *as32 = f ? ml_st_get(f, "w", ML_F32) : NULL;
        int ok = stored && as32;
        for (int i = 0; ok && i < 5; i++) {
            float x = ((float *)ml_data(t))[i], want = x;
            if (dt == ML_F16) want = ml_f16_to_f32(ml_f32_to_f16(x));
            if (dt == ML_BF16) want = ml_bf16_to_f32(ml_f32_to_bf16(x));
            ok = ((float *)ml_data(as32))[i] == want &&
                 ml_load_as_double(ml_data(stored), dt, i) == (double)want;
        }
        CHECK(ok, "save as %s then load as f32 rounds once", ml_dtype_short(dt));
        ml_release(stored);
        ml_release(as32);
        ml_st_close(f);
    }
    ml_clear_error();
    CHECK(ml_st_save(path, 1, &name, &t, 0, NULL, NULL, ML_I32) < 0 &&
          strstr(ml_last_error(), "float dtype"), "saving as an integer dtype is refused");
    /* Integer tensors keep their dtype when floats are converted. */
    const char *names2[2] = {"f", "i"};
    ml_tensor *ts2[2] = {t, tensor_of(ML_I64, 1, s5, (const double[]){1, 2, 3, 4, 5})};
    CHECK(ml_st_save(path, 2, names2, ts2, 0, NULL, NULL, ML_BF16) == 0, "mixed save");
    ml_st_file *f = ml_st_open(path);
    CHECK(f && ml_st_find(f, "f")->dtype == ML_BF16 && ml_st_find(f, "i")->dtype == ML_I64,
          "only floats converted");
    ml_tensor *i2f = f ? ml_st_get(f, "i", ML_F32) : NULL;
    CHECK(i2f && ((float *)ml_data(i2f))[4] == 5.0f, "i64 -> f32 on load");
    ml_release(i2f);
    ml_st_close(f);
    ml_release(ts2[1]);
    ml_release(t);

    /* An unaligned F32 tensor (after one U8 byte) is copied, not wrapped. */
    unsigned char file[512], data[9] = {7};
    float vals[2] = {1.25f, -3.5f};
    memcpy(data + 1, vals, 8);
    size_t len = make_file(file, "{\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                                 "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[1,9]}}",
                           data, 9);
    path = tmp_path("unaligned.safetensors");
    write_bytes(path, file, len);
    f = ml_st_open(path);
    ml_tensor *a = f ? ml_st_get(f, "a", -1) : NULL;
    CHECK(a && a->storage->release == NULL && ((float *)ml_data(a))[0] == 1.25f &&
          ((float *)ml_data(a))[1] == -3.5f, "unaligned tensor copied correctly");
    ml_tensor *a16 = f ? ml_st_get(f, "a", ML_BF16) : NULL;
    CHECK(a16 && ml_bf16_to_f32(((uint16_t *)ml_data(a16))[1]) == -3.5f, "unaligned -> bf16");
    ml_release(a);
    ml_release(a16);
    ml_st_close(f);
}

/* ---- zero-copy semantics ------------------------------------------------ */

static void test_copy_on_write(void) {
    const double v[4] = {1, 2, 3, 4};
    int64_t s4[1] = {4};
    ml_tensor *t = tensor_of(ML_F32, 1, s4, v);
    const char *name = "x", *path = tmp_path("cow.safetensors");
    CHECK(ml_st_save(path, 1, &name, &t, 0, NULL, NULL, -1) == 0, "save");
    ml_st_file *f = ml_st_open(path);
    ml_tensor *m = f ? ml_st_get(f, "x", -1) : NULL;
    CHECK(m && m->storage->release, "zero-copy");
    if (m) ((float *)ml_data(m))[0] = 42;   /* an in-place update of a loaded weight */
    ml_st_file *g = ml_st_open(path);
    ml_tensor *fresh = g ? ml_st_get(g, "x", -1) : NULL;
    CHECK(fresh && ((float *)ml_data(fresh))[0] == 1.0f, "writing a loaded tensor never changes the file");
    /* Overwriting the file while its old mapping is in use is safe. */
    CHECK(ml_st_save(path, 1, &name, &fresh, 0, NULL, NULL, ML_F16) == 0, "overwrite");
    CHECK(m && ((float *)ml_data(m))[1] == 2.0f, "old mapping still readable after overwrite");
    ml_release(m);
    ml_release(fresh);
    ml_st_close(f);
    ml_st_close(g);
    ml_release(t);
}

/* ---- reads that own their memory; files changed under an open handle --- */

static void test_read_and_truncation(void) {
    int64_t s[1] = {1024};
    ml_tensor *a = ml_full(1, s, 3.0, ML_F32, ml_cpu());
    ml_tensor *b = ml_full(1, s, -1.5, ML_F16, ml_cpu());
    const char *names[2] = {"a", "b"};
    ml_tensor *ts[2] = {a, b};
    const char *path = tmp_path("trunc.safetensors");
    CHECK(ml_st_save(path, 2, names, ts, 0, NULL, NULL, -1) == 0, "save: %s", ml_last_error());
    ml_st_file *f = ml_st_open(path);
    CHECK(f != NULL, "open: %s", ml_last_error());
    if (!f) return;
    ml_tensor *r = ml_st_read(f, "a", -1);
    CHECK(r && r->storage->release == NULL && same_values(r, a), "ml_st_read owns a copy");
    ml_tensor *r32 = ml_st_read(f, "b", ML_F32);
    CHECK(r32 && r32->dtype == ML_F32 && ((float *)ml_data(r32))[1023] == -1.5f, "read converts");
    /* Cut the file in place (same inode) to a little past its header. */
    size_t n;
    unsigned char *bytes = read_bytes(path, &n);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = (hl << 8) | bytes[i];
    write_bytes(path, bytes, (size_t)(8 + hl + 16));
    free(bytes);
    const char *names3[3] = {"a", "b", "b"};
    int dts[3] = {-1, -1, ML_F32};
    for (int i = 0; i < 3; i++) {
        ml_clear_error();
        ml_tensor *g = ml_st_get(f, names3[i], dts[i]);
        CHECK(!g && strstr(ml_last_error(), path) && strstr(ml_last_error(), "truncated"),
              "get '%s' after truncation: %s", names3[i], ml_last_error());
        ml_release(g);
        ml_clear_error();
        g = ml_st_read(f, names3[i], dts[i]);
        CHECK(!g && strstr(ml_last_error(), "truncated"), "read '%s' after truncation: %s",
              names3[i], ml_last_error());
        ml_release(g);
    }
    CHECK(r && ((float *)ml_data(r))[1023] == 3.0f, "what was read stays as it was");
    ml_release(r);
    ml_release(r32);
    ml_st_close(f);
    ml_release(a);
    ml_release(b);
}

static void test_not_regular_files(void) {
    const char *fifo = tmp_path("pipe.safetensors");
    CHECK(mkfifo(fifo, 0600) == 0, "mkfifo");
    /* Opening it for reading would block forever without a writer. */
    expect_open_error(fifo, "FIFO", "a FIFO");
    const char *idx = tmp_path("pipe.safetensors.index.json");
    CHECK(mkfifo(idx, 0600) == 0, "mkfifo");
    expect_open_error(idx, "not a regular file", "a FIFO index");
    ml_clear_error();
    ml_st_file *f = ml_st_open("/dev/null");
    CHECK(!f && strstr(ml_last_error(), "device"), "a device: %s", ml_last_error());
    ml_st_close(f);
}

/* First shard wins for metadata keys in several shards; lookups by key. */
static void test_metadata_merge(void) {
    char dir[300];
    snprintf(dir, sizeof dir, "%s/meta_shards", g_dir);
    mkdir(dir, 0777);
    int64_t s[1] = {2};
    ml_tensor *t = ml_full(1, s, 1.0, ML_F32, ml_cpu());
    const char *k1[3] = {"shared", "one", "zeta"}, *v1[3] = {"first", "1", "z"};
    const char *k2[2] = {"shared", "two"}, *v2[2] = {"second", "2"};
    char p1[400], p2[400], idx[400];
    snprintf(p1, sizeof p1, "%s/m-1.safetensors", dir);
    snprintf(p2, sizeof p2, "%s/m-2.safetensors", dir);
    snprintf(idx, sizeof idx, "%s/m.safetensors.index.json", dir);
    const char *na = "a", *nb = "b";
    CHECK(ml_st_save(p1, 1, &na, &t, 3, k1, v1, -1) == 0, "shard 1");
    CHECK(ml_st_save(p2, 1, &nb, &t, 2, k2, v2, -1) == 0, "shard 2");
    const char *index = "{\"weight_map\": {\"a\": \"m-1.safetensors\", \"b\": \"m-2.safetensors\"}}";
    write_bytes(idx, index, strlen(index));
    ml_st_file *f = ml_st_open(idx);
    CHECK(f && ml_st_metadata_count(f) == 4, "4 distinct keys: %s", f ? "" : ml_last_error());
    if (f) {
        CHECK(strcmp(ml_st_metadata_get(f, "shared"), "first") == 0, "the first shard wins");
        CHECK(strcmp(ml_st_metadata_get(f, "two"), "2") == 0 && !ml_st_metadata_get(f, "nope"),
              "lookup by key");
        for (int i = 1; i < ml_st_metadata_count(f); i++)
            CHECK(strcmp(ml_st_metadata_key(f, i - 1), ml_st_metadata_key(f, i)) < 0, "key order");
    }
    ml_st_close(f);
    ml_release(t);
}

/* ---- atomic saves ------------------------------------------------------- */

static void test_atomic_save(void) {
    int64_t s4[1] = {4};
    ml_tensor *t = ml_full(1, s4, 2.0, ML_F32, ml_cpu());
    const char *name = "x";
    ml_clear_error();
    const char *bad = tmp_path("no_such_dir/out.safetensors");
    CHECK(ml_st_save(bad, 1, &name, &t, 0, NULL, NULL, -1) < 0 && strstr(ml_last_error(), bad),
          "missing directory: %s", ml_last_error());
    write_bytes(tmp_path("plain_file"), "x", 1);
    bad = tmp_path("plain_file/out.safetensors");
    CHECK(ml_st_save(bad, 1, &name, &t, 0, NULL, NULL, -1) < 0 && strstr(ml_last_error(), bad),
          "directory that is a file: %s", ml_last_error());

    const char *path = tmp_path("keep.safetensors");
    CHECK(ml_st_save(path, 1, &name, &t, 0, NULL, NULL, -1) == 0, "first save");
    size_t n0, n1;
    unsigned char *before = read_bytes(path, &n0);
    /* Refused before anything is written: duplicate names, bad UTF-8, reserved name. */
    const char *dup[2] = {"x", "x"};
    ml_tensor *two[2] = {t, t};
    CHECK(ml_st_save(path, 2, dup, two, 0, NULL, NULL, -1) < 0 && strstr(ml_last_error(), "twice"),
          "duplicate names refused: %s", ml_last_error());
    const char *badutf = "\xff\xfe";
    CHECK(ml_st_save(path, 1, &badutf, &t, 0, NULL, NULL, -1) < 0 && strstr(ml_last_error(), "UTF-8"),
          "invalid UTF-8 name refused: %s", ml_last_error());
    const char *reserved = "__metadata__";
    CHECK(ml_st_save(path, 1, &reserved, &t, 0, NULL, NULL, -1) < 0, "reserved name refused");
    /* Failing half-way through the data: a file size limit makes write fail. */
    int64_t big[1] = {1 << 20};
    ml_tensor *large = ml_zeros(1, big, ML_F32, ml_cpu());
    struct rlimit old;
    getrlimit(RLIMIT_FSIZE, &old);
    struct rlimit lim = {64 * 1024, old.rlim_max};
    signal(SIGXFSZ, SIG_IGN);
    setrlimit(RLIMIT_FSIZE, &lim);
    int rc = ml_st_save(path, 1, &name, &large, 0, NULL, NULL, -1);
    setrlimit(RLIMIT_FSIZE, &old);
    CHECK(rc < 0 && strstr(ml_last_error(), path), "save past the size limit fails: %s", ml_last_error());
    unsigned char *after = read_bytes(path, &n1);
    CHECK(before && after && n0 == n1 && memcmp(before, after, n0) == 0, "old file untouched");
    CHECK(count_temp_files() == 0, "no temporary file left behind");
    free(before);
    free(after);
    ml_release(large);

    /* ml_write_file_atomic replaces a file whole. */
    path = tmp_path("text.json");
    CHECK(ml_write_file_atomic(path, "{}\n", 3) == 0 && ml_write_file_atomic(path, "[1]\n", 4) == 0,
          "atomic text writes");
    unsigned char *txt = read_bytes(path, &n0);
    CHECK(txt && n0 == 4 && memcmp(txt, "[1]\n", 4) == 0, "second write replaced the first");
    free(txt);
    ml_release(t);
}

/* The writer and the reader share ML_ST_MAX_HEADER: a header of exactly the
 * limit saves and opens again; one byte more is refused with nothing
 * written, found once the header is built, or before building it when the
 * metadata alone is past the limit. */
static void test_header_limit(void) {
    int64_t s1[1] = {1};
    ml_tensor *t = ml_full(1, s1, 1.0, ML_F32, ml_cpu());
    const char *name = "a", *key = "k";
    const char *path = tmp_path("limit.safetensors");
    size_t big = (size_t)ML_ST_MAX_HEADER + 16;
    char *value = malloc(big + 1);
    if (!value) { CHECK(0, "out of memory"); ml_release(t); return; }

    /* The header's length around an 8-byte value, less its padding. */
    memset(value, 'x', 8);
    value[8] = 0;
    const char *v = value;
    CHECK(ml_st_save(path, 1, &name, &t, 1, &key, &v, -1) == 0, "small save: %s", ml_last_error());
    size_t n;
    unsigned char *bytes = read_bytes(path, &n);
    uint64_t hlen = 0;
    for (int i = 0; bytes && i < 8; i++) hlen |= (uint64_t)bytes[i] << (8 * i);
    while (bytes && hlen > 0 && bytes[8 + hlen - 1] == ' ') hlen--;
    free(bytes);
    size_t at_limit = 8 + (size_t)(ML_ST_MAX_HEADER - hlen);
    remove(path);

    memset(value, 'x', at_limit);
    value[at_limit] = 0;
    CHECK(ml_st_save(path, 1, &name, &t, 1, &key, &v, -1) == 0,
          "a header of exactly ML_ST_MAX_HEADER bytes saves: %s", ml_last_error());
    ml_st_file *f = ml_st_open(path);
    CHECK(f && ml_st_metadata_get(f, "k") && strlen(ml_st_metadata_get(f, "k")) == at_limit,
          "and opens again: %s", f ? "" : ml_last_error());
    ml_st_close(f);
    remove(path);

    struct { size_t len; const char *want, *what; } cases[] = {
        {at_limit + 1, "would take 100000008 bytes", "one byte past the limit"},
        {big, "more than", "metadata alone past the limit"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        memset(value, 'x', cases[c].len);
        value[cases[c].len] = 0;
        ml_clear_error();
        int rc = ml_st_save(path, 1, &name, &t, 1, &key, &v, -1);
        const char *e = ml_last_error();
        CHECK(rc < 0 && strstr(e, path) && strstr(e, cases[c].want) && strstr(e, "nothing written"),
              "%s: %s", cases[c].what, rc < 0 ? e : "saved");
        struct stat st;
        CHECK(stat(path, &st) != 0 && count_temp_files() == 0, "%s: no file, no temporary file",
              cases[c].what);
    }
    free(value);
    ml_release(t);
}

/* ---- sharded checkpoints and variants ----------------------------------- */

static void save_two(const char *path, const char *a, const char *b, double va) {
    int64_t s2[1] = {2};
    ml_tensor *ts[2] = {ml_full(1, s2, va, ML_F32, ml_cpu()), ml_full(1, s2, va + 1, ML_F16, ml_cpu())};
    const char *names[2] = {a, b};
    CHECK(ml_st_save(path, 2, names, ts, 0, NULL, NULL, -1) == 0, "save %s: %s", path, ml_last_error());
    ml_release(ts[0]);
    ml_release(ts[1]);
}

static void test_sharded(void) {
    char dir[300], ema[300];
    snprintf(dir, sizeof dir, "%s/model", g_dir);
    mkdir(dir, 0777);
    char p1[1024], p2[1024], idx[1024], v1[1024];
    snprintf(p1, sizeof p1, "%s/diffusion_pytorch_model-00001-of-00002.safetensors", dir);
    snprintf(p2, sizeof p2, "%s/diffusion_pytorch_model-00002-of-00002.safetensors", dir);
    snprintf(idx, sizeof idx, "%s/diffusion_pytorch_model.safetensors.index.json", dir);
    save_two(p1, "down.0.weight", "down.0.bias", 1);
    save_two(p2, "up.0.weight", "up.0.bias", 10);
    const char *index =
        "{\"metadata\": {\"total_size\": 24}, \"weight_map\": {"
        "\"down.0.weight\": \"diffusion_pytorch_model-00001-of-00002.safetensors\","
        "\"down.0.bias\": \"diffusion_pytorch_model-00001-of-00002.safetensors\","
        "\"up.0.weight\": \"diffusion_pytorch_model-00002-of-00002.safetensors\","
        "\"up.0.bias\": \"diffusion_pytorch_model-00002-of-00002.safetensors\"}}";
    write_bytes(idx, index, strlen(index));
    ml_st_file *f = ml_st_open_model(dir, "diffusion_pytorch_model.safetensors", NULL);
    CHECK(f && ml_st_count(f) == 4, "sharded open: %s", ml_last_error());
    ml_tensor *u = f ? ml_st_get(f, "up.0.bias", ML_F32) : NULL;
    CHECK(u && ((float *)ml_data(u))[1] == 11.0f, "tensor from the second shard");
    CHECK(f && strstr(ml_st_find(f, "down.0.bias")->file, "00001-of-00002"), "info names the shard");
    ml_release(u);
    ml_st_close(f);
    f = ml_st_open(dir);
    CHECK(f && ml_st_count(f) == 4, "directory opens the sharded index: %s", ml_last_error());
    ml_st_close(f);

    /* Variants: a single fp16 file, and a sharded one in diffusers' spelling. */
    snprintf(v1, sizeof v1, "%s/diffusion_pytorch_model.fp16.safetensors", dir);
    save_two(v1, "only.weight", "only.bias", 5);
    f = ml_st_open_model(dir, "diffusion_pytorch_model", "fp16");
    CHECK(f && ml_st_count(f) == 2 && ml_st_find(f, "only.bias"), "fp16 variant file: %s", ml_last_error());
    ml_st_close(f);
    snprintf(ema, sizeof ema, "%s/ema", g_dir);
    mkdir(ema, 0777);
    snprintf(p1, sizeof p1, "%s/model.ema-00001-of-00001.safetensors", ema);
    save_two(p1, "a", "b", 0);
    snprintf(idx, sizeof idx, "%s/model.safetensors.index.ema.json", ema);
    const char *index2 = "{\"weight_map\": {\"a\": \"model.ema-00001-of-00001.safetensors\","
                         "\"b\": \"model.ema-00001-of-00001.safetensors\"}}";
    write_bytes(idx, index2, strlen(index2));
    f = ml_st_open_model(ema, NULL, "ema");
    CHECK(f && ml_st_count(f) == 2, "sharded variant (diffusers spelling): %s", ml_last_error());
    ml_st_close(f);

    /* Index errors name the index and the problem. */
    struct { const char *json, *want; } cases[] = {
        {"{\"weight_map\": {\"zz\": \"model.ema-00001-of-00001.safetensors\"}}", "no such tensor"},
        {"{\"weight_map\": {\"a\": \"nope.safetensors\"}}", "nope.safetensors"},
        {"{\"weight_map\": {\"a\": \"../x.safetensors\"}}", "not a file in"},
        {"{\"weight_map\": {\"a\": 3}}", "file name"},
        {"{\"weights\": {}}", "weight_map"},
        {"[1, 2]", "weight_map"},
        {"{\"weight_map\": {", "bad.index.json:1:"},
    };
    snprintf(idx, sizeof idx, "%s/bad.index.json", ema);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_bytes(idx, cases[i].json, strlen(cases[i].json));
        ml_clear_error();
        f = ml_st_open(idx);
        CHECK(f == NULL && strstr(ml_last_error(), cases[i].want), "index case %zu: %s", i, ml_last_error());
        ml_st_close(f);
    }
    /* A tensor in two shards; a weight_map pointing at the wrong shard. */
    snprintf(p2, sizeof p2, "%s/second.safetensors", ema);
    save_two(p2, "a", "c", 0);
    const char *dup = "{\"weight_map\": {\"a\": \"model.ema-00001-of-00001.safetensors\","
                      "\"c\": \"second.safetensors\"}}";
    write_bytes(idx, dup, strlen(dup));
    ml_clear_error();
    f = ml_st_open(idx);
    CHECK(!f && strstr(ml_last_error(), "appears in both"), "duplicate across shards: %s", ml_last_error());
    const char *wrong = "{\"weight_map\": {\"b\": \"second.safetensors\", \"c\": \"second.safetensors\"}}";
    write_bytes(idx, wrong, strlen(wrong));
    f = ml_st_open(idx);
    CHECK(!f && strstr(ml_last_error(), "'b'"), "wrong shard named: %s", ml_last_error());
}

/* ---- errors on valid files ---------------------------------------------- */

static void test_lookup_errors(void) {
    unsigned char file[512], data[16] = {0};
    size_t len = make_file(file, "{\"q\":{\"dtype\":\"I8\",\"shape\":[4],\"data_offsets\":[0,4]},"
                                 "\"r\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[4,6]},"
                                 "\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
                           data, 16);
    const char *path = tmp_path("i8.safetensors");
    write_bytes(path, file, len);
    ml_st_file *f = ml_st_open(path);
    CHECK(f != NULL, "a file with I8 opens: %s", ml_last_error());
    if (!f) return;
    const ml_st_info *q = ml_st_find(f, "q");
    CHECK(q && q->dtype == -1 && strcmp(q->st_dtype, "I8") == 0, "I8 reported as unsupported");
    ml_clear_error();
    CHECK(!ml_st_get(f, "q", -1) && strstr(ml_last_error(), "I8") &&
          strstr(ml_last_error(), "does not support") && strstr(ml_last_error(), path),
          "get I8: %s", ml_last_error());
    CHECK(!ml_st_get(f, "r", ML_F32) && strstr(ml_last_error(), "F8_E4M3"), "get F8: %s", ml_last_error());
    CHECK(!ml_st_get(f, "v", -1) && strstr(ml_last_error(), "'v'") && strstr(ml_last_error(), "'w'") &&
          strstr(ml_last_error(), path), "missing tensor: %s", ml_last_error());
    ml_tensor *w = ml_st_get(f, "w", -1);
    CHECK(w != NULL, "other tensors still load");
    ml_release(w);
    ml_st_close(f);
}

/* ---- fuzzing ------------------------------------------------------------ */

/* Open, and if that works load everything; returns 1 if open failed cleanly. */
static int probe(const char *path, int *crashed_message) {
    ml_clear_error();
    ml_st_file *f = ml_st_open(path);
    if (!f) {
        if (!ml_last_error()[0] || !strstr(ml_last_error(), path)) (*crashed_message)++;
        return 1;
    }
    for (int i = 0; i < ml_st_count(f); i++) {
        const ml_st_info *in = ml_st_info_at(f, i);
        ml_tensor *t = ml_st_get(f, in->name, -1);
        ml_tensor *c = in->dtype >= 0 ? ml_st_get(f, in->name, ML_F32) : NULL;
        if (t) {   /* touch every byte: reads past the mapping would fault */
            volatile unsigned char sink = 0;
            for (uint64_t k = 0; k < in->nbytes; k++) sink ^= ((unsigned char *)ml_data(t))[k];
            (void)sink;
        }
        ml_release(t);
        ml_release(c);
    }
    ml_st_close(f);
    return 0;
}

static void test_fuzz(void) {
    /* The base file: three tensors of different dtypes and metadata; the data
     * bytes are never JSON whitespace so a wrong length cannot parse. */
    const char *header =
        "{\"__metadata__\":{\"format\":\"pt\"},"
        "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
        "\"b\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[24,32]},"
        "\"c\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[32,40]}}";
    unsigned char data[40];
    for (int i = 0; i < 40; i++) data[i] = (unsigned char)(0x41 + i);
    static unsigned char base[1024], buf[1024];
    size_t len = make_file(base, header, data, 40);
    size_t hend = 8 + strlen(header);
    const char *path = tmp_path("fuzz.safetensors");
    int bad_msg = 0;
    write_bytes(path, base, len);
    CHECK(probe(path, &bad_msg) == 0, "the base file is valid: %s", ml_last_error());

    /* Every truncation fails: tensors cover the data section to its end. */
    int fails = 0;
    for (size_t cut = 0; cut < len; cut++) {
        write_bytes(path, base, cut);
        fails += probe(path, &bad_msg);
    }
    CHECK(fails == (int)len, "all %zu truncations rejected (%d were)", len, fails);

    /* Wrong header lengths. */
    fails = 0;
    int tries = 0;
    for (int i = 0; i < 600; i++) {
        uint64_t h = i < 200 ? (uint64_t)i : i < 400 ? rnd() : rnd() % (len + 16);
        if (h == hend - 8) continue;
        memcpy(buf, base, len);
        for (int k = 0; k < 8; k++) buf[k] = (unsigned char)(h >> (8 * k));
        write_bytes(path, buf, len);
        fails += probe(path, &bad_msg);
        tries++;
    }
    CHECK(fails == tries, "all %d wrong header lengths rejected (%d were)", tries, fails);

    /* Random byte flips in the header: no crash, and a rejected file always
     * gets a message naming it (valid mutants, e.g. a renamed tensor, load). */
    int rejected = 0;
    for (int i = 0; i < 4000; i++) {
        memcpy(buf, base, len);
        int flips = 1 + (int)(rnd() % 4);
        for (int k = 0; k < flips; k++) {
            size_t pos = 8 + rnd() % (hend - 8);
            buf[pos] = (rnd() & 1) ? (unsigned char)rnd() : (unsigned char)"0123456789-[]{}\",:e."[rnd() % 20];
        }
        write_bytes(path, buf, len);
        rejected += probe(path, &bad_msg);
    }
    CHECK(rejected > 2000, "most header mutations rejected (%d of 4000)", rejected);

    /* Hand-written bad headers. */
    static const struct { const char *h; const char *want; } bad[] = {
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", "overlap"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]}}", "negative"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", "end before"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,99999999999999]}}", "run past"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,9223372036854775807]}}", "run past"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,99999999999999999999]}}", "JSON"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", "needs 12 bytes"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2,-1],\"data_offsets\":[0,8]}}", "non-negative"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}", "too many elements"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", "dimensions"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", "integers"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", "two integers"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8.0]}}", "two integers"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", "data_offsets"},
        {"{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", "shape"},
        {"{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", "dtype"},
        {"{\"a\":{\"dtype\":7,\"shape\":[2],\"data_offsets\":[0,8]}}", "dtype"},
        {"{\"a\":{\"dtype\":\"F99\",\"shape\":[2],\"data_offsets\":[0,8]}}", "unknown dtype 'F99'"},
        {"{\"a\":{\"dtype\":\"f32\",\"shape\":[2],\"data_offsets\":[0,8]}}", "unknown dtype"},
        {"{\"a\":[1,2]}", "must be an object"},
        {"[1,2,3]", "JSON object"},
        {"\"hello\"", "JSON"},
        {"nul", "JSON"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", "duplicate"},
        {"{\"__metadata__\":{\"format\":3}}", "not a string"},
        {"{\"__metadata__\":[]}", "__metadata__"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}} x", "JSON"},
    };
    unsigned char zeros[16] = {0};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        size_t n = make_file(buf, bad[i].h, zeros, 16);
        write_bytes(path, buf, n);
        char what[32];
        snprintf(what, sizeof what, "bad header %zu", i);
        expect_open_error(path, bad[i].want, what);
    }
    /* Short and empty files, a huge length field, a directory without weights. */
    write_bytes(path, "", 0);
    expect_open_error(path, "8-byte", "empty file");
    memset(buf, 0xff, 16);
    write_bytes(path, buf, 16);
    expect_open_error(path, "past the end", "huge header length");
    expect_open_error(tmp_path("does_not_exist.safetensors"), "No such file", "missing file");
    CHECK(bad_msg == 0, "%d rejections had no message naming the file", bad_msg);
}

static void test_json_helpers(void) {
    char b[32];
    static const struct { double v; const char *s; } nums[] = {
        {1.0, "1.0"}, {0.1, "0.1"}, {1e-5, "1e-05"}, {0.00085, "0.00085"}, {-2.0, "-2.0"},
        {1.0 / 3, "0.3333333333333333"}, {1e300, "1e+300"}, {0.0, "0.0"}, {123456789.0, "123456789.0"},
    };
    for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++) {
        CHECK(ml_json_format_double(nums[i].v, b, sizeof b) == 0 && strcmp(b, nums[i].s) == 0,
              "format %.17g: got %s want %s", nums[i].v, b, nums[i].s);
        CHECK(strtod(b, NULL) == nums[i].v, "round trip %s", b);
    }
    int round_trips = 1;
    for (int i = 0; i < 2000; i++) {
        uint64_t u = rnd();
        double d;
        memcpy(&d, &u, 8);
        if (d != d || d - d != 0) continue;
        round_trips &= ml_json_format_double(d, b, sizeof b) == 0 && strtod(b, NULL) == d;
    }
    CHECK(round_trips, "random doubles round-trip");
    CHECK(ml_json_format_double(1.0 / 0.0, b, sizeof b) < 0, "inf refused");
    const char *path = tmp_path("bad.json");
    write_bytes(path, "{\n  \"a\": 1,\n  \"b\": ]\n}", 22);
    ml_clear_error();
    json_t *j = ml_json_load_file(path);
    CHECK(!j && strstr(ml_last_error(), path) && strstr(ml_last_error(), ":3:"),
          "JSON error names file and line: %s", ml_last_error());
    j = ml_json_load_file("tests/fixtures/sd1-tiny/pipeline/model_index.json");
    CHECK(j && json_is_object(j), "model_index.json parses");
    json_decref(j);
}

static void remove_tree(const char *dir) {
    DIR *d = opendir(dir);
    for (struct dirent *e; d && (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char p[1024];
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        struct stat st;
        if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode)) remove_tree(p);
        else unlink(p);
    }
    if (d) closedir(d);
    rmdir(dir);
}

int main(void) {
    const char *tmp = getenv("TMPDIR");
    snprintf(g_dir, sizeof g_dir, "%s/moonlit_st_XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(g_dir)) {
        printf("FAIL: cannot create a temporary directory\n");
        return 1;
    }
    test_fixtures();
    test_round_trip();
    test_python_layout();
    test_conversions();
    test_copy_on_write();
    test_read_and_truncation();
    test_not_regular_files();
    test_metadata_merge();
    test_atomic_save();
    test_header_limit();
    test_sharded();
    test_lookup_errors();
    test_fuzz();
    test_json_helpers();
    remove_tree(g_dir);
    return check_summary();
}
