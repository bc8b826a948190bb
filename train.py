"""
train.py -- train a DDPM or Soft Mixture Denoising (SMD) U-Net, on one GPU or many.

    python train.py --dataset cifar10 --smd                  # SMD on CIFAR-10 (downloads to ./data)
    python train.py --dataset cifar10                        # the DDPM baseline
    python train.py --dataset fashion-mnist --smd --ch 16 --ch-mult 1,2 --num-res-blocks 1 --attn-res "" \\
        --latent-dim 16 --batch-size 16 --lr 1e-3 --warmup 50 --max-steps 300 --sample-every 300 --sample-n 16 \\
        --sample-steps 20 --out-dir out/quick
                                                             # CPU, offline (Debian's dataset-fashion-mnist)
    python train.py --dataset path/to/celeba --image-size 64 --smd   # any folder of images
    torchrun --standalone --nproc_per_node=8 train.py --dataset cifar10 --smd   # 8 GPUs, same global batch
    python train.py --resume --out-dir out                   # continue out/ckpt.pt where it stopped
    python train.py --init google/ddpm-cifar10-32 --smd --lr 2e-5 --warmup 0   # fine-tune DDPM's weights
    python train.py --dataset fashion-mnist --categorical 10 --learned-var --anneal 1e6 --T 5  # beyond the paper

Every flag is checked before any data or model is loaded (one line and exit 2 if wrong), and
so are the flags a --resume restores. Writes to --out-dir, one run at a time (a second run there
is refused): ckpt.pt (atomically, every --ckpt-every steps, at the end and on Ctrl-C/SIGTERM),
samples_<step>.png every --sample-every steps, and log.txt (the command line, the config, each
resume and stop). On CUDA it trains in bf16 autocast with TF32, channels_last, torch.compile and
fused AdamW; in-memory datasets live on the GPU and nothing syncs the host except at log/ckpt
steps. On CPU machines with <= 4 cores it uses one thread (--threads 0), which was 7x faster.
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import categorical
import cli
import smd
from checkpoint import (MODEL_FIELDS, build_diffusion, build_model, load_pretrained, lock_run, model_config,
                        read_checkpoint, restore_rng, rng_states, save_checkpoint)
from data import DATASETS, make_batches, save_grid, to_uint8
from unet import UNetConfig

RUN_FIXED = ("dataset", "T", "schedule", "objective")   # with the model's fields: what --resume may not change
MACHINE = ("resume", "out_dir", "device", "compile", "amp", "threads")   # never taken from a checkpoint
PROG = "train.py"


def get_parser():
    p = cli.Parser(__doc__, prog=PROG)
    p.add_argument("--dataset", default="cifar10", help=f"{' | '.join(DATASETS)} | path/to/image/folder")
    p.add_argument("--data-dir", default="data", help="where torchvision datasets are (or get downloaded)")
    p.add_argument("--image-size", type=cli.positive_int, default=None,
                   help="image folders: resize + center crop (default 64); named datasets are 32")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on, off for mnist)")
    # the network: unet.UNetConfig's fields, with its defaults
    p.add_argument("--ch", type=cli.positive_int, default=UNetConfig.ch, help="base width")
    p.add_argument("--ch-mult", type=cli.positive_ints, default=None, help="e.g. 1,2,2,2 (default: by image size)")
    p.add_argument("--num-res-blocks", type=cli.positive_int, default=UNetConfig.num_res_blocks)
    p.add_argument("--attn-res", type=cli.int_list, default=UNetConfig.attn_res,
                   help='resolutions with attention, "" for none')
    p.add_argument("--dropout", type=cli.dropout, default=UNetConfig.dropout)
    p.add_argument("--norm-groups", type=cli.positive_int, default=UNetConfig.norm_groups, help="gcd(this, ch) GroupNorm groups")
    p.add_argument("--smd", action="store_true", help="Soft Mixture Denoising (else plain DDPM)")
    p.add_argument("--latent-dim", type=cli.positive_int, default=UNetConfig.latent_dim, help="SMD: size of eta, z_t")
    p.add_argument("--eta-samples", type=cli.positive_int, default=1, help="SMD: etas per example (Sec. 5.4)")
    p.add_argument("--init", default=None, help="start from published DDPM weights (diffusers' format): "
                   "google/ddpm-cifar10-32, a folder or a .bin file; they fix the network's shape")
    # beyond the paper
    p.add_argument("--categorical", dest="components", type=cli.nonneg_int, default=0, metavar="K",
                   help="a categorical mixture of K Gaussians per step, trained by its exact likelihood (0: off)")
    p.add_argument("--learned-var", action="store_true", help="categorical: learn each component's variance")
    p.add_argument("--anneal", type=cli.temperature, default=1.0, metavar="TAU0",
                   help="categorical: anneal the responsibilities' temperature from TAU0 to 1 over the first half "
                        "of --max-steps (against dead components; 1: off)")
    # the chain and the optimisation
    p.add_argument("--T", type=cli.int_at_least(2, "a chain needs 2 steps"), default=1000, help="diffusion steps")
    p.add_argument("--schedule", default="linear", choices=sorted(smd.SCHEDULES))
    p.add_argument("--objective", default="eps", choices=["eps", "v"],
                   help="what the U-Net predicts; the loss is ||eps - eps_hat||^2 either way")
    p.add_argument("--batch-size", type=cli.positive_int, default=128, help="global batch, split over the ranks")
    p.add_argument("--lr", type=cli.nonneg_float, default=2e-4)
    p.add_argument("--warmup", type=cli.nonneg_int, default=5000, help="linear learning-rate warm-up steps")
    p.add_argument("--ema-decay", type=cli.decay, default=0.9999)
    p.add_argument("--max-steps", type=cli.positive_int, default=800_000)
    p.add_argument("--seed", type=cli.nonneg_int, default=0)
    # the machine and the output
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--threads", type=cli.nonneg_int, default=0, help="CPU threads (0: 1 on <= 4 cores, else torch's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast; default: on with CUDA")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    p.add_argument("--log-every", type=cli.positive_int, default=100)
    p.add_argument("--ckpt-every", type=cli.positive_int, default=5000)
    p.add_argument("--sample-every", type=cli.nonneg_int, default=10000, help="0: never")
    p.add_argument("--sample-n", type=cli.positive_int, default=64)
    p.add_argument("--sample-steps", type=cli.int_at_least(2, "a sampler takes >= 2 steps"), default=None,
                   help="sampling steps of the in-run grids (default: min(100, T))")
    return p


def flag(dest):
    """The command-line flag of an argument (--categorical for components)."""
    return next(a.option_strings[0] for a in get_parser()._actions if a.dest == dest)


def explicit_args(argv):
    """Only the options given on the command line (resume checks them against the checkpoint)."""
    p = get_parser()
    for action in p._actions:   # argparse has no public way to ask "was this flag given?"
        action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))

# -----------------------------------------------------------------------------
# every check before any work: flags, and the flags a checkpoint restores


def check_args(args, world=1, stored=()):
    """Refuse what cannot run, in one line naming the flag. `stored`: flags whose value came
    from the checkpoint; their messages say how to override them."""
    def bad(dest, why):
        where = f" (stored in the checkpoint: pass {flag(dest)} to override it)" if dest in stored else ""
        cli.fail(PROG, f"{flag(dest)} {getattr(args, dest)!r}{where}: {why}")

    parser = {a.dest: a for a in get_parser()._actions}
    for dest in stored:   # a stored value passes the same argparse type as a typed one
        kind = parser[dest].type if dest in parser else None
        if kind in (int, float, None) or getattr(args, dest) is None or isinstance(getattr(args, dest), (list, tuple)):
            continue
        try:
            kind(str(getattr(args, dest)))
        except argparse.ArgumentTypeError as e:
            bad(dest, str(e))
    if args.dataset not in DATASETS and not os.path.isdir(args.dataset):
        bad("dataset", f"neither {' | '.join(DATASETS)} nor a folder of images")
    if args.dataset in DATASETS and args.image_size not in (None, 32):
        bad("image_size", f"{args.dataset} is 32x32 (28x28 is padded): --image-size is for image folders")
    if args.batch_size % world:
        bad("batch_size", f"not divisible by {world} ranks")
    if args.sample_every and (args.sample_steps or 0) > args.T:
        bad("sample_steps", f"the chain has only --T {args.T} steps")
    if args.smd and args.components:
        bad("components", "SMD (--smd) and the categorical denoiser are two different models: choose one")
    for dest, need in (("anneal", args.anneal != 1.0), ("learned_var", args.learned_var)):
        if need and not args.components:
            bad(dest, "applies to a categorical model: add --categorical K")
    if args.eta_samples > 1 and not args.smd:
        bad("eta_samples", "draws several SMD etas per example: add --smd (or drop it)")
    if args.init and args.components:
        bad("init", "published DDPM weights start a DDPM or SMD model, not a categorical one")
    size = 32 if args.dataset in DATASETS else args.image_size or 64
    try:
        cfg = UNetConfig(image_size=size, ch_mult=args.ch_mult)
    except ValueError as e:
        bad("ch_mult" if args.ch_mult else "image_size", str(e))
    if set(args.attn_res) - {size >> i for i in range(len(cfg.ch_mult))}:
        bad("attn_res", f"the U-Net's resolutions are {[size >> i for i in range(len(cfg.ch_mult))]}")


def resume(args, explicit, path):
    """The checkpoint of --resume. The run keeps its network, data and chain, and takes its other
    settings unless flags say otherwise; a flag that would change the network, the data or the
    chain stops the run with a message. Returns (checkpoint, the flags restored from it)."""
    try:
        ckpt = read_checkpoint(path, need=("config", "model", "ema", "optimizer", "step", "rng"))
    except (OSError, RuntimeError, ValueError) as e:
        cli.fail(PROG, f"--resume: {e}" + ("; start a new run without --resume" if "no checkpoint" in str(e) else ""))
    run = ckpt["config"]
    fixed = {**{k: run[k] for k in RUN_FIXED}, **{k: v for k, v in ckpt["model_config"].items()
                                                   if k not in ("image_size", "channels")}}
    fixed = {k: list(v) if isinstance(v, tuple) else v for k, v in fixed.items()}
    bad = [f"{flag(k)} {explicit[k]!r} (checkpoint: {fixed[k]!r})" for k in fixed
           if k in explicit and (list(explicit[k]) if isinstance(explicit[k], tuple) else explicit[k]) != fixed[k]]
    if bad:
        cli.fail(PROG, f"--resume: this run contradicts {path}: {'; '.join(bad)}. Drop these flags to continue "
                       f"that run, or start a new one in another --out-dir")
    stored = []
    for k, v in {**run, **ckpt["model_config"]}.items():
        if k not in explicit and k not in MACHINE and hasattr(args, k):
            setattr(args, k, v)
            stored.append(k)
    if ckpt["step"] >= args.max_steps:
        cli.fail(PROG, f"--resume: {path} is already at step {ckpt['step']} of --max-steps {args.max_steps}: "
                       f"pass a larger --max-steps to train on")
    return ckpt, stored


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
# the run folder: one run at a time, its log, its checkpoint


def log(msg, out_dir):
    print(msg, flush=True)
    with open(os.path.join(out_dir, "log.txt"), "a") as f:
        f.write(msg + "\n")


def log_header(args, argv, step, cfg, out_dir):
    """log.txt records each start: the time, the command line, where it starts, the config."""
    command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
    log(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {command}", out_dir)
    log(f"{'resumed at' if step else 'new run from'} step {step}; config "
        + json.dumps({**vars(args), "model_config": dataclasses.asdict(cfg)}, default=list), out_dir)


def save(path, model, ema, optimizer, step, meta, device, world, master, saved, gather=True):
    """Refuse non-finite weights, copy the model's buffers into the EMA (which averages
    parameters only), collect the RNG states and, on rank 0, write the checkpoint atomically.
    A failed write (disk full, read-only) keeps the previous checkpoint and stops the run."""
    params = [*model.parameters(), *ema.parameters()]
    if not torch.stack([torch.isfinite(p).all() for p in params]).all().item():
        raise SystemExit(f"{PROG}: non-finite parameters at step {step}; stopping without saving")
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
    rng = rng_states(device, world, gather)
    if master:
        ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "rng": rng, **meta}
        try:
            save_checkpoint(ckpt, path)
        except OSError as e:
            need = 4 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20   # model, EMA, Adam x2
            kept = f"the checkpoint of step {saved} is intact" if saved else "no checkpoint was written before"
            log(f"could not write {path} at step {step} ({e.strerror or e}); {kept}. A checkpoint needs about "
                f"{need:.0f} MiB: free space, then --resume", os.path.dirname(path))
            raise SystemExit(1)
        log(f"saved {path} at step {step}", os.path.dirname(path))
    return step


# -----------------------------------------------------------------------------
# processes, signals, the loss check


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
        raise SystemExit(f"{PROG}: non-finite loss at step {int(b)}; stopping without saving: {last}.")
    return s / max(n, 1) / (world if reduce else 1)

# -----------------------------------------------------------------------------
# the phases of main


def open_run(args, explicit, ckpt_path, world, master):
    """Check every flag once, with the values --resume restores, then lock the run folder; the checkpoint or None."""
    cli.writable_dir(PROG, args.out_dir, "--out-dir")
    ckpt, stored = resume(args, explicit, ckpt_path) if args.resume else (None, [])
    if ckpt is None and os.path.exists(ckpt_path):
        cli.fail(PROG, f"{ckpt_path} exists: pass --resume to continue it, or choose another --out-dir")
    check_args(args, world, stored)
    args.flip = args.dataset != "mnist" if args.flip is None else args.flip
    try:
        return ckpt, lock_run(args.out_dir) if master else None
    except OSError as e:
        cli.fail(PROG, f"{e}: wait for it to finish, stop it, or choose another --out-dir")


def load_data(args, explicit, ckpt, rank, world, device):
    """(batches from the run's step on, the network's config, published weights or None)."""
    if world > 1 and rank:
        dist.barrier()   # rank 0 downloads first
    cfg = model_config(ckpt["model_config"]) if ckpt else None
    try:
        data, channels, image_size = make_batches(args.dataset, args.data_dir, args.batch_size,
                                                  cfg.image_size if cfg else args.image_size, args.flip,
                                                  min(4, os.cpu_count() or 1),
                                                  args.seed, ckpt["step"] if ckpt else 0, rank, world, device)
        if cfg and cfg.channels != channels:
            raise ValueError(f"--resume: the data has {channels} channels, the checkpoint's model takes {cfg.channels}")
        init = None
        if cfg is None and args.init:
            weights, cfg, desc = initial_weights(args, explicit, channels, image_size)
            init = (weights, desc)
        elif cfg is None:
            fields = {k: v for k, v in vars(args).items() if k in MODEL_FIELDS and k not in ("image_size", "channels")}
            cfg = model_config({**fields, "image_size": image_size, "channels": channels})
    except (OSError, RuntimeError, ValueError) as e:
        cli.fail(PROG, str(e))
    if world > 1 and not rank:
        dist.barrier()
    return data, cfg, init


def build(args, cfg, ckpt, init, device, rank, world):
    """Model, EMA copy, optimiser and chain; restored from the checkpoint, or fresh."""
    torch.manual_seed(args.seed)   # the same initial weights on every rank
    model = build_model(cfg).to(device, memory_format=torch.channels_last if device.type == "cuda"
                                else torch.preserve_format)
    diffusion = build_diffusion(vars(args), categorical=bool(args.components)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = smd.make_optimizer(model, args.lr, device)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_rng(ckpt["rng"], rank, world, args.seed, ckpt["step"])
        return model, ema, optimizer, diffusion
    if init:   # DDPM's weights; SMD's g_xi and f_phi keep their fresh init (f_phi's last layer is 0)
        model.load_state_dict(init[0].state_dict(), strict=False)
        ema.load_state_dict(init[0].state_dict(), strict=False)
        print(f"initialised from {init[1]}", flush=True)
    torch.manual_seed(args.seed + rank)   # per-rank noise, t and dropout
    return model, ema, optimizer, diffusion


def train(args, net, model, ema, optimizer, diffusion, data, step, ckpt_path, meta, amp, world, master):
    """Algorithm 1 (smd.train_step), the EMA, then log / sample / save on their schedules.
    Returns (the last step, [(step, mean loss), ...])."""
    device, shape = next(model.parameters()).device, (args.sample_n, model.channels, model.image_size, model.image_size)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), math.inf, device=device)   # the first step with a non-finite loss
    n_window, t0, saved, losses = 0, time.time(), step or None, []
    stop, old_handlers = stop_flag()
    try:
        while step < args.max_steps and not stop:
            x0 = next(data)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
            loss_args = ({"tau": categorical.temperature(step, args.max_steps, args.anneal)} if args.components
                         else {"eta_samples": args.eta_samples})
            loss = smd.train_step(net, diffusion, optimizer, x0, 1.0, amp, **loss_args)
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
                        f"ETA {cli.fmt_time(dt * (args.max_steps - step))}", args.out_dir)
                loss_sum.zero_()
                n_window, t0 = 0, time.time()
            if master and args.sample_every and step % args.sample_every == 0:
                g = torch.Generator(device).manual_seed(args.seed)   # not the training RNG: resume stays exact
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    x = diffusion.sample(ema, shape, args.sample_steps or min(100, args.T), generator=g)
                save_grid(to_uint8(x).cpu().numpy(), os.path.join(args.out_dir, f"samples_{step:07d}.png"))
            if ckpt_now:
                saved = save(ckpt_path, model, ema, optimizer, step, meta, device, world, master, saved)
        if stop and saved != step:   # Ctrl-C: ranks may be a step apart, so no collectives
            mean_loss(loss_sum, first_bad, n_window, world, saved, ckpt_path, reduce=False)
            saved = save(ckpt_path, model, ema, optimizer, step, meta, device, world, master, saved, gather=False)
        if master:
            log(f"stopped by {signal.Signals(stop[0]).name} at step {step}" if stop else f"finished at step {step}",
                args.out_dir)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return step, losses


def main(argv=None):
    # -- the command line: every flag checked, then the run folder locked ---------------
    args, explicit = get_parser().parse_args(argv), explicit_args(argv)
    rank, local_rank, world, device = setup_distributed(args.device)
    master, ckpt_path = rank == 0, os.path.join(args.out_dir, "ckpt.pt")
    ckpt, lock = open_run(args, explicit, ckpt_path, world, master)
    threads = cli.set_threads(args.threads)
    compile_, amp = cli.cuda_defaults(device, args.compile, args.amp)
    try:
        # -- data (continuing where the run stopped) and the network ---------------------
        data, cfg, init = load_data(args, explicit, ckpt, rank, world, device)
        model, ema, optimizer, diffusion = build(args, cfg, ckpt, init, device, rank, world)
        net = torch.compile(model) if compile_ else model
        if world > 1:
            net = DDP(net, device_ids=[local_rank] if device.type == "cuda" else None)
        step = ckpt["step"] if ckpt else 0
        config = {k: v for k, v in vars(args).items() if k not in MODEL_FIELDS}
        meta = {"config": config, "model_config": dataclasses.asdict(cfg)}
        if master:
            log_header(args, argv, step, cfg, args.out_dir)
            kind = "SMD" if cfg.smd else f"categorical K={args.components}" if args.components else "DDPM"
            log(f"{kind} U-Net, {sum(p.numel() for p in model.parameters()):,} parameters, {args.dataset} "
                f"{cfg.channels}x{cfg.image_size}x{cfg.image_size}, batch {args.batch_size} on {world} x {device}"
                f"{f' ({threads} threads)' if device.type == 'cpu' else ''}, compile={compile_}, bf16={amp}",
                args.out_dir)

        # -- train: Algorithm 1, the EMA, logs, samples, checkpoints ---------------------
        step, losses = train(args, net, model, ema, optimizer, diffusion, data, step, ckpt_path, meta, amp,
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
