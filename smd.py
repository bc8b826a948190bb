"""
smd.py -- the diffusion process and Soft Mixture Denoising (Li et al., ICLR 2024).

The paper's math lives here (the categorical mixture that goes beyond it, in mixture.py):
  Diffusion    the forward process q (Eq. 1), the training loss (Algorithm 1) and the
               sampler (Algorithm 2), with respacing to few steps and DDIM.
  SoftMixture  the latent sampler g_xi(eta, x_t, t) -> z_t and the hypernetwork
               f_phi(z_t, t) -> per-block (scale, shift) of Eq. (11). It knows nothing of
               U-Nets: any denoiser with "blocks" can use it (unet.py, toy.py).
  train_step   one full iteration of Algorithm 1 (loss, backward, update) and the EMA.
  eta_sensitivity  does a trained SMD model use its latent at all? Because eta is independent
               of (x_0, eps) given x_t, the loss of Algorithm 1 is minimised by an eps_hat that
               ignores z; whether training finds a use for it is measured, not assumed.

Conventions: images in [-1, 1], NCHW; timesteps are 0-based, index t is the paper's
step t+1; a model is called as model(x_t, t, eta=None) -> eps_hat. For an SMD model
(one with a `latent_dim` attribute > 0) Diffusion draws eta ~ N(0, I) of shape
(B, latent_dim) itself, so Algorithms 1 and 2 read line by line below.

    python -c "import smd; d = smd.Diffusion(); print(d.timesteps(10))"
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import mixture

# -----------------------------------------------------------------------------
# noise schedules (float64 numpy; the chain is defined by alphas_cumprod)


def linear_alphas_cumprod(T):
    """DDPM's linear betas 1e-4 -> 0.02 over 1000 steps. A chain of T != 1000 steps keeps
    abar at T evenly spaced indices of the 1000-step chain (both ends included), so that
    beta_t = 1 - abar_t / abar_{t-1} stays in (0, 1) for any T and the chain still ends at
    DDPM's abar_T ~ 4e-5 (pure noise). Scaling both ends of the betas by 1000/T instead, as the
    SMD authors' code does, gives beta > 1 for T < 20."""
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    return abar[np.round(np.linspace(0, 999, T)).astype(np.int64)]


def cosine_alphas_cumprod(T, s=0.008):
    """Nichol & Dhariwal (2021), with betas clipped at 0.999."""
    f = np.cos((np.arange(T + 1, dtype=np.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    return np.cumprod(1.0 - betas)


def sigmoid_alphas_cumprod(T, start=-3.0, end=3.0, tau=1.0):
    """The SMD authors' schedule (Jabri et al. 2022): abar(u) = (s(end) - s(u (end - start) +
    start) / tau)) / (s(end) - s(start)) with s the logistic function and u = t/T, betas
    clipped at 0.999."""
    sig = lambda z: 1 / (1 + np.exp(-z))
    u = np.arange(T + 1, dtype=np.float64) / T
    f = (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))
    betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    return np.cumprod(1.0 - betas)


SCHEDULES = {"linear": linear_alphas_cumprod, "cosine": cosine_alphas_cumprod, "sigmoid": sigmoid_alphas_cumprod}


def _unwrap(model):
    return getattr(model, "module", model)   # DDP; torch.compile forwards attributes


def _latent_dim(model):
    """0 for a vanilla model, the size of eta for an SMD model."""
    return getattr(_unwrap(model), "latent_dim", 0) or 0


def _components(model):
    """K for a categorical-mixture model (see mixture.py), else 0."""
    return getattr(_unwrap(model), "components", 0) or 0


def _draw_eta(model, x, generator=None):
    """eta ~ N(0, I) of shape (B, latent_dim) for an SMD model, None for a vanilla one."""
    d = _latent_dim(model)
    if d == 0:
        return None
    return torch.randn(x.shape[0], d, device=x.device, dtype=x.dtype, generator=generator)


def _bcast(v, x):
    """(B,) coefficients -> (B, 1, ..., 1) to multiply x."""
    return v.view(-1, *([1] * (x.dim() - 1)))


class Diffusion(nn.Module):
    """Holds the schedule as float64 buffers (move with .to(device)) and implements
    q_sample, Algorithm 1 (loss) and Algorithm 2 (sample). objective: what the network
    outputs, "eps" (DDPM, the paper) or "v" = sqrt(abar) eps - sqrt(1 - abar) x_0 (the SMD
    authors' code); either way the loss is ||eps - eps_hat||^2, which for "v" is the authors'
    abar-weighted (snr / (snr + 1)) v loss."""

    def __init__(self, T=1000, schedule="linear", objective="eps"):
        super().__init__()
        if T < 2:
            raise ValueError(f"T={T}: a diffusion chain needs at least 2 steps")
        if schedule not in SCHEDULES or objective not in ("eps", "v"):
            raise ValueError(f"schedule={schedule!r}, objective={objective!r}: use one of {sorted(SCHEDULES)} "
                             f"and eps or v")
        abar = SCHEDULES[schedule](T)
        self.T, self.schedule, self.objective = T, schedule, objective
        self.abar_host = abar   # a host copy: the sampler reads its coefficients without a GPU sync
        abar_prev = np.append(1.0, abar[:-1])
        self.register_buffer("alphas_cumprod", torch.from_numpy(abar))
        self.register_buffer("betas", torch.from_numpy(1.0 - abar / abar_prev))

    # -- forward process and what the network predicts ------------------------------

    def q_sample(self, x0, t, eps):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Alg. 1 line 4)."""
        abar = _bcast(self.alphas_cumprod[t].to(x0.dtype), x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def eps_from(self, out, x_t, abar):
        """eps_hat from the network's output (abar: float or broadcastable tensor)."""
        if self.objective == "eps":
            return out
        abar = torch.as_tensor(abar, dtype=x_t.dtype, device=x_t.device)
        return abar.sqrt() * out + (1 - abar).sqrt() * x_t        # eps = sqrt(abar) v + sqrt(1-abar) x_t

    def x0_from(self, out, x_t, abar):
        """x0_hat from the network's output."""
        abar = torch.as_tensor(abar, dtype=x_t.dtype, device=x_t.device)
        if self.objective == "eps":
            return (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
        return abar.sqrt() * x_t - (1 - abar).sqrt() * out        # x0 = sqrt(abar) x_t - sqrt(1-abar) v

    def predict_eps(self, model, x_t, t, eta=None):
        """eps_hat(x_t, t, eta): Alg. 1 lines 6-7 run inside the model."""
        return self.eps_from(model(x_t, t, eta), x_t, _bcast(self.alphas_cumprod[t], x_t))

    # -- Algorithm 1 ----------------------------------------------------------------

    def loss(self, model, x0, eta_samples=1, tau=1.0):
        """One Monte Carlo estimate of Eq. (14) with Gamma_t dropped, averaged over the
        batch, the dimensions and `eta_samples` draws of eta per example (Sec. 5.4).
        Lines 6-7 (z_t = g_xi(eta, x_t, t); theta_hat = theta u f_phi(z_t, t)) run inside
        model.forward; line 9's update is the caller's optimizer step. A categorical-mixture
        model (K components) is trained by mixture.loss instead (tau: its temperature)."""
        if _components(model):
            return mixture.loss(self, model, x0, tau)
        B = x0.shape[0]
        t = torch.randint(0, self.T, (B,), device=x0.device)   # line 3: t ~ U{1..T}
        eps = torch.randn_like(x0)                             # line 3: eps ~ N(0, I)
        x_t = self.q_sample(x0, t, eps)                        # line 4
        if eta_samples > 1:                                    # K etas at the same x_t
            x_t, t, eps = (v.repeat_interleave(eta_samples, 0) for v in (x_t, t, eps))
        eta = _draw_eta(model, x_t)                            # line 5: eta ~ N(0, I)
        eps_hat = self.predict_eps(model, x_t, t, eta)         # lines 6-7 inside the model
        return F.mse_loss(eps_hat.float(), eps.float())        # line 9: ||eps - eps_hat||^2

    # -- Algorithm 2 ----------------------------------------------------------------

    def timesteps(self, steps=None):
        """The kept timesteps, descending: T-1 first, 0 last, evenly spaced (respacing as
        in improved-diffusion; `steps=None` keeps all T)."""
        steps = self.T if steps is None else int(steps)
        if not 2 <= steps <= self.T:
            raise ValueError(f"steps={steps} must be between 2 and T={self.T}")
        return np.round(np.linspace(0, self.T - 1, steps)).astype(np.int64)[::-1].copy()

    def step_coefficients(self, steps=None):
        """Per kept step (descending): (t, abar_t, abar_prev) as Python floats, where
        abar_prev is abar at the next kept step (1 after the last). The respaced chain has
        beta'_t = 1 - abar_t / abar_prev and alpha'_t = 1 - beta'_t."""
        ts = self.timesteps(steps)
        abar = self.abar_host[ts]
        return [(int(t), float(a), float(ap)) for t, a, ap in zip(ts, abar, np.append(abar[1:], 1.0))]

    @torch.no_grad()
    def sample(self, model, shape, steps=None, sampler="ddpm", var="large", ddim_eta=0.0,
               x_T=None, generator=None, clip_x0=False, device=None, dtype=torch.float32, eta_mode="fresh"):
        """Algorithm 2 (sampler="ddpm") or DDIM (sampler="ddim") over the kept timesteps;
        returns x_0 clamped to [-1, 1]. eta_mode (SMD models only): "fresh" draws a new eta at
        every step (Alg. 2 line 4); "fixed" draws one per image for the whole chain; "zero"
        holds eta = 0. With "fixed" or "zero", DDIM at ddim_eta = 0 is deterministic given x_T.
        A categorical-mixture model picks a component k ~ pi(x_t) at every step and steps with
        its x0_hat_k (and, if learned, its variance, at every step including the last)."""
        if sampler not in ("ddpm", "ddim") or var not in ("large", "small") or eta_mode not in ("fresh", "fixed", "zero"):
            raise ValueError(f"sampler={sampler!r}, var={var!r}, eta_mode={eta_mode!r}: use ddpm|ddim, large|small "
                             f"and fresh|fixed|zero")
        device = device or self.betas.device
        x = x_T if x_T is not None else torch.randn(shape, device=device, dtype=dtype, generator=generator)  # line 1
        # one allocation per batch for the step's random draws and timestep, refilled in place
        # every step (the model must not keep them); no host syncs below
        noise, tt = torch.empty_like(x), torch.empty(x.shape[0], device=x.device, dtype=torch.long)
        d, K = _latent_dim(model), _components(model)
        eta = torch.zeros(x.shape[0], d, device=x.device, dtype=x.dtype) if d else None
        if eta is not None and eta_mode == "fixed":
            torch.randn(eta.shape, generator=generator, out=eta)          # one eta per image
        u = torch.zeros(x.shape[0], 1, device=x.device, dtype=x.dtype) if K else None   # K = 1: no choice
        coefs = self.step_coefficients(steps)
        for i, (t, abar, abar_prev) in enumerate(coefs):                  # line 2
            last = abar_prev == 1.0
            torch.randn(x.shape, generator=generator, out=noise)          # line 3: eps ~ N(0, I)
            if eta is not None and eta_mode == "fresh":
                torch.randn(eta.shape, generator=generator, out=eta)      # line 4: eta ~ N(0, I)
            sigma_k = None
            if K:                                                         # beyond the paper: k ~ pi(x_t)
                if K > 1:
                    torch.rand(u.shape, generator=generator, out=u)
                abar_clip = coefs[i - 1][1] if last else abar
                x0, sigma_k = mixture.pick_component(self, model(x, tt.fill_(t)), x, u, abar, abar_prev, abar_clip)
                eps_hat = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
            else:
                eps_hat = self.eps_from(model(x, tt.fill_(t), eta).to(x.dtype), x, abar)   # lines 5-6 in model
            if sampler == "ddpm":
                x = self.ddpm_step(x, eps_hat, abar, abar_prev, var, clip_x0)
                sigma = math.sqrt(self.ddpm_variance(abar, abar_prev, var))
            else:
                x, sigma = self.ddim_step(x, eps_hat, abar, abar_prev, ddim_eta, clip_x0)
            if sigma_k is not None and sampler == "ddpm":                 # a learned variance, last step too
                x = x + sigma_k * noise
            elif not last:                                                # line 3: eps = 0 at t = 1
                x = x + sigma * noise                                     # line 7: + sigma_t eps
        return x.clamp(-1, 1)                                             # line 9

    @staticmethod
    def ddpm_variance(abar, abar_prev, var):
        """sigma_t^2 = beta_t ("large") or the posterior variance beta_tilde_t ("small")."""
        beta = 1 - abar / abar_prev
        return beta if var == "large" else beta * (1 - abar_prev) / (1 - abar)

    @staticmethod
    def ddpm_step(x, eps_hat, abar, abar_prev, var, clip_x0=False):
        """The mean of Alg. 2 line 7: (x_t - (1-alpha_t)/sqrt(1-abar_t) eps_hat) / sqrt(alpha_t).
        With clip_x0 the same mean is written through x0_hat, clipped to [-1, 1]."""
        alpha = abar / abar_prev
        if not clip_x0:
            return (x - (1 - alpha) / math.sqrt(1 - abar) * eps_hat) / math.sqrt(alpha)
        x0 = ((x - math.sqrt(1 - abar) * eps_hat) / math.sqrt(abar)).clamp(-1, 1)
        c0 = math.sqrt(abar_prev) * (1 - alpha) / (1 - abar)   # posterior mean of q(x_{t-1}|x_t,x_0)
        ct = math.sqrt(alpha) * (1 - abar_prev) / (1 - abar)
        return c0 * x0 + ct * x

    @staticmethod
    def ddim_step(x, eps_hat, abar, abar_prev, ddim_eta, clip_x0=False):
        """Song et al. (2021) Eq. (12): returns the noiseless part of x_{t-1} and sigma."""
        x0 = (x - math.sqrt(1 - abar) * eps_hat) / math.sqrt(abar)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps_hat = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        sigma = ddim_eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        return math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps_hat, sigma


# -----------------------------------------------------------------------------
# Algorithm 1 as a whole: loss, backward, update (line 9), and the EMA of the weights


def make_optimizer(model, lr, device, weight_decay=0.0):
    """AdamW as DDPM's Adam (no weight decay by default); fused kernels on CUDA."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             fused=torch.device(device).type == "cuda")


def train_step(net, diffusion, optimizer, x0, eta_samples=1, grad_clip=1.0, amp=False, tau=1.0):
    """One update on a batch: Alg. 1's loss, backward, grad-norm clip, AdamW step. Returns the
    loss as a device tensor: nothing here waits for the GPU."""
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = diffusion.loss(net, x0, eta_samples, tau)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


def ema_decay(n, max_decay=0.9999):
    """EMA decay after n updates, warmed up so early checkpoints are not the initialisation."""
    return min(max_decay, (1 + n) / (10 + n))


@torch.no_grad()
def ema_update(ema_params, params, decay):
    """ema = lerp(ema, p, 1 - decay) for all parameters in one foreach kernel."""
    torch._foreach_lerp_(ema_params, params, 1 - decay)


# -----------------------------------------------------------------------------
# Soft Mixture Denoising: z_t = g_xi(eta, x_t, t) and theta_hat = theta u f_phi(z_t, t)


def timestep_embedding(t, dim):
    """DDPM's sinusoidal embedding of timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def mlp(d_in, d_hidden, d_out, depth=2):
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, d_hidden), nn.SiLU()]
        d = d_hidden
    return nn.Sequential(*layers, nn.Linear(d, d_out))


class SoftMixture(nn.Module):
    """g_xi: MLP on [eta, pooled features of x_t, time embedding] -> z_t (Alg. 1 line 6).
    f_phi: MLP on [z_t, time embedding] -> one (scale, shift) pair per modulated block
    (Alg. 1 line 7), applied by the block as h = norm(h) * (1 + scale) + shift. f_phi's
    last layer is zero-initialised, so an untrained SMD model equals the vanilla one."""

    def __init__(self, latent_dim, feat_dim, temb_dim, block_channels, hidden=512):
        super().__init__()
        self.latent_dim, self.block_channels = latent_dim, list(block_channels)
        self.g_xi = mlp(latent_dim + feat_dim + temb_dim, hidden, latent_dim)
        self.f_phi = mlp(latent_dim + temb_dim, hidden, 2 * sum(self.block_channels))
        nn.init.zeros_(self.f_phi[-1].weight)
        nn.init.zeros_(self.f_phi[-1].bias)

    def forward(self, eta, feats, temb):
        """Returns [(scale, shift), ...], each (B, C_block), one pair per block."""
        z = self.g_xi(torch.cat([eta.to(feats.dtype), feats, temb], 1))   # z_t = g_xi(eta, x_t, t)
        params = self.f_phi(torch.cat([z, temb], 1))                      # f_phi(z_t, t)
        chunks = params.split([2 * c for c in self.block_channels], dim=1)
        return [tuple(c.chunk(2, dim=1)) for c in chunks]


def modulate(h, mod):
    """h * (1 + scale) + shift with per-channel (B, C) scale and shift (NCHW or (B, C))."""
    if mod is None:
        return h
    scale, shift = (m.view(*m.shape, *([1] * (h.dim() - 2))) for m in mod)
    return torch.addcmul(shift, h, 1 + scale)   # one pass over h, not two


# -----------------------------------------------------------------------------
# does the model use its latent?


@torch.no_grad()
def eta_sensitivity(model, diffusion, x0, n_eta=8, n_t=10, generator=None):
    """(mean, [(t, ratio), ...]): at each of n_t evenly spaced t, the std of eps_hat over eta at
    fixed (x_t, t) divided by the std over x_t of its eta-average; the mean is over t. 0 means
    the latent is unused (always for a vanilla model); a latent used at a few t only shows in
    the list. x0: a batch of data (at least 2 examples), not generated samples."""
    d = _latent_dim(model)
    ts = np.linspace(0, diffusion.T - 1, n_t).round().astype(np.int64)
    if d == 0:
        return 0.0, [(int(t), 0.0) for t in ts]
    B, per_t = x0.shape[0], []
    for t in ts:
        tt = torch.full((B,), int(t), device=x0.device, dtype=torch.long)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = diffusion.q_sample(x0, tt, eps)
        eta = torch.randn(n_eta * B, d, device=x0.device, dtype=x0.dtype, generator=generator)
        e = diffusion.predict_eps(model, x_t.repeat(n_eta, *([1] * (x0.dim() - 1))), tt.repeat(n_eta), eta).float()
        e = e.view(n_eta, *x0.shape)
        within = e.std(0).mean()            # spread over eta at fixed x_t
        between = e.mean(0).std(0).mean()   # spread over x_t of the eta-average
        per_t.append((int(t), (within / between.clamp_min(1e-12)).item()))
    return float(np.mean([r for _, r in per_t])), per_t
