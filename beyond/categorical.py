"""
beyond/categorical.py -- beyond the paper: each reverse step a categorical mixture of K Gaussians.

SMD (smd.py) makes p_theta(x_{t-1} | x_t) a continuous mixture through a latent eta and trains
it with Jensen's bound, whose minimiser ignores eta. Here the mixture is finite,

    p(x_{t-1} | x_t) = sum_k pi_k(x_t) N(x_{t-1}; mu_k, sigma_k^2 I),

mu_k the posterior mean of q(x_{t-1} | x_t, x_0 = x0_hat_k), so its negative log-likelihood can
be computed exactly (a logsumexp over k): no latent to sample, no bound. K = 1 with fixed
variances is DDPM's L_{t-1} (Eq. 14 with Gamma_t). A categorical model returns
(out_k (B, K, ...), logits (B, K), var_logits (B, K) or None): K outputs read as x0_hat_k
through the diffusion's objective (eps or v), the logits of pi and, if learned, per-component
variances log sigma_k^2 = f log beta + (1 - f) log beta_tilde with f = sigmoid(var_logits) (as
improved DDPM; at the last step beta_tilde = 0, so there it is clipped to the step before's).

Mixtures trained by likelihood fall into k-means' local optimum: at a large step the
responsibilities are one-hot, a component that starts far from every mode never gets a gradient
(dead), and its modes go to a neighbour that settles on their average (a blend). `temperature`
anneals the responsibilities instead (deterministic annealing, Ueda & Nakano 1998): training
starts with the energies divided by tau0 >> 1, every component feels every example, and the
components split apart as tau falls to 1, where the loss is the exact likelihood again.
Annealing can still end with a component on two modes and another dead; `split_blends` (--split)
copies the blend into the component worth least, and the pair parts (split-and-merge EM).
`fit_pi` (--fit-pi) adds to the head's logits each component's own fit to x_t, Bayes' weight
N(eps_hat_k; 0, I) (CategoricalDiffusion.mixture).

  CategoricalConfig, CategoricalUNet   the U-Net with K outputs and a head for the logits
  CategoricalDiffusion                 `mixture` (x0_hat_k, log pi), `loss` (the exact mixture NLL),
                                       `sample` (k ~ pi), `split_blends`
  AnnealedDiffusion                    the same, its loss annealed with the training step
  add_flags, make_diffusion, train_loop   the flags, chains and training of templates and fashion

    python -m beyond.train --dataset fashion-mnist --components 10 --learned-var --anneal 1e6 --T 5
    python -m beyond.toy --T 5 --steps 5 --models vanilla,categorical-var --ch 160 --max-steps 24000
    python -m beyond.templates --T 2 --split
    python -m beyond.categorical     # the CIFAR-10 categorical U-Net's size
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery import cli
from machinery.loop import train_loop as small_loop
from smd import Diffusion, mlp, posterior
from unet import UNet, UNetConfig, norm


@dataclass
class CategoricalConfig(UNetConfig):
    components: int = 10         # K Gaussians per reverse step
    learned_var: bool = False    # a learned variance per component (else beta_tilde)

    def __post_init__(self):
        super().__post_init__()
        if self.smd or self.components < 1:
            raise ValueError(f"components={self.components}, smd={self.smd}: a categorical model has K >= 1 "
                             f"components and no soft mixture")


class CategoricalUNet(UNet):
    """The U-Net whose last conv predicts K outputs, and a small MLP on the pooled bottleneck and
    the time embedding for the K logits of pi (and K variance logits), zero at the start."""

    config_class = CategoricalConfig

    def __init__(self, config):
        super().__init__(config)
        K, temb_dim, bottleneck = config.components, 4 * config.ch, self.mid[0].conv1.in_channels
        self.components, self.learns_variance = K, config.learned_var   # sample.py: then --var changes nothing
        self.head = mlp(bottleneck + temb_dim, temb_dim, K * (2 if config.learned_var else 1), depth=1)
        nn.init.zeros_(self.head[-1].weight)   # uniform pi and mid-range variances at the start
        nn.init.zeros_(self.head[-1].bias)

    def output_layer(self, ch):
        """K outputs; not zero-initialised, so that the components start apart."""
        return nn.Sequential(norm(ch, self.config.norm_groups), nn.SiLU(),
                             nn.Conv2d(ch, self.channels * self.config.components, 3, padding=1))

    def forward(self, x, t, eta=None):
        hs, temb = self.encode(x, t)
        K, pooled = self.components, hs[-1].float().mean((2, 3)).to(temb.dtype)   # as UNet.forward pools for g_xi
        h = self.decode(hs, temb)
        head = self.head(torch.cat([pooled, temb], 1)).float()
        out = self.out(h).view(x.shape[0], K, self.channels, self.image_size, self.image_size)
        return out, head[:, :K], head[:, K:] if self.config.learned_var else None

    @torch.no_grad()
    def copy_component(self, src, dst, optimizer=None, noise=0.05):
        """Component dst becomes a copy of src (its slice of the output conv, perturbed by `noise`
        relative, so that the two can part; its logit and variance rows of the head; their Adam
        moments), the two sharing src's pi."""
        C, K = self.channels, self.components
        conv, head = self.out[-1], self.head[-1]
        rows = [(conv.weight, src * C, dst * C, C), (conv.bias, src * C, dst * C, C),
                (head.weight, src, dst, 1), (head.bias, src, dst, 1)]
        if self.config.learned_var:
            rows += [(head.weight, K + src, K + dst, 1), (head.bias, K + src, K + dst, 1)]
        for p, s, d, n in rows:
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            for x in [p] + [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]:
                x[d:d + n] = x[s:s + n]
        conv.weight[dst * C:(dst + 1) * C] *= 1 + noise * torch.randn_like(conv.weight[dst * C:(dst + 1) * C])
        head.bias[[src, dst]] -= math.log(2)


def capped_weight(c0, s2, cap):
    """w_t = min(1, cap / (c0^2 / (2 sigma_t^2))): the exact NLL's own weight on |x0_hat - x_0|^2,
    c0^2 / (2 sigma_t^2), capped at `cap` (as min-SNR-gamma caps the eps loss's SNR weight, Hang
    et al. 2023). That weight is ~5000 at the steps into abar ~ 1 on every chain and 0.002-3 at the
    steps where a 10-step chain chooses its mode, so the exact NLL spends the network on denoising
    the last pixel noise; capped at 1, those steps weigh no more than the others. On a 2-step
    chain both steps are capped: the exact NLL times a constant."""
    return (cap * 2 * s2 / c0**2).clamp(max=1)


def temperature(step, total, tau0, frac=0.5):
    """tau at a training step: tau0 -> 1 geometrically over the first `frac` of training, then 1."""
    return tau0 ** max(0.0, 1 - step / (frac * total)) if tau0 > 1 else 1.0


class CategoricalDiffusion(Diffusion):
    """The same chain as smd.Diffusion; its loss is the exact mixture likelihood (each step's
    weighted by `capped_weight` if `cap` is set; plus `mean_loss` x Algorithm 1's loss on the
    mixture's mean) and its sampler picks a component at every step (with `draw_snr`, only at
    the steps whose x_t has a signal-to-noise ratio at most draw_snr; see `sample`)."""

    def __init__(self, T=1000, schedule="linear", objective="eps", cap=None, mean_loss=0.0, fit_pi=False,
                 draw_snr=None):
        super().__init__(T, schedule, objective)
        self.cap, self.mean_loss, self.fit_pi, self.draw_snr = cap, mean_loss, fit_pi, draw_snr

    def mixture(self, model, x_t, t):
        """The mixture at x_t: x0_hat_k (B, K, ...) in float64, log pi_k (B, K), the variance
        logits or None. With `fit_pi`, pi also weighs each component by its own fit to x_t,
          pi_k  proportional to  exp(head_k) N(eps_hat_k; 0, I),
          eps_hat_k = (x_t - sqrt(abar) x0_hat_k) / sqrt(1 - abar)   (the noise component k implies),
        Bayes' rule for "x_t is x0_hat_k noised" (the exact posterior's weights when the data are
        points x0_hat_k, as gmm.component_logits with zero width); the head learns what is left. The
        fit is held fixed (stop-gradient): pi follows the means, it does not pull them."""
        out, logits, var_logits = model(x_t, t)
        abar = self.alphas_cumprod[t].view(-1, *[1] * (out.dim() - 1))
        x0_k = self.x0_from(out.double(), x_t[:, None].double(), abar)
        logits = logits.double()
        if self.fit_pi:
            eps_k = (x_t[:, None] - abar.sqrt() * x0_k.detach()) / (1 - abar).sqrt()
            logits = logits - 0.5 * eps_k.flatten(2).pow(2).sum(2)
        return x0_k, F.log_softmax(logits, 1), var_logits

    @staticmethod
    def mixture_mean(x0_k, log_pi):
        """x0_bar = sum_k pi_k x0_hat_k, (B, ...) from x0_hat_k (B, K, ...) and log pi (B, K)."""
        return (log_pi.exp().view(*log_pi.shape, *[1] * (x0_k.dim() - 2)) * x0_k).sum(1)

    def step_terms(self, t):
        """At timesteps t: abar_t, beta_t, c0 (x_0's coefficient in the posterior mean, DDPM's Eq. 7),
        beta_tilde_t and sigma_t^2 = beta_tilde_t clipped at t = 0 to its t = 1 value."""
        abar, beta = self.alphas_cumprod[t], self.betas[t]
        c0, _, bt = posterior(abar, abar / (1 - beta))
        bt1 = posterior(self.alphas_cumprod[1], self.alphas_cumprod[0])[2]
        return abar, beta, c0, bt, torch.where(t == 0, bt1, bt)

    def loss(self, model, x0, tau=1.0):
        """-log p(x_{t-1} | x_t) per dimension, exactly (logsumexp over the K components), for
        x_{t-1} ~ q(x_{t-1} | x_t, x_0) and t ~ U{1..T}: the variational bound in nats, constants
        dropped. With d_k = x0_hat_k - x_0, x_{t-1} - mu_k = sqrt(bt) xi - c0 d_k and sigma_t^2 =
        beta_tilde_t (clipped at t = 0 to its t = 1 value),
          log N_k = -(c0^2 |d_k|^2 - 2 c0 sqrt(bt) (d_k - mean_k d).xi) / (2 sigma_t^2) + const.
        Subtracting mean_k d (the same for every k; xi is independent of it) is a control variate:
        unbiased, and it removes the xi noise entirely when the components agree, only partly when
        they disagree. K = 1 is then Eq. (14) with Gamma_t, DDPM's L_{t-1}. Learned variances add
        their own term: the mixture log-density with means and weights held fixed (stop-gradient,
        as improved DDPM's L_hybrid), so a wide variance cannot stand in for a wrong mean. With
        tau > 1 the first term is -tau logsumexp(log N_k / tau) (see `temperature`). With `cap`, each
        step's NLL (both terms) is multiplied by capped_weight(c0, sigma_t^2, cap). With `mean_loss`
        lambda > 0, lambda times Algorithm 1's loss |eps - eps_bar|^2 on the mixture's mean
        x0_bar = sum_k pi_k x0_hat_k is added: the exact posterior's mean is what that loss
        minimises, so it leaves the exact mixture optimal, and it pulls every component that pi
        keeps towards the data at steps where the posterior has one mode."""
        B = x0.shape[0]
        t = torch.randint(0, self.T, (B,), device=x0.device)
        eps = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, eps)
        x0_k, log_pi, var_logits = self.mixture(model, x_t, t)
        abar, beta, c0, bt, s2 = self.step_terms(t)
        w = capped_weight(c0, s2, self.cap) if self.cap else 1.0              # (B,): the step's weight
        d = (x0_k - x0[:, None].double()).flatten(2)                         # (B, K, D)
        xi = torch.randn(B, 1, d.shape[2], device=x0.device, dtype=d.dtype)
        dd, dxi = d.pow(2).sum(2), (d * xi).sum(2)                           # |d_k|^2 and d_k.xi, (B, K)
        c0, beta, bt, s2 = (a.view(B, 1) for a in (c0, beta, bt, s2))
        cross = dxi - dxi.mean(1, keepdim=True)                              # (d_k - mean_k d).xi
        nll = -tau * torch.logsumexp((log_pi - (c0**2 * dd - 2 * c0 * bt.sqrt() * cross) / (2 * s2)) / tau, 1)
        if var_logits is not None:    # the variances' own term: |x_{t-1} - mu_k|^2 with d held fixed
            log_s2 = torch.lerp(s2.log(), beta.log(), torch.sigmoid(var_logits.double()))
            r2 = bt * xi.pow(2).sum(2) - 2 * c0 * bt.sqrt() * dxi.detach() + c0**2 * dd.detach()
            nll = nll - torch.logsumexp(log_pi.detach() - r2 / (2 * log_s2.exp()) - 0.5 * d.shape[2] * log_s2, 1)
        loss = (w * nll).mean() / d.shape[2]
        if self.mean_loss:   # Algorithm 1's loss (line 9) on the mixture's mean prediction
            x0_bar = self.mixture_mean(x0_k, log_pi)
            ab = abar.view(B, *[1] * (x0.dim() - 1))
            eps_bar = (x_t - ab.sqrt() * x0_bar) / (1 - ab).sqrt()
            loss = loss + self.mean_loss * (eps - eps_bar).pow(2).mean()
        return loss.float()

    @torch.no_grad()
    def split_blends(self, model, x0, optimizer=None):
        """The split move of split-and-merge EM (Ueda et al. 2000) against the local optimum that
        annealing can leave: a component on several modes of q(x_{t-1} | x_t) (a blend) while
        another is worth little. x0's examples are noised to every step t and each goes to its most
        responsible component, argmax_k log pi_k - |r_k|^2 with r_k = c0 (x0_hat_k - x_0) /
        sqrt(2 sigma_t^2) (|r_k|^2: the loss's energy without the xi term).
          cost_k  what component k is worth: the nats its examples lose if they go to their
                  runner-up instead, summed over the steps (0 for one that wins nothing).
          gain_k  what splitting it can win: at every step, the energy of its examples' centred
                  residuals r_k along their first principal direction (what two components, one
                  on either side, would remove), less twice what noise puts there (the top
                  eigenvalue of a Wishart matrix: (sqrt(n) + sqrt(D))^2 / (n D) of the total).
        In order of gain, a component whose gain exceeds the cost of the cheapest other one is
        copied into it (CategoricalUNet.copy_component); each component takes part in one pair
        per call. Returns the (src, dst) pairs."""
        B, T = x0.shape[0], self.T
        t = torch.arange(T, device=x0.device).repeat_interleave(B)
        x0 = x0.repeat(T, *[1] * (x0.dim() - 1))
        x_t = self.q_sample(x0, t, torch.randn_like(x0))
        x0_k, log_pi, _ = self.mixture(model, x_t, t)
        K = x0_k.shape[1]
        if K < 2:
            return []
        _, _, c0, _, s2 = self.step_terms(t)
        r = (x0_k - x0[:, None].double()).flatten(2) * (c0 / (2 * s2).sqrt()).view(-1, 1, 1)   # (T B, K, D)
        top = (log_pi - r.pow(2).sum(2)).topk(2, 1)
        k = top.indices[:, 0]                                                                  # the winners
        cost = torch.zeros(K, dtype=r.dtype, device=r.device).index_add_(0, k, top.values[:, 0] - top.values[:, 1])
        gain = torch.zeros_like(cost)
        r, k = r.view(T, B, K, -1), k.view(T, B)
        for s in range(T):
            for c in k[s].unique().tolist():
                R = r[s, k[s] == c, c]                      # component c's examples at step s, (n, D)
                R = R - R.mean(0)
                n, D = R.shape
                noise = R.pow(2).sum() * (math.sqrt(n) + math.sqrt(D)) ** 2 / (n * D)
                gain[c] += (torch.linalg.matrix_norm(R, 2) ** 2 - 2 * noise).clamp_min(0)
        pairs, used, cheapest = [], set(), cost.argsort(stable=True).tolist()
        for src in gain.argsort(descending=True, stable=True).tolist():
            free = [c for c in cheapest if c not in used and c != src]
            if src in used or not free or gain[src] <= cost[free[0]]:
                continue
            model.copy_component(src, free[0], optimizer)
            used |= {src, free[0]}
            pairs.append((src, free[0]))
        return pairs

    @torch.no_grad()
    def sample(self, model, shape, steps=None, var="small", generator=None, x_T=None, update=None):
        """Ancestral sampling: at every step k ~ pi(x_t), then Alg. 2 line 7 with eps_hat from
        x0_hat_k and sigma_t^2 from `var`, or the component's own learned variance (added at every
        step, the last one included, unless `update` replaces the step, e.g. smd.ddim_update).
        With `draw_snr`, a component is drawn only at steps whose x_t has abar_t / (1 - abar_t) <=
        draw_snr; at the less noisy steps x0_hat is the mixture's mean sum_k pi_k x0_hat_k (and a
        learned variance the pi-weighted mean of the components'): there x_t pins down one mode, and
        what the components' predictions still differ by is their own error, which drawing one
        adds to the sample and averaging cancels."""
        x = x_T if x_T is not None else torch.randn(shape, device=self.betas.device, generator=generator)
        u = torch.zeros(x.shape[0], 1, device=x.device, dtype=x.dtype)   # K = 1: no choice to draw
        rows = torch.arange(x.shape[0], device=x.device)
        beta_tilde = None
        for t, abar, abar_prev in self.step_coefficients(steps):
            noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            x0_k, log_pi, var_logits = self.mixture(model, x, torch.full((x.shape[0],), t, device=x.device,
                                                                         dtype=torch.long))
            if self.draw_snr is None or abar / (1 - abar) <= self.draw_snr:   # draw k ~ pi (inverse CDF)
                if x0_k.shape[1] > 1:
                    torch.rand(u.shape, generator=generator, out=u)
                k, mean_step = (log_pi.float().exp().cumsum(1) < u).sum(1).clamp(max=x0_k.shape[1] - 1), False
                x0 = x0_k[rows, k].to(x.dtype)
            else:                                                              # x0_bar = sum_k pi_k x0_hat_k
                mean_step = True
                x0 = self.mixture_mean(x0_k, log_pi).to(x.dtype)
            eps_hat = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
            if update is not None:
                x = update(x, eps_hat, noise, abar, abar_prev)
                continue
            alpha = abar / abar_prev
            mean = (x - (1 - alpha) / math.sqrt(1 - abar) * eps_hat) / math.sqrt(alpha)   # Alg. 2 line 7's mean
            if var_logits is None:                                                         # ... + sigma_t eps
                s2 = 1 - alpha if var == "large" else posterior(abar, abar_prev)[2]
                x = mean + math.sqrt(s2) * noise if abar_prev < 1 else mean
                continue
            beta_tilde = posterior(abar, abar_prev)[2] if abar_prev < 1 else beta_tilde   # last step: the one before's
            f = torch.sigmoid(var_logits.to(x.dtype))
            f = (log_pi.exp().to(x.dtype) * f).sum(1) if mean_step else f[rows, k]
            log_s2 = math.log(beta_tilde) + f * (math.log(1 - alpha) - math.log(beta_tilde))
            x = mean + (0.5 * log_s2).exp().view(-1, *[1] * (x.dim() - 1)) * noise
        return x.clamp(-1, 1)


class AnnealedDiffusion(CategoricalDiffusion):
    """CategoricalDiffusion whose loss anneals the responsibilities' temperature over training,
    tau0 -> 1 (`temperature`): it counts its own calls, one per training step, from `step`."""

    def __init__(self, T=1000, schedule="linear", objective="eps", tau0=1.0, total=1, step=0, **kw):
        super().__init__(T, schedule, objective, **kw)
        self.tau0, self.total, self.step = tau0, total, step

    def loss(self, model, x0, eta_samples=1):   # eta_samples: train.py's argument, always 1 here
        self.step += 1
        return super().loss(model, x0, tau=temperature(self.step - 1, self.total, self.tau0))


TEMPERATURE = cli.float_at_least(1.0, "a starting temperature; 1: no annealing")   # --anneal's type


def add_flags(p):
    """The categorical model's training options, as templates and fashion take them."""
    p.add_argument("--anneal", type=TEMPERATURE, default=1e6,
                   help="categorical: responsibilities' temperature from this to 1 over the first half (1: off)")
    p.add_argument("--nll-cap", type=cli.positive_float, default=None,
                   help="categorical: cap each step's NLL weight on |x0_hat - x0|^2 (categorical.capped_weight)")
    p.add_argument("--mean-loss", type=cli.nonneg_float, default=0.0,
                   help="categorical: + this x Algorithm 1's eps loss on the mixture's mean (sum_k pi_k x0_k)")
    p.add_argument("--fixed-var", action="store_true",
                   help="categorical: variances fixed at beta_tilde instead of learned")
    p.add_argument("--fit-pi", action="store_true",
                   help="categorical: pi also weighs each component by N(eps_hat_k; 0, I), its own fit to x_t")
    p.add_argument("--draw-snr", type=cli.nonneg_float, default=None,
                   help="categorical sampling: draw a component only where x_t's SNR abar/(1-abar) <= this, "
                        "else the mixture's mean (default: at every step)")
    p.add_argument("--split", action="store_true",
                   help="categorical: after annealing, blends are copied into the least used components (split_blends)")


def make_diffusion(cfg, T, objective, args):
    """templates' and fashion's chain of T steps for a model config: a CategoricalDiffusion with
    the categorical flags (add_flags) for a CategoricalConfig, else smd's."""
    if isinstance(cfg, CategoricalConfig):
        return CategoricalDiffusion(T, objective=objective, cap=args.nll_cap, mean_loss=args.mean_loss,
                                    fit_pi=args.fit_pi, draw_snr=args.draw_snr)
    return Diffusion(T, objective=objective)


def train_loop(model, diffusion, draw, args, label="", before_step=None):
    """templates' and fashion's training, the same for every model: machinery.loop (Algorithm 1,
    grad clip 1, AdamW, a 5% linear warm-up, cosine decay) on args.batch_size examples
    draw(n, generator) a step from a generator seeded args.seed (the same batches for every
    model); a categorical model's responsibilities annealed (`temperature`, args.anneal) and,
    with args.split, its blends split (`split_if_due`, on examples from a second generator);
    before_step(step, optimizer), if given, first. Returns (mean loss of the last 10% of steps,
    ms per step)."""
    batches, splits = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    tau = lambda step: {"tau": temperature(step, args.max_steps, args.anneal)}
    anneal = isinstance(diffusion, CategoricalDiffusion)

    def hooks(step, opt):
        if before_step:
            before_step(step, opt)
        if args.split:
            split_if_due(model, diffusion, opt, step, args.max_steps, lambda n: draw(n, splits), f"{label}: ")
    return small_loop(model, diffusion, lambda: draw(args.batch_size, batches), args.max_steps, args.lr,
                      warmup=args.max_steps // 20, before_step=hooks, label=f"{label}: ",
                      loss_args=tau if anneal else lambda step: {})


def split_if_due(model, diffusion, optimizer, step, total, draw, label="", frac=0.5):
    """--split in a training loop: every total/20 steps from the end of annealing (`frac`, as
    `temperature`) until 80% of training, CategoricalDiffusion.split_blends on draw(512) fresh
    examples, each split printed; nothing for a model that is not categorical."""
    if isinstance(diffusion, CategoricalDiffusion) and frac * total <= step < 0.8 * total \
            and step % max(1, total // 20) == 0:
        for src, dst in diffusion.split_blends(model, draw(512), optimizer):
            print(f"  {label}step {step}: component {dst} <- a copy of {src}", flush=True)


if __name__ == "__main__":
    from unet import n_params
    cli.Parser(__doc__, prog="python -m beyond.categorical").parse_args()   # --help, and no other argument
    vanilla, cat = n_params(UNet(UNetConfig())), n_params(CategoricalUNet(CategoricalConfig(components=10)))
    print(f"UNet, categorical mixture of 10 components (beyond.train --components 10): {cat:,} parameters "
          f"(+{100 * (cat / vanilla - 1):.1f}% vs DDPM's {vanilla:,})")
