-- test_gc_pacing.lua — how tensor memory runs Lua's collector
-- (bindings/lua_tensor.c): the CPU rule (a full collection once the fresh
-- CPU tensor bytes reach a quarter of the live ones), the settings of
-- gc_pacing{} and their errors, and tensors made by finalizers during a
-- collection (no collection inside a collection).  The CUDA side (the
-- allocator's pressure hook) is tests/gpu/check_gc_pressure.lua.
local ml = require "moonlit"
local core = ml.core

local tests = {}

-- Collections the pacing runs in 100 iterations of (x * 2 + 1):sum() on a
-- 4 MB CPU tensor: each temporary (4 MB) meets the share of what is live.
local function loop_collections()
    collectgarbage("collect")
    local x = ml.full({1000 * 1000}, 0.5)
    local before = core.gc_pacing_stats().steps
    local wrong = 0
    for _ = 1, 100 do
        if (x * 2 + 1):sum():item() ~= 2e6 then wrong = wrong + 1 end
    end
    return core.gc_pacing_stats().steps - before, wrong
end

function tests.cpu_rule_a_quarter(t)
    local p = core.gc_pacing()
    t:assertEq(p.cpu_share, 0.25, "CPU share by default")
    t:assertEq(p.cuda_share, 0.5, "CUDA share by default")
    -- x (4 MB) live: each 4 MB temporary is at least a quarter of the live
    -- bytes, so every one of the 200 runs a collection
    local n, wrong = loop_collections()
    t:assertEq(wrong, 0, "sums")
    t:assertEq(n, 200, "collections with the quarter rule")
end

-- gc_pacing{credit_freed = true}: memory freed by hand (t:free(), as
-- nn.release does in the models' forwards) is not garbage and leaves the
-- debt (on by default); off, the freeing loop collects as one that does
-- not free.  With 44 MB live, a
-- quarter is 11 MB: 4 MB temporaries left to the collector run one about
-- every fourth (the live count includes the garbage), and the same loop
-- freeing each one runs none.
local function freeing_loop(x)
    local before = core.gc_pacing_stats().steps
    local wrong = 0
    for _ = 1, 100 do
        local y = x * 2
        local z = y + 1
        y:free()
        local s = z:sum()
        z:free()
        if s:item() ~= 2e6 then wrong = wrong + 1 end
    end
    return core.gc_pacing_stats().steps - before, wrong
end

function tests.freed_tensors_leave_the_debt(t)
    collectgarbage("collect")
    local x = ml.full({1000 * 1000}, 0.5)
    local keep = ml.zeros({10 * 1000 * 1000})
    t:assertEq(core.gc_pacing().credit_freed, true, "on by default")
    local was = core.gc_pacing {credit_freed = false}
    t:assertEq(was.credit_freed, true, "the old setting returned")
    t:assertEq(core.gc_pacing().credit_freed, false, "setting read back")
    local ok0, n_off, wrong_off = pcall(freeing_loop, x)
    core.gc_pacing {credit_freed = true}
    if not ok0 then error(n_off) end
    t:assertEq(wrong_off, 0, "sums")
    t:assert(n_off >= 15, "without the credit, freed temporaries still bring collections (" .. n_off .. ")")
    local ok, freed, wrong = pcall(freeing_loop, x)
    if not ok then error(freed) end
    t:assertEq(wrong, 0, "sums")
    -- at most the one the debt left by the loop before brings
    t:assert(freed <= 1, "collections when every temporary is freed by hand: " .. freed)
    -- a view does not own its storage alone: freeing it credits nothing
    before = core.gc_pacing_stats().steps
    for _ = 1, 100 do
        local y = x * 2
        local v = y:view(1000, 1000)
        v:free()
        if y:sum():item() ~= 1e6 then wrong = wrong + 1 end
    end
    t:assertEq(wrong, 0, "sums through views")
    t:assert(core.gc_pacing_stats().steps - before >= 15,
             "freeing only views still leaves the owners to the collector")
    core.gc_pacing(was)
    t:assertEq(core.gc_pacing().credit_freed, true, "on again")
    t:assertEq(keep:numel(), 1e7, "the live tensor")
end

function tests.cpu_share_changes_the_rule(t)
    local was = core.gc_pacing {cpu_share = 0.5}
    local ok, n, wrong = pcall(loop_collections)
    core.gc_pacing(was)
    t:assert(ok, tostring(n))
    t:assertEq(wrong, 0, "sums")
    -- a half: a collection every second temporary
    t:assertEq(n, 100, "collections with a share of one half")
    t:assertEq(core.gc_pacing().cpu_share, 0.25, "restored")
end

-- minor_share: young collections (generational mode) between the full
-- ones.  With x live (4 MB), a share of 1/8 calls for one at every
-- temporary at first; the cpu_share of 64 keeps the full ones out of the
-- loop.  A temporary that is still an operand when the next young
-- collection runs survives two and is promoted to the old generation,
-- where only a full collection takes it: so the live bytes (garbage
-- included) grow until the share of them exceeds a temporary, and from
-- then a young collection runs at every other one (measured: 107 of 200).
-- Turning it off returns to the incremental mode and full collections
-- only.
function tests.minor_share_runs_young_collections(t)
    local was = core.gc_pacing {cpu_share = 64, minor_share = 0.125}
    t:assertEq(core.gc_pacing().minor_share, 0.125, "setting read back")
    t:assertEq(collectgarbage("incremental"), "generational", "Lua's collector in generational mode")
    collectgarbage("generational")
    local s0 = core.gc_pacing_stats()
    local ok, n, wrong = pcall(loop_collections)
    local s1 = core.gc_pacing_stats()
    was.minor_share = 0
    core.gc_pacing(was)
    t:assert(ok, tostring(n))
    t:assertEq(wrong, 0, "sums")
    local young = s1.minor_steps - s0.minor_steps
    t:assert(young >= 100 and young <= 200, "a young collection at every temporary or every other: " .. young)
    t:assertEq(n, 0, "no full collection from the pacing")
    t:assertEq(core.gc_pacing().minor_share, 0, "off again")
    t:assertEq(collectgarbage("incremental"), "incremental", "back in incremental mode")
    -- dead tensors still go: a loop of 400 MB of temporaries stays small
    local m0 = core.memory_stats().cpu_bytes
    core.gc_pacing {minor_share = 1 / 64}
    for _ = 1, 100 do local _ = ml.zeros(1000 * 1000) + 1 end
    local m1 = core.memory_stats().cpu_bytes
    core.gc_pacing {minor_share = 0}
    t:assert(m1 - m0 < 64e6, string.format("live CPU bytes grew by %.1f MB", (m1 - m0) / 1e6))
end

function tests.stats_fields(t)
    local s = core.gc_pacing_stats()
    for _, k in ipairs {"steps", "ms", "minor_steps", "minor_ms", "pressure_steps", "pressure_ms", "pressure_freed_bytes"} do
        t:assert(type(s[k]) == "number", "gc_pacing_stats()." .. k)
    end
    if not core.cuda_available() then
        t:assertEq(s.pressure_steps, 0, "no pressure collections without a GPU")
    end
end

function tests.bad_settings(t)
    local cases = {
        {{cpu_share = 0}, "cpu_share must be a number above 0 and at most 64"},
        {{cuda_share = -1}, "cuda_share must be a number above 0 and at most 64"},
        {{cuda_share = 65}, "cuda_share must be a number above 0 and at most 64"},
        {{cpu_share = "x"}, "option 'cpu_share' must be a number"},
        {{pressure = 1}, "pressure must be a boolean %(got number%)"},
        {{minor_share = -0.5}, "minor_share must be a number from 0 %(off%) to 64"},
        {{credit_freed = 1}, "credit_freed must be a boolean %(got number%)"},
    }
    for _, c in ipairs(cases) do
        local ok, err = pcall(core.gc_pacing, c[1])
        t:assert(not ok and tostring(err):find(c[2]) ~= nil, "error for a bad setting: " .. tostring(err))
    end
    local ok, err = pcall(core.gc_pacing, 5)
    t:assert(not ok and tostring(err):find("table expected"), "a number is refused: " .. tostring(err))
    -- a refused call changes nothing
    local ok2 = pcall(core.gc_pacing, {cpu_share = 0.5, cuda_share = 0})
    t:assert(not ok2, "refused")
    t:assertEq(core.gc_pacing().cpu_share, 0.25, "nothing applied from a refused call")
end

-- Finalizers that make tensors run inside a collection: the pacing must
-- not start a collection from there (Lua ignores lua_gc then) and every
-- finalizer must finish.
function tests.finalizers_that_allocate(t)
    local made = 0
    for _ = 1, 50 do
        setmetatable({}, {__gc = function()
            local z = ml.zeros(100000)   -- 400 KB: past the pacing's 64 KB minimum
            made = made + (z:numel() == 100000 and 1 or 0)
        end})
    end
    for _ = 1, 100 do local _ = ml.zeros(100000) + 1 end
    collectgarbage("collect")
    collectgarbage("collect")
    t:assertEq(made, 50, "every finalizer made its tensor")
end

return tests
