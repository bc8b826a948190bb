"""
train.py -- train a DDPM or Soft Mixture Denoising (SMD) U-Net: the outer loop of Algorithm 1, on
one GPU or many.

    python train.py --dataset cifar10 --smd                  # SMD on CIFAR-10 (downloads to ./data)
    python train.py --dataset cifar10                        # the DDPM baseline
    python train.py --dataset fashion-mnist --image-size 16 --ch 16 --num-res-blocks 1 --attn-res "" --dropout 0 \\
        --norm-groups 4 --batch-size 64 --lr 2e-3 --warmup 50 --max-steps 1200 --out-dir out/quick   # CPU: minutes
    python train.py --dataset path/to/celeba --image-size 64 --smd   # any folder of images
    torchrun --standalone --nproc_per_node=8 train.py --dataset cifar10 --smd   # 8 GPUs, same global batch
    python train.py --resume --out-dir out                   # continue out/ckpt.pt where it stopped
    python train.py --init google/ddpm-cifar10-32 --smd --lr 2e-5 --warmup 0   # fine-tune DDPM's weights

Every flag is checked before any data or model is loaded (one line, exit 2), and so are those a
--resume restores. Writes to --out-dir, one run at a time: ckpt.pt (atomically, every --ckpt-every
steps, at the end and on Ctrl-C/SIGTERM), samples_<step>.png and log.txt; the run folder's
machinery is checkpoint.py's (resuming on several nodes needs --out-dir on a shared file system).
On CUDA: bf16 autocast, TF32, channels_last, torch.compile, fused AdamW, and the host waits for
the GPU only at log and checkpoint steps. On CPUs with <= 4 cores: one thread (--threads 0).
"""

import argparse
import copy
import dataclasses
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import cli
import pretrained
import smd
from data import DATASETS, NAMED_SIZES, make_batches, save_grid, to_uint8
from unet import UNet, UNetConfig


def get_parser():
    p = cli.Parser(__doc__, prog="train.py")
    p.add_argument("--dataset", default="cifar10", help=f"{' | '.join(DATASETS)} | path/to/image/folder")
    p.add_argument("--data-dir", default="data", help="where torchvision datasets are (or get downloaded)")
    p.add_argument("--image-size", type=cli.positive_int, help="named datasets: 32, 16 or 8 (average-pooled); folders: "
                   "resize + center crop (default: 32; folders 64)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random flips (default: on, off for mnist)")
    # the network: unet.UNetConfig's fields, with its defaults
    p.add_argument("--ch", type=cli.positive_int, default=UNetConfig.ch, help="base width")
    p.add_argument("--ch-mult", type=cli.positive_ints, help="e.g. 1,2,2,2 (default: by image size)")
    p.add_argument("--num-res-blocks", type=cli.positive_int, default=UNetConfig.num_res_blocks)
    p.add_argument("--attn-res", type=cli.int_list, default=UNetConfig.attn_res,
                   help='resolutions with self-attention ("": none)')
    p.add_argument("--dropout", type=cli.dropout, default=UNetConfig.dropout)
    p.add_argument("--norm-groups", type=cli.positive_int, default=UNetConfig.norm_groups,
                   help="GroupNorm: gcd(this, channels) groups")
    p.add_argument("--smd", action="store_true", help="Soft Mixture Denoising (else plain DDPM)")
    p.add_argument("--latent-dim", type=cli.positive_int, default=UNetConfig.latent_dim, help="SMD: size of eta, z_t")
    p.add_argument("--eta-samples", type=cli.positive_int, default=1, help="SMD: etas per example (Sec. 5.4)")
    p.add_argument("--init", help="start from published DDPM weights, diffusers' format: google/ddpm-cifar10-32, a "
                   "folder or a .bin file; they fix the network (default: none)")
    # the chain and the optimisation
    p.add_argument("--T", type=cli.int_at_least(2, "a chain needs 2 steps"), default=1000, help="diffusion steps")
    p.add_argument("--schedule", default="linear", choices=sorted(smd.SCHEDULES))
    p.add_argument("--objective", default="eps", choices=["eps", "v"], help="what the U-Net predicts (loss: eps's)")
    p.add_argument("--batch-size", type=cli.positive_int, default=128, help="global batch, split over the ranks")
    p.add_argument("--lr", type=cli.nonneg_float, default=2e-4, help="AdamW's learning rate after the warm-up")
    p.add_argument("--warmup", type=cli.nonneg_int, default=5000, help="linear learning-rate warm-up steps")
    p.add_argument("--ema-decay", type=cli.decay, default=0.9999, help="the EMA's decay, warmed up from 0.1")
    p.add_argument("--max-steps", type=cli.positive_int, default=800_000, help="training steps (DDPM's CIFAR-10: 800k)")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="weights, data order, noise")
    # the machine and the output
    cli.add_machine_flags(p)
    p.add_argument("--out-dir", default="out", help="the run folder: ckpt.pt, log.txt, samples_*.png")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt (every node must see it)")
    p.add_argument("--log-every", type=cli.positive_int, default=100, help="steps between log lines")
    p.add_argument("--ckpt-every", type=cli.positive_int, default=5000, help="steps between checkpoints")
    p.add_argument("--sample-every", type=cli.nonneg_int, default=10000, help="steps between sample grids (0: never)")
    p.add_argument("--sample-n", type=cli.positive_int, default=64, help="images in each sample grid")
    p.add_argument("--sample-steps", type=cli.int_at_least(2, "a sampler takes >= 2 steps"),
                   help="the grids' sampling steps (default: min(100, T))")
    return p


def check_args(args, parser, model_class, explicit=(), world=1, stored=()):
    """Refuse what cannot run, in one line naming the flag. `explicit`: the flags given on the
    command line; `stored`: those whose value came from the checkpoint (their messages say how
    to override them)."""
    def bad(dest, why):
        name = cli.flag(parser, dest)
        where = f" (stored in the checkpoint: pass {name} to override it)" if dest in stored else ""
        cli.fail(parser.prog, f"{name} {getattr(args, dest)!r}{where}: {why}")

    named = args.dataset in DATASETS
    if not named and not os.path.isdir(args.dataset):
        bad("dataset", f"neither {' | '.join(DATASETS)} nor a folder of images")
    if named and args.image_size not in (None, *NAMED_SIZES):
        bad("image_size", f"{args.dataset} is 32x32 (28x28 is padded), or average-pooled to 16 or 8: use one of those")
    if args.batch_size % world:
        bad("batch_size", f"not divisible by {world} ranks")
    if args.sample_every and (args.sample_steps or 0) > args.T:
        bad("sample_steps", f"the chain has only --T {args.T} steps")
    if args.eta_samples > 1 and not args.smd:
        bad("eta_samples", "draws several SMD etas per example: add --smd (or drop it)")
    size = args.image_size or (32 if named else 64)
    try:
        levels = len(UNetConfig(image_size=size, ch_mult=args.ch_mult).ch_mult)
    except ValueError as e:
        bad("ch_mult" if args.ch_mult else "image_size", str(e))
    if set(args.attn_res) - {size >> i for i in range(levels)}:
        bad("attn_res", f"the U-Net's resolutions are {[size >> i for i in range(levels)]}")
    try:   # the whole network's config: a model beyond the paper may refuse more
        model_class.config_class(**{**network_flags(args, model_class), "image_size": size})
    except ValueError as e:
        cli.fail(parser.prog, str(e))
    fixed = [k for k in network_flags(args, model_class) if k in explicit and k not in pretrained.RUN_CHOOSES]
    fixed += [k for k, v in pretrained.CHAIN.items() if getattr(args, k) != v]
    if args.init and fixed:
        bad("init", f"the weights fix the network and the chain ({pretrained.CHAIN}): drop "
                    f"{', '.join(cli.flag(parser, k) for k in fixed)}")


def network_flags(args, model_class):
    """{field: value} of the flags that fix the network (its config dataclass's fields), not the run."""
    fields = {f.name for f in dataclasses.fields(model_class.config_class)}
    return {k: v for k, v in vars(args).items() if k in fields}


def load_data(args, ckpt, model_class, prog, rank, local_rank, world, device):
    """(batches from the run's step on, the network's config, published weights or None). The
    first rank of each node reads (or downloads) the data before the others."""
    if world > 1 and local_rank:
        dist.barrier()
    cfg = model_class.config_class(**ckpt["model_config"]) if ckpt else None
    try:
        data, channels, size = make_batches(args.dataset, args.data_dir, args.batch_size,
                                            cfg.image_size if cfg else args.image_size, args.flip,
                                            min(4, os.cpu_count() or 1), args.seed, ckpt["step"] if ckpt else 0,
                                            rank, world, device)
        if cfg and cfg.channels != channels:
            raise ValueError(f"--resume: the data has {channels} channels, the checkpoint's model takes {cfg.channels}")
        init = None
        if cfg is None and args.init:
            weights, cfg, desc = pretrained.initial_model(args.init, vars(args), channels, size)
            init = (weights.state_dict(), desc)
        elif cfg is None:
            cfg = model_class.config_class(**{**network_flags(args, model_class), "image_size": size,
                                              "channels": channels})
    except (OSError, RuntimeError, ValueError) as e:
        cli.fail(prog, str(e))
    if world > 1 and not local_rank:
        dist.barrier()
    return data, cfg, init


def build(args, model_class, diffusion_class, cfg, ckpt, init, device, rank, world):
    """Model, EMA copy, optimiser and chain; restored from the checkpoint, or fresh."""
    torch.manual_seed(args.seed)   # the same initial weights on every rank
    model = model_class(cfg).to(device, memory_format=torch.channels_last if device.type == "cuda"
                                else torch.preserve_format)
    diffusion = diffusion_class(args.T, args.schedule, args.objective).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = smd.make_optimizer(model, args.lr, device)
    if ckpt:
        checkpoint.restore_run(ckpt, model, ema, optimizer, rank, world, args.seed)
        return model, ema, optimizer, diffusion
    if init:   # DDPM's weights; SMD's g_xi and f_phi keep their fresh init (f_phi's last layer is 0)
        for m in (model, ema):
            m.load_state_dict(init[0], strict=False)
        print(f"initialised from {init[1]}", flush=True)
    torch.manual_seed(args.seed + rank)   # per-rank noise, t and dropout
    return model, ema, optimizer, diffusion


def train(args, net, model, ema, optimizer, diffusion, data, step, meta, amp, loss_args, world, master):
    """Algorithm 1 (smd.train_step), the EMA, then log / sample / save on their schedules, until
    --max-steps or a Ctrl-C/SIGTERM. Returns (the last step, [(step, mean loss), ...])."""
    device, out = next(model.parameters()).device, args.out_dir
    ckpt_path, params, ema_params = os.path.join(out, "ckpt.pt"), list(model.parameters()), list(ema.parameters())
    loss_sum, first_bad = torch.zeros((), device=device), torch.full((), math.inf, device=device)
    n_window, t0, saved, losses = 0, time.time(), step or None, []
    save = lambda: checkpoint.save_run(ckpt_path, model, ema, optimizer, step, meta, world, master, saved)
    stop = checkpoint.StopRequest(world)
    try:
        while step < args.max_steps and not stop():
            x0 = next(data)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
            loss = smd.train_step(net, diffusion, optimizer, x0, 1.0, amp, **loss_args(args, step))
            smd.ema_update(ema_params, params, smd.ema_decay(step, args.ema_decay))
            step, n_window, loss_sum = step + 1, n_window + 1, loss_sum + loss
            first_bad = torch.where(loss.isfinite(), first_bad, first_bad.clamp(max=step))

            log_now = step % args.log_every == 0 or step == args.max_steps
            ckpt_now = step % args.ckpt_every == 0 or step == args.max_steps
            if log_now or ckpt_now:
                loss_mean = checkpoint.mean_loss(loss_sum, first_bad, n_window, world, saved, ckpt_path)
            if log_now:
                dt = (time.time() - t0) / n_window
                losses.append((step, loss_mean))
                if master:
                    lr, left = optimizer.param_groups[0]["lr"], cli.fmt_time(dt * (args.max_steps - step))
                    checkpoint.log(f"step {step}/{args.max_steps} | loss {loss_mean:.4f} | lr {lr:.2e} | "
                                   f"{1000 * dt:.1f} ms/step | {args.batch_size / dt:.0f} img/s | ETA {left}", out)
                loss_sum, n_window, t0 = torch.zeros_like(loss_sum), 0, time.time()
            if master and args.sample_every and step % args.sample_every == 0:
                g = torch.Generator(device).manual_seed(args.seed)   # not the training RNG: resume stays exact
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    x = diffusion.sample(ema, (args.sample_n, model.channels, model.image_size, model.image_size),
                                         args.sample_steps or min(100, args.T), generator=g)
                save_grid(to_uint8(x).cpu().numpy(), os.path.join(out, f"samples_{step:07d}.png"))
            if ckpt_now:
                saved = save()
        if stop.signal_name and saved != step:   # every rank stopped after the same step
            checkpoint.mean_loss(loss_sum, first_bad, n_window, world, saved, ckpt_path)
            saved = save()
        if master:
            checkpoint.log(f"stopped by {stop.signal_name} at step {step}" if stop.signal_name
                           else f"finished at step {step}", out)
    finally:
        stop.close()
    return step, losses


def main(argv=None, parser=None, model_class=UNet, diffusion_class=smd.Diffusion,
         loss_args=lambda args, step: {"eta_samples": args.eta_samples}):
    """Train. A model beyond the paper (beyond/train.py) passes its own parser, network and
    chain classes and loss_args(args, step): the keyword arguments of its diffusion's loss."""
    # -- the command line: every flag checked (with what --resume restores), the folder locked --
    parser = parser or get_parser()
    args, explicit = parser.parse_args(argv), cli.explicit_args(parser, argv)
    rank, local_rank, world, device = cli.setup_distributed(args.device)
    master = rank == 0
    ckpt, stored = checkpoint.open_run(parser.prog, args, explicit, parser, model_class)
    check_args(args, parser, model_class, explicit, world, stored)
    args.flip = args.dataset != "mnist" if args.flip is None else args.flip
    lock = checkpoint.lock_run(parser.prog, args.out_dir) if master else None
    threads = cli.set_threads(args.threads)
    compile_, amp = cli.cuda_defaults(device, args.compile, args.amp)
    try:
        # -- the data (from the step the run stopped at), the network, its optimiser and EMA -----
        data, cfg, init = load_data(args, ckpt, model_class, parser.prog, rank, local_rank, world, device)
        model, ema, optimizer, diffusion = build(args, model_class, diffusion_class, cfg, ckpt, init, device, rank,
                                                 world)
        net = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
        net = torch.compile(net) if compile_ else net   # compile(DDP(...)): all-reduces overlap the compiled backward
        step = ckpt["step"] if ckpt else 0
        network = network_flags(args, model_class)
        config = {k: v for k, v in vars(args).items() if k not in network}
        meta = {"config": config, "model_config": dataclasses.asdict(cfg), "model_class":
                checkpoint.class_path(model_class), "diffusion_class": checkpoint.class_path(diffusion_class)}
        if master:
            cpu = f" ({threads} thread{'s' * (threads > 1)})" if device.type == "cpu" else ""
            size = f"{cfg.channels}x{cfg.image_size}x{cfg.image_size}"
            checkpoint.log_start(args.out_dir, " ".join([parser.prog, *(sys.argv[1:] if argv is None else argv)]),
                                 step, {**config, "model_config": meta["model_config"]},
                                 f"{model_class.__name__}{' with SMD' * getattr(cfg, 'smd', False)}, "
                                 f"{sum(p.numel() for p in model.parameters()):,} parameters, {args.dataset} {size}, "
                                 f"batch {args.batch_size} on {world} x {device}{cpu}, compile={compile_}, bf16={amp}")

        # -- train: Algorithm 1, the EMA, logs, samples, checkpoints ----------------------------
        step, losses = train(args, net, model, ema, optimizer, diffusion, data, step, meta, amp, loss_args,
                             world, master)
    finally:
        if lock:
            lock.close()   # the OS releases it when the process ends; a caller in this process needs it now
        if world > 1:
            dist.destroy_process_group()
    return {"model": model, "ema": ema, "optimizer": optimizer, "step": step, "losses": losses,
            "config": config, "model_config": cfg}


if __name__ == "__main__":
    main()
