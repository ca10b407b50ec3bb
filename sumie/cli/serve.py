"""``sumie serve``: AUTOMATIC1111 1.10's ``/sdapi/v1`` API over HTTP (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Any

from sumie.cli.speed import add_weight_packing_arg
from sumie.errors import ConfigError

_LOCAL = ("127.0.0.1", "localhost", "::1")


def _log(line: str) -> None:
    print(line, file=sys.stderr)


def _host(args: argparse.Namespace) -> str:
    """--host wins; else --listen binds every interface; else localhost only."""
    if args.host is not None:
        return args.host
    return "0.0.0.0" if args.listen else "127.0.0.1"


def _check_port(host: str, port: int) -> None:
    """A one-line error instead of uvicorn's exit when the port is taken or the address is not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or "
                              "--host") from None


def build_config(args: argparse.Namespace) -> Any:
    """The ServeConfig of the command line."""
    import torch

    from sumie.serve.config import Limits, ServeConfig, parse_auth

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    devices = tuple(d.strip() for d in device.split(",") if d.strip())
    dtype = args.dtype or ("fp32" if all(d == "cpu" for d in devices) else "fp16")
    if args.max_queue_per_client < 0:
        raise ConfigError("--max-queue-per-client must be 0 (no cap) or a positive number of jobs")
    limits = Limits(max_queue=args.max_queue, max_queue_per_client=args.max_queue_per_client,
                    max_pixels=args.max_pixels, max_steps=args.max_steps)
    return ServeConfig(models_dir=Path(args.models_dir) if args.models_dir else None,
                       ckpt_dirs=tuple(Path(d) for d in args.ckpt_dir), lora_dirs=tuple(Path(d) for d in args.lora_dir),
                       embeddings_dirs=tuple(Path(d) for d in args.embeddings_dir),
                       vae_dirs=tuple(Path(d) for d in args.vae_dir),
                       controlnet_dirs=tuple(Path(d) for d in args.controlnet_dir),
                       upscaler_dirs=tuple(Path(d) for d in args.upscaler_dir),
                       clip_vision_dirs=tuple(Path(d) for d in args.clip_vision_dir),
                       ipadapter_dirs=tuple(Path(d) for d in args.ipadapter_dir), output_dir=Path(args.output_dir),
                       devices=devices, dtype=dtype, limits=limits, auth=parse_auth(args.api_auth),
                       api_tokens=tuple(args.api_token),
                       input_dir=Path(args.input_dir) if args.input_dir else None,
                       preview_method=args.preview_method, weight_packing=args.weight_packing)


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the server and block until Ctrl-C."""
    host = _host(args)
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    config = build_config(args)
    _check_port(host, args.port)
    if host not in _LOCAL and not config.auth and not config.api_tokens:
        bar = "!" * 78
        print(f"{bar}\nsumie: WARNING: listening on {host}:{args.port} WITHOUT authentication: anyone who can reach "
              "this machine can generate images and change settings. Pass --api-auth user:password or "
              f"--api-token TOKEN.\n{bar}",
              file=sys.stderr)
    if args.ray is not None:
        from sumie.serve.ray_app import serve_forever

        return serve_forever(config, args.ray, host, args.port, args.replicas, args.replica_cpus, args.device,
                             args.dtype, log=_log)
    import uvicorn

    from sumie.serve import create_app

    app = create_app(config)
    print(f"sumie: serving AUTOMATIC1111's API on http://{host}:{args.port}/sdapi/v1 and ComfyUI's on "
          f"http://{host}:{args.port}/prompt, /ws (docs: /docs)", file=sys.stderr)
    uvicorn.run(app, host=host, port=args.port, log_level=args.log_level)
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    """The model folders and devices of ``serve`` and ``batch``."""
    p.add_argument("--models-dir", metavar="DIR", help="AUTOMATIC1111 or ComfyUI folder (or its models/ folder)")
    p.add_argument("--ckpt-dir", action="append", default=[], metavar="DIR", help="more checkpoints (repeatable)")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR", help="more LoRAs (repeatable)")
    p.add_argument("--embeddings-dir", action="append", default=[], metavar="DIR",
                   help="more textual-inversion embeddings (repeatable)")
    p.add_argument("--vae-dir", action="append", default=[], metavar="DIR", help="more standalone VAEs (repeatable)")
    p.add_argument("--controlnet-dir", action="append", default=[], metavar="DIR",
                   help="more ControlNet / T2I-Adapter models (repeatable; the extension's flag)")
    p.add_argument("--upscaler-dir", action="append", default=[], metavar="DIR",
                   help="more upscaler models: ESRGAN / Real-ESRGAN / SwinIR (repeatable)")
    p.add_argument("--clip-vision-dir", action="append", default=[], metavar="DIR",
                   help="more CLIP image encoders (repeatable)")
    p.add_argument("--ipadapter-dir", action="append", default=[], metavar="DIR",
                   help="more IP-Adapter models (repeatable)")
    p.add_argument("--device", help="cpu, cuda, cuda:N, or a comma list: one engine worker each "
                                    "(default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="weights dtype (default: fp16 on a GPU, fp32 "
                                                                      "on the CPU)")
    add_weight_packing_arg(p)


def _ray_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--ray [ADDRESS]``, ``--replicas``, ``--replica-cpus`` of ``serve`` and ``batch``."""
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help=f"{what} (needs pip install 'sumie[ray]'); ADDRESS: a running cluster (ray://HOST:10001, "
                        "HOST:6379 or auto), or none / 'local' to start one here")
    p.add_argument("--replicas", type=int, metavar="N", help="with --ray: engines, one Ray actor each (default: one "
                                                             "per GPU of this node, else 1)")
    p.add_argument("--replica-cpus", type=float, default=1.0, metavar="N",
                   help="with --ray: CPUs Ray reserves per replica (default: 1)")


def cmd_batch(args: argparse.Namespace) -> int:
    """Run a JSON-lines file of native-API request bodies; exit 1 when a line failed."""
    from sumie.serve.batch import run_batch

    args.api_auth, args.api_token, args.max_queue, args.max_queue_per_client = None, [], 1 << 30, 0
    args.input_dir, args.preview_method = None, "none"  # the server's ComfyUI side is not used
    if args.ray is not None:
        from sumie.serve.ray_app import run_batch_ray

        report = run_batch_ray(Path(args.file), build_config(args), args.ray, args.replicas, args.replica_cpus,
                               args.device, args.dtype, log=_log)
    else:
        report = run_batch(Path(args.file), build_config(args), log=_log)
    print(f"sumie batch: {len(report.done)} done, {len(report.skipped)} skipped (done before), "
          f"{len(report.failed)} failed", file=sys.stderr)
    return 1 if report.failed else 0


def add_parsers(sub: Any) -> None:
    """Register ``sumie serve`` and ``sumie batch``."""
    b = sub.add_parser("batch", help="run a JSON-lines file of request bodies (resumable)")
    b.add_argument("file", help="JSON lines: one native-API request body per line ({\"task\": \"txt2img\", ...})")
    b.add_argument("-o", "--output-dir", required=True, metavar="DIR",
                   help="outputs (txt2img-images/DATE/00000-SEED.png) and the job records that make a rerun skip "
                        "finished lines")
    _model_args(b)
    b.add_argument("--max-pixels", type=int, default=2048 * 2048, metavar="N", help="largest width x height")
    b.add_argument("--max-steps", type=int, default=500, metavar="N", help="most sampling steps")
    _ray_args(b, "spread the lines over Ray actors")
    b.set_defaults(func=cmd_batch)
    p = sub.add_parser("serve", help="serve AUTOMATIC1111's /sdapi/v1 API and ComfyUI's API")
    p.add_argument("--host", help="address to bind (default: 127.0.0.1; 0.0.0.0 with --listen)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860, A1111's)")
    p.add_argument("--listen", action="store_true", help="bind every interface (0.0.0.0), as A1111's --listen")
    _model_args(p)
    p.add_argument("--output-dir", default="outputs", metavar="DIR",
                   help="where save_images writes (txt2img-images/DATE/00000-SEED.png) and the job records live "
                        "(default: outputs)")
    p.add_argument("--input-dir", metavar="DIR", help="ComfyUI's input folder (uploads, LoadImage; default: "
                                                      "OUTPUT_DIR/../input)")
    p.add_argument("--preview-method", choices=["none", "auto", "latent2rgb"], default="none",
                   help="ComfyUI WebSocket preview frames while sampling (default: none, as ComfyUI)")
    p.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS]", help="require HTTP Basic auth (A1111's flag)")
    p.add_argument("--api-token", action="append", default=[], metavar="TOKEN",
                   help="accept 'Authorization: Bearer TOKEN' (repeatable; besides --api-auth)")
    p.add_argument("--max-queue", type=int, default=32, metavar="N", help="jobs queued or running before 503 "
                                                                         "(default: 32)")
    p.add_argument("--max-queue-per-client", type=int, default=0, metavar="N",
                   help="jobs one client (auth user, else address) may have queued or running before 503 "
                        "(default: 0, no cap; the queue is round-robin between clients either way)")
    p.add_argument("--max-pixels", type=int, default=2048 * 2048, metavar="N",
                   help="largest width x height of a request (default: 2048x2048)")
    p.add_argument("--max-steps", type=int, default=500, metavar="N", help="most sampling steps (default: 500)")
    _ray_args(p, "serve through Ray Serve: --replicas copies of this server behind Ray's HTTP proxy, sharing the "
                 "job records under --output-dir")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: info)")
    p.set_defaults(func=cmd_serve)
