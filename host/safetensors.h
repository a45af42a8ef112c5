/* safetensors.h — reading and writing .safetensors checkpoints, single-file
 * or sharded, the format of diffusers/transformers model folders.
 *
 * File layout: 8-byte little-endian header length N, N bytes of JSON
 * {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..],
 * "data_offsets": [begin, end]}, ...}, then the data section (offsets are
 * relative to its start, row-major little-endian elements).
 *
 * Reading checks the whole header when the file is opened: a handle that
 * opened successfully never reads outside the file.  Tensor data is read
 * lazily, in two ways:
 *   ml_st_read  always a fresh CPU tensor that owns its memory, read with
 *               pread: a file truncated or rewritten while open gives an
 *               error, and nothing read changes when the file does later.
 *               Model loading uses it (parameters must own their memory).
 *   ml_st_get   zero-copy where it can: a tensor asked for in its stored
 *               dtype whose data is aligned wraps the file's private
 *               (copy-on-write) mapping; the mapping lives while any such
 *               tensor does, even after ml_st_close.  Anything else is
 *               ml_st_read.  For inspection and read-only use only: the file
 *               is checked to be whole when the tensor is made, but if it is
 *               truncated later, touching the tensor raises SIGBUS, and an
 *               in-place rewrite of the file shows through pages not yet
 *               written.  Writers should replace files, as ml_st_save does.
 * Paths that are not regular files (FIFOs, devices) are refused at open.
 *
 * One handle covers a sharded checkpoint too: open the
 * `*.safetensors.index.json` (its "weight_map" names each tensor's shard)
 * and every shard is opened and checked; names are looked up across them. */
#ifndef ML_SAFETENSORS_H
#define ML_SAFETENSORS_H

#include <stdint.h>
#include "tensor.h"

typedef struct ml_st_file ml_st_file;

/* The largest header length (the 8-byte field, padding included) a file may
 * have: the Python library's limit.  The reader refuses a longer one as a
 * corrupt or foreign file; ml_st_save refuses to write one, since no reader
 * would open it. */
#define ML_ST_MAX_HEADER ((uint64_t)100 * 1000 * 1000)

/* What the header says about one tensor. */
typedef struct {
    const char *name;
    const char *st_dtype;        /* safetensors spelling: "F32", "BF16", "I8", ... */
    int dtype;                   /* ml_dtype, or -1 for a dtype moonlit lacks (I8, U16, F8_*, ...) */
    int ndim;
    int64_t shape[ML_MAX_DIMS];
    uint64_t nbytes;
    const char *file;            /* the file (shard) holding the data */
} ml_st_info;

/* Open a .safetensors file, a sharded checkpoint's .index.json, or a model
 * directory (as ml_st_open_model(path, NULL, NULL)). */
ml_st_file *ml_st_open(const char *path);
/* Resolve the weights of one diffusers/transformers component folder:
 *   basename "diffusion_pytorch_model.safetensors" (".safetensors" optional;
 *   NULL tries "diffusion_pytorch_model" then "model"), variant "fp16" or NULL.
 * Tries, in order: <stem>[.<variant>].safetensors, then the sharded index
 * <stem>.safetensors.index.json, or with a variant
 * <stem>.safetensors.index.<variant>.json (diffusers' spelling) and
 * <stem>.<variant>.safetensors.index.json.  The error lists what was tried. */
ml_st_file *ml_st_open_model(const char *dir, const char *basename, const char *variant);
/* NULL-safe.  Tensors already returned stay valid. */
void ml_st_close(ml_st_file *f);

/* The path that was opened (file or index), for messages. */
const char *ml_st_path(const ml_st_file *f);
int ml_st_count(const ml_st_file *f);
/* Entry i in name order (strcmp), 0 <= i < count. */
const ml_st_info *ml_st_info_at(const ml_st_file *f, int i);
/* Entry by name: NULL if absent (no error recorded). */
const ml_st_info *ml_st_find(const ml_st_file *f, const char *name);

/* Load a tensor onto the CPU.  dtype_or_minus1: the dtype wanted, or -1 for
 * the stored one.  Errors: missing name (nearby names are suggested), a
 * dtype moonlit lacks, out of memory. */
ml_tensor *ml_st_get(ml_st_file *f, const char *name, int dtype_or_minus1);
/* As ml_st_get, but the result always owns its memory (see above); a file
 * that shrank since it was opened is an error naming it. */
ml_tensor *ml_st_read(ml_st_file *f, const char *name, int dtype_or_minus1);

/* The "__metadata__" string map (merged over shards, first shard wins),
 * in key order. */
int ml_st_metadata_count(const ml_st_file *f);
const char *ml_st_metadata_key(const ml_st_file *f, int i);
const char *ml_st_metadata_value(const ml_st_file *f, int i);
/* Value for key, or NULL. */
const char *ml_st_metadata_get(const ml_st_file *f, const char *key);

/* Write n named tensors (any device, any layout) plus optional metadata
 * (nmeta pairs; keys/values may be NULL when nmeta is 0) atomically: on any
 * failure an existing file at path is left as it was.  dtype_or_minus1 >= 0
 * must be a float dtype: floating tensors are stored in it, integer and bool
 * tensors as they are.  The layout is the Python safetensors library's:
 * tensors ordered by dtype (widest first) then name, metadata first, header
 * padded with spaces to a multiple of 8 bytes.  A header that would pass
 * ML_ST_MAX_HEADER is refused before anything is written.  Names, keys and
 * values are C strings: a caller holding counted strings (Lua) must refuse
 * ones with NUL bytes itself, as they would be cut short here. */
int ml_st_save(const char *path, int n, const char *const *names, ml_tensor *const *tensors,
               int nmeta, const char *const *meta_keys, const char *const *meta_values,
               int dtype_or_minus1);

/* Convert n elements between dtypes (src may be unaligned); the fast paths
 * cover same-dtype copies and f16/bf16 <-> f32.  Used by load and save. */
void ml_st_convert(void *dst, ml_dtype dst_dtype, const void *src, ml_dtype src_dtype, int64_t n);

#endif
