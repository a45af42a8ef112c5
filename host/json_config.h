/* json_config.h — reading and writing the JSON files of a diffusers folder
 * (config.json, model_index.json, scheduler_config.json, index files).
 *
 * A thin layer over jansson whose errors name the file and the line/column,
 * plus the number formatting the writers share. */
#ifndef ML_JSON_CONFIG_H
#define ML_JSON_CONFIG_H

#include <stddef.h>
#include <jansson.h>

/* Python's non-standard non-finite numbers.  json.dump writes NaN, Infinity
 * and -Infinity (allow_nan=True is its default), and diffusers configs hold
 * them ("lambda_min_clipped": -Infinity).  jansson refuses these tokens and
 * cannot hold a non-finite real, so ml_json_parse rewrites each bare token
 * (outside strings, followed by a delimiter) into the string "<m>NaN",
 * "<m>Infinity" or "<m>-Infinity" before jansson reads the text, where m is
 * a control character (1..31) that no string of the text holds.  A JSON
 * string can hold a control character only through an escape (\u0001, \n,
 * ...), which the scan sees, so in the tree a string holding m is one of
 * these three and nothing else; ml_json_nonfinite tells them apart.  Text
 * without such tokens is given to jansson unchanged.
 *
 * Parse `len` bytes with jansson's `flags`.  *marker gets m, or 0 when the
 * text had no such token.  On error: NULL and "<what>:line:column: ..."
 * (columns of the text as given, not of the rewritten one).  *first_line /
 * *first_column, when not NULL, get the place of the first such token. */
json_t *ml_json_parse(const char *buf, size_t len, size_t flags, const char *what, int *marker, int *first_line,
                      int *first_column);
/* Read a regular file whole and ml_json_parse it (errors name the path). */
json_t *ml_json_parse_file(const char *path, size_t flags, int *marker, int *first_line, int *first_column);
/* If the string s (n bytes) is a rewritten token of `marker`, store its value
 * (NaN, +inf, -inf) in *out and return 1; else 0. */
int ml_json_nonfinite(const char *s, size_t n, int marker, double *out);

/* Parse a file.  Any JSON value is accepted at the top level.  On error:
 * NULL and "path:line:column: what jansson saw".  These are the readers of
 * the C code (tokenizer files, safetensors indexes), which build on jansson
 * trees: NaN/Infinity there is refused with its place, since a jansson tree
 * cannot hold it.  Lua's json_load/json_decode read them as numbers. */
json_t *ml_json_load_file(const char *path);
/* Parse a buffer; `what` names it in errors ("json_decode", a file name). */
json_t *ml_json_load_buffer(const char *buf, size_t len, const char *what);

/* Shortest text that reads back as exactly v ("0.1", "1e-05"), always
 * looking like a float ("1.0", not "1") so Python keeps it a float.  NaN and
 * infinities have no JSON spelling: returns -1 with an error.  buf needs 32
 * bytes. */
int ml_json_format_double(double v, char *buf, size_t n);

#endif
