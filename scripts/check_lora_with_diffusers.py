#!/usr/bin/env python3
"""check_lora_with_diffusers.py — diffusers loads moonlit's LoRA file and draws the same image.

The outside check of moonlit.lora's file layout: moonlit injects rank-4
adapters into the UNet and the text encoder of a model folder, gives their
B matrices random values (they start at zero, which would prove nothing),
writes pytorch_lora_weights.safetensors and renders a prompt from fixed
latents, with the adapters and without.  diffusers then loads the same
folder, applies the file with StableDiffusionPipeline.load_lora_weights and
renders from the same latents, unfused and fused.  Printed: the max and mean
pixel difference (0..255 levels) of each diffusers image to moonlit's, and
how far the adapters moved the image (so a file diffusers silently ignored
would show).  Exits 1 when a difference exceeds --max-diff.

Needs torch, diffusers and peft (pip install peft); not part of `make test`.

Usage:
  check_lora_with_diffusers.py [--moonlit build/moonlit] [--model tests/fixtures/sd1-tiny/pipeline]
        [--alpha 8] [--steps 5] [--max-diff 2] [--keep DIR]
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

PROMPT = "a photo of sks dog"

# The moonlit side: adapters with random B, the file, images with and without them.
MOONLIT_SIDE = r"""
local ml = require "moonlit"
local lora = ml.nn.lora
local model, out, alpha, steps = arg[1], arg[2], tonumber(arg[3]), math.tointeger(tonumber(arg[4]))
local prompt = arg[5]
local m = ml.sd.load(model, {device = "cpu"})
ml.manual_seed(1234)
lora.inject(m.unet, {rank = 4, alpha = alpha})
lora.inject(m.text_encoder, {rank = 4, alpha = alpha})
for _, mod in ipairs {m.unet, m.text_encoder} do
    for _, l in ipairs(lora.layers(mod)) do ml.nn.init.normal_(l[2].lora_B.weight, 0, 0.3) end
end
local file = lora.save_weights(out, {unet = m.unet, text_encoder = m.text_encoder})
local vae_scale = 2 ^ (#m.vae.config.block_out_channels - 1) // 1
local s = m.unet.config.sample_size
local latents = ml.randn({1, s, s, 4})
local function draw()
    return ml.no_grad(ml.sd.generate, m, {prompt = prompt, latents = latents, num_inference_steps = steps,
                                          guidance_scale = 7.5, height = s * vae_scale, width = s * vae_scale})
end
local with = draw()
lora.remove(m.unet); lora.remove(m.text_encoder)
local without = draw()
ml.core.st_save(out .. "/moonlit_images.safetensors",
                {with_lora = with, without_lora = without, latents = latents:permute(1, 4, 2, 3):contiguous()})
print("moonlit: wrote " .. file)
"""


def pixels(x):
    return (np.clip(x, 0, 1) * 255).round().astype(np.int32)


def diff(a, b):
    d = np.abs(pixels(a) - pixels(b))
    return int(d.max()), float(d.mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--moonlit", default="build/moonlit", help="the moonlit binary")
    ap.add_argument("--model", default="tests/fixtures/sd1-tiny/pipeline", help="diffusers model folder")
    ap.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha (rank is 4; alpha != rank tests the metadata)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--max-diff", type=int, default=2, help="largest pixel difference accepted")
    ap.add_argument("--keep", help="write the LoRA folder here instead of a temporary one")
    args = ap.parse_args()

    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or os.path.join(tmp, "lora")
        os.makedirs(out, exist_ok=True)
        script = os.path.join(tmp, "moonlit_side.lua")
        with open(script, "w") as f:
            f.write(MOONLIT_SIDE)
        subprocess.run([args.moonlit, script, args.model, out, str(args.alpha), str(args.steps), PROMPT], check=True)
        ref = load_file(os.path.join(out, "moonlit_images.safetensors"))
        latents = ref["latents"].float()
        with_lora, without_lora = ref["with_lora"].numpy()[0], ref["without_lora"].numpy()[0]

        pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        size = latents.shape[-1] * 2 ** (len(pipe.vae.config.block_out_channels) - 1)

        def draw():
            with torch.no_grad():
                return pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5, height=size, width=size,
                            latents=latents.clone(), output_type="np").images[0]

        base = draw()
        pipe.load_lora_weights(out)
        # every adapter in the file must have found its layer (a key diffusers
        # does not match is only a warning there)
        in_file = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
        loaded = {}
        for part in ("unet", "text_encoder"):
            want = sum(1 for k in in_file if k.startswith(part + ".") and ".lora_A." in k)
            got = sum(1 for n, mod in getattr(pipe, part).named_modules() if hasattr(mod, "lora_A") and mod.lora_A)
            loaded[part] = (got, want)
        unfused = draw()
        pipe.fuse_lora()
        fused = draw()

    worst = 0
    print("LoRA rank 4, alpha %g, %d steps, %dx%d, %s" % (args.alpha, args.steps, size, size, args.model))
    for name, a, b in [("diffusers without LoRA vs moonlit without", base, without_lora),
                       ("diffusers load_lora_weights vs moonlit", unfused, with_lora),
                       ("diffusers fuse_lora vs moonlit", fused, with_lora)]:
        mx, mean = diff(a, b)
        worst = max(worst, mx)
        print("  %-44s max %3d  mean %.4f" % (name, mx, mean))
    for part, (got, want) in loaded.items():
        print("  %-44s %d of %d" % ("diffusers layers with an adapter, " + part, got, want))
        if got != want:
            worst = max(worst, 255)
    mx, mean = diff(with_lora, without_lora)
    print("  %-44s max %3d  mean %.4f  (how far the adapters move the image)" % ("moonlit with vs without LoRA", mx, mean))
    if mx <= args.max_diff:
        print("check_lora_with_diffusers: the adapters barely change the image; the check proves nothing")
        sys.exit(1)
    if worst > args.max_diff:
        print("check_lora_with_diffusers: FAILED (max difference %d > %d)" % (worst, args.max_diff))
        sys.exit(1)
    print("check_lora_with_diffusers: ok")


if __name__ == "__main__":
    main()
