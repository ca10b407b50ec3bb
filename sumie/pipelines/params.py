"""Typed parameters of one generation request (A1111's fields, A1111's defaults)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

VAETilingMode = Literal["auto", "on", "off"]
ResizeMode = Literal["just_resize", "crop_and_resize", "resize_and_fill"]
InpaintFill = Literal["fill", "original", "latent_noise", "latent_nothing"]
Convention = Literal["a1111", "diffusers"]


@dataclass
class HiresParams:
    """Hires fix: first pass at (width, height), upscale, then an img2img pass at the larger size."""

    scale: float = 2.0
    # "latent" (A1111 "Latent": bilinear on the latent), "lanczos", or an upscaler model's name or path (ESRGAN,
    # Real-ESRGAN, SwinIR: looked up in the model manager's upscaler folders)
    upscaler: str = "latent"
    steps: int = 0  # 0 = same as the first pass
    denoising_strength: float = 0.7
    resize_x: int = 0  # explicit target size instead of scale (0 = use scale)
    resize_y: int = 0


@dataclass
class InpaintParams:
    """Inpainting: the mask is white (255) where the image is repainted (A1111's convention)."""

    mask: Image.Image
    mask_blur: int = 4
    invert: bool = False
    fill: InpaintFill = "original"
    full_res: bool = False  # "Only masked": crop the masked region (+ padding), upscale, paste back
    full_res_padding: int = 32
    latent_mask: Image.Image | None = None  # A1111 p.latent_mask (outpainting): mask of the fill and latent blend


@dataclass
class RefinerParams:
    """SDXL refiner hand-off: the refiner takes over at ``switch_at`` of the steps."""

    model: str
    switch_at: float = 0.8


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA for a request without a prompt tag: a name in the LoRA folders or a path, and its two weights.

    ``LoraSpec("add_detail", 0.8)`` is ``<lora:add_detail:0.8>``; ``te`` weighs the text encoder(s), ``unet`` the
    UNet (None: the same as ``te``, as in ``<lora:name:W>``).
    """

    name: str | os.PathLike[str]
    te: float = 1.0
    unet: float | None = None

    @property
    def unet_weight(self) -> float:
        """The UNet weight (``te`` when not given)."""
        return self.te if self.unet is None else self.unet


@dataclass
class IPAdapterUnit:
    """An IP-Adapter (Ye et al. 2023) with its reference image(s): a name in the IP-Adapter folders or a path.

    ``weight`` scales the image attention; ``start`` / ``end`` are fractions of the noise schedule (0 = the first
    step, 1 = the last) where it acts; ``encoder`` is the CLIP vision file (None: found next to the adapter or in the
    clip_vision folder by its width). Several images: their tokens are concatenated (diffusers).
    """

    model: str | os.PathLike[str]
    images: list[Image.Image] = field(default_factory=list)
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    encoder: str | os.PathLike[str] | None = None


ControlMode = Literal["Balanced", "My prompt is more important", "ControlNet is more important"]
ControlResize = Literal["Just Resize", "Crop and Resize", "Resize and Fill"]


@dataclass
class ControlUnit:
    """One ControlNet (or T2I-Adapter) of a request, with A1111's ControlNet-extension fields and defaults.

    ``model``: a name in the ControlNet folders or a path; ``image``: the control image (None: img2img takes the
    init image with the img2img resize mode, as the extension does; txt2img needs one); ``weight``; ``start`` /
    ``end``: the fraction of the pass's steps where it acts; ``mode``: A1111's control mode (ints 0/1/2 accepted, as
    the extension's API does); ``resize_mode``: how the image is fitted to the pass's size (ints 0/1/2); ``module``:
    the preprocessor run on the image first ("none": the image is the control map); ``processor_res`` /
    ``threshold_a`` / ``threshold_b``: the preprocessor's settings (-1: its default); ``pixel_perfect``: A1111's
    flag, kept for the infotext; ``guess_mode``: diffusers' guess mode (cond rows only, scales
    ``logspace(-1, 0, n)``).
    """

    model: str | os.PathLike[str]
    image: Image.Image | None = None
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: ControlMode | int = "Balanced"
    resize_mode: ControlResize | int = "Crop and Resize"
    module: str = "none"
    guess_mode: bool = False
    processor_res: int = -1
    threshold_a: float = -1.0
    threshold_b: float = -1.0
    pixel_perfect: bool = False


DEFAULT_CFG_SCALE = 7.0  # A1111's default: for a model whose file recommends no scale, and for infotexts


@dataclass
class GenerationParams:
    """One request: txt2img when ``init_images`` is empty, img2img otherwise, inpainting when ``inpaint`` is set."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float | None = None  # None = the model file's recommended scale (``sumie.cfg_scale``), else 7
    sampler: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    seed: int = -1  # -1 = random (reported in the result)
    subseed: int = -1  # variation seed (-1 = random when subseed_strength > 0)
    subseed_strength: float = 0.0
    width: int | None = None  # None = the model's native size (512 SD1, 768 SD2-v, 1024 SDXL)
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int = 1
    cfg_rescale: float = 0.0
    pad_conds: bool = False  # A1111 "Pad prompt/negative prompt": pad the shorter with empty chunks (else repetition)
    eta: float | None = None  # ancestral/DDIM eta (None = sampler default)
    s_noise: float | None = None
    eta_noise_seed_delta: int = 0  # A1111 "Eta noise seed delta" (ENSD): generators restart at seed + delta
    # img2img / inpainting
    init_images: list[Image.Image] = field(default_factory=list)
    denoising_strength: float = 0.75
    resize_mode: ResizeMode = "just_resize"
    inpaint: InpaintParams | None = None
    # extras
    hires: HiresParams | None = None
    refiner: RefinerParams | None = None
    sdxl_original_size: tuple[int, int] | None = None  # None = (height, width) of the output
    sdxl_crop: tuple[int, int] = (0, 0)
    sdxl_target_size: tuple[int, int] | None = None
    convention: Convention = "a1111"  # "diffusers": its img2img steps, start noise scale, uint8 rounding
    styles: list[str] = field(default_factory=list)
    # LoRA besides the prompt's <lora:...> tags (both are applied the same way); strict: a LoRA module that matches
    # nothing in the model is an error instead of a warning
    loras: list[LoraSpec] = field(default_factory=list)
    strict_lora: bool = False
    ip_adapters: list[IPAdapterUnit] = field(default_factory=list)  # image prompts (IP-Adapter units)
    # ControlNets / T2I-Adapters (several add their residuals)
    controlnets: list[ControlUnit] = field(default_factory=list)
    # big images: VAE decode / encode in overlapping tiles ("auto": only when the whole image would not fit in memory;
    # sumie.pipelines.vae_tiling); tile size in image pixels (overlap: an eighth of it)
    vae_tiling: VAETilingMode = "auto"
    vae_tile_size: int = 512
    # speed options that change the image, all off by default (README "Speed options that change the image")
    token_merging_ratio: float = 0.0  # A1111 "Token merging ratio": ToMe (Bolya & Hoffman 2023), fraction merged
    token_merging_ratio_hr: float = 0.0  # the hires pass's ratio (0 = token_merging_ratio), A1111's
    token_merging_random: bool = False  # random destination tokens drawn from the seed (A1111: the fixed corner)
    s_min_uncond: float = 0.0  # A1111 "NGMS": below this sigma skip the uncond pass (every other model call)
    s_min_uncond_all: bool = False  # A1111 "NGMS all steps": skip it on every call below s_min_uncond
    skip_early_cond: float = 0.0  # A1111 "Skip Early CFG": no uncond pass on this fraction of the first calls
    deepcache_interval: int = 0  # DeepCache (Ma et al. 2023): every N-th UNet call in full, the others reuse the
    deepcache_depth: int = 0  # deep features and recompute input blocks 0..depth and their decoder blocks only
    taesd_decode: bool = False  # A1111 "VAE Decoder: TAESD": the final decode with the engine's TAESD
