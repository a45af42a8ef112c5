/* image.c — image decoding, encoding with metadata, and resampling (see
 * image.h).  stb_image / stb_image_write do the pixel coding; this file adds
 * what they lack: checks that turn truncated or mislabelled files into clear
 * errors, EXIF orientation, PNG/JPEG metadata, atomic writes, and a
 * resampler that matches PIL and torch. */
#include "image.h"
#include "atomic_file.h"
#include "error.h"
#include "fs.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* stb is compiled here, private to this file (static), limited to the three
 * formats we promise.  Its own code is not held to our warning flags; the
 * static functions it declares for formats we leave out are only reported
 * at the end of the file, so that one warning stays off for the whole file. */
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#define STBI_NO_STDIO
#define STBI_ONLY_JPEG
#define STBI_ONLY_PNG
#define STBI_ONLY_BMP
#include <stb_image.h>
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STBI_WRITE_NO_STDIO
#include <stb_image_write.h>
#pragma GCC diagnostic pop

#define DEFAULT_JPEG_QUALITY 95

/* ---- small helpers ------------------------------------------------------ */

static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
}
static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* A growable byte buffer; `failed` latches an allocation failure so
 * callbacks that cannot return errors (stb's writer) can still report one. */
typedef struct { uint8_t *p; size_t n, cap; bool failed; } bytes;

static void bytes_put(bytes *b, const void *src, size_t n) {
    if (b->failed) return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n) cap *= 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) { b->failed = true; return; }
        b->p = p; b->cap = cap;
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;   /* loader threads decode at once */

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

uint32_t ml_crc32(uint32_t crc, const void *data, size_t n) {
    pthread_once(&crc_once, crc_init);
    const uint8_t *p = data;
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = crc_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* Read a whole file into memory.  `what` starts the error message
 * ("cannot decode", "cannot read text of"). */
static int read_file(const char *path, const char *what, uint8_t **data, size_t *n) {
    *data = NULL; *n = 0;
    if (ml_require_regular_file(path, what) < 0) return -1;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return ml_error("%s '%s': cannot open: %s", what, path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno; close(fd);
        return ml_error("%s '%s': cannot stat: %s", what, path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) { close(fd); return ml_error("%s '%s': not a regular file", what, path); }
    size_t size = (size_t)st.st_size;
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) { close(fd); return ml_error("%s '%s': out of memory reading %zu bytes", what, path, size); }
    size_t got = 0;
    while (got < size) {
        ssize_t r = read(fd, buf + got, size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int e = errno; close(fd); free(buf);
            return ml_error("%s '%s': read failed: %s", what, path, strerror(e));
        }
        if (r == 0) break;     /* the file shrank under us: decode what is there */
        got += (size_t)r;
    }
    close(fd);
    *data = buf; *n = got;
    return 0;
}

/* ---- EXIF orientation --------------------------------------------------- */

/* The orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block;
 * 1 (upright) when absent or unreadable — a damaged EXIF block must not
 * stop an otherwise good image from loading. */
static int exif_orientation(const uint8_t *t, size_t n) {
    if (n < 8) return 1;
    bool le;
    if (t[0] == 'I' && t[1] == 'I') le = true;
    else if (t[0] == 'M' && t[1] == 'M') le = false;
    else return 1;
#define RD16(p) (le ? (uint32_t)((p)[0] | (p)[1] << 8) : (uint32_t)((p)[0] << 8 | (p)[1]))
#define RD32(p) (le ? le32(p) : be32(p))
    if (RD16(t + 2) != 42) return 1;
    size_t ifd = RD32(t + 4);
    if (ifd > n - 2) return 1;
    uint32_t count = RD16(t + ifd);
    for (uint32_t i = 0; i < count; i++) {
        size_t e = ifd + 2 + 12 * (size_t)i;
        if (e + 12 > n) break;
        if (RD16(t + e) == 0x0112 && RD16(t + e + 2) == 3) {   /* type 3: SHORT */
            uint32_t v = RD16(t + e + 8);
            return v >= 1 && v <= 8 ? (int)v : 1;
        }
    }
    return 1;
#undef RD16
#undef RD32
}

/* Turn an [H, W, 3] image upright for EXIF orientation o (2..8), as PIL's
 * ImageOps.exif_transpose does.  Returns the new buffer (the old one is
 * freed) and the new size, or NULL on allocation failure. */
static uint8_t *apply_orientation(uint8_t *src, int h, int w, int o, int *oh, int *ow) {
    bool swap = o >= 5;     /* 5..8 exchange rows and columns */
    *oh = swap ? w : h; *ow = swap ? h : w;
    uint8_t *dst = malloc((size_t)h * w * 3);
    if (!dst) return NULL;
    for (int y = 0; y < *oh; y++) {
        for (int x = 0; x < *ow; x++) {
            int sy, sx;
            switch (o) {
            case 2: sy = y;         sx = w - 1 - x; break;   /* mirror */
            case 3: sy = h - 1 - y; sx = w - 1 - x; break;   /* rotate 180 */
            case 4: sy = h - 1 - y; sx = x;         break;   /* flip */
            case 5: sy = x;         sx = y;         break;   /* transpose */
            case 6: sy = h - 1 - x; sx = y;         break;   /* rotate 90 clockwise */
            case 7: sy = h - 1 - x; sx = w - 1 - y; break;   /* transverse */
            default: sy = x;        sx = w - 1 - y; break;   /* 8: rotate 90 counter-clockwise */
            }
            memcpy(dst + ((size_t)y * *ow + x) * 3, src + ((size_t)sy * w + sx) * 3, 3);
        }
    }
    free(src);
    return dst;
}

/* ---- file structure checks ---------------------------------------------- */

static const uint8_t PNG_SIG[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

typedef struct { char type[5]; const uint8_t *data; uint32_t len; } png_chunk;

/* Next chunk of a PNG at *pos (CRC verified).  Returns 1 with the chunk,
 * 0 after IEND, -1 with an error "<what> '<name>': ...". */
static int png_next(const uint8_t *d, size_t n, size_t *pos, png_chunk *ch,
                    const char *what, const char *name) {
    size_t p = *pos;
    if (p + 12 > n) {
        return ml_error("%s '%s': truncated PNG (the file ends after %zu bytes, before the IEND chunk)",
                        what, name, n);
    }
    uint32_t len = be32(d + p);
    for (int i = 0; i < 4; i++) {
        uint8_t c = d[p + 4 + i];
        ch->type[i] = (char)((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ? c : '?');
    }
    ch->type[4] = 0;
    if (len > 0x7fffffffu || len > n - p - 12) {
        return ml_error("%s '%s': truncated PNG (chunk '%s' at byte %zu needs %u bytes, the file has %zu)",
                        what, name, ch->type, p, len, n - p - 12);
    }
    uint32_t want = be32(d + p + 8 + len);
    if (ml_crc32(0, d + p + 4, 4 + (size_t)len) != want) {
        return ml_error("%s '%s': corrupt PNG (CRC mismatch in chunk '%s' at byte %zu)",
                        what, name, ch->type, p);
    }
    ch->data = d + p + 8;
    ch->len = len;
    *pos = p + 12 + len;
    return strcmp(ch->type, "IEND") == 0 ? 0 : 1;
}

static int png_check(const uint8_t *d, size_t n, const char *name, int *orient) {
    size_t pos = 8;
    png_chunk ch;
    int r, first = 1;
    while ((r = png_next(d, n, &pos, &ch, "cannot decode", name)) == 1) {
        if (first && strcmp(ch.type, "IHDR") != 0)
            return ml_error("cannot decode '%s': corrupt PNG (first chunk is '%s', not IHDR)", name, ch.type);
        first = 0;
        if (strcmp(ch.type, "eXIf") == 0) *orient = exif_orientation(ch.data, ch.len);
    }
    return r;
}

/* A DHT segment's tables must each hold at most 256 codes and fit the
 * segment: stb_image writes past its fixed-size tables otherwise. */
static int dht_check(const uint8_t *p, size_t n) {
    while (n > 0) {
        if (n < 17 || (p[0] >> 4) > 1 || (p[0] & 15) > 3) return -1;
        size_t codes = 0;
        for (int i = 1; i <= 16; i++) codes += p[i];
        if (codes > 256 || n < 17 + codes) return -1;
        p += 17 + codes;
        n -= 17 + codes;
    }
    return 0;
}

/* Walk the JPEG segments to the end-of-image marker: stb decodes a file cut
 * short inside its entropy-coded data as if the rest were zeros. */
static int jpeg_check(const uint8_t *d, size_t n, const char *name, int *orient) {
    size_t p = 2;
    for (;;) {
        /* Skip stray bytes before a marker, as libjpeg does (with a warning). */
        while (p < n && d[p] != 0xFF) p++;
        while (p < n && d[p] == 0xFF) p++;         /* fill bytes */
        if (p >= n) break;
        uint8_t m = d[p++];
        if (m == 0xD9) return 0;                   /* EOI */
        if (m == 0x01 || (m >= 0xD0 && m <= 0xD8)) continue;   /* no length field */
        if (p + 2 > n) break;
        size_t len = (size_t)d[p] << 8 | d[p + 1];
        if (len < 2) return ml_error("cannot decode '%s': corrupt JPEG (segment length %zu at byte %zu)", name, len, p);
        if (p + len > n) break;
        if (m == 0xC4 && dht_check(d + p + 2, len - 2) < 0)
            return ml_error("cannot decode '%s': corrupt JPEG (bad Huffman table at byte %zu)", name, p);
        if (m == 0xE1 && len >= 8 && memcmp(d + p + 2, "Exif\0\0", 6) == 0)
            *orient = exif_orientation(d + p + 8, len - 8);
        p += len;
        if (m == 0xDA) {
            /* Entropy-coded data runs to the next marker other than a
             * stuffed zero (FF00) or a restart marker (FFD0..FFD7). */
            for (;;) {
                const uint8_t *f = memchr(d + p, 0xFF, n - p);
                if (!f) { p = n; break; }
                p = (size_t)(f - d);
                if (p + 1 >= n) { p = n; break; }
                uint8_t c = d[p + 1];
                if (c == 0x00 || (c >= 0xD0 && c <= 0xD7)) p += 2;
                else if (c == 0xFF) p += 1;
                else break;
            }
            if (p >= n) break;
        }
    }
    return ml_error("cannot decode '%s': truncated JPEG (the file ends after %zu bytes, "
                    "before the end-of-image marker)", name, n);
}

/* Uncompressed BMPs: the pixel array the header describes must be there. */
static int bmp_check(const uint8_t *d, size_t n, const char *name) {
    if (n < 30) return ml_error("cannot decode '%s': truncated BMP (only %zu bytes)", name, n);
    uint32_t off = le32(d + 10), hsize = le32(d + 14);
    int64_t w, h;
    uint32_t bpp, comp;
    if (hsize == 12) {                               /* OS/2 1.x header */
        w = d[18] | d[19] << 8; h = d[20] | d[21] << 8;
        bpp = d[24] | d[25] << 8; comp = 0;
    } else {
        if (n < 34) return ml_error("cannot decode '%s': truncated BMP (only %zu bytes)", name, n);
        w = (int32_t)le32(d + 18); h = (int32_t)le32(d + 22);
        bpp = d[28] | d[29] << 8; comp = le32(d + 30);
    }
    if (h < 0) h = -h;                               /* top-down rows */
    if (w <= 0 || (comp != 0 && comp != 3 && comp != 6)) return 0;   /* stb judges the rest */
    int64_t need = (int64_t)off + ((w * bpp + 31) / 32) * 4 * h;
    if ((int64_t)n < need)
        return ml_error("cannot decode '%s': truncated BMP (%zu bytes, the header describes %lld)",
                        name, n, (long long)need);
    return 0;
}

/* Name what the bytes are when they are not an image we read. */
static int unknown_format(const uint8_t *d, size_t n, const char *name) {
    const char *other = NULL;
    if (n >= 12 && memcmp(d, "RIFF", 4) == 0 && memcmp(d + 8, "WEBP", 4) == 0) other = "WebP";
    else if (n >= 4 && memcmp(d, "GIF8", 4) == 0) other = "GIF";
    else if (n >= 4 && (memcmp(d, "II*\0", 4) == 0 || memcmp(d, "MM\0*", 4) == 0)) other = "TIFF";
    if (other)
        return ml_error("cannot decode '%s': %s images are not supported (use JPEG, PNG or BMP)", name, other);
    size_t k = n < 16 ? n : 16;
    bool text = true;
    for (size_t i = 0; i < k; i++) text = text && (d[i] >= 32 || d[i] == '\n' || d[i] == '\r' || d[i] == '\t') && d[i] < 127;
    char shown[80];
    size_t o = 0;
    for (size_t i = 0; i < k && o + 4 < sizeof shown; i++) {
        if (text) shown[o++] = (d[i] == '\n' || d[i] == '\r' || d[i] == '\t') ? ' ' : (char)d[i];
        else o += (size_t)snprintf(shown + o, sizeof shown - o, "%s%02x", i ? " " : "", d[i]);
    }
    shown[o] = 0;
    if (text)
        return ml_error("cannot decode '%s': not a JPEG, PNG or BMP image (it looks like text: \"%s\")", name, shown);
    return ml_error("cannot decode '%s': not a JPEG, PNG or BMP image (it starts with bytes %s)", name, shown);
}

/* ---- loading ------------------------------------------------------------ */

/* -1 when the header declares more than max_pixels pixels.  Checked first,
 * before the whole-file checks: those read every chunk, and the point is to
 * spend nothing on an image that will be refused.  A header stb cannot read
 * is left to the format checks and the decoder. */
static int check_pixels(const uint8_t *d, size_t n, const char *name, int64_t max_pixels) {
    int x, y, comp;
    if (!stbi_info_from_memory(d, (int)n, &x, &y, &comp)) return 0;
    if ((int64_t)x * y <= max_pixels) return 0;
    return ml_error("cannot decode '%s': the image is %d x %d = %.1f megapixels, above the limit of %.1f "
                    "megapixels (raise max_pixels to allow it)", name, x, y, (double)x * y / 1e6,
                    (double)max_pixels / 1e6);
}

int ml_image_decode_max(const uint8_t *d, size_t n, const char *name, int64_t max_pixels,
                        uint8_t **pixels, int *h, int *w) {
    *pixels = NULL;
    if (!name) name = "<memory>";
    if (max_pixels <= 0) max_pixels = ML_IMAGE_DEFAULT_MAX_PIXELS;
    if (n == 0) return ml_error("cannot decode '%s': the file is empty", name);
    if (n > INT_MAX) return ml_error("cannot decode '%s': %zu bytes is too large (limit 2 GiB)", name, n);
    int orient = 1, rc;
    const char *fmt;
    bool png = n >= 8 && memcmp(d, PNG_SIG, 8) == 0;
    bool jpeg = !png && n >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF;
    bool bmp = !png && !jpeg && n >= 2 && d[0] == 'B' && d[1] == 'M';
    if (!png && !jpeg && !bmp) return unknown_format(d, n, name);
    if (check_pixels(d, n, name, max_pixels) < 0) return -1;
    if (png) { fmt = "PNG"; rc = png_check(d, n, name, &orient); }
    else if (jpeg) { fmt = "JPEG"; rc = jpeg_check(d, n, name, &orient); }
    else { fmt = "BMP"; rc = bmp_check(d, n, name); }
    if (rc < 0) return -1;

    int x, y, comp;
    uint8_t *p = stbi_load_from_memory(d, (int)n, &x, &y, &comp, 3);
    if (!p) {
        const char *why = stbi_failure_reason();
        if (why && strcmp(why, "outofmem") == 0)
            return ml_error("cannot decode '%s': out of memory decoding the %s image", name, fmt);
        return ml_error("cannot decode '%s': corrupt or unsupported %s image (stb_image: %s)",
                        name, fmt, why ? why : "unknown error");
    }
    if (orient != 1) {
        uint8_t *q = apply_orientation(p, y, x, orient, &y, &x);
        if (!q) {
            stbi_image_free(p);
            return ml_error("cannot decode '%s': out of memory applying the EXIF orientation", name);
        }
        p = q;
    }
    *pixels = p; *h = y; *w = x;
    return 0;
}

int ml_image_decode(const uint8_t *d, size_t n, const char *name, uint8_t **pixels, int *h, int *w) {
    return ml_image_decode_max(d, n, name, 0, pixels, h, w);
}

int ml_image_load_max(const char *path, int64_t max_pixels, uint8_t **pixels, int *h, int *w) {
    uint8_t *d;
    size_t n;
    *pixels = NULL;
    if (read_file(path, "cannot decode", &d, &n) < 0) return -1;
    int rc = ml_image_decode_max(d, n, path, max_pixels, pixels, h, w);
    free(d);
    return rc;
}

int ml_image_load(const char *path, uint8_t **pixels, int *h, int *w) {
    return ml_image_load_max(path, 0, pixels, h, w);
}

/* ---- saving ------------------------------------------------------------- */

/* Well-formed UTF-8: no overlong forms, surrogates or code points past U+10FFFF. */
static bool valid_utf8(const char *s) {
    const uint8_t *p = (const uint8_t *)s;
    while (*p) {
        uint32_t c = *p;
        int k = c < 0x80 ? 0 : (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : -1;
        if (k < 0) return false;
        uint32_t cp = k == 0 ? c : c & (0x3F >> k);
        for (int i = 1; i <= k; i++) {
            if ((p[i] & 0xC0) != 0x80) return false;
            cp = cp << 6 | (p[i] & 0x3F);
        }
        static const uint32_t min_cp[4] = {0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[k] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        p += k + 1;
    }
    return true;
}

static bool is_ascii(const char *s) {
    for (; *s; s++) if ((uint8_t)*s >= 0x80) return false;
    return true;
}

/* PNG keyword rules: 1-79 printable characters, no leading, trailing or
 * consecutive spaces.  We take the ASCII subset (keys come from code). */
static int check_key(const char *path, const char *k) {
    size_t n = k ? strlen(k) : 0;
    bool ok = n >= 1 && n <= 79 && k[0] != ' ' && k[n - 1] != ' ';
    for (size_t i = 0; ok && i < n; i++)
        ok = k[i] >= 32 && k[i] < 127 && !(k[i] == ' ' && k[i + 1] == ' ');
    if (!ok)
        return ml_error("cannot save '%s': metadata key '%s' is not a valid PNG keyword "
                        "(1-79 printable ASCII characters, no leading, trailing or double spaces)",
                        path, k ? k : "(null)");
    return 0;
}

static void png_put_chunk(bytes *b, const char *type, const uint8_t *data, size_t len) {
    uint8_t hdr[8], crc[4];
    put_be32(hdr, (uint32_t)len);
    memcpy(hdr + 4, type, 4);
    uint32_t c = ml_crc32(ml_crc32(0, type, 4), data, len);
    put_be32(crc, c);
    bytes_put(b, hdr, 8);
    bytes_put(b, data, len);
    bytes_put(b, crc, 4);
}

/* stb's PNG with our text chunks inserted right after IHDR, where readers
 * that stop at the first IDAT still see them. */
static int encode_png(bytes *out, const char *path, const uint8_t *hwc, int h, int w, int c,
                      const char **keys, const char **vals, int nkv) {
    int len;
    uint8_t *png = stbi_write_png_to_mem(hwc, w * c, w, h, c, &len);
    if (!png) return ml_error("cannot save '%s': out of memory encoding the PNG", path);
    if (len < 33 || memcmp(png + 12, "IHDR", 4) != 0) {
        free(png);
        return ml_error("cannot save '%s': the PNG encoder produced an unexpected layout", path);
    }
    bytes_put(out, png, 33);                     /* signature + IHDR */
    for (int i = 0; i < nkv; i++) {
        bytes chunk = {0};
        size_t kl = strlen(keys[i]), vl = strlen(vals[i]);
        bytes_put(&chunk, keys[i], kl + 1);      /* keyword + NUL separator */
        if (is_ascii(vals[i])) {
            bytes_put(&chunk, vals[i], vl);
            if (!chunk.failed) png_put_chunk(out, "tEXt", chunk.p, chunk.n);
        } else {
            /* compression flag 0, method 0, empty language tag, empty translated keyword */
            static const uint8_t itxt_mid[4] = {0, 0, 0, 0};
            bytes_put(&chunk, itxt_mid, 4);
            bytes_put(&chunk, vals[i], vl);
            if (!chunk.failed) png_put_chunk(out, "iTXt", chunk.p, chunk.n);
        }
        if (chunk.failed) out->failed = true;
        free(chunk.p);
    }
    bytes_put(out, png + 33, (size_t)len - 33);
    free(png);
    if (out->failed) return ml_error("cannot save '%s': out of memory building the PNG", path);
    return 0;
}

static void jpg_sink(void *ctx, void *data, int size) { bytes_put(ctx, data, (size_t)size); }

/* stb's JPEG with one COM segment of "key: value" lines after the JFIF
 * header (JPEG has no key/value text, a comment is what tools display). */
static int encode_jpeg(bytes *out, const char *path, const uint8_t *hwc, int h, int w, int c,
                       const char **keys, const char **vals, int nkv, int quality) {
    if (h > 65535 || w > 65535)
        return ml_error("cannot save '%s': %dx%d is larger than JPEG allows (65535 per side)", path, h, w);
    bytes jpg = {0};
    if (!stbi_write_jpg_to_func(jpg_sink, &jpg, w, h, c, hwc, quality) || jpg.failed) {
        free(jpg.p);
        return ml_error("cannot save '%s': out of memory encoding the JPEG", path);
    }
    size_t head = 2;                              /* SOI */
    if (jpg.n > 6 && jpg.p[2] == 0xFF && jpg.p[3] == 0xE0) head = 4 + ((size_t)jpg.p[4] << 8 | jpg.p[5]);
    bytes_put(out, jpg.p, head);
    if (nkv > 0) {
        bytes com = {0};
        for (int i = 0; i < nkv; i++) {
            if (i) bytes_put(&com, "\n", 1);
            bytes_put(&com, keys[i], strlen(keys[i]));
            bytes_put(&com, ": ", 2);
            bytes_put(&com, vals[i], strlen(vals[i]));
        }
        if (com.n > 65533) {
            free(com.p); free(jpg.p);
            return ml_error("cannot save '%s': metadata is %zu bytes, more than a JPEG comment holds (65533)",
                            path, com.n);
        }
        uint8_t hdr[4] = {0xFF, 0xFE, (uint8_t)((com.n + 2) >> 8), (uint8_t)(com.n + 2)};
        bytes_put(out, hdr, 4);
        bytes_put(out, com.p, com.n);
        if (com.failed) out->failed = true;
        free(com.p);
    }
    bytes_put(out, jpg.p + head, jpg.n - head);
    free(jpg.p);
    if (out->failed) return ml_error("cannot save '%s': out of memory building the JPEG", path);
    return 0;
}

int ml_image_save(const char *path, const uint8_t *hwc, int h, int w, int c,
                  const char **keys, const char **vals, int nkv, int jpeg_quality) {
    if (!path || !*path) return ml_error("cannot save '': empty file name");
    const char *base = strrchr(path, '/');
    const char *ext = strrchr(base ? base : path, '.');
    bool png = ext && strcasecmp(ext, ".png") == 0;
    bool jpeg = ext && (strcasecmp(ext, ".jpg") == 0 || strcasecmp(ext, ".jpeg") == 0);
    if (!png && !jpeg) {
        if (!ext) return ml_error("cannot save '%s': no file extension (use .png, .jpg or .jpeg)", path);
        return ml_error("cannot save '%s': unknown image extension '%s' (use .png, .jpg or .jpeg)", path, ext);
    }
    if (h <= 0 || w <= 0) return ml_error("cannot save '%s': empty image (%d x %d pixels)", path, h, w);
    if (c < 1 || c > 4) return ml_error("cannot save '%s': %d channels (expected 1, 2, 3 or 4)", path, c);
    if ((int64_t)h * w * c > INT_MAX / 2)
        return ml_error("cannot save '%s': %d x %d x %d is too large to encode", path, h, w, c);
    if (!hwc) return ml_error("cannot save '%s': no pixel data", path);
    if (jpeg_quality == 0) jpeg_quality = DEFAULT_JPEG_QUALITY;
    if (jpeg_quality < 1 || jpeg_quality > 100)
        return ml_error("cannot save '%s': JPEG quality %d is out of range 1..100", path, jpeg_quality);
    if (nkv < 0 || (nkv > 0 && (!keys || !vals))) return ml_error("cannot save '%s': bad metadata arguments", path);
    for (int i = 0; i < nkv; i++) {
        if (check_key(path, keys[i]) < 0) return -1;
        if (!vals[i]) return ml_error("cannot save '%s': metadata value of '%s' is missing", path, keys[i]);
        if (!valid_utf8(vals[i]))
            return ml_error("cannot save '%s': metadata value of '%s' is not valid UTF-8", path, keys[i]);
    }
    bytes out = {0};
    int rc = png ? encode_png(&out, path, hwc, h, w, c, keys, vals, nkv)
                 : encode_jpeg(&out, path, hwc, h, w, c, keys, vals, nkv, jpeg_quality);
    if (rc == 0) rc = ml_write_file_atomic(path, out.p, out.n);
    free(out.p);
    return rc;
}

/* ---- PNG text read-back ------------------------------------------------- */

/* Latin-1 bytes -> malloc'd UTF-8 string. */
static char *latin1_to_utf8(const uint8_t *s, size_t n) {
    char *o = malloc(2 * n + 1), *q = o;
    if (!o) return NULL;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < 0x80) *q++ = (char)s[i];
        else { *q++ = (char)(0xC0 | s[i] >> 6); *q++ = (char)(0x80 | (s[i] & 0x3F)); }
    }
    *q = 0;
    return o;
}

static char *dup_bytes(const uint8_t *s, size_t n) {
    char *o = malloc(n + 1);
    if (!o) return NULL;
    memcpy(o, s, n);
    o[n] = 0;
    return o;
}

/* zlib stream -> malloc'd bytes (stb_image carries an inflater). */
static uint8_t *inflate_bytes(const uint8_t *s, size_t n, size_t *outn) {
    int len;
    char *o = stbi_zlib_decode_malloc((const char *)s, (int)n, &len);
    if (!o) return NULL;
    *outn = (size_t)len;
    return (uint8_t *)o;
}

/* Decode one text chunk into key and value; 0, or -1 with error. */
static int text_chunk(const png_chunk *ch, const char *path, char **key, char **value) {
    const uint8_t *d = ch->data, *end = d + ch->len;
    const uint8_t *nul = memchr(d, 0, ch->len);
    if (!nul || nul == d)
        return ml_error("cannot read text of '%s': corrupt %s chunk (no keyword)", path, ch->type);
    const uint8_t *t = nul + 1;
    uint8_t *raw = NULL;
    size_t rawn = 0;
    *key = latin1_to_utf8(d, (size_t)(nul - d));
    *value = NULL;
    if (strcmp(ch->type, "tEXt") == 0) {
        *value = latin1_to_utf8(t, (size_t)(end - t));
    } else if (strcmp(ch->type, "zTXt") == 0) {
        if (t >= end || !(raw = inflate_bytes(t + 1, (size_t)(end - t - 1), &rawn))) goto corrupt;
        *value = latin1_to_utf8(raw, rawn);
    } else {                                      /* iTXt */
        if (end - t < 2) goto corrupt;
        int compressed = t[0];
        const uint8_t *lang_end = memchr(t + 2, 0, (size_t)(end - t - 2));
        if (!lang_end) goto corrupt;
        const uint8_t *tk_end = memchr(lang_end + 1, 0, (size_t)(end - lang_end - 1));
        if (!tk_end) goto corrupt;
        const uint8_t *txt = tk_end + 1;
        if (compressed) {
            if (!(raw = inflate_bytes(txt, (size_t)(end - txt), &rawn))) goto corrupt;
            *value = dup_bytes(raw, rawn);
        } else {
            *value = dup_bytes(txt, (size_t)(end - txt));
        }
    }
    free(raw);
    if (!*key || !*value) {
        free(*key); free(*value);
        return ml_error("cannot read text of '%s': out of memory", path);
    }
    return 0;
corrupt:
    free(raw); free(*key);
    *key = NULL;
    return ml_error("cannot read text of '%s': corrupt %s chunk", path, ch->type);
}

int ml_image_png_text(const char *path, ml_image_text **out) {
    *out = NULL;
    uint8_t *d;
    size_t n;
    if (read_file(path, "cannot read text of", &d, &n) < 0) return -1;
    if (n < 8 || memcmp(d, PNG_SIG, 8) != 0) {
        free(d);
        return ml_error("cannot read text of '%s': not a PNG file", path);
    }
    ml_image_text *list = NULL;
    int count = 0, cap = 0, r;
    size_t pos = 8;
    png_chunk ch;
    while ((r = png_next(d, n, &pos, &ch, "cannot read text of", path)) == 1) {
        if (strcmp(ch.type, "tEXt") && strcmp(ch.type, "zTXt") && strcmp(ch.type, "iTXt")) continue;
        if (count == cap) {
            cap = cap ? cap * 2 : 8;
            ml_image_text *nl = realloc(list, (size_t)cap * sizeof *nl);
            if (!nl) { r = ml_error("cannot read text of '%s': out of memory", path); break; }
            list = nl;
        }
        if ((r = text_chunk(&ch, path, &list[count].key, &list[count].value)) < 0) break;
        count++;
    }
    free(d);
    if (r < 0) { ml_image_text_free(list, count); return -1; }
    *out = list;
    return count;
}

void ml_image_text_free(ml_image_text *t, int n) {
    if (!t) return;
    for (int i = 0; i < n; i++) { free(t[i].key); free(t[i].value); }
    free(t);
}

/* ---- resampling --------------------------------------------------------- */

int ml_resize_mode_parse(const char *s) {
    static const char *names[] = {"nearest", "bilinear", "bicubic", "area"};
    for (int i = 0; i < 4; i++) if (s && strcmp(s, names[i]) == 0) return i;
    return ml_error("unknown resize mode '%s' (expected nearest, bilinear, bicubic or area)", s ? s : "(null)");
}

static double tri_filter(double x) {
    x = fabs(x);
    return x < 1.0 ? 1.0 - x : 0.0;
}

/* Keys' cubic convolution with a = -0.5, PIL's BICUBIC. */
static double cubic_filter(double x) {
    const double a = -0.5;
    x = fabs(x);
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
    return 0.0;
}

/* For one axis: output i reads inputs start[i] .. start[i]+count[i]-1 with
 * weights w[i*taps ...] (summing to 1). */
typedef struct { int taps; int *start, *count; double *w; } axis_plan;

static void plan_free(axis_plan *a) { free(a->start); free(a->count); free(a->w); }

static int plan_make(axis_plan *a, int in, int out, ml_resize_mode mode) {
    double scale = (double)in / out;
    double support = 0.0;
    if (mode == ML_RESIZE_BILINEAR || mode == ML_RESIZE_BICUBIC) {
        /* Reducing widens the filter by the scale so every input pixel
         * contributes (antialiasing); enlarging keeps the plain kernel. */
        support = (mode == ML_RESIZE_BILINEAR ? 1.0 : 2.0) * (scale > 1.0 ? scale : 1.0);
        a->taps = (int)ceil(support) * 2 + 1;
    } else if (mode == ML_RESIZE_AREA) {
        a->taps = (in + out - 1) / out + 1;
    } else {
        a->taps = 1;
    }
    a->start = malloc(sizeof(int) * (size_t)out);
    a->count = malloc(sizeof(int) * (size_t)out);
    a->w = calloc((size_t)out * a->taps, sizeof(double));
    if (!a->start || !a->count || !a->w) { plan_free(a); return ml_error("image resize: out of memory"); }
    for (int i = 0; i < out; i++) {
        double *w = a->w + (size_t)i * a->taps;
        if (mode == ML_RESIZE_NEAREST) {
            /* torch computes the scale and the product in float */
            int s = (int)floorf((float)i * ((float)in / (float)out));
            a->start[i] = s < in - 1 ? s : in - 1;
            a->count[i] = 1;
            w[0] = 1.0;
        } else if (mode == ML_RESIZE_AREA) {
            int s = (int)((int64_t)i * in / out);
            int e = (int)(((int64_t)(i + 1) * in + out - 1) / out);
            a->start[i] = s;
            a->count[i] = e - s;
            for (int k = 0; k < e - s; k++) w[k] = 1.0 / (e - s);
        } else {
            double ss = 1.0 / (scale > 1.0 ? scale : 1.0);
            double center = (i + 0.5) * scale;
            int lo = (int)(center - support + 0.5), hi = (int)(center + support + 0.5);
            if (lo < 0) lo = 0;
            if (hi > in) hi = in;
            double sum = 0.0;
            for (int k = 0; k < hi - lo; k++) {
                double x = (k + lo - center + 0.5) * ss;
                w[k] = mode == ML_RESIZE_BILINEAR ? tri_filter(x) : cubic_filter(x);
                sum += w[k];
            }
            /* Taps cut off by the border are dropped and the rest renormalised. */
            if (sum != 0.0) for (int k = 0; k < hi - lo; k++) w[k] /= sum;
            a->start[i] = lo;
            a->count[i] = hi - lo;
        }
    }
    return 0;
}

static int check_sizes(int oh, int ow, int h, int w, int c, const void *dst, const void *src) {
    if (h <= 0 || w <= 0 || c <= 0)
        return ml_error("image resize: empty input (%d x %d x %d)", h, w, c);
    if (oh <= 0 || ow <= 0)
        return ml_error("image resize: output size %d x %d must be positive", oh, ow);
    if (!dst || !src) return ml_error("image resize: missing buffer");
    return 0;
}

int ml_image_resize_f32(float *dst, int oh, int ow, const float *src, int h, int w, int c,
                        ml_resize_mode mode) {
    if (check_sizes(oh, ow, h, w, c, dst, src) < 0) return -1;
    if ((unsigned)mode > ML_RESIZE_AREA) return ml_error("image resize: bad mode %d", (int)mode);
    axis_plan px = {0}, py = {0};
    float *tmp = NULL;
    double *acc = NULL;
    int rc = -1;
    if (plan_make(&px, w, ow, mode) < 0) return -1;
    if (plan_make(&py, h, oh, mode) < 0) { plan_free(&px); return -1; }
    /* Horizontal pass first (into [H, OW, C]), then vertical, as PIL does. */
    const float *mid = src;
    if (ow != w) {
        tmp = malloc(sizeof(float) * (size_t)h * ow * c);
        if (!tmp) { ml_error("image resize: out of memory"); goto done; }
        for (int y = 0; y < h; y++) {
            const float *row = src + (size_t)y * w * c;
            float *orow = tmp + (size_t)y * ow * c;
            for (int x = 0; x < ow; x++) {
                const double *k = px.w + (size_t)x * px.taps;
                const float *in = row + (size_t)px.start[x] * c;
                for (int ch = 0; ch < c; ch++) {
                    double s = 0.0;
                    for (int t = 0; t < px.count[x]; t++) s += in[(size_t)t * c + ch] * k[t];
                    orow[(size_t)x * c + ch] = (float)s;
                }
            }
        }
        mid = tmp;
    }
    size_t rowlen = (size_t)ow * c;
    if (oh != h) {
        acc = malloc(sizeof(double) * rowlen);
        if (!acc) { ml_error("image resize: out of memory"); goto done; }
        for (int y = 0; y < oh; y++) {
            const double *k = py.w + (size_t)y * py.taps;
            memset(acc, 0, sizeof(double) * rowlen);
            for (int t = 0; t < py.count[y]; t++) {
                const float *in = mid + (size_t)(py.start[y] + t) * rowlen;
                for (size_t j = 0; j < rowlen; j++) acc[j] += in[j] * k[t];
            }
            float *orow = dst + (size_t)y * rowlen;
            for (size_t j = 0; j < rowlen; j++) orow[j] = (float)acc[j];
        }
    } else {
        memmove(dst, mid, sizeof(float) * rowlen * h);
    }
    rc = 0;
done:
    free(tmp); free(acc);
    plan_free(&px); plan_free(&py);
    return rc;
}

/* PIL's 8-bit arithmetic: weights in fixed point with 22 fraction bits
 * (the most that keeps 255 * sum|w| inside an int32), half added for
 * rounding, result shifted back and clamped. */
#define FIX_BITS 22

static void plan_to_fixed(const axis_plan *a, int out, int32_t *fw) {
    for (size_t i = 0; i < (size_t)out * a->taps; i++) {
        double v = a->w[i] * (1 << FIX_BITS);
        fw[i] = (int32_t)(v < 0 ? v - 0.5 : v + 0.5);
    }
}

static inline uint8_t clamp_fixed(int32_t s) {
    s >>= FIX_BITS;
    return (uint8_t)(s < 0 ? 0 : s > 255 ? 255 : s);
}

int ml_image_resize_u8(uint8_t *dst, int oh, int ow, const uint8_t *src, int h, int w, int c,
                       ml_resize_mode mode) {
    if (check_sizes(oh, ow, h, w, c, dst, src) < 0) return -1;
    if ((unsigned)mode > ML_RESIZE_AREA) return ml_error("image resize: bad mode %d", (int)mode);
    axis_plan px = {0}, py = {0};
    int32_t *fx = NULL, *fy = NULL, *acc = NULL;
    uint8_t *tmp = NULL;
    int rc = -1;
    if (plan_make(&px, w, ow, mode) < 0) return -1;
    if (plan_make(&py, h, oh, mode) < 0) { plan_free(&px); return -1; }
    fx = malloc(sizeof(int32_t) * (size_t)ow * px.taps);
    fy = malloc(sizeof(int32_t) * (size_t)oh * py.taps);
    if (!fx || !fy) { ml_error("image resize: out of memory"); goto done; }
    plan_to_fixed(&px, ow, fx);
    plan_to_fixed(&py, oh, fy);
    const uint8_t *mid = src;
    if (ow != w) {
        tmp = malloc((size_t)h * ow * c);
        if (!tmp) { ml_error("image resize: out of memory"); goto done; }
        for (int y = 0; y < h; y++) {
            const uint8_t *row = src + (size_t)y * w * c;
            uint8_t *orow = tmp + (size_t)y * ow * c;
            for (int x = 0; x < ow; x++) {
                const int32_t *k = fx + (size_t)x * px.taps;
                const uint8_t *in = row + (size_t)px.start[x] * c;
                for (int ch = 0; ch < c; ch++) {
                    int32_t s = 1 << (FIX_BITS - 1);
                    for (int t = 0; t < px.count[x]; t++) s += in[(size_t)t * c + ch] * k[t];
                    orow[(size_t)x * c + ch] = clamp_fixed(s);
                }
            }
        }
        mid = tmp;
    }
    size_t rowlen = (size_t)ow * c;
    if (oh != h) {
        acc = malloc(sizeof(int32_t) * rowlen);
        if (!acc) { ml_error("image resize: out of memory"); goto done; }
        for (int y = 0; y < oh; y++) {
            const int32_t *k = fy + (size_t)y * py.taps;
            for (size_t j = 0; j < rowlen; j++) acc[j] = 1 << (FIX_BITS - 1);
            for (int t = 0; t < py.count[y]; t++) {
                const uint8_t *in = mid + (size_t)(py.start[y] + t) * rowlen;
                for (size_t j = 0; j < rowlen; j++) acc[j] += in[j] * k[t];
            }
            uint8_t *orow = dst + (size_t)y * rowlen;
            for (size_t j = 0; j < rowlen; j++) orow[j] = clamp_fixed(acc[j]);
        }
    } else {
        memmove(dst, mid, rowlen * h);
    }
    rc = 0;
done:
    free(fx); free(fy); free(tmp); free(acc);
    plan_free(&px); plan_free(&py);
    return rc;
}
