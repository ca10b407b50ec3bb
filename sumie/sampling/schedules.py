"""Schedules: the decreasing sigmas a sampler visits, ending in 0 (k-diffusion convention).

Every schedule users know by name from A1111 1.10 (``modules/sd_schedulers.py``), ComfyUI (``comfy/samplers.py``
``SCHEDULER_HANDLERS`` and the Align-Your-Steps node) and diffusers (``timestep_spacing`` and the
``use_*_sigmas`` options), each written once. Functions return a 1-D tensor of sigmas, float32 unless ``dtype``
says otherwise; float64 results need a float64 :class:`DiscreteSigmas` for the table-based schedules.

Where A1111 and ComfyUI give the same name to different schedules, both exist under explicit names
(``beta_a1111``/``beta_comfyui``, ``kl_optimal_a1111``/``kl_optimal_comfyui``, ``align_your_steps_a1111``/
``align_your_steps_comfyui``) and the bare name follows ``flavor`` (A1111 by default, the project's default
convention). Two reference quirks are kept on purpose: A1111's "KL Optimal" ends at sigma_min instead of 0, and
ComfyUI's ``ddim_uniform``/``beta`` may return fewer than n steps (ddim_uniform's stride, beta's de-duplication).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor

from sumie.errors import ConfigError
from sumie.sampling.discretization import DiscreteSigmas

Flavor = Literal["a1111", "comfyui"]
Spacing = Literal["leading", "trailing", "linspace"]
TimestepRule = Literal["euler", "dpmsolver", "ddim"]


# --- numpy-exact helpers (the references build their grids with numpy; rounding depends on the last bit) ---


def _np_linspace(start: float, stop: float, num: int, endpoint: bool = True) -> list[float]:
    """numpy.linspace in float64, bit for bit: i * ((stop - start) / div) + start, last value set to stop."""
    div = num - 1 if endpoint else num
    if div <= 0:
        return [start + 0.0 * (stop - start)] * num
    step = (stop - start) / div
    out = [i * step + start for i in range(num)]
    if endpoint and num > 1:
        out[-1] = float(stop)
    return out


def _np_arange(start: float, stop: float, step: float) -> list[float]:
    """numpy.arange for floats: length ceil((stop - start) / step), values start + i * ((start + step) - start)."""
    length = max(math.ceil((stop - start) / step), 0)
    if length <= 1:
        return [float(start)] * length
    nxt = start + step
    delta = nxt - start
    return [float(start), float(nxt)] + [start + i * delta for i in range(2, length)]


def _np_interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """numpy.interp in float64 (slope * (x - xp[j]) + fp[j], exact at the nodes, clamped at the ends)."""
    x, xp, fp = x.double(), xp.double(), fp.double()
    j = (torch.searchsorted(xp, x, right=True) - 1).clamp(0, xp.numel() - 1)
    j1 = (j + 1).clamp(max=xp.numel() - 1)
    slope = (fp[j1] - fp[j]) / (xp[j1] - xp[j]).where(j1 > j, torch.ones_like(x))
    out = slope * (x - xp[j]) + fp[j]
    out = torch.where((x == xp[j]) | (j1 == j), fp[j], out)
    return torch.where(x < xp[0], fp[0], out)


def _table(ds: DiscreteSigmas) -> Tensor:
    return ds.sigmas.cpu()


def _sigma_to_t_diffusers(sigmas: Tensor, ds: DiscreteSigmas) -> Tensor:
    """diffusers' ``_sigma_to_t``: log sigma (float64) interpolated against the table's log sigmas."""
    log_table = _table(ds).log()
    log_sigmas = log_table.double()
    log_sigma = sigmas.double().clamp(min=1e-10).log()
    dists = log_sigma - log_sigmas[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.numel() - 2)
    lo = log_sigmas[low]
    den = (log_table[low] - log_table[low + 1]).double()  # numpy subtracts the float32 table values in float32
    w = ((lo - log_sigma) / den).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def _append_zero(sigmas: Tensor, dtype: torch.dtype) -> Tensor:
    sigmas = sigmas.to(dtype)
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# --- the beta distribution's inverse CDF (scipy is not a runtime dependency) ---


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function, modified Lentz (Press et al., Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 20000):
        for aa in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta function I_x(a, b), the Beta(a, b) CDF."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def _beta_ppf_lower(p: float, a: float, b: float) -> float:
    """x with I_x(a, b) = p for p <= 0.5: safeguarded Newton inside a shrinking bracket."""
    log_norm = _log_beta(a, b)
    lo, hi = 0.0, 1.0
    x = min(max(math.exp((math.log(p) + math.log(a) + log_norm) / a), 1e-300), 0.5)  # small-x asymptote
    for _ in range(400):
        f = beta_cdf(x, a, b) - p
        if f == 0.0:
            return x
        if f < 0.0:
            lo = x
        else:
            hi = x
        pdf = math.exp((a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - log_norm)
        new = x - f / pdf if pdf > 0.0 and math.isfinite(pdf) else math.nan
        if not (lo < new < hi):
            new = hi / 2.0 if lo == 0.0 else 0.5 * (lo + hi)
        if new == x or abs(new - x) <= 4e-16 * x:
            return new
        x = new
    return x


def beta_ppf(p: float, a: float, b: float) -> float:
    """Beta(a, b) inverse CDF (quantile) to ~1e-15, as scipy.stats.beta.ppf; the upper half via symmetry."""
    if not (a > 0.0 and b > 0.0):
        raise ConfigError(f"beta distribution parameters must be positive, got alpha={a}, beta={b}")
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    if a == b and p == 0.5:
        return 0.5
    if p > 0.5:
        return 1.0 - _beta_ppf_lower(1.0 - p, b, a)
    return _beta_ppf_lower(p, a, b)


# --- schedules on a sigma range ---


def karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Karras et al. 2022 (EDM) schedule: uniform in sigma^(1/rho). k-diffusion ``get_sigmas_karras``."""
    ramp = torch.linspace(0, 1, n, dtype=dtype)
    min_inv_rho = float(sigma_min) ** (1 / rho)
    max_inv_rho = float(sigma_max) ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho, dtype)


def exponential(n: int, sigma_min: float, sigma_max: float, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform in log sigma. k-diffusion ``get_sigmas_exponential``."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=dtype).exp(), dtype)


def polyexponential(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Polynomial (power rho) in log sigma; rho=1 is exponential. k-diffusion ``get_sigmas_polyexponential``."""
    ramp = torch.linspace(1, 0, n, dtype=dtype) ** rho
    log_min = math.log(sigma_min)
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - log_min) + log_min), dtype)


def kl_optimal_comfyui(n: int, sigma_min: float, sigma_max: float, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """KL-optimal schedule (Sabour et al. 2024, "Align Your Steps" appendix): uniform in arctan(sigma); ComfyUI's.

    n sigmas from sigma_max to sigma_min, then 0. ComfyUI divides by n - 1 and gives NaN for n = 1; here n = 1
    gives [sigma_max, 0].
    """
    adj = torch.arange(n, dtype=dtype) / max(n - 1, 1)
    sigmas = (adj * math.atan(sigma_min) + (1 - adj) * math.atan(sigma_max)).tan()
    return _append_zero(sigmas, dtype)


def kl_optimal_a1111(n: int, sigma_min: float, sigma_max: float, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """A1111 1.10's "KL Optimal": n + 1 points uniform in arctan(sigma) from sigma_max down to sigma_min.

    Quirk kept from A1111: the schedule ends at sigma_min, not 0, so the last step leaves sigma_min of noise.
    """
    alpha_min = torch.arctan(torch.tensor(float(sigma_min), dtype=dtype))
    alpha_max = torch.arctan(torch.tensor(float(sigma_max), dtype=dtype))
    frac = torch.arange(n + 1, dtype=dtype) / n
    return torch.tan(frac * alpha_min + (1.0 - frac) * alpha_max)


def beta_a1111(
    n: int,
    sigma_min: float,
    sigma_max: float,
    alpha: float = 0.6,
    beta: float = 0.6,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Beta schedule (Lee et al. 2024) linear in sigma: sigma_min + ppf(1 - i/(n-1)) (sigma_max - sigma_min).

    A1111 1.10's "Beta" and diffusers' ``use_beta_sigmas`` (ComfyUI's ``beta`` is different: :func:`beta_comfyui`).
    """
    ts = [1.0 - v for v in _np_linspace(0.0, 1.0, n)]
    sig = [float(sigma_min) + beta_ppf(t, alpha, beta) * (float(sigma_max) - float(sigma_min)) for t in ts]
    return _append_zero(torch.tensor(sig, dtype=torch.float64), dtype)


# --- schedules on the model's discrete sigma table ---


def normal(ds: DiscreteSigmas, n: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """n timesteps evenly spaced from T-1 to 0, sigmas interpolated in log sigma. k-diffusion ``get_sigmas(n)``.

    This one function is A1111's "Automatic" (for samplers without a default schedule), "Uniform"
    (``model_wrap.get_sigmas``) and "Normal" (``linspace(sigma_to_t(sigma_max), sigma_to_t(sigma_min), n)``) and
    ComfyUI's ``normal`` (the same with quantised ``timestep()``): sigma_max and sigma_min sit exactly at t = T-1
    and t = 0, so all four evaluate the same float32 ``linspace(T-1, 0, n)`` (checked bit for bit in the tests).
    """
    t = torch.linspace(len(ds.sigmas) - 1, 0, n, dtype=torch.float32)  # float32 like k-diffusion's t.float()
    return _append_zero(ds.t_to_sigma(t), dtype)


def sgm_uniform(ds: DiscreteSigmas, n: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """n + 1 timesteps evenly spaced from T-1 to 0, the last dropped (SGM/SDXL style). A1111 and ComfyUI."""
    t = torch.linspace(len(ds.sigmas) - 1, 0, n + 1, dtype=torch.float32)[:-1]
    return _append_zero(ds.t_to_sigma(t), dtype)


def simple(ds: DiscreteSigmas, n: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Every (T/n)-th table sigma from the top: sigmas[-(1 + int(i T / n))]. ComfyUI ``simple``, A1111 "Simple"."""
    table = _table(ds)
    stride = len(table) / n
    idx = torch.tensor([len(table) - 1 - int(i * stride) for i in range(n)])
    return _append_zero(table[idx], dtype)


def trailing(ds: DiscreteSigmas, n: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Table sigmas at t = round(T - i T / n) - 1: diffusers' ``timestep_spacing="trailing"`` (Lin et al. 2023,
    Table 2), SD-Turbo's and SDXL-Turbo's scheduler config. Equals ``simple`` when n divides T."""
    t = diffusers_timesteps(n, "trailing", num_train_timesteps=len(ds.sigmas)).long()
    return _append_zero(_table(ds)[t], dtype)


def lcm(ds: DiscreteSigmas, n: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """diffusers' LCMScheduler timesteps (Luo et al. 2023): n evenly spaced picks from the 50-step distillation grid
    t = 20 k - 1, table sigmas there; 1 <= n <= 50."""
    from sumie.sampling.samplers.lcm import lcm_sigmas

    return _append_zero(lcm_sigmas(ds, n)[:-1].cpu(), dtype)


def ddim_uniform(ds: DiscreteSigmas, n: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Table sigmas at t = 1, 1 + s, 1 + 2s, ... (s = T // n), reversed. ComfyUI ``ddim_uniform``, A1111 "DDIM".

    As in both references the count is ceil((T - 1) / s), which can exceed n (e.g. n = 30 gives 31 steps).
    """
    table = _table(ds)
    stride = max(len(table) // n, 1)
    idx = torch.arange(1, len(table), stride).flip(0)
    return _append_zero(table[idx], dtype)


def beta_comfyui(
    ds: DiscreteSigmas, n: int, alpha: float = 0.6, beta: float = 0.6, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Beta schedule (Lee et al. 2024) on the timestep axis; ComfyUI's ``beta``.

    t_i = rint(ppf(1 - i/n) (T - 1)) for i < n, repeated timesteps dropped (so fewer than n steps are possible),
    sigmas read from the table, then 0.
    """
    table = _table(ds)
    total = len(table) - 1
    step = 1.0 / n  # numpy.linspace(0, 1, n, endpoint=False)
    picked: list[int] = []
    for i in range(n):
        t = round(beta_ppf(1.0 - i * step, alpha, beta) * total)  # half to even, like numpy.rint
        if not picked or picked[-1] != t:
            picked.append(t)
    return _append_zero(table[torch.tensor(picked)], dtype)


def linear_quadratic(
    ds: DiscreteSigmas,
    n: int,
    threshold_noise: float = 0.025,
    linear_steps: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """ComfyUI's ``linear_quadratic`` (from Mochi): linear then quadratic in sigma / sigma_max, times sigma_max."""
    if n == 1:
        sched = [1.0, 0.0]
    else:
        lin = n // 2 if linear_steps is None else linear_steps
        quad = n - lin
        diff = lin - threshold_noise * n
        quad_coef = diff / (lin * quad**2)
        lin_coef = threshold_noise / lin - 2 * diff / quad**2
        const = quad_coef * lin**2
        sched = [i * threshold_noise / lin for i in range(lin)]
        sched += [quad_coef * i**2 + lin_coef * i + const for i in range(lin, n)]
        sched = [1.0 - v for v in sched + [1.0]]
    return torch.tensor(sched, dtype=torch.float64).to(dtype) * _table(ds)[-1].to(dtype)


# --- Align Your Steps (Sabour et al. 2024), tables as NVIDIA publishes them ---

AYS_COMFYUI: Mapping[str, tuple[float, ...]] = MappingProxyType(
    {
        "sd1": (
            14.6146412293,
            6.4745760956,
            3.8636745985,
            2.6946151520,
            1.8841921177,
            1.3943805092,
            0.9642583904,
            0.6523686016,
            0.3977456272,
            0.1515232662,
            0.0291671582,
        ),
        "sdxl": (
            14.6146412293,
            6.3184485287,
            3.7681790315,
            2.1811480769,
            1.3405244945,
            0.8620721141,
            0.5550693289,
            0.3798540708,
            0.2332364134,
            0.1114188177,
            0.0291671582,
        ),
        "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
    }
)
# A1111 1.10 ships the same two tables rounded to three decimals.
AYS_A1111: Mapping[str, tuple[float, ...]] = MappingProxyType(
    {
        "sd1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
        "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    }
)
_FAMILY_ALIASES = {
    "sd1": "sd1",
    "sd15": "sd1",
    "sd1.5": "sd1",
    "sd1_5": "sd1",
    "sd2": "sd1",
    "sd21": "sd1",
    "sdxl": "sdxl",
    "sdxl_refiner": "sdxl",
    "svd": "svd",
}


def _ays_table(tables: Mapping[str, tuple[float, ...]], family: str) -> tuple[float, ...]:
    key = _FAMILY_ALIASES.get(family.lower().replace("-", "_").replace(" ", ""))
    if key is None or key not in tables:
        valid = sorted(k for k, v in _FAMILY_ALIASES.items() if v in tables)
        raise ConfigError(f"no Align Your Steps table for model family {family!r}; use one of {', '.join(valid)}")
    return tables[key]


def _loglinear_interp(levels: tuple[float, ...], num: int) -> Tensor:
    """Resample decreasing noise levels to ``num`` points, linear in log sigma (NVIDIA's AYS recipe)."""
    xs = torch.tensor(_np_linspace(0.0, 1.0, len(levels)), dtype=torch.float64)
    ys = torch.tensor(levels[::-1], dtype=torch.float64).log()
    new = _np_interp(torch.tensor(_np_linspace(0.0, 1.0, num), dtype=torch.float64), xs, ys)
    return new.exp().flip(0)


def align_your_steps_comfyui(n: int, family: str = "sd1", *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Align Your Steps (Sabour et al. 2024) as ComfyUI's node: table resampled to n + 1 points, last set to 0."""
    levels = _ays_table(AYS_COMFYUI, family)
    sig = torch.tensor(levels, dtype=torch.float64) if n + 1 == len(levels) else _loglinear_interp(levels, n + 1)
    sig = sig.clone()
    sig[-1] = 0.0
    return sig.to(torch.float32).to(dtype) if dtype != torch.float64 else sig


def align_your_steps_a1111(n: int, family: str = "sd1", *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Align Your Steps (Sabour et al. 2024) as A1111 1.10: (rounded) table resampled to n points, then 0 appended."""
    levels = _ays_table(AYS_A1111, family)
    sig = torch.tensor(levels, dtype=torch.float64) if n == len(levels) else _loglinear_interp(levels, n)
    return _append_zero(sig, dtype)


# The ComfyUI variants under the plain function names (the name table's bare "beta", "kl_optimal" and
# "align_your_steps" follow ``flavor`` instead, A1111 by default).
beta = beta_comfyui
kl_optimal = kl_optimal_comfyui
align_your_steps = align_your_steps_comfyui


# --- diffusers' timestep spacings ---


def diffusers_timesteps(
    n: int,
    spacing: Spacing = "leading",
    *,
    rule: TimestepRule = "euler",
    steps_offset: int = 1,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """Timesteps of diffusers' ``set_timesteps`` (Lin et al. 2023, Table 2 spacings), float64 values.

    ``rule`` picks the scheduler family: ``euler`` (Euler, Euler a, Heun, KDPM2, LMS, DPM-SDE: n points, fractional
    for linspace), ``dpmsolver`` (DPMSolverMultistep, UniPC: n + 1 integer points, last dropped), ``ddim`` (DDIM,
    DDPM: n rounded points).
    """
    if rule not in ("euler", "dpmsolver", "ddim"):
        raise ConfigError(f"unknown timestep rule {rule!r}; use euler, dpmsolver or ddim")
    T = num_train_timesteps
    if spacing == "trailing":
        ts = [float(round(v) - 1) for v in _np_arange(T, 0, -T / n)]
    elif spacing == "leading":
        m = n + 1 if rule == "dpmsolver" else n
        ratio = T // m
        ts = [float(i * ratio + steps_offset) for i in range(m)][::-1]
        ts = ts[:-1] if rule == "dpmsolver" else ts
    elif spacing == "linspace":
        if rule == "euler":
            ts = torch.tensor(_np_linspace(0, T - 1, n), dtype=torch.float64).float().double().tolist()[::-1]
        elif rule == "dpmsolver":
            ts = [float(round(v)) for v in _np_linspace(0, T - 1, n + 1)][::-1][:-1]
        else:
            ts = [float(round(v)) for v in _np_linspace(0, T - 1, n)][::-1]
    else:
        raise ConfigError(f"unknown timestep_spacing {spacing!r}; use leading, trailing or linspace")
    return torch.tensor(ts, dtype=torch.float64)


def diffusers_sigmas(
    ds: DiscreteSigmas,
    n: int,
    spacing: Spacing = "leading",
    *,
    steps_offset: int = 1,
    interpolation: Literal["linear", "log"] = "linear",
    use_karras: bool = False,
    use_exponential: bool = False,
    use_beta: bool = False,
    use_lu_lambdas: bool = False,
    beta_alpha: float = 0.6,
    beta_beta: float = 0.6,
    final_sigma: Literal["zero", "sigma_min"] = "zero",
    rule: TimestepRule = "euler",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """(timesteps, sigmas) of a diffusers scheduler's ``set_timesteps(n)``; sigmas end in ``final_sigma``.

    ``interpolation="linear"`` is diffusers' (np.interp of sigma over t); ``"log"`` interpolates log sigma like
    k-diffusion (they differ only for fractional timesteps, i.e. linspace spacing). With ``use_karras`` /
    ``use_exponential`` / ``use_beta`` the ``euler`` rule spans the range of the spaced sigmas (leading spacing with
    steps_offset=1 thus ends at the table's sigma at t = 1, not sigma_min), the ``dpmsolver`` rule the whole
    table; timesteps then come back from sigma by log interpolation, rounded for dpmsolver's Karras and Lu,
    truncated for its exponential and beta (diffusers casts floats to int64). Timesteps are float32 (euler) or int64.
    ``ds`` should hold diffusers' own float32-cumprod table for bit parity (``from_betas`` differs by ~3e-6).
    """
    if sum([use_karras, use_exponential, use_beta, use_lu_lambdas]) > 1:
        raise ConfigError("use only one of use_karras, use_exponential, use_beta, use_lu_lambdas")
    if use_lu_lambdas and rule != "dpmsolver":
        raise ConfigError("use_lu_lambdas exists only for the dpmsolver rule (DPMSolverMultistepScheduler)")
    if final_sigma not in ("zero", "sigma_min"):
        raise ConfigError(f"unknown final_sigma {final_sigma!r}; use zero or sigma_min")
    if interpolation not in ("linear", "log"):
        raise ConfigError(f"unknown interpolation {interpolation!r}; use linear or log")
    table = _table(ds)
    T = len(table)
    timesteps = diffusers_timesteps(n, spacing, rule=rule, steps_offset=steps_offset, num_train_timesteps=T)
    if interpolation == "linear":
        sigmas = _np_interp(timesteps, torch.arange(T, dtype=torch.float64), table.double())
    else:
        sigmas = ds.t_to_sigma(timesteps.to(table.dtype)).double()

    if use_karras or use_exponential or use_beta or use_lu_lambdas:
        if rule == "dpmsolver":
            s_min, s_max = float(table[0]), float(table[-1])
        else:
            s_min, s_max = float(sigmas[-1]), float(sigmas[0])
        ramp = torch.tensor(_np_linspace(0.0, 1.0, n), dtype=torch.float64)
        if use_karras:
            lo, hi = s_min ** (1 / 7.0), s_max ** (1 / 7.0)
            sigmas = (hi + ramp * (lo - hi)) ** 7.0
        elif use_exponential:
            sigmas = torch.tensor(_np_linspace(math.log(s_max), math.log(s_min), n), dtype=torch.float64).exp()
        elif use_beta:
            sigmas = beta_a1111(n, s_min, s_max, beta_alpha, beta_beta, dtype=torch.float64)[:-1]
        else:  # Lu et al. 2022: uniform in log sigma (lambda), endpoints from the float32 log table
            log_table = table.log()
            lam_min, lam_max = float(log_table[0]), float(log_table[-1])
            sigmas = (lam_max + ramp * (lam_min - lam_max)).exp()
        timesteps = _sigma_to_t_diffusers(sigmas, ds)
        if rule == "dpmsolver":
            timesteps = timesteps.round() if (use_karras or use_lu_lambdas) else timesteps.trunc()

    last = table[0].double() if final_sigma == "sigma_min" else torch.zeros((), dtype=torch.float64)
    sigmas = torch.cat([sigmas, last.reshape(1)])
    sigmas = sigmas.to(torch.float32).to(dtype) if dtype != torch.float64 else sigmas
    ts_dtype = torch.float32 if rule == "euler" else torch.int64
    return timesteps.to(ts_dtype), sigmas


# --- names: A1111 labels and internal names, ComfyUI names ---


def discard_penultimate(sigmas: Tensor) -> Tensor:
    """Drop the second-to-last sigma (A1111 DPM2 / DPM2 a / DPM++ 3M SDE; ComfyUI dpm_2, dpm_2_ancestral, uni_pc)."""
    return torch.cat([sigmas[:-2], sigmas[-1:]])


# A1111 1.10 samplers whose "Automatic" schedule is not Uniform, and those that discard the penultimate sigma.
A1111_DEFAULT_SCHEDULE: Mapping[str, str] = MappingProxyType(
    {
        "dpm++ 2m": "karras",
        "dpm++ sde": "karras",
        "dpm++ 2s a": "karras",
        "dpm2": "karras",
        "dpm2 a": "karras",
        "restart": "karras",
        "dpm++ 2m sde": "exponential",
        "dpm++ 2m sde heun": "exponential",
        "dpm++ 3m sde": "exponential",
    }
)
A1111_DISCARD_PENULTIMATE = frozenset({"dpm2", "dpm2 a", "dpm++ 3m sde"})


def a1111_automatic(sampler: str | None) -> str:
    """The schedule A1111 1.10 uses for "Automatic" with this sampler label (``uniform`` unless it has a default)."""
    return A1111_DEFAULT_SCHEDULE.get((sampler or "").strip().lower(), "uniform")


ScheduleAdapter = Callable[..., Tensor]


def _range_adapter(fn: Callable[..., Tensor]) -> ScheduleAdapter:
    def run(ds: DiscreteSigmas, n: int, *, family: str, dtype: torch.dtype, **opts: float) -> Tensor:
        return fn(n, float(ds.sigma_min), float(ds.sigma_max), dtype=dtype, **opts)

    run.__name__ = fn.__name__
    return run


def _table_adapter(fn: Callable[..., Tensor]) -> ScheduleAdapter:
    def run(ds: DiscreteSigmas, n: int, *, family: str, dtype: torch.dtype, **opts: float) -> Tensor:
        return fn(ds, n, dtype=dtype, **opts)

    run.__name__ = fn.__name__
    return run


def _family_adapter(fn: Callable[..., Tensor]) -> ScheduleAdapter:
    def run(ds: DiscreteSigmas, n: int, *, family: str, dtype: torch.dtype, **opts: float) -> Tensor:
        return fn(n, family, dtype=dtype, **opts)

    run.__name__ = fn.__name__
    return run


_CANONICAL: Mapping[str, ScheduleAdapter] = MappingProxyType(
    {
        "normal": _table_adapter(normal),
        "sgm_uniform": _table_adapter(sgm_uniform),
        "simple": _table_adapter(simple),
        "ddim_uniform": _table_adapter(ddim_uniform),
        "trailing": _table_adapter(trailing),
        "lcm": _table_adapter(lcm),
        "karras": _range_adapter(karras),
        "exponential": _range_adapter(exponential),
        "polyexponential": _range_adapter(polyexponential),
        "kl_optimal_a1111": _range_adapter(kl_optimal_a1111),
        "kl_optimal_comfyui": _range_adapter(kl_optimal_comfyui),
        "beta_a1111": _range_adapter(beta_a1111),
        "beta_comfyui": _table_adapter(beta_comfyui),
        "align_your_steps_a1111": _family_adapter(align_your_steps_a1111),
        "align_your_steps_comfyui": _family_adapter(align_your_steps_comfyui),
        "linear_quadratic": _table_adapter(linear_quadratic),
    }
)

# Every accepted name (normalised: lower case, spaces and hyphens as underscores) -> canonical schedule.
# Bare names A1111 and ComfyUI use for different schedules resolve to A1111's here; flavor="comfyui" overrides.
_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        **{k: k for k in _CANONICAL},
        "automatic": "normal",
        "uniform": "normal",
        "sgmuniform": "sgm_uniform",
        "ddim": "ddim_uniform",
        "kl_optimal": "kl_optimal_a1111",
        "beta": "beta_a1111",
        "align_your_steps": "align_your_steps_a1111",
        "ays": "align_your_steps_a1111",
        "alignyourstepsscheduler": "align_your_steps_comfyui",  # ComfyUI's node
    }
)
_COMFYUI_OVERRIDES: Mapping[str, str] = MappingProxyType(
    {
        "kl_optimal": "kl_optimal_comfyui",
        "beta": "beta_comfyui",
        "align_your_steps": "align_your_steps_comfyui",
        "ays": "align_your_steps_comfyui",
    }
)
SCHEDULES: Mapping[str, ScheduleAdapter] = MappingProxyType({k: _CANONICAL[v] for k, v in _ALIASES.items()})


def _normalise(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def schedule_names() -> list[str]:
    """Every accepted schedule name (case-insensitive; spaces, hyphens and underscores interchangeable)."""
    return sorted(_ALIASES)


def get_schedule(name: str, flavor: Flavor = "a1111", sampler: str | None = None) -> ScheduleAdapter:
    """The schedule for an A1111 or ComfyUI name, callable as ``fn(ds, n, family=..., dtype=..., **options)``.

    The returned function's ``__name__`` is the canonical schedule name (a key of the table, e.g. ``beta_comfyui``).
    "Automatic" resolves through the A1111 sampler label (Euler -> Uniform, DPM++ 2M -> Karras, ...).
    """
    if flavor not in ("a1111", "comfyui"):
        raise ConfigError(f"unknown schedule flavor {flavor!r}; use a1111 or comfyui")
    key = _normalise(name)
    if key == "automatic":
        key = a1111_automatic(sampler)
    if flavor == "comfyui" and key in _COMFYUI_OVERRIDES:
        key = _COMFYUI_OVERRIDES[key]
    if key not in _ALIASES:
        raise ConfigError(f"unknown schedule {name!r}; valid names: {', '.join(schedule_names())}")
    return _CANONICAL[_ALIASES[key]]


def make_sigmas(
    name: str,
    ds: DiscreteSigmas,
    n: int,
    *,
    family: str = "sd1",
    flavor: Flavor = "a1111",
    sampler: str | None = None,
    discard_penultimate_sigma: bool = False,
    dtype: torch.dtype = torch.float32,
    **options: float,
) -> Tensor:
    """Sigmas of the named schedule for n steps; options (rho, alpha, beta, ...) go to the schedule.

    ``discard_penultimate_sigma`` builds n + 1 steps and drops the second-to-last sigma, as A1111 and ComfyUI do
    for DPM2-type samplers (A1111's DPM2, DPM2 a and DPM++ 3M SDE set it through ``sampler``).
    """
    if n < 1:
        raise ConfigError(f"a schedule needs at least one step, got {n}")
    fn = get_schedule(name, flavor, sampler)
    discard = discard_penultimate_sigma or (sampler or "").strip().lower() in A1111_DISCARD_PENULTIMATE
    sigmas = fn(ds, n + 1 if discard else n, family=family, dtype=dtype, **options)
    return discard_penultimate(sigmas) if discard else sigmas
