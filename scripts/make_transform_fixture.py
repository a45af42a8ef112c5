"""Make tests/fixtures/transforms/: the reference outputs of torchvision's
image transforms that ml.data.ImageTransform reproduces.

Needs numpy, Pillow, torch, torchvision and safetensors.  The outputs are
committed; run again only to change them:
    python3 scripts/make_transform_fixture.py [--out tests/fixtures/transforms]

Writes
  a_37x50.png, b_64x33.png   inputs (width x height), smooth patterns plus noise
  cmyk.jpg                   an Adobe CMYK JPEG (as Photoshop writes them)
  refs.safetensors           one [H, W, 3] f32 tensor per case (NHWC, as
                             moonlit returns them), and cmyk_rgb_by_pil, the
                             [H, W, 3] u8 RGB Pillow makes of cmyk.jpg
  cases.json                 what each case of refs.safetensors applies
Each case is ToTensor(), then Resize(resize, BILINEAR, antialias=True) of
the shorter side, then the optional CenterCrop(size), then the optional
Normalize([0.5], [0.5]) — on the float tensor, as the reference DreamBooth
recipe's Compose does after ToTensor.
"""
import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms as T

CASES = [
    # name, input, resize, center crop size (0 = none), normalize
    ("a_down20", "a_37x50.png", 20, 0, False),
    ("a_up64", "a_37x50.png", 64, 0, False),
    ("a_down24_crop24_norm", "a_37x50.png", 24, 24, True),
    ("b_down24_crop24", "b_64x33.png", 24, 24, False),
    ("b_up48_crop40", "b_64x33.png", 48, 40, False),
    ("b_same33", "b_64x33.png", 33, 0, False),
]


def pattern(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127.5 + 127.5 * np.sin(x / 3.0 + y / 7.0)
    g = 255.0 * x / max(w - 1, 1)
    b = 255.0 * ((x + 2 * y) % 11) / 10.0
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (h, w, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "transforms"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    Image.fromarray(pattern(37, 50, 1)).save(os.path.join(args.out, "a_37x50.png"))
    Image.fromarray(pattern(64, 33, 2)).save(os.path.join(args.out, "b_64x33.png"))

    refs, meta = {}, {}
    for name, src, resize, crop, norm in CASES:
        steps = [T.ToTensor(), T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True)]
        if crop:
            steps.append(T.CenterCrop(crop))
        if norm:
            steps.append(T.Normalize([0.5], [0.5]))
        with Image.open(os.path.join(args.out, src)) as im:
            out = T.Compose(steps)(im.convert("RGB"))
        refs[name] = out.permute(1, 2, 0).contiguous().to(torch.float32)
        meta[name] = {"input": src, "resize": resize, "crop": crop, "normalize": norm}

    # Photoshop-style CMYK JPEG: Pillow writes the Adobe marker and inverted
    # CMYK, which decoders turn back into RGB as (255 - C) * (255 - K) / 255.
    rgb = pattern(24, 16, 3)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    path = os.path.join(args.out, "cmyk.jpg")
    cmyk.save(path, quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK", im.mode
        refs["cmyk_rgb_by_pil"] = torch.from_numpy(np.asarray(im.convert("RGB")).copy())

    save_file(refs, os.path.join(args.out, "refs.safetensors"))
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
