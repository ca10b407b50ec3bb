"""``create_app(config) -> FastAPI``: A1111 1.10's ``/sdapi/v1`` API on Sumie's engine (see :mod:`sumie.serve`)."""

from __future__ import annotations

import errno
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from sumie.errors import ConfigError, SumieError
from sumie.serve import comfy_routes, comfy_ws, controlnet_api, frontend, routes_generate, routes_info, routes_jobs
from sumie.serve.config import ServeConfig
from sumie.serve.errors import ApiError, error_body
from sumie.serve.limits import BodyLimit
from sumie.serve.server import Server

__all__ = ["create_app"]

_basic = HTTPBasic(auto_error=False)
_bearer = HTTPBearer(auto_error=False)


def _auth(request: Request, credentials: HTTPBasicCredentials | None = Depends(_basic),  # noqa: B008
          bearer: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:  # noqa: B008
    """HTTP Basic against ``--api-auth`` or a bearer token against ``--api-token`` (neither configured: open)."""
    config = request.app.state.sumie.config
    users, tokens = config.auth, config.api_tokens
    if not users and not tokens:
        return
    if credentials is not None and users:
        want = users.get(credentials.username)
        if want is not None and secrets.compare_digest(want.encode(), credentials.password.encode()):
            return
    if bearer is not None and tokens:
        given = bearer.credentials.encode()
        if any(secrets.compare_digest(t.encode(), given) for t in tokens):
            return
    schemes = ["Basic"] * bool(users) + ["Bearer"] * bool(tokens)
    raise ApiError(401, "incorrect or missing credentials; this server needs "
                        + " or ".join({"Basic": "HTTP Basic auth (--api-auth)",
                                       "Bearer": "a bearer token (--api-token)"}[s] for s in schemes),
                   headers={"WWW-Authenticate": ", ".join(schemes)})


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app with its own :class:`Server` (workers start now; the default model loads in the background)."""
    config = config or ServeConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.sumie.close()

    app = FastAPI(title="Sumie", description="AUTOMATIC1111 1.10's /sdapi/v1 API on Sumie (plain-PyTorch Stable "
                  "Diffusion).", version="1.10-sumie", lifespan=lifespan)
    app.state.sumie = Server(config)
    frontend.write_example_inputs(app.state.sumie.comfy.folders.input)  # the img2img / inpainting templates' images
    app.add_middleware(BodyLimit, max_bytes=config.limits.max_body_bytes)
    for router in (routes_generate.router, routes_info.router):
        app.include_router(router, prefix="/sdapi/v1", dependencies=[Depends(_auth)])
    for prefix in ("", "/api"):  # ComfyUI's routes, served with and without /api as ComfyUI does
        app.include_router(comfy_routes.router, prefix=prefix, dependencies=[Depends(_auth)])
        app.include_router(frontend.router, prefix=prefix, dependencies=[Depends(_auth)])
        app.include_router(comfy_ws.router, prefix=prefix)  # checks --api-auth itself
    app.include_router(controlnet_api.router, prefix="/controlnet", dependencies=[Depends(_auth)])
    app.state.sumie_jobs = routes_jobs.NativeJobs(app.state.sumie)
    app.include_router(routes_jobs.router, prefix="/api/v1", dependencies=[Depends(_auth)], tags=["native"])
    app.include_router(frontend.static_router, dependencies=[Depends(_auth)])
    static = frontend.frontend_static()
    if static is not None:  # ComfyUI's web frontend at / (mounted last: every API route above wins)
        app.mount("/", StaticFiles(directory=static, html=True), name="frontend")

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(type(e).__name__, e.message, e.field), status_code=e.status,
                            headers=e.headers)

    @app.exception_handler(ConfigError)
    async def config_error(_request: Request, e: ConfigError) -> JSONResponse:
        return JSONResponse(error_body(type(e).__name__, str(e)), status_code=422)

    @app.exception_handler(SumieError)
    async def sumie_error(_request: Request, e: SumieError) -> JSONResponse:
        return JSONResponse(error_body(type(e).__name__, str(e)), status_code=400)

    @app.exception_handler(OSError)
    async def os_error(_request: Request, e: OSError) -> JSONResponse:
        if e.errno == errno.ENAMETOOLONG:  # a file name from the request (/view, an upload...) over 255 bytes
            return JSONResponse(error_body("ApiError", "a file name in the request is longer than the file system "
                                                       f"allows ({frontend.NAME_MAX_BYTES} bytes a name): shorten it"),
                                status_code=400)
        logging.getLogger("sumie.serve").error("unhandled error", exc_info=e)
        return JSONResponse(error_body(type(e).__name__, str(e) or type(e).__name__), status_code=500)

    @app.exception_handler(Exception)
    async def any_error(_request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(type(e).__name__, str(e) or type(e).__name__), status_code=500)

    return app
