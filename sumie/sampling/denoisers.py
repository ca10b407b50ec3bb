"""Turn a noise-predicting network into ``denoise(x, sigma) -> x0`` (Karras et al. 2022, Table 1 scalings)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from sumie.sampling.discretization import DiscreteSigmas

# network(x_in [B,C,H,W], t [B], **cond) -> eps or v [B,C,H,W]; e.g. a UNetModel.
Network = Callable[..., Tensor]


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


class EpsDenoiser:
    """eps-prediction: x0 = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma))."""

    def __init__(self, network: Network, schedule: DiscreteSigmas) -> None:
        self.network = network
        self.schedule = schedule

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) for sigma [B]."""
        return sigma.new_ones(sigma.shape), -sigma, 1 / (sigma**2 + 1) ** 0.5

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """x [B,C,H,W] at noise level sigma [B] -> predicted clean x0 [B,C,H,W]."""
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in = (_bcast(c, x) for c in self.scalings(sigma))
        out = self.network(x * c_in, self.schedule.sigma_to_t(sigma), **cond)
        return x * c_skip + out.to(x.dtype) * c_out


class VDenoiser(EpsDenoiser):
    """v-prediction (Salimans & Ho 2022): x0 = x / (sigma^2 + 1) - sigma * v / sqrt(sigma^2 + 1)."""

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) for sigma [B]."""
        return 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5, 1 / (sigma**2 + 1) ** 0.5


def make_denoiser(prediction: str, network: Network, schedule: DiscreteSigmas) -> EpsDenoiser:
    """The denoiser for a model's prediction type (``eps`` or ``v``)."""
    return {"eps": EpsDenoiser, "v": VDenoiser}[prediction](network, schedule)
