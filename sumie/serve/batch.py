"""``sumie batch prompts.jsonl -o DIR``: many generations from a file, each line a native-API request body.

The lines run through the same code as ``POST /api/v1/jobs`` (:class:`~sumie.serve.server.Server` without HTTP):
the same checks (a bad line fails alone, with the message naming its field), the same outputs
(``DIR/txt2img-images/YYYY-MM-DD/00000-SEED.png``, written atomically with their infotext) and job records
(``DIR/sumie-jobs.sqlite3``). Resumable: a line runs as job ``batch-{hash of its body}-{k}-{try}`` (``k``: how
many identical lines came before it); a rerun skips every line whose job is ``done``, wherever the line now is
(an edited line has another hash and runs again; a failed one is retried). ``--ray``: the same line code in Ray
actors (:func:`sumie.serve.ray_app.run_batch_ray`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from sumie.errors import ConfigError, SumieError
from sumie.serve.config import ServeConfig
from sumie.serve.store import JobRecords

if TYPE_CHECKING:
    from sumie.serve.server import Server

__all__ = ["BatchReport", "pending_lines", "read_batch", "read_lines", "record_line", "run_batch", "run_line",
           "start_server"]


@dataclass
class BatchReport:
    """What a batch run did: line numbers (1-based) done now, skipped (done before) and failed (with the error)."""

    done: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    outputs: dict[int, list[str]] = field(default_factory=dict)


def read_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(1-based line number, request body) per non-blank line; a line that is not a JSON object yields its error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e}); give a UTF-8 JSON-lines file") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, f"not JSON ({e.msg} at column {e.colno})"
            continue
        yield n, body if isinstance(body, dict) else "not a JSON object (a request body is {...})"


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _message(e: BaseException) -> str:
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        return f"{where}: {first['msg']}"
    return str(e) or type(e).__name__


def read_batch(path: Path) -> list[tuple[int, dict[str, Any] | str]]:
    """The lines of ``path`` (:func:`read_lines`); a ConfigError when it has none."""
    lines = list(read_lines(path))
    if not lines:
        raise ConfigError(f"{path}: no request lines; give one JSON request body per line")
    return lines


def pending_lines(lines: list[tuple[int, dict[str, Any] | str]], records: JobRecords, report: BatchReport,
                  log: Callable[[str], None]) -> list[tuple[int, dict[str, Any], str]]:
    """(line number, body, job id) of each line to run now; lines done before go to ``report.skipped``, lines that
    are not request bodies to ``report.failed`` (see the module docstring for the job ids)."""
    seen: dict[str, int] = {}
    todo: list[tuple[int, dict[str, Any], str]] = []
    for n, body in lines:
        if isinstance(body, str):
            report.failed[n] = body
            log(f"line {n}: failed: {body}")
            continue
        digest = _digest(body)
        seen[digest] = seen.get(digest, -1) + 1  # the k-th copy of a body is its own job
        prefix = f"batch-{digest}-{seen[digest]}"
        tries = 0
        while (rec := records.get(f"{prefix}-{tries}")) is not None and rec.state != "done":
            tries += 1
        if rec is not None:
            report.skipped.append(n)
            report.outputs[n] = rec.outputs
            continue
        todo.append((n, body, f"{prefix}-{tries}"))
    return todo


def start_server(config: ServeConfig) -> Server:
    """A :class:`Server` with its default model loaded (a SumieError when it does not load)."""
    from sumie.serve.server import Server

    server = Server(config)
    if not server.queue.ready.wait(600) or server.queue.load_error:
        server.close()
        raise SumieError(f"the model did not load: {server.queue.load_error}")
    return server


def run_line(server: Server, body: dict[str, Any], job_id: str) -> tuple[list[str] | None, str | None]:
    """Run one request body as job ``job_id`` and wait: (its output paths, None) or (None, the error)."""
    from sumie.serve.models import Img2ImgRequest, Txt2ImgRequest
    from sumie.serve.routes_jobs import JobRequest

    try:
        req = JobRequest.model_validate(body)
        fields = req.model_dump(exclude_unset=True, exclude={"task", "force_task_id"})
        typed = (Txt2ImgRequest if req.task == "txt2img" else Img2ImgRequest).model_validate(fields)
        plan = asyncio.run(server.plan(req.task, typed))
        plan.save, plan.send_images = True, False
        server.submit(plan, job_id).result()
    except Exception as e:  # noqa: BLE001 - one line's failure is reported, the others still run
        return None, _message(e)
    rec = server.records.get(job_id)
    if rec is None or rec.state != "done":
        return None, (rec.error if rec else None) or "the job did not finish"
    return rec.outputs, None


def record_line(report: BatchReport, n: int, outputs: list[str] | None, error: str | None,
                log: Callable[[str], None]) -> None:
    """Note line ``n``'s result in ``report`` and log it."""
    if outputs is None:
        report.failed[n] = error or "the job did not finish"
        log(f"line {n}: failed: {report.failed[n]}")
    else:
        report.done.append(n)
        report.outputs[n] = outputs
        log(f"line {n}: {', '.join(outputs)}")


def run_batch(path: Path, config: ServeConfig, log: Callable[[str], None] = print) -> BatchReport:
    """Run every line of ``path`` not done before (see the module docstring); one engine worker per device."""
    lines = read_batch(path)
    report = BatchReport()
    server = start_server(config)
    try:
        for n, body, job_id in pending_lines(lines, server.records, report, log):
            record_line(report, n, *run_line(server, body, job_id), log)
    finally:
        server.close()
    return report
