"""bp.metrics.caption_scores against pycocoevalcap 1.2's own scorers (Bleu, Rouge, Cider: pure Python), and the
PTB tokenisation stand-in.

pycocoevalcap is a test dependency (requirements-dev.txt); its PTBTokenizer, METEOR and SPICE need Java and are not
used.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from blip_peft import metrics, world

pytest.importorskip("pycocoevalcap")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402

NAMES = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]


def oracle(references: list[list[str]], candidates: list[str]) -> dict[str, float]:
    """pycocoevalcap's scores, as COCOEvalCap.evaluate computes them after tokenisation."""
    gts = {i: list(r) for i, r in enumerate(references)}
    res = {i: [c] for i, c in enumerate(candidates)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return dict(zip(NAMES, [*bleu, float(rouge), float(cider)], strict=True))


def assert_close(ours: dict[str, float], theirs: dict[str, float], tol: float = 1e-6) -> None:
    assert list(ours) == NAMES
    for name in NAMES:
        assert ours[name] == pytest.approx(theirs[name], abs=tol, rel=0), (name, ours, theirs)


def random_corpus(seed: int, images: int) -> tuple[list[list[str]], list[str]]:
    """Seeded random captions over a small vocabulary (so n-grams repeat): lengths 0..14, words repeated,
    1..5 references per image, candidates sometimes copied from or close to a reference."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(12)] + ["a", "the", "dog", "on", "of"]

    def sentence(lo: int = 0) -> str:
        n = rng.choice([lo, lo, 1, 2, 3] + list(range(lo, 15)))
        words = [rng.choice(vocab) for _ in range(n)]
        if words and rng.random() < 0.3:
            words += [words[-1]] * rng.randint(1, 3)  # repeated words
        return " ".join(words)

    refs, cands = [], []
    for _ in range(images):
        rs = [sentence(lo=1) for _ in range(rng.randint(1, 5))]
        r = rng.random()
        if r < 0.15:
            cand = rng.choice(rs)
        elif r < 0.4:
            words = rng.choice(rs).split()
            cand = " ".join(w for w in words if rng.random() < 0.8)
        else:
            cand = sentence()
        refs.append(rs)
        cands.append(cand)
    return refs, cands


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("images", [1, 2, 7, 60])
def test_random_corpora_equal_pycocoevalcap(seed: int, images: int) -> None:
    refs, cands = random_corpus(seed * 100 + images, images)
    theirs = oracle(refs, cands)
    assert_close(metrics.caption_scores(refs, cands, tokenize=False), theirs)
    # pre-tokenised text (lower case, no punctuation): tokenising first changes nothing
    assert metrics.caption_scores(refs, cands) == metrics.caption_scores(refs, cands, tokenize=False)


def test_edge_cases_equal_pycocoevalcap() -> None:
    cases: list[tuple[list[list[str]], list[str]]] = [
        ([["a b c d"]], [""]),  # empty candidate
        ([["a b c d"], ["e f"]], ["", "e"]),  # empty and one-word candidates
        ([["a a a a a"]], ["a a a a a a a a"]),  # repeated words, clipping
        ([["the cat the cat"], ["x"]], ["the the the the", "x"]),
        ([["a b", "a b c d e f g h", "a"]], ["a b c"]),  # closest reference length (ties: shorter)
        ([["a b c d e"], ["a b c d e"]], ["a b c d e", "a b c d e"]),  # every n-gram in every image: idf 0
        ([["one  two three", " one two"]], ["one two  three"]),  # double spaces: ROUGE splits on " " only
        ([["w"] * 3, ["v w"]], ["w", "v w"]),
    ]
    for refs, cands in cases:
        assert_close(metrics.caption_scores(refs, cands, tokenize=False), oracle(refs, cands))


def world_corpus(n: int, seed: int) -> tuple[list[list[str]], list[str]]:
    """The world's captions: references are an image's caption and captions of nearby scenes (a few words
    apart or not), candidates another scene's caption of the same domain (sometimes the image's own)."""
    rng = random.Random(seed)
    refs, cands = [], []
    for i in range(n):
        domain = "base" if i % 2 else "target"
        own = world.describe(world.sample_scene(seed * 10_000 + i, domain))
        others = [world.describe(world.sample_scene(seed * 10_000 + n + 5 * i + k, domain)) for k in range(4)]
        refs.append([own, *others[: rng.randint(0, 4)]])
        cands.append(own if rng.random() < 0.3 else world.describe(world.sample_scene(rng.randrange(10**6), domain)))
    return refs, cands


def test_world_captions_equal_pycocoevalcap_and_tokenising_moves_nothing() -> None:
    refs, cands = world_corpus(500, seed=3)
    ours = metrics.caption_scores(refs, cands, tokenize=False)
    assert_close(ours, oracle(refs, cands))
    # The world's captions are already PTB-tokenised (lower case, no punctuation): the documented 0.0.
    assert metrics.caption_scores(refs, cands, tokenize=True) == ours
    assert 0.0 < ours["Bleu_4"] < 1.0 and 0.0 < ours["CIDEr"]
    # Raw forms of the same captions (capitals, a final period, a comma) score as the tokenised ones.
    raw_cands = [c[:1].upper() + c[1:] + "." for c in cands]
    raw_refs = [[r.replace(" on a ", ", on a ", 1) for r in rs] for rs in refs]
    assert metrics.caption_scores(raw_refs, raw_cands) == ours


def test_ptb_tokenize() -> None:
    assert metrics.ptb_tokenize("A man riding a horse.") == "a man riding a horse"
    assert metrics.ptb_tokenize(["Don't touch the dog's ball!", ""]) == ["do n't touch the dog 's ball", ""]
    assert metrics.ptb_tokenize('A black-and-white photo, (old) "cat"...') == "a black-and-white photo old cat"
    assert metrics.ptb_tokenize("3.5 ft & 1,000 cats -- they're here") == "3.5 ft & 1,000 cats they 're here"
    for caption in [world.describe(world.sample_scene(s, d)) for s in range(50) for d in ("base", "target")]:
        assert metrics.ptb_tokenize(caption) == caption


def test_raw_text_tokenised_equals_pycocoevalcap_on_tokenised() -> None:
    refs = [["A dog runs on the grass.", "A brown dog, running!"], ["Two cats sleep on a sofa.", "Cats (two) asleep"]]
    cands = ["a dog running on grass", "Two cats on a sofa..."]
    tok_refs = [metrics.ptb_tokenize(r) for r in refs]
    assert_close(metrics.caption_scores(refs, cands), oracle(tok_refs, metrics.ptb_tokenize(cands)))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="references has 1 images but candidates has 2"):
        metrics.caption_scores([["a"]], ["a", "b"])
    with pytest.raises(ValueError, match="references\\[1\\] is empty"):
        metrics.caption_scores([["a"], []], ["a", "b"])
    with pytest.raises(ValueError, match="nothing to score"):
        metrics.caption_scores([], [])
    with pytest.raises(TypeError, match="candidates must be a list"):
        metrics.caption_scores([["a"]], "a")
    with pytest.raises(TypeError, match="references\\[0\\]\\[0\\] must be a string"):
        metrics.caption_scores([[1]], ["a"])
    # a single string is one reference
    assert metrics.caption_scores(["a b c"], ["a b c"]) == metrics.caption_scores([["a b c"]], ["a b c"])


def test_5000_images_5_references_score_as_their_1000_distinct_images() -> None:
    # The benchmark's corpus size (its time is measured in bench/caption_metrics.py, not here): the same 1,000 images
    # repeated 5 times keep every n-gram's document frequency in proportion, so the corpus-level BLEU equals the
    # 1,000 images' own and CIDEr-D's IDF too, but for the candidates' n-grams no reference has (their frequency is
    # floored at 1, so their IDF grows by log 5 and their small share of the score moves a little).
    refs, cands = world_corpus(1000, seed=1)
    refs = [(rs * 5)[:5] for rs in refs]
    once: Any = metrics.caption_scores(refs, cands)
    scores: Any = metrics.caption_scores(refs * 5, cands * 5)
    assert scores["CIDEr"] > 0
    assert scores["Bleu_4"] == pytest.approx(once["Bleu_4"], rel=1e-12)
    assert scores["CIDEr"] == pytest.approx(once["CIDEr"], rel=1e-3)
    assert scores["CIDEr"] != once["CIDEr"]
