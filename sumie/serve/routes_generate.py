"""``/sdapi/v1`` generation routes: txt2img, img2img, progress, interrupt, skip."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from sumie.serve.jobs import client_of
from sumie.serve.models import GenerationResponse, Img2ImgRequest, ProgressResponse, Txt2ImgRequest
from sumie.serve.server import Server

__all__ = ["router"]

router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.sumie


@router.post("/txt2img", response_model=GenerationResponse)
async def txt2img(body: Txt2ImgRequest, request: Request) -> GenerationResponse:
    """Text to image (A1111's StableDiffusionTxt2ImgProcessingAPI)."""
    return await _server(request).generate("txt2img", body, client_of(request))


@router.post("/img2img", response_model=GenerationResponse)
async def img2img(body: Img2ImgRequest, request: Request) -> GenerationResponse:
    """Image to image and inpainting (A1111's StableDiffusionImg2ImgProcessingAPI)."""
    return await _server(request).generate("img2img", body, client_of(request))


@router.get("/progress", response_model=ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    """The running job's progress, eta and live preview (idle: progress 0, job_count 0)."""
    return await run_in_threadpool(_server(request).progress, skip_current_image)


@router.post("/interrupt")
async def interrupt(request: Request) -> dict[str, Any]:
    """Stop the running job at its next step; it answers 200 with the images made so far."""
    _server(request).queue.interrupt()
    return {}


@router.post("/skip")
async def skip(request: Request) -> None:
    """End the running job's current batch and go on with the next."""
    _server(request).queue.skip()
