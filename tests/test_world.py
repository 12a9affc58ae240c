"""The synthetic captioning world: seeded scenes, their pixels and captions agree, domains differ as documented,
imagefolder output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from blip_peft import world
from blip_peft.metrics import tokenize
from blip_peft.world import (
    COLOURS,
    DOMAINS,
    Scene,
    describe,
    make_dataset,
    parse_caption,
    render,
    sample_scene,
    vocabulary,
    write_imagefolder,
)

TOL = 40  # every-channel distance within which a pixel counts as an object colour (objects' interiors are exact)
BG_SPREAD = 36  # max - min channel of every background pixel
NEW_WORDS = {"picture", "pink", "cyan", "heart", "hearts", "cross", "crosses", "diamond", "diamonds"}


def pixels(scene: Scene, size: int, antialias: bool = True) -> np.ndarray:
    return np.asarray(render(scene, size, antialias=antialias)).astype(np.int64)


def spread_of(img: np.ndarray) -> np.ndarray:
    """max - min channel of each pixel (slices: numpy's reductions over a length-3 axis are slow)."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)


def components(mask: np.ndarray) -> list[tuple[int, float, float]]:
    """8-connected components of a boolean mask as (area, mean row, mean column): run-length union-find."""
    parent: list[int] = []

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, stops = np.nonzero(edges == -1)  # row-major like the starts: the i-th run is [starts[i], stops[i])
    runs: list[tuple[int, int, int, int]] = []
    prev: list[tuple[int, int, int]] = []
    cur: list[tuple[int, int, int]] = []
    row = -1
    for r, s, e in zip(rows.tolist(), starts.tolist(), stops.tolist(), strict=True):
        if r != row:
            prev, cur, row = (cur if r == row + 1 else []), [], r
        rid = len(parent)
        parent.append(rid)
        for ps, pe, pid in prev:
            if ps <= e and pe >= s:  # runs [s, e) and [ps, pe) touch, diagonals included
                ra, rb = find(rid), find(pid)
                if ra != rb:
                    parent[rb] = ra
        cur.append((s, e, rid))
        runs.append((r, s, e, rid))
    acc: dict[int, list[float]] = {}
    for r, s, e, rid in runs:
        a = acc.setdefault(find(rid), [0, 0.0, 0.0])
        n = e - s
        a[0] += n
        a[1] += r * n
        a[2] += (s + e - 1) / 2 * n
    return [(int(a), sr / a, sc / a) for a, sr, sc in acc.values()]


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def scene_from_pixels(
    img: np.ndarray, colours: list[str]
) -> tuple[dict[str, list[tuple[str, float, float]]], np.ndarray]:
    """For each colour: its objects as (size class, row, column), read from the pixels alone; and the mask of
    pixels within TOL of any of the colours.

    An object is a connected blob of pixels within TOL of the colour (fragments of anti-aliased tips, under a
    quarter of a small object's area, are ignored); its size class compares its area's circle radius with the
    midpoint of the two classes' radii (sizes are areas whatever the kind).
    """
    size = img.shape[0]
    small, large = world.SIZES["small"], world.SIZES["large"]
    # Only saturated pixels can be within TOL of an object colour (their spread is at least 150 - 2 * TOL).
    rows, cols = np.nonzero(spread_of(img) > BG_SPREAD)
    values = img[rows, cols]
    found = {}
    union = np.zeros(img.shape[:2], dtype=bool)
    for colour in colours:
        near = np.abs(values - np.array(COLOURS[colour])).max(axis=-1) <= TOL
        mask = np.zeros(img.shape[:2], dtype=bool)
        mask[rows[near], cols[near]] = True
        union |= mask
        objects = []
        for area, row, col in components(mask):
            if area < 0.25 * math.pi * (small * size) ** 2:
                continue
            radius = math.sqrt(area / math.pi) / size
            objects.append(("small" if radius < (small + large) / 2 else "large", row, col))
        found[colour] = objects
    return found, union


def test_components_helper() -> None:
    mask = np.array(
        [
            [1, 1, 0, 0, 0, 1],
            [0, 0, 1, 0, 0, 1],
            [0, 0, 0, 0, 0, 0],
            [1, 0, 0, 1, 1, 0],
            [1, 1, 0, 0, 1, 0],
        ],
        dtype=bool,
    )
    assert sorted(components(mask)) == sorted(
        [(3, 1 / 3, 1.0), (2, 0.5, 5.0), (3, 11 / 3, 1 / 3), (3, 10 / 3, 11 / 3)]
    )


# ---------------------------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("domain", ["base", "target"])
def test_same_seed_same_scene_pixels_caption(domain: str) -> None:
    for seed in (0, 1, 12345):
        a, b = sample_scene(seed, domain), sample_scene(seed, domain)
        assert a == b
        assert describe(a) == describe(b)
        assert np.array_equal(pixels(a, 64), pixels(b, 64))
    assert sample_scene(np.random.default_rng(3), domain) == sample_scene(3, domain)


def test_dataset_items_depend_on_seed_domain_index_only() -> None:
    long, short = make_dataset(4, seed=9, domain="target", size=48), make_dataset(2, seed=9, domain="target", size=48)
    for x, y in zip(long, short, strict=False):
        assert x["text"] == y["text"] and x["scene"] == y["scene"]
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    for item in long:
        assert item["image"].mode == "RGB" and item["image"].size == (48, 48)
        assert item["text"] == describe(item["scene"])


def test_different_seeds_differ() -> None:
    for domain in ("base", "target"):
        scenes = [sample_scene(s, domain) for s in range(40)]
        assert len({describe(s) for s in scenes}) >= 38
        assert not np.array_equal(pixels(scenes[0], 64), pixels(scenes[1], 64))
    base, target = make_dataset(5, seed=0, domain="base", size=32), make_dataset(5, seed=0, domain="target", size=32)
    assert all(b["text"] != t["text"] for b, t in zip(base, target, strict=True))
    other = make_dataset(5, seed=1, domain="base", size=32)
    assert sum(a["text"] != b["text"] for a, b in zip(base, other, strict=True)) >= 4


def test_scene_json_round_trip() -> None:
    for seed in range(20):
        scene = sample_scene(seed, "target" if seed % 2 else "base")
        again = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
        assert again == scene
        assert np.array_equal(pixels(again, 48), pixels(scene, 48))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown domain"):
        sample_scene(0, "nope")
    with pytest.raises(ValueError, match="unknown domain"):
        vocabulary("nope")
    with pytest.raises(TypeError):
        sample_scene(-1)
    with pytest.raises(ValueError):
        render(sample_scene(0), size=0)
    with pytest.raises(ValueError):
        make_dataset(1, seed=-3)


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary and domains


def test_caption_words_are_the_vocabulary() -> None:
    assert vocabulary() == vocabulary(("base", "target")) == sorted(vocabulary(("target", "base")))
    for domain in ("base", "target"):
        vocab = vocabulary(domain)
        used: set[str] = set()
        for seed in range(400):
            words = describe(sample_scene(seed, domain)).split()
            assert set(words) <= set(vocab), words
            assert words == tokenize(" ".join(words))  # lower-case words, no punctuation
            used.update(words)
        assert used == set(vocab)  # and every vocabulary word is used
    assert len(vocabulary()) == 44 and len(vocabulary("base")) == 35


def test_target_differs_from_base_as_documented() -> None:
    base, target = DOMAINS["base"], DOMAINS["target"]
    assert set(target.kinds) - set(base.kinds) == {"heart", "cross", "diamond"}
    assert set(target.colours) - set(base.colours) == {"pink", "cyan"}
    assert set(base.kinds) < set(target.kinds) and set(base.colours) < set(target.colours)
    assert set(vocabulary("target")) - set(vocabulary("base")) == NEW_WORDS
    assert set(vocabulary("base")) < set(vocabulary("target"))
    new_kind = new_colour = 0
    for seed in range(200):
        b, t = sample_scene(seed, "base"), sample_scene(seed, "target")
        assert not describe(b).startswith("a picture of") and not set(describe(b).split()) & NEW_WORDS
        assert describe(t).startswith("a picture of ")
        assert all(g.kind in base.kinds and g.colour in base.colours for g in b.groups)
        assert any(g.kind in {"heart", "cross", "diamond"} or g.colour in {"pink", "cyan"} for g in t.groups)
        assert base.accepts(b) and target.accepts(t) and not target.accepts(b)
        new_kind += any(g.kind in {"heart", "cross", "diamond"} for g in t.groups)
        new_colour += any(g.colour in {"pink", "cyan"} for g in t.groups)
    assert new_kind > 100 and new_colour > 50  # both kinds of novelty are common


def test_parse_caption_round_trip() -> None:
    for seed in range(100):
        scene = sample_scene(seed, "target" if seed % 2 else "base")
        parsed = parse_caption(describe(scene))
        assert parsed.prefix == DOMAINS[scene.domain].prefix
        assert parsed.background == scene.background.pattern
        assert {(p.count, p.size, p.colour, p.kind) for p in parsed.phrases} == {
            (g.count, g.size, g.colour, g.kind) for g in scene.groups
        }
        assert (parsed.relation is None) == (len(scene.groups) == 1)
    assert parse_caption("  A Small RED circle on a plain background ").phrases[0].colour == "red"
    for bad in (
        "",
        "a red circle on a plain background",
        "two small red circle on a plain background",
        "a small red circle on a plain",
        "a small red circle to the left of a small red square on a plain background",
        "a small red circle between a small blue square on a plain background",
        "a small red circle on a plain background today",
    ):
        with pytest.raises(ValueError):
            parse_caption(bad)


# ---------------------------------------------------------------------------------------------------------------
# The caption can be read back from the pixels


@pytest.mark.parametrize("size", [96, 384])
@pytest.mark.parametrize("domain", ["base", "target"])
def test_pixels_match_caption(domain: str, size: int) -> None:
    for seed in range(30):
        scene = sample_scene(1000 + seed, domain)
        caption = describe(scene)
        parsed = parse_caption(caption)
        img = pixels(scene, size)
        found, _ = scene_from_pixels(img, list(COLOURS))
        named = {p.colour for p in parsed.phrases}
        for colour, objects in found.items():
            if colour not in named:
                assert objects == [], (caption, colour)
        for phrase in parsed.phrases:
            objects = found[phrase.colour]
            assert len(objects) == phrase.count, (caption, phrase, objects)
            assert {s for s, _, _ in objects} == {phrase.size}, (caption, phrase, objects)

        rows = [[r for _, r, _ in found[p.colour]] for p in parsed.phrases]
        cols = [[c for _, _, c in found[p.colour]] for p in parsed.phrases]
        if parsed.relation == "to the left of":
            assert max(cols[0]) < min(cols[1]), caption
        elif parsed.relation == "to the right of":
            assert min(cols[0]) > max(cols[1]), caption
        elif parsed.relation == "above":
            assert max(rows[0]) < min(rows[1]), caption
        elif parsed.relation == "below":
            assert min(rows[0]) > max(rows[1]), caption
        elif parsed.relation == "between":
            middle, first, last = (0, 1, 2)
            assert any(
                max(axis[first]) < min(axis[middle]) and max(axis[middle]) < min(axis[last]) for axis in (cols, rows)
            ), caption

        # The rest is muted background, or the anti-aliased rim of an object (sharp tips blend for a few pixels).
        _, object_mask = scene_from_pixels(img, sorted(named))
        spread = spread_of(img)
        assert spread[~dilate(object_mask, 4)].max() <= BG_SPREAD, caption


def test_without_antialiasing_every_pixel_is_an_object_colour_or_muted() -> None:
    palette = np.array(list(COLOURS.values()))
    for seed in range(10):
        scene = sample_scene(seed, "target")
        img = pixels(scene, 96, antialias=False)
        exact = (img[:, :, None, :] == palette[None, None]).all(-1).any(-1)
        spread = spread_of(img)
        assert np.all(exact | (spread <= BG_SPREAD))
        assert exact.sum() > 0


def test_backgrounds_are_muted_and_varied() -> None:
    patterns = set()
    for seed in range(60):
        scene = sample_scene(seed)
        patterns.add(scene.background.pattern)
        for c in (scene.background.colour, scene.background.colour2):
            assert max(c) - min(c) <= BG_SPREAD
    assert patterns == set(world.BACKGROUND_PATTERNS)
    names = list(COLOURS)
    for i, a in enumerate(names):
        assert max(COLOURS[a]) - min(COLOURS[a]) >= 150
        for b in names[i + 1 :]:
            assert np.abs(np.array(COLOURS[a]) - np.array(COLOURS[b])).max() > 2 * TOL


# ---------------------------------------------------------------------------------------------------------------
# imagefolder


def test_write_imagefolder_round_trip(tmp_path) -> None:
    folder = write_imagefolder(tmp_path / "train", 5, seed=2, domain="target", size=40, include_scene=True)
    lines = (tmp_path / "train" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5
    expected = make_dataset(5, seed=2, domain="target", size=40)
    for line, item in zip(lines, expected, strict=True):
        row = json.loads(line)
        assert row["text"] == item["text"]
        assert Scene.from_dict(row["scene"]) == item["scene"]
        path = tmp_path / "train" / row["file_name"]
        assert path.is_file() and path.suffix == ".png"
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (40, 40)
            assert np.array_equal(np.asarray(im), np.asarray(item["image"]))
    assert folder == str(tmp_path / "train")

    write_imagefolder(tmp_path / "jpg", 3, seed=2, size=32, image_format="jpg")
    rows = [json.loads(x) for x in (tmp_path / "jpg" / "metadata.jsonl").read_text().splitlines()]
    assert [set(r) for r in rows] == [{"file_name", "text"}] * 3
    assert all(r["file_name"].endswith(".jpg") and (tmp_path / "jpg" / r["file_name"]).is_file() for r in rows)
    with pytest.raises(ValueError, match="image_format"):
        write_imagefolder(tmp_path / "x", 1, image_format="tiff")
    with pytest.raises(ValueError, match="seed"):
        write_imagefolder(tmp_path / "y", 2, seed=-1)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
