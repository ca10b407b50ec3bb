"""ComfyUI's HTTP routes (``server.py`` v0.3.64) on Sumie: prompts, queue, history, files, node and model lists.

Mounted twice by :func:`sumie.serve.app.create_app`, at ``/`` and under ``/api`` (as ComfyUI serves them), behind
the server's ``--api-auth``. Answers are ComfyUI's: ``POST /prompt`` -> ``{prompt_id, number, node_errors}`` or 400
``{error, node_errors}``; ``/queue``, ``/interrupt``, ``/free`` and ``POST /history`` answer an empty 200; ``/view``
answers 400 for a bad name or type, 403 for a subfolder leaving its folder, 404 for a missing file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from starlette.concurrency import run_in_threadpool

import sumie
from sumie.comfy import object_info
from sumie.comfy.env import FOLDER_TYPES
from sumie.comfy.nodes.loaders import checkpoint_names
from sumie.serve.comfy_service import ComfyService
from sumie.serve.errors import error_body
from sumie.serve.jobs import client_of

__all__ = ["COMFYUI_VERSION", "MODEL_FOLDERS", "router"]

COMFYUI_VERSION = "0.3.64"  # the ComfyUI server whose API these routes follow
# ComfyUI's model folder names -> Sumie's model kinds (GET /models, /models/{folder}, /embeddings)
MODEL_FOLDERS = {"checkpoints": "checkpoint", "loras": "lora", "vae": "vae", "embeddings": "embedding",
                 "controlnet": "controlnet", "upscale_models": "upscaler", "ipadapter": "ip_adapter",
                 "clip_vision": "clip_vision"}

router = APIRouter()


def comfy_of(request: Request) -> ComfyService:
    """The app's ComfyUI service."""
    return request.app.state.sumie.comfy


async def json_body(request: Request) -> Any:
    """The body as JSON; None when it is empty or not JSON (ComfyUI treats those as no options)."""
    raw = await request.body()
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _empty() -> Response:
    return Response(status_code=200)


# ---------------------------------------------------------------- prompts and the queue
@router.get("/prompt")
async def get_prompt(request: Request) -> dict[str, Any]:
    """``{exec_info: {queue_remaining}}``."""
    return comfy_of(request).hub.status()


@router.post("/prompt")
async def post_prompt(request: Request) -> JSONResponse:
    """Validate and queue an API-format prompt."""
    body = await json_body(request)
    status, answer = await run_in_threadpool(comfy_of(request).submit, body, client_of(request))
    return JSONResponse(answer, status_code=status)


@router.get("/queue")
async def get_queue(request: Request) -> dict[str, Any]:
    """``{queue_running, queue_pending}``."""
    return await run_in_threadpool(comfy_of(request).queue_lists)


@router.post("/queue")
async def post_queue(request: Request) -> Response:
    """``{"clear": true}`` and / or ``{"delete": [prompt_id, ...]}`` (queued prompts only)."""
    body = await json_body(request)
    comfy = comfy_of(request)
    if isinstance(body, dict):
        if body.get("clear"):
            comfy.clear()
        if isinstance(body.get("delete"), list):
            comfy.delete(body["delete"])
    return _empty()


@router.post("/interrupt")
async def post_interrupt(request: Request) -> Response:
    """Interrupt the running job, or only the prompt ``{"prompt_id": ...}`` when it is the one running."""
    body = await json_body(request)
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    comfy_of(request).interrupt(str(prompt_id) if prompt_id else None)
    return _empty()


@router.post("/free")
async def post_free(request: Request) -> Response:
    """``{"unload_models": bool, "free_memory": bool}``: done by each worker between jobs."""
    body = await json_body(request)
    if isinstance(body, dict):
        unload, free = bool(body.get("unload_models", False)), bool(body.get("free_memory", False))
        if unload or free:
            comfy_of(request).free(unload, free)
    return _empty()


# ---------------------------------------------------------------- history
@router.get("/history")
async def get_history(request: Request, max_items: int | None = None, offset: int = -1) -> dict[str, Any]:
    """Every finished prompt (``?max_items=N``: the newest N; ``offset``)."""
    return comfy_of(request).history_items(max_items, offset)


@router.get("/history/{prompt_id}")
async def get_history_of(request: Request, prompt_id: str) -> dict[str, Any]:
    """``{prompt_id: entry}`` or ``{}``."""
    return comfy_of(request).history_of(prompt_id)


@router.post("/history")
async def post_history(request: Request) -> Response:
    """``{"clear": true}`` and / or ``{"delete": [prompt_id, ...]}``."""
    body = await json_body(request)
    if isinstance(body, dict):
        delete = body.get("delete") if isinstance(body.get("delete"), list) else None
        comfy_of(request).delete_history(delete, bool(body.get("clear")))
    return _empty()


# ---------------------------------------------------------------- files
def _folder_of(comfy: ComfyService, filename: str, kind: str | None) -> tuple[str, Path] | None:
    """ComfyUI's ``annotated_filepath`` + ``get_directory_by_type``: (name, folder) or None for a bad type."""
    for k in FOLDER_TYPES:
        if filename.endswith(f" [{k}]"):
            return filename[: -len(k) - 3], comfy.folders.folder(k)
    kind = kind or "output"
    return (filename, comfy.folders.folder(kind)) if kind in FOLDER_TYPES else None


def _inside(base: Path, subfolder: str) -> Path | None:
    """``base/subfolder`` if it stays inside ``base`` (ComfyUI's commonpath check), else None."""
    full = Path(os.path.abspath(base / subfolder))
    return full if os.path.commonpath((str(full), str(base))) == str(base) else None


def _refuse(status: int, message: str, field: str) -> JSONResponse:
    """ComfyUI answers these with a bare status; Sumie adds the JSON error naming the field (clients read the
    status)."""
    return JSONResponse(error_body("ApiError", message, field), status_code=status)


@router.get("/view")
async def view(request: Request, filename: str = "", type: str = "output", subfolder: str = "",  # noqa: A002
               channel: str = "rgba", preview: str | None = None) -> Response:
    """A file of the output / input / temp folder; ``channel`` rgb or a; ``preview`` ``webp;90`` / ``jpeg;90``."""
    found = _folder_of(comfy_of(request), filename, type) if filename else None
    if found is None:
        return _refuse(400, "filename: give a file name, and type output, input or temp", "filename")
    name, base = found
    if not name or name.startswith("/") or ".." in name or "\0" in name or "\0" in subfolder:
        return _refuse(400, "filename: a plain file name, without '/' at the start, '..' or NUL", "filename")
    folder = _inside(base, subfolder) if subfolder else base
    if folder is None:
        return _refuse(403, "subfolder: outside the folder", "subfolder")
    path = folder / os.path.basename(name)
    if not path.is_file():
        return _refuse(404, f"filename: no file {os.path.basename(name)!r} there", "filename")
    if preview is None and channel == "rgba":
        return FileResponse(path, headers={"Content-Disposition": f'filename="{path.name}"'})
    return await run_in_threadpool(_converted, path, channel, preview)


def _converted(path: Path, channel: str, preview: str | None) -> Response:
    """``/view``'s ``channel`` / ``preview`` conversions (PNG for a channel, the asked format for a preview)."""
    import io

    with Image.open(path) as img:
        img.load()
    if channel == "a":
        rgba = img.convert("RGBA")
        out = Image.new("RGBA", rgba.size)
        out.putalpha(rgba.getchannel("A"))
        img, fmt, quality = out, "png", 90
    else:
        if channel == "rgb":
            img = img.convert("RGB")
        fmt, quality = "png", 90
        if preview:
            parts = preview.split(";")
            fmt = parts[0] if parts[0] in ("webp", "jpeg") else "webp"
            quality = int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 90
            if fmt == "jpeg":
                img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt.upper(), quality=quality)
    return Response(buf.getvalue(), media_type=f"image/{fmt}",
                    headers={"Content-Disposition": f'filename="{path.name}"'})


def _same_file(path: Path, data: bytes) -> bool:
    """ComfyUI's ``compare_image_hash``: the existing file has exactly these bytes."""
    return hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()


def _upload(comfy: ComfyService, form: Any, data: bytes, filename: str,
            save: Any = None) -> Response:
    """ComfyUI's ``image_upload``: ``type`` (input by default), ``subfolder``, ``overwrite``; a new name ``x (1).png``
    when a different file has the name, the same name when the same bytes are there already."""
    kind = str(form.get("type") or "input")
    kind = kind if kind in FOLDER_TYPES else "input"
    base = comfy.folders.folder(kind)
    subfolder = str(form.get("subfolder") or "")
    if not filename or "\0" in filename or "\0" in subfolder:
        return _refuse(400, "image: the upload needs a file name without NUL (and subfolder none)", "image")
    folder = Path(os.path.abspath(base / os.path.normpath(subfolder))) if subfolder else base
    path = Path(os.path.abspath(folder / filename))
    if os.path.commonpath((str(base), str(path))) != str(base) or path.parent != folder:
        return _refuse(400, "subfolder: the upload would land outside the folder", "subfolder")
    folder.mkdir(parents=True, exist_ok=True)
    duplicate = False
    if str(form.get("overwrite")) not in ("true", "1"):
        stem, suffix = os.path.splitext(filename)
        i = 1
        while path.exists():
            if _same_file(path, data):
                duplicate = True
                break
            filename = f"{stem} ({i}){suffix}"
            path = folder / filename
            i += 1
    if not duplicate:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        if save is not None:
            answer = save(tmp)
            if answer is not None:
                return answer
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    return JSONResponse({"name": filename, "subfolder": subfolder, "type": kind})


async def _upload_parts(request: Request) -> tuple[Any, bytes, str] | None:
    form = await request.form()
    image = form.get("image")
    if image is None or isinstance(image, str):
        return None
    return form, await image.read(), os.path.basename(str(image.filename or ""))


@router.post("/upload/image")
async def upload_image(request: Request) -> Response:
    """Multipart ``image`` (+ ``overwrite``, ``type``, ``subfolder``) -> ``{name, subfolder, type}``."""
    parts = await _upload_parts(request)
    if parts is None:
        return _refuse(400, "image: send the image as a multipart file field named 'image'", "image")
    return await run_in_threadpool(_upload, comfy_of(request), *parts)


@router.post("/upload/mask")
async def upload_mask(request: Request) -> Response:
    """Multipart ``image`` (the mask) + ``original_ref`` (JSON ``{filename, subfolder, type}``): the original with
    the mask's alpha, saved under the uploaded name (PNG text chunks kept), as ComfyUI's ``upload_mask``."""
    parts = await _upload_parts(request)
    if parts is None:
        return _refuse(400, "image: send the mask as a multipart file field named 'image'", "image")
    form, data, filename = parts
    comfy = comfy_of(request)
    try:
        ref = json.loads(str(form.get("original_ref") or ""))
    except ValueError:
        return _refuse(400, "original_ref: not JSON; give {filename, subfolder, type}", "original_ref")
    if not isinstance(ref, dict):
        return _refuse(400, "original_ref: give a JSON object {filename, subfolder, type}", "original_ref")
    found = _folder_of(comfy, str(ref.get("filename", "")), ref.get("type") or "output")
    if found is None or not found[0] or found[0].startswith("/") or ".." in found[0]:
        return _refuse(400, "original_ref: its filename must be a plain file name of the output, input or temp "
                            "folder", "original_ref")
    folder = _inside(found[1], str(ref.get("subfolder") or "")) if ref.get("subfolder") else found[1]
    if folder is None:
        return _refuse(403, "original_ref: its subfolder is outside the folder", "original_ref")
    original = folder / found[0]

    def save(tmp: Path) -> Response | None:
        if not original.is_file():
            return _refuse(404, "original_ref: no such original image", "original_ref")
        import io

        with Image.open(original) as im:
            info = PngInfo()
            for k, v in getattr(im, "text", {}).items():
                info.add_text(k, v)
            rgba = im.convert("RGBA")
        with Image.open(io.BytesIO(data)) as mask:
            rgba.putalpha(mask.convert("RGBA").getchannel("A"))
        rgba.save(tmp, format="PNG", compress_level=4, pnginfo=info)
        return None

    return await run_in_threadpool(_upload, comfy, form, data, filename, save)


# ---------------------------------------------------------------- nodes, models, system
@router.get("/object_info")
async def get_object_info(request: Request) -> dict[str, Any]:
    """Every node's inputs, outputs and categories."""
    return await run_in_threadpool(object_info, comfy_of(request).env)


@router.get("/object_info/{node_class}")
async def get_object_info_of(request: Request, node_class: str) -> dict[str, Any]:
    """One node (``{}`` for an unknown class)."""
    return await run_in_threadpool(object_info, comfy_of(request).env, node_class)


@router.get("/embeddings")
async def get_embeddings(request: Request) -> list[str]:
    """Embedding names without their suffix."""
    names = await run_in_threadpool(comfy_of(request).env.model_names, "embedding")
    return [os.path.splitext(n)[0] for n in names]


@router.get("/models")
async def get_models() -> list[str]:
    """The model folder names Sumie reads."""
    return list(MODEL_FOLDERS)


@router.get("/models/{folder}")
async def get_models_of(request: Request, folder: str) -> Response:
    """A model folder's files (404 for a folder name Sumie does not have)."""
    kind = MODEL_FOLDERS.get(folder)
    if kind is None:
        return _refuse(404, f"folder: no model folder {folder!r}; see GET /models", "folder")
    env = comfy_of(request).env
    names = await run_in_threadpool(checkpoint_names if kind == "checkpoint" else env.model_names,
                                    *((env,) if kind == "checkpoint" else (kind,)))
    return JSONResponse(names)


@router.get("/extensions")
async def get_extensions() -> list[str]:
    """No frontend extensions."""
    return []


def _memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0


@router.get("/system_stats")
async def system_stats(request: Request) -> dict[str, Any]:
    """ComfyUI's ``system`` and ``devices``, plus a ``sumie`` entry (version, devices, dtype, models loaded)."""
    server = request.app.state.sumie
    total, free = _memory()
    devices = []
    for name in server.config.devices:
        dev = torch.device(name)
        if dev.type == "cuda":
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            vfree, vtotal = torch.cuda.mem_get_info(index)
            devices.append({"name": f"cuda:{index} {torch.cuda.get_device_name(index)}", "type": "cuda",
                            "index": index, "vram_total": vtotal, "vram_free": vfree,
                            "torch_vram_total": torch.cuda.memory_reserved(index),
                            "torch_vram_free": torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)})
        else:
            devices.append({"name": dev.type, "type": dev.type, "index": dev.index, "vram_total": total,
                            "vram_free": free, "torch_vram_total": total, "torch_vram_free": free})
    return {
        "system": {"os": os.name, "ram_total": total, "ram_free": free, "comfyui_version": COMFYUI_VERSION,
                   "python_version": sys.version, "pytorch_version": torch.__version__,
                   "embedded_python": False, "argv": list(sys.argv)},
        "devices": devices,
        "sumie": {"version": sumie.__version__, "api": f"ComfyUI {COMFYUI_VERSION} server API on Sumie's engine",
                  "platform": platform.platform(), "dtype": server.config.dtype,
                  "preview_method": comfy_of(request).preview_method,
                  "models_loaded": [m.name for mgr in server.queue.managers for m in mgr.loaded()]},
    }

