"""ComfyUI's web frontend (``comfyui-frontend-package``) on Sumie: its static files at ``/`` and the requests it makes.

The frontend is served from the installed wheel's ``static/`` folder (``index.html`` at ``/``, assets beside it),
mounted after every API route so it shadows none. The routes here answer what the 1.58 frontend asks as it starts
and runs (served with and without ``/api``, as ComfyUI's): ``/users`` (single user), ``/settings`` (a JSON file
written atomically), ``/userdata`` (files confined to the user folder), ``/i18n``, ``/features``,
``/experiment/models``, ``/global_subgraphs``, ``/workflow_templates``, the jobs API (``/jobs``, ``/jobs/{id}``,
``/jobs/cancel``, built from the ComfyUI history and queue) and, outside ``/api``, ``/templates/index.json`` (Sumie's
workflow templates), ``/templates/index_logo.json``, ``/internal/folder_paths`` and ``/user.css``.

User folder: ``<output-dir>/../user/default`` (ComfyUI's ``user/default``, beside ``input`` and ``temp``); settings in
``comfy.settings.json`` there, as ComfyUI's ``app/app_settings.py``.
"""

from __future__ import annotations

import io
import json
import os
import threading
import uuid
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from PIL import Image, ImageDraw

from sumie.serve.comfy_routes import MODEL_FOLDERS, comfy_of, json_body
from sumie.serve.comfy_service import ComfyService
from sumie.serve.errors import error_body

__all__ = ["EXAMPLE_INPUTS", "TEMPLATES", "UserStore", "example_inputs", "frontend_static", "jobs_of", "router",
           "static_router", "write_example_inputs"]

router = APIRouter()  # mounted at / and /api
static_router = APIRouter()  # /templates and /user.css (the frontend asks them without /api)

TEMPLATE_DIR = Path(__file__).parent / "templates"
# Sumie's workflow templates: file stem -> (title, description)
TEMPLATES = {
    "sumie_sd_txt2img": ("SD txt2img on sumie-tiny", "Text to image: checkpoint, two prompts, KSampler, decode, save."),
    "sumie_sd_img2img": ("SD img2img on sumie-tiny", "Image to image: example.png from the input folder, encoded, "
                         "resampled at denoise 0.6."),
    "sumie_sd_inpaint": ("SD inpainting on sumie-tiny", "Inpaint the transparent part of example_inpaint.png (its "
                         "alpha is the mask; paint your own in the mask editor): encode, noise mask, resample."),
    "sumie_sd_lora": ("SD txt2img with a LoRA", "Checkpoint -> Load LoRA -> prompts and KSampler; pick your LoRA "
                      "in the Load LoRA node (the template's name is a placeholder)."),
    "sumie_sd_hires_fix": ("SD hires fix on sumie-tiny", "Two passes: sample, upscale the latent by 1.5, resample."),
    "sumie_sd_controlnet": ("SD ControlNet on sumie-tiny", "A control image (LoadImage) and a ControlNet guide the "
                            "KSampler through Apply ControlNet; pick your ControlNet file and image."),
}
DEFAULT_TEMPLATE = "sumie_sd_txt2img"
# the templates index's tags (default: Text to Image)
TEMPLATE_TAGS = {"sumie_sd_img2img": ["Image to Image"], "sumie_sd_inpaint": ["Inpainting"],
                 "sumie_sd_lora": ["Text to Image", "LoRA"]}
# the input images the img2img / inpainting templates load (written into an empty input folder at start)
EXAMPLE_INPUTS = ("example.png", "example_inpaint.png")
EXAMPLE_SIZE = 64
INPAINT_BOX = (20, 6, 44, 30)  # (x0, y0, x1, y1): the transparent square of example_inpaint.png (the mask)
# user files the frontend reads at start, answered with these when the user has none (ComfyUI answers 404)
DEFAULT_USER_FILES = {"user.css": (b"", "text/css"), "comfy.templates.json": (b"[]", "application/json")}
USER_FOLDERS = ("workflows", "subgraphs")  # folders the frontend lists at start
JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")


def frontend_static() -> Path | None:
    """The ``static/`` folder of the installed ``comfyui-frontend-package`` (None when it is not installed)."""
    try:
        root = resources.files("comfyui_frontend_package") / "static"
    except ModuleNotFoundError:
        return None
    path = Path(str(root))
    return path if (path / "index.html").is_file() else None


def _refuse(status: int, message: str, field: str) -> JSONResponse:
    return JSONResponse(error_body("ApiError", message, field), status_code=status)


class UserStore:
    """ComfyUI's ``user/default`` folder: settings (one JSON file, written atomically) and user data files."""

    SETTINGS = "comfy.settings.json"

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        self._lock = threading.Lock()

    def settings(self) -> dict[str, Any]:
        """Every stored setting (``{}`` before the first write or for an unreadable file)."""
        try:
            data = json.loads((self.root / self.SETTINGS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def update(self, values: dict[str, Any]) -> None:
        """Merge ``values`` into the settings file (temporary file + ``os.replace``)."""
        with self._lock:
            merged = {**self.settings(), **values}
            self.write(self.SETTINGS, json.dumps(merged, indent=4).encode("utf-8"))

    def path(self, relative: str) -> Path | None:
        """``root/relative`` when it stays inside the user folder (and is not the folder itself), else None."""
        if not relative or "\0" in relative or os.path.isabs(relative):
            return None
        full = Path(os.path.abspath(self.root / relative))
        if full == self.root or os.path.commonpath((str(full), str(self.root))) != str(self.root):
            return None
        return full

    def write(self, relative: str, data: bytes) -> Path:
        """Write a file under the user folder atomically; returns its path."""
        path = self.path(relative)
        if path is None:
            raise ValueError(f"{relative!r} is outside the user folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    def info(self, path: Path) -> dict[str, Any]:
        """ComfyUI's ``full_info`` entry: ``{path, size, modified}`` (path relative to the user folder)."""
        st = path.stat()
        return {"path": path.relative_to(self.root).as_posix(), "size": st.st_size, "modified": st.st_mtime}


def _store(request: Request) -> UserStore:
    state = request.app.state
    store = getattr(state, "sumie_user_store", None)
    if store is None:
        store = UserStore(state.sumie.comfy.folders.output.parent / "user" / "default")
        for folder in USER_FOLDERS:
            (store.root / folder).mkdir(parents=True, exist_ok=True)
        state.sumie_user_store = store
    return store


# ---------------------------------------------------------------- users and settings
@router.get("/users")
async def get_users() -> dict[str, Any]:
    """Single-user mode, as ComfyUI without ``--multi-user``: ``{storage: "server", migrated: true}``."""
    return {"storage": "server", "migrated": True}


@router.get("/settings")
async def get_settings(request: Request) -> dict[str, Any]:
    """Every stored setting."""
    return _store(request).settings()


@router.get("/settings/{setting_id}")
async def get_setting(request: Request, setting_id: str) -> Any:
    """One setting's value (``null`` when unset)."""
    return _store(request).settings().get(setting_id)


@router.post("/settings")
async def post_settings(request: Request) -> Response:
    """Merge a ``{id: value}`` object into the settings."""
    body = await json_body(request)
    if not isinstance(body, dict):
        return _refuse(400, "body: give a JSON object {setting_id: value}", "body")
    _store(request).update(body)
    return Response(status_code=200)


@router.post("/settings/{setting_id}")
async def post_setting(request: Request, setting_id: str) -> Response:
    """Set one setting to the JSON body."""
    raw = await request.body()
    try:
        value = json.loads(raw)
    except ValueError:
        return _refuse(400, "body: give the setting's value as JSON", "body")
    _store(request).update({setting_id: value})
    return Response(status_code=200)


# ---------------------------------------------------------------- user data
@router.get("/userdata")
async def list_userdata(request: Request, dir: str = "", recurse: bool = False,  # noqa: A002
                        full_info: bool = False, split: bool = False) -> Response:
    """ComfyUI's ``list_userdata``: files under ``dir`` (relative paths; ``full_info``: ``{path, size, modified}``;
    ``split``: ``[path, *parts]``); 400 without ``dir``, 403 outside the user folder, 404 for a missing folder."""
    if not dir:
        return _refuse(400, "dir: give the folder to list, e.g. dir=workflows", "dir")
    problem = _name_problem(dir)
    if problem is not None:
        return _refuse(400, f"dir: {problem}", "dir")
    store = _store(request)
    folder = store.path(dir)
    if folder is None:
        return _refuse(403, "dir: outside the user folder", "dir")
    if not folder.is_dir():
        return _refuse(404, f"dir: no folder {dir!r}", "dir")
    files = sorted(p for p in (folder.rglob("*") if recurse else folder.glob("*")) if p.is_file()
                   and not p.name.startswith("."))
    if full_info:
        out: list[Any] = [{**store.info(p), "path": p.relative_to(folder).as_posix()} for p in files]
    else:
        out = [p.relative_to(folder).as_posix() for p in files]
        if split:
            out = [[rel, *rel.split("/")] for rel in out]
    return JSONResponse(out)


NAME_MAX_BYTES = 255  # one file or folder name (Linux's NAME_MAX); a longer one fails every file call
PATH_MAX_BYTES = 1024  # a user path, relative to the user folder


def _name_problem(relative: str) -> str | None:
    """Why ``relative`` cannot name a user file (a name over 255 bytes, a path over 1024), else None."""
    try:
        encoded = os.fsencode(relative)
    except UnicodeEncodeError:
        return "not a valid file name (unencodable characters)"
    longest = max(len(part) for part in encoded.split(b"/"))
    if longest > NAME_MAX_BYTES:
        return f"a name of {longest} bytes; file and folder names are at most {NAME_MAX_BYTES} bytes"
    if len(encoded) > PATH_MAX_BYTES:
        return f"a path of {len(encoded)} bytes; user paths are at most {PATH_MAX_BYTES} bytes"
    return None


def _user_file(request: Request, file: str, field: str = "file") -> tuple[UserStore, Path] | JSONResponse:
    problem = _name_problem(file)
    if problem is not None:
        return _refuse(400, f"{field}: {problem}", field)
    store = _store(request)
    path = store.path(file)
    if path is None:
        return _refuse(403, f"{field}: outside the user folder", field)
    return store, path


@router.post("/userdata/{file:path}/move/{dest:path}")
async def move_userdata(request: Request, file: str, dest: str, overwrite: bool = True,
                        full_info: bool = False) -> Response:
    """Rename a user file (409 when ``dest`` exists and ``overwrite`` is false)."""
    found, target = _user_file(request, file), _user_file(request, dest, "dest")
    if isinstance(found, JSONResponse):
        return found
    if isinstance(target, JSONResponse):
        return target
    store, source = found
    if not source.is_file():
        return _refuse(404, f"file: no file {file!r}", "file")
    if target[1].exists() and not overwrite:
        return _refuse(409, f"dest: {dest!r} exists; pass overwrite=true", "dest")
    target[1].parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target[1])
    return JSONResponse(store.info(target[1]) if full_info else target[1].relative_to(store.root).as_posix())


@router.get("/userdata/{file:path}")
async def get_userdata(request: Request, file: str) -> Response:
    """A user file (403 outside the user folder, 404 when missing; an empty ``user.css`` / ``comfy.templates.json``)."""
    found = _user_file(request, file)
    if isinstance(found, JSONResponse):
        return found
    if not found[1].is_file() and file in DEFAULT_USER_FILES:
        data, media_type = DEFAULT_USER_FILES[file]
        return Response(data, media_type=media_type)
    if not found[1].is_file():
        return _refuse(404, f"file: no file {file!r}", "file")
    return FileResponse(found[1])


@router.post("/userdata/{file:path}")
async def post_userdata(request: Request, file: str, overwrite: bool = True, full_info: bool = False) -> Response:
    """Write the body to a user file, atomically (409 when it exists and ``overwrite`` is false)."""
    found = _user_file(request, file)
    if isinstance(found, JSONResponse):
        return found
    store, path = found
    if path.exists() and not overwrite:
        return _refuse(409, f"file: {file!r} exists; pass overwrite=true", "file")
    if path.is_dir():
        return _refuse(400, f"file: {file!r} is a folder", "file")
    store.write(path.relative_to(store.root).as_posix(), await request.body())
    return JSONResponse(store.info(path) if full_info else path.relative_to(store.root).as_posix())


@router.delete("/userdata/{file:path}")
async def delete_userdata(request: Request, file: str) -> Response:
    """Delete a user file (204; 404 when missing)."""
    found = _user_file(request, file)
    if isinstance(found, JSONResponse):
        return found
    if not found[1].is_file():
        return _refuse(404, f"file: no file {file!r}", "file")
    found[1].unlink()
    return Response(status_code=204)


# ---------------------------------------------------------------- small lists
@router.get("/i18n")
async def get_i18n() -> dict[str, Any]:
    """No node translations (the frontend's own are built in)."""
    return {}


@router.get("/features")
async def get_features(request: Request) -> dict[str, Any]:
    """The server's feature flags (as sent on the WebSocket)."""
    return comfy_of(request).feature_flags()


@router.get("/experiment/models")
async def get_experiment_models() -> list[dict[str, Any]]:
    """ComfyUI's ``model_manager``: ``[{name, folders}]`` of the model folder names."""
    return [{"name": name, "folders": []} for name in MODEL_FOLDERS]


@router.get("/global_subgraphs")
async def get_global_subgraphs() -> dict[str, Any]:
    """No blueprint subgraphs."""
    return {}


@router.get("/workflow_templates")
async def get_workflow_templates() -> dict[str, Any]:
    """Custom nodes' templates: none (Sumie's are the core templates, ``/templates/index.json``)."""
    return {}


# ---------------------------------------------------------------- jobs (ComfyUI's newer jobs API)
def _message(entry: dict[str, Any], *events: str) -> dict[str, Any] | None:
    for event, data in entry.get("status", {}).get("messages", []):
        if event in events:
            return data
    return None


def _history_job(prompt_id: str, entry: dict[str, Any], detail: bool) -> dict[str, Any]:
    """A finished prompt as a job: status, times (ms), its first image as the preview, counts, error."""
    number, _pid, _prompt, extra, _outputs = entry["prompt"]
    start = _message(entry, "execution_start")
    end = _message(entry, "execution_success", "execution_error", "execution_interrupted")
    error = _message(entry, "execution_error")
    if _message(entry, "execution_interrupted") is not None:
        status = "cancelled"
    else:
        status = "completed" if entry.get("status", {}).get("completed") else "failed"
    items = [(node, kind, item) for node, out in entry.get("outputs", {}).items() for kind, values in out.items()
             if isinstance(values, list) for item in values]
    images = [(node, kind, item) for node, kind, item in items if kind == "images" and isinstance(item, dict)]
    preview = None
    if images:
        node, kind, item = images[0]
        preview = {**{k: item[k] for k in ("filename", "subfolder", "type") if k in item}, "nodeId": node,
                   "mediaType": kind}
    job = _job(prompt_id, status, number, extra)
    job.update({"execution_start_time": start.get("timestamp") if start else None,
                "execution_end_time": end.get("timestamp") if end else None, "preview_output": preview,
                "outputs_count": len(items), "previewable_outputs_count": len(images),
                "execution_error": dict(error) if error else None})
    if detail:
        job.update({"outputs": entry.get("outputs", {}), "execution_status": entry.get("status"),
                    "execution_meta": entry.get("meta", {}), "update_time": job["execution_end_time"]})
    return job


def _job(prompt_id: str, status: str, number: Any, extra: dict[str, Any]) -> dict[str, Any]:
    workflow = extra.get("extra_pnginfo", {}).get("workflow") if isinstance(extra.get("extra_pnginfo"), dict) else None
    return {"id": prompt_id, "status": status, "create_time": int(extra.get("create_time") or 0), "priority": number,
            "workflow_id": workflow.get("id") if isinstance(workflow, dict) else None, "outputs_count": None,
            "previewable_outputs_count": None, "_workflow": workflow}


def jobs_of(comfy: ComfyService, detail: bool = False) -> list[dict[str, Any]]:
    """Every ComfyUI prompt as a job (queued: pending, running: in_progress, then the history), newest first."""
    queue = comfy.queue_lists()
    jobs: list[dict[str, Any]] = []
    for status, items in (("in_progress", queue["queue_running"]), ("pending", queue["queue_pending"])):
        for number, prompt_id, _prompt, extra, _outputs in items:
            if "sumie_job" not in extra:  # A1111 jobs are not ComfyUI jobs
                jobs.append(_job(prompt_id, status, number, extra))
    seen = {j["id"] for j in jobs}
    jobs += [_history_job(k, v, detail) for k, v in comfy.history_items().items() if k not in seen]
    jobs.sort(key=lambda j: j["create_time"], reverse=True)
    for j in jobs:
        workflow = j.pop("_workflow")
        if detail:
            j["workflow"] = workflow
    return jobs


@router.get("/jobs")
async def get_jobs(request: Request, status: str = "", limit: int | None = None, offset: int = 0) -> Response:
    """``{jobs, pagination: {offset, limit, total, has_more}}`` of the given statuses (comma list; all if none)."""
    wanted = [s for s in status.split(",") if s] or list(JOB_STATUSES)
    bad = [s for s in wanted if s not in JOB_STATUSES]
    if bad or offset < 0 or (limit is not None and limit < 0):
        return _refuse(400, f"status: one of {', '.join(JOB_STATUSES)}; limit and offset >= 0", "status")
    jobs = [j for j in jobs_of(comfy_of(request)) if j["status"] in wanted]
    page = jobs[offset:] if limit is None else jobs[offset: offset + limit]
    return JSONResponse({"jobs": page, "pagination": {"offset": offset, "limit": limit if limit is not None
                                                       else len(page), "total": len(jobs),
                                                       "has_more": offset + len(page) < len(jobs)}})


def _cancel(comfy: ComfyService, ids: list[str]) -> None:
    """Queued jobs leave the queue; a running one is interrupted."""
    comfy.delete(ids)
    for jid in ids:
        comfy.interrupt(jid)


@router.post("/jobs/cancel")
async def cancel_jobs(request: Request) -> Response:
    """``{job_ids: [...]}``."""
    body = await json_body(request)
    ids = body.get("job_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list):
        return _refuse(400, "job_ids: give a list of job ids", "job_ids")
    _cancel(comfy_of(request), [str(i) for i in ids])
    return Response(status_code=200)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> Response:
    """Cancel one job."""
    _cancel(comfy_of(request), [job_id])
    return Response(status_code=200)


@router.get("/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> Response:
    """One job with its workflow, outputs, status and meta (404 when unknown)."""
    for job in jobs_of(comfy_of(request), detail=True):
        if job["id"] == job_id:
            return JSONResponse(job)
    return _refuse(404, f"job_id: no job {job_id!r}", "job_id")


# ---------------------------------------------------------------- templates and user.css (no /api prefix)
def templates_index() -> list[dict[str, Any]]:
    """The frontend's core templates index: one "Sumie" category with Sumie's workflow templates."""
    return [{"moduleName": "default", "category": "Sumie", "title": "Sumie (Stable Diffusion)", "type": "image",
             "templates": [{"name": name, "title": title, "description": description, "mediaType": "image",
                            "mediaSubtype": "webp", "models": ["sumie-tiny"],
                            "tags": TEMPLATE_TAGS.get(name, ["Text to Image"])}
                           for name, (title, description) in TEMPLATES.items()]}]


@static_router.get("/templates/index.json")
async def get_templates_index() -> list[dict[str, Any]]:
    """Sumie's workflow templates."""
    return templates_index()


@static_router.get("/templates/index_logo.json")
async def get_templates_logos() -> dict[str, Any]:
    """No provider logos."""
    return {}


@static_router.get("/internal/folder_paths")
async def get_folder_paths(request: Request) -> dict[str, list[str]]:
    """ComfyUI's ``/internal/folder_paths`` (asked by the frontend's missing-model check): each model folder name ->
    its folders on disk."""
    folders = comfy_of(request).env.manager.folders
    return {name: [str(p) for p in folders.dirs(kind)] if folders is not None else []
            for name, kind in MODEL_FOLDERS.items()}


_THUMBNAIL: list[bytes] = []


@static_router.get("/templates/{name}")
async def get_template(name: str) -> Response:
    """A template's workflow JSON (``{name}.json``) or its thumbnail (``{name}-1.webp``, a plain tile)."""
    stem, ext = os.path.splitext(name)
    if ext == ".json" and stem in TEMPLATES:
        return FileResponse(TEMPLATE_DIR / name, media_type="application/json")
    if ext == ".webp" and stem.rpartition("-")[0] in TEMPLATES:
        if not _THUMBNAIL:
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (40, 44, 52)).save(buf, format="WEBP")
            _THUMBNAIL.append(buf.getvalue())
        return Response(_THUMBNAIL[0], media_type="image/webp")
    return _refuse(404, f"name: no template {name!r}", "name")


def example_inputs() -> dict[str, Image.Image]:
    """The template input images: a synthetic 64x64 landscape (``example.png``, RGB) and the same with a transparent
    square in the sky (``example_inpaint.png``, RGBA: LoadImage's MASK is 1 there)."""
    n = EXAMPLE_SIZE
    img = Image.new("RGB", (n, n))
    draw = ImageDraw.Draw(img)
    for y in range(n // 2):  # sky: deep blue at the top to pale at the horizon
        t = y / (n // 2)
        draw.line([(0, y), (n, y)], fill=(int(40 + 170 * t), int(90 + 130 * t), int(200 + 40 * t)))
    draw.rectangle([0, n // 2, n, n], fill=(30, 80, 150))  # sea
    draw.ellipse([n // 2 - 8, n // 2 - 8, n // 2 + 8, n // 2 + 8], fill=(250, 200, 80))  # setting sun
    draw.polygon([(0, n), (0, 40), (18, 34), (34, 44), (34, n)], fill=(60, 110, 50))  # a headland
    draw.rectangle([10, 22, 14, 36], fill=(235, 235, 225))  # its lighthouse
    draw.rectangle([9, 19, 15, 22], fill=(200, 40, 40))
    inpaint = img.convert("RGBA")
    ImageDraw.Draw(inpaint).rectangle([INPAINT_BOX[0], INPAINT_BOX[1], INPAINT_BOX[2] - 1, INPAINT_BOX[3] - 1],
                                      fill=(128, 128, 128, 0))
    return {EXAMPLE_INPUTS[0]: img, EXAMPLE_INPUTS[1]: inpaint}


def write_example_inputs(folder: Path) -> list[Path]:
    """Write :func:`example_inputs` into ``folder`` when it holds no file (ComfyUI ships ``input/example.png``, the
    image its templates load); each file atomically. Returns the files written (none for a folder in use; a folder
    that cannot be written is warned about, not fatal: the server runs without the examples)."""
    written: list[Path] = []
    try:
        if folder.is_dir() and any(p.is_file() for p in folder.iterdir()):
            return written
        folder.mkdir(parents=True, exist_ok=True)
        for name, image in example_inputs().items():
            path = folder / name
            tmp = path.with_name(f".{name}.{uuid.uuid4().hex}.part")
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
            written.append(path)
    except OSError as e:
        warnings.warn(f"could not write the example input images into {folder}: {e}; the img2img and inpainting "
                      "templates need an image there (upload one in the Load Image node)", stacklevel=2)
    return written


def fresh_user(store: UserStore) -> bool:
    """No saved state yet: ``Comfy.TutorialCompleted`` unset (the frontend sets it on its first run) and no saved
    workflow in the user folder."""
    workflows = store.root / "workflows"
    saved = workflows.is_dir() and any(p.suffix == ".json" for p in workflows.rglob("*"))
    return not store.settings().get("Comfy.TutorialCompleted") and not saved


@static_router.get("/", include_in_schema=False)
async def get_index(request: Request) -> Response:
    """The frontend's ``index.html``; a fresh user (see :func:`fresh_user`) is sent to ``/?template=`` Sumie's SD
    txt2img template, which the frontend's template URL loader opens (its own default graph is another model's)."""
    static = frontend_static()
    if static is None:
        return _refuse(404, "the web UI needs the comfyui-frontend-package wheel; pip install "
                            "comfyui-frontend-package==1.58.1", "path")
    if not request.query_params and fresh_user(_store(request)):
        return RedirectResponse(f"/?template={DEFAULT_TEMPLATE}", status_code=302)
    return FileResponse(static / "index.html", media_type="text/html")


@static_router.get("/user.css")
async def get_user_css(request: Request) -> Response:
    """The user's ``user.css`` (empty when there is none)."""
    return await get_userdata(request, "user.css")
