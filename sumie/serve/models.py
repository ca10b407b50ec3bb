"""A1111 1.10's ``/sdapi/v1`` request and response bodies (names, types and defaults of ``modules/api/models.py``).

Every request field is nullable and optional (null = the default); unknown keys are ignored, as A1111's pydantic
models do. Types are checked by pydantic, so a wrong type is a 422 whose ``loc`` names the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ExtraBatchRequest", "ExtraSingleRequest", "ExtrasRequest", "GenerationResponse", "Img2ImgRequest",
           "PngInfoRequest", "ProgressResponse", "Txt2ImgRequest"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Common(_Request):
    """The fields txt2img and img2img share (A1111's StableDiffusionProcessing arguments)."""

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0.0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = 0.75
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] | None = Field(default_factory=list)
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)
    infotext: str | None = None


class Txt2ImgRequest(_Common):
    """``POST /sdapi/v1/txt2img`` (StableDiffusionTxt2ImgProcessingAPI)."""

    enable_hr: bool | None = False
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""


class Img2ImgRequest(_Common):
    """``POST /sdapi/v1/img2img`` (StableDiffusionImg2ImgProcessingAPI)."""

    init_images: list[str] | None = None
    resize_mode: int | None = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None
    mask_round: bool | None = True
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool | None = False


class GenerationResponse(BaseModel):
    """TextToImageResponse / ImageToImageResponse: base64 PNGs, the request as run, ``info`` a JSON string."""

    images: list[str] | None = None
    parameters: dict[str, Any]
    info: str


class ProgressState(BaseModel):
    """A1111's ``shared.state.dict()``."""

    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    """``GET /sdapi/v1/progress``."""

    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class PngInfoRequest(_Request):
    """``POST /sdapi/v1/png-info``."""

    image: str | None = None


class ExtrasRequest(_Request):
    """The upscale settings of both extras endpoints."""

    resize_mode: int | None = 0  # 0: scale by upscaling_resize, 1: to upscaling_resize_w x _h
    show_extras_results: bool | None = True
    gfpgan_visibility: float | None = 0.0
    codeformer_visibility: float | None = 0.0
    codeformer_weight: float | None = 0.0
    upscaling_resize: float | None = 2.0
    upscaling_resize_w: int | None = 512
    upscaling_resize_h: int | None = 512
    upscaling_crop: bool | None = True
    upscaler_1: str | None = "None"
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: float | None = 0.0
    upscale_first: bool | None = False


class ExtraSingleRequest(ExtrasRequest):
    """``POST /sdapi/v1/extra-single-image``."""

    image: str | None = ""


class FileData(BaseModel):
    """One image of extra-batch-images."""

    data: str
    name: str


class ExtraBatchRequest(ExtrasRequest):
    """``POST /sdapi/v1/extra-batch-images``."""

    imageList: list[FileData] | None = None  # noqa: N815 - A1111's field name
