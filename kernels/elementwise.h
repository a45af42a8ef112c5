/* elementwise.h — elementwise kernels (binary, unary and their backward,
 * clamp, where, the fused GEGLU): kernels/cpu/elementwise.c and
 * kernels/cuda/elementwise.cu, elementwise_unary.cu.  The op codes
 * (ml_binop, ml_unop) and their names are in kernel.h.
 *
 * What the host op has done before the call:
 *   - every operand has out's shape exactly; broadcasting is stride-0 views;
 *   - inputs have the compute dtype: a and b share one dtype, out has that
 *     dtype (ML_BOOL for comparisons); x, dy and dx of a backward share
 *     one float dtype; where's cond is ML_BOOL or ML_U8 and a, b, out share
 *     a dtype; mixed dtypes were converted first, and on the CPU float16 /
 *     bfloat16 were widened to float32;
 *   - every operand is on out's device.
 * Inputs and out may have any strides; out must not overlap itself, and an
 * input may alias out only element for element (same data pointer and
 * strides), as in x.add_(y).  GEGLU is the exception: its operands have
 * their own shapes and are contiguous (see its declaration).
 *
 * Which dtypes each op computes is the kernels' to say (an unsupported one
 * is an error naming op and dtype):
 *   binary     floats: every op.  int32/int64/uint8: all but DIV (POW
 *              wraps).  bool: ADD (or), MUL (and), MAXIMUM (or), MINIMUM
 *              (and), comparisons.
 *   unary      floats: every op; integers: NEG, ABS, SQUARE, RELU, SIGN,
 *              ROUND, FLOOR.
 *   backward   floats; zero for ROUND, FLOOR, SIGN.
 *   clamp      floats and integers; NaN stays NaN.
 *   where      any dtype.
 *   geglu      floats.
 * The CUDA kernels take float16 and bfloat16 directly, computing in
 * float32 and rounding once; arithmetic follows the CPU expression for
 * expression, transcendental functions come from CUDA's libdevice (so they
 * may differ from glibc's in the last bits).  Return 0 / -1. */
#ifndef ML_KERNELS_ELEMENTWISE_H
#define ML_KERNELS_ELEMENTWISE_H

#include "kernel.h"

/* out = a op b. */
ML_KERNEL(ml_binary, (ml_binop op, ml_ktensor *out, const ml_ktensor *a, const ml_ktensor *b));
/* out = a op s, or s op a when scalar_first; s is first converted to a's
 * dtype. */
ML_KERNEL(ml_binary_scalar, (ml_binop op, ml_ktensor *out, const ml_ktensor *a, double s, bool scalar_first));
/* out = op(x), same dtype. */
ML_KERNEL(ml_unary, (ml_unop op, ml_ktensor *out, const ml_ktensor *x));
/* dx = dy * op'(x) (closed forms). */
ML_KERNEL(ml_unary_backward, (ml_unop op, ml_ktensor *dx, const ml_ktensor *dy, const ml_ktensor *x));
/* out = min(max(x, lo), hi): with lo > hi every element becomes hi. */
ML_KERNEL(ml_clamp, (ml_ktensor *out, const ml_ktensor *x, double lo, double hi));
/* dx = dy where lo <= x <= hi, else 0. */
ML_KERNEL(ml_clamp_backward, (ml_ktensor *dx, const ml_ktensor *dy, const ml_ktensor *x, double lo, double hi));
/* out = cond ? a : b. */
ML_KERNEL(ml_where, (ml_ktensor *out, const ml_ktensor *cond, const ml_ktensor *a, const ml_ktensor *b));

/* GEGLU, the gated GELU of Stable Diffusion's feed-forward blocks, in one
 * pass over h instead of two strided halves and a product.  h [..., 2n]
 * and out [..., n] (dh [..., 2n], dout [..., n]) are contiguous and share
 * one float dtype; a = h[..., :n] is the value, b = h[..., n:] the gate:
 *   forward    out = a * gelu(b), gelu the exact erf form of ML_GELU;
 *   backward   dh[..., :n] = dout * gelu(b), dh[..., n:] = dout * a * gelu'(b),
 *              both halves written by the one call.
 * The CPU computes f32 and f64 (the host widens f16/bf16 to f32); CUDA
 * also takes f16/bf16, computing in f32 and rounding each result once. */
ML_KERNEL(ml_geglu, (ml_ktensor *out, const ml_ktensor *h));
ML_KERNEL(ml_geglu_backward, (ml_ktensor *dh, const ml_ktensor *dout, const ml_ktensor *h));

#endif
