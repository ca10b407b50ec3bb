"""The generation engine: one loaded model, ``engine.generate(params) -> GenerationResult``.

Flow of a request, as AUTOMATIC1111 1.10 ``process_images`` runs it (differences are noted where they are made):

1. validate; resolve the sampler and schedule; width/height default to the model's native size (the init image's
   size, rounded down to the VAE's factor, for img2img); seeds fixed (-1 -> random), image k gets ``seed + k``;
2. extra-network tags (``<lora:...>``) are taken out of both prompts and handed to their handlers, which may patch
   the networks or add hooks, before anything is encoded (:mod:`sumie.pipelines.extra_networks`);
3. the prompts are scheduled and encoded once per pass (:mod:`sumie.pipelines.scheduled_conds`);
4. per batch (``n_iter`` of them) one :class:`~sumie.pipelines.variation.VariationRNG` gives the initial noise and
   the ancestral noise; the DPM++ SDE family gets per-image Brownian trees over the pass's whole schedule;
5. txt2img starts from noise, img2img and inpainting from the VAE latent of the init image plus noise at the
   first sigma of the img2img schedule; one :func:`~sumie.pipelines.denoise.denoise` loop runs the sampler
   (:mod:`sumie.pipelines.passes`); hires fix adds a second pass (:mod:`sumie.pipelines.hires`); an SDXL refiner
   takes over mid-pass;
6. each latent is decoded on its own and turned to uint8 (:mod:`sumie.pipelines.vae_io`).

An LCM-distilled UNet (a guidance embedding, ``UNetConfig.guidance_embed_dim``) takes the CFG scale S as an input,
w = S - 1 as diffusers' ``LatentConsistencyModelPipeline``, and runs one cond-only call per step: no uncond pass, so
the negative prompt and CFG rescale are ignored (with a warning).

``params.convention`` picks whose numbers to reproduce where A1111 and diffusers differ
(:mod:`sumie.pipelines.convention`). The hires-fix pass always uses A1111's rules (diffusers has no hires fix). With
an SDXL refiner the images are decoded by the refiner's VAE, as A1111 (the model loaded at the end decodes).

A request can be interrupted or its current batch skipped from another thread (:class:`JobControl`); progress
arrives as :class:`~sumie.pipelines.control.ProgressEvent` s; warnings (ignored tags, a VAE upcast) come back in the
result. Extensions plug in through ``hooks`` (:class:`~sumie.pipelines.denoise.ModelHooks`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from sumie.adapters.lora.handler import LoraHandler
from sumie.adapters.lora.handler import register as register_lora
from sumie.adapters.lora.library import LoraLibrary
from sumie.adapters.patcher import ModelPatcher
from sumie.checkpoints.embedded import resolve_model
from sumie.checkpoints.loader import StableDiffusionModels, load_models
from sumie.checkpoints.manager import ModelManager
from sumie.checkpoints.precision import Precision
from sumie.errors import ConfigError
from sumie.models.packed import PackingMode, set_weight_packing
from sumie.models.taesd import TAESD
from sumie.pipelines import hires as hires_mod
from sumie.pipelines import images as img_ops
from sumie.pipelines import inpaint as inpaint_ops
from sumie.pipelines import vae_io, vae_tiling, validation
from sumie.pipelines.compiled import CompiledUNet
from sumie.pipelines.control import JobControl
from sumie.pipelines.convention import pipeline_convention
from sumie.pipelines.denoise import ModelHooks, sampler_options
from sumie.pipelines.extra_networks import ExtraNetwork, ExtraNetworkHandler, collect_tags, tag_text
from sumie.pipelines.infotext import format_infotext
from sumie.pipelines.job import Job, Progress, ProgressFn, SigmasFn
from sumie.pipelines.modelset import ModelSet
from sumie.pipelines.params import DEFAULT_CFG_SCALE, GenerationParams
from sumie.pipelines.passes import Run
from sumie.pipelines.upscale import resolve_upscaler
from sumie.pipelines.variation import all_seeds, fixed_seed
from sumie.prompts.embeddings import EmbeddingLibrary
from sumie.prompts.parser import strip_comments
from sumie.prompts.tokenizer import CLIPTokenizer
from sumie.sampling.conventions import Convention
from sumie.sampling.discretization import DiscreteSigmas

__all__ = ["Engine", "GenerationResult", "load"]


@dataclass
class GenerationResult:
    """Images of a request with their A1111 infotexts, per-image seeds and the params as run (seeds, size resolved).

    ``warnings``: what the run did not do as asked or changed on its own (ignored tags, a VAE upcast);
    ``interrupted``: the request was interrupted (the images are what was made until then).
    """

    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    subseeds: list[int]
    params: GenerationParams
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False


def _native_size(models: StableDiffusionModels) -> int:
    if models.native_size is not None:
        return models.native_size
    family = models.config.family
    if family.startswith("sdxl"):
        return 1024
    return 768 if family == "sd2" and models.config.prediction == "v" else 512


class Engine:
    """A loaded Stable Diffusion model ready to generate (see the module docstring); one request at a time.

    ``show_progress``: tqdm bar on stderr (None = only on a terminal). Attributes: ``models``
    (:class:`~sumie.checkpoints.loader.StableDiffusionModels`), ``tokenizer``, ``embeddings``, ``discretization``,
    ``taesd`` (previews; None = A1111's cheap approximation or the VAE), ``embeddings_dir``, ``extra_networks``
    (kind -> handler of ``<kind:...>`` prompt tags; ``lora`` and ``lyco``: a
    :class:`~sumie.adapters.lora.handler.LoraHandler` over ``lora_dirs`` and the manager's LoRA folders).
    """

    def __init__(self, models: StableDiffusionModels, *, tokenizer: CLIPTokenizer | None = None,
                 embeddings: EmbeddingLibrary | None = None, embeddings_dir: str | Path | None = None,
                 taesd: TAESD | None = None, manager: ModelManager | None = None,
                 lora_dirs: Sequence[str | Path] = ()) -> None:
        self.tokenizer = tokenizer or CLIPTokenizer()
        self.embeddings_dir = Path(embeddings_dir) if embeddings_dir is not None else None
        if embeddings is None and self.embeddings_dir is not None:
            embeddings = EmbeddingLibrary.from_folder(self.embeddings_dir, models.config, self.tokenizer)
        self.base = ModelSet(models, self.tokenizer, embeddings)
        self.taesd = taesd
        self.show_progress: bool | None = None
        # bytes a VAE pass may use when deciding to tile (None: the device's free memory; sumie.pipelines.vae_tiling)
        self.memory_budget: int | None = None
        self.extra_networks: dict[str, ExtraNetworkHandler] = {}
        self._patcher: ModelPatcher | None = None
        # the control models of the last request, by (path, mtime, size): the next request with them reuses them
        self._controls: dict[tuple[str, int, int], torch.nn.Module] = {}
        # refiners come from the model manager, with the base model's dtypes; without a shared manager the engine
        # keeps its last refiner only
        te = next(models.text_encoders[0].parameters()).dtype if models.text_encoders else None
        precision = Precision(next(models.unet.parameters()).dtype, te, models.vae.dtype)
        self.manager = manager or ModelManager(device=self.device, dtype=precision, max_models=1)
        # the models folder's LoRA folders first, then lora_dirs: a name in both is the lora_dirs file (A1111: the
        # last one found wins)
        folders = self.manager.folders.dirs("lora") if self.manager.folders is not None else []
        register_lora(self, LoraHandler(LoraLibrary([*folders, *lora_dirs], hashes=self.manager.hashes)))

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
    def patcher(self) -> ModelPatcher:
        """The model patcher of the base model's networks (LoRA and merges patch through clones of it)."""
        if self._patcher is None:
            self._patcher = ModelPatcher.for_models(self.models)
        return self._patcher

    @property
    def discretization(self) -> DiscreteSigmas:
        """The training noise schedule (zero-terminal-SNR when the checkpoint says so)."""
        return self.base.discretization

    @property
    def device(self) -> torch.device:
        """Where the UNet lives."""
        return next(self.models.unet.parameters()).device

    def refiner(self, model: str | Path) -> ModelSet:
        """The refiner checkpoint with its prompt encoder: an entry of the model manager (loaded on first use,
        evicted like any other model)."""
        def build(refined: StableDiffusionModels) -> ModelSet:
            emb = None
            if self.embeddings_dir is not None:
                emb = EmbeddingLibrary.from_folder(self.embeddings_dir, refined.config, self.tokenizer)
            return ModelSet(refined, self.tokenizer, emb)

        return self.manager.derived("checkpoint", model, ("engine refiner", str(self.embeddings_dir)), build)

    def compile_unet(self, enabled: bool = True, log: Callable[[str], None] | None = None) -> None:
        """Run the base model's plain UNet calls through ``torch.compile`` with frozen weights (opt-in, off by
        default; :mod:`sumie.pipelines.compiled`): faster on CPU once compiled, the output within fp32 rounding of
        the eager UNet, each new shape and each weight change compiled again (minutes on a CPU)."""
        self.base.compiled = CompiledUNet(self.models.unet, log) if enabled else None

    def set_weight_packing(self, mode: PackingMode) -> None:
        """Prepacked CPU convolution and linear weights (:mod:`sumie.models.packed`), the same images within fp32
        rounding: "auto" (the default) where it costs no memory (weights memory-mapped from a float32 file),
        "on" for every weight (faster, a second copy of the others), "off" never (the packed copies dropped)."""
        self.manager.set_weight_packing(mode)
        for module in (self.models.unet, self.models.vae, *self._controls.values()):
            set_weight_packing(module, mode)

    @property
    def default_cfg_scale(self) -> float:
        """The CFG scale used when a request gives none: the model file's recommendation, else A1111's 7."""
        return self.models.cfg_scale if self.models.cfg_scale is not None else DEFAULT_CFG_SCALE

    # ---------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, params: GenerationParams, *, progress: ProgressFn | None = None, preview_every: int = 0,
                 control: JobControl | None = None, hooks: ModelHooks | None = None,
                 show_progress: bool | None = None, sigmas_fn: SigmasFn | None = None,
                 sampling_convention: Convention | None = None) -> GenerationResult:
        """Run a request: txt2img, img2img (``init_images``) or inpainting (``inpaint``); see the module docstring.

        ``progress(event)`` follows every sampler step; with ``preview_every`` = N > 0 every N-th event carries
        previews of the current prediction (TAESD if loaded, else A1111's cheap approximation or the VAE).
        ``control`` interrupts or skips from another thread; ``hooks`` add extensions to the model calls.
        Expert overrides: ``sigmas_fn(n) -> sigmas [n + 1]`` replaces the named schedule (e.g. a diffusers
        scheduler's exact sigmas) and ``sampling_convention`` the start-noise scale / network-timestep rule.
        """
        p = params
        if p.cfg_scale is None:
            p = dataclasses.replace(p, cfg_scale=self.default_cfg_scale)
        early: list[str] = []  # settings the run ignores: warnings of the result
        spec, schedule = validation.check_request(p, warn=early.append)
        sampler_opts = sampler_options(spec, p.eta, p.s_noise)
        mode_img2img = bool(p.init_images)
        if p.inpaint is not None and not mode_img2img:
            raise ConfigError("inpainting needs an init image; pass init_images=[image] with the mask")
        if p.hires is not None and mode_img2img:
            raise ConfigError("hires fix is a txt2img option; for img2img set width/height to the larger size")
        if p.loras and "lora" not in self.extra_networks:
            raise ConfigError("params.loras is set but this engine has no 'lora' extra-network handler; register one "
                              "(engine.extra_networks['lora'] = LoraHandler(...))")
        if p.refiner is not None and not 0.0 <= p.refiner.switch_at <= 1.0:
            raise ConfigError(f"refiner switch point must be in [0, 1], got {p.refiner.switch_at}")
        width, height = self._size(p)
        batch_size = p.batch_size
        if mode_img2img:
            if len(p.init_images) > batch_size and batch_size != 1:
                raise ConfigError(f"{len(p.init_images)} init images for batch size {batch_size}; pass at most "
                                  f"{batch_size} images or raise the batch size")
            if len(p.init_images) > 1:
                batch_size = len(p.init_images)
        seed, subseed = fixed_seed(p.seed), fixed_seed(p.subseed)
        seeds, subseeds = all_seeds(seed, subseed, batch_size * p.n_iter, p.subseed_strength)
        resolved = dataclasses.replace(p, seed=seed, subseed=subseed, width=width, height=height,
                                       batch_size=batch_size)
        conv = pipeline_convention(p.convention)
        job = Job(resolved, spec, schedule, conv,
                  sampling_convention or conv.sampling(spec.name, schedule, self.models.config.family),
                  width, height, batch_size, sigmas_fn, sampler_opts, hooks or ModelHooks(), control or JobControl())
        job.vae_tiling = vae_tiling.request_tiling(p.vae_tiling, p.vae_tile_size, self.models.vae.downscale,
                                                   self.memory_budget)
        for message in early:
            job.warn(message)
        if self.base.embedded_guidance:  # LCM-distilled UNet: the CFG scale is an input, no uncond pass
            if p.negative_prompt.strip():
                job.warn("the negative prompt was ignored: this UNet (LCM-distilled, with a guidance embedding) "
                         "takes the CFG scale as an input and runs no uncond pass, as in diffusers")
            if p.cfg_rescale:
                job.warn("CFG rescale was ignored: this UNet (LCM-distilled, with a guidance embedding) runs no "
                         "CFG to rescale")
        if p.ip_adapters:  # image prompts: loaded, checked and encoded before any step
            from sumie.adapters.ip_adapter.units import attach_ip_adapters

            attach_ip_adapters(self, job, p.ip_adapters)
        if p.eta_noise_seed_delta and validation.uses_white_noise(spec, p.eta):
            job.extra["ENSD"] = p.eta_noise_seed_delta
        if p.controlnets:  # every unit's file, family and image checked, models loaded, before any step
            self._attach_controlnets(job)
        run = Run(job, self.base, self.refiner)
        plan = None
        if p.hires is not None:
            plan = hires_mod.plan_hires(width, height, p.hires, p.steps, self.models.vae.downscale)
            if plan.upscaler not in hires_mod.PIXEL_UPSCALERS:  # a model: loaded once for every batch
                run.upscaler = self.manager.get("upscaler", resolve_upscaler(self.manager, plan.upscaler))
        out_w, out_h = plan.output_size if plan is not None else (width, height)
        if p.taesd_decode:  # fails now, not after sampling
            vae_io.check_taesd_decoder(self.taesd, self.models.vae)
        vae_tiling.plan_tiles("decode", self.models.vae, out_h, out_w, job.vae_tiling)  # fails now, not after sampling
        previewer = vae_io.Previewer(self.models.vae, self.taesd) if preview_every else None
        show = self.show_progress if show_progress is None else show_progress
        job.progress = Progress(run.planned_steps(plan, mode_img2img) * p.n_iter, p.n_iter, progress, job.control,
                                previewer, preview_every, show)
        images: list[Image.Image] = []
        active: list[ExtraNetworkHandler] = []
        try:
            active = self._activate_extra_networks(job)
            init = run.prepare_init() if mode_img2img else None
            for it in range(p.n_iter):
                if job.control.interrupted:
                    break
                job.control.next_batch()
                job.batch = it
                batch_seeds = seeds[it * batch_size : (it + 1) * batch_size]
                batch_subseeds = subseeds[it * batch_size : (it + 1) * batch_size]
                job.decode_vae = self.models.vae
                if init is not None:
                    latent = run.img2img(init, batch_seeds, batch_subseeds, seeds[:batch_size])
                else:
                    latent = run.txt2img(batch_seeds, batch_subseeds, refiner_ok=plan is None)
                    if plan is not None and not job.control.stop_batch:
                        latent = run.hires(plan, latent, batch_seeds, batch_subseeds)
                if p.taesd_decode:  # A1111 "VAE Decoder: TAESD"
                    tiny = vae_io.check_taesd_decoder(self.taesd, job.decode_vae)
                    batch = img_ops.to_image(vae_io.decode_taesd(tiny, latent), conv.rounding)
                else:
                    batch = vae_io.decode_images(job.decode_vae, latent, conv.rounding, job.warn, job.vae_tiling)
                if init is not None and init.inputs is not None and conv.overlay:
                    batch = [inpaint_ops.apply_overlay(im, init.inputs[k % len(init.inputs)].overlay,
                                                       init.inputs[k % len(init.inputs)].paste_to)
                             for k, im in enumerate(batch)]
                images.extend(batch)
        finally:
            for handler in reversed(active):
                handler.deactivate(self, job)
            job.progress.close()
        # A1111 writes the prompts with comments stripped (its comments script edits p.all_prompts)
        shown = dataclasses.replace(resolved, prompt=strip_comments(p.prompt) + "".join(job.infotext_tags),
                                    negative_prompt=strip_comments(p.negative_prompt))
        infotexts = [format_infotext(shown, seed=seeds[k], subseed=subseeds[k], index=k, model_name=self.base.name,
                                     model_hash=self.models.hash, extra=dict(job.extra)) for k in range(len(images))]
        for image, text in zip(images, infotexts, strict=True):
            image.info["parameters"] = text
        return GenerationResult(images, infotexts, seeds[: len(images)], subseeds[: len(images)], resolved,
                                job.warnings, job.control.interrupted)

    def _activate_extra_networks(self, job: Job) -> list[ExtraNetworkHandler]:
        """Call every registered handler once, with the request's tags of its kinds (none: it may undo what it left
        in place, as A1111 calls every network), before any prompt is encoded; warn about tags without a handler."""
        active: list[ExtraNetworkHandler] = []
        by_handler: dict[int, tuple[ExtraNetworkHandler, list[ExtraNetwork]]] = {}
        for handler in self.extra_networks.values():
            by_handler.setdefault(id(handler), (handler, []))
        for kind, tags in collect_tags(job.params.prompt, job.params.negative_prompt).items():
            handler = self.extra_networks.get(kind)
            if handler is None:
                job.warn(f"extra networks of kind '{kind}' are not supported and were ignored: "
                         f"{', '.join(tag_text(t) for t in tags)} (the tags are removed from the prompt the "
                         "model sees, as A1111 does, and kept in the image's metadata)")
                continue
            by_handler[id(handler)][1].extend(tags)
        try:
            for handler, tags in by_handler.values():
                handler.activate(self, job, tags)
                active.append(handler)
        except BaseException:
            for handler in reversed(active):
                handler.deactivate(self, job)
            raise
        return active

    def _attach_controlnets(self, job: Job) -> None:
        """Add the request's ControlNet units (``params.controlnets``) to the job's hooks and infotext."""
        from sumie.adapters.control.units import request_units
        from sumie.pipelines import masks as mask_ops

        dtype = next(self.models.unet.parameters()).dtype

        def progress() -> tuple[int, int]:
            return (0, 0) if job.progress is None else (job.progress.pass_done, job.progress.pass_steps)

        p = job.params
        init = (p.init_images[0], p.resize_mode) if p.init_images else None
        crop = None
        if p.inpaint is not None and p.inpaint.full_res and p.init_images:  # "only masked": the mask's crop region
            mask = mask_ops.prepare_mask(p.inpaint.mask, p.inpaint.mask_blur, p.inpaint.invert)
            region = mask_ops.get_crop_region(mask, p.inpaint.full_res_padding)
            if region is not None:
                region = mask_ops.expand_crop_region(region, job.width, job.height, mask.width, mask.height)
                crop = (region, mask.size, (job.width, job.height))
        used: dict[tuple[str, int, int], torch.nn.Module] = {}

        def load(path: Path) -> torch.nn.Module:
            st = path.stat()
            key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
            if key not in used:
                kept = self._controls.get(key)
                used[key] = kept if kept is not None else self._load_control(path, dtype)
            return used[key]

        fn, fields = request_units(
            p.controlnets, resolve=lambda name: self.manager.resolve("controlnet", name), load=load,
            progress=progress, rule=job.convention.control_steps, resample=job.convention.control_resample,
            init=init, crop=crop)
        self._controls = used
        job.hooks = dataclasses.replace(job.hooks, residuals=[*job.hooks.residuals, fn])
        job.extra.update(fields)

    def _load_control(self, path: Path, dtype: torch.dtype) -> torch.nn.Module:
        """A ControlNet / T2I-Adapter file for this model: family and context width checked before any step."""
        from sumie.adapters.control.files import check_family, load_controlnet

        cfg = self.models.config
        control = load_controlnet(path, base=self.models.unet, device=self.device, dtype=dtype)
        check_family(control, cfg.family)
        width = getattr(getattr(control.model, "config", None), "context_dim", cfg.unet.context_dim)
        if control.kind == "controlnet" and width != cfg.unet.context_dim:
            raise ConfigError(f"ControlNet {control.name} has context width {width}; the model ({cfg.family}) has "
                              f"{cfg.unet.context_dim}: pick a ControlNet made for {cfg.family}")
        if control.kind == "t2i_adapter":  # its features go where this UNet's levels end (diffusers' rule)
            from sumie.adapters.control.t2i_files import fit_to_unet

            fit_to_unet(control, self.models.unet, cfg.family)
        set_weight_packing(control.model, self.manager.weight_packing)
        return control.model

    # ---------------------------------------------------------------- validation and size
    def _size(self, p: GenerationParams) -> tuple[int, int]:
        return validation.processing_size(p, self.models.vae.downscale, _native_size(self.models))

    # ---------------------------------------------------------------- VAE
    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of a width x height image."""
        f = self.models.vae.downscale
        return self.models.config.unet.out_channels, height // f, width // f

    def _tiling(self, mode: vae_tiling.TilingMode, tile: int) -> vae_tiling.VAETiling:
        return vae_tiling.request_tiling(mode, tile, self.models.vae.downscale, self.memory_budget)

    def encode(self, images: Tensor | Sequence[Image.Image], *, tiling: vae_tiling.TilingMode = "auto",
               tile: int = 512) -> Tensor:
        """Images ([B, 3, H, W] in [-1, 1], or PIL) -> scaled latents [B, C, H/f, W/f] (posterior means).

        ``tiling`` / ``tile``: as ``GenerationParams.vae_tiling`` / ``vae_tile_size``. No autograd graph."""
        x = images if isinstance(images, Tensor) else torch.cat([img_ops.to_tensor(im) for im in images])
        with torch.no_grad():
            return vae_io.encode(self.models.vae, x, tiling=self._tiling(tiling, tile))

    def decode(self, latent: Tensor, convention: str = "a1111", *, tiling: vae_tiling.TilingMode = "auto",
               tile: int = 512) -> list[Image.Image]:
        """Scaled latents [B, C, h, w] -> PIL images, decoded one at a time (A1111 ``decode_latent_batch``)."""
        with torch.no_grad():
            return vae_io.decode_images(self.models.vae, latent, pipeline_convention(convention).rounding,
                                        tiling=self._tiling(tiling, tile))


def load(model: str | Path | None = None, *, dtype: torch.dtype | Precision = torch.float32,
         device: torch.device | str = "cpu", vae: str | Path | None = None, prediction: str | None = None,
         embeddings_dir: str | Path | None = None, taesd: str | Path | None = None,
         vae_dtype: torch.dtype | None = None, text_encoder_dtype: torch.dtype | None = None,
         file_hash: str | Callable[[Path], str] | None = None, manager: ModelManager | None = None,
         lora_dirs: Sequence[str | Path] = ()) -> Engine:
    """Load a checkpoint (single file or diffusers folder) into an :class:`Engine`.

    ``model``: a path, or None / ``"sumie-tiny"`` for the embedded default model (64 px, trained by Sumie);
    ``dtype``: the run dtype (``vae_dtype`` / ``text_encoder_dtype`` override it per network; an SDXL VAE stays in
    float32 under float16 unless told otherwise); ``vae``: a standalone VAE file replacing the built-in one;
    ``prediction``: force "eps" or "v"; ``embeddings_dir``: textual-inversion embeddings; ``taesd``: a TAESD
    (decoder) file for previews; ``file_hash``: the model hash or a (cached) function giving it, instead of hashing
    the whole file; ``manager``: a shared model manager (refiners are loaded through it); ``lora_dirs``: folders
    where ``<lora:NAME>`` tags and ``GenerationParams.loras`` names are looked up (besides the manager's).
    """
    precision = Precision.of(dtype)
    if vae_dtype is not None or text_encoder_dtype is not None:
        precision = dataclasses.replace(precision, vae=vae_dtype or precision.vae,
                                        text_encoder=text_encoder_dtype or precision.text_encoder)
    models = load_models(resolve_model(model), dtype=precision, device=device, prediction=prediction, vae=vae,
                         file_hash=file_hash)
    tiny = None
    if taesd is not None:
        from sumie.checkpoints.io import load_state_dict

        tiny = TAESD.from_state_dict(load_state_dict(taesd), device=device, dtype=precision.vae_dtype(
            models.config.family))
        if tiny.decoder is None:
            raise ConfigError(f"{taesd}: this TAESD file has no decoder; previews need the decoder part")
        tiny.eval().requires_grad_(False)
    return Engine(models, embeddings_dir=embeddings_dir, taesd=tiny, manager=manager, lora_dirs=lora_dirs)
