#!/usr/bin/env python3
"""make_scheduler_refs.py — reference runs of diffusers' schedulers for
tests/lua/test_schedulers.lua.

Writes tests/fixtures/schedulers/refs.json (one record per case: class,
config, number of inference steps, the timesteps, init_noise_sigma, how many
steps were run and with what) and refs.safetensors (the tensors).

Every sampling case starts from the same latent x and, at step i, feeds the
same "model output" model_output[i] (and, for the stochastic samplers, the
same noise[i]): diffusers draws that noise inside step() with randn_tensor,
so the scheduler module's randn_tensor is replaced during the run by one that
hands out the stored noise.  Per step the case stores what step() returned
(prev_sample, and pred_original_sample where diffusers returns it) and, for
the Euler samplers, scale_model_input's result.  Schedulers work elementwise,
so the [1, 4, 4, 4] tensors have no layout: the test uses them as they are.

Cases: every class x timestep_spacing x steps_offset x prediction_type x
{7, 25} steps (x set_alpha_to_one for DDIM and PNDM); clip_sample, the beta
schedules, DDIM's eta and use_clipped_model_output, DDPM's variance types,
PNDM's Runge-Kutta warm-up (skip_prk_steps false), Euler's churn and
final_sigmas_type; schedules alone for many step counts; init_noise_sigma
before set_timesteps; DDPM stepped without set_timesteps; add_noise and
get_velocity of each class.

Usage: make_scheduler_refs.py [--out tests/fixtures/schedulers]
Needs: torch, diffusers, safetensors.  Same library versions give the same
files (the seed is fixed).
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       PNDMScheduler)

CLASSES = {c.__name__: c for c in (DDPMScheduler, PNDMScheduler, DDIMScheduler, EulerDiscreteScheduler,
                                   EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler)}
SHORT = {"DDPMScheduler": "ddpm", "PNDMScheduler": "pndm", "DDIMScheduler": "ddim",
         "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
         "DPMSolverMultistepScheduler": "dpmpp_2m"}
# Stable Diffusion's betas.  Cases turn DDPM/DDIM's default clip_sample = true
# off, as SD's configs do, except those that test clipping.
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SHAPE = (1, 4, 4, 4)
BANK = 40          # model outputs / noises: enough for PNDM's 12 Runge-Kutta steps + 25


class NoiseFeed:
    """Stands in for randn_tensor in a scheduler module: returns noise[i]."""

    def __init__(self, noise):
        self.noise, self.i = noise, 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == SHAPE, shape
        return self.noise[self.i].clone()


def to_float(v):
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


def build(cls_name, config):
    return CLASSES[cls_name](**config)


def timesteps_of(sch):
    ts = sch.timesteps
    return [int(v) if not ts.is_floating_point() else float(v) for v in ts.tolist()]


class Recorder:
    def __init__(self, x, model_output, noise):
        self.x, self.model_output, self.noise = x, model_output, noise
        self.cases, self.tensors, self.names = [], {}, set()

    def case(self, name, cls_name, config, n, run=True, eta=None, clipped=False, churn=None):
        """One sampling case: set_timesteps(n), then (if run) every step."""
        assert name not in self.names, name
        self.names.add(name)
        sch = build(cls_name, config)
        sch.set_timesteps(n)
        rec = {"name": name, "class": cls_name, "config": config, "num_inference_steps": n,
               "timesteps": timesteps_of(sch), "init_noise_sigma": to_float(sch.init_noise_sigma), "steps": 0}
        self.cases.append(rec)
        if not run:
            return
        module = sys.modules[type(sch).__module__]
        feed = NoiseFeed(self.noise)
        saved = module.__dict__.get("randn_tensor")
        module.randn_tensor = feed
        try:
            sample = self.x * sch.init_noise_sigma
            prevs, x0s, scaled = [], [], []
            for i, t in enumerate(sch.timesteps):
                feed.i = i
                inp = sch.scale_model_input(sample, t)
                if cls_name.startswith("Euler"):
                    scaled.append(inp)
                kw = {}
                if eta is not None:
                    kw = {"eta": eta, "variance_noise": self.noise[i].clone(), "use_clipped_model_output": clipped}
                if churn is not None:
                    kw = dict(churn)
                out = sch.step(self.model_output[i].clone(), t, sample, **kw, return_dict=False)
                sample = out[0]
                prevs.append(sample)
                if len(out) > 1:
                    x0s.append(out[1])
        finally:
            if saved is None:
                del module.randn_tensor
            else:
                module.randn_tensor = saved
        rec["steps"] = len(prevs)
        rec["noise"] = cls_name in ("DDPMScheduler", "EulerAncestralDiscreteScheduler") or bool(eta) or churn is not None
        if eta is not None:
            rec["eta"], rec["use_clipped_model_output"] = eta, clipped
        if churn is not None:
            rec["churn"] = churn
        self.tensors[name + ".prev"] = torch.cat(prevs)
        # the long runs keep only prev_sample, to keep the file small
        if x0s and n <= 10:
            self.tensors[name + ".x0"] = torch.cat(x0s)
        if scaled and n <= 10:
            self.tensors[name + ".scaled"] = torch.cat(scaled)


def sampling_grid(r):
    """class x spacing x offset x prediction x steps (x set_alpha_to_one)."""
    spacings = [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)]
    for cls_name in CLASSES:
        alpha_one = [True, False] if cls_name in ("DDIMScheduler", "PNDMScheduler") else [None]
        for spacing, offset in spacings:
            for pred in ("epsilon", "v_prediction"):
                for n in (7, 25):
                    for a1 in alpha_one:
                        cfg = dict(SD_BETAS, timestep_spacing=spacing, steps_offset=offset, prediction_type=pred)
                        if cls_name in ("DDPMScheduler", "DDIMScheduler"):
                            cfg["clip_sample"] = False
                        if cls_name == "PNDMScheduler":
                            cfg["skip_prk_steps"] = True
                        if a1 is not None:
                            cfg["set_alpha_to_one"] = a1
                        name = "%s.%s%d.%s.n%d" % (SHORT[cls_name], spacing, offset, "eps" if pred == "epsilon" else "v", n)
                        if a1 is not None:
                            name += ".a1" if a1 else ".a0"
                        r.case(name, cls_name, cfg, n)


def option_cases(r):
    sd = dict(SD_BETAS, steps_offset=1)
    # clip_sample (DDPM and DDIM default to true), a narrower range too
    for cls_name in ("DDPMScheduler", "DDIMScheduler"):
        for pred in ("epsilon", "v_prediction"):
            r.case("%s.clip.%s" % (SHORT[cls_name], pred), cls_name, dict(sd, prediction_type=pred), 7)
        r.case("%s.clip_range" % SHORT[cls_name], cls_name, dict(sd, clip_sample_range=0.5), 7)
    # prediction_type "sample"
    for cls_name in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        cfg = dict(sd, prediction_type="sample")
        if cls_name in ("DDPMScheduler", "DDIMScheduler"):
            cfg["clip_sample"] = False
        r.case("%s.sample_pred" % SHORT[cls_name], cls_name, cfg, 7)
    # the other beta schedules, with each class's default spacing
    for cls_name in CLASSES:
        for sched, extra in (("linear", {"beta_start": 0.0001, "beta_end": 0.02}), ("squaredcos_cap_v2", {})):
            cfg = dict(extra, beta_schedule=sched)
            if cls_name == "PNDMScheduler":
                cfg["skip_prk_steps"] = True
            if cls_name in ("DDPMScheduler", "DDIMScheduler"):
                cfg["clip_sample"] = False
            r.case("%s.betas_%s" % (SHORT[cls_name], sched), cls_name, cfg, 7)
    # a shorter training schedule
    for cls_name in CLASSES:
        cfg = dict(sd, num_train_timesteps=500, timestep_spacing="trailing")
        if cls_name == "PNDMScheduler":
            cfg["skip_prk_steps"] = True
        if cls_name in ("DDPMScheduler", "DDIMScheduler"):
            cfg["clip_sample"] = False
        r.case("%s.train500" % SHORT[cls_name], cls_name, cfg, 9)
    # DDIM with eta > 0 (stored noise), use_clipped_model_output
    for eta in (0.5, 1.0):
        for spacing in ("leading", "trailing"):
            for pred in ("epsilon", "v_prediction"):
                cfg = dict(sd, clip_sample=False, timestep_spacing=spacing, prediction_type=pred)
                r.case("ddim.eta%g.%s.%s" % (eta, spacing, pred), "DDIMScheduler", cfg, 7, eta=eta)
    r.case("ddim.clipped_output", "DDIMScheduler", dict(sd, clip_sample=True), 7, eta=0.5, clipped=True)
    # DDPM variance types
    for vt in ("fixed_small_log", "fixed_large"):
        r.case("ddpm.%s" % vt, "DDPMScheduler", dict(sd, clip_sample=False, variance_type=vt), 7)
    # DDPM over the whole training schedule
    r.case("ddpm.full", "DDPMScheduler", dict(sd, clip_sample=False), 1000, run=False)
    # PNDM's Runge-Kutta warm-up (the class default)
    for spacing, offset in (("leading", 1), ("trailing", 0), ("linspace", 0)):
        for pred in ("epsilon", "v_prediction"):
            cfg = dict(SD_BETAS, timestep_spacing=spacing, steps_offset=offset, prediction_type=pred)
            r.case("pndm.prk.%s%d.%s" % (spacing, offset, pred), "PNDMScheduler", cfg, 10)
    r.case("pndm.prk.n25", "PNDMScheduler", dict(sd), 25)
    # Euler's churn (s_churn > 0 adds stored noise)
    for spacing in ("linspace", "leading"):
        churn = {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 10.0, "s_noise": 1.003}
        r.case("euler.churn.%s" % spacing, "EulerDiscreteScheduler", dict(sd, timestep_spacing=spacing), 7,
               churn=churn)
    # final_sigmas_type sigma_min (the last step lands on sigma_min, not 0)
    for cls_name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        r.case("%s.final_sigma_min" % SHORT[cls_name], cls_name, dict(sd, final_sigmas_type="sigma_min"), 7)


def schedule_only_cases(r):
    """Timesteps and init_noise_sigma for many step counts (no steps run)."""
    for cls_name in CLASSES:
        for spacing in ("leading", "trailing", "linspace"):
            for offset in (0, 1):
                for n in (1, 2, 3, 4, 10, 13, 27, 30, 31, 50, 1000):
                    if offset == 1 and n == 1000:
                        continue
                    cfg = dict(SD_BETAS, timestep_spacing=spacing, steps_offset=offset)
                    if cls_name == "PNDMScheduler":
                        cfg["skip_prk_steps"] = True
                    name = "%s.sched.%s%d.n%d" % (SHORT[cls_name], spacing, offset, n)
                    try:
                        r.case(name, cls_name, cfg, n, run=False)
                    except Exception as e:  # diffusers refuses it: record nothing
                        r.names.discard(name)
                        print("skip %s: %s" % (name, str(e).splitlines()[0][:80]))


def training_cases(r, gen):
    """add_noise / get_velocity per beta schedule, and alphas_cumprod."""
    original = torch.randn(4, 4, 4, 4, generator=gen)
    noise = torch.randn(4, 4, 4, 4, generator=gen)
    timesteps = torch.tensor([0, 1, 500, 999], dtype=torch.int64)
    r.tensors["train.original"], r.tensors["train.noise"], r.tensors["train.timesteps"] = original, noise, timesteps
    out = []
    for sched, extra in (("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
                         ("linear", {}), ("squaredcos_cap_v2", {})):
        cfg = dict(extra, beta_schedule=sched)
        ddpm = DDPMScheduler(**cfg)
        key = "train." + sched
        r.tensors[key + ".alphas_cumprod"] = ddpm.alphas_cumprod.clone()
        r.tensors[key + ".add_noise"] = ddpm.add_noise(original, noise, timesteps)
        r.tensors[key + ".velocity"] = ddpm.get_velocity(original, noise, timesteps)
        out.append({"name": key, "config": cfg})
    # the sigma samplers add noise as x0 + sigma * noise at schedule timesteps
    for cls_name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"):
        cfg = dict(SD_BETAS)
        sch = build(cls_name, cfg)
        sch.set_timesteps(10)
        ts = sch.timesteps[torch.tensor([0, 3, 7, 9])]
        key = "train." + SHORT[cls_name]
        r.tensors[key + ".timesteps"] = ts.clone()
        r.tensors[key + ".add_noise"] = sch.add_noise(original, noise, ts)
        out.append({"name": key, "class": cls_name, "config": cfg, "num_inference_steps": 10})
    return out


def unscheduled_case(r):
    """DDPM stepped without set_timesteps: each step goes from t to t - 1."""
    cfg = dict(SD_BETAS, clip_sample=False)
    ddpm = DDPMScheduler(**cfg)
    module = sys.modules[type(ddpm).__module__]
    feed, saved = NoiseFeed(r.noise), module.randn_tensor
    module.randn_tensor = feed
    try:
        prevs = []
        timesteps = [999, 500, 1, 0]
        for i, t in enumerate(timesteps):
            feed.i = i
            prevs.append(ddpm.step(r.model_output[i].clone(), t, r.x, return_dict=False)[0])
    finally:
        module.randn_tensor = saved
    r.tensors["unscheduled.prev"] = torch.cat(prevs)
    return {"config": cfg, "timesteps": timesteps}


def fresh_cases():
    """init_noise_sigma of a scheduler before set_timesteps."""
    out = []
    for cls_name in CLASSES:
        for spacing in ("leading", "trailing", "linspace"):
            cfg = dict(SD_BETAS, timestep_spacing=spacing)
            out.append({"class": cls_name, "config": cfg, "init_noise_sigma": to_float(build(cls_name, cfg).init_noise_sigma)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join("tests", "fixtures", "schedulers"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(20240917)
    x = torch.randn(SHAPE, generator=gen)
    model_output = torch.randn((BANK,) + SHAPE, generator=gen)
    noise = torch.randn((BANK,) + SHAPE, generator=gen)
    r = Recorder(x, model_output, noise)
    r.tensors["x"], r.tensors["model_output"], r.tensors["noise"] = x, model_output.squeeze(1), noise.squeeze(1)
    sampling_grid(r)
    option_cases(r)
    schedule_only_cases(r)
    training = training_cases(r, gen)
    fresh = fresh_cases()
    unscheduled = unscheduled_case(r)
    os.makedirs(args.out, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in sorted(r.tensors.items())}
    st_path = os.path.join(args.out, "refs.safetensors")
    save_file(tensors, st_path, metadata={"diffusers": diffusers.__version__, "torch": torch.__version__.split("+")[0]})
    os.chmod(st_path, 0o644)
    with open(os.path.join(args.out, "refs.json"), "w") as f:
        # one record a line: small, and diffs stay readable
        f.write('{"diffusers": %s,\n"training": %s,\n"fresh": %s,\n"unscheduled": %s,\n"cases": [\n'
                % (json.dumps(diffusers.__version__), json.dumps(training), json.dumps(fresh),
                   json.dumps(unscheduled)))
        f.write(",\n".join(json.dumps(c, separators=(",", ":")) for c in r.cases))
        f.write("\n]}\n")
    run = sum(1 for c in r.cases if c["steps"] > 0)
    print("%d cases (%d with steps), %d tensors" % (len(r.cases), run, len(tensors)))


if __name__ == "__main__":
    main()
