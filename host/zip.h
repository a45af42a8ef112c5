/* zip.h — read-only access to the entries of a zip archive, enough for
 * PyTorch checkpoints (`torch.save` writes a zip whose entries are all
 * "stored", i.e. uncompressed, with zip64 records past 4 GiB).
 *
 * Opening reads and checks the central directory once: every entry's data
 * range is inside the file, so a handle that opened never reads outside it.
 * Compressed entries are listed but reading one is an error naming it. */
#ifndef ML_ZIP_H
#define ML_ZIP_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    char *name;
    uint64_t data_offset; /* where the entry's bytes start in the file */
    uint64_t size;        /* bytes stored (== uncompressed size for stored entries) */
    int method;           /* 0 stored, 8 deflate, ... */
} ml_zip_entry;

typedef struct ml_zip ml_zip;

ml_zip *ml_zip_open(const char *path);
void ml_zip_close(ml_zip *z); /* NULL-safe */
const char *ml_zip_path(const ml_zip *z);
int ml_zip_count(const ml_zip *z);
const ml_zip_entry *ml_zip_entry_at(const ml_zip *z, int i);
/* NULL when absent (no error recorded). */
const ml_zip_entry *ml_zip_find(const ml_zip *z, const char *name);
/* Read n bytes starting `offset` bytes into a stored entry. */
int ml_zip_read(const ml_zip *z, const ml_zip_entry *e, uint64_t offset, void *buf, size_t n);

#endif
