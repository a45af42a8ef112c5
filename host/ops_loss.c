/* ops_loss.c — losses, composed from recorded elementwise ops and
 * reductions so their gradients come from those ops' nodes. */
#include "ops.h"

/* mean/sum/none of (a - b)^2.  Unlike PyTorch, which only warns, differing
 * shapes are an error: broadcasting a prediction against its target is
 * almost always a bug. */
ml_tensor *ml_mse_loss(ml_tensor *a, ml_tensor *b, ml_reduction r) {
    if (!a || !b) return ml_error_null("mse_loss: missing argument");
    if (!ml_same_shape(a, b)) {
        char b1[128], b2[128];
        return ml_error_null("mse_loss: input of shape %s and target of shape %s differ",
                             ml_shape_str(a, b1, sizeof b1), ml_shape_str(b, b2, sizeof b2));
    }
    if (!ml_dtype_is_float(a->dtype) || !ml_dtype_is_float(b->dtype))
        return ml_error_null("mse_loss: needs float tensors (got %s and %s)", ml_dtype_name(a->dtype),
                             ml_dtype_name(b->dtype));
    if (r != ML_REDUCE_NONE && r != ML_REDUCE_MEAN && r != ML_REDUCE_SUM)
        return ml_error_null("mse_loss: unknown reduction %d", (int)r);
    ml_tensor *d = ml_sub(a, b);
    ml_tensor *sq = d ? ml_unary(ML_SQUARE, d) : NULL;
    ml_release(d);
    if (!sq || r == ML_REDUCE_NONE) return sq;
    ml_tensor *out = r == ML_REDUCE_MEAN ? ml_mean(sq, 0, NULL, false) : ml_sum(sq, 0, NULL, false);
    ml_release(sq);
    return out;
}
