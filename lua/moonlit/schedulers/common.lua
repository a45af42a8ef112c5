-- moonlit.schedulers.common — what every diffusers-style scheduler shares:
-- the beta schedule, alphas_cumprod, timestep spacing, add_noise and
-- get_velocity.  Per-step coefficients are Lua numbers; tensors only carry
-- samples.  The schedule itself is computed with float32 rounding at each
-- step (via string.pack) so it matches PyTorch's float32 tensors.
local core = require "moonlit.core"

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

-- betas and alphas_cumprod as Lua arrays indexed by timestep + 1.
function C.make_schedule(cfg)
    local n = cfg.num_train_timesteps
    local betas = {}
    if cfg.trained_betas then
        for i, b in ipairs(cfg.trained_betas) do betas[i] = f32(b) end
        if #betas ~= n then error(string.format("scheduler: trained_betas has %d entries, num_train_timesteps is %d", #betas, n)) end
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
        error("scheduler: unsupported beta_schedule '" .. tostring(cfg.beta_schedule) .. "'")
    end
    local ac, prod = {}, 1.0
    for i = 1, n do
        prod = f32(prod * f32(1 - betas[i]))
        ac[i] = prod
    end
    return betas, ac
end

-- numpy-style round half to even
function C.round_even(x)
    local r = math.floor(x + 0.5)
    if r - x == 0.5 and r % 2 == 1 then r = r - 1 end
    return r
end

local function linspace(a, b, n)
    local out = {}
    if n == 1 then return {a} end
    for i = 0, n - 1 do out[i + 1] = a + (b - a) * i / (n - 1) end
    return out
end
C.linspace = linspace

local function reverse(t)
    local out = {}
    for i = #t, 1, -1 do out[#out + 1] = t[i] end
    return out
end
C.reverse = reverse

-- Discrete timesteps (descending) for DDPM/DDIM/PNDM-style schedulers.
function C.spaced_timesteps(cfg, n)
    local N = cfg.num_train_timesteps
    if n > N then error(string.format("scheduler: %d inference steps exceed num_train_timesteps %d", n, N)) end
    local ts = {}
    local sp = cfg.timestep_spacing
    if sp == "linspace" then
        for i, v in ipairs(linspace(0, N - 1, n)) do ts[i] = C.round_even(v) end
        ts = reverse(ts)
    elseif sp == "leading" then
        local ratio = N // n
        for i = 0, n - 1 do ts[i + 1] = i * ratio + cfg.steps_offset end
        ts = reverse(ts)
    elseif sp == "trailing" then
        local ratio = N / n
        local v = N
        while v > 0 do ts[#ts + 1] = C.round_even(v) - 1; v = v - ratio end
    else
        error("scheduler: unsupported timestep_spacing '" .. tostring(sp) .. "'")
    end
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

-- Class helper: a constructor that fills config and schedule.
function C.class(name, extra_defaults)
    local cls = {}
    cls.__index = cls
    cls.__name = name
    setmetatable(cls, {__index = Base, __call = function(c, cfg)
        local self = setmetatable({}, c)
        self.config = C.defaults(cfg, extra_defaults)
        self.config._class_name = name
        self.num_train_timesteps = self.config.num_train_timesteps
        self.betas, self.alphas_cumprod = C.make_schedule(self.config)
        self.init_noise_sigma = 1.0
        if c.setup then c.setup(self) end
        return self
    end})
    return cls
end

return C
