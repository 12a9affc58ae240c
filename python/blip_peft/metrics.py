"""Caption metrics: corpus scores of generated captions against their references.

`caption_scores` gives the field's numbers: pycocoevalcap 1.2's ``Bleu_1``..``Bleu_4``, ``ROUGE_L`` and
``CIDEr`` (CIDEr-D), computed in the Rust core (`src/metrics.rs`) with pycocoevalcap's arithmetic, several
references per image. `ptb_tokenize` is the tokenisation `COCOEvalCap` applies first (Stanford's PTB tokenizer
plus pycocoevalcap's punctuation removal), without Java.

`recall_at_k` / `retrieval_recall` score retrieval: the share of queries with a relevant match among their top k.

`exact_match` and `bleu4` (the demo's quick scores, kept as they were: `bleu4` scores 0 where pycocoevalcap's
BLEU has its tiny guard terms) take a list of predictions and, for each, one reference or several; words are
`tokenize`'s (lower-cased, punctuation kept as single marks). The synthetic world (`blip_peft.world`) parses its
captions with the same `tokenize`.

`vqa_accuracy` scores answers as the VQA benchmark does (`normalize_vqa_answer`: its answer normalisation).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from blip_peft import _blip_peft

__all__ = [
    "bleu4",
    "caption_scores",
    "exact_match",
    "normalize_vqa_answer",
    "ptb_tokenize",
    "recall_at_k",
    "retrieval_recall",
    "tokenize",
    "vqa_accuracy",
]

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


def _caption_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(value).__name__}")
    out = list(value)
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(v).__name__}")
    return out


def ptb_tokenize(texts: str | Sequence[str]) -> Any:
    """Captions as pycocoevalcap's ``PTBTokenizer`` leaves them: lower-cased words joined by single spaces.

    A string gives a string, a list a list. What it reproduces of the Stanford tokenizer and pycocoevalcap's
    punctuation removal: lower case; punctuation split off words and dropped (``. , ? ! : ; - -- ...``, quotes,
    brackets); hyphens inside words and ``.``/``,`` inside numbers kept (``black-and-white``, ``3.5``);
    clitics split off and kept (``don't`` -> ``do n't``, ``dog's`` -> ``dog 's``); other symbols (``&``, ``%``,
    ``/``...) kept as words. Not reproduced: PTB's abbreviations (``u.s.``), URLs and emoticons, and its
    ``-LSB-`` for square brackets (dropped here). Implemented in Rust (`src/metrics.rs`).
    """
    if isinstance(texts, str):
        return _blip_peft.ptb_tokenize([texts])[0]
    return _blip_peft.ptb_tokenize(_caption_list(texts, "texts"))


def caption_scores(
    references: Sequence[str | Sequence[str]], candidates: Sequence[str], *, tokenize: bool = True
) -> dict[str, float]:
    """pycocoevalcap 1.2's corpus scores of `candidates` against `references`, under its names.

    `references` holds, for each candidate, its image's reference captions (a list of strings; a single
    string counts as one reference). Returns ``{"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L",
    "CIDEr"}`` with pycocoevalcap's definitions and arithmetic (equal to its ``Bleu(4)``, ``Rouge()`` and
    ``Cider()`` scorers within 1e-6, checked by the tests): BLEU corpus-level with the "closest" reference
    length and its 1e-15 / 1e-9 guards (no match gives a tiny positive number, not 0), ROUGE-L the mean of
    per-image F-measures (beta 1.2) over the best reference, CIDEr-D with document frequencies from these
    references, sigma 6, clipping and the x10. Scores are on pycocoevalcap's scale (BLEU in [0, 1], CIDEr
    around 0-10; papers print them x100, e.g. BLIP base's COCO CIDEr 133.5 is 1.335 here).

    With ``tokenize=True`` (the default, as `COCOEvalCap` tokenises before scoring) every caption goes
    through `ptb_tokenize` first; ``tokenize=False`` scores the strings as given, words split on white
    space, exactly as pycocoevalcap's scorers read pre-tokenised text. On already tokenised text (lower
    case, no punctuation, single spaces) the two agree exactly; on the synthetic world's captions
    (`blip_peft.world`, lower case and unpunctuated) tokenising moves no score at all (measured: a difference
    of 0.0 on every score, 500 captions of both domains, `tests/test_caption_scores.py`). Scoring 5,000
    images x 5 references took 0.2 s on a busy 2-CPU machine, pycocoevalcap's scorers 5.7 s (bench/RESULTS.md).
    """
    if not isinstance(tokenize, bool):
        raise TypeError(f"tokenize must be True or False, got {type(tokenize).__name__} {tokenize!r}")
    cands = _caption_list(candidates, "candidates")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise TypeError(
            "references must be a list with one list of reference captions per candidate, got "
            f"{type(references).__name__}"
        )
    refs: list[list[str]] = []
    for i, r in enumerate(references):
        refs.append([r] if isinstance(r, str) else _caption_list(r, f"references[{i}]"))
    return dict(_blip_peft.caption_scores(refs, cands, bool(tokenize)))


# ------------------------------------------------------------------------------------------------ VQA accuracy
# The VQA benchmark's answer normalisation (vqaEval.py of the official VQA API): punctuation, number words,
# articles and common contractions.
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "shant": "shan't", "shed": "she'd", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "thats": "that's", "thered": "there'd", "theres": "there's", "theyd": "they'd", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_VQA_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_vqa_answer(answer: str) -> str:
    """An answer as the VQA evaluation compares it: lower case, punctuation removed (a comma inside a number and a
    decimal point kept), number words as digits ("two" -> "2"), articles dropped, contractions spelled with their
    apostrophe ("dont" -> "don't")."""
    if not isinstance(answer, str):
        raise TypeError(f"an answer must be a str, got {type(answer).__name__}")
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        if (p + " " in text or " " + p in text) or _VQA_COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _VQA_PERIOD_STRIP.sub("", out)
    words = []
    for word in out.lower().split():
        word = _VQA_NUMBERS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(_VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """The VQA benchmark's accuracy of `preds` (one answer per question) against `refs` (per question one
    answer, or the annotators' answers), both normalised by `normalize_vqa_answer`.

    With several reference answers a question scores the VQA formula: the mean, over each annotator left out in
    turn, of ``min(1, matches among the others / 3)``; with one reference it scores 1 on an exact (normalised)
    match, else 0. Returns the mean over the questions, in [0, 1].
    """
    questions = _references(preds, refs)
    total = 0.0
    for pred, answers in zip(preds, questions, strict=True):
        got = normalize_vqa_answer(pred)
        gts = [normalize_vqa_answer(a) for a in answers]
        if len(gts) == 1:
            total += float(got == gts[0])
            continue
        scores = [min(1.0, sum(g == got for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
        total += sum(scores) / len(scores)
    return total / len(preds)


def recall_at_k(ranking: Any, relevant: Sequence[Sequence[int]], k: int) -> float:
    """Recall@k of retrieval: the share of queries (rows of `ranking`, each its candidates' indices best first)
    whose first `k` candidates hold at least one of `relevant[query]` (the usual R@k of image-text retrieval).
    `ranking` may be a tensor, an array or nested lists; it must rank at least `k` candidates per query."""
    rows = [list(map(int, row)) for row in (ranking.tolist() if hasattr(ranking, "tolist") else ranking)]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if len(rows) != len(relevant):
        raise ValueError(f"ranking has {len(rows)} queries but relevant has {len(relevant)}; give one list per query")
    if not rows:
        raise ValueError("recall_at_k needs at least one query")
    if any(len(row) < k for row in rows):
        raise ValueError(f"every query must rank at least k={k} candidates (rank with top_k >= {k})")
    if any(not r for r in relevant):
        raise ValueError("every query needs at least one relevant candidate")
    hits = sum(1 for row, rel in zip(rows, relevant, strict=True) if set(row[:k]) & set(rel))
    return hits / len(rows)


def retrieval_recall(
    result: Any,
    relevant_texts: Sequence[Sequence[int]],
    relevant_images: Sequence[Sequence[int]],
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Recall@k both ways of a `blip_peft.rank` result: ``{"image_to_text_r1", "text_to_image_r1", ...}`` for each
    k of `ks` (k capped at the candidates there are), with the relevant texts of each image and images of each
    text (as `world.retrieval_pairs` gives them)."""
    out: dict[str, float] = {}
    for k in ks:
        i2t = min(k, int(result.image_to_text.shape[1]))
        t2i = min(k, int(result.text_to_image.shape[1]))
        out[f"image_to_text_r{k}"] = recall_at_k(result.image_to_text, relevant_texts, i2t)
        out[f"text_to_image_r{k}"] = recall_at_k(result.text_to_image, relevant_images, t2i)
    return out
