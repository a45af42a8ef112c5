-- moonlit.fixture_tolerances — the bf16 tolerances of scripts/verify_fixture.lua,
-- derived from what PyTorch's own bf16 autocast gives on the same fixture.
--
--   local FT = require "moonlit.fixture_tolerances"
--   local tol = FT.from_measurement(measured, {fixture = "sd1-tiny"})  -- measurement JSON -> file contents
--   local t = FT.load(dir .. "/bf16_tolerances.json")                  -- nil, why when absent
--   t:check("unet.out")  -> {pytorch = e, tol = max(factor * e, floor)}
--   t:set("train.grads")  -> {pytorch = aggregate, tol = max(factor * aggregate, floor), median}
--   t:tensor_ok("grad.unet.conv_in.weight", num, den, atol) -> pass, allowed, pytorch_num
--
-- A check passes when moonlit's error is at most `factor` (1.5) times the
-- largest error PyTorch's autocast showed over its draws, or at most `floor`
-- (1e-4, the GPU float32 tolerance), whichever is larger: a check where
-- PyTorch happens to be exact (the schedulers' float32 math) is held to
-- float32 agreement, not to exactness. Every error is verify_fixture's
-- relative L2 error against the fixture's float32 reference.
--
-- The gradients and the parameters after AdamW are one check per set: all
-- the set's tensors as one vector, by the rule above. Each tensor is also
-- compared by its absolute L2 difference `num` against the reference norm
-- `den`: moonlit's `num` may be `tensor_factor` (2) times PyTorch's
-- (`pytorch rel * den`), or the float32 rule `floor * den + atol`. In
-- absolute terms, a gradient that is zero in exact arithmetic (an attention
-- key bias) is held to bf16 noise of PyTorch's size. A parameter after one
-- AdamW step may also hold PARAM_FLIPS elements moved the other way
-- (t:flip_allowance(lr), added to its atol by verify_fixture).
--
-- File format: docs/fixtures.md, "bf16 tolerances". Every malformed entry
-- is an error that names the file and the key.
local core = require "moonlit.core"

local M = {}

M.FACTOR = 1.5
M.FLOOR = 1e-4
-- A set of tensors (the gradients, the parameters after AdamW) is one check:
-- all its tensors as one vector within FACTOR of PyTorch's. Each tensor on
-- its own is then held within TENSOR_FACTOR of PyTorch's, a guard against
-- one tensor going wrong: on a small tensor two equally good bf16
-- computations differ by up to ~1.8x (measured over PyTorch's own draws),
-- so 1.5x per tensor would fail an implementation as good as PyTorch.
M.TENSOR_FACTOR = 2
-- AdamW's first step moves each element by about lr, in its gradient's
-- direction; where bf16 noise decides that sign the element lands 2 lr from
-- the reference. A parameter tensor may hold this many such elements more
-- than the 1.5x rule would allow: where PyTorch's draws happened to flip
-- none, one flip in moonlit would otherwise fail a tensor of any size.
M.PARAM_FLIPS = 2
-- PyTorch's errors are written rounded up to this many significant digits
M.DIGITS = 3
-- what scripts/measure_autocast_error.py writes in meta.precision for a
-- bf16 run (its --precision f32 self-check is not a measurement of bf16)
M.BF16_PRECISION = "torch.autocast bfloat16 over float32 weights"
-- the token embedding's gradient and parameter are stored as a head and three sums
M.EMBEDDING_FIELDS = {"head", "sum", "sumsq", "abssum"}

local function is_finite_number(v)
    return type(v) == "number" and v == v and v ~= math.huge and v ~= -math.huge
end

local function show(v)
    if v == core.json_null then return "null" end
    if type(v) == "string" then return string.format("%q", v) end
    return tostring(v)
end

local function fail(where, key, what, got)
    error(string.format("%s: %s %s (got %s)", where, key, what, show(got)), 0)
end

-- An error value: a finite number >= 0.
local function check_error_value(where, key, v)
    if not is_finite_number(v) or v < 0 then fail(where, key, "must be a finite number >= 0", v) end
    return v + 0.0
end

-- A tensor's entry: an error value, or for the token embedding an object of
-- EMBEDDING_FIELDS, each an error value.
local function check_tensor_entry(where, key, v)
    if type(v) ~= "table" then return check_error_value(where, key, v) end
    local out = {}
    for _, f in ipairs(M.EMBEDDING_FIELDS) do
        out[f] = check_error_value(where, key .. "." .. f, v[f])
    end
    for f in pairs(v) do
        if out[f] == nil then fail(where, key, "has an unknown field " .. show(f), v[f]) end
    end
    return out
end

local function check_section(where, t, name, entry)
    local s = t[name]
    if type(s) ~= "table" then fail(where, name, "must be an object of errors", s) end
    local out, n = {}, 0
    for k, v in pairs(s) do
        if type(k) ~= "string" then fail(where, name, "must have names as keys", k) end
        out[k] = entry(where, name .. "[" .. show(k) .. "]", v)
        n = n + 1
    end
    if n == 0 then fail(where, name, "is empty", "{}") end
    return out, n
end

-- The sets' summaries are for the report only: the aggregate (all tensors as
-- one vector) and the median over tensors, each the largest over the draws.
local function check_sets(where, sets)
    if sets == nil then return {} end
    if type(sets) ~= "table" then fail(where, "sets", "must be an object", sets) end
    local out = {}
    for name, s in pairs(sets) do
        local key = "sets[" .. show(name) .. "]"
        if type(s) ~= "table" then fail(where, key, "must be an object", s) end
        out[name] = {aggregate = check_error_value(where, key .. ".aggregate", s.aggregate),
                     median = check_error_value(where, key .. ".median", s.median)}
    end
    return out
end

local Tolerances = {}
Tolerances.__index = Tolerances

-- Checks a decoded bf16_tolerances.json; `where` names it in errors.
function M.validate(t, where)
    where = where or "bf16 tolerances"
    if type(t) ~= "table" then fail(where, "the file", "must hold a JSON object", t) end
    local factor, floor = t.factor, t.floor
    if not is_finite_number(factor) or factor < 1 then fail(where, "factor", "must be a number >= 1", factor) end
    if not is_finite_number(floor) or floor < 0 then fail(where, "floor", "must be a finite number >= 0", floor) end
    local tensor_factor = t.tensor_factor
    if not is_finite_number(tensor_factor) or tensor_factor < factor then
        fail(where, "tensor_factor", "must be a number >= factor", tensor_factor)
    end
    local flips = t.param_flips
    if math.type(flips) ~= "integer" or flips < 0 then fail(where, "param_flips", "must be an integer >= 0", flips) end
    if type(t.measured) ~= "table" then fail(where, "measured", "must be an object (what PyTorch ran on)", t.measured) end
    local checks = check_section(where, t, "checks", check_error_value)
    local tensors = check_section(where, t, "tensors", check_tensor_entry)
    return setmetatable({where = where, factor = factor + 0.0, floor = floor + 0.0,
                         tensor_factor = tensor_factor + 0.0, param_flips = flips,
                         measured = t.measured,
                         checks = checks, tensors = tensors, sets = check_sets(where, t.sets)}, Tolerances)
end

-- Reads and checks a tolerance file; nil, message when there is none.
function M.load(path)
    if not core.is_file(path) then return nil, path .. " not found" end
    local ok, t = pcall(core.json_load, path, {null = core.json_null})
    if not ok then error(tostring(t), 0) end
    return M.validate(t, path)
end

local function missing(self, kind, name)
    error(string.format("%s has no entry for %s %s: it was measured on another version of the fixture or "
                        .. "of verify_fixture; measure again (docs/fixtures.md, \"bf16 tolerances\")",
                        self.where, kind, show(name)), 0)
end

-- The rule for one value whose PyTorch error is e: max(factor * e, floor).
function Tolerances:allowed(e)
    return math.max(self.factor * e, self.floor)
end

-- A whole-result check: {pytorch = PyTorch's error, tol = what moonlit may reach}.
function Tolerances:check(name)
    local e = self.checks[name]
    if e == nil then missing(self, "check", name) end
    return {pytorch = e, tol = self:allowed(e)}
end

-- PyTorch's entry for a tensor: a number, or the token embedding's fields.
function Tolerances:tensor(key)
    local e = self.tensors[key]
    if e == nil then missing(self, "tensor", key) end
    return e
end

-- One tensor of a gradient or parameter set. num = |moonlit - reference|,
-- den = |reference|, atol = verify_fixture's float32 absolute floor for it.
-- Returns pass, the largest num allowed, and PyTorch's num.
function Tolerances:tensor_ok(key, num, den, atol, field)
    local e = self:tensor(key)
    if type(e) == "table" then
        e = e[field or "head"]
    elseif field and field ~= "head" then
        error(string.format("%s: tensor %s has a single error, not the field %s", self.where, show(key), show(field)), 0)
    end
    local pt_num = den > 0 and e * den or e
    local allowed = math.max(self.tensor_factor * pt_num, self.floor * den + atol)
    return num <= allowed, allowed, pt_num
end

-- A set as one check: {pytorch = PyTorch's aggregate error (all the set's
-- tensors as one vector), tol = what moonlit's aggregate may reach}.
function Tolerances:set(name)
    local s = self.sets[name]
    if s == nil then missing(self, "set", name) end
    return {pytorch = s.aggregate, tol = self:allowed(s.aggregate), median = s.median}
end

-- The extra absolute difference a parameter tensor may have after one AdamW
-- step of learning rate lr: param_flips elements, each 2 lr away.
function Tolerances:flip_allowance(lr)
    return 2 * lr * math.sqrt(self.param_flips)
end

-- x rounded up to DIGITS significant digits: a shorter file, and never a
-- tolerance below what was measured.
local function round_up(x)
    if x == 0 then return 0.0 end
    local scale = 10.0 ^ (math.floor(math.log(x, 10)) - (M.DIGITS - 1))
    local up = math.ceil(x / scale) * scale
    local short = tonumber(string.format("%." .. M.DIGITS .. "g", up))
    return short >= x and short or up
end
M.round_up = round_up

-- Turns the JSON of scripts/measure_autocast_error.py into the contents of
-- bf16_tolerances.json. opts.fixture: the fixture's folder name, which the
-- measurement must name too.
function M.from_measurement(m, opts)
    opts = opts or {}
    local where = opts.where or "measurement"
    if type(m) ~= "table" then fail(where, "the file", "must hold a JSON object", m) end
    local meta = m.meta
    if type(meta) ~= "table" then fail(where, "meta", "must be an object", meta) end
    if meta.precision ~= M.BF16_PRECISION then
        fail(where, "meta.precision", "must be " .. show(M.BF16_PRECISION) .. ": only a bf16 autocast run sets bf16 tolerances", meta.precision)
    end
    if opts.fixture and meta.fixture ~= opts.fixture then
        fail(where, "meta.fixture", "must be " .. show(opts.fixture) .. ", the fixture these tolerances are for", meta.fixture)
    end
    local checks = check_section(where, m, "checks", check_error_value)
    local tensors = check_section(where, m, "tensors", check_tensor_entry)
    for k, v in pairs(checks) do checks[k] = round_up(v) end
    for k, v in pairs(tensors) do
        if type(v) == "table" then
            for f, e in pairs(v) do v[f] = round_up(e) end
        else
            tensors[k] = round_up(v)
        end
    end
    -- sets: one summary per draw; the file keeps the largest of each figure
    local sets = {}
    if m.sets ~= nil then
        if type(m.sets) ~= "table" then fail(where, "sets", "must be an object", m.sets) end
        for name, draws in pairs(m.sets) do
            local key = "sets[" .. show(name) .. "]"
            if type(draws) ~= "table" or #draws == 0 then fail(where, key, "must be a list of summaries, one per draw", draws) end
            local agg, med = 0.0, 0.0
            for i, s in ipairs(draws) do
                if type(s) ~= "table" then fail(where, key .. "[" .. i .. "]", "must be an object", s) end
                agg = math.max(agg, check_error_value(where, key .. "[" .. i .. "].aggregate", s.aggregate))
                med = math.max(med, check_error_value(where, key .. "[" .. i .. "].median", s.median))
            end
            sets[name] = core.json_object {aggregate = round_up(agg), median = round_up(med)}
        end
    end
    local measured = {}
    for k, v in pairs(meta) do measured[k] = v end
    local out = {
        about = "bf16-mixed tolerances of scripts/verify_fixture.lua: a check passes when moonlit's relative L2 error "
                .. "is at most max(factor x PyTorch's, floor), PyTorch's being the largest over the draws of "
                .. "scripts/measure_autocast_error.py, rounded up to 3 digits; a set (train.grads, train.params) "
                .. "is one check by its aggregate, and each of its tensors is held to tensor_factor x PyTorch's; a "
                .. "parameter tensor may also hold param_flips elements moved 2 lr the other way "
                .. "(docs/fixtures.md, \"bf16 tolerances\")",
        factor = M.FACTOR,
        floor = M.FLOOR,
        tensor_factor = M.TENSOR_FACTOR,
        param_flips = M.PARAM_FLIPS,
        measured = core.json_object(measured),
        checks = core.json_object(checks),
        tensors = core.json_object(tensors),
        sets = core.json_object(sets),
    }
    for k, v in pairs(tensors) do
        if type(v) == "table" then tensors[k] = core.json_object(v) end
    end
    -- what is written must read back: the same checks as verify_fixture applies
    M.validate(out, where)
    return out
end

return M
