/* zip.c — the central directory of a zip archive (see zip.h).
 *
 * The end-of-central-directory record is searched in the file's last 64 KiB
 * (it may be followed by a comment); when a count or offset there is
 * saturated (0xFFFF / 0xFFFFFFFF) the zip64 locator and record just before
 * it give the real values.  Each entry's local header is read too, because
 * the data starts after the local (not the central) name and extra fields. */
#define _XOPEN_SOURCE 700
#include "zip.h"
#include "error.h"
#include "fs.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct ml_zip {
    int fd;
    char *path;
    uint64_t file_size;
    int count;
    ml_zip_entry *entries;
};

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }

static int pread_full(const ml_zip *z, void *buf, size_t n, uint64_t off) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(z->fd, (char *)buf + done, n - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return ml_error("%s: read failed: %s", z->path, strerror(errno));
        if (r == 0) return ml_error("%s: truncated zip (wanted %zu bytes at offset %llu)", z->path, n,
                                    (unsigned long long)(off + done));
        done += (size_t)r;
    }
    return 0;
}

void ml_zip_close(ml_zip *z) {
    if (!z) return;
    for (int i = 0; i < z->count; i++) free(z->entries[i].name);
    free(z->entries);
    if (z->fd >= 0) close(z->fd);
    free(z->path);
    free(z);
}

/* Finds the end-of-central-directory record; fills the directory's entry
 * count, size and offset (zip64 values when present). */
static int read_eocd(ml_zip *z, uint64_t *count, uint64_t *cd_size, uint64_t *cd_off) {
    size_t tail = z->file_size < 65557 ? (size_t)z->file_size : 65557;
    if (tail < 22) return ml_error("%s: not a zip file (only %llu bytes; a torch .ckpt is a zip archive)", z->path,
                                   (unsigned long long)z->file_size);
    uint8_t *buf = malloc(tail);
    if (!buf) return ml_error("%s: out of memory", z->path);
    uint64_t base = z->file_size - tail;
    if (pread_full(z, buf, tail, base) < 0) { free(buf); return -1; }
    long at = -1;
    for (long i = (long)tail - 22; i >= 0; i--)
        if (rd32(buf + i) == 0x06054b50u) { at = i; break; }
    if (at < 0) {
        free(buf);
        return ml_error("%s: not a zip archive or truncated (no end-of-central-directory record)", z->path);
    }
    const uint8_t *e = buf + at;
    *count = rd16(e + 10);
    *cd_size = rd32(e + 12);
    *cd_off = rd32(e + 16);
    int zip64 = *count == 0xFFFF || *cd_size == 0xFFFFFFFFu || *cd_off == 0xFFFFFFFFu;
    uint64_t eocd_pos = base + (uint64_t)at;
    free(buf);
    if (!zip64) return 0;
    uint8_t loc[20], rec[56];
    if (eocd_pos < 20 || pread_full(z, loc, 20, eocd_pos - 20) < 0 || rd32(loc) != 0x07064b50u)
        return ml_error("%s: zip64 end-of-central-directory locator missing or corrupt", z->path);
    uint64_t rec_off = rd64(loc + 8);
    if (rec_off > z->file_size || z->file_size - rec_off < 56 || pread_full(z, rec, 56, rec_off) < 0 ||
        rd32(rec) != 0x06064b50u)
        return ml_error("%s: zip64 end-of-central-directory record missing or corrupt", z->path);
    *count = rd64(rec + 32);
    *cd_size = rd64(rec + 40);
    *cd_off = rd64(rec + 48);
    return 0;
}

/* One central-directory header at p (n bytes left); returns its length or -1. */
static long parse_entry(ml_zip *z, const uint8_t *p, size_t n, ml_zip_entry *out) {
    if (n < 46 || rd32(p) != 0x02014b50u) return ml_error("%s: corrupt zip central directory", z->path);
    int method = rd16(p + 10);
    uint64_t csize = rd32(p + 20), usize = rd32(p + 24), local = rd32(p + 42);
    size_t name_len = rd16(p + 28), extra_len = rd16(p + 30), comment_len = rd16(p + 32);
    size_t total = 46 + name_len + extra_len + comment_len;
    if (total > n) return ml_error("%s: corrupt zip central directory (entry runs past it)", z->path);
    /* zip64 extended information: the saturated fields, in this order. */
    const uint8_t *x = p + 46 + name_len, *xend = x + extra_len;
    while (xend - x >= 4) {
        uint16_t id = rd16(x), len = rd16(x + 2);
        if ((size_t)(xend - x - 4) < len) break;
        if (id == 0x0001) {
            const uint8_t *v = x + 4, *vend = v + len;
            if (usize == 0xFFFFFFFFu && vend - v >= 8) { usize = rd64(v); v += 8; }
            if (csize == 0xFFFFFFFFu && vend - v >= 8) { csize = rd64(v); v += 8; }
            if (local == 0xFFFFFFFFu && vend - v >= 8) { local = rd64(v); v += 8; }
        }
        x += 4 + len;
    }
    out->name = malloc(name_len + 1);
    if (!out->name) return ml_error("%s: out of memory", z->path);
    memcpy(out->name, p + 46, name_len);
    out->name[name_len] = 0;
    out->method = method;
    out->size = csize;
    if (method == 0 && csize != usize)
        return ml_error("%s: zip entry '%s' is stored but its sizes disagree (%llu vs %llu)", z->path, out->name,
                        (unsigned long long)csize, (unsigned long long)usize);
    uint8_t lh[30];
    if (local > z->file_size || z->file_size - local < 30 || pread_full(z, lh, 30, local) < 0 ||
        rd32(lh) != 0x04034b50u)
        return ml_error("%s: zip entry '%s': local header missing or corrupt", z->path, out->name);
    uint64_t data = local + 30 + rd16(lh + 26) + rd16(lh + 28);
    uint64_t end;
    if (__builtin_add_overflow(data, csize, &end) || end > z->file_size)
        return ml_error("%s: zip entry '%s' runs past the end of the file (truncated?)", z->path, out->name);
    out->data_offset = data;
    return (long)total;
}

ml_zip *ml_zip_open(const char *path) {
    ml_zip *z = calloc(1, sizeof *z);
    if (!z) return ml_error_null("%s: out of memory", path);
    z->fd = -1;
    z->path = strdup(path);
    if (!z->path) { free(z); return ml_error_null("%s: out of memory", path); }
    struct stat st;
    /* Refused before open: opening a FIFO for reading waits for a writer
     * forever.  O_NONBLOCK covers a path swapped for a FIFO between the
     * check and the open; fstat then refuses it, and the flag is cleared
     * for the reads of a regular file. */
    if (ml_require_regular_file(path, "cannot read zip archive") < 0) goto fail;
    z->fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (z->fd < 0) { ml_error("%s: cannot open: %s", path, strerror(errno)); goto fail; }
    if (fstat(z->fd, &st) < 0 || !S_ISREG(st.st_mode)) { ml_error("%s: not a regular file", path); goto fail; }
    int fl = fcntl(z->fd, F_GETFL);
    if (fl >= 0) fcntl(z->fd, F_SETFL, fl & ~O_NONBLOCK);
    z->file_size = (uint64_t)st.st_size;
    uint64_t count = 0, cd_size = 0, cd_off = 0;
    if (read_eocd(z, &count, &cd_size, &cd_off) < 0) goto fail;
    if (cd_off > z->file_size || z->file_size - cd_off < cd_size || count > cd_size / 46 + 1) {
        ml_error("%s: corrupt or truncated zip (central directory outside the file)", path);
        goto fail;
    }
    uint8_t *cd = malloc(cd_size ? (size_t)cd_size : 1);
    z->entries = calloc(count ? (size_t)count : 1, sizeof *z->entries);
    if (!cd || !z->entries) { free(cd); ml_error("%s: out of memory", path); goto fail; }
    if (pread_full(z, cd, (size_t)cd_size, cd_off) < 0) { free(cd); goto fail; }
    size_t pos = 0;
    for (uint64_t i = 0; i < count; i++) {
        long len = parse_entry(z, cd + pos, (size_t)cd_size - pos, &z->entries[i]);
        z->count = (int)i + 1; /* the name (if any) is freed with the handle */
        if (len < 0) { free(cd); goto fail; }
        pos += (size_t)len;
    }
    free(cd);
    return z;
fail:
    ml_zip_close(z);
    return NULL;
}

const char *ml_zip_path(const ml_zip *z) { return z->path; }
int ml_zip_count(const ml_zip *z) { return z->count; }
const ml_zip_entry *ml_zip_entry_at(const ml_zip *z, int i) { return i >= 0 && i < z->count ? &z->entries[i] : NULL; }

const ml_zip_entry *ml_zip_find(const ml_zip *z, const char *name) {
    for (int i = 0; i < z->count; i++)
        if (strcmp(z->entries[i].name, name) == 0) return &z->entries[i];
    return NULL;
}

int ml_zip_read(const ml_zip *z, const ml_zip_entry *e, uint64_t offset, void *buf, size_t n) {
    if (e->method != 0)
        return ml_error("%s: zip entry '%s' is compressed (method %d); only stored entries are read, as torch.save writes them",
                        z->path, e->name, e->method);
    uint64_t end;
    if (__builtin_add_overflow(offset, (uint64_t)n, &end) || end > e->size)
        return ml_error("%s: read of %zu bytes at %llu is past the end of zip entry '%s' (%llu bytes)", z->path, n,
                        (unsigned long long)offset, e->name, (unsigned long long)e->size);
    return pread_full(z, buf, n, e->data_offset + offset);
}
