"""Synthetic captioned dataset: coloured shapes with sizes, positions, counts and backgrounds, captions in English.

Each sample is drawn from a seed (sample ``i`` of seed ``s`` is always the same), rendered with PIL at 4x and
box-downsampled (anti-aliased edges), and comes with its caption and its structured spec, which the adherence
detector (:mod:`sumie.tiny.adherence`) scores generated images against.

Layout rules the detector relies on: every object lies inside its own cell of a 3x3 grid (no two objects share a
cell, so they never touch); triangles and stars point up; squares are axis-aligned; small objects span 0.11-0.15 of
the image side, large ones 0.22-0.26; the background differs from every object colour by >= ``MIN_CONTRAST`` in RGB.

New shapes (:data:`NEW_SHAPES`: a five-point star; a bar, a horizontal rectangle three times as wide as tall, as
wide as a square of its size) are an extension for adapter training (LoRA, textual inversion): they only appear when
a :class:`SceneMix` asks for them (``star > 0``, ``bar > 0``) and in :func:`new_shape_prompts`; the default mix,
split and evaluation prompts are those sumie-tiny was trained and measured on, draw for draw. (sumie-tiny's VAE
cannot carry a star: it decodes one as a pentagon or a blob, so an adapter that leaves the VAE alone cannot teach the
shape to that model; bars survive its round trip.)

Train/held-out split: :data:`DEFAULT_HELDOUT` lists (colour, shape) and (colour, grid cell) pairs that no training
image ever contains (not even unmentioned in the caption); :func:`heldout_prompts` only yields prompts that state at
least one of them, so they test attribute combinations never seen together in training.
Do not flip the images horizontally for augmentation: captions name left and right.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from sumie.errors import ConfigError

__all__ = [
    "ALL_SHAPES", "BACKGROUNDS", "COLORS", "DEFAULT_HELDOUT", "MIN_CONTRAST", "POSITIONS", "POSITION_PHRASES",
    "RELATIONS", "SHAPES", "SIZES", "SIZE_RANGES", "HeldOut", "Instance", "ObjectSpec", "Sample", "Scene", "SceneSpec",
    "TrainSet",
    "NEW_SHAPES", "bar_prompts", "heldout_prompts", "make_caption", "new_shape_prompts", "parse_caption", "realize",
    "render", "render_caption", "render_mask", "sample_spec", "seen_prompts", "star_prompts", "word_prompts",
]

SHAPES = ("circle", "square", "triangle")  # the shapes of the default mix (what sumie-tiny knows)
NEW_SHAPES = ("star", "bar")  # only with SceneMix(star > 0 / bar > 0) or new_shape_prompts
ALL_SHAPES = (*SHAPES, *NEW_SHAPES)
BAR_ASPECT = 3  # a bar's width / height (its width is the extent, as a square's side)
STAR_INNER = 0.5  # inner / outer radius of a drawn star (a regular pentagram is 0.38; fatter reads at 8 px)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 230), "yellow": (250, 230, 40),
    "purple": (150, 50, 200), "orange": (245, 130, 0), "white": (255, 255, 255), "black": (0, 0, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "light blue": (160, 200, 240),
    "pink": (250, 190, 200),
}
SIZES = ("small", "large")
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.11, 0.15), "large": (0.22, 0.26)}  # of the image side
# grid cell k = 3 * row + column
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")  # objects[0] <relation> objects[1]
MIN_CONTRAST = 100.0  # least RGB distance between the background and any object colour of a sample
_CELL_MARGIN = 0.02  # least gap between an object and its cell's edge (fraction of the image side)
_SUPERSAMPLE = 4

# phrasing (the parser below accepts exactly these)
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "at the top left", "in the top left corner"),
    "top right": ("in the top right", "at the top right", "in the top right corner"),
    "bottom left": ("in the bottom left", "at the bottom left", "in the bottom left corner"),
    "bottom right": ("in the bottom right", "at the bottom right", "in the bottom right corner"),
    "top": ("at the top", "in the top middle"),
    "bottom": ("at the bottom", "in the bottom middle"),
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "center": ("in the center", "in the middle"),
}
_RELATION_PHRASES = {
    "left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
    "above": ("above",), "below": ("below", "under"),
}
_BACKGROUND_SUFFIXES = ("on a {} background", "on {}", "against a {} background", "with a {} background")
_PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ")
_COUNT_WORDS = {1: "a", 2: "two", 3: "three"}

# how often training captions state each optional attribute
_P_SIZE, _P_POSITION, _P_BACKGROUND = 0.5, 0.6, 0.5


@dataclass(frozen=True)
class SceneMix:
    """The mix of scene kinds in training captions: ``one`` object, a ``count`` of 2-3 alike objects or ``two``
    different objects (shares that sum to 1); of the two-object captions, the share that states a ``relation`` and the
    share that states both objects' ``positions`` (the rest state no placement); ``star`` and ``bar`` = the chance an
    object is that new shape (else one of the three default shapes; all 0 draws exactly as before new shapes
    existed); ``colors`` = the object colours drawn (empty: all of :data:`COLORS`)."""

    one: float = 0.45
    count: float = 0.15
    two: float = 0.40
    relation: float = 0.35
    positions: float = 0.30
    star: float = 0.0
    bar: float = 0.0
    colors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in MIX_KEYS[:-1]:
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ConfigError(f"synthetic mix {key} must be a number in [0, 1], got {value!r}")
        total = self.one + self.count + self.two
        if abs(total - 1) > 1e-6:
            raise ConfigError(f"synthetic mix one + count + two must sum to 1, got {total:g} "
                              f"({self.one:g} + {self.count:g} + {self.two:g}); e.g. one = 0.3, count = 0.1, two = 0.6")
        bad = [c for c in self.colors if c not in COLORS] if isinstance(self.colors, tuple) else [self.colors]
        if bad:
            raise ConfigError(f"synthetic mix colors must be a list of {', '.join(COLORS)}; got {bad[0]!r}")
        if sum(self.new_shapes.values()) > 1 + 1e-6:
            raise ConfigError(f"synthetic mix shares of new shapes ({' + '.join(NEW_SHAPES)}) must sum to <= 1, got "
                              f"{sum(self.new_shapes.values()):g}")
        if self.relation + self.positions > 1 + 1e-6:
            raise ConfigError(f"synthetic mix relation + positions are shares of the two-object captions and must be "
                              f"<= 1, got {self.relation:g} + {self.positions:g}")

    @property
    def new_shapes(self) -> dict[str, float]:
        """The chance of each new shape (:data:`NEW_SHAPES` order; 0 for the ones not asked for)."""
        return {shape: getattr(self, shape) for shape in NEW_SHAPES}

    @classmethod
    def from_options(cls, options: object) -> SceneMix:
        """From a ``mix = { two = 0.6, ... }`` table of a run config (unnamed keys keep their defaults)."""
        if isinstance(options, SceneMix):
            return options
        if not isinstance(options, dict):
            raise ConfigError(f"synthetic mix must be a table like {{ one = 0.3, count = 0.1, two = 0.6 }}, "
                              f"got {options!r}")
        for key in options:
            if key not in MIX_KEYS:
                raise ConfigError(f"unknown key {key!r} in the synthetic mix; valid keys: {', '.join(MIX_KEYS)}")
        if isinstance(options.get("colors"), list):
            options = {**options, "colors": tuple(options["colors"])}
        return cls(**options)


MIX_KEYS = ("one", "count", "two", "relation", "positions", *NEW_SHAPES, "colors")
DEFAULT_MIX = SceneMix()  # what sumie-tiny was trained on; the evaluation prompts always use it


@dataclass(frozen=True)
class ObjectSpec:
    """One kind of object a caption asks for; ``None`` = not stated (rendered at random)."""

    shape: str
    color: str
    size: str | None = None
    position: str | None = None  # only with count == 1
    count: int = 1


@dataclass(frozen=True)
class SceneSpec:
    """What a caption states: its objects, optional background, optional relation ``objects[0] rel objects[1]``."""

    objects: tuple[ObjectSpec, ...]
    background: str | None = None
    relation: str | None = None

    @property
    def kind(self) -> str:
        """``"one"`` (one kind of object, any count) or ``"two"`` (two different objects)."""
        return "one" if len(self.objects) == 1 else "two"


@dataclass(frozen=True)
class Instance:
    """One drawn object; centre and extent (bounding-box side) are fractions of the image side."""

    shape: str
    color: str
    size: str
    cell: int
    cx: float
    cy: float
    extent: float


@dataclass(frozen=True)
class Scene:
    """A fully concrete scene: background, drawn instances (grouped per spec object) and the relation."""

    background: str
    objects: tuple[tuple[Instance, ...], ...]
    relation: str | None = None

    @property
    def instances(self) -> tuple[Instance, ...]:
        """All drawn instances, flattened."""
        return tuple(i for group in self.objects for i in group)

    def full_spec(self) -> SceneSpec:
        """A spec stating everything drawn: one object per instance, with its size and position."""
        objs = tuple(ObjectSpec(i.shape, i.color, i.size, POSITIONS[i.cell]) for i in self.instances)
        return SceneSpec(objs, self.background, self.relation)


@dataclass(frozen=True)
class HeldOut:
    """Attribute combinations absent from training: (colour, shape) and (colour, position) pairs."""

    color_shape: frozenset[tuple[str, str]] = frozenset()
    color_position: frozenset[tuple[str, str]] = frozenset()

    def allows(self, color: str, shape: str | None = None, position: str | None = None) -> bool:
        """Whether an object with these attributes may appear in training (``None`` = not decided yet)."""
        if shape is not None and (color, shape) in self.color_shape:
            return False
        return position is None or (color, position) not in self.color_position

    def novel(self, spec: SceneSpec) -> bool:
        """Whether a spec states at least one held-out combination."""
        return any(not self.allows(o.color, o.shape, o.position) for o in spec.objects)

    def novelties(self, spec: SceneSpec) -> set[str]:
        """Which kinds of held-out pair a spec states: {"color_shape", "color_position"}."""
        out = set()
        for o in spec.objects:
            if (o.color, o.shape) in self.color_shape:
                out.add("color_shape")
            if o.position is not None and (o.color, o.position) in self.color_position:
                out.add("color_position")
        return out


# each colour keeps >= 2 shapes and 8 of its 9 cells in training; each shape is held out with 2 colours
DEFAULT_HELDOUT = HeldOut(
    color_shape=frozenset({("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "triangle"),
                           ("purple", "square"), ("orange", "circle")}),
    color_position=frozenset({("red", "top left"), ("green", "bottom right"), ("blue", "center"),
                              ("yellow", "top right"), ("purple", "bottom left"), ("orange", "top"),
                              ("white", "left"), ("black", "right")}),
)


@dataclass
class Sample:
    """One rendered sample: RGB image, caption, the caption's spec and the concrete scene drawn."""

    image: Image.Image
    caption: str
    spec: SceneSpec
    scene: Scene = field(repr=False)


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True))))


# object colour -> the backgrounds it may be drawn on (a constant table)
_BACKGROUNDS_OF: dict[str, frozenset[str]] = {
    c: frozenset(b for b, brgb in BACKGROUNDS.items() if _contrast(brgb, rgb) >= MIN_CONTRAST)
    for c, rgb in COLORS.items()
}


def _backgrounds_for(colors: Sequence[str]) -> list[str]:
    """Backgrounds at least ``MIN_CONTRAST`` away from every given object colour (in ``BACKGROUNDS`` order)."""
    return [b for b in BACKGROUNDS if all(b in _BACKGROUNDS_OF[c] for c in colors)]


def _check_spec(spec: SceneSpec) -> None:
    """Raise ConfigError when a spec names unknown attributes or cannot be drawn."""
    if not 1 <= len(spec.objects) <= 2:
        raise ConfigError(f"a synthetic scene has 1 or 2 kinds of object, got {len(spec.objects)}")
    for o in spec.objects:
        for value, allowed, what in ((o.shape, ALL_SHAPES, "shape"), (o.color, COLORS, "colour")):
            if value not in allowed:
                raise ConfigError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
        if o.size is not None and o.size not in SIZES:
            raise ConfigError(f"unknown size {o.size!r}; use small or large")
        if o.position is not None and o.position not in POSITIONS:
            raise ConfigError(f"unknown position {o.position!r}; use one of {', '.join(POSITIONS)}")
        if o.count not in (1, 2, 3) or (o.count > 1 and (o.position is not None or len(spec.objects) > 1)):
            raise ConfigError("counts of 2 or 3 are only for a single kind of object without a position")
    if spec.background is not None and spec.background not in BACKGROUNDS:
        raise ConfigError(f"unknown background {spec.background!r}; use one of {', '.join(BACKGROUNDS)}")
    if spec.background is not None and spec.background not in _backgrounds_for([o.color for o in spec.objects]):
        raise ConfigError(f"a {spec.background} background is too close to an object colour; pick another")
    if spec.relation is not None and (spec.relation not in RELATIONS or len(spec.objects) != 2):
        raise ConfigError(f"relation {spec.relation!r} needs two objects and one of {', '.join(RELATIONS)}")
    if spec.relation is not None and any(o.position is not None for o in spec.objects):
        raise ConfigError("a prompt states either a relation between its objects or their positions, not both")
    if len(spec.objects) == 2:
        a, b = spec.objects
        if (a.color, a.shape) == (b.color, b.shape):
            raise ConfigError("the two objects of a scene must differ in colour or shape")
        if a.position is not None and a.position == b.position:
            raise ConfigError("the two objects of a scene must be in different positions")


def _relation_holds(rel: str, cell_a: int, cell_b: int) -> bool:
    (ra, ca), (rb, cb) = divmod(cell_a, 3), divmod(cell_b, 3)
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


def realize(spec: SceneSpec, rng: random.Random, heldout: HeldOut | None = None) -> Scene:
    """Draw the unstated attributes of ``spec`` at random (avoiding ``heldout`` combinations when given)."""
    _check_spec(spec)
    ok = heldout.allows if heldout is not None else (lambda color, shape=None, position=None: True)
    bg = spec.background or rng.choice(_backgrounds_for([o.color for o in spec.objects]))
    cells: list[list[int]] = [[] for _ in spec.objects]
    taken = {POSITIONS.index(o.position) for o in spec.objects if o.position is not None}
    if spec.relation is not None:
        a, b = spec.objects
        pairs = [(i, j) for i in range(9) for j in range(9) if i != j and _relation_holds(spec.relation, i, j)
                 and ok(a.color, position=POSITIONS[i]) and ok(b.color, position=POSITIONS[j])]
        cells = [[p] for p in rng.choice(pairs)]
    else:
        for k, o in enumerate(spec.objects):
            if o.position is not None:
                cells[k] = [POSITIONS.index(o.position)]
        for k, o in enumerate(spec.objects):
            if o.position is None:
                free = [c for c in range(9) if c not in taken and ok(o.color, position=POSITIONS[c])]
                cells[k] = rng.sample(free, o.count)
                taken.update(cells[k])
    groups = []
    for o, cs in zip(spec.objects, cells, strict=True):
        size = o.size or rng.choice(SIZES)
        group = []
        for c in cs:
            extent = rng.uniform(*SIZE_RANGES[size])
            slack = max(0.0, (1 / 3 - extent) / 2 - _CELL_MARGIN)
            row, col = divmod(c, 3)
            cx = (col + 0.5) / 3 + rng.uniform(-slack, slack)
            cy = (row + 0.5) / 3 + rng.uniform(-slack, slack)
            group.append(Instance(o.shape, o.color, size, c, cx, cy, extent))
        groups.append(tuple(group))
    return Scene(bg, tuple(groups), spec.relation)


def _draw(scene: Scene, resolution: int, mode: str, background: int | tuple[int, int, int],
          colour: dict[str, int] | dict[str, tuple[int, int, int]]) -> Image.Image:
    big = resolution * _SUPERSAMPLE
    img = Image.new(mode, (big, big), background)
    draw = ImageDraw.Draw(img)
    for inst in scene.instances:
        half = inst.extent * big / 2
        x, y = inst.cx * big, inst.cy * big
        box = (x - half, y - half, x + half - 1, y + half - 1)
        fill = colour[inst.color]
        if inst.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif inst.shape == "square":
            draw.rectangle(box, fill=fill)
        elif inst.shape == "star":
            draw.polygon(_star_points(x, y, half), fill=fill)
        elif inst.shape == "bar":
            tall = half / BAR_ASPECT
            draw.rectangle((x - half, y - tall, x + half - 1, y + tall - 1), fill=fill)
        else:
            draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=fill)
    return img.reduce(_SUPERSAMPLE)


def _star_points(x: float, y: float, half: float) -> list[tuple[float, float]]:
    """A five-point star pointing up whose bounding box (side ``2 * half``, centre ``x, y``) is as wide as tall."""
    # outer radius R: width 2 R sin 72 deg; height R (1 + cos 36 deg) is a bit less, the box is centred vertically
    r_out = half / math.sin(math.radians(72))
    top = y - r_out * (1 + math.cos(math.radians(36))) / 2
    cy = top + r_out
    pts = []
    for k in range(10):
        r = r_out if k % 2 == 0 else r_out * STAR_INNER
        a = math.radians(-90 + 36 * k)
        pts.append((x + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def render(scene: Scene, resolution: int = 64) -> Image.Image:
    """Draw a scene as an RGB image of ``resolution`` px (4x supersampled, box-downsampled)."""
    return _draw(scene, resolution, "RGB", BACKGROUNDS[scene.background], COLORS)


def render_mask(scene: Scene, resolution: int = 64) -> Image.Image:
    """The objects' coverage of each pixel as an ``L`` image (255 = object, 0 = background; edges in between)."""
    return _draw(scene, resolution, "L", 0, dict.fromkeys(COLORS, 255))


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(o: ObjectSpec, rng: random.Random, color_words: Mapping[str, str]) -> str:
    words = []
    if o.size is not None:
        words.append(rng.choice(_SIZE_WORDS[o.size]))
    words += [color_words.get(o.color, o.color), o.shape + ("s" if o.count > 1 else "")]
    det = _article(words[0]) if o.count == 1 else _COUNT_WORDS[o.count]
    text = " ".join([det, *words])
    if o.position is not None:
        text += " " + rng.choice(POSITION_PHRASES[o.position])
    return text


def make_caption(spec: SceneSpec, rng: random.Random, color_words: Mapping[str, str] | None = None) -> str:
    """An English caption stating exactly what ``spec`` states, in a randomly chosen phrasing.

    ``color_words`` names object colours with other words (e.g. ``{"red": "crimson"}``: a word to teach).
    """
    _check_spec(spec)
    nps = [_noun_phrase(o, rng, color_words or {}) for o in spec.objects]
    if spec.relation is not None:
        body = f"{nps[0]} {rng.choice(_RELATION_PHRASES[spec.relation])} {nps[1]}"
    else:
        body = " and ".join(nps)
    if spec.background is not None:
        if rng.random() < 0.2:
            return f"{_article(spec.background)} {spec.background} background with {body}"
        body += " " + rng.choice(_BACKGROUND_SUFFIXES).format(spec.background)
    return rng.choice(_PREFIXES) + body


# ---------------------------------------------------------------- parser (inverse of make_caption)

def _alt(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_POSITION_OF = {p: name for name, phrases in POSITION_PHRASES.items() for p in phrases}
_SIZE_OF = {w: name for name, words in _SIZE_WORDS.items() for w in words}
_RELATION_OF = {p: name for name, phrases in _RELATION_PHRASES.items() for p in phrases}
_NP_RE = re.compile(
    rf"^(a|an|one|two|three) (?:({_alt(_SIZE_OF)}) )?({_alt(COLORS)}) ({_alt(ALL_SHAPES)})(s?)"
    rf"(?: ({_alt(_POSITION_OF)}))?$")
_BG_LEAD_RE = re.compile(rf"^an? ({_alt(BACKGROUNDS)}) background with (.+)$")
_BG_TAIL_RE = re.compile(rf"^(.+?),? (?:on an?|on|against an?|with an?) ({_alt(BACKGROUNDS)})(?: background)?$")
_RELATION_RE = re.compile(rf"^(.+?) ({_alt(_RELATION_OF)}) (.+)$")
_PREFIX_RE = re.compile(r"^(?:a picture of|an image of|a drawing of|a photo of) ")
_PROMPT_HELP = ('prompts look like "a small red circle in the top left on a white background", "two blue squares", '
                '"a red circle and a blue square" or "a green triangle to the left of a purple circle"')


def _parse_np(text: str, caption: str) -> ObjectSpec:
    m = _NP_RE.match(text)
    if m is None:
        raise ConfigError(f"cannot read {text!r} in prompt {caption!r}; {_PROMPT_HELP}")
    det, size, color, shape, plural, position = m.groups()
    count = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}[det]
    if (count > 1) != bool(plural):
        raise ConfigError(f"{text!r} in prompt {caption!r}: the count and the plural do not agree")
    return ObjectSpec(shape, color, _SIZE_OF.get(size) if size else None,
                      _POSITION_OF[position] if position else None, count)


def parse_caption(caption: str) -> SceneSpec:
    """The spec of a caption in the synthetic grammar (inverse of :func:`make_caption`); ConfigError otherwise."""
    text = " ".join(caption.lower().replace("grey", "gray").strip().rstrip(".").split())
    text = _PREFIX_RE.sub("", text)
    background = None
    if m := _BG_LEAD_RE.match(text):
        background, text = m.group(1), m.group(2)
    elif m := _BG_TAIL_RE.match(text):
        text, background = m.group(1), m.group(2)
    relation = None
    if m := _RELATION_RE.match(text):
        relation = _RELATION_OF[m.group(2)]
        parts = [m.group(1), m.group(3)]
    else:
        parts = text.split(" and ")
    spec = SceneSpec(tuple(_parse_np(p, caption) for p in parts), background, relation)
    _check_spec(spec)
    return spec


# ---------------------------------------------------------------- sampling

def _random_shape(rng: random.Random, new_shapes: Mapping[str, float]) -> str:
    """A new shape with its chance in ``new_shapes``, else one of :data:`SHAPES` (no extra draw when all are 0)."""
    if any(p > 0 for p in new_shapes.values()):
        u = rng.random()
        for shape, p in new_shapes.items():
            if u < p:
                return shape
            u -= p
    return rng.choice(SHAPES)


def _random_object(rng: random.Random, count: int, p_position: float, mix: SceneMix = DEFAULT_MIX) -> ObjectSpec:
    size = rng.choice(SIZES) if rng.random() < _P_SIZE else None
    position = rng.choice(POSITIONS) if count == 1 and rng.random() < p_position else None
    shape = _random_shape(rng, mix.new_shapes)
    return ObjectSpec(shape, rng.choice(mix.colors or list(COLORS)), size, position, count)


def _random_spec(rng: random.Random, kind: str | None = None, mix: SceneMix = DEFAULT_MIX) -> SceneSpec:
    """A spec from the training distribution of captions (``kind`` forces "one" or "two" objects)."""
    u = rng.random()
    if kind == "one":
        u *= mix.one + mix.count
    elif kind == "two":
        u = mix.one + mix.count + u * mix.two
    relation = None
    if u < mix.one:
        objects: tuple[ObjectSpec, ...] = (_random_object(rng, 1, _P_POSITION, mix),)
    elif u < mix.one + mix.count:
        objects = (_random_object(rng, rng.choice((2, 3)), 0.0, mix),)
    else:
        v = rng.random()
        with_positions = mix.relation <= v < mix.relation + mix.positions
        objects = (_random_object(rng, 1, float(with_positions), mix),
                   _random_object(rng, 1, float(with_positions), mix))
        relation = rng.choice(RELATIONS) if v < mix.relation else None
    colors = [o.color for o in objects]
    background = rng.choice(_backgrounds_for(colors) or ["gray"]) if rng.random() < _P_BACKGROUND else None
    return SceneSpec(objects, background, relation)


def _valid(spec: SceneSpec) -> bool:
    try:
        _check_spec(spec)
    except ConfigError:
        return False
    return True


def sample_spec(rng: random.Random, heldout: HeldOut | None = DEFAULT_HELDOUT, *, novel: bool = False,
                kind: str | None = None, novelty: str | None = None, mix: SceneMix = DEFAULT_MIX) -> SceneSpec:
    """A random caption spec, allowed in training (``novel=False``) or stating a held-out pair of kind ``novelty``."""
    if novel and heldout is None:
        raise ConfigError("novel specs need a held-out split")
    for _ in range(100_000):
        spec = _random_spec(rng, kind, mix)
        if not _valid(spec):
            continue
        if heldout is None:
            return spec
        found = heldout.novelties(spec)
        if (bool(found) == novel) and (novelty is None or novelty in found):
            return spec
    raise ConfigError("the held-out split leaves no valid scene; hold out fewer combinations")


def _scene(rng: random.Random, heldout: HeldOut | None, mix: SceneMix) -> tuple[SceneSpec, Scene]:
    """The first draws of every sample: its spec, then where its objects go (no image: render draws nothing)."""
    spec = sample_spec(rng, heldout, mix=mix)
    return spec, realize(spec, rng, heldout)


def _sample(rng: random.Random, resolution: int, heldout: HeldOut | None, mix: SceneMix,
            color_words: Mapping[str, str] | None = None) -> Sample:
    spec, scene = _scene(rng, heldout, mix)
    return Sample(render(scene, resolution), make_caption(spec, rng, color_words), spec, scene)


def _check_resolution(resolution: int) -> None:
    if resolution < 32 or resolution % 8:
        raise ConfigError(f"synthetic resolution {resolution} must be a multiple of 8 and >= 32 (e.g. 64 or 128)")


def to_tensor(image: Image.Image) -> Tensor:
    """PIL RGB image -> float tensor [3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class TrainSet(torch.utils.data.Dataset):
    """Training split: item ``i`` -> (image [3, H, W] in [-1, 1], caption), deterministic in (seed, mix, i).

    ``color_words`` renames colours in the captions (``{"red": "crimson"}``), e.g. to teach a new word.
    """

    def __init__(self, resolution: int = 64, length: int = 100_000, seed: int = 0,
                 heldout: HeldOut | None = DEFAULT_HELDOUT, mix: SceneMix | dict[str, Any] = DEFAULT_MIX,
                 color_words: Mapping[str, str] | None = None) -> None:
        _check_resolution(resolution)
        if length < 1:
            raise ConfigError(f"synthetic dataset length must be >= 1, got {length}")
        self.resolution, self.length, self.seed, self.heldout = resolution, length, seed, heldout
        self.mix = SceneMix.from_options(mix)
        self.color_words = _check_color_words(color_words)

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> random.Random:
        if not 0 <= index < self.length:
            raise IndexError(f"sample {index} out of range for a synthetic set of {self.length}")
        return random.Random(f"sumie-synthetic:{self.seed}:{index}")

    def sample(self, index: int) -> Sample:
        """Sample ``index`` with its PIL image, caption, spec and scene."""
        return _sample(self._rng(index), self.resolution, self.heldout, self.mix, self.color_words)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        s = self.sample(index)
        return to_tensor(s.image), s.caption

    def mask(self, index: int) -> Tensor:
        """Where the objects of item ``index`` are: [1, H, W] float32 in [0, 1] (for foreground-weighted losses)."""
        _, scene = _scene(self._rng(index), self.heldout, self.mix)  # as sample(), without the RGB image
        arr = torch.from_numpy(np.asarray(render_mask(scene, self.resolution), dtype=np.uint8).copy())
        return arr.float().div_(255.0).unsqueeze(0)

    def uint8_batch(self, start: int, stop: int) -> tuple[Tensor, list[str]]:
        """Samples ``start..stop-1`` as one uint8 tensor [N, 3, H, W] and their captions (for in-memory caches)."""
        samples = [self.sample(i) for i in range(start, stop)]
        arr = np.stack([np.asarray(s.image, dtype=np.uint8) for s in samples])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), [s.caption for s in samples]


def heldout_prompts(n: int, kind: str = "one", seed: int = 0,
                    heldout: HeldOut = DEFAULT_HELDOUT) -> list[tuple[str, SceneSpec]]:
    """``n`` distinct held-out prompts of one kind of object ("one", counts 1-3) or two objects ("two")."""
    return _prompts(n, kind, f"sumie-heldout:{kind}:{seed}", heldout, novel=True)


def seen_prompts(n: int, kind: str = "one", seed: int = 0,
                 heldout: HeldOut = DEFAULT_HELDOUT) -> list[tuple[str, SceneSpec]]:
    """``n`` distinct prompts whose attribute pairs all occur in training (the baseline for held-out scores)."""
    return _prompts(n, kind, f"sumie-seen:{kind}:{seed}", heldout, novel=False)


def new_shape_prompts(shape: str, n: int, kind: str = "one", seed: int = 0,
                      heldout: HeldOut = DEFAULT_HELDOUT) -> list[tuple[str, SceneSpec]]:
    """``n`` distinct prompts with a new ``shape``: every object one ("one"), or at least one of two objects ("two")."""
    if shape not in NEW_SHAPES:
        raise ConfigError(f"unknown new shape {shape!r}; use one of {', '.join(NEW_SHAPES)}")
    mix = SceneMix(**{shape: 1.0 if kind == "one" else 0.5})
    return _prompts(n, kind, f"sumie-{shape}:{kind}:{seed}", heldout, novel=False, mix=mix,
                    keep=lambda spec: any(o.shape == shape for o in spec.objects))


def star_prompts(n: int, kind: str = "one", seed: int = 0,
                 heldout: HeldOut = DEFAULT_HELDOUT) -> list[tuple[str, SceneSpec]]:
    """``n`` distinct prompts with stars (:func:`new_shape_prompts`)."""
    return new_shape_prompts("star", n, kind, seed, heldout)


def bar_prompts(n: int, kind: str = "one", seed: int = 0,
                heldout: HeldOut = DEFAULT_HELDOUT) -> list[tuple[str, SceneSpec]]:
    """``n`` distinct prompts with bars (:func:`new_shape_prompts`)."""
    return new_shape_prompts("bar", n, kind, seed, heldout)


def word_prompts(n: int, kind: str = "one", seed: int = 0, color_words: Mapping[str, str] | None = None,
                 heldout: HeldOut = DEFAULT_HELDOUT) -> list[tuple[str, SceneSpec]]:
    """``n`` distinct seen prompts naming a renamed colour by its new word (``{"red": "crimson"}``), with its spec."""
    words = _check_color_words(color_words)
    if not words:
        raise ConfigError("word prompts need color words, e.g. {\"red\": \"crimson\"}")
    return _prompts(n, kind, f"sumie-word:{kind}:{seed}", heldout, novel=False, color_words=words,
                    keep=lambda spec: any(o.color in words for o in spec.objects))


def _check_color_words(color_words: Mapping[str, str] | None) -> dict[str, str]:
    words = dict(color_words or {})
    for color, word in words.items():
        if color not in COLORS:
            raise ConfigError(f"color_words: unknown colour {color!r}; use one of {', '.join(COLORS)}")
        if not isinstance(word, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", word):
            raise ConfigError(f"color_words: the word for {color} must be one lower-case word, got {word!r}")
    return words


def _prompts(n: int, kind: str, rng_seed: str, heldout: HeldOut, novel: bool, mix: SceneMix = DEFAULT_MIX,
             keep: Callable[[SceneSpec], bool] | None = None,
             color_words: Mapping[str, str] | None = None) -> list[tuple[str, SceneSpec]]:
    if kind not in ("one", "two"):
        raise ConfigError(f'prompt kind must be "one" or "two", got {kind!r}')
    rng = random.Random(rng_seed)
    out: list[tuple[str, SceneSpec]] = []
    seen: set[str] = set()
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        novelty = ("color_shape", "color_position")[len(out) % 2]  # half of each, when the split has both
        if not novel or not heldout.color_shape or not heldout.color_position:
            novelty = None
        spec = sample_spec(rng, heldout, novel=novel, kind=kind, novelty=novelty, mix=mix)
        if keep is not None and not keep(spec):
            continue
        caption = make_caption(spec, rng, color_words)
        if caption not in seen:
            seen.add(caption)
            out.append((caption, spec))
    return out


def render_caption(caption: str, resolution: int = 64, seed: int = 0) -> tuple[Image.Image, Scene]:
    """A ground-truth render of a caption (unstated attributes drawn from ``seed``) and the scene drawn."""
    _check_resolution(resolution)
    scene = realize(parse_caption(caption), random.Random(f"sumie-render:{seed}:{caption}"))
    return render(scene, resolution), scene
