// attention_cudnn.cu — fused flash attention for float16 / bfloat16 through
// the cuDNN frontend's graph API (contract in attention_cudnn.h).
//
// Why: moonlit's own half-precision path (attention.cu) runs cuBLAS GEMMs
// around explicit [Sq, Sk] score matrices; cuDNN's fused kernels keep the
// scores on chip, forward and backward, and are several times faster at
// Stable Diffusion's shapes.  They are tried first and our kernels remain
// the fallback for whatever cuDNN does not take.
//
// One graph per distinct call: the forward is an sdpa node (outputs O and,
// for training, the softmax Stats), the backward an sdpa_backward node
// (inputs Q, K, V, O, dO, Stats; outputs dQ, dK, dV).  Tensors are declared
// with logical dims {B, H, S, width} and the caller's BSHD strides
// {batch, head, seq, 1}, so no operand is copied or transposed.  Building a
// graph (validate, heuristics, check_support, plan) takes milliseconds, so
// built graphs are kept in a table keyed by everything that shapes the
// plan: pass, device, dtype, sizes, strides, mask, scale bits, whether
// Stats are wanted, determinism.  A key cuDNN refused is kept too (as "no
// graph"), so an unsupported shape costs one attempt, not one per call.
//
// Support is decided by cuDNN itself, on the library actually loaded: the
// binary may be built against newer headers (9.19) than the library of the
// machine it runs on (9.14).  The frontend checks the runtime version
// (cudnnGetVersion) in its support surface, and any failure to validate or
// build a graph is answered 0 ("unsupported"), with the frontend's message
// printed once per distinct reason.  The build is tried first with the
// frontend's automatic choice of implementation, then with the composite
// implementation (the long-standing one), in case the automatic choice is
// one the loaded library cannot plan.  Failures while executing a built
// graph are real errors (-1).
//
// Stats are cuDNN's natural-log log-sum-exp of the scaled scores, the lse of
// attention.cu: no conversion either way.  Workspaces and the scratch of
// unwanted gradients are one ml_cuda_workspace (allocator.h), freed
// stream-ordered after the graph is queued on the handle's stream, which is
// the device's compute stream (cudnn_handle.h).
//
// Letters: B batch, H heads, Sq / Sk query / key positions, D query/key
// width, Dv value width.
#include "common.cuh"
#include "attention_cudnn.h"

#include <cstdio>
#include <mutex>
#include <set>
#include <string>

extern "C" void ml_cudnn_sdpa_shape_contiguous(ml_cudnn_sdpa_shape *s, int device, ml_dtype dtype, int64_t B,
                                               int64_t H, int64_t Sq, int64_t Sk, int64_t D, int64_t Dv, bool causal,
                                               double scale) {
    auto bshd = [H](int64_t S, int64_t W) { return ml_sdpa_layout{S * H * W, H * W, W}; };
    *s = ml_cudnn_sdpa_shape{};
    s->device = device;
    s->dtype = dtype;
    s->B = B, s->H = H, s->Sq = Sq, s->Sk = Sk, s->D = D, s->Dv = Dv;
    s->q = s->dq = bshd(Sq, D);
    s->k = s->dk = bshd(Sk, D);
    s->v = s->dv = bshd(Sk, Dv);
    s->out = s->dout = bshd(Sq, Dv);
    s->causal = causal;
    s->scale = scale;
    s->deterministic = false;
}

namespace {

std::mutex g_notice_mu;
std::set<std::string> g_noticed;

// Prints "moonlit: <what>: <why>; using moonlit's attention kernel" the
// first time `why` comes up in this process; returns 0 ("unsupported").
int unsupported(const std::string &what, const std::string &why) {
    std::lock_guard<std::mutex> lock(g_notice_mu);
    if (g_noticed.insert(why).second)
        fprintf(stderr, "moonlit: %s: %s; using moonlit's attention kernel\n", what.c_str(), why.c_str());
    return 0;
}

bool is_half(ml_dtype dt) { return dt == ML_F16 || dt == ML_BF16; }

}  // namespace

#ifndef ML_WITH_CUDNN_FRONTEND

// Built without the frontend headers: every half-precision call says so once
// and falls back.
extern "C" int ml_cudnn_sdpa_forward(void *, float *, const void *, const void *, const void *,
                                     const ml_cudnn_sdpa_shape *s) {
    if (!s || !is_half(s->dtype)) return 0;
    return unsupported("cuDNN SDPA",
                       "this build has no cuDNN frontend (scripts/fetch_cudnn_frontend.sh, then rebuild)");
}

extern "C" int ml_cudnn_sdpa_backward(void *, void *, void *, const void *, const void *, const void *,
                                      const void *, const void *, const float *, const ml_cudnn_sdpa_shape *s) {
    if (!s || !is_half(s->dtype)) return 0;
    return unsupported("cuDNN SDPA",
                       "this build has no cuDNN frontend (scripts/fetch_cudnn_frontend.sh, then rebuild)");
}

#else  // ML_WITH_CUDNN_FRONTEND

#include "allocator.h"
#include "cudnn_handle.h"

#include <array>
#include <climits>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <map>
#include <memory>
#include <unordered_map>

// The frontend's JSON support (graph serialisation) is not used here; leaving
// it out saves a megabyte of header per compile.
#define CUDNN_FRONTEND_SKIP_JSON_LIB
// The frontend reaches cuDNN (and the CUDA runtime) through dlsym rather
// than direct calls.  Two reasons: its checks of what the backend can do
// then ask the loaded library's version at run time instead of assuming the
// headers' (9.19 here, 9.14 on the GPU machine), and the parts of it that
// moonlit never runs (an NVRTC-compiled normalisation engine) need no
// library at link time.
#define NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING
#include <cudnn_frontend.h>
#include <dlfcn.h>
#include <cstdlib>

// The library the frontend's dlsym calls look in (it declares this and
// leaves the definition to the program); set by runtime() below.  Defined
// once in the whole program: another file using the frontend must share it.
namespace cudnn_frontend {
void *cudnn_dlhandle = nullptr;
}

namespace {

namespace fe = cudnn_frontend;
using tensor_ptr = std::shared_ptr<fe::graph::Tensor_attributes>;

// Graph tensor ids (the variant pack maps them to device pointers).
enum : int64_t { UID_Q = 1, UID_K, UID_V, UID_O, UID_STATS, UID_DO, UID_DQ, UID_DK, UID_DV };

enum { FWD = 0, BWD = 1 };

// "9.14.0" from cudnnGetVersion()'s 91400 (cuDNN 9 numbering).
std::string version_string(size_t v) {
    char s[32];
    snprintf(s, sizeof s, "%zu.%zu.%zu", v / 10000, v / 100 % 100, v % 100);
    return s;
}

// The library loaded at run time, and "" or why it cannot serve any graph:
// another major version than the headers (their enums may differ), or no
// handle on it for the frontend.
struct runtime_info {
    size_t version;
    std::string name, problem;
};

// Sonames of the libraries moonlit is linked with, hence already loaded:
// dlopen by soname returns those very copies.
#define ML_STR2(x) #x
#define ML_STR(x) ML_STR2(x)
constexpr const char *kCudnnSoname = "libcudnn.so." ML_STR(CUDNN_MAJOR);

const runtime_info &runtime() {
    static const runtime_info info = [] {
        runtime_info r;
        r.version = cudnnGetVersion();
        r.name = "cuDNN " + version_string(r.version) + " SDPA";
        if (r.version / 10000 != CUDNN_MAJOR) {
            r.problem = "the loaded cuDNN library is " + version_string(r.version) + ", moonlit was built for cuDNN " +
                        std::to_string(CUDNN_MAJOR) + ".x";
            return r;
        }
        void *h = dlopen(kCudnnSoname, RTLD_NOW | RTLD_NOLOAD);
        if (!h) h = dlopen(kCudnnSoname, RTLD_NOW);
        if (!h) {
            const char *e = dlerror();
            r.problem = std::string("cannot open ") + kCudnnSoname + " (" + (e ? e : "no reason given") + ")";
            return r;
        }
        cudnn_frontend::cudnn_dlhandle = h;
        // Left to itself the frontend opens the first of libcudart.so.12 and
        // .13 it finds, which on a machine with both need not be the runtime
        // moonlit's kernels use; its documented override names ours (a
        // setting of the user's own is kept).
        const std::string cudart = "libcudart.so." + std::to_string(CUDART_VERSION / 1000);
        setenv("CUDNN_FRONTEND_CUDART_LIB_NAME", cudart.c_str(), 0);
        return r;
    }();
    return info;
}

std::string call_desc(int pass, const ml_cudnn_sdpa_shape &s) {
    char d[160];
    snprintf(d, sizeof d, "%s %s, B %lld H %lld Sq %lld Sk %lld D %lld Dv %lld%s", ml_dtype_name(s.dtype),
             pass == FWD ? "forward" : "backward", (long long)s.B, (long long)s.H, (long long)s.Sq, (long long)s.Sk,
             (long long)s.D, (long long)s.Dv, s.causal ? " causal" : "");
    return d;
}

// ---- the plan table -----------------------------------------------------------

// pass, device, dtype, stats, deterministic, causal, scale bits, B, H, Sq, Sk,
// D, Dv, then 3 strides for each of q, k, v, out, dout, dq, dk, dv.
constexpr int kKeyLen = 13 + 8 * 3;
using plan_key = std::array<int64_t, kKeyLen>;

struct plan {
    std::shared_ptr<fe::graph::Graph> graph;   // null: cuDNN cannot run this key
    int64_t workspace = 0;                     // bytes
    uint64_t last_use = 0;
};

std::mutex g_mu;
std::map<plan_key, plan> g_plans;
uint64_t g_clock;
// Stable Diffusion uses a few dozen shapes; past this many the least recently
// used plan is dropped (a long run over varying sizes must not grow forever).
constexpr size_t kMaxPlans = 256;

plan_key make_key(int pass, const ml_cudnn_sdpa_shape &s, bool stats) {
    plan_key k{};
    const float scale = (float)s.scale;   // the graph takes the scale as a float
    uint32_t bits;
    memcpy(&bits, &scale, sizeof bits);
    const int64_t head[13] = {pass,
                              s.device,
                              (int64_t)s.dtype,
                              stats,
                              pass == BWD && s.deterministic,
                              s.causal,
                              (int64_t)bits,
                              s.B,
                              s.H,
                              s.Sq,
                              s.Sk,
                              s.D,
                              s.Dv};
    int n = 0;
    for (int64_t x : head) k[n++] = x;
    const ml_sdpa_layout *ls[8] = {&s.q, &s.k, &s.v, &s.out, &s.dout, &s.dq, &s.dk, &s.dv};
    const int used = pass == FWD ? 4 : 8;   // the forward's key ignores the backward's layouts
    for (int i = 0; i < 8; i++) {
        k[n++] = i < used ? ls[i]->batch : 0;
        k[n++] = i < used ? ls[i]->seq : 0;
        k[n++] = i < used ? ls[i]->head : 0;
    }
    return k;
}

// ---- building graphs ------------------------------------------------------------

fe::DataType_t io_type(ml_dtype dt) { return dt == ML_F16 ? fe::DataType_t::HALF : fe::DataType_t::BFLOAT16; }

// Logical {B, H, S, W} over BSHD memory.
std::vector<int64_t> dims(int64_t B, int64_t H, int64_t S, int64_t W) { return {B, H, S, W}; }
std::vector<int64_t> strides(const ml_sdpa_layout &l) { return {l.batch, l.head, l.seq, 1}; }

tensor_ptr input(fe::graph::Graph &g, const char *name, int64_t uid, std::vector<int64_t> d, std::vector<int64_t> st) {
    return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(d).set_stride(st));
}

// Stats / lse: [B, H, Sq, 1] float32, contiguous.
std::vector<int64_t> stats_dims(const ml_cudnn_sdpa_shape &s) { return {s.B, s.H, s.Sq, 1}; }
std::vector<int64_t> stats_strides(const ml_cudnn_sdpa_shape &s) { return {s.H * s.Sq, s.Sq, 1, 1}; }

std::shared_ptr<fe::graph::Graph> new_graph(const ml_cudnn_sdpa_shape &s) {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(io_type(s.dtype))
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    return g;
}

std::shared_ptr<fe::graph::Graph> forward_graph(const ml_cudnn_sdpa_shape &s, bool stats,
                                                fe::AttentionImplementation_t impl) {
    auto g = new_graph(s);
    auto Q = input(*g, "Q", UID_Q, dims(s.B, s.H, s.Sq, s.D), strides(s.q));
    auto K = input(*g, "K", UID_K, dims(s.B, s.H, s.Sk, s.D), strides(s.k));
    auto V = input(*g, "V", UID_V, dims(s.B, s.H, s.Sk, s.Dv), strides(s.v));
    auto opts = fe::graph::SDPA_attributes()
                    .set_name("sdpa")
                    .set_generate_stats(stats)
                    .set_attn_scale((float)s.scale)
                    .set_implementation(impl);
    if (s.causal) opts.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT).set_diagonal_band_right_bound(0);
    auto outs = g->sdpa(Q, K, V, opts);
    outs[0]->set_output(true).set_uid(UID_O).set_dim(dims(s.B, s.H, s.Sq, s.Dv)).set_stride(strides(s.out));
    if (stats)
        outs[1]
            ->set_output(true)
            .set_uid(UID_STATS)
            .set_data_type(fe::DataType_t::FLOAT)
            .set_dim(stats_dims(s))
            .set_stride(stats_strides(s));
    return g;
}

std::shared_ptr<fe::graph::Graph> backward_graph(const ml_cudnn_sdpa_shape &s) {
    auto g = new_graph(s);
    auto Q = input(*g, "Q", UID_Q, dims(s.B, s.H, s.Sq, s.D), strides(s.q));
    auto K = input(*g, "K", UID_K, dims(s.B, s.H, s.Sk, s.D), strides(s.k));
    auto V = input(*g, "V", UID_V, dims(s.B, s.H, s.Sk, s.Dv), strides(s.v));
    auto O = input(*g, "O", UID_O, dims(s.B, s.H, s.Sq, s.Dv), strides(s.out));
    auto dO = input(*g, "dO", UID_DO, dims(s.B, s.H, s.Sq, s.Dv), strides(s.dout));
    auto stats = g->tensor(fe::graph::Tensor_attributes()
                               .set_name("Stats")
                               .set_uid(UID_STATS)
                               .set_dim(stats_dims(s))
                               .set_stride(stats_strides(s))
                               .set_data_type(fe::DataType_t::FLOAT));
    auto opts = fe::graph::SDPA_backward_attributes()
                    .set_name("sdpa_backward")
                    .set_attn_scale((float)s.scale)
                    .set_deterministic_algorithm(s.deterministic);
    if (s.causal) opts.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT).set_diagonal_band_right_bound(0);
    auto grads = g->sdpa_backward(Q, K, V, O, dO, stats, opts);
    grads[0]->set_output(true).set_uid(UID_DQ).set_dim(dims(s.B, s.H, s.Sq, s.D)).set_stride(strides(s.dq));
    grads[1]->set_output(true).set_uid(UID_DK).set_dim(dims(s.B, s.H, s.Sk, s.D)).set_stride(strides(s.dk));
    grads[2]->set_output(true).set_uid(UID_DV).set_dim(dims(s.B, s.H, s.Sk, s.Dv)).set_stride(strides(s.dv));
    return g;
}

// Validates and plans g on the loaded library; "" when it can run, else
// cuDNN's reason.
std::string build(fe::graph::Graph &g, cudnnHandle_t h) {
    try {
        fe::error_t e = g.build(h, {fe::HeurMode_t::A});
        if (e.is_good()) return "";
        std::string why = e.get_message();
        return why.empty() ? "cuDNN gave no reason" : why;
    } catch (const std::exception &x) {
        return std::string("the cuDNN frontend threw: ") + x.what();
    }
}

// The plan of key k, built on first use (caller holds g_mu).  Its graph is
// null when cuDNN refused; *why then says why.
plan *plan_for(const plan_key &key, int pass, const ml_cudnn_sdpa_shape &s, bool stats, cudnnHandle_t h,
               std::string *why) {
    auto it = g_plans.find(key);
    if (it != g_plans.end()) {
        it->second.last_use = ++g_clock;
        return &it->second;
    }
    if (g_plans.size() >= kMaxPlans) {
        auto lru = g_plans.begin();
        for (auto i = g_plans.begin(); i != g_plans.end(); ++i)
            if (i->second.last_use < lru->second.last_use) lru = i;
        g_plans.erase(lru);   // a call running it holds its own reference to the graph
    }
    plan p;
    p.last_use = ++g_clock;
    std::shared_ptr<fe::graph::Graph> g;
    if (pass == FWD) {
        g = forward_graph(s, stats, fe::AttentionImplementation_t::AUTO);
        *why = build(*g, h);
        if (!why->empty()) {
            auto g2 = forward_graph(s, stats, fe::AttentionImplementation_t::COMPOSITE);
            std::string why2 = build(*g2, h);
            if (why2.empty())
                g = g2, why->clear();
            else if (why2 != *why)
                *why += "; composite implementation: " + why2;
        }
    } else {
        g = backward_graph(s);
        *why = build(*g, h);
    }
    if (why->empty()) {
        int64_t ws = 0;
        fe::error_t e = g->get_workspace_size(ws);
        if (e.is_bad() || ws < 0)
            *why = "no workspace size: " + e.get_message();
        else
            p.graph = g, p.workspace = ws;
    }
    return &g_plans.emplace(key, std::move(p)).first->second;
}

// ---- checks before cuDNN sees a call ---------------------------------------------

bool mul_ok(int64_t a, int64_t b, int64_t *out) { return !__builtin_mul_overflow(a, b, out); }

// Elements of a [B, S, H, W] tensor, -1 on overflow.
int64_t numel(int64_t B, int64_t S, int64_t H, int64_t W) {
    int64_t n;
    if (!mul_ok(B, S, &n) || !mul_ok(n, H, &n) || !mul_ok(n, W, &n)) return -1;
    return n;
}

// Why cuDNN must not see this call ("" if it may); sizes and layouts only.
std::string precheck(int pass, const ml_cudnn_sdpa_shape &s) {
    const ml_sdpa_layout *ls[8] = {&s.q, &s.k, &s.v, &s.out, &s.dout, &s.dq, &s.dk, &s.dv};
    const int used = pass == FWD ? 4 : 8;
    for (int i = 0; i < used; i++)
        if (ls[i]->batch < 0 || ls[i]->seq < 0 || ls[i]->head < 0) return "negative strides";
    // cuDNN's kernels index with 32-bit offsets in places; the extents of
    // moonlit's tensors stay well inside that in practice.
    const int64_t n[4] = {numel(s.B, s.Sq, s.H, s.D), numel(s.B, s.Sk, s.H, s.D), numel(s.B, s.Sk, s.H, s.Dv),
                          numel(s.B, s.Sq, s.H, s.Dv)};
    for (int64_t x : n)
        if (x < 0 || x > INT_MAX) return "tensors of 2^31 elements or more";
    return "";
}

bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

// MOONLIT_CUDNN_SDPA: unset or 1, cuDNN first; 0, moonlit's kernels only
// (A/B comparisons); "deterministic", cuDNN with its deterministic backward
// whatever the caller asks.
enum class env_mode { on, off, deterministic };

env_mode mode() {
    static const env_mode m = [] {
        const char *e = getenv("MOONLIT_CUDNN_SDPA");
        if (!e || !*e || !strcmp(e, "1")) return env_mode::on;
        if (!strcmp(e, "0")) return env_mode::off;
        if (!strcmp(e, "deterministic")) return env_mode::deterministic;
        fprintf(stderr, "moonlit: MOONLIT_CUDNN_SDPA=%s is not 0, 1 or deterministic; taken as 1\n", e);
        return env_mode::on;
    }();
    return m;
}

// The parts of a call shared by both passes: checks, handle, plan.  Returns
// 1 with *out set, 0 (unsupported, noticed) or -1.
int prepare(int pass, const ml_cudnn_sdpa_shape &s, bool stats, std::initializer_list<const void *> ptrs,
            cudnnHandle_t *h, std::shared_ptr<fe::graph::Graph> *graph, int64_t *workspace) {
    if (!is_half(s.dtype)) return 0;   // f32 / f64 stay on moonlit's kernels, silently
    // empty calls and bad sizes are the caller's own kernel's to handle or report
    if (s.B <= 0 || s.H <= 0 || s.Sq <= 0 || s.Sk <= 0 || s.D <= 0 || s.Dv <= 0) return 0;
    if (mode() == env_mode::off) return unsupported("cuDNN SDPA", "turned off by MOONLIT_CUDNN_SDPA=0");
    const runtime_info &rt = runtime();
    if (!rt.problem.empty()) return unsupported("cuDNN SDPA", rt.problem);
    std::string why = precheck(pass, s);
    if (!why.empty()) return unsupported(rt.name + " (" + call_desc(pass, s) + ")", why);
    for (const void *p : ptrs)
        if (p && !aligned16(p))
            return unsupported(rt.name + " (" + call_desc(pass, s) + ")", "an operand is not 16-byte aligned");
    *h = ml_cudnn_handle(s.device);
    if (!*h) {
        why = std::string("no cuDNN handle (") + ml_last_error() + ")";
        ml_clear_error();
        return unsupported(rt.name, why);
    }
    const plan_key key = make_key(pass, s, stats);
    std::lock_guard<std::mutex> lock(g_mu);
    plan *p = plan_for(key, pass, s, stats, *h, &why);
    if (!p->graph) {
        // a refused key is noticed when it is first built (why is set then)
        return why.empty() ? 0 : unsupported(rt.name + " does not take " + call_desc(pass, s), why);
    }
    *graph = p->graph;   // our own reference: the table may drop the plan meanwhile
    *workspace = p->workspace;
    return 1;
}

// Queues g with pack on h's stream.  ws holds the graph's workspace as its
// part 0 (ws goes back to the cache when the caller's scope ends, after the
// graph is queued: stream-ordered, as allocator.h explains).
int run(cudnnHandle_t h, const fe::graph::Graph &g, const ml_cuda_workspace &ws,
        std::unordered_map<int64_t, void *> &pack, int pass, const ml_cudnn_sdpa_shape &s) {
    fe::error_t e = g.execute(h, pack, ws.part<void>(0));
    if (e.is_bad())
        return ml_error("sdpa: %s failed on %s: %s", runtime().name.c_str(), call_desc(pass, s).c_str(),
                        e.get_message().c_str());
    return 1;
}

// Bytes of a [B, S, H, W] half-precision gradient cuDNN writes when the
// caller does not want it (precheck bounded every extent by INT_MAX
// elements, so this does not overflow).
size_t half_bytes(int64_t B, int64_t S, int64_t H, int64_t W) { return (size_t)numel(B, S, H, W) * 2; }

}  // namespace

extern "C" int ml_cudnn_sdpa_forward(void *out, float *lse, const void *q, const void *k, const void *v,
                                     const ml_cudnn_sdpa_shape *s) {
    if (!s) return 0;
    try {
        cudnnHandle_t h;
        std::shared_ptr<fe::graph::Graph> g;
        int64_t workspace;
        const bool stats = lse != nullptr;
        int rc = prepare(FWD, *s, stats, {out, lse, q, k, v}, &h, &g, &workspace);
        if (rc <= 0) return rc;
        std::unordered_map<int64_t, void *> pack = {
            {UID_Q, (void *)q}, {UID_K, (void *)k}, {UID_V, (void *)v}, {UID_O, out}};
        if (stats) pack[UID_STATS] = lse;
        ml_cuda_workspace ws(s->device, {(size_t)workspace});
        if (!ws.ok()) return -1;
        return run(h, *g, ws, pack, FWD, *s);
    } catch (const std::exception &x) {
        return ml_error("sdpa: cuDNN forward: %s", x.what());
    }
}

extern "C" int ml_cudnn_sdpa_backward(void *dq, void *dk, void *dv, const void *dout, const void *q, const void *k,
                                      const void *v, const void *out, const float *lse,
                                      const ml_cudnn_sdpa_shape *s) {
    if (!s) return 0;
    if (!dq && !dk && !dv) return 1;   // nothing wanted: nothing to do
    if (!lse) return 0;                // no saved statistics: only moonlit's kernels could say why
    try {
        // Unwanted gradients go to contiguous scratch, and the key says so.
        ml_cudnn_sdpa_shape t = *s;
        ml_cudnn_sdpa_shape c;
        ml_cudnn_sdpa_shape_contiguous(&c, s->device, s->dtype, s->B, s->H, s->Sq, s->Sk, s->D, s->Dv, s->causal,
                                       s->scale);
        if (!dq) t.dq = c.dq;
        if (!dk) t.dk = c.dk;
        if (!dv) t.dv = c.dv;
        if (mode() == env_mode::deterministic) t.deterministic = true;
        cudnnHandle_t h;
        std::shared_ptr<fe::graph::Graph> g;
        int64_t workspace;
        int rc = prepare(BWD, t, true, {dq, dk, dv, dout, q, k, v, out, lse}, &h, &g, &workspace);
        if (rc <= 0) return rc;
        // parts: the graph's workspace, then scratch for each unwanted gradient
        ml_cuda_workspace ws(s->device, {(size_t)workspace, dq ? 0 : half_bytes(s->B, s->Sq, s->H, s->D),
                                         dk ? 0 : half_bytes(s->B, s->Sk, s->H, s->D),
                                         dv ? 0 : half_bytes(s->B, s->Sk, s->H, s->Dv)});
        if (!ws.ok()) return -1;
        std::unordered_map<int64_t, void *> pack = {
            {UID_Q, (void *)q},   {UID_K, (void *)k},     {UID_V, (void *)v},
            {UID_O, (void *)out}, {UID_DO, (void *)dout}, {UID_STATS, (void *)lse},
            {UID_DQ, dq ? dq : ws.part<void>(1)},
            {UID_DK, dk ? dk : ws.part<void>(2)},
            {UID_DV, dv ? dv : ws.part<void>(3)}};
        return run(h, *g, ws, pack, BWD, t);
    } catch (const std::exception &x) {
        return ml_error("sdpa backward: cuDNN: %s", x.what());
    }
}

#endif  // ML_WITH_CUDNN_FRONTEND
