"""Beyond the paper: the categorical mixture (categorical.py) against DDPM (K = 1), a
brute-force mixture likelihood and its sampler's component frequencies (CPU, float64).
Statistical checks state their band in standard errors (at least 4)."""

import math

import pytest
import torch

import smd
from beyond import categorical
from beyond.categorical import CategoricalConfig, CategoricalDiffusion, CategoricalUNet
from test_smd import GaussianOracle


def posterior_terms(d, t):
    """Per-example (abar, c0, beta, beta_tilde, sigma_t^2 = beta_tilde clipped at t = 0), from
    DDPM's formulas written out here."""
    abar, beta = d.alphas_cumprod[t], d.betas[t]
    ap = abar / (1 - beta)
    bt = beta * (1 - ap) / (1 - abar)
    bt1 = d.betas[1] * (1 - d.alphas_cumprod[0]) / (1 - d.alphas_cumprod[1])
    return abar, ap.sqrt() * beta / (1 - abar), beta, bt, torch.where(t == 0, bt1, bt)


def test_categorical_unet_heads():
    """K predictions from the last conv, K logits (and K variance logits) from the pooled
    bottleneck; pi starts uniform and the K predictions start different from each other."""
    cfg = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=(16,), dropout=0.0)
    m = CategoricalUNet(CategoricalConfig(**cfg, components=4, learned_var=True))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 500])
    out, logits, var_logits = m(x, t)
    assert out.shape == (2, 4, 3, 32, 32) and logits.shape == var_logits.shape == (2, 4)
    assert torch.equal(logits, torch.zeros(2, 4)) and (out[:, 0] - out[:, 1]).abs().mean() > 1e-3
    assert CategoricalUNet(CategoricalConfig(**cfg, components=4))(x, t)[2] is None
    with pytest.raises(ValueError, match="no soft mixture"):
        CategoricalConfig(smd=True, components=4)


class Mixture(torch.nn.Module):
    """A mixture model with given outputs: out (K, D) per component (read through the
    objective), logits (K,), var_logits (K,) or None, the same for every x_t."""

    def __init__(self, out, logits, v=None):
        super().__init__()
        self.out, self.logits, self.v = out, logits, v

    def forward(self, x, t, eta=None):
        B = x.shape[0]
        v = None if self.v is None else self.v.expand(B, -1)
        return self.out.expand(B, *self.out.shape).to(x.dtype), self.logits.expand(B, -1), v


class OneComponent(torch.nn.Module):
    """Any eps model as a mixture of K = 1 (its x0_hat through the eps objective)."""

    def __init__(self, eps_model):
        super().__init__()
        self.eps_model = eps_model

    def forward(self, x, t, eta=None):
        return self.eps_model(x, t)[:, None], torch.zeros(x.shape[0], 1, dtype=x.dtype), None


def test_mixture_of_one_is_ddpm():
    """K = 1 with fixed variances: the mixture loss is Eq. (14) with Gamma_t (DDPM's L_{t-1}) on
    the same draws, and the sampler (DDPM large/small, DDIM) is DDPM's, step for step."""
    d, oracle = CategoricalDiffusion(T=20), GaussianOracle(0.3, smd.Diffusion(T=20).alphas_cumprod)
    ddpm = smd.Diffusion(T=20)
    x0 = 0.3 * torch.randn(64, 8, dtype=torch.float64)
    torch.manual_seed(5)
    ours = d.loss(OneComponent(oracle), x0)
    torch.manual_seed(5)                                  # the same t and eps
    t = torch.randint(0, d.T, (64,))
    eps = torch.randn_like(x0)
    abar, c0, beta, bt, s2 = posterior_terms(d, t)
    gamma = c0**2 * (1 - abar) / abar / (2 * s2)          # Gamma_t = c^2 / (2 sigma_t^2), c in eps units
    ref = (gamma[:, None] * (oracle(d.q_sample(x0, t, eps), t) - eps) ** 2).mean()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    x_T = torch.randn(16, 8, dtype=torch.float64)
    for kw in (dict(var="large"), dict(var="small"), dict(update=smd.ddim_update)):
        a = d.sample(OneComponent(oracle), x_T.shape, x_T=x_T.clone(), generator=torch.Generator().manual_seed(1), **kw)
        b = ddpm.sample(oracle, x_T.shape, x_T=x_T.clone(), generator=torch.Generator().manual_seed(1), **kw)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def mixture_nll(d, x0, t, eps, xi, out, logits, log_s2, tau=1.0):
    """-log sum_k pi_k N(x_{t-1}; mu_k, s_k^2 I) per dimension for x_{t-1} = mu_tilde + sqrt(bt) xi,
    written from DDPM's posterior formulas without CategoricalDiffusion.loss's algebra (log 2 pi dropped)."""
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
    d, K, D, B = CategoricalDiffusion(T=5, objective="v"), 3, 4, 100_000
    out, logits, v = (torch.randn(*s, dtype=torch.float64) for s in ((K, D), (K,), (K,)))
    x0 = torch.randn(1, D, dtype=torch.float64).clamp(-1, 1).expand(B, D).contiguous()
    t = torch.randint(0, d.T, (B,))
    eps, xi = torch.randn_like(x0), torch.randn_like(x0)
    abar, c0, beta, bt, s2 = posterior_terms(d, t)
    outs, lg = out.expand(B, K, D), logits.expand(B, K)
    fixed = mixture_nll(d, x0, t, eps, xi, outs, lg, s2.log()[:, None].expand(B, K))
    fixed = fixed - (bt / (2 * s2) + 0.5 * s2.log())          # the constants the loss drops
    learned = mixture_nll(d, x0, t, eps, xi, outs, lg, torch.lerp(s2.log()[:, None], beta.log()[:, None], v.sigmoid()))
    torch.manual_seed(1)
    ours_fixed = d.loss(Mixture(out, logits), x0).item()
    torch.manual_seed(1)
    ours_learned = d.loss(Mixture(out, logits, v), x0).item()
    assert ours_fixed == pytest.approx(fixed.mean().item(), rel=0.01)
    assert ours_learned == pytest.approx((fixed + learned).mean().item(), rel=0.01)

    grads = []
    for var in (None, v):                                     # same draws: means and logits get the same gradient
        o, lgt = out.clone().requires_grad_(), logits.clone().requires_grad_()
        torch.manual_seed(3)
        d.loss(Mixture(o, lgt, var), x0[:512]).backward()
        grads.append((o.grad, lgt.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-12)


def test_annealed_mixture_loss_against_brute_force():
    """At temperature tau the loss is -tau logsumexp((log pi_k + log N_k) / tau) (brute force, fixed
    variances, 100k draws), which tau = 1 leaves exact; the schedule runs tau0 -> 1 geometrically
    over the first half of training."""
    torch.manual_seed(0)
    d, K, D, B = CategoricalDiffusion(T=5, objective="v"), 3, 4, 100_000
    out, logits = torch.randn(K, D, dtype=torch.float64), torch.randn(K, dtype=torch.float64)
    x0 = torch.randn(1, D, dtype=torch.float64).clamp(-1, 1).expand(B, D).contiguous()
    t = torch.randint(0, d.T, (B,))
    eps, xi = torch.randn_like(x0), torch.randn_like(x0)
    abar, c0, beta, bt, s2 = posterior_terms(d, t)
    for tau in (1.0, 30.0, 1e4):
        ref = mixture_nll(d, x0, t, eps, xi, out.expand(B, K, D), logits.expand(B, K), s2.log()[:, None].expand(B, K), tau)
        ref = ref - (bt / (2 * s2) + 0.5 * s2.log())          # the same dropped constants as at tau = 1
        torch.manual_seed(1)
        ours = d.loss(Mixture(out, logits), x0, tau).item()
        assert ours == pytest.approx(ref.mean().item(), rel=0.01), tau
    assert [categorical.temperature(s, 100, 1e6) for s in (0, 25, 50, 99)] == pytest.approx([1e6, 1e3, 1.0, 1.0])
    assert categorical.temperature(10, 100, 1.0) == 1.0


def test_mixture_sampler_picks_components_with_their_probabilities():
    """Three components whose x0_hat_k are -0.8, 0 and 0.8 at every x_t, pi = (0.6, 0.3, 0.1): with
    fixed variances the last step lands exactly on the x0_hat_k it picks (c0 = 1, ct = 0, no
    noise), so the samples' histogram is pi; a learned variance adds noise at that step too."""
    d = CategoricalDiffusion(T=3, objective="v")
    x0s = torch.tensor([-0.8, 0.0, 0.8], dtype=torch.float64)
    pi = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)

    class ExactX0(torch.nn.Module):
        def __init__(self, v=None):
            super().__init__()
            self.v = v

        def forward(self, x, t, eta=None):
            a = d.alphas_cumprod[t].view(-1, 1, 1)
            out = (a.sqrt() * x[:, None] - x0s.view(1, 3, 1)) / (1 - a).sqrt()   # x0_from(out) = x0s
            return out, pi.log().expand(len(x), -1), None if self.v is None else self.v.expand(len(x), -1)

    n = 30_000
    x_T = torch.randn(n, 1, dtype=torch.float64)
    x = d.sample(ExactX0(), x_T.shape, generator=torch.Generator().manual_seed(0), var="small", x_T=x_T)
    share = torch.stack([(x - c).abs().lt(1e-9).double().mean() for c in x0s])
    assert share.sum().item() == pytest.approx(1.0, abs=1e-12)   # every sample sits on one x0_hat_k
    torch.testing.assert_close(share, pi, atol=0.012, rtol=0)   # standard error <= sqrt(0.24 / n) = 0.0028
    x = d.sample(ExactX0(torch.zeros(3)), x_T.shape, generator=torch.Generator().manual_seed(0), x_T=x_T)
    beta = 1 - d.abar_host[0]                                  # last step: sigma^2 = beta = beta_tilde clipped
    spread = (x - x0s[(x - x0s).abs().argmin(1)][:, None]).std().item()
    assert spread == pytest.approx(math.sqrt(beta), rel=0.03)   # standard error 1 / sqrt(2 n) = 0.4%


class Linear(torch.nn.Module):
    """Components whose x0_hat_k = m_k + slope x_t (v objective), with logits that depend on x_t,
    or the given fixed ones."""

    def __init__(self, d, m, slope=0.5, logits=None):
        super().__init__()
        self.d, self.m, self.slope, self.logits = d, m, slope, logits

    def forward(self, x, t, eta=None):
        a = self.d.alphas_cumprod[t].view(-1, 1, 1)
        x0 = self.m[None] + self.slope * x[:, None]
        logits = (torch.stack([x.sum(1), -x.sum(1), x[:, 0]], 1) if self.logits is None
                  else self.logits.expand(len(x), -1))
        return (a.sqrt() * x[:, None] - x0) / (1 - a).sqrt(), logits, None


def test_draw_snr_steps_with_the_mixture_mean_where_x_t_is_clear():
    """draw_snr = 0: no step draws (every abar_t > 0), and the sampler is DDPM's with the mixture's
    mean x0_bar = sum_k pi_k x0_hat_k as its prediction, step for step; draw_snr = inf draws at
    every step, the sampler without it, bit for bit; in between, the noisy steps draw (the samples
    differ from the mean-only chain's) and the clear ones do not (with x0_hat_k constant in x_t and
    fixed pi, every sample ends on sum_k pi_k x0_hat_k, where drawing would end on an x0_hat_k)."""
    d = CategoricalDiffusion(T=5, objective="v")
    m = torch.tensor([[-0.8, 0.2], [0.0, -0.5], [0.8, 0.4]], dtype=torch.float64)
    model = Linear(d, m)

    def mean_eps(x, t, eta=None):
        x0_k, log_pi, _ = d.mixture(model, x, t)
        a = d.alphas_cumprod[t].view(-1, 1)
        return (x - a.sqrt() * (log_pi.exp()[..., None] * x0_k).sum(1)) / (1 - a).sqrt()

    x_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    run = lambda m_, snr, **kw: CategoricalDiffusion(T=5, objective="v", draw_snr=snr).sample(
        m_, x_T.shape, x_T=x_T.clone(), generator=torch.Generator().manual_seed(1), **kw)
    for var in ("small", "large"):
        ddpm = smd.Diffusion(T=5).sample(mean_eps, x_T.shape, x_T=x_T.clone(), var=var,
                                          generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(run(model, 0.0, var=var), ddpm, rtol=0, atol=1e-12)
    assert torch.equal(run(model, math.inf), run(model, None))
    snr = [a / (1 - a) for _, a, _ in d.step_coefficients()]    # rising along the chain
    mid = math.sqrt(snr[2] * snr[3])                               # draw at t = 4, 3, 2; the mean at t = 1, 0
    assert (run(model, mid) - run(model, 0.0)).abs().max() > 1e-3
    pi = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    const = Linear(d, m, slope=0.0, logits=pi.log())
    torch.testing.assert_close(run(const, mid), (pi[:, None] * m).sum(0).expand_as(x_T), rtol=0, atol=1e-12)
    drawn = run(const, math.inf)
    assert all((drawn - m[k]).abs().max(1).values.lt(1e-9).any() for k in range(3))


def test_capped_weight(monkeypatch):
    """w_t = min(1, cap * 2 sigma_t^2 / c0^2) multiplies each example's NLL: with every example at
    one t the capped loss is w_t times the exact one, on the same draws; a cap too large to bind
    leaves the exact loss."""
    c0, s2 = torch.tensor([1.0, 0.1, 0.01], dtype=torch.float64), torch.tensor([1e-4, 1e-2, 1e-2], dtype=torch.float64)
    torch.testing.assert_close(categorical.capped_weight(c0, s2, 1.0), torch.tensor([2e-4, 1.0, 1.0], dtype=torch.float64))
    model = Mixture(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64),
                    torch.randn(3, dtype=torch.float64))
    x0 = torch.randn(64, 4, dtype=torch.float64).clamp(-1, 1)
    d = {cap: CategoricalDiffusion(T=10, objective="v", cap=cap) for cap in (None, 1e30, 1.0)}
    randint = torch.randint
    for step in (0, 4, 9):
        monkeypatch.setattr(torch, "randint", lambda low, high, size, **kw: torch.full(size, step))
        losses = {}
        for cap, diffusion in d.items():
            torch.manual_seed(0)
            losses[cap] = diffusion.loss(model, x0).item()
        abar, beta = d[None].alphas_cumprod[step], d[None].betas[step]
        c0, _, bt = smd.posterior(abar, abar / (1 - beta))
        s2 = bt if step else smd.posterior(d[None].alphas_cumprod[1], d[None].alphas_cumprod[0])[2]
        w = min(1.0, float(2 * s2 / c0**2))
        assert losses[1e30] == pytest.approx(losses[None], rel=1e-12)
        assert losses[1.0] == pytest.approx(w * losses[None], rel=1e-6), step
    monkeypatch.setattr(torch, "randint", randint)


def test_mean_loss_is_algorithm_1_on_the_mixture_mean(monkeypatch):
    """mean_loss = lambda adds lambda |eps - eps_bar|^2, eps_bar from x0_bar = sum_k pi_k x0_hat_k
    (by hand here, every example at one t, the same draws); with K = 1 that term is Algorithm 1's
    loss of the one component (smd.Diffusion.loss on the same draws)."""
    x0 = torch.randn(64, 4, dtype=torch.float64).clamp(-1, 1)
    model = Mixture(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    randint = torch.randint
    for step in (0, 5, 9):
        monkeypatch.setattr(torch, "randint", lambda low, high, size, **kw: torch.full(size, step))
        losses = {}
        for lam in (0.0, 2.5):
            torch.manual_seed(0)
            losses[lam] = CategoricalDiffusion(T=10, objective="v", mean_loss=lam).loss(model, x0).item()
        torch.manual_seed(0)
        eps = torch.randn_like(x0)
        d = CategoricalDiffusion(T=10, objective="v")
        abar = d.alphas_cumprod[step]
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        x0_k = abar.sqrt() * x_t[:, None] - (1 - abar).sqrt() * model.out            # v -> x0, (B, K, D)
        x0_bar = (model.logits.softmax(0)[None, :, None] * x0_k).sum(1)
        eps_bar = (x_t - abar.sqrt() * x0_bar) / (1 - abar).sqrt()
        assert losses[2.5] - losses[0.0] == pytest.approx(2.5 * (eps - eps_bar).pow(2).mean().item(), rel=1e-5)
    monkeypatch.setattr(torch, "randint", randint)

    eps_model = lambda x, t, eta=None: 0.7 * x + 0.01 * t[:, None].to(x.dtype)
    d1 = CategoricalDiffusion(T=10, objective="eps", mean_loss=1.0)
    d0 = CategoricalDiffusion(T=10, objective="eps")
    torch.manual_seed(1)
    with_mean = d1.loss(OneComponent(eps_model), x0).item()
    torch.manual_seed(1)
    without = d0.loss(OneComponent(eps_model), x0).item()
    torch.manual_seed(1)
    alg1 = smd.Diffusion(T=10, objective="eps").loss(eps_model, x0).item()
    assert with_mean - without == pytest.approx(alg1, rel=1e-5)


class FixedX0(torch.nn.Module):
    """Components whose x0_hat_k are given points m (K, D) at every x_t and t (through the v
    objective), except, with `last`, at t = 0, where each is x_t plus its own small offset (they
    nearly coincide there, and each wins some examples); copy_component is recorded, not done."""

    def __init__(self, d, m, last=False):
        super().__init__()
        self.d, self.m, self.last, self.copies = d, m, last, []
        self.offsets = 1e-3 * torch.randn(m.shape, generator=torch.Generator().manual_seed(1), dtype=m.dtype)

    def forward(self, x, t, eta=None):
        a = self.d.alphas_cumprod[t].view(-1, 1, 1)
        m = self.m[None].expand(len(x), -1, -1)
        if self.last:
            m = torch.where((t == 0).view(-1, 1, 1), x[:, None] + self.offsets[None], m)
        out = (a.sqrt() * x[:, None] - m) / (1 - a).sqrt()   # x0_from(out) = m
        return out, torch.zeros(len(x), len(self.m), dtype=x.dtype), None

    def copy_component(self, src, dst, optimizer=None):
        self.copies.append((src, dst, optimizer))


def test_fit_pi_is_bayes_for_point_components():
    """With fit_pi and components whose x0_hat_k are fixed points m_k (zero head logits), pi is
    the exact posterior over "x_t is m_k noised", gmm.GaussianMixture(m, std=0)'s weights, at
    every step; it holds the fit fixed (no gradient into m through pi); without fit_pi pi stays
    the head's (uniform here)."""
    from machinery import gmm
    D, T = 16, 5
    g = torch.Generator().manual_seed(0)
    m = (0.5 * torch.randn(4, D, generator=g, dtype=torch.float64)).requires_grad_()
    d = CategoricalDiffusion(T=T, objective="v", fit_pi=True)
    t = torch.arange(T).repeat_interleave(8)
    x_t = d.q_sample(m.detach()[torch.arange(len(t)) % 4], t, torch.randn(len(t), D, generator=g, dtype=torch.float64))
    x0_k, log_pi, _ = d.mixture(FixedX0(d, m), x_t, t)
    exact = gmm.GaussianMixture(m.detach(), 0.0).component_logits(x_t, d.alphas_cumprod[t]).log_softmax(1)
    assert torch.allclose(x0_k, m.expand(len(t), -1, -1)) and torch.allclose(log_pi, exact, atol=1e-9)
    assert (exact.exp().max(1).values < 0.99).any()          # some steps are not yet decided
    assert x0_k.requires_grad and not log_pi.requires_grad   # the head's logits are constants here
    d.fit_pi = False
    uniform = torch.full((len(t), 4), -math.log(4), dtype=torch.float64)
    assert torch.allclose(d.mixture(FixedX0(d, m), x_t, t)[1], uniform)


def test_split_blends_copies_the_blend_into_the_dead_component():
    """Three modes A, B, C in 64 dimensions; component 0 on C, component 1 on the average of A and
    B (a blend: it wins both), component 2 far from all (dead): the blend is copied into the dead
    one, at every chain length, also when at the last step the three nearly coincide and each wins
    some examples there. With one component per mode nothing is split, nor when a fourth is an
    exact copy of the first (it wins nothing, but there is no blend to give it)."""
    D = 64
    A, B = torch.full((D,), 0.8, dtype=torch.float64), torch.full((D,), -0.8, dtype=torch.float64)
    C = 0.8 * (-1.0) ** torch.arange(D, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0 = torch.cat([m.expand(32, D) for m in (A, B, C)]) + 0.05 * torch.randn(96, D, generator=g, dtype=torch.float64)
    for T in (2, 5, 10):
        d = CategoricalDiffusion(T=T, objective="v")
        for last in (False, True):
            model = FixedX0(d, torch.stack([C, (A + B) / 2, torch.full((D,), 5.0, dtype=torch.float64)]), last)
            opt = object()
            assert d.split_blends(model, x0, opt) == [(1, 2)] and model.copies == [(1, 2, opt)]
        assert d.split_blends(FixedX0(d, torch.stack([A, B, C])), x0) == []
        assert d.split_blends(FixedX0(d, torch.stack([A, B, C, A])), x0) == []


def test_copy_component_copies_outputs_logits_variances_and_adam_moments():
    """After copy_component(0, 2) without noise, component 2's predictions, logit and variance
    logit are component 0's, the two logits lower by log 2 (their pi summed is the old pi_0's
    share of the rest), Adam's moments copied; component 1 untouched. With noise the copy differs."""
    torch.manual_seed(0)
    m = CategoricalUNet(CategoricalConfig(image_size=8, channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                          attn_res=(), dropout=0.0, components=3, learned_var=True))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 7, 9])
    for _ in range(2):   # non-zero head weights and Adam moments
        opt.zero_grad()
        out, logits, v = m(x, t)
        (out.square().mean() + logits[:, 0].mean() - v[:, 1].mean()).backward()
        opt.step()
    with torch.no_grad():
        before = m(x, t)
    m.copy_component(0, 2, opt, noise=0.0)
    with torch.no_grad():
        out, logits, v = m(x, t)
    torch.testing.assert_close(out[:, 2], out[:, 0])
    torch.testing.assert_close(out[:, :2], before[0][:, :2])
    torch.testing.assert_close(logits[:, [0, 2]], before[1][:, [0, 0]] - math.log(2))
    torch.testing.assert_close(logits[:, 1], before[1][:, 1])
    torch.testing.assert_close(v[:, 2], v[:, 0])
    torch.testing.assert_close(v[:, :2], before[2][:, :2])
    conv = m.out[-1].weight
    torch.testing.assert_close(opt.state[conv]["exp_avg"][2], opt.state[conv]["exp_avg"][0])
    torch.testing.assert_close(opt.state[conv]["exp_avg_sq"][2], opt.state[conv]["exp_avg_sq"][0])
    m.copy_component(1, 2, opt)
    with torch.no_grad():
        out = m(x, t)[0]
    assert not torch.allclose(out[:, 2], out[:, 1]) and (out[:, 2] - out[:, 1]).abs().max() < 0.5 * out[:, 1].abs().max()
