"""
machinery/bench.py -- how fast is it, and what does SMD cost? Vanilla and SMD side by side, one run.

Times, for the same U-Net config: a training step (forward + backward + AdamW, eager and
torch.compile'd), a sampling step (Algorithm 2 at batch 500; compiled, and compiled as a CUDA
graph, mode="reduce-overhead") and FID feature extraction (inception.py, and pytorch-fid's
model on the same images if installed). Prints ms/step, img/s, the SMD/vanilla ratio, U-Net
GFLOPs per image (torch's FLOP counter), peak GPU memory, model FLOPs utilisation against the
GPU's bf16 peak (by its exact name; another GPU gets no MFU) and the time of each model's first
call (for a compiled one: compiling it). Each other number is the median of several repeats
after a warm-up. --json is rewritten after each task, so a run stopped early keeps what it
measured. Every flag is checked before a model is built (a bad one: one line, exit 2).

    python -m machinery.bench                   # CUDA: the CIFAR-10 35.7M model, batch 128, bf16
    python -m machinery.bench --json bench.json    # also write the results
    python -m machinery.bench --config tiny        # a tiny U-Net (the default on CPU; under a minute)
    python -m machinery.bench --config cifar10 --tasks train,sample   # the CIFAR-10 model on CPU (batch 8; minutes)
    python -m machinery.bench --tasks fid --fid-weights random   # FID speed alone, the network with random weights
    python -m machinery.bench --config quickstart --tasks train --batch-size 64 --threads 1   # CPU threads
"""

import argparse
import dataclasses
import functools
import os
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import smd
from machinery import cli, data, inception
from unet import UNet, UNetConfig

PROG = "python -m machinery.bench"
CONFIGS = {"cifar10": UNetConfig(), "tiny": UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),   # the tests' U-Net
           "quickstart": UNetConfig(image_size=16, channels=1, ch=16, num_res_blocks=1, attn_res=(), dropout=0.0,
                                    norm_groups=4)}   # the README's quick start (train at --batch-size 64)
# the flags whose default depends on the device: (CUDA, CPU)
DEVICE_DEFAULTS = dict(batch_size=(128, 8), sample_batch_size=(500, 16), warmup_iters=(10, 1),
                       repeats=(5, 2), iters=(10, 2), fid_images=(2000, 4))
SAMPLE_STEPS = 10  # steps of Algorithm 2 per timed sampling call; reported per step
TASKS = ("train", "sample", "fid")

# dense bf16 tensor-core peak (FLOP/s, NVIDIA's data sheets: half the "with sparsity" figure)
# by the exact name torch.cuda.get_device_name() returns; a name not here gets no MFU
BF16_PEAK = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
             "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
             "NVIDIA L40S": 362e12, "NVIDIA L4": 121e12, "NVIDIA GeForce RTX 4090": 165e12}


def bf16_peak(name):
    """The GPU's dense bf16 peak in FLOP/s; None, with a line saying so, for a name not in BF16_PEAK."""
    if name not in BF16_PEAK:
        print(f"unknown GPU {name}: no MFU (add its exact name and dense bf16 peak to bench.BF16_PEAK)")
    return BF16_PEAK.get(name)

# -----------------------------------------------------------------------------
# Timing and counting


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(makers, device, warmup, repeats, iters):
    """{key: (seconds per call, peak GiB, seconds of the first call)} for {key: maker}, where
    maker() builds a model and returns its step function. Each is built and warmed up in turn
    (the first call, compiling a compiled model, timed alone), its peak memory counted above
    what was resident before it was built; then the repeats alternate between them, so that
    their ratio sees the same machine state. Seconds: the median over repeats of the mean of
    `iters` calls."""
    fns, mem, first, cuda = {}, {}, {}, device.type == "cuda"
    for key, make in makers.items():
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if cuda else 0
        fns[key] = make()
        t0 = time.perf_counter()
        fns[key]()
        sync(device)
        first[key] = time.perf_counter() - t0
        for _ in range(warmup - 1):
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
    return {key: (statistics.median(times[key]), mem[key], first[key]) for key in fns}


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

# -----------------------------------------------------------------------------
# What is timed


def compiled(model, compile):
    """compile: False, True, or "cuda-graph" (torch.compile's mode="reduce-overhead").
    Static shapes: training and sampling batches differ, and each gets its own graph."""
    if not compile:
        return model
    return torch.compile(model, mode="reduce-overhead" if compile == "cuda-graph" else "default", dynamic=False)


def fresh_unet(config, use_smd, device):
    return UNet(dataclasses.replace(config, smd=use_smd)).to(device, memory_format=torch.channels_last)


def training_step(config, use_smd, compile, args, device):
    """A function doing one training step of a fresh U-Net (Alg. 1, backward, AdamW)."""
    model = fresh_unet(config, use_smd, device)
    net, diffusion = compiled(model, compile), smd.Diffusion().to(device)
    opt = smd.make_optimizer(model, 2e-4, device)
    x0 = torch.randn(args.batch_size, config.channels, config.image_size, config.image_size,
                     device=device).to(memory_format=torch.channels_last)
    return lambda: smd.train_step(net, diffusion, opt, x0, amp=device.type == "cuda")


def sampling_steps(config, use_smd, compile, args, device):
    """A function running SAMPLE_STEPS steps of Algorithm 2 (respaced) on a fresh U-Net."""
    model = fresh_unet(config, use_smd, device).eval()
    net, diffusion = compiled(model, compile), smd.Diffusion().to(device)
    shape = (args.sample_batch_size, config.channels, config.image_size, config.image_size)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            diffusion.sample(net, shape, steps=SAMPLE_STEPS)
    return run


def time_task(task, compile, args, device, flops, peak):
    """Table rows for vanilla and SMD doing `task` ("train step" or "sample step"), timed side
    by side with one compile setting; smd_ratio is SMD's time over vanilla's."""
    train = task == "train step"
    config, make = CONFIGS[args.config], training_step if train else sampling_steps
    batch, per_call = (args.batch_size, 1) if train else (args.sample_batch_size, SAMPLE_STEPS)
    warmup, iters = (args.warmup_iters, args.iters) if train else (max(1, args.warmup_iters // 2), 1)
    torch._dynamo.reset()
    timed = side_by_side({s: functools.partial(make, config, s, compile, args, device) for s in (False, True)},
                         device, warmup, args.repeats, iters)
    rows = []
    for s, (sec, mem, first) in timed.items():
        sec, f = sec / per_call, flops[s, train]
        rows.append(dict(task=task, compile=compile, smd=s, ms=1e3 * sec, img_s=batch / sec,
                         smd_ratio=timed[s][0] / timed[False][0], gflops=f / 1e9, mem_gib=mem,
                         mfu=f * batch / sec / peak if peak else None, first_s=first))
    return rows


def pytorch_fid_features(model, images, batch_size, device):
    """As pytorch-fid's get_activations (float [0, 1] NCHW batches in, pool_3 features out),
    under torch's default TF32 settings, which are what a pytorch-fid user runs with."""
    out = []
    with inception.allow_tf32(cudnn=True, matmul=False), torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float().div(255)
            out.append(model(x.to(device))[0].squeeze(3).squeeze(2).cpu().numpy())
    return np.concatenate(out)


def time_fid(args, device):
    """img/s of FID features (299x299 Inception) on the same random 32x32 uint8 images, side
    by side: inception.py in fp32 (and with TF32 on CUDA), and pytorch-fid's model if installed.
    --fid-weights random: the same network with random weights (its speed, not its features)."""
    try:
        if args.fid_weights == "random":
            model = inception.InceptionV3().eval().requires_grad_(False).to(device, memory_format=torch.channels_last)
        else:
            model = inception.load_inception(args.fid_weights, device)
    except (ValueError, OSError) as e:
        print(f"FID benchmark skipped: {e}")
        return None
    images = np.random.default_rng(0).integers(0, 256, (args.fid_images, 32, 32, 3), dtype=np.uint8)
    batch = args.fid_batch_size
    makers = {"fid.py": lambda: lambda: inception.features(model, images, batch, device)}
    if device.type == "cuda":
        makers["fid.py --tf32"] = lambda: lambda: inception.features(model, images, batch, device, tf32=True)
    try:
        theirs = inception.pytorch_fid_model(model).to(device)
        makers["pytorch-fid"] = lambda: lambda: pytorch_fid_features(theirs, images, batch, device)
    except ImportError:
        print("pytorch-fid is not installed: no comparison (pip install pytorch-fid)")
    timed = side_by_side(makers, device, 1, args.repeats, 1)
    return {key: args.fid_images / sec for key, (sec, _, _) in timed.items()}

# -----------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    """The flags, all checked, with the device-dependent defaults filled in."""
    p = cli.Parser(__doc__, prog=PROG)

    def count(flag, what):  # a count whose default depends on the device
        on_gpu, on_cpu = DEVICE_DEFAULTS[flag[2:].replace("-", "_")]
        p.add_argument(flag, type=cli.positive_int, help=f"{what} (None: {on_gpu} on CUDA, {on_cpu} on CPU)")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda if this machine has it, else cpu")
    p.add_argument("--config", choices=sorted(CONFIGS),
                   help="U-Net: DDPM's CIFAR-10 model or a tiny one (None: cifar10 on CUDA, tiny on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="also time torch.compile'd steps (None: with CUDA)")
    count("--batch-size", "training batch")
    count("--sample-batch-size", "sampling batch")
    count("--warmup-iters", "untimed calls first")
    count("--repeats", "timed repeats, the median kept")
    count("--iters", "training steps per repeat")
    count("--fid-images", "images per FID timing")
    p.add_argument("--fid-batch-size", type=cli.positive_int, default=200, help="images per Inception batch")
    p.add_argument("--fid-weights", help="FID Inception weights; random: random weights, for speed only "
                                         "(None: as fid.py, through torch.hub)")
    p.add_argument("--tasks", type=cli.choices_list(TASKS), default=",".join(TASKS), help="what to time")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--force", action="store_true", help="replace an existing --json")
    p.add_argument("--threads", type=cli.nonneg_int, default=0,
                   help="CPU threads (0: 1 on machines with <= 4 cores, else as many as torch picks)")
    args = p.parse_args(argv)
    if args.fid_weights not in (None, "random") and not os.path.isfile(args.fid_weights):
        cli.fail(PROG, f"--fid-weights {args.fid_weights}: no such file; download {inception.FID_WEIGHTS_URL}, "
                       f"or leave out --fid-weights to download it through torch.hub")
    cli.output_file(PROG, args.json, "--json", force=args.force)
    gpu = torch.device(args.device).type == "cuda"
    for key, (on_gpu, on_cpu) in DEVICE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, on_gpu if gpu else on_cpu)
    args.config = args.config or ("cifar10" if gpu else "tiny")
    return args


def report(rows, fid_img_s, args):
    print(f"\n{'task':<12} {'compiled':<11} {'model':<8} {'ms/step':>9} {'img/s':>9} {'SMD/van':>8} "
          f"{'GFLOP/img':>10} {'peak GiB':>9} {'MFU':>6} {'1st call s':>10}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['task']:<12} {str(r['compile']):<11} {'SMD' if r['smd'] else 'vanilla':<8} {r['ms']:>9.2f} "
              f"{r['img_s']:>9.1f} {r['smd_ratio']:>8.3f} {r['gflops']:>10.2f} {r['mem_gib']:>9.2f} {mfu:>6} "
              f"{r['first_s']:>10.1f}")
    for k, v in (fid_img_s or {}).items():
        print(f"FID features (Inception 299x299, batch {args.fid_batch_size}), {k}: {v:.1f} img/s")


def main(argv=None):
    # build: flags, device, the FLOPs of one image
    args = parse_args(argv)
    threads = cli.set_threads(args.threads)
    device, config = torch.device(args.device), CONFIGS[args.config]
    gpu = device.type == "cuda"
    compile, _ = cli.cuda_defaults(device, args.compile)
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    peak = bf16_peak(name) if gpu else None
    print(f"device: {name} ({threads} CPU threads, torch {torch.__version__}); U-Net {args.config} "
          f"(ch={config.ch} ch_mult={config.ch_mult}); train batch {args.batch_size}, sample batch "
          f"{args.sample_batch_size}; tasks {','.join(args.tasks)}", flush=True)
    flops = {(s, train): flops_per_image(config, s, train) for s in (False, True) for train in (False, True)
             if {"train", "sample"} & set(args.tasks)}
    t0, rows, fid_img_s = time.time(), [], None

    def save():   # after every task: a run stopped early keeps what it measured
        if args.json:
            data.save_json(dict(device=name, torch=torch.__version__, threads=threads, bf16_peak=peak,
                                config=dataclasses.asdict(config), args=data.portable(args), rows=rows,
                                fid_img_s=fid_img_s), args.json)

    # time training (eager, and compiled if asked), then sampling (eager, or compiled and, on a GPU,
    # compiled as a CUDA graph)
    modes = {"train": [False, True] if compile else [False],
             "sample": ([True, "cuda-graph"] if gpu else [True]) if compile else [False]}
    for task in [t for t in ("train", "sample") if t in args.tasks]:
        for mode in modes[task]:
            print(f"[{time.time() - t0:5.0f}s] {task} steps, compile={mode}", flush=True)
            rows += time_task(f"{task} step", mode, args, device, flops, peak)
            save()

    # time FID features
    if "fid" in args.tasks:
        print(f"[{time.time() - t0:5.0f}s] FID features", flush=True)
        fid_img_s = time_fid(args, device)
        save()

    report(rows, fid_img_s, args)
    return rows, fid_img_s


if __name__ == "__main__":
    main()
