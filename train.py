"""
train.py -- train a DDPM or Soft Mixture Denoising (SMD) U-Net, on one GPU or many.

    python train.py --dataset cifar10 --smd                  # SMD on CIFAR-10 (downloads to ./data)
    python train.py --dataset cifar10                        # the DDPM baseline
    python train.py --dataset fashion-mnist --smd            # offline: reads /usr/share/datasets/fashion-mnist
    python train.py --dataset path/to/celeba --image-size 64 --smd   # any folder of images
    torchrun --standalone --nproc_per_node=8 train.py --dataset cifar10 --smd   # 8 GPUs, same global batch
    python train.py --resume --out-dir out                   # continue out/ckpt.pt where it stopped
    python train.py --init google/ddpm-cifar10-32 --smd --lr 2e-5 --warmup 0   # fine-tune DDPM's weights
    python train.py --dataset mnist --ch 32 --ch-mult 1,2 --num-res-blocks 1 --attn-res "" \\
        --batch-size 16 --max-steps 200 --log-every 20       # a CPU smoke test

Writes to --out-dir: ckpt.pt (atomically, every --ckpt-every steps, at the end and on
Ctrl-C), samples_<step>.png every --sample-every steps, and log.txt. On CUDA it trains in
bf16 autocast with TF32, channels_last, torch.compile and fused AdamW; in-memory datasets
(CIFAR-10, MNIST) live on the GPU and nothing syncs the host except at log/ckpt steps.
"""

import argparse
import copy
import dataclasses
import math
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import mixture
import smd
from checkpoint import (MODEL_FIELDS, build_diffusion, cuda_defaults, fmt_time, load_pretrained, model_config,
                        read_checkpoint, save_checkpoint)
from data import make_batches, save_grid, to_uint8
from unet import UNet, UNetConfig

RUN_FIXED = ("dataset", "T", "schedule", "objective")   # with the model's fields: what --resume may not change
MACHINE = ("resume", "out_dir", "device", "compile", "amp", "workers")   # never taken from a checkpoint


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
    # the network: unet.UNetConfig's fields, with its defaults
    p.add_argument("--ch", type=int, default=UNetConfig.ch)
    p.add_argument("--ch-mult", type=int_tuple, default=None, help="e.g. 1,2,2,2 (default: by image size)")
    p.add_argument("--num-res-blocks", type=int, default=UNetConfig.num_res_blocks)
    p.add_argument("--attn-res", type=int_tuple, default=UNetConfig.attn_res, help='resolutions with attention, "" for none')
    p.add_argument("--dropout", type=float, default=UNetConfig.dropout)
    p.add_argument("--smd", action="store_true", help="Soft Mixture Denoising (else plain DDPM)")
    p.add_argument("--latent-dim", type=int, default=UNetConfig.latent_dim, help="SMD: dimension of eta and z_t")
    p.add_argument("--mixture", dest="components", type=int, default=UNetConfig.components, metavar="K",
                   help="beyond the paper: a mixture of K Gaussians per step, trained by its exact likelihood")
    p.add_argument("--learned-var", action="store_true", help="mixture: learn each component's variance")
    p.add_argument("--anneal", type=mixture.start_temperature, default=1.0, metavar="TAU0",
                   help="mixture: anneal the responsibilities' temperature from TAU0 to 1 over the first half of "
                        "--max-steps (against dead components; 1: off)")
    p.add_argument("--init", default=None, help="start from published DDPM weights (diffusers' format): "
                   "google/ddpm-cifar10-32, a folder or a .bin/.safetensors file; they fix the network's shape")
    # the chain and the optimisation
    p.add_argument("--eta-samples", type=int, default=1, help="SMD: etas per example in the loss (Sec. 5.4)")
    p.add_argument("--T", type=int, default=1000, help="diffusion steps")
    p.add_argument("--schedule", default="linear", choices=sorted(smd.SCHEDULES))
    p.add_argument("--objective", default="eps", choices=["eps", "v"],
                   help="what the U-Net predicts; the loss is ||eps - eps_hat||^2 either way")
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split over the ranks")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=5000, help="linear learning-rate warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--max-steps", type=int, default=800_000)
    p.add_argument("--seed", type=int, default=0)
    # the machine and the output
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


def flag(dest):
    """The command-line flag of an argument (--mixture for components)."""
    return next(a.option_strings[0] for a in get_parser()._actions if a.dest == dest)


def explicit_args(argv):
    """Only the options given on the command line (resume checks them against the checkpoint)."""
    p = get_parser()
    for action in p._actions:   # argparse has no public way to ask "was this flag given?"
        action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))

# -----------------------------------------------------------------------------
# resume


def resume(args, explicit, path):
    """(checkpoint, its UNetConfig) for --resume. The run keeps the checkpoint's network, data
    and chain, and takes its other settings unless flags say otherwise; a flag that would
    change the network, the data or the chain stops the run with a message."""
    try:
        ckpt = read_checkpoint(path, need=("config", "model", "ema", "optimizer", "step", "rng"))
        cfg = model_config(ckpt)
    except (OSError, RuntimeError, ValueError) as e:
        raise SystemExit(f"train.py: --resume: {e}")
    run = {"objective": "eps", **ckpt["config"]}   # checkpoints from before --objective predicted eps
    fixed = {**{k: run[k] for k in RUN_FIXED}, **dataclasses.asdict(cfg)}
    bad = [f"{flag(k)} {explicit[k]!r} (checkpoint: {fixed[k]!r})"
           for k in fixed if k in explicit and explicit[k] != fixed[k]]
    if bad:
        raise SystemExit(f"train.py: --resume: this run contradicts {path}: {'; '.join(bad)}. Drop these flags "
                         f"to continue that run, or start a new one in another --out-dir.")
    for k, v in ckpt["config"].items():
        if k not in explicit and k not in MACHINE:
            setattr(args, k, v)
    return ckpt, cfg


def restore_rng(states, rank, world, seed, step):
    if len(states) != world:   # e.g. a Ctrl-C checkpoint of a DDP run, or a different world size
        print(f"rank {rank}: the checkpoint has RNG states of {len(states)} ranks, not {world}: reseeding")
        return torch.manual_seed(seed + rank + 1_000_003 * step)
    torch.set_rng_state(states[rank]["torch"])
    if states[rank]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]["cuda"])

def initial_weights(args, explicit, channels, image_size):
    """(DDPM U-Net, the UNetConfig of this run, description) for --init: the published weights
    fix the network's shape; --smd, --latent-dim and --dropout are this run's."""
    given = [k for k in MODEL_FIELDS if k in explicit and k not in ("smd", "latent_dim", "dropout")]
    if given or args.T != 1000 or args.schedule != "linear" or args.objective != "eps":
        raise ValueError(f"--init {args.init}: the weights fix the network and the chain (T=1000, linear betas, "
                         f"eps): drop {', '.join(map(flag, given)) or '--T/--schedule/--objective'}")
    model, cfg, desc = load_pretrained(args.init)
    if (cfg.channels, cfg.image_size) != (channels, image_size):
        raise ValueError(f"--init {args.init} takes {cfg.channels}x{cfg.image_size}x{cfg.image_size} images, "
                         f"--dataset {args.dataset} has {channels}x{image_size}x{image_size}")
    return model, dataclasses.replace(cfg, smd=args.smd, latent_dim=args.latent_dim, dropout=args.dropout), desc

# -----------------------------------------------------------------------------
# the loop's pieces: processes, signals, logging, the loss check, saving


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


def log(msg, out_dir):
    print(msg, flush=True)
    with open(os.path.join(out_dir, "log.txt"), "a") as f:
        f.write(msg + "\n")


def mean_loss(loss_sum, first_bad, n, world, saved, ckpt_path, reduce=True):
    """The one host sync: the mean loss over the last n steps (over all ranks if `reduce`);
    stops the run on a NaN/inf loss, naming its step and the last good checkpoint."""
    s, b = loss_sum.clone(), first_bad.clone()
    if world > 1 and reduce:
        dist.all_reduce(s)
        dist.all_reduce(b, op=dist.ReduceOp.MIN)
    s, b = torch.stack([s, b]).tolist()
    if math.isfinite(b):
        last = f"the last good checkpoint is {ckpt_path} (step {saved})" if saved else "no checkpoint was written"
        raise SystemExit(f"train.py: non-finite loss at step {int(b)}; stopping without saving: {last}.")
    return s / max(n, 1) / (world if reduce else 1)


def rng_states(device, world, gather):
    """This process's RNG states; under DDP a list over ranks (gathered unless `gather` is off)."""
    state = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
    if world == 1 or not gather:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def save(path, model, ema, optimizer, step, meta, device, world, master, gather=True):
    """Refuse non-finite weights, copy the model's buffers into the EMA (which averages
    parameters only), collect the RNG states and, on rank 0, write the checkpoint atomically.
    meta: {'config': ..., 'model_config': ...}. Returns the step saved."""
    params = [*model.parameters(), *ema.parameters()]
    if not torch.stack([torch.isfinite(p).all() for p in params]).all().item():
        raise SystemExit(f"train.py: non-finite parameters at step {step}; stopping without saving.")
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
    rng = rng_states(device, world, gather)
    if master:
        save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "rng": rng, **meta}, path)
        log(f"saved {path} at step {step}", os.path.dirname(path))
    return step

# -----------------------------------------------------------------------------


def main(argv=None):
    # -- processes and the machine ---------------------------------------------------
    args, explicit = get_parser().parse_args(argv), explicit_args(argv)
    rank, local_rank, world, device = setup_distributed(args.device)
    master, cuda = rank == 0, device.type == "cuda"
    compile_, amp = cuda_defaults(device, args.compile, args.amp)

    # -- a new run, or the checkpoint's ----------------------------------------------
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt, cfg = resume(args, explicit, ckpt_path) if args.resume else (None, None)
    if ckpt is None and os.path.exists(ckpt_path):
        raise SystemExit(f"train.py: {ckpt_path} exists: pass --resume to continue it, or choose another --out-dir")
    if args.batch_size % world:
        raise SystemExit(f"train.py: --batch-size {args.batch_size} is not divisible by {world} ranks")
    args.flip = args.dataset != "mnist" if args.flip is None else args.flip
    step = ckpt["step"] if ckpt else 0

    # -- data: the batches continue where the run stopped ----------------------------
    if world > 1 and not master:
        dist.barrier()   # rank 0 downloads first
    try:
        data, channels, image_size = make_batches(args.dataset, args.data_dir, args.batch_size,
                                                  cfg.image_size if cfg else args.image_size, args.flip, args.workers,
                                                  args.seed, step, rank, world, device)
        if cfg and cfg.channels != channels:
            raise ValueError(f"--resume: the data has {channels} channels, the checkpoint's model takes {cfg.channels}")
        init_model = None
        if cfg is None and args.init:
            init_model, cfg, init_desc = initial_weights(args, explicit, channels, image_size)
        elif cfg is None:
            cfg = UNetConfig(image_size=image_size, channels=channels,
                             **{k: v for k, v in vars(args).items() if k in MODEL_FIELDS and k != "image_size"})
    except (OSError, RuntimeError, ValueError) as e:
        raise SystemExit(f"train.py: {e}")
    if world > 1 and master:
        dist.barrier()
    if args.anneal != 1.0 and not cfg.components:
        raise SystemExit(f"train.py: --anneal {args.anneal} anneals a mixture's responsibilities: add --mixture K")

    # -- model, EMA, optimiser ---------------------------------------------------------
    torch.manual_seed(args.seed)   # the same initial weights on every rank
    model = UNet(cfg).to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    diffusion = build_diffusion(vars(args)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = smd.make_optimizer(model, args.lr, device, args.weight_decay)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_rng(ckpt["rng"], rank, world, args.seed, step)
        if master:
            print(f"RESUMED {ckpt_path} at step {step} (of --max-steps {args.max_steps})", flush=True)
    else:
        if init_model:   # DDPM's weights; SMD's g_xi and f_phi keep their fresh init (f_phi's last layer is 0)
            model.load_state_dict(init_model.state_dict(), strict=False)
            ema.load_state_dict(init_model.state_dict(), strict=False)
            if master:
                print(f"initialised from {init_desc}", flush=True)
        torch.manual_seed(args.seed + rank)   # per-rank noise, t and dropout
    params, ema_params = list(model.parameters()), list(ema.parameters())
    net = torch.compile(model) if compile_ else model
    if world > 1:
        net = DDP(net, device_ids=[local_rank] if cuda else None)
    config = {k: v for k, v in vars(args).items() if k not in MODEL_FIELDS}
    meta = {"config": config, "model_config": dataclasses.asdict(cfg)}
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        kind = "SMD" if cfg.smd else f"mixture-of-{cfg.components}" if cfg.components else "DDPM"
        print(f"{kind} U-Net, {sum(p.numel() for p in params):,} parameters, {args.dataset} "
              f"{channels}x{image_size}x{image_size}, batch {args.batch_size} on {world} x {device}, "
              f"compile={compile_}, bf16={amp}", flush=True)

    # -- train: Algorithm 1, EMA, then log / sample / save on their schedules ----------
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), math.inf, device=device)   # the first step with a non-finite loss
    n_window, t0, saved, losses = 0, time.time(), step if ckpt else None, []
    stop, old_handlers = stop_flag()
    try:
        while step < args.max_steps and not stop:
            x0 = next(data)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
            tau = mixture.temperature(step, args.max_steps, args.anneal)
            loss = smd.train_step(net, diffusion, optimizer, x0, args.eta_samples, args.grad_clip, amp, tau)
            smd.ema_update(ema_params, params, smd.ema_decay(step, args.ema_decay))
            step += 1
            n_window += 1
            loss_sum += loss
            first_bad = torch.where(loss.isfinite(), first_bad, first_bad.clamp(max=step))

            log_now = step % args.log_every == 0 or step == args.max_steps
            ckpt_now = step % args.ckpt_every == 0 or step == args.max_steps
            if log_now or ckpt_now:
                loss_mean = mean_loss(loss_sum, first_bad, n_window, world, saved, ckpt_path)
            if log_now:
                dt = (time.time() - t0) / n_window
                losses.append((step, loss_mean))
                if master:
                    log(f"step {step}/{args.max_steps} | loss {loss_mean:.4f} | lr {optimizer.param_groups[0]['lr']:.2e} | "
                        f"{1000 * dt:.1f} ms/step | {args.batch_size / dt:.0f} img/s | "
                        f"ETA {fmt_time(dt * (args.max_steps - step))}", args.out_dir)
                loss_sum.zero_()
                n_window, t0 = 0, time.time()
            if master and args.sample_every and step % args.sample_every == 0:
                g = torch.Generator(device).manual_seed(args.seed)   # not the training RNG: resume stays exact
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    x = diffusion.sample(ema, (args.sample_n, channels, image_size, image_size),
                                         min(args.sample_steps, args.T), generator=g, device=device)
                save_grid(to_uint8(x).cpu().numpy(), os.path.join(args.out_dir, f"samples_{step:07d}.png"))
            if ckpt_now:
                saved = save(ckpt_path, model, ema, optimizer, step, meta, device, world, master)
        if stop and saved != step:   # Ctrl-C: ranks may be a step apart, so no collectives
            mean_loss(loss_sum, first_bad, n_window, world, saved, ckpt_path, reduce=False)
            saved = save(ckpt_path, model, ema, optimizer, step, meta, device, world, master, gather=False)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if world > 1:
            dist.destroy_process_group()
    return {"model": model, "ema": ema, "optimizer": optimizer, "step": step, "losses": losses,
            "config": config, "model_config": cfg}


if __name__ == "__main__":
    main()
