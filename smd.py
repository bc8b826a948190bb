"""
smd.py -- Soft Mixture Denoising (Li, van Breugel, van der Schaar, ICLR 2024) on DDPM.

Read it top to bottom; it is the paper in the order a reader needs it:
  SoftMixture  the latent z_t = g_xi(eta, x_t, t) and the hypernetwork f_phi(z_t, t), whose
               per-block (scale, shift) `modulate` applies (Eq. 11: theta_hat = theta u f_phi).
  Diffusion    the forward process (Eq. 1) in closed form, q(x_t | x_0) (Alg. 1 line 4), Algorithm 1
               (`loss`) and Algorithm 2 (`sample`).
  beside Alg. 2: what can replace its line 7 (the authors' clipped-x0 path, DDIM), and
               `HeldEta`, a wrapper holding eta fixed for a whole chain.
  train_step   Algorithm 1 as one optimiser update (line 9); the EMA of the weights.
  eta_sensitivity  does a trained model use its latent at all? (Alg. 1's loss is minimised by
               an eps_hat that ignores z: eta is independent of (x_0, eps) given x_t.)

Conventions: images in [-1, 1], NCHW; timesteps are 0-based, index t is the paper's step t+1.
A model is called as model(x_t, t, eta) -> eps_hat and has an attribute `latent_dim`: the size
of eta for an SMD model, 0 for a vanilla one (which gets eta = None). Diffusion draws eta
itself, so Algorithms 1 and 2 read line by line below.

    python -c "import smd; print(smd.Diffusion(T=1000).timesteps(10))"
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Soft Mixture Denoising: z_t = g_xi(eta, x_t, t) and theta_hat = theta u f_phi(z_t, t)


class SoftMixture(nn.Module):
    """g_xi: MLP on [eta, pooled features of x_t, time embedding] -> z_t (Alg. 1 line 6, Alg. 2
    line 5). f_phi: MLP on [z_t, time embedding] -> one (scale, shift) pair per modulated block
    (Alg. 1 line 7, Alg. 2 line 6). f_phi's last layer starts at zero, so an untrained SMD model is the
    vanilla one. It knows nothing of U-Nets: any denoiser with blocks can use it."""

    def __init__(self, latent_dim, feat_dim, temb_dim, block_channels, hidden=512):
        super().__init__()
        self.latent_dim, self.block_channels = latent_dim, list(block_channels)
        self.g_xi = mlp(latent_dim + feat_dim + temb_dim, hidden, latent_dim)
        self.f_phi = mlp(latent_dim + temb_dim, hidden, 2 * sum(self.block_channels))
        nn.init.zeros_(self.f_phi[-1].weight)
        nn.init.zeros_(self.f_phi[-1].bias)

    def forward(self, eta, feats, temb):
        """[(scale, shift), ...], each (B, C_block), one pair per block."""
        z = self.g_xi(torch.cat([eta.to(feats.dtype), feats, temb], 1))   # Alg. 1 l.6, 2 l.5: z_t = g_xi(eta, x_t, t)
        params = self.f_phi(torch.cat([z, temb], 1))                      # Alg. 1 l.7, 2 l.6: f_phi(z_t, t)
        chunks = params.split([2 * c for c in self.block_channels], dim=1)
        return [tuple(c.chunk(2, dim=1)) for c in chunks]


def modulate(h, mod):
    """h * (1 + scale) + shift, per channel: the block's weights theta_hat = theta u f_phi(z_t, t).
    mod = (scale, shift) of shape (B, C), or None (vanilla); h is (B, C, ...)."""
    if mod is None:
        return h
    scale, shift = (m.view(*m.shape, *([1] * (h.dim() - 2))) for m in mod)
    return torch.addcmul(shift, h, 1 + scale)   # shift + h * (1 + scale) in one pass over h


def mlp(d_in, d_hidden, d_out, depth=2):
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, d_hidden), nn.SiLU()]
        d = d_hidden
    return nn.Sequential(*layers, nn.Linear(d, d_out))


def timestep_embedding(t, dim):
    """DDPM's sinusoidal embedding of timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)

# -----------------------------------------------------------------------------
# the noise schedule (float64 numpy; a chain is defined by its alphas_cumprod) and the posterior


def linear_alphas_cumprod(T):
    """DDPM's linear betas 1e-4 -> 0.02 over 1000 steps. A chain of T != 1000 steps keeps abar at
    T evenly spaced indices of the 1000-step chain (both ends included), so beta_t = 1 - abar_t /
    abar_{t-1} stays in (0, 1) for any T and the chain still ends in pure noise (abar_T ~ 4e-5).
    Scaling both ends of the betas by 1000/T instead, as the authors' code does, gives beta > 1
    for T < 20."""
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    return abar[np.round(np.linspace(0, 999, T)).astype(np.int64)]


def sigmoid_alphas_cumprod(T, start=-3.0, end=3.0, tau=1.0):
    """The SMD authors' schedule (Jabri et al. 2022): abar(u) = (s(end) - s((u (end - start) +
    start) / tau)) / (s(end) - s(start)) with s the logistic function and u = t/T, betas clipped
    at 0.999."""
    sig = lambda z: 1 / (1 + np.exp(-z))
    u = np.arange(T + 1, dtype=np.float64) / T
    f = (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))
    betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    return np.cumprod(1.0 - betas)


SCHEDULES = {"linear": linear_alphas_cumprod, "sigmoid": sigmoid_alphas_cumprod}


def posterior(abar, abar_prev):
    """q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, beta_tilde I) for one (possibly respaced) step
    abar_prev -> abar (DDPM Eqs. 6-7); returns (c0, ct, beta_tilde). Floats or tensors."""
    alpha = abar / abar_prev
    beta = 1 - alpha
    c0 = abar_prev**0.5 * beta / (1 - abar)
    ct = alpha**0.5 * (1 - abar_prev) / (1 - abar)
    return c0, ct, beta * (1 - abar_prev) / (1 - abar)

# -----------------------------------------------------------------------------
# the diffusion process, Algorithm 1 and Algorithm 2


class Diffusion(nn.Module):
    """The chain as float64 buffers (they move with .to(device)): q_sample, Algorithm 1 (loss)
    and Algorithm 2 (sample). objective: what the network outputs, "eps" (DDPM, the paper) or
    "v" = sqrt(abar) eps - sqrt(1 - abar) x_0 (the authors' code); either way the loss is
    ||eps - eps_hat||^2, which for "v" is the authors' snr/(snr+1)-weighted v loss."""

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
        self.register_buffer("alphas_cumprod", torch.from_numpy(abar))
        self.register_buffer("betas", torch.from_numpy(1.0 - abar / np.append(1.0, abar[:-1])))

    def q_sample(self, x0, t, eps):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: a draw from q(x_t | x_0), the closed form of
        Eq. (1)'s chain (Alg. 1 line 4)."""
        abar = self.alphas_cumprod[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def draw_eta(self, model, x, generator=None):
        """eta ~ N(0, I) of shape (B, latent_dim) for an SMD model, None for a vanilla one."""
        d = getattr(getattr(model, "module", model), "latent_dim", 0)   # .module: under DDP
        return torch.randn(x.shape[0], d, device=x.device, dtype=x.dtype, generator=generator) if d else None

    def predict_eps(self, model, x_t, t, eta=None):
        """eps_hat(x_t, t, eta) for t of shape (B,); Alg. 1 lines 6-7 run inside the model."""
        out = model(x_t, t, eta).to(x_t.dtype)
        abar = self.alphas_cumprod[t].view(-1, *([1] * (x_t.dim() - 1)))
        return self.eps_from(out, x_t, abar)

    # -- Algorithm 1 ----------------------------------------------------------------

    def loss(self, model, x0, eta_samples=1):
        """One Monte Carlo estimate of Eq. (14) with Gamma_t dropped, averaged over the batch,
        the dimensions and `eta_samples` etas per example (Sec. 5.4). Line 9's update is the
        caller's optimiser step (train_step)."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)   # line 3: t ~ U{1..T}
        eps = torch.randn_like(x0)                                       # line 3: eps ~ N(0, I)
        x_t = self.q_sample(x0, t, eps)                                  # line 4
        if eta_samples > 1:                                              # Sec. 5.4: K etas per x_t
            x_t, t, eps = (v.repeat_interleave(eta_samples, 0) for v in (x_t, t, eps))
        eta = self.draw_eta(model, x_t)                                  # line 5: eta ~ N(0, I)
        eps_hat = self.predict_eps(model, x_t, t, eta)                   # lines 6-7, inside the model
        return F.mse_loss(eps_hat.float(), eps.float())                  # line 9: ||eps - eps_hat||^2

    # -- Algorithm 2 ----------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model, shape, steps=None, var="large", generator=None, x_T=None, update=None):
        """Algorithm 2 over `steps` kept timesteps (all T by default); returns x_0 clamped to
        [-1, 1]. var: sigma_t^2 = beta_t ("large") or beta_tilde_t ("small"). update(x_t, eps_hat,
        eps, abar_t, abar_prev) -> x_{t-1} replaces line 7 (clipped_update, ddim_update below)."""
        if var not in ("large", "small"):
            raise ValueError(f"var={var!r}: use large (sigma^2 = beta) or small (beta_tilde)")
        x = x_T if x_T is not None else torch.randn(shape, device=self.betas.device, generator=generator)  # line 1
        for t, abar, abar_prev in self.step_coefficients(steps):                 # line 2: for t = T, ..., 1
            eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)   # line 3
            eta = self.draw_eta(model, x, generator)                              # line 4: eta ~ N(0, I)
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            eps_hat = self.predict_eps(model, x, tt, eta)                         # lines 5-6, in the model
            if update is not None:                                                # line 7, swapped (DDIM, clipping)
                x = update(x, eps_hat, eps, abar, abar_prev)
                continue
            alpha = abar / abar_prev                                              # the (respaced) step's alpha_t
            sigma2 = 1 - alpha if var == "large" else posterior(abar, abar_prev)[2]   # sigma_t^2 = beta_t or beta~_t
            mean = (x - (1 - alpha) / math.sqrt(1 - abar) * eps_hat) / math.sqrt(alpha)   # line 7
            x = mean + math.sqrt(sigma2) * eps if abar_prev < 1 else mean    # line 7's sigma_t eps; eps = 0 at t = 1
        return x.clamp(-1, 1)                                                     # line 9: return x_0

    def timesteps(self, steps=None):
        """The kept timesteps, descending: T-1 first, 0 last, evenly spaced (respacing as in
        improved-diffusion; steps=None keeps all T)."""
        steps = self.T if steps is None else int(steps)
        if not 2 <= steps <= self.T:
            raise ValueError(f"steps={steps} must be between 2 and T={self.T}")
        return np.round(np.linspace(0, self.T - 1, steps)).astype(np.int64)[::-1].copy()

    def step_coefficients(self, steps=None):
        """Per kept step, descending: (t, abar_t, abar_prev) as Python floats, abar_prev being abar
        at the next kept step (1 after the last). The respaced chain has alpha'_t = abar_t /
        abar_prev and beta'_t = 1 - alpha'_t."""
        ts = self.timesteps(steps)
        abar = self.abar_host[ts]
        return [(int(t), float(a), float(ap)) for t, a, ap in zip(ts, abar, np.append(abar[1:], 1.0))]

    # -- what the network outputs ---------------------------------------------------

    def eps_from(self, out, x_t, abar):
        """eps_hat from the network's output (abar: a float or a tensor broadcastable to x_t)."""
        if self.objective == "eps":
            return out
        abar = torch.as_tensor(abar, dtype=x_t.dtype, device=x_t.device)
        return abar.sqrt() * out + (1 - abar).sqrt() * x_t        # eps = sqrt(abar) v + sqrt(1-abar) x_t

    def x0_from(self, out, x_t, abar):
        """x0_hat from the network's output."""
        abar = torch.as_tensor(abar, dtype=x_t.dtype, device=x_t.device)
        if self.objective == "eps":
            return x0_from_eps(x_t, out, abar)
        return abar.sqrt() * x_t - (1 - abar).sqrt() * out        # x0 = sqrt(abar) x_t - sqrt(1-abar) v

# -----------------------------------------------------------------------------
# what can replace line 7 of Algorithm 2 (sampler options the paper does not have)


def x0_from_eps(x_t, eps_hat, abar):
    """x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar): q_sample solved for x_0 (abar: a
    float, or a tensor broadcastable to x_t)."""
    sqrt = math.sqrt if isinstance(abar, float) else torch.sqrt
    return (x_t - sqrt(1 - abar) * eps_hat) / sqrt(abar)


def clipped_update(x, eps_hat, noise, abar, abar_prev, var="large"):
    """The authors' sampler: line 7's mean written through x0_hat, clipped to [-1, 1], as the
    posterior mean c0 x0_hat + ct x_t (equal to line 7 when nothing is clipped)."""
    x0 = x0_from_eps(x, eps_hat, abar).clamp(-1, 1)
    c0, ct, beta_tilde = posterior(abar, abar_prev)
    if abar_prev == 1.0:
        return c0 * x0 + ct * x
    return c0 * x0 + ct * x + math.sqrt(1 - abar / abar_prev if var == "large" else beta_tilde) * noise


def ddim_update(x, eps_hat, noise, abar, abar_prev, ddim_eta=0.0, clip_x0=False):
    """DDIM (Song et al. 2021, Eq. 12) on the same kept steps; ddim_eta = 0 is deterministic
    (for an SMD model only with its eta held: HeldEta). Not to be confused with SMD's eta."""
    x0 = x0_from_eps(x, eps_hat, abar)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps_hat = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
    sigma = ddim_eta * math.sqrt(posterior(abar, abar_prev)[2])
    x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps_hat
    return x if abar_prev == 1.0 else x + sigma * noise


class HeldEta(nn.Module):
    """An SMD model with its eta held for the whole chain, eta (B, latent_dim): one draw per
    image ("fixed") or zeros ("zero"), where Alg. 2 line 4 draws a fresh one every step. Line 4
    still draws its eta (and this wrapper discards it), so the chain's other draws, x_T and the
    step noise, are the ones of the fresh-eta chain. With DDIM at ddim_eta = 0 the chain is
    deterministic given x_T."""

    def __init__(self, model, eta):
        super().__init__()
        self.model, self.eta, self.latent_dim = model, eta, model.latent_dim

    def forward(self, x, t, eta=None):
        return self.model(x, t, self.eta)

# -----------------------------------------------------------------------------
# Algorithm 1 as a whole: loss, backward, update (line 9), and the EMA of the weights


def make_optimizer(model, lr, device, weight_decay=0.0):
    """AdamW as DDPM's Adam (no weight decay by default); fused kernels on CUDA."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             fused=torch.device(device).type == "cuda")


def train_step(net, diffusion, optimizer, x0, grad_clip=1.0, amp=False, **loss_args):
    """One update on a batch: diffusion.loss (Alg. 1; loss_args such as eta_samples go to it),
    backward, grad-norm clip, AdamW step. Returns the loss as a device tensor (no host sync)."""
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = diffusion.loss(net, x0, **loss_args)
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
# the caveat, measured: does the model use its latent?


@torch.no_grad()
def eta_sensitivity(model, diffusion, x0, n_eta=8, n_t=10, generator=None):
    """(mean, [(t, ratio), ...]): at each of n_t evenly spaced t, the std of eps_hat over eta at
    fixed (x_t, t) divided by the std over x_t of its eta-average; the mean is over t. 0 means
    the latent is unused (always for a vanilla model); a latent used at a few t only shows in
    the list. x0: a batch of data (at least 2 examples), not generated samples."""
    d = getattr(model, "latent_dim", 0)
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
