#!/usr/bin/env python3
"""make_single_file_fixture.py — the fixtures of tests/lua/test_single_file.lua.

Writes into tests/fixtures/single_file/:
  pipeline/          a tiny SD 1.x-shaped diffusers folder (random weights,
                     no tokenizer), the reference the single files must equal
  tiny.ckpt          the same weights in the original (CompVis/LDM) layout,
                     written by torch.save (zip format): UNet in f16, the rest
                     in f32, EMA copies of the UNet (model_ema.*, other
                     values), global_step, inside {"state_dict": ...}
  tiny.safetensors   the non-EMA weights of tiny.ckpt, LDM layout, all f16
  malicious.ckpt     a torch.save zip whose pickle calls os.system through
                     __reduce__ (creating a marker file); a reader that runs
                     it leaves the marker behind

The LDM names are written by this script's own mapping (diffusers ships no
LDM writer); diffusers' from_single_file then reads tiny.safetensors and
tiny.ckpt back and must give the folder's weights, which checks the mapping
independently of moonlit's.  All weights are rounded to f16 first so the
f16 and f32 copies hold the same values.  Run from the repository root.
"""
import collections
import os
import re
import sys

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, StableDiffusionPipeline, PNDMScheduler
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

OUT = "tests/fixtures/single_file"


def tiny_models():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(4, 8, 8), norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8), layers_per_block=1,
        norm_num_groups=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=8, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    with torch.no_grad():
        for m in (unet, vae, text):
            for p in m.parameters():
                p.normal_(0, 0.2)
                p.copy_(p.half().float())
    return unet, vae, text


# ---- diffusers -> LDM names (this script's own table) --------------------------

RESNET_UNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
RESNET_VAE = [("conv_shortcut", "nin_shortcut")]
ATTN_VAE = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def sub_pairs(rest, pairs):
    for a, b in pairs:
        if rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def unet_to_ldm(sd, n_levels, lpb):
    out = {}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for k, v in sd.items():
        head, _, leaf = k.rpartition(".")
        m = None
        if head in fixed:
            name = fixed[head] + "." + leaf
        elif (m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = 1 + i * (lpb + 1) + j
            name = f"input_blocks.{idx}.0." + sub_pairs(rest, RESNET_UNET) if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
        elif (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)):
            name = f"input_blocks.{1 + int(m[1]) * (lpb + 1) + lpb}.0.op.{m[2]}"
        elif (m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", k)):
            name = f"middle_block.{2 * int(m[1])}." + sub_pairs(m[2], RESNET_UNET)
        elif (m := re.match(r"mid_block\.attentions\.0\.(.*)", k)):
            name = "middle_block.1." + m[1]
        elif (m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = i * (lpb + 1) + j
            name = f"output_blocks.{idx}.0." + sub_pairs(rest, RESNET_UNET) if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        elif (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k)):
            i = int(m[1])
            idx = i * (lpb + 1) + lpb
            has_attn = any(x.startswith(f"up_blocks.{i}.attentions.") for x in sd)
            name = f"output_blocks.{idx}.{2 if has_attn else 1}.conv.{m[2]}"
        else:
            raise SystemExit(f"unmapped UNet key {k}")
        out["model.diffusion_model." + name] = v
    return out


def vae_to_ldm(sd, n_levels):
    out = {}
    for k, v in sd.items():
        name = k
        if (m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", k)):
            name = f"{m[1]}.norm_out.{m[2]}"
        elif (m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)):
            name = f"encoder.down.{m[1]}.block.{m[2]}." + sub_pairs(m[3], RESNET_VAE)
        elif (m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)):
            name = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif (m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)):
            name = f"decoder.up.{n_levels - 1 - int(m[1])}.block.{m[2]}." + sub_pairs(m[3], RESNET_VAE)
        elif (m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k)):
            name = f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif (m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", k)):
            name = f"{m[1]}.mid.block_{int(m[2]) + 1}." + sub_pairs(m[3], RESNET_VAE)
        elif (m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", k)):
            name = f"{m[1]}.mid.attn_1." + sub_pairs(m[2], ATTN_VAE)
            if v.dim() == 2:  # LDM's attention projections are 1x1 convolutions
                v = v[:, :, None, None]
        out["first_stage_model." + name] = v
    return out


def main():
    unet, vae, text = tiny_models()
    os.makedirs(OUT, exist_ok=True)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(f"{OUT}/pipeline")

    ldm = {}
    ldm.update(unet_to_ldm(unet.state_dict(), 3, 1))
    ldm.update(vae_to_ldm(vae.state_dict(), 2))
    for k, v in text.state_dict().items():
        if not k.endswith("position_ids"):
            # transformers 5 drops the "text_model." its older releases (and the web UIs) use.
            ldm["cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k] = v
    ldm = {k: v.contiguous() for k, v in ldm.items()}
    save_file({k: v.half() for k, v in ldm.items()}, f"{OUT}/tiny.safetensors")

    state = collections.OrderedDict()
    g = torch.Generator().manual_seed(1)
    for k, v in ldm.items():
        state[k] = v.half() if k.startswith("model.diffusion_model.") else v
    for k, v in ldm.items():
        if k.startswith("model.diffusion_model."):
            # LDM's EMA names: the key after "model." with its dots removed.
            state["model_ema." + k[len("model."):].replace(".", "")] = torch.randn(v.shape, generator=g).half()
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 3}, f"{OUT}/tiny.ckpt")

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch single_file_payload_ran",))

    torch.save({"state_dict": {"x": torch.zeros(2)}, "payload": Payload()}, f"{OUT}/malicious.ckpt")

    # diffusers reads both files back as the folder's weights.
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained("tests/fixtures/sd1-tiny/pipeline/tokenizer")
    for f in ("tiny.safetensors", "tiny.ckpt"):
        p = StableDiffusionPipeline.from_single_file(f"{OUT}/{f}", config=f"{OUT}/pipeline", tokenizer=tok,
                                                     safety_checker=None, local_files_only=True)
        for name, ref in (("unet", unet), ("vae", vae), ("text_encoder", text)):
            got = getattr(p, name).state_dict()
            for k, v in ref.state_dict().items():
                if k.endswith("position_ids"):
                    continue
                if not torch.equal(got[k].float(), v.float()):
                    raise SystemExit(f"{f}: diffusers reads {name}.{k} differently")
        print(f"{f}: diffusers from_single_file gives the folder's weights")
    for root, _, files in os.walk(OUT):
        for f in files:
            print(os.path.join(root, f), os.path.getsize(os.path.join(root, f)))


if __name__ == "__main__":
    sys.exit(main())
