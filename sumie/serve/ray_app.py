"""Beyond one machine's process: ``sumie serve --ray`` (a Ray Serve deployment) and ``sumie batch --ray``.

``sumie serve --ray [ADDRESS]`` runs N replicas of the same app :func:`sumie.serve.create_app` builds (the same
routes, nothing forked), each a Ray actor with its own engine worker and queue (one GPU each where the cluster has
GPUs), behind Ray Serve's HTTP proxy on ``--host`` / ``--port``. A request goes to one replica (the proxy picks the
less busy of two); a job lives in the replica that queued it. Ray places the replicas on any node of the cluster
with the CPUs or GPU they ask for.

The job records and the output images live in one store, a Ray actor on the node that runs the command
(:mod:`sumie.serve.store_actor`): the single server's SQLite file and numbered images under ``--output-dir``,
written only by that actor. Every replica reaches them through it (``ServeConfig.store_actor``, with ``shared``
semantics): a running job writes its progress there (at most every ``progress_write_s``, and its last step) and a
cancel asked through another replica is read there, so ``GET /api/v1/jobs/{id}`` (state, progress, outputs, info),
its events, its output files, ``DELETE`` and A1111's ``/progress`` answer on whichever replica, on whichever node,
the proxy picks. A replica that Ray starts in place of one that died marks the jobs the dead one held failed
(:func:`~sumie.serve.store.recover_dead`, for the processes of its own machine). The model folders must exist at
the same paths on every node that runs a replica.

Queue semantics are the single server's, per replica: ``--max-queue`` jobs queued or running in a replica, then 503
with Retry-After, never a silent drop. In front of them Ray Serve lets a replica hold ``max_queue + 16`` requests at
once (room for polls and event streams beside the waiting A1111 requests) and its proxy holds as many again while it
picks replicas, refusing any beyond that with its own 503 (plain text, with Retry-After; Ray's
``max_queued_requests``). The proxy balances on requests in flight, not on jobs queued: a native job's POST returns
at once, so a replica may be full while another has room; a client retries after Retry-After. ComfyUI's queue and
history (``/prompt``, ``/history``, ``/ws``) stay per replica: use the native or A1111 API through Ray.

``sumie batch FILE -o DIR --ray [ADDRESS]`` spreads the lines over ``--replicas`` Ray actors, each a
:class:`~sumie.serve.server.Server` (one engine) on the same store, with the line code of :mod:`sumie.serve.batch`,
so the outputs, job ids and the resume rule are those of the single-process batch.

Ray is an optional extra (``pip install 'sumie[ray]'``), imported only here and only when ``--ray`` is given.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sumie.errors import ConfigError, SumieError
from sumie.serve.config import ServeConfig

__all__ = ["BatchWorker", "Deployed", "RayPlan", "ReplicaHeader", "SumieReplica", "deploy", "import_ray",
           "plan_replicas", "run_batch_ray", "serve_forever", "shared_config"]

APP_NAME = "sumie"
_POLL_ROOM = 16  # requests a replica takes besides max_queue (GET polls, event streams)


def import_ray() -> Any:
    """``ray`` with ``ray.serve`` imported, or a SumieError saying how to install it."""
    try:
        import ray
        import ray.serve  # noqa: F401 - the [serve] extra
    except ImportError as e:
        raise SumieError(f"--ray needs Ray: pip install 'sumie[ray]' ({e})") from None
    return ray


def connect(address: str | None) -> float:
    """Join the cluster at ``address`` (None or "local": start one on this machine); returns the seconds it took.
    A Ray already initialised in this process (a test's cluster) is used as it is."""
    ray = import_ray()
    t0 = time.monotonic()
    if not ray.is_initialized():
        where = None if address in (None, "", "local") else address
        if where is not None and where != "auto":
            _reachable(where)
        try:
            ray.init(address=where, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise SumieError(f"cannot join the Ray cluster at {where or 'local'}: {e}; start one with `ray start "
                             "--head` or pass --ray without an address") from None
    return time.monotonic() - t0


def _reachable(address: str) -> None:
    """A one-line error when nothing listens at ``[ray://]HOST:PORT`` (Ray itself would retry for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray {address}: give HOST:PORT (the head's GCS, e.g. HOST:6379), ray://HOST:10001, "
                          "auto, or nothing to start a local cluster")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise SumieError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start it with `ray start "
                         "--head` or check the address") from None


def check_flags(replicas: int | None, cpus: float, device: str | None) -> None:
    """The ``--replicas`` / ``--replica-cpus`` / ``--device`` errors found before any cluster is joined."""
    if device is not None and "," in device:
        raise ConfigError("with --ray each replica has one device; give --replicas N instead of a --device list")
    if cpus <= 0:
        raise ConfigError(f"--replica-cpus must be positive, got {cpus}")
    if replicas is not None and replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {replicas}")


@dataclass(frozen=True)
class RayPlan:
    """How many replicas and what each one asks of Ray (Ray places them on any node that has it)."""

    replicas: int
    cpus: float
    gpus: float

    def actor_options(self) -> dict[str, Any]:
        """Ray's ``ray_actor_options`` of one replica."""
        return {"num_cpus": self.cpus, "num_gpus": self.gpus}


def plan_replicas(config: ServeConfig, replicas: int | None, cpus: float, device: str | None,
                  dtype: str | None = None) -> tuple[RayPlan, ServeConfig]:
    """The replicas (default: one per GPU of the cluster, else 1) and the config each one runs: one device
    (``cuda``: the GPU Ray gives it; ``cpu``), ``shared`` records. ``device`` / ``dtype``: the user's ``--device``
    and ``--dtype`` (None: not given)."""
    ray = import_ray()
    check_flags(replicas, cpus, device)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and device not in ("cpu",)
    if device is not None and device.startswith("cuda") and gpus == 0:
        raise ConfigError(f"--device {device}: this Ray cluster has no GPU; use --device cpu")
    n = replicas if replicas is not None else (gpus if use_gpu else 1)
    if use_gpu and n > gpus:
        raise ConfigError(f"--replicas {n}: the cluster has {gpus} GPU(s), one per replica; use --replicas {gpus} "
                          "or --device cpu")
    dtype = dtype or ("fp16" if use_gpu else "fp32")
    return RayPlan(n, cpus, 1.0 if use_gpu else 0.0), \
        shared_config(config, devices=("cuda",) if use_gpu else ("cpu",), dtype=dtype)


def shared_config(config: ServeConfig, **changes: Any) -> ServeConfig:
    """``config`` for one of several processes: absolute paths (Ray workers start elsewhere), ``shared`` records."""
    def absolute(p: Path | None) -> Path | None:
        return None if p is None else Path(os.path.abspath(p))

    return dataclasses.replace(
        config, models_dir=absolute(config.models_dir), ckpt_dirs=tuple(map(absolute, config.ckpt_dirs)),
        lora_dirs=tuple(map(absolute, config.lora_dirs)), embeddings_dirs=tuple(map(absolute, config.embeddings_dirs)),
        vae_dirs=tuple(map(absolute, config.vae_dirs)), controlnet_dirs=tuple(map(absolute, config.controlnet_dirs)),
        output_dir=absolute(config.output_dir), db_path=absolute(config.database), input_dir=absolute(config.input_dir),
        shared=True, **changes)


# ------------------------------------------------------------------------------------------------ serve


class ReplicaHeader:
    """ASGI middleware: every HTTP answer says which replica gave it (``X-Sumie-Replica: HOST:PID``)."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-sumie-replica", self.value)]}
            await send(message)

        await self.app(scope, receive, tagged)


class SumieReplica:
    """One replica: the app of :func:`sumie.serve.create_app` with its own server (used through ``serve.ingress``)."""

    async def __init__(self, config: ServeConfig) -> None:  # type: ignore[misc] - awaited by Ray's ingress wrapper
        from sumie.serve.app import create_app

        self.sumie_app = create_app(config)  # (``app`` is the wrapper's)
        queue = self.sumie_app.state.sumie.queue
        self.sumie_app.add_middleware(ReplicaHeader, replica=queue.worker_id)
        if not await asyncio.to_thread(queue.ready.wait, 1800):  # ready means: the default model is loaded
            raise SumieError("the default model did not load within 30 minutes")
        if queue.load_error:
            raise SumieError(f"the default model did not load: {queue.load_error}")

    def __serve_build_asgi_app__(self) -> Any:
        """The ASGI app Ray Serve runs (its lifespan closes the server when the replica stops)."""
        return self.sumie_app


@dataclass(frozen=True)
class Deployed:
    """What :func:`deploy` started: the seconds it took and the store actor. Ray ends the actor when the last
    handle of it is dropped, so hold this while the deployment runs (and end it with
    :func:`~sumie.serve.store_actor.close_store`)."""

    seconds: float
    store: Any


def deploy(config: ServeConfig, plan: RayPlan, host: str, port: int) -> Deployed:
    """Start the job store on this node, Serve's HTTP proxy on host:port, and ``plan.replicas`` replicas of the app;
    returns when every replica has its model loaded. ``config`` is a :func:`shared_config`."""
    from sumie.serve.store_actor import close_store, start_store

    t0 = time.monotonic()
    name, store = start_store(config.output_dir, config.database)  # its start-up recovery runs once, here
    try:
        _run_app(dataclasses.replace(config, store_actor=name), plan, host, port)
    except BaseException:
        close_store(store)
        raise
    return Deployed(time.monotonic() - t0, store)


def _run_app(config: ServeConfig, plan: RayPlan, host: str, port: int) -> None:
    """Serve's HTTP proxy and the replicas (see :func:`deploy`)."""
    ray = import_ray()
    from ray import serve
    from ray.serve.config import BackpressureConfig

    limits = config.limits
    deployment = serve.deployment(
        serve.ingress()(SumieReplica), name="SumieReplica", num_replicas=plan.replicas,
        ray_actor_options=plan.actor_options(), max_ongoing_requests=limits.max_queue + _POLL_ROOM,
        max_queued_requests=plan.replicas * (limits.max_queue + _POLL_ROOM),
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s))
    try:
        serve.start(http_options={"host": host, "port": port}, detached=False)
    except (ray.exceptions.RayError, RuntimeError, TimeoutError) as e:
        # Ray Serve gives its HTTP proxy actor a fixed 60 s to start: a machine too busy to start it ends here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SumieError(f"Ray Serve's HTTP proxy did not start on {host}:{port} ({first}); is the port free and "
                         f"the machine not overloaded? Try again, or another --port") from None
    try:
        serve.run(deployment.bind(config), name=APP_NAME, route_prefix="/", blocking=False)
    except (ray.exceptions.RayError, RuntimeError) as e:
        raise SumieError(f"the Ray Serve deployment failed: {e}") from None


def serve_forever(config: ServeConfig, address: str | None, host: str, port: int, replicas: int | None,
                  cpus: float, device: str | None, dtype: str | None, log: Callable[[str], None]) -> int:
    """``sumie serve --ray``: join (or start) the cluster, deploy, block until Ctrl-C or SIGTERM, then remove the
    app (and the whole Serve instance and cluster when this command started them)."""
    ray = import_ray()
    from ray import serve

    from sumie.serve.store_actor import close_store

    check_flags(replicas, cpus, device)
    started = connect(address)
    own = address in (None, "", "local")
    deployed: Deployed | None = None
    try:
        plan, shared = plan_replicas(config, replicas, cpus, device, dtype)
        log(f"sumie: Ray cluster ready in {started:.1f} s; deploying {plan.replicas} replica(s) "
            f"({'1 GPU' if plan.gpus else f'{plan.cpus:g} CPU'} each)")
        deployed = deploy(shared, plan, host, port)
        log(f"sumie: {plan.replicas} replica(s) ready in {deployed.seconds:.1f} s; serving AUTOMATIC1111's API on "
            f"http://{host}:{port}/sdapi/v1 and the native jobs API on http://{host}:{port}/api/v1/jobs "
            f"(records: {shared.database}); Ctrl-C stops")
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            stop.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log("sumie: stopping the replicas")
        return 0
    finally:
        if own:
            serve.shutdown()
        elif APP_NAME in serve.status().applications:
            serve.delete(APP_NAME)  # a shared cluster: only what this command deployed
        if deployed is not None:
            close_store(deployed.store)
        ray.shutdown()


# ------------------------------------------------------------------------------------------------ batch


class BatchWorker:
    """One Ray actor of ``sumie batch --ray``: a :class:`~sumie.serve.server.Server` (one engine) that runs lines."""

    def __init__(self, config: ServeConfig) -> None:
        from sumie.serve.batch import start_server

        self.server = start_server(config)

    def run(self, n: int, body: dict[str, Any], job_id: str) -> tuple[int, list[str] | None, str | None]:
        """Line ``n`` as job ``job_id``: (n, outputs, None) or (n, None, error)."""
        from sumie.serve.batch import run_line

        return (n, *run_line(self.server, body, job_id))

    def worker(self) -> str:
        """HOST:PID of this actor (the ``worker`` of its job records)."""
        return self.server.queue.worker_id

    def close(self) -> None:
        """Stop the engine worker and close the records."""
        self.server.close()


def run_batch_ray(path: Path, config: ServeConfig, address: str | None, replicas: int | None, cpus: float,
                  device: str | None, dtype: str | None = None, log: Callable[[str], None] = print) -> Any:
    """``sumie batch --ray``: the lines not done before, spread over ``replicas`` actors; a BatchReport."""
    from sumie.serve.batch import BatchReport, pending_lines, read_batch, record_line
    from sumie.serve.store_actor import close_store, connect_store, start_store

    ray = import_ray()
    check_flags(replicas, cpus, device)
    lines = read_batch(path)
    connect(address)
    plan, shared = plan_replicas(config, replicas, cpus, device, dtype)
    report = BatchReport()
    name, store = start_store(shared.output_dir, shared.database)
    try:
        todo = pending_lines(lines, connect_store(name)[1], report, log)
        if not todo:
            return report
        actor = ray.remote(BatchWorker).options(**plan.actor_options())
        workers = [actor.remote(dataclasses.replace(shared, store_actor=name))
                   for _ in range(min(plan.replicas, len(todo)))]
        try:
            pool = ray.util.ActorPool(workers)
            for n, outputs, error in pool.map_unordered(lambda w, line: w.run.remote(*line), todo):
                record_line(report, n, outputs, error, log)
        finally:
            ray.get([w.close.remote() for w in workers])
            for w in workers:
                ray.kill(w)
    finally:
        close_store(store)
    report.done.sort()
    return report
