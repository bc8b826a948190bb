"""gmm.py: the closed forms of a Gaussian mixture under diffusion against Monte Carlo, on the
toy's 7x7 grid in 2-D and on random means in 6-D."""

import math

import pytest
import torch

from machinery.gmm import GaussianMixture


def grid():
    g = (torch.arange(7, dtype=torch.float64) - 3) * 0.25
    return GaussianMixture(torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2), 0.025)


def random_6d():
    return GaussianMixture(0.5 * torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), 0.1)


def forward_samples(q, n, abar, seed=0):
    """(x_0, x) with x ~ q(x | x_0) = N(sqrt(abar) x_0, (1 - abar) I), x_0 ~ q(x_0)."""
    g = torch.Generator().manual_seed(seed)
    x0 = q.sample(n, g)
    return x0, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * torch.randn(x0.shape, dtype=torch.float64, generator=g)


def weighted_moments(x, logw):
    """Self-normalised importance-weighted mean and variance of x, and their standard errors
    from the effective sample size 1 / sum w^2 and the samples' own fourth moment."""
    w = (logw - logw.max()).exp()
    w = w / w.sum()
    ess = 1 / w.pow(2).sum()
    mean = (w[:, None] * x).sum(0)
    var = (w[:, None] * (x - mean) ** 2).sum(0)
    m4 = (w[:, None] * (x - mean) ** 4).sum(0)
    return mean, var, (var / ess).sqrt(), ((m4 - var**2) / ess).sqrt()


@pytest.mark.parametrize("q", [grid(), random_6d()], ids=["grid-2d", "random-6d"])
@pytest.mark.parametrize("abar, abar_prev", [(0.3, 0.6),        # a respaced step
                                             (0.9, 1.0),        # the last step, to x_0
                                             (0.05, 0.08)])
def test_posterior_matches_monte_carlo(q, abar, abar_prev):
    """Eq. (19): q(x_prev | x_t) is proportional to q(x_t | x_prev) q(x_prev): weight forward samples
    of x_prev by the Gaussian kernel q(x_t | x_prev) and compare mean, variance and q(x_t)."""
    alpha, D = abar / abar_prev, q.means.shape[1]
    x_t = forward_samples(q, 1, abar, seed=99)[1]                   # a plausible x_t
    _, x_prev = forward_samples(q, 400_000, abar_prev)
    logk = -((x_t - math.sqrt(alpha) * x_prev) ** 2).sum(1) / (2 * (1 - alpha))
    mc_mean, mc_var, se_mean, se_var = weighted_moments(x_prev, logk)
    w, a, b, var = q.posterior(x_t, abar, abar_prev)
    mu = a * x_t + b * q.means                                      # (K, D) component means
    mean = (w[0, :, None] * mu).sum(0)
    cf_var = (w[0, :, None] * (mu - mean) ** 2).sum(0) + var
    assert w.sum().item() == pytest.approx(1.0)
    assert ((mc_mean - mean).abs() < 6 * se_mean).all()            # 6 standard errors (ESS-based)
    assert ((mc_var - cf_var).abs() < 6 * se_var).all()
    k = logk.exp() / (2 * math.pi * (1 - alpha)) ** (D / 2)         # q(x_t | x_prev): its mean is q(x_t)
    assert q.log_prob(x_t, abar).exp().item() == pytest.approx(k.mean().item(), abs=6 * k.std().item() / len(k) ** 0.5)


@pytest.mark.parametrize("q", [grid(), random_6d()], ids=["grid-2d", "random-6d"])
def test_best_eps_is_the_posterior_mean_of_eps(q):
    abar = 0.2
    x0, _ = forward_samples(q, 400_000, abar)
    for seed in (7, 8):
        x_t = forward_samples(q, 1, abar, seed=seed)[1]
        logk = -((x_t - math.sqrt(abar) * x0) ** 2).sum(1) / (2 * (1 - abar))    # q(x_t | x_0)
        mc, _, se, _ = weighted_moments((x_t - math.sqrt(abar) * x0) / math.sqrt(1 - abar), logk)
        assert ((q.best_eps(x_t, abar)[0] - mc).abs() < 6 * se).all()   # 6 standard errors (ESS-based)
