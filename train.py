"""
train.py -- train a DDPM or Soft Mixture Denoising (SMD) U-Net: the outer loop of Algorithm 1, on
one GPU or many.

    python train.py --dataset cifar10 --smd                  # SMD on CIFAR-10 (downloads to ./data)
    python train.py --dataset cifar10                        # the DDPM baseline
    python train.py --dataset fashion-mnist --image-size 16 --ch 16 --num-res-blocks 1 --attn-res "" --dropout 0 \\
        --norm-groups 4 --batch-size 64 --lr 2e-3 --warmup 50 --max-steps 2000 --smd --out-dir out/quick   # CPU: 3 min
    python train.py --dataset path/to/celeba --image-size 64 --smd   # any folder of images
    torchrun --standalone --nproc_per_node=8 train.py --dataset cifar10 --smd   # 8 GPUs, same global batch
    python train.py --resume --out-dir out                   # continue out/ckpt.pt where it stopped
    python train.py --init google/ddpm-cifar10-32 --smd --lr 2e-5 --warmup 0   # fine-tune DDPM's weights

Every flag is checked before any data or model is loaded (one line, exit 2), and so are those a
--resume restores. Writes to --out-dir, one run at a time: log.txt (its second line is the command,
re-runnable as written), samples_<step>.png and ckpt.pt, atomically: at the first log step, every
--ckpt-every steps, at the end and on Ctrl-C/SIGTERM. A write that fails (a full disk) is retried
at the next save while training goes on, and at the end every minute until it works. Exit status:
0 once --max-steps is reached, 130 after Ctrl-C, 143 after SIGTERM (the checkpoint saved first).
The run's machinery (checks, resume, DDP, saves, stops) is machinery/run.py; on CUDA it turns on
bf16 autocast, TF32, channels_last, torch.compile and fused AdamW, and the host waits for the GPU
only at log and checkpoint steps.
"""

import argparse
import copy
import os

import torch

import smd
from machinery import cli
from machinery.data import DATASETS, save_grid, to_uint8
from machinery.run import Run
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


def build(args, cfg, run, init=None):
    """The U-Net, its EMA copy, AdamW and the chain: restored from the checkpoint, or fresh."""
    torch.manual_seed(args.seed)   # the same initial weights on every rank
    model = UNet(cfg).to(run.device, memory_format=torch.channels_last if run.device.type == "cuda"
                         else torch.preserve_format)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = smd.make_optimizer(model, args.lr, run.device)
    diffusion = smd.Diffusion(args.T, args.schedule, args.objective).to(run.device)
    run.restore(model, ema, optimizer, init)   # the checkpoint's state and RNG, or --init's weights
    return model, ema, optimizer, diffusion


def save_samples(args, ema, diffusion, step, run):
    """A grid of the EMA model's samples (Algorithm 2), from a generator of its own: the training
    RNG is untouched, so a resumed run stays exact."""
    g = torch.Generator(run.device).manual_seed(args.seed)
    c = ema.config
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
        x = diffusion.sample(ema, (args.sample_n, c.channels, c.image_size, c.image_size),
                             args.sample_steps or min(100, args.T), generator=g)
    save_grid(to_uint8(x).cpu().numpy(), os.path.join(args.out_dir, f"samples_{step:07d}.png"))


def train(args, run, net, model, ema, optimizer, diffusion, data):
    """Algorithm 1 until --max-steps or a Ctrl-C/SIGTERM: a batch, one update, the EMA, then the
    log line, the sample grid and the checkpoint when they are due. Returns the last step."""
    params, ema_params, step = list(model.parameters()), list(ema.parameters()), run.start
    while step < args.max_steps and not run.stop():
        x0 = next(data)                                                    # Alg. 1 line 2: x_0 ~ q(x_0)
        for group in optimizer.param_groups:                               # linear learning-rate warm-up
            group["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
        loss = smd.train_step(net, diffusion, optimizer, x0, 1.0, run.amp, eta_samples=args.eta_samples)  # lines 3-9
        smd.ema_update(ema_params, params, smd.ema_decay(step, args.ema_decay))
        step += 1
        run.losses.add(loss, step)                                         # on the device: no host sync
        if step % args.log_every == 0 or step == args.max_steps:
            run.log_progress(step, optimizer.param_groups[0]["lr"])
        if run.master and args.sample_every and step % args.sample_every == 0:
            save_samples(args, ema, diffusion, step, run)
        if run.save_due(step):
            run.save(step)
    return step


def main(argv=None):
    """Train; returns the model, EMA, optimiser, last step and logged losses (exits 130 or 143
    when a Ctrl-C or SIGTERM stopped the run)."""
    run = Run(get_parser(), argv, UNet)   # every flag checked, with what --resume restores; DDP; the folder locked
    args = run.args
    try:
        data, cfg, init = run.load_data()   # the batches from the run's step on
        model, ema, optimizer, diffusion = build(args, cfg, run, init)
        net = run.wrap(model)               # DDP, torch.compile
        run.begin(model, ema, optimizer, type(diffusion))
        step = train(args, run, net, model, ema, optimizer, diffusion, data)
        status = run.finish(step)
    finally:
        run.close()
    if status:
        raise SystemExit(status)
    return {"model": model, "ema": ema, "optimizer": optimizer, "step": step, "losses": run.history,
            "config": run.meta["config"], "model_config": cfg}


if __name__ == "__main__":
    main()
