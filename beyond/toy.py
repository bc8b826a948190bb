"""
beyond/toy.py -- toy.py's 7x7 Gaussian mixture with the models beyond the paper: SMD trained by
an importance-weighted bound (IWAE) instead of Algorithm 1's Jensen bound, and the categorical
mixture of K Gaussians per reverse step (beyond/categorical.py), with beta_tilde or learned
variances. The same data, scores, references, table and figure as toy.py, and the same flags,
plus --eta-samples, --components and --anneal.

    python -m beyond.toy --T 10 --steps 10,5 --models vanilla,smd,iwae     # the IWAE bound
    python -m beyond.toy --T 5 --steps 5 --models vanilla,categorical-var --ch 160 --max-steps 24000 --seeds 3
                                           # K = 49 categorical mixture, ~8.5 min a seed, 1 core
"""

import argparse
import math

import torch
import torch.nn as nn

import smd
import toy
from machinery import cli
from beyond.categorical import TEMPERATURE, AnnealedDiffusion
from toy import Denoiser

MODELS = ("vanilla", "smd", "iwae", "categorical", "categorical-var")


class CategoricalDenoiser(Denoiser):
    """toy.Denoiser with K 2-d outputs, K logits and, if learned_var, K variance logits, all from
    the same last features (beyond/categorical.py's model for 2-D points); pi starts uniform."""

    def __init__(self, width=128, depth=3, T=1000, components=49, learned_var=False, **kw):
        self.components, self.learned_var = components, learned_var
        super().__init__(width, depth, 0, T, **kw)
        self.head = nn.Linear(width, components * (2 if learned_var else 1))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def output_layer(self, width):
        return nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, 2 * self.components))

    def forward(self, x, t, eta=None):
        h, K = self.out[:-1](self.trunk(x, t)), self.components
        head = self.head(h)
        return self.out[-1](h).view(-1, K, 2), head[:, :K], head[:, K:] if self.learned_var else None



class IWAEDiffusion(smd.Diffusion):
    """The same chain, trained by `iwae_loss` with `eta_samples` etas per example."""

    def __init__(self, T, eta_samples):
        super().__init__(T)
        self.eta_samples = eta_samples

    def loss(self, model, x0):
        """iwae_loss on the first batch/eta_samples examples: the batch's rows are examples x etas."""
        return iwae_loss(model, self, x0[:max(1, len(x0) // self.eta_samples)], self.eta_samples)


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


def model_specs(args):
    """toy.model_specs' specs, for every model in --models: the paper's two from toy.py and those
    beyond it, with widths matched the same way (toy.match_widths)."""
    paper = toy.model_specs(argparse.Namespace(**{**vars(args), "models": ["vanilla", "smd"]}))
    specs = {"vanilla": paper["vanilla"], "smd": paper["SMD"],
             "iwae": dict(name="SMD-iwae", chain=lambda: IWAEDiffusion(args.T, args.eta_samples), var=None,
                          make=lambda w: Denoiser(w, args.depth, args.latent_dim, args.T, mix_hidden=args.mix_hidden)),
             "categorical": categorical_spec(args, False), "categorical-var": categorical_spec(args, True)}
    names = {"vanilla": "vanilla", "smd": "SMD"}
    return toy.match_widths({specs[m].pop("name", names.get(m)): specs[m] for m in args.models}, args)


def categorical_spec(args, learned_var):
    """A categorical mixture of --components Gaussians per step, its responsibilities annealed."""
    return dict(name=f"categorical K={args.components}" + (", learned var" if learned_var else ""),
                make=lambda w: CategoricalDenoiser(w, args.depth, args.T, args.components, learned_var),
                chain=lambda: AnnealedDiffusion(args.T, objective="v", tau0=args.anneal, total=args.max_steps),
                var=["small"])   # as trained, or their own


def get_parser():
    p = toy.get_parser()
    p.prog, p.description = "python -m beyond.toy", __doc__
    models = next(a for a in p._actions if a.dest == "models")   # toy.py's --models, with these models too
    models.type, models.help = cli.choices_list(MODELS), f"comma-separated, of: {', '.join(MODELS)}"
    p.add_argument("--eta-samples", type=cli.positive_int, default=8, help="iwae: etas per example")
    p.add_argument("--components", type=cli.positive_int, default=49, help="categorical: number of components K")
    p.add_argument("--anneal", type=TEMPERATURE, default=1.0, help="categorical: responsibilities' temperature from "
                   "this to 1 over the first half of training (beyond.categorical.temperature; 1: off)")
    return p


def main(argv=None):
    parser = get_parser()
    args = toy.parse_args(parser, argv)
    if "iwae" in args.models and args.batch_size < args.eta_samples:
        cli.fail(parser.prog, f"--batch-size {args.batch_size}: iwae needs at least --eta-samples {args.eta_samples} "
                              f"rows")
    toy.experiment(args, model_specs(args))


if __name__ == "__main__":
    main()
