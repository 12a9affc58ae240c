"""The synthetic world's questions: answers re-derived from the pixels (colours, counts and sizes read back as
tests/test_world.py reads them for captions; an object's kind is its colour's phrase in the caption), and the
VQA accuracy metric with the benchmark's answer normalisation."""

from __future__ import annotations

import re

import pytest
from test_world import pixels, scene_from_pixels

from blip_peft import world
from blip_peft.metrics import normalize_vqa_answer, vqa_accuracy
from blip_peft.world import COLOURS, KINDS, describe, parse_caption, sample_scene, scene_questions

_SINGULAR = {plural: kind for kind, plural in KINDS.items()}


def answer_from_pixels(question: str, found: dict, kind_of: dict[str, str]) -> str:
    """The answer to one of `scene_questions`' questions, from the objects read off the pixels (`found`: colour ->
    [(size class, row, column)]) and each colour's kind."""
    if question == "how many objects are there?":
        return str(sum(len(objects) for objects in found.values()))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        kind = _SINGULAR[m[1]]
        return str(sum(len(objs) for colour, objs in found.items() if kind_of.get(colour) == kind))
    if m := re.fullmatch(r"what colour is the (small|large) (\w+)\?", question):
        size, kind = m[1], m[2]
        hits = [c for c, objs in found.items() if kind_of.get(c) == kind for s, _, _ in objs if s == size]
        assert len(hits) == 1, (question, hits)
        return hits[0]
    if m := re.fullmatch(r"is there a (\w+)\?", question):
        return "yes" if any(objs and kind_of.get(c) == m[1] for c, objs in found.items()) else "no"
    if m := re.fullmatch(r"what shape (is|are) the (\w+) objects?\?", question):
        objects = found[m[2]]
        assert (len(objects) == 1) == (m[1] == "is"), (question, objects)
        return kind_of[m[2]]
    raise AssertionError(f"unknown question {question!r}")


@pytest.mark.parametrize("size", [96, 384])
@pytest.mark.parametrize("domain", ["base", "target"])
def test_answers_match_the_pixels(domain: str, size: int) -> None:
    kinds_seen, answers_seen = set(), set()
    for seed in range(30):
        scene = sample_scene(2000 + seed, domain)
        qa = scene_questions(scene)
        assert qa == scene_questions(sample_scene(2000 + seed, domain))  # a pure function of the scene
        assert len({q for q, _ in qa}) == len(qa)  # no question twice
        found, _ = scene_from_pixels(pixels(scene, size), list(COLOURS))
        kind_of = {p.colour: p.kind for p in parse_caption(describe(scene)).phrases}
        for question, answer in qa:
            assert answer_from_pixels(question, found, kind_of) == answer, (describe(scene), question, answer)
            assert normalize_vqa_answer(answer) == answer  # already in the evaluation's normal form
            kinds_seen.add(question.split()[0])
            answers_seen.add(answer)
    assert kinds_seen == {"how", "what", "is"}
    assert {"yes", "no", "0", "1", "2"} <= answers_seen


def test_vqa_dataset_items() -> None:
    items = world.vqa_dataset(3, seed=1, size=64)
    scenes = [item["scene"] for item in world.make_dataset(3, seed=1, size=64)]
    assert [(it["question"], it["answer"]) for it in items] == [qa for s in scenes for qa in scene_questions(s)]
    assert all(it["image"].size == (64, 64) for it in items)
    assert set(items[0]) == {"image", "question", "answer", "scene"}


def test_normalize_vqa_answer() -> None:
    cases = {
        "Two": "2",
        "two.": "2",
        "The red": "red",
        "a circle!": "circle",
        "dont": "don't",
        "1,000": "1000",
        "3.5": "3.5",
        "yes, it is": "yes it is",
        "  Yes\n": "yes",
        "left-hand": "left hand",
    }
    for given, want in cases.items():
        assert normalize_vqa_answer(given) == want, given
    with pytest.raises(TypeError):
        normalize_vqa_answer(2)  # type: ignore[arg-type]


def test_vqa_accuracy() -> None:
    assert vqa_accuracy(["2", "red", "no"], ["two", "Red", "yes"]) == pytest.approx(2 / 3)
    # Ten annotators: the benchmark's formula (each left out in turn, min(1, matches / 3)).
    refs = ["yes"] * 2 + ["no"] * 8
    assert vqa_accuracy(["yes"], [refs]) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy(["no"], [refs]) == pytest.approx(1.0)
    assert vqa_accuracy(["maybe"], [refs]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy(["a"], ["a", "b"])
    with pytest.raises(TypeError):
        vqa_accuracy("a", "a")
