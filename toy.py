"""
toy.py -- the 7x7 Gaussian-mixture experiment of Soft Mixture Denoising (Li et al., ICLR
2024, Fig. 2), as a measurement against exact answers.

On a Gaussian mixture everything is known in closed form: the density q(x_t), the best
Gaussian denoiser eps* = E[eps | x_t] (what a perfectly trained vanilla DDPM computes, the
bottleneck of Sec. 3.1) and the true posterior q(x_{t-1} | x_t), again a Gaussian mixture
(Proposition 3.1, Eq. 29), which sampled step by step is what Theorem 4.1 says SMD can reach.
We train a vanilla and an SMD MLP denoiser (Algorithm 1 of smd.py) with the same number of
parameters, sample them (Algorithm 2) at several step counts, and score them and both references
against the true mixture. Every flag and output path is checked before training.

    python toy.py                          # T=1000, respaced to 1000/100/20/10/5 steps (about 6 min, 1 core)
    python toy.py --T 10 --steps 10,5      # train a 10-step chain directly
    python toy.py --seeds 3 --json out.json --png out.png
"""

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import smd
from machinery import cli, data, gmm
from machinery.loop import train_loop
from unet import matched_width, n_params

PROG = "toy.py"

# -----------------------------------------------------------------------------
# the data; everything exact about it is in gmm.py

GRID, SPACING, STD = 7, 0.25, 0.025     # means on [-0.75, 0.75]^2, 10 std apart: |x| < 0.9


def grid_means():
    """(49, 2) mode centres, equal weights w_k = 1/49."""
    g = (torch.arange(GRID, dtype=torch.float64) - (GRID - 1) / 2) * SPACING
    return torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)


MEANS = grid_means()
DATA = gmm.GaussianMixture(MEANS, STD)

# -----------------------------------------------------------------------------
# metrics: how close is a sample set to q(x_0)?


def metrics(x, share=0.25):
    """nll: -E log q(x) (true samples give the entropy; blur raises it, collapse onto the
    centres would lower it, hence `spread`); precision: fraction within 3 std of the nearest
    mode; coverage: modes holding >= `share` of their expected n/49 precise samples; tv: total
    variation of the precise samples' mode histogram from uniform; spread: rms distance of
    precise samples to their mode over its true value (1 for data)."""
    x = x.double()
    d, k = torch.cdist(x, MEANS).min(1)
    ok = d < 3 * STD
    counts = torch.bincount(k[ok], minlength=len(MEANS)).double()
    hist = counts / counts.sum().clamp_min(1)
    rms_true = STD * math.sqrt(2 - 9 / math.expm1(4.5))      # E[r^2 | r < 3 std] for 2-D N(0, STD^2 I)
    return dict(nll=-DATA.log_prob(x).mean().item(), precision=ok.double().mean().item(),
                coverage=int((counts >= share * len(x) / len(MEANS)).sum()),
                tv=0.5 * (hist - 1 / len(MEANS)).abs().sum().item() if ok.any() else 1.0,
                spread=(d[ok].pow(2).mean().sqrt() / rms_true).item() if ok.any() else float("nan"))

# -----------------------------------------------------------------------------
# the denoiser: an MLP whose hidden layers are the blocks SMD modulates


class Denoiser(nn.Module):
    """eps_theta(x_t, t): h = W x + time; `depth` residual blocks h <- h + W silu(modulate(norm(h)));
    out = W silu(norm(h)). With latent_dim > 0 the blocks' (scale, shift) = f_phi(g_xi(eta, h_0, t), t)
    (Eq. 11, Alg. 1 lines 6-7) from smd.SoftMixture; with latent_dim = 0 the model is vanilla."""

    def __init__(self, width=128, depth=3, latent_dim=0, T=1000, temb_dim=64, mix_hidden=64, n_freq=6):
        super().__init__()
        self.latent_dim, self.t_scale, self.temb_dim = latent_dim, 1000 / T, temb_dim
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq), persistent=False)
        self.time = smd.mlp(temb_dim, temb_dim, temb_dim, depth=1)
        self.inp, self.tproj = nn.Linear(2 + 4 * n_freq, width), nn.Linear(temb_dim, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = self.output_layer(width)
        self.soft_mixture = smd.SoftMixture(latent_dim, width, temb_dim, [width] * depth, mix_hidden) \
            if latent_dim else None

    def output_layer(self, width):
        return nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t, eta=None):
        return self.out(self.trunk(x, t, eta))

    def trunk(self, x, t, eta=None):
        """The last features, before the output layer."""
        tu, inv = torch.unique(t, return_inverse=True)      # sampling has one t per batch: embed it once
        e = self.time(smd.timestep_embedding(tu * self.t_scale, self.temb_dim))
        te, e = self.tproj(e)[inv], e[inv]
        f = (x[:, :, None] * self.freqs).flatten(1)            # Fourier features pi 2^k x: the grid is sharp
        h = self.inp(torch.cat([x, f.sin(), f.cos()], 1)) + te
        mods = self.soft_mixture(eta, h, e) if self.soft_mixture is not None else [None] * len(self.blocks)
        for norm, lin, mod in zip(self.norms, self.blocks, mods):
            h = h + lin(F.silu(smd.modulate(norm(h), mod)))
        return h


def eta_zero(model, n):
    """The SMD model with eta held at 0 for n samples: if it samples as well, the latent is unused."""
    return smd.HeldEta(model, torch.zeros(n, model.latent_dim))

# -----------------------------------------------------------------------------
# the models, with parameter counts matched by width, and their training


def model_specs(args):
    """{name: spec} of the models in --models, vanilla and SMD, with their widths matched. A spec
    is a dict: make(width) -> model, chain() -> its diffusion (whose loss is the training
    objective), var: the sampling variances (None: --var)."""
    makers = {"vanilla": lambda w: Denoiser(w, args.depth, 0, args.T),
              "SMD": lambda w: Denoiser(w, args.depth, args.latent_dim, args.T, mix_hidden=args.mix_hidden)}
    names = {"vanilla": "vanilla", "smd": "SMD"}
    return match_widths({names[m]: dict(make=makers[names[m]], chain=lambda: smd.Diffusion(args.T), var=None)
                         for m in args.models}, args)


def match_widths(specs, args):
    """With --match-params (the default) each model's width is the one whose parameter count is
    closest to the largest of the models at --ch (unet.matched_width); else --ch."""
    target = max(n_params(spec["make"](args.ch)) for spec in specs.values())
    for spec in specs.values():
        spec["width"] = matched_width(target, spec["make"]) if args.match_params else args.ch
    return specs


def train(model, diffusion, args):
    """machinery.loop.train_loop on fresh batches of the mixture: AdamW, a cosine learning-rate
    decay, no warm-up and no gradient clipping. Returns the mean loss of the last 10% of steps."""
    draw = lambda: DATA.sample(args.batch_size).float()
    return train_loop(model, diffusion, draw, args.max_steps, args.lr, warmup=0, grad_clip=0.0)[0]

# -----------------------------------------------------------------------------
# one seed: train, sample everything, score everything


def run(args, seed, specs):
    """Train every model from the global seed `seed` (their widths differ, so their initial
    weights and batches are not the same draws), then sample and score them and both references
    at every step count, each from a generator seeded alike: the same x_T for every model, and
    for SMD with eta held at 0 the same step noise as with a fresh eta."""
    steps_list = args.steps
    models, info = {}, {}
    for name, spec in specs.items():
        torch.manual_seed(seed)
        model, diffusion = spec["make"](spec["width"]), spec["chain"]()
        t0 = time.time()
        final_loss = train(model, diffusion, args)
        model.eval()
        info[name] = dict(params=n_params(model), loss=final_loss, train_s=time.time() - t0,
                          eta_sensitivity=smd.eta_sensitivity(model, diffusion, DATA.sample(1000).float())[0]
                          if model.latent_dim else 0.0)
        print(f"seed {seed} {name}: {info[name]['params']:,} params, final loss {final_loss:.4f}, "
              f"eta-sensitivity {info[name]['eta_sensitivity']:.4f}, {info[name]['train_s']:.0f}s")
        models[name] = (model, diffusion, spec["var"])
        if model.latent_dim:
            models[name + " eta=0"] = (eta_zero(model, args.n), diffusion, args.var[:1])
    rows, gen = [], lambda s: torch.Generator().manual_seed(seed * 100003 + s)

    def score(name, var, s, x, **extra):
        rows.append(dict(model=name, var=var, steps=s, **extra, **metrics(x), _x=x.float()))

    reference = smd.Diffusion(args.T)
    score("data", "-", 0, DATA.sample(args.n, gen(0)))
    for s in steps_list:
        score("exact mixture", "-", s, DATA.sample_exact(reference, args.n, s, gen(s)))
    samplers = [("best Gaussian", DATA.best_gaussian_model(reference), reference, None, torch.float64)] + \
               [(k, m, d, v, torch.float32) for k, (m, d, v) in models.items()]
    with torch.no_grad():
        for name, model, diffusion, variances, dtype in samplers:   # eta=0: the first --var only
            for var in variances or args.var:
                for s in steps_list:
                    t0 = time.time()     # Diffusion.sample clamps to [-1, 1]; the data lie in |x| < 0.9
                    g = gen(s)
                    x_T = torch.randn((args.n, 2), generator=g, dtype=dtype)
                    x = diffusion.sample(model, x_T.shape, steps=s, var=var, generator=g, x_T=x_T)
                    print(f"  sampled {name}, sigma^2 {var}, {s} steps: {time.time() - t0:.0f}s", flush=True)
                    smd_model = getattr(model, "latent_dim", 0) and name in info
                    extra = {"eta_sens": info[name]["eta_sensitivity"]} if smd_model else {}
                    score(name, var, s, x, **extra)
    return rows, info

# -----------------------------------------------------------------------------
# reporting: table, JSON, figure


KEYS = ["nll", "precision", "coverage", "tv", "spread"]


def aggregate(per_seed):
    """Mean and std over seeds, row by row (rows come in the same order for every seed); the std
    is the population std (ddof = 0), not the standard error."""
    out = []
    for rs in zip(*per_seed):
        r = {k: rs[0][k] for k in ("model", "var", "steps")}
        for k in KEYS + ["eta_sens"]:
            if k in rs[0]:
                v = np.array([x[k] for x in rs], dtype=np.float64)
                r[k], r[k + "_std"] = float(v.mean()), float(v.std())
        out.append(r)
    return out


def fmt(r, k, digits):
    if k not in r:
        return ""
    s = f"{r[k]:.{digits}f}"
    return s + (f"±{r[k + '_std']:.{digits}f}" if r.get(k + "_std", 0) > 0 else "")


def table(rows):
    head = (f"{'model':<20} {'var':<5} {'steps':>5} {'NLL':>12} {'precision':>12} {'coverage':>11} {'TV':>12} "
            f"{'spread':>12} {'eta-sens':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<20} {r['var']:<5} {r['steps'] or '-':>5} {fmt(r, 'nll', 3):>12} "
                     f"{fmt(r, 'precision', 3):>12} {fmt(r, 'coverage', 0):>11} {fmt(r, 'tv', 3):>12} "
                     f"{fmt(r, 'spread', 2):>12} {fmt(r, 'eta_sens', 4):>9}")
    return "\n".join(lines)


def density_image(x, px=96, lim=1.0):
    """A 2-D histogram of x on [-lim, lim]^2, sqrt-scaled, dark = dense, as a uint8 image."""
    ij = ((x.numpy() + lim) / (2 * lim) * px).astype(np.int64)
    ij = ij[((ij >= 0) & (ij < px)).all(1)]
    h = np.zeros((px, px))
    np.add.at(h, (px - 1 - ij[:, 1], ij[:, 0]), 1)
    h = np.sqrt(h / max(h.max(), 1))
    return (255 * (1 - h)).astype(np.uint8)


def figure(rows, path, px=96, pad=4, left=150, top=20):
    """Rows = models (references first), columns = step counts, like Fig. 2."""
    steps = sorted({r["steps"] for r in rows if r["steps"]}, reverse=True)
    names = list(dict.fromkeys((r["model"], r["var"]) for r in rows if r["steps"]))
    img = Image.new("L", (left + len(steps) * (px + pad), top + len(names) * (px + pad)), 255)
    draw = ImageDraw.Draw(img)
    for j, s in enumerate(steps):
        draw.text((left + j * (px + pad) + px // 3, 4), f"{s} steps", fill=0)
    for i, (name, var) in enumerate(names):
        y = top + i * (px + pad)
        draw.text((4, y + px // 2 - 10), name, fill=0)
        draw.text((4, y + px // 2 + 2), "" if var == "-" else f"sigma^2: {var}", fill=0)
        for r in rows:
            if (r["model"], r["var"]) == (name, var) and "_x" in r:
                img.paste(Image.fromarray(density_image(r["_x"], px)), (left + steps.index(r["steps"]) * (px + pad), y))
    img.save(path, optimize=True)


def get_parser():
    p = cli.Parser(__doc__, prog=PROG)
    p.add_argument("--T", type=cli.int_at_least(2, "a chain needs 2 steps"), default=1000, help="training chain length")
    p.add_argument("--steps", type=cli.positive_ints, default=[1000, 100, 20, 10, 5],
                   help="sampling step counts, each in [2, T]")
    p.add_argument("--var", type=cli.choices_list(["large", "small"]), default=["large", "small"],
                   help="sampling variances: sigma^2 = beta (large) and/or beta_tilde (small)")
    p.add_argument("--models", type=cli.choices_list(["vanilla", "smd"]), default=["vanilla", "smd"],
                   help="comma-separated, of: vanilla, smd")
    p.add_argument("--ch", type=cli.positive_int, default=96, help="the MLP's width (then matched: --no-match-params)")
    p.add_argument("--depth", type=cli.positive_int, default=3, help="residual blocks")
    p.add_argument("--latent-dim", type=cli.positive_int, default=4, help="SMD: size of eta and z_t")
    p.add_argument("--mix-hidden", type=cli.positive_int, default=32, help="SMD: g_xi and f_phi's hidden width")
    p.add_argument("--no-match-params", dest="match_params", action="store_false",
                   help="every model at --ch (by default widths match the largest model's parameter count)")
    p.add_argument("--max-steps", type=cli.positive_int, default=4000, help="training steps per model")
    p.add_argument("--batch-size", type=cli.positive_int, default=512, help="examples per training step")
    p.add_argument("--lr", type=cli.positive_float, default=2e-3, help="AdamW's peak learning rate (cosine decay)")
    p.add_argument("--n", type=cli.int_at_least(2, "samples per evaluation"), default=10000,
                   help="samples per model and step count")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="the first seed")
    p.add_argument("--seeds", type=cli.positive_int, default=1,
                   help="seeds, from --seed on (mean and population std reported)")
    cli.add_machine_flags(p, gpu=False)
    p.add_argument("--json", default="", help="write the results here ('': nowhere)")
    p.add_argument("--png", default="toy.png", help="write the figure here (first seed; '': none)")
    p.add_argument("--force", action="store_true", help="replace an existing --json or --png file")
    return p


def parse_args(parser, argv=None):
    """The flags, with the step counts and the output paths checked before any work."""
    args = parser.parse_args(argv)
    bad_steps = [s for s in args.steps if not 2 <= s <= args.T]
    if bad_steps:
        cli.fail(parser.prog, f"--steps {','.join(map(str, bad_steps))}: a sampler takes between 2 and --T {args.T} "
                              f"steps")
    cli.output_file(parser.prog, args.json, "--json", args.force, (".json",))
    cli.output_file(parser.prog, args.png, "--png", args.force, (".png",))
    return args


def experiment(args, specs):
    """Run every seed, print the table, write the JSON and the figure."""
    cli.set_threads(args.threads)
    t0, per_seed, infos, first = time.time(), [], [], None
    for seed in range(args.seed, args.seed + args.seeds):
        rows, info = run(args, seed, specs)
        first = first or rows
        per_seed.append([{k: v for k, v in r.items() if k != "_x"} for r in rows])
        infos.append(info)
    rows = aggregate(per_seed)
    print(table(rows))
    print(f"total {time.time() - t0:.0f}s")
    if args.json:
        result = dict(config=data.portable(args), std="population std over seeds (ddof = 0)", models=infos, rows=rows,
                      seconds=time.time() - t0)
        data.save_json(result, args.json)
        print(f"wrote {args.json}")
    if args.png:   # last: a bad path costs no results
        figure(first, args.png)
        print(f"wrote {args.png}: the first seed's samples")


def main(argv=None):
    args = parse_args(get_parser(), argv)
    experiment(args, model_specs(args))


if __name__ == "__main__":
    main()
