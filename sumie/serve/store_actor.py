"""The job store of a Ray deployment as a Ray actor, so that replicas can run on any machine of the cluster.

``sumie serve --ray`` and ``sumie batch --ray`` start one :class:`StoreActor` on the node that runs the command.
It owns what a single server keeps on disk, the SQLite job records and the numbered output images
(:mod:`sumie.serve.store`), and does the start-up recovery once. Every replica or batch actor, on whichever node
Ray places it, reaches them through :func:`connect_store`: objects with the methods of
:class:`~sumie.serve.store.JobRecords` and :class:`~sumie.serve.store.OutputStore` whose calls run in the actor
(an image to save travels to it as a PIL image; an output file to serve comes back as bytes). No replica opens the
database or writes the output folder itself, so neither needs a shared or network file system: only the model
folders must exist at the same paths on every node that runs a replica.

Ray is imported only here, and this module only with ``--ray``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sumie.errors import SumieError
from sumie.serve.store import JobRecords, OutputStore, prepare_shared

__all__ = ["StoreActor", "close_store", "connect_store", "start_store"]

NAMESPACE = "sumie"
_TIMEOUT_S = 120.0  # a call the actor does not answer in this time means it is gone
_CONCURRENCY = 32  # calls the actor serves at once (threads; JobRecords and OutputStore lock what they share)
_PARTS = {
    "records": frozenset({"add", "start", "finish", "set_progress", "request_cancel", "running", "get", "exists",
                          "recover", "unfinished_workers", "fail_workers"}),
    "outputs": frozenset({"save", "find", "read", "clean_temp"}),
}


class StoreActor:
    """The records and output folder of one deployment, in the process of a Ray actor (threaded)."""

    def __init__(self, output_dir: str, database: str) -> None:
        self.recovered, cleaned = prepare_shared(Path(output_dir), Path(database))
        self.cleaned = [str(p) for p in cleaned]
        self.parts = {"records": JobRecords(Path(database)), "outputs": OutputStore(Path(output_dir))}

    def call(self, part: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """``part.method(*args, **kwargs)`` (part: "records" or "outputs")."""
        if method not in _PARTS.get(part, ()):
            raise SumieError(f"the job store has no {part}.{method}")
        return getattr(self.parts[part], method)(*args, **kwargs)

    def started(self) -> tuple[int, list[str]]:
        """What the start-up recovery did: (unfinished records marked failed, temporary files removed)."""
        return self.recovered, self.cleaned

    def close(self) -> None:
        """Close the database."""
        self.parts["records"].close()


class _Remote:
    """One part of a :class:`StoreActor` seen from another process: its methods, each a blocking actor call."""

    def __init__(self, actor: Any, part: str, name: str) -> None:
        self._actor, self._part, self._name = actor, part, name

    def __getattr__(self, method: str) -> Any:
        if method not in _PARTS[self._part]:
            raise AttributeError(method)

        def call(*args: Any, **kwargs: Any) -> Any:
            import ray

            try:
                return ray.get(self._actor.call.remote(self._part, method, *args, **kwargs), timeout=_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                raise SumieError(f"the job store ({self._name}) does not answer: {type(e).__name__}; the command "
                                 "that started the deployment has stopped or its node is gone") from None

        return call

    def close(self) -> None:
        """Nothing: the store is closed by the command that started it (:func:`close_store`)."""


def start_store(output_dir: Path, database: Path) -> tuple[str, Any]:
    """Start the store actor on this process's node (no CPU reserved); (its name, its handle). Raises SumieError
    when its start-up fails (an unwritable folder, a broken database)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = f"sumie-store-{uuid.uuid4().hex[:12]}"
    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(StoreActor).options(
        name=name, namespace=NAMESPACE, num_cpus=0, max_concurrency=_CONCURRENCY, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    ).remote(str(Path(output_dir).resolve()), str(Path(database).resolve()))
    try:
        ray.get(actor.started.remote(), timeout=_TIMEOUT_S)
    except ray.exceptions.RayError as e:
        ray.kill(actor)
        cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
        raise SumieError(f"the job store did not start: {str(cause).strip().splitlines()[-1]}") from None
    return name, actor


def connect_store(name: str) -> tuple[OutputStore, JobRecords]:
    """The output store and job records of the store actor ``name`` (as the local classes' methods)."""
    import ray

    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise SumieError(f"no job store {name!r} in this Ray cluster; start the deployment with sumie serve --ray"
                         ) from None
    outputs: Any = _Remote(actor, "outputs", name)
    records: Any = _Remote(actor, "records", name)
    return outputs, records


def close_store(actor: Any) -> None:
    """Close the store's database and end the actor."""
    import ray

    try:
        ray.get(actor.close.remote(), timeout=_TIMEOUT_S)
    except ray.exceptions.RayError:
        pass
    ray.kill(actor)
