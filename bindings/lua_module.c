/* lua_module.c — `require "moonlit.core"`: one table holding every binding
 * part (tensor, ops, autograd, io, tokenizer, image, cuda, data). */
#include "mlua.h"
#include <time.h>

void mlua_open_pickle(lua_State *L); /* ckpt_load: torch checkpoints, never executed */
void mlua_open_launcher(lua_State *L); /* spawn/poll/reap: ml.train's worker launcher */

/* now() -> seconds on the monotonic clock (for timing; os.clock is CPU time). */
static int l_now(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + ts.tv_nsec * 1e-9);
    return 1;
}

int luaopen_moonlit_core(lua_State *L) {
    lua_newtable(L);
    mlua_open_tensor(L);
    mlua_open_ops(L);
    mlua_open_autograd(L);
    mlua_open_io(L);
    mlua_open_tokenizer(L);
    mlua_open_image(L);
    mlua_open_cuda(L);
    mlua_open_fs(L);
    mlua_open_profile(L);
    mlua_open_data(L);
    mlua_open_dist(L);
    mlua_open_pickle(L);
    mlua_open_launcher(L);
#ifdef ML_WITH_CUDA
    lua_pushboolean(L, 1);
#else
    lua_pushboolean(L, 0);
#endif
    lua_setfield(L, -2, "built_with_cuda");
    lua_pushcfunction(L, l_now);
    lua_setfield(L, -2, "now");
    return 1;
}
