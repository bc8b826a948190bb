"""Diffusion math against closed forms and diffusers' schedulers (CPU, float64)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

import mixture
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


# ----------------------------------------------------------------------------- beyond the paper: a categorical mixture

class Mixture(torch.nn.Module):
    """A mixture model with given outputs: out (K, D) per component (read through the
    objective), logits (K,), v (K,) or None, the same for every x_t."""

    def __init__(self, out, logits, v=None):
        super().__init__()
        self.out, self.logits, self.v, self.components = out, logits, v, len(logits)

    def forward(self, x, t, eta=None):
        B = x.shape[0]
        v = None if self.v is None else self.v.expand(B, -1)
        return self.out.expand(B, *self.out.shape).to(x.dtype), self.logits.expand(B, -1), v


class OneComponent(torch.nn.Module):
    """Any eps model as a mixture of K = 1 (its x0_hat through the eps objective)."""
    components = 1

    def __init__(self, eps_model):
        super().__init__()
        self.eps_model = eps_model

    def forward(self, x, t, eta=None):
        return self.eps_model(x, t)[:, None], torch.zeros(x.shape[0], 1, dtype=x.dtype), None


def test_mixture_of_one_is_ddpm():
    """K = 1 with fixed variances: the mixture loss is Eq. (14) with Gamma_t (DDPM's L_{t-1}) on
    the same draws, and the sampler (DDPM large/small, DDIM) is DDPM's, step for step."""
    d, oracle = smd.Diffusion(T=20), GaussianOracle(0.3, smd.Diffusion(T=20).alphas_cumprod)
    x0 = 0.3 * torch.randn(64, 8, dtype=torch.float64)
    torch.manual_seed(5)
    ours = d.loss(OneComponent(oracle), x0)
    torch.manual_seed(5)                                  # the same t and eps
    t = torch.randint(0, d.T, (64,))
    eps = torch.randn_like(x0)
    abar, c0, beta, bt, s2 = mixture.posterior_terms(d, t)
    gamma = c0**2 * (1 - abar) / abar / (2 * s2)          # Gamma_t = c^2 / (2 sigma_t^2), c in eps units
    ref = (gamma[:, None] * (oracle(d.q_sample(x0, t, eps), t) - eps) ** 2).mean()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    x_T = torch.randn(16, 8, dtype=torch.float64)
    for kw in (dict(var="large"), dict(var="small"), dict(sampler="ddim")):
        a = d.sample(OneComponent(oracle), x_T.shape, x_T=x_T.clone(), generator=torch.Generator().manual_seed(1), **kw)
        b = d.sample(oracle, x_T.shape, x_T=x_T.clone(), generator=torch.Generator().manual_seed(1), **kw)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def mixture_nll(d, x0, t, eps, xi, out, logits, log_s2, tau=1.0):
    """-log sum_k pi_k N(x_{t-1}; mu_k, s_k^2 I) per dimension for x_{t-1} = mu_tilde + sqrt(bt) xi,
    written from DDPM's posterior formulas without mixture.loss's algebra (log 2 pi dropped)."""
    abar, betas = d.alphas_cumprod[t], d.betas[t]
    ap = abar / (1 - betas)
    c0, ct, bt = ap.sqrt() * betas / (1 - abar), (1 - betas).sqrt() * (1 - ap) / (1 - abar), betas * (1 - ap) / (1 - abar)
    x_t = abar.sqrt()[:, None] * x0 + (1 - abar).sqrt()[:, None] * eps
    x_prev = c0[:, None] * x0 + ct[:, None] * x_t + bt.sqrt()[:, None] * xi
    mu = c0[:, None, None] * d.x0_from(out, x_t[:, None], abar.view(-1, 1, 1)) + ct[:, None, None] * x_t[:, None]
    logn = -((x_prev[:, None] - mu) ** 2).sum(2) / (2 * log_s2.exp()) - 0.5 * x0.shape[1] * log_s2
    return -tau * torch.logsumexp((torch.log_softmax(logits, 1) + logn) / tau, 1) / x0.shape[1]


def test_mixture_loss_against_brute_force():
    """On 100k fresh draws for one x_0: the loss is the brute-force mixture NLL of the fixed
    variances plus, if learned, that of the learned ones (the control variate and the dropped
    constants aside: E |sqrt(bt) xi|^2 / (2 s^2) + (D/2) log s^2 for the fixed part); and the
    learned variances' term sends no gradient to the means or the weights."""
    torch.manual_seed(0)
    d, K, D, B = smd.Diffusion(T=5, objective="v"), 3, 4, 100_000
    out, logits, v = (torch.randn(*s, dtype=torch.float64) for s in ((K, D), (K,), (K,)))
    x0 = torch.randn(1, D, dtype=torch.float64).clamp(-1, 1).expand(B, D).contiguous()
    t = torch.randint(0, d.T, (B,))
    eps, xi = torch.randn_like(x0), torch.randn_like(x0)
    abar, c0, beta, bt, s2 = mixture.posterior_terms(d, t)
    outs, lg = out.expand(B, K, D), logits.expand(B, K)
    fixed = mixture_nll(d, x0, t, eps, xi, outs, lg, s2.log()[:, None].expand(B, K))
    fixed = fixed - (bt / (2 * s2) + 0.5 * s2.log())          # the constants mixture.loss drops
    learned = mixture_nll(d, x0, t, eps, xi, outs, lg, torch.lerp(s2.log()[:, None], beta.log()[:, None], v.sigmoid()))
    torch.manual_seed(1)
    ours_fixed = mixture.loss(d, Mixture(out, logits), x0).item()
    torch.manual_seed(1)
    ours_learned = mixture.loss(d, Mixture(out, logits, v), x0).item()
    assert ours_fixed == pytest.approx(fixed.mean().item(), rel=0.01)
    assert ours_learned == pytest.approx((fixed + learned).mean().item(), rel=0.01)

    grads = []
    for var in (None, v):                                     # same draws: means and logits get the same gradient
        o, lgt = out.clone().requires_grad_(), logits.clone().requires_grad_()
        torch.manual_seed(3)
        mixture.loss(d, Mixture(o, lgt, var), x0[:512]).backward()
        grads.append((o.grad, lgt.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-12)


def test_annealed_mixture_loss_against_brute_force():
    """At temperature tau the loss is -tau logsumexp((log pi_k + log N_k) / tau) (brute force, fixed
    variances, 100k draws), which tau = 1 leaves exact; the schedule runs tau0 -> 1 geometrically
    over the first half of training."""
    torch.manual_seed(0)
    d, K, D, B = smd.Diffusion(T=5, objective="v"), 3, 4, 100_000
    out, logits = torch.randn(K, D, dtype=torch.float64), torch.randn(K, dtype=torch.float64)
    x0 = torch.randn(1, D, dtype=torch.float64).clamp(-1, 1).expand(B, D).contiguous()
    t = torch.randint(0, d.T, (B,))
    eps, xi = torch.randn_like(x0), torch.randn_like(x0)
    abar, c0, beta, bt, s2 = mixture.posterior_terms(d, t)
    for tau in (1.0, 30.0, 1e4):
        ref = mixture_nll(d, x0, t, eps, xi, out.expand(B, K, D), logits.expand(B, K), s2.log()[:, None].expand(B, K), tau)
        ref = ref - (bt / (2 * s2) + 0.5 * s2.log())          # the same dropped constants as at tau = 1
        torch.manual_seed(1)
        ours = mixture.loss(d, Mixture(out, logits), x0, tau).item()
        assert ours == pytest.approx(ref.mean().item(), rel=0.01), tau
    assert [mixture.temperature(s, 100, 1e6) for s in (0, 25, 50, 99)] == pytest.approx([1e6, 1e3, 1.0, 1.0])
    assert mixture.temperature(10, 100, 1.0) == 1.0


def test_mixture_sampler_picks_components_with_their_probabilities():
    """Three components whose x0_hat_k are -0.8, 0 and 0.8 at every x_t, pi = (0.6, 0.3, 0.1): with
    fixed variances the last step lands exactly on the x0_hat_k it picks (c0 = 1, ct = 0, no
    noise), so the samples' histogram is pi; a learned variance adds noise at that step too."""
    d = smd.Diffusion(T=3, objective="v")
    x0s = torch.tensor([-0.8, 0.0, 0.8], dtype=torch.float64)
    pi = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)

    class ExactX0(torch.nn.Module):
        components = 3

        def __init__(self, v=None):
            super().__init__()
            self.v = v

        def forward(self, x, t, eta=None):
            a = d.alphas_cumprod[t].view(-1, 1, 1)
            out = (a.sqrt() * x[:, None] - x0s.view(1, 3, 1)) / (1 - a).sqrt()   # x0_from(out) = x0s
            return out, pi.log().expand(len(x), -1), None if self.v is None else self.v.expand(len(x), -1)

    x = d.sample(ExactX0(), (30_000, 1), generator=torch.Generator().manual_seed(0), var="small", dtype=torch.float64)
    share = torch.stack([(x - c).abs().lt(1e-9).double().mean() for c in x0s])
    assert share.sum().item() == 1.0
    torch.testing.assert_close(share, pi, atol=0.01, rtol=0)
    x = d.sample(ExactX0(torch.zeros(3)), (30_000, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    beta = 1 - d.abar_host[0]                                  # last step: sigma^2 = beta = beta_tilde clipped
    spread = (x - x0s[(x - x0s).abs().argmin(1)][:, None]).std().item()
    assert spread == pytest.approx(math.sqrt(beta), rel=0.03)
