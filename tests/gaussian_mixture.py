"""A Gaussian mixture with its exact denoiser and exact probability-flow map: a reference-free sampler oracle.

Data x0 ~ sum_k w_k N(mu_k, diag(v_k)); noisy x = x0 + sigma * n (k-diffusion's convention). Then
x ~ sum_k w_k N(mu_k, diag(v_k + sigma^2)), and the posterior mean (the ideal denoiser) is

    E[x0 | x] = sum_k r_k(x) (mu_k + v_k / (v_k + sigma^2) (x - mu_k)),  r_k(x) ~ w_k N(x; mu_k, v_k + sigma^2),

responsibilities times the component-wise Wiener filter. Everything is float64. :meth:`GaussianMixture.flow`
integrates the probability-flow ODE dx/dlog(sigma) = x - E[x0 | x] with many RK4 steps: from sigma to 0 it is the
ideal consistency function (what an LCM network approximates). Nothing here uses Sumie's samplers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _sigma_col(sigma: Tensor | float, n: int) -> Tensor:
    """sigma (scalar or [n]) -> [n, 1] float64."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return s.reshape(-1, 1).expand(n, 1) if s.numel() == 1 else s.reshape(n, 1)


@dataclass(frozen=True)
class GaussianMixture:
    """weights [K], means [K, d], variances [K, d] (diagonal covariances), all float64."""

    weights: Tensor
    means: Tensor
    variances: Tensor

    @classmethod
    def default(cls) -> GaussianMixture:
        """3 components in 3 dimensions, SD-latent scale: unequal weights (0.5/0.3/0.2), one isotropic (std 0.6),
        one diagonal (std 0.45-0.71), one narrower isotropic (std 0.5); means 3.5-4.6 apart."""
        return cls(
            torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
            torch.tensor([[-2.0, 0.5, 0.0], [1.5, 1.5, -1.0], [0.5, -2.0, 1.5]], dtype=torch.float64),
            torch.tensor([[0.36, 0.36, 0.36], [0.5, 0.2, 0.35], [0.25, 0.25, 0.25]], dtype=torch.float64),
        )

    @property
    def dim(self) -> int:
        """Dimension d."""
        return self.means.shape[1]

    def mean(self) -> Tensor:
        """Mixture mean [d]."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Mixture covariance [d, d]."""
        mu = self.mean()
        second = sum(w * (torch.diag(v) + torch.outer(m, m))
                     for w, m, v in zip(self.weights, self.means, self.variances, strict=True))
        return second - torch.outer(mu, mu)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x0 [n, d], component labels [n]) drawn exactly."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[labels] + self.variances[labels].sqrt() * z, labels

    def _uniform_sigma(self, sigma: Tensor | float) -> float | None:
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        return float(s[0]) if bool((s == s[0]).all()) else None

    def _log_joint_t(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """log w_k + log N(x; mu_k, v_k + sigma^2), transposed [K, n] (reductions over K stay fast)."""
        s = self._uniform_sigma(sigma)
        if s is not None:  # one sigma for all rows: the quadratic form as matmuls
            inv = 1 / (self.variances + s * s)  # [K, d]
            quad = inv @ (x * x).T - 2 * (self.means * inv) @ x.T + (self.means**2 * inv).sum(-1, keepdim=True)
            logdet = -inv.log().sum(-1, keepdim=True)
        else:
            var = self.variances[:, None, :] + _sigma_col(sigma, x.shape[0])[None] ** 2  # [K, n, d]
            quad = ((x[None] - self.means[:, None, :]) ** 2 / var).sum(-1)
            logdet = var.log().sum(-1)
        return self.weights.log()[:, None] - 0.5 * (quad + logdet + self.dim * math.log(2 * math.pi))

    def log_joint(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """log w_k + log N(x; mu_k, v_k + sigma^2) for each component [n, K]."""
        return self._log_joint_t(x.to(torch.float64), sigma).T

    def _resp_t(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        lj = self._log_joint_t(x, sigma)
        r = (lj - lj.max(0, keepdim=True).values).exp()
        return r / r.sum(0, keepdim=True)

    def responsibilities(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Posterior component probabilities r_k(x) at noise level sigma [n, K]."""
        return self._resp_t(x.to(torch.float64), sigma).T

    def denoise(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """The exact denoiser E[x0 | x_sigma = x] [n, d]; x [n, d] (any float dtype), sigma scalar or [n]."""
        xd = x.to(torch.float64)
        rt = self._resp_t(xd, sigma)  # [K, n]
        s = self._uniform_sigma(sigma)
        if s is not None:  # sum_k r_k (mu_k (1 - g_k) + g_k x) with the Wiener gains g = v / (v + sigma^2)
            gain = self.variances / (self.variances + s * s)
            out = rt.T @ (self.means * (1 - gain)) + xd * (rt.T @ gain)
        else:
            s2 = _sigma_col(sigma, x.shape[0])[None] ** 2
            gain = self.variances[:, None, :] / (self.variances[:, None, :] + s2)  # [K, n, d]
            out = (rt[:, :, None] * (self.means[:, None, :] + gain * (xd[None] - self.means[:, None, :]))).sum(0)
        return out.to(x.dtype)

    def assign(self, x: Tensor) -> Tensor:
        """Most probable component of each clean sample [n]."""
        return self.log_joint(x.to(torch.float64), 0.0).argmax(-1)

    def flow(self, x: Tensor, sigma: Tensor | float, sigma_to: float = 1e-3, steps: int = 64) -> Tensor:
        """Probability-flow ODE from sigma down to ``sigma_to`` (RK4 in log sigma), then one exact denoise: the
        ideal consistency function f(x, sigma) ~ x(0) (error far below 1e-6 for this mixture)."""
        y = x.to(torch.float64)
        u = _sigma_col(sigma, x.shape[0]).log()
        h = (math.log(sigma_to) - u) / steps

        def f(y: Tensor, u: Tensor) -> Tensor:
            return y - self.denoise(y, u.exp().reshape(-1))

        for _ in range(steps):
            k1 = f(y, u)
            k2 = f(y + h / 2 * k1, u + h / 2)
            k3 = f(y + h / 2 * k2, u + h / 2)
            k4 = f(y + h * k3, u + h)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            u = u + h
        return self.denoise(y, sigma_to).to(x.dtype)


class IsotropicMixture:
    """Exact E[x0 | x0 + sigma n = x] of an isotropic Gaussian mixture over the flattened image [B, ...].

    ``cast_sigma``: compute in x's dtype even when sigma comes in another (else torch's type promotion applies).
    """

    def __init__(self, dim: int, k: int = 3, seed: int = 0, cast_sigma: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(k, dim, generator=g, dtype=torch.float64)
        self.var = (0.2 + 0.5 * torch.rand(k, generator=g, dtype=torch.float64)) ** 2
        self.logw = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
        self.cast_sigma = cast_sigma

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        xf = x.reshape(x.shape[0], -1)
        mu, v, logw = (a.to(x.dtype) for a in (self.mu, self.var, self.logw))
        s = sigma.to(x.dtype) if self.cast_sigma else sigma
        var = v[None] + s[:, None] ** 2  # [B, K]
        diff = xf[:, None] - mu[None]  # [B, K, D]
        logp = logw - xf.shape[1] / 2 * var.log() - diff.pow(2).sum(-1) / (2 * var)
        x0k = mu[None] + (v[None] / var)[..., None] * diff
        return (torch.softmax(logp, -1)[..., None] * x0k).sum(1).reshape(x.shape)
