"""Sampling nodes: nodes.py KSampler / KSamplerAdvanced (``common_ksampler``) and the sampler-custom family of
comfy_extras/nodes_custom_sampler.py (SamplerCustom, KSamplerSelect, BasicScheduler, KarrasScheduler, CFGGuider,
RandomNoise, SamplerCustomAdvanced). The numbers are :mod:`sumie.comfy.sampler`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sumie.comfy import sampler as cs
from sumie.comfy.nodes.base import SEED_MAX, InputTypes, Node, RunContext
from sumie.comfy.values import ComfyGuider, ComfyModel, ComfyNoise, ComfySampler, Conditioning, NodeOutput, applied
from sumie.sampling import schedules

CUSTOM = "comfy_extras.nodes_custom_sampler"


def _run(ctx: RunContext, model: ComfyModel, guider: ComfyGuider, sampler: str, sigmas: Tensor,
         latent: dict[str, Any], seed: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample a LATENT: (output, denoised output) LATENTs; progress and interruption through ``ctx``."""
    samples = cs.fix_empty_latent(model, latent)
    latent = {**latent, "samples": samples}
    latent.pop("downscale_ratio_spacial", None)
    noise = cs.prepare_noise(latent, seed)
    guide = cs.ComfyCFG(model, guider.positive, guider.negative, guider.cfg, samples.shape)

    def progress(value: int, total: int, x0: Tensor) -> None:
        if ctx.preview is not None:
            ctx.preview(x0, model.models.vae)
        ctx.progress(value, total)
        ctx.check()

    ctx.check()
    with applied(model.patcher, model.patches):
        out, denoised = cs.sample(model, guide, sampler, sigmas, noise, samples, seed or 0,
                                  latent.get("noise_mask"), progress)
    result = {**latent, "samples": out}
    return result, ({**latent, "samples": denoised} if denoised is not None else result)


def _cfg() -> tuple[str, dict[str, Any]]:
    return ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01})


class KSampler(Node):
    """nodes.py ``KSampler``."""

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    CATEGORY = "sampling"
    DESCRIPTION = "Uses the provided model, positive and negative conditioning to denoise the latent image."
    DISPLAY_NAME = "KSampler"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Model, seed, steps, cfg, sampler, scheduler, conditionings, latent, denoise."""
        cfg_type, cfg_opts = _cfg()
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX,
                             "tooltip": "The random seed used for creating the noise."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                              "tooltip": "The number of steps used in the denoising process."}),
            "cfg": (cfg_type, {**cfg_opts, "tooltip": (
                "The Classifier-Free Guidance scale balances creativity and adherence to the prompt. Higher values "
                "result in images more closely matching the prompt however too high values will negatively impact "
                "quality.")}),
            "sampler_name": (cs.supported_samplers(), {"tooltip": (
                "The algorithm used when sampling, this can affect the quality, speed, and style of the generated "
                "output.")}),
            "scheduler": (cs.supported_schedulers(), {
                "tooltip": "The scheduler controls how noise is gradually removed to form the image."}),
            "positive": ("CONDITIONING", {
                "tooltip": "The conditioning describing the attributes you want to include in the image."}),
            "negative": ("CONDITIONING", {
                "tooltip": "The conditioning describing the attributes you want to exclude from the image."}),
            "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "The amount of denoising applied, lower values will maintain the structure of the initial image "
                "allowing for image to image sampling.")}),
        }}

    def run(self, ctx: RunContext, model: ComfyModel, seed: int, steps: int, cfg: float, sampler_name: str,
            scheduler: str, positive: Conditioning, negative: Conditioning, latent_image: dict[str, Any],
            denoise: float = 1.0) -> NodeOutput:
        """``common_ksampler`` with the node's steps and denoise."""
        sigmas = cs.ksampler_sigmas(cs.discretization(model), sampler_name, scheduler, steps, denoise)
        out, _ = _run(ctx, model, ComfyGuider(model, positive, negative, cfg), sampler_name, sigmas, latent_image,
                      seed)
        return NodeOutput((out,))


class KSamplerAdvanced(Node):
    """nodes.py ``KSamplerAdvanced``: start / end steps, noise on or off, leftover noise kept or not."""

    RETURN_TYPES = ("LATENT",)
    CATEGORY = "sampling"
    DISPLAY_NAME = "KSampler (Advanced)"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """KSampler's inputs with add_noise, start / end steps and return_with_leftover_noise."""
        return {"required": {
            "model": ("MODEL",), "add_noise": (["enable", "disable"],),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}), "cfg": _cfg(),
            "sampler_name": (cs.supported_samplers(),), "scheduler": (cs.supported_schedulers(),),
            "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
            "return_with_leftover_noise": (["disable", "enable"],),
        }}

    def run(self, ctx: RunContext, model: ComfyModel, add_noise: str, noise_seed: int, steps: int, cfg: float,
            sampler_name: str, scheduler: str, positive: Conditioning, negative: Conditioning,
            latent_image: dict[str, Any], start_at_step: int, end_at_step: int,
            return_with_leftover_noise: str) -> NodeOutput:
        """The steps from ``start_at_step`` to ``end_at_step`` of the full schedule."""
        full = cs.ksampler_sigmas(cs.discretization(model), sampler_name, scheduler, steps, 1.0)
        sigmas = cs.advanced_sigmas(full, start_at_step, end_at_step, return_with_leftover_noise != "enable")
        if sigmas is None:
            return NodeOutput((latent_image,))
        seed = None if add_noise == "disable" else noise_seed
        out, _ = _run(ctx, model, ComfyGuider(model, positive, negative, cfg), sampler_name, sigmas, latent_image,
                      seed)
        return NodeOutput((out,))


class SamplerCustom(Node):
    """nodes_custom_sampler.py ``SamplerCustom``: a SAMPLER on given SIGMAS; also the last denoised x0."""

    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")
    CATEGORY = "sampling/custom_sampling"
    PYTHON_MODULE = CUSTOM

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Model, noise switch and seed, cfg, conditionings, sampler, sigmas, latent."""
        return {"required": {
            "model": ("MODEL",), "add_noise": ("BOOLEAN", {"default": True}),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
            "cfg": _cfg(), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
            "sampler": ("SAMPLER",), "sigmas": ("SIGMAS",), "latent_image": ("LATENT",),
        }}

    def run(self, ctx: RunContext, model: ComfyModel, add_noise: bool, noise_seed: int, cfg: float,
            positive: Conditioning, negative: Conditioning, sampler: ComfySampler, sigmas: Tensor,
            latent_image: dict[str, Any]) -> NodeOutput:
        """(output, denoised_output)."""
        out, den = _run(ctx, model, ComfyGuider(model, positive, negative, cfg), sampler.name, sigmas,
                        latent_image, noise_seed if add_noise else None)
        return NodeOutput((out, den))


class KSamplerSelect(Node):
    """nodes_custom_sampler.py ``KSamplerSelect``."""

    RETURN_TYPES = ("SAMPLER",)
    CATEGORY = "sampling/custom_sampling/samplers"
    PYTHON_MODULE = CUSTOM

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """The sampler name."""
        return {"required": {"sampler_name": (cs.supported_samplers(),)}}

    def run(self, ctx: RunContext, sampler_name: str) -> NodeOutput:
        """The SAMPLER."""
        return NodeOutput((ComfySampler(sampler_name),))


class BasicScheduler(Node):
    """nodes_custom_sampler.py ``BasicScheduler``: a scheduler's sigmas, the last ``steps + 1`` of
    ``int(steps / denoise)`` for denoise < 1 (no penultimate-sigma drop: that is KSampler's)."""

    RETURN_TYPES = ("SIGMAS",)
    CATEGORY = "sampling/custom_sampling/schedulers"
    PYTHON_MODULE = CUSTOM

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Model, scheduler, steps, denoise."""
        return {"required": {"model": ("MODEL",), "scheduler": (cs.supported_schedulers(),),
                             "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                             "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}}

    def run(self, ctx: RunContext, model: ComfyModel, scheduler: str, steps: int, denoise: float) -> NodeOutput:
        """The SIGMAS."""
        total = steps
        if denoise < 1.0:
            if denoise <= 0.0:
                return NodeOutput((torch.zeros(0),))
            total = int(steps / denoise)
        sigmas = cs.calculate_sigmas(cs.discretization(model), scheduler, total)
        return NodeOutput((sigmas[-(steps + 1):],))


class KarrasScheduler(Node):
    """nodes_custom_sampler.py ``KarrasScheduler``: k-diffusion's ``get_sigmas_karras``."""

    RETURN_TYPES = ("SIGMAS",)
    CATEGORY = "sampling/custom_sampling/schedulers"
    PYTHON_MODULE = CUSTOM

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Steps, sigma range, rho."""
        def f(default: float, top: float) -> tuple[str, dict[str, Any]]:
            return ("FLOAT", {"default": default, "min": 0.0, "max": top, "step": 0.01, "round": False})

        return {"required": {"steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                             "sigma_max": f(14.614642, 5000.0), "sigma_min": f(0.0291675, 5000.0),
                             "rho": f(7.0, 100.0)}}

    def run(self, ctx: RunContext, steps: int, sigma_max: float, sigma_min: float, rho: float) -> NodeOutput:
        """The SIGMAS."""
        return NodeOutput((schedules.karras(steps, sigma_min, sigma_max, rho),))


class CFGGuider(Node):
    """nodes_custom_sampler.py ``CFGGuider``."""

    RETURN_TYPES = ("GUIDER",)
    CATEGORY = "sampling/custom_sampling/guiders"
    PYTHON_MODULE = CUSTOM

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Model, conditionings, cfg."""
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "cfg": _cfg()}}

    def run(self, ctx: RunContext, model: ComfyModel, positive: Conditioning, negative: Conditioning,
            cfg: float) -> NodeOutput:
        """The GUIDER."""
        return NodeOutput((ComfyGuider(model, positive, negative, float(cfg)),))


class RandomNoise(Node):
    """nodes_custom_sampler.py ``RandomNoise``: ComfyUI's batch noise for a seed."""

    RETURN_TYPES = ("NOISE",)
    CATEGORY = "sampling/custom_sampling/noise"
    PYTHON_MODULE = CUSTOM

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """The seed."""
        return {"required": {"noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX,
                                                    "control_after_generate": True})}}

    def run(self, ctx: RunContext, noise_seed: int) -> NodeOutput:
        """The NOISE."""
        return NodeOutput((ComfyNoise(int(noise_seed)),))


class SamplerCustomAdvanced(Node):
    """nodes_custom_sampler.py ``SamplerCustomAdvanced``: NOISE + GUIDER + SAMPLER + SIGMAS."""

    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")
    CATEGORY = "sampling/custom_sampling"
    PYTHON_MODULE = CUSTOM

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Noise, guider, sampler, sigmas, latent."""
        return {"required": {"noise": ("NOISE",), "guider": ("GUIDER",), "sampler": ("SAMPLER",),
                             "sigmas": ("SIGMAS",), "latent_image": ("LATENT",)}}

    def run(self, ctx: RunContext, noise: ComfyNoise, guider: ComfyGuider, sampler: ComfySampler, sigmas: Tensor,
            latent_image: dict[str, Any]) -> NodeOutput:
        """(output, denoised_output)."""
        out, den = _run(ctx, guider.model, guider, sampler.name, sigmas, latent_image, noise.seed)
        return NodeOutput((out, den))


NODES: dict[str, type[Node]] = {
    "KSampler": KSampler,
    "KSamplerAdvanced": KSamplerAdvanced,
    "SamplerCustom": SamplerCustom,
    "KSamplerSelect": KSamplerSelect,
    "BasicScheduler": BasicScheduler,
    "KarrasScheduler": KarrasScheduler,
    "CFGGuider": CFGGuider,
    "RandomNoise": RandomNoise,
    "SamplerCustomAdvanced": SamplerCustomAdvanced,
}
