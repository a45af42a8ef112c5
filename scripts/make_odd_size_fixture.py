#!/usr/bin/env python3
"""make_odd_size_fixture.py — diffusers references at sizes that do not divide
by the UNet's overall downsampling factor.

The tiny fixture's UNet downsamples three times (factor 8), so a 5x7 latent
(a 40x56 image) makes skips of 5x7, 3x4, 2x2 and 1x1, and diffusers then
upsamples to each skip's size rather than doubling (its `upsample_size`).
This records, from the committed fixture pipeline, on CPU in float32:

  unet.sample [2,4,5,7]  unet.timesteps [2]  unet.encoder_hidden_states
  unet.out              the UNet's output at 5x7
  unet_b.sample [1,4,3,6] unet_b.timesteps unet_b.encoder_hidden_states unet_b.out
                        another shape (3x6: one side odd, one even)
  pipeline.latents [1,4,5,7]  pipeline.image [1,40,56,3]
                        the whole text-to-image pipeline at 40x56 with fixed
                        latents (prompt and settings below)

Tensors are NCHW, as diffusers keeps them; images NHWC in [0, 1].

Usage: make_odd_size_fixture.py [--fixture DIR] [--out FILE]
  --fixture DIR  the sd1-tiny fixture (default: tests/fixtures/sd1-tiny)
  --out FILE     default: DIR/odd_size.safetensors

Needs: torch, diffusers, transformers, safetensors (pip).
"""
import argparse
import os

import numpy as np
import torch
from safetensors.torch import save_file

from diffusers import StableDiffusionPipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a dog"
STEPS = 3
GUIDANCE = 7.5


def randn(rng, *shape):
    # numpy's generator is stable across torch versions, unlike torch.randn
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixture", default=os.path.join(REPO, "tests", "fixtures", "sd1-tiny"))
    ap.add_argument("--out")
    args = ap.parse_args()
    out = args.out or os.path.join(args.fixture, "odd_size.safetensors")
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(args.fixture, "pipeline"),
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet.eval()
    c, d = unet.config.in_channels, unet.config.cross_attention_dim
    rng = np.random.default_rng(1234)
    rec = {}
    for name, (n, h, w), ts in (("unet", (2, 5, 7), [10, 999]), ("unet_b", (1, 3, 6), [500])):
        sample = randn(rng, n, c, h, w)
        ehs = randn(rng, n, 77, d)
        t = torch.tensor(ts, dtype=torch.int64)
        rec[name + ".sample"] = sample
        rec[name + ".timesteps"] = t.to(torch.int32)
        rec[name + ".encoder_hidden_states"] = ehs
        rec[name + ".out"] = unet(sample, t, ehs).sample
    latents = randn(rng, 1, c, 5, 7)
    image = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=40, width=56,
                 latents=latents.clone(), output_type="np").images
    rec["pipeline.latents"] = latents
    rec["pipeline.image"] = torch.from_numpy(np.ascontiguousarray(image)).float()
    tmp = out + ".tmp"
    save_file({k: v.contiguous() for k, v in rec.items()}, tmp,
              metadata={"prompt": PROMPT, "steps": str(STEPS), "guidance_scale": str(GUIDANCE),
                        "scheduler": pipe.scheduler.__class__.__name__})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    print("wrote", out, os.path.getsize(out), "bytes")


if __name__ == "__main__":
    main()
