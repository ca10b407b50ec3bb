"""Seeds, variation seeds and the per-image noise of a request, exactly as AUTOMATIC1111 1.10 draws them.

A1111 (``modules/processing.py`` ``process_images_inner``, ``modules/rng.py`` ``ImageRNG``) with the RNG source "CPU":

* a seed of -1 becomes ``random.randrange(4294967294)`` (:func:`fixed_seed`); image k of the request (batch j,
  position i, k = j * batch_size + i) gets ``seed + k`` and variation seed ``subseed + k``; with a variation
  strength other than 0 every image keeps ``seed`` and only the variation seed counts up (:func:`all_seeds`);
* each image has its own CPU generator seeded with its seed. The first draw ``randn((4, H/8, W/8))`` is the initial
  noise; with a variation seed it is ``slerp(strength, noise, randn(subseed))`` where the variation noise comes from
  a fresh generator, so the image's own generator has advanced by exactly one draw either way and the later draws
  (ancestral samplers' noise) do not depend on the variation seed (:class:`VariationRNG`);
* "Eta noise seed delta" (ENSD, e.g. NovelAI's 31337): after the first draw the generators restart from
  ``seed + delta``.

:func:`slerp` keeps A1111's quirks: it normalises over dimension 1 of a single image's [C, H, W] noise (per channel
and column), and where the mean cosine exceeds 0.9995 it returns ``low * val + high * (1 - val)`` (the weights the
other way round from the spherical branch).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor

from sumie.errors import ConfigError
from sumie.sampling.noise import ImageRNG

MAX_SEED = 4294967294  # A1111: random.randrange(4294967294)


def fixed_seed(seed: int | None, rng: random.Random | None = None) -> int:
    """A concrete seed: -1 or None -> a random one in [0, 4294967294) (A1111 ``get_fixed_seed``), else the seed."""
    if seed is None or int(seed) == -1:
        return int((rng or random.SystemRandom()).randrange(MAX_SEED))
    seed = int(seed)
    if seed < 0:
        raise ConfigError(f"seed must be -1 (random) or >= 0, got {seed}")
    return seed


def all_seeds(seed: int, subseed: int, count: int, subseed_strength: float) -> tuple[list[int], list[int]]:
    """(seeds, subseeds) of ``count`` images: seed + k unless a variation strength is set; subseed + k always."""
    seeds = [seed + (k if subseed_strength == 0 else 0) for k in range(count)]
    subseeds = [subseed + k for k in range(count)]
    return seeds, subseeds


def slerp(val: float, low: Tensor, high: Tensor) -> Tensor:
    """A1111's ``slerp`` of two single-image noises [C, H, W] (norms over dim 1), val 0 -> low, 1 -> high."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed))


class VariationRNG(ImageRNG):
    """:class:`ImageRNG` with A1111's variation seeds and eta noise seed delta (see the module docstring).

    ``first()`` is the initial noise [B, *shape]; each later call (``rng()`` / ``rng(sigma, sigma_next)``) the next
    white-noise draw of every image's generator, for ancestral samplers.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], subseeds: Sequence[int] | None = None,
                 subseed_strength: float = 0.0, eta_noise_seed_delta: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(seeds, shape, device=device, dtype=dtype)
        if not 0.0 <= subseed_strength <= 1.0:
            raise ConfigError(f"variation strength must be in [0, 1], got {subseed_strength}")
        self.seeds = [int(s) for s in seeds]
        self.subseeds = [int(s) for s in subseeds] if subseeds is not None else None
        self.subseed_strength = float(subseed_strength)
        self.eta_noise_seed_delta = int(eta_noise_seed_delta)

    def first(self) -> Tensor:
        """Initial noise [B, *shape]: each seed's first draw, slerped towards its variation seed's noise."""
        xs = []
        for i, g in enumerate(self.generators):
            noise = torch.randn(self.shape, generator=g, dtype=torch.float32)
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                sub = torch.randn(self.shape, generator=_generator(subseed), dtype=torch.float32)
                noise = slerp(self.subseed_strength, noise, sub)
            xs.append(noise)
        if self.eta_noise_seed_delta:
            self.generators = [_generator(s + self.eta_noise_seed_delta) for s in self.seeds]
        return torch.stack(xs).to(device=self.device, dtype=self.dtype)


__all__ = ["MAX_SEED", "VariationRNG", "all_seeds", "fixed_seed", "slerp"]
