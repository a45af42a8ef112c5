/* dist.h — collectives between the processes of a data-parallel run.
 *
 * One process group per process (ml_dist_init once, ml_dist_destroy at the
 * end).  Rank 0 listens on master_addr:master_port; every other rank
 * connects to it (retrying until timeout_s).  Those TCP connections carry:
 *   - the "cpu" backend's collectives on CPU tensors (rank 0 is the hub: it
 *     gathers every rank's data, reduces in rank order, sends the result
 *     back, so all ranks get bit-identical results);
 *   - for every backend, the small host-side collectives (barrier, numbers,
 *     strings) and, with "nccl", the ncclUniqueId from rank 0 to the others.
 * The "nccl" backend runs tensor collectives on CUDA tensors with NCCL on a
 * communication stream ordered against the compute stream by events
 * (kernels/cuda/nccl.cu).
 *
 * Every blocking wait has a deadline (timeout_s); a peer that exits shows as
 * EOF / connection reset at once.  After any failure the group is broken:
 * every later collective fails with the first error.  Errors name the
 * collective, this rank and the cause, e.g.
 *   "all_reduce (rank 1 of 3): rank 2 closed its connection (exited or crashed)". */
#ifndef ML_DIST_H
#define ML_DIST_H

#include <stdbool.h>
#include <stddef.h>
#include "tensor.h"

typedef enum { ML_DIST_SUM = 0, ML_DIST_AVG = 1, ML_DIST_MAX = 2 } ml_dist_op;
typedef enum { ML_DIST_BACKEND_CPU = 0, ML_DIST_BACKEND_NCCL = 1 } ml_dist_backend;

typedef struct {
    int rank, world_size, local_rank;
    ml_dist_backend backend;
    const char *master_addr;   /* host name or address of rank 0 */
    int master_port;           /* 1..65535 */
    double timeout_s;          /* every blocking wait; > 0 */
} ml_dist_config;

#define ML_DIST_DEFAULT_TIMEOUT_S 300.0

/* Parse "sum"/"avg"/"max" and "cpu"/"nccl"; -1 + error if unknown. */
int ml_dist_op_parse(const char *s, ml_dist_op *out);
int ml_dist_backend_parse(const char *s, ml_dist_backend *out);
const char *ml_dist_backend_name(ml_dist_backend b);

int ml_dist_init(const ml_dist_config *cfg);
bool ml_dist_is_initialized(void);
int ml_dist_rank(void);          /* -1 when not initialised */
int ml_dist_world_size(void);
int ml_dist_local_rank(void);
ml_dist_backend ml_dist_get_backend(void);
/* Close the connections (and the NCCL communicator).  Safe to call twice. */
void ml_dist_destroy(void);

/* A collective in flight (async all_reduce).  "nccl": enqueued on the
 * communication stream.  "cpu" with world size > 1: queued for this
 * process's communication thread, which runs the queue in order while the
 * caller computes; every other call waits for the queue to empty first. */
typedef struct ml_dist_work ml_dist_work;
/* "nccl": order the compute stream after the collective (the host does not
 * block).  "cpu": block until the thread has run it.  -1 + its error. */
int ml_dist_work_wait(ml_dist_work *w);
/* 1 when finished, 0 if not yet, -1 on error. */
int ml_dist_work_done(ml_dist_work *w);
/* Frees w; a work never waited for is waited for first (so the tensor's
 * memory is not reused under a running collective). */
void ml_dist_work_free(ml_dist_work *w);

/* In place on a contiguous tensor of every rank (same shape and dtype).
 * async: *work gets a handle (NULL for a blocking call). */
int ml_dist_all_reduce(ml_tensor *t, ml_dist_op op, ml_dist_work **work);
int ml_dist_broadcast(ml_tensor *t, int root);
/* [world_size * t.shape[0], ...]: rank 0's rows first. */
ml_tensor *ml_dist_all_gather(const ml_tensor *t);
/* t.shape[0] divisible by world_size; returns this rank's chunk of the reduction. */
ml_tensor *ml_dist_reduce_scatter(const ml_tensor *t, ml_dist_op op);
int ml_dist_barrier(void);
/* Host values, over TCP on every backend. */
int ml_dist_all_reduce_double(double *x, ml_dist_op op);
/* root's bytes to every rank: *data (malloc'd, NUL-terminated) and *len are
 * replaced on the other ranks (the caller frees). */
int ml_dist_broadcast_bytes(char **data, size_t *len, int root);

#ifdef ML_WITH_CUDA
/* Implemented in kernels/cuda/nccl.cu (extern "C"); host/dist.c reaches them
 * through weak references (dispatch.h).  `comm` is the opaque communicator. */
#define ML_NCCL_ID_BYTES 128
int ml_nccl_unique_id(void *id);                         /* ML_NCCL_ID_BYTES bytes */
void *ml_nccl_comm_init(const void *id, int world_size, int rank, int device, double timeout_s);
void ml_nccl_comm_destroy(void *comm);
/* kind: 0 all_reduce, 1 broadcast, 2 all_gather, 3 reduce_scatter.
 * send/recv are CUDA tensors of one device; for all_reduce and broadcast
 * they are the same tensor.  async != NULL: *async gets a work handle to
 * wait on; else the compute stream waits at once. */
int ml_nccl_collective(void *comm, int kind, const ml_tensor *send, ml_tensor *recv, ml_dist_op op, int root,
                       void **async);
/* -1 + the watchdog's message once the communicator was aborted. */
int ml_nccl_comm_check(void *comm);
int ml_nccl_work_wait(void *work);
int ml_nccl_work_done(void *work);
void ml_nccl_work_free(void *work);
#endif

#endif
