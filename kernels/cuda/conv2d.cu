// conv2d.cu — CUDA twins of kernels/cpu/conv2d.c over cuDNN's convolution
// API with NHWC tensors and [O,kh,kw,C] (NHWC) filters (contract in
// conv2d.h).
//
// cuDNN pads symmetrically only.  An asymmetric convolution (the VAE
// encoder's downsampling pads bottom/right only) is run on an explicitly
// zero-padded copy of the input with no padding of its own, and its input
// gradient is computed on the padded shape and cropped: exact, at the cost
// of one copy of the input.
//
// Each distinct shape gets a plan, made once and kept: descriptors, and per
// pass (forward, backward data, backward filter) the algorithm cuDNN's
// heuristic ranks first among those allowed (deterministic ones preferred,
// so a run repeats bit for bit) and its workspace size.  f32/f64 are
// restricted to FMA kernels: CUDNN_DEFAULT_MATH would let f32 run on TF32
// tensor cores from Ampere on, which loses parity with the CPU.  f16/bf16
// use tensor cores with f32 accumulation.  The bias is added by the
// broadcast-add kernel, its gradient is a column sum of dout seen as
// [N*Ho*Wo, O].
#include "common.cuh"
#include "cudnn_handle.h"
#include "conv2d.h"
#include "copy.h"
#include "elementwise.h"
#include "gemm.h"
#include "checked_math.h"

#include <climits>
#include <map>
#include <memory>
#include <mutex>

namespace {

enum { FWD, BWD_DATA, BWD_FILTER, NPASS };

// Dims of one cuDNN convolution (the input as cuDNN sees it: padded when
// the padding is explicit).
struct conv_key {
    int v[13];   // dev, dtype, N, H, W, C, O, kh, kw, pad_h, pad_w, stride_h, stride_w
    bool operator<(const conv_key &o) const { return memcmp(v, o.v, sizeof v) < 0; }
};

struct conv_plan {
    cudnnTensorDescriptor_t x = nullptr, y = nullptr;
    cudnnFilterDescriptor_t w = nullptr;
    cudnnConvolutionDescriptor_t conv[NPASS] = {};   // per pass: each algorithm may want its own math type
    bool chosen[NPASS] = {};
    int algo[NPASS] = {};
    size_t ws[NPASS] = {};
    ~conv_plan() {
        for (auto c : conv)
            if (c) cudnnDestroyConvolutionDescriptor(c);
        if (w) cudnnDestroyFilterDescriptor(w);
        if (y) cudnnDestroyTensorDescriptor(y);
        if (x) cudnnDestroyTensorDescriptor(x);
    }
};

std::mutex g_mu;
std::map<conv_key, std::unique_ptr<conv_plan>> g_plans;

cudnnDataType_t data_type(ml_dtype dt) {
    switch (dt) {
    case ML_F64: return CUDNN_DATA_DOUBLE;
    case ML_F16: return CUDNN_DATA_HALF;
    case ML_BF16: return CUDNN_DATA_BFLOAT16;
    default: return CUDNN_DATA_FLOAT;
    }
}

bool is_half(int dt) { return dt == ML_F16 || dt == ML_BF16; }

int make_plan(const conv_key &k, conv_plan *p) {
    const int *v = k.v;
    int N = v[2], H = v[3], W = v[4], C = v[5], O = v[6], kh = v[7], kw = v[8];
    cudnnDataType_t t = data_type((ml_dtype)v[1]);
    ML_CUDNN_TRY(cudnnCreateTensorDescriptor(&p->x));
    ML_CUDNN_TRY(cudnnSetTensor4dDescriptor(p->x, CUDNN_TENSOR_NHWC, t, N, C, H, W));
    ML_CUDNN_TRY(cudnnCreateFilterDescriptor(&p->w));
    ML_CUDNN_TRY(cudnnSetFilter4dDescriptor(p->w, t, CUDNN_TENSOR_NHWC, O, C, kh, kw));
    cudnnDataType_t compute = t == CUDNN_DATA_DOUBLE ? CUDNN_DATA_DOUBLE : CUDNN_DATA_FLOAT;
    cudnnMathType_t math = is_half(v[1]) ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH;
    for (auto &c : p->conv) {
        ML_CUDNN_TRY(cudnnCreateConvolutionDescriptor(&c));
        ML_CUDNN_TRY(cudnnSetConvolution2dDescriptor(c, v[9], v[10], v[11], v[12], 1, 1, CUDNN_CROSS_CORRELATION,
                                                     compute));
        ML_CUDNN_TRY(cudnnSetConvolutionMathType(c, math));
    }
    int n, o, ho, wo;
    ML_CUDNN_TRY(cudnnGetConvolution2dForwardOutputDim(p->conv[FWD], p->x, p->w, &n, &o, &ho, &wo));
    int want_h = (H + 2 * v[9] - kh) / v[11] + 1, want_w = (W + 2 * v[10] - kw) / v[12] + 1;
    if (n != N || o != O || ho != want_h || wo != want_w)
        return ml_error("conv2d: cuDNN computes an output of [%d, %d, %d, %d] where [%d, %d, %d, %d] is expected",
                        n, ho, wo, o, N, want_h, want_w, O);
    ML_CUDNN_TRY(cudnnCreateTensorDescriptor(&p->y));
    ML_CUDNN_TRY(cudnnSetTensor4dDescriptor(p->y, CUDNN_TENSOR_NHWC, t, n, o, ho, wo));
    return 0;
}

// Workspace an algorithm may ask for before a leaner one is preferred (FFT
// algorithms can want gigabytes).
constexpr size_t kWorkspaceCap = (size_t)512 << 20;

// The heuristic's first usable result: status success, no tensor-core math
// for f32/f64, workspace within kWorkspaceCap if any is, deterministic if
// any is (so runs repeat bit for bit).  -1 if none.
template <typename Perf> int pick(const Perf *r, int n, bool half) {
    int best = -1;
    for (int capped = 1; capped >= 0 && best < 0; capped--) {
        for (int i = 0; i < n; i++) {
            if (r[i].status != CUDNN_STATUS_SUCCESS || (capped && r[i].memory > kWorkspaceCap)) continue;
            if (!half &&
                (r[i].mathType == CUDNN_TENSOR_OP_MATH || r[i].mathType == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION))
                continue;
            if (r[i].determinism == CUDNN_DETERMINISTIC) return i;
            if (best < 0) best = i;
        }
    }
    return best;
}

const char *pass_name(int pass) {
    return pass == FWD ? "forward" : pass == BWD_DATA ? "backward data" : "backward filter";
}

// Chooses the algorithm of one pass (caller holds g_mu).
template <typename Perf> int choose(cudnnHandle_t h, conv_plan *p, int pass, bool half, const Perf *r, int n) {
    int i = pick(r, n, half);
    if (i < 0) return ml_error("conv2d: cuDNN offers no %s algorithm for this shape and dtype", pass_name(pass));
    // A half-precision algorithm may ask for a math type of its own; f32
    // stays on FMA whatever the heuristic reports.
    if (half) ML_CUDNN_TRY(cudnnSetConvolutionMathType(p->conv[pass], r[i].mathType));
    p->algo[pass] = (int)r[i].algo;
    cudnnConvolutionDescriptor_t c = p->conv[pass];
    size_t ws = 0;
    if (pass == FWD)
        ML_CUDNN_TRY(cudnnGetConvolutionForwardWorkspaceSize(h, p->x, p->w, c, p->y,
                                                             (cudnnConvolutionFwdAlgo_t)p->algo[pass], &ws));
    else if (pass == BWD_DATA)
        ML_CUDNN_TRY(cudnnGetConvolutionBackwardDataWorkspaceSize(h, p->w, p->y, c, p->x,
                                                                  (cudnnConvolutionBwdDataAlgo_t)p->algo[pass], &ws));
    else
        ML_CUDNN_TRY(cudnnGetConvolutionBackwardFilterWorkspaceSize(
            h, p->x, p->y, c, p->w, (cudnnConvolutionBwdFilterAlgo_t)p->algo[pass], &ws));
    p->ws[pass] = ws;
    p->chosen[pass] = true;
    return 0;
}

// The plan of key k with the algorithm of `pass` chosen.  Plans are never
// freed: a model has a few dozen shapes.
int plan_for(cudnnHandle_t h, const conv_key &k, int pass, conv_plan **out) {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_plans.find(k);
    if (it == g_plans.end()) {
        std::unique_ptr<conv_plan> p(new conv_plan);
        if (make_plan(k, p.get()) < 0) return -1;
        it = g_plans.emplace(k, std::move(p)).first;
    }
    conv_plan *p = it->second.get();
    *out = p;
    if (p->chosen[pass]) return 0;
    bool half = is_half(k.v[1]);
    int n = 0;
    if (pass == FWD) {
        cudnnConvolutionFwdAlgoPerf_t r[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
        ML_CUDNN_TRY(cudnnGetConvolutionForwardAlgorithm_v7(h, p->x, p->w, p->conv[pass], p->y,
                                                            CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &n, r));
        return choose(h, p, pass, half, r, n);
    }
    if (pass == BWD_DATA) {
        cudnnConvolutionBwdDataAlgoPerf_t r[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
        ML_CUDNN_TRY(cudnnGetConvolutionBackwardDataAlgorithm_v7(h, p->w, p->y, p->conv[pass], p->x,
                                                                 CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &n, r));
        return choose(h, p, pass, half, r, n);
    }
    cudnnConvolutionBwdFilterAlgoPerf_t r[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
    ML_CUDNN_TRY(cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, p->x, p->y, p->conv[pass], p->w,
                                                               CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &n, r));
    return choose(h, p, pass, half, r, n);
}

// What one call needs: the handle, the plan, the input as cuDNN sees it.
struct conv_call {
    int dev;
    cudnnHandle_t h;
    conv_key key;
    bool explicit_pad;   // input padded by us, cuDNN pads nothing
    int64_t Hp, Wp;      // input height/width as cuDNN sees it
};

int fits_int(const char *op, const ml_ktensor *t, int64_t numel) {
    if (numel <= INT_MAX) return 0;
    char s[128];
    return ml_error("%s: tensor %s has more than 2^31 elements, beyond cuDNN's convolution API", op,
                    ml_kt_shape_str(t, s, sizeof s));
}

int setup(conv_call *c, const char *op, const ml_ktensor *x, const ml_ktensor *w, const ml_ktensor *y,
          const ml_conv2d_params *p) {
    /* cuDNN 9 has no NHWC f64 backward-filter algorithms: refuse f64 up
     * front rather than fail half-way through a training step. */
    if (x->dtype == ML_F64)
        return ml_error("%s: f64 is not supported on cuda (cuDNN has no NHWC f64 kernels); use f32, f16 or bf16", op);
    if (x->dtype != ML_F32 && x->dtype != ML_F16 && x->dtype != ML_BF16)
        return ml_error("%s: dtype %s is not supported on cuda (expected f32, f16 or bf16)", op,
                        ml_dtype_short(x->dtype));
    c->dev = x->device.index;
    c->explicit_pad = p->pad_top != p->pad_bottom || p->pad_left != p->pad_right;
    int64_t N = x->shape[0], C = x->shape[3];
    c->Hp = x->shape[1] + (c->explicit_pad ? p->pad_top + p->pad_bottom : 0);
    c->Wp = x->shape[2] + (c->explicit_pad ? p->pad_left + p->pad_right : 0);
    // The padded input's element count, checked: huge padding on a small
    // input must not wrap to a size that passes.
    int64_t padded_numel;
    if (!ml_mul_i64(N, c->Hp, &padded_numel) || !ml_mul_i64(padded_numel, c->Wp, &padded_numel) ||
        !ml_mul_i64(padded_numel, C, &padded_numel))
        padded_numel = INT64_MAX;
    if (fits_int(op, x, padded_numel) < 0 || fits_int(op, y, ml_kt_numel(y)) < 0 ||
        fits_int(op, w, ml_kt_numel(w)) < 0)
        return -1;
    int v[13] = {c->dev, (int)x->dtype, (int)N, (int)c->Hp, (int)c->Wp, (int)C, (int)w->shape[0],
                 (int)w->shape[1], (int)w->shape[2], c->explicit_pad ? 0 : p->pad_top,
                 c->explicit_pad ? 0 : p->pad_left, p->stride_h, p->stride_w};
    memcpy(c->key.v, v, sizeof v);
    c->h = ml_cudnn_handle(c->dev);
    return c->h ? 0 : -1;
}

// The window of the padded buffer xp [N, Hp, Wp, C] where x [N, H, W, C] sits.
ml_ktensor interior(const ml_ktensor *xp, const ml_ktensor *x, const ml_conv2d_params *p) {
    ml_ktensor v = *xp;
    for (int d = 0; d < 4; d++) v.shape[d] = x->shape[d];
    v.data = (char *)xp->data +
             (p->pad_top * xp->strides[1] + p->pad_left * xp->strides[2]) * (int64_t)ml_dtype_size(xp->dtype);
    return v;
}

// An [N, Hp, Wp, C] buffer like x in scratch memory: the input as cuDNN
// sees it when the padding is explicit.  Lives as long as its workspace
// (the caller's scope); zero-filled around a copy of x when `copy`,
// uninitialised otherwise.
struct padded_input {
    ml_cuda_workspace ws;
    ml_ktensor t;
    static size_t bytes(const ml_ktensor *x, const conv_call &c) {
        // setup() checked that N*Hp*Wp*C fits in an int; times the element size it fits in size_t.
        return (size_t)(x->shape[0] * c.Hp * c.Wp * x->shape[3]) * ml_dtype_size(x->dtype);
    }
    padded_input(const ml_ktensor *x, const conv_call &c) : ws(c.dev, {bytes(x, c)}), t(*x) {
        int64_t shape[4] = {x->shape[0], c.Hp, c.Wp, x->shape[3]};
        memcpy(t.shape, shape, sizeof shape);
        ml_kt_contiguous_strides(4, t.shape, t.strides);
        t.data = ws.ok() ? ws.part<char>(0) : nullptr;
    }
    // 0, or -1 when the memory could not be had or the copy failed.
    int fill_from(const ml_ktensor *x, const ml_conv2d_params *p) {
        if (!ws.ok()) return -1;
        ml_ktensor v = interior(&t, x, p);
        return ml_fill_cuda(&t, 0) < 0 || ml_copy_cuda(&v, x) < 0 ? -1 : 0;
    }
};

// out [N, Ho, Wo, O] += b [O] broadcast over the pixels.
int add_bias(ml_ktensor *out, const ml_ktensor *b) {
    ml_ktensor bv = *b;
    bv.ndim = 4;
    for (int d = 0; d < 4; d++) {
        bv.shape[d] = out->shape[d];
        bv.strides[d] = d == 3 ? b->strides[0] : 0;
    }
    return ml_binary_cuda(ML_ADD, out, out, &bv);
}

// cuDNN's scaling factors are double for f64 data, float otherwise.
struct scales {
    float f1 = 1, f0 = 0;
    double d1 = 1, d0 = 0;
    bool dbl;
    explicit scales(ml_dtype dt) : dbl(dt == ML_F64) {}
    const void *one() const { return dbl ? (const void *)&d1 : (const void *)&f1; }
    const void *zero() const { return dbl ? (const void *)&d0 : (const void *)&f0; }
};

// Runs one pass with its workspace.
int run_pass(const conv_call &c, int pass, ml_dtype dt, const void *xp, const void *wp, const void *yp, void *dst) {
    conv_plan *p;
    if (plan_for(c.h, c.key, pass, &p) < 0) return -1;
    size_t wsb = p->ws[pass];
    ml_cuda_workspace scratch(c.dev, {wsb});
    if (!scratch.ok()) return -1;
    void *ws = wsb ? scratch.part<void>(0) : nullptr;
    scales s(dt);
    cudnnStatus_t st;
    const char *what;
    if (pass == FWD) {
        what = "cudnnConvolutionForward";
        st = cudnnConvolutionForward(c.h, s.one(), p->x, xp, p->w, wp, p->conv[pass],
                                     (cudnnConvolutionFwdAlgo_t)p->algo[pass], ws, wsb, s.zero(), p->y, dst);
    } else if (pass == BWD_DATA) {
        what = "cudnnConvolutionBackwardData";
        st = cudnnConvolutionBackwardData(c.h, s.one(), p->w, wp, p->y, yp, p->conv[pass],
                                          (cudnnConvolutionBwdDataAlgo_t)p->algo[pass], ws, wsb, s.zero(), p->x, dst);
    } else {
        what = "cudnnConvolutionBackwardFilter";
        st = cudnnConvolutionBackwardFilter(c.h, s.one(), p->x, xp, p->y, yp, p->conv[pass],
                                            (cudnnConvolutionBwdFilterAlgo_t)p->algo[pass], ws, wsb, s.zero(), p->w,
                                            dst);
    }
    // The workspace goes back stream-ordered: the pass is queued first.
    if (st != CUDNN_STATUS_SUCCESS) return ml_cudnn_fail(st, what, __FILE__, __LINE__);
    return 0;
}

}  // namespace

extern "C" int ml_conv2d_forward_cuda(ml_ktensor *out, const ml_ktensor *x, const ml_ktensor *w, const ml_ktensor *b,
                                      const ml_conv2d_params *p) {
    cudaStream_t s;
    if (ml_cuda_prepare(out, "conv2d", &s) < 0) return -1;
    if (ml_kt_numel(out) == 0) return 0;
    if (ml_kt_numel(x) == 0) {
        // Every tap reads padding (or there are no input channels).
        if (ml_fill_cuda(out, 0) < 0) return -1;
        return b ? add_bias(out, b) : 0;
    }
    conv_call c;
    if (setup(&c, "conv2d", x, w, out, p) < 0) return -1;
    if (c.explicit_pad) {
        padded_input xp(x, c);   // given back stream-ordered once the pass is queued
        if (xp.fill_from(x, p) < 0) return -1;
        if (run_pass(c, FWD, x->dtype, xp.t.data, w->data, nullptr, out->data) < 0) return -1;
    } else if (run_pass(c, FWD, x->dtype, x->data, w->data, nullptr, out->data) < 0) {
        return -1;
    }
    return b ? add_bias(out, b) : 0;
}

extern "C" int ml_conv2d_backward_cuda(ml_ktensor *dx, ml_ktensor *dw, ml_ktensor *db, const ml_ktensor *dout,
                                       const ml_ktensor *x, const ml_ktensor *w, const ml_conv2d_params *p) {
    cudaStream_t s;
    if (ml_cuda_prepare(dout, "conv2d backward", &s) < 0) return -1;
    int dev = dout->device.index;
    int64_t O = w->shape[0], rows = ml_kt_numel(dout) / (O ? O : 1);
    if (db && ml_cuda_colsum(dev, dout->dtype, db->data, dout->data, O ? rows : 0, O, false) < 0) return -1;
    if (!dx && !dw) return 0;
    if (ml_kt_numel(x) == 0 || ml_kt_numel(dout) == 0) {
        // No input or no output element: the gradients that exist are zero.
        if (dx && ml_fill_cuda(dx, 0) < 0) return -1;
        return dw ? ml_fill_cuda(dw, 0) : 0;
    }
    conv_call c;
    if (setup(&c, "conv2d backward", x, w, dout, p) < 0) return -1;
    int rc = 0;
    if (dw) {
        if (c.explicit_pad) {
            padded_input xp(x, c);
            rc = xp.fill_from(x, p);
            if (rc == 0) rc = run_pass(c, BWD_FILTER, x->dtype, xp.t.data, nullptr, dout->data, dw->data);
        } else {
            rc = run_pass(c, BWD_FILTER, x->dtype, x->data, nullptr, dout->data, dw->data);
        }
    }
    if (dx && rc == 0) {
        if (c.explicit_pad) {
            // The gradient of the padded input is computed whole and its
            // interior is dx.
            padded_input dxp(x, c);
            if (!dxp.ws.ok()) return -1;
            rc = run_pass(c, BWD_DATA, x->dtype, nullptr, w->data, dout->data, dxp.t.data);
            if (rc == 0) {
                ml_ktensor v = interior(&dxp.t, x, p);
                rc = ml_copy_cuda(dx, &v);
            }
        } else {
            rc = run_pass(c, BWD_DATA, x->dtype, nullptr, w->data, dout->data, dx->data);
        }
    }
    return rc;
}
