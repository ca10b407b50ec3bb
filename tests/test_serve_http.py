"""``sumie serve`` over real HTTP with httpx: response shapes against A1111 1.10's models, 422s naming the field,
auth, traversal names, queue limits, extras. The embedded sumie-tiny at 32 px and a few steps."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import webuiapi
from lora_testfiles import write_kohya
from PIL import Image
from safetensors.torch import save_file
from serve_helpers import Running, b64_png, from_b64, running_server

from sumie.checkpoints.embedded import embedded_path
from sumie.checkpoints.loader import load_models
from sumie.serve import Limits, ServeConfig
from sumie.serve.models import Img2ImgRequest, Txt2ImgRequest

FAST = {"width": 32, "height": 32, "steps": 3, "sampler_name": "Euler"}
INFO_KEYS = {"prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
             "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps",
             "batch_size", "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash",
             "sd_vae_name", "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
             "extra_generation_params", "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip",
             "is_using_inpainting_conditioning", "version"}
LIMITS = Limits(max_pixels=128 * 128, max_steps=500, max_images=8, max_b64_bytes=400_000,
                max_image_pixels=256 * 256, max_body_bytes=2_000_000)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("serve-http")
    ckpt, loras = root / "ckpt", root / "loras"
    ckpt.mkdir()
    loras.mkdir()
    shutil.copyfile(embedded_path(), ckpt / "my-model.safetensors")
    (ckpt / "escape.safetensors").symlink_to(embedded_path())  # points outside the folder: never listed
    write_kohya(loras / "detail.safetensors", load_models(embedded_path()),
                metadata={"ss_output_name": "fine-detail", "ss_network_dim": "4"})
    (loras / "broken.safetensors").write_bytes(b"\0" * 8)
    emb1, emb2 = root / "emb1", root / "emb2"
    emb1.mkdir()
    emb2.mkdir()
    save_file({"emb_params": torch.randn(2, 64)}, str(emb1 / "shiny-style.safetensors"))
    save_file({"emb_params": torch.randn(1, 768)}, str(emb2 / "sd15-only.safetensors"))  # another model's width
    with running_server(ServeConfig(ckpt_dirs=(ckpt,), lora_dirs=(loras,), embeddings_dirs=(emb1, emb2),
                                    output_dir=root / "out", limits=LIMITS)) as running:
        yield running


@pytest.fixture(scope="module")
def http(srv: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{srv.url}/sdapi/v1", timeout=120) as client:
        yield client


def _png(size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 40, 40)) -> str:
    return b64_png(Image.new("RGB", size, color))


def _huge_header_png(width: int, height: int) -> str:
    """A tiny PNG whose header claims width x height (no pixel data to match): a decompression bomb's shape."""
    raw = bytearray(base64.b64decode(_png((8, 8))))
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return base64.b64encode(bytes(raw)).decode()


def test_every_endpoint_answers_json_in_a1111_shapes(srv: Running, http: httpx.Client) -> None:
    shapes = {"sd-models": {"title", "model_name", "hash", "sha256", "filename", "config"},
              "samplers": {"name", "aliases", "options"},
              "schedulers": {"name", "label", "aliases", "default_rho", "need_inner_model"},
              "upscalers": {"name", "model_name", "model_path", "model_url", "scale"},
              "loras": {"name", "alias", "path", "metadata"}}
    for path, keys in shapes.items():
        r = http.get(f"/{path}")
        assert r.status_code == 200 and r.json() and all(set(e) == keys for e in r.json()), path
    assert [m["model_name"] for m in http.get("/sd-models").json()] == ["my-model"]  # no symlink escape
    assert [(x["name"], x["alias"], x["metadata"].get("ss_network_dim")) for x in http.get("/loras").json()] == [
        ("broken", "broken", None), ("detail", "fine-detail", "4")]
    for path in ("prompt-styles", "hypernetworks", "face-restorers", "realesrgan-models", "sd-vae", "script-info"):
        assert http.get(f"/{path}").json() == [], path
    assert http.get("/scripts").json() == {"txt2img": ["controlnet", "controlnet m2m"],
                                           "img2img": ["controlnet", "controlnet m2m"]}
    emb = http.get("/embeddings").json()
    assert {k: (v["shape"], v["vectors"]) for k, v in emb["loaded"].items()} == {"shiny-style": (64, 2)}
    assert list(emb["skipped"]) == ["sd15-only"]
    mem = http.get("/memory").json()
    assert set(mem) == {"ram", "cuda"} and mem["ram"]["total"] >= mem["ram"]["free"] > 0
    assert http.get("/cmd-flags").json()["api"] is True
    opts = http.get("/options").json()
    assert {"sd_model_checkpoint", "sd_checkpoint_hash", "CLIP_stop_at_last_layers", "send_seed", "samples_format",
            "enable_pnginfo", "eta_ancestral", "eta_ddim", "randn_source", "sd_vae", "img2img_fix_steps"} <= set(opts)
    prog = http.get("/progress").json()
    assert set(prog) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert set(prog["state"]) == {"skipped", "interrupted", "stopping_generation", "job", "job_count",
                                  "job_timestamp", "job_no", "sampling_step", "sampling_steps"}
    for path in ("refresh-checkpoints", "refresh-loras", "skip"):
        r = http.post(f"/{path}")
        assert r.status_code == 200 and r.json() is None, path
    assert http.post("/interrupt").json() == {}
    schema = httpx.get(f"{srv.url}/openapi.json").json()
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/options"} <= set(schema["paths"])
    assert "swagger" in httpx.get(f"{srv.url}/docs").text.lower()


def test_txt2img_response_matches_a1111_models(http: httpx.Client) -> None:
    body = {**FAST, "prompt": "a cat", "seed": None, "cfg_scale": None, "batch_size": 2, "no_such_field": [1, 2],
            "alwayson_scripts": {"adetailer": {"args": []}}, "restore_faces": True}
    r = http.post("/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"images", "parameters", "info"} and isinstance(out["info"], str)
    assert set(Txt2ImgRequest.model_fields) <= set(out["parameters"])  # the request with every default
    assert out["parameters"]["cfg_scale"] is None and out["parameters"]["sampler_index"] == "Euler"
    info = json.loads(out["info"])
    assert INFO_KEYS <= set(info)
    assert info["cfg_scale"] == 7.0 and info["seed"] >= 0 and info["all_seeds"] == [info["seed"], info["seed"] + 1]
    assert any("adetailer" in w for w in info["warnings"]) and any("restore_faces" in w for w in info["warnings"])
    for b64, text in zip(out["images"], info["infotexts"], strict=True):
        assert not b64.startswith("data:") and from_b64(b64).info["parameters"] == text


def test_send_images_false_and_force_task_id(http: httpx.Client) -> None:
    r = http.post("/txt2img", json={**FAST, "send_images": False, "force_task_id": "task-one"})
    assert r.status_code == 200 and r.json()["images"] == []
    again = http.post("/txt2img", json={**FAST, "force_task_id": "task-one"})
    assert again.status_code == 409 and again.json()["field"] == "force_task_id"


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"sampler_name": "Nope"}, "sampler_name", "Euler a"),
    ({"sampler_name": None, "sampler_index": "Nope"}, "sampler_index", "DPM++ 2M"),
    ({"scheduler": "bogus"}, "scheduler", "Karras"),
    ({"steps": 501}, "steps", "limit of 500"),
    ({"batch_size": 3, "n_iter": 3}, "batch_size", "limit of 8"),
    ({"width": 256, "height": 256}, "width", "limit of 16384"),
    ({"enable_hr": True, "hr_scale": 8}, "hr_scale", "limit"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler", "Lanczos"),
    ({"subseed_strength": 2}, "subseed_strength", "[0, 1]"),
    ({"seed": -5}, "seed", "-1 (random)"),
    ({"script_name": "x/y/z plot"}, "script_name", "no scripts"),
    ({"override_settings": {"CLIP_stop_at_last_layers": "two"}}, "CLIP_stop_at_last_layers", "int"),
])
def test_txt2img_422_names_the_field(http: httpx.Client, body: dict, field: str, words: str) -> None:
    r = http.post("/txt2img", json={**FAST, **body})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and words in r.json()["detail"]


def test_pydantic_type_errors_and_engine_errors_are_422(http: httpx.Client) -> None:
    r = http.post("/txt2img", json={**FAST, "steps": "many"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"]
    r = http.post("/txt2img", json={**FAST, "width": 30})  # not a multiple of the VAE factor: found by the engine
    assert r.status_code == 422 and "width 30" in r.json()["detail"]
    r = http.post("/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"]


@pytest.mark.parametrize(("body", "status", "field", "words"), [
    ({}, 404, "init_images", "no init images"),
    ({"init_images": ["not base64 at all!!"]}, 422, "init_images[0]", "not valid base64"),
    ({"init_images": [base64.b64encode(b"hello, not an image").decode()]}, 422, "init_images[0]", "not an image"),
    ({"init_images": [_png((300, 300))]}, 422, "init_images[0]", "300x300"),
    ({"init_images": [_huge_header_png(12000, 12000)]}, 422, "init_images[0]", "12000x12000"),
    ({"init_images": ["A" * 400_004]}, 422, "init_images[0]", "limit of 400000"),
    ({"init_images": [_png()], "mask": "%%%"}, 422, "mask", "base64"),
    ({"init_images": [_png()], "resize_mode": 7}, 422, "resize_mode", "just resize"),
    ({"init_images": [_png()], "mask": _png(), "inpainting_fill": 9}, 422, "inpainting_fill", "latent noise"),
    ({"init_images": [_png()], "mask": _png(), "mask_blur": 5000}, 422, "mask_blur", "[0, 64]"),
    ({"init_images": [_png()], "mask": _png(), "inpaint_full_res_padding": -1}, 422, "inpaint_full_res_padding",
     "[0, 256]"),
])
def test_img2img_bad_images_name_the_field(http: httpx.Client, body: dict, status: int, field: str,
                                           words: str) -> None:
    started = time.monotonic()
    r = http.post("/img2img", json={**FAST, **body})
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and words in r.json()["detail"]
    assert time.monotonic() - started < 10  # nothing decoded the bomb


def test_request_bodies_over_the_limit_are_413(srv: Running, http: httpx.Client) -> None:
    big = {**FAST, "prompt": "x" * 2_100_000}
    r = http.post("/txt2img", json=big)
    assert r.status_code == 413 and "limit of 2000000 bytes" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"y" * 100_000
        yield b'"}'

    r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"
    assert http.get("/progress").status_code == 200


def test_img2img_data_url_and_include_init_images(http: httpx.Client) -> None:
    r = http.post("/img2img", json={**FAST, "init_images": ["data:image/png;base64," + _png()],
                                    "include_init_images": True, "denoising_strength": 0.3})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["init_images"][0].startswith("data:image/png")
    info = json.loads(r.json()["info"])
    assert INFO_KEYS <= set(info) and info["denoising_strength"] == 0.3


def test_model_names_resolve_only_inside_the_folders(http: httpx.Client) -> None:
    r = http.post("/options", json={"sd_model_checkpoint": "my-modle"})
    assert r.status_code == 422 and "my-model.safetensors" in r.json()["detail"]  # close matches
    assert http.post("/options", json={"sd_model_checkpoint": "escape"}).status_code == 422
    for name in ("../../etc/passwd", "/etc/passwd", "..\\..\\secret.safetensors", "sub/../../x"):
        r = http.post("/options", json={"sd_model_checkpoint": name})
        assert r.status_code == 400 and r.json()["field"] == "sd_model_checkpoint", name
        r = http.post("/txt2img", json={**FAST, "override_settings": {"sd_model_checkpoint": name}})
        assert r.status_code == 400, name
        assert http.post("/txt2img", json={**FAST, "refiner_checkpoint": name}).status_code == 400
        assert http.post("/options", json={"sd_vae": name}).status_code == 400
    for tag in ("<lora:../../etc/passwd:1>", "<lora:/etc/hostname>", f"<lora:{embedded_path()}:0.5>"):
        r = http.post("/txt2img", json={**FAST, "prompt": f"a cat {tag}"})
        assert r.status_code == 400 and r.json()["field"] == "prompt", tag
        r = http.post("/txt2img", json={**FAST, "negative_prompt": tag})
        assert r.status_code == 400 and r.json()["field"] == "negative_prompt", tag
    r = http.post("/txt2img", json={**FAST, "seed": 3, "prompt": "a cat <lora:detail:0.9>"})  # in the folder: used
    assert r.status_code == 200 and "<lora:detail:0.9>" in json.loads(r.json()["info"])["infotexts"][0]
    plain = http.post("/txt2img", json={**FAST, "seed": 3, "prompt": "a cat"})
    assert from_b64(r.json()["images"][0]).tobytes() != from_b64(plain.json()["images"][0]).tobytes()
    assert http.post("/txt2img", json={**FAST, "prompt": "<lora:nope:1>"}).status_code == 422
    assert http.post("/options", json={"sd_model_checkpoint": "my-model"}).status_code == 200
    assert http.get("/options").json()["sd_model_checkpoint"].startswith("my-model.safetensors [")


def test_png_info_and_extras(http: httpx.Client) -> None:
    assert http.post("/png-info", json={"image": _png()}).json() == {"info": "", "items": {}, "parameters": {}}
    assert http.post("/png-info", json={"image": "@@"}).status_code == 422
    src = Image.new("RGB", (16, 16))
    src.putdata([(i * 7 % 256, i * 13 % 256, i % 256) for i in range(256)])
    for name, f in (("Lanczos", Image.Resampling.LANCZOS), ("Nearest", Image.Resampling.NEAREST)):
        r = http.post("/extra-single-image", json={"image": b64_png(src), "upscaler_1": name, "upscaling_resize": 2})
        assert r.status_code == 200 and set(r.json()) == {"html_info", "image"}
        assert from_b64(r.json()["image"]).tobytes() == src.resize((32, 32), f).tobytes()
    r = http.post("/extra-single-image", json={"image": b64_png(src), "upscaler_1": "Lanczos", "resize_mode": 1,
                                               "upscaling_resize_w": 40, "upscaling_resize_h": 20})
    assert from_b64(r.json()["image"]).size == (40, 20)
    bad = http.post("/extra-single-image", json={"image": b64_png(src), "upscaler_1": "4x-UltraSharp"})
    assert bad.status_code == 422 and bad.json()["field"] == "upscaler_1" and "Lanczos" in bad.json()["detail"]
    r = http.post("/extra-batch-images", json={"upscaler_1": "Nearest", "upscaling_resize": 2, "imageList": [
        {"data": b64_png(src), "name": "a.png"}, {"data": b64_png(src), "name": "b.png"}]})
    assert [from_b64(b).size for b in r.json()["images"]] == [(32, 32), (32, 32)]


def _wait_running(url: str, step: int = 1, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        prog = httpx.get(f"{url}/sdapi/v1/progress", params={"skip_current_image": "true"}).json()
        if prog["state"]["sampling_step"] >= step:
            return prog
        time.sleep(0.03)
    raise AssertionError("the job did not start")


def test_skip_ends_a_batch_and_interrupt_the_job(srv: Running, http: httpx.Client) -> None:
    out: dict[str, httpx.Response] = {}
    job = threading.Thread(target=lambda: out.setdefault("r", http.post("/txt2img", json={
        **FAST, "steps": 300, "n_iter": 2, "seed": 5})))
    job.start()
    assert _wait_running(srv.url)["state"]["job_no"] == 0
    http.post("/skip")
    deadline = time.monotonic() + 60
    while httpx.get(f"{srv.url}/sdapi/v1/progress").json()["state"]["job_no"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.03)
    prog = _wait_running(srv.url)
    assert prog["progress"] > 0.5  # A1111's formula: 0.01 + 1/2 + step/steps/2
    http.post("/interrupt")
    job.join(60)
    r = out["r"]
    assert r.status_code == 200 and len(r.json()["images"]) == 2 and json.loads(r.json()["info"])["interrupted"]


def test_queue_full_is_503_with_retry_after_and_http_is_not_blocked(tmp_path: Path) -> None:
    limits = Limits(max_queue=1)
    with running_server(ServeConfig(output_dir=tmp_path, limits=limits)) as s, \
            httpx.Client(base_url=f"{s.url}/sdapi/v1", timeout=120) as client:
        out: dict[str, httpx.Response] = {}
        job = threading.Thread(target=lambda: out.setdefault("r", client.post("/txt2img", json={
            **FAST, "steps": 400})))
        job.start()
        _wait_running(s.url)
        started = time.monotonic()
        full = client.post("/txt2img", json=FAST)
        assert full.status_code == 503 and full.headers["retry-after"] == "5" and "queue is full" in full.text
        assert client.get("/sd-models").status_code == 200 and time.monotonic() - started < 5  # not blocked
        client.post("/interrupt")
        job.join(60)
        assert out["r"].status_code == 200
        assert client.post("/txt2img", json=FAST).status_code == 200  # room again


def test_503_until_the_model_is_loaded(tmp_path: Path) -> None:
    with running_server(ServeConfig(output_dir=tmp_path, preload=False)) as s:
        queue = s.server.queue
        release = threading.Event()
        queue.workers[0].submit(lambda manager, control: release.wait(60))  # the device is busy: the load waits
        queue.ready.clear()
        queue.preload(embedded_path(), None)
        r = httpx.post(f"{s.url}/sdapi/v1/txt2img", json=FAST)
        assert r.status_code == 503 and r.headers["retry-after"] == "5" and "loading" in r.json()["detail"]
        assert httpx.get(f"{s.url}/sdapi/v1/progress").status_code == 200
        release.set()
        assert queue.ready.wait(60)
        assert httpx.post(f"{s.url}/sdapi/v1/txt2img", json=FAST, timeout=120).status_code == 200


def test_api_auth(tmp_path: Path) -> None:
    with running_server(ServeConfig(output_dir=tmp_path, auth={"alice": "s3cret", "bob": "pw"}, preload=False)) as s:
        url = f"{s.url}/sdapi/v1/options"
        for auth in (None, ("alice", "wrong"), ("mallory", "s3cret")):
            r = httpx.get(url, auth=auth)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic" and r.json()["detail"]
        assert httpx.get(url, auth=("alice", "s3cret")).status_code == 200
        assert httpx.get(url, auth=("bob", "pw")).status_code == 200
        api = webuiapi.WebUIApi(host=s.host, port=s.port, username="bob", password="pw")
        assert api.get_options()["samples_format"] == "png"


def test_txt2img_and_img2img_models_take_every_a1111_field() -> None:
    txt = {"prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
           "seed_resize_from_w", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter", "steps",
           "cfg_scale", "width", "height", "restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid", "eta",
           "denoising_strength", "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise", "override_settings",
           "override_settings_restore_afterwards", "refiner_checkpoint", "refiner_switch_at",
           "disable_extra_networks", "firstpass_image", "comments", "enable_hr", "firstphase_width",
           "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
           "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
           "force_task_id", "script_name", "script_args", "send_images", "save_images", "alwayson_scripts",
           "infotext"}
    img = (txt - {n for n in txt if n.startswith(("hr_", "firstphase_"))} - {"enable_hr"}) | {
        "init_images", "resize_mode", "image_cfg_scale", "mask", "mask_blur_x", "mask_blur_y", "mask_blur",
        "mask_round", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
        "initial_noise_multiplier", "latent_mask", "include_init_images"}
    assert set(Txt2ImgRequest.model_fields) == txt
    assert set(Img2ImgRequest.model_fields) == img
    nulls = Txt2ImgRequest.model_validate(dict.fromkeys(txt))  # every field nullable
    assert nulls.steps is None and Img2ImgRequest.model_validate(dict.fromkeys(img)).mask is None
    d = Txt2ImgRequest()
    assert (d.steps, d.cfg_scale, d.width, d.sampler_index, d.seed, d.hr_scale, d.denoising_strength) == (
        50, 7.0, 512, "Euler", -1, 2.0, 0.75)
    i = Img2ImgRequest()
    assert (i.mask_blur_x, i.inpaint_full_res, i.inpaint_full_res_padding, i.resize_mode) == (4, True, 0, 0)


def test_infotext_field_fills_unset_fields(http: httpx.Client) -> None:
    text = "a lighthouse\nNegative prompt: fog\nSteps: 2, Sampler: Euler a, CFG scale: 4, Seed: 77, Size: 32x32"
    r = http.post("/txt2img", json={"infotext": text, "width": 32, "height": 32})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["prompt"], info["negative_prompt"], info["steps"], info["seed"], info["sampler_name"]) == (
        "a lighthouse", "fog", 2, 77, "Euler a")


@pytest.mark.parametrize("layout", ["a1111", "comfyui"])
def test_models_dir_layouts(tmp_path: Path, layout: str) -> None:
    kinds = {"a1111": ("Stable-diffusion", "Lora", "VAE"), "comfyui": ("checkpoints", "loras", "vae")}[layout]
    models = tmp_path / "webui" / "models"
    for k in kinds:
        (models / k).mkdir(parents=True)
    (models / kinds[0] / "sub").mkdir()
    shutil.copyfile(embedded_path(), models / kinds[0] / "sub" / "model.safetensors")
    (models / kinds[1] / "style.safetensors").write_bytes(b"\0" * 8)
    (models / kinds[2] / "kl.safetensors").write_bytes(b"\0" * 8)
    config = ServeConfig(models_dir=tmp_path / "webui", output_dir=tmp_path / "out")
    with running_server(config) as s, httpx.Client(base_url=f"{s.url}/sdapi/v1", timeout=120) as c:
        listed = c.get("/sd-models").json()
        assert [(m["title"].split(" [")[0], m["model_name"]) for m in listed] == [("sub/model.safetensors",
                                                                                  "sub_model")]
        assert [x["name"] for x in c.get("/loras").json()] == ["style"]
        assert [x["model_name"] for x in c.get("/sd-vae").json()] == ["kl.safetensors"]
        r = c.post("/txt2img", json={**FAST, "override_settings": {"sd_model_checkpoint": "sub_model"}})
        assert r.status_code == 200 and json.loads(r.json()["info"])["sd_model_name"] == "model"
        assert c.post("/options", json={"sd_vae": "nope"}).status_code == 422


def test_a_checkpoint_that_fails_to_load_answers_its_error_and_another_can_be_chosen(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "a-broken.safetensors").write_bytes(b"this is not a safetensors file at all")
    shutil.copyfile(embedded_path(), ckpt / "b-good.safetensors")
    with running_server(ServeConfig(ckpt_dirs=(ckpt,), output_dir=tmp_path / "out"), load_ok=False) as s, \
            httpx.Client(base_url=f"{s.url}/sdapi/v1", timeout=120) as c:
        assert "a-broken.safetensors" in (s.server.queue.load_error or "")
        r = c.post("/txt2img", json=FAST)
        assert r.status_code == 500 and "a-broken.safetensors" in r.json()["detail"]  # not a hang, not a 503
        assert c.post("/options", json={"sd_model_checkpoint": "b-good"}).status_code == 200
        assert c.post("/txt2img", json=FAST).status_code == 200
