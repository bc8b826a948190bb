"""
beyond/templates.py -- the expressive bottleneck in image space, measured against exact answers.

The data are 16 random smooth 16x16 grayscale templates (random 4x4 values, bicubically
upsampled, each scaled to span [-0.85, 0.85]) plus N(0, 0.05^2) noise per pixel: a
16-component Gaussian mixture in D = 256 (gmm.GaussianMixture), so exact mixture denoising
and the best Gaussian denoiser eps* = E[eps | x_t] (what a perfectly trained vanilla DDPM
computes) are known in closed form. On chains of T = 2, 5 and 10 steps, trained directly,
we train three U-Nets from the same seed on the same image batches -- vanilla (Algorithm 1),
SMD as in the paper (Algorithm 1 with eta) and, beyond the paper, a categorical mixture of K
Gaussians per reverse step trained by its exact likelihood, with its responsibilities annealed
(beyond.categorical.temperature, --anneal) -- and score their samples and
both references by the nearest template: distance (RMS per pixel over std; 1 for data),
blended share (distance > 2 std: not any one template), template coverage and TV of the
template histogram. `gap` is E|eps_mean - eps*|^2 / D on data: how far a model's mean
prediction is from the best Gaussian denoiser (0 = a perfectly trained vanilla model).

    python -m beyond.templates --json assets/templates/templates_results.json --png assets/templates/templates.png
                                                   # ~23 min, 1 core
    python -m beyond.templates --T 5 --components 4,16 --max-steps 500 --n 500 --png '' --json ''
    python -m beyond.templates --T 5 --fixed-var --mean-loss 1       # T = 5's best categorical setting
    python -m beyond.templates --T 10 --fixed-var --mean-loss 1 --nll-cap 1   # T = 10's

Every flag and output path is checked before training. Widths are matched by unet.matched_width
(the even width whose parameter count is closest to vanilla's).
"""

import math
import time

import torch
import torch.nn.functional as F
from PIL import Image

import smd
from machinery import cli, data, gmm
from beyond.categorical import (CategoricalConfig, CategoricalDiffusion, CategoricalUNet, add_flags, make_diffusion,
                                train_loop)
from unet import UNet, UNetConfig, matched_width, n_params

# -----------------------------------------------------------------------------
# the data; everything exact about it is in gmm.py

PROG = "python -m beyond.templates"
N_TEMPLATES, SIZE, STD, BLEND = 16, 16, 0.05, 2.0   # BLEND: distance (in std) beyond which a sample is blended


def make_templates(n=N_TEMPLATES, size=SIZE, coarse=4, amp=0.85, seed=0):
    """(n, size*size) float64: random coarse x coarse values in [-1, 1], bicubic-upsampled and
    scaled so that each template spans [-amp, amp]. With seed 0 the closest two templates are
    5.7 std apart (RMS per pixel), so even their average is > BLEND std from both."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, 1, coarse, coarse, generator=g, dtype=torch.float64) * 2 - 1
    up = F.interpolate(z, size=size, mode="bicubic", align_corners=True)
    return (up / up.abs().amax((1, 2, 3), keepdim=True) * amp).flatten(1)


TEMPLATES = make_templates()
DATA = gmm.GaussianMixture(TEMPLATES, STD)


def images(x):
    """(B, D) -> (B, 1, 16, 16) float32."""
    return x.float().view(-1, 1, SIZE, SIZE)

# -----------------------------------------------------------------------------
# metrics: how close is a sample set to q(x_0)?


def nearest_template(x):
    """(distance, index): RMS per pixel to the nearest template, in units of STD."""
    d, k = torch.cdist(x.double().flatten(1), TEMPLATES).min(1)
    return d / math.sqrt(TEMPLATES.shape[1]) / STD, k


def metrics(x, share=0.25):
    """dist: mean nearest-template distance (data: 1.0); dist_clean: the same over the clean
    samples (distance <= BLEND std); blended: share of samples that are not clean (data: 0);
    coverage: templates with >= `share` of their expected n/16 clean samples; tv: total
    variation of the clean samples' template histogram from uniform (1 if none are clean)."""
    d, k = nearest_template(x)
    clean = d <= BLEND
    counts = torch.bincount(k[clean], minlength=N_TEMPLATES).double()
    hist = counts / counts.sum().clamp_min(1)
    return dict(dist=d.mean().item(), dist_clean=d[clean].mean().item() if clean.any() else None,
                blended=1 - clean.double().mean().item(),
                coverage=int((counts >= share * len(x) / N_TEMPLATES).sum()),
                tv=0.5 * (hist - 1 / N_TEMPLATES).abs().sum().item() if clean.any() else 1.0)

# -----------------------------------------------------------------------------
# the three denoisers, with parameter counts matched to SMD's by the U-Net's width


def config(args, ch, **kw):
    fields = dict(image_size=SIZE, channels=1, ch=ch, ch_mult=tuple(args.ch_mult), num_res_blocks=1, attn_res=(),
                  dropout=0.0, **kw)
    return CategoricalConfig(**fields) if kw.get("components") else UNetConfig(**fields)


def build(cfg):
    return CategoricalUNet(cfg) if isinstance(cfg, CategoricalConfig) else UNet(cfg)


def model_specs(args):
    """name -> (config, objective): vanilla at --ch, SMD and the categorical models at the even
    width whose parameter count is closest to vanilla's (unless --no-match-params)."""
    target = n_params(UNet(config(args, args.ch)))
    width = lambda **kw: matched_width(target, lambda w: build(config(args, w, **kw)), 2) if args.match_params \
        else args.ch
    smd_kw = dict(smd=True, latent_dim=args.latent_dim)
    obj = args.objective
    specs = {"vanilla": (config(args, args.ch), obj), "SMD": (config(args, width(**smd_kw), **smd_kw), obj)}
    for K in args.components:
        kw = dict(components=K, learned_var=not args.fixed_var)
        specs[f"categorical K={K}"] = (config(args, width(**kw), **kw), "v")
    return specs


@torch.no_grad()
def mean_eps(model, diffusion, x_t, t):
    """The model's mean prediction of eps: eps_hat (vanilla), eps_hat averaged over 8 etas (SMD),
    or eps of the categorical mixture's mean x0_hat = sum_k pi_k x0_hat_k."""
    abar = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    if getattr(model, "latent_dim", 0):
        return torch.stack([diffusion.predict_eps(model, x_t, t, torch.randn(len(t), model.latent_dim))
                            for _ in range(8)]).mean(0)
    if not isinstance(diffusion, CategoricalDiffusion):
        return diffusion.predict_eps(model, x_t, t)
    x0_k, log_pi, _ = diffusion.mixture(model, x_t, t)
    x0 = diffusion.mixture_mean(x0_k, log_pi).float()
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


@torch.no_grad()
def gap_to_best_gaussian(model, diffusion, n, generator):
    """E |eps_mean - eps*|^2 / D over x_0 ~ data, t ~ U{1..T}, eps ~ N(0, I): the model's excess
    Algorithm-1 loss over the best any vanilla model can do. Returns (mean, [per t])."""
    x0 = images(DATA.sample(n, generator))
    t = torch.randint(0, diffusion.T, (n,), generator=generator)
    x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=generator))
    best = DATA.best_eps(x_t.flatten(1), diffusion.alphas_cumprod[t]).float().view(x_t.shape)
    err = (mean_eps(model, diffusion, x_t, t) - best).pow(2).mean((1, 2, 3))
    return err.mean().item(), [err[t == s].mean().item() for s in range(diffusion.T)]

# -----------------------------------------------------------------------------
# one chain length: references, training, sampling, scores


def run_T(T, args, specs, rows, info, samples):
    gen = lambda s: torch.Generator().manual_seed(args.seed * 100003 + 1000 * T + s)

    def score(name, x, **extra):
        rows.append(dict(model=name, T=T, **extra, **metrics(x)))
        samples[(name, T)] = x.float().view(-1, 1, SIZE, SIZE)[:16]

    dif_eps = smd.Diffusion(T)
    score("exact mixture", DATA.sample_exact(dif_eps, args.n, generator=gen(1)))
    g = gen(2)
    x_T = torch.randn((args.n, 1, SIZE, SIZE), generator=g, dtype=torch.float64)
    score("best Gaussian", dif_eps.sample(DATA.best_gaussian_model(dif_eps), x_T.shape, var=args.var, generator=g,
                                          x_T=x_T))
    for name, (cfg, objective) in specs.items():
        diffusion = make_diffusion(cfg, T, objective, args)
        torch.manual_seed(args.seed)
        model, t0 = build(cfg), time.time()
        loss = train_loop(model, diffusion, lambda n, g: images(DATA.sample(n, g)), args, f"T={T} {name}")[0]
        model.eval()
        eta = smd.eta_sensitivity(model, diffusion, images(DATA.sample(250, gen(3))), n_t=min(10, T),
                                  generator=gen(4))[0] if model.latent_dim else None
        gap, gap_t = gap_to_best_gaussian(model, diffusion, min(2000, args.n), gen(5))
        m = dict(params=n_params(model), ch=cfg.ch, loss=loss, train_s=time.time() - t0, gap=gap, gap_per_t=gap_t,
                 eta_sens=eta)
        with torch.no_grad():
            x = diffusion.sample(model, (args.n, 1, SIZE, SIZE), var=args.var, generator=gen(6))
        info[f"{name} T={T}"] = m
        score(name, x, **{k: m[k] for k in ("params", "gap", "eta_sens", "train_s") if m[k] is not None})
        print(f"T={T} {name}: {m['params']:,} params (ch {cfg.ch}), loss {loss:.4f}, gap {m['gap']:.4f}"
              + (f", eta-sensitivity {eta:.4f}" if eta is not None else "") + f", {time.time() - t0:.0f}s",
              flush=True)

# -----------------------------------------------------------------------------
# reporting: table, figure


def table(rows):
    head = (f"{'model':<16} {'T':>3} {'params':>8} {'dist':>7} {'dist_clean':>10} {'blended':>8} {'coverage':>8} "
            f"{'TV':>6} {'gap':>7} {'eta-sens':>8}")
    lines = [head, "-" * len(head)]
    opt = lambda r, k, f: format(r[k], f) if r.get(k) is not None else ""
    for r in rows:
        lines.append(f"{r['model']:<16} {r['T'] or '-':>3} {opt(r, 'params', ','):>8} {r['dist']:>7.2f} "
                     f"{opt(r, 'dist_clean', '.2f'):>10} {r['blended']:>8.3f} {r['coverage']:>8} {r['tv']:>6.3f} "
                     f"{opt(r, 'gap', '.4f'):>7} {opt(r, 'eta_sens', '.4f'):>8}")
    return "\n".join(lines)


def tile(x, scale=2, pad=1):
    """16 images (16, 1, 16, 16) in [-1, 1] as a 4x4 RGB grid, upscaled; blended ones framed red."""
    d, _ = nearest_template(x.flatten(1))
    s = SIZE * scale + 2 * pad
    grid = Image.new("RGB", (4 * s, 4 * s), (255, 255, 255))
    for i, (img, di) in enumerate(zip(x, d)):
        a = ((img[0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        frame = Image.new("RGB", (s, s), (220, 0, 0) if di > BLEND else (255, 255, 255))
        frame.paste(Image.fromarray(a).resize((SIZE * scale,) * 2, Image.NEAREST).convert("RGB"), (pad, pad))
        grid.paste(frame, ((i % 4) * s, (i // 4) * s))
    return grid


def figure(rows, samples, path):
    """Rows = data and models, columns = T; under each cell: blended share / templates covered."""
    Ts = sorted({r["T"] for r in rows if r["T"]})
    names = ["data"] + list(dict.fromkeys(r["model"] for r in rows if r["T"]))
    row = lambda name, T: next(r for r in rows if r["model"] == name and r["T"] in (T, 0))
    data.figure(names, Ts, lambda name, T: tile(samples[(name, row(name, T)["T"])]),
                lambda name, T: f"blend {row(name, T)['blended']:.2f}  cov {row(name, T)['coverage']}", path,
                note=f"red frame: > {BLEND:g} std from every template", left=120)


def get_parser():
    p = cli.Parser(__doc__, prog=PROG)
    p.add_argument("--T", type=cli.positive_ints, default=[2, 5, 10], help="training chain lengths (each >= 2)")
    p.add_argument("--components", type=cli.positive_ints, default=[16], help="K of the categorical model(s)")
    p.add_argument("--ch", type=cli.int_at_least(2, "U-Net width"), default=14,
                   help="vanilla's U-Net width; the others are matched to its count")
    p.add_argument("--ch-mult", type=cli.positive_ints, default=[1, 2, 2], help="width multipliers per resolution")
    p.add_argument("--no-match-params", dest="match_params", action="store_false", help="every model at --ch")
    p.add_argument("--latent-dim", type=cli.positive_int, default=16, help="SMD: size of eta and z_t")
    p.add_argument("--max-steps", type=cli.positive_int, default=1200, help="training steps per model")
    p.add_argument("--batch-size", type=cli.positive_int, default=64, help="examples per training step")
    p.add_argument("--lr", type=cli.positive_float, default=4e-3, help="AdamW's peak learning rate")
    add_flags(p)
    p.add_argument("--objective", default="eps", choices=["eps", "v"], help="vanilla and SMD: eps (the paper) or v")
    p.add_argument("--var", default="small", choices=["small", "large"],
                   help="sigma^2 of vanilla, SMD and a --fixed-var categorical: small (beta~) or large (beta)")
    p.add_argument("--n", type=cli.int_at_least(16, "the figure shows 16"), default=2000,
                   help="samples per cell; also the rows of the gap, at most 2000")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="weights, batches, samples")
    cli.add_machine_flags(p, gpu=False)
    p.add_argument("--json", default="", help="write the results here ('': nowhere)")
    p.add_argument("--png", default="templates.png", help="write the figure here ('': none)")
    p.add_argument("--force", action="store_true", help="replace an existing --json or --png file")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if min(args.T) < 2:
        cli.fail(PROG, f"--T {min(args.T)}: a chain needs at least 2 steps")
    if SIZE % 2 ** (len(args.ch_mult) - 1):
        cli.fail(PROG, f"--ch-mult {args.ch_mult}: {SIZE}x{SIZE} images allow at most 5 levels")
    cli.output_file(PROG, args.json, "--json", args.force, (".json",))
    cli.output_file(PROG, args.png, "--png", args.force, (".png",))
    cli.set_threads(args.threads)
    t0 = time.time()
    specs = model_specs(args)
    print(", ".join(f"{k}: {n_params(build(c)):,} params (ch {c.ch})" for k, (c, _) in specs.items()))
    x = DATA.sample(args.n, torch.Generator().manual_seed(args.seed))
    rows, info = [dict(model="data", T=0, **metrics(x))], {}
    noise = STD * torch.randn(TEMPLATES.shape, generator=torch.Generator().manual_seed(args.seed))
    samples = {("data", 0): images(TEMPLATES + noise)}
    for T in args.T:
        run_T(T, args, specs, rows, info, samples)
    print(table(rows))
    print(f"total {time.time() - t0:.0f}s")
    if args.json:
        result = dict(config=data.portable(args), models=info, rows=rows, seconds=time.time() - t0)
        data.save_json(result, args.json)
    if args.png:   # last: a bad path costs no results
        figure(rows, samples, args.png)


if __name__ == "__main__":
    main()
