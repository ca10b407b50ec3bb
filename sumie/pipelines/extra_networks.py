"""Extra networks: A1111's ``<kind:name:args>`` prompt tags, taken out of the prompts before anything is encoded.

A handler per kind (``lora``, ``hypernet``, ...) is registered on an engine (``engine.extra_networks["lora"] =
handler``). For each request the engine collects the tags of the prompt and the negative prompt (A1111 reads both)
and calls ``activate`` of every registered handler once (a handler registered for several kinds gets all their
tags) before the text encoders run, with no tags when the request has none of its kinds (A1111 does the same), so a
handler can patch the text encoders and the UNet (through the model patcher) or add hooks to the job, and can undo
what it left in place for an earlier request; ``deactivate`` is called when the request ends, whatever happened.
Tags of a kind without a handler are removed from the text the model sees, as A1111 does, and reported in the
result's warnings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from sumie.prompts.parser import ExtraNetwork, extract_extra_networks, strip_comments

if TYPE_CHECKING:
    from sumie.pipelines.engine import Engine
    from sumie.pipelines.job import Job

__all__ = ["ExtraNetwork", "ExtraNetworkHandler", "collect_tags", "tag_text"]


class ExtraNetworkHandler(Protocol):
    """Applies one kind of extra network for one request (A1111's ``ExtraNetwork.activate`` / ``deactivate``)."""

    def activate(self, engine: Engine, job: Job, tags: Sequence[ExtraNetwork]) -> None:
        """Apply the request's tags of this kind (before the prompts are encoded); ``tags`` may be empty."""

    def deactivate(self, engine: Engine, job: Job) -> None:
        """Undo what :meth:`activate` did (after the request, also when it failed)."""


def collect_tags(*prompts: str) -> dict[str, list[ExtraNetwork]]:
    """Tags of the prompts by kind (lower case), in order of appearance; comments are stripped first."""
    out: dict[str, list[ExtraNetwork]] = {}
    for text in prompts:
        for tag in extract_extra_networks(strip_comments(text))[1]:
            out.setdefault(tag.kind.lower(), []).append(tag)
    return out


def tag_text(tag: ExtraNetwork) -> str:
    """The tag as written: ``<lora:name:0.8>``."""
    return f"<{tag.kind}:{':'.join((tag.name, *tag.args))}>"
