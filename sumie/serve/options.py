"""The server's settings as A1111's ``/sdapi/v1/options`` shows them (``shared.opts``), one store per app."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from sumie.serve.errors import ApiError

__all__ = ["DEFAULT_OPTIONS", "Options"]

# A1111 1.10 option names with their defaults; the ones Sumie acts on are marked.
DEFAULT_OPTIONS: dict[str, Any] = {
    "sd_model_checkpoint": "",  # used: the checkpoint title
    "sd_checkpoint_hash": "",
    "sd_vae": "Automatic",  # used: "Automatic", "None" or a VAE name
    "CLIP_stop_at_last_layers": 1,  # used: clip skip
    "eta_ancestral": 1.0,  # used: eta of ancestral / SDE samplers when the request has none
    "eta_ddim": 0.0,  # used: DDIM's eta when the request has none
    "eta_noise_seed_delta": 0,  # used: ENSD
    "samples_format": "png",  # used: png, jpg or webp for saved images
    "jpeg_quality": 80,  # used
    "enable_pnginfo": True,  # used: infotext in saved and returned images
    "samples_save": True,
    "send_seed": True,
    "randn_source": "GPU",
    "img2img_fix_steps": False,
    "live_previews_enable": True,  # used
    "show_progress_every_n_steps": 10,
    "show_progress_type": "Approx cheap",
    "sd_checkpoints_limit": 1,
    "sd_checkpoint_cache": 0,
    "sd_vae_checkpoint_cache": 0,
    "outdir_samples": "",
    "outdir_txt2img_samples": "outputs/txt2img-images",
    "outdir_img2img_samples": "outputs/img2img-images",
    "outdir_extras_samples": "outputs/extras-images",
    "save_images_add_number": True,
    "filter_nsfw": False,
    "upscaler_for_img2img": None,
    "img2img_background_color": "#ffffff",
    "initial_noise_multiplier": 1.0,
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 0.0,
    "s_noise": 1.0,
    "k_sched_type": "Automatic",
    "sigma_min": 0.0,
    "sigma_max": 0.0,
    "rho": 0.0,
    "always_discard_next_to_last_sigma": False,
    "sgm_noise_multiplier": False,
    "pad_cond_uncond": False,
    "pad_cond_uncond_v0": False,
    "persistent_cond_cache": True,
    "token_merging_ratio": 0.0,
    "token_merging_ratio_hr": 0.0,
    "s_min_uncond": 0.0,
    "s_min_uncond_all": False,
    "skip_early_cond": 0.0,
    "face_restoration": False,
    "face_restoration_model": "CodeFormer",
    "tiling": False,
    "sd_unet": "Automatic",
    "sd_lora": "None",
    "lora_preferred_name": "Alias from file",
    "add_model_hash_to_info": True,
    "add_model_name_to_info": True,
    "add_version_to_infotext": True,
    "return_grid": True,
    "do_not_show_images": False,
}
_FORMATS = ("png", "jpg", "jpeg", "webp")


def _check(key: str, value: Any) -> Any:
    """The value if its type fits the option's default (ints pass for floats); 422 naming the key otherwise."""
    default = DEFAULT_OPTIONS[key]
    if default is None:
        return value
    kind = type(default)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ApiError(422, f"option {key} must be a {kind.__name__}, got {value!r}", field=key)
    if key == "samples_format" and value.lower() not in _FORMATS:
        raise ApiError(422, f"option samples_format must be one of {', '.join(_FORMATS)}, got {value!r}", field=key)
    if key == "CLIP_stop_at_last_layers" and not 1 <= value <= 12:
        raise ApiError(422, f"option CLIP_stop_at_last_layers must be in [1, 12], got {value}", field=key)
    return value


class Options:
    """A thread-safe copy of the defaults; unknown keys are ignored (A1111 ignores options it does not have)."""

    def __init__(self) -> None:
        self._values = dict(DEFAULT_OPTIONS)
        self._lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        """Every option now."""
        with self._lock:
            return dict(self._values)

    def merged(self, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """The options with a request's ``override_settings`` applied (checked; unknown keys dropped)."""
        out = self.snapshot()
        for key, value in (overrides or {}).items():
            if key in DEFAULT_OPTIONS:
                out[key] = _check(key, value)
        return out

    def checked(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The known keys of ``values``, type-checked (raises before anything is changed)."""
        return {k: _check(k, v) for k, v in values.items() if k in DEFAULT_OPTIONS}

    def update(self, values: Mapping[str, Any]) -> None:
        """Set already-checked values."""
        with self._lock:
            self._values.update(values)

    def __getitem__(self, key: str) -> Any:
        with self._lock:
            return self._values[key]
