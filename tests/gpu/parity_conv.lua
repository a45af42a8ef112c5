-- parity_conv.lua — CPU vs GPU cases for conv2d (cuDNN, NHWC), loaded by
-- test_parity.lua.
--
-- f32 runs on cuDNN's FMA kernels (no TF32): the tolerance allows for
-- summation order and Winograd-style transforms over up to 9*64 taps, and
-- is far below TF32's error (~1e-2).  Half-precision cases round the
-- inputs to bf16/f16 on both devices; the CPU convolves the rounded values
-- in f32 and rounds the result, the GPU uses tensor cores with f32
-- accumulation (on the graph path the bias is added in f32 inside cuDNN's
-- graph; on the legacy path after rounding: one more rounding).
--
-- The GPU side runs through whichever cuDNN API MOONLIT_CONV_API selects
-- (kernels/cuda/conv2d.cu): graph by default, with the legacy API taking
-- what the graph path refuses; scripts/gpu_check.sh runs these cases once
-- more with MOONLIT_CONV_API=legacy.  The half-precision cases cover both
-- APIs' choices: bias and no bias, strides 1 and 2, symmetric and
-- asymmetric padding (a padded copy with pad 0 for cuDNN), 1x1 and 3x3.
return function(case, ml, helpers)
    local F = ml.F
    local f32 = {rtol = 1e-4, atol = 2e-4}
    local bf16 = {rtol = 2e-2, atol = 2e-2}
    local f16 = {rtol = 5e-3, atol = 5e-3}

    -- op in dtype dt on the GPU, in f32 on dt-rounded inputs on the CPU
    -- (helpers.via, test_parity.lua)
    local via = helpers.via
    -- conv(opts): fn(x, w, b) with those options; b may be absent.
    local function conv(opts) return function(x, w, b) return F.conv2d(x, w, b, opts) end end
    -- x [N,H,W,C], w [O,kh,kw,C], b [O] (no b when nobias)
    local function xwb(n, h, wd, c, o, kh, kw, nobias)
        return function(M)
            local t = {M.randn(n, h, wd, c), M.randn(o, kh, kw, c)}
            if not nobias then t[3] = M.randn(o) end
            return t
        end
    end
    local p1 = conv {padding = 1}
    local s2p1 = conv {stride = 2, padding = 1}
    local vae_down = conv {stride = 2, padding = {0, 1, 0, 1}}
    local plain = conv {}

    case("conv2d", "3x3 pad 1, bias [2,16,16,32] -> 64", p1, xwb(2, 16, 16, 32, 64, 3, 3), f32)
    case("conv2d", "3x3 stride 2 pad 1 [2,16,16,32] -> 32", s2p1, xwb(2, 16, 16, 32, 32, 3, 3), f32)
    case("conv2d", "VAE downsample: stride 2 padding {0,1,0,1} [2,16,16,32]", vae_down, xwb(2, 16, 16, 32, 32, 3, 3),
         f32)
    case("conv2d", "padding {0,1,0,1} stride 2, odd size [1,15,13,8]", vae_down, xwb(1, 15, 13, 8, 8, 3, 3), f32)
    case("conv2d", "asymmetric width only {1,1,0,2}, 3x3", conv {padding = {1, 1, 0, 2}}, xwb(2, 9, 7, 8, 12, 3, 3),
         f32)
    case("conv2d", "1x1 [2,8,8,64] -> 32, bias", plain, xwb(2, 8, 8, 64, 32, 1, 1), f32)
    case("conv2d", "3x3 pad 1, no bias [2,12,12,16] -> 24", p1, xwb(2, 12, 12, 16, 24, 3, 3, true), f32)
    case("conv2d", "stride {1,2} padding {1,0}, 2x3 kernel", conv {stride = {1, 2}, padding = {1, 0}},
         xwb(2, 9, 11, 8, 6, 2, 3), f32)
    case("conv2d", "conv_in 4 -> 32 channels [2,16,16,4]", p1, xwb(2, 16, 16, 4, 32, 3, 3), f32)
    case("conv2d", "conv_out 32 -> 4 channels", p1, xwb(2, 16, 16, 32, 4, 3, 3), f32)
    case("conv2d", "non-contiguous (NCHW-permuted) input", function(x, w, b)
        return F.conv2d(x:permute(1, 3, 4, 2), w, b, {padding = 1})
    end, function(M) return {M.randn(2, 16, 8, 8), M.randn(24, 3, 3, 16), M.randn(24)} end, f32)
    case("conv2d", "SD-sized 3x3 pad 1 [1,32,32,64] -> 64", p1, xwb(1, 32, 32, 64, 64, 3, 3), f32)
    case("conv2d", "bf16 3x3 pad 1 [2,16,16,32] -> 64", via("bf16", p1), xwb(2, 16, 16, 32, 64, 3, 3), bf16)
    case("conv2d", "bf16 VAE downsample padding {0,1,0,1}", via("bf16", vae_down), xwb(2, 16, 16, 32, 32, 3, 3), bf16)
    case("conv2d", "bf16 1x1 no bias", via("bf16", plain), xwb(2, 8, 8, 64, 32, 1, 1, true), bf16)
    case("conv2d", "bf16 conv_in 4 -> 32 channels", via("bf16", p1), xwb(2, 16, 16, 4, 32, 3, 3), bf16)
    case("conv2d", "f16 3x3 stride 2 pad 1", via("f16", s2p1), xwb(2, 16, 16, 32, 32, 3, 3), f16)
    case("conv2d", "bf16 3x3 pad 1, no bias", via("bf16", p1), xwb(2, 12, 12, 16, 24, 3, 3, true), bf16)
    case("conv2d", "bf16 3x3 stride 2 pad 1, no bias", via("bf16", s2p1), xwb(2, 16, 16, 32, 32, 3, 3, true), bf16)
    case("conv2d", "bf16 1x1 bias", via("bf16", plain), xwb(2, 8, 8, 64, 32, 1, 1), bf16)
    case("conv2d", "bf16 1x1 stride 2", via("bf16", conv {stride = 2}), xwb(2, 9, 9, 32, 16, 1, 1), bf16)
    case("conv2d", "bf16 asymmetric {1,1,0,2}, no bias", via("bf16", conv {padding = {1, 1, 0, 2}}),
         xwb(2, 9, 7, 8, 16, 3, 3, true), bf16)
    case("conv2d", "bf16 SD-sized 3x3 [1,32,32,64] -> 64", via("bf16", p1), xwb(1, 32, 32, 64, 64, 3, 3), bf16)
    case("conv2d", "f16 3x3 pad 1, bias", via("f16", p1), xwb(2, 16, 16, 32, 64, 3, 3), f16)
    case("conv2d", "f16 3x3 pad 1, no bias", via("f16", p1), xwb(2, 12, 12, 16, 24, 3, 3, true), f16)
    case("conv2d", "f16 1x1 bias", via("f16", plain), xwb(2, 8, 8, 64, 32, 1, 1), f16)
    case("conv2d", "f16 1x1 no bias", via("f16", plain), xwb(2, 8, 8, 64, 32, 1, 1, true), f16)
    case("conv2d", "f16 VAE downsample padding {0,1,0,1}", via("f16", vae_down), xwb(2, 16, 16, 32, 32, 3, 3), f16)
    case("conv2d", "f16 conv_out 32 -> 4 channels", via("f16", p1), xwb(2, 16, 16, 32, 4, 3, 3), f16)
    -- f64 conv is refused on CUDA (cuDNN 9 has no NHWC f64 backward-filter
    -- algorithms); f64 stays a CPU dtype for gradient checks.
end
