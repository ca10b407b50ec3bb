"""The generation engine: one loaded model, ``engine.generate(params) -> GenerationResult``.

Flow of a request, as AUTOMATIC1111 1.10 ``process_images`` runs it (differences are noted where they are made):

1. validate; resolve the sampler and schedule; width/height default to the model's native size (the init image's
   size, rounded down to a multiple of 8, for img2img); seeds fixed (-1 -> random), image k gets ``seed + k``;
2. the prompts are scheduled and encoded once per pass (:mod:`sumie.pipelines.scheduled_conds`);
3. per batch (``n_iter`` of them) one :class:`~sumie.pipelines.variation.VariationRNG` gives the initial noise and
   the ancestral noise; the DPM++ SDE family gets per-image Brownian trees over the pass's whole schedule;
4. txt2img starts from noise, img2img and inpainting from the VAE latent of the init image plus noise at the
   first sigma of the img2img schedule (:func:`sumie.sampling.img2img.img2img_sigmas`); one
   :func:`~sumie.pipelines.denoise.denoise` loop runs the sampler; hires fix adds a second pass
   (:mod:`sumie.pipelines.hires`); an SDXL refiner takes over mid-pass;
5. each latent is decoded on its own and turned to uint8: A1111 truncates ``255 * clamp((x + 1) / 2, 0, 1)``,
   diffusers rounds ``255 * clamp(x / 2 + 0.5, 0, 1)`` (``params.convention``).

``params.convention`` picks whose numbers to reproduce where A1111 and diffusers differ:

* VAE encoding of init images: A1111 samples the posterior with the unseeded global torch RNG, which makes its
  img2img not reproducible bit for bit; Sumie's A1111 convention takes the posterior mean (the deterministic centre
  of what A1111 does). The diffusers convention samples it with each image's generator before the noise is drawn
  (and the masked image of 9-channel inpainting after it), as diffusers does with a list of per-image generators;
* img2img steps (:func:`sumie.sampling.img2img.img2img_plan`) and the uint8 rounding;
* start-noise scale and network timesteps: those of the diffusers scheduler matching the sampler (DPM++ 2M/SDE ->
  DPMSolverMultistep: VP start, rounded Karras timesteps; Euler family: ``leading`` spacing for SDXL, ``linspace``
  otherwise). ``generate(sigmas_fn=..., sampling_convention=...)`` pins the exact diffusers schedule;
* inpainting: A1111 blends the original latent into every prediction and pastes the original pixels back outside
  the mask (overlay); diffusers re-noises the kept region of the input after each step (not before the first call
  when it starts from pure noise at strength 1), blends nothing for 9-channel UNets and returns the decoded image
  as is. Latent mask: A1111 bicubic + round, diffusers binarized + nearest.

The hires-fix pass always uses A1111's rules (diffusers has no hires fix). With an SDXL refiner the images are
decoded by the refiner's VAE, as A1111 (the model loaded at the end decodes).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sumie.checkpoints.embedded import resolve_model
from sumie.checkpoints.loader import StableDiffusionModels, load_models
from sumie.errors import ConfigError
from sumie.models.taesd import TAESD
from sumie.pipelines import hires as hires_mod
from sumie.pipelines import images as img_ops
from sumie.pipelines.denoise import GuidedModel, Stage, UNetNetwork, denoise, refiner_switch, sampler_options
from sumie.pipelines.params import DEFAULT_CFG_SCALE, GenerationParams
from sumie.pipelines.scheduled_conds import (
    PromptConds,
    PromptEncoder,
    SDXLSizes,
    describe_networks,
    total_steps,
)
from sumie.pipelines.variation import VariationRNG, all_seeds, fixed_seed
from sumie.prompts.embeddings import EmbeddingLibrary
from sumie.prompts.parser import strip_comments
from sumie.prompts.text_conditioning import ConditioningOptions, TextConditioner
from sumie.prompts.tokenizer import CLIPTokenizer
from sumie.sampling import registry
from sumie.sampling.conventions import A1111, Convention, convention_denoiser, diffusers_convention
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.img2img import img2img_plan
from sumie.sampling.registry import SamplerSpec
from sumie.sampling.samplers.common import Callback

__all__ = ["Engine", "GenerationResult", "PreviewFn", "ProgressFn", "load"]

# progress(done_steps, total_steps) after every sampler step of the request (all batches and passes)
ProgressFn = Callable[[int, int], None]
# preview(done_steps, images) with the current prediction of every image of the batch
PreviewFn = Callable[[int, list[Image.Image]], None]
SigmasFn = Callable[[int], Tensor]

# diffusers scheduler of each sampler, for the diffusers convention's start scale and timestep rounding
_DIFFUSERS_SCHEDULER = {
    "euler": "euler", "euler_ancestral": "euler_ancestral", "heun": "heun", "dpm_2": "kdpm2",
    "dpm_2_ancestral": "kdpm2_ancestral", "lms": "lms", "dpmpp_2m": "dpmsolver_multistep",
    "dpmpp_2m_sde": "dpmsolver_multistep", "dpmpp_2m_sde_heun": "dpmsolver_multistep",
    "dpmpp_3m_sde": "dpmsolver_multistep", "dpmpp_sde": "euler",
}
_SIGMA_KIND = {"karras": "karras", "exponential": "exponential", "beta_a1111": "beta", "beta_comfyui": "beta"}


@dataclass
class GenerationResult:
    """Images of a request with their A1111 infotexts, per-image seeds and the params as run (seeds, size resolved)."""

    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    subseeds: list[int]
    params: GenerationParams


def _uses_white_noise(spec: SamplerSpec, eta: float | None) -> bool:
    """Whether a sampler draws per-image white noise after the initial noise (where ENSD changes the image)."""
    if not spec.stochastic or spec.needs_brownian:
        return False
    default = inspect.signature(spec.function).parameters.get("eta")
    value = eta if eta is not None else (default.default if default is not None else 1.0)
    return value != 0


def _native_size(models: StableDiffusionModels) -> int:
    if models.native_size is not None:
        return models.native_size
    family = models.config.family
    if family.startswith("sdxl"):
        return 1024
    return 768 if family == "sd2" and models.config.prediction == "v" else 512


def _check_multiple(name: str, value: int, factor: int) -> None:
    if value < factor or value % factor:
        lo = max(factor, value // factor * factor)
        raise ConfigError(f"{name} {value} is not a multiple of {factor}; use {lo} or {lo + factor}")


@dataclass
class _Job:
    """Per-request state shared by the passes."""

    params: GenerationParams
    spec: SamplerSpec
    schedule: str
    convention: Convention
    width: int
    height: int
    batch_size: int
    sigmas_fn: SigmasFn | None
    progress: _Progress
    options: dict[str, Any]
    conds: dict[tuple[Any, ...], tuple[PromptConds, PromptConds]]
    extra: dict[str, object]
    decode_vae: Any = None


@dataclass
class _Init:
    """img2img inputs of a request: processing-size images, their tensors, masks and (A1111) latents."""

    images: list[Image.Image]
    tensor: Tensor  # [B, 3, H, W] in [-1, 1], repeated to the batch size
    inputs: list[img_ops.InpaintInputs] | None = None
    nmask: Tensor | None = None  # [1, 1, h, w], 1 = repaint
    mask_full: Tensor | None = None  # [1, 1, H, W] in [0, 1] for 9-channel UNets
    latent: Tensor | None = None  # A1111 convention: posterior means [B, 4, h, w]
    image_cond: Tensor | None = None  # A1111 convention: 9-channel UNet input [B, 5, h, w]
    reps: int = 1  # how often the one init image is repeated to fill the batch


class _Progress:
    """Counts sampler steps over a request; drives the tqdm bar, the progress callback and previews."""

    def __init__(self, total: int, progress: ProgressFn | None, preview: PreviewFn | None, every: int,
                 decode: Callable[[Tensor], list[Image.Image]], show: bool | None) -> None:
        self.total, self.done = total, 0
        self.progress, self.preview, self.every, self.decode = progress, preview, max(int(every), 1), decode
        self.bar = None
        if show is not False:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", disable=None if show is None else not show, leave=False)

    def callback(self, steps: int) -> Callback:
        """A sampler callback for a pass of ``steps`` steps."""
        start, seen = self.done, [0]

        def cb(d: dict[str, Any]) -> None:
            i = min(int(d["i"]) + 1, steps)
            if i <= seen[0]:
                return
            if self.bar is not None:
                self.bar.update(i - seen[0])
            seen[0] = i
            self.done = start + i
            if self.progress is not None:
                self.progress(self.done, self.total)
            if self.preview is not None and (i % self.every == 0 or i == steps):
                self.preview(self.done, self.decode(d["denoised"]))

        return cb

    def finish_pass(self, start: int, steps: int) -> None:
        """Account a pass that ran fewer callbacks than planned (e.g. strength 0)."""
        if self.done < start + steps:
            if self.bar is not None:
                self.bar.update(start + steps - self.done)
            self.done = start + steps

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


class _ModelSet:
    """One checkpoint's networks with its prompt encoder and denoiser factory (base model or refiner)."""

    def __init__(self, models: StableDiffusionModels, tokenizer: CLIPTokenizer,
                 embeddings: EmbeddingLibrary | None) -> None:
        self.models = models
        self.tokenizer = tokenizer
        self.embeddings = embeddings
        self.discretization = DiscreteSigmas.from_betas(zero_terminal_snr=models.zero_terminal_snr)
        self.network = UNetNetwork(models.unet)

    @property
    def name(self) -> str:
        """The checkpoint's file or folder name without extension (A1111's model name)."""
        return Path(self.models.source).stem

    def encoder(self, clip_skip: int) -> PromptEncoder:
        """A prompt encoder with A1111's clip skip."""
        cond = TextConditioner(self.models.config, self.models.text_encoders, self.embeddings,
                               ConditioningOptions(clip_skip=clip_skip), tokenizer=self.tokenizer)
        return PromptEncoder(self.models.config, cond)

    def denoiser(self, convention: Convention, sigmas: Tensor) -> Any:
        """The x0 denoiser of this model's UNet under a timestep convention."""
        self.network.unet = self.models.unet  # the UNet may be swapped (tests spy on it)
        return convention_denoiser(self.models.config.prediction, self.network, self.discretization, convention,
                                   sigmas)


class Engine:
    """A loaded Stable Diffusion model ready to generate (see the module docstring); one request at a time.

    ``show_progress``: tqdm bar on stderr (None = only on a terminal). Attributes: ``models``
    (:class:`~sumie.checkpoints.loader.StableDiffusionModels`), ``tokenizer``, ``embeddings``, ``discretization``,
    ``taesd`` (previews; None = previews decode with the full VAE), ``embeddings_dir``.
    """

    def __init__(self, models: StableDiffusionModels, *, tokenizer: CLIPTokenizer | None = None,
                 embeddings: EmbeddingLibrary | None = None, embeddings_dir: str | Path | None = None,
                 taesd: TAESD | None = None) -> None:
        self.tokenizer = tokenizer or CLIPTokenizer()
        self.embeddings_dir = Path(embeddings_dir) if embeddings_dir is not None else None
        if embeddings is None and self.embeddings_dir is not None:
            embeddings = EmbeddingLibrary.from_folder(self.embeddings_dir, models.config, self.tokenizer)
        self.base = _ModelSet(models, self.tokenizer, embeddings)
        self.taesd = taesd
        self.show_progress: bool | None = None
        self._refiners: dict[str, _ModelSet] = {}

    # ---------------------------------------------------------------- properties
    @property
    def models(self) -> StableDiffusionModels:
        """The base model's networks."""
        return self.base.models

    @property
    def embeddings(self) -> EmbeddingLibrary | None:
        """Textual-inversion embeddings of the base model."""
        return self.base.embeddings

    @property
    def discretization(self) -> DiscreteSigmas:
        """The training noise schedule (zero-terminal-SNR when the checkpoint says so)."""
        return self.base.discretization

    @property
    def device(self) -> torch.device:
        """Where the UNet lives."""
        return next(self.models.unet.parameters()).device

    def refiner(self, model: str | Path) -> _ModelSet:
        """The refiner checkpoint (loaded on first use with the base model's dtype and device, then kept)."""
        key = str(model)
        if key not in self._refiners:
            dtype = next(self.models.unet.parameters()).dtype
            refined = load_models(key, dtype=dtype, device=self.device)
            emb = None
            if self.embeddings_dir is not None:
                emb = EmbeddingLibrary.from_folder(self.embeddings_dir, refined.config, self.tokenizer)
            self._refiners[key] = _ModelSet(refined, self.tokenizer, emb)
        return self._refiners[key]

    @property
    def default_cfg_scale(self) -> float:
        """The CFG scale used when a request gives none: the model file's recommendation, else A1111's 7."""
        return self.models.cfg_scale if self.models.cfg_scale is not None else DEFAULT_CFG_SCALE

    # ---------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, params: GenerationParams, *, progress: ProgressFn | None = None,
                 preview: PreviewFn | None = None, preview_every: int = 5, sigmas_fn: SigmasFn | None = None,
                 sampling_convention: Convention | None = None) -> GenerationResult:
        """Run a request: txt2img, img2img (``init_images``) or inpainting (``inpaint``); see the module docstring.

        ``progress(done, total)`` follows every sampler step; ``preview(done, images)`` gets the current prediction
        every ``preview_every`` steps (TAESD if loaded, else the VAE). Expert overrides: ``sigmas_fn(n) -> sigmas
        [n + 1]`` replaces the named schedule (e.g. a diffusers scheduler's exact sigmas) and
        ``sampling_convention`` the start-noise scale / network-timestep rule.
        """
        p = params
        if p.cfg_scale is None:
            p = dataclasses.replace(p, cfg_scale=self.default_cfg_scale)
        self._validate(p)
        spec, schedule = registry.resolve(p.sampler, p.scheduler)
        sampler_opts = sampler_options(spec, p.eta, p.s_noise)
        mode_img2img = bool(p.init_images)
        if p.inpaint is not None and not mode_img2img:
            raise ConfigError("inpainting needs an init image; pass init_images=[image] with the mask")
        if p.hires is not None and mode_img2img:
            raise ConfigError("hires fix is a txt2img option; for img2img set width/height to the larger size")
        width, height = self._size(p)
        batch_size = p.batch_size
        if mode_img2img:
            if len(p.init_images) > batch_size and batch_size != 1:
                raise ConfigError(f"{len(p.init_images)} init images for batch size {batch_size}; pass at most "
                                  f"{batch_size} images or raise the batch size")
            if len(p.init_images) > 1:
                batch_size = len(p.init_images)
        seed, subseed = fixed_seed(p.seed), fixed_seed(p.subseed)
        job_extra: dict[str, object] = {}
        if p.eta_noise_seed_delta and _uses_white_noise(spec, p.eta):
            job_extra["ENSD"] = p.eta_noise_seed_delta
        count = batch_size * p.n_iter
        seeds, subseeds = all_seeds(seed, subseed, count, p.subseed_strength)
        convention = sampling_convention or self._convention(spec, schedule, p.convention)
        resolved = dataclasses.replace(p, seed=seed, subseed=subseed, width=width, height=height,
                                       batch_size=batch_size)
        job = _Job(resolved, spec, schedule, convention, width, height, batch_size, sigmas_fn,
                   None, sampler_opts, {}, job_extra)  # type: ignore[arg-type]
        plan = hires_mod.plan_hires(width, height, p.hires, p.steps) if p.hires is not None else None
        per_batch = self._planned_steps(job, plan, mode_img2img)
        job.progress = _Progress(per_batch * p.n_iter, progress, preview, preview_every, self._preview_images,
                                 self.show_progress)
        images: list[Image.Image] = []
        try:
            init = self._prepare_init(job) if mode_img2img else None
            for it in range(p.n_iter):
                batch_seeds = seeds[it * batch_size : (it + 1) * batch_size]
                batch_subseeds = subseeds[it * batch_size : (it + 1) * batch_size]
                job.decode_vae = self.models.vae
                if init is not None:
                    latent = self._img2img(job, init, batch_seeds, batch_subseeds, seeds[:batch_size])
                else:
                    latent = self._txt2img(job, batch_seeds, batch_subseeds, refiner_ok=plan is None)
                    if plan is not None:
                        latent = self._hires(job, plan, latent, batch_seeds, batch_subseeds)
                batch = self.decode(latent, p.convention, vae=job.decode_vae)
                if init is not None and init.inputs is not None and p.convention == "a1111":  # diffusers: none
                    batch = [img_ops.apply_overlay(im, init.inputs[k % len(init.inputs)].overlay,
                                                   init.inputs[k % len(init.inputs)].paste_to)
                             for k, im in enumerate(batch)]
                images.extend(batch)
        finally:
            job.progress.close()
        # A1111 writes the prompts with comments stripped (its comments script edits p.all_prompts)
        shown = dataclasses.replace(resolved, prompt=strip_comments(p.prompt),
                                    negative_prompt=strip_comments(p.negative_prompt))
        infotexts = [self._infotext(shown, seeds[k], subseeds[k], k, job.extra) for k in range(len(images))]
        for image, text in zip(images, infotexts, strict=True):
            image.info["parameters"] = text
        return GenerationResult(images, infotexts, seeds[: len(images)], subseeds[: len(images)], resolved)

    # ---------------------------------------------------------------- validation and setup
    def _validate(self, p: GenerationParams) -> None:
        from sumie.pipelines import validation

        validation.check_request(p)

    def _size(self, p: GenerationParams) -> tuple[int, int]:
        from sumie.pipelines import validation

        return validation.processing_size(p, self.models.vae.downscale, _native_size(self.models))

    def _convention(self, spec: SamplerSpec, schedule: str, name: str) -> Convention:
        """A1111's, or the diffusers scheduler's start scale and timestep rule for this sampler and schedule."""
        if name != "diffusers":
            return A1111
        sched = _DIFFUSERS_SCHEDULER.get(spec.name)
        if sched is None:  # DDIM, PLMS, DDPM, UniPC, LCM, DPM++ 2S a: VP start, table timesteps
            return Convention("diffusers", "vp", "log")
        spacing = "leading" if self.models.config.family.startswith("sdxl") else "linspace"
        return diffusers_convention(sched, spacing, _SIGMA_KIND.get(schedule, "spacing"))  # type: ignore[arg-type]

    def full_sigmas(self, job: _Job, steps: int, models: _ModelSet | None = None) -> Tensor:
        """The whole ``steps``-step schedule of the request's sampler (or ``sigmas_fn``'s), ending in 0."""
        if steps < 1:
            raise ConfigError(f"a schedule needs at least one step, got {steps}")
        if job.sigmas_fn is not None:
            return job.sigmas_fn(steps).float()
        ms = models or self.base
        return registry.make_sigmas(job.spec, job.schedule, ms.discretization, steps,
                                    family=ms.models.config.family).float()

    def img2img_schedule(self, job: _Job, steps: int, strength: float, convention: str,
                         fix_steps: bool = False) -> tuple[Tensor, Tensor]:
        """(visited sigmas, whole schedule) of an img2img pass; the visited part is empty when nothing runs."""
        n, start = img2img_plan(steps, strength, convention, fix_steps)  # type: ignore[arg-type]
        if n == 0:
            return torch.zeros(0), torch.zeros(0)
        full = self.full_sigmas(job, n)
        return full[start:], full

    def _planned_steps(self, job: _Job, plan: hires_mod.HiresPlan | None, img2img: bool) -> int:
        p = job.params
        if img2img:
            visited, _ = self.img2img_schedule(job, p.steps, p.denoising_strength, p.convention)
            return max(len(visited) - 1, 0)
        steps = len(self.full_sigmas(job, p.steps)) - 1
        if plan is not None:
            visited, _ = self.img2img_schedule(job, plan.steps, plan.strength, "a1111", fix_steps=True)
            steps += len(visited) - 1
        return steps

    # ---------------------------------------------------------------- conditioning and passes
    def pass_conds(self, job: _Job, models: _ModelSet, steps: int, hires_steps: int | None,
                   size: tuple[int, int]) -> tuple[PromptConds, PromptConds]:
        """(cond, uncond) of a pass, cached per model, step plan and size; warns about ignored extra networks."""
        p = job.params
        key = (id(models), steps, hires_steps, size)
        if key not in job.conds:
            sdxl = SDXLSizes(p.sdxl_original_size or size, tuple(p.sdxl_crop), p.sdxl_target_size or size)
            enc = models.encoder(p.clip_skip)
            cond = enc.encode(p.prompt, steps, hires_steps=hires_steps, sizes=sdxl)
            uncond = enc.encode(p.negative_prompt, steps, hires_steps=hires_steps, negative=True, sizes=sdxl)
            ignored = describe_networks(cond) + describe_networks(uncond)
            if ignored and not job.conds:
                warnings.warn(f"extra networks are not supported yet and were ignored: {', '.join(ignored)}",
                              stacklevel=3)
            job.conds[key] = (cond, uncond)
        return job.conds[key]

    def sample_pass(self, job: _Job, *, sigmas: Tensor, full_sigmas: Tensor, rng: VariationRNG, noise: Tensor,
                    seeds: Sequence[int], size: tuple[int, int], steps: int, hires_steps: int | None,
                    init_latent: Tensor | None = None, image_cond: Tensor | None = None, mask: Tensor | None = None,
                    refiner_ok: bool = True, blend_input: bool = False, start_from_noise: bool = False) -> Tensor:
        """One sampling pass over ``sigmas`` (prompt schedules planned for ``steps`` / ``hires_steps`` user steps).

        ``init_latent``: img2img start (and the original kept under ``mask``, 1 = generate); ``start_from_noise``
        starts from noise alone while still blending towards ``init_latent`` (diffusers' inpainting at strength 1);
        ``image_cond``: the 9-channel UNet's mask + masked-image latent [B, 5, h, w].
        """
        p, spec = job.params, job.spec
        planned = total_steps(spec.name, steps)
        planned_hr = total_steps(spec.name, hires_steps) if hires_steps is not None else None
        stages, switch = [], None
        sets = [self.base]
        if p.refiner is not None and refiner_ok:
            if not 0.0 <= p.refiner.switch_at <= 1.0:
                raise ConfigError(f"refiner switch point must be in [0, 1], got {p.refiner.switch_at}")
            sets.append(self.refiner(p.refiner.model))
            if sets[-1].models.config.inpainting != self.models.config.inpainting:
                raise ConfigError("the refiner must be an inpainting model exactly when the base model is one")
            switch = refiner_switch(self.base.discretization, p.refiner.switch_at)
        for ms in sets:
            cond, uncond = self.pass_conds(job, ms, planned, planned_hr, size)
            stages.append(Stage(ms.denoiser(job.convention, sigmas), cond, uncond, image_cond))
        space = "x0" if p.convention == "a1111" else ("v" if self.models.config.prediction == "v" else "eps")
        model = GuidedModel(stages, p.cfg_scale, p.cfg_rescale, space, switch, mask=mask,  # type: ignore[arg-type]
                            init_latent=init_latent if mask is not None else None,
                            noise=noise if blend_input else None, blend_input=blend_input,
                            blend_from_call=1 if start_from_noise else 0)
        noise_sampler = None
        if spec.stochastic or job.options:
            noise_sampler = registry.make_noise_sampler(spec, seeds, tuple(noise.shape[1:]), full_sigmas, rng=rng,
                                                        device=noise.device)
        n_steps = max(len(sigmas) - 1, 0)
        start = job.progress.done
        out = denoise(model, sigmas, spec, noise, init_latent=None if start_from_noise else init_latent,
                      noise_sampler=noise_sampler, convention=job.convention, callback=job.progress.callback(n_steps),
                      options=job.options)
        job.progress.finish_pass(start, n_steps)
        if model.switched_at is not None:
            job.decode_vae = sets[-1].models.vae  # A1111 decodes with the model loaded at the end: the refiner
        return out

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of a width x height image."""
        f = self.models.vae.downscale
        return self.models.config.unet.out_channels, height // f, width // f

    def _txt2img(self, job: _Job, seeds: list[int], subseeds: list[int], refiner_ok: bool) -> Tensor:
        p = job.params
        rng = VariationRNG(seeds, self.latent_shape(job.width, job.height), subseeds, p.subseed_strength,
                           p.eta_noise_seed_delta, device=self.device)
        noise = rng.first()
        sigmas = self.full_sigmas(job, p.steps)
        return self.sample_pass(job, sigmas=sigmas, full_sigmas=sigmas, rng=rng, noise=noise, seeds=seeds,
                                size=(job.height, job.width), steps=p.steps, hires_steps=None,
                                image_cond=self.blank_image_cond(len(seeds), job.width, job.height),
                                refiner_ok=refiner_ok)

    def _hires(self, job: _Job, plan: hires_mod.HiresPlan, latent: Tensor, seeds: list[int],
               subseeds: list[int]) -> Tensor:
        p = job.params
        if plan.upscaler == "latent":
            samples = hires_mod.upscale_latent(latent, plan)
        else:  # decode, uint8 as A1111, Lanczos to the target (rounded down to whole latent pixels), encode
            f = self.models.vae.downscale
            ux, uy = plan.upscale_x // f * f, plan.upscale_y // f * f
            low = img_ops.to_image(self._decode_tensor(latent, self.models.vae), "truncate")
            samples = self.encode_images([img_ops.resize_image(im, ux, uy, "just_resize") for im in low])
        samples = hires_mod.truncate_latent(samples, plan)
        f = self.models.vae.downscale
        h, w = samples.shape[-2] * f, samples.shape[-1] * f
        rng = VariationRNG(seeds, tuple(samples.shape[1:]), subseeds, p.subseed_strength, p.eta_noise_seed_delta,
                           device=self.device)
        noise = rng.first()
        sigmas, full = self.img2img_schedule(job, plan.steps, plan.strength, "a1111", fix_steps=True)
        return self.sample_pass(job, sigmas=sigmas, full_sigmas=full, rng=rng, noise=noise, seeds=seeds,
                                size=(plan.upscale_y, plan.upscale_x), steps=p.steps, hires_steps=plan.steps,
                                init_latent=samples, image_cond=self.blank_image_cond(len(seeds), w, h),
                                refiner_ok=True)

    # ---------------------------------------------------------------- img2img and inpainting
    def _prepare_init(self, job: _Job) -> _Init:
        """Init images at the processing size (masks, fill, crops as A1111's img2img ``init``), latents if A1111."""
        p = job.params
        w, h = job.width, job.height
        inputs = None
        if p.inpaint is not None:
            inputs = [img_ops.prepare_inpaint(im, p.inpaint, w, h, p.resize_mode, p.inpaint.latent_mask)
                      for im in p.init_images]
            if inputs[0].mask is None:  # "only masked" with an empty mask: plain img2img, as A1111
                inputs = None
        if inputs is not None:
            pictures = [i.image for i in inputs]
        else:
            pictures = [img_ops.resize_image(img_ops.flatten(im), w, h, p.resize_mode) for im in p.init_images]
        reps = job.batch_size if len(pictures) == 1 else 1
        tensor = torch.cat([img_ops.to_tensor(im, convention=p.convention) for im in pictures]).repeat(reps, 1, 1, 1)
        init = _Init(pictures, tensor, inputs, reps=reps)
        if inputs is not None:
            c, lh, lw = self.latent_shape(w, h)
            init.mask_full = img_ops.mask_to_tensor(inputs[0].mask)
            if p.convention == "diffusers":  # binarized, nearest-downsampled (``prepare_mask_latents``)
                init.nmask = F.interpolate((init.mask_full >= 0.5).float(), size=(lh, lw)).to(self.device)
            else:  # bicubic to latent size, rounded (A1111)
                init.nmask = img_ops.latent_mask(inputs[0].latent_mask_source, lh, lw).to(self.device)
        if p.convention == "a1111":  # deterministic: posterior means, computed once (A1111 encodes once too)
            init.latent = self.encode_tensor(tensor[:1] if reps > 1 else tensor).repeat(reps, 1, 1, 1)
            init.image_cond = self._inpaint_cond(init, None)
        return init

    def _inpaint_cond(self, init: _Init, generators: Sequence[torch.Generator] | None) -> Tensor | None:
        """[B, 5, h, w] mask + masked-image latent for 9-channel UNets (None for other UNets)."""
        if not self.models.config.inpainting:
            return None
        b, _, hh, ww = init.tensor.shape
        if init.mask_full is None:
            return self.blank_image_cond(b, ww, hh)
        conv = "a1111" if generators is None else "diffusers"
        if generators is None and init.reps > 1:  # one image repeated: the mean latent is the same for all
            b = 1
        outs = []
        for i in range(b):
            latent, mask = img_ops.inpaint_model_inputs(
                init.tensor[i : i + 1].to(self.device), init.mask_full.to(self.device), self.models.vae, conv,
                generator=None if generators is None else generators[i], sample=generators is not None)
            outs.append(torch.cat([mask, latent], dim=1).float())
        return torch.cat(outs).expand(init.tensor.shape[0], -1, -1, -1)

    def _img2img(self, job: _Job, init: _Init, seeds: list[int], subseeds: list[int],
                 first_seeds: list[int]) -> Tensor:
        p = job.params
        shape = self.latent_shape(job.width, job.height)
        rng = VariationRNG(seeds, shape, subseeds, p.subseed_strength, p.eta_noise_seed_delta, device=self.device)
        masked = init.nmask is not None
        nine = self.models.config.inpainting
        strength_max = p.denoising_strength >= 1.0
        if p.convention == "diffusers":  # one generator per image: image latent, noise, masked-image latent
            latent = None
            if not (masked and nine and strength_max):
                latent = self.encode_tensor(init.tensor, generators=rng.generators)
            noise = rng.first()
            image_cond = self._inpaint_cond(init, rng.generators)
            if latent is None:
                latent = torch.zeros_like(noise)
        else:
            latent, image_cond = init.latent, init.image_cond
            noise = rng.first()
        assert latent is not None
        if masked and p.inpaint is not None and p.inpaint.fill == "latent_noise":
            fill_noise = VariationRNG(first_seeds, shape, device=self.device).first()  # A1111: seeds of batch 1
            latent = img_ops.apply_latent_fill(latent, init.nmask, "latent_noise", fill_noise)
        elif masked and p.inpaint is not None:
            latent = img_ops.apply_latent_fill(latent, init.nmask, p.inpaint.fill)
        sigmas, full = self.img2img_schedule(job, p.steps, p.denoising_strength, p.convention)
        diffusers = p.convention == "diffusers"
        mask = init.nmask if masked and not (diffusers and nine) else None
        if len(sigmas) < 2:
            return latent
        return self.sample_pass(job, sigmas=sigmas, full_sigmas=full, rng=rng, noise=noise, seeds=seeds,
                                size=(job.height, job.width), steps=p.steps, hires_steps=None, init_latent=latent,
                                image_cond=image_cond, mask=mask, blend_input=diffusers and mask is not None,
                                start_from_noise=diffusers and masked and strength_max)

    # ---------------------------------------------------------------- VAE
    def encode_images(self, images: Sequence[Image.Image], generators: Sequence[torch.Generator] | None = None,
                      vae: Any = None) -> Tensor:
        """RGB images -> scaled latents [B, 4, H/8, W/8] (see :meth:`encode_tensor`)."""
        return self.encode_tensor(torch.cat([img_ops.to_tensor(im) for im in images]), generators, vae)

    def encode_tensor(self, x: Tensor, generators: Sequence[torch.Generator] | None = None,
                      vae: Any = None) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8], one image at a time: the posterior
        mean, or a sample drawn from each image's generator when ``generators`` are given (diffusers)."""
        vae = vae or self.models.vae
        device = next(vae.parameters()).device
        out = []
        for i in range(x.shape[0]):
            post = vae.encode(x[i : i + 1].to(device))
            z = post.mean if generators is None else post.sample(generators[i])
            out.append(vae.scale_latents(z).float())
        return torch.cat(out)

    def blank_image_cond(self, b: int, width: int, height: int) -> Tensor | None:
        """9-channel UNets without a mask: all-ones mask + latent of a mid-grey image (A1111); None otherwise."""
        if not self.models.config.inpainting:
            return None
        latent, mask = img_ops.txt2img_inpaint_inputs(1, height, width, self.models.vae, device=self.device,
                                                      sample=False)
        return torch.cat([mask, latent], dim=1).float().expand(b, -1, -1, -1)

    def _decode_tensor(self, latent: Tensor, vae: Any) -> Tensor:
        out = [vae.decode(vae.unscale_latents(latent[i : i + 1])).float() for i in range(latent.shape[0])]
        return torch.cat(out)

    def decode(self, latent: Tensor, convention: str = "a1111", vae: Any = None) -> list[Image.Image]:
        """Scaled latents [B, 4, h, w] -> PIL images, decoded one at a time (A1111 ``decode_latent_batch``)."""
        x = self._decode_tensor(latent, vae or self.models.vae)
        return img_ops.to_image(x, "round" if convention == "diffusers" else "truncate")

    def _preview_images(self, latent: Tensor) -> list[Image.Image]:
        if self.taesd is not None:
            x = self.taesd.decode(latent.to(self.taesd.dtype)).float()
        else:
            x = self._decode_tensor(latent, self.models.vae)
        return img_ops.to_image(x, "truncate")

    # ---------------------------------------------------------------- metadata
    def _infotext(self, p: GenerationParams, seed: int, subseed: int, index: int, extra: dict[str, object]) -> str:
        try:
            from sumie.pipelines.infotext import format_infotext
        except ImportError:
            return _basic_infotext(p, seed, subseed, self.base.name, self.models.hash, extra)
        return format_infotext(p, seed=seed, subseed=subseed, index=index, model_name=self.base.name,
                               model_hash=self.models.hash, extra=dict(extra))


def _basic_infotext(p: GenerationParams, seed: int, subseed: int, model_name: str, model_hash: str | None,
                    extra: dict[str, object]) -> str:
    """A minimal A1111-style ``parameters`` text (used until the full formatter is available)."""
    fields: dict[str, object] = {"Steps": p.steps, "Sampler": p.sampler, "CFG scale": p.cfg_scale, "Seed": seed,
                                 "Size": f"{p.width}x{p.height}", "Model hash": model_hash, "Model": model_name}
    if p.subseed_strength:
        fields["Variation seed"], fields["Variation seed strength"] = subseed, p.subseed_strength
    if p.init_images:
        fields["Denoising strength"] = p.denoising_strength
    fields.update(extra)
    params = ", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None)
    neg = f"\nNegative prompt: {p.negative_prompt}" if p.negative_prompt else ""
    return f"{p.prompt}{neg}\n{params}"


def load(model: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
         vae: str | Path | None = None, prediction: str | None = None, embeddings_dir: str | Path | None = None,
         taesd: str | Path | None = None) -> Engine:
    """Load a checkpoint (single file or diffusers folder) into an :class:`Engine`.

    ``model``: a path, or None / ``"sumie-tiny"`` for the embedded default model (64 px, trained by Sumie);
    ``vae``: a standalone VAE file replacing the built-in one; ``prediction``: force "eps" or "v";
    ``embeddings_dir``: textual-inversion embeddings; ``taesd``: a TAESD (decoder) file for cheap previews.
    """
    models = load_models(resolve_model(model), dtype=dtype, device=device, prediction=prediction, vae=vae)
    tiny = None
    if taesd is not None:
        from sumie.checkpoints.io import load_state_dict

        tiny = TAESD.from_state_dict(load_state_dict(taesd), device=device, dtype=dtype)
        if tiny.decoder is None:
            raise ConfigError(f"{taesd}: this TAESD file has no decoder; previews need the decoder part")
        tiny.eval().requires_grad_(False)
    return Engine(models, embeddings_dir=embeddings_dir, taesd=tiny)
