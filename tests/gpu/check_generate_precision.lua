-- check_generate_precision.lua — text-to-image on the GPU in each precision
-- (f32, bf16-mixed, bf16-sr) against the sd1-tiny image diffusers made in
-- f32.  Tolerances (relative L2): 1e-4 for f32, 2e-2 for bf16 (the fixture
-- README's GPU tolerances).
--   build/moonlit tests/gpu/check_generate_precision.lua
local ml = require "moonlit"
local r = ml.core.st_load("tests/fixtures/sd1-tiny/pipeline_out.safetensors")
local tol = {f32 = 1e-4, ["bf16-mixed"] = 2e-2, ["bf16-sr"] = 2e-2}
local ok, bad = 0, 0
for _, p in ipairs {"f32", "bf16-mixed", "bf16-sr"} do
    local m = ml.sd.load("tests/fixtures/sd1-tiny/pipeline", {device = "cuda", precision = p})
    local img = ml.sd.generate(m, {prompt = "photo of a unqtkn dog", negative_prompt = "", num_inference_steps = 5,
                                   guidance_scale = 7.5, latents = r.latents:permute(1, 3, 4, 2):contiguous()})
    local d = (img:double() - r.image:double()):norm():item() / r.image:double():norm():item()
    local pass = d <= tol[p]
    print(string.format("generate %-10s image rel L2 %.3e  tol %.0e  %s", p, d, tol[p], pass and "ok" or "FAIL"))
    if pass then ok = ok + 1 else bad = bad + 1 end
end
print(string.format("%d passed, %d failed", ok, bad))
os.exit(bad == 0 and 0 or 1)
