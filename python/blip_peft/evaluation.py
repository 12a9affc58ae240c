"""`blip_peft.evaluate`: caption a dataset's images and score the captions as the field does (pycocoevalcap's
BLEU-1..4, ROUGE-L, CIDEr-D via `blip_peft.metrics.caption_scores`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from blip_peft.captioning import generate
from blip_peft.data import as_items
from blip_peft.metrics import caption_scores

#: The BLIP authors' evaluation decoding (LAVIS `caption_coco_ft.yaml`): beam search, 3 beams, 5-20 tokens.
RECIPE_DECODING: dict[str, int] = {"num_beams": 3, "min_new_tokens": 5, "max_new_tokens": 20}

#: The names `caption_scores` (and so `evaluate`) reports, in its order.
METRIC_NAMES: tuple[str, ...] = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")


def _image_key(image: Any) -> Any:
    """What makes two rows the same image: the same path, the same encoded bytes, or the same object."""
    if isinstance(image, (str, os.PathLike)):
        return ("path", os.path.normpath(os.fspath(image)))
    if isinstance(image, (bytes, bytearray)):
        return ("bytes", bytes(image))
    return ("object", id(image))


def group_references(
    dataset: Any, image_column: str = "image", text_column: str = "text"
) -> tuple[list[Any], list[list[str]]]:
    """The dataset's distinct images (in order of first appearance) and each one's reference captions.

    A row's caption may be a string or a list of strings (several references). Rows whose image is the same
    path (after `os.path.normpath`), the same encoded bytes or the very same object (e.g. one PIL image
    in several rows) are one image, their captions pooled. A `datasets.Dataset` builds a new PIL image per
    row access, so give it one row per image with a list of captions (or paths as images).
    """
    if isinstance(dataset, Mapping):
        raise TypeError(
            "evaluate needs images and their reference captions, not a mapping of tensors: pass a list of "
            "{'image', 'text'} rows, an ImageCaptionDataset or a datasets.Dataset"
        )
    pairs = as_items(dataset, image_column, text_column)
    if len(pairs) == 0:
        raise ValueError("the dataset is empty: nothing to evaluate")
    images: list[Any] = []
    references: list[list[str]] = []
    where: dict[Any, int] = {}
    keep: list[Any] = []  # rows' images stay alive while grouping by identity
    for i in range(len(pairs)):
        image, text = pairs[i]
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(
                f"dataset item {i}: {text_column!r} must be a caption (a string) or a non-empty list of captions, "
                f"got {text!r:.80}"
            )
        keep.append(image)
        key = _image_key(image)
        if key not in where:
            where[key] = len(images)
            images.append(image)
            references.append([])
        references[where[key]].extend(texts)
    return images, references


def evaluate(
    model: Any,
    processor: Any,
    dataset: Any,
    *,
    batch_size: int = 32,
    num_beams: int = RECIPE_DECODING["num_beams"],
    min_new_tokens: int = RECIPE_DECODING["min_new_tokens"],
    max_new_tokens: int = RECIPE_DECODING["max_new_tokens"],
    prompt: str | None = None,
    tokenize: bool = True,
    return_captions: bool = False,
    image_column: str = "image",
    text_column: str = "text",
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Captions `dataset`'s images with `model` and scores them against the dataset's captions.

    Returns `blip_peft.metrics.caption_scores`'s dict (``Bleu_1``..``Bleu_4``, ``ROUGE_L``, ``CIDEr``,
    pycocoevalcap's numbers; with ``tokenize=True`` both sides are PTB-tokenised first, as `COCOEvalCap`
    does). With ``return_captions=True`` it also holds ``"captions"`` (one per image) and ``"references"``.

    `dataset` is any form `train` accepts with images and captions (a list of ``{"image", "text"}`` rows, an
    `ImageCaptionDataset`, a `datasets.Dataset`); an image with several references is either one row whose
    caption is a list of strings, or several rows with the same image (see `group_references`).

    Captions come from `blip_peft.generate` in batches of `batch_size`, with the BLIP authors' evaluation
    decoding by default (beam search with 3 beams, 5 to 20 new tokens: transformers' ``num_beams``,
    ``min_new_tokens``, ``max_new_tokens``); other keyword arguments go to `generate` too. With a `prompt`
    (default: the one stored with a `PeftModel`'s adapter, if any) captions continue it and the prompt is
    stripped before scoring, as LAVIS scores them. The model is put in eval mode while it captions.
    """
    images, references = group_references(dataset, image_column, text_column)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        return score_images(
            model,
            processor,
            images,
            references,
            batch_size=batch_size,
            num_beams=num_beams,
            min_new_tokens=min_new_tokens,
            max_new_tokens=max_new_tokens,
            prompt=prompt,
            tokenize=tokenize,
            return_captions=return_captions,
            **generate_kwargs,
        )
    finally:
        if was_training and hasattr(model, "train"):
            model.train()


def score_images(
    model: Any,
    processor: Any,
    images: list[Any],
    references: list[list[str]],
    *,
    batch_size: int = 32,
    prompt: str | None = None,
    tokenize: bool = True,
    return_captions: bool = False,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """`evaluate` on images already grouped with their references (`group_references`), decoding with the
    recipe's settings (`RECIPE_DECODING`) under the given ones, without touching the model's mode: `generate`
    decodes without dropout in any mode, so `train` scores its evaluation set with this on the model it is
    training (lent to Python during the evaluation step)."""
    if prompt is None:
        prompt = getattr(model, "caption_prompt", None)
    captions = generate(
        model,
        processor,
        images,
        prompt=prompt,
        batch_size=batch_size,
        strip_prompt=prompt is not None,
        **{**RECIPE_DECODING, **generate_kwargs},
    )
    scores: dict[str, Any] = dict(caption_scores(references, captions, tokenize=tokenize))
    if return_captions:
        scores["captions"] = captions
        scores["references"] = references
    return scores
