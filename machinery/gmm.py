"""
machinery/gmm.py -- a mixture of equal-weight isotropic Gaussians, and everything the diffusion process
does to it in closed form: the density q(x_t), the best Gaussian denoiser eps* = E[eps | x_t]
(what a perfectly trained vanilla DDPM computes: the bottleneck of Sec. 3.1) and the true
posterior q(x_{t-1} | x_t), again a Gaussian mixture (Proposition 3.1, Eq. 29), which sampled
step by step is exact mixture denoising (what Theorem 4.1 says SMD can reach). toy.py (the
7x7 grid in 2-D) and templates.py (template images in 256-D) score models against these.

    python -c "import torch; from machinery import gmm; g = gmm.GaussianMixture(torch.eye(2), 0.1); print(g.sample(3))"
"""

import math

import torch


class GaussianMixture:
    """q(x_0) = (1/K) sum_k N(mu_k, std^2 I) in D dimensions; all math in float64."""

    def __init__(self, means, std):
        self.means, self.std = torch.as_tensor(means, dtype=torch.float64), float(std)

    def sample(self, n, generator=None):
        """x_0 ~ q(x_0)."""
        k = torch.randint(0, len(self.means), (n,), generator=generator)
        return self.means[k] + self.std * torch.randn(n, self.means.shape[1], dtype=torch.float64, generator=generator)

    def component_logits(self, x_t, abar):
        """log w_k N(x_t; sqrt(abar) mu_k, v I) with v = 1 - abar + abar std^2: the components of
        q(x_t) (Eq. 26) and, normalised, the posterior weights w'_k of Eq. (29). abar: float or (B,)."""
        abar = torch.as_tensor(abar, dtype=torch.float64).reshape(-1, 1)
        v, m, x = 1 - abar + abar * self.std**2, self.means, x_t.double()
        d2 = x.pow(2).sum(1, keepdim=True) - 2 * abar.sqrt() * (x @ m.T) + abar * m.pow(2).sum(1)
        return -d2 / (2 * v) - 0.5 * m.shape[1] * torch.log(2 * math.pi * v) - math.log(len(m))

    def log_prob(self, x, abar=1.0):
        """log q(x_t) in nats; abar = 1 is the data density."""
        return self.component_logits(x, abar).logsumexp(1)

    def best_eps(self, x_t, abar):
        """eps* = E[eps | x_t] = -sqrt(1 - abar) grad log q(x_t) (Tweedie): the minimiser of Eq. (5).
        grad log q = sum_k w'_k (sqrt(abar) mu_k - x_t) / v."""
        abar = torch.as_tensor(abar, dtype=torch.float64).reshape(-1, 1)
        v = 1 - abar + abar * self.std**2
        r = self.component_logits(x_t, abar.flatten()).softmax(1)             # w'_k, Eq. (29)
        grad = (r @ self.means * abar.sqrt() - x_t.double()) / v
        return -(1 - abar).sqrt() * grad

    def best_gaussian_model(self, diffusion):
        """eps* as a model(x_t, t, eta=None) for Diffusion.sample (x_t flattened to (B, D))."""
        def model(x, t, eta=None):
            return self.best_eps(x.flatten(1), diffusion.alphas_cumprod[t]).to(x.dtype).view(x.shape)
        return model

    def posterior(self, x_t, abar, abar_prev):
        """Eq. (29) for Sigma_k = std^2 I and one (possibly respaced) step abar -> abar_prev:
        q(x_prev | x_t) = sum_k w'_k N(a x_t + b mu_k, s'^2 I) with alpha = abar / abar_prev,
        Lambda = (alpha - abar + abar std^2) / (1 - alpha), a = Lambda / (1 + Lambda) / sqrt(alpha),
        b = sqrt(abar_prev) / (1 + Lambda), s'^2 = (1 - alpha) / alpha * Lambda / (1 + Lambda).
        Returns (w' (B, K), a, b, s'^2)."""
        alpha = abar / abar_prev
        lam = (alpha - abar + abar * self.std**2) / (1 - alpha)
        w = self.component_logits(x_t, abar).softmax(1)
        return (w, lam / (1 + lam) / math.sqrt(alpha), math.sqrt(abar_prev) / (1 + lam),
                (1 - alpha) / alpha * lam / (1 + lam))

    @torch.no_grad()
    def sample_exact(self, diffusion, n, steps=None, generator=None):
        """Exact mixture denoising: x_T ~ N(0, I), then x_{t-1} ~ q(x_{t-1} | x_t) (Eq. 29) along
        the respaced chain: k ~ w'(x_t), x_{t-1} ~ N(a x_t + b mu_k, s'^2 I). The last step
        (abar_prev = 1) samples x_0 from q(x_0 | x_t) itself."""
        x = torch.randn(n, self.means.shape[1], dtype=torch.float64, generator=generator)
        for _, abar, abar_prev in diffusion.step_coefficients(steps):
            w, a, b, var = self.posterior(x, abar, abar_prev)
            u = torch.rand(n, 1, dtype=torch.float64, generator=generator)
            k = (w.cumsum(1) < u).sum(1).clamp(max=len(self.means) - 1)     # inverse-CDF draw of k
            noise = torch.randn(x.shape, dtype=torch.float64, generator=generator)
            x = a * x + b * self.means[k] + math.sqrt(var) * noise
        return x
