"""ControlNets and T2I-Adapters in ComfyUI graphs (``comfy/controlnet.py``), run by Sumie's control networks.

* ``CONTROL_NET`` (:class:`ComfyControlNet`): a file read by :func:`sumie.adapters.control.files.load_controlnet`
  (every ControlNet layout and T2I-Adapters; an SDXL Control-LoRA is merged with the sampled model's UNet when it
  first runs, as ComfyUI's ``ControlLora.pre_run`` does);
* the apply nodes put a :class:`ControlHint` into the ``control`` option of conditioning entries; a hint keeps the
  one it replaced (``previous``), so chained ControlNets add their outputs (``control_merge``);
* per UNet call of an entry (:meth:`ControlHint.residuals`): each hint of the chain whose range holds the sigma
  (``timestep_range`` from ``percent_to_sigma`` of start / end percent) runs its network on the UNet's own input
  (``calculate_input``: the scaled latent), the integer timestep, the entry's context and ADM vector; the image is
  resized to 8x the latent size with ``common_upscale(..., "nearest-exact", "center")`` (T2I-Adapters: to the next
  multiple of the adapter's unshuffle, one-channel adapters get the channel mean), a batch of images is cycled over
  the latent batch (``broadcast_image_to``), and every output is multiplied by the strength;
* ComfyUI's old ``ControlNetApply`` marks entries ``control_apply_to_uncond``: when no negative entry has a control,
  the negative entries get the positive ones' (``apply_empty_x_to_equal_area``, see :func:`fill_uncond_controls`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sumie.adapters.control.files import ControlFile, load_controlnet
from sumie.checkpoints.io import read_safetensors_header
from sumie.checkpoints.keymaps.controlnet import controlnet_layout
from sumie.comfy.resize import common_upscale
from sumie.errors import ConfigError
from sumie.models.hooks import Residuals

__all__ = ["ComfyControlNet", "ControlHint", "fill_uncond_controls", "load_comfy_controlnet"]


@dataclass(eq=False)
class ComfyControlNet:
    """A ``CONTROL_NET``: the file and its network (None for a Control-LoRA until it meets a UNet)."""

    path: Path
    control: ControlFile | None
    merged: dict[int, ControlFile] = field(default_factory=dict)  # Control-LoRA: id(base UNet) -> merged network

    @property
    def name(self) -> str:
        """The file's name."""
        return self.path.name

    def network(self, unet: nn.Module) -> ControlFile:
        """The network to run beside ``unet`` (a Control-LoRA merged with it, once per UNet)."""
        if self.control is not None:
            return self.control
        key = id(unet)
        if key not in self.merged:
            self.merged.clear()
            self.merged[key] = load_controlnet(self.path, base=unet)  # type: ignore[arg-type]
        return self.merged[key]


def load_comfy_controlnet(path: Path, base: nn.Module | None = None, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32) -> ComfyControlNet:
    """Read a control file onto ``device`` / ``dtype`` (``base``: a UNet to merge a Control-LoRA with now; without
    it, a Control-LoRA waits for the UNet it is sampled with)."""
    control_lora = False
    if path.is_file() and path.suffix.lower() in (".safetensors", ".sft"):
        header, _ = read_safetensors_header(path)
        control_lora = controlnet_layout(set(header)) == "control_lora"
    if control_lora and base is None:
        return ComfyControlNet(path, None)
    if base is not None:
        return ComfyControlNet(path, load_controlnet(path, base=base))  # type: ignore[arg-type]
    return ComfyControlNet(path, load_controlnet(path, device=device, dtype=dtype))


def _broadcast(hint: Tensor, rows: int) -> Tensor:
    """``broadcast_image_to`` for one entry's rows: one image serves all, more are cycled over the batch."""
    if hint.shape[0] == 1 or hint.shape[0] == rows:
        return hint.expand(rows, *hint.shape[1:]) if hint.shape[0] == 1 else hint
    hint = hint[:rows]
    reps = math.ceil(rows / hint.shape[0])
    return torch.cat([hint] * reps)[:rows]


@dataclass(eq=False)
class ControlHint:
    """One applied control: network, image [B, 3, H, W] in [0, 1], strength, sigma range and the one it follows."""

    net: ComfyControlNet
    image: Tensor
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: ControlHint | None = None
    _hints: dict[tuple[int, int, str], Tensor] = field(default_factory=dict)

    def chain(self) -> list[ControlHint]:
        """This hint and those before it, oldest first."""
        out: list[ControlHint] = []
        h: ControlHint | None = self
        while h is not None:
            out.append(h)
            h = h.previous
        return out[::-1]

    def _hint(self, height: int, width: int, t2i: bool, unshuffle: int, grey: bool) -> Tensor:
        if t2i:  # scale_image_to: up to the next multiple of the adapter's unshuffle
            width = math.ceil(width / unshuffle) * unshuffle
            height = math.ceil(height / unshuffle) * unshuffle
        key = (height, width, "t2i" if t2i else "cn")
        if key not in self._hints:
            img = self.image.float()
            if tuple(img.shape[-2:]) != (height, width):
                img = common_upscale(img, width, height, "nearest-exact", "center")
            if grey and img.shape[1] > 1:
                img = img.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)  # the adapter takes one channel
            self._hints[key] = img
        return self._hints[key]

    def _own(self, x_in: Tensor, t: Tensor, context: Tensor, y: Tensor | None, unet: nn.Module) -> Residuals:
        """This hint's residuals (times the strength) for one entry's rows."""
        control = self.net.network(unet)
        model = control.model
        rows = x_in.shape[0]
        device = x_in.device
        if control.kind == "t2i_adapter":
            cfg = model.config  # type: ignore[attr-defined]
            hint = self._hint(x_in.shape[-2] * 8, x_in.shape[-1] * 8, True, cfg.unshuffle, cfg.hint_channels == 1)
            try:
                raw = model(_broadcast(hint, rows).to(device))
            except ValueError as e:
                raise ConfigError(f"T2I-Adapter {self.net.name}: {e}") from None
            s = self.strength
            return Residuals(encoder=[None if f is None else f * s for f in raw.encoder],
                             middle=None if raw.middle is None else raw.middle * s)
        in_ch = model.input_blocks[0][0].in_channels  # type: ignore[index]
        hint = _broadcast(self._hint(x_in.shape[-2] * 8, x_in.shape[-1] * 8, False, 1, False), rows).to(device)
        raw = model(x_in[:, :in_ch], hint, t, context, y)
        s = self.strength
        return Residuals(skips=[None if r is None else r * s for r in raw.skips],
                         middle=None if raw.middle is None else raw.middle * s)

    def residuals(self, x_in: Tensor, t: Tensor, context: Tensor, y: Tensor | None, sigma: float,
                  unet: nn.Module, percent_to_sigma: Callable[[float], float]) -> Residuals | None:
        """The chain's summed residuals for one entry's UNet call at ``sigma`` (None: no hint acts)."""
        total: Residuals | None = None
        for h in self.chain():
            if sigma > percent_to_sigma(h.start_percent) or sigma < percent_to_sigma(h.end_percent):
                continue
            r = h._own(x_in, t, context, y, unet)
            total = r if total is None else total.add(r)
        return total


def place_rows(parts: Sequence[tuple[Tensor, Residuals]], batch: int) -> Residuals:
    """Residuals of some rows of a batch (row indices [n] each), zeros for the other rows ([batch, ...] tensors)."""
    def merge(get: Callable[[Residuals], Sequence[Tensor | None]]) -> list[Tensor | None]:
        n = max(len(get(r)) for _, r in parts)
        out: list[Tensor | None] = []
        for i in range(n):
            vals = [(sl, get(r)[i]) for sl, r in parts if i < len(get(r)) and get(r)[i] is not None]
            if not vals:
                out.append(None)
                continue
            first = vals[0][1]
            full = first.new_zeros((batch, *first.shape[1:]))
            for sl, v in vals:
                full[sl] += v.to(full)
            out.append(full)
        return out

    middle = merge(lambda r: [r.middle])[0]
    return Residuals(merge(lambda r: r.encoder), merge(lambda r: r.skips), middle)


def fill_uncond_controls(positive: list[list[Any]], negative: list[list[Any]]) -> list[list[Any]]:
    """``apply_empty_x_to_equal_area`` for ``control``: when no negative entry without an area has a control, the
    controls of positive entries marked ``control_apply_to_uncond`` (no area) go to the negative entries without an
    area: the x-th control replaces the control of negative entry ``x % n`` (a later one overwrites an earlier)."""
    cond_cnets = [c[1]["control"] for c in positive if c[1].get("control_apply_to_uncond", False)
                  and "area" not in c[1] and c[1].get("control") is not None]
    plain = [i for i, c in enumerate(negative) if "area" not in c[1]]
    if not cond_cnets or not plain or any(negative[i][1].get("control") is not None for i in plain):
        return negative
    uncond = [list(c) for c in negative]
    for x, cnet in enumerate(cond_cnets):
        i = plain[x % len(plain)]
        uncond[i] = [negative[i][0], {**negative[i][1], "control": cnet}]
    return uncond
