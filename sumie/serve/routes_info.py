"""``/sdapi/v1`` settings, lists, png-info, extras, memory: A1111's shapes, empty lists where Sumie has nothing."""

from __future__ import annotations

import os
from typing import Any

import torch
from fastapi import APIRouter, Body, Request
from starlette.concurrency import run_in_threadpool

from sumie.checkpoints.io import file_metadata
from sumie.errors import CheckpointError
from sumie.pipelines.infotext import parse_infotext
from sumie.sampling import registry
from sumie.serve.decode import decode_image, encode_png
from sumie.serve.errors import ApiError
from sumie.serve.extras import UPSCALERS, postprocess
from sumie.serve.models import ExtraBatchRequest, ExtraSingleRequest, PngInfoRequest
from sumie.serve.server import Server

__all__ = ["router"]

router = APIRouter()
_RHO = {"karras": 7.0, "polyexponential": 1.0}
_INNER = {"normal", "sgm_uniform", "simple", "ddim_uniform", "beta_a1111", "align_your_steps_a1111"}


def _server(request: Request) -> Server:
    return request.app.state.sumie


# -------------------------------------------------------------------------------------------------------- options
@router.get("/options")
def get_options(request: Request) -> dict[str, Any]:
    """Every option (A1111 ``shared.opts``)."""
    return _server(request).current_options()


@router.post("/options")
async def set_options(request: Request, body: dict[str, Any] = Body(...)) -> None:  # noqa: B008 - FastAPI idiom
    """Set options; a new ``sd_model_checkpoint`` is loaded before the answer (unknown names: 422, close matches)."""
    server = _server(request)
    await server.set_options(body)


@router.get("/cmd-flags")
def cmd_flags(request: Request) -> dict[str, Any]:
    """The server's command-line settings (A1111's cmd_opts; credentials never shown)."""
    c = _server(request).config
    return {"api": True, "nowebui": True, "api_auth": None if not c.auth else "<set>",
            "models_dir": str(c.models_dir) if c.models_dir else None,
            "ckpt_dir": [str(d) for d in c.ckpt_dirs], "lora_dir": [str(d) for d in c.lora_dirs],
            "embeddings_dir": [str(d) for d in c.embeddings_dirs], "outdir": str(c.output_dir),
            "device": list(c.devices), "precision": c.dtype, "max_queue": c.limits.max_queue}


# -------------------------------------------------------------------------------------------------------- models
@router.get("/sd-models")
def sd_models(request: Request) -> list[dict[str, Any]]:
    """Checkpoints: title ``name [hash]`` (hash once known), model_name, hash, sha256, filename, config."""
    cat = _server(request).catalog
    out = []
    for f in cat.checkpoints():
        short = cat.short_hash(f)  # known after a load (the embedded model's at once)
        sha = cat.hashes.cached(f.path) if short else None
        out.append({"title": cat.title(f), "model_name": f.model_name, "hash": short, "sha256": sha,
                    "filename": str(f.path), "config": None})
    return out


@router.get("/sd-vae")
def sd_vae(request: Request) -> list[dict[str, Any]]:
    """Standalone VAEs of the configured folders."""
    return [{"model_name": f.name, "filename": str(f.path)} for f in _server(request).folders.list("vae")]


@router.get("/loras")
def loras(request: Request) -> list[dict[str, Any]]:
    """LoRAs of the configured folders (name, alias, path, metadata)."""
    out = []
    for f in _server(request).folders.list("lora"):
        try:
            meta: dict[str, Any] = file_metadata(f.path)
        except CheckpointError:
            meta = {}  # unreadable header: listed by name, loading it says what is wrong
        out.append({"name": f.stem, "alias": meta.get("ss_output_name") or f.stem, "path": str(f.path),
                    "metadata": meta})
    return out


@router.get("/embeddings")
def embeddings(request: Request) -> dict[str, Any]:
    """Textual-inversion embeddings the loaded model can use (loaded) and the others (skipped)."""
    lib = _server(request).queue.last_embeddings()
    loaded: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    if lib is not None:
        for name, e in lib.embeddings.items():
            loaded[name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                            "shape": e.width, "vectors": e.num_vectors}
        for name, reason in lib.skipped.items():
            skipped[name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                             "vectors": None, "reason": reason}
    return {"loaded": loaded, "skipped": skipped}


@router.post("/refresh-checkpoints")
def refresh_checkpoints() -> None:
    """Folders are read on every listing; nothing to refresh."""


@router.post("/refresh-loras")
def refresh_loras() -> None:
    """Folders are read on every listing; nothing to refresh."""


@router.post("/refresh-vae")
def refresh_vae() -> None:
    """Folders are read on every listing; nothing to refresh."""


@router.post("/refresh-embeddings")
def refresh_embeddings() -> None:
    """Embeddings are read when a model is loaded; nothing to refresh."""


# -------------------------------------------------------------------------------------------------------- samplers
@router.get("/samplers")
def samplers() -> list[dict[str, Any]]:
    """Samplers by A1111 label with aliases (A1111's and Sumie's / ComfyUI's names) and default schedule."""
    out = []
    for s in registry.SAMPLERS:
        names = list(dict.fromkeys((*s.a1111, s.name, *s.comfyui)))
        opts: dict[str, Any] = {"scheduler": s.default_schedule}
        if s.discard_a1111:
            opts["discard_next_to_last_sigma"] = True
        out.append({"name": names[0], "aliases": names[1:], "options": opts})
    return out


@router.get("/schedulers")
def schedulers() -> list[dict[str, Any]]:
    """Schedules: name, label, aliases, default_rho, need_inner_model (``automatic`` first)."""
    out: list[dict[str, Any]] = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
                                  "need_inner_model": False}]
    for canon, (a1111, comfy) in registry.SCHEDULE_ALIASES.items():
        # A1111 lists Uniform and Normal apart (Sumie runs both as "normal"); other extra labels are spellings
        labels = [label for label in a1111 if canon == "normal" or label == a1111[0]] or [canon]
        for label in labels:
            name = label.lower().replace(" ", "_") if a1111 else canon
            aliases = [n for n in dict.fromkeys((*a1111, canon, *comfy)) if n not in (name, label)]
            out.append({"name": name, "label": label, "aliases": aliases or None,
                        "default_rho": _RHO.get(canon, -1.0), "need_inner_model": canon in _INNER})
    return out


@router.get("/upscalers")
def upscalers() -> list[dict[str, Any]]:
    """The built-in upscalers (model upscalers come with the upscaler support)."""
    return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0 if n == "None"
             else None} for n in UPSCALERS]


@router.get("/latent-upscale-modes")
def latent_upscale_modes() -> list[dict[str, Any]]:
    """Hires-fix upscalers that work on the latent."""
    return [{"name": "Latent"}]


# The ControlNet extension's two script names, as A1111 lists them with it installed: its units work through
# ``alwayson_scripts``; "controlnet m2m" (a selectable script) is refused as a ``script_name`` like every script, and
# is listed because clients detect the extension by it (webuiapi then sends ``{"args": []}`` when a request has no
# units; without it, webuiapi's shared default ``alwayson_scripts`` dict carries the last units into later calls).
CONTROLNET_SCRIPTS = ["controlnet", "controlnet m2m"]


@router.get("/scripts")
def scripts() -> dict[str, list[str]]:
    """The ControlNet extension's names (see above); ``script_name`` is refused with 422."""
    return {"txt2img": list(CONTROLNET_SCRIPTS), "img2img": list(CONTROLNET_SCRIPTS)}


@router.get("/script-info")
def script_info() -> list[Any]:
    """No scripts."""
    return []


@router.get("/extensions")
def extensions() -> list[Any]:
    """No extensions."""
    return []


@router.get("/prompt-styles")
def prompt_styles() -> list[Any]:
    """No prompt styles."""
    return []


@router.get("/hypernetworks")
def hypernetworks() -> list[Any]:
    """No hypernetworks."""
    return []


@router.get("/face-restorers")
def face_restorers() -> list[Any]:
    """No face restorers."""
    return []


@router.get("/realesrgan-models")
def realesrgan_models() -> list[Any]:
    """No Real-ESRGAN models."""
    return []


# -------------------------------------------------------------------------------------------------------- images
@router.post("/png-info")
def png_info(body: PngInfoRequest, request: Request) -> dict[str, Any]:
    """The image's generation parameters: text, other chunks, and the text parsed as A1111 parses it."""
    if not body.image:
        raise ApiError(404, "image: no image given; send a base64 image", field="image")
    lim = _server(request).config.limits
    img = decode_image(body.image, "image", max_b64_bytes=lim.max_b64_bytes, max_pixels=lim.max_image_pixels)
    items = {k: v for k, v in img.info.items() if isinstance(v, str | int | float)}
    text = items.pop("parameters", None)
    if text is None and "exif" in img.info:
        from sumie.pipelines.output import decode_user_comment

        comment = img.getexif().get_ifd(0x8769).get(0x9286)
        text = decode_user_comment(comment) if comment else None
    if not text:
        return {"info": "", "items": items, "parameters": {}}
    return {"info": text, "items": items, "parameters": parse_infotext(str(text))}


@router.post("/extra-single-image")
async def extra_single_image(body: ExtraSingleRequest, request: Request) -> dict[str, Any]:
    """Upscale one image (None / Lanczos / Nearest)."""
    lim = _server(request).config.limits

    def run() -> dict[str, Any]:
        img = decode_image(body.image, "image", max_b64_bytes=lim.max_b64_bytes, max_pixels=lim.max_image_pixels)
        out, info = postprocess(img, body, lim.max_pixels)
        return {"html_info": info, "image": encode_png(out)}

    return await run_in_threadpool(run)


@router.post("/extra-batch-images")
async def extra_batch_images(body: ExtraBatchRequest, request: Request) -> dict[str, Any]:
    """Upscale a list of images."""
    lim = _server(request).config.limits
    if not body.imageList:
        raise ApiError(422, "imageList: no images given", field="imageList")

    def run() -> dict[str, Any]:
        outs, info = [], ""
        for i, item in enumerate(body.imageList or []):
            img = decode_image(item.data, f"imageList[{i}].data", max_b64_bytes=lim.max_b64_bytes,
                               max_pixels=lim.max_image_pixels)
            out, info = postprocess(img, body, lim.max_pixels)
            outs.append(encode_png(out))
        return {"html_info": info, "images": outs}

    return await run_in_threadpool(run)


# -------------------------------------------------------------------------------------------------------- memory
@router.get("/memory")
def memory(request: Request) -> dict[str, Any]:
    """RAM of the machine and CUDA memory of the first configured GPU (A1111's shape)."""
    ram: dict[str, Any]
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
        ram = {"free": free, "used": total - free, "total": total}
    except (ValueError, OSError, AttributeError) as e:
        ram = {"error": str(e)}
    cuda: dict[str, Any]
    devices = [d for d in _server(request).config.devices if d.startswith("cuda")]
    if devices and torch.cuda.is_available():
        dev = torch.device(devices[0])
        free, total = torch.cuda.mem_get_info(dev)
        stats = torch.cuda.memory_stats(dev)
        cuda = {"system": {"free": free, "used": total - free, "total": total},
                "active": {"current": stats.get("active_bytes.all.current", 0),
                           "peak": stats.get("active_bytes.all.peak", 0)},
                "allocated": {"current": stats.get("allocated_bytes.all.current", 0),
                              "peak": stats.get("allocated_bytes.all.peak", 0)},
                "reserved": {"current": stats.get("reserved_bytes.all.current", 0),
                             "peak": stats.get("reserved_bytes.all.peak", 0)},
                "inactive": {"current": stats.get("inactive_split_bytes.all.current", 0),
                             "peak": stats.get("inactive_split_bytes.all.peak", 0)},
                "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}
    else:
        cuda = {"error": "this server runs on no CUDA device"}
    return {"ram": ram, "cuda": cuda}
