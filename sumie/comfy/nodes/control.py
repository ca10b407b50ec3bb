"""ControlNet nodes (nodes.py: ControlNetLoader, DiffControlNetLoader, ControlNetApply, ControlNetApplyAdvanced).

The loaders read any file :func:`sumie.adapters.control.files.load_controlnet` reads (original / diffusers
ControlNets, SDXL Control-LoRAs, T2I-Adapters) from the ``controlnet`` folders; the apply nodes attach a
:class:`~sumie.comfy.control.ControlHint` to conditioning entries as ComfyUI attaches its ``ControlBase`` copies
(see :mod:`sumie.comfy.control` for what happens at sampling). ``vae`` (ControlNetApplyAdvanced's optional input) is
only used by ComfyUI for ControlNets of latent-space models (SD3, Flux), none of which Sumie runs: it is accepted and
not needed.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sumie.adapters.control.files import check_family
from sumie.comfy.control import ComfyControlNet, ControlHint, load_comfy_controlnet
from sumie.comfy.env import ComfyEnvironment
from sumie.comfy.nodes.base import InputTypes, Node, RunContext
from sumie.comfy.values import ComfyModel, Conditioning, NodeOutput
from sumie.errors import ConfigError


def _load(env: ComfyEnvironment, name: str, model: ComfyModel | None = None) -> ComfyControlNet:
    path = env.manager.resolve("controlnet", name)
    unet = None if model is None else model.models.unet
    net = load_comfy_controlnet(path, unet, env.manager.device, env.manager.dtype.unet)
    if model is not None and net.control is not None:
        check_family(net.control, model.models.config.family)
    return net


def _strength() -> tuple[str, dict[str, Any]]:
    return ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})


class ControlNetLoader(Node):
    """nodes.py ``ControlNetLoader``."""

    RETURN_TYPES = ("CONTROL_NET",)
    CATEGORY = "loaders"
    DISPLAY_NAME = "Load ControlNet Model"

    @classmethod
    def input_types(cls, env: ComfyEnvironment) -> InputTypes:
        """The controlnet folder's files."""
        return {"required": {"control_net_name": (env.model_names("controlnet"),)}}

    def run(self, ctx: RunContext, control_net_name: str) -> NodeOutput:
        """Read the file (a Control-LoRA is merged with the UNet it is sampled with)."""
        return NodeOutput((_load(ctx.env, control_net_name),))


class DiffControlNetLoader(Node):
    """nodes.py ``DiffControlNetLoader``: the file read beside a MODEL (a Control-LoRA merged with its UNet now, the
    family checked). ComfyUI's old "difference" ControlNets (a ``difference`` key) are not read."""

    RETURN_TYPES = ("CONTROL_NET",)
    CATEGORY = "loaders"
    DISPLAY_NAME = "Load ControlNet Model (diff)"

    @classmethod
    def input_types(cls, env: ComfyEnvironment) -> InputTypes:
        """The model and the file."""
        return {"required": {"model": ("MODEL",), "control_net_name": (env.model_names("controlnet"),)}}

    def run(self, ctx: RunContext, model: ComfyModel, control_net_name: str) -> NodeOutput:
        """Read the file for this model."""
        return NodeOutput((_load(ctx.env, control_net_name, model),))


def _image_hint(image: Tensor) -> Tensor:
    """IMAGE [B, H, W, C] -> [B, C, H, W] (``image.movedim(-1, 1)``)."""
    if image.ndim != 4:
        raise ConfigError(f"the ControlNet image must be an IMAGE [B, H, W, C], got shape {tuple(image.shape)}")
    return image.movedim(-1, 1)


class ControlNetApply(Node):
    """nodes.py ``ControlNetApply`` (deprecated in ComfyUI): every entry of one conditioning gets the control over
    the whole schedule, also applied to the negative side (``control_apply_to_uncond``)."""

    RETURN_TYPES = ("CONDITIONING",)
    CATEGORY = "conditioning/controlnet"
    DISPLAY_NAME = "Apply ControlNet (OLD)"
    DEPRECATED = True

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Conditioning, ControlNet, image, strength."""
        return {"required": {"conditioning": ("CONDITIONING",), "control_net": ("CONTROL_NET",),
                             "image": ("IMAGE",), "strength": _strength()}}

    def run(self, ctx: RunContext, conditioning: Conditioning, control_net: ComfyControlNet, image: Tensor,
            strength: float) -> NodeOutput:
        """Entries with ``control`` (following any control they had) and ``control_apply_to_uncond``."""
        if strength == 0:
            return NodeOutput((conditioning,))
        hint = _image_hint(image)
        out = []
        for c in conditioning:
            opts = dict(c[1])
            opts["control"] = ControlHint(control_net, hint, float(strength), previous=opts.get("control"))
            opts["control_apply_to_uncond"] = True
            out.append([c[0], opts])
        return NodeOutput((out,))


class ControlNetApplyAdvanced(Node):
    """nodes.py ``ControlNetApplyAdvanced``: both conditionings get the control for a part of the schedule."""

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    CATEGORY = "conditioning/controlnet"
    DISPLAY_NAME = "Apply ControlNet"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Both conditionings, ControlNet, image, strength, the range as fractions; optional VAE."""
        pct = {"min": 0.0, "max": 1.0, "step": 0.001}
        return {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "control_net": ("CONTROL_NET",), "image": ("IMAGE",), "strength": _strength(),
                             "start_percent": ("FLOAT", {"default": 0.0, **pct}),
                             "end_percent": ("FLOAT", {"default": 1.0, **pct})},
                "optional": {"vae": ("VAE",)}}

    def run(self, ctx: RunContext, positive: Conditioning, negative: Conditioning, control_net: ComfyControlNet,
            image: Tensor, strength: float, start_percent: float, end_percent: float, vae: Any = None) -> NodeOutput:
        """(positive, negative) with one shared hint per distinct previous control (ComfyUI's ``cnets``)."""
        if strength == 0:
            return NodeOutput((positive, negative))
        hint = _image_hint(image)
        made: dict[int, ControlHint] = {}
        out: list[Conditioning] = []
        for conditioning in (positive, negative):
            entries = []
            for c in conditioning:
                opts = dict(c[1])
                prev = opts.get("control")
                if id(prev) not in made:
                    made[id(prev)] = ControlHint(control_net, hint, float(strength), float(start_percent),
                                                 float(end_percent), prev)
                opts["control"] = made[id(prev)]
                opts["control_apply_to_uncond"] = False
                entries.append([c[0], opts])
            out.append(entries)
        return NodeOutput((out[0], out[1]))


NODES: dict[str, type[Node]] = {
    "ControlNetLoader": ControlNetLoader,
    "DiffControlNetLoader": DiffControlNetLoader,
    "ControlNetApply": ControlNetApply,
    "ControlNetApplyAdvanced": ControlNetApplyAdvanced,
}
