"""toy.py: the mixture's closed forms against Monte Carlo, the exact references, the metrics,
the importance-weighted objective, and a tiny end-to-end run (CPU, well under a minute)."""

import json
import math
import sys

import pytest
import torch

import smd
import toy

torch.set_num_threads(1)
ENTROPY = math.log(49) + 1 + math.log(2 * math.pi * toy.STD**2)   # H[q(x_0)] for separated modes


def forward_samples(n, abar, seed=0):
    """(x_0, x) with x ~ q(x | x_0) = N(sqrt(abar) x_0, (1 - abar) I), x_0 ~ q(x_0): no toy.py math."""
    g = torch.Generator().manual_seed(seed)
    x0 = toy.sample_data(n, g)
    return x0, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * torch.randn(n, 2, dtype=torch.float64, generator=g)


def weighted_moments(x, logw):
    w = (logw - logw.max()).exp()
    w = w / w.sum()
    mean = (w[:, None] * x).sum(0)
    return mean, (w[:, None] * (x - mean) ** 2).sum(0)


@pytest.mark.parametrize("abar, abar_prev, x_t", [(0.3, 0.6, (0.05, -0.1)),        # a respaced step
                                                   (0.9, 1.0, (0.31, 0.12)),        # the last step, to x_0
                                                   (0.05, 0.08, (-0.4, 0.9))])
def test_posterior_mixture_matches_monte_carlo(abar, abar_prev, x_t):
    """Eq. (19): q(x_prev | x_t) is proportional to q(x_t | x_prev) q(x_prev): weight forward samples
    of x_prev by the Gaussian kernel q(x_t | x_prev) and compare mean, variance and q(x_t)."""
    alpha = abar / abar_prev
    x_t = torch.tensor([x_t], dtype=torch.float64)
    _, x_prev = forward_samples(400_000, abar_prev)
    logk = -((x_t - math.sqrt(alpha) * x_prev) ** 2).sum(1) / (2 * (1 - alpha))
    mc_mean, mc_var = weighted_moments(x_prev, logk)
    w, a, b, var = toy.posterior_mixture(x_t, abar, abar_prev)
    mu = a * x_t + b * toy.MEANS                                     # (49, 2) component means
    mean = (w[0, :, None] * mu).sum(0)
    cf_var = (w[0, :, None] * (mu - mean) ** 2).sum(0) + var
    assert w.sum().item() == pytest.approx(1.0)
    scale = cf_var.sqrt().max().item()
    assert (mc_mean - mean).abs().max().item() < 0.03 * scale + 2e-3
    torch.testing.assert_close(mc_var, cf_var, rtol=0.05, atol=1e-5)
    q_mc = (logk.exp() / (2 * math.pi * (1 - alpha))).mean().item()   # q(x_t) = E_{x_prev}[q(x_t | x_prev)]
    assert toy.log_prob(x_t, abar).exp().item() == pytest.approx(q_mc, rel=0.03)


def test_best_gaussian_eps_is_the_posterior_mean_of_eps():
    abar = 0.2
    x0, _ = forward_samples(400_000, abar)
    for x_t in ([0.1, 0.2], [-0.7, 0.05]):
        x_t = torch.tensor([x_t], dtype=torch.float64)
        logk = -((x_t - math.sqrt(abar) * x0) ** 2).sum(1) / (2 * (1 - abar))    # q(x_t | x_0)
        mc, _ = weighted_moments((x_t - math.sqrt(abar) * x0) / math.sqrt(1 - abar), logk)
        torch.testing.assert_close(toy.best_gaussian_eps(x_t, abar)[0], mc, atol=0.01, rtol=0.01)


def test_references_match_the_data_at_1000_steps_and_only_exact_survives_5():
    d = smd.Diffusion(1000)
    g = torch.Generator().manual_seed(0)
    exact = toy.metrics(toy.sample_exact(d, 4000, 1000, g))
    gauss = toy.metrics(d.sample(toy.best_gaussian_model(d), (4000, 2), steps=1000, var="large",
                                 generator=g, dtype=torch.float64))
    for m in (exact, gauss):
        assert m["precision"] > 0.97 and m["coverage"] == 49 and m["tv"] < 0.08
        assert m["nll"] == pytest.approx(ENTROPY, abs=0.06) and m["spread"] == pytest.approx(1, abs=0.05)
    exact5 = toy.metrics(toy.sample_exact(d, 4000, 5, g))
    gauss5 = toy.metrics(d.sample(toy.best_gaussian_model(d), (4000, 2), steps=5, var="large",
                                  generator=g, dtype=torch.float64))
    assert exact5["precision"] > 0.97 and exact5["coverage"] == 49
    assert gauss5["precision"] < 0.5 and gauss5["nll"] > ENTROPY + 5      # Theorem 3.1's bottleneck


def test_metrics_score_true_samples_well_and_corrupted_ones_badly():
    g = torch.Generator().manual_seed(1)
    x = toy.sample_data(10_000, g)
    good = toy.metrics(x)
    assert good["nll"] == pytest.approx(ENTROPY, abs=0.04)
    assert good["precision"] == pytest.approx(1 - math.exp(-4.5), abs=0.005)   # P(chi2_2 < 9)
    assert good["coverage"] == 49 and good["tv"] < 0.05 and good["spread"] == pytest.approx(1, abs=0.03)
    shifted = toy.metrics(x + toy.SPACING / 2)
    assert shifted["precision"] < 0.01 and shifted["nll"] > ENTROPY + 10
    blurred = toy.metrics(x + 2 * toy.STD * torch.randn(x.shape, dtype=x.dtype, generator=g))
    assert blurred["precision"] < 0.65 and blurred["nll"] > ENTROPY + 1 and blurred["spread"] > 1.2
    half = toy.metrics(x[torch.cdist(x, toy.MEANS).argmin(1) < 24])           # 24 of 49 modes only
    assert half["coverage"] == 24 and half["tv"] == pytest.approx(25 / 49, abs=0.03)
    collapsed = toy.metrics(toy.MEANS[torch.randint(0, 49, (10_000,), generator=g)])
    assert collapsed["spread"] < 1e-3 and collapsed["nll"] < ENTROPY   # why NLL alone is not enough


def test_iwae_loss_is_the_paper_loss_when_the_latent_is_unused_and_tighter_otherwise():
    d = smd.Diffusion(1000)
    model = toy.Denoiser(32, 2, latent_dim=4)            # f_phi is zero-initialised: eta is ignored
    x0 = toy.sample_data(256).float()
    torch.manual_seed(0)
    jensen = d.loss(model, x0)
    torch.manual_seed(0)                                 # same t and eps: same x_t
    iwae = toy.iwae_loss(model, d, x0, K=4)
    assert iwae.item() == pytest.approx(jensen.item(), rel=1e-4)

    class Spread(torch.nn.Module):                       # predictions that differ across eta
        latent_dim = 2

        def forward(self, x, t, eta):
            return x + eta
    torch.manual_seed(0)
    iwae = toy.iwae_loss(Spread(), d, x0, K=4)
    torch.manual_seed(0)
    jensen = d.loss(Spread(), x0, eta_samples=4)         # the same eta draws: the K=4 Jensen bound
    assert iwae.item() < jensen.item()


def test_param_matching_and_eta_fixed():
    m = toy.Denoiser(64, 3, latent_dim=8)
    w = toy.matched_width(toy.n_params(m), 3, 1000)
    assert 0 <= toy.n_params(toy.Denoiser(w, 3)) - toy.n_params(m) < 0.1 * toy.n_params(m)
    x, t = torch.randn(5, 2), torch.randint(0, 1000, (5,))
    torch.testing.assert_close(toy.eta_fixed(m)(x, t), m(x, t, torch.zeros(5, 8)))


def test_tiny_end_to_end(tmp_path, monkeypatch, capsys):
    out, png = tmp_path / "toy.json", tmp_path / "toy.png"
    monkeypatch.setattr(sys, "argv", ["toy.py", "--T", "10", "--steps", "10,5", "--iters", "20", "--n", "500",
                                      "--width", "32", "--smd-objective", "jensen,iwae", "--K", "2",
                                      "--json", str(out), "--png", str(png)])
    toy.main()
    res = json.loads(out.read_text())
    names = {(r["model"], r["var"], r["steps"]) for r in res["rows"]}
    for name in ("exact mixture", "best Gaussian", "vanilla", "SMD-jensen", "SMD-iwae", "SMD-iwae eta=0"):
        assert any(n[0] == name and n[2] == 5 for n in names), name
    assert png.stat().st_size > 1000
    assert "SMD-iwae" in capsys.readouterr().out
