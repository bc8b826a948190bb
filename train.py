"""
train.py -- train a DDPM or Soft Mixture Denoising (SMD) U-Net, on one GPU or many.

    python train.py --dataset cifar10 --smd                  # SMD on CIFAR-10 (downloads to ./data)
    python train.py --dataset cifar10                        # the DDPM baseline
    python train.py --dataset fashion-mnist --smd            # offline: reads /usr/share/datasets/fashion-mnist
    python train.py --dataset path/to/celeba --image-size 64 --smd   # any folder of images
    torchrun --standalone --nproc_per_node=8 train.py --dataset cifar10 --smd   # 8 GPUs, same global batch
    python train.py --resume --out-dir out                   # continue out/ckpt.pt where it stopped
    python train.py --dataset mnist --ch 32 --ch-mult 1,2 --num-res-blocks 1 --attn-res "" \\
        --batch-size 16 --max-steps 200 --log-every 20       # a CPU smoke test

Writes to --out-dir: ckpt.pt (atomically, every --ckpt-every steps, at the end and on
Ctrl-C), samples_<step>.png every --sample-every steps, and log.txt. On CUDA it trains in
bf16 autocast with TF32, channels_last, torch.compile and fused AdamW; in-memory datasets
(CIFAR-10, MNIST) live on the GPU and nothing syncs the host except at log/ckpt steps.
"""

import argparse
import copy
import math
import os
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import smd
import unet
from data import make_batches

MODEL_KEYS = ("image_size", "channels", "ch", "ch_mult", "num_res_blocks", "attn_res", "dropout", "smd", "latent_dim")
FIXED_ON_RESUME = ("dataset", "T", "schedule", *MODEL_KEYS)   # what --resume may not change


def int_tuple(s):
    return tuple(int(v) for v in s.replace(",", " ").split())


def get_parser():
    p = argparse.ArgumentParser(description="Train DDPM / SMD.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="cifar10", help="cifar10 | mnist | fashion-mnist | path/to/image/folder")
    p.add_argument("--data-dir", default="data", help="where torchvision datasets are (or get downloaded)")
    p.add_argument("--image-size", type=int, default=None, help="image folders: resize + center crop (default 64)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on, off for mnist)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (image folders)")
    p.add_argument("--ch", type=int, default=128)
    p.add_argument("--ch-mult", type=int_tuple, default=None, help="e.g. 1,2,2,2 (default: by image size)")
    p.add_argument("--num-res-blocks", type=int, default=2)
    p.add_argument("--attn-res", type=int_tuple, default=(16,), help='resolutions with attention, "" for none')
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--smd", action="store_true", help="Soft Mixture Denoising (else plain DDPM)")
    p.add_argument("--latent-dim", type=int, default=64, help="SMD: dimension of eta and z_t")
    p.add_argument("--eta-samples", type=int, default=1, help="SMD: etas per example in the loss (Sec. 5.4)")
    p.add_argument("--T", type=int, default=1000, help="diffusion steps")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split over the ranks")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=5000, help="linear learning-rate warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--max-steps", type=int, default=800_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast; default: on with CUDA")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=5000)
    p.add_argument("--sample-every", type=int, default=10000, help="0: never")
    p.add_argument("--sample-n", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=100)
    return p


def explicit_args(argv):
    """Only the options given on the command line (resume checks them against the checkpoint)."""
    p = get_parser()
    for action in p._actions:   # argparse has no public way to ask "was this flag given?"
        action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))

# -----------------------------------------------------------------------------
# model, optimiser, one training step, EMA (plain functions bench.py reuses)


def build_model(config):
    """The UNet a config (dict or argparse.Namespace) describes."""
    c = config if isinstance(config, dict) else vars(config)
    return unet.UNet(**{k: c[k] for k in MODEL_KEYS})


def build_diffusion(config):
    c = config if isinstance(config, dict) else vars(config)
    return smd.Diffusion(c["T"], c["schedule"])


def make_optimizer(model, lr, device, weight_decay=0.0):
    """AdamW as DDPM's Adam (no weight decay by default); fused kernels on CUDA."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             fused=torch.device(device).type == "cuda")


def train_step(net, diffusion, optimizer, x0, eta_samples=1, grad_clip=1.0, amp=False):
    """One update on a batch: Alg. 1's loss, backward, grad-norm clip, AdamW step. Returns the
    loss as a device tensor: nothing here waits for the GPU."""
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = diffusion.loss(net, x0, eta_samples)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


def ema_decay(n, max_decay=0.9999):
    """EMA decay after n updates, warmed up so early checkpoints are not the initialisation."""
    return min(max_decay, (1 + n) / (10 + n))


@torch.no_grad()
def ema_update(ema_params, params, decay):
    """ema = lerp(ema, p, 1 - decay) for all parameters in one foreach kernel."""
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def to_uint8(x):
    """[-1, 1] NCHW floats -> uint8 NHWC, exactly as saved on disk (fid.py reads this)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images, path):
    """uint8 NHWC numpy images -> one PNG grid, as square as possible."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * cols, h, w, c), np.uint8)
    grid[:n] = images
    grid = grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)

# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(ckpt, path):
    """Write to a temp file, fsync, then os.replace: a crash leaves the old file intact."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_states(device, world, gather):
    """This process's RNG states; under DDP a list over ranks (gathered unless `gather` is off)."""
    state = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
    if world == 1 or not gather:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def restore_rng(states, rank, world, seed, step):
    if len(states) != world:   # e.g. a Ctrl-C checkpoint of a DDP run, or a different world size
        print(f"rank {rank}: the checkpoint has RNG states of {len(states)} ranks, not {world}: reseeding")
        return torch.manual_seed(seed + rank + 1_000_003 * step)
    torch.set_rng_state(states[rank]["torch"])
    if states[rank]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]["cuda"])


def resume_config(args, explicit, path):
    """Load ckpt.pt for --resume. The run takes the checkpoint's config (bar the machine's own
    settings) except where flags say otherwise; flags that would change the model or the data
    stop the run with a message, never a silent restart."""
    if not os.path.exists(path):
        raise SystemExit(f"train.py: --resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config = ckpt["config"]
    except Exception as e:
        raise SystemExit(f"train.py: --resume: cannot read {path} ({type(e).__name__}: {e})")
    bad = [f"--{k.replace('_', '-')} {explicit[k]!r} (checkpoint: {config[k]!r})"
           for k in FIXED_ON_RESUME if k in explicit and explicit[k] != config[k]]
    if bad:
        raise SystemExit(f"train.py: --resume: this run contradicts {path}: {'; '.join(bad)}. Drop these flags "
                         f"to continue that run, or start a new one in another --out-dir.")
    for k, v in config.items():
        if k not in explicit and k not in ("resume", "out_dir", "channels", "device", "compile", "amp", "workers"):
            setattr(args, k, v)
    return ckpt

# -----------------------------------------------------------------------------
# the training loop


def setup_distributed(device_arg):
    """(rank, local_rank, world, device); torchrun's env vars start DDP (NCCL on GPUs, else gloo)."""
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device(device_arg or ("cuda" if cuda else "cpu"))
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return rank, local_rank, world, device


def stop_flag():
    """Ctrl-C / SIGTERM set a flag that the loop checks between steps; a second Ctrl-C aborts."""
    stop = []

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        print("stopping after this step and saving a checkpoint (Ctrl-C again to abort)", flush=True)
    return stop, {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def main(argv=None):
    args, explicit = get_parser().parse_args(argv), explicit_args(argv)
    rank, local_rank, world, device = setup_distributed(args.device)
    master, cuda = rank == 0, device.type == "cuda"
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = resume_config(args, explicit, ckpt_path) if args.resume else None
    if ckpt is None and os.path.exists(ckpt_path):
        raise SystemExit(f"train.py: {ckpt_path} exists: pass --resume to continue it, or choose another --out-dir")
    if args.batch_size % world:
        raise SystemExit(f"train.py: --batch-size {args.batch_size} is not divisible by {world} ranks")
    compile_, amp = (cuda if v is None else v for v in (args.compile, args.amp))
    args.flip = args.dataset != "mnist" if args.flip is None else args.flip
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    step = ckpt["step"] if ckpt else 0

    if world > 1 and not master:
        dist.barrier()   # rank 0 downloads first
    data, channels, image_size = make_batches(args, rank, world, step, device)
    if world > 1 and master:
        dist.barrier()
    ch_mult = tuple(args.ch_mult or unet.DEFAULT_CH_MULT.get(image_size, ()))
    config = {**vars(args), "image_size": image_size, "channels": channels, "ch_mult": ch_mult}
    if ckpt and ckpt["config"]["channels"] != channels:
        raise SystemExit(f"train.py: --resume: the data has {channels} channels, the checkpoint's model takes "
                         f"{ckpt['config']['channels']}")

    torch.manual_seed(args.seed)   # the same initial weights on every rank
    model = build_model(config).to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    diffusion = build_diffusion(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = make_optimizer(model, args.lr, device, args.weight_decay)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_rng(ckpt["rng"], rank, world, args.seed, step)
        if master:
            print(f"RESUMED {ckpt_path} at step {step} (of --max-steps {args.max_steps})", flush=True)
    else:
        torch.manual_seed(args.seed + rank)   # per-rank noise, t and dropout
    params, ema_params = list(model.parameters()), list(ema.parameters())
    net = torch.compile(model) if compile_ else model
    if world > 1:
        net = DDP(net, device_ids=[local_rank] if cuda else None)
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        n_params = sum(p.numel() for p in params)
        print(f"{'SMD' if args.smd else 'DDPM'} U-Net, {n_params:,} parameters, {args.dataset} "
              f"{channels}x{image_size}x{image_size}, batch {args.batch_size} on {world} x {device}, "
              f"compile={compile_}, bf16={amp}", flush=True)

    def log(msg):
        if master:
            print(msg, flush=True)
            with open(os.path.join(args.out_dir, "log.txt"), "a") as f:
                f.write(msg + "\n")

    def check_finite(reduce=True):
        """The one host sync: mean loss since the last log; stop on NaN/inf naming the step."""
        s, b = loss_sum.clone(), first_bad.clone()
        if world > 1 and reduce:
            dist.all_reduce(s)
            dist.all_reduce(b, op=dist.ReduceOp.MIN)
        s, b = torch.stack([s, b]).tolist()
        if math.isfinite(b):
            last = f"the last good checkpoint is {ckpt_path} (step {saved})" if saved else "no checkpoint was written"
            raise SystemExit(f"train.py: non-finite loss at step {int(b)}; stopping without saving: {last}.")
        return s / max(n_window, 1) / (world if reduce else 1)

    def save(gather=True):
        finite = torch.stack([torch.isfinite(p).all() for p in params + ema_params]).all().item()
        if not finite:
            raise SystemExit(f"train.py: non-finite parameters at step {step}; stopping without saving.")
        for b_ema, b in zip(ema.buffers(), model.buffers()):   # EMA averages parameters only
            b_ema.copy_(b)
        rng = rng_states(device, world, gather)
        if master:
            save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                             "step": step, "config": config, "rng": rng}, ckpt_path)
            log(f"saved {ckpt_path} at step {step}")
        return step

    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), math.inf, device=device)
    n_window, t0, saved, losses = 0, time.time(), step if ckpt else None, []
    stop, old_handlers = stop_flag()
    try:
        while step < args.max_steps and not stop:
            x0 = next(data)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
            loss = train_step(net, diffusion, optimizer, x0, args.eta_samples, args.grad_clip, amp)
            ema_update(ema_params, params, ema_decay(step, args.ema_decay))
            step += 1
            n_window += 1
            loss_sum += loss
            first_bad = torch.where(loss.isfinite(), first_bad, first_bad.clamp(max=step))

            log_now = step % args.log_every == 0 or step == args.max_steps
            ckpt_now = step % args.ckpt_every == 0 or step == args.max_steps
            if log_now or ckpt_now:
                mean_loss = check_finite()
            if log_now:
                dt = (time.time() - t0) / n_window
                losses.append((step, mean_loss))
                log(f"step {step}/{args.max_steps} | loss {mean_loss:.4f} | lr {optimizer.param_groups[0]['lr']:.2e} | "
                    f"{1000 * dt:.1f} ms/step | {args.batch_size / dt:.0f} img/s | ETA {fmt_time(dt * (args.max_steps - step))}")
                loss_sum.zero_()
                n_window, t0 = 0, time.time()
            if master and args.sample_every and step % args.sample_every == 0:
                g = torch.Generator(device).manual_seed(args.seed)   # not the training RNG: resume stays exact
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    x = diffusion.sample(ema, (args.sample_n, channels, image_size, image_size),
                                         min(args.sample_steps, args.T), generator=g, device=device)
                save_grid(to_uint8(x).cpu().numpy(), os.path.join(args.out_dir, f"samples_{step:07d}.png"))
            if ckpt_now:
                saved = save()
        if stop and saved != step:   # Ctrl-C: ranks may be a step apart, so no collectives
            check_finite(reduce=False)
            saved = save(gather=False)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if world > 1:
            dist.destroy_process_group()
    return {"model": model, "ema": ema, "optimizer": optimizer, "step": step, "losses": losses, "config": config}


if __name__ == "__main__":
    main()
