"""What a server is built from: folders, devices, limits, authentication (no global state: one object per app)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sumie.configs import PackingMode
from sumie.errors import ConfigError

__all__ = ["PREVIEW_METHODS", "Limits", "ServeConfig", "parse_auth"]

PREVIEW_METHODS = ("none", "auto", "latent2rgb")  # ComfyUI's --preview-method choices Sumie has (no TAESD)


@dataclass(frozen=True)
class Limits:
    """Per-request limits; a request over one is a 422 naming the field."""

    max_pixels: int = 2048 * 2048  # width x height of any pass (hires target included)
    max_steps: int = 500
    max_images: int = 64  # batch_size x n_iter
    max_b64_bytes: int = 40 << 20  # length of one base64 image string
    max_body_bytes: int = 128 << 20  # a request body (413 above)
    max_image_pixels: int = 4096 * 4096  # decoded input images (checked from the header, before decoding)
    max_queue: int = 32  # queued + running jobs; full -> 503 with Retry-After
    max_queue_per_client: int = 0  # queued + running jobs of one client (0: no cap beyond max_queue)


@dataclass(frozen=True)
class ServeConfig:
    """A server: model folders (``models_dir``: an A1111 or ComfyUI folder; the others flat folders of one kind),
    outputs, devices (one engine worker each), limits and HTTP Basic credentials (user -> password)."""

    models_dir: Path | None = None
    ckpt_dirs: tuple[Path, ...] = ()
    lora_dirs: tuple[Path, ...] = ()
    embeddings_dirs: tuple[Path, ...] = ()
    vae_dirs: tuple[Path, ...] = ()
    controlnet_dirs: tuple[Path, ...] = ()
    upscaler_dirs: tuple[Path, ...] = ()
    clip_vision_dirs: tuple[Path, ...] = ()
    ipadapter_dirs: tuple[Path, ...] = ()
    output_dir: Path = Path("outputs")
    devices: tuple[str, ...] = ("cpu",)
    dtype: str = "fp32"
    limits: Limits = field(default_factory=Limits)
    auth: dict[str, str] = field(default_factory=dict)
    api_tokens: tuple[str, ...] = ()  # bearer tokens (--api-token), accepted besides --api-auth
    db_path: Path | None = None  # job records (default: OUTPUT_DIR/sumie-jobs.sqlite3)
    preload: bool = True  # load the default checkpoint at start (endpoints answer 503 until it is loaded)
    retry_after_s: int = 5
    input_dir: Path | None = None  # ComfyUI's input folder (default: OUTPUT_DIR/../input)
    preview_method: str = "none"  # ComfyUI's --preview-method: none, auto or latent2rgb (binary WebSocket frames)
    weight_packing: PackingMode = "auto"  # CPU convolutions' and linear layers' prepacked weights (models/packed)
    # One of several processes on one output folder and job records (the replicas of ``sumie serve --ray``): no
    # start-up recovery or temp-file cleanup (whoever starts them does it once: sumie.serve.store.prepare_shared);
    # running jobs write their progress to the records and jobs of the other processes are answered from there.
    shared: bool = False
    progress_write_s: float = 0.5  # with ``shared``: least time between two progress writes of one job
    # The named Ray actor that holds the records and the output folder for every replica (``sumie serve --ray``,
    # ``sumie batch --ray``; :mod:`sumie.serve.store_actor`), so replicas may run on other machines; None: local files.
    store_actor: str | None = None

    def __post_init__(self) -> None:
        if not self.devices:
            raise ConfigError("a server needs at least one device; give e.g. devices=('cpu',)")
        if self.preview_method not in PREVIEW_METHODS:
            raise ConfigError(f"unknown preview method {self.preview_method!r}; use one of: "
                              f"{', '.join(PREVIEW_METHODS)}")
        if any(not t or any(c.isspace() for c in t) for t in self.api_tokens):
            raise ConfigError("--api-token must be a non-empty token without spaces")
        for name, folders in (("--ckpt-dir", self.ckpt_dirs), ("--lora-dir", self.lora_dirs),
                              ("--embeddings-dir", self.embeddings_dirs), ("--vae-dir", self.vae_dirs),
                              ("--controlnet-dir", self.controlnet_dirs), ("--upscaler-dir", self.upscaler_dirs),
                              ("--clip-vision-dir", self.clip_vision_dirs), ("--ipadapter-dir", self.ipadapter_dirs)):
            for f in folders:
                if not Path(f).is_dir():
                    raise ConfigError(f"{name} {f}: no such folder; create it or fix the path")

    @property
    def database(self) -> Path:
        """The SQLite file of the job records."""
        return self.db_path if self.db_path is not None else self.output_dir / "sumie-jobs.sqlite3"


def parse_auth(text: str | None) -> dict[str, str]:
    """A1111's ``--api-auth user:pass[,user:pass]`` -> {user: password}."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        user, sep, password = part.partition(":")
        if not sep or not user or not password:
            raise ConfigError(f"--api-auth entry {part!r} is not user:password; give user:pass[,user:pass]")
        out[user] = password
    if text is not None and not out:
        raise ConfigError("--api-auth is empty; give user:pass[,user:pass]")
    return out
