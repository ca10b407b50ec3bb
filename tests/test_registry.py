"""The sampler registry: A1111 1.10 and ComfyUI names, default schedules, flavors, sigmas, noise, and the
``sumie samplers`` command."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from sumie.cli.main import main
from sumie.errors import ConfigError
from sumie.sampling import registry, schedules
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.samplers.sde import sample_dpmpp_2m_sde

# A1111 1.10's sampler labels (sd_samplers_kdiffusion / _timesteps / _lcm / _extra) -> (sampler, default schedule)
A1111 = {
    "DPM++ 2M": ("dpmpp_2m", "karras"), "DPM++ SDE": ("dpmpp_sde", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "exponential"), "DPM++ 2M SDE Heun": ("dpmpp_2m_sde_heun", "exponential"),
    "DPM++ 2S a": ("dpmpp_2s_ancestral", "karras"), "DPM++ 3M SDE": ("dpmpp_3m_sde", "exponential"),
    "Euler a": ("euler_ancestral", "normal"), "Euler": ("euler", "normal"), "LMS": ("lms", "normal"),
    "Heun": ("heun", "normal"), "DPM2": ("dpm_2", "karras"), "DPM2 a": ("dpm_2_ancestral", "karras"),
    "Restart": ("restart", "karras"), "DDIM": ("ddim", "ddim_uniform"), "PLMS": ("plms", "ddim_uniform"),
    "UniPC": ("uni_pc", "normal"), "LCM": ("lcm", "sgm_uniform"), "DDPM": ("ddpm", "normal"),
}
# ComfyUI's KSampler sampler names that Sumie has.
COMFYUI = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde",
           "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
           "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ddim", "uni_pc", "uni_pc_bh2"]
COMFYUI_SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
                      "linear_quadratic", "kl_optimal"]


@pytest.mark.parametrize("label", list(A1111))
def test_a1111_labels_resolve_with_their_default_schedule(label: str) -> None:
    spec, schedule = registry.resolve(label)
    assert (spec.name, schedule) == A1111[label] and spec.flavor == "a1111"
    assert registry.resolve(label.upper(), "Automatic") == (spec, schedule)


@pytest.mark.parametrize(("name", "want"), [
    ("DPM++ 2M Karras", ("dpmpp_2m", "karras")), ("Euler a Karras", ("euler_ancestral", "karras")),
    ("dpm++ 2m sde heun karras", ("dpmpp_2m_sde_heun", "karras")), ("LMS Karras", ("lms", "karras")),
    ("DPM++ 3M SDE Exponential", ("dpmpp_3m_sde", "exponential")), ("DPM2 a Karras", ("dpm_2_ancestral", "karras")),
    ("Euler SGM Uniform", ("euler", "sgm_uniform")), ("Euler SGMUniform", ("euler", "sgm_uniform")),
    ("DPM++ 2M Align Your Steps", ("dpmpp_2m", "align_your_steps_a1111")), ("Heun Beta", ("heun", "beta_a1111")),
    ("DPM++ SDE KL Optimal", ("dpmpp_sde", "kl_optimal_a1111")), ("Euler Uniform", ("euler", "normal")),
    ("k_dpmpp_2m_ka", ("dpmpp_2m", "karras")), ("k_dpmpp_3m_sde_exp", ("dpmpp_3m_sde", "exponential")),
    ("k_euler_a", ("euler_ancestral", "normal")),
])
def test_a1111_combined_labels(name: str, want: tuple[str, str]) -> None:
    spec, schedule = registry.resolve(name)
    assert (spec.name, schedule) == want
    assert registry.resolve(name, want[1])[1] == want[1]  # naming the same schedule twice is fine


def test_a1111_defaults_and_discards_agree_with_the_schedule_tables() -> None:
    for label in A1111:
        spec = registry.get_sampler(label)
        if spec.module not in ("ddim", "plms", "unipc", "lcm"):  # k-diffusion samplers have an "Automatic" entry
            assert spec.default_schedule == registry.resolve_schedule(schedules.a1111_automatic(label)), label
        assert spec.discard_penultimate_sigma == (label.lower() in schedules.A1111_DISCARD_PENULTIMATE), label


@pytest.mark.parametrize("name", COMFYUI)
@pytest.mark.parametrize("scheduler", COMFYUI_SCHEDULERS)
def test_comfyui_names(name: str, scheduler: str) -> None:
    spec, schedule = registry.resolve(name, scheduler)
    assert spec.flavor == ("a1111" if name in ("euler", "heun", "lms", "ddim", "ddpm", "lcm") else "comfyui")
    assert name.removesuffix("_gpu") in (spec.name, *spec.comfyui)
    want = {"beta": "beta_comfyui", "kl_optimal": "kl_optimal_comfyui"}.get(scheduler, scheduler)
    if spec.flavor == "a1111":  # names both UIs share follow A1111 (the project's default convention)
        want = {"beta": "beta_a1111", "kl_optimal": "kl_optimal_a1111"}.get(scheduler, scheduler)
    assert schedule == want


def test_flavor_decides_discard_and_tail() -> None:
    ds = DiscreteSigmas.from_betas(dtype=torch.float64)
    a = registry.get_sampler("DPM++ 3M SDE")
    c = registry.get_sampler("dpmpp_3m_sde")
    sa, sc = (registry.make_sigmas(s, "exponential", ds, 10, dtype=torch.float64) for s in (a, c))
    assert len(sa) == len(sc) == 11
    assert torch.equal(sa, schedules.make_sigmas("exponential", ds, 10, discard_penultimate_sigma=True,
                                                 dtype=torch.float64))
    assert torch.equal(sc, schedules.make_sigmas("exponential", ds, 10, dtype=torch.float64))
    unipc_a = registry.make_sigmas(registry.get_sampler("UniPC"), "normal", ds, 10, dtype=torch.float64)
    unipc_c = registry.make_sigmas(registry.get_sampler("uni_pc"), "normal", ds, 10, dtype=torch.float64)
    # A1111's UniPC stops at sigma_min; ComfyUI's drops the penultimate sigma and ends at 0.001.
    assert torch.equal(unipc_a, schedules.make_sigmas("normal", ds, 11, dtype=torch.float64)[:-1])
    assert len(unipc_c) == 11 and float(unipc_c[-1]) == 0.001
    assert torch.equal(unipc_c[:-1], schedules.make_sigmas("normal", ds, 10, discard_penultimate_sigma=True,
                                                           dtype=torch.float64)[:-1])
    assert registry.get_sampler("dpmpp_3m_sde", "a1111").discard_penultimate_sigma


def test_every_alias_resolves_and_every_function_takes_its_options() -> None:
    for spec in registry.SAMPLERS:
        for alias in (spec.name, *spec.aliases):
            assert registry.get_sampler(alias).name == spec.name, alias
        params = inspect.signature(spec.function).parameters
        assert {"callback", "noise_sampler"} <= set(params)
        assert set(spec.kwargs) <= set(params), spec.name
    for name in registry.schedule_names():
        a1111, comfy = registry.schedule_aliases(name)
        assert all(registry.resolve_schedule(n, "a1111") == name for n in a1111)
        assert all(registry.resolve_schedule(n, "comfyui") == name for n in comfy)


def test_spec_call_applies_its_options() -> None:
    spec = registry.get_sampler("DPM++ 2M SDE Heun")
    sigmas = schedules.make_sigmas("exponential", DiscreteSigmas.from_betas(dtype=torch.float64), 8,
                                   dtype=torch.float64)
    x = torch.linspace(-3, 3, 12, dtype=torch.float64).reshape(2, 6) * sigmas[0]
    model = lambda x, s: torch.tanh(x / (1 + s[:, None] ** 2) ** 0.5)  # noqa: E731

    def noise(a, b):  # noqa: ANN001, ANN202
        return torch.cos(x * float(a) + float(b))

    out = spec(model, x, sigmas, noise_sampler=noise)
    assert torch.equal(out, sample_dpmpp_2m_sde(model, x, sigmas, noise_sampler=noise, solver_type="heun"))
    assert not torch.equal(out, sample_dpmpp_2m_sde(model, x, sigmas, noise_sampler=noise))
    assert torch.equal(spec(model, x, sigmas, noise_sampler=noise, solver_type="midpoint"),
                       sample_dpmpp_2m_sde(model, x, sigmas, noise_sampler=noise))


def test_errors_are_one_line_and_list_the_valid_names() -> None:
    for call in (lambda: registry.resolve("DPM fast"), lambda: registry.resolve("euler", "cosine"),
                 lambda: registry.resolve("Euler Cosine")):
        with pytest.raises(ConfigError) as e:
            call()
        assert "\n" not in str(e.value) and "valid:" in str(e.value)
    with pytest.raises(ConfigError, match="euler_ancestral, heun"):
        registry.resolve("k_euler_b")
    with pytest.raises(ConfigError, match="karras"):
        registry.resolve("DPM++ 2M Karras", "exponential")


def test_cli_lists_samplers_and_schedules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["samplers"]) == 0
    text = capsys.readouterr().out
    for name in ("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun_gpu", "uni_pc_bh2", "SGM Uniform",
                 "beta_comfyui", "kl_optimal_a1111"):
        assert name in text
    assert main(["samplers", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in data["samplers"]] == registry.sampler_names()
    assert {s["name"] for s in data["schedules"]} == set(registry.schedule_names())
    assert next(s for s in data["samplers"] if s["name"] == "dpmpp_sde")["noise"] == "brownian"
