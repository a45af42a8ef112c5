-- parity_attention.lua — CPU vs GPU cases for scaled dot-product attention
-- (op "sdpa"), loaded by test_parity.lua.  Shapes are BSHD: q [B, Sq, H, D],
-- k [B, Sk, H, D], v [B, Sk, H, Dv].  They cover Stable Diffusion's head
-- widths (40, 80, 160; 64 for SD 2.x and CLIP), cross attention over 77 text
-- tokens, the VAE's single head as wide as its channels (up to 512), the
-- causal mask, sequences that leave partial tiles (the GPU kernels take 16 to
-- 64 rows at a time, depending on the width), and half precision (on the GPU,
-- tensor-core GEMMs around explicit score matrices at these sizes).
return function(case, ml)
    local sdpa = ml.F.scaled_dot_product_attention
    -- f32 sums of up to 512 products, in another order than the CPU's BLAS
    local f32 = {rtol = 1e-4, atol = 2e-5}

    local function attn(opts) return function(q, k, v) return sdpa(q, k, v, opts) end end
    local function qkv(M, B, Sq, Sk, H, D, Dv)
        return {M.randn(B, Sq, H, D), M.randn(B, Sk, H, D), M.randn(B, Sk, H, Dv or D)}
    end

    case("sdpa", "heads 4, D 8", attn(), function(M) return qkv(M, 2, 13, 13, 4, 8) end, f32)
    case("sdpa", "heads 4, D 8, causal", attn {causal = true}, function(M) return qkv(M, 2, 13, 13, 4, 8) end, f32)
    case("sdpa", "cross attention: 77 keys, D 40", attn(), function(M) return qkv(M, 2, 70, 77, 2, 40) end, f32)
    case("sdpa", "self attention [2,256,8,40], scale 0.3", attn {scale = 0.3},
         function(M) return qkv(M, 2, 256, 256, 8, 40) end, f32)
    case("sdpa", "D 80, causal, two key tiles", attn {causal = true}, function(M) return qkv(M, 1, 100, 100, 2, 80) end, f32)
    case("sdpa", "D 80, cross attention", attn(), function(M) return qkv(M, 1, 33, 77, 2, 80) end, f32)
    case("sdpa", "D 160, 90 keys, causal", attn {causal = true}, function(M) return qkv(M, 1, 70, 90, 2, 160) end, f32)
    case("sdpa", "D 160, cross attention", attn(), function(M) return qkv(M, 2, 40, 77, 2, 160) end, f32)
    case("sdpa", "single head D 64 (VAE-like)", attn(), function(M) return qkv(M, 1, 130, 130, 1, 64) end, f32)
    case("sdpa", "single head D 128", attn(), function(M) return qkv(M, 1, 100, 70, 1, 128) end, f32)
    case("sdpa", "single head D 512 (VAE mid-block)", attn(), function(M) return qkv(M, 1, 64, 64, 1, 512) end, f32)
    case("sdpa", "D 512, causal, more queries than keys", attn {causal = true},
         function(M) return qkv(M, 1, 40, 20, 1, 512) end, f32)
    case("sdpa", "causal, fewer queries than keys", attn {causal = true},
         function(M) return qkv(M, 1, 30, 100, 2, 16) end, f32)
    case("sdpa", "value width 24, key width 40", attn(), function(M) return qkv(M, 2, 33, 47, 3, 40, 24) end, f32)
    -- q, k, v as narrow views of one packed projection [B, S, H, 3*D]
    case("sdpa", "q, k, v narrowed from one packed tensor, causal",
         function(qkv_) return sdpa(qkv_:narrow(4, 1, 8), qkv_:narrow(4, 9, 8), qkv_:narrow(4, 17, 8), {causal = true}) end,
         function(M) return {M.randn(2, 20, 4, 24)} end, f32)
    case("sdpa", "q, k, v narrowed from one packed tensor, D 40",
         function(qkv_) return sdpa(qkv_:narrow(4, 1, 40), qkv_:narrow(4, 41, 40), qkv_:narrow(4, 81, 40)) end,
         function(M) return {M.randn(1, 77, 2, 120)} end, f32)
    case("sdpa", "transposed (non-contiguous) k and v", attn(),
         function(M) return {M.randn(2, 13, 4, 8), M.randn_nc(2, 21, 4, 8), M.randn_nc(2, 21, 4, 8)} end, f32)
    case("sdpa", "gradient for q only (k, v constants)", attn {causal = true},
         function(M) return {M.randn(1, 70, 2, 40), M.const(1, 77, 2, 40), M.const(1, 77, 2, 40)} end, f32)

    -- Half precision runs only on the GPU: both sides take inputs rounded to
    -- the half type; the CPU computes in f32, the GPU in the half type with
    -- f32 accumulation (outputs and gradients rounded once).
    local function half(dt, opts)
        return function(q, k, v)
            local function r(t) return t:to(dt) end
            if q.device == "cpu" then return sdpa(r(q):float(), r(k):float(), r(v):float(), opts) end
            return sdpa(r(q), r(k), r(v), opts):float()
        end
    end
    case("sdpa", "bf16, cross attention, D 40", half("bf16"), function(M) return qkv(M, 2, 70, 77, 2, 40) end,
         {rtol = 2e-2, atol = 1e-2})
    case("sdpa", "bf16, causal, D 160", half("bf16", {causal = true}), function(M) return qkv(M, 1, 70, 70, 2, 160) end,
         {rtol = 2e-2, atol = 1e-2})
    case("sdpa", "f16, causal, D 64", half("f16", {causal = true}), function(M) return qkv(M, 1, 66, 66, 2, 64) end,
         {rtol = 1e-2, atol = 2e-3})
    -- Stable Diffusion's sizes in the half types take the GPU's tensor-core
    -- path (scores in f32, probabilities and dS rounded to the half type):
    -- a 32x32 latent's self attention, its cross attention over 77 text
    -- tokens (a score row stride padded from 77 to 80), CLIP's causal text.
    local bf16 = {rtol = 2e-2, atol = 1e-2}
    case("sdpa", "bf16, self attention [2,1024,8,40]", half("bf16"), function(M) return qkv(M, 2, 1024, 1024, 8, 40) end,
         bf16)
    case("sdpa", "bf16, cross attention [2,1024,8,40] over 77 keys", half("bf16"),
         function(M) return qkv(M, 2, 1024, 77, 8, 40) end, bf16)
    case("sdpa", "bf16, causal text [2,77,12,64]", half("bf16", {causal = true}),
         function(M) return qkv(M, 2, 77, 77, 12, 64) end, bf16)
    case("sdpa", "bf16, D 160, causal, more queries than keys", half("bf16", {causal = true}),
         function(M) return qkv(M, 2, 100, 60, 8, 160) end, bf16)
    case("sdpa", "f16, self attention [2,256,8,80]", half("f16"), function(M) return qkv(M, 2, 256, 256, 8, 80) end,
         {rtol = 1e-2, atol = 2e-3})

    -- The half types at Stable Diffusion's shapes once more, against a
    -- float64 reference (the CPU computes in f64 from the same rounded
    -- inputs): these are the calls cuDNN's fused attention takes on the GPU
    -- (kernels/cuda/attention_cudnn.cu), with moonlit's kernels as the
    -- fallback (MOONLIT_CUDNN_SDPA=0 runs them), so both paths must meet the
    -- same tolerances.  The GPU rounds its probabilities to the half type
    -- before P V (as every flash-attention kernel does), and stores out in
    -- the half type, which the backward's rowsum(dout * out) then sees; sums
    -- that cancel keep the error of their terms.  rtol is a few units of the
    -- type's last place; atol is 3 times the largest error beyond rtol that
    -- either path showed on an H200 (cuDNN 9.14) for out and the three
    -- gradients of each shape, whose magnitudes reach 0.2 to 8: a wrong
    -- scale, mask, statistic or layout is off by 10 to 100 times more.
    local function ref64(dt, opts)
        return function(q, k, v)
            local function r(t) return t:to(dt) end
            if q.device == "cpu" then return sdpa(r(q):double(), r(k):double(), r(v):double(), opts):float() end
            return sdpa(r(q), r(k), r(v), opts):float()
        end
    end
    local rtol = {bf16 = 2e-2, f16 = 5e-3}
    local C = {causal = true}
    -- name, opts, B, Sq, Sk, H, D, Dv, atol for bf16, atol for f16
    local shapes = {
        {"SD 64x64 self attention [1,4096,8,40]", nil, 1, 4096, 4096, 8, 40, 40, 2e-3, 2e-4},
        {"SD 64x64 cross attention [2,4096,8,40] over 77 keys", nil, 2, 4096, 77, 8, 40, 40, 4.5e-2, 5.5e-3},
        {"SD 32x32 self attention [2,1024,8,80]", nil, 2, 1024, 1024, 8, 80, 80, 3.6e-3, 4e-4},
        {"SD 32x32 cross attention [4,1024,8,80] over 77 keys", nil, 4, 1024, 77, 8, 80, 80, 2.4e-2, 3.5e-3},
        {"SD 16x16 self attention [4,256,8,160]", nil, 4, 256, 256, 8, 160, 160, 6.5e-3, 7e-4},
        {"SD 16x16 cross attention [4,256,8,160] over 77 keys", nil, 4, 256, 77, 8, 160, 160, 1.6e-2, 1.7e-3},
        {"odd length: self attention [1,4097,2,40]", nil, 1, 4097, 4097, 2, 40, 40, 1.3e-3, 1.8e-4},
        {"odd length: 4097 queries over 77 keys", nil, 1, 4097, 77, 8, 40, 40, 4e-2, 5.5e-3},
        {"CLIP text, causal [4,77,12,64]", C, 4, 77, 77, 12, 64, 64, 2.7e-2, 4.2e-3},
        {"causal, more queries than keys [2,100,4,64] over 60", C, 2, 100, 60, 4, 64, 64, 2e-2, 2.3e-3},
        {"causal, fewer queries than keys [2,60,4,64] over 100", C, 2, 60, 100, 4, 64, 64, 3.4e-2, 2.7e-3},
        {"key width 64, value width 32 [2,100,4,64]", nil, 2, 100, 100, 4, 64, 32, 6.5e-3, 7e-4},
        {"scale 0.3 [2,256,8,40]", {scale = 0.3}, 2, 256, 256, 8, 40, 40, 3.8e-2, 4.6e-3},
        -- shapes cuDNN does not take whole: head width 512 (on Hopper its
        -- forward does, its backward does not, so moonlit's backward runs on
        -- cuDNN's statistics), 36 (neither: not a multiple of 8)
        {"head width 512 (cuDNN forward at most) [1,64,1,512]", nil, 1, 64, 64, 1, 512, 512, 7.5e-3, 9e-4},
        {"head width 36 (not a multiple of 8) [2,100,4,36]", nil, 2, 100, 100, 4, 36, 36, 9.5e-3, 8.5e-4},
    }
    for _, dt in ipairs {"bf16", "f16"} do
        local function tol(bf, f) return {rtol = rtol[dt], atol = dt == "bf16" and bf or f} end
        local function name(n) return dt .. " (cuDNN shapes), " .. n end
        for _, s in ipairs(shapes) do
            local n, opts, B, Sq, Sk, H, D, Dv, abf, af = table.unpack(s, 1, 10)
            case("sdpa", name(n), ref64(dt, opts), function(M) return qkv(M, B, Sq, Sk, H, D, Dv) end, tol(abf, af))
        end
        -- cuDNN writes all three gradients: the unwanted ones go to scratch
        case("sdpa", name("gradient for q only (k, v constants)"), ref64(dt),
             function(M) return {M.randn(2, 1024, 8, 40), M.const(2, 77, 8, 40), M.const(2, 77, 8, 40)} end,
             tol(1e-2, 1.1e-3))
        case("sdpa", name("gradients for k, v only (q constant)"), ref64(dt, C),
             function(M) return {M.const(2, 77, 8, 64), M.randn(2, 77, 8, 64), M.randn(2, 77, 8, 64)} end,
             tol(2.2e-2, 2.9e-3))
    end
end
