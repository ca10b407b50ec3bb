"""Training losses: the DDPM forward process with eps / v targets and min-SNR weighting, and the KL-VAE loss.

Diffusion (Ho et al. 2020; v-prediction Salimans & Ho 2022): t ~ U{0..T-1}, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
with SD's alphas_cumprod (:meth:`sumie.sampling.discretization.DiscreteSigmas.from_betas`); the UNet predicts eps
or v = sqrt(a_t) eps - sqrt(1 - a_t) x0; min-SNR-gamma (Hang et al. 2023) weights each sample by
min(SNR, gamma) / SNR (eps) or min(SNR, gamma) / (SNR + 1) (v); ``foreground_weight`` multiplies the squared error
of latent pixels covered by the subject's mask (kohya-ss's masked loss gives the background weight 0; here it keeps
weight 1, so the model still learns backgrounds).

VAE (Kingma & Welling 2014; LDM's ``LPIPSWithDiscriminator`` without the weights-needing terms): per-pixel L1 or L2
reconstruction + ``kl_weight`` * KL(q(z|x) || N(0, I)) summed over latents and divided by the image's values, so
``kl_weight`` means what LDM's 1e-6 means on its sums; optional L1 terms on image gradients (edges) and on
2x/4x/8x average-pooled images (multi-scale), which need no downloaded network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sumie.models.vae import DiagonalGaussian
from sumie.sampling.discretization import DiscreteSigmas

__all__ = ["NoiseSchedule", "diffusion_loss", "foreground_weights", "min_snr_weights", "timestep_weights", "vae_loss"]


class NoiseSchedule:
    """The discrete forward process q(x_t | x0) of SD: ``alphas_cumprod`` [T] (float64 for exact sqrt)."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        self.alphas_cumprod = alphas_cumprod.double()
        self.num_steps = int(alphas_cumprod.shape[0])

    @classmethod
    def sd(cls, zero_terminal_snr: bool = False) -> NoiseSchedule:
        """SD's scaled-linear betas (0.00085 .. 0.012, 1000 steps)."""
        return cls(DiscreteSigmas.from_betas(zero_terminal_snr=zero_terminal_snr, dtype=torch.float64).alphas_cumprod)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         weights: Tensor | None = None) -> Tensor:
        """t ~ U{0, ..., T-1}, or drawn in proportion to ``weights`` [T] (:func:`timestep_weights`): LongTensor [B]."""
        if weights is None:
            return torch.randint(0, self.num_steps, (batch,), generator=generator)
        return torch.multinomial(weights, batch, replacement=True, generator=generator)

    def _coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        a = self.alphas_cumprod[t.cpu()]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (a.sqrt().to(like).view(shape), (1 - a).sqrt().to(like).view(shape))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps: [B, C, H, W]."""
        sa, sb = self._coefs(t, x0)
        return sa * x0 + sb * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction: str) -> Tensor:
        """What the network should output: eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) x0."""
        if prediction == "eps":
            return noise
        if prediction == "v":
            sa, sb = self._coefs(t, x0)
            return sa * noise - sb * x0
        raise ValueError(f"unknown prediction {prediction!r}; use eps or v")

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio a_t / (1 - a_t): [B] float32."""
        a = self.alphas_cumprod[t.cpu()]
        return (a / (1 - a)).float().to(t.device)


def timestep_weights(num_steps: int, strategy: str, portion: float = 0.25, multiplier: float = 1.0,
                     begin: int = 0, end: int = 1000) -> Tensor | None:
    """Sampling weights [T] that favour some timesteps (diffusers' ``timestep_bias_strategy``), None for uniform.

    "later" multiplies the weight of the last ``portion`` of the timesteps (the noisiest, where the layout is
    decided) by ``multiplier``, "earlier" the first ``portion``, "range" timesteps ``begin`` <= t < ``end``.
    """
    if strategy == "none":
        return None
    weights = torch.ones(num_steps, dtype=torch.float64)
    n = int(portion * num_steps)
    chosen = {"later": slice(num_steps - n, None), "earlier": slice(0, n), "range": slice(begin, end)}
    if strategy not in chosen:
        raise ValueError(f"unknown timestep bias strategy {strategy!r}; use none, earlier, later or range")
    weights[chosen[strategy]] *= multiplier
    return weights


def min_snr_weights(snr: Tensor, gamma: float, prediction: str) -> Tensor:
    """Min-SNR-gamma loss weights [B] for an eps or v objective (Hang et al. 2023, eq. 13; diffusers' form)."""
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction == "eps" else clipped / (snr + 1)


def foreground_weights(mask: Tensor, weight: float) -> Tensor:
    """Per-pixel loss weights 1 + (weight - 1) * mask: mask [B, 1, h, w] in [0, 1] at latent size -> same shape."""
    return 1.0 + (weight - 1.0) * mask.float()


def diffusion_loss(pred: Tensor, target: Tensor, weights: Tensor | None = None,
                   pixel_weights: Tensor | None = None) -> Tensor:
    """Mean over the batch of per-sample MSE, weighted per sample ([B]) and per pixel ([B, 1, h, w]), in float32."""
    err = (pred.float() - target.float()).pow(2)
    if pixel_weights is not None:
        err = err * pixel_weights.to(err)
    per = err.mean(dim=tuple(range(1, pred.ndim)))
    if weights is not None:
        per = per * weights.to(per)
    return per.mean()


def _l(a: Tensor, b: Tensor, kind: str) -> Tensor:
    return (a - b).abs().mean() if kind == "l1" else (a - b).pow(2).mean()


def vae_loss(x: Tensor, recon: Tensor, posterior: DiagonalGaussian, *, kl_weight: float = 1e-6,
             recon_kind: str = "l1", edge_weight: float = 0.0, multiscale_weight: float = 0.0,
             ) -> tuple[Tensor, dict[str, float]]:
    """x, recon [B, 3, H, W] in [-1, 1]; returns (total loss, {"rec", "kl", "edge", "ms"} as floats)."""
    x, recon = x.float(), recon.float()
    rec = _l(recon, x, recon_kind)
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    kl_sum = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum()
    kl = kl_sum / x.numel()
    total = rec + kl_weight * kl
    parts = {"rec": float(rec.detach()), "kl": float(kl.detach())}
    if edge_weight > 0:
        edge = (_l(recon.diff(dim=-1), x.diff(dim=-1), "l1") + _l(recon.diff(dim=-2), x.diff(dim=-2), "l1")) / 2
        total = total + edge_weight * edge
        parts["edge"] = float(edge.detach())
    if multiscale_weight > 0:
        terms = [_l(F.avg_pool2d(recon, k), F.avg_pool2d(x, k), "l1") for k in (2, 4, 8) if min(x.shape[-2:]) >= k]
        if terms:
            ms = torch.stack(terms).mean()
            total = total + multiscale_weight * ms
            parts["ms"] = float(ms.detach())
    return total, parts
