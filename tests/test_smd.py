"""The paper's math (smd.py) against closed forms, hand-written formulas and diffusers' schedulers
(CPU, float64). Statistical checks state their band in standard errors (at least 4)."""

import functools
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

import smd

# DDPM's schedule, written out here independently of smd.py
BETAS = np.linspace(1e-4, 0.02, 1000)
ABAR = np.cumprod(1 - BETAS)


class GaussianOracle:
    """The exact noise predictor for data N(0, s^2 I): E[eps | x_t] = sqrt(1-abar) x / (abar s^2 + 1-abar)."""

    latent_dim = 0

    def __init__(self, s, abar):
        self.s, self.abar = s, torch.as_tensor(abar)

    def __call__(self, x, t, eta=None):
        a = self.abar[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * x / (a * self.s**2 + 1 - a)


def test_schedule_is_ddpm():
    d = smd.Diffusion()
    np.testing.assert_allclose(d.betas.numpy(), BETAS, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ABAR, rtol=1e-12)
    assert d.betas.dtype == torch.float64
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ref.alphas_cumprod.double().numpy(), rtol=1e-5)


@pytest.mark.parametrize("T", [2, 5, 20, 100, 1000])
def test_short_chains_are_respaced_ddpm(T):
    d = smd.Diffusion(T=T)
    keep = np.round(np.linspace(0, 999, T)).astype(int)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ABAR[keep], rtol=1e-12)
    betas = d.betas.numpy()
    assert np.all(betas > 0) and np.all(betas < 1)
    np.testing.assert_allclose(np.cumprod(1 - betas), ABAR[keep], rtol=1e-12)


def test_unknown_schedule_and_bad_steps_raise():
    with pytest.raises(ValueError, match="schedule=.quadratic.*use one of"):
        smd.Diffusion(schedule="quadratic")
    with pytest.raises(ValueError, match="between 2 and T"):
        smd.Diffusion(T=10).timesteps(11)


@pytest.mark.parametrize("steps", [1000, 100, 20, 5, 2])
def test_respaced_timesteps(steps):
    d = smd.Diffusion()
    ts = d.timesteps(steps)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == steps and len(set(ts)) == steps
    assert np.all(np.diff(ts) < 0)
    coef = d.step_coefficients(steps)
    for i, (t, abar, abar_prev) in enumerate(coef):
        assert t == ts[i] and abar == pytest.approx(ABAR[t], rel=1e-12)   # the true abar at every kept step
        assert abar_prev == pytest.approx(ABAR[ts[i + 1]] if i + 1 < steps else 1.0, rel=1e-12)


def test_q_sample_moments():
    d = smd.Diffusion()
    n = 200_000
    x0 = torch.full((n,), 0.7, dtype=torch.float64)
    for t in [0, 250, 999]:
        tt = torch.full((n,), t)
        x = d.q_sample(x0, tt, torch.randn_like(x0))
        se_mean, se_var = math.sqrt((1 - ABAR[t]) / n), (1 - ABAR[t]) * math.sqrt(2 / n)   # standard errors
        assert x.mean().item() == pytest.approx(math.sqrt(ABAR[t]) * 0.7, abs=5 * se_mean)
        assert x.var().item() == pytest.approx(1 - ABAR[t], abs=5 * se_var)


def expected_variance(s, steps, sampler, var, ddim_eta=0.0):
    """Closed-form variance of x_0 sampled with the exact predictor: every step is linear,
    x_prev = a x + b noise, so v_prev = a^2 v + b^2 starting from v_T = 1."""
    ts = np.round(np.linspace(0, 999, steps)).astype(int)[::-1]
    v = 1.0
    for i, t in enumerate(ts):
        ab, ab_prev = ABAR[t], (ABAR[ts[i + 1]] if i + 1 < steps else 1.0)
        k = math.sqrt(1 - ab) / (ab * s**2 + 1 - ab)             # eps_hat = k x
        if sampler == "ddpm":
            alpha = ab / ab_prev
            a = (1 - (1 - alpha) / math.sqrt(1 - ab) * k) / math.sqrt(alpha)
            b2 = (1 - alpha) if var == "large" else (1 - alpha) * (1 - ab_prev) / (1 - ab)
        else:
            c = (1 - math.sqrt(1 - ab) * k) / math.sqrt(ab)         # x0_hat = c x
            b2 = ddim_eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
            a = math.sqrt(ab_prev) * c + math.sqrt(1 - ab_prev - b2) * k
        v = a * a * v + (b2 if i + 1 < steps else 0.0)
    return v


def clamped_variance(v):
    """E[clamp(X, -1, 1)^2] for X ~ N(0, v): sample() returns x_0 clamped to [-1, 1]."""
    a = 1 / math.sqrt(v)
    return v * (1 - 2 * norm.sf(a) - 2 * a * norm.pdf(a)) + 2 * norm.sf(a)


@pytest.mark.parametrize("steps", [1000, 100, 20, 5])
@pytest.mark.parametrize("sampler,var,ddim_eta", [("ddpm", "large", 0), ("ddpm", "small", 0),
                                                  ("ddim", "large", 0.0), ("ddim", "large", 1.0)])
def test_sampled_variance_matches_closed_form(steps, sampler, var, ddim_eta):
    s, n = 0.3, 2000 * 16
    d = smd.Diffusion()
    g = torch.Generator().manual_seed(steps)
    update = functools.partial(smd.ddim_update, ddim_eta=ddim_eta) if sampler == "ddim" else None
    x_T = torch.randn(2000, 16, dtype=torch.float64, generator=g)
    x = d.sample(GaussianOracle(s, ABAR), x_T.shape, steps=steps, var=var, generator=g, x_T=x_T, update=update)
    v = clamped_variance(expected_variance(s, steps, sampler, var, ddim_eta))
    assert abs(x.mean().item()) < 5 * math.sqrt(v / n)                      # 5 standard errors
    assert x.var().item() == pytest.approx(v, abs=5 * v * math.sqrt(2 / n))  # 5 standard errors (~0.8% each)


def test_exact_sampling_recovers_data_variance_at_1000_steps():
    # sanity of the closed form itself: with 1000 steps DDPM (small) nearly recovers s^2
    assert expected_variance(0.3, 1000, "ddpm", "small") == pytest.approx(0.09, rel=0.05)


def test_ddpm_matches_diffusers_custom_timesteps():
    diffusers = pytest.importorskip("diffusers")
    d = smd.Diffusion()
    oracle = GaussianOracle(0.3, ABAR)
    for var, kind in [("large", "fixed_large"), ("small", "fixed_small")]:
        x_T = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        ours = d.sample(oracle, x_T.shape, steps=50, var=var, x_T=x_T.clone(),
                        generator=torch.Generator().manual_seed(1))
        ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                      variance_type=kind, clip_sample=False)
        ref.set_timesteps(timesteps=d.timesteps(50).tolist())
        g, x = torch.Generator().manual_seed(1), x_T.clone()
        for t in ref.timesteps:
            tt = torch.full((x.shape[0],), int(t))
            x = ref.step(oracle(x, tt), int(t), x, generator=g).prev_sample
        torch.testing.assert_close(ours, x.clamp(-1, 1), atol=2e-4, rtol=0)


@pytest.mark.parametrize("ddim_eta", [0.0, 0.5])
def test_ddim_matches_diffusers(ddim_eta):
    # diffusers' DDIM steps back by T // steps, so its "linspace" spacing equals ours for a
    # full chain; use a short respaced chain (T=20) so every step is a big one
    diffusers = pytest.importorskip("diffusers")
    d = smd.Diffusion(T=20)
    abar = d.alphas_cumprod
    oracle = GaussianOracle(0.3, abar)
    x_T = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = d.sample(oracle, x_T.shape, x_T=x_T.clone(), generator=torch.Generator().manual_seed(1),
                    update=functools.partial(smd.ddim_update, ddim_eta=ddim_eta))
    ref = diffusers.DDIMScheduler(num_train_timesteps=20, trained_betas=d.betas.numpy(), clip_sample=False,
                                  set_alpha_to_one=True, timestep_spacing="linspace")
    ref.set_timesteps(20)
    assert ref.timesteps.tolist() == d.timesteps().tolist()
    g, x = torch.Generator().manual_seed(1), x_T.clone()
    for t in ref.timesteps:
        noise = torch.randn(x.shape, dtype=x.dtype, generator=g)   # same draw order as smd.sample
        x = ref.step(oracle(x, torch.full((64,), int(t))), int(t), x, eta=ddim_eta,
                     variance_noise=noise).prev_sample
    torch.testing.assert_close(ours, x.clamp(-1, 1), atol=2e-4, rtol=0)


def line_7(x, eps_hat, noise, abar, abar_prev, var="large"):
    """Alg. 2 line 7 written out: (x_t - (1 - alpha) / sqrt(1 - abar) eps_hat) / sqrt(alpha) + sigma eps."""
    alpha = abar / abar_prev
    sigma2 = (1 - alpha) * ((1 - abar_prev) / (1 - abar) if var == "small" else 1.0)
    return (x - (1 - alpha) / math.sqrt(1 - abar) * eps_hat) / math.sqrt(alpha) + math.sqrt(sigma2) * noise


def test_clipped_update_is_line_7_when_nothing_is_clipped():
    x, eps = torch.randn(16, 4, dtype=torch.float64) * 0.1, torch.randn(16, 4, dtype=torch.float64) * 0.1
    noise = torch.randn(16, 4, dtype=torch.float64)
    for a, ap, var in [(ABAR[10], ABAR[5], "large"), (ABAR[10], ABAR[5], "small")]:
        torch.testing.assert_close(line_7(x, eps, noise, a, ap, var), smd.clipped_update(x, eps, noise, a, ap, var))
    torch.testing.assert_close(line_7(x, eps, 0 * noise, ABAR[3], 1.0), smd.clipped_update(x, eps, noise, ABAR[3], 1.0))
    big = torch.full((2, 4), 3.0, dtype=torch.float64)   # x0_hat far outside [-1, 1]: the clipped mean differs
    assert not torch.allclose(line_7(big, 0 * big, 0 * big, ABAR[10], ABAR[5]),
                              smd.clipped_update(big, 0 * big, 0 * big, ABAR[10], ABAR[5]))


def test_posterior_is_ddpm():
    """(c0, ct, beta_tilde) of q(x_{t-1} | x_t, x_0), DDPM Eq. (7), written out here."""
    for t in (1, 10, 999):
        c0, ct, bt = smd.posterior(ABAR[t], ABAR[t - 1])
        assert c0 == pytest.approx(math.sqrt(ABAR[t - 1]) * BETAS[t] / (1 - ABAR[t]), rel=1e-12)
        assert ct == pytest.approx(math.sqrt(1 - BETAS[t]) * (1 - ABAR[t - 1]) / (1 - ABAR[t]), rel=1e-12)
        assert bt == pytest.approx(BETAS[t] * (1 - ABAR[t - 1]) / (1 - ABAR[t]), rel=1e-12)


def test_loss_with_exact_predictor_equals_closed_form():
    # E||eps - E[eps|x_t]||^2 per dimension = Var(eps | x_t) = abar s^2 / (abar s^2 + 1 - abar), averaged over t
    s, d = 0.5, smd.Diffusion()
    expected = np.mean(ABAR * s**2 / (ABAR * s**2 + 1 - ABAR))
    torch.manual_seed(0)
    x0 = s * torch.randn(400_000, 4, dtype=torch.float64)
    loss = d.loss(GaussianOracle(s, ABAR), x0)
    assert loss.item() == pytest.approx(expected, rel=0.01)   # standard error ~1.5e-3 relative: > 6 of them


class RecordingSMD(torch.nn.Module):
    latent_dim = 3

    def forward(self, x, t, eta=None):
        self.seen = (x, t, eta)
        return torch.zeros_like(x)


def test_loss_draws_one_eta_per_copy_with_eta_samples():
    model, x0 = RecordingSMD(), torch.randn(5, 2)
    loss = smd.Diffusion().loss(model, x0, eta_samples=4)
    x, t, eta = model.seen
    assert x.shape == (20, 2) and eta.shape == (20, 3)
    assert torch.equal(x[0], x[3]) and torch.equal(t[0:4], t[0].repeat(4))   # same x_t and t for the K copies
    assert not torch.equal(eta[0], eta[1])                                   # different eta
    assert loss.item() == pytest.approx(1.0, rel=0.5)   # ||eps||^2 with eps_hat = 0


def test_sampler_draws_fresh_eta_every_step():
    etas = []

    class Model(RecordingSMD):
        def forward(self, x, t, eta=None):
            etas.append(eta)
            return torch.zeros_like(x)

    smd.Diffusion().sample(Model(), (2, 3), steps=4)
    assert len(etas) == 4 and all(e.shape == (2, 3) for e in etas)
    assert not torch.equal(etas[0], etas[1])


def test_held_eta_fixed_and_zero():
    """smd.HeldEta: one eta per image for the whole chain, or eta = 0; with either, DDIM at
    ddim_eta 0 is deterministic given x_T (with fresh etas it is not)."""
    etas = []

    class Model(RecordingSMD):
        def forward(self, x, t, eta=None):
            etas.append(eta.clone())
            return 0.1 * x + eta.sum(1, keepdim=True)    # the output depends on eta

    d, x_T, fixed = smd.Diffusion(T=20), torch.randn(4, 3), torch.randn(4, 3)
    d.sample(smd.HeldEta(Model(), fixed), (4, 3), steps=5)
    assert len(etas) == 5 and all(torch.equal(e, fixed) for e in etas)
    ddim = functools.partial(smd.ddim_update, ddim_eta=0.0)
    run = lambda model, seed: d.sample(model, (4, 3), steps=5, x_T=x_T.clone(), update=ddim,
                                       generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(smd.HeldEta(Model(), torch.zeros(4, 3)), 0), run(smd.HeldEta(Model(), torch.zeros(4, 3)), 1))
    assert not torch.equal(run(Model(), 0), run(Model(), 1))
    with pytest.raises(ValueError, match="var='tiny'"):
        d.sample(Model(), (4, 3), var="tiny")


def test_eta_sensitivity():
    d = smd.Diffusion()
    x0 = torch.randn(32, 2)

    class UsesEta(RecordingSMD):
        def forward(self, x, t, eta=None):
            return x + eta[:, :2] * self.w * (t[:, None] < 300)   # the latent matters at small t only

    m = UsesEta()
    m.w = 0.0
    assert smd.eta_sensitivity(m, d, x0)[0] == 0.0
    m.w = 1.0
    mean, per_t = smd.eta_sensitivity(m, d, x0, n_t=10)
    assert [t for t, _ in per_t] == list(np.linspace(0, 999, 10).round().astype(int))
    assert all(r > 0.3 for t, r in per_t if t < 300) and all(r == 0 for t, r in per_t if t >= 300)
    assert mean == pytest.approx(np.mean([r for _, r in per_t]))
    assert smd.eta_sensitivity(GaussianOracle(1.0, ABAR), d, x0)[0] == 0.0   # vanilla: no latent


# ----------------------------------------------------------------------------- the authors' choices

def test_sigmoid_schedule_is_the_authors():
    """Their sigmoid_beta_schedule (lucidrains' denoising-diffusion-pytorch), written out here in
    torch: betas from the logistic abar curve, clipped to [0, 0.999]. (Theirs takes sigmoid(start)
    and sigmoid(end) in float32, which moves betas by ~1e-5 relative; here all is float64.)"""
    T, start, end, tau = 1000, -3, 3, 1
    t = torch.linspace(0, T, T + 1, dtype=torch.float64) / T
    v_start, v_end = (torch.tensor(v / tau, dtype=torch.float64).sigmoid() for v in (start, end))
    abar = (-((t * (end - start) + start) / tau).sigmoid() + v_end) / (v_end - v_start)
    abar = abar / abar[0]
    betas = torch.clip(1 - abar[1:] / abar[:-1], 0, 0.999)
    d = smd.Diffusion(T, "sigmoid")
    torch.testing.assert_close(d.betas, betas, rtol=1e-10, atol=1e-12)
    assert d.betas[-1] == 0.999 and 0 < d.alphas_cumprod[-1] < 1e-6


def test_v_objective_closed_forms():
    """v = sqrt(abar) eps - sqrt(1-abar) x0: the conversions invert it, and the loss of the
    exact v-predictor of Gaussian data is the eps closed form (the authors' abar-weighted
    v loss is ||eps - eps_hat||^2)."""
    d = smd.Diffusion(objective="v")
    x0, eps, abar = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64), 0.3
    x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    v = math.sqrt(abar) * eps - math.sqrt(1 - abar) * x0
    torch.testing.assert_close(d.eps_from(v, x_t, abar), eps)
    torch.testing.assert_close(d.x0_from(v, x_t, abar), x0)

    class VOracle(GaussianOracle):     # E[v | x_t] = sqrt(abar) E[eps | x_t] - sqrt(1-abar) E[x0 | x_t]
        def __call__(self, x, t, eta=None):
            a = self.abar[t].to(x.dtype).view(-1, 1)
            e = super().__call__(x, t)
            return a.sqrt() * e - (1 - a).sqrt() * (x - (1 - a).sqrt() * e) / a.sqrt()

    s = 0.5
    torch.manual_seed(0)
    x0 = s * torch.randn(400_000, 4, dtype=torch.float64)
    expected = np.mean(ABAR * s**2 / (ABAR * s**2 + 1 - ABAR))
    assert d.loss(VOracle(s, ABAR), x0).item() == pytest.approx(expected, rel=0.01)
    with pytest.raises(ValueError, match="objective='x0'"):
        smd.Diffusion(objective="x0")




# ----------------------------------------------------------------------------- SMD's soft mixture, by hand

def test_modulate_is_scale_and_shift():
    """h * (1 + scale) + shift per channel, for feature maps and for vectors; None leaves h."""
    h, scale, shift = torch.randn(2, 3, 4, 5), torch.randn(2, 3), torch.randn(2, 3)
    ref = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    torch.testing.assert_close(smd.modulate(h, (scale, shift)), ref)
    torch.testing.assert_close(smd.modulate(h[:, :, 0, 0], (scale, shift)), h[:, :, 0, 0] * (1 + scale) + shift)
    assert smd.modulate(h, None) is h


def by_hand_mlp(seq, x):
    """Linear-SiLU-...-Linear from the layers' weights."""
    for layer in seq:
        x = torch.nn.functional.silu(x) if isinstance(layer, torch.nn.SiLU) else x @ layer.weight.T + layer.bias
    return x


def test_soft_mixture_is_g_xi_then_f_phi():
    """z_t = g_xi([eta, feats, temb]) and (scale_b, shift_b) = the b-th pair of f_phi([z_t, temb]),
    written out by hand; z_t moves with eta, with the pooled x_t features and with t, and
    f_phi's output moves with z_t and with t."""
    torch.manual_seed(0)
    sm = smd.SoftMixture(latent_dim=4, feat_dim=6, temb_dim=5, block_channels=[3, 2], hidden=16)
    torch.nn.init.normal_(sm.f_phi[-1].weight, std=0.3)     # leave the zero init: f_phi must matter
    torch.nn.init.normal_(sm.f_phi[-1].bias, std=0.3)
    eta, feats, temb = torch.randn(2, 4), torch.randn(2, 6), torch.randn(2, 5)
    z = by_hand_mlp(sm.g_xi, torch.cat([eta, feats, temb], 1))
    p = by_hand_mlp(sm.f_phi, torch.cat([z, temb], 1))
    mods = sm(eta, feats, temb)
    torch.testing.assert_close(mods[0][0], p[:, 0:3]), torch.testing.assert_close(mods[0][1], p[:, 3:6])
    torch.testing.assert_close(mods[1][0], p[:, 6:8]), torch.testing.assert_close(mods[1][1], p[:, 8:10])
    g = lambda *a: sm.g_xi(torch.cat(a, 1))
    f = lambda z, temb: sm.f_phi(torch.cat([z, temb], 1))
    other = lambda x: x + torch.randn_like(x)
    for moved in (g(other(eta), feats, temb), g(eta, other(feats), temb), g(eta, feats, other(temb))):
        assert (moved - z).abs().max() > 1e-3                 # z_t depends on eta, x_t and t
    assert (f(other(z), temb) - p).abs().max() > 1e-3 and (f(z, other(temb)) - p).abs().max() > 1e-3
    zero = smd.SoftMixture(4, 6, 5, [3, 2], 16)(eta, feats, temb)
    assert all(torch.equal(m, torch.zeros_like(m)) for pair in zero for m in pair)   # untrained: theta_hat = theta
