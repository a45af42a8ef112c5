/* profile.c — kernel timings by name (see profile.h).  Records are kept in
 * call order; CUDA records are resolved into times only when profiling
 * stops, so timing never synchronises the GPU mid-step. */
#include "profile.h"
#include "error.h"
#include <stdlib.h>
#include <string.h>
#include <time.h>

bool ml_profile_on;

typedef struct {
    const char *name;
    bool cuda;
    double t0, t1;        /* CPU: seconds */
    int ev0, ev1;         /* CUDA: event slots */
} record;

static record *g_rec;
static int g_n, g_cap, g_events;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void ml_profile_start(void) {
    g_n = 0;
    g_events = 0;
    ml_profile_on = true;
}

int ml_profile_begin(const char *name, bool cuda) {
    if (g_n == g_cap) {
        int nc = g_cap ? g_cap * 2 : 4096;
        record *nr = realloc(g_rec, (size_t)nc * sizeof *nr);
        if (!nr) return -1;
        g_rec = nr;
        g_cap = nc;
    }
    record *r = &g_rec[g_n];
    r->name = name;
    r->cuda = cuda;
    if (cuda) {
#ifdef ML_WITH_CUDA
        r->ev0 = g_events++;
        r->ev1 = g_events++;
        if (ml_cuda_profile_record(r->ev0) < 0) return -1;
#else
        return -1;
#endif
    } else {
        r->t0 = now_s();
    }
    return g_n++;
}

void ml_profile_end(int token) {
    if (token < 0 || token >= g_n) return;
    record *r = &g_rec[token];
    if (r->cuda) {
#ifdef ML_WITH_CUDA
        ml_cuda_profile_record(r->ev1);
#endif
    } else {
        r->t1 = now_s();
    }
}

static int by_time(const void *a, const void *b) {
    double x = ((const ml_profile_entry *)a)->ms, y = ((const ml_profile_entry *)b)->ms;
    return x < y ? 1 : x > y ? -1 : 0;
}

int ml_profile_stop(ml_profile_entry **out, int *n) {
    ml_profile_on = false;
#ifdef ML_WITH_CUDA
    if (g_events && ml_cuda_profile_sync() < 0) return -1;
#endif
    ml_profile_entry *e = calloc((size_t)(g_n ? g_n : 1), sizeof *e);
    if (!e) return ml_error("profile: out of memory");
    int k = 0;
    for (int i = 0; i < g_n; i++) {
        record *r = &g_rec[i];
        double ms = 0;
        if (r->cuda) {
#ifdef ML_WITH_CUDA
            float f = 0;
            if (ml_cuda_profile_elapsed(r->ev0, r->ev1, &f) == 0) ms = f;
#endif
        } else {
            ms = (r->t1 - r->t0) * 1e3;
        }
        int j = 0;
        while (j < k && strcmp(e[j].name, r->name) != 0) j++;
        if (j == k) { e[k].name = r->name; k++; }
        e[j].ms += ms;
        e[j].calls++;
    }
    qsort(e, (size_t)k, sizeof *e, by_time);
    g_n = 0;
    *out = e;
    *n = k;
    return 0;
}
