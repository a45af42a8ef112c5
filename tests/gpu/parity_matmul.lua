-- parity_matmul.lua — CPU vs GPU cases for matmul and linear (cuBLASLt),
-- loaded by test_parity.lua.
--
-- f32 must agree to summation order: the tolerance (atol 2e-4 on sums of
-- up to ~600 products of N(0,1) values) is far below what TF32 would give
-- (~1e-2).  Half-precision cases round the inputs to bf16/f16 on both
-- devices; the CPU multiplies the rounded values in f32 and rounds the
-- result, the GPU multiplies in bf16/f16 with f32 accumulation.
return function(case, ml, helpers)
    local F = ml.F
    local f32 = {rtol = 1e-5, atol = 2e-4}
    local bf16 = {rtol = 2e-2, atol = 2e-2}
    local f16 = {rtol = 5e-3, atol = 5e-3}
    local f64 = {rtol = 3e-7, atol = 1e-9}   -- f64 products, compared after rounding to f32

    -- op run in dtype dt on the GPU; on the CPU, op in f32 on the inputs
    -- rounded to dt, the result rounded to dt.  Returned in f32.
    local via = helpers.via
    -- op run in f64 on both devices (f32 leaves and result).
    local function in_f64(op)
        return function(...)
            local args = {...}
            for i, t in ipairs(args) do args[i] = t:double() end
            -- back in f32: the suite's upstream gradient is f32
            return op(table.unpack(args)):float()
        end
    end

    -- ---- matmul ----------------------------------------------------------------

    local mm = function(a, b) return a:matmul(b) end
    case("matmul", "2-D [64,96] @ [96,80]", mm, function(M) return {M.randn(64, 96), M.randn(96, 80)} end, f32)
    case("matmul", "batched [4,33,40] @ [4,40,24]", mm, function(M) return {M.randn(4, 33, 40), M.randn(4, 40, 24)} end,
         f32)
    case("matmul", "batch broadcast [3,1,20,32] @ [5,32,16]", mm,
         function(M) return {M.randn(3, 1, 20, 32), M.randn(5, 32, 16)} end, f32)
    case("matmul", "shared right operand [4,50,64] @ [64,48]", mm,
         function(M) return {M.randn(4, 50, 64), M.randn(64, 48)} end, f32)
    case("matmul", "shared left operand [50,64] @ [4,64,48]", mm,
         function(M) return {M.randn(50, 64), M.randn(4, 64, 48)} end, f32)
    case("matmul", "shared left operand of [1,1] batch dims", mm,
         function(M) return {M.randn(1, 1, 20, 30), M.randn(2, 3, 30, 10)} end, f32)
    case("matmul", "1-D @ 2-D [64] @ [64,40]", mm, function(M) return {M.randn(64), M.randn(64, 40)} end, f32)
    case("matmul", "2-D @ 1-D [40,64] @ [64]", mm, function(M) return {M.randn(40, 64), M.randn(64)} end, f32)
    case("matmul", "1-D @ 1-D (dot)", mm, function(M) return {M.randn(300), M.randn(300)} end, f32)
    case("matmul", "batched @ 1-D [3,20,30] @ [30]", mm, function(M) return {M.randn(3, 20, 30), M.randn(30)} end, f32)
    case("matmul", "transposed views a^T @ b^T [6,30,40] @ [6,40,20]", mm,
         function(M) return {M.randn_nc(6, 30, 40), M.randn_nc(6, 40, 20)} end, f32)
    case("matmul", "2-D a:t() @ b", mm, function(M) return {M.randn_nc(64, 48), M.randn(48, 32)} end, f32)
    case("matmul", "shared transposed right operand [4,20,30] @ [30,25]^T view", mm,
         function(M) return {M.randn(4, 20, 30), M.randn_nc(30, 25)} end, f32)
    case("matmul", "shared transposed left operand [20,30]^T view @ [4,30,25]", mm,
         function(M) return {M.randn_nc(20, 30), M.randn(4, 30, 25)} end, f32)
    case("matmul", "attention scores q @ k:t() [2,8,77,40]", function(q, k) return q:matmul(k:transpose(-1, -2)) end,
         function(M) return {M.randn(2, 8, 77, 40), M.randn(2, 8, 77, 40)} end, f32)
    case("matmul", "permuted (copied) operand", function(a, b) return a:permute(2, 1, 3):matmul(b) end,
         function(M) return {M.randn(20, 3, 16), M.randn(3, 16, 12)} end, f32)
    case("matmul", "operand at an unaligned offset", function(a, b) return a:narrow(1, 2, 30):matmul(b) end,
         function(M) return {M.randn(41, 31), M.randn(31, 17)} end, f32)
    case("matmul", "empty inner dim [5,0] @ [0,4]", mm, function(M) return {M.randn(5, 0), M.randn(0, 4)} end, f32)
    case("matmul", "SD-sized [512,320] @ [320,640]", mm, function(M) return {M.randn(512, 320), M.randn(320, 640)} end,
         f32)
    case("matmul", "bf16 batched, shared right operand [4,64,80] @ [80,48]", via("bf16", mm),
         function(M) return {M.randn(4, 64, 80), M.randn(80, 48)} end, bf16)
    case("matmul", "bf16 attention q @ k:t() [2,4,64,40]", via("bf16", function(q, k)
        return q:matmul(k:transpose(-1, -2))
    end), function(M) return {M.randn(2, 4, 64, 40), M.randn(2, 4, 64, 40)} end, bf16)
    case("matmul", "bf16 odd sizes at an unaligned offset", via("bf16", function(a, b)
        return a:narrow(1, 2, 13):matmul(b)
    end), function(M) return {M.randn(17, 7), M.randn(7, 5)} end, bf16)
    case("matmul", "bf16 shared left operand [50,64] @ [4,64,48]", via("bf16", mm),
         function(M) return {M.randn(50, 64), M.randn(4, 64, 48)} end, bf16)
    case("matmul", "f16 batched [4,33,40] @ [4,40,24]", via("f16", mm),
         function(M) return {M.randn(4, 33, 40), M.randn(4, 40, 24)} end, f16)
    case("matmul", "f64 batched transposed [3,33,47]^T view @ [47,29]", in_f64(mm),
         function(M) return {M.randn_nc(3, 33, 47), M.randn(47, 29)} end, f64)

    -- ---- linear ----------------------------------------------------------------

    local lin = function(x, w, b) return F.linear(x, w, b) end
    local lin_nobias = function(x, w) return F.linear(x, w) end
    case("linear", "with bias [64,96] -> 80", lin, function(M) return {M.randn(64, 96), M.randn(80, 96), M.randn(80)} end,
         f32)
    case("linear", "without bias [37,40] -> 24", lin_nobias, function(M) return {M.randn(37, 40), M.randn(24, 40)} end,
         f32)
    case("linear", "3-D input [2,77,64] -> 96 (text encoder)", lin,
         function(M) return {M.randn(2, 77, 64), M.randn(96, 64), M.randn(96)} end, f32)
    case("linear", "NHWC input [2,8,8,64] -> 32 (proj_in)", lin,
         function(M) return {M.randn(2, 8, 8, 64), M.randn(32, 64), M.randn(32)} end, f32)
    case("linear", "non-contiguous input and weight", lin,
         function(M) return {M.randn_nc(30, 40), M.randn_nc(20, 40), M.randn(20)} end, f32)
    case("linear", "odd sizes [7,3] -> 5", lin, function(M) return {M.randn(7, 3), M.randn(5, 3), M.randn(5)} end, f32)
    case("linear", "one row [1,320] -> 1280 (time embedding)", lin,
         function(M) return {M.randn(1, 320), M.randn(1280, 320), M.randn(1280)} end, f32)
    case("linear", "SD-sized [2,256,320] -> 320", lin,
         function(M) return {M.randn(2, 256, 320), M.randn(320, 320), M.randn(320)} end, f32)
    case("linear", "bf16 with bias [2,77,64] -> 96", via("bf16", lin),
         function(M) return {M.randn(2, 77, 64), M.randn(96, 64), M.randn(96)} end, bf16)
    case("linear", "bf16 without bias [64,40] -> 24", via("bf16", lin_nobias),
         function(M) return {M.randn(64, 40), M.randn(24, 40)} end, bf16)
    case("linear", "bf16 odd sizes [7,3] -> 5", via("bf16", lin),
         function(M) return {M.randn(7, 3), M.randn(5, 3), M.randn(5)} end, bf16)
    case("linear", "f16 with bias [33,64] -> 48", via("f16", lin),
         function(M) return {M.randn(33, 64), M.randn(48, 64), M.randn(48)} end, f16)
    case("linear", "f64 with bias [33,47] -> 29", in_f64(lin),
         function(M) return {M.randn(33, 47), M.randn(29, 47), M.randn(29)} end, f64)
end
