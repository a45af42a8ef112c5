/* op_registry.c — the registry's rows as data (host/op_registry.h): the
 * names autograd nodes print and what the bindings and tests read. */
#include "op_registry.h"
#include <stddef.h>

static const ml_op_info g_ops[ML_OP_COUNT] = {
#define ML_OP_INFO(name, grad, cuda, lua, where) {#name, #lua, ML_##grad, cuda, ML_LUA_##where},
    ML_OP_LIST(ML_OP_INFO)
#undef ML_OP_INFO
};

const ml_op_info *ml_op_info_of(ml_op op) {
    return (unsigned)op < ML_OP_COUNT ? &g_ops[op] : NULL;
}

const char *ml_op_name(ml_op op) {
    if ((unsigned)op < ML_OP_COUNT) return g_ops[op].name;
    if (op == ML_NODE_CUSTOM) return "custom";
    if (op == ML_NODE_UNRECORDED) return "unrecorded";
    return "?";
}
