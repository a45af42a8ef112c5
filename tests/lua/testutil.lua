-- testutil.lua — small helpers the Lua test files share.
local U = {}

-- The error message of f(...) as a string, or nil if it did not fail.
function U.error_of(f, ...)
    local ok, err = pcall(f, ...)
    if ok then return nil end
    return tostring(err)
end

-- Whether s contains pattern as plain text (nil-safe).
function U.has(s, pattern)
    return s ~= nil and s:find(pattern, 1, true) ~= nil
end

function U.read_file(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("a")
    f:close()
    return s
end

function U.write_file(path, data)
    local f = assert(io.open(path, "wb"))
    f:write(data)
    f:close()
end

local function sh_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
U.shell_quote = sh_quote

-- The moonlit binary running this suite: MOONLIT_BIN (set by
-- tests/run_all.sh), else the interpreter that started the runner (the
-- lowest index of `arg`); nil when neither is known.
function U.moonlit_bin()
    local bin = os.getenv("MOONLIT_BIN")
    if bin and bin ~= "" then return bin end
    if type(arg) ~= "table" or arg[-1] == nil then return nil end
    local i = -1
    while arg[i - 1] ~= nil do i = i - 1 end
    return arg[i]
end

-- The interpreter that started the runner, whatever MOONLIT_BIN says.
function U.running_interpreter()
    if type(arg) ~= "table" or arg[-1] == nil then return nil end
    local i = -1
    while arg[i - 1] ~= nil do i = i - 1 end
    return arg[i]
end

-- A fresh empty folder (mktemp -d); remove it with U.remove_tree.
function U.temp_dir()
    local p = assert(io.popen("mktemp -d"))
    local d = p:read("l")
    p:close()
    return assert(d, "mktemp -d failed")
end

-- cp -r in Lua through the core's file functions.
function U.copy_tree(src, dst)
    local core = require "moonlit.core"
    core.mkdir_p(dst)
    for _, name in ipairs(core.list_dir(src)) do
        local s, d = src .. "/" .. name, dst .. "/" .. name
        if core.is_dir(s) then U.copy_tree(s, d) else core.copy_file(s, d) end
    end
end

function U.remove_tree(dir) os.execute("rm -rf " .. sh_quote(dir)) end

-- ---- autocast runs (test_autocast_cache, test_recompute_casts) -------------
-- The CPU has no bf16 compute, so those tests run autocast with f32
-- parameters and f64 as the compute dtype.  Models with every layer kind
-- that casts its parameters: Linear and LayerNorm; convolutions 3x3 and 1x1
-- (a GEMM over a view of the converted weight) and GroupNorm.
function U.cast_mlp()
    local ml = require "moonlit"
    local nn = ml.nn
    ml.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.SiLU(), nn.Linear(8, 3))
end
function U.cast_convnet()
    local ml = require "moonlit"
    local nn = ml.nn
    ml.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, {padding = 1}), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 1))
end

-- Three AdamW steps of make() on x under autocast("f64"): {outs =, grads =}
-- each step's output and gradients, params = the final parameters, held =
-- the bytes the graph held for backward at the first step's end of forward.
function U.autocast_train(make, x)
    local ml = require "moonlit"
    local m = make()
    local opt = ml.optim.AdamW(m:parameters(), {lr = 1e-2})
    local outs, grads, held = {}, {}, 0
    for s = 1, 3 do
        opt:zero_grad()
        local y = ml.nn.autocast("f64", function() return m(x) end)
        local loss = (y ^ 2):mean()
        if s == 1 then
            for _, e in ipairs(ml.core.saved_census(loss)) do held = held + e.bytes end
        end
        loss:backward()
        outs[s] = y:detach():clone()
        grads[s] = {}
        for i, p in ipairs(m:parameters()) do grads[s][i] = p.grad:clone() end
        opt:step()
    end
    return {outs = outs, grads = grads, params = m:parameters(), held = held}
end

-- Two U.autocast_train results must agree bit for bit.
function U.assert_same_training(t, a, b)
    for s = 1, 3 do
        t:assertEq(b.outs[s].dtype, "f64")
        t:assertTensorEq(b.outs[s], a.outs[s], 0, "step " .. s .. " output")
        for i = 1, #a.grads[s] do
            t:assertEq(b.grads[s][i].dtype, "f32", "gradients in the parameter's dtype")
            t:assertTensorEq(b.grads[s][i], a.grads[s][i], 0, "step " .. s .. " grad " .. i)
        end
    end
    for i = 1, #a.params do t:assertTensorEq(b.params[i], a.params[i], 0, "final param " .. i) end
end

return U
