"""
bench.py -- how fast is it, and what does SMD cost? Vanilla and SMD side by side, one run.

Times, for the same U-Net config: a training step (forward + backward + AdamW, eager and
torch.compile'd), a sampling step (Algorithm 2 at batch 500; compiled, and as a CUDA graph)
and FID feature extraction (fid.py, and pytorch-fid's model on the same images if installed).
Prints ms/step, img/s, the SMD/vanilla ratio, U-Net GFLOPs per image (counted once with
torch's FLOP counter), peak GPU memory and model FLOPs utilisation against the GPU's bf16
peak. Warm-up is excluded; each number is the median of several repeats.

    python bench.py                      # CUDA: the CIFAR-10 35.7M model, batch 128, bf16
    python bench.py --json bench.json    # also write the results
    python bench.py --config tiny        # a tiny U-Net (the default on CPU; under a minute)
    python bench.py --config cifar10 --no-fid   # the CIFAR-10 model on CPU (batch 8; minutes)
"""

import argparse
import dataclasses
import functools
import json
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import inception
import smd
from checkpoint import cuda_defaults
from unet import UNet, UNetConfig

CONFIGS = {"cifar10": UNetConfig(), "tiny": UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)}

# dense bf16 tensor-core peak (FLOP/s) by device name, from the vendors' data sheets
BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10G": 70e12, "RTX 4090": 165e12}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(makers, device, warmup, repeats, iters):
    """{key: (seconds per call, peak GiB)} for {key: maker}, where maker() builds a model and
    returns its step function. Each is built and warmed up in turn, its peak memory counted
    above what was resident before it was built; then the repeats alternate between them, so
    that their ratio sees the same machine state. Seconds: the median over repeats of the
    mean of `iters` calls."""
    fns, mem, cuda = {}, {}, device.type == "cuda"
    for key, make in makers.items():
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if cuda else 0
        fns[key] = make()
        for _ in range(warmup):
            fns[key]()
        sync(device)
        mem[key] = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if cuda else float("nan")
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
            times[key].append((time.perf_counter() - t0) / iters)
    return {key: (statistics.median(times[key]), mem[key]) for key in fns}


def flops_per_image(config, use_smd, train_step):
    """FLOPs of one image's forward (and backward, for a training step), counted on the CPU."""
    model = UNet(dataclasses.replace(config, smd=use_smd))
    x, t = torch.randn(1, config.channels, config.image_size, config.image_size), torch.tensor([1])
    eta = torch.randn(1, model.latent_dim) if use_smd else None
    with FlopCounterMode(display=False) as counter:
        out = model(x, t, eta)
        if train_step:
            out.square().mean().backward()
    return counter.get_total_flops()


def compiled(model, compile):
    """compile: False, True, or "cuda-graph" (mode="reduce-overhead", as sample.py --cuda-graph).
    Static shapes: training and sampling batches differ, and each gets its own graph."""
    if not compile:
        return model
    return torch.compile(model, mode="reduce-overhead" if compile == "cuda-graph" else "default", dynamic=False)


def training_step(config, use_smd, compile, args, device):
    """A function doing one training step of a fresh U-Net (Alg. 1, backward, AdamW)."""
    model = UNet(dataclasses.replace(config, smd=use_smd)).to(device, memory_format=torch.channels_last)
    net, diffusion = compiled(model, compile), smd.Diffusion().to(device)
    opt = smd.make_optimizer(model, 2e-4, device)
    x0 = torch.randn(args.batch_size, config.channels, config.image_size, config.image_size,
                     device=device).to(memory_format=torch.channels_last)
    return lambda: smd.train_step(net, diffusion, opt, x0, amp=device.type == "cuda")


def sampling_steps(config, use_smd, compile, args, device, steps):
    """A function running `steps` steps of Algorithm 2 (respaced) on a fresh U-Net."""
    model = UNet(dataclasses.replace(config, smd=use_smd)).to(device, memory_format=torch.channels_last).eval()
    net, diffusion = compiled(model, compile), smd.Diffusion().to(device)
    shape = (args.sample_batch, config.channels, config.image_size, config.image_size)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            diffusion.sample(net, shape, steps=steps, device=device)
    return run


def pytorch_fid_features(model, images, batch_size, device):
    """As pytorch-fid's get_activations (float [0, 1] NCHW batches in, pool_3 features out),
    under torch's default TF32 settings, which are what a pytorch-fid user runs with."""
    out = []
    with inception.allow_tf32(cudnn=True, matmul=False), torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float().div(255)
            out.append(model(x.to(device))[0].squeeze(3).squeeze(2).cpu().numpy())
    return np.concatenate(out)


def bench_fid(args, device):
    """img/s of FID features (299x299 Inception) on the same random 32x32 uint8 images, side
    by side: fid.py in fp32 (and with TF32 on CUDA), and pytorch-fid's model if installed."""
    try:
        model = inception.load_inception(args.fid_weights, device)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"FID benchmark skipped: {e}")
        return None
    images = np.random.default_rng(0).integers(0, 256, (args.fid_images, 32, 32, 3), dtype=np.uint8)
    makers = {"fid.py": lambda: lambda: inception.features(model, images, args.fid_batch, device)}
    if device.type == "cuda":
        makers["fid.py --tf32"] = lambda: lambda: inception.features(model, images, args.fid_batch, device, tf32=True)
    try:
        theirs = inception.pytorch_fid_model(model).to(device)
        makers["pytorch-fid"] = lambda: lambda: pytorch_fid_features(theirs, images, args.fid_batch, device)
    except ImportError:
        print("pytorch-fid is not installed: no comparison (pip install pytorch-fid)")
    timed = side_by_side(makers, device, 1, args.repeats, 1)
    return {key: args.fid_images / sec for key, (sec, _) in timed.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", choices=["cifar10", "tiny"], default=None,
                   help="U-Net size: DDPM's CIFAR-10 model or a tiny one; default: cifar10 on CUDA, tiny on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (128 on CUDA, 8 on CPU)")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (500 on CUDA, 16 on CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd rows (CUDA only)")
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
    config = CONFIGS[args.config or ("cifar10" if gpu else "tiny")]
    cuda_defaults(device)
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None) if gpu else None
    print(f"device: {name}; U-Net ch={config.ch} ch_mult={config.ch_mult}; "
          f"train batch {args.batch_size}, sample batch {args.sample_batch}")

    flops = {(s, step): flops_per_image(config, s, step) for s in (False, True) for step in (False, True)}
    rows = []

    def add(task, compile, use_smd, sec, mem, batch):
        f = flops[use_smd, task == "train step"]
        rows.append(dict(task=task, compile=compile, smd=use_smd, ms=1e3 * sec, img_s=batch / sec, gflops=f / 1e9,
                         mem_gib=mem, mfu=f * batch / sec / peak if peak else None))

    fast = gpu and not args.no_compile
    steps = 10   # one sampling call = 10 steps, reported per step
    t0 = time.time()
    for compile in [False, True] if fast else [False]:
        print(f"[{time.time() - t0:5.0f}s] training steps, compile={compile}", flush=True)
        torch._dynamo.reset()
        timed = side_by_side({s: functools.partial(training_step, config, s, compile, args, device)
                              for s in (False, True)}, device, args.warmup, args.repeats, args.iters)
        for s, (sec, mem) in timed.items():
            add("train step", compile, s, sec, mem, args.batch_size)
    for compile in [True, "cuda-graph"] if fast else [False]:
        print(f"[{time.time() - t0:5.0f}s] sampling steps, compile={compile}", flush=True)
        torch._dynamo.reset()
        timed = side_by_side({s: functools.partial(sampling_steps, config, s, compile, args, device, steps)
                              for s in (False, True)}, device, max(1, args.warmup // 2), args.repeats, 1)
        for s, (sec, mem) in timed.items():
            add("sample step", compile, s, sec / steps, mem, args.sample_batch)
    for r in rows:   # SMD/vanilla time ratio for the same task and compile setting
        base = next(b for b in rows if b["task"] == r["task"] and b["compile"] == r["compile"] and not b["smd"])
        r["smd_ratio"] = r["ms"] / base["ms"]
    if not args.no_fid:
        print(f"[{time.time() - t0:5.0f}s] FID features", flush=True)
    fid_img_s = None if args.no_fid else bench_fid(args, device)

    print(f"\n{'task':<12} {'compiled':<11} {'model':<8} {'ms/step':>9} {'img/s':>9} {'SMD/van':>8} "
          f"{'GFLOP/img':>10} {'peak GiB':>9} {'MFU':>6}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['task']:<12} {str(r['compile']):<11} {'SMD' if r['smd'] else 'vanilla':<8} {r['ms']:>9.2f} "
              f"{r['img_s']:>9.1f} {r['smd_ratio']:>8.3f} {r['gflops']:>10.2f} {r['mem_gib']:>9.2f} {mfu:>6}")
    for k, v in (fid_img_s or {}).items():
        print(f"FID features (Inception 299x299, batch {args.fid_batch}), {k}: {v:.1f} img/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, config=dataclasses.asdict(config), args=vars(args), rows=rows,
                           fid_img_s=fid_img_s), f, indent=1)
    return rows, fid_img_s


if __name__ == "__main__":
    main()
