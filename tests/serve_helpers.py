"""A real uvicorn server on a free localhost port, in a background thread, for the serve tests."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI
from PIL import Image

from sumie.serve import ServeConfig, create_app

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


@dataclass
class Running:
    """A started server: its app and where it listens."""

    app: FastAPI
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def server(self):  # noqa: ANN201 - sumie.serve.server.Server
        return self.app.state.sumie


@contextmanager
def running_server(config: ServeConfig, *, wait_ready: bool = True, load_ok: bool = True) -> Iterator[Running]:
    """Start ``create_app(config)`` under uvicorn on a socket bound to a free port; stop it on exit.

    ``wait_ready``: wait for the default model's load (``load_ok``: and require it to succeed)."""
    app = create_app(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    if wait_ready:
        assert app.state.sumie.queue.ready.wait(120), "the model did not load"
        assert not load_ok or app.state.sumie.queue.load_error is None, app.state.sumie.queue.load_error
    try:
        yield Running(app, "127.0.0.1", port)
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def b64_png(image: Image.Image) -> str:
    """Raw base64 of a PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def from_b64(text: str) -> Image.Image:
    """A PIL image from raw base64."""
    img = Image.open(io.BytesIO(base64.b64decode(text)))
    img.load()
    return img


def to_api(workflow: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The frontend's graph -> API format: widgets in object_info's input order (a seed's control value skipped, as the
    1.58.1 frontend adds one after ``seed`` / ``noise_seed`` or an input with ``control_after_generate``; an
    ``image_upload`` combo's upload button, which the frontend saves as ``"image"``, skipped too)."""
    links = {lk[0]: lk for lk in workflow["links"]}
    prompt: dict[str, Any] = {}
    for node in workflow["nodes"]:
        spec = info[node["type"]]["input"]
        inputs: dict[str, Any] = {}
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i["link"] is not None}
        values = list(node["widgets_values"])
        for name, entry in [*spec["required"].items(), *spec.get("optional", {}).items()]:
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            elif isinstance(entry[0], list) or entry[0] in WIDGET_TYPES:
                inputs[name] = values.pop(0)
                opts = entry[1] if len(entry) > 1 else {}
                if opts.get("control_after_generate", name in ("seed", "noise_seed")):  # the frontend's rule
                    assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
                if opts.get("image_upload"):
                    assert values.pop(0) == "image"
        assert values == [], (node["type"], values)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def ws_until(ws: Any, done: Callable[[dict[str, Any]], bool], *, timeout: float = 120) -> list[dict[str, Any]]:
    """ComfyUI WebSocket JSON messages (binary previews skipped) up to and including the first one ``done`` accepts."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        m = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(m, bytes):
            continue
        out.append(json.loads(m))
        if done(out[-1]):
            return out


def ws_drain(ws: Any, *, quiet: float = 0.5) -> list[str]:
    """The types of the WebSocket messages that arrive until none comes for ``quiet`` s ("binary" for previews)."""
    kinds: list[str] = []
    while True:
        try:
            m = ws.recv(timeout=quiet)
        except TimeoutError:
            return kinds
        kinds.append("binary" if isinstance(m, bytes) else json.loads(m)["type"])
