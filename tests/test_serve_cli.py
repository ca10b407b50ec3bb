"""``sumie serve`` as a command: binds where told, warns without auth off localhost, one-line errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from sumie.cli.main import build_parser
from sumie.cli.serve import _host


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sumie", "serve", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_hosts_default_to_localhost() -> None:
    parse = build_parser().parse_args
    assert _host(parse(["serve"])) == "127.0.0.1"
    assert _host(parse(["serve", "--listen"])) == "0.0.0.0"
    assert _host(parse(["serve", "--listen", "--host", "127.0.0.2"])) == "127.0.0.2"


def test_serve_out_of_the_box_and_warn_without_auth(tmp_path: Path) -> None:
    port = _free_port()
    proc = _serve("--host", "0.0.0.0", "--port", str(port), "--output-dir", "out", "--log-level", "warning",
                  cwd=tmp_path)
    try:
        deadline, models = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", timeout=60,
                               json={"width": 32, "height": 32, "steps": 2, "save_images": True})
                if r.status_code == 200:
                    models = httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/sd-models").json()
                    break
                assert r.status_code == 503 and r.headers["retry-after"]  # still loading
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert models is not None and [m["model_name"] for m in models] == ["sumie-tiny"]
        assert len(list((tmp_path / "out" / "txt2img-images").glob("*/00000-*.png"))) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert "WITHOUT authentication" in err and "--api-auth" in err
    assert proc.returncode == 0, err


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = _serve("--port", str(busy.getsockname()[1]), cwd=tmp_path)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().count("\n") == 0 and "cannot listen on 127.0.0.1:" in err
    assert "Traceback" not in err


def test_weight_packing_reaches_every_model_manager(tmp_path: Path) -> None:
    """``sumie serve --weight-packing off`` (and ``batch``) sets the mode of each worker's model manager; a mode
    that does not exist is a usage error naming the choices."""
    import dataclasses

    from sumie.cli.serve import build_config
    from sumie.serve.server import Server

    parse = build_parser().parse_args
    assert build_config(parse(["serve"])).weight_packing == "auto"
    assert parse(["batch", "jobs.jsonl", "-o", "out", "--weight-packing", "on"]).weight_packing == "on"
    config = build_config(parse(["serve", "--weight-packing", "off", "--device", "cpu,cpu"]))
    server = Server(dataclasses.replace(config, preload=False, output_dir=tmp_path / "out"))
    try:
        assert [m.weight_packing for m in server.queue.managers] == ["off", "off"]
    finally:
        server.close()
    proc = subprocess.run([sys.executable, "-m", "sumie", "serve", "--weight-packing", "yes"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "--weight-packing" in proc.stderr and "auto" in proc.stderr
