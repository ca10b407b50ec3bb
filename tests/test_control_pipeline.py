"""ControlNet in whole generations: parity with diffusers' ControlNet pipelines, every task, weight 0, the CLI.

Parity: a random diffusers ``ControlNetModel.from_unet`` (zero convolutions and the hint block's last conv made
random: real ControlNets are not zero) is written in the original single-file layout (``control_model.*``: the
encoder renamed with Sumie's diffusers -> LDM UNet key map, the hint block, zero convs and middle-block conv by the
ControlNet paper's layout) and loaded by Sumie by path; diffusers' ``StableDiffusionControlNetPipeline`` (and a list
of ControlNets: ``MultiControlNetModel``) runs the same seeds. Sumie runs the diffusers convention: its step range
rule (``controlnet_keep``) and its control-image resize (PIL Lanczos to W x H); diffusers duplicates the control image
for CFG, Sumie runs the ControlNet on the UNet's whole CFG batch with the hint expanded to it. The tolerance is
test_pipeline_parity's (mean |diff| < 1/255 and < 0.05 levels); each test also shows the ControlNet moved the image
far beyond it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import test_pipeline_parity as pp
import torch
from PIL import Image
from safetensors.torch import save_file
from test_pipeline_parity import sd1, sd1_inpaint, sdxl, tokenizers  # noqa: F401 - the fixtures

from sumie.adapters.control import images as ci
from sumie.adapters.control import units as cu
from sumie.checkpoints.keymaps.unet import diffusers_to_ldm_unet
from sumie.cli.main import main
from sumie.errors import SumieError
from sumie.models.controlnet import ControlNetModel
from sumie.pipelines.infotext import parse_infotext
from sumie.pipelines.output import read_png_info
from sumie.pipelines.params import ControlUnit, HiresParams, InpaintParams

# ------------------------------------------------------------------------------------------------ files


def _to_original(sd: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """diffusers ControlNet keys -> the original layout (without the ``control_model.`` prefix)."""
    out: dict[str, torch.Tensor] = {}
    encoder = {}
    for k, v in sd.items():
        if k.startswith("controlnet_cond_embedding."):
            rest = k.removeprefix("controlnet_cond_embedding.")
            if rest.startswith("conv_in."):
                out["input_hint_block.0." + rest.removeprefix("conv_in.")] = v
            elif rest.startswith("conv_out."):
                out["input_hint_block.14." + rest.removeprefix("conv_out.")] = v
            else:
                j, tail = rest.removeprefix("blocks.").split(".", 1)
                out[f"input_hint_block.{2 * (int(j) + 1)}.{tail}"] = v
        elif k.startswith("controlnet_down_blocks."):
            i, tail = k.removeprefix("controlnet_down_blocks.").split(".", 1)
            out[f"zero_convs.{i}.0.{tail}"] = v
        elif k.startswith("controlnet_mid_block."):
            out["middle_block_out.0." + k.removeprefix("controlnet_mid_block.")] = v
        else:
            encoder[k] = v
    out.update(diffusers_to_ldm_unet(encoder, cfg))
    return out


def make_controlnet(m: pp.Models, path: Path, seed: int) -> Any:
    """A random diffusers ControlNet for ``m`` (nonzero zero-convs), written to ``path`` in the original layout."""
    torch.manual_seed(seed)
    unet = m.parts["unet"]
    if unet.config.in_channels != 4:  # a 9-channel inpainting model takes the ControlNets of its 4-channel family
        unet = diffusers.UNet2DConditionModel.from_config({**unet.config, "in_channels": 4})
    net = diffusers.ControlNetModel.from_unet(unet).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # the encoder: not a copy of the UNet's
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    cfg = m.engine.models.config.unet
    sd = _to_original(net.state_dict(), cfg)
    ControlNetModel(dataclasses.replace(cfg, in_channels=4)).load_state_dict(sd, strict=True)  # the map is complete
    save_file({"control_model." + k: v.contiguous() for k, v in sd.items()}, str(path))
    return net


def control_picture(seed: int, size: tuple[int, int] = (80, 48)) -> Image.Image:
    """A structured control image of another size than the output (so the resize runs)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    arr = np.stack([(np.sin(x / (3 + seed)) + 1) * 127, (np.cos(y / 4) + 1) * 127, rng.random(x.shape) * 255], -1)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.fixture(scope="module")
def cn_files(sd1: pp.Models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    root = tmp_path_factory.mktemp("cn")
    return {"a": (root / "cn_a.safetensors", make_controlnet(sd1, root / "cn_a.safetensors", 21)),
            "b": (root / "cn_b.safetensors", make_controlnet(sd1, root / "cn_b.safetensors", 22))}


def _pipe(m: pp.Models, net: Any, tokenizers: dict[str, Any], xl: bool = False) -> Any:  # noqa: F811
    cls = "StableDiffusionXLControlNetPipeline" if xl else "StableDiffusionControlNetPipeline"
    kw: dict[str, Any] = dict(vae=m.parts["vae"], text_encoder=m.parts["text_encoder"], tokenizer=tokenizers["eos"],
                              unet=m.parts["unet"], controlnet=net, scheduler=pp.SCHEDS["euler"].make(
                                  "leading" if xl else "linspace"))
    if xl:
        kw.update(text_encoder_2=m.parts["text_encoder_2"], tokenizer_2=tokenizers["bang"], add_watermarker=False)
    else:
        kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, cls)(**kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(m: pp.Models, units: list[ControlUnit], xl: bool = False, **kw: Any) -> np.ndarray:
    s = pp.SCHEDS["euler"]
    p = pp.params(sampler=s.sampler, controlnets=units, **kw)
    return pp.u8(m.engine.generate(p, sigmas_fn=s.sigmas_fn(m.engine, "leading" if xl else "linspace")).images)


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", ["balanced", "range", "guess"])
def test_controlnet_txt2img_matches_diffusers(sd1: pp.Models, tokenizers: dict[str, Any],  # noqa: F811
                                              cn_files: dict[str, Any], case: str) -> None:
    path, net = cn_files["a"]
    image = control_picture(1)
    weight, start, end = (0.8, 0.0, 1.0) if case != "range" else (1.2, 0.25, 0.75)
    guess = case == "guess"
    pipe = _pipe(sd1, net, tokenizers)
    n = len(pp.SEEDS)
    ref = pipe([pp.PROMPT] * n, image=image, negative_prompt=[pp.NEGATIVE] * n, num_inference_steps=4,
               guidance_scale=7.0, height=64, width=64, output_type="np", latents=pp.start_noise((4, 8, 8), pp.SEEDS),
               controlnet_conditioning_scale=weight, control_guidance_start=start, control_guidance_end=end,
               guess_mode=guess).images
    ours = _ours(sd1, [ControlUnit(str(path), image, weight=weight, start=start, end=end, guess_mode=guess,
                                   resize_mode="Just Resize")])
    pp.check(ours, pp.ref_u8(ref), f"ControlNet txt2img ({case}) vs StableDiffusionControlNetPipeline")
    plain = _ours(sd1, [])
    assert pp.mad(ours, plain) > 20 * pp.STRICT  # the ControlNet moved the image far beyond the tolerance


def test_multi_controlnet_matches_diffusers(sd1: pp.Models, tokenizers: dict[str, Any],  # noqa: F811
                                            cn_files: dict[str, Any]) -> None:
    (pa, na), (pb, nb) = cn_files["a"], cn_files["b"]
    ia, ib = control_picture(1), control_picture(2, (64, 64))
    pipe = _pipe(sd1, [na, nb], tokenizers)
    n = len(pp.SEEDS)
    ref = pipe([pp.PROMPT] * n, image=[ia, ib], negative_prompt=[pp.NEGATIVE] * n, num_inference_steps=4,
               guidance_scale=7.0, height=64, width=64, output_type="np", latents=pp.start_noise((4, 8, 8), pp.SEEDS),
               controlnet_conditioning_scale=[0.6, 1.5], control_guidance_start=[0.0, 0.25],
               control_guidance_end=[1.0, 1.0]).images
    both = [ControlUnit(str(pa), ia, weight=0.6, resize_mode="Just Resize"),
            ControlUnit(str(pb), ib, weight=1.5, start=0.25, resize_mode="Just Resize")]
    ours = _ours(sd1, both)
    pp.check(ours, pp.ref_u8(ref), "multi-ControlNet txt2img vs MultiControlNetModel")
    assert pp.mad(ours, _ours(sd1, both[:1])) > 20 * pp.STRICT  # the second unit counts


def test_controlnet_img2img_matches_diffusers(sd1: pp.Models, tokenizers: dict[str, Any],  # noqa: F811
                                             cn_files: dict[str, Any]) -> None:
    """img2img: the step range counts the visited steps (diffusers' ``len(timesteps)`` after ``strength``)."""
    path, net = cn_files["a"]
    s, image, control = pp.SCHEDS["euler"], pp.init_image(), control_picture(6)
    pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline(
        vae=sd1.parts["vae"], text_encoder=sd1.parts["text_encoder"], tokenizer=tokenizers["eos"],
        unet=sd1.parts["unet"], controlnet=net, scheduler=s.make("linspace"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(pp.PROMPT, image=image, control_image=control, strength=0.6, negative_prompt=pp.NEGATIVE,
               num_inference_steps=5, guidance_scale=7.0, num_images_per_prompt=len(pp.SEEDS),
               generator=pp.generators(pp.SEEDS), output_type="np", height=64, width=64,
               controlnet_conditioning_scale=1.5, control_guidance_start=0.3, control_guidance_end=1.0).images
    unit = ControlUnit(str(path), control, weight=1.5, start=0.3, resize_mode="Just Resize")
    p = pp.params(sampler=s.sampler, steps=5, init_images=[image], denoising_strength=0.6, controlnets=[unit])
    ours = pp.u8(sd1.engine.generate(p, sigmas_fn=s.sigmas_fn(sd1.engine, "linspace")).images)
    pp.check(ours, pp.ref_u8(ref), "ControlNet img2img vs StableDiffusionControlNetImg2ImgPipeline")
    plain = pp.u8(sd1.engine.generate(dataclasses.replace(p, controlnets=[]),
                                      sigmas_fn=s.sigmas_fn(sd1.engine, "linspace")).images)
    assert pp.mad(ours, plain) > 20 * pp.STRICT


def test_sdxl_controlnet_matches_diffusers(sdxl: pp.Models, tokenizers: dict[str, Any],  # noqa: F811
                                          tmp_path: Path) -> None:
    net = make_controlnet(sdxl, tmp_path / "xl.safetensors", 31)
    image = control_picture(3)
    pipe = _pipe(sdxl, net, tokenizers, xl=True)
    n = len(pp.SEEDS)
    ref = pipe([pp.PROMPT] * n, image=image, negative_prompt=[pp.NEGATIVE] * n, num_inference_steps=4,
               guidance_scale=7.0, height=64, width=64, output_type="np", latents=pp.start_noise((4, 8, 8), pp.SEEDS),
               controlnet_conditioning_scale=0.7).images
    unit = ControlUnit(str(tmp_path / "xl.safetensors"), image, weight=0.7, resize_mode="Just Resize")
    ours = _ours(sdxl, [unit], xl=True)
    pp.check(ours, pp.ref_u8(ref), "SDXL ControlNet vs StableDiffusionXLControlNetPipeline")
    assert pp.mad(ours, _ours(sdxl, [], xl=True)) > 20 * pp.STRICT


# ------------------------------------------------------------------------------------------------ every task


def _task_params(task: str) -> dict[str, Any]:
    base: dict[str, Any] = dict(prompt=pp.PROMPT, negative_prompt=pp.NEGATIVE, steps=4, cfg_scale=7.0, seed=3,
                                width=64, height=64, batch_size=2, sampler="Euler a")
    if task in ("img2img", "inpaint9"):
        base.update(init_images=[pp.init_image()], denoising_strength=0.7)
    if task == "inpaint9":
        base["inpaint"] = InpaintParams(mask=pp.block_mask())
    if task == "hires":
        base.update(width=32, height=32, hires=HiresParams(scale=2.0, steps=3, denoising_strength=0.6))
    return base


@pytest.mark.parametrize("task", ["txt2img", "img2img", "inpaint9", "hires", "sdxl"])
def test_every_task_weight_zero_is_exact_and_weight_one_changes_it(
        request: pytest.FixtureRequest, tmp_path: Path, task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    m: pp.Models = request.getfixturevalue({"inpaint9": "sd1_inpaint", "sdxl": "sdxl"}.get(task, "sd1"))
    path = tmp_path / "cn.safetensors"
    make_controlnet(m, path, 41)
    sizes: list[tuple[int, int]] = []
    real = ci.control_image
    monkeypatch.setattr(ci, "control_image", lambda im, w, h, *a: sizes.append((w, h)) or real(im, w, h, *a))
    from sumie.pipelines.params import GenerationParams

    kw = _task_params(task)
    plain = m.engine.generate(GenerationParams(**kw))
    zero = m.engine.generate(GenerationParams(**kw, controlnets=[ControlUnit(str(path), control_picture(4),
                                                                             weight=0.0)]))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain.images, zero.images, strict=True))
    assert not sizes  # a unit at weight 0 never runs
    on = m.engine.generate(GenerationParams(**kw, controlnets=[ControlUnit(str(path), control_picture(4))]))
    assert pp.mad(pp.u8(on.images), pp.u8(plain.images)) > 1.0
    expected = [(64, 64)] if task != "hires" else [(32, 32), (64, 64)]  # the hires pass gets its own size
    assert sorted(set(sizes)) == expected
    assert 'ControlNet 0: "Module: none, Model: cn [' in on.infotexts[0]


def test_outside_the_step_range_is_exact(sd1: pp.Models, cn_files: dict[str, Any]) -> None:  # noqa: F811
    path, _ = cn_files["a"]
    from sumie.pipelines.params import GenerationParams

    kw = _task_params("txt2img")
    plain = pp.u8(sd1.engine.generate(GenerationParams(**kw)).images)
    # A1111 rule, 4 steps: start 1.0 needs sampling_step / 4 >= 1: never reached
    late = GenerationParams(**kw, controlnets=[ControlUnit(str(path), control_picture(1), start=1.0)])
    assert np.array_equal(pp.u8(sd1.engine.generate(late).images), plain)
    # diffusers rule: end 0.2 < (i + 1) / 4 for every step
    kwd = dict(kw, convention="diffusers")
    plain_d = pp.u8(sd1.engine.generate(GenerationParams(**kwd)).images)
    early = GenerationParams(**kwd, controlnets=[ControlUnit(str(path), control_picture(1), end=0.2)])
    assert np.array_equal(pp.u8(sd1.engine.generate(early).images), plain_d)
    # A1111 rule, end 0.2: step 0 and step 1 both read sampling_step 0 -> it acts there
    a1111_early = GenerationParams(**kw, controlnets=[ControlUnit(str(path), control_picture(1), end=0.2)])
    assert pp.mad(pp.u8(sd1.engine.generate(a1111_early).images), plain) > 0.1


@pytest.mark.parametrize("mode", ["My prompt is more important", "ControlNet is more important"])
def test_control_modes_differ_from_balanced(sd1: pp.Models, cn_files: dict[str, Any], mode: str) -> None:  # noqa: F811
    path, _ = cn_files["a"]
    from sumie.pipelines.params import GenerationParams

    kw = _task_params("txt2img")
    bal = pp.u8(sd1.engine.generate(GenerationParams(**kw, controlnets=[
        ControlUnit(str(path), control_picture(1))])).images)
    other = pp.u8(sd1.engine.generate(GenerationParams(**kw, controlnets=[
        ControlUnit(str(path), control_picture(1), mode=mode)])).images)
    assert pp.mad(bal, other) > 0.5


# ------------------------------------------------------------------------------------------------ errors


def test_errors_before_any_step(sd1: pp.Models, tmp_path: Path, cn_files: dict[str, Any]) -> None:  # noqa: F811
    from sumie.configs import UNetConfig
    from sumie.pipelines.params import GenerationParams

    other = ControlNetModel(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                       transformer_depth=(1, 1), num_heads=2, context_dim=32, norm_groups=8))
    save_file({"control_model." + k: v.contiguous() for k, v in other.state_dict().items()},
              str(tmp_path / "other.safetensors"))
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"not a png")
    path, _ = cn_files["a"]
    events: list[object] = []
    kw = _task_params("txt2img")
    cases = [(ControlUnit(str(tmp_path / "other.safetensors"), control_picture(1)), "context width 32.*sd1"),
             (ControlUnit(str(tmp_path / "missing.safetensors"), control_picture(1)), "no such file"),
             (ControlUnit(str(path), bad_image), "cannot be read"),  # type: ignore[arg-type]
             (ControlUnit(str(path), control_picture(1), weight=3.0), r"\[0, 2\]"),
             (ControlUnit(str(path), control_picture(1), mode="loud"), "control mode")]  # type: ignore[arg-type]
    for unit, message in cases:
        with pytest.raises(SumieError, match=message):
            sd1.engine.generate(GenerationParams(**kw, controlnets=[unit]), progress=events.append)
    assert events == []


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_writes_the_unit_and_from_png_recreates_the_image(sd1: pp.Models, tmp_path: Path,  # noqa: F811
                                                              cn_files: dict[str, Any],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "webui" / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "ControlNet").mkdir()
    (models / "ControlNet" / "canny_test.safetensors").write_bytes(cn_files["a"][0].read_bytes())
    ctl = tmp_path / "edges.png"
    control_picture(5).save(ctl)
    common = ["--model", str(sd1.root), "--models-dir", str(tmp_path / "webui"), "--steps", "3", "-q",
              "--width", "64", "--height", "64", "--sampler", "Euler"]
    out1, out2 = tmp_path / "one.png", tmp_path / "two.png"
    assert main(["generate", "a cat", *common, "--seed", "7", "--controlnet", "canny_test", "--control-image",
                 str(ctl), "--control-weight", "0.7", "--control-mode", "prompt", "--control-end", "0.8",
                 "--control-resize", "resize-and-fill", "-o", str(out1)]) == 0
    fields = parse_infotext(read_png_info(out1))
    unit = cu.parse_infotext_value(fields["ControlNet 0"])
    assert unit["model"].startswith("canny_test [") and unit["weight"] == 0.7 and unit["guidance_end"] == 0.8
    assert unit["control_mode"] == "My prompt is more important" and unit["resize_mode"] == "Resize and Fill"
    # re-created from the PNG: the unit comes back from the infotext, its image from --control-image
    assert main(["generate", *common, "--from-png", str(out1), "--control-image", str(ctl), "-o", str(out2)]) == 0
    assert np.array_equal(np.asarray(Image.open(out1)), np.asarray(Image.open(out2)))
    capsys.readouterr()
    assert main(["generate", *common, "--from-png", str(out1), "-o", str(tmp_path / "three.png")]) == 2
    assert "its control image is not stored in the PNG" in capsys.readouterr().err
    assert main(["generate", "x", *common, "--controlnet", "nope", "--control-image", str(ctl)]) == 2
    assert "ControlNet nope" in capsys.readouterr().err


@pytest.mark.parametrize(("sampler", "convention", "seen", "active"), [
    # A1111: a call reads the index of the last finished step (hook.py guidance_schedule_handler reads
    # state.sampling_step, which sd_samplers_kdiffusion.callback_state sets after each step; 0 before the first)
    ("Euler", "a1111", [0, 1, 2, 3], [False, False, False, True]),
    # Heun: the callback comes after a step's first call, so its second call already reads this step
    ("Heun", "a1111", [0, 1, 1, 2, 2, 3, 3], [False] * 5 + [True] * 2),
    # diffusers: controlnet_keep[i] with i the step being computed
    ("Euler", "diffusers", [0, 1, 2, 3], [False, False, True, True]),
])
def test_step_range_through_the_engine(sd1: pp.Models, cn_files: dict[str, Any],  # noqa: F811
                                       monkeypatch: pytest.MonkeyPatch, sampler: str, convention: str,
                                       seen: list[int], active: list[bool]) -> None:
    path, _ = cn_files["a"]
    from sumie.pipelines.params import GenerationParams

    record: list[tuple[int, int, bool]] = []
    real = cu.unit_active

    def spy(start: float, end: float, done: int, total: int, rule: cu.StepRule = "a1111") -> bool:
        out = real(start, end, done, total, rule)
        record.append((done, total, out))
        return out

    monkeypatch.setattr(cu, "unit_active", spy)
    kw = dict(_task_params("txt2img"), sampler=sampler, convention=convention)
    sd1.engine.generate(GenerationParams(**kw, controlnets=[ControlUnit(str(path), control_picture(1), start=0.5)]))
    assert [d for d, _, _ in record] == seen and {n for _, n, _ in record} == {4}
    assert [a for _, _, a in record] == active


def test_img2img_unit_without_image_takes_the_init_image(sd1: pp.Models, cn_files: dict[str, Any]) -> None:  # noqa: F811
    """The extension's ``choose_input_image``: no unit image in img2img -> ``p.init_images[0]`` with the img2img
    resize mode."""
    path, _ = cn_files["a"]
    from sumie.pipelines.params import GenerationParams

    kw = _task_params("img2img")  # resize_mode "just_resize"
    explicit = sd1.engine.generate(GenerationParams(**kw, controlnets=[
        ControlUnit(str(path), pp.init_image(), resize_mode="Just Resize")]))
    implicit = sd1.engine.generate(GenerationParams(**kw, controlnets=[ControlUnit(str(path), None)]))
    assert np.array_equal(pp.u8(explicit.images), pp.u8(implicit.images))
    plain = sd1.engine.generate(GenerationParams(**kw))
    assert pp.mad(pp.u8(implicit.images), pp.u8(plain.images)) > 1.0


def test_only_masked_crops_the_control_image_as_the_init_image(sd1: pp.Models, cn_files: dict[str, Any],  # noqa: F811
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Inpaint area "Only masked": the extension's ``try_crop_image_with_a1111_mask`` cuts the control image to the
    mask's crop region and "resize and fill"s it to the processing size, as A1111 does the init image."""
    from PIL import ImageDraw

    from sumie.pipelines import inpaint as inpaint_ops
    from sumie.pipelines.params import GenerationParams

    path, _ = cn_files["a"]
    init = pp.init_image(128)
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((80, 72, 111, 111), fill=255)
    inpaint = InpaintParams(mask=mask, full_res=True, full_res_padding=8)
    seen: list[Image.Image] = []
    real = ci.control_image
    monkeypatch.setattr(ci, "control_image", lambda im, *a: seen.append(im) or real(im, *a))
    kw = dict(_task_params("img2img"), init_images=[init], inpaint=inpaint)
    sd1.engine.generate(GenerationParams(**kw, controlnets=[ControlUnit(str(path), init, resize_mode="Just Resize")]))
    inputs = inpaint_ops.prepare_inpaint(init, inpaint, 64, 64)
    assert inputs.crop_region is not None and inputs.crop_region != (0, 0, 128, 128)
    assert seen and np.array_equal(np.asarray(seen[0]), np.asarray(inputs.image))  # the init image's own crop


def test_refiner_steps_run_without_the_base_models_controlnets(sdxl: pp.Models, tmp_path: Path,  # noqa: F811
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """ControlNets are made for the base UNet (an SDXL refiner has another context width): the refiner's calls
    get no residuals."""
    from sumie.pipelines.params import GenerationParams, RefinerParams

    make_controlnet(sdxl, tmp_path / "xl.safetensors", 51)
    calls: list[int] = []
    real = cu.ControlResiduals.__call__
    monkeypatch.setattr(cu.ControlResiduals, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    kw = dict(_task_params("sdxl"), sampler="Euler")
    unit = ControlUnit(str(tmp_path / "xl.safetensors"), control_picture(1))
    sdxl.engine.generate(GenerationParams(**kw, controlnets=[unit]))
    assert len(calls) == 4
    calls.clear()
    res = sdxl.engine.generate(GenerationParams(**kw, controlnets=[unit],
                                                refiner=RefinerParams(model=str(sdxl.root), switch_at=0.5)))
    assert "Refiner" in res.infotexts[0] and 0 < len(calls) < 4


# ------------------------------------------------------------------------------------------------ T2I, modules


# a 4-level SD1-like UNet (T2I-Adapter files have one feature per SD1 level); the rest is TINY_SD1
FOUR_LEVELS = dict(pp.TINY_SD1, unet=dict(
    pp.TINY_SD1["unet"], block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))


@pytest.fixture(scope="module")
def sd1_four(tmp_path_factory: pytest.TempPathFactory) -> pp.Models:
    return pp.build(tmp_path_factory.mktemp("sd1_four"), FOUR_LEVELS, seed=2)


def _t2i_file(path: Path, channels: list[int], seed: int) -> Path:
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    ref = T2IAdapter(in_channels=3, channels=channels, num_res_blocks=1, downscale_factor=8,
                     adapter_type="full_adapter").eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return path


def test_t2i_adapter_through_the_engine(sd1_four: pp.Models, tmp_path: Path) -> None:
    """A diffusers-layout T2I-Adapter in a unit: its features land where this UNet's levels end (diffusers' rule;
    sites 1, 3, 5, 7 with one resnet a level), weight 0 is exact, weight 1 changes the image, the infotext names it."""
    from sumie.pipelines.params import GenerationParams

    path = _t2i_file(tmp_path / "t2i_tiny.safetensors", [32, 32, 64, 64], 5)
    kw = _task_params("txt2img")
    plain = sd1_four.engine.generate(GenerationParams(**kw)).images
    zero = sd1_four.engine.generate(GenerationParams(**kw, controlnets=[ControlUnit(str(path), control_picture(6),
                                                                                    weight=0.0)]))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, zero.images, strict=True))
    on = sd1_four.engine.generate(GenerationParams(**kw, controlnets=[ControlUnit(str(path), control_picture(6))]))
    assert pp.mad(pp.u8(on.images), pp.u8(plain)) > 1.0
    assert 'ControlNet 0: "Module: none, Model: t2i_tiny [' in on.infotexts[0]


def test_t2i_adapter_of_other_widths_is_refused(sd1_four: pp.Models, tmp_path: Path) -> None:
    from sumie.pipelines.params import GenerationParams

    path = _t2i_file(tmp_path / "t2i_other.safetensors", [32, 64, 64, 64], 6)
    with pytest.raises(SumieError, match=r"T2I-Adapter t2i_other makes features of widths \[32, 64, 64, 64\]; "
                                         r"this UNet needs \[32, 32, 64, 64\]"):
        sd1_four.engine.generate(GenerationParams(**_task_params("txt2img"),
                                                  controlnets=[ControlUnit(str(path), control_picture(6))]))


def test_control_module_runs_the_preprocessor_with_the_units_settings(sd1: pp.Models,  # noqa: F811
                                                                      cn_files: dict[str, Any]) -> None:
    """``module="canny"`` with A1111's slider fields (threshold_a/b = low/high) equals giving the canny map itself."""
    from sumie.pipelines.params import GenerationParams
    from sumie.preprocess import run

    y, x = np.mgrid[0:64, 0:96].astype(np.float32)
    blob = 255 * np.exp(-((x - 48) ** 2 + (y - 32) ** 2) / (2 * 14**2))  # soft edges: the thresholds matter
    picture = Image.fromarray(np.stack([blob, blob * 0.5 + 60, 255 - blob], -1).astype(np.uint8))
    path = str(cn_files["a"][0])
    kw = _task_params("txt2img")
    inline = sd1.engine.generate(GenerationParams(**kw, controlnets=[ControlUnit(
        path, picture, module="canny", processor_res=64, threshold_a=50, threshold_b=120)]))
    edges = run("canny", picture, resolution=64, low=50, high=120)
    given = sd1.engine.generate(GenerationParams(**kw, controlnets=[ControlUnit(path, edges)]))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(inline.images, given.images, strict=True))
    other = sd1.engine.generate(GenerationParams(**kw, controlnets=[ControlUnit(
        path, picture, module="canny", processor_res=64, threshold_a=5, threshold_b=20)]))
    assert pp.mad(pp.u8(other.images), pp.u8(inline.images)) > 0.5  # the thresholds reach the preprocessor
    assert 'Module: canny' in inline.infotexts[0]
    with pytest.raises(SumieError, match="control module 'openpose' needs a pose"):
        sd1.engine.generate(GenerationParams(**kw, controlnets=[ControlUnit(path, picture, module="openpose")]))


def test_the_next_request_reuses_the_loaded_controlnet(sd1: pp.Models, cn_files: dict[str, Any],  # noqa: F811
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A ControlNet is read from disk once while consecutive requests use it; a changed file is read again."""
    from sumie.pipelines.params import GenerationParams

    engine = sd1.engine
    monkeypatch.setattr(engine, "_controls", {})  # nothing kept from the tests before
    loads: list[str] = []
    real = engine._load_control
    monkeypatch.setattr(engine, "_load_control", lambda path, dtype: loads.append(path.name) or real(path, dtype))
    kw = dict(_task_params("txt2img"), steps=2, batch_size=1)
    unit = ControlUnit(str(cn_files["a"][0]), control_picture(3))
    first = engine.generate(GenerationParams(**kw, controlnets=[unit, unit]))
    second = engine.generate(GenerationParams(**kw, controlnets=[unit]))
    assert loads == ["cn_a.safetensors"]
    engine.generate(GenerationParams(**kw, controlnets=[ControlUnit(str(cn_files["b"][0]), control_picture(3))]))
    engine.generate(GenerationParams(**kw, controlnets=[unit]))  # only the last request's models are kept
    assert loads == ["cn_a.safetensors", "cn_b.safetensors", "cn_a.safetensors"]
    assert pp.mad(pp.u8(first.images), pp.u8(second.images)) > 0  # two units of weight 1 differ from one
