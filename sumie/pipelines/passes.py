"""The sampling passes of one batch: txt2img, the hires-fix second pass, img2img / inpainting (A1111 1.10 order).

Every pass ends in :func:`sample_pass`: conds for the pass (cached per model, step plan and size), a
:class:`~sumie.pipelines.denoise.GuidedModel` over one or two stages (base, refiner), the mask wrapper for
inpainting, then the one :func:`~sumie.pipelines.denoise.denoise` loop. An interrupt or skip (``JobControl``) ends
the pass at the next step and returns the newest prediction, as A1111 does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sumie.errors import ConfigError
from sumie.models.hooks import DeepCache
from sumie.models.tome import TokenMerging
from sumie.models.upscalers.detect import Upscaler
from sumie.pipelines import hires as hires_mod
from sumie.pipelines import images as img_ops
from sumie.pipelines import inpaint as inpaint_ops
from sumie.pipelines import masks as mask_ops
from sumie.pipelines import vae_io
from sumie.pipelines.control import PassName
from sumie.pipelines.denoise import GuidedModel, Stage, denoise, refiner_switch
from sumie.pipelines.job import Job, StopBatch
from sumie.pipelines.modelset import ModelSet
from sumie.pipelines.params import GenerationParams
from sumie.pipelines.scheduled_conds import PromptConds, SDXLSizes, total_steps
from sumie.pipelines.upscale import upscale
from sumie.pipelines.variation import VariationRNG
from sumie.sampling import registry
from sumie.sampling.guidance import masked_model
from sumie.sampling.img2img import img2img_schedule

__all__ = ["InitImages", "Run", "speed_hooks"]


def speed_hooks(p: GenerationParams, pass_name: PassName, latent_size: tuple[int, int],
                seed: int) -> dict[str, object]:
    """The UNet hooks of the speed options that change the image, for one pass (empty when they are off): ToMe at
    A1111's ratio for the pass (the hires pass: ``token_merging_ratio_hr``, else the first pass's) and DeepCache."""
    out: dict[str, object] = {}
    ratio = p.token_merging_ratio
    if pass_name == "hires":
        ratio = p.token_merging_ratio_hr or ratio
    if ratio > 0:
        generator = torch.Generator().manual_seed(seed) if p.token_merging_random else None
        out["token_merge"] = TokenMerging(ratio, (int(latent_size[0]), int(latent_size[1])), generator=generator)
    if p.deepcache_interval > 1:
        out["deep_cache"] = DeepCache(p.deepcache_interval, p.deepcache_depth)
    return out


@dataclass
class InitImages:
    """img2img inputs of a request: processing-size images, their tensors, masks and (A1111) latents."""

    images: list[Image.Image]
    tensor: Tensor  # [B, 3, H, W] in [-1, 1], repeated to the batch size
    inputs: list[inpaint_ops.InpaintInputs] | None = None
    nmask: Tensor | None = None  # [1, 1, h, w], 1 = repaint
    mask_full: Tensor | None = None  # [1, 1, H, W] in [0, 1] for 9-channel UNets
    latent: Tensor | None = None  # A1111 convention: posterior means [B, 4, h, w]
    image_cond: Tensor | None = None  # A1111 convention: 9-channel UNet input [B, 5, h, w]
    reps: int = 1  # how often the one init image is repeated to fill the batch


@dataclass
class Run:
    """The passes of one request: the job, the base model and how to get a refiner."""

    job: Job
    base: ModelSet
    refiner: Callable[[str], ModelSet]
    upscaler: Upscaler | None = None  # the hires fix's upscaler model (None: latent / lanczos)

    # ---------------------------------------------------------------- shapes and schedules
    @property
    def device(self) -> torch.device:
        """Where the UNet lives."""
        return next(self.base.models.unet.parameters()).device

    @property
    def vae(self):  # noqa: ANN201 - AutoencoderKL
        """The base model's VAE."""
        return self.base.models.vae

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of a width x height image."""
        f = self.vae.downscale
        return self.base.models.config.unet.out_channels, height // f, width // f

    def full_sigmas(self, steps: int) -> Tensor:
        """The whole ``steps``-step schedule of the request's sampler (or ``sigmas_fn``'s), ending in 0."""
        job = self.job
        if steps < 1:
            raise ConfigError(f"a schedule needs at least one step, got {steps}")
        if job.sigmas_fn is not None:
            return job.sigmas_fn(steps).float()
        return registry.make_sigmas(job.spec, job.schedule, self.base.discretization, steps,
                                    family=self.base.models.config.family).float()

    def img2img_schedule(self, steps: int, strength: float, rule: str,
                         fix_steps: bool = False) -> tuple[Tensor, Tensor]:
        """(visited sigmas, whole schedule) of an img2img pass; both are empty when nothing runs."""
        return img2img_schedule(self.full_sigmas, steps, strength, rule, fix_steps=fix_steps)  # type: ignore[arg-type]

    def planned_steps(self, plan: hires_mod.HiresPlan | None, img2img: bool) -> int:
        """Sampler steps of one batch (for progress and ETA)."""
        p = self.job.params
        if img2img:
            visited, _ = self.img2img_schedule(p.steps, p.denoising_strength, self.job.convention.img2img_steps)
            return max(len(visited) - 1, 0)
        steps = len(self.full_sigmas(p.steps)) - 1
        if plan is not None:
            visited, _ = self.img2img_schedule(plan.steps, plan.strength, "a1111", fix_steps=True)
            steps += len(visited) - 1
        return steps

    # ---------------------------------------------------------------- conditioning and the pass
    def pass_conds(self, models: ModelSet, steps: int, hires_steps: int | None,
                   size: tuple[int, int]) -> tuple[PromptConds, PromptConds]:
        """(cond, uncond) of a pass, cached per model, step plan and size."""
        job = self.job
        p = job.params
        key = (id(models), steps, hires_steps, size)
        if key not in job.conds:
            sdxl = SDXLSizes(p.sdxl_original_size or size, tuple(p.sdxl_crop), p.sdxl_target_size or size)
            enc = models.encoder(p.clip_skip)
            cond = enc.encode(p.prompt, steps, hires_steps=hires_steps, sizes=sdxl)
            uncond = enc.encode(p.negative_prompt, steps, hires_steps=hires_steps, negative=True, sizes=sdxl)
            job.conds[key] = (cond, uncond)
        return job.conds[key]

    def sample_pass(self, *, sigmas: Tensor, full_sigmas: Tensor, rng: VariationRNG, noise: Tensor,
                    seeds: Sequence[int], size: tuple[int, int], steps: int, hires_steps: int | None,
                    pass_name: PassName, init_latent: Tensor | None = None, image_cond: Tensor | None = None,
                    mask: Tensor | None = None, refiner_ok: bool = True, blend_input: bool = False,
                    start_from_noise: bool = False) -> Tensor:
        """One sampling pass over ``sigmas`` (prompt schedules planned for ``steps`` / ``hires_steps`` user steps).

        ``init_latent``: img2img start (and the original kept under ``mask``, 1 = generate); ``start_from_noise``
        starts from noise alone while still blending towards ``init_latent`` (diffusers' inpainting at strength 1);
        ``image_cond``: the 9-channel UNet's mask + masked-image latent [B, 5, h, w].
        """
        job = self.job
        p, spec = job.params, job.spec
        planned = total_steps(spec.name, steps)
        planned_hr = total_steps(spec.name, hires_steps) if hires_steps is not None else None
        sets, switch = [self.base], None
        if p.refiner is not None and refiner_ok:
            sets.append(self.refiner(p.refiner.model))
            if sets[-1].models.config.inpainting != self.base.models.config.inpainting:
                raise ConfigError("the refiner must be an inpainting model exactly when the base model is one")
            switch = refiner_switch(self.base.discretization, p.refiner.switch_at)
        stages = []
        speed = speed_hooks(p, pass_name, tuple(noise.shape[-2:]), seeds[0])
        for ms in sets:
            cond, uncond = self.pass_conds(ms, planned, planned_hr, size)
            hooks = job.hooks
            if speed:
                hooks = dataclasses.replace(hooks, unet=dataclasses.replace(hooks.unet, **speed))
            if ms is not self.base:  # residual functions made for the base UNet (ControlNets) skip the refiner
                hooks = dataclasses.replace(hooks, residuals=[r for r in hooks.residuals
                                                              if not getattr(r, "base_only", False)])
            stages.append(Stage(ms.denoiser(job.sampling, sigmas, hooks, spec.consistency), cond, uncond,
                                image_cond, embedded_guidance=ms.embedded_guidance))
        pad = self.base.empty_chunk(p.clip_skip) if p.pad_conds else None
        guided = GuidedModel(stages, p.cfg_scale, p.cfg_rescale,  # type: ignore[arg-type]
                             job.convention.rescale_space(self.base.models.config.prediction), switch,
                             wrappers=job.hooks.wrappers, pass_call=True, pad_empty=pad,
                             cfg_above_one_only=job.convention.cfg_above_one_only, s_min_uncond=p.s_min_uncond,
                             s_min_uncond_all=p.s_min_uncond_all, skip_early_cond=p.skip_early_cond,
                             total_calls=planned_hr if planned_hr is not None else planned)
        model = guided
        if mask is not None:
            model = masked_model(guided, mask, init_latent, noise if blend_input else None,  # type: ignore[arg-type]
                                 blend_input, blend_from_call=1 if start_from_noise else 0)
        noise_sampler = None
        if spec.stochastic or job.options:
            noise_sampler = registry.make_noise_sampler(spec, seeds, tuple(noise.shape[1:]), full_sigmas, rng=rng,
                                                        device=noise.device)
        n_steps = max(len(sigmas) - 1, 0)
        progress = job.progress
        assert progress is not None
        start = progress.done
        callback = progress.callback(n_steps, pass_name, job.batch,
                                     lambda: "refiner" if guided.switched_at is not None else pass_name)
        try:
            out = denoise(model, sigmas, spec, noise, init_latent=None if start_from_noise else init_latent,
                          noise_sampler=noise_sampler, convention=job.sampling, callback=callback,
                          options=job.options)
        except StopBatch:
            assert progress.last is not None
            out = progress.last  # A1111 returns the newest prediction (``last_latent``)
        progress.finish_pass(start, n_steps)
        if guided.padded:
            job.extra["Pad conds"] = True
        if guided.switched_at is not None:
            job.decode_vae = sets[-1].models.vae  # A1111 decodes with the model loaded at the end: the refiner
        return out

    # ---------------------------------------------------------------- txt2img and hires fix
    def blank_image_cond(self, b: int, width: int, height: int) -> Tensor | None:
        """9-channel UNets without a mask: all-ones mask + latent of a mid-grey image (A1111); None otherwise."""
        if not self.base.models.config.inpainting:
            return None
        latent, mask = inpaint_ops.txt2img_inpaint_inputs(
            1, height, width, lambda x: vae_io.encode(self.vae, x, tiling=self.job.vae_tiling), device=self.device)
        return torch.cat([mask, latent], dim=1).float().expand(b, -1, -1, -1)

    def _rng(self, seeds: list[int], subseeds: list[int], shape: Sequence[int]) -> VariationRNG:
        p = self.job.params
        return VariationRNG(seeds, shape, subseeds, p.subseed_strength, p.eta_noise_seed_delta, device=self.device)

    def txt2img(self, seeds: list[int], subseeds: list[int], refiner_ok: bool) -> Tensor:
        """The first pass of txt2img from seeded noise -> latent [B, C, h, w]."""
        job = self.job
        p = job.params
        rng = self._rng(seeds, subseeds, self.latent_shape(job.width, job.height))
        noise = rng.first()
        sigmas = self.full_sigmas(p.steps)
        return self.sample_pass(sigmas=sigmas, full_sigmas=sigmas, rng=rng, noise=noise, seeds=seeds,
                                size=(job.height, job.width), steps=p.steps, hires_steps=None, pass_name="first",
                                image_cond=self.blank_image_cond(len(seeds), job.width, job.height),
                                refiner_ok=refiner_ok)

    def hires(self, plan: hires_mod.HiresPlan, latent: Tensor, seeds: list[int], subseeds: list[int]) -> Tensor:
        """The hires-fix second pass on the upscaled first-pass latent."""
        p = self.job.params
        f = self.vae.downscale
        if plan.upscaler == "latent":
            samples = hires_mod.upscale_latent(latent, plan)
        else:  # decode, uint8 as A1111, model and / or Lanczos to the target (whole latent pixels), encode
            ux, uy = plan.upscale_x // f * f, plan.upscale_y // f * f
            low = vae_io.decode_images(self.vae, latent, "truncate", self.job.warn, self.job.vae_tiling)
            if self.upscaler is not None:
                low = [upscale(self.upscaler, im, size=(ux, uy), device=self.device) for im in low]
            big = torch.cat([img_ops.to_tensor(img_ops.resize_image(im, ux, uy, "just_resize")) for im in low])
            samples = vae_io.encode(self.vae, big, tiling=self.job.vae_tiling)
        samples = hires_mod.truncate_latent(samples, plan)
        h, w = samples.shape[-2] * f, samples.shape[-1] * f
        rng = self._rng(seeds, subseeds, tuple(samples.shape[1:]))
        noise = rng.first()
        sigmas, full = self.img2img_schedule(plan.steps, plan.strength, "a1111", fix_steps=True)
        return self.sample_pass(sigmas=sigmas, full_sigmas=full, rng=rng, noise=noise, seeds=seeds,
                                size=(plan.upscale_y, plan.upscale_x), steps=p.steps, hires_steps=plan.steps,
                                pass_name="hires", init_latent=samples,
                                image_cond=self.blank_image_cond(len(seeds), w, h), refiner_ok=True)

    # ---------------------------------------------------------------- img2img and inpainting
    def prepare_init(self) -> InitImages:
        """Init images at the processing size (masks, fill, crops as A1111's img2img ``init``), latents if A1111."""
        job = self.job
        p, conv = job.params, job.convention
        w, h = job.width, job.height
        inputs = None
        if p.inpaint is not None:
            inputs = [inpaint_ops.prepare_inpaint(im, p.inpaint, w, h, p.resize_mode, p.inpaint.latent_mask)
                      for im in p.init_images]
            if inputs[0].mask is None:  # "only masked" with an empty mask: plain img2img, as A1111
                inputs = None
        if inputs is not None:
            pictures = [i.image for i in inputs]
        else:
            pictures = [img_ops.resize_image(img_ops.flatten(im), w, h, p.resize_mode) for im in p.init_images]
        reps = job.batch_size if len(pictures) == 1 else 1
        tensor = torch.cat([img_ops.to_tensor(im, convention=conv.name) for im in pictures]).repeat(reps, 1, 1, 1)
        init = InitImages(pictures, tensor, inputs, reps=reps)
        if inputs is not None:
            _, lh, lw = self.latent_shape(w, h)
            init.mask_full = mask_ops.mask_to_tensor(inputs[0].mask)  # type: ignore[arg-type]
            if conv.latent_mask == "binary_nearest":  # diffusers ``prepare_mask_latents``
                init.nmask = F.interpolate((init.mask_full >= 0.5).float(), size=(lh, lw)).to(self.device)
            else:  # bicubic to latent size, rounded (A1111)
                init.nmask = mask_ops.latent_mask(inputs[0].latent_mask_source, lh, lw).to(self.device)  # type: ignore
        if not conv.sample_posterior:  # deterministic: posterior means, computed once (A1111 encodes once too)
            init.latent = vae_io.encode(self.vae, tensor[:1] if reps > 1 else tensor,
                                         tiling=job.vae_tiling).repeat(reps, 1, 1, 1)
            init.image_cond = self.inpaint_cond(init, None)
        return init

    def inpaint_cond(self, init: InitImages, generators: Sequence[torch.Generator] | None) -> Tensor | None:
        """[B, 5, h, w] mask + masked-image latent for 9-channel UNets (None for other UNets)."""
        if not self.base.models.config.inpainting:
            return None
        b, _, hh, ww = init.tensor.shape
        if init.mask_full is None:
            return self.blank_image_cond(b, ww, hh)
        if generators is None and init.reps > 1:  # one image repeated: the mean latent is the same for all
            b = 1
        outs = []
        for i in range(b):
            gens = None if generators is None else [generators[i]]
            latent, mask = inpaint_ops.inpaint_model_inputs(
                init.tensor[i : i + 1].to(self.device), init.mask_full.to(self.device),
                lambda x, gens=gens: vae_io.encode(self.vae, x, gens, self.job.vae_tiling), self.job.convention.name)
            outs.append(torch.cat([mask, latent], dim=1).float())
        return torch.cat(outs).expand(init.tensor.shape[0], -1, -1, -1)

    def img2img(self, init: InitImages, seeds: list[int], subseeds: list[int], first_seeds: list[int]) -> Tensor:
        """img2img or inpainting from the init images -> latent [B, C, h, w]."""
        job = self.job
        p, conv = job.params, job.convention
        shape = self.latent_shape(job.width, job.height)
        rng = self._rng(seeds, subseeds, shape)
        masked = init.nmask is not None
        nine = self.base.models.config.inpainting
        strength_max = p.denoising_strength >= 1.0
        if conv.sample_posterior:  # one generator per image: image latent, noise, masked-image latent
            latent = None
            if not (masked and nine and strength_max):
                latent = vae_io.encode(self.vae, init.tensor, rng.generators, job.vae_tiling)
            noise = rng.first()
            image_cond = self.inpaint_cond(init, rng.generators)
            if latent is None:
                latent = torch.zeros_like(noise)
        else:
            latent, image_cond = init.latent, init.image_cond
            noise = rng.first()
        assert latent is not None
        if masked and p.inpaint is not None and p.inpaint.fill == "latent_noise":
            fill_noise = VariationRNG(first_seeds, shape, device=self.device).first()  # A1111: seeds of batch 1
            latent = inpaint_ops.apply_latent_fill(latent, init.nmask, "latent_noise", fill_noise)  # type: ignore
        elif masked and p.inpaint is not None:
            latent = inpaint_ops.apply_latent_fill(latent, init.nmask, p.inpaint.fill)  # type: ignore[arg-type]
        sigmas, full = self.img2img_schedule(p.steps, p.denoising_strength, conv.img2img_steps)
        mask = init.nmask if masked and (conv.blend_nine_channel or not nine) else None
        if len(sigmas) < 2:
            return latent
        return self.sample_pass(sigmas=sigmas, full_sigmas=full, rng=rng, noise=noise, seeds=seeds,
                                size=(job.height, job.width), steps=p.steps, hires_steps=None, pass_name="first",
                                init_latent=latent, image_cond=image_cond, mask=mask,
                                blend_input=conv.blend_input and mask is not None,
                                start_from_noise=conv.noise_start_at_full_strength and masked and strength_max)
