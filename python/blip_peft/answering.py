"""`blip_peft.answer`: images and questions in, answer strings out (the VQA head's `generate`, batched)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["answer"]


def _vqa_model(model: Any) -> Any:
    from blip_peft.modeling_vqa import BlipForQuestionAnswering  # noqa: PLC0415
    from blip_peft.peft_model import PeftModel  # noqa: PLC0415

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not isinstance(base, BlipForQuestionAnswering):
        raise TypeError(
            f"answer() needs a blip_peft BlipForQuestionAnswering (or a PeftModel on one), got {type(base).__name__}"
        )
    return base


@torch.no_grad()
def answer(
    model: Any,
    processor: Any,
    images: Any,
    questions: str | Sequence[str],
    batch_size: int = 32,
    **kwargs: Any,
) -> list[str]:
    """The answers to `questions` about `images`, one per question, in order.

    `images`: one image (PIL image, path, bytes, array) or a list; `questions`: one question or a list. One image
    with many questions, many images with one question, or two lists of the same length (question i about image
    i). Questions of the same length in tokens are batched together (at most `batch_size`), so no question is
    padded: the VQA head's answer decoder attends to every question position, padding included (as transformers'
    does), so an answer then depends only on its image and question, not on the batch it ran in. Other keyword
    arguments go to `model.generate` (`max_new_tokens`, default 10; `num_beams`, ...); answers are decoded with
    special tokens skipped.
    """
    _vqa_model(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    image_list = list(images) if isinstance(images, (list, tuple)) else [images]
    question_list = [questions] if isinstance(questions, str) else list(questions)
    if not all(isinstance(q, str) for q in question_list):
        raise TypeError("questions must be a string or a list of strings")
    if not image_list:
        raise ValueError("answer() needs at least one image")
    if not question_list:
        raise ValueError("answer() needs at least one question")
    if any(not q.strip() for q in question_list):
        raise ValueError("a question is empty; ask something (e.g. 'how many circles are there?')")
    if len(image_list) == 1 and len(question_list) > 1:
        image_list = image_list * len(question_list)
    elif len(question_list) == 1 and len(image_list) > 1:
        question_list = question_list * len(image_list)
    elif len(image_list) != len(question_list):
        raise ValueError(
            f"got {len(image_list)} images and {len(question_list)} questions: give one question per image, one "
            "image for all questions, or one question for all images"
        )
    kwargs.setdefault("max_new_tokens", 10)
    ids = processor.tokenizer(question_list)["input_ids"]
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(ids):
        by_length.setdefault(len(row), []).append(i)
    answers: list[str | None] = [None] * len(question_list)
    was_training = model.training
    model.eval()
    try:
        for rows in by_length.values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                pixel_values = processor(images=[image_list[i] for i in chunk], return_tensors="pt")["pixel_values"]
                input_ids = torch.tensor([ids[i] for i in chunk], dtype=torch.long)
                out = model.generate(
                    input_ids=input_ids,
                    pixel_values=pixel_values,
                    attention_mask=torch.ones_like(input_ids),
                    **kwargs,
                )
                for i, text in zip(chunk, processor.batch_decode(out, skip_special_tokens=True), strict=True):
                    answers[i] = text.strip()
    finally:
        model.train(was_training)
    return [a if a is not None else "" for a in answers]
