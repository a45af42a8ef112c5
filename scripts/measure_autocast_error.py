#!/usr/bin/env python3
"""measure_autocast_error.py — how far PyTorch's own bf16 autocast lands from
the float32 reference of a fixture, check by check.

moonlit's `--precision bf16-mixed` keeps float32 master weights and runs the
layers in bf16. PyTorch's equivalent is `torch.autocast(dtype=torch.bfloat16)`
over float32 weights. This script loads <fixture_dir>/pipeline with diffusers
and transformers, feeds it the inputs stored in the fixture, runs every check
of scripts/verify_fixture.lua under autocast, and writes the relative L2 error
of each result against the float32 result stored in the fixture: the same
metric, the same inputs and the same check names as verify_fixture. Its
output is what `verify_fixture.lua --write-tolerances` turns into the
fixture's bf16_tolerances.json (docs/fixtures.md, "bf16 tolerances").

Usage:
  measure_autocast_error.py FIXTURE_DIR [--device cpu|cuda|cuda:N] [--out FILE]
                            [--draws N] [--precision bf16|f32]

  --device     where to run (default cpu; the numbers that set tolerances
               come from the GPU, as moonlit's bf16-mixed runs only there)
  --out        the JSON to write (default: print it; the table then goes to
               stderr)
  --draws      how many draws of the network checks (default 16): one run
               is one draw of rounding noise, so each error written is the
               largest over draws that differ in PyTorch's code path and in
               nudged inputs (see NUDGE below)
  --precision  f32 runs the same checks without autocast: every error must
               then sit at float32 rounding level, which shows that the
               checks here compute what the fixture stored

Output JSON:
  meta     library versions, device name, date, fixture, precision, draws
  checks   {check name: relative L2 error, the largest over the draws},
           names as verify_fixture prints them without their "(worst of N
           steps)" decorations
  draws    {check name: [the error of each draw]}
  tensors  {"grad.<module>.<name>" | "param.<module>.<name>": error, the
           largest over the draws} for every gradient after clipping and
           every parameter after one AdamW step; the token embedding, which
           the fixture stores as its first values and three sums, as
           {"head", "sum", "sumsq", "abssum"}
  sets     {"train.grads" | "train.params": [per draw: count, median,
           worst (and its name), aggregate (all tensors as one vector), and
           how many tensors fail verify_fixture's old blanket bf16 rule of
           2e-2]}

Needs torch, diffusers, transformers, safetensors, numpy. The fixture's
pipeline/tokenizer must hold CLIP's vocabulary (scripts/fetch_clip_vocab.sh)
for the pipeline check.
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
import zlib

# Quiet the import-time notices about optional image backends this never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler,  # noqa: E402
                       DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       PNDMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

TE_PREFIX = "text_model."
# verify_fixture's blanket bf16 tolerance before per-check tolerances existed;
# the sets' summaries count how many tensors PyTorch itself fails under it.
BLANKET_BF16_TOL = 2e-2
# verify_fixture's GPU float32 tolerance: what marks a gradient as carrying
# signal rather than float32 noise when it picks a set's worst tensor.
F32_TOL = 1e-4
# PyTorch's bf16 error is one draw of rounding noise: another equally good
# computation of the same check lands elsewhere, and on small tensors and on
# the loss (a mean where errors cancel) its error may be several times
# larger or smaller. So the script runs every network check in several
# draws and keeps the largest error of each. Draw d runs
#   - the attention through its eager form (separate matmul, softmax,
#     matmul: diffusers' AttnProcessor, transformers' "eager") when d is odd,
#     instead of scaled_dot_product_attention,
#   - the UNet and VAE in channels-last memory format when d // 2 is odd,
#     which changes the convolution kernels and their summation order,
#   - and, for d > 0, with every float input of the network checks nudged
#     by a relative 2^-20 (about 8 float32 ulps): the float32 result moves by
#     ~1e-6, far below bf16's error, while bf16 rounds differently all
#     through the network.
# The fixture's references are never changed.
NUDGE = 2.0 ** -20
NUDGED_INPUTS = {
    "unet.safetensors": ("sample", "encoder_hidden_states"),
    "vae.safetensors": ("image", "latents"),
    "pipeline_out.safetensors": ("latents",),
    "train_step.safetensors": ("images", "vae_eps", "noise"),
}
SCHEDULER_CLASSES = {"pndm": PNDMScheduler, "ddim": DDIMScheduler,
                     "euler": EulerDiscreteScheduler, "dpmpp2m": DPMSolverMultistepScheduler}


def die(msg):
    sys.exit("measure_autocast_error: " + msg)


def diff_norms(got, want):
    """(relative L2, |got - want|, |want|) in float64 on the CPU, as
    verify_fixture's rel_l2: the absolute error where the reference is 0."""
    g, w = got.detach().to("cpu", torch.float64), want.detach().to("cpu", torch.float64)
    if g.shape != w.shape:
        die("shape %s vs reference %s" % (list(g.shape), list(w.shape)))
    num, den = (g - w).norm().item(), w.norm().item()
    return (num / den if den > 0 else num), num, den


def rel_l2(got, want):
    return diff_norms(got, want)[0]


def rel_scalar(got, want):
    return abs(got - want) / abs(want) if want != 0 else abs(got - want)


class Runner:
    """One fixture, one device, one precision: runs each check and collects
    its error."""

    def __init__(self, fixture, device, precision, draw):
        self.dir, self.device, self.precision, self.draw = fixture, torch.device(device), precision, draw
        self.checks, self.tensors, self.sets = {}, {}, {}
        self.pdir = os.path.join(fixture, "pipeline")
        with open(os.path.join(fixture, "meta.json")) as f:
            self.meta = json.load(f)
        with open(os.path.join(self.pdir, "scheduler", "scheduler_config.json")) as f:
            self.scheduler_config = json.load(f)
        dev = self.device
        self.eager_attention, self.channels_last = draw % 2 == 1, (draw // 2) % 2 == 1
        self.unet = UNet2DConditionModel.from_pretrained(os.path.join(self.pdir, "unet")).to(dev).eval()
        self.vae = AutoencoderKL.from_pretrained(os.path.join(self.pdir, "vae")).to(dev).eval()
        self.te = CLIPTextModel.from_pretrained(os.path.join(self.pdir, "text_encoder"),
                                                attn_implementation="eager" if self.eager_attention else "sdpa")
        self.te = self.te.to(dev).eval()
        for model in (self.unet, self.vae):
            if self.eager_attention:
                model.set_attn_processor(AttnProcessor())
            if self.channels_last:
                model.to(memory_format=torch.channels_last)

    def describe(self):
        return ", ".join(["eager attention" if self.eager_attention else "SDPA attention",
                          "channels-last" if self.channels_last else "contiguous NCHW",
                          "inputs nudged" if self.draw > 0 else "inputs as stored"])

    def load(self, fname):
        """A fixture file's tensors; in draw d > 0 its float inputs are nudged
        (see NUDGED_INPUTS), the references never."""
        r = load_file(os.path.join(self.dir, fname))
        if self.draw > 0:
            gen = torch.Generator().manual_seed(self.draw * 1_000_003 + zlib.crc32(fname.encode()))
            for key in NUDGED_INPUTS.get(fname, ()):
                if key in r:
                    r[key] = r[key] * (1 + NUDGE * torch.randn(r[key].shape, generator=gen))
        return r

    def has(self, fname):
        return os.path.isfile(os.path.join(self.dir, fname))

    def autocast(self):
        """The compute precision of moonlit's ml.sd.autocast: bf16 layers
        over float32 weights, or plain float32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    def to_dev(self, t):
        return t.to(self.device)

    def record(self, name, err):
        self.checks[name] = err

    # ---- networks (verify_fixture: ml.no_grad around compute(...))
    @torch.no_grad()
    def networks(self):
        r = self.load("text_encoder.safetensors")
        with self.autocast():
            hs = self.te(self.to_dev(r["input_ids"].long())).last_hidden_state
        self.record("text_encoder.last_hidden_state", rel_l2(hs, r["last_hidden_state"]))

        r = self.load("unet.safetensors")
        with self.autocast():
            out = self.unet(self.to_dev(r["sample"]), self.to_dev(r["timesteps"].long()),
                            self.to_dev(r["encoder_hidden_states"])).sample
        self.record("unet.out", rel_l2(out, r["out"]))

        r = self.load("vae.safetensors")
        with self.autocast():
            dist = self.vae.encode(self.to_dev(r["image"])).latent_dist
            decoded = self.vae.decode(self.to_dev(r["latents"])).sample
        self.record("vae.encode.mean", rel_l2(dist.mean, r["mean"]))
        self.record("vae.encode.logvar", rel_l2(dist.logvar, r["logvar"]))
        self.record("vae.decode", rel_l2(decoded, r["decoded"]))

    # ---- schedulers: float32 math in both libraries, under autocast all the
    # same so that every check of verify_fixture has a measured number
    @torch.no_grad()
    def schedulers(self):
        fname = "schedulers.safetensors"
        r = self.load(fname)
        with safe_open(os.path.join(self.dir, fname), "pt") as f:
            md = f.metadata() or {}
        configs = json.loads(md["configs"]) if "configs" in md else {}
        pcfg = self.scheduler_config
        betas_only = {k: pcfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                           "beta_schedule", "trained_betas", "prediction_type")
                      if k in pcfg}

        # how verify_fixture builds each sampler (see its comment there)
        def make(name):
            cls = SCHEDULER_CLASSES[name]
            if name in configs:
                return cls.from_config(configs[name])
            if name == "pndm":
                return cls.from_config(pcfg)
            if name == "ddim":
                return cls.from_config(dict(pcfg, clip_sample=False))
            return cls(**betas_only)

        ddpm = DDPMScheduler(**betas_only)
        with self.autocast():
            self.record("schedulers.alphas_cumprod", rel_l2(ddpm.alphas_cumprod, r["alphas_cumprod"]))
            lat, noise = self.to_dev(r["add_noise.latents"]), self.to_dev(r["add_noise.noise"])
            ts = self.to_dev(r["add_noise.timesteps"].long())
            self.record("schedulers.add_noise", rel_l2(ddpm.add_noise(lat, noise, ts), r["add_noise.out"]))
            if "velocity.out" in r:
                self.record("schedulers.get_velocity",
                            rel_l2(ddpm.get_velocity(lat, noise, ts), r["velocity.out"]))
            for name in SCHEDULER_CLASSES:
                if name + ".timesteps" not in r:
                    continue
                sch = make(name)
                n = 0
                while "%s.%d.prev_sample" % (name, n) in r:
                    n += 1
                # the number of inference steps that yields the stored schedule
                want_ts = r[name + ".timesteps"].tolist()
                k = len(want_ts)
                for cand in range(len(want_ts), 0, -1):
                    sch.set_timesteps(cand)
                    if len(sch.timesteps) == len(want_ts):
                        k = cand
                        break
                sch.set_timesteps(k, device=self.device)
                got_ts = [float(t) for t in sch.timesteps]
                same = len(got_ts) == len(want_ts) and all(abs(a - b) <= 1e-3 for a, b in zip(want_ts, got_ts))
                self.record("schedulers.%s.timesteps" % name, 0.0 if same else 1.0)
                want_sigma = r[name + ".init_noise_sigma"].item()
                self.record("schedulers.%s.init_noise_sigma" % name,
                            rel_scalar(float(sch.init_noise_sigma), want_sigma))
                x = self.to_dev(r[name + ".init"])
                worst_in = worst_out = 0.0
                for i in range(n):
                    t = sch.timesteps[i]
                    key = "%s.%d." % (name, i)
                    worst_in = max(worst_in, rel_l2(sch.scale_model_input(x, t), r[key + "scaled_input"]))
                    x = sch.step(self.to_dev(r[key + "model_output"]), t, x).prev_sample
                    worst_out = max(worst_out, rel_l2(x, r[key + "prev_sample"]))
                self.record("schedulers.%s.scaled_input" % name, worst_in)
                self.record("schedulers.%s.prev_sample" % name, worst_out)

    # ---- the whole text-to-image call, as make_fixture recorded it
    @torch.no_grad()
    def pipeline(self):
        pc = self.meta.get("pipeline_call")
        if not pc:
            return
        r = self.load("pipeline_out.safetensors")
        # the folder's tokenizer and scheduler, this draw's networks (the same
        # weights, in this draw's attention and memory format)
        pipe = StableDiffusionPipeline.from_pretrained(self.pdir, unet=self.unet, vae=self.vae, text_encoder=self.te,
                                                       safety_checker=None, requires_safety_checker=False)
        if type(pipe.scheduler).__name__ != SCHEDULER_CLASSES[pc["scheduler"]].__name__:
            die("pipeline/scheduler is %s but meta.json's pipeline_call says %s"
                % (type(pipe.scheduler).__name__, pc["scheduler"]))
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        image = r["image"]
        with self.autocast():
            out = pipe(pc["prompt"], negative_prompt=pc["negative_prompt"],
                       num_inference_steps=pc["num_inference_steps"],
                       guidance_scale=pc["guidance_scale"], height=image.shape[1], width=image.shape[2],
                       latents=self.to_dev(r["latents"].clone()), output_type="np").images
        self.record("pipeline.image", rel_l2(torch.from_numpy(np.ascontiguousarray(out)).float(), image))

    # ---- one DreamBooth training step, as verify_fixture runs it
    def train(self):
        if not self.has("train_step.safetensors"):
            return
        r = self.load("train_step.safetensors")
        tr = self.meta["train"]
        unet, vae, te = self.unet, self.vae, self.te
        unet.train()
        te.train()
        named = [("unet", k, p) for k, p in unet.named_parameters()]
        named += [("text_encoder", k[len(TE_PREFIX):] if k.startswith(TE_PREFIX) else k, p)
                  for k, p in te.named_parameters()]
        params = [p for _, _, p in named]
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        for p in vae.parameters():
            p.requires_grad_(False)
        with torch.no_grad(), self.autocast():
            dist = vae.encode(self.to_dev(r["images"])).latent_dist
            latents = (dist.mean + dist.std * self.to_dev(r["vae_eps"])) * tr["vae_scaling"]
        latents = latents.float()
        self.record("train.latents", rel_l2(latents, r["latents"]))
        noise = self.to_dev(r["noise"])
        t = self.to_dev(r["timesteps"].long())
        ddpm = DDPMScheduler.from_config(self.scheduler_config)
        noisy = ddpm.add_noise(latents, noise, t)
        with self.autocast():
            pred = unet(noisy, t, te(self.to_dev(r["input_ids"].long()))[0]).sample
        pred = pred.float()
        self.record("train.model_pred", rel_l2(pred, r["model_pred"]))
        if self.meta.get("prediction_type") == "v_prediction":
            target = ddpm.get_velocity(latents, noise, t)
        else:
            target = noise
        half = pred.shape[0] // 2
        loss = (F.mse_loss(pred[:half], target[:half])
                + tr["prior_loss_weight"] * F.mse_loss(pred[half:], target[half:]))
        self.record("train.loss", rel_scalar(loss.item(), r["loss"].item()))
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, tr["max_grad_norm"]).item()
        self.record("train.grad_norm", rel_scalar(gnorm, r["grad_norm"].item()))

        # verify_fixture's absolute floors: gradients that are zero in exact
        # arithmetic hold only float32 noise in the reference
        atol = 1e-6 * min(gnorm, tr["max_grad_norm"])

        def param_atol(key):
            g = r.get("grad." + key)
            if g is not None and "param." + key in r and g.double().norm().item() <= atol:
                return tr["lr"] * math.sqrt(r["param." + key].numel())
            return 1e-7

        self.compare_set("train.grads", "grad.", r, named, lambda p: p.grad, lambda key: atol)
        opt = torch.optim.AdamW(params, lr=tr["lr"], betas=tuple(tr["betas"]), eps=tr["eps"],
                                weight_decay=tr["weight_decay"])
        opt.step()
        self.compare_set("train.params", "param.", r, named, lambda p: p, param_atol)

    def compare_set(self, set_name, prefix, r, named, get, atol_of):
        """Per-tensor errors of one set, and a summary of the set: how
        verify_fixture's compare_set walks it (the token embedding by its
        stored head and sums)."""
        rels, worst, worst_name = [], 0.0, ""
        sum_num2 = sum_den2 = 0.0
        blanket_fails = 0
        for mname, pname, p in named:
            key = mname + "." + pname
            mine = get(p).detach()
            atol = atol_of(key)
            if prefix + key in r:
                rel, num, den = diff_norms(mine, r[prefix + key])
                self.tensors[prefix + key] = rel
                rels.append(rel)
                sum_num2 += num * num
                sum_den2 += den * den
                if num > BLANKET_BF16_TOL * den + atol:
                    blanket_fails += 1
                if rel > worst and den * F32_TOL > atol:
                    worst, worst_name = rel, key
            elif prefix + key + ".head" in r:
                flat = mine.reshape(-1).to("cpu", torch.float64)
                want_head = r[prefix + key + ".head"]
                rel, num, den = diff_norms(flat[:want_head.numel()], want_head)
                want = r[prefix + key + ".sum_sumsq_abssum"].tolist()
                got = [flat.sum().item(), (flat * flat).sum().item(), flat.abs().sum().item()]
                entry = {"head": rel}
                for label, g, w in zip(("sum", "sumsq", "abssum"), got, want):
                    entry[label] = rel_scalar(g, w)
                self.tensors[prefix + key] = entry
                rels.append(rel)
                fails = num > BLANKET_BF16_TOL * den + atol
                for g, w in zip(got, want):
                    if abs(g - w) > BLANKET_BF16_TOL * abs(w) + atol * math.sqrt(flat.numel()):
                        fails = True
                blanket_fails += fails
            else:
                die("the fixture's train_step.safetensors lacks %s%s" % (prefix, key))
        summary = {
            "count": len(rels),
            "median": float(np.median(rels)) if rels else 0.0,
            "worst": worst, "worst_name": worst_name,
            "aggregate": math.sqrt(sum_num2 / sum_den2) if sum_den2 > 0 else math.sqrt(sum_num2),
            "fails_at_%g" % BLANKET_BF16_TOL: blanket_fails,
        }
        self.sets[set_name] = summary


def device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine() or "cpu"


def finite_or_none(v, where, bad):
    """v with every non-finite float replaced by None; their places in bad."""
    if isinstance(v, dict):
        return {k: finite_or_none(x, "%s[%r]" % (where, k), bad) for k, x in v.items()}
    if isinstance(v, list):
        return [finite_or_none(x, "%s[%d]" % (where, i), bad) for i, x in enumerate(v)]
    if isinstance(v, float) and not math.isfinite(v):
        bad.append(where)
        return None
    return v


def worse(a, b):
    """The larger of two errors; NaN if either is (max() would drop it)."""
    return a + b if math.isnan(a) or math.isnan(b) else max(a, b)


def worst_entry(a, b):
    """The larger error of two draws, per field for the token embedding."""
    if isinstance(a, dict):
        return {k: worse(a[k], b[k]) for k in a}
    return worse(a, b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("fixture", help="fixture folder (docs/fixtures.md)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--out", help="JSON file to write (default: print the JSON)")
    ap.add_argument("--precision", choices=("bf16", "f32"), default="bf16",
                    help="bf16: torch.autocast bfloat16 over float32 weights (default); "
                         "f32: no autocast, a check of the checks")
    ap.add_argument("--draws", type=int, default=16,
                    help="runs of the network checks in PyTorch's other code paths and with nudged "
                         "inputs; every error written is the largest over them (default 16)")
    args = ap.parse_args()
    for f in ("meta.json", "pipeline", "unet.safetensors", "vae.safetensors", "text_encoder.safetensors",
              "schedulers.safetensors"):
        if not os.path.exists(os.path.join(args.fixture, f)):
            die("%s is not a fixture folder: it has no %s" % (args.fixture, f))
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        die("--device must be cpu, cuda or cuda:N (got %s)" % args.device)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        die("--device %s: torch sees no GPU" % args.device)
    if not 1 <= args.draws <= 1000:
        die("--draws must be between 1 and 1000 (got %d)" % args.draws)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    # float32 means float32: moonlit's f32 kernels do not use TF32, and the
    # ops autocast leaves in float32 (norms, softmax, losses) should not either.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    # the table goes to stdout unless the JSON does
    log = sys.stdout if args.out else sys.stderr
    draws = []
    for d in range(args.draws):
        run = Runner(args.fixture, args.device, args.precision, d)
        run.networks()
        if d == 0:
            # float32 in both libraries: one draw says all there is
            run.schedulers()
        run.pipeline()
        run.train()
        del run.unet, run.vae, run.te       # keep only the errors of past draws
        draws.append(run)
        print("draw %d of %d done (%s)" % (d + 1, args.draws, run.describe()), file=log)

    checks, per_draw, tensors = {}, {}, {}
    for run in draws:
        for name, err in run.checks.items():
            checks[name] = worse(checks[name], err) if name in checks else err
            per_draw.setdefault(name, []).append(err)
        for name, err in run.tensors.items():
            tensors[name] = worst_entry(tensors[name], err) if name in tensors else err
    sets = {name: [run.sets[name] for run in draws] for name in draws[0].sets}

    print("%-40s %10s  %s" % ("check", "error", "spread over draws (min .. max)"), file=log)
    for name, err in checks.items():
        print("%-40s %10.3e  %.3e .. %.3e" % (name, err, min(per_draw[name]), max(per_draw[name])), file=log)
    for name, summaries in sets.items():
        s0 = summaries[0]
        print("%-40s %d tensors, first draw: median %.3e, worst %.3e (%s), aggregate %.3e, %d past %g"
              % (name, s0["count"], s0["median"], s0["worst"], s0["worst_name"] or "-", s0["aggregate"],
                 s0["fails_at_%g" % BLANKET_BF16_TOL], BLANKET_BF16_TOL), file=log)

    dev = draws[0].device
    result = {
        "meta": {
            "fixture": os.path.basename(os.path.normpath(args.fixture)),
            "precision": "torch.autocast bfloat16 over float32 weights" if args.precision == "bf16"
                         else "float32, no autocast",
            "draws": args.draws, "nudge": NUDGE,
            "device": device_name(dev), "device_type": dev.type,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "checks": checks,
        "draws": per_draw,
        "tensors": tensors,
        "sets": sets,
    }
    # A non-finite error is written as null (JSON has no NaN), so that
    # --write-tolerances names it, and this script fails after writing.
    bad = []
    for section in ("checks", "draws", "tensors", "sets"):
        result[section] = finite_or_none(result[section], section, bad)
    text = json.dumps(result, indent=1, sort_keys=True, allow_nan=False)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
        print("measure_autocast_error: wrote %s (%d checks, %d tensors, %d draws)"
              % (args.out, len(checks), len(tensors), args.draws), file=log)
    else:
        print(text)
    if bad:
        die("errors that are not finite: " + ", ".join(bad))


if __name__ == "__main__":
    main()
