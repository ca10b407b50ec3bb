"""The discrete 1000-step DDPM noise schedule SD was trained on (Ho et al. 2020), as continuous sigmas."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from sumie.errors import ConfigError

BetaSchedule = Literal["scaled_linear", "linear"]
# How a sigma becomes the network's timestep: k-diffusion's log interpolation, or diffusers' variants of it.
TimestepMode = Literal["log", "linear", "round", "floor"]


def make_betas(
    kind: BetaSchedule = "scaled_linear", steps: int = 1000, start: float = 0.00085, end: float = 0.012
) -> Tensor:
    """Betas [steps] in float64: ``scaled_linear`` (linear in sqrt(beta), SD's) or ``linear``."""
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    if kind == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float64)
    raise ConfigError(f"unknown beta schedule {kind!r}; use scaled_linear or linear")


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2023, Alg. 1)."""
    s = alphas_cumprod.double().sqrt()
    s0, s_last = s[0].clone(), s[-1].clone()
    s = (s - s_last) * s0 / (s0 - s_last)
    return (s**2).to(alphas_cumprod.dtype)


# A zero-SNR schedule has an infinite last sigma; A1111 and ComfyUI clamp alpha_bar there to this value.
ZSNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08


class DiscreteSigmas:
    """Map between discrete training timesteps t in [0, 999] and sigma = sqrt((1 - a_bar) / a_bar)."""

    def __init__(self, alphas_cumprod: Tensor, quantize: bool = False) -> None:
        self.alphas_cumprod = alphas_cumprod
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # [T], increasing
        self.log_sigmas = self.sigmas.log()
        self.quantize = quantize

    @classmethod
    def from_betas(
        cls,
        kind: BetaSchedule = "scaled_linear",
        start: float = 0.00085,
        end: float = 0.012,
        steps: int = 1000,
        zero_terminal_snr: bool = False,
        quantize: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> DiscreteSigmas:
        """SD's schedule by default; ``dtype`` float32 matches A1111/k-diffusion, float64 for exact tests."""
        betas = make_betas(kind, steps, start, end)
        ac = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:
            ac = rescale_zero_terminal_snr(ac)
            ac[-1] = ZSNR_LAST_ALPHA_CUMPROD
        return cls(ac.to(dtype), quantize=quantize)

    @property
    def sigma_min(self) -> Tensor:
        """Smallest trained sigma (t = 0)."""
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Tensor:
        """Largest trained sigma (t = T - 1)."""
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: Tensor, quantize: bool | None = None, *, mode: TimestepMode = "log") -> Tensor:
        """Continuous timestep by linear interpolation in log sigma (k-diffusion), or the nearest one if quantized.

        ``mode`` picks diffusers' variants (``quantize`` still wins when true): ``linear`` inverts the piecewise
        linear sigma(t) diffusers' Euler-family schedulers interpolate with (np.interp), so their fractional
        timesteps come back exactly; ``round`` / ``floor`` round the log-interpolated t half-to-even / down, as
        DPMSolver's Karras (and KDPM2's) / exponential and beta timesteps are.
        """
        quantize = self.quantize if quantize is None else quantize
        if mode not in ("log", "linear", "round", "floor"):
            raise ConfigError(f"unknown timestep mode {mode!r}; use log, linear, round or floor")
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.to(log_sigmas.dtype).log()
        dists = log_sigma - log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.dtype)
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        if mode == "linear":
            table = self.sigmas.to(sigma.device)
            lo, hi = table[low], table[low + 1]
            w = ((sigma.to(table.dtype) - lo) / (hi - lo)).clamp(0, 1)
        else:
            lo, hi = log_sigmas[low], log_sigmas[low + 1]
            w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        t = (1 - w) * low + w * (low + 1)
        if mode == "round":
            t = t.round()
        elif mode == "floor":
            t = t.floor()
        return t.view(sigma.shape).to(sigma.dtype)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at a (fractional) timestep, interpolating log sigma."""
        log_sigmas = self.log_sigmas.to(t.device)
        t = t.to(log_sigmas.dtype)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
