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
end
