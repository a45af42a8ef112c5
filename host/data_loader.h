/* data_loader.h — a pool of threads that decode, transform and batch images
 * ahead of the training loop (the C side of ml.data).
 *
 * The Lua side plans an epoch: which files land in which batch, with which
 * transform and which stable key.  The loader executes that plan: each job
 * is one sample (decode -> [0,1] f32 -> resize of the shorter side -> crop
 * -> optional horizontal flip -> optional normalise to [-1,1]); workers write
 * straight into the batch buffer, at most `prefetch` batches ahead of the
 * consumer.  Random crop offsets and flips come from ml_data_hash(transform
 * seed, epoch, key, ...), so results do not depend on thread count or timing.
 *
 * Workers never touch tensors (refcounts are not atomic): they fill raw
 * buffers that the consumer thread wraps.  Errors (naming the file) are kept
 * per batch and returned by ml_data_loader_next when that batch is taken.
 *
 * With a CUDA destination the batch buffers are pinned host memory; the
 * consumer copies them with ml_data_loader_upload (asynchronous, on the
 * compute stream) and the buffer is reused only after that copy's event has
 * completed. */
#ifndef ML_DATA_LOADER_H
#define ML_DATA_LOADER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "image.h"
#include "tensor.h"

#define ML_DATA_MAX_COLS 16
#define ML_DATA_DEFAULT_MAX_PIXELS ML_IMAGE_DEFAULT_MAX_PIXELS

typedef enum { ML_CROP_NONE = 0, ML_CROP_CENTER, ML_CROP_RANDOM } ml_crop_mode;

/* What torchvision's Compose([ToTensor(), Resize(resize, BILINEAR,
 * antialias=True), CenterCrop/RandomCrop(size), RandomHorizontalFlip(hflip),
 * Normalize([0.5], [0.5])]) does, with each step optional. */
typedef struct {
    int resize;          /* shorter side after resizing; 0 = keep the size */
    ml_crop_mode crop;
    int size;            /* crop edge (square); used when crop != NONE */
    double hflip;        /* probability of a horizontal flip, 0..1 */
    bool normalize;      /* x -> (x - 0.5) / 0.5 */
    uint64_t seed;
} ml_data_transform;

/* One sample of one image column. */
typedef struct {
    const char *path;        /* copied by ml_data_loader_new */
    int transform;           /* index into the transforms array, -1 = none */
    int64_t key;             /* stable index of the row: feeds the random draws */
    int64_t max_pixels;      /* refuse larger images before decoding; <= 0 = default */
} ml_data_sample;

typedef struct {
    int ncols;                       /* image columns per batch, 1..ML_DATA_MAX_COLS */
    const char *const *col_names;    /* for error messages; may be NULL */
    int64_t nbatches;
    const int *batch_rows;           /* rows of each batch (nbatches entries) */
    /* Samples batch by batch, then column by column, then row by row:
     * sum(batch_rows) * ncols entries. */
    const ml_data_sample *samples;
    const ml_data_transform *transforms;
    int ntransforms;
    uint64_t epoch;
    int threads;                     /* <= 0: min(4, cores) */
    int prefetch;                    /* batches ahead; <= 0: 2 */
    ml_device device;                /* where batches go (pinned buffers if CUDA) */
} ml_data_loader_config;

/* A finished batch: one [rows, h, w, 3] f32 buffer per image column. */
typedef struct {
    int64_t index;                   /* 0-based batch number in the plan */
    int rows;
    int ncols;
    struct { float *data; int h, w; size_t nbytes; } col[ML_DATA_MAX_COLS];
} ml_data_batch;

typedef struct {
    long long batches;               /* batches taken */
    double wait_ms;                  /* total time the consumer waited in next() */
    double last_wait_ms;
    double decode_ms;                /* total worker time over all samples */
    int threads;
} ml_data_stats;

typedef struct ml_data_loader ml_data_loader;

ml_data_loader *ml_data_loader_new(const ml_data_loader_config *cfg);   /* NULL + error */
/* Wait for the next batch: 1 = *out filled, 0 = the plan is done, -1 = the
 * batch failed (error names the file) or the loader was closed.  CPU: the
 * caller owns each out->col[i].data (free with ml_data_buffer_free; a buffer
 * it sets to NULL in *out is one it took).  CUDA: the buffers stay the
 * loader's; call ml_data_loader_upload for each column, then
 * ml_data_loader_release. */
int ml_data_loader_next(ml_data_loader *L, ml_data_batch *out);
/* CUDA destination: copy column `col` of the batch to device memory `dst`
 * (nbytes of it) asynchronously on the compute stream. */
int ml_data_loader_upload(ml_data_loader *L, const ml_data_batch *b, int col, void *dst);
/* Give the batch's buffers back (CPU: frees those still set; CUDA: reused
 * once the uploads issued so far have completed). */
void ml_data_loader_release(ml_data_loader *L, ml_data_batch *b);
void ml_data_loader_stats(ml_data_loader *L, ml_data_stats *out);
/* Stop and join the workers, free everything; NULL-safe. */
void ml_data_loader_free(ml_data_loader *L);

/* Release callback for ml_storage_wrap of a CPU batch buffer. */
void ml_data_buffer_free(void *ctx, void *data, size_t nbytes);

/* Loader worker threads alive in this process (for leak tests). */
int ml_data_live_threads(void);

/* The counter-based hash behind every random draw: a 64-bit value from
 * (seed, epoch, index, stream), splitmix64-mixed. */
uint64_t ml_data_hash(uint64_t seed, uint64_t epoch, uint64_t index, uint64_t stream);
/* A draw in [0, n) from that hash (n >= 1). */
uint64_t ml_data_hash_below(uint64_t seed, uint64_t epoch, uint64_t index, uint64_t stream, uint64_t n);
/* Whether a transform of this seed with flip probability hflip flips the
 * image of this key in this epoch: the loader's own draw, so a consumer
 * that does not decode the image (cached latents) can know it. */
bool ml_data_flip_drawn(uint64_t seed, uint64_t epoch, int64_t key, double hflip);

/* One sample, synchronously, on the calling thread (ds:take): *out gets a
 * malloc'd [h, w, 3] f32 buffer (free()).  tf may be NULL. */
int ml_data_process(const char *path, const ml_data_transform *tf, uint64_t epoch, int64_t key,
                    int64_t max_pixels, float **out, int *h, int *w);

#endif
