-- train_mlp.lua — a complete custom training loop: synthetic regression
-- data, a two-layer MLP, AdamW, the loss reported as it falls.
--   moonlit examples/train_mlp.lua [steps] [device]
local ml = require "moonlit"
local nn = ml.nn

local p = ml.argparse.new("train_mlp.lua", "Train a small MLP on synthetic regression data (AdamW).")
p:positional("steps", {type = "integer", required = false, default = 500, help = "optimizer steps (default 500)"})
p:positional("device", {required = false, default = "cpu", help = "cpu, cuda or cuda:N (default cpu)"})
local args = p:parse(arg or {})
local steps, device = args.steps, args.device
if steps < 1 then p:error("<steps> must be >= 1") end
ml.manual_seed(0)

-- y = sin(3 x1) + x2^2 - 0.5 x3, learned from 1024 noisy samples
local n, din = 1024, 3
local x = ml.rand({n, din}, {device = device}) * 2 - 1
local cols = {x:select(2, 1), x:select(2, 2), x:select(2, 3)}
local y = ((cols[1] * 3):sin() + cols[2]:square() - cols[3] * 0.5):view(n, 1)
y = y + ml.randn({n, 1}, {device = device}) * 0.01

local model = nn.Sequential(nn.Linear(din, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
model:to(device)
local opt = ml.optim.AdamW(model:parameters(), {lr = 3e-3, weight_decay = 1e-4})

local first, last
for step = 1, steps do
    opt:zero_grad()
    local loss = ml.F.mse_loss(model(x), y)
    loss:backward()
    opt:step()
    local v = loss:item()
    first = first or v
    last = v
    if step == 1 or step % 100 == 0 or step == steps then
        print(string.format("step %4d  loss %.6f", step, v))
    end
end
print(string.format("loss fell %.1fx (%.4f -> %.6f)", first / last, first, last))
return {first = first, last = last}
