/* profile.c — kernel timings by name (see profile.h).  Records are kept in
 * call order; CUDA records are resolved into times only when profiling
 * stops, so timing never synchronises the GPU mid-step. */
#include "profile.h"
#include "error.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

bool ml_profile_on;

typedef struct {
    const char *name;
    const char *scope;
    bool cuda;
    double t0, t1;        /* CPU: seconds */
    int ev0, ev1;         /* CUDA: event slots */
} record;

static record *g_rec;
static int g_n, g_cap, g_events;
static const char *g_scope;

/* ---- scopes: interned strings in an open-addressing set that only grows */

static char **g_names;
static size_t g_names_cap, g_names_n;

static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ull;   /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

const char *ml_profile_intern(const char *s) {
    if (!s) return NULL;
    if (2 * (g_names_n + 1) > g_names_cap) {   /* keep the set at most half full */
        size_t nc = g_names_cap ? 2 * g_names_cap : 256;
        char **nt = calloc(nc, sizeof *nt);
        if (!nt) return NULL;
        for (size_t i = 0; i < g_names_cap; i++) {
            if (!g_names[i]) continue;
            size_t j = hash_str(g_names[i]) & (nc - 1);
            while (nt[j]) j = (j + 1) & (nc - 1);
            nt[j] = g_names[i];
        }
        free(g_names);
        g_names = nt;
        g_names_cap = nc;
    }
    size_t j = hash_str(s) & (g_names_cap - 1);
    for (; g_names[j]; j = (j + 1) & (g_names_cap - 1))
        if (strcmp(g_names[j], s) == 0) return g_names[j];
    char *c = strdup(s);
    if (!c) return NULL;
    g_names[j] = c;
    g_names_n++;
    return c;
}

const char *ml_profile_set_scope(const char *interned) {
    const char *prev = g_scope;
    g_scope = interned;
    return prev;
}

const char *ml_profile_scope(void) { return g_scope; }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void ml_profile_start(void) {
    g_n = 0;
    g_events = 0;
    g_scope = NULL;
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
    r->scope = g_scope;
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

static bool same(const char *a, const char *b) { return a == b || (a && b && strcmp(a, b) == 0); }

int ml_profile_stop(ml_profile_entry **out, int *n) { return ml_profile_stop_ex(out, n, false); }

int ml_profile_stop_ex(ml_profile_entry **out, int *n, bool by_scope) {
    ml_profile_on = false;
    g_scope = NULL;
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
        const char *scope = by_scope ? r->scope : NULL;
        int j = 0;
        while (j < k && !(strcmp(e[j].name, r->name) == 0 && same(e[j].scope, scope))) j++;
        if (j == k) { e[k].name = r->name; e[k].scope = scope; k++; }
        e[j].ms += ms;
        e[j].calls++;
    }
    qsort(e, (size_t)k, sizeof *e, by_time);
    g_n = 0;
    *out = e;
    *n = k;
    return 0;
}
