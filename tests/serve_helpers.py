"""A real uvicorn server on a free localhost port, in a background thread, for the serve tests."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI
from PIL import Image

from sumie.serve import ServeConfig, create_app


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
