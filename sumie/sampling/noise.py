"""Seeds and noise: one CPU generator per image (A1111's RNG), so results never depend on device or batch size."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import Tensor


class ImageRNG:
    """Per-image CPU generators: ``first()`` is the initial latent noise, each call afterwards the next draw.

    Image i of a batch uses ``seeds[i]``; its noise equals what the same seed gives alone (A1111's ImageRNG).
    Used as a ``noise_sampler(sigma, sigma_next)`` for ancestral samplers.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.shape = tuple(shape)
        self.device, self.dtype = torch.device(device), dtype
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def _draw(self) -> Tensor:
        noise = torch.stack([torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators])
        return noise.to(device=self.device, dtype=self.dtype)

    def first(self) -> Tensor:
        """Initial noise [B, *shape]."""
        return self._draw()

    def __call__(self, sigma: Tensor | float | None = None, sigma_next: Tensor | float | None = None) -> Tensor:
        """Next standard-normal draw [B, *shape] (the sigmas are ignored: the noise is white)."""
        return self._draw()


class BrownianNoise:
    """Brownian-tree noise for SDE samplers (k-diffusion's BrownianTreeNoiseSampler), one tree per image seed.

    Built on the CPU in float32, so the noise is the same on any device; ``noise(sigma, sigma_next)`` returns the
    normalised increment W(t1) - W(t0) / sqrt(|t1 - t0|) [B, *shape].
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], sigma_min: float, sigma_max: float,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        import torchsde

        self.device, self.dtype = torch.device(device), dtype
        t0, t1 = torch.tensor(float(sigma_min)), torch.tensor(float(sigma_max))
        # the ends the trees keep: float32, then rounded to the tree's tolerance (torchsde rounds to 1 / tol digits)
        tol = float(inspect.signature(torchsde.BrownianTree).parameters["tol"].default)
        digits = -int(math.log10(tol)) if tol > 0 else None
        self.t0, self.t1 = (float(t) if digits is None else round(float(t), digits) for t in (t0, t1))
        w0 = torch.zeros(tuple(shape), dtype=torch.float32)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(s)) for s in seeds]

    def __call__(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        """Normalised Brownian increment between two noise levels [B, *shape]."""
        a, b = float(sigma), float(sigma_next)
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        # a float64 sigma can lie a rounding error outside the float32 tree ends: torchsde would warn and clamp
        # (k-diffusion lets it); clamping here gives the same increment without touching the warning filters
        qlo = min(max(float(torch.tensor(lo)), self.t0), self.t1)
        qhi = min(max(float(torch.tensor(hi)), self.t0), self.t1)
        w = torch.stack([tree(qlo, qhi) for tree in self.trees]) * sign
        return (w / abs(hi - lo) ** 0.5).to(device=self.device, dtype=self.dtype)


def batch_noise(shape: Sequence[int], seed: int, batch_index: Sequence[int] | None = None) -> Tensor:
    """Initial noise of a whole batch from one CPU generator (ComfyUI ``comfy.sample.prepare_noise``) [B, ...].

    Image i of a batch continues the stream of image i - 1 (not seed + i, unlike :class:`ImageRNG`). With
    ``batch_index`` (a latent taken from a larger batch) one draw of shape [1, ...] is made per index up to the
    largest and each image gets the draw of its index, so a picked image keeps the noise it had in its batch.
    """
    gen = torch.Generator("cpu").manual_seed(int(seed))
    if batch_index is None:
        return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    one = (1, *tuple(shape)[1:])
    draws = [torch.randn(one, generator=gen, dtype=torch.float32) for _ in range(max(batch_index) + 1)]
    return torch.cat([draws[i] for i in batch_index])
