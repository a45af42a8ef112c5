/* image.h — image files <-> raw uint8 pixel buffers, and resizing.
 *
 * Pixels are row-major HWC (height, width, channels), the layout stb decodes
 * and the NHWC models consume.  Letters used throughout: H, W = input size,
 * OH, OW = output size, C = channels.
 *
 * Loading decodes JPEG, PNG and BMP (by content, not by extension) to 8-bit
 * RGB the way PIL's `Image.open(p)` + `exif_transpose` + `convert("RGB")`
 * does: grayscale is replicated, alpha is dropped (not composited), 16-bit
 * PNG keeps its high byte, and the EXIF orientation tag of a JPEG (or a PNG
 * eXIf chunk) is applied so phone photos come out upright.  Files are checked
 * before decoding (PNG chunk CRCs, JPEG end-of-image marker, BMP pixel data
 * size) because stb silently fills a truncated file with grey.
 *
 * Saving picks the format from the extension (.png, .jpg, .jpeg; any case)
 * and writes atomically: a temporary file in the same directory is renamed
 * over the target, so a failed save never leaves a partial file and never
 * damages an existing one.  Key/value metadata goes into PNG text chunks
 * (tEXt for ASCII values, uncompressed UTF-8 iTXt otherwise — what PIL's
 * PngInfo.add_text writes for text it cannot encode as Latin-1) or, for
 * JPEG, into one comment (COM) segment of "key: value" lines.
 *
 * All functions return 0 (or a count) on success and -1 with ml_last_error()
 * naming the file on failure; they never abort. */
#ifndef ML_IMAGE_H
#define ML_IMAGE_H

#include <stddef.h>
#include <stdint.h>

/* The most pixels (width x height) decoded unless the caller raises it:
 * a small file can declare a huge image (a 249 KB PNG of 16000 x 16000
 * decodes to 768 MB of RGB, and more as float), so the size the header
 * declares is checked before any pixel is decoded. */
#define ML_IMAGE_DEFAULT_MAX_PIXELS (64ll * 1000 * 1000)

/* Decode the image file at `path` to RGB: *pixels gets a malloc'd
 * [H, W, 3] buffer (release with free()).  Only regular files are read (a
 * FIFO or device is refused, not waited on).  Images larger than
 * ML_IMAGE_DEFAULT_MAX_PIXELS are refused before decoding. */
int ml_image_load(const char *path, uint8_t **pixels, int *h, int *w);
/* Same with a pixel limit: max_pixels <= 0 means the default. */
int ml_image_load_max(const char *path, int64_t max_pixels, uint8_t **pixels, int *h, int *w);
/* Same from bytes in memory; `name` is used only in error messages. */
int ml_image_decode(const uint8_t *data, size_t n, const char *name,
                    uint8_t **pixels, int *h, int *w);
int ml_image_decode_max(const uint8_t *data, size_t n, const char *name, int64_t max_pixels,
                        uint8_t **pixels, int *h, int *w);

/* Write `hwc` ([H, W, C], C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA; JPEG
 * ignores alpha) to `path`.  keys/vals: nkv UTF-8 metadata pairs (keys are
 * PNG keywords: 1-79 printable ASCII characters, no leading, trailing or
 * double spaces).  jpeg_quality: 1..100, or 0 for the default 95; ignored
 * for PNG. */
int ml_image_save(const char *path, const uint8_t *hwc, int h, int w, int c,
                  const char **keys, const char **vals, int nkv, int jpeg_quality);

/* One metadata entry read back from a file (UTF-8, NUL-terminated). */
typedef struct { char *key; char *value; } ml_image_text;

/* Read every tEXt, zTXt and iTXt chunk of the PNG at `path`, in file order.
 * *out gets a malloc'd array (NULL when there are none); returns the count
 * or -1.  Latin-1 tEXt/zTXt text is converted to UTF-8. */
int ml_image_png_text(const char *path, ml_image_text **out);
void ml_image_text_free(ml_image_text *t, int n);

/* Resampling modes.  BILINEAR and BICUBIC match PIL's Image.resize with
 * BILINEAR / BICUBIC (cubic a = -0.5), which torch's F.interpolate(...,
 * antialias=True) also matches: the filter widens by the scale factor when
 * reducing, so a downscale averages every input pixel instead of skipping
 * some.  NEAREST and AREA follow torch's F.interpolate modes of the same
 * names: source index floor(i * in/out), and adaptive average pooling bins
 * [floor(i*in/out), ceil((i+1)*in/out)). */
typedef enum {
    ML_RESIZE_NEAREST = 0, ML_RESIZE_BILINEAR, ML_RESIZE_BICUBIC, ML_RESIZE_AREA
} ml_resize_mode;

/* "nearest", "bilinear", "bicubic", "area"; -1 with error if unknown. */
int ml_resize_mode_parse(const char *s);

/* dst [OH, OW, C] <- src [H, W, C] resampled.  Float values are not clamped
 * (bicubic may overshoot), as in torch and PIL's float mode. */
int ml_image_resize_f32(float *dst, int oh, int ow, const float *src, int h, int w, int c,
                        ml_resize_mode mode);
/* The 8-bit twin, bit-exact with PIL's 8-bit resampling (fixed-point
 * weights, each pass rounded and clamped to 0..255, horizontal pass first). */
int ml_image_resize_u8(uint8_t *dst, int oh, int ow, const uint8_t *src, int h, int w, int c,
                       ml_resize_mode mode);

/* CRC-32 (ISO-HDLC, as in PNG and zlib) of n bytes, continuing from `crc`
 * (start with 0). */
uint32_t ml_crc32(uint32_t crc, const void *data, size_t n);

#endif
