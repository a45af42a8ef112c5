/* json_config.c — jansson with file-and-position errors, float formatting
 * (see json_config.h). */
#include "json_config.h"
#include "error.h"
#include "fs.h"
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- Python's NaN / Infinity / -Infinity (see json_config.h) ------------- */

static const struct { const char *word; size_t n; } k_nonfinite[] = {
    {"NaN", 3}, {"Infinity", 8}, {"-Infinity", 9},
};
/* Each token becomes "\u00XX<word>": two quotes and a six-byte escape more. */
enum { REWRITE_GROWTH = 8 };

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* A byte that may follow a token: what JSON allows after a value. */
static int is_delim(char c) {
    return c == ',' || c == ']' || c == '}' || c == ':' || c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Which non-finite token (index into k_nonfinite) starts at buf + i, or -1.
 * Outside strings, valid JSON holds no 'N' or 'I' at all (only true, false,
 * null and numbers), so no valid text is ever changed by a rewrite. */
static int token_at(const char *buf, size_t len, size_t i) {
    for (int k = 0; k < 3; k++) {
        size_t n = k_nonfinite[k].n;
        if (len - i >= n && memcmp(buf + i, k_nonfinite[k].word, n) == 0 && (i + n == len || is_delim(buf[i + n])))
            return k;
    }
    return -1;
}

typedef struct { int line; size_t new_end; } rewrite;

json_t *ml_json_parse(const char *buf, size_t len, size_t flags, const char *what, int *marker, int *first_line,
                      int *first_column) {
    *marker = 0;
    /* Pass 1: the control characters strings hold (through escapes; a raw
     * one is invalid JSON and jansson refuses it, counted all the same) and
     * the tokens outside strings. */
    bool used[32] = {false};
    size_t ntok = 0;
    int line = 1, fl = 0, fc = 0;
    size_t line_start = 0;
    bool in_str = false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)buf[i];
        if (c == '\n') { line++; line_start = i + 1; }
        if (in_str) {
            if (c == '"') in_str = false;
            else if (c < 0x20) used[c] = true;
            else if (c == '\\' && i + 1 < len) {
                char e = buf[++i];
                if (e == 'b') used['\b'] = true;
                else if (e == 'f') used['\f'] = true;
                else if (e == 'n') used['\n'] = true;
                else if (e == 'r') used['\r'] = true;
                else if (e == 't') used['\t'] = true;
                else if (e == 'u' && len - i > 4) {
                    int v = 0;
                    for (int d = 1; d <= 4 && v >= 0; d++) {
                        int h = hexval(buf[i + d]);
                        v = h < 0 ? -1 : v * 16 + h;
                    }
                    if (v >= 0 && v < 0x20) used[v] = true;
                }
            }
        } else if (c == '"') {
            in_str = true;
        } else if (c == 'N' || c == 'I' || c == '-') {
            int k = token_at(buf, len, i);
            if (k >= 0) {
                if (ntok++ == 0) {
                    /* columns count characters, as jansson's do: not UTF-8 continuation bytes */
                    fl = line;
                    fc = 1;
                    for (size_t q = line_start; q < i; q++) fc += ((unsigned char)buf[q] & 0xC0) != 0x80;
                }
                i += k_nonfinite[k].n - 1;
            }
        }
    }
    if (first_line) *first_line = fl;
    if (first_column) *first_column = fc;
    json_error_t err;
    if (ntok == 0) {
        json_t *j = json_loadb(buf, len, flags, &err);
        if (!j) return ml_error_null("%s:%d:%d: %s", what, err.line, err.column, err.text);
        return j;
    }
    int m = 0;
    for (int c = 1; c < 32 && !m; c++)
        if (!used[c]) m = c;
    if (!m)
        return ml_error_null("%s:%d:%d: cannot read %s here: the strings of this text use every control "
                             "character, leaving none to stand for it", what, fl, fc,
                             "NaN/Infinity");
    /* Pass 2: the text with each token written as a marked string. */
    size_t out_len;
    if (__builtin_mul_overflow(ntok, (size_t)REWRITE_GROWTH, &out_len) ||
        __builtin_add_overflow(out_len, len, &out_len))
        return ml_error_null("%s: too large", what);
    char *out = malloc(out_len + 1);   /* + 1: sprintf's terminator after a last token */
    rewrite *rw = malloc(ntok * sizeof *rw);
    if (!out || !rw) { free(out); free(rw); return ml_error_null("%s: out of memory", what); }
    size_t o = 0, r = 0;
    line = 1;
    in_str = false;
    for (size_t i = 0; i < len; i++) {
        char c = buf[i];
        if (c == '\n') line++;
        if (in_str) {
            if (c == '"') in_str = false;
            else if (c == '\\' && i + 1 < len) { out[o++] = c; c = buf[++i]; }
        } else if (c == '"') {
            in_str = true;
        } else if (c == 'N' || c == 'I' || c == '-') {
            int k = token_at(buf, len, i);
            if (k >= 0) {
                o += (size_t)sprintf(out + o, "\"\\u%04x%s\"", m, k_nonfinite[k].word);
                rw[r++] = (rewrite){line, o};
                i += k_nonfinite[k].n - 1;
                continue;
            }
        }
        out[o++] = c;
    }
    json_t *j = json_loadb(out, o, flags, &err);
    if (!j) {
        /* Back to the columns of the text as given: each token before the
         * error on its line made the line 8 bytes longer. */
        int col = err.column;
        for (size_t q = 0; q < r; q++)
            if (rw[q].line == err.line && rw[q].new_end <= (size_t)err.position) col -= REWRITE_GROWTH;
        ml_error("%s:%d:%d: %s", what, err.line, col, err.text);
    } else {
        *marker = m;
    }
    free(out);
    free(rw);
    return j;
}

int ml_json_nonfinite(const char *s, size_t n, int marker, double *out) {
    if (!marker || n < 1 || (unsigned char)s[0] != marker) return 0;
    for (int k = 0; k < 3; k++) {
        if (n - 1 == k_nonfinite[k].n && memcmp(s + 1, k_nonfinite[k].word, n - 1) == 0) {
            *out = k == 0 ? NAN : k == 1 ? INFINITY : -INFINITY;
            return 1;
        }
    }
    return 0;
}

json_t *ml_json_parse_file(const char *path, size_t flags, int *marker, int *first_line, int *first_column) {
    *marker = 0;
    /* before fopen: opening a FIFO would wait for a writer forever */
    if (ml_require_regular_file(path, "cannot read JSON") < 0) return NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return ml_error_null("cannot read JSON '%s': %s", path, strerror(errno));
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 1 << 16;
            char *nb = ncap > cap ? realloc(buf, ncap) : NULL;
            if (!nb) { free(buf); fclose(f); return ml_error_null("cannot read JSON '%s': out of memory", path); }
            buf = nb;
            cap = ncap;
        }
        size_t k = fread(buf + n, 1, cap - n, f);
        n += k;
        if (k == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) { free(buf); return ml_error_null("cannot read JSON '%s': read error", path); }
    json_t *j = ml_json_parse(buf, n, flags, path, marker, first_line, first_column);
    free(buf);
    return j;
}

/* The C readers: a jansson tree has no place for a non-finite number. */
static json_t *strict(json_t *j, int marker, int line, int col, const char *what) {
    if (j && marker) {
        json_decref(j);
        return ml_error_null("%s:%d:%d: NaN/Infinity (Python's non-finite numbers) cannot be read here: "
                             "this file is read into C structures, which have no place for them", what, line,
                             col);
    }
    return j;
}

json_t *ml_json_load_file(const char *path) {
    int marker, line, col;
    json_t *j = ml_json_parse_file(path, JSON_DECODE_ANY, &marker, &line, &col);
    return strict(j, marker, line, col, path);
}

json_t *ml_json_load_buffer(const char *buf, size_t len, const char *what) {
    int marker, line, col;
    json_t *j = ml_json_parse(buf, len, JSON_DECODE_ANY, what, &marker, &line, &col);
    return strict(j, marker, line, col, what);
}

int ml_json_format_double(double v, char *buf, size_t n) {
    if (!isfinite(v)) return ml_error("JSON has no representation for %g", v);
    /* Shortest of %.15g..%.17g that round-trips: 17 digits always do. */
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, n, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) break;
    }
    if (!strpbrk(buf, ".eE")) {
        size_t len = strlen(buf);
        if (len + 3 > n) return ml_error("number buffer too small");
        memcpy(buf + len, ".0", 3);
    }
    return 0;
}
