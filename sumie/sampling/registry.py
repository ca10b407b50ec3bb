"""Every sampler by name: Sumie's, A1111's ("DPM++ 2M Karras") and ComfyUI's ("dpmpp_2m" + "karras").

One table of :class:`SamplerSpec`. :func:`resolve` turns a user's sampler (and scheduler) into a spec and a schedule
name, case-insensitively; an A1111 label with a scheduler suffix ("Euler a Karras") carries its schedule. With no
scheduler (or A1111's "Automatic") a sampler gets its default schedule, as A1111 1.10 assigns them.

A1111 and ComfyUI disagree in three places, so a resolved spec carries a ``flavor``: the convention of the name it
was found by (A1111 labels -> "a1111"; ComfyUI's snake_case names, which are also Sumie's -> "comfyui"; the names
both use, like "euler" or "ddim", -> "a1111", the project default). It decides (1) which samplers drop the
penultimate sigma (A1111: DPM2, DPM2 a, DPM++ 3M SDE; ComfyUI: dpm_2, dpm_2_ancestral, uni_pc, uni_pc_bh2),
(2) how UniPC's sigmas end (:data:`Tail`) and (3) which schedule the shared names "beta", "kl_optimal" and
"align_your_steps" mean (see ``sumie.sampling.schedules``). Sampler modules are imported only when first used, so
this module imports on its own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from sumie.errors import ConfigError
from sumie.sampling.samplers.common import Callback, Model, NoiseSampler

Flavor = Literal["a1111", "comfyui"]
# How a sampler's sigmas end: "zero" - the schedule as is (a last step to 0); "sigma_min" - one step more is made
# and the final 0 dropped, so sampling stops at the smallest sigma without a denoise to 0 (A1111's UniPC:
# t_0 = 1/N, denoise_to_zero=False); "0.001" - the final 0 becomes 0.001 (ComfyUI's uni_pc).
Tail = Literal["zero", "sigma_min", "0.001"]


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: its function (``module.attr`` under ``sumie.sampling.samplers``), options and names.

    ``stochastic``: needs a noise sampler; ``needs_brownian``: that noise should be Brownian (DPM++ SDE family),
    else per-image white noise. ``options`` are keyword arguments the name implies (``solver_type="heun"`` for
    DPM++ 2M SDE Heun). ``discard_a1111`` / ``discard_comfyui``: that UI computes steps + 1 sigmas and drops the one
    before the final 0; ``discard_penultimate_sigma`` is the one of the spec's ``flavor``. ``tail_a1111`` /
    ``tail_comfyui``: how the sigmas end (see :data:`Tail`); ``tail`` is the one of the spec's flavor.
    ``consistency``: a consistency-model sampler (LCM) whose denoiser applies LCM's boundary condition, as A1111's
    LCM sampler and diffusers' LCMScheduler do.
    """

    name: str
    module: str
    attr: str
    stochastic: bool
    needs_brownian: bool
    default_schedule: str
    a1111: tuple[str, ...] = ()
    comfyui: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()
    discard_a1111: bool = False
    discard_comfyui: bool = False
    tail_a1111: Tail = "zero"
    tail_comfyui: Tail = "zero"
    flavor: Flavor = "a1111"
    consistency: bool = False  # the model's x0 goes through LCM's boundary condition (samplers.lcm.LCMDenoiser)

    @property
    def function(self) -> Callable[..., Tensor]:
        """The sampler function (imported on first use)."""
        return getattr(importlib.import_module(f"sumie.sampling.samplers.{self.module}"), self.attr)

    @property
    def aliases(self) -> tuple[str, ...]:
        """Every other name it answers to: A1111 labels and aliases, then ComfyUI names."""
        return tuple(dict.fromkeys(n for n in (*self.a1111, *self.comfyui) if n != self.name))

    @property
    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments."""
        return dict(self.options)

    @property
    def discard_penultimate_sigma(self) -> bool:
        """Whether this flavor drops the sigma before the final 0 (steps + 1 are made)."""
        return self.discard_a1111 if self.flavor == "a1111" else self.discard_comfyui

    @property
    def tail(self) -> Tail:
        """How this flavor ends the sigmas (see :data:`Tail`)."""
        return self.tail_a1111 if self.flavor == "a1111" else self.tail_comfyui

    def __call__(self, model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                 noise_sampler: NoiseSampler | None = None, **options: Any) -> Tensor:
        """Run the sampler with its options (``options`` override them)."""
        return self.function(model, x, sigmas, callback=callback, noise_sampler=noise_sampler,
                             **{**self.kwargs, **options})


def _s(name: str, module: str, attr: str, schedule: str, a1111: tuple[str, ...], comfyui: tuple[str, ...], *,
       stochastic: bool = False, brownian: bool = False, discard: tuple[bool, bool] = (False, False),
       tail: tuple[Tail, Tail] = ("zero", "zero"), consistency: bool = False, **options: Any) -> SamplerSpec:
    return SamplerSpec(name, module, attr, stochastic or brownian, brownian, schedule, a1111, comfyui,
                       tuple(options.items()), *discard, *tail, consistency=consistency)


# Default schedules: A1111 1.10's per-sampler 'scheduler' option, "Automatic" otherwise (its Uniform = normal).
# DDIM/PLMS run on A1111's DDIM timesteps (ddim_uniform). UniPC and LCM have no A1111 sigma schedule: UniPC gets
# normal (A1111 spaces it uniformly in time too), LCM sgm_uniform (ComfyUI's usual pairing; A1111's LCM spaces its
# own 50 distillation timesteps; the "lcm" schedule is diffusers' LCMScheduler's picks from them). UniPC's order 3
# and variants are A1111's and ComfyUI's (bh1; uni_pc_bh2).
SAMPLERS: tuple[SamplerSpec, ...] = (
    _s("euler", "ode", "sample_euler", "normal", ("Euler", "k_euler"), ("euler",)),
    _s("euler_ancestral", "ancestral", "sample_euler_ancestral", "normal",
       ("Euler a", "k_euler_a", "k_euler_ancestral"), ("euler_ancestral",), stochastic=True),
    _s("heun", "ode", "sample_heun", "normal", ("Heun", "k_heun"), ("heun",)),
    _s("dpm_2", "ode", "sample_dpm_2", "karras", ("DPM2", "k_dpm_2"), ("dpm_2",), discard=(True, True)),
    _s("dpm_2_ancestral", "ancestral", "sample_dpm_2_ancestral", "karras", ("DPM2 a", "k_dpm_2_a"),
       ("dpm_2_ancestral",), stochastic=True, discard=(True, True)),
    _s("lms", "ode", "sample_lms", "normal", ("LMS", "k_lms"), ("lms",)),
    _s("dpmpp_2s_ancestral", "ancestral", "sample_dpmpp_2s_ancestral", "karras", ("DPM++ 2S a", "k_dpmpp_2s_a"),
       ("dpmpp_2s_ancestral",), stochastic=True),
    _s("dpmpp_2m", "ode", "sample_dpmpp_2m", "karras", ("DPM++ 2M", "k_dpmpp_2m"), ("dpmpp_2m",)),
    _s("dpmpp_sde", "sde", "sample_dpmpp_sde", "karras", ("DPM++ SDE", "k_dpmpp_sde"),
       ("dpmpp_sde", "dpmpp_sde_gpu"), brownian=True),
    _s("dpmpp_2m_sde", "sde", "sample_dpmpp_2m_sde", "exponential", ("DPM++ 2M SDE", "k_dpmpp_2m_sde"),
       ("dpmpp_2m_sde", "dpmpp_2m_sde_gpu"), brownian=True),
    _s("dpmpp_2m_sde_heun", "sde", "sample_dpmpp_2m_sde", "exponential",
       ("DPM++ 2M SDE Heun", "k_dpmpp_2m_sde_heun"), ("dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"),
       brownian=True, solver_type="heun"),
    _s("dpmpp_3m_sde", "sde", "sample_dpmpp_3m_sde", "exponential", ("DPM++ 3M SDE", "k_dpmpp_3m_sde"),
       ("dpmpp_3m_sde", "dpmpp_3m_sde_gpu"), brownian=True, discard=(True, False)),
    _s("restart", "sde", "sample_restart", "karras", ("Restart", "restart"), (), stochastic=True),
    _s("ddim", "ddim", "sample_ddim", "ddim_uniform", ("DDIM", "ddim"), ("ddim",)),
    _s("ddpm", "ddim", "sample_ddpm", "normal", ("DDPM",), ("ddpm",), stochastic=True),
    _s("plms", "plms", "sample_plms", "ddim_uniform", ("PLMS", "plms"), ()),
    _s("uni_pc", "unipc", "sample_unipc", "normal", ("UniPC", "unipc"), ("uni_pc",), discard=(False, True),
       tail=("sigma_min", "0.001"), order=3, variant="bh1"),
    _s("uni_pc_bh2", "unipc", "sample_unipc", "normal", (), ("uni_pc_bh2",), discard=(False, True),
       tail=("sigma_min", "0.001"), order=3, variant="bh2"),
    _s("lcm", "lcm", "sample_lcm", "sgm_uniform", ("LCM", "k_lcm"), ("lcm",), stochastic=True, consistency=True),
)

# Canonical schedules of sumie.sampling.schedules with their A1111 1.10 labels and ComfyUI names (ComfyUI's Align
# Your Steps is a node, not a scheduler name). A1111's "Automatic" is each sampler's default_schedule.
SCHEDULE_ALIASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "normal": (("Uniform", "Normal"), ("normal",)),
    "karras": (("Karras",), ("karras",)),
    "exponential": (("Exponential",), ("exponential",)),
    "polyexponential": (("Polyexponential",), ()),
    "sgm_uniform": (("SGM Uniform", "SGMUniform"), ("sgm_uniform",)),
    "simple": (("Simple",), ("simple",)),
    "ddim_uniform": (("DDIM",), ("ddim_uniform",)),
    "beta_a1111": (("Beta",), ()),
    "beta_comfyui": ((), ("beta",)),
    "kl_optimal_a1111": (("KL Optimal",), ()),
    "kl_optimal_comfyui": ((), ("kl_optimal",)),
    "align_your_steps_a1111": (("Align Your Steps",), ()),
    "align_your_steps_comfyui": ((), ()),
    "linear_quadratic": ((), ("linear_quadratic",)),
    "trailing": ((), ()),  # diffusers' timestep_spacing="trailing" (SD-Turbo)
    "lcm": ((), ()),  # diffusers' LCMScheduler timesteps
}
_AUTOMATIC = ("", "automatic")


def _key(name: str) -> str:
    return " ".join(name.strip().lower().split())


def sampler_names() -> list[str]:
    """Sumie's sampler names, in table order."""
    return [s.name for s in SAMPLERS]


def _sampler_index() -> dict[str, tuple[SamplerSpec, Flavor]]:
    """Every name -> (spec, flavor of that name); names A1111 and ComfyUI share count as A1111's."""
    index: dict[str, tuple[SamplerSpec, Flavor]] = {}
    for spec in SAMPLERS:
        for n in spec.a1111:
            index.setdefault(_key(n), (spec, "a1111"))
        for n in (spec.name, *spec.comfyui):
            index.setdefault(_key(n), (spec, "comfyui"))
    return index


def get_sampler(name: str, flavor: Flavor | None = None) -> SamplerSpec:
    """The spec of a sampler name (Sumie, A1111 or ComfyUI; case-insensitive), with the flavor of the name
    unless ``flavor`` is given. Schedule suffixes are not parsed here (see :func:`resolve`)."""
    found = _sampler_index().get(_key(name))
    if found is None:
        raise ConfigError(f"unknown sampler {name!r}; valid: {', '.join(sampler_names())} "
                          "(A1111 and ComfyUI names work too; `sumie samplers` lists them)")
    spec, named = found
    return replace(spec, flavor=flavor or named)


def schedule_names() -> list[str]:
    """The canonical schedules ``sumie.sampling.schedules`` implements."""
    from sumie.sampling import schedules

    return list(dict.fromkeys(fn.__name__ for fn in schedules.SCHEDULES.values()))


def schedule_aliases(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(A1111 labels, ComfyUI names) of a canonical schedule."""
    return SCHEDULE_ALIASES.get(name, ((), ()))


def resolve_schedule(name: str, flavor: Flavor = "a1111") -> str:
    """The canonical schedule for a Sumie, A1111 or ComfyUI schedule name (case-insensitive); names the two UIs
    use for different schedules ("beta", "kl_optimal", "align_your_steps") follow ``flavor``."""
    from sumie.sampling import schedules

    try:
        return schedules.get_schedule(name, flavor).__name__
    except ConfigError:
        raise ConfigError(f"unknown schedule {name!r}; valid: {', '.join(schedule_names())} "
                          "(A1111 and ComfyUI names work too; `sumie samplers` lists them)") from None


def _split_suffix(name: str) -> tuple[str, str] | None:
    """A1111's combined label "DPM++ 2M Karras" -> ("dpm++ 2m", "karras"), longest label first; also its old
    aliases "k_dpmpp_2m_ka" (Karras) and "k_dpmpp_3m_sde_exp" (Exponential)."""
    key, samplers = _key(name), _sampler_index()
    for suffix, schedule in (("_ka", "karras"), ("_exp", "exponential")):
        if key.startswith("k_") and key.endswith(suffix) and key[: -len(suffix)] in samplers:
            return key[: -len(suffix)], schedule
    labels = {_key(a): canon for canon, (a1111, _) in SCHEDULE_ALIASES.items() for a in a1111}
    for label in sorted(labels, key=len, reverse=True):
        head = key[: -len(label) - 1]
        if key.endswith(" " + label) and head in samplers:
            return head, labels[label]
    return None


def resolve(sampler: str, scheduler: str | None = None, flavor: Flavor | None = None) -> tuple[SamplerSpec, str]:
    """(spec, canonical schedule) for a sampler and an optional scheduler, in any naming:
    ("DPM++ 2M Karras", None) and ("dpmpp_2m", "karras") -> (dpmpp_2m, "karras"); ("Euler a", None) -> normal.

    A scheduler of None, "" or "Automatic" means the sampler's default (or the one its A1111 label names). The
    flavor (see the module docstring) comes from the sampler name unless given.
    """
    if _key(sampler) in _sampler_index():
        spec, named = get_sampler(sampler, flavor), None
    else:
        split = _split_suffix(sampler)
        if split is None:
            get_sampler(sampler)  # raises the one-line error listing the valid names
        spec, named = get_sampler(split[0], flavor), split[1]
    explicit = None
    if scheduler is not None and _key(scheduler) not in _AUTOMATIC:
        explicit = resolve_schedule(scheduler, spec.flavor)
    if named and explicit and named != explicit:
        raise ConfigError(f"sampler {sampler!r} names schedule {named!r} but scheduler {scheduler!r} was given; "
                          "drop one of them")
    return spec, explicit or named or spec.default_schedule


def make_sigmas(spec: SamplerSpec, schedule: str, discretization: Any, steps: int, **kwargs: Any) -> Tensor:
    """The sigmas [steps + 1] a sampler runs on: the schedule (``kwargs``: family, dtype, rho, ...), with the
    penultimate sigma dropped and the end shaped (:data:`Tail`) as the spec's flavor does it."""
    from sumie.sampling import schedules

    tail = spec.tail
    sigmas = schedules.make_sigmas(resolve_schedule(schedule, spec.flavor), discretization,
                                   steps + int(tail == "sigma_min"), flavor=spec.flavor,
                                   discard_penultimate_sigma=spec.discard_penultimate_sigma, **kwargs)
    if tail == "sigma_min" and sigmas[-1] == 0:
        return sigmas[:-1]
    if tail == "0.001" and sigmas[-1] == 0:
        return torch.cat([sigmas[:-1], sigmas.new_full([1], 0.001)])
    return sigmas


def make_noise_sampler(spec: SamplerSpec, seeds: Sequence[int], shape: Sequence[int], sigmas: Tensor, *,
                       rng: Any = None, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> NoiseSampler:
    """The noise a sampler draws, reproducible per image: Brownian-tree noise for the DPM++ SDE family (between
    the smallest non-zero and the largest sigma, as k-diffusion and A1111), else each image's white noise.

    White noise continues each image's generator after its initial noise, as A1111 does: pass the ``ImageRNG``
    the initial noise was drawn from as ``rng``, or a fresh one is made and advanced past that first draw.
    ``shape`` is one image's shape (without the batch). Deterministic samplers get white noise too (for options
    like DDIM's eta or s_churn).
    """
    from sumie.sampling.noise import BrownianNoise, ImageRNG

    if spec.needs_brownian:
        positive = sigmas[sigmas > 0]
        return BrownianNoise(seeds, shape, float(positive.min()), float(sigmas.max()), device=device, dtype=dtype)
    if rng is None:
        rng = ImageRNG(seeds, shape, device=device, dtype=dtype)
        rng.first()
    return rng
