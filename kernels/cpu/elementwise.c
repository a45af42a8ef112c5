/* elementwise.c — CPU elementwise kernels (contract in elementwise.h).
 *
 * One strided walker (ew_run) merges the dims of all operands into as few
 * as possible and calls a typed inner function once per innermost row.  The
 * inner functions are generated per (op, dtype) by macros; each has a branch
 * for unit strides everywhere (contiguous) and for one input of stride 0
 * (scalar operand, or a row broadcast down the leading dims such as a bias
 * [C] against [.., C]), which the compiler vectorises.  Integer unary ops
 * and integer clamp are rare and go through one generic int64 loop. */

/* The Makefile's -O2 keeps GCC's "very cheap" vectoriser, which gives up on
 * any loop needing a runtime aliasing check — i.e. all of these. */
#pragma GCC optimize("O3")

#include "elementwise.h"
#include <stdint.h>
#include <string.h>
#include <tgmath.h>

/* ---- names for messages (declared in kernel.h) ------------------------ */

const char *ml_binop_name(ml_binop op) {
    static const char *k[] = {"add", "sub", "mul", "div", "pow", "maximum", "minimum",
                              "eq", "ne", "lt", "le", "gt", "ge"};
    return (unsigned)op <= ML_GE ? k[op] : "?";
}

const char *ml_unop_name(ml_unop op) {
    static const char *k[] = {"neg", "sqrt", "rsqrt", "exp", "log", "abs", "sin", "cos",
                              "silu", "gelu", "gelu_tanh", "quick_gelu", "sigmoid", "tanh",
                              "relu", "square", "round", "floor", "sign"};
    return (unsigned)op < ML_NUM_UNOPS ? k[op] : "?";
}

/* ---- the strided walker ------------------------------------------------- */

#define EW_MAX_OPS 4

typedef struct { double s, lo, hi; int op; } ew_params;
/* One row: n elements; p[k] the first element of operand k, s[k] its
 * stride in elements (operand 0 is the output). */
typedef void (*ew_fn)(int64_t n, char *const *p, const int64_t *s, const ew_params *prm);
typedef struct { char *ptr; size_t esize; const int64_t *strides; } ew_operand;

static ew_operand opnd(const ml_ktensor *t) {
    ew_operand o = {(char *)t->data, ml_dtype_size(t->dtype), t->strides};
    return o;
}

static void ew_run(int nop, int ndim, const int64_t *shape, const ew_operand *op,
                   ew_fn fn, const ew_params *prm) {
    int64_t sh[ML_MAX_DIMS], st[EW_MAX_OPS][ML_MAX_DIMS];
    int nd = 0;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] == 0) return;
        if (shape[d] == 1) continue;
        bool merge = nd > 0;
        for (int k = 0; k < nop && merge; k++) merge = st[k][nd - 1] == op[k].strides[d] * shape[d];
        if (merge) {
            sh[nd - 1] *= shape[d];
            for (int k = 0; k < nop; k++) st[k][nd - 1] = op[k].strides[d];
        } else {
            sh[nd] = shape[d];
            for (int k = 0; k < nop; k++) st[k][nd] = op[k].strides[d];
            nd++;
        }
    }
    char *p[EW_MAX_OPS];
    int64_t s[EW_MAX_OPS] = {0};
    for (int k = 0; k < nop; k++) p[k] = op[k].ptr;
    if (nd == 0) { fn(1, p, s, prm); return; }
    int64_t n = sh[nd - 1], rows = 1, idx[ML_MAX_DIMS] = {0};
    for (int k = 0; k < nop; k++) s[k] = st[k][nd - 1];
    for (int d = 0; d < nd - 1; d++) rows *= sh[d];
    for (int64_t r = 0; r < rows; r++) {
        fn(n, p, s, prm);
        for (int d = nd - 2; d >= 0; d--) {
            if (++idx[d] < sh[d]) {
                for (int k = 0; k < nop; k++) p[k] += st[k][d] * (int64_t)op[k].esize;
                break;
            }
            idx[d] = 0;
            for (int k = 0; k < nop; k++) p[k] -= st[k][d] * (sh[d] - 1) * (int64_t)op[k].esize;
        }
    }
}

/* ---- binary ------------------------------------------------------------- */

#define DEF_BIN(name, T, TO, EXPR)                                                          \
    static void name(int64_t n, char *const *p, const int64_t *s, const ew_params *prm) {  \
        (void)prm;                                                                          \
        TO *o = (TO *)p[0];                                                                 \
        const T *a = (const T *)p[1], *b = (const T *)p[2];                                 \
        int64_t so = s[0], sa = s[1], sb = s[2];                                            \
        if (so == 1 && sa == 1 && sb == 1) {                                                \
            for (int64_t i = 0; i < n; i++) { T x = a[i], y = b[i]; o[i] = (TO)(EXPR); }    \
        } else if (so == 1 && sa == 1 && sb == 0) {                                         \
            T y = b[0];                                                                     \
            for (int64_t i = 0; i < n; i++) { T x = a[i]; o[i] = (TO)(EXPR); }              \
        } else if (so == 1 && sa == 0 && sb == 1) {                                         \
            T x = a[0];                                                                     \
            for (int64_t i = 0; i < n; i++) { T y = b[i]; o[i] = (TO)(EXPR); }              \
        } else {                                                                            \
            for (int64_t i = 0; i < n; i++) {                                               \
                T x = a[i * sa], y = b[i * sb];                                             \
                o[i * so] = (TO)(EXPR);                                                     \
            }                                                                               \
        }                                                                                   \
    }

#define BIN_COMPARE(T, tn)                              \
    DEF_BIN(bin_eq_##tn, T, uint8_t, x == y)            \
    DEF_BIN(bin_ne_##tn, T, uint8_t, x != y)            \
    DEF_BIN(bin_lt_##tn, T, uint8_t, x < y)             \
    DEF_BIN(bin_le_##tn, T, uint8_t, x <= y)            \
    DEF_BIN(bin_gt_##tn, T, uint8_t, x > y)             \
    DEF_BIN(bin_ge_##tn, T, uint8_t, x >= y)

/* maximum/minimum propagate NaN like PyTorch. */
#define BIN_FLOAT(T, tn)                                        \
    DEF_BIN(bin_add_##tn, T, T, x + y)                          \
    DEF_BIN(bin_sub_##tn, T, T, x - y)                          \
    DEF_BIN(bin_mul_##tn, T, T, x * y)                          \
    DEF_BIN(bin_div_##tn, T, T, x / y)                          \
    DEF_BIN(bin_pow_##tn, T, T, pow(x, y))                      \
    DEF_BIN(bin_max_##tn, T, T, (x > y || x != x) ? x : y)      \
    DEF_BIN(bin_min_##tn, T, T, (x < y || x != x) ? x : y)      \
    BIN_COMPARE(T, tn)

/* x^y for integers by squaring, wrapping like the multiplication; a
 * negative exponent gives 0 except for bases 1 and -1. */
static inline int64_t ipow64(int64_t x, int64_t y) {
    if (y < 0) return x == 1 ? 1 : x == -1 ? (y & 1 ? -1 : 1) : 0;
    uint64_t r = 1, b = (uint64_t)x;
    for (uint64_t e = (uint64_t)y; e; e >>= 1) {
        if (e & 1) r *= b;
        b *= b;
    }
    return (int64_t)r;
}

/* Integer add/sub/mul wrap around (through the unsigned type U) as in
 * PyTorch, without C's signed-overflow undefined behaviour. */
#define BIN_INT(T, U, tn)                                       \
    DEF_BIN(bin_add_##tn, T, T, (U)x + (U)y)                    \
    DEF_BIN(bin_sub_##tn, T, T, (U)x - (U)y)                    \
    DEF_BIN(bin_mul_##tn, T, T, (U)x * (U)y)                    \
    DEF_BIN(bin_pow_##tn, T, T, ipow64(x, y))                   \
    DEF_BIN(bin_max_##tn, T, T, x > y ? x : y)                  \
    DEF_BIN(bin_min_##tn, T, T, x < y ? x : y)                  \
    BIN_COMPARE(T, tn)

BIN_FLOAT(float, f32)
BIN_FLOAT(double, f64)
BIN_INT(int32_t, uint32_t, i32)
BIN_INT(int64_t, uint64_t, i64)
BIN_INT(uint8_t, uint32_t, u8)
DEF_BIN(bin_or_b, uint8_t, uint8_t, x | y)
DEF_BIN(bin_and_b, uint8_t, uint8_t, x & y)
BIN_COMPARE(uint8_t, b)

#define BIN_ROW_COMPARE(tn) \
    [ML_EQ] = bin_eq_##tn, [ML_NE] = bin_ne_##tn, [ML_LT] = bin_lt_##tn, \
    [ML_LE] = bin_le_##tn, [ML_GT] = bin_gt_##tn, [ML_GE] = bin_ge_##tn
#define BIN_ROW_FLOAT(tn) { \
    [ML_ADD] = bin_add_##tn, [ML_SUB] = bin_sub_##tn, [ML_MUL] = bin_mul_##tn, \
    [ML_DIV] = bin_div_##tn, [ML_POW] = bin_pow_##tn, [ML_MAXIMUM] = bin_max_##tn, \
    [ML_MINIMUM] = bin_min_##tn, BIN_ROW_COMPARE(tn) }
#define BIN_ROW_INT(tn) { \
    [ML_ADD] = bin_add_##tn, [ML_SUB] = bin_sub_##tn, [ML_MUL] = bin_mul_##tn, \
    [ML_POW] = bin_pow_##tn, [ML_MAXIMUM] = bin_max_##tn, [ML_MINIMUM] = bin_min_##tn, \
    BIN_ROW_COMPARE(tn) }

static const ew_fn k_bin[ML_NUM_DTYPES][ML_GE + 1] = {
    [ML_F32] = BIN_ROW_FLOAT(f32),
    [ML_F64] = BIN_ROW_FLOAT(f64),
    [ML_I32] = BIN_ROW_INT(i32),
    [ML_I64] = BIN_ROW_INT(i64),
    [ML_U8] = BIN_ROW_INT(u8),
    [ML_BOOL] = {[ML_ADD] = bin_or_b, [ML_MUL] = bin_and_b, [ML_MAXIMUM] = bin_or_b,
                 [ML_MINIMUM] = bin_and_b, BIN_ROW_COMPARE(b)},
};

static ew_fn binary_fn(ml_binop op, ml_dtype in) {
    if ((unsigned)op > ML_GE || (unsigned)in >= ML_NUM_DTYPES) {
        ml_error("binary kernel (cpu): bad op %d or dtype %d", (int)op, (int)in);
        return NULL;
    }
    ew_fn fn = k_bin[in][op];
    if (!fn) ml_error("%s (cpu): dtype %s is not supported", ml_binop_name(op), ml_dtype_name(in));
    return fn;
}

int ml_binary_cpu(ml_binop op, ml_ktensor *out, const ml_ktensor *a, const ml_ktensor *b) {
    ew_fn fn = binary_fn(op, a->dtype);
    if (!fn) return -1;
    ew_operand o[3] = {opnd(out), opnd(a), opnd(b)};
    ew_run(3, out->ndim, out->shape, o, fn, NULL);
    return 0;
}

int ml_binary_scalar_cpu(ml_binop op, ml_ktensor *out, const ml_ktensor *a, double s, bool scalar_first) {
    ew_fn fn = binary_fn(op, a->dtype);
    if (!fn) return -1;
    static const int64_t zero[ML_MAX_DIMS];
    _Alignas(8) char sv[8];
    ml_store_from_double(sv, a->dtype, 0, s);
    ew_operand sc = {sv, ml_dtype_size(a->dtype), zero};
    ew_operand o[3] = {opnd(out), scalar_first ? sc : opnd(a), scalar_first ? opnd(a) : sc};
    ew_run(3, out->ndim, out->shape, o, fn, NULL);
    return 0;
}

/* ---- unary (floats) ----------------------------------------------------- */

#define DEF_UN(name, T, EXPR)                                                               \
    static void name(int64_t n, char *const *p, const int64_t *s, const ew_params *prm) {  \
        (void)prm;                                                                          \
        T *o = (T *)p[0];                                                                   \
        const T *xp = (const T *)p[1];                                                      \
        int64_t so = s[0], sx = s[1];                                                       \
        if (so == 1 && sx == 1) {                                                           \
            for (int64_t i = 0; i < n; i++) { T x = xp[i]; o[i] = (T)(EXPR); }              \
        } else {                                                                            \
            for (int64_t i = 0; i < n; i++) { T x = xp[i * sx]; o[i * so] = (T)(EXPR); }    \
        }                                                                                   \
    }

/* dx = g * f'(x); g is the incoming gradient. */
#define DEF_UNB(name, T, EXPR)                                                              \
    static void name(int64_t n, char *const *p, const int64_t *s, const ew_params *prm) {  \
        (void)prm;                                                                          \
        T *o = (T *)p[0];                                                                   \
        const T *gp = (const T *)p[1], *xp = (const T *)p[2];                               \
        int64_t so = s[0], sg = s[1], sx = s[2];                                            \
        if (so == 1 && sg == 1 && sx == 1) {                                                \
            for (int64_t i = 0; i < n; i++) { T g = gp[i], x = xp[i]; o[i] = (T)(EXPR); }   \
        } else {                                                                            \
            for (int64_t i = 0; i < n; i++) {                                               \
                T g = gp[i * sg], x = xp[i * sx];                                           \
                o[i * so] = (T)(EXPR);                                                      \
            }                                                                               \
        }                                                                                   \
    }

/* Activation helpers and their derivatives, one set per float type.
 * sqrt(2/pi) = 0.7978845608028654, 1/sqrt(2) = 0.7071067811865476,
 * 1/sqrt(2 pi) = 0.3989422804014327. */
#define ACT_HELPERS(T, tn)                                                                  \
    static inline T sigmoid_##tn(T x) { return (T)1 / ((T)1 + exp(-x)); }                  \
    static inline T dsilu_##tn(T x) {                                                       \
        T s = sigmoid_##tn(x);                                                              \
        return s * ((T)1 + x * ((T)1 - s));                                                 \
    }                                                                                       \
    static inline T dgelu_##tn(T x) {                                                       \
        T cdf = (T)0.5 * ((T)1 + erf(x * (T)0.7071067811865476));                           \
        T pdf = exp((T)-0.5 * x * x) * (T)0.3989422804014327;                               \
        return cdf + x * pdf;                                                               \
    }                                                                                       \
    static inline T gelu_tanh_##tn(T x) {                                                   \
        T inner = (T)0.7978845608028654 * (x + (T)0.044715 * x * x * x);                    \
        return (T)0.5 * x * ((T)1 + tanh(inner));                                           \
    }                                                                                       \
    static inline T dgelu_tanh_##tn(T x) {                                                  \
        T x2 = x * x;                                                                       \
        T t = tanh((T)0.7978845608028654 * (x + (T)0.044715 * x2 * x));                     \
        T left = (T)0.5 * x, right = (T)1 + t;                                              \
        T dinner = (T)0.7978845608028654 * ((T)1 + (T)3 * (T)0.044715 * x2);                \
        return (T)0.5 * right + left * ((T)1 - t * t) * dinner;                             \
    }                                                                                       \
    static inline T dquick_gelu_##tn(T x) {                                                 \
        T s = sigmoid_##tn((T)1.702 * x);                                                   \
        return s + (T)1.702 * x * s * ((T)1 - s);                                           \
    }

#define UNARY_FLOAT(T, tn)                                                                  \
    ACT_HELPERS(T, tn)                                                                      \
    DEF_UN(un_neg_##tn, T, -x)                                                              \
    DEF_UN(un_sqrt_##tn, T, sqrt(x))                                                        \
    DEF_UN(un_rsqrt_##tn, T, (T)1 / sqrt(x))                                                \
    DEF_UN(un_exp_##tn, T, exp(x))                                                          \
    DEF_UN(un_log_##tn, T, log(x))                                                          \
    DEF_UN(un_abs_##tn, T, fabs(x))                                                         \
    DEF_UN(un_sin_##tn, T, sin(x))                                                          \
    DEF_UN(un_cos_##tn, T, cos(x))                                                          \
    DEF_UN(un_silu_##tn, T, x / ((T)1 + exp(-x)))                                           \
    DEF_UN(un_gelu_##tn, T, (T)0.5 * x * ((T)1 + erf(x * (T)0.7071067811865476)))           \
    DEF_UN(un_gelu_tanh_##tn, T, gelu_tanh_##tn(x))                                         \
    DEF_UN(un_quick_gelu_##tn, T, x / ((T)1 + exp((T)-1.702 * x)))                          \
    DEF_UN(un_sigmoid_##tn, T, sigmoid_##tn(x))                                             \
    DEF_UN(un_tanh_##tn, T, tanh(x))                                                        \
    DEF_UN(un_relu_##tn, T, (x > 0 || x != x) ? x : (T)0)                                   \
    DEF_UN(un_square_##tn, T, x * x)                                                        \
    DEF_UN(un_round_##tn, T, rint(x))                                                       \
    DEF_UN(un_floor_##tn, T, floor(x))                                                      \
    DEF_UN(un_sign_##tn, T, (T)((x > 0) - (x < 0)))                                         \
    DEF_UNB(unb_neg_##tn, T, ((void)x, -g))                                                          \
    DEF_UNB(unb_sqrt_##tn, T, g * (T)0.5 / sqrt(x))                                         \
    DEF_UNB(unb_rsqrt_##tn, T, g * (T)-0.5 / (x * sqrt(x)))                                 \
    DEF_UNB(unb_exp_##tn, T, g * exp(x))                                                    \
    DEF_UNB(unb_log_##tn, T, g / x)                                                         \
    DEF_UNB(unb_abs_##tn, T, g * (T)((x > 0) - (x < 0)))                                    \
    DEF_UNB(unb_sin_##tn, T, g * cos(x))                                                    \
    DEF_UNB(unb_cos_##tn, T, -g * sin(x))                                                   \
    DEF_UNB(unb_silu_##tn, T, g * dsilu_##tn(x))                                            \
    DEF_UNB(unb_gelu_##tn, T, g * dgelu_##tn(x))                                            \
    DEF_UNB(unb_gelu_tanh_##tn, T, g * dgelu_tanh_##tn(x))                                  \
    DEF_UNB(unb_quick_gelu_##tn, T, g * dquick_gelu_##tn(x))                                \
    DEF_UNB(unb_sigmoid_##tn, T, g * sigmoid_##tn(x) * ((T)1 - sigmoid_##tn(x)))            \
    DEF_UNB(unb_tanh_##tn, T, g * ((T)1 - tanh(x) * tanh(x)))                               \
    DEF_UNB(unb_relu_##tn, T, x > 0 ? g : (T)0)                                             \
    DEF_UNB(unb_square_##tn, T, (T)2 * x * g)                                               \
    DEF_UNB(unb_zero_##tn, T, ((void)g, (void)x, (T)0))

UNARY_FLOAT(float, f32)
UNARY_FLOAT(double, f64)

#define UN_ROW(tn) { \
    [ML_NEG] = un_neg_##tn, [ML_SQRT] = un_sqrt_##tn, [ML_RSQRT] = un_rsqrt_##tn, \
    [ML_EXP] = un_exp_##tn, [ML_LOG] = un_log_##tn, [ML_ABS] = un_abs_##tn, \
    [ML_SIN] = un_sin_##tn, [ML_COS] = un_cos_##tn, [ML_SILU] = un_silu_##tn, \
    [ML_GELU] = un_gelu_##tn, [ML_GELU_TANH] = un_gelu_tanh_##tn, \
    [ML_QUICK_GELU] = un_quick_gelu_##tn, [ML_SIGMOID] = un_sigmoid_##tn, \
    [ML_TANH] = un_tanh_##tn, [ML_RELU] = un_relu_##tn, [ML_SQUARE] = un_square_##tn, \
    [ML_ROUND] = un_round_##tn, [ML_FLOOR] = un_floor_##tn, [ML_SIGN] = un_sign_##tn }
#define UNB_ROW(tn) { \
    [ML_NEG] = unb_neg_##tn, [ML_SQRT] = unb_sqrt_##tn, [ML_RSQRT] = unb_rsqrt_##tn, \
    [ML_EXP] = unb_exp_##tn, [ML_LOG] = unb_log_##tn, [ML_ABS] = unb_abs_##tn, \
    [ML_SIN] = unb_sin_##tn, [ML_COS] = unb_cos_##tn, [ML_SILU] = unb_silu_##tn, \
    [ML_GELU] = unb_gelu_##tn, [ML_GELU_TANH] = unb_gelu_tanh_##tn, \
    [ML_QUICK_GELU] = unb_quick_gelu_##tn, [ML_SIGMOID] = unb_sigmoid_##tn, \
    [ML_TANH] = unb_tanh_##tn, [ML_RELU] = unb_relu_##tn, [ML_SQUARE] = unb_square_##tn, \
    [ML_ROUND] = unb_zero_##tn, [ML_FLOOR] = unb_zero_##tn, [ML_SIGN] = unb_zero_##tn }

static const ew_fn k_un_f32[ML_NUM_UNOPS] = UN_ROW(f32);
static const ew_fn k_un_f64[ML_NUM_UNOPS] = UN_ROW(f64);
static const ew_fn k_unb_f32[ML_NUM_UNOPS] = UNB_ROW(f32);
static const ew_fn k_unb_f64[ML_NUM_UNOPS] = UNB_ROW(f64);

/* ---- unary and clamp on integers: one generic int64 loop ----------------- */

static int64_t load_int(const char *p, ml_dtype t) {
    switch (t) {
    case ML_I32: return *(const int32_t *)p;
    case ML_I64: return *(const int64_t *)p;
    default: return *(const uint8_t *)p;
    }
}

static void store_int(char *p, ml_dtype t, int64_t v) {
    switch (t) {
    case ML_I32: *(int32_t *)p = (int32_t)v; break;
    case ML_I64: *(int64_t *)p = v; break;
    case ML_BOOL: *(uint8_t *)p = v != 0; break;
    default: *(uint8_t *)p = (uint8_t)v; break;
    }
}

static int64_t unary_int(ml_unop op, int64_t x, double lo, double hi) {
    switch (op) {
    case ML_NEG: return (int64_t)(0 - (uint64_t)x);
    case ML_ABS: return x < 0 ? (int64_t)(0 - (uint64_t)x) : x;
    case ML_SQUARE: return (int64_t)((uint64_t)x * (uint64_t)x);
    case ML_RELU: return x > 0 ? x : 0;
    case ML_SIGN: return (x > 0) - (x < 0);
    case ML_NUM_UNOPS:   /* clamp */
        if ((double)x < lo) x = (int64_t)ceil(lo);
        if ((double)x > hi) x = (int64_t)floor(hi);
        return x;
    default: return x;   /* ROUND, FLOOR: integers are already whole */
    }
}

/* prm->op: the ml_unop, or ML_NUM_UNOPS for clamp(lo, hi).  The element
 * dtype travels in prm->s (integer kernels are not generated per type). */
static void un_int(int64_t n, char *const *p, const int64_t *s, const ew_params *prm) {
    ml_dtype t = (ml_dtype)(int)prm->s;
    int64_t es = (int64_t)ml_dtype_size(t);
    for (int64_t i = 0; i < n; i++) {
        int64_t v = unary_int((ml_unop)prm->op, load_int(p[1] + i * s[1] * es, t), prm->lo, prm->hi);
        if (t == ML_U8 || t == ML_BOOL) v = (uint8_t)v;
        store_int(p[0] + i * s[0] * es, t, v);
    }
}

static bool is_int(ml_dtype t) { return t == ML_I32 || t == ML_I64 || t == ML_U8; }

int ml_unary_cpu(ml_unop op, ml_ktensor *out, const ml_ktensor *x) {
    if ((unsigned)op >= ML_NUM_UNOPS) return ml_error("unary kernel (cpu): bad op %d", (int)op);
    ew_operand o[2] = {opnd(out), opnd(x)};
    if (x->dtype == ML_F32 || x->dtype == ML_F64) {
        ew_run(2, out->ndim, out->shape, o, (x->dtype == ML_F32 ? k_un_f32 : k_un_f64)[op], NULL);
        return 0;
    }
    bool int_ok = op == ML_NEG || op == ML_ABS || op == ML_SQUARE || op == ML_RELU ||
                  op == ML_SIGN || op == ML_ROUND || op == ML_FLOOR;
    if (!is_int(x->dtype) || !int_ok)
        return ml_error("%s (cpu): dtype %s is not supported", ml_unop_name(op), ml_dtype_name(x->dtype));
    ew_params prm = {.s = x->dtype, .op = op};
    ew_run(2, out->ndim, out->shape, o, un_int, &prm);
    return 0;
}

int ml_unary_backward_cpu(ml_unop op, ml_ktensor *dx, const ml_ktensor *dy, const ml_ktensor *x) {
    if ((unsigned)op >= ML_NUM_UNOPS) return ml_error("unary backward kernel (cpu): bad op %d", (int)op);
    if (x->dtype != ML_F32 && x->dtype != ML_F64)
        return ml_error("%s backward (cpu): dtype %s is not supported (float32 or float64)", ml_unop_name(op),
                        ml_dtype_name(x->dtype));
    ew_operand o[3] = {opnd(dx), opnd(dy), opnd(x)};
    ew_run(3, dx->ndim, dx->shape, o, (x->dtype == ML_F32 ? k_unb_f32 : k_unb_f64)[op], NULL);
    return 0;
}

/* ---- clamp -------------------------------------------------------------- */

/* max first, then min: with lo > hi every element becomes hi (PyTorch). */
#define DEF_CLAMP(T, tn)                                                                    \
    static void clamp_##tn(int64_t n, char *const *p, const int64_t *s, const ew_params *prm) { \
        T *o = (T *)p[0];                                                                   \
        const T *xp = (const T *)p[1];                                                      \
        T lo = (T)prm->lo, hi = (T)prm->hi;                                                 \
        for (int64_t i = 0; i < n; i++) {                                                   \
            T x = xp[i * s[1]];                                                             \
            x = x < lo ? lo : x;                                                            \
            o[i * s[0]] = x > hi ? hi : x;                                                  \
        }                                                                                   \
    }                                                                                       \
    static void clampb_##tn(int64_t n, char *const *p, const int64_t *s, const ew_params *prm) { \
        T *o = (T *)p[0];                                                                   \
        const T *gp = (const T *)p[1], *xp = (const T *)p[2];                               \
        T lo = (T)prm->lo, hi = (T)prm->hi;                                                 \
        for (int64_t i = 0; i < n; i++) {                                                   \
            T x = xp[i * s[2]];                                                             \
            o[i * s[0]] = (x >= lo && x <= hi) ? gp[i * s[1]] : (T)0;                       \
        }                                                                                   \
    }

DEF_CLAMP(float, f32)
DEF_CLAMP(double, f64)

int ml_clamp_cpu(ml_ktensor *out, const ml_ktensor *x, double lo, double hi) {
    ew_operand o[2] = {opnd(out), opnd(x)};
    ew_params prm = {.lo = lo, .hi = hi};
    if (x->dtype == ML_F32) ew_run(2, out->ndim, out->shape, o, clamp_f32, &prm);
    else if (x->dtype == ML_F64) ew_run(2, out->ndim, out->shape, o, clamp_f64, &prm);
    else if (is_int(x->dtype)) {
        prm.s = x->dtype;
        prm.op = ML_NUM_UNOPS;
        ew_run(2, out->ndim, out->shape, o, un_int, &prm);
    } else return ml_error("clamp (cpu): dtype %s is not supported", ml_dtype_name(x->dtype));
    return 0;
}

int ml_clamp_backward_cpu(ml_ktensor *dx, const ml_ktensor *dy, const ml_ktensor *x, double lo, double hi) {
    if (x->dtype != ML_F32 && x->dtype != ML_F64)
        return ml_error("clamp backward (cpu): dtype %s is not supported (float32 or float64)",
                        ml_dtype_name(x->dtype));
    ew_operand o[3] = {opnd(dx), opnd(dy), opnd(x)};
    ew_params prm = {.lo = lo, .hi = hi};
    ew_run(3, dx->ndim, dx->shape, o, x->dtype == ML_F32 ? clampb_f32 : clampb_f64, &prm);
    return 0;
}

/* ---- where: dtype-agnostic, by element size ----------------------------- */

#define DEF_WHERE(T, bits)                                                                  \
    static void where_##bits(int64_t n, char *const *p, const int64_t *s, const ew_params *prm) { \
        (void)prm;                                                                          \
        T *o = (T *)p[0];                                                                   \
        const uint8_t *c = (const uint8_t *)p[1];                                           \
        const T *a = (const T *)p[2], *b = (const T *)p[3];                                 \
        if (s[0] == 1 && s[1] == 1 && s[2] == 1 && s[3] == 1) {                             \
            for (int64_t i = 0; i < n; i++) o[i] = c[i] ? a[i] : b[i];                      \
        } else {                                                                            \
            for (int64_t i = 0; i < n; i++) o[i * s[0]] = c[i * s[1]] ? a[i * s[2]] : b[i * s[3]]; \
        }                                                                                   \
    }

DEF_WHERE(uint8_t, 8)
DEF_WHERE(uint16_t, 16)
DEF_WHERE(uint32_t, 32)
DEF_WHERE(uint64_t, 64)

int ml_where_cpu(ml_ktensor *out, const ml_ktensor *cond, const ml_ktensor *a, const ml_ktensor *b) {
    ew_fn fn;
    switch (ml_dtype_size(out->dtype)) {
    case 1: fn = where_8; break;
    case 2: fn = where_16; break;
    case 4: fn = where_32; break;
    default: fn = where_64; break;
    }
    ew_operand o[4] = {opnd(out), opnd(cond), opnd(a), opnd(b)};
    ew_run(4, out->ndim, out->shape, o, fn, NULL);
    return 0;
}

/* ---- geglu: out = a * gelu(b) over the two halves of each row ------------ */

/* The GELU is un_gelu's expression and its gradient dgelu's (erf computed
 * once for both), in the order of the unfused ops: hidden * gelu(gate)
 * forward; g * gelu(b) and (g * a) * gelu'(b) backward (the mul's
 * gradients, then gelu's).  So in f32 and f64 the fused op gives the
 * unfused op's bits. */
#define DEF_GEGLU(T, tn)                                                                    \
    static void geglu_##tn(int64_t rows, int64_t n, T *out, const T *h) {                  \
        for (int64_t r = 0; r < rows; r++) {                                                \
            const T *a = h + r * 2 * n, *b = a + n;                                         \
            T *o = out + r * n;                                                             \
            for (int64_t i = 0; i < n; i++) {                                               \
                T x = b[i];                                                                 \
                T gelu = (T)0.5 * x * ((T)1 + erf(x * (T)0.7071067811865476));              \
                o[i] = a[i] * gelu;                                                         \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    static void geglu_backward_##tn(int64_t rows, int64_t n, T *dh, const T *dout, const T *h) { \
        for (int64_t r = 0; r < rows; r++) {                                                \
            const T *a = h + r * 2 * n, *b = a + n, *g = dout + r * n;                      \
            T *da = dh + r * 2 * n, *db = da + n;                                           \
            for (int64_t i = 0; i < n; i++) {                                               \
                T x = b[i], e = erf(x * (T)0.7071067811865476);                             \
                T gelu = (T)0.5 * x * ((T)1 + e);                                           \
                T cdf = (T)0.5 * ((T)1 + e);                                                \
                T pdf = exp((T)-0.5 * x * x) * (T)0.3989422804014327;                       \
                da[i] = g[i] * gelu;                                                        \
                db[i] = (g[i] * a[i]) * (cdf + x * pdf);                                    \
            }                                                                               \
        }                                                                                   \
    }

DEF_GEGLU(float, f32)
DEF_GEGLU(double, f64)

/* Rows and half width n of a geglu call, from out's (or dout's) shape. */
static void geglu_rows(const ml_ktensor *half, int64_t *rows, int64_t *n) {
    *n = half->ndim > 0 ? half->shape[half->ndim - 1] : 1;
    *rows = *n > 0 ? ml_kt_numel(half) / *n : 0;
}

int ml_geglu_cpu(ml_ktensor *out, const ml_ktensor *h) {
    int64_t rows, n;
    geglu_rows(out, &rows, &n);
    if (h->dtype == ML_F32) geglu_f32(rows, n, out->data, h->data);
    else if (h->dtype == ML_F64) geglu_f64(rows, n, out->data, h->data);
    else return ml_error("geglu (cpu): dtype %s is not supported (float32 or float64)", ml_dtype_name(h->dtype));
    return 0;
}

int ml_geglu_backward_cpu(ml_ktensor *dh, const ml_ktensor *dout, const ml_ktensor *h) {
    int64_t rows, n;
    geglu_rows(dout, &rows, &n);
    if (h->dtype == ML_F32) geglu_backward_f32(rows, n, dh->data, dout->data, h->data);
    else if (h->dtype == ML_F64) geglu_backward_f64(rows, n, dh->data, dout->data, h->data);
    else return ml_error("geglu backward (cpu): dtype %s is not supported (float32 or float64)",
                         ml_dtype_name(h->dtype));
    return 0;
}
