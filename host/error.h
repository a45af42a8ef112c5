/* error.h — the one way host code reports failure.
 *
 * host/ never aborts: a failing function records a message with ml_error()
 * and returns NULL / -1.  bindings/ reads ml_last_error() and raises it as a
 * Lua error, so the REPL survives every bad input. */
#ifndef ML_ERROR_H
#define ML_ERROR_H

#include <stddef.h>

/* Record a printf-style message; always returns -1 so callers can write
 * `return ml_error("...")`. */
int ml_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Same, returning NULL for pointer-returning functions. */
void *ml_error_null(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The last message recorded on this thread ("" if none). */
const char *ml_last_error(void);
void ml_clear_error(void);

#endif
