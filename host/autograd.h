/* autograd.h — the tape: nodes recorded by ops, the backward engine, hooks.
 *
 * Every node has exactly one output (multi-output ops such as chunk/split
 * are built from single-output views).  A node holds strong references to
 * its inputs' nodes (or, for leaves, to the leaf tensor) and to the tensors
 * it saved for backward.  Saved tensors are stored as detached aliases (same
 * storage, no grad_fn), so no reference cycle can form.  When backward ends
 * (without retain_graph) every visited node drops its saved tensors at once:
 * memory never waits for Lua's garbage collector.  A saved tensor whose
 * storage was written in place after it was saved makes backward fail
 * (naming the op that saved it), as in PyTorch.
 *
 * Backward functions run with grad mode off: they may call ordinary ops. */
#ifndef ML_AUTOGRAD_H
#define ML_AUTOGRAD_H

#include "tensor.h"
#include "op_registry.h"

#define ML_NODE_MAX_INPUTS 8
#define ML_NODE_SAVED_INLINE 8   /* saved tensors held without a heap array */

typedef struct ml_node ml_node;

/* Compute grads for the node's inputs from `gout` (the gradient of its
 * output).  Write a NEW reference into gin[i] for each i with
 * ml_node_needs_grad(n, i); leave others NULL.  gin[i] must have the
 * input's shape (use ml_sum_to_shape for broadcast inputs). Return 0 / -1. */
typedef int (*ml_backward_fn)(ml_node *n, ml_tensor *gout, ml_tensor **gin);

typedef struct {
    ml_node *fn;          /* producer of this input (strong ref) or NULL */
    ml_tensor *leaf;      /* leaf requiring grad (strong ref) or NULL */
    int ndim;             /* the input's shape and dtype, for zero/sum_to_shape */
    int64_t shape[ML_MAX_DIMS];
    ml_dtype dtype;
    ml_device device;
} ml_edge;

struct ml_node {
    ml_op op;             /* which op recorded it (host/op_registry.h) */
    const char *name;     /* printable, for errors and t.grad_fn: ml_op_name(op),
                           * or the caller's name for ML_NODE_CUSTOM */
    int refcount;
    ml_backward_fn backward;
    int n_inputs;
    ml_edge next[ML_NODE_MAX_INPUTS];
    /* Saved tensors, any number: saved[k] was saved when its storage was at
     * saved_version[k]; backward refuses to use it if the storage has been
     * written in place since.  Both point into the inline buffers until a
     * node saves more than ML_NODE_SAVED_INLINE. */
    int n_saved, cap_saved;
    ml_tensor **saved;
    int64_t *saved_version;
    ml_tensor *saved_buf[ML_NODE_SAVED_INLINE];
    int64_t version_buf[ML_NODE_SAVED_INLINE];
    /* op parameters a backward needs */
    double f[8];
    int64_t i[ML_MAX_DIMS * 2];
    /* Why the forward pass could not record this node completely (out of
     * memory saving a tensor, too many inputs), or NULL.  Backward refuses
     * a graph holding such a node rather than return partial gradients. */
    const char *broken;
    /* State a backward needs beyond tensors and numbers (a checkpointed
     * block's Lua function): ctx_free(ctx) runs when the node drops its saved
     * tensors (after its backward without retain_graph, or when the node is
     * freed), so what ctx holds goes with them. */
    void *ctx;
    void (*ctx_free)(void *ctx);
    /* Saved casts of parameters kept as a recipe instead of memory (see
     * ml_node_save): their saved[k] is NULL between backwards and is made
     * again, bit for bit, while the node's backward runs. */
    struct ml_recast *recast;
    bool released;                   /* saved tensors already freed */
    /* engine scratch */
    int deps;
    ml_tensor *grad_acc;
    int64_t seq;
};

/* ---- grad mode (thread-local) ----------------------------------------- */
bool ml_grad_enabled(void);
bool ml_set_grad_enabled(bool on);   /* returns the previous value */

/* ---- recording (used by ops) ------------------------------------------- */
/* Returns a new node of registry op `op` if grad mode is on and some input
 * requires grad, else NULL (then the op records nothing).  Inputs may
 * contain NULLs.  Recording cannot make an op fail: when the node itself
 * cannot be allocated, the op gets a shared placeholder node that saves
 * nothing, and a backward that reaches it fails naming the op (never a
 * silently missing gradient). */
ml_node *ml_node_begin(ml_op op, ml_backward_fn bw, int n_inputs, ml_tensor *const *inputs);
/* The same for a backward that is not a registry op (ML_NODE_CUSTOM): the
 * node prints `name`, which must outlive it (a string literal). */
ml_node *ml_node_begin_custom(const char *name, ml_backward_fn bw, int n_inputs, ml_tensor *const *inputs);
/* Save a tensor for backward (stored as a detached alias, with its
 * storage's version).  Out of memory marks the node broken (see above).
 *
 * One kind of tensor is not kept: the untouched output of a recorded
 * dtype conversion of a leaf (an f32 parameter converted to bf16 by
 * autocast, possibly seen through views), while the recompute-casts switch
 * is on.  The node keeps the parameter (which lives anyway) and converts
 * it again right before its backward, so the conversion's memory is not
 * held from forward to backward; the bits are the same.  The parameter
 * must then not be written in place between forward and backward:
 * backward refuses, as it does for any saved tensor written since. */
void ml_node_save(ml_node *n, ml_tensor *t);
/* ml_node_save of t, the op's `input` as the kernel takes it (detached,
 * made contiguous: ml_kernel_input): when t is input's own memory, the
 * test above looks at input's history. */
void ml_node_save_input(ml_node *n, ml_tensor *t, const ml_tensor *input);
/* The recompute-casts switch (on by default); returns the previous value.
 * Off, saved conversions are kept as memory, as any saved tensor. */
bool ml_set_recompute_casts(bool on);
bool ml_recompute_casts(void);
/* Attach node as out's grad_fn (takes the node reference); out becomes a
 * non-leaf requiring grad. */
void ml_node_finish(ml_node *n, ml_tensor *out);
bool ml_node_needs_grad(const ml_node *n, int i);
/* The dtype a backward may write node input i's gradient in instead of
 * `dflt` (the input's own dtype), or dflt.  Only inside a backward
 * function.  It is the wider float dtype of the tensor the input was
 * converted from, when that input is the output of a recorded dtype
 * conversion (to_dtype, or cast_as: autocast's f32 parameter seen in bf16)
 * that nothing else in this backward still sends a gradient to.  That
 * conversion's backward then passes the gradient on as is (to_backward),
 * so a kernel that computes in the wider type anyway (a GEMM accumulating
 * in f32) writes the parameter's gradient once, unrounded, instead of
 * rounding it to bf16 for a conversion kernel to widen again. */
ml_dtype ml_grad_dtype_hint(const ml_node *n, int i, ml_dtype dflt);
void ml_node_release(ml_node *n);
/* True if any of the tensors requires grad and grad mode is on. */
bool ml_any_requires_grad(int n, ml_tensor *const *ts);

/* ---- in-place writes ------------------------------------------------------ */
/* Refuse (error naming op, shape and strides) a tensor two of whose
 * elements may share a memory location, as an expanded one does: writing
 * through it would hit those locations several times and give a result
 * that depends on the order of the writes.  Sufficient, not exact (see
 * autograd.c).  Returns 0 or -1. */
int ml_check_no_internal_overlap(const char *op, const ml_tensor *t);
/* The gate every in-place op passes before writing into dst: in-place
 * writes are not recorded, so while grad mode is on they are refused on
 * tensors autograd tracks (error naming op), and a dst with internal
 * overlap is refused whatever the mode.  On success the version of
 * dst's storage is bumped, so a tensor saved for backward that is then
 * overwritten (through any view) makes backward fail instead of using the
 * new values.  Returns 0 or -1. */
int ml_inplace_begin(const char *op, ml_tensor *dst);
/* ml_inplace_begin's refusals without the version bump: for a caller that
 * must fail exactly where the writers fail but does not write (the root
 * of a broadcast, so that no rank is left waiting for one that refused). */
int ml_inplace_check(const char *op, const ml_tensor *dst);
/* Bump the version only: for writes allowed whatever the grad mode
 * (optimizer steps update parameters that require grad). */
void ml_mark_modified(ml_tensor *t);

/* ---- engine ------------------------------------------------------------ */
/* Backpropagate from root.  grad may be NULL if root has one element (then
 * ones).  Gradients of leaves accumulate into leaf->grad. */
int ml_backward(ml_tensor *root, ml_tensor *grad, bool retain_graph);

/* What the graph behind root holds for backward: fn is called once per
 * node reachable from root's grad_fn with the node's name, its saved
 * tensors, how many of them hold a storage no node visited before held,
 * and those storages' bytes (each storage counted once, at the first node
 * that saved it; a node already run without retain_graph is not reported).
 * 0 / -1 (out of memory). */
typedef void (*ml_census_fn)(void *ctx, const char *node, int n_saved, int fresh, size_t fresh_bytes);
int ml_saved_census(const ml_tensor *root, ml_census_fn fn, void *ctx);

/* ---- hooks on leaf tensors --------------------------------------------- */
/* Called with the incoming gradient before it is accumulated into .grad.
 * Return a NEW reference to replace it, or NULL to keep it (set *err = 1 on
 * failure, with ml_error). */
typedef ml_tensor *(*ml_hook_fn)(void *ctx, ml_tensor *grad, int *err);
typedef struct ml_hook {
    ml_hook_fn fn;
    void *ctx;
    void (*ctx_free)(void *ctx);
    int id;
    struct ml_hook *next;
} ml_hook;
int ml_add_hook(ml_tensor *leaf, ml_hook_fn fn, void *ctx, void (*ctx_free)(void *));
void ml_remove_hook(ml_tensor *leaf, int id);
/* Called after a leaf's .grad has been fully accumulated for this backward
 * (the data-parallel layer starts bucket all-reduce from here). */
typedef void (*ml_grad_ready_fn)(void *ctx, ml_tensor *leaf);
void ml_set_grad_ready_callback(ml_grad_ready_fn fn, void *ctx);

/* ---- failure injection (tests) ---------------------------------------- */
/* Make autograd's own allocation points fail as if out of memory: the
 * node allocation in ml_node_begin, growing a node's saved list, and
 * summing two gradients in backward.  The allocation `skip` points from
 * now fails once (0: the next one); a negative value turns it off.  Per
 * thread.  Lets tests reach failure paths that real memory pressure hits. */
void ml_autograd_fail_alloc_after(int skip);

#endif
