/* error.c — thread-local last-error message (see error.h). */
#include "error.h"
#include <stdarg.h>
#include <stdio.h>

static _Thread_local char g_msg[2048];

int ml_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_msg, sizeof g_msg, fmt, ap);
    va_end(ap);
    return -1;
}

void *ml_error_null(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_msg, sizeof g_msg, fmt, ap);
    va_end(ap);
    return NULL;
}

const char *ml_last_error(void) { return g_msg; }
void ml_clear_error(void) { g_msg[0] = 0; }
