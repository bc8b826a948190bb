"""
mixture.py -- beyond the paper: each reverse step a categorical mixture of K Gaussians.

SMD (smd.py) makes p_theta(x_{t-1} | x_t) a continuous mixture through a latent eta and trains
it with Jensen's bound, whose minimiser ignores eta. Here the mixture is finite,

    p(x_{t-1} | x_t) = sum_k pi_k(x_t) N(x_{t-1}; mu_k, sigma_k^2 I),

mu_k the posterior mean of q(x_{t-1} | x_t, x_0 = x0_hat_k), so its negative log-likelihood can
be computed exactly (a logsumexp over k): no latent to sample, no bound. K = 1 with fixed
variances is DDPM's L_{t-1} (Eq. 14 with Gamma_t). A model with `components = K` returns
(out_k (B, K, ...), logits (B, K), v (B, K) or None): K outputs read as x0_hat_k through the
diffusion's objective (eps or v), the logits of pi and, if learned, per-component variances
log sigma_k^2 = f log beta + (1 - f) log beta_tilde, f = sigmoid(v) (as improved DDPM, with
beta_tilde clipped at t = 0 to its t = 1 value). smd.Diffusion.loss and .sample call the two
functions below for such a model; unet.py (--mixture K) and toy.py use them.

Mixtures trained by likelihood fall into k-means' local optimum: at a large step the
responsibilities are one-hot, a component that starts far from every mode never gets a gradient
(dead), and its modes go to a neighbour that settles on their average (a blend). `temperature`
anneals the responsibilities instead (deterministic annealing, Ueda & Nakano 1998): training
starts with the energies divided by tau0 >> 1, every component feels every example, and the
components split apart as tau falls to 1, where the loss is the exact likelihood again.

    python toy.py --T 5 --steps 5 --smd-objective mixture-var --width 160 --batch 512 --iters 24000
    python templates.py --T 2                  # annealed (--anneal 1e6) against vanilla and SMD
    python train.py --dataset cifar10 --mixture 10 --learned-var --anneal 1e6 --T 10
"""

import argparse
import math

import torch
import torch.nn.functional as F


def _bcast(v, x):
    return v.view(-1, *([1] * (x.dim() - 1)))


def posterior_terms(diffusion, t):
    """Per-example float64 (abar, c0, beta, beta_tilde, beta_tilde clipped at t = 0) for
    q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, beta_tilde I)."""
    abar, beta = diffusion.alphas_cumprod[t], diffusion.betas[t]
    abar_prev = abar / (1 - beta)
    bt = beta * (1 - abar_prev) / (1 - abar)
    abar01 = diffusion.alphas_cumprod
    bt1 = diffusion.betas[1] * (1 - abar01[0]) / (1 - abar01[1])
    return abar, abar_prev.sqrt() * beta / (1 - abar), beta, bt, torch.where(t == 0, bt1, bt)


def temperature(step, total, tau0, frac=0.5):
    """tau at a training step: tau0 -> 1 geometrically over the first `frac` of training, then 1."""
    return tau0 ** max(0.0, 1 - step / (frac * total)) if tau0 > 1 else 1.0


def start_temperature(text):
    """argparse type of --anneal: tau0 >= 1 (1: no annealing)."""
    tau0 = float(text)
    if not tau0 >= 1:
        raise argparse.ArgumentTypeError(f"{text}: the starting temperature must be >= 1 (1: no annealing)")
    return tau0


def loss(diffusion, model, x0, tau=1.0):
    """-log p(x_{t-1} | x_t) per dimension, exactly (logsumexp over the K components: no
    Jensen, no sampled latent), for x_{t-1} ~ q(x_{t-1} | x_t, x_0) and t ~ U{1..T}: the
    variational bound in nats, constants dropped. With d_k = x0_hat_k - x_0,
    x_{t-1} - mu_k = sqrt(bt) xi - c0 d_k and sigma_t^2 = beta_tilde_t (clipped at t = 0),
      log N_k = -(c0^2 |d_k|^2 - 2 c0 sqrt(bt) (d_k - mean_k d).xi) / (2 sigma_t^2) + const,
    where subtracting mean_k d (the same for every k, and zero-mean since xi is independent
    of x_t) removes noise without bias. K = 1 is then Eq. (14) with Gamma_t, DDPM's
    L_{t-1} = Gamma_t |eps - eps_hat|^2. Learned variances add their own term: the full
    mixture log-density with the means and weights held fixed (stop-gradient, as improved
    DDPM's L_hybrid), so that a wide variance cannot stand in for a wrong mean. With tau > 1
    the first term is -tau logsumexp(log N_k' / tau) (see `temperature`); tau = 1 is exact."""
    B = x0.shape[0]
    t = torch.randint(0, diffusion.T, (B,), device=x0.device)
    eps = torch.randn_like(x0)
    x_t = diffusion.q_sample(x0, t, eps)
    out, logits, v = model(x_t, t)
    abar, c0, beta, bt, s2 = posterior_terms(diffusion, t)
    x0_k = diffusion.x0_from(out.double(), x_t[:, None].double(), _bcast(abar, out))
    d = (x0_k - x0[:, None].double()).flatten(2)                         # (B, K, D)
    xi = torch.randn(B, 1, d.shape[2], device=x0.device, dtype=d.dtype)
    dd, dxi = d.pow(2).sum(2), (d * xi).sum(2)                           # |d_k|^2 and d_k.xi, (B, K)
    c0, beta, bt, s2 = (a.view(B, 1) for a in (c0, beta, bt, s2))
    log_pi = F.log_softmax(logits.double(), 1)
    cross = dxi - dxi.mean(1, keepdim=True)                              # (d_k - mean_k d).xi
    nll = -tau * torch.logsumexp((log_pi - (c0**2 * dd - 2 * c0 * bt.sqrt() * cross) / (2 * s2)) / tau, 1)
    if v is not None:    # the variances' own term: |x_{t-1} - mu_k|^2 with d held fixed
        log_s2 = torch.lerp(s2.log(), beta.log(), torch.sigmoid(v.double()))
        r2 = bt * xi.pow(2).sum(2) - 2 * c0 * bt.sqrt() * dxi.detach() + c0**2 * dd.detach()
        nll = nll - torch.logsumexp(log_pi.detach() - r2 / (2 * log_s2.exp()) - 0.5 * d.shape[2] * log_s2, 1)
    return nll.mean().float() / d.shape[2]


def pick_component(diffusion, output, x, u, abar, abar_prev, abar_clip):
    """One sampling step's (x0_hat_k, sigma) for k ~ pi(x_t), drawn by inverse CDF from the
    uniforms u (B, 1). sigma is None for fixed variances, else per-example (B, 1, ...) from
    the respaced step's beta and beta_tilde (clipped at the last step: abar_clip is abar of
    the step before it)."""
    out, logits, v = output
    k = (logits.float().softmax(1).cumsum(1) < u).sum(1).clamp(max=out.shape[1] - 1)
    rows = torch.arange(len(k), device=k.device)
    x0 = diffusion.x0_from(out[rows, k].to(x.dtype), x, abar)
    if v is None:
        return x0, None
    beta = 1 - abar / abar_prev
    bt = beta * (1 - abar_prev) / (1 - abar) if abar_prev < 1 else \
        (1 - abar_clip / abar) * (1 - abar) / (1 - abar_clip)
    log_s2 = math.log(bt) + torch.sigmoid(v[rows, k].to(x.dtype)) * (math.log(beta) - math.log(bt))
    return x0, _bcast((0.5 * log_s2).exp(), x)
