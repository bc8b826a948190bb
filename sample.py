"""
sample.py -- draw images from a checkpoint written by train.py (EMA weights by default).

    python sample.py --steps 100                             # 64 images, 100 DDPM steps -> samples.png
    python sample.py --n 50000 --batch-size 1000 --npz samples.npz    # paper-style FID input for fid.py
    python sample.py --sampler ddim --steps 50 --grid ddim.png        # DDIM (--ddim-eta 0)
    python sample.py --sampler ddim --steps 50 --eta-mode fixed       # SMD: deterministic DDIM needs a held eta
    python sample.py --ckpt out --no-ema --var small --clip-x0 --seed 1 --grid raw.png   # a run folder: its ckpt.pt
    python sample.py --ckpt google/ddpm-cifar10-32 --clip-x0 --steps 100   # DDPM's published CIFAR-10 weights
    python sample.py --eta-sensitivity 64                    # SMD: does the model use its latent?

Every flag and output path is checked before the checkpoint is loaded, an existing output is
replaced only with --force, and a flag that would change nothing for this checkpoint says so in
one line. Images are saved as uint8 NHWC, x -> round((x + 1) * 127.5) clamped to [0, 255]; the
.npz holds them under the key `images` (written first: if the grid then fails, the .npz is kept;
a run stopped by Ctrl-C writes the images it finished, and a long one rewrites the .npz every
10 minutes). An --n whose images would not fit in memory is refused before sampling. The same
checkpoint, seed and batch size give the same images (on CUDA with --compile a last, smaller
batch is padded to the batch size so that nothing recompiles; its images then differ from an
uncompiled run's).

For an SMD model Algorithm 2 draws a fresh eta at every step (--eta-mode fresh), so even DDIM
with --ddim-eta 0 is random; --eta-mode fixed holds one eta per image for the chain (zero: eta =
0). Every mode sees the same x_T and step noise, so `--eta-mode zero` against the default, at
one seed, answers "does eta change the samples?": identical images mean an unused latent.
--eta-sensitivity N measures, on N training images, how much eps_hat moves with eta (0: unused).
"""

import functools
import os
import sys
import time

import numpy as np
import torch

import smd
from machinery import cli
from machinery.checkpoint import load_checkpoint
from machinery.data import IMAGE_FORMATS, make_batches, save_grid, save_npz, to_uint8

PROG = "sample.py"


def step_update(sampler="ddpm", var="large", ddim_eta=0.0, clip_x0=False):
    """The update that replaces Alg. 2 line 7 for these options (None: line 7 itself)."""
    if sampler == "ddim":
        return functools.partial(smd.ddim_update, ddim_eta=ddim_eta, clip_x0=clip_x0)
    return functools.partial(smd.clipped_update, var=var) if clip_x0 else None


SAVE_EVERY_S = 600   # a long run rewrites its .npz this often, so that a killed run keeps most of its images


class Progress(torch.nn.Module):
    """The model, counting its calls (one per step of a chain) and printing, every few seconds,
    how far the chains are, at how many images a second, and the time left."""

    EVERY = 5.0   # seconds between lines

    def __init__(self, model, n, steps):
        super().__init__()
        self.model, self.latent_dim = model, getattr(model, "latent_dim", 0)
        self.n, self.steps, self.calls, self.done = n, steps, 0, 0
        self.t0 = self.shown = time.time()

    def forward(self, x, t, eta=None):
        self.calls += 1
        now = time.time()
        if now - self.shown > self.EVERY:   # the work counted in image-steps
            done = self.done * self.steps + self.calls * min(len(x), self.n - self.done)
            self.shown, rate = now, done / (now - self.t0)
            print(f"images {self.done}-{min(self.n, self.done + len(x))}/{self.n}: step {self.calls}/{self.steps} | "
                  f"{rate / self.steps:.1f} img/s | ETA {cli.fmt_time((self.n * self.steps - done) / rate)}",
                  flush=True)
        return self.model(x, t, eta)


@torch.no_grad()
def generate(model, diffusion, n, batch_size=256, steps=None, var="large", update=None, eta_mode="fresh", seed=0,
             amp=False, progress=True, pad=False):
    """n images as uint8 NHWC numpy (see batches)."""
    images = np.empty((n, model.image_size, model.image_size, model.channels), np.uint8)
    for start, x in batches(model, diffusion, n, batch_size, steps, var, update, eta_mode, seed, amp, progress, pad):
        images[start:start + len(x)] = x
    return images


@torch.no_grad()
def batches(model, diffusion, n, batch_size=256, steps=None, var="large", update=None, eta_mode="fresh", seed=0,
            amp=False, progress=True, pad=False):
    """Yields (index of its first image, uint8 NHWC numpy batch) until n images are made. One
    generator seeded with `seed` draws every x_T, step noise and (fresh) eta, batch after batch,
    so the same seed and batch size give the same images. eta_mode: "fresh" (Alg. 2), or "fixed"
    / "zero" held for the chain (smd.HeldEta; a fixed eta comes from a second generator, so every
    mode sees the same x_T and noise). pad: run a last, smaller batch at the full batch size (a
    compiled model then meets one shape only). The only host sync is the copy of each batch."""
    device = diffusion.betas.device
    g, g_eta = (torch.Generator(device).manual_seed(s) for s in (seed, seed + 1_000_003))
    shape = (model.channels, model.image_size, model.image_size)
    chain = len(diffusion.timesteps(steps))
    counter = Progress(model, n, chain) if progress else model
    t0 = time.time()
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        size = batch_size if pad else b
        x_T = torch.randn((size, *shape), device=device, generator=g)
        net = counter
        if eta_mode != "fresh" and getattr(model, "latent_dim", 0):
            held = torch.zeros(size, model.latent_dim, device=device)
            net = smd.HeldEta(counter, held.normal_(generator=g_eta) if eta_mode == "fixed" else held)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            x = diffusion.sample(net, (size, *shape), steps, var, generator=g, x_T=x_T, update=update)
        yield start, to_uint8(x[:b]).cpu().numpy()
        if progress:
            counter.done, counter.calls = start + b, 0
            dt = time.time() - t0
            print(f"{start + b}/{n} images | {(start + b) / dt:.1f} img/s | "
                  f"ETA {cli.fmt_time(dt / (start + b) * (n - start - b))}", flush=True)


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
    p = cli.Parser(__doc__, prog=PROG)
    p.add_argument("--ckpt", default="out/ckpt.pt",
                   help="train.py checkpoint or run folder, or DDPM weights in diffusers' format: a Hugging Face id "
                        "(google/ddpm-cifar10-32, downloaded once), a folder or a .bin file")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--steps", type=cli.int_at_least(2, "a sampler takes >= 2 steps"), default=None,
                   help="sampling steps, respaced (default: all T of the checkpoint's chain)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="Algorithm 2 (ddpm) or DDIM")
    p.add_argument("--var", default="large", choices=["large", "small"], help="DDPM: sigma^2 = beta or beta_tilde")
    p.add_argument("--ddim-eta", type=cli.nonneg_float, default=0.0,
                   help="DDIM's eta (0: deterministic for DDPM models; for SMD add --eta-mode fixed); not SMD's eta")
    p.add_argument("--clip-x0", action="store_true",
                   help="step through x0_hat clipped to [-1, 1] (the authors' sampler)")
    p.add_argument("--eta-mode", default="fresh", choices=["fresh", "fixed", "zero"],
                   help="SMD: a fresh eta every step (Alg. 2), one per image for the chain, or eta = 0")
    p.add_argument("--n", type=cli.positive_int, default=64, help="number of images")
    p.add_argument("--batch-size", type=cli.positive_int, default=256, help="images sampled at once")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="x_T, every step's noise and eta")
    p.add_argument("--grid", default=None, help=f"{' or '.join(IMAGE_FORMATS)} grid of the first 256 images "
                   f"(default: samples.png when there is no --npz)")
    p.add_argument("--npz", default=None, help=".npz of all images, uint8 NHWC under 'images' (fid.py's input; "
                   "default: none)")
    p.add_argument("--force", action="store_true", help="replace an existing --grid or --npz file")
    cli.add_machine_flags(p)   # under --amp the chain itself stays fp32
    p.add_argument("--eta-sensitivity", type=cli.nonneg_int, default=0, metavar="N",
                   help="SMD: measure the eta-sensitivity on N training images (0: skip)")
    return p


def load(args, device):
    """(model, diffusion, info) with every check that needs the checkpoint: steps against T."""
    try:
        model, diffusion, info = load_checkpoint(args.ckpt, device, ema=not args.no_ema)
    except FileNotFoundError as e:
        cli.fail(PROG, f"--ckpt {args.ckpt}: {e}; train one first (python train.py --out-dir out ..., see the "
                       f"README's quick start), or pass --ckpt PATH to a checkpoint, a run folder or DDPM's weights")
    except (OSError, RuntimeError, ValueError) as e:
        cli.fail(PROG, f"--ckpt {args.ckpt}: {e}")
    if args.steps is not None and args.steps > diffusion.T:
        cli.fail(PROG, f"--steps {args.steps}: this checkpoint's chain has only T={diffusion.T} steps")
    return model, diffusion, info


def check_memory(args, model):
    """Refuse an --n whose uint8 images would not fit in the memory available now."""
    per_image = model.channels * model.image_size**2
    try:
        with open("/proc/meminfo") as f:
            avail = 1024 * next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if args.n * per_image > 0.8 * avail:
        cli.fail(PROG, f"--n {args.n}: its images take {args.n * per_image / 2**30:.1f} GiB ({model.image_size}x"
                       f"{model.image_size}x{model.channels} uint8 each), this machine has {avail / 2**30:.1f} GiB "
                       f"available: use --n {int(0.8 * avail) // per_image} or less per run (another --seed for more)")


def ignored(args, explicit, info, model):
    """A line for each flag that changes nothing for this checkpoint and sampler."""
    not_smd = f"{args.ckpt} is not an SMD model"
    learned = getattr(model, "learns_variance", False)   # a model that sets its own sigma_t (improved DDPM's kind)
    for flag, why in [("eta_mode", args.eta_mode != "fresh" and not info["smd"] and not_smd),
                      ("eta_sensitivity", args.eta_sensitivity and not info["smd"] and not_smd),
                      ("var", "var" in explicit and args.sampler == "ddim" and "DDIM's noise is --ddim-eta's"),
                      ("var", "var" in explicit and args.sampler == "ddpm" and learned and "the model learns sigma_t"),
                      ("ddim_eta", "ddim_eta" in explicit and args.sampler == "ddpm" and "use --sampler ddim")]:
        if why:
            print(f"note: --{flag.replace('_', '-')} has no effect: {why}", flush=True)


def header(args, info, diffusion, model, compile_, amp):
    """The one line that says what is sampled, and how."""
    start, weights = f" from {info['init']}" if info.get("init") else "", "raw" if args.no_ema else "EMA"
    origin = (f"published weights ({info['init']})" if info["step"] is None else
              f"trained {info['step']} steps on {info.get('dataset')}{start}, {weights} weights")
    kind = info["model_class"].rpartition(".")[2] + (" with SMD" if info["smd"] else "")
    sampler = ("DDIM" + (f" (ddim_eta {args.ddim_eta})" if args.ddim_eta else "") if args.sampler == "ddim" else
               "DDPM, sigma^2 learned" if getattr(model, "learns_variance", False) else
               f"DDPM, sigma^2 {'beta' if args.var == 'large' else 'beta_tilde'}")
    eta = f", eta {args.eta_mode}" if info["smd"] else ""
    return (f"{args.ckpt}: {kind} {origin} | {sampler}, {args.steps or diffusion.T} of T={diffusion.T} steps, "
            f"clip_x0={args.clip_x0}{eta}, seed {args.seed}, n {args.n}, compile={compile_}, bf16={amp}")


def write(images, grid, npz, note=""):
    """The .npz first, then the grid; a failed write is reported and the other one kept.
    Returns whether every write succeeded."""
    ok = True
    for path, save, what in ((npz, save_npz, f"{len(images)} images {images.shape[1:]} uint8 under 'images'"),
                             (grid, lambda x, p: save_grid(x[:256], p), f"a grid of {min(256, len(images))} images")):
        if not path:
            continue
        try:
            save(images, path)
            print(f"wrote {path}: {what}{note}", flush=True)
        except OSError as e:
            print(f"{PROG}: could not write {path} ({e.strerror or e})", file=sys.stderr, flush=True)
            ok = False
    return ok


def main(argv=None):
    parser = get_parser()
    args, explicit = parser.parse_args(argv), cli.explicit_args(parser, argv)
    grid = args.grid or (None if args.npz else "samples.png")
    cli.output_file(PROG, grid, "--grid", args.force, IMAGE_FORMATS)
    cli.output_file(PROG, args.npz, "--npz", args.force, (".npz",))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cli.set_threads(args.threads)
    compile_, amp = cli.cuda_defaults(device, args.compile, args.amp)
    with cli.one_line_interrupt(PROG):
        model, diffusion, info = load(args, device)
        check_memory(args, model)
        print(header(args, info, diffusion, model, compile_, amp), flush=True)
        ignored(args, explicit, info, model)
        net = torch.compile(model) if compile_ else model
        update = step_update(args.sampler, args.var, args.ddim_eta, args.clip_x0)
        images = np.empty((args.n, model.image_size, model.image_size, model.channels), np.uint8)
        done, saved = 0, time.time()
        try:
            for start, x in batches(net, diffusion, args.n, args.batch_size, args.steps, args.var, update,
                                    args.eta_mode, args.seed, amp, pad=compile_):
                images[start:start + len(x)], done = x, start + len(x)
                if args.npz and done < args.n and time.time() - saved > SAVE_EVERY_S:   # a killed run keeps these
                    save_npz(images[:done], args.npz)
                    saved = time.time()
        except KeyboardInterrupt:
            if done and args.npz:
                write(images[:done], None, args.npz, f" (interrupted: {done} of {args.n} images)")
            raise
        ok = write(images, grid, args.npz)
        if info["smd"] and args.eta_sensitivity:
            report_eta_sensitivity(model, diffusion, info, device, args.seed, args.eta_sensitivity)
    if not ok:
        raise SystemExit(1)
    return images


if __name__ == "__main__":
    main()
