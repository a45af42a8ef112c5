/* test_kernel_boundary.c — what crosses from host ops into kernels: the
 * plain descriptor (kernels/kernel.h) and ML_KT, the descriptor helpers,
 * the copy and fill kernels behind ml_copy_/ml_fill_/ml_to_doubles on
 * views, broadcasts, conversions and overlaps, the profiler names ML_RUN
 * times them under, what attention's CPU kernel still reports itself, and,
 * in a CUDA build, that every kernel pair declared
 * with ML_KERNEL has its CUDA twin linked in (the weak references would let
 * a missing one link silently). */
#include "check.h"
#include "dispatch.h"
#include "ops.h"
#include "profile.h"
#include "tensor.h"
#include "attention.h"
#include "conv2d.h"
#include "copy.h"
#include "elementwise.h"
#include "index.h"
#include "matmul.h"
#include "norm.h"
#include "optim.h"
#include "random.h"
#include "reduce.h"
#include "softmax.h"
#include "upsample.h"
#include <stdlib.h>
#include <string.h>

static ml_tensor *arange_f32(int ndim, const int64_t *shape) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    ml_tensor *flat = ml_arange(0, (double)n, 1, ML_F32, ml_cpu());
    ml_tensor *t = flat ? ml_view(flat, ndim, shape) : NULL;
    ml_release(flat);
    return t;
}

static bool values_are(const ml_tensor *t, const double *want, int64_t n) {
    double *v = ml_to_doubles(t);
    bool ok = v != NULL;
    for (int64_t i = 0; ok && i < n; i++) ok = v[i] == want[i];
    free(v);
    return ok;
}

static void test_descriptor_of_views(void) {
    CHECK(ML_KT(NULL) == NULL, "the descriptor of no tensor is NULL (an argument not wanted)");
    ml_tensor *x = arange_f32(2, (int64_t[]){3, 4});
    ml_tensor *col = x ? ml_narrow(x, 1, 1, 2) : NULL;      /* [3, 2], offset 1, strides {4, 1} */
    ml_tensor *tr = col ? ml_transpose(col, 0, 1) : NULL;   /* [2, 3], strides {1, 4} */
    CHECK(tr != NULL, "views: %s", ml_last_error());
    if (!tr) goto out;
    ml_ktensor *k = ML_KT(tr);
    CHECK(k->data == ml_data(tr) && (float *)k->data == (float *)x->storage->data + 1,
          "data points at the view's first element (offset applied)");
    CHECK(k->ndim == 2 && k->shape[0] == 2 && k->shape[1] == 3 && k->strides[0] == 1 && k->strides[1] == 4,
          "shape and strides copied: [%lld, %lld] / {%lld, %lld}", (long long)k->shape[0], (long long)k->shape[1],
          (long long)k->strides[0], (long long)k->strides[1]);
    CHECK(k->dtype == ML_F32 && ml_device_eq(k->device, ml_cpu()), "dtype and device copied");
    CHECK(ml_kt_numel(k) == 6, "numel of [2, 3]");
    CHECK(!ml_kt_is_contiguous(k), "a transposed view is not contiguous");
    CHECK(ml_kt_is_contiguous(ML_KT(x)), "a fresh tensor is contiguous");
    ml_ktensor one = {.ndim = 3, .shape = {2, 1, 3}, .strides = {3, 99, 1}};
    CHECK(ml_kt_is_contiguous(&one), "a size-1 dim may have any stride");
    char b[16];
    CHECK(strcmp(ml_kt_shape_str(k, b, sizeof b), "[2, 3]") == 0, "shape string: %s", b);
    /* Short buffers are truncated, never overrun (AddressSanitizer runs this too). */
    char tiny[4];
    CHECK(strcmp(ml_kt_shape_str(k, tiny, sizeof tiny), "[2,") == 0, "truncated shape string: %s", tiny);
    CHECK(ml_kt_shape_str(k, tiny, 0) == tiny, "a zero-length buffer is left alone");
    ml_ktensor scalar = {.ndim = 0};
    CHECK(ml_kt_numel(&scalar) == 1 && strcmp(ml_kt_shape_str(&scalar, b, sizeof b), "[]") == 0,
          "a 0-dim descriptor has one element and shape []");
    int64_t st[3];
    ml_kt_contiguous_strides(3, (int64_t[]){2, 0, 5}, st);
    CHECK(st[0] == 5 && st[1] == 5 && st[2] == 1, "zero sizes count as 1 in contiguous strides");
out:
    ml_release(tr); ml_release(col); ml_release(x);
}

static void test_copy_kernel(void) {
    /* Broadcast: a [3] row copied into every row of [2, 3] (stride-0 source). */
    ml_tensor *row = ml_from_doubles((double[]){1, 2, 3}, 1, (int64_t[]){3}, ML_F64);
    ml_tensor *dst = ml_zeros(2, (int64_t[]){2, 3}, ML_F32, ml_cpu());
    CHECK(row && dst && ml_copy_(dst, row) == 0, "broadcast copy: %s", ml_last_error());
    CHECK(values_are(dst, (double[]){1, 2, 3, 1, 2, 3}, 6), "a row broadcast over [2, 3], f64 to f32");
    /* Into a transposed destination, converting to int32 (truncation). */
    ml_tensor *src = ml_from_doubles((double[]){0.5, 1.5, 2.5, -3.7, 4.2, 5.9}, 2, (int64_t[]){3, 2}, ML_F64);
    ml_tensor *base = ml_zeros(2, (int64_t[]){2, 3}, ML_I32, ml_cpu());
    ml_tensor *bt = base ? ml_transpose(base, 0, 1) : NULL;   /* [3, 2] view of [2, 3] */
    CHECK(src && bt && ml_copy_(bt, src) == 0, "copy into a transposed view: %s", ml_last_error());
    CHECK(values_are(base, (double[]){0, 2, 4, 1, -3, 5}, 6), "int32 values land transposed, truncated");
    /* Overlapping views of one buffer, contiguous and of one dtype: moved
     * as memmove does, so the shifted copy is the original. */
    ml_tensor *x = ml_from_doubles((double[]){1, 2, 3, 4, 5}, 1, (int64_t[]){5}, ML_F32);
    ml_tensor *hi = x ? ml_narrow(x, 0, 1, 4) : NULL, *lo = x ? ml_narrow(x, 0, 0, 4) : NULL;
    CHECK(hi && lo && ml_copy_(hi, lo) == 0, "overlapping copy: %s", ml_last_error());
    CHECK(values_are(x, (double[]){1, 1, 2, 3, 4}, 5), "x[2:5] <- x[1:4] reads before it writes");
    /* A shape that does not broadcast is refused by the host, naming both. */
    ml_tensor *bad = ml_zeros(1, (int64_t[]){4}, ML_F32, ml_cpu());
    CHECK(bad && ml_copy_(dst, bad) < 0 && strstr(ml_last_error(), "[4]") && strstr(ml_last_error(), "[2, 3]"),
          "a [4] source into [2, 3]: %s", ml_last_error());
    ml_release(row); ml_release(dst); ml_release(src); ml_release(bt); ml_release(base);
    ml_release(hi); ml_release(lo); ml_release(x); ml_release(bad);
}

static void test_fill_and_read_views(void) {
    ml_tensor *x = ml_zeros(2, (int64_t[]){3, 4}, ML_F64, ml_cpu());
    ml_tensor *col = x ? ml_narrow(x, 1, 2, 1) : NULL;   /* column 2: stride 4 */
    CHECK(col && ml_fill_(col, 7) == 0, "fill a column: %s", ml_last_error());
    CHECK(values_are(x, (double[]){0, 0, 7, 0, 0, 0, 7, 0, 0, 0, 7, 0}, 12), "only the column's elements are 7");
    /* ml_to_doubles reads views in row-major order through the copy kernel. */
    ml_tensor *a = arange_f32(2, (int64_t[]){2, 3});
    ml_tensor *at = a ? ml_transpose(a, 0, 1) : NULL;
    CHECK(at && values_are(at, (double[]){0, 3, 1, 4, 2, 5}, 6), "a transposed view reads in its own order");
    ml_tensor *r = ml_from_doubles((double[]){1, 2}, 2, (int64_t[]){1, 2}, ML_F32);
    ml_tensor *e = r ? ml_expand(r, 2, (int64_t[]){3, 2}) : NULL;
    CHECK(e && values_are(e, (double[]){1, 2, 1, 2, 1, 2}, 6), "a stride-0 expand reads every row");
    ml_tensor *b = ml_from_doubles((double[]){0, 1, 2}, 1, (int64_t[]){3}, ML_BOOL);
    CHECK(b && values_are(b, (double[]){0, 1, 1}, 3), "bool reads as 0/1");
    double one;
    CHECK(b && ml_item(b, &one) < 0, "item of a 3-element tensor is refused");
    ml_release(col); ml_release(x); ml_release(at); ml_release(a); ml_release(e); ml_release(r); ml_release(b);
}

static bool profiled(const ml_profile_entry *e, int n, const char *name, long calls) {
    for (int i = 0; i < n; i++)
        if (strcmp(e[i].name, name) == 0) return e[i].calls == calls;
    return false;
}

static void test_profiled_under_kernel_names(void) {
    ml_tensor *a = ml_zeros(1, (int64_t[]){8}, ML_F32, ml_cpu());   /* its own fill runs before profiling */
    ml_tensor *b = ml_empty(1, (int64_t[]){8}, ML_F32, ml_cpu());
    if (!a || !b) { CHECK(0, "allocation: %s", ml_last_error()); goto out; }
    ml_profile_start();
    int rc = ml_fill_(b, 2);
    if (rc == 0) rc = ml_copy_(a, b);
    if (rc == 0) rc = ml_copy_(b, a);
    ml_profile_entry *e = NULL;
    int n = 0;
    CHECK(ml_profile_stop(&e, &n) == 0 && rc == 0, "profiling: %s", ml_last_error());
    CHECK(profiled(e, n, "ml_fill_cpu", 1), "ml_fill_ runs the fill kernel through ML_RUN, timed once");
    CHECK(profiled(e, n, "ml_copy_cpu", 2), "two copies, timed as ml_copy_cpu");
    free(e);
out:
    ml_release(a); ml_release(b);
}

/* Attention's kernels take descriptors and leave the argument checks to
 * ml_sdpa; what they still report themselves is what the host cannot
 * know: a dtype the CPU does not compute in (called directly), and the
 * size of the CPU's score block.  With head widths 0, k and v are empty
 * whatever Sk is, so Sk is bounded by no tensor: 128 query rows times 2^60
 * keys would wrap the block's byte count. */
static void test_attention_kernel_reports(void) {
    int64_t s4[4] = {1, 4, 1, 8}, l3[3] = {1, 1, 4};
    ml_tensor *q = ml_zeros(4, s4, ML_F16, ml_cpu()), *out = ml_zeros(4, s4, ML_F16, ml_cpu());
    ml_tensor *lse = ml_zeros(3, l3, ML_F32, ml_cpu());
    CHECK(q && out && lse, "half tensors: %s", ml_last_error());
    if (q && out && lse) {
        int rc = ml_sdpa_forward_cpu(ML_KT(out), ML_KT(lse), ML_KT(q), ML_KT(q), ML_KT(q), false, 1);
        CHECK(rc < 0 && strstr(ml_last_error(), "float32 or float64"),
              "the CPU kernel names the dtypes it computes in (rc %d): %s", rc, ml_last_error());
    }
    ml_release(q); ml_release(out); ml_release(lse);

    int64_t sq[4] = {1, 128, 1, 0}, skv[4] = {1, (int64_t)1 << 60, 1, 0};
    ml_tensor *eq = ml_zeros(4, sq, ML_F32, ml_cpu()), *ek = ml_zeros(4, skv, ML_F32, ml_cpu());
    CHECK(eq && ek, "empty q, k: %s", ml_last_error());
    if (eq && ek) {
        ml_tensor *y = ml_sdpa(eq, ek, ek, false, 0);
        CHECK(!y && strstr(ml_last_error(), "score block does not fit"),
              "2^60 keys of width 0: a clear error, not a wrapped allocation: %s", y ? "(no error)" : ml_last_error());
        ml_release(y);
    }
    ml_release(eq); ml_release(ek);
}

static void test_every_twin_is_linked(void) {
#ifdef ML_WITH_CUDA
    /* Each ML_KERNEL declares a weak _cuda reference: a null address here
     * is a pair whose CUDA twin this build lacks. */
    const struct { const char *name; const void *fn; } twins[] = {
#define TWIN(f) {#f "_cuda", (const void *)f##_cuda}
        TWIN(ml_copy), TWIN(ml_fill),
        TWIN(ml_binary), TWIN(ml_binary_scalar), TWIN(ml_unary), TWIN(ml_unary_backward), TWIN(ml_geglu), TWIN(ml_geglu_backward),
        TWIN(ml_clamp), TWIN(ml_clamp_backward), TWIN(ml_where),
        TWIN(ml_matmul_forward), TWIN(ml_matmul_backward), TWIN(ml_linear_forward), TWIN(ml_linear_backward),
        TWIN(ml_gemm), TWIN(ml_colsum),
        TWIN(ml_conv2d_forward), TWIN(ml_conv2d_backward),
        TWIN(ml_group_norm_forward), TWIN(ml_group_norm_backward),
        TWIN(ml_layer_norm_forward), TWIN(ml_layer_norm_backward),
        TWIN(ml_softmax_forward), TWIN(ml_softmax_backward),
        TWIN(ml_sdpa_forward), TWIN(ml_sdpa_backward),
        TWIN(ml_adamw_multi), TWIN(ml_grad_norm_multi), TWIN(ml_scale_multi),
        TWIN(ml_embedding_forward), TWIN(ml_embedding_backward), TWIN(ml_gather_forward),
        TWIN(ml_gather_backward), TWIN(ml_index_select_forward), TWIN(ml_index_select_backward),
        TWIN(ml_upsample_nearest2d_forward), TWIN(ml_upsample_nearest2d_backward),
        TWIN(ml_sum), TWIN(ml_var), TWIN(ml_norm), TWIN(ml_max_dim),
        TWIN(ml_uniform), TWIN(ml_normal), TWIN(ml_randint),
#undef TWIN
    };
    for (size_t i = 0; i < sizeof twins / sizeof twins[0]; i++)
        CHECK(twins[i].fn != NULL, "%s is not linked into this CUDA build", twins[i].name);
#else
    printf("moonlit built without CUDA: no twins to look for\n");
#endif
}

int main(void) {
    test_descriptor_of_views();
    test_copy_kernel();
    test_fill_and_read_views();
    test_profiled_under_kernel_names();
    test_attention_kernel_reports();
    test_every_twin_is_linked();
    return check_summary();
}
