"""Sampling with ComfyUI's numbers on Sumie's samplers (``comfy/sample.py``, ``comfy/samplers.py``).

* sigmas: ``calculate_sigmas`` on the model's discrete schedule (float32 table from float64, as
  ``ModelSamplingDiscrete``); dpm_2 / dpm_2_ancestral / uni_pc / uni_pc_bh2 build steps + 1 and drop the
  penultimate sigma; ``denoise`` < 1 builds ``int(steps / denoise)`` steps and keeps the last ``steps + 1``
  (``KSampler.set_steps``); KSamplerAdvanced's start / end steps slice them and ``force_full_denoise`` zeroes the
  last (``KSampler.sample``);
* noise: :func:`sumie.sampling.noise.batch_noise` (``prepare_noise``); the start is ``latent + noise *
  sqrt(1 + sigma0^2)`` when sigma0 is the model's largest sigma, else ``latent + noise * sigma0``
  (``noise_scaling``); latents are scaled by the VAE factor on the way in and back on the way out;
* the model: the UNet sees the nearest integer timestep (``ModelSamplingDiscrete.timestep``); each conditioning
  entry active at the current sigma (``start_percent`` / ``end_percent``) is evaluated on its region (``area`` /
  ``mask``) and the entries of one side are averaged with their weights (``calc_cond_batch``: no entry -> 0),
  then ``uncond + (cond - uncond) * cfg`` on the denoised x0,
  the uncond pass skipped at cfg 1; SDXL's ADM vector from ``pooled_output`` and width / height (default: the
  latent size x 8, ``encode_model_conds``);
* per-step noise of stochastic samplers: one CPU generator seeded with the seed for the whole batch
  (``default_noise_sampler``), Brownian trees for the SDE samplers (``BrownianTreeNoiseSampler`` with one seed);
* ComfyUI's ``ddim`` is Euler (with fresh random inpainting noise from seed + 1); ``uni_pc``'s final 0 is 0.001;
* an entry's ``control`` (:mod:`sumie.comfy.control`) adds its ControlNet residuals to the UNet calls of that entry's
  rows only (ComfyUI batches entries only when their controls are the same), and a MODEL's IP-Adapter hooks see
  which rows are cond and uncond (``cond_or_uncond``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sumie.adapters.control.files import check_family
from sumie.adapters.control.t2i_files import fit_to_unet
from sumie.comfy.control import ControlHint, fill_uncond_controls, place_rows
from sumie.comfy.resize import common_upscale, resize_to_batch_size
from sumie.comfy.values import ComfyModel, Conditioning
from sumie.errors import ConfigError
from sumie.models.hooks import CallInfo, Residuals, UNetOptions
from sumie.models.unet import sdxl_adm_vector
from sumie.pipelines.denoise import ModelHooks, UNetNetwork
from sumie.sampling import registry, schedules
from sumie.sampling.denoisers import make_denoiser
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.guidance import batch_conds, masked_model
from sumie.sampling.noise import BrownianNoise, ImageRNG, batch_noise
from sumie.sampling.registry import SamplerSpec

# comfy/samplers.py KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"] and SCHEDULER_HANDLERS, in ComfyUI's order;
# the option lists keep those Sumie runs (supported_samplers / supported_schedulers).
COMFY_SAMPLERS = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "er_sde", "seeds_2", "seeds_3", "sa_solver",
    "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)
COMFY_SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                    "linear_quadratic", "kl_optimal")
ProgressFn = Callable[[int, int, Tensor], None]
# ComfyUI ``set_inpaint``: a blank (black) image's latent per channel, the masked image without a mask
BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)  # (step done, total steps, denoised x0 [B, C, h, w])


def _known_sampler(name: str) -> bool:
    try:
        registry.get_sampler(name, "comfyui")
    except ConfigError:
        return False
    return True


def supported_samplers() -> list[str]:
    """ComfyUI's sampler names that Sumie runs, in ComfyUI's order."""
    return [n for n in COMFY_SAMPLERS if n == "ddim" or _known_sampler(n)]


def supported_schedulers() -> list[str]:
    """ComfyUI's scheduler names that Sumie computes, in ComfyUI's order."""
    out = []
    for n in COMFY_SCHEDULERS:
        try:
            registry.resolve_schedule(n, "comfyui")
        except ConfigError:
            continue
        out.append(n)
    return out


def sampler_spec(name: str) -> SamplerSpec:
    """The spec a ComfyUI sampler name runs (``ddim`` runs Euler, as ComfyUI's ``sampler_object`` does)."""
    if name not in supported_samplers():
        raise ConfigError(f"sampler {name!r} is not available in Sumie; use one of {', '.join(supported_samplers())}")
    return registry.get_sampler("euler" if name == "ddim" else name, "comfyui")


def discretization(model: ComfyModel) -> DiscreteSigmas:
    """The model's sigma table with ComfyUI's integer timesteps (``ModelSamplingDiscrete``)."""
    return DiscreteSigmas.from_betas(zero_terminal_snr=model.models.zero_terminal_snr, quantize=True)


def calculate_sigmas(ds: DiscreteSigmas, scheduler: str, steps: int) -> Tensor:
    """``calculate_sigmas``: the named schedule's steps + 1 sigmas ending in 0."""
    if scheduler not in supported_schedulers():
        raise ConfigError(f"scheduler {scheduler!r} is not available; use one of {', '.join(supported_schedulers())}")
    return schedules.make_sigmas(registry.resolve_schedule(scheduler, "comfyui"), ds, steps, flavor="comfyui")


def ksampler_sigmas(ds: DiscreteSigmas, sampler: str, scheduler: str, steps: int, denoise: float = 1.0) -> Tensor:
    """``KSampler.set_steps``: the sigmas a KSampler runs for ``steps`` and ``denoise``; empty for denoise <= 0."""
    discard = sampler in ("dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2")

    def full(n: int) -> Tensor:
        sigmas = calculate_sigmas(ds, scheduler, n + 1 if discard else n)
        return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas

    if denoise > 0.9999:
        return full(steps)
    if denoise <= 0.0:
        return torch.zeros(0)
    return full(int(steps / denoise))[-(steps + 1):]


def advanced_sigmas(sigmas: Tensor, start_step: int | None, last_step: int | None,
                    force_full_denoise: bool) -> Tensor | None:
    """``KSampler.sample``'s slicing: None when ``start_step`` is past the end (the latent is returned as is)."""
    sigmas = sigmas.clone()
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1]
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step < len(sigmas) - 1:
            sigmas = sigmas[start_step:]
        else:
            return None
    return sigmas


def prepare_noise(latent: dict[str, Any], seed: int | None) -> Tensor:
    """The start noise of a LATENT: zeros without a seed (noise disabled), else ComfyUI's batch noise."""
    samples = latent["samples"]
    if seed is None:
        return torch.zeros(samples.shape, dtype=torch.float32)
    return batch_noise(samples.shape, seed, latent.get("batch_index"))


def fix_empty_latent(model: ComfyModel, latent: dict[str, Any]) -> Tensor:
    """An all-zero latent made for another latent layout, resized to the model's (``fix_empty_latent_channels``):
    its channels repeated to the UNet's, its side scaled by ``downscale_ratio_spacial`` / the VAE's downscale."""
    samples = latent["samples"]
    if bool(samples.count_nonzero()):
        return samples
    channels = model.models.config.unet.out_channels
    ratio = latent.get("downscale_ratio_spacial")
    if ratio is not None and ratio != model.models.vae.downscale:
        f = ratio / model.models.vae.downscale
        size = (round(samples.shape[2] * f), round(samples.shape[3] * f))
        samples = torch.nn.functional.interpolate(samples, size=size, mode="nearest-exact")
    if samples.shape[1] != channels:
        samples = samples[:, :1].repeat(1, channels, 1, 1)
    return samples


class _Entry:
    """One conditioning entry prepared for a model call: context, ADM vector, active sigma range and the region
    it acts on (``area`` (h, w, y, x) in latent cells and ``mult``, ComfyUI ``get_area_and_mult``)."""

    def __init__(self, ds: DiscreteSigmas, model: ComfyModel, cond: list[Any], latent_shape: Sequence[int],
                 device: torch.device, dtype: torch.dtype, negative: bool = False) -> None:
        context, opts = cond[0], cond[1]
        self.context = context.to(device=device, dtype=dtype)
        self.y = _adm(model, opts, latent_shape, device, dtype, negative)
        self.start = _percent_to_sigma(ds, float(opts.get("start_percent", 0.0)))
        self.end = _percent_to_sigma(ds, float(opts.get("end_percent", 1.0)))
        self.area, self.mult = _area_and_mult(opts, latent_shape, device, dtype)
        self.concat_image: Tensor | None = opts.get("concat_latent_image")
        self.concat_mask: Tensor | None = opts.get("concat_mask")
        self.concat: Tensor | None = None  # set by ComfyCFG.set_inpaint for 9-channel UNets
        self.control: ControlHint | None = opts.get("control")
        self.negative = negative

    def active(self, sigma: float) -> bool:
        """ComfyUI's ``timestep_start`` / ``timestep_end`` test."""
        return not (sigma > self.start or sigma < self.end)


def _area_and_mult(opts: dict[str, Any], latent_shape: Sequence[int], device: torch.device,
                   dtype: torch.dtype) -> tuple[tuple[int, int, int, int] | None, Tensor | None]:
    """The entry's region (h, w, y, x) or None (the whole latent) and its weight map [B or 1, C, h, w] or None
    (1 everywhere): ``resolve_areas_and_cond_masks`` + ``get_area_and_mult`` (a mask scaled to the latent and
    ``mask_strength``, or for an area without a mask 8-cell linear ramps on its inner edges; times ``strength``)."""
    b, c, height, width = latent_shape[0], latent_shape[1], latent_shape[2], latent_shape[3]
    area = opts.get("area")
    if area is not None and area[0] == "percentage":
        a = area[1:]
        area = (max(1, round(a[0] * height)), max(1, round(a[1] * width)), round(a[2] * height), round(a[3] * width))
    mask = opts.get("mask")
    if mask is not None:
        mask = mask.float()
        mask = mask[None] if mask.ndim == 2 else mask
        if tuple(mask.shape[1:]) != (height, width):
            mask = F.interpolate(mask[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        if opts.get("set_area_to_bounds", False):
            bounds = mask.abs().amax(dim=0)
            ys, xs = torch.nonzero(bounds, as_tuple=True)
            if len(ys) == 0:
                area = (8, 8, 0, 0)
            else:
                y0, x0 = int(ys.min()), int(xs.min())
                area = (max(8, int(ys.max()) - y0 + 1), max(8, int(xs.max()) - x0 + 1), y0, x0)
    strength = float(opts.get("strength", 1.0))
    if area is not None:
        h, w, y, x = (int(v) for v in area)
        area = (min(height - y, h), min(width - x, w), y, x)
    if mask is None and area is None:
        return None, (None if strength == 1.0 else torch.full((1, 1, 1, 1), strength, device=device, dtype=dtype))
    h, w, y, x = area if area is not None else (height, width, 0, 0)
    if mask is not None:
        m = mask[:b, y:y + h, x:x + w] * float(opts.get("mask_strength", 1.0))
        mult = m[:, None].repeat(max(b // m.shape[0], 1), c, 1, 1) * strength
    else:
        mult = torch.full((1, c, h, w), strength)
        ramp = 8
        for dim, (size, offset, full) in enumerate(((h, y, height), (w, x, width))):
            axis = 2 + dim
            for t in range(ramp):
                if offset != 0:
                    mult.narrow(axis, t, 1).mul_((t + 1) / ramp)
                if size + offset < full:
                    mult.narrow(axis, size - 1 - t, 1).mul_((t + 1) / ramp)
    return area, mult.to(device=device, dtype=dtype)


def _percent_to_sigma(ds: DiscreteSigmas, percent: float) -> float:
    """``ModelSamplingDiscrete.percent_to_sigma``: 0 -> above every sigma, 1 -> 0."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return float(ds.t_to_sigma(torch.tensor((1.0 - percent) * 999.0)))


def _adm(model: ComfyModel, opts: dict[str, Any], latent_shape: Sequence[int], device: torch.device,
         dtype: torch.dtype, negative: bool = False) -> Tensor | None:
    """SDXL's ADM vector from the entry's pooled output and sizes (ComfyUI ``SDXL.encode_adm``; the refiner's
    ``SDXLRefiner.encode_adm`` with the aesthetic score, default 6, or 2.5 on the negative side), None for SD1/2."""
    cfg = model.models.config
    adm = cfg.unet.adm_in_channels
    if adm is None:
        return None
    pooled = opts.get("pooled_output")
    if pooled is None:
        raise ConfigError("this SDXL-type model needs a conditioning with a pooled output (CLIPTextEncode)")
    width = opts.get("width", latent_shape[3] * 8)
    height = opts.get("height", latent_shape[2] * 8)
    ids = [height, width, opts.get("crop_h", 0), opts.get("crop_w", 0)]
    n_ids, rem = divmod(adm - pooled.shape[-1], 256)
    if rem or n_ids not in (5, 6):
        raise ConfigError(f"ADM input of {adm} channels does not fit pooled {pooled.shape[-1]} + 5 or 6 x 256 ids")
    if n_ids == 6:
        ids += [opts.get("target_height", height), opts.get("target_width", width)]
    else:
        ids.append(opts.get("aesthetic_score", 2.5 if negative else 6.0))
    y = sdxl_adm_vector(pooled.float(), torch.tensor([ids], dtype=torch.float32), 256)
    return y.to(device=device, dtype=dtype)


class ComfyCFG:
    """``model(x, sigma) -> x0``: the active entries of both sides (batched per region), each side averaged with
    its weights, then ``uncond + (cond - uncond) * cfg`` on x0 (ComfyUI ``sampling_function`` / ``cfg_function``)."""

    def __init__(self, model: ComfyModel, positive: Conditioning, negative: Conditioning, cfg: float,
                 latent_shape: Sequence[int]) -> None:
        m = model.models
        self.ds = discretization(model)
        device = next(m.unet.parameters()).device
        self.device = device
        self.positive = [_Entry(self.ds, model, c, latent_shape, device, torch.float32) for c in positive]
        skip_uncond = math.isclose(cfg, 1.0)
        negative = fill_uncond_controls(positive, negative)
        self.negative = [] if skip_uncond else [_Entry(self.ds, model, c, latent_shape, device, torch.float32, True)
                                                for c in negative]
        self.cfg = float(cfg)
        self.model = model
        self.hooked = bool(model.extra_kv) or any(e.control is not None for e in self.positive + self.negative)
        for e in self.positive + self.negative:  # every control network loaded and checked before any step
            for h in e.control.chain() if e.control is not None else ():
                control = h.net.network(m.unet)
                check_family(control, m.config.family)
                fit_to_unet(control, m.unet, m.config.family)
        hooks = None
        if self.hooked:  # else the plain UNet call, unchanged
            hooks = ModelHooks(unet=UNetOptions(extra_kv=list(model.extra_kv)), residuals=[self._control])
        self.denoiser = make_denoiser(m.config.prediction, UNetNetwork(m.unet, hooks), self.ds)
        self._call: tuple[float, list[tuple[slice, _Entry]]] = (0.0, [])  # the coming UNet call's sigma and rows
        self._calls = 0

    def set_inpaint(self, latent: Tensor, denoise_mask: Tensor | None) -> None:
        """Give a 9-channel inpainting UNet its extra input per entry (``BaseModel.concat_cond``): the mask
        (``concat_mask`` or the sampler's noise mask; rounded) and the masked image's latent
        (``concat_latent_image`` or the latent being sampled); ones and a blank image without a mask."""
        if not self.model.models.config.inpainting:
            return
        vae = self.model.models.vae
        b, _, h, w = latent.shape
        for e in self.positive + self.negative:
            img = latent if e.concat_image is None else vae.scale_latents(e.concat_image.float()).to(latent)
            if img.shape[1:] != latent.shape[1:]:
                img = common_upscale(img, w, h, "bilinear", "center")
            img = resize_to_batch_size(img, b)
            mask = e.concat_mask if e.concat_mask is not None else denoise_mask
            if mask is None:
                blank = torch.tensor(BLANK_INPAINT_LATENT, dtype=latent.dtype, device=latent.device)
                e.concat = torch.cat([torch.ones_like(latent[:, :1]), blank.view(1, -1, 1, 1).expand_as(latent)], 1)
                continue
            mask = mask.float().to(latent.device)
            mask = mask[:, :1] if mask.ndim == 4 else mask
            mask = mask.reshape(-1, 1, *mask.shape[-2:])
            if mask.shape[-2:] != latent.shape[-2:]:
                mask = common_upscale(mask, w, h, "bilinear", "center")
            e.concat = torch.cat([resize_to_batch_size(mask.round(), b), img], dim=1)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x [B, C, h, w] at sigma [B] -> guided x0 [B, C, h, w]."""
        s = float(sigma.reshape(-1)[0])
        pos = [e for e in self.positive if e.active(s)]
        neg = [e for e in self.negative if e.active(s)]
        cond, uncond = self._predict([pos, neg], x, sigma)
        if not self.negative and math.isclose(self.cfg, 1.0):
            return cond
        return uncond + (cond - uncond) * self.cfg

    def _predict(self, sides: list[list[_Entry]], x: Tensor, sigma: Tensor) -> list[Tensor]:
        """``calc_cond_batch``: per side, each entry's prediction on its region weighted by its mult, normalised
        by the summed weights (0 where no entry acts); the entries of one region (both sides) share one call."""
        outs = [torch.zeros_like(x) for _ in sides]
        counts = [torch.full_like(x, 1e-37) for _ in sides]
        b = x.shape[0]
        regions: dict[tuple[int, int, int, int] | None, list[tuple[int, _Entry]]] = {}
        for k, entries in enumerate(sides):
            for e in entries:
                regions.setdefault(e.area, []).append((k, e))
        for area, group in regions.items():
            h, w, y, x0 = area if area is not None else (x.shape[2], x.shape[3], 0, 0)
            part = x[:, :, y:y + h, x0:x0 + w]
            kwargs = batch_conds([_kwargs(e, area) for _, e in group], b, repeat_context=True)
            n = len(group)
            if self.hooked:
                rows = torch.cat([torch.full((b,), 0 if e.negative else 1, device=x.device) for _, e in group])
                kwargs["call"] = CallInfo(self._calls, sigma.expand(b).repeat(n), rows)
                self._call = (float(sigma.reshape(-1)[0]), [(slice(i * b, (i + 1) * b), e)
                                                             for i, (_, e) in enumerate(group)])
                self._calls += 1
            pred = self.denoiser(part.repeat(n, 1, 1, 1), sigma.expand(b).repeat(n), **kwargs)
            for i, (k, e) in enumerate(group):
                mult = e.mult if e.mult is not None else torch.ones((), device=x.device, dtype=x.dtype)
                outs[k][:, :, y:y + h, x0:x0 + w] += pred[i * b:(i + 1) * b] * mult
                counts[k][:, :, y:y + h, x0:x0 + w] += mult
        return [o / c for o, c in zip(outs, counts, strict=True)]

    def _control(self, x_in: Tensor, t: Tensor, context: Tensor, y: Tensor | None,
                 call: CallInfo | None) -> Residuals | None:
        """The residual function of the hooked UNet: each control chain once on the rows of the entries holding it
        (ComfyUI runs a ControlNet once for the cond and uncond rows that share it), zeros elsewhere."""
        sigma, entries = self._call
        groups: dict[int, tuple[ControlHint, list[int]]] = {}
        for rows, e in entries:
            if e.control is not None:
                groups.setdefault(id(e.control), (e.control, []))[1].extend(range(rows.start, rows.stop))
        parts: list[tuple[Tensor, Residuals]] = []
        for hint, index in groups.values():
            idx = torch.tensor(index, device=x_in.device)
            r = hint.residuals(x_in[idx], t[idx], context[idx], None if y is None else y[idx], sigma,
                               self.model.models.unet, lambda p: _percent_to_sigma(self.ds, p))
            if r is not None:
                parts.append((idx, r))
        if not parts:
            return None
        if len(parts) == 1 and parts[0][0].tolist() == list(range(x_in.shape[0])):
            return parts[0][1]
        return place_rows(parts, x_in.shape[0])


def _kwargs(e: _Entry, area: tuple[int, int, int, int] | None) -> dict[str, Tensor]:
    """The denoiser keyword arguments of an entry (context, and y / concat where the model takes them)."""
    out = {"context": e.context}
    if e.y is not None:
        out["y"] = e.y
    if e.concat is not None:
        out["concat"] = e.concat if area is None else e.concat[:, :, area[2]:area[2] + area[0],
                                                                   area[3]:area[3] + area[1]]
    return out


def _noise_sampler(spec: SamplerSpec, seed: int, x: Tensor, sigmas: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """ComfyUI's per-step noise: a Brownian tree over the whole batch for the SDE family, else one generator."""
    shape = tuple(x.shape)
    if spec.needs_brownian:
        positive = sigmas[sigmas > 0]
        tree = BrownianNoise([seed], shape, float(positive.min()), float(sigmas.max()), device=x.device)
        return lambda s, t: tree(s, t)[0]
    rng = ImageRNG([seed], shape, device=x.device)
    return lambda s=None, t=None: rng()[0]


def sample(model: ComfyModel, guide: Callable[[Tensor, Tensor], Tensor], sampler: str, sigmas: Tensor,
           noise: Tensor, latent: Tensor, seed: int, mask: Tensor | None = None,
           progress: ProgressFn | None = None) -> tuple[Tensor, Tensor | None]:
    """Run a sampler from ComfyUI's start: (samples, last denoised x0), both unscaled latents [B, C, h, w].

    ``latent`` is the LATENT's unscaled samples, ``noise`` its start noise (zeros: no noise), ``mask`` its
    ``noise_mask`` (1 = denoise) at any size; ``progress(i, total, x0)`` after every step.
    """
    vae = model.models.vae
    if len(sigmas) == 0:
        return latent, None
    spec = sampler_spec(sampler)
    device = next(model.models.unet.parameters()).device
    scaled = vae.scale_latents(latent.float()).to(device)
    noise = noise.to(device)
    sigmas = sigmas.to(torch.float32)
    ds = discretization(model)
    s0 = float(sigmas[0])
    max_denoise = math.isclose(float(ds.sigma_max), s0, rel_tol=1e-5) or s0 > float(ds.sigma_max)
    x = noise * (math.sqrt(1.0 + s0**2) if max_denoise else s0) + scaled
    fn: Callable[[Tensor, Tensor], Tensor] = guide
    m = None
    if mask is not None:
        m = torch.nn.functional.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=x.shape[-2:],
                                            mode="bilinear").to(device)
        m = m.repeat(1, x.shape[1], 1, 1)
        m = m.repeat(math.ceil(x.shape[0] / m.shape[0]), 1, 1, 1)[: x.shape[0]]
        inpaint_noise = noise
        if sampler == "ddim":  # ComfyUI's "random" inpaint option
            inpaint_noise = torch.randn(noise.shape, generator=torch.Generator("cpu").manual_seed(seed + 1)).to(noise)
        fn = masked_model(guide, m, scaled, inpaint_noise)
    if isinstance(guide, ComfyCFG):
        guide.set_inpaint(scaled, m)
    run_sigmas = sigmas
    if spec.tail == "0.001" and float(sigmas[-1]) == 0:
        run_sigmas = torch.cat([sigmas[:-1], sigmas.new_full([1], 0.001)])
    total = len(sigmas) - 1
    last: dict[str, Tensor] = {}

    def callback(info: dict[str, Any]) -> None:
        last["x0"] = info["denoised"]
        if progress is not None:
            progress(int(info["i"]) + 1, total, info["denoised"])

    noise_sampler = _noise_sampler(spec, seed, x, run_sigmas.to(device)) if spec.stochastic else None
    kwargs = dict(spec.kwargs)
    with torch.no_grad():
        out = spec.function(fn, x, run_sigmas.to(device), callback=callback, noise_sampler=noise_sampler, **kwargs)
    denoised = vae.unscale_latents(last["x0"]).float().cpu() if "x0" in last else None
    return vae.unscale_latents(out).float().cpu(), denoised
