// nccl.cu — the "nccl" backend of ml.dist: a communicator per process,
// collectives enqueued on a communication stream, ordered against the
// device's compute stream by events, and a watchdog that turns a dead or
// hung peer into an error instead of a silent hang.
//
// Ordering, for each collective:
//   record `before` on the compute stream -> the comm stream waits on it
//   -> the NCCL call on the comm stream -> record `done` on the comm stream
//   -> (blocking form at once, async form at w:wait()) the compute stream
//   waits on `done`.  The host never blocks.  Memory stays safe under the
//   caching allocator (which reuses blocks in compute-stream order): every
//   buffer the collective touches was allocated before `before`, and is
//   only reused by compute work queued after the wait on `done`.
//
// Failure: the communicator is non-blocking (NCCL's config.blocking = 0), so
// no NCCL call can block the host forever; initialisation and each enqueue
// poll ncclCommGetAsyncError with the process group's timeout.  A watchdog
// thread polls the async error and the pending collectives' `done` events
// every 50 ms; an NCCL error, or a collective not finished after timeout_s,
// aborts the communicator (ncclCommAbort, which also ends the kernels that
// wait on the dead peer), prints the reason to stderr at once, and every
// later ml.dist call raises it.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nccl.h>

#include "common.cuh"

extern "C" {
#include "dist.h"
}

namespace {

double now_s() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}

struct Work {
    std::atomic<int> refs{1};
    cudaEvent_t done = nullptr;
    double start = 0;
    const char *name = "";
    int device = 0;
    bool waited = false;
};

void work_unref(Work *w) {
    if (w && w->refs.fetch_sub(1) == 1) {
        if (w->done && cudaEventDestroy(w->done) != cudaSuccess) cudaGetLastError();
        delete w;
    }
}

struct Comm {
    ncclComm_t comm = nullptr;
    int device = 0, rank = 0, world = 1;
    double timeout_s = 300;
    cudaStream_t stream = nullptr;   // the communication stream
    cudaEvent_t before = nullptr;    // compute-stream progress, re-recorded per collective
    std::mutex mu;                   // NCCL calls, abort, pending, error
    std::vector<Work *> pending;     // collectives not yet seen complete (one ref each)
    std::string error;               // non-empty: aborted, every call fails with it
    std::thread watchdog;
    std::atomic<bool> stop{false};
};

std::string nccl_msg(Comm *c, ncclResult_t r) {
    std::string m = ncclGetErrorString(r);
    const char *last = c && c->comm ? ncclGetLastError(c->comm) : ncclGetLastError(nullptr);
    if (last && last[0]) { m += ": "; m += last; }
    return m;
}

// Record the failure, abort the communicator (mu held).
void abort_locked(Comm *c, const std::string &why) {
    if (!c->error.empty()) return;
    c->error = why;
    fprintf(stderr, "moonlit: dist (rank %d of %d): %s; aborting the NCCL communicator\n", c->rank, c->world,
            why.c_str());
    if (c->comm) {
        ncclCommAbort(c->comm);
        c->comm = nullptr;
    }
    for (Work *w : c->pending) work_unref(w);
    c->pending.clear();
}

// Non-blocking communicator: after a call answered ncclInProgress, wait
// (bounded) for it to settle (mu held).
int settle_locked(Comm *c, ncclResult_t r, const char *what) {
    double deadline = now_s() + c->timeout_s;
    // Poll at once, then back off from 10 us to 1 ms: a collective that
    // settles in microseconds (the usual case) must not cost a whole
    // millisecond, and DDP enqueues one per bucket, a hundred per step.
    int wait_us = 0;
    while (r == ncclInProgress) {
        if (now_s() > deadline) {
            abort_locked(c, std::string(what) + " did not start within the timeout (a peer died or hung)");
            return ml_error("%s", c->error.c_str());
        }
        if (wait_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(wait_us));
        wait_us = wait_us == 0 ? 10 : std::min(wait_us * 2, 1000);
        if (ncclCommGetAsyncError(c->comm, &r) != ncclSuccess) break;
    }
    if (r != ncclSuccess) {
        abort_locked(c, std::string(what) + ": NCCL error: " + nccl_msg(c, r));
        return ml_error("%s", c->error.c_str());
    }
    return 0;
}

void watchdog_loop(Comm *c) {
    cudaSetDevice(c->device);
    while (!c->stop.load()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        std::lock_guard<std::mutex> lock(c->mu);
        if (!c->error.empty() || !c->comm) continue;
        ncclResult_t st = ncclSuccess;
        ncclResult_t q = ncclCommGetAsyncError(c->comm, &st);
        if (q != ncclSuccess) st = q;
        if (st != ncclSuccess && st != ncclInProgress) {
            abort_locked(c, "NCCL reported an asynchronous error: " + nccl_msg(c, st));
            continue;
        }
        double t = now_s();
        for (size_t i = 0; i < c->pending.size();) {
            Work *w = c->pending[i];
            cudaError_t e = cudaEventQuery(w->done);
            if (e == cudaSuccess) {
                work_unref(w);
                c->pending.erase(c->pending.begin() + (long)i);
                continue;
            }
            if (e != cudaErrorNotReady) {
                abort_locked(c, std::string(w->name) + ": CUDA error: " + cudaGetErrorString(e));
                break;
            }
            cudaGetLastError();
            if (t - w->start > c->timeout_s) {
                char buf[256];
                snprintf(buf, sizeof buf, "%s did not finish within %g s (a peer rank died or hung)", w->name,
                         c->timeout_s);
                abort_locked(c, buf);
                break;
            }
            i++;
        }
    }
}

bool nccl_type(ml_dtype dt, ncclDataType_t *out) {
    switch (dt) {
    case ML_F32: *out = ncclFloat32; return true;
    case ML_F16: *out = ncclFloat16; return true;
    case ML_BF16: *out = ncclBfloat16; return true;
    case ML_F64: *out = ncclFloat64; return true;
    case ML_I64: *out = ncclInt64; return true;
    case ML_I32: *out = ncclInt32; return true;
    case ML_U8: *out = ncclUint8; return true;
    default: return false;
    }
}

ncclRedOp_t nccl_op(ml_dist_op op) {
    switch (op) {
    case ML_DIST_AVG: return ncclAvg;
    case ML_DIST_MAX: return ncclMax;
    default: return ncclSum;
    }
}

const char *kind_name(int kind) {
    static const char *names[] = {"all_reduce", "broadcast", "all_gather", "reduce_scatter"};
    return kind >= 0 && kind < 4 ? names[kind] : "collective";
}

}  // namespace

extern "C" int ml_nccl_unique_id(void *id) {
    static_assert(sizeof(ncclUniqueId) == ML_NCCL_ID_BYTES, "ncclUniqueId size");
    ncclUniqueId u;
    ncclResult_t r = ncclGetUniqueId(&u);
    if (r != ncclSuccess) return ml_error("ncclGetUniqueId: %s", nccl_msg(nullptr, r).c_str());
    memcpy(id, &u, sizeof u);
    return 0;
}

extern "C" void *ml_nccl_comm_init(const void *id, int world_size, int rank, int device, double timeout_s) {
    if (ml_cuda_set_device(device) < 0) return nullptr;
    Comm *c = new Comm;
    c->device = device;
    c->rank = rank;
    c->world = world_size;
    c->timeout_s = timeout_s;
    cudaError_t e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&c->before, cudaEventDisableTiming);
    if (e != cudaSuccess) {
        ml_cuda_fail(e, "creating the NCCL stream", __FILE__, __LINE__);
        if (c->stream) cudaStreamDestroy(c->stream);
        delete c;
        return nullptr;
    }
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;   // every call returns at once; we poll with a deadline
    ncclResult_t r = ncclCommInitRankConfig(&c->comm, world_size, u, rank, &config);
    double deadline = now_s() + timeout_s;
    while (r == ncclInProgress && now_s() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        if (ncclCommGetAsyncError(c->comm, &r) != ncclSuccess) break;
    }
    if (r != ncclSuccess) {
        std::string why = r == ncclInProgress
                              ? "ncclCommInitRank did not finish within the timeout (a rank is missing or hung)"
                              : "ncclCommInitRank: " + nccl_msg(c, r);
        if (c->comm) ncclCommAbort(c->comm);
        cudaEventDestroy(c->before);
        cudaStreamDestroy(c->stream);
        delete c;
        ml_error("%s", why.c_str());
        return nullptr;
    }
    c->watchdog = std::thread(watchdog_loop, c);
    return c;
}

extern "C" void ml_nccl_comm_destroy(void *comm) {
    Comm *c = (Comm *)comm;
    if (!c) return;
    c->stop.store(true);
    if (c->watchdog.joinable()) c->watchdog.join();
    {
        std::lock_guard<std::mutex> lock(c->mu);
        if (c->comm) {
            // Let queued collectives finish (bounded), then free; abort if
            // a peer never completes them.
            ncclResult_t r = ncclCommFinalize(c->comm);
            double deadline = now_s() + c->timeout_s;
            while (r == ncclInProgress && now_s() < deadline) {
                std::this_thread::sleep_for(std::chrono::milliseconds(5));
                if (ncclCommGetAsyncError(c->comm, &r) != ncclSuccess) break;
            }
            if (r == ncclSuccess) ncclCommDestroy(c->comm);
            else ncclCommAbort(c->comm);
            c->comm = nullptr;
        }
        for (Work *w : c->pending) work_unref(w);
        c->pending.clear();
    }
    if (c->before) cudaEventDestroy(c->before);
    if (c->stream) cudaStreamDestroy(c->stream);
    delete c;
}

extern "C" int ml_nccl_collective(void *comm, int kind, const ml_tensor *send, ml_tensor *recv, ml_dist_op op,
                                  int root, void **async) {
    Comm *c = (Comm *)comm;
    const char *what = kind_name(kind);
    if (!c) return ml_error("%s: no NCCL communicator", what);
    ncclDataType_t dt;
    if (!nccl_type(send->dtype, &dt)) return ml_error("%s: dtype %s is not supported by NCCL", what, ml_dtype_short(send->dtype));
    std::lock_guard<std::mutex> lock(c->mu);
    if (!c->error.empty()) return ml_error("%s", c->error.c_str());
    cudaStream_t compute;
    if (ml_cuda_enter(c->device, &compute) < 0) return -1;
    ML_CUDA_TRY(cudaEventRecord(c->before, compute));
    ML_CUDA_TRY(cudaStreamWaitEvent(c->stream, c->before, 0));
    const void *sbuf = ml_data(send);
    void *rbuf = ml_data(recv);
    size_t count = (size_t)ml_numel(send);
    ncclResult_t r;
    switch (kind) {
    case 0: r = ncclAllReduce(sbuf, rbuf, count, dt, nccl_op(op), c->comm, c->stream); break;
    case 1: r = ncclBroadcast(sbuf, rbuf, count, dt, root, c->comm, c->stream); break;
    case 2: r = ncclAllGather(sbuf, rbuf, count, dt, c->comm, c->stream); break;
    case 3: r = ncclReduceScatter(sbuf, rbuf, (size_t)ml_numel(recv), dt, nccl_op(op), c->comm, c->stream); break;
    default: return ml_error("unknown collective %d", kind);
    }
    if (settle_locked(c, r, what) < 0) return -1;
    Work *w = new Work;
    w->start = now_s();
    w->name = what;
    w->device = c->device;
    cudaError_t e = cudaEventCreateWithFlags(&w->done, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventRecord(w->done, c->stream);
    if (e != cudaSuccess) {
        work_unref(w);
        return ml_cuda_fail(e, "recording the collective's event", __FILE__, __LINE__);
    }
    c->pending.push_back(w);   // the watchdog's reference
    if (async) {
        w->refs.fetch_add(1);
        *async = w;
        return 0;
    }
    ML_CUDA_TRY(cudaStreamWaitEvent(compute, w->done, 0));
    return 0;
}

extern "C" int ml_nccl_comm_check(void *comm) {
    Comm *c = (Comm *)comm;
    if (!c) return 0;
    std::lock_guard<std::mutex> lock(c->mu);
    if (!c->error.empty()) return ml_error("%s", c->error.c_str());
    return 0;
}

extern "C" int ml_nccl_work_wait(void *work) {
    Work *w = (Work *)work;
    if (!w || w->waited) return 0;
    cudaStream_t compute;
    if (ml_cuda_enter(w->device, &compute) < 0) return -1;
    ML_CUDA_TRY(cudaStreamWaitEvent(compute, w->done, 0));
    w->waited = true;
    return 0;
}

extern "C" int ml_nccl_work_done(void *work) {
    Work *w = (Work *)work;
    if (!w) return 1;
    cudaError_t e = cudaEventQuery(w->done);
    if (e == cudaSuccess) return 1;
    if (e == cudaErrorNotReady) { cudaGetLastError(); return 0; }
    return ml_cuda_fail(e, "cudaEventQuery", __FILE__, __LINE__);
}

extern "C" void ml_nccl_work_free(void *work) {
    Work *w = (Work *)work;
    if (!w) return;
    // Never waited for: order the compute stream after it anyway, so the
    // tensor's memory is not handed out again under a running collective.
    if (!w->waited && ml_nccl_work_wait(w) < 0) ml_clear_error();
    work_unref(w);
}
