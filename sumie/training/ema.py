"""Exponential moving average of parameters (Polyak averaging), with diffusers' ``EMAModel`` warmup.

``decay(step)``: 0 until ``start`` steps have passed (the average just copies the weights), then either the fixed
``decay`` or, with ``warmup``, ``min(decay, 1 - (1 + n / inv_gamma) ** -power)`` for the n-th averaged step
(diffusers ``EMAModel.get_decay``; power 2/3 suits runs of ~100k steps). :meth:`EMA.swapped` exchanges the
averaged and live tensors in place (no copy) for sampling or export and swaps them back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """Shadow copies of a list of parameters, updated after every optimizer step."""

    def __init__(self, params: Iterable[nn.Parameter], decay: float = 0.999, start: int = 0, warmup: bool = True,
                 power: float = 2 / 3, inv_gamma: float = 1.0) -> None:
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]  # same dtype as the (float32) parameters
        self.decay = decay
        self.start = start
        self.warmup = warmup
        self.power = power
        self.inv_gamma = inv_gamma
        self.num_updates = 0

    def decay_at(self, step: int) -> float:
        """Decay used by the update after optimizer step ``step`` (1-based)."""
        n = step - self.start - 1
        if n <= 0:
            return 0.0
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + n / self.inv_gamma) ** -self.power)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """shadow <- d * shadow + (1 - d) * param, with d = :meth:`decay_at` (step)."""
        d = self.decay_at(step)
        live = [p.detach() for p in self.params]
        if d == 0.0:
            torch._foreach_copy_(self.shadow, live)
        else:
            torch._foreach_lerp_(self.shadow, live, 1.0 - d)
        self.num_updates += 1

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the parameters hold the averaged values; the live ones come back afterwards."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for i, p in enumerate(self.params):
            p.data, self.shadow[i] = self.shadow[i], p.data

    def state_dict(self) -> dict[str, object]:
        """Shadow tensors and counters."""
        return {"shadow": [s.clone() for s in self.shadow], "num_updates": self.num_updates, "decay": self.decay,
                "start": self.start, "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict` output (the parameter list must be the same)."""
        shadow: list[Tensor] = state["shadow"]  # type: ignore[assignment]
        if len(shadow) != len(self.params):
            raise ValueError(f"EMA state has {len(shadow)} tensors for {len(self.params)} parameters")
        with torch.no_grad():
            for s, t in zip(self.shadow, shadow, strict=True):
                s.copy_(t)
        self.num_updates = int(state["num_updates"])  # type: ignore[call-overload]
