"""ControlNet units in ``alwayson_scripts`` (the extension's API format) and ``/controlnet/*``, through a real server
driven by ``webuiapi``'s ``ControlNetUnit``, with a random-weight ControlNet for sumie-tiny."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import webuiapi
from control_testfiles import randomize, write_original
from PIL import Image
from serve_helpers import Running, b64_png, running_server

from sumie.adapters.control.units import unit_label
from sumie.models.controlnet import ControlNetModel
from sumie.serve import ServeConfig

FAST = {"width": 32, "height": 32, "steps": 3, "sampler_name": "Euler", "cfg_scale": 5.0, "seed": 77}


def _picture() -> Image.Image:
    y, x = np.mgrid[0:48, 0:40].astype(np.float32)
    arr = np.stack([(np.sin(x / 3) + 1) * 127, (np.cos(y / 4) + 1) * 127, (x * y) % 255], -1)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("serve_cn")
    cn_dir = root / "cn"
    cn_dir.mkdir()
    with running_server(ServeConfig(controlnet_dirs=(cn_dir,), output_dir=root / "out")) as running:
        cfg = running.server.queue._last.models.config.unet  # the loaded sumie-tiny's UNet config
        net = randomize(ControlNetModel(dataclasses.replace(cfg, in_channels=4)), seed=5).eval()
        write_original(cn_dir / "cn_tiny.safetensors", net)  # control_model.* keys
        yield running


@pytest.fixture(scope="module")
def api(srv: Running) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host=srv.host, port=srv.port, sampler="Euler", steps=3)


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_unit_changes_the_image_weight_zero_is_no_unit(srv: Running, api: webuiapi.WebUIApi) -> None:
    plain = api.txt2img(prompt="a cat", **FAST)
    title = api.controlnet_model_list()[0]
    unit = webuiapi.ControlNetUnit(image=_picture(), module="none", model=title, weight=1.0, pixel_perfect=True)
    with_cn = api.txt2img(prompt="a cat", controlnet_units=[unit], **FAST)
    assert len(with_cn.images) == 1
    diff = np.abs(_pixels(with_cn.images[0]) - _pixels(plain.images[0])).mean()
    assert diff > 1.0, diff  # the unit steers the image
    text = with_cn.info["infotexts"][0]
    assert "ControlNet 0: \"Module: none, Model: cn_tiny [" in text and "Weight: 1.0" in text
    assert "Resize Mode: Resize and Fill" in text  # webuiapi's default resize mode, passed through
    assert with_cn.info["extra_generation_params"]["ControlNet 0"].startswith("Module: none")
    assert not any("ControlNet" in w for w in with_cn.info["warnings"])
    zero = webuiapi.ControlNetUnit(image=_picture(), module="none", model="cn_tiny", weight=0.0)
    off = api.txt2img(prompt="a cat", controlnet_units=[zero], **FAST)
    assert off.images[0].tobytes() == plain.images[0].tobytes()  # weight 0: the unit is not run at all
    none_model = webuiapi.ControlNetUnit(image=_picture(), module="canny", model="None")
    disabled = webuiapi.ControlNetUnit(image=_picture(), model="cn_tiny", enabled=False)
    skipped = api.txt2img(prompt="a cat", controlnet_units=[none_model, disabled], **FAST)
    assert skipped.images[0].tobytes() == plain.images[0].tobytes()
    assert "ControlNet" not in skipped.info["infotexts"][0]


def test_img2img_unit_without_image_takes_the_init_image_and_preprocessor_runs(api: webuiapi.WebUIApi) -> None:
    init = _picture().resize((32, 32))
    base = api.img2img(images=[init], prompt="x", denoising_strength=0.8, **FAST)
    unit = webuiapi.ControlNetUnit(module="canny", model="cn_tiny", threshold_a=50, threshold_b=150,
                                   processor_res=64)
    r = api.img2img(images=[init], prompt="x", denoising_strength=0.8, controlnet_units=[unit], **FAST)
    assert r.images[0].tobytes() != base.images[0].tobytes()
    text = r.info["infotexts"][0]
    assert "Module: canny" in text and "Processor Res: 64, Threshold A: 50.0, Threshold B: 150.0" in text


def test_controlnet_list_routes(srv: Running, api: webuiapi.WebUIApi) -> None:
    cn = Path(srv.server.folders.dirs("controlnet")[0]) / "cn_tiny.safetensors"
    assert api.controlnet_model_list() == [unit_label(cn)]
    assert api.controlnet_version() == 2
    modules = api.controlnet_module_list()
    assert modules[0] == "none" and "canny" in modules
    detail = httpx.get(f"{srv.url}/controlnet/module_list").json()["module_detail"]
    assert [s["name"] for s in detail["canny"]["sliders"]] == ["resolution", "low", "high"]


@pytest.mark.parametrize(("change", "field", "status"), [
    ({"weight": 2.5}, "weight", 422),
    ({"weight": "heavy"}, "weight", 422),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start", 422),
    ({"control_mode": 7}, "control_mode", 422),
    ({"resize_mode": "Stretch"}, "resize_mode", 422),
    ({"module": "nonexistent"}, "module", 422),
    ({"model": "missing_model"}, "model", 422),
    ({"model": "../../etc/passwd"}, "model", 400),
    ({"image": "not base64!"}, "image", 422),
    ({"image": ""}, "image", 422),  # txt2img needs an image
    ({"processor_res": 1.5}, "processor_res", 422),
])
def test_bad_unit_values_name_the_field(srv: Running, change: dict, field: str, status: int) -> None:
    unit = {"enabled": True, "image": b64_png(_picture()), "module": "none", "model": "cn_tiny", "weight": 1.0,
            "unknown_field_is_ignored": [1, 2], **change}
    body = {"prompt": "x", **FAST, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["field"] == f"alwayson_scripts.controlnet.args[0].{field}", r.json()
    assert f"alwayson_scripts.controlnet.args[0].{field}" in r.json()["detail"]


def test_other_scripts_are_reported_ignored_and_old_keys_work(srv: Running) -> None:
    unit = {"input_image": b64_png(_picture()), "model": "cn_tiny", "guidance": 0.5, "lowvram": True}
    body = {"prompt": "x", **FAST, "alwayson_scripts": {"ControlNet": {"args": [unit]},
                                                         "Dynamic Prompts": {"args": [True]}}}
    r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    import json

    info = json.loads(r.json()["info"])
    assert "Guidance End: 0.5" in info["infotexts"][0]
    assert info["warnings"] == ["alwayson_scripts: 'Dynamic Prompts' is not available in Sumie and was ignored"]


def test_webuiapi_detects_the_extension_so_a_request_without_units_has_none(api: webuiapi.WebUIApi) -> None:
    """webuiapi keeps units in its shared default ``alwayson_scripts`` dict; it clears them (``{"args": []}``) only
    when ``/scripts`` shows the ControlNet extension, as A1111 with the extension does."""
    assert api.has_controlnet
