"""Diffusion math against closed forms and diffusers' schedulers (CPU, float64)."""

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
    with pytest.raises(ValueError, match="unknown schedule"):
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
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    for t in [0, 250, 999]:
        tt = torch.full((x0.shape[0],), t)
        x = d.q_sample(x0, tt, torch.randn_like(x0))
        assert x.mean().item() == pytest.approx(math.sqrt(ABAR[t]) * 0.7, abs=5e-3)
        assert x.var().item() == pytest.approx(1 - ABAR[t], rel=1e-2, abs=1e-4)


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
    s = 0.3
    d = smd.Diffusion()
    g = torch.Generator().manual_seed(steps)
    x = d.sample(GaussianOracle(s, ABAR), (2000, 16), steps=steps, sampler=sampler, var=var,
                 ddim_eta=ddim_eta, generator=g, dtype=torch.float64)
    v = clamped_variance(expected_variance(s, steps, sampler, var, ddim_eta))
    assert abs(x.mean().item()) < 0.02
    assert x.var().item() == pytest.approx(v, rel=0.03)     # MC std error ~0.8%


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
    ours = d.sample(oracle, x_T.shape, sampler="ddim", ddim_eta=ddim_eta, x_T=x_T.clone(),
                    generator=torch.Generator().manual_seed(1))
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


def test_clip_x0_is_the_same_mean_when_nothing_is_clipped():
    x, eps = torch.randn(16, 4, dtype=torch.float64) * 0.1, torch.randn(16, 4, dtype=torch.float64) * 0.1
    a, ap = ABAR[10], ABAR[5]
    torch.testing.assert_close(smd.Diffusion.ddpm_step(x, eps, a, ap, "large"),
                               smd.Diffusion.ddpm_step(x, eps, a, ap, "large", clip_x0=True))


def test_loss_with_exact_predictor_equals_closed_form():
    # E||eps - E[eps|x_t]||^2 per dimension = Var(eps | x_t) = abar s^2 / (abar s^2 + 1 - abar), averaged over t
    s, d = 0.5, smd.Diffusion()
    expected = np.mean(ABAR * s**2 / (ABAR * s**2 + 1 - ABAR))
    torch.manual_seed(0)
    x0 = s * torch.randn(400_000, 4, dtype=torch.float64)
    loss = d.loss(GaussianOracle(s, ABAR), x0)
    assert loss.item() == pytest.approx(expected, rel=0.01)


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
            etas.append(eta.clone())   # the sampler refills one buffer each step
            return torch.zeros_like(x)

    smd.Diffusion().sample(Model(), (2, 3), steps=4)
    assert len(etas) == 4 and all(e.shape == (2, 3) for e in etas)
    assert not torch.equal(etas[0], etas[1])


def test_sampler_fixed_and_zero_eta():
    """eta_mode="fixed": one eta per image for the whole chain; "zero": eta = 0; with either,
    DDIM at ddim_eta 0 is deterministic given x_T (with fresh etas it is not)."""
    etas = []

    class Model(RecordingSMD):
        def forward(self, x, t, eta=None):
            etas.append(eta.clone())
            return 0.1 * x + eta.sum(1, keepdim=True)    # the output depends on eta

    d, x_T = smd.Diffusion(T=20), torch.randn(4, 3)
    d.sample(Model(), (4, 3), steps=5, eta_mode="fixed")
    assert len(etas) == 5 and all(torch.equal(e, etas[0]) for e in etas) and etas[0].abs().sum() > 0
    assert not torch.equal(etas[0][0], etas[0][1])       # one eta per image
    etas.clear()
    d.sample(Model(), (4, 3), steps=5, eta_mode="zero")
    assert all(torch.equal(e, torch.zeros(4, 3)) for e in etas)
    ddim = lambda mode, seed: d.sample(Model(), (4, 3), steps=5, sampler="ddim", x_T=x_T.clone(), eta_mode=mode,
                                       generator=torch.Generator().manual_seed(seed))
    assert torch.equal(ddim("zero", 0), ddim("zero", 1))
    assert not torch.equal(ddim("fresh", 0), ddim("fresh", 1))
    with pytest.raises(ValueError, match="fresh|fixed|zero"):
        d.sample(Model(), (4, 3), eta_mode="frozen")


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
