// conv_cudnn_graph.cu — NHWC 2-D convolutions through the cuDNN frontend's
// graph API, plans built once per shape and kept (contract in
// conv_cudnn_graph.h).
//
// Why: cuDNN 9 implements its legacy convolution calls
// (cudnnConvolutionForward and the backward twins, kernels/cuda/conv2d.cu)
// as a shim over the graph backend that redoes part of the plan's set-up on
// every call: a host cost of tens of microseconds that dominates small
// convolutions.  A graph built and planned once per shape costs one execute
// per call.  The forward's bias add is fused into the same graph (a
// pointwise ADD after conv_fprop, in float32 before the rounding to the
// output's dtype), which saves the separate broadcast-add kernel and one
// pass over the output.
//
// Tensors are declared as cuDNN wants them: logical NCHW dims with the
// strides of our NHWC memory (x {N, C, H, W} with strides {HWC, 1, WC, C});
// the filter, [O, kh, kw, C] in memory, as {O, C, kh, kw} with strides
// {kh kw C, 1, kw C, C}; the bias [O] as {1, O, 1, 1}.  No operand is copied.
//
// Plans.  For each key (pass, device, dtype, sizes, padding, strides, bias,
// the choice rule) the graph is validated and cuDNN's heuristics are asked
// for engine configurations, mode A then the fallback list.  Configurations
// are filtered before anything is built:
//   - NONDETERMINISTIC ones are left out unless the rule is "fastest" (so
//     that runs repeat bit for bit); when that leaves nothing, the graph is
//     rebuilt with them allowed;
//   - REDUCED_PRECISION_REDUCTION ones always (the sums stay float32);
//   - for float32, TENSOR_CORE and DOWN_CONVERT_INPUTS ones (TF32 or half
//     inputs would lose parity with the CPU), leaving FMA kernels;
//   - workspaces over kWorkspaceCap.
// Then, by the rule (MOONLIT_CONV_ALGO, read by conv2d.cu): "heuristic"
// builds the first configuration that builds, in cuDNN's ranking; "measure"
// and "fastest" build up to kMaxTimed of them and time each on the first
// call's own buffers (one warm-up, then kTimedRuns back-to-back runs), the
// fastest kept, times within kTimeTie counting as equal (the smaller
// workspace, then the better ranked, decides), so that two runs on one
// machine nearly always choose alike.  A failed measurement falls back to
// the best-ranked built plan, with a notice.
//
// Support is decided by cuDNN on the library actually loaded (the frontend
// is dynamically loaded, as in attention_cudnn.cu, whose library handle this
// file shares).  Whatever goes wrong before a plan is chosen — validation,
// heuristics, no configuration left, a build, an exception from the
// frontend — answers 0 ("unsupported") and the key is remembered as refused,
// so the legacy path takes it from then on at no extra cost; one line on
// stderr per distinct reason.  A built plan that fails to execute is also
// turned into a refusal of its key (the legacy path then runs the call), so
// a mistake here costs speed, never a wrong result.  Workspaces are
// ml_cuda_workspace (allocator.h), freed stream-ordered after the graph is
// queued on the handle's stream, the device's compute stream
// (cudnn_handle.h).
#include "common.cuh"
#include "conv_cudnn_graph.h"

#include <cstdio>
#include <mutex>
#include <set>
#include <string>

namespace {

std::mutex g_notice_mu;
std::set<std::string> g_noticed;

// Prints "moonlit: <what>: <why>; using cuDNN's legacy convolution API" the
// first time `why` comes up in this process; returns 0 ("unsupported").
int unsupported(const std::string &what, const std::string &why) {
    std::lock_guard<std::mutex> lock(g_notice_mu);
    if (g_noticed.insert(why).second)
        fprintf(stderr, "moonlit: %s: %s; using cuDNN's legacy convolution API\n", what.c_str(), why.c_str());
    return 0;
}

bool graph_dtype(ml_dtype dt) { return dt == ML_F32 || dt == ML_F16 || dt == ML_BF16; }

}  // namespace

#ifndef ML_WITH_CUDNN_FRONTEND

// Built without the frontend headers: the first call says so once and every
// call falls back.
namespace {
int no_frontend(const ml_conv_graph_shape *s) {
    if (!s || !graph_dtype(s->dtype)) return 0;
    return unsupported("conv2d (cuDNN graph)",
                       "this build has no cuDNN frontend (scripts/fetch_cudnn_frontend.sh, then rebuild)");
}
}  // namespace

extern "C" int ml_conv_graph_forward(void *, const void *, const void *, const void *, const ml_conv_graph_shape *s,
                                     bool *bias_added) {
    if (bias_added) *bias_added = false;
    return no_frontend(s);
}

extern "C" int ml_conv_graph_backward_data(void *, const void *, const void *, const ml_conv_graph_shape *s) {
    return no_frontend(s);
}

extern "C" int ml_conv_graph_backward_filter(void *, const void *, const void *, const ml_conv_graph_shape *s) {
    return no_frontend(s);
}

#else  // ML_WITH_CUDNN_FRONTEND

#include "allocator.h"
#include "cudnn_handle.h"

#include <array>
#include <climits>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <unordered_map>
#include <vector>

// As in attention_cudnn.cu: no JSON (serialisation is not used), and cuDNN
// reached through dlsym so that support checks ask the loaded library.
#define CUDNN_FRONTEND_SKIP_JSON_LIB
#define NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING
#include <cudnn_frontend.h>
#include <dlfcn.h>
#include <cstdlib>

// cudnn_frontend::cudnn_dlhandle, the library the frontend's dlsym calls
// look in, is defined once for the program in attention_cudnn.cu; runtime()
// below sets it when it is still unset (both files set it to the same
// handle: dlopen of one soname returns the one loaded copy).

namespace {

namespace fe = cudnn_frontend;
using tensor_ptr = std::shared_ptr<fe::graph::Tensor_attributes>;
using graph_ptr = std::shared_ptr<fe::graph::Graph>;

// Graph tensor ids (the variant pack maps them to device pointers).
enum : int64_t { UID_X = 1, UID_W, UID_Y, UID_BIAS, UID_DX, UID_DY, UID_DW };

enum { FWD = 0, DGRAD = 1, WGRAD = 2 };

const char *pass_name(int pass) {
    return pass == FWD ? "forward" : pass == DGRAD ? "backward data" : "backward filter";
}

// Workspace a plan may ask for (the legacy path's cap too).
constexpr int64_t kWorkspaceCap = (int64_t)512 << 20;
// Plans built and timed per key under "measure" / "fastest": cuDNN's
// ranking is good enough that the best is nearly always among its first
// few, and each build costs milliseconds.
constexpr size_t kMaxTimed = 8;
constexpr int kTimedRuns = 3;
// Measured times closer than this fraction count as equal (see the top).
constexpr float kTimeTie = 0.03f;

std::string version_string(size_t v) {
    char s[32];
    snprintf(s, sizeof s, "%zu.%zu.%zu", v / 10000, v / 100 % 100, v % 100);
    return s;
}

// The library loaded at run time, and "" or why it cannot serve any graph.
struct runtime_info {
    size_t version;
    std::string name, problem;
};

#define ML_STR2(x) #x
#define ML_STR(x) ML_STR2(x)
constexpr const char *kCudnnSoname = "libcudnn.so." ML_STR(CUDNN_MAJOR);

const runtime_info &runtime() {
    static const runtime_info info = [] {
        runtime_info r;
        r.version = cudnnGetVersion();
        r.name = "cuDNN " + version_string(r.version) + " conv2d graph";
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
        if (!cudnn_frontend::cudnn_dlhandle) cudnn_frontend::cudnn_dlhandle = h;
        // The CUDA runtime moonlit's kernels use, not the first of .12/.13
        // the frontend would find (a setting of the user's own is kept).
        const std::string cudart = "libcudart.so." + std::to_string(CUDART_VERSION / 1000);
        setenv("CUDNN_FRONTEND_CUDART_LIB_NAME", cudart.c_str(), 0);
        return r;
    }();
    return info;
}

// Ho / Wo of the shape (the caller checked the kernel fits the padded input).
int64_t out_h(const ml_conv_graph_shape &s) { return (s.H + 2 * s.pad_h - s.kh) / s.stride_h + 1; }
int64_t out_w(const ml_conv_graph_shape &s) { return (s.W + 2 * s.pad_w - s.kw) / s.stride_w + 1; }

std::string call_desc(int pass, const ml_conv_graph_shape &s, bool bias) {
    char d[200];
    snprintf(d, sizeof d, "%s %s%s, input [%lld, %lld, %lld, %lld] filter [%lld, %lld, %lld, %lld] stride %lld,%lld pad %lld,%lld",
             ml_dtype_name(s.dtype), pass_name(pass), bias ? " with bias" : "", (long long)s.N, (long long)s.H,
             (long long)s.W, (long long)s.C, (long long)s.O, (long long)s.kh, (long long)s.kw, (long long)s.C,
             (long long)s.stride_h, (long long)s.stride_w, (long long)s.pad_h, (long long)s.pad_w);
    return d;
}

// cuDNN's reasons can run to one line per engine configuration; the first
// line says what matters and keeps the notices one per distinct reason.
std::string first_line(const std::string &why) {
    std::string r = why.substr(0, why.find('\n'));
    if (r.size() > 300) r = r.substr(0, 300) + "...";
    return r.empty() ? "cuDNN gave no reason" : r;
}

// ---- the plan table -------------------------------------------------------------

// pass, device, dtype, N, H, W, C, O, kh, kw, pad_h, pad_w, stride_h,
// stride_w, bias, choice.
constexpr int kKeyLen = 16;
using plan_key = std::array<int64_t, kKeyLen>;

plan_key make_key(int pass, const ml_conv_graph_shape &s, bool bias) {
    return plan_key{pass,    s.device, (int64_t)s.dtype, s.N,        s.H,        s.W,        s.C,  s.O,
                    s.kh,    s.kw,     s.pad_h,          s.pad_w,    s.stride_h, s.stride_w, bias, (int64_t)s.choice};
}

struct plan {
    graph_ptr graph;                  // null: refused (the legacy path runs this key)
    std::vector<int64_t> candidates;  // built plans, in cuDNN's ranking
    int64_t index = -1;               // the chosen plan; -1 until chosen
    int64_t workspace = 0;            // bytes, of the chosen plan
    uint64_t last_use = 0;
};

std::mutex g_mu;
std::map<plan_key, plan> g_plans;
uint64_t g_clock;
// A model has a few dozen shapes; past this many the least recently used
// plan is dropped (a run over varying sizes must not grow forever).
constexpr size_t kMaxPlans = 512;

// ---- building graphs ------------------------------------------------------------

fe::DataType_t io_type(ml_dtype dt) {
    return dt == ML_F16 ? fe::DataType_t::HALF : dt == ML_BF16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::FLOAT;
}

// Logical {n, c, h, w} over NHWC memory.
std::vector<int64_t> nchw(int64_t n, int64_t c, int64_t h, int64_t w) { return {n, c, h, w}; }
std::vector<int64_t> nhwc_strides(int64_t c, int64_t h, int64_t w) { return {h * w * c, 1, w * c, c}; }

tensor_ptr input(fe::graph::Graph &g, const char *name, int64_t uid, std::vector<int64_t> d, std::vector<int64_t> st) {
    return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(d).set_stride(st));
}

graph_ptr make_graph(int pass, const ml_conv_graph_shape &s, bool bias) {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(io_type(s.dtype))
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    const int64_t Ho = out_h(s), Wo = out_w(s);
    const std::vector<int64_t> x_dims = nchw(s.N, s.C, s.H, s.W), x_str = nhwc_strides(s.C, s.H, s.W);
    const std::vector<int64_t> w_dims = nchw(s.O, s.C, s.kh, s.kw), w_str = nhwc_strides(s.C, s.kh, s.kw);
    const std::vector<int64_t> y_dims = nchw(s.N, s.O, Ho, Wo), y_str = nhwc_strides(s.O, Ho, Wo);
    const std::vector<int64_t> pad = {s.pad_h, s.pad_w}, stride = {s.stride_h, s.stride_w}, dilation = {1, 1};
    if (pass == FWD) {
        auto X = input(*g, "X", UID_X, x_dims, x_str);
        auto W = input(*g, "W", UID_W, w_dims, w_str);
        auto opts = fe::graph::Conv_fprop_attributes()
                        .set_name("conv_fprop")
                        .set_padding(pad)
                        .set_stride(stride)
                        .set_dilation(dilation);
        auto Y = g->conv_fprop(X, W, opts);
        if (bias) {
            // conv_fprop's result stays virtual (float32, on chip); the sum
            // is the graph's output.
            auto B = input(*g, "B", UID_BIAS, {1, s.O, 1, 1}, {s.O, 1, s.O, s.O});
            Y = g->pointwise(Y, B, fe::graph::Pointwise_attributes().set_name("bias").set_mode(fe::PointwiseMode_t::ADD));
        }
        Y->set_output(true).set_uid(UID_Y).set_dim(y_dims).set_stride(y_str).set_data_type(io_type(s.dtype));
    } else if (pass == DGRAD) {
        auto DY = input(*g, "DY", UID_DY, y_dims, y_str);
        auto W = input(*g, "W", UID_W, w_dims, w_str);
        auto opts = fe::graph::Conv_dgrad_attributes()
                        .set_name("conv_dgrad")
                        .set_padding(pad)
                        .set_stride(stride)
                        .set_dilation(dilation);
        auto DX = g->conv_dgrad(DY, W, opts);
        DX->set_output(true).set_uid(UID_DX).set_dim(x_dims).set_stride(x_str).set_data_type(io_type(s.dtype));
    } else {
        auto DY = input(*g, "DY", UID_DY, y_dims, y_str);
        auto X = input(*g, "X", UID_X, x_dims, x_str);
        auto opts = fe::graph::Conv_wgrad_attributes()
                        .set_name("conv_wgrad")
                        .set_padding(pad)
                        .set_stride(stride)
                        .set_dilation(dilation);
        auto DW = g->conv_wgrad(DY, X, opts);
        DW->set_output(true).set_uid(UID_DW).set_dim(w_dims).set_stride(w_str).set_data_type(io_type(s.dtype));
    }
    return g;
}

#define ML_FE_TRY(call)                                         \
    do {                                                        \
        fe::error_t ml_e_ = (call);                             \
        if (ml_e_.is_bad()) return first_line(ml_e_.get_message()); \
    } while (0)

// Validates g, asks the heuristics, filters their configurations (see the
// top) and builds up to `want` of them, their indices into *built in
// cuDNN's ranking.  "" on success, else cuDNN's reason.
std::string plan_graph(fe::graph::Graph &g, cudnnHandle_t h, const ml_conv_graph_shape &s, bool deterministic,
                       size_t want, std::vector<int64_t> *built) {
    try {
        ML_FE_TRY(g.validate());
        ML_FE_TRY(g.build_operation_graph(h));
        ML_FE_TRY(g.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}));
        g.deselect_numeric_notes({fe::NumericalNote_t::REDUCED_PRECISION_REDUCTION});
        if (s.dtype == ML_F32)
            g.deselect_numeric_notes({fe::NumericalNote_t::TENSOR_CORE, fe::NumericalNote_t::DOWN_CONVERT_INPUTS});
        if (deterministic) g.deselect_numeric_notes({fe::NumericalNote_t::NONDETERMINISTIC});
        g.deselect_workspace_greater_than(kWorkspaceCap);
        ML_FE_TRY(g.check_support());
        std::string first_failure;
        const int64_t count = g.get_execution_plan_count();
        for (int64_t i = 0; i < count && built->size() < want; i++) {
            fe::error_t e = g.build_plan_at_index(i);
            if (e.is_good())
                built->push_back(i);
            else if (first_failure.empty())
                first_failure = first_line(e.get_message());
        }
        if (built->empty()) return "no plan could be built (" + first_failure + ")";
        return "";
    } catch (const std::exception &x) {
        return std::string("the cuDNN frontend threw: ") + x.what();
    }
}

// Builds the graph of a key and its candidate plans (caller holds g_mu).
// "" with p->graph set, or why cuDNN refused.
std::string build(plan *p, int pass, const ml_conv_graph_shape &s, bool bias, cudnnHandle_t h) {
    const size_t want = s.choice == ML_CONV_GRAPH_HEURISTIC ? 1 : kMaxTimed;
    const bool any_kind = s.choice == ML_CONV_GRAPH_FASTEST;
    graph_ptr g = make_graph(pass, s, bias);
    std::vector<int64_t> built;
    std::string why = plan_graph(*g, h, s, !any_kind, want, &built);
    if (!why.empty() && !any_kind) {
        // No deterministic plan: any plan rather than the legacy path, as
        // the legacy path itself would choose.
        g = make_graph(pass, s, bias);
        built.clear();
        std::string why2 = plan_graph(*g, h, s, false, want, &built);
        if (why2.empty())
            why.clear();
        else if (why2 != why)
            why += "; allowing nondeterministic plans: " + why2;
    }
    if (!why.empty()) return why;
    p->graph = g;
    p->candidates = built;
    if (built.size() == 1) {
        // Nothing to measure: the one built plan is the choice.
        int64_t ws = 0;
        fe::error_t e = g->get_workspace_size_plan_at_index(built[0], ws);
        if (e.is_bad() || ws < 0) {
            p->graph.reset();
            return "no workspace size: " + first_line(e.get_message());
        }
        p->index = built[0];
        p->workspace = ws;
    }
    return "";
}

// The plan of key k (caller holds g_mu): found, or built now.  Its graph is
// null when cuDNN refused; *why is then set the first time.
plan *plan_for(const plan_key &key, int pass, const ml_conv_graph_shape &s, bool bias, cudnnHandle_t h,
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
    *why = build(&p, pass, s, bias, h);
    return &g_plans.emplace(key, std::move(p)).first->second;
}

// ---- measuring ----------------------------------------------------------------------

// Times each candidate of p on the call's buffers (pack) and keeps the
// fastest as p->index (caller holds g_mu).  0, or -1 with *why set when no
// candidate could be timed.  The outputs in pack are overwritten, which is
// harmless: the call writes them next.
int measure(plan *p, cudnnHandle_t h, int dev, std::unordered_map<int64_t, void *> &pack, std::string *why) {
    fe::graph::Graph &g = *p->graph;
    std::vector<int64_t> ws(p->candidates.size(), -1);
    int64_t max_ws = 0;
    for (size_t i = 0; i < ws.size(); i++) {
        int64_t w = 0;
        if (g.get_workspace_size_plan_at_index(p->candidates[i], w).is_good() && w >= 0) {
            ws[i] = w;
            if (w > max_ws) max_ws = w;
        }
    }
    ml_cuda_workspace scratch(dev, {(size_t)max_ws});
    if (!scratch.ok()) {
        *why = std::string("no memory for the measurement (") + ml_last_error() + ")";
        ml_clear_error();
        return -1;
    }
    cudaStream_t st = nullptr;
    if (cudnnGetStream(h, &st) != CUDNN_STATUS_SUCCESS) {
        *why = "cudnnGetStream failed";
        return -1;
    }
    cudaEvent_t start = nullptr, stop = nullptr;
    if (cudaEventCreate(&start) != cudaSuccess || cudaEventCreate(&stop) != cudaSuccess) {
        if (start) cudaEventDestroy(start);
        *why = std::string("no CUDA events (") + cudaGetErrorString(cudaGetLastError()) + ")";
        return -1;
    }
    std::vector<float> ms(p->candidates.size(), -1.f);
    for (size_t i = 0; i < ms.size(); i++) {
        if (ws[i] < 0) continue;
        const int64_t c = p->candidates[i];
        void *w = scratch.part<void>(0);
        if (g.execute_plan_at_index(h, pack, w, c).is_bad()) continue;   // warm-up; a failing plan is skipped
        bool ok = cudaEventRecord(start, st) == cudaSuccess;
        for (int r = 0; ok && r < kTimedRuns; r++) ok = g.execute_plan_at_index(h, pack, w, c).is_good();
        ok = ok && cudaEventRecord(stop, st) == cudaSuccess && cudaEventSynchronize(stop) == cudaSuccess;
        float t = 0;
        if (ok && cudaEventElapsedTime(&t, start, stop) == cudaSuccess) ms[i] = t / kTimedRuns;
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    float best = -1;
    for (float t : ms)
        if (t >= 0 && (best < 0 || t < best)) best = t;
    if (best < 0) {
        *why = "no plan ran";
        return -1;
    }
    size_t pick = ms.size();
    for (size_t i = 0; i < ms.size(); i++) {
        if (ms[i] < 0 || ms[i] > best * (1 + kTimeTie)) continue;
        if (pick == ms.size() || ws[i] < ws[pick]) pick = i;   // ties: less workspace, then the better ranked
    }
    p->index = p->candidates[pick];
    p->workspace = ws[pick];
    return 0;
}

// ---- calls -------------------------------------------------------------------------

bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

bool mul_ok(int64_t a, int64_t b, int64_t *out) { return !__builtin_mul_overflow(a, b, out); }

int64_t numel4(int64_t a, int64_t b, int64_t c, int64_t d) {
    int64_t n;
    if (!mul_ok(a, b, &n) || !mul_ok(n, c, &n) || !mul_ok(n, d, &n)) return -1;
    return n;
}

// Why cuDNN must not see this shape ("" if it may).
std::string precheck(const ml_conv_graph_shape &s) {
    if (s.N <= 0 || s.H <= 0 || s.W <= 0 || s.C <= 0 || s.O <= 0 || s.kh <= 0 || s.kw <= 0 || s.stride_h <= 0 ||
        s.stride_w <= 0 || s.pad_h < 0 || s.pad_w < 0)
        return "empty or invalid sizes";
    if (s.H + 2 * s.pad_h < s.kh || s.W + 2 * s.pad_w < s.kw) return "a kernel larger than the padded input";
    // cuDNN's kernels index with 32-bit offsets in places (the legacy path
    // refuses such tensors with an error of its own).
    const int64_t n[3] = {numel4(s.N, s.H, s.W, s.C), numel4(s.O, s.kh, s.kw, s.C), numel4(s.N, out_h(s), out_w(s), s.O)};
    for (int64_t x : n)
        if (x < 0 || x > INT_MAX) return "tensors of 2^31 elements or more";
    return "";
}

// Runs one call of `pass`: the checks, the key's plan (built, chosen on
// these buffers when measured), one execute.  1, 0 (unsupported, noticed)
// or -1.
int run(int pass, const ml_conv_graph_shape &s, bool bias, std::unordered_map<int64_t, void *> &pack) {
    if (!graph_dtype(s.dtype)) return 0;   // f64 and the rest: the legacy path's to refuse
    const runtime_info &rt = runtime();
    if (!rt.problem.empty()) return unsupported("conv2d (cuDNN graph)", rt.problem);
    std::string why = precheck(s);
    if (!why.empty()) return unsupported(rt.name + " (" + call_desc(pass, s, bias) + ")", why);
    for (auto &kv : pack)
        if (!aligned16(kv.second))
            return unsupported(rt.name + " (" + call_desc(pass, s, bias) + ")", "an operand is not 16-byte aligned");
    cudnnHandle_t h = ml_cudnn_handle(s.device);
    if (!h) {
        why = std::string("no cuDNN handle (") + ml_last_error() + ")";
        ml_clear_error();
        return unsupported(rt.name, why);
    }
    const plan_key key = make_key(pass, s, bias);
    graph_ptr g;
    int64_t index, workspace;
    {
        std::lock_guard<std::mutex> lock(g_mu);
        plan *p = plan_for(key, pass, s, bias, h, &why);
        if (!p->graph) return why.empty() ? 0 : unsupported(rt.name + " does not take " + call_desc(pass, s, bias), why);
        if (p->index < 0) {
            // The first call of a measured key: its inputs are written by
            // kernels queued on the compute stream, which the measurement
            // runs on too; the synchronisation makes an earlier kernel's
            // failure its own error rather than a failed measurement.
            cudaStream_t st = nullptr;
            if (cudnnGetStream(h, &st) == CUDNN_STATUS_SUCCESS) ML_CUDA_TRY(cudaStreamSynchronize(st));
            std::string mwhy;
            if (measure(p, h, s.device, pack, &mwhy) < 0) {
                // The best-ranked built plan, as the heuristic rule would.
                int64_t ws = 0;
                if (p->graph->get_workspace_size_plan_at_index(p->candidates[0], ws).is_bad() || ws < 0) {
                    p->graph.reset();
                    return unsupported(rt.name + " does not take " + call_desc(pass, s, bias),
                                       "measuring its plans failed (" + mwhy + ") and no workspace size is known");
                }
                p->index = p->candidates[0];
                p->workspace = ws;
                fprintf(stderr, "moonlit: %s: measuring the plans of %s failed (%s); using cuDNN's first choice\n",
                        rt.name.c_str(), call_desc(pass, s, bias).c_str(), mwhy.c_str());
            }
        }
        g = p->graph;   // our own reference: the table may drop the plan meanwhile
        index = p->index;
        workspace = p->workspace;
    }
    ml_cuda_workspace ws(s.device, {(size_t)workspace});
    if (!ws.ok()) return -1;
    fe::error_t e = g->execute_plan_at_index(h, pack, ws.part<void>(0), index);
    if (e.is_bad()) {
        // Nothing to rely on in this plan: the key goes to the legacy path,
        // which runs this call too.
        std::lock_guard<std::mutex> lock(g_mu);
        auto it = g_plans.find(key);
        if (it != g_plans.end()) it->second.graph.reset();
        return unsupported(rt.name + " failed to run " + call_desc(pass, s, bias),
                           "executing its plan failed: " + first_line(e.get_message()));
    }
    return 1;
}

}  // namespace

extern "C" int ml_conv_graph_forward(void *y, const void *x, const void *w, const void *bias, const ml_conv_graph_shape *s,
                                     bool *bias_added) {
    if (bias_added) *bias_added = false;
    if (!s || !y || !x || !w) return 0;
    try {
        std::unordered_map<int64_t, void *> pack = {{UID_X, (void *)x}, {UID_W, (void *)w}, {UID_Y, y}};
        if (bias) {
            pack[UID_BIAS] = (void *)bias;
            int rc = run(FWD, *s, true, pack);
            if (rc != 0) {
                if (rc > 0 && bias_added) *bias_added = true;
                return rc;
            }
            // The fused add refused: the convolution alone may still go
            // through a graph, the caller adding the bias.
            pack.erase(UID_BIAS);
        }
        return run(FWD, *s, false, pack);
    } catch (const std::exception &e) {
        return unsupported("conv2d (cuDNN graph)", std::string("the cuDNN frontend threw: ") + e.what());
    }
}

extern "C" int ml_conv_graph_backward_data(void *dx, const void *dy, const void *w, const ml_conv_graph_shape *s) {
    if (!s || !dx || !dy || !w) return 0;
    try {
        std::unordered_map<int64_t, void *> pack = {{UID_DY, (void *)dy}, {UID_W, (void *)w}, {UID_DX, dx}};
        return run(DGRAD, *s, false, pack);
    } catch (const std::exception &e) {
        return unsupported("conv2d (cuDNN graph)", std::string("the cuDNN frontend threw: ") + e.what());
    }
}

extern "C" int ml_conv_graph_backward_filter(void *dw, const void *x, const void *dy, const ml_conv_graph_shape *s) {
    if (!s || !dw || !x || !dy) return 0;
    try {
        std::unordered_map<int64_t, void *> pack = {{UID_X, (void *)x}, {UID_DY, (void *)dy}, {UID_DW, dw}};
        return run(WGRAD, *s, false, pack);
    } catch (const std::exception &e) {
        return unsupported("conv2d (cuDNN graph)", std::string("the cuDNN frontend threw: ") + e.what());
    }
}

#endif  // ML_WITH_CUDNN_FRONTEND
