#!/usr/bin/env python3
"""make_fixture.py — build Stable Diffusion reference fixtures with diffusers.

Makes a toy-size Stable Diffusion model with random weights (every parameter
perturbed after init, so each one matters) and records what diffusers,
transformers and PyTorch compute from it, on CPU in float32, in the layout
docs/fixtures.md describes:

  pipeline/                 diffusers folder (StableDiffusionPipeline.save_pretrained)
  tokenizer.json            prompts -> ids / padded_ids
  text_encoder.safetensors  unet.safetensors  vae.safetensors
  schedulers.safetensors    pipeline_out.safetensors  train_step.safetensors
  meta.json                 the config, parameter counts, loss, grad_norm

Usage:
  make_fixture.py --out DIR --preset sd1-tiny|sd2-tiny [--seed N]
  make_fixture.py --out DIR --config-from META.json [--seed N]
  make_fixture.py --out DIR --weights-from FIXTURE/pipeline --inputs-from FIXTURE
                  --config-from FIXTURE/meta.json --compare-to FIXTURE
      recompute an existing fixture from its own weights and inputs, and
      print how far each stored tensor is from the one recomputed.

Options:
  --tokenizer-dir DIR  where CLIP's vocab.json + merges.txt are (default:
                       tests/fixtures/sd1-tiny/pipeline/tokenizer, filled by
                       scripts/fetch_clip_vocab.sh)
  --strip-vocab        remove vocab.json, merges.txt and tokenizer.json from
                       pipeline/tokenizer at the end (they are not committed)
  --compare-to DIR     print per file the largest relative L2 distance to the
                       same tensor in DIR; exit 1 past --tolerance (1e-5)

Needs: torch, diffusers, transformers, safetensors (pip).  Run from anywhere;
relative paths are taken from the current directory.
"""
import argparse
import copy
import json
import os
import shutil
import sys
import zlib

import numpy as np

# Quiet the import-time notices about optional image backends this never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch  # noqa: E402
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import diffusers
import transformers
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler,
                       DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       PNDMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VOCAB_DIR = os.path.join(REPO, "tests", "fixtures", "sd1-tiny", "pipeline", "tokenizer")
VOCAB_FILES = ("vocab.json", "merges.txt", "tokenizer.json")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TE_PREFIX = "text_model."

# Prompts for tokenizer.json: plain, mixed case, contractions, accents, CJK
# and emoji, digits, punctuation, whitespace, empty, longer than 77 tokens,
# literal special tokens, case folding outside ASCII.
PROMPTS = [
    "photo of a unqtkn dog",
    "photo of a dog",
    "a photo of sks dog in a bucket",
    "A Photo Of A UNQTKN Dog Sleeping, 4k, highly-detailed!!!",
    "photo of a unqtkn dog in a doghouse",
    "  leading and   trailing   spaces  ",
    "it's the dog's bowl; they're here, we've won, I'm ok, you'll see, he'd go",
    "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e na\u00efve fa\u00e7ade \u00c5ngstr\u00f6m",
    "\u6771\u4eac\u306e\u72ac \U0001f436\U0001f415 emoji test \u2728",
    "numbers 12345 3.14159 and 2nd 1st",
    "punctuation: (a), [b], {c}, <d>, #tag @user $5 %50 ^_^ a-b_c~d",
    "newline\nand\ttab",
    "",
    "a very long prompt" + " with many repeated words" * 20,
    "<|startoftext|> literal special tokens <|endoftext|>",
    "\u00c0\u00c9\u00ce\u00d5\u00dc \u00df \u01c5 \u0130stanbul \u03a3\u0391\u03a3",
]

SCHEDULER_DEFAULTS = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1,
}
TRAIN_DEFAULTS = {
    "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-2,
    "max_grad_norm": 1.0, "prior_loss_weight": 1.0, "vae_scaling": 0.18215,
}
TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [16, 32, 32, 32], "layers_per_block": 2, "norm_num_groups": 8,
    "sample_size": 64,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
SD_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3

PRESETS = {
    # SD 1.4 at toy size: the config of the fixture this project was given.
    "sd1-tiny": {
        "image_size": 64,
        "prediction_type": "epsilon",
        "unet": {
            "sample_size": 8, "in_channels": 4, "out_channels": 4,
            "block_out_channels": [16, 32, 32, 32], "layers_per_block": 2,
            "norm_num_groups": 8, "cross_attention_dim": 32, "attention_head_dim": 2,
            "down_block_types": SD_DOWN, "up_block_types": SD_UP,
        },
        "vae": TINY_VAE,
        "text": {
            "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 32,
            "pad_token_id": 49407, "bos_token_id": 49406, "eos_token_id": 49407,
        },
        "scheduler": dict(SCHEDULER_DEFAULTS, prediction_type="epsilon"),
        "train": TRAIN_DEFAULTS,
        "pipeline_call": {
            "prompt": "photo of a unqtkn dog", "negative_prompt": "",
            "num_inference_steps": 5, "guidance_scale": 7.5, "scheduler": "pndm",
        },
    },
    # SD 2.x at toy size: linear proj_in/proj_out, a head count per block,
    # upcast attention, GELU text encoder, v-prediction, DDIM as SD 2.1 ships
    # it, and SD 2's tokenizer that pads with "!" (id 0) and whose text config
    # carries OpenCLIP's bos/eos/pad ids.  The text width (= cross-attention
    # width, 24) differs from every UNet width so a mixed-up dimension fails;
    # widths and group counts differ from sd1-tiny so nothing hard-coded
    # passes both.  The text width stays small: the 49408-row token embedding
    # dominates the fixture's size.
    "sd2-tiny": {
        "image_size": 64,
        "prediction_type": "v_prediction",
        "unet": {
            "sample_size": 8, "in_channels": 4, "out_channels": 4,
            "block_out_channels": [8, 16, 32, 32], "layers_per_block": 2,
            "norm_num_groups": 4, "cross_attention_dim": 24,
            "attention_head_dim": [2, 4, 8, 8], "use_linear_projection": True,
            "upcast_attention": True,
            "down_block_types": SD_DOWN, "up_block_types": SD_UP,
        },
        "vae": dict(TINY_VAE, block_out_channels=[8, 16, 16, 16], norm_num_groups=4),
        "text": {
            "vocab_size": 49408, "hidden_size": 24, "intermediate_size": 96,
            "num_hidden_layers": 3, "num_attention_heads": 3, "max_position_embeddings": 77,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 24,
            "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        },
        "tokenizer": {"pad_token": "!"},
        "scheduler": dict(SCHEDULER_DEFAULTS, prediction_type="v_prediction"),
        "train": TRAIN_DEFAULTS,
        "pipeline_call": {
            "prompt": "photo of a unqtkn dog", "negative_prompt": "",
            "num_inference_steps": 5, "guidance_scale": 7.5, "scheduler": "ddim",
        },
    },
}

SCHEDULERS = {"pndm": PNDMScheduler, "ddim": DDIMScheduler,
              "euler": EulerDiscreteScheduler, "dpmpp2m": DPMSolverMultistepScheduler}
SCHEDULER_STEPS = 10
INSTANCE_PROMPT = "photo of a unqtkn dog"
CLASS_PROMPT = "photo of a dog"


def die(msg):
    sys.exit("make_fixture: " + msg)


def make_scheduler(name, cfg):
    # DDIM's own default clips x0 to [-1, 1]; Stable Diffusion's folders turn
    # that off, so the fixture does too unless the config says otherwise.
    extra = {"clip_sample": False} if name == "ddim" else {}
    return SCHEDULERS[name].from_config(dict(extra, **cfg))


class Rng:
    """Independent, reproducible random streams, one per named input, so that
    adding or changing one input leaves every other input as it was."""

    def __init__(self, seed):
        self.seed = seed

    def gen(self, tag):
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(tag.encode()))

    def randn(self, tag, *shape):
        return torch.randn(*shape, generator=self.gen(tag))

    def uniform(self, tag, *shape):
        return torch.rand(*shape, generator=self.gen(tag)) * 2 - 1


class Inputs:
    """Inputs of each record: freshly drawn, or read back from an existing
    fixture (--inputs-from), so its outputs can be recomputed and compared."""

    def __init__(self, rng, from_dir):
        self.rng, self.from_dir, self.files = rng, from_dir, {}

    def get(self, fname, key, make):
        if self.from_dir is None:
            return make()
        if fname not in self.files:
            self.files[fname] = load_file(os.path.join(self.from_dir, fname))
        if key not in self.files[fname]:
            die("%s/%s has no tensor %r" % (self.from_dir, fname, key))
        return self.files[fname][key]


def rel_l2(a, b):
    a, b = a.double(), b.double()
    nb = b.norm().item()
    return (a - b).norm().item() / nb if nb > 0 else (a - b).norm().item()


# ---------------------------------------------------------------- models

def build_models(cfg, seed, weights_from):
    """UNet, VAE and text encoder: loaded from a pipeline folder, or built from
    the config with random weights that are then perturbed (norm scales start
    at 1 and biases at 0; without the perturbation a wrong use of them could
    go unnoticed)."""
    if weights_from:
        unet = UNet2DConditionModel.from_pretrained(os.path.join(weights_from, "unet"))
        vae = AutoencoderKL.from_pretrained(os.path.join(weights_from, "vae"))
        te = CLIPTextModel.from_pretrained(os.path.join(weights_from, "text_encoder"))
        return unet, vae, te
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**dict(cfg["vae"], scaling_factor=cfg["train"]["vae_scaling"]))
    te = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    rng = Rng(seed)
    for mname, model in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(0.02 * rng.randn("perturb." + mname + "." + name, *p.shape))
    return unet, vae, te


def vocab_dir_for(args):
    candidates = [args.tokenizer_dir] if args.tokenizer_dir else []
    if args.weights_from:
        candidates.append(os.path.join(args.weights_from, "tokenizer"))
    candidates.append(DEFAULT_VOCAB_DIR)
    for d in candidates:
        if all(os.path.isfile(os.path.join(d, f)) for f in ("vocab.json", "merges.txt")):
            return d
    die("no vocab.json + merges.txt in %s (run scripts/fetch_clip_vocab.sh or pass "
        "--tokenizer-dir)" % ", ".join(candidates))


def build_tokenizer(cfg, vocab_dir, max_len, weights_from):
    pad = cfg.get("tokenizer", {}).get("pad_token", EOS)
    if weights_from:
        # SD 2.x pads with "!", SD 1.x with <|endoftext|>: take the folder's word.
        with open(os.path.join(weights_from, "tokenizer", "tokenizer_config.json")) as f:
            pad = json.load(f).get("pad_token", pad)
    return CLIPTokenizer(vocab=os.path.join(vocab_dir, "vocab.json"),
                         merges=os.path.join(vocab_dir, "merges.txt"),
                         unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=pad,
                         model_max_length=max_len)


def save_pipeline(out, unet, vae, te, tok, sched, vocab_dir):
    # tokenizer.json as SD repos carry it: fixed 77-token padding with the
    # pad token, truncation at 77.
    n = tok.model_max_length
    tok.backend_tokenizer.enable_truncation(max_length=n)
    tok.backend_tokenizer.enable_padding(length=n, pad_id=tok.pad_token_id, pad_token=tok.pad_token)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pdir = os.path.join(out, "pipeline")
    if os.path.isdir(pdir):
        shutil.rmtree(pdir)
    pipe.save_pretrained(pdir, safe_serialization=True)

    # Real SD 1.x/2.x text encoder files carry the `text_model.` prefix that
    # transformers 5 no longer writes; readers must accept that layout.
    te_file = os.path.join(pdir, "text_encoder", "model.safetensors")
    sd = load_file(te_file)
    sd = {(k if k.startswith(TE_PREFIX) else TE_PREFIX + k): v.contiguous() for k, v in sd.items()}
    save_file(sd, te_file, metadata={"format": "pt"})
    for root, _, files in os.walk(pdir):
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)

    # The tokenizer folder as SD repos ship it: vocab.json + merges.txt (what
    # older loaders read), special_tokens_map.json, and a slow-tokenizer style
    # config next to the tokenizer.json that transformers writes.
    tdir = os.path.join(pdir, "tokenizer")
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(vocab_dir, f), os.path.join(tdir, f))
    tc_path = os.path.join(tdir, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc.update({"add_prefix_space": False, "do_lower_case": True, "errors": "replace"})
    write_json(tc_path, dict(sorted(tc.items())), indent=2, newline=True)
    write_json(os.path.join(tdir, "special_tokens_map.json"),
               {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token}, indent=1)
    return pdir


def write_json(path, obj, indent, newline=False):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        if newline:
            f.write("\n")


def i32(t):
    return t.to(torch.int32).contiguous()


def save(out, fname, tensors):
    path = os.path.join(out, fname)
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, path)
    os.chmod(path, 0o644)


# ---------------------------------------------------------------- records

def record_tokenizer(out, tok, pdir, inputs):
    prompts = PROMPTS
    if inputs.from_dir:
        with open(os.path.join(inputs.from_dir, "tokenizer.json"), encoding="utf-8") as f:
            prompts = json.load(f)["prompts"]
    n = tok.model_max_length
    # The same vocabulary loaded the way a pipeline loads it (tokenizer.json
    # from the saved folder) must give the same ids.
    tok2 = CLIPTokenizer.from_pretrained(os.path.join(pdir, "tokenizer"))
    rec = {
        "prompts": prompts,
        "class": type(tok).__name__,
        "padded_ids": [tok(p, padding="max_length", max_length=n, truncation=True).input_ids
                       for p in prompts],
        "ids": [tok(p).input_ids for p in prompts],
        "class_2": type(tok2).__name__,
        "ids_2": [tok2(p).input_ids for p in prompts],
    }
    if rec["ids"] != rec["ids_2"]:
        die("the tokenizer built from vocab.json/merges.txt and the one saved disagree")
    write_json(os.path.join(out, "tokenizer.json"), rec, indent=0)


def padded(tok, prompts):
    return i32(tok(prompts, padding="max_length", max_length=tok.model_max_length,
                   truncation=True, return_tensors="pt").input_ids)


@torch.no_grad()
def record_text_encoder(out, te, tok, inputs):
    ids = inputs.get("text_encoder.safetensors", "input_ids",
                     lambda: padded(tok, [INSTANCE_PROMPT, CLASS_PROMPT]))
    hs = te(ids.long()).last_hidden_state
    save(out, "text_encoder.safetensors", {"input_ids": i32(ids), "last_hidden_state": hs})
    return hs


@torch.no_grad()
def record_unet(out, unet, cfg, inputs):
    f, r = "unet.safetensors", inputs.rng
    s = cfg["unet"]["sample_size"]
    c = cfg["unet"].get("in_channels", 4)
    sample = inputs.get(f, "sample", lambda: r.randn("unet.sample", 2, c, s, s))
    t = inputs.get(f, "timesteps", lambda: torch.tensor([10, 999], dtype=torch.int32))
    ehs = inputs.get(f, "encoder_hidden_states",
                     lambda: r.randn("unet.ehs", 2, cfg["text"]["max_position_embeddings"],
                                     cfg["unet"]["cross_attention_dim"]))
    o = unet(sample, t.long(), ehs).sample
    save(out, f, {"sample": sample, "timesteps": i32(t), "encoder_hidden_states": ehs, "out": o})
    return o


@torch.no_grad()
def record_vae(out, vae, cfg, inputs):
    f, r = "vae.safetensors", inputs.rng
    n = cfg["image_size"]
    lat = n // 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    image = inputs.get(f, "image", lambda: r.uniform("vae.image", 1, 3, n, n))
    latents = inputs.get(f, "latents",
                         lambda: r.randn("vae.latents", 1, cfg["vae"]["latent_channels"], lat, lat))
    dist = vae.encode(image).latent_dist
    decoded = vae.decode(latents).sample
    save(out, f, {"image": image, "mean": dist.mean, "logvar": dist.logvar,
                  "latents": latents, "decoded": decoded})


@torch.no_grad()
def record_schedulers(out, cfg, inputs):
    f, r = "schedulers.safetensors", inputs.rng
    scfg = cfg["scheduler"]
    s = cfg["unet"]["sample_size"]
    c = cfg["unet"].get("in_channels", 4)
    ddpm = DDPMScheduler.from_config(scfg)
    rec = {"alphas_cumprod": ddpm.alphas_cumprod.float()}
    lat = inputs.get(f, "add_noise.latents", lambda: r.randn("add_noise.latents", 4, c, s, s))
    noise = inputs.get(f, "add_noise.noise", lambda: r.randn("add_noise.noise", 4, c, s, s))
    ts = inputs.get(f, "add_noise.timesteps", lambda: torch.tensor([0, 1, 500, 999], dtype=torch.int32))
    rec.update({"add_noise.latents": lat, "add_noise.noise": noise, "add_noise.timesteps": i32(ts),
                "add_noise.out": ddpm.add_noise(lat, noise, ts.long()),
                "velocity.out": ddpm.get_velocity(lat, noise, ts.long())})
    # Each sampler from the training config with its own default timestep
    # spacing, stepped on stored random model outputs (no network involved).
    for name in SCHEDULERS:
        sch = make_scheduler(name, scfg)
        sch.set_timesteps(SCHEDULER_STEPS)
        sigma = torch.tensor([float(sch.init_noise_sigma)])
        x = inputs.get(f, name + ".init", lambda: r.randn(name + ".init", 1, c, s, s) * sigma)
        rec[name + ".timesteps"] = sch.timesteps.round().to(torch.int64)
        rec[name + ".init"] = x
        rec[name + ".init_noise_sigma"] = sigma
        for i, t in enumerate(sch.timesteps):
            k = "%s.%d." % (name, i)
            mo = inputs.get(f, k + "model_output", lambda: r.randn(k + "model_output", 1, c, s, s))
            rec[k + "scaled_input"] = sch.scale_model_input(x, t)
            rec[k + "model_output"] = mo
            x = sch.step(mo, t, x).prev_sample
            rec[k + "prev_sample"] = x
    save(out, f, rec)


@torch.no_grad()
def record_pipeline(out, pdir, cfg, inputs):
    call = cfg["pipeline_call"]
    pipe = StableDiffusionPipeline.from_pretrained(pdir, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    n = cfg["image_size"]
    lat = cfg["unet"]["sample_size"]
    latents = inputs.get("pipeline_out.safetensors", "latents",
                         lambda: inputs.rng.randn("pipeline.latents", 1,
                                                  cfg["unet"].get("in_channels", 4), lat, lat))
    image = pipe(call["prompt"], negative_prompt=call["negative_prompt"],
                 num_inference_steps=call["num_inference_steps"],
                 guidance_scale=call["guidance_scale"], height=n, width=n,
                 latents=latents.clone(), output_type="np").images
    save(out, "pipeline_out.safetensors",
         {"latents": latents, "image": torch.from_numpy(np.ascontiguousarray(image)).float()})


def summary_of_embedding(t):
    t64 = t.detach().double()
    return t.detach().reshape(-1)[:512].clone(), torch.stack([t64.sum(), (t64 * t64).sum(), t64.abs().sum()])


def te_name(name):
    return name[len(TE_PREFIX):] if name.startswith(TE_PREFIX) else name


def record_train_step(out, unet, vae, te, tok, cfg, inputs):
    """One DreamBooth step as the recipe does it: instance and class images in
    one batch, VAE frozen, UNet and text encoder trained, prior-preserving
    loss, global gradient clipping, AdamW."""
    f, r = "train_step.safetensors", inputs.rng
    tr = cfg["train"]
    n = cfg["image_size"]
    images = inputs.get(f, "images", lambda: r.uniform("train.images", 4, 3, n, n))
    ids = inputs.get(f, "input_ids",
                     lambda: padded(tok, [INSTANCE_PROMPT] * 2 + [CLASS_PROMPT] * 2))
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    eps = inputs.get(f, "vae_eps", lambda: r.randn("train.vae_eps", *dist.mean.shape))
    # latent_dist.sample() with its noise made explicit
    latents = (dist.mean + dist.std * eps) * tr["vae_scaling"]
    noise = inputs.get(f, "noise", lambda: r.randn("train.noise", *latents.shape))
    timesteps = inputs.get(f, "timesteps", lambda: torch.tensor([3, 250, 500, 997], dtype=torch.int32))
    ddpm = DDPMScheduler.from_config(cfg["scheduler"])
    noisy = ddpm.add_noise(latents, noise, timesteps.long())
    if cfg["scheduler"]["prediction_type"] == "v_prediction":
        target = ddpm.get_velocity(latents, noise, timesteps.long())
    else:
        target = noise

    unet.train()
    te.train()
    params = {"unet": dict(unet.named_parameters()),
              "text_encoder": {te_name(k): p for k, p in te.named_parameters()}}
    for group in params.values():
        for p in group.values():
            p.requires_grad_(True)
            p.grad = None
    ehs = te(ids.long())[0]
    pred = unet(noisy, timesteps.long(), ehs).sample
    pred_inst, pred_class = pred.chunk(2)
    tgt_inst, tgt_class = target.chunk(2)
    loss = (F.mse_loss(pred_inst.float(), tgt_inst.float(), reduction="mean")
            + tr["prior_loss_weight"] * F.mse_loss(pred_class.float(), tgt_class.float(),
                                                   reduction="mean"))
    loss.backward()
    all_params = [p for group in params.values() for p in group.values()]
    grad_norm = torch.nn.utils.clip_grad_norm_(all_params, tr["max_grad_norm"])

    rec = {"images": images, "input_ids": i32(ids), "vae_eps": eps, "latents": latents.detach(),
           "noise": noise, "timesteps": i32(timesteps), "model_pred": pred.detach(),
           "loss": loss.detach().reshape(1), "grad_norm": grad_norm.detach().float().reshape(1)}
    opt = torch.optim.AdamW(all_params, lr=tr["lr"], betas=tuple(tr["betas"]), eps=tr["eps"],
                            weight_decay=tr["weight_decay"])

    def store(prefix):
        for mname, group in params.items():
            for name, p in group.items():
                t = p.grad if prefix == "grad" else p
                key = "%s.%s.%s" % (prefix, mname, name)
                if name == "embeddings.token_embedding.weight":
                    rec[key + ".head"], rec[key + ".sum_sumsq_abssum"] = summary_of_embedding(t)
                else:
                    rec[key] = t.detach().clone()

    store("grad")
    opt.step()
    store("param")
    save(out, f, rec)
    return loss.item(), grad_norm.item()


# ---------------------------------------------------------------- compare

def compare(out, ref):
    """Print, for every file, the largest relative L2 distance between a
    stored tensor and the recomputed one; integer tensors must be equal."""
    worst_all = 0.0
    for fname in sorted(os.listdir(ref)):
        if not fname.endswith(".safetensors"):
            continue
        if not os.path.exists(os.path.join(out, fname)):
            # other scripts add files to a fixture folder (odd_size.safetensors
            # comes from make_odd_size_fixture.py): compare what this one makes
            print("%-26s not made by this script (skipped)" % fname)
            continue
        a, b = load_file(os.path.join(out, fname)), load_file(os.path.join(ref, fname))
        if set(a) != set(b):
            print("%-26s KEYS DIFFER: only here %s, only in reference %s"
                  % (fname, sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5]))
            worst_all = float("inf")
            continue
        worst, wkey, bad = 0.0, "", []
        for k in sorted(b):
            if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape:
                bad.append("%s %s%s vs %s%s" % (k, a[k].dtype, list(a[k].shape), b[k].dtype, list(b[k].shape)))
            elif not b[k].is_floating_point():
                if not torch.equal(a[k], b[k]):
                    bad.append(k + " differs")
            else:
                e = rel_l2(a[k], b[k])
                if e > worst:
                    worst, wkey = e, k
        print("%-26s %4d tensors  max rel L2 %.3g  (%s)%s"
              % (fname, len(b), worst, wkey or "-", "  MISMATCH: " + "; ".join(bad[:5]) if bad else ""))
        if bad:
            worst = float("inf")
        worst_all = max(worst_all, worst)
    with open(os.path.join(out, "tokenizer.json"), encoding="utf-8") as f:
        ta = json.load(f)
    with open(os.path.join(ref, "tokenizer.json"), encoding="utf-8") as f:
        tb = json.load(f)
    same = ta == tb
    print("%-26s %s" % ("tokenizer.json", "identical" if same else "DIFFERS in " +
                        ", ".join(k for k in tb if ta.get(k) != tb[k])))
    return worst_all, same


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", required=True, help="fixture folder to write")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS))
    src.add_argument("--config-from", help="a meta.json-like file with the config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-dir")
    ap.add_argument("--weights-from", help="pipeline folder whose weights to use instead of random ones")
    ap.add_argument("--inputs-from", help="fixture folder whose inputs to reuse")
    ap.add_argument("--compare-to", help="fixture folder to compare the result with")
    ap.add_argument("--tolerance", type=float, default=1e-5,
                    help="with --compare-to, exit 1 past this relative L2 (default 1e-5)")
    ap.add_argument("--strip-vocab", action="store_true")
    args = ap.parse_args()
    # The overlong prompt is there on purpose; keep the output to what matters.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()

    if args.config_from:
        with open(args.config_from) as f:
            cfg = json.load(f)
    else:
        cfg = copy.deepcopy(PRESETS[args.preset or "sd1-tiny"])
    for k in ("params", "loss", "grad_norm", "versions"):
        cfg.pop(k, None)
    cfg["train"] = dict(TRAIN_DEFAULTS, **cfg.get("train", {}))
    if cfg["scheduler"].get("prediction_type", "epsilon") != cfg.get("prediction_type", "epsilon"):
        die("prediction_type %r and scheduler.prediction_type %r disagree"
            % (cfg.get("prediction_type"), cfg["scheduler"].get("prediction_type")))

    os.makedirs(args.out, exist_ok=True)
    vocab_dir = vocab_dir_for(args)
    unet, vae, te = build_models(cfg, args.seed, args.weights_from)
    tok = build_tokenizer(cfg, vocab_dir, cfg["text"]["max_position_embeddings"], args.weights_from)
    call_sched = make_scheduler(cfg["pipeline_call"]["scheduler"], cfg["scheduler"])
    pdir = save_pipeline(args.out, unet, vae, te, tok, call_sched, vocab_dir)

    inputs = Inputs(Rng(args.seed), args.inputs_from)
    unet.eval()
    te.eval()
    vae.eval()
    record_tokenizer(args.out, tok, pdir, inputs)
    record_text_encoder(args.out, te, tok, inputs)
    record_unet(args.out, unet, cfg, inputs)
    record_vae(args.out, vae, cfg, inputs)
    record_schedulers(args.out, cfg, inputs)
    record_pipeline(args.out, pdir, cfg, inputs)
    loss, grad_norm = record_train_step(args.out, unet, vae, te, tok, cfg, inputs)

    meta = dict(cfg)
    meta["params"] = {m: sum(p.numel() for p in mod.parameters())
                      for m, mod in (("unet", unet), ("vae", vae), ("text_encoder", te))}
    meta["loss"], meta["grad_norm"] = loss, grad_norm
    meta["versions"] = {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__,
                        "transformers": transformers.__version__}
    write_json(os.path.join(args.out, "meta.json"), meta, indent=1)

    if args.strip_vocab:
        for fname in VOCAB_FILES:
            p = os.path.join(pdir, "tokenizer", fname)
            if os.path.exists(p):
                os.remove(p)
    print("make_fixture: wrote %s (loss %.6g, grad_norm %.6g)" % (args.out, loss, grad_norm))
    if args.compare_to:
        worst, same = compare(args.out, args.compare_to)
        print("make_fixture: worst relative L2 over all tensors %.3g, tokenizer %s"
              % (worst, "identical" if same else "differs"))
        if worst > args.tolerance or not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
