"""One loaded checkpoint as the passes use it: its prompt encoder, its training schedule and its denoiser."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from sumie.checkpoints.loader import StableDiffusionModels
from sumie.pipelines.compiled import CompiledUNet
from sumie.pipelines.denoise import ModelHooks, UNetNetwork
from sumie.pipelines.scheduled_conds import PromptEncoder
from sumie.prompts.embeddings import EmbeddingLibrary
from sumie.prompts.text_conditioning import ConditioningOptions, TextConditioner
from sumie.prompts.tokenizer import CLIPTokenizer
from sumie.sampling.conventions import Convention, convention_denoiser
from sumie.sampling.denoisers import EpsDenoiser
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.samplers.lcm import LCMDenoiser

__all__ = ["ModelSet"]


class ModelSet:
    """A checkpoint's networks with its prompt encoder and denoiser factory (the base model or a refiner)."""

    def __init__(self, models: StableDiffusionModels, tokenizer: CLIPTokenizer,
                 embeddings: EmbeddingLibrary | None) -> None:
        self.models = models
        self.tokenizer = tokenizer
        self.embeddings = embeddings
        self.discretization = DiscreteSigmas.from_betas(zero_terminal_snr=models.zero_terminal_snr)
        self.compiled: CompiledUNet | None = None  # the opt-in compiled UNet (Engine.compile_unet)

    @property
    def name(self) -> str:
        """The checkpoint's file or folder name without extension (A1111's model name)."""
        return Path(self.models.source).stem

    def conditioner(self, clip_skip: int) -> TextConditioner:
        """The text encoders with A1111's clip skip."""
        return TextConditioner(self.models.config, self.models.text_encoders, self.embeddings,
                               ConditioningOptions(clip_skip=clip_skip), tokenizer=self.tokenizer)

    def encoder(self, clip_skip: int) -> PromptEncoder:
        """A prompt encoder (schedules, AND, SDXL size conditioning) with A1111's clip skip."""
        return PromptEncoder(self.models.config, self.conditioner(clip_skip))

    def empty_chunk(self, clip_skip: int) -> Tensor:
        """The empty prompt's context [1, 77, D] (A1111 ``cond_stage_model_empty_prompt``, for padding)."""
        return self.conditioner(clip_skip).empty().context

    @property
    def embedded_guidance(self) -> bool:
        """Whether the UNet takes the CFG scale as an input (LCM-distilled: a guidance embedding, no uncond pass)."""
        return self.models.config.unet.guidance_embed_dim is not None

    def denoiser(self, convention: Convention, sigmas: Tensor, hooks: ModelHooks | None = None,
                 consistency: bool = False) -> EpsDenoiser | LCMDenoiser:
        """The x0 denoiser of this model's UNet (with the request's hooks) under a timestep convention; with
        ``consistency`` wrapped in LCM's boundary condition at the same timesteps."""
        compiled = self.compiled if self.compiled is not None and self.compiled.unet is self.models.unet else None
        network = UNetNetwork(self.models.unet, hooks, compiled)  # the UNet may have been swapped (tests spy on it)
        den = convention_denoiser(self.models.config.prediction, network, self.discretization, convention, sigmas)
        return LCMDenoiser(den, den.schedule) if consistency else den
