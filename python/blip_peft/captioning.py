"""`blip_peft.generate`: images in, caption strings out, preprocessing overlapped with decoding."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        raise TypeError("pass images (PIL images, paths, bytes or arrays), or call model.generate(pixel_values=...)")
    return [images]


def generate(
    model: Any,
    processor: Any,
    images: Any,
    prompt: str | Sequence[str] | None = None,
    batch_size: int = 32,
    strip_prompt: bool = False,
    **kwargs: Any,
) -> list[str]:
    """Captions for `images` (PIL images, paths, encoded bytes, HWC uint8 arrays, or a list mixing them).

    Images are preprocessed in batches of `batch_size` on a background thread while the previous batch
    decodes (decoding releases the GIL). Captions are decoded with special tokens skipped; with a `prompt`
    (e.g. "a photography of") the caption starts with it, as transformers returns it, unless
    `strip_prompt=True`. Without one, the model's `caption_prompt` is used when it has one (a `PeftModel`
    whose adapter was trained with `train(prompt=...)`, saved with it in `caption_config.json`); pass
    ``prompt=""`` for none. Other keyword arguments go to `model.generate` (`max_new_tokens`, `num_beams`, ...).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    items = _as_list(images)
    if not items:
        return []
    if prompt is None:
        prompt = getattr(model, "caption_prompt", None)
    if prompt == "":
        prompt = None
    prompts: list[str] | None
    if prompt is not None and not isinstance(prompt, str):
        prompts = list(prompt)
        if len(prompts) != len(items) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string, or a list of strings with one per image")
    else:
        prompts = None if prompt is None else [prompt] * len(items)
    chunks = [
        (items[i : i + batch_size], None if prompts is None else prompts[i : i + batch_size])
        for i in range(0, len(items), batch_size)
    ]

    def prepare(chunk: tuple[list[Any], list[str] | None]) -> Any:
        chunk_images, chunk_prompts = chunk
        if chunk_prompts is None:
            return processor(images=chunk_images, return_tensors="pt")
        return processor(images=chunk_images, text=chunk_prompts, padding=True, return_tensors="pt")

    captions: list[str] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, chunks[0])
        for index in range(len(chunks)):
            inputs = pending.result()
            if index + 1 < len(chunks):
                pending = pool.submit(prepare, chunks[index + 1])
            ids = model.generate(
                pixel_values=inputs["pixel_values"],
                input_ids=inputs.get("input_ids") if prompts is not None else None,
                attention_mask=inputs.get("attention_mask") if prompts is not None else None,
                **kwargs,
            )
            texts = processor.batch_decode(ids, skip_special_tokens=True)
            if strip_prompt and prompts is not None:
                chunk_prompts = chunks[index][1] or []
                texts = [_strip(t, processor, p) for t, p in zip(texts, chunk_prompts, strict=True)]
            captions.extend(texts)
    return captions


def _strip(text: str, processor: Any, prompt: str) -> str:
    """`text` without its leading prompt (compared as the tokenizer normalises it, e.g. lowercased)."""
    decoded_prompt = processor.batch_decode(
        [processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]], skip_special_tokens=True
    )[0]
    if text.startswith(decoded_prompt):
        return text[len(decoded_prompt) :].lstrip()
    return text
