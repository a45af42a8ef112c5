-- parity_nn.lua — CPU vs GPU parity cases for the normalisation, softmax,
-- indexing and upsampling kernels (kernels/cuda/norm.cu, softmax.cu,
-- index.cu, upsample.cu), at Stable Diffusion's layouts and toy sizes.
-- Loaded by test_parity.lua, which runs each case on both devices and
-- compares outputs and input gradients.
--
-- bf16/f16 cases: the GPU kernels take those dtypes directly (computing in
-- f32); the CPU computes in f32 only, so there the op runs in f32 on the
-- same rounded inputs and its result is rounded to the dtype — the two
-- must then agree to about one unit in the last place of the dtype.
return function(case, ml, helpers)
    local F = ml.F

    local via = helpers.via   -- fn on dt copies of its float inputs, returning f32
    local half = {rtol = 2e-2, atol = 1e-2}

    local function ids(M, list) return M.place(ml.tensor(list, {dtype = "i64"})) end

    -- CLIP-like prompt ids [B, 77] (0-based, vocabulary V): a few tokens,
    -- then the end token repeated as padding.
    local function prompt_ids(M, B, V)
        local rows = {}
        for b = 1, B do
            local r = {V - 2}
            for k = 2, 77 do r[k] = k <= 5 + 3 * b and (b * 7 + k * 13) % (V - 2) or V - 1 end
            rows[b] = r
        end
        return ids(M, rows)
    end

    -- ---- group_norm (NHWC) -------------------------------------------------

    local gn = function(groups, silu)
        return function(x, w, b) return F.group_norm(x, groups, w, b, 1e-5, {silu = silu}) end
    end
    case("group_norm", "[2,8,8,32] 8 groups, affine", gn(8, false),
         function(M) return {M.randn(2, 8, 8, 32), M.randn(32), M.randn(32)} end)
    case("group_norm", "[2,8,8,32] 8 groups, affine + fused silu", gn(8, true),
         function(M) return {M.randn(2, 8, 8, 32), M.randn(32), M.randn(32)} end)
    case("group_norm", "[2,64,32] 3-D, 4 groups", gn(4, false),
         function(M) return {M.randn(2, 64, 32), M.randn(32), M.randn(32)} end)
    case("group_norm", "[2,64,32] 3-D, 4 groups, fused silu", gn(4, true),
         function(M) return {M.randn(2, 64, 32), M.randn(32), M.randn(32)} end)
    case("group_norm", "no affine, fused silu, 12 channels in 3 groups",
         function(x) return F.group_norm(x, 3, nil, nil, 1e-5, {silu = true}) end,
         function(M) return {M.randn(2, 4, 4, 12)} end)
    case("group_norm", "non-contiguous input, 6 groups", gn(6, false),
         function(M) return {M.randn_nc(2, 16, 24), M.randn(24), M.randn(24)} end)
    case("group_norm", "[2,64,64,64] 32 groups, silu (sliced reduction)", gn(32, true),
         function(M) return {M.randn(2, 64, 64, 64), M.randn(64), M.randn(64)} end)
    case("group_norm", "[1,8,8,40] 1 group (group wider than a warp)", gn(1, true),
         function(M) return {M.randn(1, 8, 8, 40), M.randn(40), M.randn(40)} end)
    -- mean 50, spread 0.1: the variance must not cancel away
    case("group_norm", "large mean, small spread",
         function(x, w, b) return F.group_norm(x * 0.1 + 50, 4, w, b) end,
         function(M) return {M.randn(2, 6, 6, 16), M.randn(16), M.randn(16)} end, {rtol = 1e-5, atol = 1e-4})
    case("group_norm", "bf16 [2,8,8,32] 8 groups, fused silu", via("bf16", gn(8, true)),
         function(M) return {M.randn(2, 8, 8, 32), M.randn(32), M.randn(32)} end, half)
    case("group_norm", "bf16 [2,64,32] 4 groups", via("bf16", gn(4, false)),
         function(M) return {M.randn(2, 64, 32), M.randn(32), M.randn(32)} end, half)
    case("group_norm", "f16 [2,8,8,32] 8 groups, fused silu", via("f16", gn(8, true)),
         function(M) return {M.randn(2, 8, 8, 32), M.randn(32), M.randn(32)} end, {rtol = 4e-3, atol = 2e-3})

    -- ---- layer_norm (last dim) ---------------------------------------------

    local ln = function(x, w, b) return F.layer_norm(x, w, b) end
    case("layer_norm", "[2,77,32] affine", ln, function(M) return {M.randn(2, 77, 32), M.randn(32), M.randn(32)} end)
    case("layer_norm", "no affine [5,40]", function(x) return F.layer_norm(x) end, function(M) return {M.randn(5, 40)} end)
    case("layer_norm", "rows of 2048 (a block per row)", ln,
         function(M) return {M.randn(6, 2048), M.randn(2048), M.randn(2048)} end)
    case("layer_norm", "[2,4096,64] (sliced dw/db)", ln,
         function(M) return {M.randn(2, 4096, 64), M.randn(64), M.randn(64)} end)
    case("layer_norm", "non-contiguous, eps 1e-6", function(x, w, b) return F.layer_norm(x, w, b, 1e-6) end,
         function(M) return {M.randn_nc(30, 24), M.randn(24), M.randn(24)} end)
    case("layer_norm", "bf16 [2,77,32]", via("bf16", ln),
         function(M) return {M.randn(2, 77, 32), M.randn(32), M.randn(32)} end, half)

    -- ---- softmax / log_softmax ---------------------------------------------

    for _, op in ipairs {"softmax", "log_softmax"} do
        case(op, "last dim [2,77,77]", function(x) return F[op](x) end, function(M) return {M.randn(2, 77, 77)} end)
        case(op, "middle dim [4,50,16]", function(x) return F[op](x, 2) end, function(M) return {M.randn(4, 50, 16)} end)
        case(op, "first dim [30,20]", function(x) return F[op](x, 1) end, function(M) return {M.randn(30, 20)} end)
        case(op, "rows of 3000 (a block per row)", function(x) return F[op](x, -1) end,
             function(M) return {M.randn(3, 3000)} end)
        case(op, "non-contiguous, dim -1", function(x) return F[op](x, -1) end, function(M) return {M.randn_nc(40, 30)} end)
        case(op, "large logits (x * 100)", function(x) return F[op](x * 100, -1) end,
             function(M) return {M.randn(16, 64)} end, {rtol = 1e-5, atol = 1e-4})
        case(op, "bf16 last dim [8,77]", via("bf16", function(x) return F[op](x, -1) end),
             function(M) return {M.randn(8, 77)} end, half)
    end

    -- ---- embedding (ids 0-based) -------------------------------------------

    local emb = function(w, i) return F.embedding(w, i) end
    case("embedding", "CLIP-like ids [2,77], padding repeated", emb,
         function(M) return {M.randn(100, 32), prompt_ids(M, 2, 100)} end)
    case("embedding", "repeated ids [2,2]", emb, function(M) return {M.randn(5, 3), ids(M, {{0, 2}, {2, 4}})} end)
    case("embedding", "random int32 ids [300]", emb,
         function(M) return {M.randn(50, 24), M.ints(0, 50, 300):to("i32")} end)
    case("embedding", "odd row width (3 values)", emb, function(M) return {M.randn(9, 3), M.ints(0, 9, 4, 5)} end)
    case("embedding", "bf16 CLIP-like ids [2,77]", via("bf16", emb),
         function(M) return {M.randn(100, 32), prompt_ids(M, 2, 100)} end, half)

    -- ---- gather / index_select (indices 1-based) ---------------------------

    case("gather", "dim 2, repeated indices", function(x, i) return F.gather(x, 2, i) end,
         function(M) return {M.randn(3, 4), ids(M, {{1, 1, 4}, {2, 3, 2}, {4, 4, 4}})} end)
    case("gather", "dim 1, index smaller than input", function(x, i) return F.gather(x, 1, i) end,
         function(M) return {M.randn(6, 5), M.ints(1, 7, 4, 3)} end)
    case("gather", "3-D dim 3, longer than the input along dim", function(x, i) return F.gather(x, 3, i) end,
         function(M) return {M.randn(4, 5, 6), M.ints(1, 7, 4, 5, 9)} end)
    case("gather", "non-contiguous input", function(x, i) return F.gather(x, 2, i) end,
         function(M) return {M.randn_nc(10, 8), M.ints(1, 9, 10, 3)} end)
    case("gather", "schedule lookup [1000] at timesteps [8]", function(x, i) return F.gather(x, 1, i) end,
         function(M) return {M.randn(1000), M.ints(1, 1001, 8)} end)

    case("index_select", "dim 1, repeated", function(x, i) return F.index_select(x, 1, i) end,
         function(M) return {M.randn(4, 3), ids(M, {3, 1, 3})} end)
    case("index_select", "middle dim of [3,10,4], repeats", function(x, i) return F.index_select(x, 2, i) end,
         function(M) return {M.randn(3, 10, 4), M.ints(1, 11, 15)} end)
    case("index_select", "non-contiguous, last dim", function(x, i) return F.index_select(x, 2, i) end,
         function(M) return {M.randn_nc(6, 8), ids(M, {8, 2, 2, 1})} end)
    case("index_select", "int32 index", function(x, i) return F.index_select(x, 1, i) end,
         function(M) return {M.randn(20, 16), M.ints(1, 21, 30):to("i32")} end)
    case("index_select", "bf16 middle dim", via("bf16", function(x, i) return F.index_select(x, 2, i) end),
         function(M) return {M.randn(3, 10, 4), M.ints(1, 11, 15)} end, half)

    -- ---- upsample_nearest2d (NHWC) -----------------------------------------

    local up = function(s) return function(x) return F.upsample_nearest2d(x, s) end end
    case("upsample_nearest2d", "[2,4,4,16] x2", up(2), function(M) return {M.randn(2, 4, 4, 16)} end)
    case("upsample_nearest2d", "[1,3,5,6] x3", up(3), function(M) return {M.randn(1, 3, 5, 6)} end)
    case("upsample_nearest2d", "odd channels [2,3,3,3] x2", up(2), function(M) return {M.randn(2, 3, 3, 3)} end)
    case("upsample_nearest2d", "from a permuted NCHW tensor",
         function(x) return F.upsample_nearest2d(x:permute(1, 3, 4, 2), 2) end,
         function(M) return {M.randn(2, 5, 4, 4)} end)
    case("upsample_nearest2d", "bf16 [2,4,4,16] x2", via("bf16", up(2)), function(M) return {M.randn(2, 4, 4, 16)} end,
         half)
end
