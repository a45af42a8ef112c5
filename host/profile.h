/* profile.h — per-kernel time, for finding where a step spends it.
 *
 * While profiling is on, every kernel launched through ML_RUN / CUDA_CALL
 * (host/dispatch.h) and every device copy is timed under its kernel's name:
 * CPU kernels by the wall clock, CUDA kernels by events recorded on the
 * device's stream (so GPU time, not launch time).  Off, the cost is one
 * branch per kernel call. */
#ifndef ML_PROFILE_H
#define ML_PROFILE_H

#include <stdbool.h>

extern bool ml_profile_on;

typedef struct {
    const char *name;     /* kernel name (static string) */
    const char *scope;    /* where it was called from (by-scope reports), or NULL */
    double ms;            /* total time */
    long calls;
} ml_profile_entry;

void ml_profile_start(void);                 /* clear and enable */
/* Disable, wait for the GPU, and return the totals sorted by time
 * (malloc'd array owned by the caller); -1 + error on failure. */
int ml_profile_stop(ml_profile_entry **out, int *n);
/* The same, with the totals kept apart per (kernel, scope) when by_scope. */
int ml_profile_stop_ex(ml_profile_entry **out, int *n, bool by_scope);

/* Scopes say who called a kernel: a layer's class in forward (set by the
 * Lua nn.Module call), "backward of <op>" while autograd runs a node.  A
 * record keeps the scope current at its kernel's call, so a report can say
 * which layer or which backward emitted, say, the copies.  Scopes are
 * interned strings (ml_profile_intern: stable for the process's life);
 * set_scope returns the previous one.  Only read while profiling. */
const char *ml_profile_intern(const char *s);  /* NULL when out of memory */
const char *ml_profile_set_scope(const char *interned);
const char *ml_profile_scope(void);

/* Used by the dispatch macros.  begin returns a token for end. */
int ml_profile_begin(const char *name, bool cuda);
void ml_profile_end(int token);

#ifdef ML_WITH_CUDA
/* kernels/cuda/profile.cu: events on the current device's stream. */
int ml_cuda_profile_record(int slot);        /* record event `slot`; grows the pool */
int ml_cuda_profile_elapsed(int a, int b, float *ms);
int ml_cuda_profile_sync(void);
#endif

#endif
