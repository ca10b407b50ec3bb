"""AUTOMATIC1111 (webui 1.10) prompt syntax: comments, extra-network tags, AND, scheduling, attention.

The order A1111 applies them to a prompt, and the functions here:

1. ``# comment`` lines and line ends are removed (:func:`strip_comments`);
2. ``<lora:name:0.8>``-style tags are cut out (:func:`extract_extra_networks`);
3. ``a AND b :0.5`` splits into weighted sub-prompts (:func:`split_and`, positive prompts only);
4. ``[from:to:when]`` / ``[a|b]`` make one text per step range (:func:`prompt_schedule`);
5. each text becomes ``(text, weight)`` pieces with ``(x)``, ``[x]``, ``(x:1.3)`` and ``BREAK``
   (:func:`parse_prompt_attention`), which :mod:`sumie.prompts.text_conditioning` tokenizes.

A1111 parses step 4 with a lark grammar; here a small two-pass parser reads the same language:
a bracket at the top level of a prompt is a construct when it is a valid one (the choice lark makes),
otherwise a literal character. Every function is total: any string gives a result, never an exception.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "ExtraNetwork",
    "cond_index_at_step",
    "extract_extra_networks",
    "multicond_prompt_list",
    "parse_prompt_attention",
    "prompt_schedule",
    "prompt_schedules",
    "split_and",
    "strip_comments",
]

# ----------------------------------------------------------------------------------------------- comments

_WHOLE_LINE_COMMENT = re.compile(r"(^|\n)#[^\n]*(\n|$)")
_LINE_END_COMMENT = re.compile(r"#[^\n]*(\n|$)")


def strip_comments(text: str) -> str:
    """Remove ``#`` comments as A1111's "Enable comments" option (on by default): each becomes a newline."""
    text = _WHOLE_LINE_COMMENT.sub("\n", text)
    return _LINE_END_COMMENT.sub("\n", text)


# ------------------------------------------------------------------------------------------ extra networks

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetwork:
    """One ``<kind:name:arg...>`` tag: ``<lora:add_detail:0.8>`` -> kind "lora", name "add_detail", args ("0.8",).

    ``name`` is the first positional item (A1111's ``positional[0]``), ``args`` the remaining items as written
    (``key=value`` items included); :attr:`positional` and :attr:`named` split them as A1111's
    ``ExtraNetworkParams`` does.
    """

    kind: str
    name: str
    args: tuple[str, ...] = ()

    @property
    def positional(self) -> tuple[str, ...]:
        """Items after the name that are not ``key=value``."""
        return tuple(a for a in self.args if len(a.split("=", 2)) != 2)

    @property
    def named(self) -> dict[str, str]:
        """``key=value`` items after the name (exactly one ``=``), as A1111 splits them."""
        out: dict[str, str] = {}
        for a in self.args:
            parts = a.split("=", 2)
            if len(parts) == 2:
                out[parts[0]] = parts[1]
        return out

    def multiplier(self, index: int = 0, default: float = 1.0) -> float:
        """Positional argument ``index`` as a float (LoRA: 0 = text-encoder weight), ``default`` if absent or bad."""
        pos = self.positional
        if index >= len(pos):
            return default
        try:
            return float(pos[index])
        except ValueError:
            return default


def _make_extra_network(kind: str, raw: str) -> ExtraNetwork:
    items = raw.split(":")
    for k, item in enumerate(items):
        if len(item.split("=", 2)) != 2:  # the first positional item is the name
            return ExtraNetwork(kind, item, tuple(items[:k] + items[k + 1 :]))
    return ExtraNetwork(kind, "", tuple(items))


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """Cut every ``<kind:args>`` tag out of the prompt (A1111 ``extra_networks.parse_prompt``): (clean, tags).

    ``kind`` is any word (lora, lyco, hypernet, ...); the tag is replaced by nothing, so surrounding spaces
    and commas stay as typed.
    """
    found: list[ExtraNetwork] = []

    def cut(m: re.Match[str]) -> str:
        found.append(_make_extra_network(m.group(1), m.group(2)))
        return ""

    return _EXTRA_NETWORK.sub(cut, prompt), found


# ---------------------------------------------------------------------------------------------------- AND

_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable-diffusion sub-prompts (Liu et al. 2022): ``"a AND b :0.5"`` -> ``[("a", 1.0), (" b", 0.5)]``.

    As A1111's ``get_multicond_prompt_list``: split on the word ``AND``; a trailing ``:number`` is the
    sub-prompt's weight (default 1); trailing whitespace is dropped, leading whitespace kept.
    """
    out: list[tuple[str, float]] = []
    for sub in _AND.split(prompt):
        m = _AND_WEIGHT.search(sub)
        if m is None:  # the pattern matches every string; kept for totality
            out.append((sub, 1.0))
            continue
        text, weight = m.group(1), m.group(2)
        try:
            out.append((text, float(weight) if weight is not None else 1.0))
        except ValueError:  # a digit class float() rejects: keep the text whole, weight 1
            out.append((sub.rstrip(), 1.0))
    return out


def multicond_prompt_list(prompts: list[str]) -> tuple[list[list[tuple[int, float]]], list[str]]:
    """Batch form of :func:`split_and`: per prompt ``[(index into flat, weight)]``, plus the unique sub-prompts."""
    flat: list[str] = []
    index: dict[str, int] = {}
    per_prompt: list[list[tuple[int, float]]] = []
    for prompt in prompts:
        row = []
        for text, weight in split_and(prompt):
            if text not in index:
                index[text] = len(flat)
                flat.append(text)
            row.append((index[text], weight))
        per_prompt.append(row)
    return per_prompt, flat


# --------------------------------------------------------------------------------------------- scheduling

# lark's common.SIGNED_NUMBER with optional whitespace around it: the tail of ``[a:b:NUMBER]``.
_NUMBER_TAIL = re.compile(
    r"\s*([+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+))\s*"
)
_CLOSE = {"[": "]", "(": ")"}


@dataclass(frozen=True)
class _Construct:
    """A valid ``[...]`` construct of the schedule grammar: its span and the ``:`` / ``|`` at its depth."""

    start: int  # index of "["
    end: int  # index of "]"
    kind: str  # "scheduled" or "alternate" (emphasis needs no record: it is copied as text)
    seps: tuple[int, ...]  # separator indices at depth 0
    number: str = ""  # scheduled: the NUMBER token


@dataclass
class _Frame:
    start: int
    bracket: str
    seps: list[int]


def _find_constructs(text: str) -> dict[int, _Construct] | None:
    """One left-to-right pass: every valid scheduled/alternate ``[...]`` by start index; None if nothing parses.

    Inside a construct every bracket must itself form a valid construct, so one invalid bracket makes every
    enclosing open bracket invalid too: those are dropped together and become literal characters.
    """
    found: dict[int, _Construct] = {}
    stack: list[_Frame] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 >= n or text[i + 1] == "\n":
                return None  # a backslash must escape a character: no parse at all
            i += 2
            continue
        if c in "[(":
            stack.append(_Frame(i, c, []))
        elif c in ":|":
            if stack:
                stack[-1].seps.append(i)
        elif c in "])" and stack:
            frame = stack.pop()
            construct = _close(text, frame, i) if _CLOSE[frame.bracket] == c else False
            if construct is False:
                stack.clear()  # this bracket is invalid, and so is every bracket around it
            elif construct is not None:
                found[frame.start] = construct
        i += 1
    return found


def _close(text: str, frame: _Frame, end: int) -> _Construct | bool | None:
    """Validate a bracket pair with its depth-0 separators: a record, None (plain emphasis) or False (invalid)."""
    kinds = [text[s] for s in frame.seps]
    if frame.bracket == "(":
        return None if "|" not in kinds and kinds.count(":") <= 1 else False
    if not kinds:
        return None  # [x] emphasis
    if ":" not in kinds:
        return _Construct(frame.start, end, "alternate", tuple(frame.seps))
    if "|" in kinds or len(kinds) > 2:
        return False
    m = _NUMBER_TAIL.fullmatch(text, frame.seps[-1] + 1, end)
    if m is None:
        return False
    return _Construct(frame.start, end, "scheduled", tuple(frame.seps), m.group(1))


def _has_top_level_pipe(text: str, constructs: dict[int, _Construct]) -> bool:
    """True when a ``|`` lies outside every alternation: then the grammar has no parse.

    Inside a valid emphasis bracket every ``|`` belongs to a nested alternation, so skipping the recorded
    constructs and reading everything else as text finds exactly the stray ones.
    """
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
        elif c == "[" and i in constructs:
            i = constructs[i].end + 1
        elif c == "|":
            return True
        else:
            i += 1
    return False


def _when(number: str, steps: int, int_offset: int, flt_offset: float, old: bool) -> int:
    """A1111's step of ``[a:b:number]``: fractions (a ``.`` in the number) scale by ``steps``; clamped to steps."""
    v = float(number)
    if old:
        v = v * steps if v < 1 else v
    elif "." in number:
        v = (v - flt_offset) * steps
    else:
        v = v - int_offset
    if math.isnan(v):
        return -1
    if math.isinf(v):
        return steps if v > 0 else -1
    return min(steps, int(v))


def _text_at(text: str, constructs: dict[int, _Construct], whens: dict[int, int], step: int) -> str:
    """The prompt text in effect at ``step``: scheduled parts chosen, alternations rotated."""
    out: list[str] = []
    resume: list[tuple[int, int]] = []  # (continue at, span end) of enclosing spans
    i, end = 0, len(text)
    while True:
        if i >= end:
            if not resume:
                return "".join(out)
            i, end = resume.pop()
            continue
        c = text[i]
        if c == "\\":
            out.append(text[i : i + 2])
            i += 2
            continue
        construct = constructs.get(i) if c == "[" else None
        if construct is None:
            out.append(c)
            i += 1
            continue
        bounds = [construct.start, *construct.seps, construct.end]
        if construct.kind == "alternate":
            k = (step - 1) % (len(bounds) - 1)
            lo, hi = bounds[k] + 1, bounds[k + 1]
        elif len(construct.seps) == 2:  # [before:after:when]
            lo, hi = (bounds[0] + 1, bounds[1]) if step <= whens[construct.start] else (bounds[1] + 1, bounds[2])
        else:  # [after:when]: nothing before
            lo, hi = (i, i) if step <= whens[construct.start] else (bounds[0] + 1, bounds[1])
        resume.append((construct.end + 1, end))
        i, end = lo, hi


def prompt_schedule(
    prompt: str, steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """``[(end_step, text)]``: the text to use up to and including each end step (A1111 prompt editing).

    ``[from:to:when]`` switches at ``when``, ``[to:when]`` adds and ``[from::when]`` removes text; a number with
    a ``.`` is a fraction of ``steps``, one without is a step number (``int()`` truncation, clamped to
    ``steps``; values below 1 never switch). ``[a|b]`` alternates every step. With ``hires_steps`` the
    schedule is for the hires pass: integers count from ``steps``, fractions from 1.0 (``[x:1.5]`` switches
    halfway through hires), as A1111 does unless ``use_old_scheduling``. A prompt the grammar cannot read
    is used as written for all steps.
    """
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, total = 0, 0.0, steps
    else:
        int_offset, flt_offset, total = steps, 1.0, hires_steps
    constructs = _find_constructs(prompt)
    if constructs is None or _has_top_level_pipe(prompt, constructs):
        return [(total, prompt)]
    ends = {total}
    whens: dict[int, int] = {}
    for start, c in constructs.items():
        if c.kind == "scheduled":
            whens[start] = _when(c.number, total, int_offset, flt_offset, use_old_scheduling)
            if whens[start] >= 1:
                ends.add(whens[start])
        else:
            ends.update(range(1, total + 1))
    return [(t, _text_at(prompt, constructs, whens, t)) for t in sorted(ends)]


def prompt_schedules(
    prompts: list[str], steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[list[tuple[int, str]]]:
    """:func:`prompt_schedule` for each prompt (A1111 ``get_learned_conditioning_prompt_schedules``)."""
    cache: dict[str, list[tuple[int, str]]] = {}
    for p in prompts:
        if p not in cache:
            cache[p] = prompt_schedule(p, steps, hires_steps, use_old_scheduling)
    return [cache[p] for p in prompts]


def cond_index_at_step(schedule: list[tuple[int, str]], step: int) -> int:
    """Which schedule entry a sampler uses at 0-based ``step``: the first with ``step <= end_step``, else 0."""
    for k, (end_step, _) in enumerate(schedule):
        if step <= end_step:
            return k
    return 0


# -------------------------------------------------------------------------------------------- attention

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_WEIGHT = -1.0

_ATTENTION_TOKEN = re.compile(
    r"\\[()\[\]\\]"  # escaped bracket or backslash
    r"|\\"  # a lone backslash (dropped)
    r"|[(\[]"  # opening bracket
    r"|:\s*([+-]?[.\d]+)\s*\)"  # ":1.3)" closing a weighted round bracket
    r"|[)\]]"  # closing bracket
    r"|[^\\()\[\]:]+"  # text
    r"|:"  # a colon that is not a weight
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Emphasis pieces: ``(x)`` x1.1, ``((x))`` x1.21, ``(x:1.3)``, ``[x]`` /1.1, ``\\(`` literal, ``BREAK``.

    As A1111's ``parse_prompt_attention``: ``BREAK`` is the piece ``("BREAK", -1.0)``; round and square
    brackets keep separate stacks; unclosed brackets apply from where they open to the end; equal-weight
    neighbours merge; an empty prompt gives ``[("", 1.0)]``. A ``BREAK`` inside brackets has its weight
    multiplied too, and is then ordinary text.
    """
    res: list[list] = []  # [text, weight] pairs, mutated in place as brackets close
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    def add_text(run: str) -> None:
        for k, part in enumerate(_BREAK.split(run)):
            if k > 0:
                res.append(["BREAK", BREAK_WEIGHT])
            res.append([part, 1.0])

    pos = 0
    while pos < len(text):
        m = _ATTENTION_TOKEN.match(text, pos)
        if m is None:  # cannot happen (every character starts some token); keep the rest as text
            add_text(text[pos:])
            break
        tok, weight = m.group(0), m.group(1)
        if weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:  # ":..)" and the like: the colon is text, the rest reads on as usual
                add_text(":")
                pos += 1
                continue
            scale(round_open.pop(), factor)
        elif tok[0] == "\\":
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif tok == ")" and round_open:
            scale(round_open.pop(), ROUND_MULTIPLIER)
        elif tok == "]" and square_open:
            scale(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            add_text(tok)
        pos = m.end()

    for start in round_open:
        scale(start, ROUND_MULTIPLIER)
    for start in square_open:
        scale(start, SQUARE_MULTIPLIER)
    if not res:
        res = [["", 1.0]]

    merged: list[list] = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]
