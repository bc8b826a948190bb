"""
machinery/loop.py -- the small experiments' training loop (toy.py's, and any like it), in one
process on the CPU: Algorithm 1's step (smd.train_step) on fresh batches, a warm-up and a cosine
decay of the learning rate, progress lines with an ETA. train.py has its own loop (checkpoints,
EMA, DDP, signals).
"""

import math
import time

import smd
from machinery.cli import fmt_time


def train_loop(model, diffusion, draw, max_steps, lr, warmup=0, grad_clip=1.0, loss_args=lambda step: {},
               before_step=None, label=""):
    """Each step a batch x0 = draw(), before_step(step, optimizer) if given, then smd.train_step
    with loss_args(step); the learning rate warms up linearly over `warmup` steps and decays to 0
    on a cosine. Progress every 10%. Returns (the mean loss of the last 10% of steps, ms per step)."""
    optimizer = smd.make_optimizer(model, lr, "cpu")
    losses, every, t0 = [], max(1, max_steps // 10), time.time()
    for step in range(max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / max_steps))
        x0 = draw()
        if before_step:
            before_step(step, optimizer)
        losses.append(smd.train_step(model, diffusion, optimizer, x0, grad_clip, **loss_args(step)).item())
        if (step + 1) % every == 0 and step + 1 < max_steps:
            s = time.time() - t0
            print(f"  {label}step {step + 1}/{max_steps}, loss {sum(losses[-every:]) / every:.4f}, "
                  f"{1000 * s / (step + 1):.0f} ms/step, ETA {fmt_time(s / (step + 1) * (max_steps - step - 1))}",
                  flush=True)
    return sum(losses[-every:]) / every, 1000 * (time.time() - t0) / max_steps
