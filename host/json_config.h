/* json_config.h — reading and writing the JSON files of a diffusers folder
 * (config.json, model_index.json, scheduler_config.json, index files).
 *
 * A thin layer over jansson whose errors name the file and the line/column,
 * plus the number formatting the writers share. */
#ifndef ML_JSON_CONFIG_H
#define ML_JSON_CONFIG_H

#include <stddef.h>
#include <jansson.h>

/* Parse a file.  Any JSON value is accepted at the top level.  On error:
 * NULL and "path:line:column: what jansson saw". */
json_t *ml_json_load_file(const char *path);
/* Parse a buffer; `what` names it in errors ("json_decode", a file name). */
json_t *ml_json_load_buffer(const char *buf, size_t len, const char *what);

/* Shortest text that reads back as exactly v ("0.1", "1e-05"), always
 * looking like a float ("1.0", not "1") so Python keeps it a float.  NaN and
 * infinities have no JSON spelling: returns -1 with an error.  buf needs 32
 * bytes. */
int ml_json_format_double(double v, char *buf, size_t n);

#endif
