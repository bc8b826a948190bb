"""
sample.py -- draw images from a checkpoint written by train.py (EMA weights by default).

    python sample.py --steps 100                             # 64 images, 100 DDPM steps -> samples.png
    python sample.py --n 50000 --batch-size 1000 --npz samples.npz    # paper-style FID input for fid.py
    python sample.py --sampler ddim --steps 50 --grid ddim.png        # DDIM (--ddim-eta 0)
    python sample.py --sampler ddim --steps 50 --fixed-eta            # SMD: deterministic DDIM needs a fixed eta
    python sample.py --ckpt out/ckpt.pt --no-ema --var small --clip-x0 --seed 1 --grid raw.png
    python sample.py --ckpt google/ddpm-cifar10-32 --clip-x0 --steps 100   # DDPM's published CIFAR-10 weights

Images are saved as uint8 NHWC, x -> round((x + 1) * 127.5) clamped to [0, 255]; the .npz holds
them under the key `images`. The same checkpoint, seed and batch size give the same images.
For an SMD model Algorithm 2 draws a fresh eta at every step, so even DDIM with --ddim-eta 0 is
random; --fixed-eta holds one eta per image (or 0) for the whole chain, which makes it
deterministic and answers "does eta change the samples?". For SMD checkpoints it also prints
the eta-sensitivity on training images (does the model use its latent, and at which t?).
"""

import argparse
import time

import numpy as np
import torch

import smd
from checkpoint import cuda_defaults, fmt_time, load_checkpoint
from data import make_batches, save_grid, save_npz, to_uint8


@torch.no_grad()
def generate(model, diffusion, n, batch_size=256, steps=None, sampler="ddpm", var="large", ddim_eta=0.0,
             seed=0, device="cpu", amp=False, progress=True, clip_x0=False, eta_mode="fresh"):
    """n images as uint8 NHWC numpy. One generator seeded with `seed` draws every x_T, noise
    and eta, batch after batch, so the same seed and batch size give the same images. The
    only host sync is the copy of each finished batch."""
    device = torch.device(device)
    g = torch.Generator(device).manual_seed(seed)
    shape = (model.channels, model.image_size, model.image_size)
    out, t0 = [], time.time()
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            x = diffusion.sample(model, (b, *shape), steps, sampler, var, ddim_eta, generator=g, device=device,
                                 clip_x0=clip_x0, eta_mode=eta_mode)
        out.append(to_uint8(x).cpu().numpy())
        if progress:
            done, dt = start + b, time.time() - t0
            print(f"{done}/{n} images | {done / dt:.1f} img/s | ETA {fmt_time(dt / done * (n - done))}", flush=True)
    return np.concatenate(out)


def report_eta_sensitivity(model, diffusion, info, device, seed, n=32):
    """SMD: does the model use its latent? Measured on n training images (the latent's job is
    the data's posterior, not the samples'), per t and on average."""
    try:
        batches, _, _ = make_batches(info["dataset"], info.get("data_dir", "data"), n, info["image_size"],
                                     flip=False, workers=0, seed=seed, device=device)
        x0 = next(batches)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"eta-sensitivity not measured: the training data is not readable here ({e})")
        return None
    g = torch.Generator(device).manual_seed(seed)
    mean, per_t = smd.eta_sensitivity(model, diffusion, x0, generator=g)
    print(f"eta-sensitivity {mean:.4f} (std of eps_hat over SMD's eta / std over x_t; 0 = latent unused; "
          f"{len(x0)} {info['dataset']} images); per t: " + ", ".join(f"{t}: {r:.3f}" for t, r in per_t))
    return mean, per_t


def get_parser():
    p = argparse.ArgumentParser(description="Sample from a train.py checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.pt",
                   help="train.py checkpoint, or DDPM weights in diffusers' format: a Hugging Face id "
                        "(google/ddpm-cifar10-32, downloaded once), a folder or a .bin/.safetensors file")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (respaced); default: all T")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--var", default="large", choices=["large", "small"], help="DDPM: sigma^2 = beta or beta_tilde")
    p.add_argument("--ddim-eta", type=float, default=0.0,
                   help="DDIM's eta (0: deterministic for DDPM models; for SMD add --fixed-eta); not SMD's eta")
    p.add_argument("--clip-x0", action="store_true",
                   help="step through x0_hat clipped to [-1, 1] (the SMD authors' sampler)")
    p.add_argument("--fixed-eta", nargs="?", const="fixed", choices=["fixed", "zero"], default=None,
                   help="SMD: one eta per image for the whole chain (or 'zero': eta = 0) instead of a fresh "
                        "eta every step (Alg. 2)")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="PNG grid of the first 256 images (default samples.png without --npz)")
    p.add_argument("--npz", default=None, help=".npz of all images, uint8 NHWC under 'images' (fid.py's input)")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the U-Net; default: on with CUDA")
    p.add_argument("--cuda-graph", action="store_true",
                   help="compile with mode='reduce-overhead': each step's kernels replay as one CUDA graph")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the U-Net (the chain stays fp32); default: on with CUDA")
    p.add_argument("--eta-sensitivity", type=int, default=32, metavar="N",
                   help="SMD: measure the eta-sensitivity on N training images (0: skip)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit(f"sample.py: --cuda-graph needs a CUDA device, not {device}")
    compile_, amp = cuda_defaults(device, args.compile, args.amp)
    try:
        model, diffusion, info = load_checkpoint(args.ckpt, device, ema=not args.no_ema)
        if args.steps is not None and args.steps > diffusion.T:
            raise ValueError(f"--steps {args.steps} > T={diffusion.T}: this checkpoint's chain has only {diffusion.T} steps")
        diffusion.timesteps(args.steps)   # checks steps >= 2
    except (OSError, RuntimeError, ValueError) as e:
        raise SystemExit(f"sample.py: {e}")
    if args.fixed_eta and not info["smd"]:
        print(f"note: --fixed-eta has no effect: {args.ckpt} is not an SMD model")
    grid = args.grid or (None if args.npz else "samples.png")
    origin = (f"published weights ({info['init']})" if info["step"] is None else
              f"trained {info['step']} steps on {info.get('dataset')}" + (f" from {info['init']}" if info.get("init") else "")
              + f", {'raw' if args.no_ema else 'EMA'} weights")
    kind = "SMD" if info["smd"] else f"mixture-of-{info['components']}" if info.get("components") else "DDPM"
    print(f"{args.ckpt}: {kind} U-Net {origin} | {args.sampler}, "
          f"{args.steps or diffusion.T} of T={diffusion.T} steps, var {args.var}, clip_x0={args.clip_x0}, "
          f"eta {args.fixed_eta or 'fresh'}, seed {args.seed}, n {args.n}, compile={compile_ or args.cuda_graph}, "
          f"cuda_graph={args.cuda_graph}, bf16={amp}", flush=True)
    net = torch.compile(model, mode="reduce-overhead") if args.cuda_graph else torch.compile(model) if compile_ else model
    images = generate(net, diffusion, args.n, args.batch_size, args.steps, args.sampler, args.var, args.ddim_eta,
                      args.seed, device, amp, clip_x0=args.clip_x0, eta_mode=args.fixed_eta or "fresh")
    if info["smd"] and args.eta_sensitivity:
        report_eta_sensitivity(model, diffusion, info, device, args.seed, args.eta_sensitivity)
    if grid:
        save_grid(images[:256], grid)
        print(f"wrote {grid}")
    if args.npz:
        save_npz(images, args.npz)
        print(f"wrote {args.npz}: {images.shape[0]} images {images.shape[1:]} uint8 under 'images'")
    return images


if __name__ == "__main__":
    main()
