-- test_memory.lua — a training loop's memory stays flat without any help
-- from the script: 10,000 forward/backward/AdamW steps of a small MLP, no
-- collectgarbage() calls (backward releases the graph; tensor memory held
-- by dead Lua temporaries must not pile up behind Lua's collector).  The
-- resident set after step 1,000 and after step 10,000 may differ by little.
local ml = require "moonlit"
local nn = ml.nn

local tests = {}

local function page_size()
    local p = io.popen("getconf PAGESIZE 2>/dev/null")
    local n = p and tonumber(p:read("l"))
    if p then p:close() end
    return n or 4096
end

-- Resident set size in bytes, from /proc/self/statm (Linux).
local function rss_bytes(page)
    local f = io.open("/proc/self/statm")
    if not f then return nil end
    local line = f:read("l")
    f:close()
    return tonumber(line:match("^%d+%s+(%d+)")) * page
end

-- AddressSanitizer keeps freed memory in quarantine, so RSS says nothing there.
local function under_asan()
    local f = io.open("/proc/self/maps")
    if not f then return false end
    local maps = f:read("a")
    f:close()
    return maps:find("libasan", 1, true) ~= nil
end

function tests.training_loop_memory_stays_flat(t)
    local page = page_size()
    if not rss_bytes(page) then return end   -- no /proc: nothing to measure
    ml.manual_seed(0)
    local x, y = ml.randn(32, 8), ml.randn(32, 1)
    local model = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 1))
    local opt = ml.optim.AdamW(model:parameters(), {lr = 1e-3})
    local rss_1k, heap_1k, heap_max
    for step = 1, 10000 do
        opt:zero_grad()
        local loss = ml.F.mse_loss(model(x), y)
        loss:backward()
        opt:step()
        if step >= 1000 then
            local heap = collectgarbage("count")
            heap_max = math.max(heap_max or 0, heap)
        end
        if step == 1000 then rss_1k, heap_1k = rss_bytes(page), collectgarbage("count") end
    end
    local rss_10k = rss_bytes(page)
    local grew_mb = (rss_10k - rss_1k) / 2 ^ 20
    t:assert(heap_max < 8 * 1024, string.format("Lua heap stays small (max %.0f KB after step 1000)", heap_max))
    if under_asan() then return end
    t:assert(grew_mb < 2, string.format("RSS grew %.2f MB between step 1,000 (%.1f MB) and 10,000 (%.1f MB)",
                                         grew_mb, rss_1k / 2 ^ 20, rss_10k / 2 ^ 20))
    t:assert(heap_1k > 0)
end

function tests.free_and_close_release_at_once(t)
    local page = page_size()
    if not rss_bytes(page) or under_asan() then return end
    -- 64 MB buffers, released deterministically: RSS drops by the buffer
    -- each time.  Each check compares RSS while the buffer lives with RSS
    -- right after its release, so memory the rest of the process takes
    -- meanwhile (allocator arenas, the Lua heap) cannot fail it.
    local MB = 2 ^ 20
    for i = 1, 5 do
        local before, during = rss_bytes(page), nil
        do
            local big <close> = ml.ones(16, 1024, 1024)
            during = rss_bytes(page)
            t:assert(during - before > 32 * MB, string.format("the buffer is resident (+%.1f MB)", (during - before) / MB))
        end
        local after = rss_bytes(page)
        t:assert(during - after > 48 * MB,
                 string.format("<close> gave the memory back (round %d: %.1f MB returned of 64)", i, (during - after) / MB))
    end
    for i = 1, 5 do
        local big = ml.ones(16, 1024, 1024)
        local during = rss_bytes(page)
        big:free()
        local after = rss_bytes(page)
        t:assert(during - after > 48 * MB,
                 string.format("free() gave the memory back (round %d: %.1f MB returned of 64)", i, (during - after) / MB))
    end
end

-- No storage is leaked: after a full collection the number of live
-- storages is the same after 1,000 and after 5,000 steps (parameters,
-- gradients, optimizer state and data only).
function tests.training_loop_leaks_no_storage(t)
    ml.manual_seed(0)
    local x, y = ml.randn(16, 4), ml.randn(16, 1)
    local model = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 1))
    local opt = ml.optim.AdamW(model:parameters(), {lr = 1e-3})
    local counts = {}
    for step = 1, 5000 do
        opt:zero_grad()
        local loss = ml.F.mse_loss(model(x), y)
        loss:backward()
        opt:step()
        if step == 1000 or step == 5000 then
            collectgarbage("collect")
            collectgarbage("collect")
            counts[#counts + 1] = ml.memory_stats().storages
        end
    end
    t:assertEq(counts[2], counts[1], "live storages after 1,000 and 5,000 steps")
end

return tests
