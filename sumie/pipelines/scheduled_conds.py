"""Prompt text -> the conditioning of every model call, as AUTOMATIC1111 1.10 schedules it.

A1111 (``processing.setup_conds``, ``prompt_parser.get_multicond_learned_conditioning``, ``CFGDenoiser``):

* comments and ``<lora:...>``-style tags are removed first (:func:`clean_prompt`);
* the positive prompt splits on ``AND`` into weighted sub-prompts; the negative prompt does not;
* each (sub-)prompt is scheduled (``[a:b:when]``, ``[a|b]``) over ``total_steps`` = the steps, doubled for the
  samplers A1111 marks second order (Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE, Restart: :func:`total_steps`),
  and all texts of one schedule are encoded in one call;
* the denoiser counts its calls (0, 1, 2, ...) and call k uses the first schedule entry whose end step is >= k
  (``reconstruct_cond_batch``), so ``[a:b:0.5]`` at 20 steps is ``a`` for calls 0-10 and ``b`` from call 11 on.

For the hires-fix pass the schedule follows A1111's ``hires_steps`` rule (see ``prompt_schedule``). SDXL-type
models (an ADM input) get the ADM vector per schedule entry: pooled text + embedded size/crop ids (base) or
size/crop/aesthetic score (refiner; 6.0 positive, 2.5 negative as A1111's defaults).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sumie.configs import ModelConfig
from sumie.errors import ConfigError
from sumie.models.unet import sdxl_adm_vector
from sumie.prompts.parser import ExtraNetwork, extract_extra_networks, prompt_schedule, split_and, strip_comments
from sumie.prompts.text_conditioning import TextConditioner

# A1111 1.10 samplers with "second_order": prompt schedules count two model calls per step.
SECOND_ORDER = frozenset({"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "restart"})
ADM_ID_DIM = 256  # each size/crop/score id is embedded in 256 sinusoidal features (sgm ``Timestep(256)``)
AESTHETIC_POSITIVE = 6.0  # A1111 "SDXL refiner high aesthetic score"
AESTHETIC_NEGATIVE = 2.5  # A1111 "SDXL refiner low aesthetic score"


def total_steps(sampler: str, steps: int) -> int:
    """Model calls A1111 plans prompt schedules for: ``2 * steps`` for second-order samplers, else ``steps``."""
    return steps * 2 if sampler in SECOND_ORDER else steps


def clean_prompt(text: str) -> tuple[str, list[ExtraNetwork]]:
    """Remove ``#`` comments and cut out ``<kind:name:...>`` tags: (prompt, tags)."""
    return extract_extra_networks(strip_comments(text))


@dataclass(frozen=True)
class SDXLSizes:
    """The size/crop conditioning of SDXL-type models, (height, width) pairs as sgm orders them."""

    original: tuple[int, int]
    crop: tuple[int, int] = (0, 0)
    target: tuple[int, int] | None = None

    def time_ids(self, n_ids: int, aesthetic: float) -> list[float]:
        """Base (6 ids): orig, crop, target; refiner (5 ids): orig, crop, aesthetic score."""
        base = [*self.original, *self.crop]
        if n_ids == 6:
            return [*base, *(self.target or self.original)]
        if n_ids == 5:
            return [*base, aesthetic]
        raise ConfigError(f"unsupported ADM input: {n_ids} embedded ids (expected 6 for SDXL, 5 for its refiner)")


@dataclass
class ScheduledCond:
    """One text over the model calls: entry k (``context[k]`` [L, D], ``y[k]`` [adm]) is used up to call ``ends[k]``."""

    ends: tuple[int, ...]
    texts: tuple[str, ...]
    context: Tensor  # [K, L, D]
    y: Tensor | None = None  # [K, adm] for SDXL-type models

    def index(self, call: int) -> int:
        """Entry for 0-based model call ``call``: the first whose end >= call, else 0 (A1111)."""
        for k, end in enumerate(self.ends):
            if call <= end:
                return k
        return 0

    def at(self, call: int) -> dict[str, Tensor]:
        """Denoiser kwargs for a call: ``context`` [1, L, D] (and ``y`` [1, adm])."""
        k = self.index(call)
        out = {"context": self.context[k : k + 1]}
        if self.y is not None:
            out["y"] = self.y[k : k + 1]
        return out

    @property
    def length(self) -> int:
        """Context tokens (77 per chunk)."""
        return int(self.context.shape[1])


@dataclass
class PromptConds:
    """A prompt's conditioning: weighted ``AND`` parts (one part of weight 1 for plain and negative prompts)."""

    parts: tuple[tuple[ScheduledCond, float], ...]
    networks: tuple[ExtraNetwork, ...] = ()

    @property
    def simple(self) -> bool:
        """One part of weight 1: plain classifier-free guidance."""
        return len(self.parts) == 1 and self.parts[0][1] == 1.0


class PromptEncoder:
    """Schedules and encodes prompts with one model's text encoders (see the module docstring)."""

    def __init__(self, config: ModelConfig, conditioner: TextConditioner) -> None:
        self.config = config
        self.conditioner = conditioner
        adm = config.unet.adm_in_channels
        if adm is None:
            self.n_ids = 0
        else:
            te = config.text_encoders[-1]
            pooled = te.projection_dim or te.width
            n, rem = divmod(adm - pooled, ADM_ID_DIM)
            if rem or n not in (5, 6):
                raise ConfigError(f"ADM input of {adm} channels does not fit pooled {pooled} + 5 or 6 x 256 ids")
            self.n_ids = n

    def _schedule(self, text: str, steps: int, hires_steps: int | None, negative: bool,
                  sizes: SDXLSizes | None) -> ScheduledCond:
        schedule = prompt_schedule(text, steps, hires_steps)
        texts = [t for _, t in schedule]
        cond = self.conditioner(texts, is_negative=negative)
        y = None
        if self.n_ids:
            if cond.pooled is None:
                raise ConfigError("this model needs a pooled text embedding for its ADM input")
            if sizes is None:
                raise ConfigError("SDXL-type models need the image size for their conditioning")
            score = AESTHETIC_NEGATIVE if negative else AESTHETIC_POSITIVE
            ids = torch.tensor([sizes.time_ids(self.n_ids, score)] * len(texts), dtype=torch.float32)
            y = sdxl_adm_vector(cond.pooled, ids.to(cond.pooled.device), ADM_ID_DIM)
        return ScheduledCond(tuple(e for e, _ in schedule), tuple(texts), cond.context, y)

    def encode(self, prompt: str, steps: int, *, hires_steps: int | None = None, negative: bool = False,
               sizes: SDXLSizes | None = None) -> PromptConds:
        """A prompt's conds for ``steps`` planned model calls (:func:`total_steps`); negative: no AND split."""
        text, networks = clean_prompt(prompt)
        subs = [(text, 1.0)] if negative else split_and(text)
        cache: dict[str, ScheduledCond] = {}
        parts = []
        for sub, weight in subs:
            if sub not in cache:
                cache[sub] = self._schedule(sub, steps, hires_steps, negative, sizes)
            parts.append((cache[sub], weight))
        return PromptConds(tuple(parts), tuple(networks))


def describe_networks(conds: PromptConds) -> list[str]:
    """``kind:name`` of each extra-network tag, for warnings."""
    return [f"{n.kind}:{n.name}" for n in conds.networks]


def expand_rows(cond: dict[str, Any], rows: int) -> dict[str, Any]:
    """Broadcast single-row cond tensors to ``rows`` rows."""
    return {k: v.expand(rows, *v.shape[1:]) if isinstance(v, Tensor) and v.shape[0] == 1 else v
            for k, v in cond.items()}


__all__ = [
    "AESTHETIC_NEGATIVE", "AESTHETIC_POSITIVE", "SECOND_ORDER", "PromptConds", "PromptEncoder", "SDXLSizes",
    "ScheduledCond", "clean_prompt", "describe_networks", "expand_rows", "total_steps",
]
