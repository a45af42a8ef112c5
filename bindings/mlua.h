/* mlua.h — shared glue of the Lua bindings.
 *
 * A tensor crosses into Lua as a full userdata holding one ml_tensor*
 * reference (metatable "moonlit.Tensor").  t:free(), __gc and __close share
 * one release path; a freed handle raises "attempt to use a freed tensor".
 *
 * Each bindings/lua_*.c file exports mlua_open_<part>(L), which adds its
 * functions to the table on the top of the stack (the `moonlit.core`
 * module); bindings/lua_module.c calls them all. */
#ifndef ML_MLUA_H
#define ML_MLUA_H

#include <lua.h>
#include <lauxlib.h>
#include "tensor.h"

#define MLUA_TENSOR "moonlit.Tensor"

typedef struct { ml_tensor *t; } mlua_tensor_box;

/* Push t as a Lua tensor, taking ownership of the reference.  If t is NULL,
 * raises a Lua error with ml_last_error() (so `return mlua_push_tensor(L, op(...))`
 * is the usual tail of a binding). Returns 1. */
int mlua_push_tensor(lua_State *L, ml_tensor *t);
/* Borrow the tensor at idx; raises an argument error if not a live tensor. */
ml_tensor *mlua_check_tensor(lua_State *L, int idx);
/* Tensor at idx, or NULL if it is nil/none; errors on other types. */
ml_tensor *mlua_opt_tensor(lua_State *L, int idx);
/* A tensor, or a Lua number converted to a 0-dim tensor like `like` (new ref). */
ml_tensor *mlua_tensor_or_scalar(lua_State *L, int idx, const ml_tensor *like);
/* Raise ml_last_error() as a Lua error, prefixed with the op name if given
 * and the host message does not already start with "op: ". */
int mlua_error(lua_State *L, const char *op);
/* If rc < 0 raise the host error. */
#define MLUA_CHECK(L, rc) do { if ((rc) < 0) mlua_error((L), NULL); } while (0)

/* Integer arguments.  Every integer the bindings read goes through these
 * before it is narrowed (to int, int8_t, ...): a number that is not integral
 * (1.5), not a number, or outside [lo, hi] raises an error naming `what`
 * ("padding", "scale") and the accepted range, instead of being truncated
 * (1.5 -> 1) or wrapped (2^32 + 1 -> 1).  Integral floats (2.0) are
 * accepted, as Lua's own luaL_checkinteger does. */
lua_Integer mlua_check_integer(lua_State *L, int idx, const char *what, lua_Integer lo, lua_Integer hi);
/* The same, nil/none giving def. */
lua_Integer mlua_opt_integer(lua_State *L, int idx, const char *what, lua_Integer def, lua_Integer lo,
                             lua_Integer hi);
/* An int (range within INT_MIN..INT_MAX). */
static inline int mlua_check_int(lua_State *L, int idx, const char *what, int lo, int hi) {
    return (int)mlua_check_integer(L, idx, what, lo, hi);
}
static inline int mlua_opt_int(lua_State *L, int idx, const char *what, int def, int lo, int hi) {
    return (int)mlua_opt_integer(L, idx, what, def, lo, hi);
}
/* Options-table field `key` as an integer in [lo, hi] (def when absent). */
lua_Integer mlua_opt_field_integer(lua_State *L, int idx, const char *key, lua_Integer def, lua_Integer lo,
                                   lua_Integer hi);

/* Lua dims are 1-based (negative counts from the end, -1 = last).  Convert
 * to the host's 0-based dim, raising a clear error if out of range. */
int mlua_check_dim(lua_State *L, int idx, int ndim);
/* Read a shape given as a table {2,3} or as varargs of integers from idx.
 * Entries must be integers (checked as mlua_check_integer does); whether
 * the sizes are valid is left to the host (ml_shape_check).  Returns ndim. */
int mlua_check_shape(lua_State *L, int idx, int64_t *shape);
/* Read an options-table field (idx is the table's stack index, may be nil). */
const char *mlua_opt_field_string(lua_State *L, int idx, const char *key, const char *def);
double mlua_opt_field_number(lua_State *L, int idx, const char *key, double def);
int mlua_opt_field_bool(lua_State *L, int idx, const char *key, int def);
/* The same for an option that must be a boolean when given: anything else
 * raises "fn: key must be a boolean (got <type>)". */
int mlua_opt_field_boolean(lua_State *L, int idx, const char *fn, const char *key, int def);
/* File and folder paths.  C's open/fopen/stat end a name at its first NUL
 * byte, so "a\0b" would silently name the file "a".  These return the
 * string at idx (an argument, or a table entry pushed for reading), raising
 * an error naming `what` ("st_load: path") when it holds a NUL byte or is
 * not a string.  The opt forms give def for nil/none (or an absent field). */
const char *mlua_check_path(lua_State *L, int idx, const char *what);
const char *mlua_opt_path(lua_State *L, int idx, const char *what, const char *def);
/* Options-table field `key` used as part of a file name (a variant, a
 * basename); the error names "<op>: option '<key>'". */
const char *mlua_opt_field_path(lua_State *L, int idx, const char *op, const char *key, const char *def);
/* Push s (n bytes) with each NUL byte shown as \0, for messages; returns it. */
const char *mlua_push_shown(lua_State *L, const char *s, size_t n);
/* dtype/device options: {dtype="f32", device="cuda:0"}. */
ml_dtype mlua_opt_dtype(lua_State *L, int idx, ml_dtype def);
ml_device mlua_opt_device(lua_State *L, int idx, ml_device def);

/* Parts (each adds functions to the table at the top of the stack). */
void mlua_open_tensor(lua_State *L);
void mlua_open_ops(lua_State *L);
void mlua_open_autograd(lua_State *L);
void mlua_open_io(lua_State *L);         /* safetensors, json */
void mlua_open_tokenizer(lua_State *L);
void mlua_open_image(lua_State *L);
void mlua_open_cuda(lua_State *L);       /* device info, allocator stats */
void mlua_open_fs(lua_State *L);         /* mkdir_p, copy_file, list_dir */
void mlua_open_profile(lua_State *L);    /* profile(fn): per-kernel times */
void mlua_open_data(lua_State *L);       /* data_loader: ml.data's loader threads */
void mlua_open_dist(lua_State *L);       /* dist_*: ml.dist's collectives between processes */

/* Entry point: require "moonlit.core". */
int luaopen_moonlit_core(lua_State *L);

#endif
