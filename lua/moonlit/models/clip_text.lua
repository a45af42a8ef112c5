-- moonlit.models.clip_text — transformers' CLIPTextModel (SD's text
-- encoder), built from its config.json.
--   te(input_ids [B,S] int) -> last_hidden_state [B,S,D]
-- Parameter names are transformers' without the "text_model." prefix; the
-- loader accepts both forms and files are written with the prefix.
local core = require "moonlit.core"
local nn = require "moonlit.nn"
local config_check = require "moonlit.config_check"
local release = nn.release

local M = {}

local Embeddings = nn.Module:extend("CLIPTextEmbeddings")
function Embeddings:init(cfg)
    self:add_module("token_embedding", nn.Embedding(cfg.vocab_size, cfg.hidden_size))
    self:add_module("position_embedding", nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size))
end
function Embeddings:forward(ids)
    local s = ids:size(2)
    if s > self.position_embedding.weight:size(1) then
        error(string.format("CLIPTextModel: sequence of %d tokens is longer than max_position_embeddings %d",
                            s, self.position_embedding.weight:size(1)), 2)
    end
    local pos = nn.cast(self.position_embedding.weight):narrow(1, 1, s)   -- [S, D]
    return self.token_embedding(ids) + pos
end

local SelfAttention = nn.Module:extend("CLIPAttention")
function SelfAttention:init(cfg)
    local d = cfg.hidden_size
    self.heads = cfg.num_attention_heads
    self.head_dim = d // self.heads
    self:add_module("k_proj", nn.Linear(d, d))
    self:add_module("v_proj", nn.Linear(d, d))
    self:add_module("q_proj", nn.Linear(d, d))
    self:add_module("out_proj", nn.Linear(d, d))
end
-- Intermediates are released once used (nn.release): what backward needs
-- the graph holds.
function SelfAttention:forward(x)
    local b, s = x:size(1), x:size(2)
    local function heads(proj)
        local p = proj(x)
        local hv = p:view(b, s, self.heads, self.head_dim)
        release(p, x, hv)
        return hv
    end
    local q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
    local o = core.scaled_dot_product_attention(q, k, v, {causal = true})
    release(q, x); release(k, x); release(v, x)
    local ov = o:view(b, s, self.heads * self.head_dim)
    release(o, ov)
    local out = self.out_proj(ov)
    release(ov, out)
    return out
end

local MLP = nn.Module:extend("CLIPMLP")
function MLP:init(cfg)
    self.act = cfg.hidden_act or "quick_gelu"
    self:add_module("fc1", nn.Linear(cfg.hidden_size, cfg.intermediate_size))
    self:add_module("fc2", nn.Linear(cfg.intermediate_size, cfg.hidden_size))
end
local acts = {quick_gelu = core.quick_gelu, gelu = core.gelu, gelu_new = core.gelu_tanh,
              gelu_pytorch_tanh = core.gelu_tanh, relu = core.relu, silu = core.silu}
function MLP:forward(x)
    local act = acts[self.act] or error("CLIPTextModel: unsupported hidden_act '" .. tostring(self.act) .. "'")
    local h = self.fc1(x)
    local a = act(h)
    release(h, x, a)
    local y = self.fc2(a)
    release(a, x, y)
    return y
end

local Layer = nn.Module:extend("CLIPEncoderLayer")
function Layer:init(cfg)
    local eps = cfg.layer_norm_eps or 1e-5
    self:add_module("self_attn", SelfAttention(cfg))
    self:add_module("layer_norm1", nn.LayerNorm(cfg.hidden_size, {eps = eps}))
    self:add_module("mlp", MLP(cfg))
    self:add_module("layer_norm2", nn.LayerNorm(cfg.hidden_size, {eps = eps}))
end
function Layer:forward(x)
    local n1 = self.layer_norm1(x)
    local a = self.self_attn(n1)
    release(n1, x, a)
    local h = x + a
    release(a, x)
    local n2 = self.layer_norm2(h)
    local m = self.mlp(n2)
    release(n2, h, m)
    local out = h + m
    release(m, h)
    release(h, x)
    return out
end

local Encoder = nn.Module:extend("CLIPEncoder")
function Encoder:init(cfg)
    local layers = nn.ModuleList()
    for _ = 1, cfg.num_hidden_layers do layers:append(Layer(cfg)) end
    self:add_module("layers", layers)
end

local CLIPTextModel = nn.Module:extend("CLIPTextModel")
M.CLIPTextModel = CLIPTextModel
-- text_encoder:enable_gradient_checkpointing() recomputes each encoder layer
CLIPTextModel._checkpoint_classes = {"CLIPEncoderLayer"}

function CLIPTextModel:init(cfg)
    config_check.check("CLIPTextModel", cfg)
    self.config = cfg
    self:add_module("embeddings", Embeddings(cfg))
    self:add_module("encoder", Encoder(cfg))
    self:add_module("final_layer_norm", nn.LayerNorm(cfg.hidden_size, {eps = cfg.layer_norm_eps or 1e-5}))
end

-- ids [B,S] int32/int64 -> last_hidden_state [B,S,D].  opts.skip_layers
-- (clip skip) returns the output of an earlier layer, final-normed.
function CLIPTextModel:forward(ids, opts)
    local h = self.embeddings(ids)
    local layers = self.encoder.layers:children()
    local n = #layers - ((opts and opts.skip_layers) or 0)
    for i = 1, n do
        local nh = layers[i](h)
        release(h, ids, nh)
        h = nh
    end
    local out = self.final_layer_norm(h)
    release(h, ids, out)
    return out
end

return M
