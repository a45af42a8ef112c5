-- parity_geglu.lua — CPU vs GPU parity cases for the fused GEGLU
-- (kernels/cuda/elementwise.cu: geglu_forward_k, geglu_backward_k), loaded
-- by test_parity.lua, which compares the output and the input's gradient.
--
-- The CUDA kernels move 16 bytes per half-row step when the half width n is
-- a multiple of 16 / element size and one element otherwise: the cases
-- cover both (n = 40 and 1280 wide; n = 13 and 37 narrow), a strided input
-- (made contiguous once by the host) and SD's feed-forward width at a small
-- batch.  bf16/f16: the GPU computes in f32 and rounds once; the CPU
-- computes f32 on the same rounded inputs, rounded to the dtype (via).
return function(case, ml, helpers)
    local F = ml.F
    local via = helpers.via
    local half = {rtol = 2e-2, atol = 1e-2}
    local geglu = function(h) return F.geglu(h) end

    case("geglu", "[4,77,80] (vector path, n = 40)", geglu, function(M) return {M.randn(4, 77, 80)} end)
    case("geglu", "[3,9,26] (element path, n = 13)", geglu, function(M) return {M.randn(3, 9, 26)} end)
    case("geglu", "non-contiguous [50,74] (n = 37)", geglu, function(M) return {M.randn_nc(50, 74)} end)
    case("geglu", "SD width [2,64,2560] (n = 1280)", geglu, function(M) return {M.randn(2, 64, 2560)} end)
    case("geglu", "gate scaled x4 (tails of erf)", function(h) return F.geglu(h * 4) end,
         function(M) return {M.randn(16, 96)} end)
    case("geglu", "empty [0,8]", geglu, function(M) return {M.randn(0, 8)} end)
    for _, dt in ipairs {"bf16", "f16"} do
        case("geglu", dt .. " [4,77,80]", via(dt, geglu), function(M) return {M.randn(4, 77, 80)} end, half)
        case("geglu", dt .. " [3,9,26] (element path)", via(dt, geglu), function(M) return {M.randn(3, 9, 26)} end,
             half)
    end
end
