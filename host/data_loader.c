/* data_loader.c — the loader thread pool of ml.data (see data_loader.h). */
#include "data_loader.h"
#include "device.h"
#include "error.h"
#include "fs.h"
#include "image.h"
#ifdef ML_WITH_CUDA
#include "cuda/runtime.h"   /* ml_cuda_set_device (plain C) */
#endif

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static atomic_int g_live_threads;

int ml_data_live_threads(void) { return atomic_load(&g_live_threads); }

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

/* ---- counter-based random draws ---------------------------------------- */

static uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t ml_data_hash(uint64_t seed, uint64_t epoch, uint64_t index, uint64_t stream) {
    return mix64(mix64(mix64(mix64(seed) ^ epoch) ^ index) ^ stream);
}

/* Streams of the draws of one sample. */
enum { DRAW_CROP_Y = 1, DRAW_CROP_X = 2, DRAW_FLIP = 3 };

bool ml_data_flip_drawn(uint64_t seed, uint64_t epoch, int64_t key, double hflip) {
    if (!(hflip > 0)) return false;
    double u = (double)(ml_data_hash(seed, epoch, (uint64_t)key, DRAW_FLIP) >> 11) * 0x1.0p-53;
    return u < hflip;
}

uint64_t ml_data_hash_below(uint64_t seed, uint64_t epoch, uint64_t index, uint64_t stream, uint64_t n) {
    /* Multiply-high maps the 64-bit hash onto [0, n) without the modulo's
     * bias toward small values (negligible here, but free to avoid). */
    return (uint64_t)(((unsigned __int128)ml_data_hash(seed, epoch, index, stream) * n) >> 64);
}

/* ---- one sample ---------------------------------------------------------- */

static int read_whole(const char *path, uint8_t **data, size_t *n) {
    *data = NULL;
    /* before fopen: opening a FIFO would wait for a writer forever */
    if (ml_require_regular_file(path, "cannot read image") < 0) return -1;
    FILE *f = fopen(path, "rb");
    if (!f) return ml_error("cannot read image '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return ml_error("cannot read image '%s': not a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    uint8_t *d = malloc(size ? size : 1);
    if (!d) { fclose(f); return ml_error("cannot read image '%s': out of memory (%zu bytes)", path, size); }
    size_t got = fread(d, 1, size, f);
    int err = ferror(f);
    fclose(f);
    if (err || got != size) { free(d); return ml_error("cannot read image '%s': read error", path); }
    *data = d; *n = size;
    return 0;
}

/* Width and height from the file header, without decoding: 0 if found,
 * -1 if the header says nothing we understand (the decoder then judges). */
static int probe_size(const uint8_t *d, size_t n, int64_t *w, int64_t *h) {
    if (n >= 24 && memcmp(d, "\x89PNG\r\n\x1a\n", 8) == 0 && memcmp(d + 12, "IHDR", 4) == 0) {
        *w = (int64_t)d[16] << 24 | d[17] << 16 | d[18] << 8 | d[19];
        *h = (int64_t)d[20] << 24 | d[21] << 16 | d[22] << 8 | d[23];
        return 0;
    }
    if (n >= 26 && d[0] == 'B' && d[1] == 'M') {
        uint32_t hsize = d[14] | d[15] << 8 | d[16] << 16 | (uint32_t)d[17] << 24;
        if (hsize == 12) { *w = d[18] | d[19] << 8; *h = d[20] | d[21] << 8; return 0; }
        *w = (int32_t)(d[18] | d[19] << 8 | d[20] << 16 | (uint32_t)d[21] << 24);
        *h = (int32_t)(d[22] | d[23] << 8 | d[24] << 16 | (uint32_t)d[25] << 24);
        if (*h < 0) *h = -*h;
        if (*w < 0) *w = -*w;
        return 0;
    }
    if (n >= 4 && d[0] == 0xFF && d[1] == 0xD8) {
        size_t p = 2;
        while (p + 4 <= n) {
            if (d[p] != 0xFF) { p++; continue; }
            uint8_t m = d[p + 1];
            if (m == 0xFF) { p++; continue; }
            if (m == 0x01 || (m >= 0xD0 && m <= 0xD8)) { p += 2; continue; }
            if (m == 0xD9 || m == 0xDA) return -1;   /* no frame header before the scan */
            size_t len = (size_t)d[p + 2] << 8 | d[p + 3];
            /* SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC). */
            if (m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC) {
                if (p + 9 > n) return -1;
                *h = d[p + 5] << 8 | d[p + 6];
                *w = d[p + 7] << 8 | d[p + 8];
                return 0;
            }
            p += 2 + len;
        }
    }
    return -1;
}

/* torchvision's Resize(int) of the shorter side: (new_short, int(size * long / short)). */
static void resized_size(int h, int w, int resize, int64_t *oh, int64_t *ow) {
    if (resize <= 0) { *oh = h; *ow = w; return; }
    int64_t s = h <= w ? h : w, l = h <= w ? w : h;
    int64_t nl = (int64_t)((double)((int64_t)resize * l) / (double)s);
    if (h <= w) { *oh = resize; *ow = nl; }
    else { *oh = nl; *ow = resize; }
}

/* The output edge of a transform when it does not depend on the image. */
static int fixed_size(const ml_data_transform *tf) {
    return tf && tf->crop != ML_CROP_NONE ? tf->size : 0;
}

/* Decode `path` and apply `tf` (may be NULL); the [oh, ow, 3] result goes to
 * dst when dst is given (its size must then be the transform's crop size),
 * else to a malloc'd *own. */
static int run_sample(const char *path, const ml_data_transform *tf, uint64_t epoch, int64_t key,
                      int64_t max_pixels, float *dst, float **own, int *out_h, int *out_w) {
    uint8_t *file = NULL, *px = NULL;
    float *img = NULL, *rs = NULL;
    size_t n = 0;
    int rc = -1, h, w;
    if (own) *own = NULL;
    if (max_pixels <= 0) max_pixels = ML_DATA_DEFAULT_MAX_PIXELS;
    if (read_whole(path, &file, &n) < 0) return -1;
    int64_t pw, ph;
    if (probe_size(file, n, &pw, &ph) == 0 && pw * ph > max_pixels) {
        ml_error("image '%s' is %lld x %lld = %.1f megapixels, above the limit of %.1f "
                 "megapixels (raise read_images' max_pixels to allow it)",
                 path, (long long)pw, (long long)ph, pw * ph / 1e6, max_pixels / 1e6);
        goto done;
    }
    if (ml_image_decode_max(file, n, path, max_pixels, &px, &h, &w) < 0) goto done;
    free(file); file = NULL;
    if ((int64_t)h * w > max_pixels) {
        ml_error("image '%s' is %d x %d = %.1f megapixels, above the limit of %.1f megapixels "
                 "(raise read_images' max_pixels to allow it)", path, w, h, (double)h * w / 1e6,
                 max_pixels / 1e6);
        goto done;
    }
    size_t npx = (size_t)h * w * 3;
    img = malloc(npx * sizeof(float));
    if (!img) { ml_error("image '%s': out of memory for %d x %d pixels", path, w, h); goto done; }
    for (size_t i = 0; i < npx; i++) img[i] = px[i] / 255.0f;   /* ToTensor */
    free(px); px = NULL;

    int64_t rh, rw;
    resized_size(h, w, tf ? tf->resize : 0, &rh, &rw);
    if (rh < 1 || rw < 1 || rh > INT_MAX / 4 || rw > INT_MAX / 4 || rh * rw > max_pixels) {
        ml_error("image '%s' (%d x %d) resized to %lld x %lld is out of range (limit %.1f megapixels)",
                 path, w, h, (long long)rw, (long long)rh, max_pixels / 1e6);
        goto done;
    }
    const float *cur = img;
    if (rh != h || rw != w) {
        rs = malloc((size_t)rh * rw * 3 * sizeof(float));
        if (!rs) { ml_error("image '%s': out of memory resizing to %lld x %lld", path, (long long)rw, (long long)rh); goto done; }
        if (ml_image_resize_f32(rs, (int)rh, (int)rw, img, h, w, 3, ML_RESIZE_BILINEAR) < 0) {
            ml_error("image '%s': %s", path, ml_last_error());
            goto done;
        }
        cur = rs;
    }

    int oh = (int)rh, ow = (int)rw, top = 0, left = 0;
    if (tf && tf->crop != ML_CROP_NONE) {
        if (tf->size > rh || tf->size > rw) {
            ml_error("image '%s' is %lld x %lld after resizing, smaller than the crop size %d "
                     "(resize it to at least the crop size)", path, (long long)rw, (long long)rh, tf->size);
            goto done;
        }
        oh = ow = tf->size;
        if (tf->crop == ML_CROP_CENTER) {
            /* torchvision: int(round((h - size) / 2)), Python's round-half-even. */
            top = (int)nearbyint((rh - oh) / 2.0);
            left = (int)nearbyint((rw - ow) / 2.0);
        } else {
            top = (int)ml_data_hash_below(tf->seed, epoch, (uint64_t)key, DRAW_CROP_Y, (uint64_t)(rh - oh + 1));
            left = (int)ml_data_hash_below(tf->seed, epoch, (uint64_t)key, DRAW_CROP_X, (uint64_t)(rw - ow + 1));
        }
    }
    bool flip = tf && ml_data_flip_drawn(tf->seed, epoch, key, tf->hflip);
    bool norm = tf && tf->normalize;
    float *out = dst;
    if (!out) {
        out = malloc((size_t)oh * ow * 3 * sizeof(float));
        if (!out) { ml_error("image '%s': out of memory", path); goto done; }
        *own = out;
    }
    for (int y = 0; y < oh; y++) {
        const float *row = cur + ((size_t)(top + y) * rw + left) * 3;
        float *o = out + (size_t)y * ow * 3;
        for (int x = 0; x < ow; x++) {
            const float *p = row + (size_t)(flip ? ow - 1 - x : x) * 3;
            for (int c = 0; c < 3; c++) o[x * 3 + c] = norm ? (p[c] - 0.5f) / 0.5f : p[c];
        }
    }
    *out_h = oh; *out_w = ow;
    rc = 0;
done:
    free(file); free(px); free(img); free(rs);
    return rc;
}

int ml_data_process(const char *path, const ml_data_transform *tf, uint64_t epoch, int64_t key,
                    int64_t max_pixels, float **out, int *h, int *w) {
    return run_sample(path, tf, epoch, key, max_pixels, NULL, out, h, w);
}

/* ---- buffers --------------------------------------------------------------- */

void ml_data_buffer_free(void *ctx, void *data, size_t nbytes) { free(data); }

static float *cpu_buffer(size_t nbytes) {
    size_t rounded = (nbytes + 63) & ~(size_t)63;
    return aligned_alloc(64, rounded ? rounded : 64);
}

typedef struct { float *p; size_t n; } pinned_buf;
typedef struct { void *event; int n; pinned_buf buf[ML_DATA_MAX_COLS]; } inflight_batch;

/* ---- the pool ------------------------------------------------------------ */

typedef struct {
    int64_t batch;          /* which batch this slot holds; -1 = free */
    int remaining;          /* samples not finished yet */
    bool ready;
    int64_t fail_sample;    /* lowest failing sample of the batch, -1 = none */
    char err[768];
    int fixed[ML_DATA_MAX_COLS];     /* crop edge of the column, 0 = varies */
    float *buf[ML_DATA_MAX_COLS];
    size_t nbytes[ML_DATA_MAX_COLS];
    int h[ML_DATA_MAX_COLS], w[ML_DATA_MAX_COLS];
    float **tmp;            /* per sample, for columns whose size varies */
    int *th, *tw;
    int cap;                /* entries of tmp/th/tw */
} slot;

struct ml_data_loader {
    int ncols;
    int64_t nbatches, nsamples;
    int *batch_rows;
    int64_t *batch_start;            /* first sample of each batch, nbatches + 1 */
    ml_data_sample *samples;
    char **col_names;
    ml_data_transform *transforms;
    int ntransforms;
    uint64_t epoch;
    ml_device device;
    bool cuda;

    pthread_mutex_t mu;
    pthread_cond_t work_cv, ready_cv;
    int64_t next_job, next_job_batch, taken;
    bool stop;
    int nslots;
    slot *slots;
    pthread_t *tids;
    int nthreads;

    ml_data_stats stats;

    /* CUDA: pinned buffers ready for reuse, and those whose upload may
     * still be running (consumer thread only, except `pool` under mu). */
    pinned_buf *pool;
    int npool, pool_cap;
    inflight_batch *inflight;
    int ninflight, inflight_cap;
};

#ifdef ML_WITH_CUDA
static float *pinned_get(ml_data_loader *L, size_t nbytes) {   /* under mu */
    for (int i = 0; i < L->npool; i++)
        if (L->pool[i].n == nbytes) {
            float *p = L->pool[i].p;
            L->pool[i] = L->pool[--L->npool];
            return p;
        }
    /* Select the loader's device on this worker thread first: pinned
     * memory is allocated in the current device's context, and a thread's
     * default is device 0 (each process of a multi-GPU run would otherwise
     * open a context there). */
    if (ml_cuda_set_device(L->device.index) < 0) return NULL;
    return ml_cuda_host_alloc(nbytes);
}
static void pinned_put(ml_data_loader *L, float *p, size_t n) {   /* under mu */
    if (L->npool == L->pool_cap) {
        int cap = L->pool_cap ? 2 * L->pool_cap : 8;
        pinned_buf *np = realloc(L->pool, sizeof *np * cap);
        if (!np) { ml_cuda_host_free(p); return; }
        L->pool = np; L->pool_cap = cap;
    }
    L->pool[L->npool++] = (pinned_buf){p, n};
}
/* Move finished uploads' buffers back to the pool; `wait_all` blocks on the
 * rest first (closing). */
static void reap_inflight(ml_data_loader *L, bool wait_all) {
    int k = 0;
    for (int i = 0; i < L->ninflight; i++) {
        inflight_batch *f = &L->inflight[i];
        int done = wait_all ? (ml_cuda_event_sync(f->event) < 0 ? -1 : 1) : ml_cuda_event_query(f->event);
        if (done == 0) { L->inflight[k++] = *f; continue; }
        ml_cuda_event_destroy(f->event);
        pthread_mutex_lock(&L->mu);
        for (int c = 0; c < f->n; c++) pinned_put(L, f->buf[c].p, f->buf[c].n);
        pthread_mutex_unlock(&L->mu);
    }
    L->ninflight = k;
}
#endif

static float *batch_buffer(ml_data_loader *L, size_t nbytes) {   /* under mu */
#ifdef ML_WITH_CUDA
    if (L->cuda) return pinned_get(L, nbytes);
#endif
    return cpu_buffer(nbytes);
}

static void buffer_drop(ml_data_loader *L, float *p, size_t nbytes) {   /* under mu */
    if (!p) return;
#ifdef ML_WITH_CUDA
    if (L->cuda) { pinned_put(L, p, nbytes); return; }
#endif
    free(p);
}

static void slot_clear(ml_data_loader *L, slot *s) {   /* under mu */
    for (int c = 0; c < L->ncols; c++) {
        buffer_drop(L, s->buf[c], s->nbytes[c]);
        s->buf[c] = NULL;
    }
    for (int i = 0; i < s->cap; i++) { free(s->tmp[i]); s->tmp[i] = NULL; }
    s->batch = -1;
    s->ready = false;
}

static void slot_fail(slot *s, int64_t sample, const char *msg) {
    if (s->fail_sample >= 0 && s->fail_sample <= sample) return;
    s->fail_sample = sample;
    snprintf(s->err, sizeof s->err, "%s", msg);
}

/* Start batch b in its slot: decide which columns have a fixed size and
 * allocate their buffers. */
static void slot_open(ml_data_loader *L, slot *s, int64_t b) {   /* under mu */
    int rows = L->batch_rows[b];
    s->batch = b;
    s->remaining = rows * L->ncols;
    s->ready = false;
    s->fail_sample = -1;
    s->err[0] = 0;
    for (int c = 0; c < L->ncols; c++) {
        const ml_data_sample *first = &L->samples[L->batch_start[b] + (int64_t)c * rows];
        int edge = fixed_size(first->transform >= 0 ? &L->transforms[first->transform] : NULL);
        for (int r = 1; r < rows && edge; r++) {
            const ml_data_sample *sm = first + r;
            if (fixed_size(sm->transform >= 0 ? &L->transforms[sm->transform] : NULL) != edge) edge = 0;
        }
        s->fixed[c] = edge;
        s->buf[c] = NULL;
        s->nbytes[c] = 0;
        if (edge) {
            s->nbytes[c] = (size_t)rows * edge * edge * 3 * sizeof(float);
            s->h[c] = s->w[c] = edge;
            s->buf[c] = batch_buffer(L, s->nbytes[c]);
            if (!s->buf[c]) {
                char msg[256];
                snprintf(msg, sizeof msg, "data loader: out of memory for a batch buffer of %zu bytes (%s)",
                         s->nbytes[c], ml_last_error());
                slot_fail(s, 0, msg);
            }
        }
    }
}

/* The last sample of a batch finished: stack the columns whose size was
 * only known after decoding.  Runs without the lock (the slot is private
 * until `ready`), except for buffer allocation. */
static void slot_assemble(ml_data_loader *L, slot *s) {
    int64_t b = s->batch;
    int rows = L->batch_rows[b];
    for (int c = 0; c < L->ncols && s->fail_sample < 0; c++) {
        if (s->fixed[c]) continue;
        int base = c * rows;
        for (int r = 1; r < rows; r++)
            if (s->th[base + r] != s->th[base] || s->tw[base + r] != s->tw[base]) {
                char msg[768];
                const ml_data_sample *sm = &L->samples[L->batch_start[b] + base];
                snprintf(msg, sizeof msg, "column '%s': images of one batch must have one size, but '%s' "
                         "is %d x %d and '%s' is %d x %d (resize and crop them with ml.data.ImageTransform)",
                         L->col_names[c], sm[0].path, s->tw[base], s->th[base], sm[r].path,
                         s->tw[base + r], s->th[base + r]);
                slot_fail(s, base + r, msg);
                break;
            }
        if (s->fail_sample >= 0) break;
        size_t one = (size_t)s->th[base] * s->tw[base] * 3;
        s->nbytes[c] = one * rows * sizeof(float);
        s->h[c] = s->th[base];
        s->w[c] = s->tw[base];
        pthread_mutex_lock(&L->mu);
        s->buf[c] = batch_buffer(L, s->nbytes[c]);
        pthread_mutex_unlock(&L->mu);
        if (!s->buf[c]) {
            slot_fail(s, base, "data loader: out of memory for a batch buffer");
            break;
        }
        for (int r = 0; r < rows; r++) {
            memcpy(s->buf[c] + one * r, s->tmp[base + r], one * sizeof(float));
            free(s->tmp[base + r]);
            s->tmp[base + r] = NULL;
        }
    }
}

static void *worker_main(void *arg) {
    ml_data_loader *L = arg;
    pthread_mutex_lock(&L->mu);
    for (;;) {
        while (!L->stop && L->next_job < L->nsamples && L->next_job_batch >= L->taken + L->nslots)
            pthread_cond_wait(&L->work_cv, &L->mu);
        if (L->stop || L->next_job >= L->nsamples) break;
        int64_t j = L->next_job++, b = L->next_job_batch;
        if (L->next_job == L->batch_start[b + 1]) L->next_job_batch++;
        slot *s = &L->slots[b % L->nslots];
        if (s->batch != b) slot_open(L, s, b);
        int rows = L->batch_rows[b];
        int64_t si = j - L->batch_start[b];
        int col = (int)(si / rows), row = (int)(si % rows);
        const ml_data_sample *sm = &L->samples[j];
        const ml_data_transform *tf = sm->transform >= 0 ? &L->transforms[sm->transform] : NULL;
        bool skip = s->fail_sample >= 0;   /* the batch failed already: no point decoding */
        float *dst = s->fixed[col] && s->buf[col]
                   ? s->buf[col] + (size_t)row * s->fixed[col] * s->fixed[col] * 3 : NULL;
        pthread_mutex_unlock(&L->mu);

        double t0 = now_ms();
        float *own = NULL;
        int oh = 0, ow = 0, rc = 0;
        if (!skip) rc = run_sample(sm->path, tf, L->epoch, sm->key, sm->max_pixels, dst,
                                   dst ? NULL : &own, &oh, &ow);
        double dt = now_ms() - t0;

        pthread_mutex_lock(&L->mu);
        L->stats.decode_ms += dt;
        if (rc < 0) slot_fail(s, si, ml_last_error());
        if (!s->fixed[col]) { s->tmp[si] = own; s->th[si] = oh; s->tw[si] = ow; }
        if (--s->remaining == 0) {
            pthread_mutex_unlock(&L->mu);
            slot_assemble(L, s);
            pthread_mutex_lock(&L->mu);
            s->ready = true;
            pthread_cond_broadcast(&L->ready_cv);
        }
    }
    pthread_mutex_unlock(&L->mu);
    atomic_fetch_sub(&g_live_threads, 1);
    return NULL;
}

void ml_data_loader_free(ml_data_loader *L) {
    if (!L) return;
    pthread_mutex_lock(&L->mu);
    L->stop = true;
    pthread_cond_broadcast(&L->work_cv);
    pthread_cond_broadcast(&L->ready_cv);
    pthread_mutex_unlock(&L->mu);
    for (int i = 0; i < L->nthreads; i++) pthread_join(L->tids[i], NULL);
#ifdef ML_WITH_CUDA
    if (L->cuda) reap_inflight(L, true);
#endif
    if (L->slots)
        for (int i = 0; i < L->nslots; i++) {
            slot_clear(L, &L->slots[i]);
            free(L->slots[i].tmp); free(L->slots[i].th); free(L->slots[i].tw);
        }
#ifdef ML_WITH_CUDA
    for (int i = 0; i < L->npool; i++) ml_cuda_host_free(L->pool[i].p);
#endif
    free(L->pool);
    free(L->inflight);
    if (L->samples)
        for (int64_t i = 0; i < L->nsamples; i++) free((char *)L->samples[i].path);
    if (L->col_names)
        for (int c = 0; c < L->ncols; c++) free(L->col_names[c]);
    free(L->col_names);
    free(L->samples); free(L->batch_rows); free(L->batch_start); free(L->transforms);
    free(L->slots); free(L->tids);
    pthread_mutex_destroy(&L->mu);
    pthread_cond_destroy(&L->work_cv);
    pthread_cond_destroy(&L->ready_cv);
    free(L);
}

ml_data_loader *ml_data_loader_new(const ml_data_loader_config *cfg) {
    if (cfg->ncols < 1 || cfg->ncols > ML_DATA_MAX_COLS)
        return ml_error_null("data loader: %d image columns (expected 1..%d)", cfg->ncols, ML_DATA_MAX_COLS);
    if (cfg->nbatches < 0) return ml_error_null("data loader: negative batch count");
    if (cfg->device.type == ML_CUDA) {
#ifndef ML_WITH_CUDA
        return ml_error_null("data loader: device cuda:%d requested but moonlit was built without CUDA",
                             cfg->device.index);
#else
        if (!ml_device_available(cfg->device))
            return ml_error_null("data loader: device cuda:%d is not available", cfg->device.index);
#endif
    }
    for (int i = 0; i < cfg->ntransforms; i++) {
        const ml_data_transform *t = &cfg->transforms[i];
        if (t->resize < 0 || (t->crop != ML_CROP_NONE && t->size < 1) || !(t->hflip >= 0 && t->hflip <= 1))
            return ml_error_null("data loader: transform %d is invalid (resize %d, size %d, hflip %g)",
                                 i + 1, t->resize, t->size, t->hflip);
    }
    ml_data_loader *L = calloc(1, sizeof *L);
    if (!L) return ml_error_null("data loader: out of memory");
    pthread_mutex_init(&L->mu, NULL);
    pthread_cond_init(&L->work_cv, NULL);
    pthread_cond_init(&L->ready_cv, NULL);
    L->ncols = cfg->ncols;
    L->nbatches = cfg->nbatches;
    L->epoch = cfg->epoch;
    L->device = cfg->device;
    L->cuda = cfg->device.type == ML_CUDA;
    L->ntransforms = cfg->ntransforms;
    L->batch_rows = malloc(sizeof(int) * (size_t)(cfg->nbatches + 1));
    L->batch_start = malloc(sizeof(int64_t) * (size_t)(cfg->nbatches + 1));
    L->col_names = calloc((size_t)L->ncols, sizeof(char *));
    L->transforms = malloc(sizeof(ml_data_transform) * (size_t)(cfg->ntransforms + 1));
    if (!L->batch_rows || !L->batch_start || !L->col_names || !L->transforms) goto oom;
    if (cfg->ntransforms) memcpy(L->transforms, cfg->transforms, sizeof(ml_data_transform) * cfg->ntransforms);
    for (int c = 0; c < L->ncols; c++) {
        char buf[32];
        snprintf(buf, sizeof buf, "%d", c + 1);
        L->col_names[c] = strdup(cfg->col_names && cfg->col_names[c] ? cfg->col_names[c] : buf);
        if (!L->col_names[c]) goto oom;
    }
    int max_rows = 0;
    int64_t total = 0;
    for (int64_t b = 0; b < cfg->nbatches; b++) {
        int r = cfg->batch_rows[b];
        if (r < 1) { ml_data_loader_free(L); return ml_error_null("data loader: batch %lld has %d rows", (long long)b + 1, r); }
        if (r > max_rows) max_rows = r;
        L->batch_rows[b] = r;
        L->batch_start[b] = total;
        if (total > INT64_MAX / 2 - (int64_t)r * L->ncols) goto oom;
        total += (int64_t)r * L->ncols;
    }
    L->batch_start[cfg->nbatches] = total;
    L->nsamples = total;
    if ((uint64_t)total > SIZE_MAX / sizeof(ml_data_sample)) goto oom;
    L->samples = calloc((size_t)(total ? total : 1), sizeof(ml_data_sample));
    if (!L->samples) goto oom;
    for (int64_t i = 0; i < total; i++) {
        const ml_data_sample *s = &cfg->samples[i];
        if (s->transform < -1 || s->transform >= cfg->ntransforms) {
            ml_data_loader_free(L);
            return ml_error_null("data loader: sample %lld names transform %d of %d", (long long)i + 1,
                                 s->transform + 1, cfg->ntransforms);
        }
        L->samples[i] = *s;
        L->samples[i].path = strdup(s->path ? s->path : "");
        if (!L->samples[i].path) goto oom;
    }
    L->nslots = cfg->prefetch > 0 ? cfg->prefetch : 2;
    L->slots = calloc((size_t)L->nslots, sizeof(slot));
    if (!L->slots) goto oom;
    for (int i = 0; i < L->nslots; i++) {
        slot *s = &L->slots[i];
        s->batch = -1;
        s->cap = max_rows * L->ncols;
        s->tmp = calloc((size_t)(s->cap ? s->cap : 1), sizeof(float *));
        s->th = calloc((size_t)(s->cap ? s->cap : 1), sizeof(int));
        s->tw = calloc((size_t)(s->cap ? s->cap : 1), sizeof(int));
        if (!s->tmp || !s->th || !s->tw) goto oom;
    }
    int nt = cfg->threads;
    if (nt <= 0) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        nt = cores < 1 ? 1 : cores > 4 ? 4 : (int)cores;
    }
    if (nt > 256) nt = 256;
    if (total < nt) nt = total > 0 ? (int)total : 0;
    L->tids = calloc((size_t)(nt ? nt : 1), sizeof(pthread_t));
    if (!L->tids) goto oom;
    for (int i = 0; i < nt; i++) {
        /* Counted before it starts (and uncounted as it exits), so the
         * count never lags behind a loader that exists. */
        atomic_fetch_add(&g_live_threads, 1);
        int e = pthread_create(&L->tids[i], NULL, worker_main, L);
        if (e != 0) {
            atomic_fetch_sub(&g_live_threads, 1);
            ml_data_loader_free(L);   /* joins the ones started */
            return ml_error_null("data loader: cannot start a worker thread: %s", strerror(e));
        }
        L->nthreads = i + 1;
    }
    L->stats.threads = nt;
    return L;
oom:
    ml_data_loader_free(L);
    return ml_error_null("data loader: out of memory planning %lld batches", (long long)cfg->nbatches);
}

int ml_data_loader_next(ml_data_loader *L, ml_data_batch *out) {
    memset(out, 0, sizeof *out);
#ifdef ML_WITH_CUDA
    if (L->cuda) reap_inflight(L, false);
#endif
    double t0 = now_ms();
    pthread_mutex_lock(&L->mu);
    if (L->taken >= L->nbatches) { pthread_mutex_unlock(&L->mu); return 0; }
    slot *s = &L->slots[L->taken % L->nslots];
    while (!L->stop && !(s->batch == L->taken && s->ready)) pthread_cond_wait(&L->ready_cv, &L->mu);
    if (L->stop) { pthread_mutex_unlock(&L->mu); return ml_error("data loader: closed"); }
    double waited = now_ms() - t0;
    L->stats.wait_ms += waited;
    L->stats.last_wait_ms = waited;
    L->stats.batches++;
    int rc = 1;
    if (s->fail_sample >= 0) {
        ml_error("%s", s->err);
        slot_clear(L, s);
        rc = -1;
    } else {
        out->index = s->batch;
        out->rows = L->batch_rows[s->batch];
        out->ncols = L->ncols;
        for (int c = 0; c < L->ncols; c++) {
            out->col[c].data = s->buf[c];
            out->col[c].h = s->h[c];
            out->col[c].w = s->w[c];
            out->col[c].nbytes = s->nbytes[c];
            s->buf[c] = NULL;   /* the caller's now */
        }
        slot_clear(L, s);
    }
    L->taken++;
    pthread_cond_broadcast(&L->work_cv);
    pthread_mutex_unlock(&L->mu);
    return rc;
}

int ml_data_loader_upload(ml_data_loader *L, const ml_data_batch *b, int col, void *dst) {
    if (!L->cuda) return ml_error("data loader: upload is for a CUDA destination");
#ifdef ML_WITH_CUDA
    if (col < 0 || col >= b->ncols || !b->col[col].data) return ml_error("data loader: no column %d to upload", col + 1);
    return ml_cuda_memcpy_h2d_async(L->device.index, dst, b->col[col].data, b->col[col].nbytes);
#else
    return ml_error("data loader: moonlit was built without CUDA");
#endif
}

void ml_data_loader_release(ml_data_loader *L, ml_data_batch *b) {
#ifdef ML_WITH_CUDA
    if (L->cuda) {
        inflight_batch f = {0};
        for (int c = 0; c < b->ncols; c++)
            if (b->col[c].data) f.buf[f.n++] = (pinned_buf){b->col[c].data, b->col[c].nbytes};
        memset(b, 0, sizeof *b);
        if (f.n == 0) return;
        f.event = ml_cuda_event_record(L->device.index);
        if (L->ninflight == L->inflight_cap) {
            int cap = L->inflight_cap ? 2 * L->inflight_cap : 8;
            inflight_batch *ni = realloc(L->inflight, sizeof *ni * cap);
            if (ni) { L->inflight = ni; L->inflight_cap = cap; }
        }
        if (!f.event || L->ninflight == L->inflight_cap) {
            /* No event (or no room to remember it): wait for the copies now
             * rather than reuse a buffer the GPU may still read. */
            if (f.event) { ml_cuda_event_sync(f.event); ml_cuda_event_destroy(f.event); }
            else ml_cuda_synchronize(L->device.index);
            pthread_mutex_lock(&L->mu);
            for (int c = 0; c < f.n; c++) pinned_put(L, f.buf[c].p, f.buf[c].n);
            pthread_mutex_unlock(&L->mu);
            return;
        }
        L->inflight[L->ninflight++] = f;
        /* A consumer far ahead of the GPU would pin ever more memory: past a
         * bound, wait for the oldest copies. */
        if (L->ninflight > 4 * L->nslots + 4) {
            ml_cuda_event_sync(L->inflight[0].event);
            reap_inflight(L, false);
        }
        return;
    }
#endif
    for (int c = 0; c < b->ncols; c++) free(b->col[c].data);
    memset(b, 0, sizeof *b);
}

void ml_data_loader_stats(ml_data_loader *L, ml_data_stats *out) {
    pthread_mutex_lock(&L->mu);
    *out = L->stats;
    pthread_mutex_unlock(&L->mu);
}
