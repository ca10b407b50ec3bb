"""What a caller can do to a running request, and what it hears back: interrupt / skip flags and progress events.

:class:`JobControl` is shared between the thread that runs ``Engine.generate`` and any other thread (a server's
``/interrupt`` handler, a CLI's Ctrl-C): the engine checks it at every sampler step. A1111's semantics:

* ``interrupt()`` stops at the next step; the images of the current batch are decoded from the latents reached so
  far and returned with their infotexts; later batches are not started;
* ``skip()`` ends the current batch the same way and goes on with the next one (A1111's "Skip").

:class:`ProgressEvent` is what ``generate(progress=...)`` receives after every sampler step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image
from torch import Tensor

PassName = Literal["first", "hires", "refiner"]

__all__ = ["JobControl", "PassName", "ProgressEvent"]


class JobControl:
    """Thread-safe interrupt / skip flags of one request (A1111 ``state.interrupted`` / ``state.skipped``)."""

    def __init__(self) -> None:
        self._interrupt = threading.Event()
        self._skip = threading.Event()

    def interrupt(self) -> None:
        """Stop at the next step; return what was made so far."""
        self._interrupt.set()

    def skip(self) -> None:
        """End the current batch at the next step and go on with the next one."""
        self._skip.set()

    @property
    def interrupted(self) -> bool:
        """Whether :meth:`interrupt` was called."""
        return self._interrupt.is_set()

    @property
    def skipped(self) -> bool:
        """Whether :meth:`skip` was called since the current batch began."""
        return self._skip.is_set()

    @property
    def stop_batch(self) -> bool:
        """Whether the current batch must end now (interrupted or skipped)."""
        return self._interrupt.is_set() or self._skip.is_set()

    def next_batch(self) -> None:
        """A new batch begins: a skip applies to one batch only."""
        self._skip.clear()


@dataclass(frozen=True)
class ProgressEvent:
    """One sampler step of a request: where it is (pass, batch, step), how far in all, and the time left."""

    pass_name: PassName
    batch: int  # 0-based batch index
    batches: int
    step: int  # 1-based step within the pass
    steps: int  # steps of this pass
    done: int  # steps done over the whole request (all batches and passes)
    total: int
    elapsed: float  # seconds since the request started
    eta: float | None  # seconds left, from the mean step time so far (None before the first step)
    preview: list[Image.Image] | None = field(default=None, compare=False)  # current prediction, when asked
    denoised: Tensor | None = field(default=None, compare=False, repr=False)  # the prediction x0 [B, C, h, w]

    @property
    def fraction(self) -> float:
        """Share of the request done, in [0, 1]."""
        return self.done / self.total if self.total else 1.0
