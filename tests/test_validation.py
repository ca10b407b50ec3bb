"""sumie.pipelines.validation: the one set of request checks behind the engine and the CLI (no model needed)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from sumie.errors import ConfigError
from sumie.pipelines.params import GenerationParams, RefinerParams
from sumie.pipelines.validation import (
    ETA_MAX,
    MAX_SEED_VALUE,
    S_NOISE_MAX,
    IgnoredSettingWarning,
    api_name,
    check_request,
    check_size,
    check_values,
    processing_size,
    uses_s_noise,
)
from sumie.sampling import registry
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.noise import ImageRNG


def cli_name(field: str) -> str:
    return "--" + field.replace("_", "-")


@pytest.mark.parametrize(("kw", "api", "cli"), [
    ({"steps": 0}, "steps must be at least 1, got 0", "--steps must be at least 1"),
    ({"batch_size": 0}, "batch size must be at least 1", "--batch-size must be at least 1"),
    ({"n_iter": 0}, "batch count (n_iter) must be at least 1", "--n-iter must be at least 1"),
    ({"subseed_strength": 1.5}, "variation strength (subseed_strength) must be in [0, 1]", "--subseed-strength"),
    ({"cfg_rescale": -0.1}, "CFG rescale must be in [0, 1]", "--cfg-rescale must be in [0, 1]"),
    ({"cfg_scale": float("nan")}, "CFG scale must be a finite number", "--cfg-scale must be a finite number"),
    ({"denoising_strength": 2.0}, "denoising strength must be in [0, 1]", "--denoising-strength must be in"),
    ({"eta": -3.0}, "eta must be in [0, 100]", "--eta must be in [0, 100]"),
    ({"eta": float("inf")}, "eta must be in [0, 100]", "--eta must be in [0, 100]"),
    ({"s_noise": -0.5}, "s_noise must be in [0, 100]", "--s-noise must be in [0, 100]"),
    ({"s_noise": float("nan")}, "s_noise must be in [0, 100]", "--s-noise must be in [0, 100]"),
    ({"clip_skip": 0}, "clip skip must be 1 (off) or more", "--clip-skip must be 1 (off) or more"),
    ({"eta_noise_seed_delta": -1}, "eta noise seed delta must be >= 0", "--eta-noise-seed-delta must be >= 0"),
    ({"seed": -2}, "seed must be -1 (random) or a number from 0 to", "--seed must be -1 (random)"),
    ({"refiner": RefinerParams("r.safetensors", switch_at=1.5)}, "refiner switch point (refiner.switch_at) must be",
     "--refiner.switch-at must be in [0, 1]"),
])
def test_messages_name_the_field_for_the_api_and_the_flag_for_the_cli(kw: dict, api: str, cli: str) -> None:
    p = GenerationParams(**kw)
    with pytest.raises(ConfigError) as e:
        check_values(p)
    assert api in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_values(p, cli_name)
    assert str(e.value).startswith(cli)


def test_api_names() -> None:
    assert (api_name("steps"), api_name("batch_size"), api_name("cfg_scale")) == ("steps", "batch size", "CFG scale")
    assert api_name("subseed_strength") == "variation strength (subseed_strength)"


def test_seed_range_covers_every_image_and_the_delta() -> None:
    top = MAX_SEED_VALUE
    assert top == 2**64 - 1
    check_values(GenerationParams(seed=top))  # torch.Generator.manual_seed takes it
    torch.Generator().manual_seed(top)
    check_values(GenerationParams(seed=-1, subseed=top))
    with pytest.raises(ConfigError, match=r"seed 18446744073709551616 is out of range: seeds go from 0 to "):
        check_values(GenerationParams(seed=top + 1))
    with pytest.raises(ValueError):  # why: torch refuses it with a traceback-only error
        torch.Generator().manual_seed(top + 1)
    check_values(GenerationParams(seed=top - 1, batch_size=2))
    with pytest.raises(ConfigError, match=r"with 2 images: .*use a seed up to 18446744073709551614"):
        check_values(GenerationParams(seed=top, batch_size=2))
    check_values(GenerationParams(seed=top, batch_size=2, subseed_strength=0.5))  # then every image keeps the seed
    with pytest.raises(ConfigError, match="subseed .* with 4 images"):
        check_values(GenerationParams(subseed=top - 2, batch_size=2, n_iter=2))
    with pytest.raises(ConfigError, match="eta noise seed delta 10: .*up to 18446744073709551605"):
        check_values(GenerationParams(seed=top, eta_noise_seed_delta=10))
    with pytest.raises(ConfigError, match="eta noise seed delta .* is too large"):
        check_values(GenerationParams(seed=-1, eta_noise_seed_delta=top))


def test_size_is_a_multiple_of_the_vae_factor() -> None:
    check_size(60, 64, 4)
    check_size(None, None, 8)
    with pytest.raises(ConfigError, match=r"^width 61 is not a multiple of 4; use 60 or 64 "):
        check_size(61, 60, 4)
    with pytest.raises(ConfigError, match=r"^--height 3 is not a multiple of 4; use 4 or 8 "):
        check_size(60, 3, 4, cli_name)
    with pytest.raises(ConfigError, match=r"^width 60 is not a multiple of 8; use 56 or 64"):
        check_size(60, 64, 8)
    assert processing_size(GenerationParams(), 4, 64) == (64, 64)
    from PIL import Image

    init = GenerationParams(init_images=[Image.new("RGB", (61, 30))], height=32)
    assert processing_size(init, 4, 64) == (60, 32)  # the init image's width rounded down to the factor


def test_sampler_options_only_where_the_sampler_takes_them() -> None:
    assert check_request(GenerationParams(sampler="Euler a", eta=0.5, s_noise=0.9))[0].name == "euler_ancestral"
    with pytest.raises(ConfigError, match=r"^sampler DPM\+\+ 2M has no eta; leave --eta out \(it applies to "
                                          r"Euler a, .*DDIM\)"):
        check_request(GenerationParams(sampler="dpmpp_2m", eta=0.5), cli_name)
    with pytest.raises(ConfigError, match=r"has no sigma noise; leave s_noise out \(it applies to Euler a, .*"
                                          r"Restart\)"):
        check_request(GenerationParams(sampler="DPM++ 2M Karras", s_noise=0.5))
    with pytest.raises(ConfigError, match="unknown sampler 'Euler z'"):
        check_request(GenerationParams(sampler="Euler z"))
    with pytest.warns(IgnoredSettingWarning, match="s_noise has no effect with sampler Euler"):
        check_request(GenerationParams(sampler="Euler", s_noise=0.5))
    seen: list[str] = []
    check_request(GenerationParams(sampler="Euler a", eta=0.0, s_noise=0.5), cli_name, warn=seen.append)
    assert seen == ["--s-noise has no effect with sampler Euler a (at eta 0 it adds no noise); it is ignored and not "
                    "written to the image's parameters"]


@pytest.mark.parametrize(("sampler", "eta", "used"), [
    ("euler", None, False), ("heun", None, False), ("dpm_2", None, False),  # s_noise only scales churn, off
    ("euler_ancestral", None, True), ("euler_ancestral", 0.0, False), ("dpmpp_2m_sde", 0.3, True),
    ("restart", None, True), ("ddim", 0.5, False), ("dpmpp_2m", None, False),
])
def test_uses_s_noise(sampler: str, eta: float | None, used: bool) -> None:
    assert uses_s_noise(registry.get_sampler(sampler), eta) is used


def _toy_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x / (1 + s**2) ** 0.5) * 0.8


def _sample(spec: registry.SamplerSpec, steps: int, **options: float) -> torch.Tensor:
    sigmas = registry.make_sigmas(spec, spec.default_schedule, DiscreteSigmas.from_betas(), steps)
    rng = ImageRNG([1, 2], (4, 8, 8))
    x = rng.first() * sigmas[0]
    noise = registry.make_noise_sampler(spec, [1, 2], (4, 8, 8), sigmas, rng=rng)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Should have", category=UserWarning)  # torchsde float32 ends
        return spec(_toy_model, x, sigmas, noise_sampler=noise, **options)


NOISY = [s.name for s in registry.SAMPLERS
         if {"eta", "s_noise"} & set(inspect.signature(s.function).parameters)]


@pytest.mark.parametrize("name", NOISY)
def test_eta_and_s_noise_bounds_never_give_nan(name: str) -> None:
    """The accepted extremes keep every sampler finite (20 steps: Restart restarts); a negative eta does not."""
    spec = registry.get_sampler(name)
    params = inspect.signature(spec.function).parameters
    etas = [0.0, ETA_MAX] if "eta" in params else [None]
    s_noises = [0.0, S_NOISE_MAX] if "s_noise" in params else [None]
    for eta in etas:
        for s_noise in s_noises:
            options = {k: v for k, v in (("eta", eta), ("s_noise", s_noise)) if v is not None}
            assert torch.isfinite(_sample(spec, 20, **options)).all(), options
    if "eta" in params and spec.name != "ddim":  # DDIM refuses a negative eta itself
        assert not torch.isfinite(_sample(spec, 20, eta=-3.0)).all()  # what the lower bound prevents
