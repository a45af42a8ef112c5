/* autograd.c — recording nodes and running backward.
 *
 * The engine counts, for every node reachable from the root, how many edges
 * feed it, then runs nodes whose count reaches zero (a topological order).
 * Gradients for a leaf are summed first; hooks then see the total, it is
 * accumulated into leaf->grad, and the grad-ready callback fires — the
 * point where data-parallel training can start reducing that bucket. */
#include "autograd.h"
#include "ops.h"
#include "profile.h"
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

static _Thread_local bool g_grad_disabled;
static ml_grad_ready_fn g_ready_fn;
static void *g_ready_ctx;

bool ml_grad_enabled(void) { return !g_grad_disabled; }
bool ml_set_grad_enabled(bool on) { bool prev = !g_grad_disabled; g_grad_disabled = !on; return prev; }
void ml_set_grad_ready_callback(ml_grad_ready_fn fn, void *ctx) { g_ready_fn = fn; g_ready_ctx = ctx; }

/* ---- failure injection -------------------------------------------------- */

static _Thread_local int g_fail_after = -1;

void ml_autograd_fail_alloc_after(int skip) { g_fail_after = skip < 0 ? -1 : skip; }

/* True when the test hook says this allocation point fails now. */
static bool injected_failure(void) {
    if (g_fail_after < 0) return false;
    return g_fail_after-- == 0;
}

/* ---- recording ---------------------------------------------------------- */

bool ml_any_requires_grad(int n, ml_tensor *const *ts) {
    if (g_grad_disabled) return false;
    for (int i = 0; i < n; i++) if (ts[i] && ts[i]->requires_grad) return true;
    return false;
}

/* The node an op gets when its own node cannot be allocated.  It has no
 * inputs and saves nothing; it is never freed and its refcount is never
 * touched.  Ops may still write op parameters (f, i) into it: those are
 * never read.  The name of the op that last failed is kept for the error
 * backward reports. */
static ml_node g_unrecorded = {.op = ML_NODE_UNRECORDED, .name = "unrecorded",
                               .broken = "out of memory recording the node"};
static const char *_Atomic g_unrecorded_op = "?";

static ml_node *node_begin(ml_op op, const char *name, ml_backward_fn bw, int n_inputs, ml_tensor *const *inputs) {
    if (!ml_any_requires_grad(n_inputs, inputs)) return NULL;
    ml_node *n = injected_failure() ? NULL : calloc(1, sizeof *n);
    if (!n) {
        g_unrecorded_op = name;
        return &g_unrecorded;
    }
    n->op = op;
    n->name = name;
    n->refcount = 1;
    n->backward = bw;
    n->saved = n->saved_buf;
    n->saved_version = n->version_buf;
    n->cap_saved = ML_NODE_SAVED_INLINE;
    if (n_inputs > ML_NODE_MAX_INPUTS) {
        /* An op bug (ops join longer input lists in groups): record a node
         * that backward refuses, naming the op. */
        n->broken = "more than ML_NODE_MAX_INPUTS (8) inputs";
        return n;
    }
    n->n_inputs = n_inputs;
    for (int i = 0; i < n_inputs; i++) {
        ml_tensor *t = inputs[i];
        ml_edge *e = &n->next[i];
        if (!t) continue;
        e->ndim = t->ndim;
        memcpy(e->shape, t->shape, sizeof e->shape);
        e->dtype = t->dtype;
        e->device = t->device;
        if (!t->requires_grad) continue;
        if (t->grad_fn) {
            e->fn = t->grad_fn;
            if (e->fn != &g_unrecorded) e->fn->refcount++;
        } else {
            e->leaf = ml_retain(t);
        }
    }
    return n;
}

ml_node *ml_node_begin(ml_op op, ml_backward_fn bw, int n_inputs, ml_tensor *const *inputs) {
    return node_begin(op, ml_op_name(op), bw, n_inputs, inputs);
}

ml_node *ml_node_begin_custom(const char *name, ml_backward_fn bw, int n_inputs, ml_tensor *const *inputs) {
    return node_begin(ML_NODE_CUSTOM, name, bw, n_inputs, inputs);
}

/* ---- saved casts, kept as a recipe ---------------------------------------
 *
 * Under autocast without the shadow cache every layer converts its f32
 * weight to bf16 and its node saves that conversion: SD 1.4's step holds
 * 1.8 GiB of such copies from forward to backward, for values the f32
 * parameter (alive anyway) already gives.  So ml_node_save keeps, for a
 * tensor that is exactly such a conversion, the parameter and the recipe
 * (dtype, shape); the engine converts again right before the node's
 * backward and frees the result right after it.  The conversion kernel is
 * the same, so the bits are the same. */
typedef struct ml_recast {
    int slot;                 /* index into saved[] */
    ml_tensor *src;           /* detached alias of the leaf converted from */
    int64_t src_version;      /* the leaf's storage version when converted */
    ml_dtype dtype;           /* what it was converted to */
    int ndim;                 /* the saved tensor's own shape (a view of the conversion) */
    int64_t shape[ML_MAX_DIMS];
    ml_tensor *made;          /* the conversion made again, while backward runs */
    struct ml_recast *next;
} ml_recast;

static _Atomic bool g_recompute_casts = true;

bool ml_set_recompute_casts(bool on) { return atomic_exchange(&g_recompute_casts, on); }
bool ml_recompute_casts(void) { return atomic_load(&g_recompute_casts); }

/* The to_dtype node of a leaf behind t through plain views (each of which
 * aliases its input: a view of a contiguous tensor never copies), when t is
 * that conversion's untouched output seen whole and in order; else NULL. */
static ml_node *cast_of_leaf(const ml_tensor *t, const ml_tensor *origin) {
    if (!origin->grad_fn || origin->storage != t->storage || t->offset != 0 || !ml_is_contiguous(t)) return NULL;
    ml_node *c = origin->grad_fn;
    for (int hops = 0; c && c->op == ML_OP_view && hops < 8; hops++) c = c->n_inputs == 1 ? c->next[0].fn : NULL;
    if (!c || c->op != ML_OP_to_dtype || c->f[0] != 1 || !c->next[0].leaf) return NULL;
    const ml_tensor *leaf = c->next[0].leaf;
    if ((int64_t)(intptr_t)t->storage != c->i[1] || t->storage->version != c->i[2] ||
        leaf->storage->version != c->i[0] || ml_numel(leaf) != ml_numel(t) || !ml_is_contiguous(leaf))
        return NULL;
    return c;
}

/* Saves t into slot k as a recipe if it is a cast of a leaf; false when it
 * is not one (or the recipe cannot be allocated: then t is kept). */
static bool save_as_recast(ml_node *n, ml_tensor *t, const ml_tensor *origin, int k) {
    if (!t || !origin || k >= ML_NODE_SAVED_INLINE || !ml_recompute_casts()) return false;
    ml_node *c = cast_of_leaf(t, origin);
    if (!c) return false;
    ml_recast *r = calloc(1, sizeof *r);
    if (!r) return false;
    if (!(r->src = ml_detach(c->next[0].leaf))) { free(r); return false; }
    r->slot = k;
    r->src_version = c->i[0];
    r->dtype = t->dtype;
    r->ndim = t->ndim;
    memcpy(r->shape, t->shape, sizeof r->shape);
    r->next = n->recast;
    n->recast = r;
    n->saved_version[k] = 0;
    n->saved[k] = NULL;
    return true;
}

/* A recipe whose leaf was written in place since it was converted would
 * give other values than the forward used: refused before backward runs. */
static int check_recast_versions(const ml_node *n) {
    for (const ml_recast *r = n->recast; r; r = r->next) {
        if (r->src->storage->version == r->src_version) continue;
        char b[128];
        return ml_error("backward: one of the variables needed for gradient computation has been modified by "
                        "an inplace operation: saved tensor %d of '%s' is the %s conversion of a parameter "
                        "(shape %s), which is at version %lld; expected version %lld (modify parameters "
                        "after backward, or keep conversions as memory with core.recompute_casts(false))",
                        r->slot + 1, n->name, ml_dtype_short(r->dtype), ml_shape_str(r->src, b, sizeof b),
                        (long long)r->src->storage->version, (long long)r->src_version);
    }
    return 0;
}

/* Convert every recipe of n into its saved slot, for n's backward (grad
 * mode is off there, so the conversion records nothing). */
static int recast_make(ml_node *n) {
    for (ml_recast *r = n->recast; r; r = r->next) {
        ml_tensor *c = ml_to_dtype(r->src, r->dtype);
        if (!c) return -1;
        r->made = ml_from_storage(c->storage, 0, r->ndim, r->shape, NULL, r->dtype);
        ml_release(c);
        if (!r->made) return -1;
        n->saved[r->slot] = r->made;
    }
    return 0;
}

/* Free what recast_make made: the slots are recipes again. */
static void recast_drop_made(ml_node *n) {
    for (ml_recast *r = n->recast; r; r = r->next) {
        if (r->made) { ml_release(r->made); r->made = NULL; }
        n->saved[r->slot] = NULL;
    }
}

static void recast_free(ml_node *n) {
    recast_drop_made(n);
    while (n->recast) {
        ml_recast *r = n->recast;
        n->recast = r->next;
        ml_release(r->src);
        free(r);
    }
}

void ml_node_save_input(ml_node *n, ml_tensor *t, const ml_tensor *input) {
    if (n == &g_unrecorded || n->broken) return;
    if (save_as_recast(n, t, input, n->n_saved)) { n->n_saved++; return; }
    ml_node_save(n, t);
}

void ml_node_save(ml_node *n, ml_tensor *t) {
    if (n == &g_unrecorded || n->broken) return;
    if (save_as_recast(n, t, t, n->n_saved)) { n->n_saved++; return; }
    if (n->n_saved == n->cap_saved) {
        int nc = n->cap_saved * 2;
        bool inline_now = n->saved == n->saved_buf;
        ml_tensor **ns = injected_failure() ? NULL : malloc((size_t)nc * sizeof *ns);
        int64_t *nv = ns ? malloc((size_t)nc * sizeof *nv) : NULL;
        if (!ns || !nv) {
            free(ns);
            n->broken = "out of memory saving a tensor for backward";
            return;
        }
        memcpy(ns, n->saved, (size_t)n->n_saved * sizeof *ns);
        memcpy(nv, n->saved_version, (size_t)n->n_saved * sizeof *nv);
        if (!inline_now) { free(n->saved); free(n->saved_version); }
        n->saved = ns;
        n->saved_version = nv;
        n->cap_saved = nc;
    }
    ml_tensor *alias = NULL;
    if (t && !(alias = ml_detach(t))) {
        n->broken = "out of memory saving a tensor for backward";
        return;
    }
    n->saved_version[n->n_saved] = t ? t->storage->version : 0;
    n->saved[n->n_saved++] = alias;
}

void ml_node_finish(ml_node *n, ml_tensor *out) {
    if (out->grad_fn) ml_node_release(out->grad_fn);
    out->grad_fn = n;
    out->requires_grad = true;
}

bool ml_node_needs_grad(const ml_node *n, int i) {
    return i < n->n_inputs && (n->next[i].fn || n->next[i].leaf);
}

ml_dtype ml_grad_dtype_hint(const ml_node *n, int i, ml_dtype dflt) {
    if (i >= n->n_inputs) return dflt;
    const ml_node *c = n->next[i].fn;
    /* deps counts the edges into c whose gradient has not arrived yet
     * (engine scratch, see ml_backward): 1 with nothing summed means this
     * edge is c's only remaining one, so c receives this gradient alone and
     * never has to add it to one of another dtype. */
    if (!c || (c->op != ML_OP_to_dtype && c->op != ML_OP_cast_as) || c->deps != 1 || c->grad_acc ||
        n->next[i].dtype != dflt)
        return dflt;
    ml_dtype wide = c->next[0].dtype;
    if (!ml_dtype_is_float(wide) || !ml_dtype_is_float(dflt) || ml_dtype_size(wide) <= ml_dtype_size(dflt) ||
        !ml_device_eq(c->next[0].device, n->next[i].device))
        return dflt;
    return wide;
}

/* ---- in-place writes ---------------------------------------------------- */

void ml_mark_modified(ml_tensor *t) { t->storage->version++; }

static void dims_str(int n, const int64_t *v, char *buf, size_t cap) {
    size_t k = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < n && k < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, i ? ", %lld" : "%lld", (long long)v[i]);
    if (k < cap) snprintf(buf + k, cap - k, "]");
}

/* Dims of size 1 never step, and an empty tensor has nothing to write.  For
 * the rest, sorted by |stride|: the elements reached by the dims before dim
 * i span at most `span` elements, so if |stride_i| exceeds that span each
 * step along dim i lands past all of them and no two index tuples meet.
 * This is sufficient, not necessary: a layout it refuses may still be free
 * of overlap (shape {3, 2}, strides {2, 3}), but the views moonlit makes of
 * a fresh tensor (view, transpose, permute, narrow, select) all pass.
 * The span saturates instead of overflowing: no later stride can exceed
 * it, so such a layout (larger than any memory) is refused. */
int ml_check_no_internal_overlap(const char *op, const ml_tensor *t) {
    int64_t st[ML_MAX_DIMS], sz[ML_MAX_DIMS];
    int n = 0;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] == 0) return 0;
        if (t->shape[i] == 1) continue;
        int64_t s = t->strides[i] < 0 ? -t->strides[i] : t->strides[i];
        int j = n++;
        for (; j > 0 && st[j - 1] > s; j--) { st[j] = st[j - 1]; sz[j] = sz[j - 1]; }
        st[j] = s;
        sz[j] = t->shape[i];
    }
    int64_t span = 0;
    bool overlap = false;
    for (int i = 0; i < n && !overlap; i++) {
        overlap = st[i] <= span;
        span = st[i] > (INT64_MAX - span) / (sz[i] - 1) ? INT64_MAX : span + st[i] * (sz[i] - 1);
    }
    if (!overlap) return 0;
    char b1[160], b2[160];
    dims_str(t->ndim, t->shape, b1, sizeof b1);
    dims_str(t->ndim, t->strides, b2, sizeof b2);
    return ml_error("%s: more than one element of the written-to tensor refers to a single memory "
                    "location (shape %s, strides %s, e.g. from expand); write into a copy made "
                    "with :clone() or :contiguous() instead", op, b1, b2);
}

int ml_inplace_check(const char *op, const ml_tensor *dst) {
    if (ml_grad_enabled() && dst->requires_grad) {
        if (!dst->grad_fn)
            return ml_error("%s: in-place op on a leaf tensor that requires grad "
                            "(run it under no_grad)", op);
        return ml_error("%s: in-place op on a tensor that is part of an autograd graph "
                        "(in-place ops are not recorded; use the out-of-place op)", op);
    }
    return ml_check_no_internal_overlap(op, dst);
}

int ml_inplace_begin(const char *op, ml_tensor *dst) {
    if (ml_inplace_check(op, dst) < 0) return -1;
    ml_mark_modified(dst);
    return 0;
}

static void drop_saved(ml_node *n) {
    if (n->ctx_free) {
        void (*f)(void *) = n->ctx_free;
        n->ctx_free = NULL;
        f(n->ctx);
        n->ctx = NULL;
    }
    recast_free(n);
    for (int i = 0; i < n->n_saved; i++) { ml_release(n->saved[i]); n->saved[i] = NULL; }
    n->n_saved = 0;
    if (n->saved != n->saved_buf) {
        free(n->saved);
        free(n->saved_version);
        n->saved = n->saved_buf;
        n->saved_version = n->version_buf;
        n->cap_saved = ML_NODE_SAVED_INLINE;
    }
    n->released = true;
}

/* Iterative so that very long chains cannot overflow the C stack.  The
 * work list starts on the C stack, so releasing a small graph never needs
 * memory. */
void ml_node_release(ml_node *root) {
    if (!root || root == &g_unrecorded || --root->refcount > 0) return;
    ml_node *local[64];
    size_t cap = sizeof local / sizeof *local, top = 0;
    ml_node **stack = local;
    stack[top++] = root;
    while (top) {
        ml_node *n = stack[--top];
        drop_saved(n);
        ml_release(n->grad_acc);
        for (int i = 0; i < n->n_inputs; i++) {
            ml_release(n->next[i].leaf);
            ml_node *c = n->next[i].fn;
            if (c && c != &g_unrecorded && --c->refcount == 0) {
                if (top == cap) {
                    ml_node **ns = malloc(cap * 2 * sizeof *stack);
                    if (!ns) continue;     /* out of memory: that subgraph leaks */
                    memcpy(ns, stack, cap * sizeof *stack);
                    if (stack != local) free(stack);
                    stack = ns;
                    cap *= 2;
                }
                stack[top++] = c;
            }
        }
        free(n);
    }
    if (stack != local) free(stack);
}

/* ---- hooks -------------------------------------------------------------- */

int ml_add_hook(ml_tensor *leaf, ml_hook_fn fn, void *ctx, void (*ctx_free)(void *)) {
    static int next_id = 1;
    if (!leaf->requires_grad || leaf->grad_fn)
        return ml_error("register_hook: only leaf tensors that require grad take hooks");
    /* ids are never reused (remove_hook(id) must not take a newer hook) */
    if (next_id == INT_MAX) return ml_error("register_hook: this process has used up its %d hook ids", INT_MAX);
    ml_hook *h = calloc(1, sizeof *h);
    if (!h) return ml_error("out of memory");
    h->fn = fn; h->ctx = ctx; h->ctx_free = ctx_free; h->id = next_id++;
    ml_hook **p = &leaf->hooks;
    while (*p) p = &(*p)->next;
    *p = h;
    return h->id;
}

void ml_remove_hook(ml_tensor *leaf, int id) {
    for (ml_hook **p = &leaf->hooks; *p; p = &(*p)->next) {
        if ((*p)->id == id) {
            ml_hook *h = *p;
            *p = h->next;
            if (h->ctx_free) h->ctx_free(h->ctx);
            free(h);
            return;
        }
    }
}

/* ---- engine ------------------------------------------------------------- */

typedef struct { ml_tensor *leaf; int pending; ml_tensor *acc; } leaf_slot;

typedef struct {
    ml_node **nodes; size_t n_nodes, cap_nodes;
    leaf_slot *leaves; size_t n_leaves, cap_leaves;
} graph;

static int push_node(graph *g, ml_node *n) {
    if (g->n_nodes == g->cap_nodes) {
        size_t nc = g->cap_nodes ? g->cap_nodes * 2 : 256;
        ml_node **nn = realloc(g->nodes, nc * sizeof *nn);
        if (!nn) return ml_error("backward: out of memory");
        g->nodes = nn; g->cap_nodes = nc;
    }
    g->nodes[g->n_nodes++] = n;
    return 0;
}

/* Leaf lookup by linear scan would be quadratic for models with ~1000
 * parameters; a pointer-keyed open-addressing table keeps it linear. */
typedef struct { const void **keys; size_t *vals; size_t cap, n; } ptr_map;

static size_t pm_hash(const void *p, size_t cap) { return ((uintptr_t)p >> 4) * 11400714819323198485ull & (cap - 1); }

/* Returns the slot for k (inserting it with value SIZE_MAX if new), or NULL
 * when out of memory. */
static size_t *pm_slot(ptr_map *m, const void *k) {
    if ((m->n + 1) * 2 > m->cap) {
        size_t nc = m->cap ? m->cap * 2 : 128;
        const void **nk = calloc(nc, sizeof *nk);
        size_t *nv = calloc(nc, sizeof *nv);
        if (!nk || !nv) { free(nk); free(nv); return NULL; }
        for (size_t i = 0; i < m->cap; i++) {
            if (!m->keys[i]) continue;
            size_t j = pm_hash(m->keys[i], nc);
            while (nk[j]) j = (j + 1) & (nc - 1);
            nk[j] = m->keys[i]; nv[j] = m->vals[i];
        }
        free(m->keys); free(m->vals);
        m->keys = nk; m->vals = nv; m->cap = nc;
    }
    size_t i = pm_hash(k, m->cap);
    while (m->keys[i] && m->keys[i] != k) i = (i + 1) & (m->cap - 1);
    if (!m->keys[i]) { m->keys[i] = k; m->vals[i] = SIZE_MAX; m->n++; }
    return &m->vals[i];
}

/* ---- what a graph holds (ml_saved_census) -------------------------------- */

int ml_saved_census(const ml_tensor *root, ml_census_fn fn, void *ctx) {
    if (!root->grad_fn) return 0;
    graph g = {0};
    ptr_map seen = {0}, storages = {0};
    int rc = -1;
    if (!pm_slot(&seen, root->grad_fn)) { ml_error("saved_census: out of memory"); goto out; }
    if (push_node(&g, root->grad_fn) < 0) goto out;
    for (size_t k = 0; k < g.n_nodes; k++) {
        ml_node *n = g.nodes[k];
        int fresh = 0;
        size_t bytes = 0;
        for (int j = 0; !n->released && j < n->n_saved; j++) {
            ml_storage *st = n->saved[j] ? n->saved[j]->storage : NULL;
            if (!st) continue;
            size_t before = storages.n;
            if (!pm_slot(&storages, st)) { ml_error("saved_census: out of memory"); goto out; }
            if (storages.n > before) { fresh++; bytes += st->nbytes; }
        }
        if (!n->released) fn(ctx, n->name, n->n_saved, fresh, bytes);
        for (int i = 0; i < n->n_inputs; i++) {
            ml_node *c = n->next[i].fn;
            if (!c) continue;
            size_t before = seen.n;
            if (!pm_slot(&seen, c)) { ml_error("saved_census: out of memory"); goto out; }
            if (seen.n > before && push_node(&g, c) < 0) goto out;
        }
    }
    rc = 0;
out:
    free(g.nodes);
    free(seen.keys); free(seen.vals);
    free(storages.keys); free(storages.vals);
    return rc;
}

/* *acc += g (a new tensor; *acc keeps its value on failure).  e is the
 * edge the gradients flow along, to name its end in the error. */
static int accumulate(ml_tensor **acc, ml_tensor *g, const ml_edge *e) {
    if (!*acc) { *acc = ml_retain(g); return 0; }
    ml_tensor *s = NULL;
    if (injected_failure()) ml_error("out of memory");
    else s = ml_add(*acc, g);
    if (s) {
        ml_release(*acc);
        *acc = s;
        return 0;
    }
    char msg[1024], b[128];
    snprintf(msg, sizeof msg, "%s", ml_last_error());
    if (e->fn) return ml_error("backward: summing the gradients for the output of '%s' failed: %s", e->fn->name, msg);
    return ml_error("backward: summing the gradients for a leaf tensor of shape %s failed: %s",
                    ml_shape_str(e->leaf, b, sizeof b), msg);
}

/* A node backward cannot use: not fully recorded in the forward pass. */
static int refuse_broken(const ml_node *n) {
    if (n == &g_unrecorded)
        return ml_error("backward: the graph is incomplete: out of memory while recording the autograd node "
                        "of '%s' in the forward pass, so its inputs would get no gradient; run the forward "
                        "pass again", g_unrecorded_op);
    return ml_error("backward: the node of '%s' was not fully recorded in the forward pass (%s), so its inputs "
                    "would get wrong gradients; run the forward pass again", n->name, n->broken);
}

/* The rule PyTorch users know: a tensor saved for backward must still hold
 * the values it had when saved.  Its storage's version says whether an
 * in-place op wrote into it (or into any view of it) since. */
static int check_saved_versions(const ml_node *n) {
    for (int k = 0; k < n->n_saved; k++) {
        const ml_tensor *t = n->saved[k];
        if (!t || t->storage->version == n->saved_version[k]) continue;
        char b[128];
        return ml_error("backward: one of the variables needed for gradient computation has been modified by "
                        "an inplace operation: saved tensor %d of '%s' (shape %s, %s) is at version %lld; "
                        "expected version %lld (clone it before modifying it, or modify it after backward)",
                        k + 1, n->name, ml_shape_str(t, b, sizeof b), ml_dtype_short(t->dtype),
                        (long long)t->storage->version, (long long)n->saved_version[k]);
    }
    return 0;
}

/* A backward function's gradient for input i must have that input's shape. */
static int check_grad_shape(const ml_node *n, int i, const ml_tensor *g) {
    const ml_edge *e = &n->next[i];
    bool same = g->ndim == e->ndim;
    for (int d = 0; same && d < e->ndim; d++) same = g->shape[d] == e->shape[d];
    if (same) return 0;
    char b1[128], b2[128];
    ml_tensor shape_of_input = {.ndim = e->ndim};
    memcpy(shape_of_input.shape, e->shape, sizeof e->shape);
    return ml_error("backward of '%s' returned a gradient of shape %s for input %d of shape %s", n->name,
                    ml_shape_str(g, b1, sizeof b1), i + 1, ml_shape_str(&shape_of_input, b2, sizeof b2));
}

static int leaf_done_(leaf_slot *s) {
    ml_tensor *leaf = s->leaf, *g = s->acc;
    s->acc = NULL;
    if (!g) return 0;
    for (ml_hook *h = leaf->hooks; h; h = h->next) {
        int err = 0;
        ml_tensor *ng = h->fn(h->ctx, g, &err);
        if (err) { ml_release(g); return -1; }
        if (ng) { ml_release(g); g = ng; }
    }
    if (!ml_same_shape(g, leaf) || g->dtype != leaf->dtype || !ml_device_eq(g->device, leaf->device)) {
        ml_tensor *c = ml_to_dtype(g, leaf->dtype);
        ml_release(g);
        if (!c) return -1;
        g = c;
        if (!ml_same_shape(g, leaf)) {
            char b1[128], b2[128];
            ml_shape_str(g, b1, sizeof b1);
            ml_release(g);
            return ml_error("backward: gradient of shape %s for a parameter of shape %s",
                            b1, ml_shape_str(leaf, b2, sizeof b2));
        }
    }
    if (leaf->grad) {
        int rc = ml_add_(leaf->grad, g, 1.0);
        ml_release(g);
        if (rc < 0) return -1;
    } else if (g->refcount == 1 && ml_is_contiguous(g) && !g->grad_fn) {
        leaf->grad = g;
    } else {
        leaf->grad = ml_clone(g);
        ml_release(g);
        if (!leaf->grad) return -1;
    }
    if (g_ready_fn) g_ready_fn(g_ready_ctx, leaf);
    return 0;
}

/* leaf_done_, its kernels (the sum into .grad, hooks) filed under one scope
 * while profiling. */
static int leaf_done(leaf_slot *s) {
    if (!ml_profile_on) return leaf_done_(s);
    const char *outer = ml_profile_set_scope(ml_profile_intern("backward: into a leaf's grad"));
    int rc = leaf_done_(s);
    ml_profile_set_scope(outer);
    return rc;
}

int ml_backward(ml_tensor *root, ml_tensor *grad, bool retain_graph) {
    if (!root->requires_grad)
        return ml_error("backward: the tensor does not require grad and has no grad_fn");
    bool prev = ml_set_grad_enabled(false);
    int rc = -1;
    graph g = {0};
    ptr_map lm = {0};
    ml_tensor *seed = NULL;
    if (grad) {
        if (!ml_same_shape(grad, root)) {
            char b1[128], b2[128];
            ml_error("backward: gradient shape %s does not match tensor shape %s",
                     ml_shape_str(grad, b1, sizeof b1), ml_shape_str(root, b2, sizeof b2));
            goto out;
        }
        if (grad->dtype != root->dtype || !ml_device_eq(grad->device, root->device)) {
            char d1[32], d2[32];
            ml_device_str(grad->device, d1, sizeof d1);
            ml_device_str(root->device, d2, sizeof d2);
            ml_error("backward: gradient is %s on %s but the tensor is %s on %s",
                     ml_dtype_short(grad->dtype), d1, ml_dtype_short(root->dtype), d2);
            goto out;
        }
        seed = ml_retain(grad);
    } else {
        if (ml_numel(root) != 1) {
            char b[128];
            ml_error("backward: grad can be implicitly created only for one-element outputs (shape %s)",
                     ml_shape_str(root, b, sizeof b));
            goto out;
        }
        seed = ml_full(root->ndim, root->shape, 1.0, root->dtype, root->device);
        if (!seed) goto out;
    }
    if (!root->grad_fn) {          /* a leaf: its gradient is the seed itself */
        leaf_slot s = {root, 0, ml_retain(seed)};
        rc = leaf_done(&s);
        goto out;
    }

    /* Discover the graph and count incoming edges.  A node not fully
     * recorded is refused before anything is written into it (the shared
     * placeholder node is never written). */
    if (root->grad_fn->broken) { refuse_broken(root->grad_fn); goto out; }
    if (push_node(&g, root->grad_fn) < 0) goto out;
    root->grad_fn->deps = 0;
    root->grad_fn->seq = -1;          /* mark visited */
    for (size_t k = 0; k < g.n_nodes; k++) {
        ml_node *n = g.nodes[k];
        if (n->released) {
            ml_error("backward: trying to backward through the graph a second time (node '%s'); "
                     "pass retain_graph = true the first time", n->name);
            goto reset;
        }
        /* Checked before any node runs, so no leaf gets a gradient from a
         * backward that then fails this way. */
        if (check_saved_versions(n) < 0 || check_recast_versions(n) < 0) goto reset;
        for (int i = 0; i < n->n_inputs; i++) {
            ml_node *c = n->next[i].fn;
            if (c) {
                if (c->broken) { refuse_broken(c); goto reset; }
                if (c->seq != -1) { c->seq = -1; c->deps = 0; if (push_node(&g, c) < 0) goto reset; }
                c->deps++;
            } else if (n->next[i].leaf) {
                size_t *slot = pm_slot(&lm, n->next[i].leaf);
                if (!slot) { ml_error("backward: out of memory"); goto reset; }
                if (*slot == SIZE_MAX) {
                    if (g.n_leaves == g.cap_leaves) {
                        size_t nc = g.cap_leaves ? g.cap_leaves * 2 : 64;
                        leaf_slot *nl = realloc(g.leaves, nc * sizeof *nl);
                        if (!nl) { ml_error("backward: out of memory"); goto reset; }
                        g.leaves = nl; g.cap_leaves = nc;
                    }
                    *slot = g.n_leaves;
                    g.leaves[g.n_leaves++] = (leaf_slot){n->next[i].leaf, 0, NULL};
                }
                g.leaves[*slot].pending++;
            }
        }
    }

    /* Run.  The ready list reuses the front of a separate array. */
    ml_node **ready = malloc(g.n_nodes * sizeof *ready);
    if (!ready) { ml_error("backward: out of memory"); goto reset; }
    size_t top = 0;
    root->grad_fn->grad_acc = ml_retain(seed);
    ready[top++] = root->grad_fn;
    rc = 0;
    while (top && rc == 0) {
        ml_node *n = ready[--top];
        ml_tensor *gout = n->grad_acc;
        n->grad_acc = NULL;
        ml_tensor *gin[ML_NODE_MAX_INPUTS] = {0};
        if (gout) {
            /* While profiling, the kernels this node runs are filed under it. */
            const char *outer = NULL;
            if (ml_profile_on) {
                char scope[96];
                snprintf(scope, sizeof scope, "backward of %s", n->name);
                outer = ml_profile_set_scope(ml_profile_intern(scope));
            }
            int brc = recast_make(n) < 0 ? -1 : n->backward(n, gout, gin);
            recast_drop_made(n);
            if (ml_profile_on) ml_profile_set_scope(outer);
            if (brc < 0) {
                char msg[1024];
                snprintf(msg, sizeof msg, "%s", ml_last_error());
                ml_error("backward of '%s': %s", n->name, msg);
                rc = -1;
            }
            ml_release(gout);
        }
        /* This node's saved tensors (the forward's activations) are not
         * needed again: free them now rather than when the whole backward
         * ends, so activations go as backward passes them, as in PyTorch. */
        if (!retain_graph) drop_saved(n);
        for (int i = 0; i < n->n_inputs; i++) {
            ml_edge *e = &n->next[i];
            if (rc == 0 && gin[i] && (e->fn || e->leaf) && check_grad_shape(n, i, gin[i]) < 0) rc = -1;
            if (e->fn) {
                if (gin[i] && rc == 0 && accumulate(&e->fn->grad_acc, gin[i], e) < 0) rc = -1;
                if (--e->fn->deps == 0) ready[top++] = e->fn;
            } else if (e->leaf) {
                leaf_slot *s = &g.leaves[*pm_slot(&lm, e->leaf)];
                if (gin[i] && rc == 0 && accumulate(&s->acc, gin[i], e) < 0) rc = -1;
                /* Drop our reference before the leaf takes its gradient, so a
                 * gradient nobody else holds becomes leaf->grad as is instead
                 * of being cloned (one copy per parameter per step). */
                ml_release(gin[i]);
                gin[i] = NULL;
                if (--s->pending == 0 && rc == 0 && leaf_done(s) < 0) rc = -1;
            }
            ml_release(gin[i]);
        }
    }
    free(ready);
reset:
    for (size_t k = 0; k < g.n_nodes; k++) {
        ml_node *n = g.nodes[k];
        n->seq = 0;
        ml_release(n->grad_acc);
        n->grad_acc = NULL;
        if (!retain_graph) drop_saved(n);
    }
    for (size_t i = 0; i < g.n_leaves; i++) ml_release(g.leaves[i].acc);
out:
    ml_release(seed);
    free(g.nodes);
    free(g.leaves);
    free(lm.keys);
    free(lm.vals);
    ml_set_grad_enabled(prev);
    return rc;
}
