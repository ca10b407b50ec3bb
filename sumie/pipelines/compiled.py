"""An opt-in compiled UNet: ``torch.compile`` (inductor) with the weights frozen into the graph.

Freezing lets inductor treat the weights as constants: it folds them, prepacks them for oneDNN's convolutions and
matmuls on CPU, and fuses the element-wise work around them. On this project's 2-core CPU that is what makes the
compiled UNet faster than the eager one (docs/benchmarks.md); without freezing the compiled graph is not faster.

The price of freezing is that the graph holds the weights as they were when it compiled. :class:`CompiledUNet`
therefore fingerprints the parameters (each tensor's identity, version counter and storage) on every call and
compiles again when they changed: a LoRA patched in or out, a checkpoint merge, an optimizer step. Compiling takes
minutes on a small CPU, seconds on a GPU. Only the plain call (no ControlNet residuals, no attention hooks, no
autograd) is compiled; every other call runs the eager UNet, so all extensions work as before. Shapes are static
(inductor on torch 2.13's CPU build cannot lower this UNet with dynamic shapes): each new latent size or batch
compiles once more, and then stays cached for the process.

The freezing switch is inductor's process-wide config; it is set only for the duration of each compiled call
(``torch._inductor.config.patch``), never left on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CompiledUNet", "weights_key"]


def weights_key(module: nn.Module) -> tuple[tuple[int, int, int], ...]:
    """What identifies ``module``'s current weights: each parameter and buffer's (object id, version, storage).

    Weights created under ``torch.inference_mode`` have no version counter (-1 here): an in-place change to them
    goes unseen, while a patch that installs new tensors (Sumie's patcher, LoRA) is seen as for any weight."""
    return tuple((id(t), -1 if t.is_inference() else t._version, t.data_ptr())
                 for t in (*module.parameters(), *module.buffers()))


class CompiledUNet:
    """``unet(x, t, context, y=None, guidance=None)`` through an inductor graph with frozen weights (module doc).

    ``log`` receives a line when a compile starts and ends (it takes minutes on a CPU)."""

    def __init__(self, unet: nn.Module, log: Callable[[str], None] | None = None) -> None:
        self.unet = unet
        self.log = log
        self.compiles = 0  # graphs built so far (first calls of new shapes, and after weight changes)
        self._key: tuple[tuple[int, int, int], ...] | None = None
        self._shapes: set[tuple[Any, ...]] = set()
        self._fn: Callable[..., Tensor] | None = None

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                 guidance: Tensor | None = None, **hooks: Any) -> Tensor:
        """The UNet's output; compiled for plain inference calls, eager otherwise (hooks, autograd)."""
        if torch.is_grad_enabled() or any(v is not None for v in hooks.values()):
            return self.unet(x, timesteps, context, y=y, guidance=guidance, **hooks)
        key = weights_key(self.unet)
        if key != self._key or self._fn is None:
            # dynamo caches graphs per code object, and its guards do not check weight values: a graph frozen with
            # other weights (an earlier CompiledUNet's too) could be reused. Drop them all; other compiled
            # functions of this process compile again on their next call.
            torch.compiler.reset()
            self._fn = torch.compile(self.unet, dynamic=False)  # (module hooks, e.g. timers, run between graphs)
            self._key, self._shapes = key, set()
        shape = (tuple(x.shape), tuple(timesteps.shape), tuple(context.shape), None if y is None else tuple(y.shape),
                 None if guidance is None else tuple(guidance.shape), x.dtype, x.device)
        new = shape not in self._shapes
        t0 = time.monotonic()
        if new and self.log is not None:
            self.log(f"compiling the UNet for {tuple(x.shape)} (once per shape and weights; minutes on a CPU)")
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            out = self._fn(x, timesteps, context, y=y, guidance=guidance)
        if new:
            self._shapes.add(shape)
            self.compiles += 1
            if self.log is not None:
                self.log(f"compiled in {time.monotonic() - t0:.0f} s")
        return out
