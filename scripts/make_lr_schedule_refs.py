"""Reference learning rates from diffusers' get_scheduler, for
tests/lua/test_train.lua: every schedule moonlit offers, a warm-up and a
total, the rate of each optimizer step (the value the optimizer used for
step k, read before lr_scheduler.step() as a training loop does).

    python3 scripts/make_lr_schedule_refs.py > tests/fixtures/lr_schedules/diffusers.json
"""
import json

import torch
from diffusers.optimization import get_scheduler

BASE_LR, WARMUP, TOTAL = 5e-6, 7, 40
out = {"base_lr": BASE_LR, "warmup_steps": WARMUP, "total_steps": TOTAL, "schedules": {}}
for name in ["constant", "constant_with_warmup", "linear", "cosine"]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=BASE_LR)
    sched = get_scheduler(name, optimizer=opt, num_warmup_steps=WARMUP, num_training_steps=TOTAL)
    lrs = []
    for _ in range(TOTAL + 3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    out["schedules"][name] = lrs
print(json.dumps(out, indent=1))
