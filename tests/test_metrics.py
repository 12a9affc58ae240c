"""The caption metrics (blip_peft.metrics): exact match and corpus BLEU-4 on hand-checked cases."""

from __future__ import annotations

import math

import pytest

from blip_peft.metrics import bleu4, exact_match


def test_exact_match() -> None:
    assert exact_match(["a red circle", "two blue squares"], ["a red circle", "two blue squares"]) == 1.0
    assert exact_match(["a red circle", "two blue squares"], ["a red circle", "a blue square"]) == 0.5
    assert exact_match(["x y"], ["a b"]) == 0.0
    assert exact_match(["  A Red  circle "], ["a red circle"]) == 1.0
    assert exact_match(["a red circle"], [["a blue circle", "a red circle"]]) == 1.0
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_bleu4() -> None:
    refs = ["two small red circles to the left of a blue square", "a large yellow star on a striped background"]
    assert bleu4(refs, refs) == pytest.approx(1.0)
    assert bleu4(["x y z w v"], ["a b c d e"]) == 0.0
    # precisions 5/6, 4/5, 3/4, 2/3 with no brevity penalty: (1/3) ** (1/4)
    assert bleu4(["a b c d e f"], ["a b c d e g"]) == pytest.approx((1 / 3) ** 0.25)
    # all precisions 1, 4 words against 6: brevity penalty exp(1 - 6/4)
    assert bleu4(["a b c d"], ["a b c d e f"]) == pytest.approx(math.exp(-0.5))
    # clipping: each n-gram matches at most as often as the reference holds it (no bigram matches here)
    assert bleu4(["the the the the"], ["the cat the cat"]) == 0.0
    # corpus level: n-gram counts are pooled before the geometric mean
    assert bleu4(["a b c d", "a b c d e f"], ["a b c d", "a b c d e g"]) == pytest.approx(
        ((9 / 10) * (7 / 8) * (5 / 6) * (3 / 4)) ** 0.25
    )
    # several references: clipped by the most generous one, length from the closest one
    assert bleu4(["a b c d e"], [["a b c d e", "q"]]) == pytest.approx(1.0)
    assert 0.0 < bleu4(["a picture of a large red circle"], ["a large red circle on a plain background"]) < 1.0
