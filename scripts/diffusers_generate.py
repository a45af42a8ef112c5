#!/usr/bin/env python3
"""diffusers_generate.py — generate an image from a diffusers folder with diffusers.

The outside check that a model folder moonlit wrote is a valid diffusers
folder: diffusers itself loads it (StableDiffusionPipeline.from_pretrained)
and renders a prompt on CPU in float32.  With the same starting latents as a
moonlit run (--latents), the two PNGs should agree to a pixel level or two;
--compare prints the difference.

Usage:
  diffusers_generate.py MODEL_DIR --prompt TEXT --out image.png
        [--negative-prompt TEXT] [--steps N] [--guidance G] [--seed N]
        [--size PIXELS] [--scheduler pndm|ddim|euler|dpmpp2m]
        [--latents FILE.safetensors] [--save-array FILE.safetensors]
        [--compare OTHER.png] [--max-diff N]

  --latents     start from the tensor "latents" [1,4,h,w] in FILE (the one
                tensor there if it has another name) instead of seeded noise
  --scheduler   sample with that scheduler, built from the folder's scheduler
                config (default: the folder's own scheduler)
  --save-array  also write the float image [1,H,W,3] in [0,1] as "image"
  --compare     print the max and mean absolute difference, in 0..255 pixel
                levels, between the generated image and OTHER.png
  --max-diff    with --compare, exit 1 when the max difference exceeds N
"""
import argparse
import os
import sys

import numpy as np

# Quiet the import-time notices about optional image backends this never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch  # noqa: E402
from PIL import Image
from safetensors.torch import load_file, save_file

import diffusers
import transformers
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       PNDMScheduler, StableDiffusionPipeline)

SCHEDULERS = {"pndm": PNDMScheduler, "ddim": DDIMScheduler,
              "euler": EulerDiscreteScheduler, "dpmpp2m": DPMSolverMultistepScheduler}


def die(msg):
    sys.exit("diffusers_generate: " + msg)


def load_latents(path):
    tensors = load_file(path)
    if "latents" in tensors:
        return tensors["latents"].float()
    if len(tensors) == 1:
        return next(iter(tensors.values())).float()
    die("%s has no tensor named 'latents' (it has %s)" % (path, ", ".join(sorted(tensors))))


def to_pixels(image):
    # The rounding diffusers' numpy_to_pil uses, so PNGs match its own.
    return (image * 255).round().astype(np.uint8)


def compare(pixels, other_path):
    other = np.asarray(Image.open(other_path).convert("RGB"))
    if other.shape != pixels.shape:
        die("%s is %s, the generated image is %s" % (other_path, list(other.shape), list(pixels.shape)))
    d = np.abs(pixels.astype(np.int32) - other.astype(np.int32))
    return int(d.max()), float(d.mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("model_dir")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default="")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, help="image height and width (default: the model's)")
    ap.add_argument("--scheduler", choices=sorted(SCHEDULERS))
    ap.add_argument("--latents")
    ap.add_argument("--out", required=True)
    ap.add_argument("--save-array")
    ap.add_argument("--compare")
    ap.add_argument("--max-diff", type=int)
    args = ap.parse_args()

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()

    pipe = StableDiffusionPipeline.from_pretrained(args.model_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler:
        pipe.scheduler = SCHEDULERS[args.scheduler].from_config(pipe.scheduler.config)

    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latents = load_latents(args.latents) if args.latents else None
    if args.size:
        size = args.size
    elif latents is not None:
        size = latents.shape[-1] * vae_scale
    else:
        size = pipe.unet.config.sample_size * vae_scale
    if latents is not None and latents.shape[-2:] != (size // vae_scale, size // vae_scale):
        die("latents %s do not fit a %dx%d image" % (list(latents.shape), size, size))

    with torch.no_grad():
        image = pipe(args.prompt, negative_prompt=args.negative_prompt,
                     num_inference_steps=args.steps, guidance_scale=args.guidance,
                     height=size, width=size, latents=latents,
                     generator=torch.Generator().manual_seed(args.seed),
                     output_type="np").images
    pixels = to_pixels(image[0])
    Image.fromarray(pixels).save(args.out)
    if args.save_array:
        save_file({"image": torch.from_numpy(np.ascontiguousarray(image)).float()}, args.save_array)
    print("diffusers_generate: wrote %s (%dx%d, %s, %d steps)"
          % (args.out, size, size, type(pipe.scheduler).__name__, args.steps))

    if args.compare:
        mx, mean = compare(pixels, args.compare)
        print("max abs pixel diff %d  mean %.4f  (vs %s)" % (mx, mean, args.compare))
        if args.max_diff is not None and mx > args.max_diff:
            sys.exit(1)


if __name__ == "__main__":
    main()
