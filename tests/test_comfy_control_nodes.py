"""ControlNet nodes in ComfyUI graphs (ControlNetLoader / DiffControlNetLoader / ControlNetApply /
ControlNetApplyAdvanced) on a tiny random-weight SD1 model and a random ControlNet at its shapes.

The graph's image is compared with an independent computation: k-diffusion's Euler sampler and CompVis denoiser
(ComfyUI's numbers, as in test_comfy_execution) around Sumie's UNet fed the ControlNet's residuals, computed here from
ComfyUI's ``comfy/controlnet.py`` rules: the IMAGE is centre-cropped to the latent's aspect and resized to 8x the
latent with ``nearest-exact``, the network sees the scaled latent, the integer timestep and the entry's context, every
output is multiplied by the strength, and it acts while ``sigma`` lies between ``percent_to_sigma(start)`` and
``percent_to_sigma(end)`` (``t = (1 - percent) * 999``, log-sigma interpolation); ``ControlNetApplyAdvanced`` gives
both sides the control, the old ``ControlNetApply`` gives the positive one and, through
``apply_empty_x_to_equal_area``, the negative one too.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from control_testfiles import TINY_CONTROLNET, random_controlnet, write_original
from PIL import Image
from reference_kdiffusion import load as load_kdiffusion
from safetensors.torch import save_file
from test_comfy_execution import CFG, NEGATIVE, POSITIVE, SEED, SIZE, STEPS, _context, example_prompt, mad, run, saved

from sumie.checkpoints.manager import ModelFolders, ModelManager
from sumie.checkpoints.save import random_single_file
from sumie.comfy import ComfyEnvironment, ComfyFolders, check_request
from sumie.comfy.nodes.loaders import load_checkpoint
from sumie.configs import TINY
from sumie.models.hooks import Residuals

TOL = 1.0  # mean absolute difference in uint8 levels (two computations of the same image)
IMG_W, IMG_H = 96, 80  # the control image: another size and aspect than the 64 x 64 output (crop + resize)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/checkpoints/tiny_sd1 and models/controlnet/cn.pth (original layout, random weights)."""
    base = tmp_path_factory.mktemp("comfy_control")
    ckpts = base / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    save_file(random_single_file(TINY["sd1"], seed=0), str(ckpts / "tiny_sd1.safetensors"))
    write_original(base / "models" / "controlnet" / "cn.pth", random_controlnet(TINY_CONTROLNET["sd1"], seed=7))
    write_original(base / "models" / "controlnet" / "sub" / "cn2.safetensors",
                   random_controlnet(TINY_CONTROLNET["sd1"], seed=8), prefix=False)
    return base


@pytest.fixture(scope="module")
def manager(root: Path) -> ModelManager:
    """The module's model manager."""
    return ModelManager(ModelFolders(root))


def control_picture() -> Image.Image:
    """A control image with structure (stripes and a block), IMG_W x IMG_H."""
    arr = np.zeros((IMG_H, IMG_W, 3), dtype=np.uint8)
    arr[:, ::7] = (255, 255, 255)
    arr[20:60, 30:70] = (250, 40, 10)
    arr[::5, :, 1] = 180
    return Image.fromarray(arr)


@pytest.fixture
def env(tmp_path: Path, manager: ModelManager) -> ComfyEnvironment:
    """Fresh folders with the control image in the input folder."""
    folders = ComfyFolders.under(tmp_path)
    folders.input.mkdir(parents=True)
    control_picture().save(folders.input / "control.png")
    return ComfyEnvironment(folders, manager)


def control_prompt(strength: float = 1.0, start: float = 0.0, end: float = 1.0, old: bool = False,
                   name: str = "cn.pth") -> dict[str, Any]:
    """The example graph with LoadImage -> ControlNetApplyAdvanced (or ControlNetApply) before the KSampler."""
    p = example_prompt("tiny_sd1.safetensors")
    p["11"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": name}}
    p["12"] = {"class_type": "LoadImage", "inputs": {"image": "control.png"}}
    if old:
        p["13"] = {"class_type": "ControlNetApply", "inputs": {
            "conditioning": ["6", 0], "control_net": ["11", 0], "image": ["12", 0], "strength": strength}}
        p["3"]["inputs"].update(positive=["13", 0])
    else:
        p["13"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "control_net": ["11", 0], "image": ["12", 0],
            "strength": strength, "start_percent": start, "end_percent": end, "vae": ["4", 2]}}
        p["3"]["inputs"].update(positive=["13", 0], negative=["13", 1])
    return p


def image_of(env: ComfyEnvironment, prompt: dict[str, Any]) -> np.ndarray:
    """Run a graph; its saved image as uint8 [H, W, 3]."""
    result, _ = run(env, prompt)
    assert result.success, result.error
    return np.asarray(Image.open(saved(env, result)[0]).convert("RGB"))


# ---------------------------------------------------------------- the independent computation


def reference_hint(size: int) -> torch.Tensor:
    """The control image as ComfyUI's ControlNet sees it: [1, 3, size, size], centre crop to 1:1 then nearest-exact."""
    x = torch.from_numpy(np.asarray(control_picture()).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    side = min(IMG_W, IMG_H)
    top, left = (IMG_H - side) // 2, (IMG_W - side) // 2
    x = x[:, :, top:top + side, left:left + side]
    return F.interpolate(x, size=(size, size), mode="nearest-exact")


def percent_sigma(percent: float) -> float:
    """ModelSamplingDiscrete.percent_to_sigma: the sigma at t = (1 - percent) * 999, log-sigma interpolated."""
    if percent <= 0:
        return math.inf
    if percent >= 1:
        return 0.0
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    log_sigmas = np.log(((1 - ac) / ac) ** 0.5)
    t = (1.0 - percent) * 999.0
    lo = int(math.floor(t))
    w = t - lo
    return float(np.exp((1 - w) * log_sigmas[lo] + w * log_sigmas[min(lo + 1, 999)]))


class _Controlled(torch.nn.Module):
    """k-diffusion's CompVis wrapper around the UNet plus a ControlNet on the rows in ``on`` (cond first, then
    uncond) while the sigma is in range; ``sigma`` is set before each call."""

    def __init__(self, models: Any, cn: torch.nn.Module, hint: torch.Tensor, strength: float,
                 sigma_range: tuple[float, float], on: tuple[bool, bool]) -> None:
        super().__init__()
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.unet, self.cn, self.hint, self.strength = models.unet, cn, hint, strength
        self.range, self.on = sigma_range, on
        self.sigma = 0.0

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        hi, lo = self.range
        if self.strength == 0 or not (lo <= self.sigma <= hi):
            return self.unet(x, t, cond)
        out = self.cn(x, self.hint.expand(x.shape[0], -1, -1, -1), t, cond)
        rows = torch.tensor([self.on[0], self.on[1]], dtype=x.dtype).repeat_interleave(x.shape[0] // 2)
        m = rows.view(-1, 1, 1, 1)
        def scale(v: torch.Tensor | None) -> torch.Tensor | None:
            return None if v is None else v * self.strength * m

        control = Residuals([scale(e) for e in out.encoder], [scale(s) for s in out.skips], scale(out.middle))
        return self.unet(x, t, cond, control=control)


def reference(models: Any, cn: torch.nn.Module, strength: float, start: float, end: float,
              on: tuple[bool, bool] = (True, True)) -> np.ndarray:
    """The control graph's image with k-diffusion's Euler -> uint8 [H, W, 3]."""
    k_sampling, k_external = load_kdiffusion()
    inner = _Controlled(models, cn, reference_hint(SIZE), strength, (percent_sigma(start), percent_sigma(end)), on)
    den = k_external.CompVisDenoiser(inner, quantize=True).float()
    sigmas = den.get_sigmas(STEPS).float()
    cond, uncond = _context(models, POSITIVE), _context(models, NEGATIVE)

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        inner.sigma = float(sigma[0])
        c, u = den(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond])).chunk(2)
        return u + (c - u) * CFG

    shape = (1, 4, SIZE // 8, SIZE // 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    s0 = float(sigmas[0])
    with torch.no_grad():
        x = k_sampling.sample_euler(model, noise * math.sqrt(1 + s0**2), sigmas, disable=True)
        img = models.vae.decode(x / models.vae.config.scaling_factor).float()
    img = torch.clamp((img + 1.0) / 2.0, 0.0, 1.0)[0].permute(1, 2, 0).numpy()
    return np.clip(255.0 * img, 0, 255).astype(np.uint8)


def _cn(seed: int = 7) -> torch.nn.Module:
    return random_controlnet(TINY_CONTROLNET["sd1"], seed=seed)


@pytest.mark.parametrize(("strength", "start", "end"), [(1.0, 0.0, 1.0), (1.7, 0.0, 1.0), (0.8, 0.3, 0.8)])
def test_controlnet_apply_advanced_matches_comfyui_conventions(env: ComfyEnvironment, strength: float, start: float,
                                                               end: float) -> None:
    """ControlNetApplyAdvanced: the image equals k-diffusion + the ControlNet by ComfyUI's rules (both sides)."""
    ours = image_of(env, control_prompt(strength, start, end))
    models = load_checkpoint(env, "tiny_sd1.safetensors")[0].models
    ref = reference(models, _cn(), strength, start, end)
    plain = reference(models, _cn(), 0.0, 0.0, 1.0)
    diff, effect = mad(ours, ref), mad(ref, plain)
    print(f"ControlNet strength {strength} [{start}, {end}]: {diff:.4f}/255 from the reference; the control changes "
          f"the image by {effect:.2f}/255")
    assert diff < TOL
    assert effect > 2 * TOL  # the ControlNet matters, so the comparison can fail
    other = (0.5, 1.0) if (start, end) == (0.0, 1.0) else (0.0, 1.0)  # another range gives another image
    assert mad(ours, reference(models, _cn(), strength, *other)) > 2 * TOL


def test_old_controlnet_apply_also_guides_the_negative(env: ComfyEnvironment) -> None:
    """ControlNetApply (OLD): control_apply_to_uncond puts the control on the negative entries as well, so the
    image equals the advanced node's over the whole schedule (and differs from a positive-only control)."""
    ours = image_of(env, control_prompt(1.3, old=True))
    models = load_checkpoint(env, "tiny_sd1.safetensors")[0].models
    assert mad(ours, reference(models, _cn(), 1.3, 0.0, 1.0)) < TOL
    assert mad(ours, reference(models, _cn(), 1.3, 0.0, 1.0, on=(True, False))) > 5 * TOL


def test_strength_zero_is_no_controlnet(env: ComfyEnvironment) -> None:
    """Strength 0 returns the conditioning unchanged: the same image as the graph without the ControlNet."""
    plain = image_of(env, example_prompt("tiny_sd1.safetensors"))
    np.testing.assert_array_equal(image_of(env, control_prompt(0.0)), plain)
    np.testing.assert_array_equal(image_of(env, control_prompt(0.0, old=True)), plain)
    assert mad(image_of(env, control_prompt(1.0)), plain) > 10 * TOL


def test_chained_controlnets_add(env: ComfyEnvironment) -> None:
    """Two ControlNetApplyAdvanced nodes in a row: both networks' residuals add (control_merge)."""
    p = control_prompt(0.9)
    p["14"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "sub/cn2.safetensors"}}
    p["15"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["13", 0], "negative": ["13", 1], "control_net": ["14", 0], "image": ["12", 0],
        "strength": 0.6, "start_percent": 0.0, "end_percent": 1.0}}
    p["3"]["inputs"].update(positive=["15", 0], negative=["15", 1])
    ours = image_of(env, p)
    models = load_checkpoint(env, "tiny_sd1.safetensors")[0].models
    first, second = _cn(7), _cn(8)

    class Both(torch.nn.Module):
        def forward(self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> Any:
            a, b = first(x, hint, t, ctx), second(x, hint, t, ctx)
            skips = [sa * 0.9 + sb * 0.6 for sa, sb in zip(a.skips, b.skips, strict=True)]
            return Residuals(skips=skips, middle=a.middle * 0.9 + b.middle * 0.6)

    ref = reference(models, Both(), 1.0, 0.0, 1.0)
    diff = mad(ours, ref)
    print(f"two chained ControlNets: {diff:.4f}/255 from the reference")
    assert diff < TOL
    assert mad(ours, reference(models, first, 0.9, 0.0, 1.0)) > 5 * TOL


def test_diff_controlnet_loader_equals_the_loader(env: ComfyEnvironment) -> None:
    """DiffControlNetLoader reads the same ControlNet (checked against the model's family)."""
    p = control_prompt(1.0)
    p["11"] = {"class_type": "DiffControlNetLoader", "inputs": {"model": ["4", 0], "control_net_name": "cn.pth"}}
    np.testing.assert_array_equal(image_of(env, p), image_of(env, control_prompt(1.0)))


def test_validation_of_the_control_inputs(env: ComfyEnvironment) -> None:
    """An unknown file and a strength above 10 fail validation as ComfyUI words it."""
    body = check_request({"prompt": control_prompt(11.0, name="nope.pth")}, env).body
    assert body is not None
    errors = {e["extra_info"]["input_name"]: e["type"] for e in body["node_errors"]["11"]["errors"]}
    errors.update({e["extra_info"]["input_name"]: e["type"] for e in body["node_errors"]["13"]["errors"]})
    assert errors == {"control_net_name": "value_not_in_list", "strength": "value_bigger_than_max"}


# ---------------------------------------------------------------- T2I-Adapters through ControlNetLoader


@pytest.fixture(scope="module")
def four_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 4-level SD1 checkpoint (T2I-Adapters have one feature per SD1 level) and a diffusers-layout
    T2I-Adapter for it (random weights)."""
    from diffusers import T2IAdapter

    base = tmp_path_factory.mktemp("comfy_t2i")
    cfg = TINY["sd1"].with_(unet=replace(TINY["sd1"].unet, channel_mult=(1, 1, 2, 2), transformer_depth=(1,) * 4))
    (base / "models" / "checkpoints").mkdir(parents=True)
    save_file(random_single_file(cfg, seed=4), str(base / "models" / "checkpoints" / "four.safetensors"))
    g = torch.Generator().manual_seed(9)
    ref = T2IAdapter(in_channels=3, channels=[32, 32, 64, 64], num_res_blocks=1, downscale_factor=8,
                     adapter_type="full_adapter").eval()
    with torch.no_grad():  # every weight from the seeded generator (the constructor's come from the global RNG)
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))
    (base / "models" / "controlnet").mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              str(base / "models" / "controlnet" / "t2i.safetensors"))
    return base


def test_t2i_adapter_through_controlnet_nodes(four_root: Path, tmp_path: Path) -> None:
    """ControlNetLoader reads a T2I-Adapter; its features (computed once from the resized image) are added to the
    encoder blocks of every row times the strength (ComfyUI ``T2IAdapter.get_control``): equal to the reference,
    strength 0 equal to none."""
    from sumie.adapters.control.files import load_controlnet
    from sumie.adapters.control.t2i_files import fit_to_unet

    folders = ComfyFolders.under(tmp_path)
    folders.input.mkdir(parents=True)
    control_picture().save(folders.input / "control.png")
    env = ComfyEnvironment(folders, ModelManager(ModelFolders(four_root)))

    def graph(strength: float) -> dict[str, Any]:
        p = control_prompt(strength, name="t2i.safetensors")
        p["4"]["inputs"]["ckpt_name"] = "four.safetensors"
        return p

    ours, plain = image_of(env, graph(1.4)), image_of(env, graph(0.0))
    models = load_checkpoint(env, "four.safetensors")[0].models
    adapter = load_controlnet(four_root / "models" / "controlnet" / "t2i.safetensors")
    fit_to_unet(adapter, models.unet, "sd1")
    with torch.no_grad():
        feats = adapter.model(reference_hint(SIZE))

    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> Residuals:
            b = x.shape[0]
            return Residuals(encoder=[None if f is None else f.expand(b, -1, -1, -1) for f in feats.encoder])

    ref = reference(models, Features(), 1.4, 0.0, 1.0)
    diff, effect = mad(ours, ref), mad(ours, plain)
    print(f"T2I-Adapter: {diff:.4f}/255 from the reference; it changes the image by {effect:.2f}/255")
    assert diff < TOL and effect > 2 * TOL
    np.testing.assert_array_equal(plain, image_of(env, example_prompt("four.safetensors")))
