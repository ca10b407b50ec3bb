"""``sumie serve``: AUTOMATIC1111 1.10's ``/sdapi/v1`` API and ComfyUI's server API on Sumie's engine.

One process: FastAPI + uvicorn in front, one engine worker thread per device behind a bounded FIFO queue, so HTTP
never waits on sampling. Files: :mod:`~sumie.serve.config` (what a server is built from),
:mod:`~sumie.serve.catalog` (names -> files inside the configured folders only), :mod:`~sumie.serve.models` (A1111's
request / response bodies), :mod:`~sumie.serve.mapping` (requests -> ``GenerationParams``, results -> ``info``),
:mod:`~sumie.serve.jobs` (queue, workers, live progress), :mod:`~sumie.serve.store` (outputs, SQLite job records),
:mod:`~sumie.serve.options` (``/options``), :mod:`~sumie.serve.server` (one app's state),
:mod:`~sumie.serve.app` (``create_app``) and the routes: A1111's (``routes_generate``, ``routes_info``), the
ControlNet extension's (:mod:`~sumie.serve.controlnet_api`, also the units in ``alwayson_scripts``), Sumie's native
jobs API (:mod:`~sumie.serve.routes_jobs`) and ComfyUI's (:mod:`~sumie.serve.comfy_service`: graph prompts on the
same queue, history; :mod:`~sumie.serve.comfy_routes`, :mod:`~sumie.serve.comfy_ws`: the WebSocket);
:mod:`~sumie.serve.batch` runs a JSON-lines file without HTTP.
"""

from sumie.serve.app import create_app
from sumie.serve.config import Limits, ServeConfig

__all__ = ["Limits", "ServeConfig", "create_app"]
