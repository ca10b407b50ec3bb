"""Whose numbers a request reproduces where AUTOMATIC1111 1.10 and diffusers 0.42 differ: one object, one switch each.

The engine reads every difference from a :class:`PipelineConvention` (``params.convention`` names one); the
functions that compute a reference's formula (:func:`sumie.pipelines.images.to_tensor`,
:func:`sumie.pipelines.inpaint.inpaint_model_inputs`, :func:`sumie.sampling.img2img.img2img_plan`) take the name.

* VAE encoding of init images: A1111 samples the posterior with the unseeded global torch RNG, which makes its
  img2img not reproducible bit for bit; the A1111 convention takes the posterior mean (the deterministic centre of
  what A1111 does). diffusers samples it with each image's generator before the noise is drawn (and the masked image
  of 9-channel inpainting after it), as it does with a list of per-image generators;
* img2img steps (:func:`~sumie.sampling.img2img.img2img_plan`) and the uint8 rounding (A1111 truncates);
* start-noise scale and network timesteps: those of the diffusers scheduler matching the sampler (DPM++ 2M/SDE ->
  DPMSolverMultistep: VP start, rounded Karras timesteps; Euler family: ``leading`` spacing for SDXL, ``linspace``
  otherwise) (:meth:`PipelineConvention.sampling`);
* inpainting: A1111 blends the original latent into every prediction and pastes the original pixels back outside
  the mask (overlay); diffusers re-noises the kept region of the input after each step (not before the first call
  when it starts from pure noise at strength 1), blends nothing for 9-channel UNets and returns the decoded image as
  is. Latent mask: A1111 bicubic + round, diffusers binarized + nearest;
* CFG rescale: A1111's extension rescales x0, diffusers the model's own output (eps or v);
* CFG scales at or below 1: diffusers runs the cond alone (``do_classifier_free_guidance`` is ``scale > 1``; SD-Turbo's
  ``guidance_scale=0.0``), A1111 and ComfyUI compute ``uncond + scale * (cond - uncond)`` for every scale but 1;
* the LCM sampler: diffusers' LCMScheduler gives the UNet integer timesteps (rounded here);
* ControlNet step range (``control_steps``): A1111's extension stops a unit when ``sampling_step / steps`` is
  outside [start, end], with ``sampling_step`` the index of the last finished step (0 before the first, so the
  first two steps both read 0); diffusers keeps it at step i when ``i / N >= start`` and ``(i + 1) / N <= end``;
  the control image (``control_resample``): A1111's extension resizes with OpenCV (nearest for maps of 3-199
  colours, area when shrinking, cubic when enlarging), diffusers with PIL's Lanczos.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sumie.errors import ConfigError
from sumie.pipelines.images import Rounding
from sumie.sampling.conventions import A1111, Convention, diffusers_convention
from sumie.sampling.guidance import RescaleSpace

ConventionName = Literal["a1111", "diffusers"]

# diffusers scheduler of each sampler, for the diffusers convention's start scale and timestep rounding
_DIFFUSERS_SCHEDULER = {
    "euler": "euler", "euler_ancestral": "euler_ancestral", "heun": "heun", "dpm_2": "kdpm2",
    "dpm_2_ancestral": "kdpm2_ancestral", "lms": "lms", "dpmpp_2m": "dpmsolver_multistep",
    "dpmpp_2m_sde": "dpmsolver_multistep", "dpmpp_2m_sde_heun": "dpmsolver_multistep",
    "dpmpp_3m_sde": "dpmsolver_multistep", "dpmpp_sde": "euler",
}
_SIGMA_KIND = {"karras": "karras", "exponential": "exponential", "beta_a1111": "beta", "beta_comfyui": "beta"}

__all__ = ["A1111_PIPELINE", "DIFFUSERS_PIPELINE", "PipelineConvention", "pipeline_convention"]


@dataclass(frozen=True)
class PipelineConvention:
    """Every A1111 / diffusers difference of the pipeline (see the module docstring)."""

    name: ConventionName
    sample_posterior: bool  # init images: posterior sample from the image's generator (else its mean)
    rounding: Rounding  # decoded image -> uint8
    latent_mask: Literal["bicubic_round", "binary_nearest"]
    blend_input: bool  # re-noise the kept region of the model input at each step (else blend the prediction only)
    blend_nine_channel: bool  # mask-blend the predictions of 9-channel inpainting UNets too
    overlay: bool  # paste the original pixels back outside the mask after decoding
    noise_start_at_full_strength: bool  # inpainting at strength 1 starts from pure noise (with the mask blend on)
    cfg_above_one_only: bool  # a CFG scale <= 1 runs the cond alone (diffusers) instead of uncond + s (cond - uncond)
    control_steps: ConventionName = "a1111"  # the ControlNet start/end rule (see the module docstring)
    control_resample: Literal["opencv", "lanczos"] = "opencv"  # control-image interpolation

    @property
    def img2img_steps(self) -> ConventionName:
        """The img2img step rule of :func:`sumie.sampling.img2img.img2img_plan`."""
        return self.name

    def rescale_space(self, prediction: str) -> RescaleSpace:
        """Where CFG rescale works: x0 (A1111's extension), else the model's own output (diffusers)."""
        if self.name == "a1111":
            return "x0"
        return "v" if prediction == "v" else "eps"

    def sampling(self, sampler: str, schedule: str, family: str) -> Convention:
        """Start-noise scale and network-timestep rule for a sampler and schedule (the diffusers scheduler's)."""
        if self.name != "diffusers":
            return A1111
        if sampler == "lcm":  # LCMScheduler: VP start, integer timesteps
            return Convention("diffusers", "vp", "round")
        sched = _DIFFUSERS_SCHEDULER.get(sampler)
        if sched is None:  # DDIM, PLMS, DDPM, UniPC, DPM++ 2S a: VP start, table timesteps
            return Convention("diffusers", "vp", "log")
        # the scheduler config's timestep_spacing: "trailing" where the schedule names it (SD-Turbo's), else the
        # stock configs' (SDXL leading, SD1/SD2 linspace)
        spacing = "trailing" if schedule == "trailing" else "leading" if family.startswith("sdxl") else "linspace"
        return diffusers_convention(sched, spacing, _SIGMA_KIND.get(schedule, "spacing"))  # type: ignore[arg-type]


A1111_PIPELINE = PipelineConvention("a1111", sample_posterior=False, rounding="truncate",
                                    latent_mask="bicubic_round", blend_input=False, blend_nine_channel=True,
                                    overlay=True, noise_start_at_full_strength=False, cfg_above_one_only=False)
DIFFUSERS_PIPELINE = PipelineConvention("diffusers", sample_posterior=True, rounding="round",
                                        latent_mask="binary_nearest", blend_input=True, blend_nine_channel=False,
                                        overlay=False, noise_start_at_full_strength=True, cfg_above_one_only=True,
                                        control_steps="diffusers", control_resample="lanczos")


def pipeline_convention(name: str) -> PipelineConvention:
    """The convention called ``name`` ("a1111" or "diffusers")."""
    if name == "a1111":
        return A1111_PIPELINE
    if name == "diffusers":
        return DIFFUSERS_PIPELINE
    raise ConfigError(f"unknown convention {name!r}; use a1111 or diffusers")
