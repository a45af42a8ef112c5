/* ops_optim.c — the optimizer ops: the fused AdamW step on one tensor or on
 * a list of them, and the total gradient norm and in-place scaling over a
 * list that clip_grad_norm is made of (lua/moonlit/optim.lua).
 *
 * Every argument is checked here, once, before anything is written: list
 * lengths, shapes, devices, dtypes, contiguity, and that no tensor the call
 * writes shares memory with another tensor of the call (a parameter listed
 * twice would be stepped twice by a loop, but raced on by a GPU kernel).
 * The kernels (kernels/optim.h) then get plain descriptors and trust them. */
#include "ops.h"
#include "dispatch.h"
#include "optim.h"
#include "checked_math.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- shared checks -------------------------------------------------------- */

/* "parameter 3: " when the list has more than one entry (1-based, as the
 * Lua lists the tensors come from), "" for a single tensor. */
static const char *which(char *buf, size_t n, const char *noun, int64_t count, int64_t k) {
    if (count <= 1) buf[0] = 0;
    else snprintf(buf, n, "%s %lld: ", noun, (long long)(k + 1));
    return buf;
}

/* "parameter 3's exp_avg" (or "the exp_avg" for a single entry); "tensor 3"
 * where the list holds one kind of tensor (role ""). */
static const char *subject(char *buf, size_t n, const char *noun, const char *role, int64_t count, int64_t k) {
    if (!role[0]) snprintf(buf, n, "%s %lld", noun, (long long)(k + 1));
    else if (count <= 1) snprintf(buf, n, "the %s", role);
    else snprintf(buf, n, "%s %lld's %s", noun, (long long)(k + 1), role);
    return buf;
}

/* A byte range of a storage that the call reads or writes. */
typedef struct {
    const ml_storage *storage;
    size_t begin, end;
    int64_t index;      /* list position */
    int role;           /* index into the caller's role names */
    bool written;
} span;

static int begin_cmp(const void *a, const void *b) {
    const span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

/* Sorts s by (storage, begin).  A step lists ~3,500 spans, and qsort's
 * indirect comparisons cost more than the rest of the op's host work; an
 * LSD radix sort on the bytes in which the storage pointers differ (a few:
 * allocations share their high bytes) is linear.  Runs of one storage
 * (views of one buffer) are then sorted by begin. */
static int sort_spans(span *s, size_t n) {
    if (n < 2) return 0;
    span *tmp = malloc(n * sizeof *tmp);   /* n * sizeof fits: the caller allocated s so */
    if (!tmp) return ml_error("out of host memory sorting %zu tensor ranges", n);
    uintptr_t diff = 0;
    for (size_t i = 1; i < n; i++) diff |= (uintptr_t)s[i].storage ^ (uintptr_t)s[0].storage;
    span *from = s, *to = tmp;
    for (unsigned shift = 0; shift < 8 * sizeof(uintptr_t); shift += 8) {
        if (((diff >> shift) & 0xff) == 0) continue;
        size_t at[257] = {0};
        for (size_t i = 0; i < n; i++) at[(((uintptr_t)from[i].storage >> shift) & 0xff) + 1]++;
        for (int b = 0; b < 256; b++) at[b + 1] += at[b];
        for (size_t i = 0; i < n; i++) to[at[((uintptr_t)from[i].storage >> shift) & 0xff]++] = from[i];
        span *t = from;
        from = to;
        to = t;
    }
    if (from != s) memcpy(s, from, n * sizeof *s);
    free(tmp);
    for (size_t i = 0, j; i < n; i = j) {
        for (j = i + 1; j < n && s[j].storage == s[i].storage; j++) {}
        if (j - i > 1) qsort(s + i, j - i, sizeof *s, begin_cmp);
    }
    return 0;
}

static void span_of(span *s, const ml_tensor *t, int64_t index, int role, bool written) {
    size_t el = ml_dtype_size(t->dtype);
    s->storage = t->storage;
    s->begin = (size_t)t->offset * el;   /* inside the storage: ml_from_storage checked */
    s->end = s->begin + (size_t)ml_numel(t) * el;
    s->index = index;
    s->role = role;
    s->written = written;
}

/* Fails if a written span overlaps any other span (read-only spans may
 * overlap each other).  Sorted by start within each storage, a span
 * overlaps an earlier one exactly when it starts before the furthest end
 * seen so far, so one sweep finds every conflict. */
static int check_disjoint(const char *op, span *s, size_t n, const char *const *roles, int64_t count,
                          const char *noun) {
    if (sort_spans(s, n) < 0) return -1;
    const span *far_w = NULL, *far_r = NULL;   /* the furthest-ending written / read span of this storage */
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && s[i].storage != s[i - 1].storage) far_w = far_r = NULL;
        const span *hit = NULL;
        if (far_w && s[i].begin < far_w->end) hit = far_w;
        else if (s[i].written && far_r && s[i].begin < far_r->end) hit = far_r;
        if (hit) {
            char a[64], b[64];
            return ml_error("%s: %s shares memory with %s (a tensor listed twice, or a view of another one?): "
                            "each tensor the op writes must have memory of its own",
                            op, subject(a, sizeof a, noun, roles[s[i].role], count, s[i].index),
                            subject(b, sizeof b, noun, roles[hit->role], count, hit->index));
        }
        const span **far = s[i].written ? &far_w : &far_r;
        if (!*far || s[i].end > (*far)->end) *far = &s[i];
    }
    return 0;
}

/* A one-element f32 tensor on dev (grad_scale, scale). */
static int check_scale(const char *op, const char *what, const ml_tensor *s, ml_device dev) {
    if (s->dtype != ML_F32 || ml_numel(s) != 1)
        return ml_error("%s: %s must be a one-element float32 tensor (got %s with %lld elements)", op, what,
                        ml_dtype_name(s->dtype), (long long)ml_numel(s));
    if (!ml_device_eq(s->device, dev)) {
        char a[16], b[16];
        ml_device_str(s->device, a, sizeof a);
        ml_device_str(dev, b, sizeof b);
        return ml_error("%s: %s is on %s but the tensors are on %s", op, what, a, b);
    }
    return 0;
}

static int check_list_length(const char *op, int64_t n) {
    if (n < 1) return ml_error("%s: the list of tensors is empty", op);
    /* The GPU's chunk table holds 32-bit tensor indices. */
    if (n > INT32_MAX) return ml_error("%s: %lld tensors in one call, at most %d", op, (long long)n, INT32_MAX);
    return 0;
}

static bool is_float(ml_dtype t) { return t == ML_F32 || t == ML_F64 || t == ML_F16 || t == ML_BF16; }

/* ---- AdamW ------------------------------------------------------------------ */

/* The dtype combinations the kernels take (kernels/optim.h), or an error
 * naming the four dtypes.  The CPU's bf16-sr step takes a gradient of the
 * parameter's dtype or f32 only. */
static int check_adamw_dtypes(const char *pre, const ml_tensor *p, const ml_tensor *g, const ml_tensor *m,
                              const ml_tensor *v) {
    ml_dtype tp = p->dtype, tg = g->dtype, tm = m->dtype, tv = v->dtype;
    if (tp == ML_F16)
        return ml_error("adamw: %sf16 parameters are not supported (stochastic rounding is done for bf16): keep "
                        "f32 or bf16 parameters", pre);
    bool cpu = p->device.type == ML_CPU;
    bool ok;
    if (tp == ML_F64 || tg == ML_F64 || tm == ML_F64 || tv == ML_F64) {
        ok = tp == ML_F64 && tg == ML_F64 && tm == ML_F64 && tv == ML_F64;
    } else if (tp == ML_F32 && tm == ML_F32 && tv == ML_F32) {
        ok = tg == ML_F32 || tg == ML_BF16 || tg == ML_F16;
    } else {
        bool p_ok = tp == ML_F32 || tp == ML_BF16;
        bool s_ok = tm == tv && (tm == ML_F32 || tm == ML_BF16);
        bool g_ok = cpu ? (tg == tp || tg == ML_F32) : (tg == ML_F32 || tg == ML_BF16 || tg == ML_F16);
        ok = p_ok && s_ok && g_ok;
    }
    if (ok) return 0;
    return ml_error("adamw: %sunsupported dtypes (param %s, grad %s, exp_avg %s, exp_avg_sq %s): use f64 "
                    "throughout, or f32 params and moments with an f32, bf16 or f16 grad, or (bf16-sr) an f32 or "
                    "bf16 param with f32 or bf16 moments of one dtype and a grad of the param's dtype or f32%s",
                    pre, ml_dtype_name(tp), ml_dtype_name(tg), ml_dtype_name(tm), ml_dtype_name(tv),
                    cpu ? "" : " or f16");
}

static const char *const adamw_roles[5] = {"param", "gradient", "exp_avg", "exp_avg_sq", "shadow"};

/* A parameter's autocast shadow (ml_adamw_args.shadows): the param's shape
 * and device, contiguous, floating in another dtype, and not a tensor
 * autograd tracks (the step writes it whatever the grad mode). */
static int check_shadow(const char *pre, const ml_tensor *p, const ml_tensor *sh) {
    if (!ml_same_shape(sh, p)) {
        char b1[128], b2[128];
        return ml_error("adamw: %sshadow of shape %s does not match the parameter's shape %s", pre,
                        ml_shape_str(sh, b1, sizeof b1), ml_shape_str(p, b2, sizeof b2));
    }
    if (!ml_device_eq(sh->device, p->device)) return ml_error("adamw: %sshadow is not on the parameter's device", pre);
    if (!is_float(sh->dtype) || sh->dtype == p->dtype)
        return ml_error("adamw: %sshadow must be a floating dtype other than the parameter's %s (got %s)", pre,
                        ml_dtype_name(p->dtype), ml_dtype_name(sh->dtype));
    if (!ml_is_contiguous(sh)) return ml_error("adamw: %sshadow must be contiguous", pre);
    if (sh->requires_grad) return ml_error("adamw: %sshadow requires grad (a shadow is a plain copy)", pre);
    return 0;
}

int ml_adamw_multi_(int64_t n, ml_tensor *const *params, ml_tensor *const *grads, ml_tensor *const *exp_avgs,
                    ml_tensor *const *exp_avg_sqs, const int64_t *steps, const ml_adamw_args *a,
                    uint64_t *blocks_used) {
    if (check_list_length("adamw", n) < 0) return -1;
    if (!params || !grads || !exp_avgs || !exp_avg_sqs || !steps || !a) return ml_error("adamw: missing argument");
    int rc = -1;
    size_t nspans = 0;
    span *spans = NULL;
    ml_adamw_tensor *items = NULL;
    ml_device *devs = NULL;
    size_t sp_bytes, it_bytes;
    if (!ml_mul_size((size_t)n, 5 * sizeof *spans, &sp_bytes) || !ml_mul_size((size_t)n, sizeof *items, &it_bytes))
        return ml_error("adamw: %lld tensors is too many", (long long)n);
    spans = malloc(sp_bytes);
    items = malloc(it_bytes);
    devs = malloc((size_t)n * sizeof *devs);
    if (!spans || !items || !devs) {
        ml_error("adamw: out of host memory for a list of %lld tensors", (long long)n);
        goto done;
    }
    uint64_t offset = a->offset;
    for (int64_t k = 0; k < n; k++) {
        char pre[48];
        which(pre, sizeof pre, "parameter", n, k);
        ml_tensor *t4[4] = {params[k], grads[k], exp_avgs[k], exp_avg_sqs[k]};
        for (int r = 0; r < 4; r++)
            if (!t4[r]) { ml_error("adamw: %smissing %s", pre, adamw_roles[r]); goto done; }
        ml_tensor *p = t4[0];
        if (steps[k] < 1) {
            ml_error("adamw: %sstep must be >= 1 (got %lld)", pre, (long long)steps[k]);
            goto done;
        }
        for (int r = 1; r < 4; r++) {
            if (!ml_same_shape(t4[r], p)) {
                char b1[128], b2[128];
                ml_error("adamw: %s%s of shape %s does not match the parameter's shape %s", pre, adamw_roles[r],
                         ml_shape_str(t4[r], b1, sizeof b1), ml_shape_str(p, b2, sizeof b2));
                goto done;
            }
            if (!ml_device_eq(t4[r]->device, p->device)) {
                ml_error("adamw: %s%s is not on the parameter's device", pre, adamw_roles[r]);
                goto done;
            }
        }
        if (check_adamw_dtypes(pre, p, t4[1], t4[2], t4[3]) < 0) goto done;
        for (int r = 0; r < 4; r++) {
            if (!ml_is_contiguous(t4[r])) {
                ml_error("adamw: %s%s must be contiguous", pre, adamw_roles[r]);
                goto done;
            }
        }
        if (a->grad_scale && check_scale("adamw", "grad_scale", a->grad_scale, p->device) < 0) goto done;
        ml_tensor *sh = a->shadows ? a->shadows[k] : NULL;
        if (sh && check_shadow(pre, p, sh) < 0) goto done;
        if (ml_numel(p) > 0) {
            for (int r = 0; r < 4; r++) span_of(&spans[nspans++], t4[r], k, r, r != 1);
            if (sh) span_of(&spans[nspans++], sh, k, 4, true);
        }
        items[k] = (ml_adamw_tensor){
            .param = ml_data(p), .grad = ml_data(t4[1]), .exp_avg = ml_data(t4[2]), .exp_avg_sq = ml_data(t4[3]),
            .numel = ml_numel(p), .step = steps[k], .offset = offset,
            .param_dtype = p->dtype, .grad_dtype = t4[1]->dtype, .state_dtype = t4[2]->dtype,
            .shadow = sh ? ml_data(sh) : NULL, .shadow_dtype = sh ? sh->dtype : p->dtype};
        devs[k] = p->device;
        /* A 64-bit counter: wrapping is what a generator advanced tensor by
         * tensor would do too. */
        offset += ml_adamw_blocks(p->dtype, t4[2]->dtype, ml_numel(p));
    }
    if (check_disjoint("adamw", spans, nspans, adamw_roles, n, "parameter") < 0) goto done;

    for (int64_t k = 0; k < n; k++) {
        ml_mark_modified(params[k]);
        ml_mark_modified(exp_avgs[k]);
        ml_mark_modified(exp_avg_sqs[k]);
        if (a->shadows && a->shadows[k]) ml_mark_modified(a->shadows[k]);
    }
    ml_adamw_hparams h = {a->lr, a->beta1, a->beta2, a->eps, a->weight_decay, a->seed,
                          a->grad_scale ? (const float *)ml_data(a->grad_scale) : NULL};
    /* One kernel call per device, in order of first appearance (almost
     * always one).  The offsets were fixed above in list order, so the
     * grouping changes no bits.  Same-device entries move to the front of
     * the unprocessed part, keeping their order. */
    rc = 0;
    for (int64_t start = 0; start < n && rc == 0;) {
        ml_device dev = devs[start];
        int64_t end = start;
        for (int64_t k = start; k < n; k++) {
            if (!ml_device_eq(devs[k], dev)) continue;
            ml_adamw_tensor it = items[k];
            memmove(&items[end + 1], &items[end], (size_t)(k - end) * sizeof *items);
            memmove(&devs[end + 1], &devs[end], (size_t)(k - end) * sizeof *devs);
            items[end] = it;
            devs[end] = dev;
            end++;
        }
        rc = ML_RUN(dev, ml_adamw_multi, dev, &h, end - start, items + start);
        start = end;
    }
    if (rc == 0 && blocks_used) *blocks_used = offset - a->offset;
done:
    free(spans);
    free(items);
    free(devs);
    return rc;
}

/* Like PyTorch's optimizer.step(), which runs under no_grad, this updates
 * parameters that require grad whatever the grad mode. */
int ml_adamw_step_(ml_tensor *p, ml_tensor *g, ml_tensor *m, ml_tensor *v, double lr, double b1, double b2,
                   double eps, double wd, int64_t step, uint64_t seed, uint64_t offset) {
    ml_adamw_args a = {lr, b1, b2, eps, wd, seed, offset, NULL};
    return ml_adamw_multi_(1, &p, &g, &m, &v, &step, &a, NULL);
}

uint64_t ml_adamw_random_blocks(const ml_tensor *p, const ml_tensor *m, const ml_tensor *v) {
    ml_dtype state = m->dtype == ML_BF16 || v->dtype == ML_BF16 ? ML_BF16 : m->dtype;
    return ml_adamw_blocks(p->dtype, state, ml_numel(p));
}

/* ---- norm and scale ----------------------------------------------------------- */

/* The descriptors of a list of floating tensors on one device; *dev gets it. */
static int optim_list(const char *op, int64_t n, ml_tensor *const *xs, ml_optim_tensor *out, ml_device *dev) {
    for (int64_t k = 0; k < n; k++) {
        char pre[48];
        which(pre, sizeof pre, "tensor", n, k);
        const ml_tensor *x = xs[k];
        if (!x) return ml_error("%s: %smissing tensor", op, pre);
        if (k == 0) *dev = x->device;
        if (!ml_device_eq(x->device, *dev)) {
            char a[16], b[16];
            ml_device_str(x->device, a, sizeof a);
            ml_device_str(*dev, b, sizeof b);
            return ml_error("%s: %sis on %s but tensor 1 is on %s: one call takes tensors of one device", op, pre,
                            a, b);
        }
        if (!is_float(x->dtype))
            return ml_error("%s: %sdtype %s is not a floating type (f32, f64, f16, bf16)", op, pre,
                            ml_dtype_name(x->dtype));
        if (!ml_is_contiguous(x)) return ml_error("%s: %smust be contiguous", op, pre);
        out[k] = (ml_optim_tensor){ml_data(x), ml_numel(x), x->dtype};
    }
    return 0;
}

static ml_optim_tensor *optim_alloc(const char *op, int64_t n) {
    size_t bytes;
    if (!ml_mul_size((size_t)n, sizeof(ml_optim_tensor), &bytes)) {
        ml_error("%s: %lld tensors is too many", op, (long long)n);
        return NULL;
    }
    ml_optim_tensor *l = malloc(bytes);
    if (!l) ml_error("%s: out of host memory for a list of %lld tensors", op, (long long)n);
    return l;
}

int ml_grad_norm_multi(int64_t n, ml_tensor *const *xs, double norm_type, double max_norm, ml_tensor **norm,
                       ml_tensor **coef) {
    const char *op = "grad_norm";
    *norm = *coef = NULL;
    if (check_list_length(op, n) < 0) return -1;
    if (!(norm_type > 0)) return ml_error("%s: norm_type must be > 0 or math.huge (got %g)", op, norm_type);
    if (!(max_norm >= 0)) return ml_error("%s: max_norm must be >= 0 (got %g)", op, max_norm);
    ml_optim_tensor *l = optim_alloc(op, n);
    if (!l) return -1;
    ml_device dev;
    int rc = optim_list(op, n, xs, l, &dev);
    if (rc == 0) {
        *norm = ml_empty(0, NULL, ML_F32, dev);
        *coef = *norm ? ml_empty(0, NULL, ML_F32, dev) : NULL;
        rc = *coef ? 0 : -1;
    }
    if (rc == 0) {
        float *pn = ml_data(*norm), *pc = ml_data(*coef);
        rc = ML_RUN(dev, ml_grad_norm_multi, dev, n, l, norm_type, max_norm, pn, pc);
    }
    free(l);
    if (rc < 0) {
        ml_release(*norm);
        ml_release(*coef);
        *norm = *coef = NULL;
    }
    return rc;
}

static const char *const scale_roles[1] = {""};

int ml_scale_multi_(int64_t n, ml_tensor *const *xs, const ml_tensor *scale) {
    const char *op = "scale_";
    if (check_list_length(op, n) < 0) return -1;
    if (!scale) return ml_error("%s: missing scale", op);
    ml_optim_tensor *l = optim_alloc(op, n);
    span *spans = l ? malloc((size_t)n * sizeof *spans) : NULL;   /* n * sizeof fits: l's size did */
    ml_device dev;
    int rc = -1;
    if (l && !spans) ml_error("%s: out of host memory for a list of %lld tensors", op, (long long)n);
    if (spans && optim_list(op, n, xs, l, &dev) == 0 && check_scale(op, "scale", scale, dev) == 0) {
        size_t ns = 0;
        for (int64_t k = 0; k < n; k++)
            if (ml_numel(xs[k]) > 0) span_of(&spans[ns++], xs[k], k, 0, true);
        rc = check_disjoint(op, spans, ns, scale_roles, n, "tensor");
        /* The in-place gate refuses a tensor of a graph; ask it about all of
         * them before letting it bump any version. */
        for (int64_t k = 0; k < n && rc == 0; k++)
            if (ml_grad_enabled() && xs[k]->requires_grad) rc = ml_inplace_begin(op, xs[k]);
        for (int64_t k = 0; k < n && rc == 0; k++) rc = ml_inplace_begin(op, xs[k]);
        if (rc == 0) {
            const float *s = ml_data(scale);
            rc = ML_RUN(dev, ml_scale_multi, dev, n, l, s);
        }
    }
    free(l);
    free(spans);
    return rc;
}
