-- tester.lua — the Lua test kit (in the spirit of Torch7's torch.Tester).
-- A test file returns a table of functions; each receives a tester `t`.
-- A test passes when it raises no error and every assertion held.
local Tester = {}
Tester.__index = Tester

function Tester.new() return setmetatable({failures = {}}, Tester) end

local function fail(self, msg)
    local info = debug.getinfo(3, "Sl")
    self.failures[#self.failures + 1] = string.format("%s:%d: %s", info.short_src, info.currentline or 0, msg)
end

function Tester:assert(cond, msg)
    if not cond then fail(self, msg or "assertion failed") end
    return cond
end

local function deep_eq(a, b)
    if type(a) ~= type(b) then return false end
    if type(a) ~= "table" then return a == b end
    for k, v in pairs(a) do if not deep_eq(v, b[k]) then return false end end
    for k in pairs(b) do if a[k] == nil then return false end end
    return true
end

local function show(v)
    if type(v) ~= "table" then return tostring(v) end
    local parts = {}
    for i, x in ipairs(v) do parts[i] = show(x) end
    return "{" .. table.concat(parts, ", ") .. "}"
end

function Tester:assertEq(a, b, msg)
    if not deep_eq(a, b) then fail(self, (msg and msg .. ": " or "") .. show(a) .. " ~= " .. show(b)) return false end
    return true
end

function Tester:assertNear(a, b, tol, msg)
    tol = tol or 1e-6
    if not (math.abs(a - b) <= tol) then
        fail(self, string.format("%s%.10g vs %.10g (tol %g)", msg and msg .. ": " or "", a, b, tol))
        return false
    end
    return true
end

-- Tensors equal in shape and within tol (max abs difference).
function Tester:assertTensorEq(a, b, tol, msg)
    tol = tol or 1e-6
    local prefix = msg and msg .. ": " or ""
    local sa, sb = a:size(), b:size()
    if not deep_eq(sa, sb) then
        fail(self, prefix .. "shapes differ: " .. show(sa) .. " vs " .. show(sb))
        return false
    end
    if a:numel() == 0 then return true end
    local d = (a:to("cpu"):double() - b:to("cpu"):double()):abs():max():item()
    if not (d <= tol) then
        fail(self, string.format("%smax abs difference %.6g > %g", prefix, d, tol))
        return false
    end
    return true
end

-- Relative L2 error ||a - b|| / ||b|| within tol.
function Tester:assertRelErr(a, b, tol, msg)
    local ad, bd = a:to("cpu"):double(), b:to("cpu"):double()
    local num, den = (ad - bd):norm():item(), bd:norm():item()
    local err = den > 0 and num / den or num
    if not (err <= tol) then
        fail(self, string.format("%srelative L2 error %.3g > %g", msg and msg .. ": " or "", err, tol))
        return false
    end
    return true
end

-- fn must raise an error whose message contains `pattern` (plain text).
function Tester:assertError(fn, pattern, msg)
    local ok, err = pcall(fn)
    if ok then fail(self, (msg or "expected an error") .. " (none raised)") return false end
    if pattern and not tostring(err):find(pattern, 1, true) then
        fail(self, string.format("%serror '%s' does not mention '%s'", msg and msg .. ": " or "", tostring(err), pattern))
        return false
    end
    return true
end

function Tester:assertNoError(fn, msg)
    local ok, err = pcall(fn)
    if not ok then fail(self, (msg and msg .. ": " or "") .. tostring(err)) end
    return ok
end

return Tester
