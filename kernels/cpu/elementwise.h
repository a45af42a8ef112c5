/* elementwise.h — CPU elementwise kernels (binary, unary and their
 * backward, clamp, where).  The CUDA twins in kernels/cuda/elementwise.h
 * have the same signatures with _cuda.
 *
 * Contract shared by every kernel here:
 *   - All tensor arguments have out's shape exactly; broadcasting is done by
 *     the caller with stride-0 views.  Inputs may have any strides.
 *   - out may have any strides (in-place ops pass a possibly non-contiguous
 *     destination) but must not overlap itself; an input may alias out only
 *     element for element (same data pointer and strides), as in x.add_(y).
 *   - Inputs already have the compute dtype: a and b share one dtype; out
 *     has that dtype, or ML_BOOL for comparisons.  The host converts mixed
 *     dtypes first.  CPU kernels take f32/f64 and integer dtypes (per op, see
 *     below); the host runs f16/bf16 through f32 on the CPU.
 *   - Return 0, or -1 with ml_error() for an unsupported dtype. */
#ifndef ML_KERNELS_CPU_ELEMENTWISE_H
#define ML_KERNELS_CPU_ELEMENTWISE_H

#include "tensor.h"
#include "ops.h"

/* out = a op b.  Floats: every op.  i32/i64/u8: all but DIV (POW wraps).
 * bool: ADD (or), MUL (and), MAXIMUM (or), MINIMUM (and), comparisons. */
int ml_binary_cpu(ml_binop op, ml_tensor *out, const ml_tensor *a, const ml_tensor *b);
/* out = a op s, or s op a when scalar_first; s is first converted to a's
 * dtype. */
int ml_binary_scalar_cpu(ml_binop op, ml_tensor *out, const ml_tensor *a, double s, bool scalar_first);
/* out = op(x), same dtype.  Floats: every op; integers: NEG, ABS, SQUARE,
 * RELU, SIGN, ROUND, FLOOR. */
int ml_unary_cpu(ml_unop op, ml_tensor *out, const ml_tensor *x);
/* dx = dy * op'(x) (closed forms; zero for ROUND, FLOOR, SIGN).  Floats. */
int ml_unary_backward_cpu(ml_unop op, ml_tensor *dx, const ml_tensor *dy, const ml_tensor *x);
/* out = min(max(x, lo), hi); NaN stays NaN.  Floats and integers. */
int ml_clamp_cpu(ml_tensor *out, const ml_tensor *x, double lo, double hi);
/* dx = dy where lo <= x <= hi, else 0.  Floats. */
int ml_clamp_backward_cpu(ml_tensor *dx, const ml_tensor *dy, const ml_tensor *x, double lo, double hi);
/* out = cond ? a : b; cond is ML_BOOL or ML_U8, a/b/out one dtype (any). */
int ml_where_cpu(ml_tensor *out, const ml_tensor *cond, const ml_tensor *a, const ml_tensor *b);

/* "add", "gelu_tanh", ... for messages and autograd node names. */
const char *ml_binop_name(ml_binop op);
const char *ml_unop_name(ml_unop op);

#endif
