"""
sample.py -- draw images from a checkpoint written by train.py (EMA weights by default).

    python sample.py --steps 100                             # 64 images, 100 DDPM steps -> samples.png
    python sample.py --n 50000 --batch-size 1000 --npz samples.npz    # paper-style FID input for fid.py
    python sample.py --sampler ddim --steps 50 --grid ddim.png        # DDIM, deterministic (--ddim-eta 0)
    python sample.py --ckpt out/ckpt.pt --no-ema --var small --seed 1 --grid raw.png

Images are saved as uint8 NHWC, x -> round((x + 1) * 127.5) clamped to [0, 255]; the .npz holds
them under the key `images`. The same checkpoint, seed and batch size give the same images.
For SMD checkpoints it also prints the eta-sensitivity (does the model use its latent?).
"""

import argparse
import os
import time

import numpy as np
import torch

import smd
from train import MODEL_KEYS, build_diffusion, build_model, fmt_time, save_grid, to_uint8


def load_checkpoint(path, device="cpu", ema=True):
    """(model in eval mode, diffusion, config + {'step'}) from a train.py checkpoint, with
    errors that say what is wrong: missing, unreadable, or not this project's model."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path} (train one with train.py, or pass --ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                           f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    key = "ema" if ema else "model"
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or key not in ckpt:
        found = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a train.py checkpoint: it needs 'config' and '{key}' entries, has {found}")
    config = ckpt["config"]
    missing = [k for k in (*MODEL_KEYS, "T", "schedule") if k not in config]
    if missing:
        raise ValueError(f"{path}: its config lacks {missing}: a checkpoint of another model?")
    model, diffusion = build_model(config), build_diffusion(config)
    try:
        model.load_state_dict(ckpt[key])
    except RuntimeError as e:
        raise ValueError(f"{path}: the '{key}' weights do not fit the U-Net its config describes "
                         f"(a checkpoint of another model?): {' '.join(str(e).split()[6:])[:200]}...") from None
    return model.to(device).eval(), diffusion.to(device), {**config, "step": ckpt.get("step")}


@torch.no_grad()
def generate(model, diffusion, n, batch_size=256, steps=None, sampler="ddpm", var="large", ddim_eta=0.0,
             seed=0, device="cpu", amp=False, progress=True):
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
            x = diffusion.sample(model, (b, *shape), steps, sampler, var, ddim_eta, generator=g, device=device)
        out.append(to_uint8(x).cpu().numpy())
        if progress:
            done, dt = start + b, time.time() - t0
            print(f"{done}/{n} images | {done / dt:.1f} img/s | ETA {fmt_time(dt / done * (n - done))}", flush=True)
    return np.concatenate(out)


def save_npz(images, path):
    """images (uint8 NHWC) under the key 'images', written atomically."""
    with open(path + ".tmp", "wb") as f:
        np.savez(f, images=images)
    os.replace(path + ".tmp", path)


def get_parser():
    p = argparse.ArgumentParser(description="Sample from a train.py checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.pt")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (respaced); default: all T")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--var", default="large", choices=["large", "small"], help="DDPM: sigma^2 = beta or beta_tilde")
    p.add_argument("--ddim-eta", type=float, default=0.0, help="DDIM's eta (0: deterministic); not SMD's eta")
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
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    compile_, amp = (cuda if v is None else v for v in (args.compile, args.amp))
    if args.cuda_graph and not cuda:
        raise SystemExit(f"sample.py: --cuda-graph needs a CUDA device, not {device}")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        model, diffusion, config = load_checkpoint(args.ckpt, device, ema=not args.no_ema)
        if args.steps is not None and args.steps > diffusion.T:
            raise ValueError(f"--steps {args.steps} > T={diffusion.T}: this checkpoint's chain has only {diffusion.T} steps")
        diffusion.timesteps(args.steps)   # checks steps >= 2
    except (OSError, RuntimeError, ValueError) as e:
        raise SystemExit(f"sample.py: {e}")
    grid = args.grid or (None if args.npz else "samples.png")
    print(f"{args.ckpt}: {'SMD' if config['smd'] else 'DDPM'} U-Net trained {config['step']} steps on "
          f"{config.get('dataset')}, {'raw' if args.no_ema else 'EMA'} weights | {args.sampler}, "
          f"{args.steps or diffusion.T} of T={diffusion.T} steps, var {args.var}, seed {args.seed}, n {args.n}, "
          f"compile={compile_ or args.cuda_graph}, cuda_graph={args.cuda_graph}, bf16={amp}", flush=True)
    net = torch.compile(model, mode="reduce-overhead") if args.cuda_graph else torch.compile(model) if compile_ else model
    images = generate(net, diffusion, args.n, args.batch_size, args.steps, args.sampler, args.var, args.ddim_eta,
                      args.seed, device, amp)
    if config["smd"]:
        x0 = torch.from_numpy(images[:64]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        g = torch.Generator(device).manual_seed(args.seed)
        s = smd.eta_sensitivity(model, diffusion, x0, generator=g)
        print(f"eta-sensitivity {s:.4f} (std of eps_hat over SMD's eta / std over x_t, averaged over t; "
              f"0 = latent unused; measured on {len(x0)} of these samples)")
    if grid:
        save_grid(images[:256], grid)
        print(f"wrote {grid}")
    if args.npz:
        save_npz(images, args.npz)
        print(f"wrote {args.npz}: {images.shape[0]} images {images.shape[1:]} uint8 under 'images'")
    return images


if __name__ == "__main__":
    main()
