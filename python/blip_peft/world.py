"""A synthetic captioning world: seeded scenes of coloured shapes, rendered with PIL and captioned in plain English.

It is made to pretrain a small BLIP model on one domain (``"base"``) and to show LoRA fine-tuning on a held-out
one (``"target"``), with captions that are a deterministic function of the pixels, so exact match can reach 1.0.

A scene holds 1 to 3 *groups*; a group is 1 to 3 objects of one kind, one colour and one size class. Every group
of a scene has its own colour. The groups sit in disjoint cells of the image: the whole image (``"single"``), side
by side (``"row"``) or one above the other (``"column"``). The caption reads::

    one group     "<group> on a <pattern> background"
    two groups    "<group> <relation> <group> on a <pattern> background"
                  relation: "to the left of" | "to the right of" | "above" | "below"
    three groups  "<middle group> between <group> and <group> on a <pattern> background"

where ``<group>`` is ``"a"``/``"two"``/``"three"``, then ``"small"``/``"large"``, the colour and the kind (plural
from two on): ``"two small red circles to the left of a large blue square on a striped background"``.

Canonical order (so that one image has exactly one caption): with two groups the one named first is the one whose
kind comes first in `KINDS` (then whose colour comes first in `COLOURS`), and the relation tells where it lies; with
three groups the middle one (along the row or column) is named first, then the two others left to right, or top
to bottom.

The domains (`DOMAINS`):

- ``"base"``: kinds circle, square, triangle, star; colours red, orange, yellow, green, blue, purple; backgrounds
  plain, noisy, gradient, striped, checkered; captions as above.
- ``"target"`` differs in three ways a model trained on base has to learn:

  1. three new kinds, **heart**, **cross** (a plus sign) and **diamond** (a tall rhombus), drawn alongside the
     base kinds;
  2. two new colours, **pink** and **cyan**, alongside the base colours;
  3. a new caption style: every caption starts with **"a picture of"**.

  Every target scene holds at least one group of a new kind or a new colour (scenes are drawn as in base, from
  the larger lists, and redrawn until one does). Backgrounds, sizes, counts and layouts are the base ones.

Pixels: object colours are pure, saturated RGB values (max - min channel >= 150; any two differ by at least 90
in some channel); backgrounds are muted (max - min channel <= 36 everywhere; the noise is grey), so each object's
colour can be read back from its interior pixels, which keep their exact value. Objects never touch each other and
never cross their group's cell. Sizes are areas: a small object has the area of a circle of radius 4.5% of the
image side, a large one of 8% (each within +/- 6%), whatever its kind. The tests read colours, counts, size
classes and relations back from the pixels at 96 and 384 pixels (they hold down to 64; at 48 the small objects
of a group may merge).

Determinism: a scene is a pure function of its seed (`sample_scene`), the image a pure function of the scene, the
size and the anti-aliasing switch (`render`), the caption a pure function of the scene (`describe`).
`make_dataset` and `write_imagefolder` derive item ``i`` from ``(seed, domain, i)`` alone, so the first ``k`` items
do not depend on ``n``.

Questions (`scene_questions`, `vqa_dataset`): each scene also answers a fixed list of questions, a pure function
of the scene: how many objects (of each kind present, and of the domain's first absent kind), what colour the
object of a size and kind is (when only one object has them), whether there is a kind (yes for those present, no
for the first absent one), what shape the objects of a colour are. Answers are single words (counts as digits).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from blip_peft.metrics import tokenize

__all__ = [
    "BACKGROUND_PATTERNS",
    "COLOURS",
    "COUNT_WORDS",
    "DOMAINS",
    "KINDS",
    "RELATIONS",
    "SIZES",
    "Background",
    "Domain",
    "Group",
    "Item",
    "ParsedCaption",
    "Phrase",
    "Scene",
    "describe",
    "distractor_caption",
    "iter_dataset",
    "make_dataset",
    "parse_caption",
    "render",
    "retrieval_pairs",
    "sample_scene",
    "scene_questions",
    "vocabulary",
    "vqa_dataset",
    "write_imagefolder",
]

RGB = tuple[int, int, int]

#: Every object colour of every domain, in canonical order, with its exact RGB value.
COLOURS: dict[str, RGB] = {
    "red": (225, 25, 25),
    "orange": (255, 130, 0),
    "yellow": (240, 220, 0),
    "green": (0, 180, 30),
    "blue": (30, 60, 235),
    "purple": (150, 30, 210),
    "pink": (250, 90, 200),
    "cyan": (0, 200, 230),
}

#: Every object kind of every domain, in canonical order, with its plural.
KINDS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "heart": "hearts",
    "cross": "crosses",
    "diamond": "diamonds",
}

#: Size classes and the radius (fraction of the image side) of the circle with the same area.
SIZES: dict[str, float] = {"small": 0.045, "large": 0.08}

#: Background patterns and their caption word.
BACKGROUND_PATTERNS: dict[str, str] = {
    "plain": "plain",
    "noisy": "noisy",
    "gradient": "gradient",
    "striped": "striped",
    "checkered": "checkered",
}

#: How a caption says a group's count.
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}

#: The words relating groups: the first four between two groups, "between" for three.
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below", "between")

# Geometry, as fractions of the image side.
_MARGIN = 0.03  # between the image border and every object
_GROUP_GAP = 0.05  # between the cells of two groups
_ITEM_GAP = 0.025  # between the bounding circles of two objects of one group
_SCALE_JITTER = 0.06  # each object's area radius is its size class's radius times 1 +/- this
_MAX_ANGLE = 15.0  # degrees of rotation either way (circles are not rotated)
_MAX_BG_SPREAD = 36  # max - min channel of any background colour


@dataclass(frozen=True)
class Domain:
    """What a domain's scenes and captions may hold.

    Attributes:
        name: the domain's name (a key of `DOMAINS`).
        kinds: object kinds scenes are drawn from (uniformly), a subset of `KINDS`.
        colours: object colours scenes are drawn from (uniformly, without repeats in a scene), a subset of `COLOURS`.
        patterns: background patterns (uniformly), a subset of `BACKGROUND_PATTERNS`.
        prefix: words every caption starts with (``""`` for none).
        novel_kinds, novel_colours: when either is non-empty, every scene has a group of one of these kinds or
            one of these colours (scenes are redrawn until one does).
    """

    name: str
    kinds: tuple[str, ...]
    colours: tuple[str, ...]
    patterns: tuple[str, ...]
    prefix: str = ""
    novel_kinds: tuple[str, ...] = ()
    novel_colours: tuple[str, ...] = ()

    def accepts(self, scene: Scene) -> bool:
        """Whether `scene` may be drawn in this domain (its kinds, colours, pattern and novelty rule)."""
        if any(g.kind not in self.kinds or g.colour not in self.colours for g in scene.groups):
            return False
        if scene.background.pattern not in self.patterns:
            return False
        if self.novel_kinds or self.novel_colours:
            return any(g.kind in self.novel_kinds or g.colour in self.novel_colours for g in scene.groups)
        return True


_BASE_KINDS = ("circle", "square", "triangle", "star")
_BASE_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
_NEW_KINDS = ("heart", "cross", "diamond")
_NEW_COLOURS = ("pink", "cyan")

#: The domains by name. See the module's docstring for how ``"target"`` differs from ``"base"``.
DOMAINS: dict[str, Domain] = {
    "base": Domain("base", _BASE_KINDS, _BASE_COLOURS, tuple(BACKGROUND_PATTERNS)),
    "target": Domain(
        "target",
        _BASE_KINDS + _NEW_KINDS,
        _BASE_COLOURS + _NEW_COLOURS,
        tuple(BACKGROUND_PATTERNS),
        prefix="a picture of",
        novel_kinds=_NEW_KINDS,
        novel_colours=_NEW_COLOURS,
    ),
}


def _domain(name: str) -> Domain:
    if not isinstance(name, str) or name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; the domains are {sorted(DOMAINS)}")
    return DOMAINS[name]


# ---------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Item:
    """One object's placement: centre ``(x, y)`` and `scale` as fractions of the image side (y grows downwards),
    `angle` in degrees (counter-clockwise on screen). `scale` is the radius of the circle with the object's area."""

    x: float
    y: float
    scale: float
    angle: float


@dataclass(frozen=True)
class Group:
    """`count` objects of one kind, colour and size class (``"small"`` or ``"large"``)."""

    kind: str
    colour: str
    size: str
    items: tuple[Item, ...]

    @property
    def count(self) -> int:
        """How many objects the group holds (1 to 3)."""
        return len(self.items)

    @property
    def centroid(self) -> tuple[float, float]:
        """The mean of the objects' centres, as fractions of the image side."""
        return (
            sum(i.x for i in self.items) / len(self.items),
            sum(i.y for i in self.items) / len(self.items),
        )


@dataclass(frozen=True)
class Background:
    """A muted background.

    Attributes:
        pattern: a key of `BACKGROUND_PATTERNS`.
        colour, colour2: the two muted RGB colours (``colour2`` is the second stripe/square colour and the
            gradient's far end; plain and noisy use ``colour`` only).
        angle: degrees; the gradient's direction, the stripes' normal, the checkerboard's rotation.
        period: the stripes' and checkerboard's period, a fraction of the image side.
        noise: the noisy pattern's standard deviation in grey levels.
        seed: seeds the noisy pattern's pixels (with the rendered size).
    """

    pattern: str
    colour: RGB
    colour2: RGB
    angle: float
    period: float
    noise: float
    seed: int


@dataclass(frozen=True)
class Scene:
    """A scene: 1 to 3 groups in a `layout` (``"single"``, ``"row"`` or ``"column"``) on a background.

    ``groups[i]`` lies in cell ``i`` of the layout (left to right, or top to bottom). Build one with
    `sample_scene`; turn it into pixels with `render` and into words with `describe`.
    """

    domain: str
    layout: str
    groups: tuple[Group, ...]
    background: Background

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `Scene.from_dict` turns it back into an equal scene."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        """The scene `Scene.to_dict` (possibly through JSON) described."""
        bg = dict(data["background"])
        bg["colour"] = tuple(int(c) for c in bg["colour"])
        bg["colour2"] = tuple(int(c) for c in bg["colour2"])
        groups = tuple(
            Group(g["kind"], g["colour"], g["size"], tuple(Item(**it) for it in g["items"])) for g in data["groups"]
        )
        return cls(data["domain"], data["layout"], groups, Background(**bg))


# ---------------------------------------------------------------------------------------------------------------
# Shapes: unit polygons centred on their area centroid, farthest vertex at distance 1, pointing up (y down).


def _regular(n: int, phase_deg: float) -> np.ndarray:
    t = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    return np.stack([np.cos(t), -np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.5) -> np.ndarray:
    t = np.deg2rad(90.0 + 180.0 * np.arange(2 * points) / points)
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), -r * np.sin(t)], axis=1)


def _heart(n: int = 96) -> np.ndarray:
    t = 2 * np.pi * np.arange(n) / n
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1)


def _cross(half_width: float = 0.3) -> np.ndarray:
    w = half_width
    return np.array(
        [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)],
        dtype=np.float64,
    )


def _area_and_centroid(p: np.ndarray) -> tuple[float, np.ndarray]:
    x, y = p[:, 0], p[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    cx = ((x + xn) * cross).sum() / (6 * area)
    cy = ((y + yn) * cross).sum() / (6 * area)
    return abs(float(area)), np.array([cx, cy])


def _normalise(p: np.ndarray) -> np.ndarray:
    _, c = _area_and_centroid(p)
    q = p - c
    return q / np.sqrt((q**2).sum(axis=1)).max()


_UNIT_SHAPES: dict[str, np.ndarray] = {
    "circle": _regular(128, 90.0),
    "square": _regular(4, 45.0),
    "triangle": _regular(3, 90.0),
    "star": _star(),
    "heart": _normalise(_heart()),
    "cross": _normalise(_cross()),
    "diamond": np.array([(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)]),
}
# circumradius / area radius of each kind: a kind drawn at `scale` reaches `scale * _REACH[kind]` from its centre
_REACH: dict[str, float] = {k: math.sqrt(math.pi / _area_and_centroid(p)[0]) for k, p in _UNIT_SHAPES.items()}


def _outline(kind: str, item: Item, side: int) -> list[tuple[float, float]]:
    """The object's polygon in pixel coordinates of a ``side x side`` canvas."""
    a = math.radians(item.angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    pts = _UNIT_SHAPES[kind] @ rot * (item.scale * _REACH[kind])
    pts = (pts + np.array([item.x, item.y])) * side - 0.5
    return [(float(x), float(y)) for x, y in pts]


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def _as_rng(rng_or_seed: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (int, np.integer)) and not isinstance(rng_or_seed, bool) and rng_or_seed >= 0:
        return np.random.default_rng(int(rng_or_seed))
    raise TypeError(f"expected a numpy Generator or a non-negative int seed, got {rng_or_seed!r}")


def _cells(layout: str, n: int) -> list[tuple[float, float, float, float]]:
    """The groups' cells ``(x0, y0, x1, y1)``: left to right for a row, top to bottom for a column."""
    lo, hi = _MARGIN, 1.0 - _MARGIN
    if layout == "single":
        return [(lo, lo, hi, hi)]
    step = (hi - lo - (n - 1) * _GROUP_GAP) / n
    spans = [(lo + i * (step + _GROUP_GAP), lo + i * (step + _GROUP_GAP) + step) for i in range(n)]
    if layout == "row":
        return [(a, lo, b, hi) for a, b in spans]
    return [(lo, a, hi, b) for a, b in spans]


def _place(
    rng: np.random.Generator, reach: list[float], cell: tuple[float, float, float, float]
) -> list[tuple[float, float]]:
    """Centres for objects of bounding radii `reach` inside `cell`, bounding circles `_ITEM_GAP` apart."""
    x0, y0, x1, y1 = cell
    for _ in range(20):
        centres: list[tuple[float, float]] = []
        for r in reach:
            for _ in range(30):
                x, y = rng.uniform(x0 + r, x1 - r), rng.uniform(y0 + r, y1 - r)
                if all(
                    math.hypot(x - cx, y - cy) >= r + rc + _ITEM_GAP
                    for (cx, cy), rc in zip(centres, reach, strict=False)
                ):
                    centres.append((float(x), float(y)))
                    break
            else:
                break
        if len(centres) == len(reach):
            return centres
    # Crowded cell: one slot per object along the cell's long side.
    horizontal = (x1 - x0) >= (y1 - y0)
    a0, a1, b0, b1 = (x0, x1, y0, y1) if horizontal else (y0, y1, x0, x1)
    slot = (a1 - a0) / len(reach)
    centres = []
    for i, r in enumerate(reach):
        lo, hi = a0 + i * slot + r + _ITEM_GAP / 2, a0 + (i + 1) * slot - r - _ITEM_GAP / 2
        if lo > hi or b1 - b0 < 2 * r:  # pragma: no cover - the sizes are chosen so that this cannot happen
            raise RuntimeError("objects do not fit their cell")
        a, b = float(rng.uniform(lo, hi)), float(rng.uniform(b0 + r, b1 - r))
        centres.append((a, b) if horizontal else (b, a))
    return centres


def _muted(rng: np.random.Generator, level: float) -> RGB:
    tint = rng.uniform(-_MAX_BG_SPREAD / 2, _MAX_BG_SPREAD / 2, size=3)
    r, g, b = (int(v) for v in np.clip(np.rint(level + tint), 0, 255))
    return (r, g, b)


def _sample_background(rng: np.random.Generator, domain: Domain) -> Background:
    pattern = domain.patterns[int(rng.integers(len(domain.patterns)))]
    level = float(rng.uniform(35, 220))
    delta = float(rng.uniform(50, 110))
    level2 = level + delta if level + delta <= 235 or level - delta < 20 else level - delta
    colour, colour2 = _muted(rng, level), _muted(rng, float(np.clip(level2, 20, 235)))
    return Background(
        pattern=pattern,
        colour=colour,
        colour2=colour2,
        angle=float(rng.uniform(0, 360)),
        period=float(rng.uniform(0.1, 0.18)),
        noise=float(rng.uniform(10, 22)),
        seed=int(rng.integers(2**31)),
    )


def _sample_once(rng: np.random.Generator, domain: Domain) -> Scene:
    n = int(rng.integers(1, 4))
    layout = "single" if n == 1 else ("row", "column")[int(rng.integers(2))]
    colours = [domain.colours[int(i)] for i in rng.choice(len(domain.colours), size=n, replace=False)]
    groups = []
    for colour, cell in zip(colours, _cells(layout, n), strict=True):
        kind = domain.kinds[int(rng.integers(len(domain.kinds)))]
        size = ("small", "large")[int(rng.integers(2))]
        count = int(rng.integers(1, 4))
        scales = [SIZES[size] * float(rng.uniform(1 - _SCALE_JITTER, 1 + _SCALE_JITTER)) for _ in range(count)]
        angles = [0.0 if kind == "circle" else float(rng.uniform(-_MAX_ANGLE, _MAX_ANGLE)) for _ in range(count)]
        centres = _place(rng, [s * _REACH[kind] for s in scales], cell)
        items = tuple(Item(x, y, s, a) for (x, y), s, a in zip(centres, scales, angles, strict=True))
        groups.append(Group(kind, colour, size, items))
    return Scene(domain.name, layout, tuple(groups), _sample_background(rng, domain))


def sample_scene(rng_or_seed: np.random.Generator | int, domain: str = "base") -> Scene:
    """Draw a scene of `domain` (``"base"`` or ``"target"``).

    `rng_or_seed` is a `numpy.random.Generator` (advanced by the draw) or a non-negative int, which stands for
    ``numpy.random.default_rng(seed)``: the same seed and domain give the same scene.
    """
    dom = _domain(domain)
    rng = _as_rng(rng_or_seed)
    for _ in range(10_000):
        scene = _sample_once(rng, dom)
        if dom.accepts(scene):
            return scene
    raise RuntimeError(f"domain {domain!r} accepts no scene")  # pragma: no cover


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """Upsample a coarse ``g x g`` grid (its values at the image's corners and between) to ``size x size``."""
    g = grid.shape[0]
    u = ((np.arange(size) + 0.5) / size) * (g - 1)
    i0 = np.clip(np.floor(u).astype(int), 0, g - 2)
    f = u - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _square_wave(p: np.ndarray, half: float, size: int) -> np.ndarray:
    """0 on even bands ``[2k h, (2k+1) h)`` of `p`, 1 on odd ones, ramped over one pixel across each edge."""
    q = p / half
    odd = (np.floor(q).astype(np.int64) % 2).astype(np.float64)
    to_edge = np.minimum(q - np.floor(q), np.ceil(q) - q) * half * size  # in pixels
    own = np.clip(0.5 + to_edge, 0.0, 1.0)  # the share of the pixel on its own side of the nearest edge
    return odd * own + (1 - odd) * (1 - own)


def _background_pixels(bg: Background, size: int) -> np.ndarray:
    """The background as a float ``(size, size, 3)`` array of grey levels."""
    u = (np.arange(size, dtype=np.float64) + 0.5) / size
    x, y = u[None, :], u[:, None]
    c1 = np.array(bg.colour, dtype=np.float64)
    c2 = np.array(bg.colour2, dtype=np.float64)
    a = math.radians(bg.angle)
    along = math.cos(a) * x + math.sin(a) * y
    across = -math.sin(a) * x + math.cos(a) * y
    if bg.pattern == "plain":
        out = np.broadcast_to(c1, (size, size, 3)).copy()
    elif bg.pattern == "gradient":
        corners = [math.cos(a) * cx + math.sin(a) * cy for cx in (0, 1) for cy in (0, 1)]
        t = (along - min(corners)) / (max(corners) - min(corners))
        out = c1 + t[..., None] * (c2 - c1)
    elif bg.pattern == "striped":
        t = _square_wave(along, bg.period / 2, size)
        out = c1 + t[..., None] * (c2 - c1)
    elif bg.pattern == "checkered":
        fa, fb = _square_wave(along, bg.period / 2, size), _square_wave(across, bg.period / 2, size)
        t = fa + fb - 2 * fa * fb  # soft "exclusive or" of the two stripe sets
        out = c1 + t[..., None] * (c2 - c1)
    elif bg.pattern == "noisy":
        rng = np.random.default_rng([bg.seed, size])
        coarse = _bilinear(rng.standard_normal((7, 7)), size)
        fine = rng.standard_normal((size, size))
        out = c1 + (bg.noise * (0.7 * coarse + 0.7 * fine))[..., None]  # grey noise keeps the colour muted
    else:
        raise ValueError(f"unknown background pattern {bg.pattern!r}")
    return np.clip(out, 0, 255)


def render(scene: Scene, size: int = 384, antialias: bool = True) -> Image.Image:
    """The scene as a ``size x size`` RGB image.

    With `antialias`, objects are drawn at 4x the size and box-filtered down (their edges blend into the
    background; interiors keep their exact colour); without, every object pixel has its exact colour. The same
    scene, size and `antialias` always give the same pixels.
    """
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    size = int(size)
    ss = 4 if antialias else 1
    canvas = Image.new("RGB", (size * ss, size * ss), (0, 0, 0))
    mask = Image.new("L", canvas.size, 0)
    draw_c, draw_m = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    for group in scene.groups:
        for item in group.items:
            outline = _outline(group.kind, item, size * ss)
            draw_c.polygon(outline, fill=COLOURS[group.colour])
            draw_m.polygon(outline, fill=255)
    if ss > 1:
        canvas, mask = canvas.reduce(ss), mask.reduce(ss)
    # The canvas holds colour * coverage (objects never overlap): composite over the background.
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
    out = np.asarray(canvas, dtype=np.float64) + _background_pixels(scene.background, size) * (1.0 - alpha)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------------------------
# Captions


def _phrase_words(count: int, size: str, colour: str, kind: str) -> str:
    noun = kind if count == 1 else KINDS[kind]
    return f"{COUNT_WORDS[count]} {size} {colour} {noun}"


def _group_words(g: Group) -> str:
    return _phrase_words(g.count, g.size, g.colour, g.kind)


def _identity(g: Group) -> tuple[int, int]:
    return list(KINDS).index(g.kind), list(COLOURS).index(g.colour)


def describe(scene: Scene) -> str:
    """The scene's caption (see the module's docstring for the grammar and the canonical order)."""
    groups = scene.groups
    if len(groups) == 1:
        body = _group_words(groups[0])
    elif len(groups) == 2:
        first, other = sorted(groups, key=_identity)
        (fx, fy), (ox, oy) = first.centroid, other.centroid
        if scene.layout == "row":
            relation = "to the left of" if fx < ox else "to the right of"
        else:
            relation = "above" if fy < oy else "below"
        body = f"{_group_words(first)} {relation} {_group_words(other)}"
    elif len(groups) == 3:
        axis = 0 if scene.layout == "row" else 1
        ends0, middle, ends1 = sorted(groups, key=lambda g: g.centroid[axis])
        body = f"{_group_words(middle)} between {_group_words(ends0)} and {_group_words(ends1)}"
    else:
        raise ValueError(f"a scene holds 1 to 3 groups, this one {len(groups)}")
    caption = f"{body} on a {BACKGROUND_PATTERNS[scene.background.pattern]} background"
    prefix = _domain(scene.domain).prefix
    return f"{prefix} {caption}" if prefix else caption


def vocabulary(domains: str | Sequence[str] = ("base", "target")) -> list[str]:
    """Every word a caption of any of `domains` can use, sorted (captions are these words joined by spaces)."""
    names = [domains] if isinstance(domains, str) else list(domains)
    words: set[str] = set()
    for name in names:
        dom = _domain(name)
        words.update(COUNT_WORDS.values())
        words.update(SIZES)
        words.update(dom.colours)
        words.update(dom.kinds)
        words.update(KINDS[k] for k in dom.kinds)
        words.update(BACKGROUND_PATTERNS[p] for p in dom.patterns)
        words.update(w for r in RELATIONS for w in r.split())
        words.update(("and", "on", "background"))
        words.update(dom.prefix.split())
    return sorted(words)


@dataclass(frozen=True)
class Phrase:
    """One group as a caption names it."""

    count: int
    size: str
    colour: str
    kind: str


@dataclass(frozen=True)
class ParsedCaption:
    """A caption taken apart by `parse_caption`.

    Attributes:
        prefix: the style words before the scene (``""`` or ``"a picture of"``).
        phrases: the groups in the caption's order (for ``"between"``: the middle group, then the two others).
        relation: ``None`` for one group, else one of `RELATIONS`.
        background: the background pattern.
    """

    prefix: str
    phrases: tuple[Phrase, ...]
    relation: str | None
    background: str


_PLURALS = {v: k for k, v in KINDS.items()}
_COUNTS = {v: k for k, v in COUNT_WORDS.items()}
_PATTERN_OF_WORD = {v: k for k, v in BACKGROUND_PATTERNS.items()}
_PREFIXES = sorted({d.prefix for d in DOMAINS.values() if d.prefix}, key=len, reverse=True)


def parse_caption(text: str) -> ParsedCaption:
    """Take a caption of the world's grammar (any domain's words) apart; `ValueError` if it is not one.

    Useful to score generated captions attribute by attribute. Case and surrounding spaces are ignored.
    """
    words = tokenize(text)
    pos = 0

    def fail(why: str) -> ValueError:
        return ValueError(f"not a caption of the world ({why}): {text!r}")

    def take(expected: Sequence[str]) -> bool:
        nonlocal pos
        if words[pos : pos + len(expected)] == list(expected):
            pos += len(expected)
            return True
        return False

    def phrase() -> Phrase:
        nonlocal pos
        if len(words) < pos + 4:
            raise fail("a group needs a count, a size, a colour and a kind")
        count_w, size, colour, noun = words[pos : pos + 4]
        if count_w not in _COUNTS or size not in SIZES or colour not in COLOURS:
            raise fail(f"bad group {' '.join(words[pos : pos + 4])!r}")
        count = _COUNTS[count_w]
        if count == 1 and noun in KINDS:
            kind = noun
        elif count > 1 and noun in _PLURALS:
            kind = _PLURALS[noun]
        else:
            raise fail(f"bad noun {noun!r} after {count_w!r}")
        pos += 4
        return Phrase(count, size, colour, kind)

    prefix = next((p for p in _PREFIXES if take(p.split())), "")
    phrases = [phrase()]
    relation: str | None = None
    for rel in RELATIONS:
        if take(rel.split()):
            relation = rel
            phrases.append(phrase())
            if rel == "between":
                if not take(["and"]):
                    raise fail("'between' needs 'and'")
                phrases.append(phrase())
            break
    if len(words) != pos + 4 or words[pos : pos + 2] != ["on", "a"] or words[pos + 3] != "background":
        raise fail("it must end with 'on a <pattern> background'")
    if words[pos + 2] not in _PATTERN_OF_WORD:
        raise fail(f"unknown background {words[pos + 2]!r}")
    if len({p.colour for p in phrases}) != len(phrases):
        raise fail("two groups of one colour")
    return ParsedCaption(prefix, tuple(phrases), relation, _PATTERN_OF_WORD[words[pos + 2]])


# ---------------------------------------------------------------------------------------------------------------
# Datasets


def _item_rng(seed: int, domain: str, index: int) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(domain.encode()), int(index)]))


def _check_count(n: int) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return int(n)


def iter_dataset(n: int, seed: int = 0, domain: str = "base", size: int = 384) -> Iterator[dict[str, Any]]:
    """`make_dataset`'s items one at a time (for datasets too large to hold in memory).

    The arguments are checked at the call, not at the first item.
    """
    _domain(domain)
    _item_rng(seed, domain, 0)
    count = _check_count(n)
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")

    def items() -> Iterator[dict[str, Any]]:
        for i in range(count):
            scene = sample_scene(_item_rng(seed, domain, i), domain)
            yield {"image": render(scene, size), "text": describe(scene), "scene": scene}

    return items()


def make_dataset(n: int, seed: int = 0, domain: str = "base", size: int = 384) -> list[dict[str, Any]]:
    """`n` items ``{"image": PIL.Image (RGB, size x size), "text": caption, "scene": Scene}`` of `domain`.

    Item ``i``'s scene is ``sample_scene(numpy.random.default_rng(SeedSequence([seed, crc32(domain), i])))``, so
    items do not depend on `n`; use different seeds for training and test sets.
    """
    return list(iter_dataset(n, seed, domain, size))


_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP"}


def write_imagefolder(
    folder: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    domain: str = "base",
    size: int = 384,
    image_format: str = "png",
    include_scene: bool = False,
) -> str:
    """Write `make_dataset`'s items as a Hugging Face ``imagefolder``: ``00000.png, ...`` and ``metadata.jsonl``.

    Each metadata line holds ``file_name`` and ``text`` (and, with `include_scene`, ``"scene"``: `Scene.to_dict`).
    JPEG files are written at quality 95 and webp at the default quality: both lossy, so only png (and bmp) keep
    the exact colours.
    The folder is created if needed; files of the same names are overwritten. Returns the folder's path.
    """
    fmt = image_format.lower().lstrip(".")
    if fmt not in _FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_FORMATS)}, got {image_format!r}")
    items = iter_dataset(n, seed, domain, size)
    width = max(5, len(str(max(_check_count(n) - 1, 0))))
    root = os.fspath(folder)
    os.makedirs(root, exist_ok=True)
    meta = os.path.join(root, "metadata.jsonl")
    tmp = meta + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for i, item in enumerate(items):
                name = f"{i:0{width}d}.{fmt}"
                options: dict[str, Any] = {"quality": 95} if _FORMATS[fmt] == "JPEG" else {}
                item["image"].save(os.path.join(root, name), format=_FORMATS[fmt], **options)
                row: dict[str, Any] = {"file_name": name, "text": item["text"]}
                if include_scene:
                    row["scene"] = item["scene"].to_dict()
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, meta)  # metadata.jsonl appears complete or not at all
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return root


# ---------------------------------------------------------------------------------------------------------------
# Questions and answers


def scene_questions(scene: Scene) -> list[tuple[str, str]]:
    """The scene's questions with their answers, in a fixed order (a pure function of the scene):

    - ``"how many objects are there?"``;
    - ``"how many <kinds> are there?"`` for each kind present, then for the domain's first absent kind (``"0"``);
    - ``"what colour is the <size> <kind>?"`` for each size and kind only one object has;
    - ``"is there a <kind>?"``: ``"yes"`` for each kind present, ``"no"`` for the domain's first absent kind;
    - ``"what shape is the <colour> object?"`` / ``"what shape are the <colour> objects?"`` for each group.

    Counts are digits (``"2"``), the VQA evaluation's normal form (`metrics.normalize_vqa_answer`).
    """
    kinds = _domain(scene.domain).kinds
    groups = sorted(scene.groups, key=_identity)
    present = [k for k in kinds if any(g.kind == k for g in groups)]
    absent = [k for k in kinds if k not in present]
    out: list[tuple[str, str]] = [("how many objects are there?", str(sum(g.count for g in groups)))]
    for kind in present + absent[:1]:
        out.append((f"how many {KINDS[kind]} are there?", str(sum(g.count for g in groups if g.kind == kind))))
    for size in SIZES:
        for kind in present:
            matching = [g for g in groups if g.kind == kind and g.size == size]
            if len(matching) == 1 and matching[0].count == 1:
                out.append((f"what colour is the {size} {kind}?", matching[0].colour))
    for kind in present:
        out.append((f"is there a {kind}?", "yes"))
    for kind in absent[:1]:
        out.append((f"is there a {kind}?", "no"))
    for g in groups:
        if g.count == 1:
            out.append((f"what shape is the {g.colour} object?", g.kind))
        else:
            out.append((f"what shape are the {g.colour} objects?", g.kind))
    return out


def vqa_dataset(n: int, seed: int = 0, domain: str = "base", size: int = 384) -> list[dict[str, Any]]:
    """`make_dataset`'s first `n` scenes as VQA items ``{"image", "question", "answer", "scene"}``: every question of
    each scene (`scene_questions`), in order, the scene's image shared by its questions."""
    out = []
    for item in iter_dataset(n, seed, domain, size):
        for question, answer in scene_questions(item["scene"]):
            out.append({"image": item["image"], "question": question, "answer": answer, "scene": item["scene"]})
    return out


# Retrieval: image-text pairs and the texts that do not fit


def distractor_caption(scene: Scene, rng_or_seed: np.random.Generator | int) -> str:
    """A caption that is wrong for `scene` by one attribute: one group's colour (to another colour of the domain
    the scene does not use) or its kind (to another kind of the domain) changed, the rest as `describe` says. A
    hard negative for image-text matching: it differs from the true caption in one word."""
    rng = _as_rng(rng_or_seed)
    domain = _domain(scene.domain)
    target = int(rng.integers(len(scene.groups)))
    group = scene.groups[target]
    used = {g.colour for g in scene.groups}
    colours = [c for c in domain.colours if c not in used]
    kinds = [k for k in domain.kinds if k != group.kind]
    change_colour = bool(colours) and (not kinds or bool(rng.integers(2)))
    if change_colour:
        group = Group(group.kind, colours[int(rng.integers(len(colours)))], group.size, group.items)
    else:
        group = Group(kinds[int(rng.integers(len(kinds)))], group.colour, group.size, group.items)
    groups = tuple(group if i == target else g for i, g in enumerate(scene.groups))
    return describe(Scene(scene.domain, scene.layout, groups, scene.background))


def retrieval_pairs(n: int, seed: int = 0, domain: str = "base", size: int = 384) -> dict[str, Any]:
    """`n` image-text pairs of `domain` for retrieval (`make_dataset`'s items: image ``i`` and its caption ``i``).

    Returns ``{"images", "texts", "scenes", "relevant_texts", "relevant_images"}``: ``relevant_texts[i]`` lists the
    texts that describe image ``i`` (its own caption and any other that is word for word the same: two scenes may
    share a caption), ``relevant_images[j]`` the images text ``j`` describes; what `metrics.retrieval_recall`
    takes.
    """
    items = make_dataset(n, seed, domain, size)
    texts = [item["text"] for item in items]
    by_text: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        by_text.setdefault(text, []).append(i)
    relevant = [by_text[t] for t in texts]
    return {
        "images": [item["image"] for item in items],
        "texts": texts,
        "scenes": [item["scene"] for item in items],
        "relevant_texts": relevant,
        "relevant_images": [list(r) for r in relevant],
    }
