"""Caption metrics: corpus scores of generated captions against their references.

`exact_match` and `bleu4` take a list of predictions and, for each, one reference or several; words are
`tokenize`'s (lower-cased, punctuation kept as single marks). The synthetic world (`blip_peft.world`) parses its
captions with the same `tokenize`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["bleu4", "exact_match", "tokenize"]

_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: ``"A red circle."`` -> ``["a", "red", "circle", "."]``."""
    return _TOKEN.findall(text.lower())


def _references(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    if isinstance(preds, str) or isinstance(refs, str):
        raise TypeError("preds and refs are sequences of captions, not single strings")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError("nothing to score")
    out = []
    for r in refs:
        rs = [r] if isinstance(r, str) else list(r)
        if not rs:
            raise ValueError("a prediction has no reference")
        out.append(rs)
    return out


def exact_match(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """The fraction of predictions equal to their reference (or to one of their references).

    Captions are compared as `tokenize` lists: case and spacing do not count, punctuation does.
    """
    all_refs = _references(preds, refs)
    hits = sum(any(tokenize(p) == tokenize(r) for r in rs) for p, rs in zip(preds, all_refs, strict=True))
    return hits / len(preds)


def _ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu4(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002) of `preds` against `refs` (one or several references each), in [0, 1].

    Clipped 1- to 4-gram precisions are summed over the corpus and averaged geometrically with equal weights,
    times the brevity penalty ``exp(1 - r / c)`` when the total prediction length ``c`` is below the total
    reference length ``r`` (for each prediction, the reference length closest to its own, the shorter on ties).
    No smoothing: a corpus without any matching 4-gram scores 0. Words are `tokenize`'s.
    """
    all_refs = _references(preds, refs)
    matched = [0] * 4
    total = [0] * 4
    pred_len = ref_len = 0
    for p, rs in zip(preds, all_refs, strict=True):
        hyp = tokenize(p)
        toks = [tokenize(r) for r in rs]
        pred_len += len(hyp)
        ref_len += min((abs(len(t) - len(hyp)), len(t)) for t in toks)[1]
        for n in range(1, 5):
            counts = _ngrams(hyp, n)
            most: Counter[tuple[str, ...]] = Counter()
            for t in toks:
                most |= _ngrams(t, n)
            matched[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            total[n - 1] += max(len(hyp) - n + 1, 0)
    if pred_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / 4
    brevity = 1.0 if pred_len >= ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision)
