"""
toy.py -- the 7x7 Gaussian-mixture experiment of Soft Mixture Denoising (Li et al., ICLR
2024, Fig. 2), as a measurement against exact answers.

On a Gaussian mixture everything is known in closed form: the density q(x_t), the best
Gaussian denoiser eps* = E[eps | x_t] (what a perfectly trained vanilla DDPM computes, the
bottleneck of Theorem 3.1) and the true posterior q(x_{t-1} | x_t), again a Gaussian mixture
(Proposition 3.1, Eq. 29), which sampled step by step is what Theorem 4.1 says SMD can reach.
We train a vanilla and an SMD MLP denoiser (Algorithm 1 of smd.py; or, beyond the paper, the
categorical mixture of categorical.py), sample them (Algorithm 2) at several step counts, and
score them and both references against the true mixture. Every flag is checked before training.

    python toy.py                          # T=1000, respaced to 1000/100/20/10/5 steps (4-7 min, 1 core)
    python toy.py --smd-objective iwae     # beyond the paper: the importance-weighted bound
    python toy.py --T 10 --steps 10,5 --smd-objective jensen,iwae   # train a 10-step chain directly
    python toy.py --T 5 --steps 5 --smd-objective categorical-var --width 160 --batch-size 512 --iters 24000
                                           # beyond the paper: K=49 categorical mixture, ~8.5 min, 1 core
    python toy.py --seeds 3 --json out.json --png out.png
"""

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import cli
import data
import gmm
import smd
from categorical import CategoricalDiffusion, temperature
from unet import matched_width, n_params

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
        return self.out(self.trunk(x, t, eta)[0])

    def trunk(self, x, t, eta=None):
        """(last features, time embedding)."""
        tu, inv = torch.unique(t, return_inverse=True)      # sampling has one t per batch: embed it once
        e = self.time(smd.timestep_embedding(tu * self.t_scale, self.temb_dim))
        te, e = self.tproj(e)[inv], e[inv]
        f = (x[:, :, None] * self.freqs).flatten(1)            # Fourier features pi 2^k x: the grid is sharp
        h = self.inp(torch.cat([x, f.sin(), f.cos()], 1)) + te
        mods = self.soft_mixture(eta, h, e) if self.soft_mixture is not None else [None] * len(self.blocks)
        for norm, lin, mod in zip(self.norms, self.blocks, mods):
            h = h + lin(F.silu(smd.modulate(norm(h), mod)))
        return h, e


class CategoricalDenoiser(Denoiser):
    """Beyond the paper (categorical.py): K 2-d outputs, K logits and, if learned_var, K variance
    logits, all from the same last features; pi starts uniform."""

    def __init__(self, width=128, depth=3, T=1000, components=49, learned_var=False, **kw):
        self.components, self.learned_var = components, learned_var
        super().__init__(width, depth, 0, T, **kw)
        self.head = nn.Linear(width, components * (2 if learned_var else 1))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def output_layer(self, width):
        return nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, 2 * self.components))

    def forward(self, x, t, eta=None):
        h, K = self.out[:-1](self.trunk(x, t)[0]), self.components
        head = self.head(h)
        return self.out[-1](h).view(-1, K, 2), head[:, :K], head[:, K:] if self.learned_var else None


def eta_zero(model, n):
    """The SMD model with eta held at 0 for n samples: if it samples as well, the latent is unused."""
    return smd.HeldEta(model, torch.zeros(n, model.latent_dim))

# -----------------------------------------------------------------------------
# training: Algorithm 1 (Jensen) or the importance-weighted bound (beyond the paper)


def iwae_loss(model, diffusion, x0, eta_samples):
    """-(1/Gamma_t) log (1/K) sum_k p(x_{t-1} | x_t, z_k), x_{t-1} ~ q(x_{t-1} | x_t, x_0), K = eta_samples.
    With p(x_{t-1} | x_t, z) = N(mu_z, sigma_t^2 I), mu_z from eps_hat_k by Eq. (12)/Alg. 2 line 7 and
    x_{t-1} = mu_tilde + sqrt(beta_tilde) xi (mu_tilde: the same formula with the true eps):
      x_{t-1} - mu_z = c D_k + sqrt(beta_tilde) xi,  D_k = eps_hat_k - eps,  c = beta / sqrt(alpha (1 - abar)),
      log p_k = -Gamma ||D_k||^2 - rho D_k.xi + const,  Gamma = c^2 / (2 sigma^2)  (the paper's Gamma_t, Eq. 14),
      rho = c sqrt(beta_tilde) / sigma^2.  sigma^2 = beta_tilde, clipped at t=0 to its t=1 value (IDDPM).
    Subtracting rho mean_k(D_k).xi from every log p_k shifts the bound by a zero-mean term (xi is
    independent of everything else) and removes the xi noise when the K predictions agree. Then
    dividing by Gamma_t gives exactly the paper's loss ||eps - eps_hat||^2 when z is ignored, and a
    soft minimum over k (winner-takes-all as Gamma_t -> inf) when the predictions differ."""
    B, D, K = *x0.shape, eta_samples
    t = torch.randint(0, diffusion.T, (B,))
    eps = torch.randn_like(x0)
    x_t = diffusion.q_sample(x0, t, eps)
    eta = torch.randn(B * K, model.latent_dim)
    eps_hat = model(x_t.repeat_interleave(K, 0), t.repeat_interleave(K, 0), eta).view(B, K, D)
    abar, beta = diffusion.alphas_cumprod, diffusion.betas
    beta_tilde = smd.posterior(abar, torch.cat([abar.new_ones(1), abar[:-1]]))[2]
    sigma2 = torch.cat([beta_tilde[1:2], beta_tilde[1:]])
    c2 = beta**2 / ((1 - beta) * (1 - abar))
    gamma, rho = (c2 / (2 * sigma2))[t], (c2.sqrt() * beta_tilde.sqrt() / sigma2)[t]      # float64
    d = (eps_hat - eps[:, None]).double()
    xi = torch.randn(B, 1, D, dtype=torch.float64)
    logp = -gamma[:, None] * d.pow(2).sum(-1) - rho[:, None] * ((d - d.mean(1, keepdim=True)) * xi).sum(-1)
    bound = logp.logsumexp(1) - math.log(K)
    return (-(bound / gamma).mean() / D).float()          # / D: the same scale as F.mse_loss


def train(model, diffusion, args, objective):
    """AdamW with a cosine learning-rate decay; returns the mean loss of the last 10% of steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    losses = []
    for it in range(args.iters):
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * it / args.iters))
        x0 = DATA.sample(args.batch_size).float()
        if objective == "iwae":
            loss = iwae_loss(model, diffusion, x0[:max(1, args.batch_size // args.eta_samples)], args.eta_samples)
        elif objective.startswith("categorical"):   # the exact mixture likelihood, annealed if asked
            loss = diffusion.loss(model, x0, tau=temperature(it, args.iters, args.anneal))
        else:   # Algorithm 1 (vanilla: eta is None; SMD: one eta per example, the paper's Jensen bound)
            loss = diffusion.loss(model, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return float(np.mean(losses[-max(1, args.iters // 10):]))

# -----------------------------------------------------------------------------
# one seed: train, sample everything, score everything


def build_models(args):
    """{name: (objective, make_model, diffusion)} for vanilla and the objectives asked for. With
    --match-params (the default) every model's width is raised to the parameter count of the
    largest one at --width (unet.matched_width: the width with the closest count)."""
    eps = smd.Diffusion(args.T)
    makers = {"vanilla": ("jensen", lambda w: Denoiser(w, args.depth, 0, args.T), eps)}
    for o in args.smd_objective:
        if o in ("jensen", "iwae"):
            makers[f"SMD-{o}"] = (o, lambda w: Denoiser(w, args.depth, args.latent_dim, args.T,
                                                        mix_hidden=args.mix_hidden), eps)
        else:   # categorical mixtures read their x0_hat_k through the v objective
            lv = o == "categorical-var"
            makers[f"categorical K={args.components}" + (", learned var" if lv else "")] = \
                (o, lambda w, lv=lv: CategoricalDenoiser(w, args.depth, args.T, args.components, lv),
                 CategoricalDiffusion(args.T, objective="v"))
    target = max(n_params(make(args.width)) for _, make, _ in makers.values())
    out = {}
    for name, (o, make, diffusion) in makers.items():
        w = matched_width(target, make) if args.match_params else args.width
        out[name] = (o, lambda make=make, w=w: make(w), diffusion)
    return out


def run(args, seed):
    """Train every model from the same seed (same init stream, same batches: common random
    numbers), then sample and score them and both references at every step count."""
    steps_list = args.steps
    models, info = {}, {}
    for name, (objective, make, diffusion) in build_models(args).items():
        torch.manual_seed(seed)
        model = make()
        t0 = time.time()
        final_loss = train(model, diffusion, args, objective)
        model.eval()
        info[name] = dict(params=n_params(model), loss=final_loss, train_s=time.time() - t0,
                          eta_sensitivity=smd.eta_sensitivity(model, diffusion, DATA.sample(1000).float())[0]
                          if model.latent_dim else 0.0)
        print(f"seed {seed} {name}: {info[name]['params']:,} params, final loss {final_loss:.4f} ({objective}), "
              f"eta-sensitivity {info[name]['eta_sensitivity']:.4f}, {info[name]['train_s']:.0f}s")
        models[name] = (model, diffusion)
        if model.latent_dim:
            models[name + " eta=0"] = (eta_zero(model, args.n), diffusion)
    rows, gen = [], lambda s: torch.Generator().manual_seed(seed * 100003 + s)

    def score(name, var, s, x, **extra):
        rows.append(dict(model=name, var=var, steps=s, **extra, **metrics(x), _x=x.float()))

    reference = smd.Diffusion(args.T)
    score("data", "-", 0, DATA.sample(args.n, gen(0)))
    for s in steps_list:
        score("exact mixture", "-", s, DATA.sample_exact(reference, args.n, s, gen(s)))
    samplers = [("best Gaussian", DATA.best_gaussian_model(reference), reference, torch.float64)] + \
               [(k, m, d, torch.float32) for k, (m, d) in models.items()]
    with torch.no_grad():
        for name, model, diffusion, dtype in samplers:
            # eta=0: the first var only; categorical: beta_tilde, as trained (or their own variances)
            variances = ["small"] if name.startswith("categorical") else args.var[:1] if name.endswith("eta=0") else args.var
            for var in variances:
                for s in steps_list:
                    t0 = time.time()     # Diffusion.sample clamps to [-1, 1]; the data lie in |x| < 0.9
                    g = gen(s)
                    x_T = torch.randn((args.n, 2), generator=g, dtype=dtype)
                    x = diffusion.sample(model, x_T.shape, steps=s, var=var, generator=g, x_T=x_T)
                    print(f"  sampled {name}, sigma^2 {var}, {s} steps: {time.time() - t0:.0f}s", flush=True)
                    extra = {"eta_sens": info[name]["eta_sensitivity"]} if name.startswith("SMD") and name in info else {}
                    score(name, var, s, x, **extra)
    return rows, info

# -----------------------------------------------------------------------------
# reporting: table, JSON, figure


KEYS = ["nll", "precision", "coverage", "tv", "spread"]


def aggregate(per_seed):
    """mean and std over seeds, row by row (rows come in the same order for every seed)."""
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
    head = f"{'model':<20} {'var':<5} {'steps':>5} {'NLL':>12} {'precision':>12} {'coverage':>11} {'TV':>12} {'spread':>12} {'eta-sens':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<20} {r['var']:<5} {r['steps'] or '-':>5} {fmt(r, 'nll', 3):>12} {fmt(r, 'precision', 3):>12} "
                     f"{fmt(r, 'coverage', 0):>11} {fmt(r, 'tv', 3):>12} {fmt(r, 'spread', 2):>12} {fmt(r, 'eta_sens', 4):>9}")
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
    p = cli.Parser(__doc__, prog="toy.py")
    p.add_argument("--T", type=cli.int_at_least(2, "a chain needs 2 steps"), default=1000, help="training chain length")
    p.add_argument("--steps", type=cli.positive_ints, default=[1000, 100, 20, 10, 5], help="sampling step counts")
    p.add_argument("--var", type=cli.choices_list(["large", "small"]), default=["large", "small"])
    p.add_argument("--smd-objective", type=cli.choices_list(["jensen", "iwae", "categorical", "categorical-var"]),
                   default=["jensen"], help="comma-separated: jensen (the paper's SMD), iwae (SMD, importance-weighted "
                   "bound), categorical (K components, beta_tilde variances), categorical-var (learned variances)")
    p.add_argument("--eta-samples", type=cli.positive_int, default=8, help="etas per example for iwae")
    p.add_argument("--components", type=cli.positive_int, default=49, help="categorical: number of components K")
    p.add_argument("--width", type=cli.positive_int, default=96)
    p.add_argument("--depth", type=cli.positive_int, default=3)
    p.add_argument("--latent-dim", type=cli.positive_int, default=4)
    p.add_argument("--mix-hidden", type=cli.positive_int, default=32, help="SMD: g_xi and f_phi's hidden width")
    p.add_argument("--no-match-params", dest="match_params", action="store_false",
                   help="by default every model's width is raised to the largest model's parameter count")
    p.add_argument("--iters", type=cli.positive_int, default=4000)
    p.add_argument("--batch-size", type=cli.positive_int, default=512,
                   help="rows per step (iwae: batch-size/eta-samples examples x eta-samples etas)")
    p.add_argument("--lr", type=cli.positive_float, default=2e-3)
    p.add_argument("--anneal", type=cli.temperature, default=1.0, help="categorical: responsibilities' temperature "
                   "from this to 1 over the first half of training (categorical.temperature; 1: off)")
    p.add_argument("--n", type=cli.int_at_least(2, "samples per evaluation"), default=10000)
    p.add_argument("--seed", type=cli.nonneg_int, default=0)
    p.add_argument("--seeds", type=cli.positive_int, default=1)
    p.add_argument("--threads", type=cli.nonneg_int, default=0, help="CPU threads (0: 1 on <= 4 cores)")
    p.add_argument("--json", default="", help="write results here")
    p.add_argument("--png", default="toy.png", help="write the figure here (first seed); '' for none")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    too_long = [s for s in args.steps if s > args.T]
    if too_long:
        cli.fail("toy.py", f"--steps {','.join(map(str, too_long))}: a chain of --T {args.T} has at most {args.T} steps")
    if "iwae" in args.smd_objective and args.batch_size < args.eta_samples:
        cli.fail("toy.py", f"--batch-size {args.batch_size}: iwae needs at least --eta-samples {args.eta_samples} rows")
    cli.writable_file("toy.py", args.json, "--json")
    cli.writable_file("toy.py", args.png, "--png")
    cli.set_threads(args.threads)
    t0 = time.time()
    per_seed, infos, first = [], [], None
    for seed in range(args.seed, args.seed + args.seeds):
        rows, info = run(args, seed)
        first = first or rows
        per_seed.append([{k: v for k, v in r.items() if k != "_x"} for r in rows])
        infos.append(info)
    rows = aggregate(per_seed)
    print(table(rows))
    print(f"total {time.time() - t0:.0f}s")
    if args.json:
        result = dict(config=vars(args), models=infos, rows=rows, seconds=time.time() - t0)
        data.save_json(result, args.json)
    if args.png:   # last: a bad path costs no results
        figure(first, args.png)


if __name__ == "__main__":
    main()
