"""
bench.py -- how fast is it, and what does SMD cost? Vanilla and SMD side by side, one run.

Times, for the same U-Net config: a training step (forward + backward + AdamW, eager and
torch.compile'd), a sampling step (Algorithm 2 at batch 500) and FID feature extraction.
Prints ms/step, img/s, the SMD/vanilla ratio, peak GPU memory and model FLOPs utilisation
(U-Net FLOPs per image counted once with torch's FLOP counter, against the GPU's bf16 peak).
Warm-up is excluded; each number is the median of several repeats.

    python bench.py                      # CUDA: the CIFAR-10 35.7M model, batch 128, bf16
    python bench.py --json bench.json    # also write the results
    python bench.py --tiny               # a tiny config (the default on CPU; under a minute)
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import fid
import train

CIFAR10 = dict(image_size=32, channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
               attn_res=(16,), dropout=0.1, latent_dim=64, T=1000, schedule="linear")
TINY = dict(CIFAR10, ch=32, ch_mult=(1, 2), num_res_blocks=1)

# dense bf16 tensor-core peak (FLOP/s) by device name, from the vendors' data sheets
BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10G": 70e12, "RTX 4090": 165e12}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, warmup, repeats, iters):
    """Median over `repeats` of the mean wall time of `iters` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def peak_memory(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def flops_per_image(config, smd, train_step):
    """FLOPs of one image's forward (and backward, for a training step), counted on the CPU."""
    model = train.build_model(dict(config, smd=smd))
    x, t = torch.randn(1, config["channels"], config["image_size"], config["image_size"]), torch.tensor([1])
    with FlopCounterMode(display=False) as counter:
        out = model(x, t)
        if train_step:
            out.square().mean().backward()
    return counter.get_total_flops()


def bench_training(config, smd, compile, args, device):
    model = train.build_model(dict(config, smd=smd)).to(device, memory_format=torch.channels_last)
    net = torch.compile(model) if compile else model
    diffusion = train.build_diffusion(config).to(device)
    opt = train.make_optimizer(model, 2e-4, device)
    x0 = torch.randn(args.batch_size, config["channels"], config["image_size"], config["image_size"],
                     device=device).to(memory_format=torch.channels_last)
    amp = device.type == "cuda"
    reset_peak(device)
    sec = median_time(lambda: train.train_step(net, diffusion, opt, x0, amp=amp), device,
                      args.warmup, args.repeats, args.iters)
    return sec, peak_memory(device)


def bench_sampling(config, smd, compile, args, device):
    model = train.build_model(dict(config, smd=smd)).to(device, memory_format=torch.channels_last).eval()
    net = torch.compile(model) if compile else model
    diffusion = train.build_diffusion(config).to(device)
    shape = (args.sample_batch, config["channels"], config["image_size"], config["image_size"])
    steps = 10   # one call = 10 steps of Algorithm 2 (respaced), timed per step below
    amp = device.type == "cuda"

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            diffusion.sample(net, shape, steps=steps, device=device)

    reset_peak(device)
    sec = median_time(run, device, max(1, args.warmup // 2), args.repeats, 1) / steps
    return sec, peak_memory(device)


def bench_fid(args, device):
    """img/s of FID features (299x299 Inception, fp32) on random 32x32 uint8 images."""
    try:
        model = fid.load_inception(args.fid_weights, device)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"FID benchmark skipped: {e}")
        return None
    images = np.random.default_rng(0).integers(0, 256, (args.fid_images, 32, 32, 3), dtype=np.uint8)
    sec = median_time(lambda: fid.features(model, images, args.fid_batch, device), device, 1, args.repeats, 1)
    return args.fid_images / sec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny U-Net (default on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (128 on CUDA, 8 on CPU)")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (500 on CUDA, 16 on CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd rows (off on CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="training steps per timed repeat")
    p.add_argument("--fid-images", type=int, default=None)
    p.add_argument("--fid-batch", type=int, default=200)
    p.add_argument("--fid-weights", default=None, help="FID Inception weights (default: as fid.py)")
    p.add_argument("--no-fid", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    defaults = dict(batch_size=(128, 8), sample_batch=(500, 16), warmup=(10, 1), repeats=(5, 2),
                    iters=(10, 2), fid_images=(2000, 4))
    for k, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, on_gpu if gpu else on_cpu)
    config = TINY if args.tiny or not gpu else CIFAR10
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None) if gpu else None
    print(f"device: {name}; U-Net ch={config['ch']} ch_mult={config['ch_mult']}; "
          f"train batch {args.batch_size}, sample batch {args.sample_batch}")

    rows = []
    compiles = [False] if args.no_compile or not gpu else [False, True]
    for compile in compiles:
        for smd in (False, True):
            sec, mem = bench_training(config, smd, compile, args, device)
            flops = flops_per_image(config, smd, train_step=True) * args.batch_size
            rows.append(dict(task="train step", compile=compile, smd=smd, ms=1e3 * sec,
                             img_s=args.batch_size / sec, mem_gib=mem, mfu=flops / sec / peak if peak else None))
    for smd in (False, True):
        sec, mem = bench_sampling(config, smd, gpu and not args.no_compile, args, device)
        flops = flops_per_image(config, smd, train_step=False) * args.sample_batch
        rows.append(dict(task="sample step", compile=gpu and not args.no_compile, smd=smd, ms=1e3 * sec,
                         img_s=args.sample_batch / sec, mem_gib=mem, mfu=flops / sec / peak if peak else None))
    for r in rows:   # SMD/vanilla time ratio for the same task and compile setting
        base = next(b for b in rows if b["task"] == r["task"] and b["compile"] == r["compile"] and not b["smd"])
        r["smd_ratio"] = r["ms"] / base["ms"]
    fid_img_s = None if args.no_fid else bench_fid(args, device)

    print(f"\n{'task':<12} {'compiled':<9} {'model':<8} {'ms/step':>9} {'img/s':>9} "
          f"{'SMD/van':>8} {'peak GiB':>9} {'MFU':>6}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['task']:<12} {str(r['compile']):<9} {'SMD' if r['smd'] else 'vanilla':<8} "
              f"{r['ms']:>9.2f} {r['img_s']:>9.1f} {r['smd_ratio']:>8.3f} {r['mem_gib']:>9.2f} {mfu:>6}")
    if fid_img_s is not None:
        print(f"FID features (Inception 299x299, fp32, batch {args.fid_batch}): {fid_img_s:.1f} img/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, config=config, args=vars(args), rows=rows, fid_img_s=fid_img_s), f, indent=1)
    return rows, fid_img_s


if __name__ == "__main__":
    main()
