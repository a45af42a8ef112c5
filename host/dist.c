/* dist.c — the process group: TCP rendezvous at rank 0, the "cpu" backend's
 * collectives (rank 0 as hub) and the host-side collectives of every
 * backend; tensor collectives of the "nccl" backend are handed to
 * kernels/cuda/nccl.cu.  See dist.h for the model and docs/dist.md for why.
 *
 * Wire format: every message is a header (msg_hdr) and nbytes of payload.
 * The header repeats what each rank believes it is doing (collective, a
 * sequence number, dtype/op/root, the tensor's size), so ranks that call
 * different collectives, or the same one with different shapes, get an
 * error naming the rank instead of exchanging garbage.  Byte order is the
 * host's (all supported hosts are little-endian). */
#include "dist.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "autograd.h"
#include "checked_math.h"
#include "dispatch.h"
#include "dtype.h"
#include "error.h"

#ifdef ML_WITH_CUDA
#include "device.h"
ML_CUDA_TWIN int ml_nccl_unique_id(void *id);
ML_CUDA_TWIN void *ml_nccl_comm_init(const void *id, int world_size, int rank, int device, double timeout_s);
ML_CUDA_TWIN void ml_nccl_comm_destroy(void *comm);
ML_CUDA_TWIN int ml_nccl_collective(void *comm, int kind, const ml_tensor *send, ml_tensor *recv, ml_dist_op op,
                                    int root, void **async);
ML_CUDA_TWIN int ml_nccl_comm_check(void *comm);
ML_CUDA_TWIN int ml_nccl_work_wait(void *work);
ML_CUDA_TWIN int ml_nccl_work_done(void *work);
ML_CUDA_TWIN void ml_nccl_work_free(void *work);
#endif

#define DIST_MAGIC 0x53444c4du   /* "MLDS" */
/* Largest payload one message may announce (a corrupt header must not make
 * us allocate terabytes): 16 GiB. */
#define DIST_MAX_PAYLOAD ((uint64_t)1 << 34)
/* Non-zero ranks wait this much longer than timeout_s for rank 0's reply,
 * so that when another rank hangs, rank 0's report (naming that rank)
 * arrives before their own timeout would blame rank 0. */
#define DIST_REPLY_GRACE_S 2.0

enum {
    K_HELLO = 1, K_OK, K_ABORT,
    K_ALL_REDUCE, K_BROADCAST, K_ALL_GATHER, K_REDUCE_SCATTER, K_BARRIER, K_NUMBER, K_BYTES,
};

static const char *kind_name(uint32_t k) {
    switch (k) {
    case K_HELLO: return "init";
    case K_OK: return "init";
    case K_ABORT: return "abort";
    case K_ALL_REDUCE: return "all_reduce";
    case K_BROADCAST: return "broadcast";
    case K_ALL_GATHER: return "all_gather";
    case K_REDUCE_SCATTER: return "reduce_scatter";
    case K_BARRIER: return "barrier";
    case K_NUMBER: return "all_reduce_number";
    case K_BYTES: return "broadcast_string";
    default: return "unknown message";
    }
}

typedef struct {
    uint32_t magic, kind;
    uint32_t param;      /* dtype | op << 8 | root << 16 (collective-dependent) */
    uint32_t reserved;
    uint64_t seq;        /* collective number, the same on every rank */
    uint64_t size;       /* the tensor's bytes as this rank sees them */
    uint64_t nbytes;     /* payload following this header */
} msg_hdr;

static struct {
    bool init;
    int rank, world_size, local_rank;
    ml_dist_backend backend;
    double timeout_s;
    int *fds;            /* rank 0: fds[r] for r >= 1; other ranks: fds[0] is rank 0 */
    uint64_t seq;
    char broken[1024];   /* first failure; non-empty = every later call fails */
    void *nccl;          /* communicator (nccl backend) */
    int cuda_device;
} G;

/* Why the last low-level transfer failed.  Per thread: the communication
 * thread (below) and the main thread never transfer at the same time, but
 * each reads the cause its own transfer left. */
static _Thread_local char g_cause[600];

static void set_cause(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void set_cause(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_cause, sizeof g_cause, fmt, ap);
    va_end(ap);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int ms_left(double deadline) {
    double left = deadline - now_s();
    if (left <= 0) return 0;
    if (left > 1e6) return 1000000000;
    return (int)(left * 1000) + 1;
}

/* "<what> (rank r of n): <cause>", recorded as the group's failure. */
static int fail(const char *what, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(const char *what, const char *fmt, ...) {
    char msg[800];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    char full[sizeof G.broken];
    snprintf(full, sizeof full, "dist.%s (rank %d of %d): %s", what, G.rank, G.world_size, msg);
    if (G.init && !G.broken[0]) snprintf(G.broken, sizeof G.broken, "%s", full);
    return ml_error("%s", full);
}

/* An argument error: this rank's call was wrong; the group stays usable. */
static int arg_error(const char *what, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int arg_error(const char *what, const char *fmt, ...) {
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (!G.init) return ml_error("dist.%s: %s", what, msg);
    return ml_error("dist.%s (rank %d of %d): %s", what, G.rank, G.world_size, msg);
}

static int check_usable(const char *what) {
    if (!G.init) return ml_error("dist.%s: the process group is not initialised (call dist.init first)", what);
    if (G.broken[0]) return ml_error("dist.%s (rank %d of %d): the process group failed earlier: %s", what, G.rank,
                                     G.world_size, G.broken);
    return 0;
}

/* ---- transfers ---------------------------------------------------------- */

static int send_all(int fd, const void *buf, size_t n, double deadline, int peer) {
    const char *p = buf;
    while (n > 0) {
        struct pollfd pf = {fd, POLLOUT, 0};
        int pr = poll(&pf, 1, ms_left(deadline));
        if (pr < 0 && errno == EINTR) continue;
        if (pr < 0) { set_cause("poll: %s", strerror(errno)); return -1; }
        if (pr == 0) {
            set_cause("rank %d did not take our data within %g s (hung?)", peer, G.timeout_s);
            return -1;
        }
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
            if (errno == EPIPE || errno == ECONNRESET)
                set_cause("rank %d closed its connection (exited or crashed)", peer);
            else
                set_cause("sending to rank %d: %s", peer, strerror(errno));
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* One read into buf; 1 = progress, -1 = error (cause set), 0 = try again. */
static int recv_some(int fd, char *buf, size_t want, size_t *got, int peer) {
    ssize_t k = recv(fd, buf + *got, want - *got, MSG_DONTWAIT);
    if (k == 0) {
        set_cause("rank %d closed its connection (exited or crashed)", peer);
        return -1;
    }
    if (k < 0) {
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        if (errno == ECONNRESET) set_cause("rank %d closed its connection (exited or crashed)", peer);
        else set_cause("receiving from rank %d: %s", peer, strerror(errno));
        return -1;
    }
    *got += (size_t)k;
    return 1;
}

static int recv_all(int fd, void *buf, size_t n, double deadline, int peer) {
    size_t got = 0;
    while (got < n) {
        struct pollfd pf = {fd, POLLIN, 0};
        int pr = poll(&pf, 1, ms_left(deadline));
        if (pr < 0 && errno == EINTR) continue;
        if (pr < 0) { set_cause("poll: %s", strerror(errno)); return -1; }
        if (pr == 0) {
            set_cause("rank %d did not respond within %g s (it hung, or is not in this collective)", peer,
                      G.timeout_s);
            return -1;
        }
        if (recv_some(fd, buf, n, &got, peer) < 0) return -1;
    }
    return 0;
}

static int send_msg(int fd, const msg_hdr *h, const void *payload, double deadline, int peer) {
    if (send_all(fd, h, sizeof *h, deadline, peer) < 0) return -1;
    if (h->nbytes && send_all(fd, payload, (size_t)h->nbytes, deadline, peer) < 0) return -1;
    return 0;
}

static msg_hdr make_hdr(uint32_t kind, uint32_t param, uint64_t size, uint64_t nbytes) {
    msg_hdr h = {DIST_MAGIC, kind, param, 0, G.seq, size, nbytes};
    return h;
}

/* Rank 0 tells every other rank that the collective failed (best effort,
 * one second at most) so they report the cause rather than time out. */
static void hub_abort(const char *why) {
    if (G.rank != 0 || !G.fds) return;
    size_t n = strlen(why);
    msg_hdr h = make_hdr(K_ABORT, 0, 0, n);
    double deadline = now_s() + 1.0;
    for (int r = 1; r < G.world_size; r++)
        if (G.fds[r] >= 0) send_msg(G.fds[r], &h, why, deadline, r);
}

static void describe_param(char *buf, size_t n, const msg_hdr *h) {
    snprintf(buf, n, "dtype %s, op %u, root %u, %llu bytes", ml_dtype_short((ml_dtype)(h->param & 0xff)),
             (h->param >> 8) & 0xff, h->param >> 16, (unsigned long long)h->size);
}

/* Rank 0: receive one message from every other rank at once (whichever is
 * ready first, so a dead rank is seen at once even while another is slow).
 * want->kind/seq/param/size must match; payload[r] gets a malloc'd copy of
 * rank r's payload, whose size must be expect[r] (or anything up to
 * DIST_MAX_PAYLOAD when expect[r] is UINT64_MAX). */
static int hub_gather(const msg_hdr *want, const uint64_t *expect, char **payload, bool check_size,
                      uint64_t *sizes) {
    int n = G.world_size;
    msg_hdr *hdr = calloc((size_t)n, sizeof *hdr);
    size_t *got = calloc((size_t)n, sizeof *got);
    bool *done = calloc((size_t)n, sizeof *done);
    struct pollfd *pf = calloc((size_t)n, sizeof *pf);
    int *who = calloc((size_t)n, sizeof *who);
    int rc = 0;
    if (!hdr || !got || !done || !pf || !who) { set_cause("out of memory"); rc = -1; goto out; }
    double deadline = now_s() + G.timeout_s;
    int left = n - 1;
    while (left > 0 && rc == 0) {
        int m = 0;
        for (int r = 1; r < n; r++)
            if (!done[r]) { pf[m] = (struct pollfd){G.fds[r], POLLIN, 0}; who[m++] = r; }
        int pr = poll(pf, (nfds_t)m, ms_left(deadline));
        if (pr < 0 && errno == EINTR) continue;
        if (pr < 0) { set_cause("poll: %s", strerror(errno)); rc = -1; break; }
        if (pr == 0) {
            char list[200] = "";
            size_t len = 0;
            for (int i = 0; i < m && len < sizeof list - 16; i++)
                len += (size_t)snprintf(list + len, sizeof list - len, "%s%d", i ? ", " : "", who[i]);
            set_cause("rank%s %s did not respond within %g s (hung, or not in this collective)", m > 1 ? "s" : "",
                      list, G.timeout_s);
            rc = -1;
            break;
        }
        for (int i = 0; i < m && rc == 0; i++) {
            if (!pf[i].revents) continue;
            int r = who[i];
            if (got[r] < sizeof(msg_hdr)) {
                if (recv_some(G.fds[r], (char *)&hdr[r], sizeof(msg_hdr), &got[r], r) < 0) { rc = -1; break; }
                if (got[r] < sizeof(msg_hdr)) continue;
                const msg_hdr *h = &hdr[r];
                if (h->magic != DIST_MAGIC) { set_cause("rank %d sent a malformed message", r); rc = -1; break; }
                if (h->kind != want->kind || h->seq != want->seq) {
                    set_cause("rank %d called %s (collective #%llu) while this rank called %s (#%llu): ranks "
                              "must call the same collectives in the same order",
                              r, kind_name(h->kind), (unsigned long long)h->seq, kind_name(want->kind),
                              (unsigned long long)want->seq);
                    rc = -1;
                    break;
                }
                if (h->param != want->param || (check_size && h->size != want->size)) {
                    char a[120], b[120];
                    describe_param(a, sizeof a, h);
                    describe_param(b, sizeof b, want);
                    set_cause("rank %d passed %s; rank 0 passed %s (every rank must pass the same shape, dtype, "
                              "op and root)", r, a, b);
                    rc = -1;
                    break;
                }
                uint64_t e = expect[r];
                if ((e != UINT64_MAX && h->nbytes != e) || h->nbytes > DIST_MAX_PAYLOAD) {
                    set_cause("rank %d sent %llu bytes, expected %llu", r, (unsigned long long)h->nbytes,
                              (unsigned long long)e);
                    rc = -1;
                    break;
                }
                payload[r] = malloc(h->nbytes ? (size_t)h->nbytes : 1);
                if (!payload[r]) { set_cause("out of memory for %llu bytes", (unsigned long long)h->nbytes); rc = -1; break; }
            } else {
                size_t pgot = got[r] - sizeof(msg_hdr);
                if (recv_some(G.fds[r], payload[r], (size_t)hdr[r].nbytes, &pgot, r) < 0) { rc = -1; break; }
                got[r] = pgot + sizeof(msg_hdr);
            }
            if (got[r] == sizeof(msg_hdr) + hdr[r].nbytes) {
                done[r] = true;
                left--;
                if (sizes) sizes[r] = hdr[r].nbytes;
            }
        }
    }
out:
    free(hdr); free(got); free(done); free(pf); free(who);
    return rc;
}

static void free_payloads(char **p) {
    if (!p) return;
    for (int r = 0; r < G.world_size; r++) free(p[r]);
    free(p);
}

/* Rank 0 after a failure: record it, pass it on, and return -1. */
static int hub_fail(const char *what) {
    fail(what, "%s", g_cause);
    hub_abort(G.broken);
    return -1;
}

/* Non-zero rank: send our part and receive rank 0's reply into reply (size
 * must equal expect, or be up to DIST_MAX_PAYLOAD with expect UINT64_MAX;
 * *reply_alloc then gets a malloc'd buffer). */
/* The text that follows an abort header r (at most cap - 1 bytes, waiting
 * a second at most) into msg, NUL-terminated; its length, 0 if none came. */
static size_t recv_reason(int fd, const msg_hdr *r, char *msg, size_t cap) {
    size_t n = r->nbytes < cap - 1 ? (size_t)r->nbytes : cap - 1;
    if (recv_all(fd, msg, n, now_s() + 1.0, 0) < 0) n = 0;
    msg[n] = 0;
    return n;
}

/* After a failed send to rank 0: rank 0 may have stopped the collective and
 * closed before our part went out, with its reason already waiting in our
 * receive buffer.  Read it (briefly) so the error names the real cause, not
 * the closed connection.  1 = found (msg filled), 0 = none. */
static int pending_abort(char *msg, size_t cap) {
    msg_hdr r;
    if (recv_all(G.fds[0], &r, sizeof r, now_s() + 0.5, 0) < 0) return 0;
    if (r.magic != DIST_MAGIC || r.kind != K_ABORT) return 0;
    return recv_reason(G.fds[0], &r, msg, cap) > 0;
}

static int peer_exchange(const char *what, const msg_hdr *h, const void *payload, void *reply, uint64_t expect,
                         char **reply_alloc, uint64_t *reply_len) {
    double deadline = now_s() + G.timeout_s;
    if (send_msg(G.fds[0], h, payload, deadline, 0) < 0) {
        char cause[sizeof g_cause], msg[1024];
        snprintf(cause, sizeof cause, "%s", g_cause);
        if (pending_abort(msg, sizeof msg)) return fail(what, "stopped by rank 0: %s", msg);
        return fail(what, "%s", cause);
    }
    msg_hdr r;
    deadline = now_s() + G.timeout_s + DIST_REPLY_GRACE_S;
    if (recv_all(G.fds[0], &r, sizeof r, deadline, 0) < 0) return fail(what, "%s", g_cause);
    if (r.magic != DIST_MAGIC) return fail(what, "rank 0 sent a malformed message");
    if (r.kind == K_ABORT) {
        char msg[1024];
        size_t n = recv_reason(G.fds[0], &r, msg, sizeof msg);
        return fail(what, "stopped by rank 0: %s", n ? msg : "(no reason received)");
    }
    if (r.kind != h->kind || r.seq != h->seq) return fail(what, "rank 0 answered a different collective (%s)", kind_name(r.kind));
    if ((expect != UINT64_MAX && r.nbytes != expect) || r.nbytes > DIST_MAX_PAYLOAD)
        return fail(what, "rank 0 sent %llu bytes, expected %llu", (unsigned long long)r.nbytes,
                    (unsigned long long)expect);
    if (reply_alloc) {
        *reply_alloc = malloc((size_t)r.nbytes + 1);
        if (!*reply_alloc) return fail(what, "out of memory");
        (*reply_alloc)[r.nbytes] = 0;
        reply = *reply_alloc;
        if (reply_len) *reply_len = r.nbytes;
    }
    if (r.nbytes && recv_all(G.fds[0], reply, (size_t)r.nbytes, deadline, 0) < 0) {
        if (reply_alloc) { free(*reply_alloc); *reply_alloc = NULL; }
        return fail(what, "%s", g_cause);
    }
    return 0;
}

/* Rank 0: send every other rank its reply (out[r], n[r] bytes). */
static int hub_reply(const char *what, uint32_t kind, uint32_t param, uint64_t size, char *const *out,
                     const uint64_t *n) {
    double deadline = now_s() + G.timeout_s;
    for (int r = 1; r < G.world_size; r++) {
        msg_hdr h = make_hdr(kind, param, size, n[r]);
        if (send_msg(G.fds[r], &h, out[r], deadline, r) < 0) return hub_fail(what);
    }
    return 0;
}

/* ---- reductions (rank 0, in rank order: identical on every run) --------- */

static bool reducible(ml_dtype dt) {
    return dt == ML_F32 || dt == ML_F64 || dt == ML_F16 || dt == ML_BF16 || dt == ML_I64 || dt == ML_I32;
}

static double load_f(const void *p, ml_dtype dt, int64_t i) {
    switch (dt) {
    case ML_F32: return ((const float *)p)[i];
    case ML_F64: return ((const double *)p)[i];
    case ML_F16: return ml_f16_to_f32(((const uint16_t *)p)[i]);
    case ML_BF16: return ml_bf16_to_f32(((const uint16_t *)p)[i]);
    default: return ml_load_as_double(p, dt, i);
    }
}

static void store_f(void *p, ml_dtype dt, int64_t i, double v) {
    switch (dt) {
    case ML_F32: ((float *)p)[i] = (float)v; break;
    case ML_F64: ((double *)p)[i] = v; break;
    case ML_F16: ((uint16_t *)p)[i] = ml_f32_to_f16((float)v); break;
    case ML_BF16: ((uint16_t *)p)[i] = ml_f32_to_bf16((float)v); break;
    default: ml_store_from_double(p, dt, i, v);
    }
}

/* out <- op over in[0..world_size-1] (rank order).  Floats accumulate in
 * double and round once; integers in int64 (avg is refused for them). */
static int reduce_ranks(void *out, const void *const *in, int64_t numel, ml_dtype dt, ml_dist_op op) {
    int n = G.world_size;
    if (dt == ML_I64 || dt == ML_I32) {
        for (int64_t i = 0; i < numel; i++) {
            int64_t acc = dt == ML_I64 ? ((const int64_t *)in[0])[i] : ((const int32_t *)in[0])[i];
            for (int r = 1; r < n; r++) {
                int64_t v = dt == ML_I64 ? ((const int64_t *)in[r])[i] : ((const int32_t *)in[r])[i];
                if (op == ML_DIST_MAX) acc = v > acc ? v : acc;
                else acc = (int64_t)((uint64_t)acc + (uint64_t)v);   /* wraps as the dtype does, never UB */
            }
            if (dt == ML_I64) ((int64_t *)out)[i] = acc;
            else ((int32_t *)out)[i] = (int32_t)acc;
        }
        return 0;
    }
    for (int64_t i = 0; i < numel; i++) {
        double acc = load_f(in[0], dt, i);
        for (int r = 1; r < n; r++) {
            double v = load_f(in[r], dt, i);
            if (op == ML_DIST_MAX) acc = (v > acc || isnan(v)) ? v : acc;   /* NaN wins, as max does */
            else acc += v;
        }
        if (op == ML_DIST_AVG) acc /= n;
        store_f(out, dt, i, acc);
    }
    return 0;
}

/* ---- setup -------------------------------------------------------------- */

int ml_dist_op_parse(const char *s, ml_dist_op *out) {
    if (!strcmp(s, "sum")) *out = ML_DIST_SUM;
    else if (!strcmp(s, "avg") || !strcmp(s, "mean")) *out = ML_DIST_AVG;
    else if (!strcmp(s, "max")) *out = ML_DIST_MAX;
    else return ml_error("unknown reduction op '%s' (expected sum, avg or max)", s);
    return 0;
}

int ml_dist_backend_parse(const char *s, ml_dist_backend *out) {
    if (!strcmp(s, "cpu")) *out = ML_DIST_BACKEND_CPU;
    else if (!strcmp(s, "nccl")) *out = ML_DIST_BACKEND_NCCL;
    else return ml_error("unknown backend '%s' (expected cpu or nccl)", s);
    return 0;
}

const char *ml_dist_backend_name(ml_dist_backend b) { return b == ML_DIST_BACKEND_NCCL ? "nccl" : "cpu"; }

bool ml_dist_is_initialized(void) { return G.init; }
int ml_dist_rank(void) { return G.init ? G.rank : -1; }
int ml_dist_world_size(void) { return G.init ? G.world_size : -1; }
int ml_dist_local_rank(void) { return G.init ? G.local_rank : -1; }
ml_dist_backend ml_dist_get_backend(void) { return G.backend; }

static void tune_socket(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
}

/* Close so that what we sent last (an abort's reason) still arrives: a
 * socket closed with unread input sends a reset, and a reset makes the peer
 * drop the data it has not read yet.  So: end our side, read and discard
 * what the peer still had in flight (briefly: `until` bounds all sockets
 * together), then close. */
static void close_gracefully(int fd, double until) {
    shutdown(fd, SHUT_WR);
    char sink[4096];
    for (;;) {
        struct pollfd pf = {fd, POLLIN, 0};
        int ms = ms_left(until);
        if (ms <= 0 || poll(&pf, 1, ms) <= 0) break;
        ssize_t k = recv(fd, sink, sizeof sink, MSG_DONTWAIT);
        if (k == 0 || (k < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)) break;
    }
    close(fd);
}

static void close_all(void) {
    if (G.fds) {
        double until = now_s() + 0.5;
        for (int r = 0; r < G.world_size; r++)
            if (G.fds[r] >= 0) close_gracefully(G.fds[r], until);
        free(G.fds);
        G.fds = NULL;
    }
}

/* Rank 0: listen, accept world_size - 1 ranks, check their hello, say OK. */
static int rendezvous_hub(const ml_dist_config *c) {
    char port[16];
    snprintf(port, sizeof port, "%d", c->master_port);
    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_family = AF_INET;       /* every interface: other nodes reach us by master_addr */
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    int gr = getaddrinfo(NULL, port, &hints, &ai);
    if (gr != 0) return fail("init", "cannot resolve the listening address: %s", gai_strerror(gr));
    int lfd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (lfd < 0) { freeaddrinfo(ai); return fail("init", "socket: %s", strerror(errno)); }
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, ai->ai_addr, ai->ai_addrlen) < 0) {
        int e = errno;
        freeaddrinfo(ai);
        close(lfd);
        return fail("init", "cannot listen on port %d: %s%s", c->master_port, strerror(e),
                    e == EADDRINUSE ? " (another run or program uses it: pick another master_port)" : "");
    }
    freeaddrinfo(ai);
    if (listen(lfd, c->world_size) < 0) {
        int e = errno;
        close(lfd);
        return fail("init", "listen on port %d: %s", c->master_port, strerror(e));
    }
    double deadline = now_s() + c->timeout_s;
    int joined = 0, rc = 0;
    while (joined < c->world_size - 1 && rc == 0) {
        struct pollfd pf = {lfd, POLLIN, 0};
        int pr = poll(&pf, 1, ms_left(deadline));
        if (pr < 0 && errno == EINTR) continue;
        if (pr <= 0) {
            char list[200] = "";
            size_t len = 0;
            for (int r = 1; r < c->world_size && len < sizeof list - 16; r++)
                if (G.fds[r] < 0) len += (size_t)snprintf(list + len, sizeof list - len, "%s%d", len ? ", " : "", r);
            rc = fail("init", "timed out after %g s waiting for rank(s) %s to connect to port %d", c->timeout_s,
                      list, c->master_port);
            break;
        }
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) continue;
        tune_socket(fd);
        msg_hdr h;
        if (recv_all(fd, &h, sizeof h, now_s() + c->timeout_s, -1) < 0 || h.magic != DIST_MAGIC || h.kind != K_HELLO) {
            close(fd);   /* not one of ours (a port scanner, a stale client): ignore it */
            continue;
        }
        char why[300] = "";
        int r = (int)h.seq;
        if (h.nbytes != (uint64_t)c->world_size)
            snprintf(why, sizeof why, "rank %d was started with world_size %llu, rank 0 with %d", r,
                     (unsigned long long)h.nbytes, c->world_size);
        else if (h.seq < 1 || h.seq >= (uint64_t)c->world_size)
            snprintf(why, sizeof why, "a process said it is rank %llu, outside 1..%d", (unsigned long long)h.seq,
                     c->world_size - 1);
        else if (G.fds[r] >= 0)
            snprintf(why, sizeof why, "two processes said they are rank %d", r);
        else if (h.param != (uint32_t)c->backend)
            snprintf(why, sizeof why, "rank %d uses backend %s, rank 0 uses %s", r,
                     ml_dist_backend_name((ml_dist_backend)h.param), ml_dist_backend_name(c->backend));
        if (why[0]) {
            msg_hdr a = make_hdr(K_ABORT, 0, 0, strlen(why));
            send_msg(fd, &a, why, now_s() + 1.0, -1);
            close(fd);
            rc = fail("init", "%s", why);
            hub_abort(why);
            break;
        }
        G.fds[r] = fd;
        joined++;
    }
    close(lfd);
    if (rc < 0) return -1;
    msg_hdr ok = make_hdr(K_OK, 0, 0, 0);
    for (int r = 1; r < c->world_size; r++)
        if (send_msg(G.fds[r], &ok, NULL, deadline + 1.0, r) < 0) return hub_fail("init");
    return 0;
}

/* Connect to host:port before the deadline (non-blocking connect). */
static int connect_once(const char *host, int port, double deadline, int *out_fd) {
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int gr = getaddrinfo(host, ps, &hints, &ai);
    if (gr != 0) { set_cause("cannot resolve master_addr '%s': %s", host, gai_strerror(gr)); return -2; }
    int rc = -1;
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
        if (fd < 0) continue;
        int cr = connect(fd, a->ai_addr, a->ai_addrlen);
        if (cr < 0 && errno == EINPROGRESS) {
            struct pollfd pf = {fd, POLLOUT, 0};
            int left = ms_left(deadline);
            if (left > 1000) left = 1000;
            if (poll(&pf, 1, left) == 1) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                cr = err ? -1 : 0;
                errno = err;
            } else {
                errno = ETIMEDOUT;
            }
        }
        if (cr == 0) {
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
            tune_socket(fd);
            *out_fd = fd;
            rc = 0;
            break;
        }
        set_cause("connecting to %s:%d: %s", host, port, strerror(errno));
        close(fd);
    }
    freeaddrinfo(ai);
    return rc;
}

static int rendezvous_peer(const ml_dist_config *c) {
    double deadline = now_s() + c->timeout_s;
    int fd = -1;
    for (;;) {
        int rc = connect_once(c->master_addr, c->master_port, deadline, &fd);
        if (rc == 0) break;
        if (rc == -2) return fail("init", "%s", g_cause);
        if (now_s() >= deadline)
            return fail("init", "could not reach rank 0 at %s:%d within %g s (last error: %s)", c->master_addr,
                        c->master_port, c->timeout_s, g_cause);
        struct timespec ts = {0, 100 * 1000 * 1000};   /* rank 0 may not listen yet */
        nanosleep(&ts, NULL);
    }
    G.fds[0] = fd;
    /* The hello is a header alone: seq = our rank, param = backend, nbytes
     * = our world_size (no payload follows). */
    msg_hdr hello = {DIST_MAGIC, K_HELLO, (uint32_t)c->backend, 0, (uint64_t)c->rank, 0, (uint64_t)c->world_size};
    if (send_all(fd, &hello, sizeof hello, deadline, 0) < 0) return fail("init", "%s", g_cause);
    msg_hdr r;
    if (recv_all(fd, &r, sizeof r, deadline + DIST_REPLY_GRACE_S, 0) < 0)
        return fail("init", "waiting for rank 0 to accept: %s", g_cause);
    if (r.magic != DIST_MAGIC) return fail("init", "the process on %s:%d is not a moonlit rank 0", c->master_addr, c->master_port);
    if (r.kind == K_ABORT) {
        char msg[600];
        recv_reason(fd, &r, msg, sizeof msg);
        return fail("init", "rank 0 refused this process: %s", msg);
    }
    if (r.kind != K_OK) return fail("init", "unexpected answer from rank 0");
    return 0;
}

int ml_dist_init(const ml_dist_config *c) {
    if (G.init) return ml_error("dist.init: already initialised (rank %d of %d); call dist.destroy first", G.rank,
                                G.world_size);
    if (c->world_size < 1 || c->world_size > 65536)
        return ml_error("dist.init: world_size must be in 1..65536 (got %d)", c->world_size);
    if (c->rank < 0 || c->rank >= c->world_size)
        return ml_error("dist.init: rank must be in 0..%d for world_size %d (got %d)", c->world_size - 1,
                        c->world_size, c->rank);
    if (c->local_rank < 0) return ml_error("dist.init: local_rank must be >= 0 (got %d)", c->local_rank);
    if (c->master_port < 1 || c->master_port > 65535)
        return ml_error("dist.init: master_port must be in 1..65535 (got %d)", c->master_port);
    if (!(c->timeout_s > 0) || c->timeout_s > 1e7)
        return ml_error("dist.init: timeout_s must be a positive number of seconds (got %g)", c->timeout_s);
    if (!c->master_addr || !c->master_addr[0]) return ml_error("dist.init: master_addr is empty");
#ifndef ML_WITH_CUDA
    if (c->backend == ML_DIST_BACKEND_NCCL)
        return ml_error("dist.init: backend 'nccl' needs a CUDA build of moonlit (this one is CPU only); use "
                        "backend = 'cpu'");
#else
    if (c->backend == ML_DIST_BACKEND_NCCL) {
        /* NVLink SHARP (NVLS) buffers are not supported on the machines we
         * run on; NCCL reads this at its first call. */
        setenv("NCCL_NVLS_ENABLE", "0", 0);
        if (!ml_nccl_comm_init) return ml_error("dist.init: this build has no NCCL support (kernels/cuda/nccl.cu)");
        int count = ml_cuda_device_count();
        if (count == 0) return ml_error("dist.init: backend 'nccl' but no GPU is visible");
        if (count > 1 && c->local_rank >= count)
            return ml_error("dist.init: local_rank %d but only %d GPUs are visible", c->local_rank, count);
        G.cuda_device = count == 1 ? 0 : c->local_rank;
    }
#endif
    memset(g_cause, 0, sizeof g_cause);
    G.rank = c->rank;
    G.world_size = c->world_size;
    G.local_rank = c->local_rank;
    G.backend = c->backend;
    G.timeout_s = c->timeout_s;
    G.seq = 0;
    G.broken[0] = 0;
    G.nccl = NULL;
    G.fds = malloc(sizeof(int) * (size_t)c->world_size);
    if (!G.fds) return ml_error("dist.init: out of memory");
    for (int r = 0; r < c->world_size; r++) G.fds[r] = -1;
    int rc = 0;
    if (c->world_size > 1) rc = c->rank == 0 ? rendezvous_hub(c) : rendezvous_peer(c);
    if (rc < 0) {
        close_all();
        return -1;
    }
    G.init = true;
#ifdef ML_WITH_CUDA
    if (c->backend == ML_DIST_BACKEND_NCCL) {
        char *id = NULL;
        size_t len = ML_NCCL_ID_BYTES;
        if (c->rank == 0) {
            id = malloc(ML_NCCL_ID_BYTES + 1);
            if (!id || ml_nccl_unique_id(id) < 0) {
                char why[600];
                snprintf(why, sizeof why, "ncclGetUniqueId failed: %s", id ? ml_last_error() : "out of memory");
                if (c->world_size > 1) { set_cause("%s", why); hub_fail("init"); } else fail("init", "%s", why);
                free(id);
                ml_dist_destroy();
                return -1;
            }
        }
        if (ml_dist_broadcast_bytes(&id, &len, 0) < 0 || len != ML_NCCL_ID_BYTES) {
            if (len != ML_NCCL_ID_BYTES) ml_error("dist.init (rank %d): the ncclUniqueId from rank 0 is %zu bytes", c->rank, len);
            free(id);
            char keep[1024];
            snprintf(keep, sizeof keep, "%s", ml_last_error());
            ml_dist_destroy();
            return ml_error("%s", keep);
        }
        G.nccl = ml_nccl_comm_init(id, c->world_size, c->rank, G.cuda_device, c->timeout_s);
        free(id);
        if (!G.nccl) {
            char keep[1024];
            snprintf(keep, sizeof keep, "dist.init (rank %d of %d): %s", c->rank, c->world_size, ml_last_error());
            ml_dist_destroy();
            return ml_error("%s", keep);
        }
    }
#endif
    return 0;
}

static void comm_stop(void);

void ml_dist_destroy(void) {
    comm_stop();
#ifdef ML_WITH_CUDA
    if (G.nccl && ml_nccl_comm_destroy) ml_nccl_comm_destroy(G.nccl);
#endif
    G.nccl = NULL;
    close_all();
    G.init = false;
    G.broken[0] = 0;
}

/* ---- work handles and the "cpu" backend's communication thread --------- */

/* An async all_reduce on the "cpu" backend (world size > 1) is queued and
 * run by one communication thread per process, started at the first such
 * call, so the hub's reduction and the socket transfers overlap the
 * caller's compute (DDP launches buckets during backward).  The thread
 * runs the queue in order.  Every other entry point that touches the
 * sockets or G first waits until the queue is empty (comm_drain), so one
 * thread at a time uses them, and each rank issues its collectives in the
 * order it called them, which is the order the hub pairs them in.  The
 * thread runs C only (no Lua) and never retains or releases a tensor: the
 * work holds a reference taken and dropped on the calling thread. */
struct ml_dist_work {
    void *nccl_work;       /* nccl backend: the pending collective */
    ml_tensor *tensor;     /* cpu backend, queued: the tensor reduced in place (retained) */
    ml_dist_op op;
    uint64_t nbytes;
    bool done;             /* under Q.mu */
    int rc;
    char msg[1024];        /* the error when rc < 0 */
    ml_dist_work *next;
};

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;     /* signalled when work is queued or finishes, and at stop */
    bool started, stop;
    pthread_t tid;
    ml_dist_work *head, *tail;   /* head stays queued while it runs */
} Q = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false, false, 0, NULL, NULL};

static int cpu_reduce(const char *what, uint32_t kind, const ml_tensor *t, ml_dist_op op, void *out, uint64_t out_bytes);

static void *comm_main(void *arg) {
    (void)arg;
    pthread_mutex_lock(&Q.mu);
    for (;;) {
        while (!Q.head && !Q.stop) pthread_cond_wait(&Q.cv, &Q.mu);
        if (!Q.head) break;
        ml_dist_work *w = Q.head;
        pthread_mutex_unlock(&Q.mu);
        int rc = cpu_reduce("all_reduce", K_ALL_REDUCE, w->tensor, w->op, ml_data(w->tensor), w->nbytes);
        pthread_mutex_lock(&Q.mu);
        w->rc = rc;
        if (rc < 0) snprintf(w->msg, sizeof w->msg, "%s", ml_last_error());
        w->done = true;
        Q.head = w->next;
        if (!Q.head) Q.tail = NULL;
        pthread_cond_broadcast(&Q.cv);
    }
    pthread_mutex_unlock(&Q.mu);
    return NULL;
}

/* Start the thread with every signal blocked, so that SIGINT and SIGTERM
 * keep reaching the main thread (the REPL's and the launcher's handlers). */
static int comm_start(void) {
    if (Q.started) return 0;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int e = pthread_create(&Q.tid, NULL, comm_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e != 0) return arg_error("all_reduce", "cannot start the communication thread: %s", strerror(e));
    Q.started = true;
    return 0;
}

/* Wait until every queued collective has run. */
static void comm_drain(void) {
    if (!Q.started) return;
    pthread_mutex_lock(&Q.mu);
    while (Q.head) pthread_cond_wait(&Q.cv, &Q.mu);
    pthread_mutex_unlock(&Q.mu);
}

static void comm_stop(void) {
    if (!Q.started) return;
    comm_drain();
    pthread_mutex_lock(&Q.mu);
    Q.stop = true;
    pthread_cond_broadcast(&Q.cv);
    pthread_mutex_unlock(&Q.mu);
    pthread_join(Q.tid, NULL);
    Q.started = Q.stop = false;
}

static void comm_enqueue(ml_dist_work *w) {
    pthread_mutex_lock(&Q.mu);
    if (Q.tail) Q.tail->next = w; else Q.head = w;
    Q.tail = w;
    pthread_cond_broadcast(&Q.cv);
    pthread_mutex_unlock(&Q.mu);
}

/* Blocks until a queued work has run; its result. */
static int comm_wait(ml_dist_work *w) {
    pthread_mutex_lock(&Q.mu);
    while (!w->done) pthread_cond_wait(&Q.cv, &Q.mu);
    pthread_mutex_unlock(&Q.mu);
    if (w->rc < 0) return ml_error("%s", w->msg);
    return 0;
}

int ml_dist_work_wait(ml_dist_work *w) {
    if (!w) return 0;
    if (w->tensor) return comm_wait(w);
    if (!w->nccl_work) return 0;
#ifdef ML_WITH_CUDA
    if (G.nccl && ml_nccl_comm_check && ml_nccl_comm_check(G.nccl) < 0) return fail("all_reduce", "%s", ml_last_error());
    int rc = ml_nccl_work_wait(w->nccl_work);
    if (rc < 0) return fail("all_reduce", "%s", ml_last_error());
    return rc;
#else
    return 0;
#endif
}

int ml_dist_work_done(ml_dist_work *w) {
    if (!w) return 1;
    if (w->tensor) {
        pthread_mutex_lock(&Q.mu);
        bool done = w->done;
        pthread_mutex_unlock(&Q.mu);
        if (!done) return 0;
        return w->rc < 0 ? ml_error("%s", w->msg) : 1;
    }
    if (!w->nccl_work) return 1;
#ifdef ML_WITH_CUDA
    if (G.nccl && ml_nccl_comm_check && ml_nccl_comm_check(G.nccl) < 0) return fail("all_reduce", "%s", ml_last_error());
    int rc = ml_nccl_work_done(w->nccl_work);
    if (rc < 0) return fail("all_reduce", "%s", ml_last_error());
    return rc;
#else
    return 1;
#endif
}

void ml_dist_work_free(ml_dist_work *w) {
    if (!w) return;
    if (w->tensor) {
        /* never free memory the thread may still be reducing into */
        if (comm_wait(w) < 0) ml_clear_error();
        ml_release(w->tensor);
    }
#ifdef ML_WITH_CUDA
    if (w->nccl_work && ml_nccl_work_free) ml_nccl_work_free(w->nccl_work);
#endif
    free(w);
}

/* ---- tensor collectives ------------------------------------------------- */

/* The checks of the tensor alone (no look at G.broken, which the
 * communication thread may be writing); *nbytes gets its byte size. */
static int check_tensor_args(const char *what, const ml_tensor *t, uint64_t *nbytes) {
    if (!G.init) return check_usable(what);
    if (!ml_is_contiguous(t)) return arg_error(what, "the tensor must be contiguous (call :contiguous() first)");
    bool nccl = G.backend == ML_DIST_BACKEND_NCCL;
    if (nccl && t->device.type != ML_CUDA)
        return arg_error(what, "backend nccl needs a CUDA tensor (got a %s tensor)", t->device.type == ML_CPU ? "cpu" : "?");
    if (nccl && t->device.index != G.cuda_device)
        return arg_error(what, "the tensor is on cuda:%d, this rank's GPU is cuda:%d", t->device.index, G.cuda_device);
    if (!nccl && t->device.type != ML_CPU)
        return arg_error(what, "backend cpu needs a CPU tensor (initialise with backend = 'nccl' for CUDA tensors)");
    if (!reducible(t->dtype))
        return arg_error(what, "dtype %s is not supported (f32, bf16, f16, f64, i64, i32)", ml_dtype_short(t->dtype));
    int64_t numel = ml_numel(t);
    size_t bytes;
    if (!ml_mul_size((size_t)numel, ml_dtype_size(t->dtype), &bytes))
        return arg_error(what, "tensor too large");
    *nbytes = bytes;
    return 0;
}

static int check_tensor(const char *what, const ml_tensor *t, uint64_t *nbytes) {
    if (check_usable(what) < 0) return -1;
    return check_tensor_args(what, t, nbytes);
}

/* The gate of every other in-place write (ml_inplace_begin: while grad mode
 * is on a tensor autograd tracks is refused, and the storage version is
 * bumped so a saved tensor overwritten here fails backward), as this rank's
 * argument error.  Called after the argument checks and before anything is
 * sent, on every rank alike (write = false on a broadcast's root, which
 * reads only), so that all ranks refuse together and none waits for one
 * that did. */
static int inplace_gate(const char *what, ml_tensor *t, bool write) {
    if ((write ? ml_inplace_begin(what, t) : ml_inplace_check(what, t)) == 0) return 0;
    char msg[600];
    snprintf(msg, sizeof msg, "%s", ml_last_error());
    size_t n = strlen(what);
    return arg_error(what, "%s", strncmp(msg, what, n) == 0 && msg[n] == ':' ? msg + n + 2 : msg);
}

static uint32_t pack_param(ml_dtype dt, int op, int root) {
    return (uint32_t)dt | (uint32_t)op << 8 | (uint32_t)root << 16;
}

/* The hub-side and peer-side of all_reduce / reduce_scatter on bytes. */
static int cpu_reduce(const char *what, uint32_t kind, const ml_tensor *t, ml_dist_op op, void *out, uint64_t out_bytes) {
    uint64_t nbytes = 0;
    if (check_tensor(what, t, &nbytes) < 0) return -1;
    int n = G.world_size;
    if (n == 1) {
        /* one rank: every op is the identity (and rounding a value of the
         * dtype through double gives it back), so skip the pass */
        if (out != ml_data(t)) memcpy(out, ml_data(t), (size_t)out_bytes);
        return 0;
    }
    int64_t numel = ml_numel(t);
    uint32_t param = pack_param(t->dtype, op, 0);
    G.seq++;
    msg_hdr want = make_hdr(kind, param, nbytes, nbytes);
    if (G.rank != 0) return peer_exchange(what, &want, ml_data(t), out, out_bytes, NULL, NULL);
    char **in = calloc((size_t)n, sizeof *in);
    uint64_t *expect = calloc((size_t)n, sizeof *expect);
    char *full = kind == K_REDUCE_SCATTER ? malloc(nbytes ? (size_t)nbytes : 1) : NULL;
    if (!in || !expect || (kind == K_REDUCE_SCATTER && !full)) {
        free(in); free(expect); free(full);
        set_cause("out of memory");
        return hub_fail(what);
    }
    for (int r = 0; r < n; r++) expect[r] = nbytes;
    int rc = n > 1 ? hub_gather(&want, expect, in, true, NULL) : 0;
    if (rc < 0) {
        free_payloads(in); free(expect); free(full);
        return hub_fail(what);
    }
    const void **src = (const void **)malloc(sizeof(void *) * (size_t)n);
    if (!src) { free_payloads(in); free(expect); free(full); set_cause("out of memory"); return hub_fail(what); }
    src[0] = ml_data(t);
    for (int r = 1; r < n; r++) src[r] = in[r];
    void *dst = kind == K_REDUCE_SCATTER ? (void *)full : out;
    reduce_ranks(dst, src, numel, t->dtype, op);
    free(src);
    char **reply = calloc((size_t)n, sizeof *reply);
    if (!reply) { free_payloads(in); free(expect); free(full); set_cause("out of memory"); return hub_fail(what); }
    for (int r = 1; r < n; r++) {
        reply[r] = kind == K_REDUCE_SCATTER ? full + (size_t)out_bytes * (size_t)r : (char *)dst;
        expect[r] = out_bytes;
    }
    if (kind == K_REDUCE_SCATTER) memcpy(out, full, (size_t)out_bytes);
    rc = n > 1 ? hub_reply(what, kind, param, nbytes, reply, expect) : 0;
    free(reply);
    free_payloads(in);
    free(expect);
    free(full);
    return rc;
}

#ifdef ML_WITH_CUDA
static int nccl_call(const char *what, int kind, const ml_tensor *send, ml_tensor *recv, ml_dist_op op, int root,
                     void **async) {
    if (!ml_nccl_collective) return arg_error(what, "this build has no NCCL support");
    if (ml_nccl_collective(G.nccl, kind, send, recv, op, root, async) < 0) return fail(what, "%s", ml_last_error());
    return 0;
}
#endif

int ml_dist_all_reduce(ml_tensor *t, ml_dist_op op, ml_dist_work **work) {
    if (work) *work = NULL;
    uint64_t nbytes;
    if (check_tensor_args("all_reduce", t, &nbytes) < 0) return -1;
    if (op == ML_DIST_AVG && !ml_dtype_is_float(t->dtype))
        return arg_error("all_reduce", "op avg needs a floating-point tensor (got %s)", ml_dtype_short(t->dtype));
    if (inplace_gate("all_reduce", t, true) < 0) return -1;
    ml_dist_work *w = NULL;
    if (work) {
        w = calloc(1, sizeof *w);
        if (!w) return arg_error("all_reduce", "out of memory");
    }
    if (w && G.backend == ML_DIST_BACKEND_CPU && G.world_size > 1) {
        /* queued: a broken group is reported by the thread, at wait */
        if (comm_start() < 0) { free(w); return -1; }
        w->tensor = ml_retain(t);
        w->op = op;
        w->nbytes = nbytes;
        comm_enqueue(w);
        *work = w;
        return 0;
    }
    comm_drain();
    if (check_usable("all_reduce") < 0) { free(w); return -1; }
#ifdef ML_WITH_CUDA
    if (G.backend == ML_DIST_BACKEND_NCCL) {
        if (nccl_call("all_reduce", 0, t, t, op, 0, w ? &w->nccl_work : NULL) < 0) { free(w); return -1; }
        if (work) *work = w;
        return 0;
    }
#endif
    if (cpu_reduce("all_reduce", K_ALL_REDUCE, t, op, ml_data(t), nbytes) < 0) { free(w); return -1; }
    if (work) *work = w;
    return 0;
}

int ml_dist_broadcast(ml_tensor *t, int root) {
    comm_drain();
    uint64_t nbytes;
    if (check_tensor("broadcast", t, &nbytes) < 0) return -1;
    if (root < 0 || root >= G.world_size)
        return arg_error("broadcast", "root must be in 0..%d (got %d)", G.world_size - 1, root);
    int n = G.world_size;
    /* the root's tensor is read, every other rank's written */
    if (inplace_gate("broadcast", t, n > 1 && G.rank != root) < 0) return -1;
#ifdef ML_WITH_CUDA
    if (G.backend == ML_DIST_BACKEND_NCCL) return nccl_call("broadcast", 1, t, t, ML_DIST_SUM, root, NULL);
#endif
    if (n == 1) return 0;
    uint32_t param = pack_param(t->dtype, 0, root);
    G.seq++;
    msg_hdr want = make_hdr(K_BROADCAST, param, nbytes, G.rank == root ? nbytes : 0);
    if (G.rank != 0)
        return peer_exchange("broadcast", &want, ml_data(t), ml_data(t), G.rank == root ? 0 : nbytes, NULL, NULL);
    char **in = calloc((size_t)n, sizeof *in);
    uint64_t *expect = calloc((size_t)n, sizeof *expect);
    char **reply = calloc((size_t)n, sizeof *reply);
    if (!in || !expect || !reply) {
        free(in); free(expect); free(reply);
        set_cause("out of memory");
        return hub_fail("broadcast");
    }
    for (int r = 0; r < n; r++) expect[r] = r == root ? nbytes : 0;
    int rc = hub_gather(&want, expect, in, true, NULL);
    if (rc == 0) {
        if (root != 0) memcpy(ml_data(t), in[root], (size_t)nbytes);
        for (int r = 1; r < n; r++) {
            reply[r] = ml_data(t);
            expect[r] = r == root ? 0 : nbytes;
        }
        rc = hub_reply("broadcast", K_BROADCAST, param, nbytes, reply, expect);
    } else {
        hub_fail("broadcast");
    }
    free_payloads(in);
    free(expect);
    free(reply);
    return rc;
}

ml_tensor *ml_dist_all_gather(const ml_tensor *t) {
    comm_drain();
    uint64_t nbytes;
    if (check_tensor("all_gather", t, &nbytes) < 0) return NULL;
    if (t->ndim < 1) return arg_error("all_gather", "needs a tensor of at least 1 dim (got a scalar)"), NULL;
    int n = G.world_size;
    int64_t shape[ML_MAX_DIMS];
    memcpy(shape, t->shape, sizeof(int64_t) * (size_t)t->ndim);
    if (!ml_mul_i64(shape[0], n, &shape[0])) return arg_error("all_gather", "result too large"), NULL;
    ml_tensor *out = ml_empty(t->ndim, shape, t->dtype, t->device);
    if (!out) return NULL;
#ifdef ML_WITH_CUDA
    if (G.backend == ML_DIST_BACKEND_NCCL) {
        if (nccl_call("all_gather", 2, t, out, ML_DIST_SUM, 0, NULL) < 0) { ml_release(out); return NULL; }
        return out;
    }
#endif
    uint64_t total = nbytes * (uint64_t)n;   /* fits: out exists */
    uint32_t param = pack_param(t->dtype, 0, 0);
    G.seq++;
    msg_hdr want = make_hdr(K_ALL_GATHER, param, nbytes, nbytes);
    if (G.rank != 0) {
        if (peer_exchange("all_gather", &want, ml_data(t), ml_data(out), total, NULL, NULL) < 0) { ml_release(out); return NULL; }
        return out;
    }
    memcpy(ml_data(out), ml_data(t), (size_t)nbytes);
    if (n == 1) return out;
    char **in = calloc((size_t)n, sizeof *in);
    uint64_t *expect = calloc((size_t)n, sizeof *expect);
    char **reply = calloc((size_t)n, sizeof *reply);
    int rc = -1;
    if (!in || !expect || !reply) {
        set_cause("out of memory");
        hub_fail("all_gather");
    } else {
        for (int r = 0; r < n; r++) expect[r] = nbytes;
        if (hub_gather(&want, expect, in, true, NULL) < 0) {
            hub_fail("all_gather");
        } else {
            for (int r = 1; r < n; r++) {
                memcpy((char *)ml_data(out) + (size_t)nbytes * (size_t)r, in[r], (size_t)nbytes);
                reply[r] = ml_data(out);
                expect[r] = total;
            }
            rc = hub_reply("all_gather", K_ALL_GATHER, param, nbytes, reply, expect);
        }
    }
    if (in) free_payloads(in);
    free(expect);
    free(reply);
    if (rc < 0) { ml_release(out); return NULL; }
    return out;
}

ml_tensor *ml_dist_reduce_scatter(const ml_tensor *t, ml_dist_op op) {
    comm_drain();
    uint64_t nbytes;
    if (check_tensor("reduce_scatter", t, &nbytes) < 0) return NULL;
    int n = G.world_size;
    if (t->ndim < 1 || t->shape[0] % n != 0)
        return arg_error("reduce_scatter", "dim 1 (size %lld) must be divisible by world_size %d",
                         t->ndim < 1 ? 0LL : (long long)t->shape[0], n), NULL;
    if (op == ML_DIST_AVG && !ml_dtype_is_float(t->dtype))
        return arg_error("reduce_scatter", "op avg needs a floating-point tensor (got %s)", ml_dtype_short(t->dtype)), NULL;
    int64_t shape[ML_MAX_DIMS];
    memcpy(shape, t->shape, sizeof(int64_t) * (size_t)t->ndim);
    shape[0] /= n;
    ml_tensor *out = ml_empty(t->ndim, shape, t->dtype, t->device);
    if (!out) return NULL;
#ifdef ML_WITH_CUDA
    if (G.backend == ML_DIST_BACKEND_NCCL) {
        if (nccl_call("reduce_scatter", 3, t, out, op, 0, NULL) < 0) { ml_release(out); return NULL; }
        return out;
    }
#endif
    if (cpu_reduce("reduce_scatter", K_REDUCE_SCATTER, t, op, ml_data(out), nbytes / (uint64_t)n) < 0) {
        ml_release(out);
        return NULL;
    }
    return out;
}

/* ---- host collectives (TCP on every backend) ---------------------------- */

int ml_dist_barrier(void) {
    comm_drain();
    if (check_usable("barrier") < 0) return -1;
    int n = G.world_size;
    if (n == 1) return 0;
    G.seq++;
    msg_hdr want = make_hdr(K_BARRIER, 0, 0, 0);
    if (G.rank != 0) return peer_exchange("barrier", &want, NULL, NULL, 0, NULL, NULL);
    char **in = calloc((size_t)n, sizeof *in);
    uint64_t *expect = calloc((size_t)n, sizeof *expect);
    char **reply = calloc((size_t)n, sizeof *reply);
    int rc = -1;
    if (!in || !expect || !reply) { set_cause("out of memory"); hub_fail("barrier"); }
    else if (hub_gather(&want, expect, in, true, NULL) < 0) hub_fail("barrier");
    else rc = hub_reply("barrier", K_BARRIER, 0, 0, reply, expect);
    if (in) free_payloads(in);
    free(expect);
    free(reply);
    return rc;
}

int ml_dist_all_reduce_double(double *x, ml_dist_op op) {
    comm_drain();
    if (check_usable("all_reduce_number") < 0) return -1;
    int n = G.world_size;
    if (n == 1) return 0;
    G.seq++;
    uint32_t param = pack_param(ML_F64, op, 0);
    msg_hdr want = make_hdr(K_NUMBER, param, 8, 8);
    if (G.rank != 0) return peer_exchange("all_reduce_number", &want, x, x, 8, NULL, NULL);
    char **in = calloc((size_t)n, sizeof *in);
    uint64_t *expect = calloc((size_t)n, sizeof *expect);
    char **reply = calloc((size_t)n, sizeof *reply);
    const void **src = calloc((size_t)n, sizeof *src);
    int rc = -1;
    if (!in || !expect || !reply || !src) { set_cause("out of memory"); hub_fail("all_reduce_number"); goto out; }
    for (int r = 0; r < n; r++) expect[r] = 8;
    if (hub_gather(&want, expect, in, true, NULL) < 0) { hub_fail("all_reduce_number"); goto out; }
    src[0] = x;
    for (int r = 1; r < n; r++) src[r] = in[r];
    double res;
    reduce_ranks(&res, src, 1, ML_F64, op);
    *x = res;
    for (int r = 1; r < n; r++) reply[r] = (char *)x;
    rc = hub_reply("all_reduce_number", K_NUMBER, param, 8, reply, expect);
out:
    if (in) free_payloads(in);
    free(expect);
    free(reply);
    free(src);
    return rc;
}

int ml_dist_broadcast_bytes(char **data, size_t *len, int root) {
    comm_drain();
    const char *what = "broadcast_string";
    if (check_usable(what) < 0) return -1;
    int n = G.world_size;
    if (root < 0 || root >= n) return arg_error(what, "root must be in 0..%d (got %d)", n - 1, root);
    if (G.rank == root && (uint64_t)*len > DIST_MAX_PAYLOAD) return arg_error(what, "%zu bytes is too large", *len);
    if (n == 1) return 0;
    G.seq++;
    uint32_t param = pack_param(ML_U8, 0, root);
    msg_hdr want = make_hdr(K_BYTES, param, 0, G.rank == root ? *len : 0);
    if (G.rank != 0) {
        char *got = NULL;
        uint64_t got_len = 0;
        bool mine = G.rank == root;
        if (peer_exchange(what, &want, *data, NULL, mine ? 0 : UINT64_MAX, mine ? NULL : &got, &got_len) < 0)
            return -1;
        if (!mine) {
            free(*data);
            *data = got;
            *len = (size_t)got_len;
        }
        return 0;
    }
    char **in = calloc((size_t)n, sizeof *in);
    uint64_t *expect = calloc((size_t)n, sizeof *expect);
    uint64_t *sizes = calloc((size_t)n, sizeof *sizes);
    char **reply = calloc((size_t)n, sizeof *reply);
    int rc = -1;
    if (!in || !expect || !sizes || !reply) { set_cause("out of memory"); hub_fail(what); goto out; }
    for (int r = 0; r < n; r++) expect[r] = r == root ? UINT64_MAX : 0;
    if (hub_gather(&want, expect, in, false, sizes) < 0) { hub_fail(what); goto out; }
    if (root != 0) {
        /* Take the root's bytes as ours (NUL-terminated like every result). */
        char *mine = realloc(in[root], (size_t)sizes[root] + 1);
        if (!mine) { set_cause("out of memory"); hub_fail(what); goto out; }
        mine[sizes[root]] = 0;
        in[root] = NULL;
        free(*data);
        *data = mine;
        *len = (size_t)sizes[root];
    }
    for (int r = 1; r < n; r++) {
        reply[r] = *data;
        expect[r] = r == root ? 0 : (uint64_t)*len;
    }
    rc = hub_reply(what, K_BYTES, param, 0, reply, expect);
out:
    if (in) free_payloads(in);
    free(expect);
    free(sizes);
    free(reply);
    return rc;
}
