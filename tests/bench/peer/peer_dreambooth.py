"""Peer baseline for the whole DreamBooth recipe on one GPU, phase by phase,
with diffusers' own examples/dreambooth/train_dreambooth.py for training.

Phases, each timed by wall clock:
  class images: StableDiffusionPipeline as train_dreambooth.py generates them
                (fp16 on CUDA, 50 steps, batch --sample_batch_size), into --class_dir
  training:     train_dreambooth.py run as a subprocess with prior preservation, the
                text encoder trained, bf16 mixed precision (its load, steps and save);
                the class images are already there, so it generates none
  generation:   the tuned folder, 50 PNDM steps, guidance 7.5, --num_images images

Usage: python3 peer_dreambooth.py --script train_dreambooth.py --model_dir M --instance_dir D
           --class_dir C --output_dir O [--num_class_images 16] [--max_train_steps 50]
Prints one JSON line at the end: {"class_images_s": ..., "training_s": ..., "generation_s": ...}.
"""
import argparse, json, os, subprocess, sys, time

ap = argparse.ArgumentParser()
ap.add_argument("--script", required=True)
ap.add_argument("--model_dir", required=True)
ap.add_argument("--instance_dir", required=True)
ap.add_argument("--class_dir", required=True)
ap.add_argument("--output_dir", required=True)
ap.add_argument("--instance_prompt", default="photo of unqtkn dog")
ap.add_argument("--class_prompt", default="photo of a dog")
ap.add_argument("--num_class_images", type=int, default=16)
ap.add_argument("--sample_batch_size", type=int, default=4)
ap.add_argument("--max_train_steps", type=int, default=50)
ap.add_argument("--train_batch_size", type=int, default=2)
ap.add_argument("--resolution", type=int, default=512)
ap.add_argument("--num_images", type=int, default=4)
args = ap.parse_args()

import torch
from diffusers import StableDiffusionPipeline

res = {}
os.makedirs(args.class_dir, exist_ok=True)

# class images, as train_dreambooth.py makes them
t0 = time.time()
pipe = StableDiffusionPipeline.from_pretrained(args.model_dir, torch_dtype=torch.float16, safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
pipe.to("cuda")
done = 0
while done < args.num_class_images:
    n = min(args.sample_batch_size, args.num_class_images - done)
    images = pipe([args.class_prompt] * n, num_inference_steps=50).images
    for img in images:
        img.save(os.path.join(args.class_dir, f"{done:05d}.jpg"))
        done += 1
torch.cuda.synchronize()
res["class_images_s"] = time.time() - t0
del pipe
torch.cuda.empty_cache()

# training, with the flags the recipe uses
t0 = time.time()
cmd = [sys.executable, args.script, "--pretrained_model_name_or_path", args.model_dir,
       "--instance_data_dir", args.instance_dir, "--class_data_dir", args.class_dir,
       "--output_dir", args.output_dir, "--with_prior_preservation", "--prior_loss_weight", "1.0",
       "--instance_prompt", args.instance_prompt, "--class_prompt", args.class_prompt,
       "--resolution", str(args.resolution), "--train_batch_size", str(args.train_batch_size),
       "--learning_rate", "5e-6", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
       "--num_class_images", str(args.num_class_images), "--max_train_steps", str(args.max_train_steps),
       "--train_text_encoder", "--mixed_precision", "bf16", "--checkpointing_steps", "1000000",
       "--seed", "0", "--max_grad_norm", "1.0"]
p = subprocess.run(cmd, capture_output=True, text=True)
res["training_s"] = time.time() - t0
res["training_rc"] = p.returncode
if p.returncode != 0:
    sys.stderr.write(p.stdout[-3000:] + "\n" + p.stderr[-6000:] + "\n")

# generation from the tuned folder
if p.returncode == 0:
    t0 = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(args.output_dir, torch_dtype=torch.bfloat16, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cuda")
    t1 = time.time()
    images = pipe(["photo of a unqtkn dog in a bucket"] * args.num_images, num_inference_steps=50,
                  guidance_scale=7.5).images
    torch.cuda.synchronize()
    res["generation_s"] = time.time() - t0
    res["generation_images_s"] = time.time() - t1
    images[0].save(os.path.join(args.output_dir, "peer-sample.png"))
print(json.dumps(res))
