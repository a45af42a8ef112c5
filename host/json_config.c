/* json_config.c — jansson with file-and-position errors, float formatting
 * (see json_config.h). */
#include "json_config.h"
#include "error.h"
#include "fs.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

json_t *ml_json_load_file(const char *path) {
    if (ml_require_regular_file(path, "cannot read JSON") < 0) return NULL;
    json_error_t err;
    json_t *j = json_load_file(path, JSON_DECODE_ANY, &err);
    if (!j) {
        /* jansson reports a missing file with line -1. */
        if (err.line < 0) return ml_error_null("%s: %s", path, err.text);
        return ml_error_null("%s:%d:%d: %s", path, err.line, err.column, err.text);
    }
    return j;
}

json_t *ml_json_load_buffer(const char *buf, size_t len, const char *what) {
    json_error_t err;
    json_t *j = json_loadb(buf, len, JSON_DECODE_ANY, &err);
    if (!j) return ml_error_null("%s:%d:%d: %s", what, err.line, err.column, err.text);
    return j;
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
