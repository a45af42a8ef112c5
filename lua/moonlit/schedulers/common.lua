-- moonlit.schedulers.common — what every diffusers-style scheduler shares:
-- the beta schedule, alphas_cumprod, timestep spacing, add_noise and
-- get_velocity.  Per-step coefficients are Lua numbers; tensors only carry
-- samples.  The schedule itself is rounded to float32 (via string.pack)
-- wherever PyTorch rounds it, so betas, alphas_cumprod and the timesteps
-- come out bit-identical to diffusers'.
local core = require "moonlit.core"
local config_check = require "moonlit.config_check"

local C = {}

local function f32(x) return (string.unpack("<f", string.pack("<f", x))) end
C.f32 = f32

-- Config keys with diffusers' defaults.
function C.defaults(cfg, extra)
    local d = {
        num_train_timesteps = 1000, beta_start = 0.0001, beta_end = 0.02, beta_schedule = "linear",
        trained_betas = nil, prediction_type = "epsilon", timestep_spacing = "leading", steps_offset = 0,
    }
    for k, v in pairs(extra or {}) do d[k] = v end
    for k, v in pairs(cfg or {}) do d[k] = v end
    return d
end

-- The schedule is a Lua array of num_train_timesteps entries built in a
-- loop: 1e8 takes minutes and gigabytes, 2^40 never ends.  Trained models
-- use 1000; a million leaves room for any real one (the bound the config
-- schemas of moonlit.config_check use).
C.MAX_TRAIN_TIMESTEPS = config_check.MAX_TRAIN_TIMESTEPS

function C.check_train_timesteps(name, cfg)
    local n = cfg.num_train_timesteps
    if math.type(n) ~= "integer" and not (math.type(n) == "float" and n == math.floor(n)) then
        error(string.format("%s: num_train_timesteps must be an integer (got %s %s)", name, type(n), tostring(n)), 0)
    end
    if n < 2 or n > C.MAX_TRAIN_TIMESTEPS then
        error(string.format("%s: num_train_timesteps = %s is out of range (expected 2 to %d)",
                            name, tostring(n), C.MAX_TRAIN_TIMESTEPS), 0)
    end
end

-- betas and alphas_cumprod as Lua arrays indexed by timestep + 1.
function C.make_schedule(cfg, name)
    C.check_train_timesteps(name, cfg)
    local n = math.tointeger(cfg.num_train_timesteps)
    local betas = {}
    if cfg.trained_betas then
        for i, b in ipairs(cfg.trained_betas) do betas[i] = f32(b) end
        if #betas ~= n then
            error(string.format("%s: trained_betas has %d entries, num_train_timesteps is %d", name, #betas, n), 0)
        end
    elseif cfg.beta_schedule == "linear" or cfg.beta_schedule == "scaled_linear" then
        local a, b = cfg.beta_start, cfg.beta_end
        if cfg.beta_schedule == "scaled_linear" then a, b = math.sqrt(a), math.sqrt(b) end
        a, b = f32(a), f32(b)
        -- torch.linspace in float32: from both ends towards the middle
        local step = f32((b - a) / (n - 1))
        for i = 0, n - 1 do
            local v = i < n // 2 and f32(a + step * i) or f32(b - step * (n - 1 - i))
            betas[i + 1] = cfg.beta_schedule == "scaled_linear" and f32(v * v) or v
        end
    elseif cfg.beta_schedule == "squaredcos_cap_v2" then
        local function abar(t) return math.cos((t + 0.008) / 1.008 * math.pi / 2) ^ 2 end
        for i = 0, n - 1 do
            betas[i + 1] = f32(math.min(1 - abar((i + 1) / n) / abar(i / n), 0.999))
        end
    else
        error(string.format("%s: unsupported beta_schedule '%s' (expected linear, scaled_linear or squaredcos_cap_v2)",
                            name, tostring(cfg.beta_schedule)), 0)
    end
    -- torch.cumprod on CPU accumulates float32 in double and rounds each output
    local ac, prod = {}, 1.0
    for i = 1, n do
        prod = prod * f32(1 - betas[i])
        ac[i] = f32(prod)
    end
    return betas, ac
end

-- numpy-style round half to even
-- np.interp over integer knots 0..#ys-1 (ys is 1-based)
function C.interp(x, ys)
    if x <= 0 then return ys[1] end
    if x >= #ys - 1 then return ys[#ys] end
    local i = math.floor(x)
    return ys[i + 1] + (ys[i + 2] - ys[i + 1]) * (x - i)
end

-- The k-diffusion sigmas sqrt((1 - abar) / abar) of every training timestep,
-- rounded to float32 at each operation as diffusers' float32 tensors are.
function C.train_sigmas(alphas_cumprod)
    local out = {}
    for i, a in ipairs(alphas_cumprod) do out[i] = f32(math.sqrt(f32(f32(1 - a) / a))) end
    return out
end

function C.round_even(x)
    local r = math.floor(x + 0.5)
    if r - x == 0.5 and r % 2 == 1 then r = r - 1 end
    return r
end

-- np.linspace(a, b, n): i * step + a, the last one exactly b
local function linspace(a, b, n)
    if n == 1 then return {a} end
    local out, step = {}, (b - a) / (n - 1)
    for i = 0, n - 1 do out[i + 1] = i * step + a end
    out[n] = b
    return out
end
C.linspace = linspace

-- np.arange(start, 0, -step): ceil(start / step) values start + i * delta,
-- delta being the distance between the first two (as numpy fills it)
function C.arange_down(start, step)
    local len = math.ceil(start / step)
    local delta = (start - step) - start
    local out = {}
    for i = 0, len - 1 do out[i + 1] = start + i * delta end
    return out
end

local function reverse(t)
    local out = {}
    for i = #t, 1, -1 do out[#out + 1] = t[i] end
    return out
end
C.reverse = reverse

-- A number of inference steps set_timesteps accepts.
function C.check_steps(name, cfg, n)
    if math.type(n) ~= "integer" and not (type(n) == "number" and n == math.floor(n)) then
        error(string.format("%s: set_timesteps: num_inference_steps must be an integer, got %s", name, tostring(n)), 0)
    end
    if n < 1 then
        error(string.format("%s: set_timesteps: %d inference steps (need at least 1)", name, n), 0)
    end
    if n > cfg.num_train_timesteps then
        error(string.format("%s: set_timesteps: %d inference steps exceed num_train_timesteps %d",
                            name, n, cfg.num_train_timesteps), 0)
    end
    return math.tointeger(n)
end

local function spacing_error(name, sp)
    error(string.format("%s: unsupported timestep_spacing '%s' (expected leading, trailing or linspace)",
                        name, tostring(sp)), 0)
end

-- Inference timesteps, descending, as diffusers' DDPM/DDIM/Euler compute
-- them (unrounded for linspace: the discrete schedulers round them).
function C.spaced(cfg, n, name)
    local N = cfg.num_train_timesteps
    local sp = cfg.timestep_spacing
    if sp == "linspace" then
        return reverse(linspace(0, N - 1, n))
    elseif sp == "leading" then
        local ratio, ts = N // n, {}
        for i = n - 1, 0, -1 do ts[#ts + 1] = i * ratio + cfg.steps_offset end
        return ts
    elseif sp == "trailing" then
        local ts = C.arange_down(N, N / n)
        for i, v in ipairs(ts) do ts[i] = C.round_even(v) - 1 end
        return ts
    end
    spacing_error(name, sp)
end

-- Integer timesteps (descending) for DDPM/DDIM-style schedulers.
function C.spaced_timesteps(cfg, n, name)
    local ts = C.spaced(cfg, n, name)
    for i, v in ipairs(ts) do ts[i] = math.tointeger(C.round_even(v)) end
    return ts
end

-- alphas_cumprod[timesteps] as a tensor shaped [N,1,1,1] like `like`.
local function gather_ac(self, timesteps, like)
    if type(timesteps) == "number" then return nil, self.alphas_cumprod[timesteps + 1] end
    local act = self:alphas_cumprod_tensor(like.device)
    local idx = timesteps:to("cpu"):long() + 1
    local a = core.index_select(act, 1, idx:to(like.device))
    local shape = {a:size(1)}
    for _ = 2, like:dim() do shape[#shape + 1] = 1 end
    return a:view(shape):to(like.dtype)
end

-- Shared methods mixed into every scheduler class.
local Base = {}
C.Base = Base

function Base:alphas_cumprod_tensor(device)
    device = device or "cpu"
    self._act = self._act or {}
    if not self._act[device] then
        self._act[device] = core.tensor(self.alphas_cumprod, {dtype = "f32", device = device})
    end
    return self._act[device]
end

-- x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (timesteps: tensor [N] or number)
function Base:add_noise(original, noise, timesteps)
    local at, a = gather_ac(self, timesteps, original)
    if at then return original * at:sqrt() + noise * (1 - at):sqrt() end
    return original * math.sqrt(a) + noise * math.sqrt(1 - a)
end

-- v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (the v-prediction target)
function Base:get_velocity(sample, noise, timesteps)
    local at, a = gather_ac(self, timesteps, sample)
    if at then return noise * at:sqrt() - sample * (1 - at):sqrt() end
    return noise * math.sqrt(a) - sample * math.sqrt(1 - a)
end

function Base:scale_model_input(sample) return sample end

-- Config checks shared by every class: a value outside what is implemented
-- is an error here, never silently another behaviour.
function C.check_choice(name, cfg, key, allowed)
    for _, v in ipairs(allowed) do if cfg[key] == v then return end end
    error(string.format("%s: unsupported %s '%s' (expected %s)", name, key, tostring(cfg[key]),
                        table.concat(allowed, ", ")), 0)
end

function C.check_off(name, cfg, keys)
    for _, k in ipairs(keys) do
        if cfg[k] then error(string.format("%s: %s = %s is not implemented", name, k, tostring(cfg[k])), 0) end
    end
end

-- Class helper: a constructor cls(cfg, [source]) that checks the config
-- (with the class's defaults filled in) against the class's schema in
-- moonlit.config_check, then fills the schedule.  source names the file
-- in errors ("config" when not given); cls.check(self) may add checks.
function C.class(name, extra_defaults)
    local cls = {}
    cls.__index = cls
    cls.__name = name
    setmetatable(cls, {__index = Base, __call = function(c, cfg, source)
        local self = setmetatable({}, c)
        if cfg ~= nil and type(cfg) ~= "table" then
            error(string.format("%s: %s: expected a config table, got %s", name, source or "config", type(cfg)), 2)
        end
        self.config = C.defaults(cfg, extra_defaults)
        self.config._class_name = name
        local conf = self.config
        config_check.check(name, conf, source)
        if c.check then c.check(self) end
        self.num_train_timesteps = conf.num_train_timesteps
        self.betas, self.alphas_cumprod = C.make_schedule(conf, name)
        self.init_noise_sigma = 1.0
        if c.setup then c.setup(self) end
        return self
    end})
    return cls
end

-- The error a step before set_timesteps gets.
function C.need_timesteps(self)
    if not self.timesteps then
        error(self.__name .. ": step called before set_timesteps", 3)
    end
end

return C
