"""``sumie serve`` driven by the unchanged ``webuiapi`` client (A1111's most used Python client) over real HTTP."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import webuiapi
from PIL import Image
from serve_helpers import Running, from_b64, running_server

from sumie.checkpoints.embedded import embedded_path
from sumie.serve import ServeConfig

FAST = {"width": 32, "height": 32, "steps": 3, "sampler_name": "Euler", "cfg_scale": 5.0}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("serve")
    ckpt = root / "ckpt"
    ckpt.mkdir()
    shutil.copyfile(embedded_path(), ckpt / "tiny-a.safetensors")
    with running_server(ServeConfig(ckpt_dirs=(ckpt,), output_dir=root / "out")) as running:
        yield running


@pytest.fixture(scope="module")
def api(srv: Running) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host=srv.host, port=srv.port, sampler="Euler", steps=3)


def test_txt2img_batches_seeds_and_png_parameters(api: webuiapi.WebUIApi) -> None:
    r = api.txt2img(prompt="a red circle", seed=1234, batch_size=2, n_iter=2, **FAST)
    assert len(r.images) == 4 and all(im.size == (32, 32) for im in r.images)
    assert r.info["all_seeds"] == [1234, 1235, 1236, 1237] and r.info["seed"] == 1234
    assert r.info["sampler_name"] == "Euler" and r.info["steps"] == 3 and r.info["sd_model_name"] == "tiny-a"
    for im, text, seed in zip(r.images, r.info["infotexts"], r.info["all_seeds"], strict=True):
        assert im.info["parameters"] == text  # each PNG carries its own infotext
        assert f"Seed: {seed}," in text and "Steps: 3," in text and "Size: 32x32" in text
    assert r.parameters["prompt"] == "a red circle" and r.parameters["batch_size"] == 2
    again = api.txt2img(prompt="a red circle", seed=1234, batch_size=2, n_iter=2, **FAST)
    assert [im.tobytes() for im in again.images] == [im.tobytes() for im in r.images]  # seeded: reproducible


def test_sampler_label_with_schedule_and_hires_fix(api: webuiapi.WebUIApi) -> None:
    r = api.txt2img(prompt="a blue square", seed=7, **{**FAST, "sampler_name": "DPM++ 2M Karras"})
    assert r.info["sampler_name"] == "DPM++ 2M" and r.info["extra_generation_params"]["Schedule type"] == "Karras"
    h = api.txt2img(prompt="a blue square", seed=7, enable_hr=True, hr_scale=2, hr_second_pass_steps=2,
                    denoising_strength=0.5, hr_upscaler=webuiapi.HiResUpscaler.Latent, **FAST)
    assert h.images[0].size == (64, 64)
    assert "Hires upscale: 2" in h.info["infotexts"][0] and h.info["denoising_strength"] == 0.5


def test_img2img_and_inpainting_keep_the_unmasked_part(api: webuiapi.WebUIApi) -> None:
    init = api.txt2img(prompt="a green triangle", seed=3, **FAST).images[0].convert("RGB")
    r = api.img2img(images=[init], prompt="a green triangle", denoising_strength=0.5, seed=5, **FAST)
    assert r.images[0].size == (32, 32) and "Denoising strength: 0.5" in r.info["infotexts"][0]
    assert r.parameters["init_images"] is None  # include_init_images false: not echoed, as A1111
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 12, 32))  # repaint the left part only
    m = api.img2img(images=[init], mask_image=mask, prompt="a green triangle", denoising_strength=0.9, seed=5,
                    mask_blur=2, inpaint_full_res=False, inpainting_fill=1, **FAST)
    out = m.images[0].convert("RGB")
    right = (24, 0, 32, 32)  # far from the mask and its blur: the original pixels pasted back
    assert out.crop(right).tobytes() == init.crop(right).tobytes()
    assert out.crop((0, 0, 8, 32)).tobytes() != init.crop((0, 0, 8, 32)).tobytes()
    assert "Mask blur: 2" in m.info["infotexts"][0]


def test_png_info_round_trip(api: webuiapi.WebUIApi) -> None:
    r = api.txt2img(prompt="a red circle", negative_prompt="blurry", seed=99, **FAST)
    info = api.png_info(r.images[0])
    assert info.info == r.info["infotexts"][0]
    p = info.parameters
    assert p["Prompt"] == "a red circle" and p["Negative prompt"] == "blurry" and p["Seed"] == "99"
    assert p["Size-1"] == "32" and p["Steps"] == "3"


def test_progress_during_a_job_then_interrupt_returns_the_partial_image(srv: Running,
                                                                        api: webuiapi.WebUIApi) -> None:
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    out: dict[str, object] = {}
    job = threading.Thread(target=lambda: out.setdefault("r", api.txt2img(prompt="slow", seed=11,
                                                                          **{**FAST, "steps": 400})))
    started = time.monotonic()
    job.start()
    seen = None
    while time.monotonic() - started < 60:
        prog = api.get_progress()
        if prog["state"]["sampling_step"] >= 2:
            seen = prog
            break
        time.sleep(0.05)
    assert seen is not None, "no progress seen while the job ran"
    assert 0.01 < seen["progress"] < 0.5 and seen["state"]["job_count"] == 1 and seen["state"]["job"] == "txt2img"
    assert seen["state"]["sampling_steps"] == 400 and seen["eta_relative"] > 0
    assert from_b64(seen["current_image"]).size[0] > 0  # the live preview
    quiet = httpx.get(f"{srv.url}/sdapi/v1/progress", params={"skip_current_image": "true"}).json()
    assert quiet["current_image"] is None and quiet["state"]["job_count"] == 1
    api.interrupt()
    job.join(60)
    r = out["r"]
    assert len(r.images) == 1 and r.info["interrupted"] is True  # 200 with the partial image
    assert "Steps: 400," in r.info["infotexts"][0]
    with sqlite3.connect(srv.server.config.database) as db:
        state = db.execute("SELECT state FROM jobs ORDER BY created DESC LIMIT 1").fetchone()[0]
    assert state == "interrupted"
    assert api.get_progress()["state"]["job_count"] == 0


def test_options_get_set_and_override_settings(api: webuiapi.WebUIApi) -> None:
    opts = api.get_options()
    assert opts["CLIP_stop_at_last_layers"] == 1 and opts["samples_format"] == "png"
    assert opts["sd_model_checkpoint"].startswith("tiny-a.safetensors")
    r = api.txt2img(prompt="x", seed=1, override_settings={"CLIP_stop_at_last_layers": 2}, **FAST)
    assert "Clip skip: 2" in r.info["infotexts"][0] and r.info["clip_skip"] == 2
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1  # restored afterwards
    api.set_options({"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "tiny-a"})
    try:
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        assert "Clip skip: 2" in api.txt2img(prompt="x", seed=1, **FAST).info["infotexts"][0]
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    assert "Clip skip" not in api.txt2img(prompt="x", seed=1, **FAST).info["infotexts"][0]


def test_lists_samplers_schedulers_models(api: webuiapi.WebUIApi) -> None:
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ SDE", "DDIM", "UniPC", "LCM"} <= set(samplers)
    assert "k_euler_a" in samplers["Euler a"]["aliases"]
    assert {"automatic", "karras", "exponential", "uniform"} <= {s["name"] for s in api.get_schedulers()}
    models = api.get_sd_models()
    assert [m["model_name"] for m in models] == ["tiny-a"]  # the folder's checkpoint, not the embedded one
    assert models[0]["title"] == f"tiny-a.safetensors [{models[0]['sha256'][:10]}]"  # hashed when loaded
    assert api.get_cmd_flags()["api"] is True
    assert {u["name"] for u in api.get_upscalers()} == {"None", "Lanczos", "Nearest"}


def test_save_images_writes_a1111_names_with_infotext(srv: Running, api: webuiapi.WebUIApi) -> None:
    r = api.txt2img(prompt="saved", seed=4242, save_images=True, batch_size=2, **FAST)
    day = time.strftime("%Y-%m-%d", time.localtime())
    folder = Path(srv.server.config.output_dir) / "txt2img-images" / day
    files = sorted(p.name for p in folder.glob("*-424[23].png"))
    assert len(files) == 2 and files[0].endswith("-4242.png") and files[1].endswith("-4243.png")
    assert int(files[1][:5]) == int(files[0][:5]) + 1
    with Image.open(folder / files[0]) as im:
        assert im.info["parameters"] == r.info["infotexts"][0]
    assert not list(folder.glob("*.tmp*")) and not list(folder.glob(".*"))
