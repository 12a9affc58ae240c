"""`rank(model, processor, images, texts)`: image-text retrieval over whole collections, as BLIP scores it.

Every image and every text is encoded once (in batches): the contrastive (ITC) features give the cosine
similarity of all pairs, and the top-k matches are read both ways (image -> texts, text -> images). With
`rerank_itm=k`, each query's k best candidates by similarity are scored again by the matching head (the text
encoded over the image, ITM) and re-ordered by `itm_logit[match] + similarity`, as BLIP's evaluation
(LAVIS's `compute_sim_matrix`) does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["RETRIEVAL_CONFIG_NAME", "RankResult", "RetrievalTrainResult", "rank", "train_retrieval"]


@dataclass
class RankResult:
    """What `rank` returns.

    - `similarity`: `[images, texts]` float32 cosine similarities (ITC).
    - `image_to_text` / `text_to_image`: `[images, k]` / `[texts, k]` indices of each query's best matches,
      best first (after ITM re-ranking when asked for).
    - `image_to_text_scores` / `text_to_image_scores`: the scores they were ordered by (the similarity, or
      `itm_logit[match] + similarity` when re-ranked).
    """

    similarity: torch.Tensor
    image_to_text: torch.Tensor
    text_to_image: torch.Tensor
    image_to_text_scores: torch.Tensor
    text_to_image_scores: torch.Tensor


def _retrieval_model(model: Any) -> Any:
    from blip_peft.modeling_retrieval import BlipForImageTextRetrieval  # noqa: PLC0415
    from blip_peft.peft_model import PeftModel  # noqa: PLC0415

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not isinstance(base, BlipForImageTextRetrieval):
        raise TypeError(
            f"rank() needs a blip_peft BlipForImageTextRetrieval (or a PeftModel on one), got {type(base).__name__}"
        )
    return base


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@torch.no_grad()
def rank(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    texts: Sequence[str],
    top_k: int = 5,
    rerank_itm: bool | int = False,
    batch_size: int = 32,
    max_length: int | None = None,
) -> RankResult:
    """Scores every image against every text and returns the top-k matches both ways.

    Args:
        model: a `BlipForImageTextRetrieval` (or a `PeftModel` on one); it runs in evaluation mode for the call.
        processor: the model's `BlipProcessor` (images and texts are preprocessed by it).
        images: images as the processor takes them (PIL images, numpy arrays, paths).
        texts: the candidate texts.
        top_k: how many matches to keep per query (at most the number of candidates).
        rerank_itm: False for ITC only; True or an int k: re-rank each query's k best (True: `top_k`) by ITM.
        batch_size: images (and texts) encoded per batch; ITM re-ranking scores that many pairs at once.
        max_length: truncate texts to this many tokens (default: the model's positions).
    """
    base = _retrieval_model(model)
    images, texts = list(images), list(texts)
    if not images:
        raise ValueError("rank() needs at least one image")
    if not texts:
        raise ValueError("rank() needs at least one text")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    top_k = _positive_int(top_k, "top_k")
    batch_size = _positive_int(batch_size, "batch_size")
    if isinstance(rerank_itm, bool):
        rerank = top_k if rerank_itm else 0
    else:
        rerank = _positive_int(rerank_itm, "rerank_itm")
        if rerank < top_k:
            raise ValueError(f"rerank_itm={rerank} must be at least top_k={top_k} (the candidates re-ranked)")
    if max_length is None:
        max_length = int(base.config.text_config.max_position_embeddings)

    was_training = base.training
    base.eval()
    try:
        image_feats, image_embeds = [], []
        for start in range(0, len(images), batch_size):
            pixels = processor(images=images[start : start + batch_size], return_tensors="pt")["pixel_values"]
            feat, embeds = base.get_image_features(pixels)
            image_feats.append(feat.float())
            image_embeds.append(embeds if rerank else None)
        text_feats, text_ids, text_masks = [], [], []
        for start in range(0, len(texts), batch_size):
            # Rows padded to the batch's longest text (masked: each text's features are its own alone).
            enc = processor(
                text=texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            ids, mask = enc["input_ids"], enc["attention_mask"]
            text_feats.append(base.get_text_features(ids, mask).float())
            text_ids.extend(ids.unbind(0))
            text_masks.extend(mask.unbind(0))
        similarity = torch.cat(image_feats) @ torch.cat(text_feats).T
        k_it, k_ti = min(top_k, len(texts)), min(top_k, len(images))
        if not rerank:
            s_it, i_it = similarity.topk(k_it, dim=1)
            s_ti, i_ti = similarity.T.topk(k_ti, dim=1)
            return RankResult(similarity, i_it, i_ti, s_it, s_ti)
        embeds_all = torch.cat(image_embeds)  # type: ignore[arg-type]

        def itm(pairs: list[tuple[int, int]]) -> torch.Tensor:
            """The match logit of each (image, text) pair, `batch_size` pairs at a time. The pairs go in image
            order, so a batch's texts of one image share that image's cross-attention keys/values."""
            order = sorted(range(len(pairs)), key=lambda p: pairs[p][0])
            out = torch.empty(len(pairs))
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                width = max(int(text_masks[pairs[p][1]].sum()) for p in chunk)
                ids = torch.stack([text_ids[pairs[p][1]][:width] for p in chunk])
                mask = torch.stack([text_masks[pairs[p][1]][:width] for p in chunk])
                used = sorted({pairs[p][0] for p in chunk})
                slot = {image: n for n, image in enumerate(used)}
                logits = base.itm_logits(
                    embeds_all[torch.tensor(used)], ids, mask, image_index=[slot[pairs[p][0]] for p in chunk]
                )
                out[torch.tensor(chunk)] = logits[:, 1].float()
            return out

        def reranked(sim: torch.Tensor, k: int, as_pair: Any) -> tuple[torch.Tensor, torch.Tensor]:
            cand_sim, cand = sim.topk(min(rerank, sim.shape[1]), dim=1)
            pairs = [as_pair(q, int(c)) for q in range(sim.shape[0]) for c in cand[q]]
            scores = itm(pairs).view_as(cand_sim) + cand_sim
            order_scores, order = scores.topk(k, dim=1)
            return cand.gather(1, order), order_scores

        i_it, s_it = reranked(similarity, k_it, lambda q, c: (q, c))
        i_ti, s_ti = reranked(similarity.T, k_ti, lambda q, c: (c, q))
        return RankResult(similarity, i_it, i_ti, s_it, s_ti)
    finally:
        base.train(was_training)


# ------------------------------------------------------------------------------------------------- training

RETRIEVAL_CONFIG_NAME = "retrieval_config.json"


@dataclass
class RetrievalTrainResult:
    """What `train_retrieval` returns: the steps taken, the learned temperature, and each logged step's record
    (`blip_peft.train`'s: ``step``, ``epoch``, ``loss`` = ITC + ITM, ``learning_rate``, ``grad_norm``, ...)."""

    global_step: int
    temp: float
    log_history: list[dict[str, Any]]


def train_retrieval(
    model: Any,
    processor: Any,
    dataset: Any,
    *,
    num_train_epochs: int = 1,
    per_device_train_batch_size: int = 8,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    max_steps: int | None = None,
    max_grad_norm: float | None = 1.0,
    temp: float | torch.Tensor | None = None,
    learn_temp: bool = True,
    max_length: int | None = None,
    seed: int = 0,
    logging_steps: int = 1,
    output_dir: str | None = None,
    callback: Any = None,
) -> RetrievalTrainResult:
    """Fine-tunes a retrieval model with BLIP's losses, ITC + ITM on hard negatives: a compatibility wrapper over
    `blip_peft.train` (which trains every BLIP head, with mixed precision, accumulation, checkpoints, resume,
    evaluation and data parallelism), under transformers' `TrainingArguments` names.

    `dataset`: image-text pairs (dicts or a `datasets.Dataset` with "image" and "text"; an optional "image_id"
    marks pairs of one image, else pairs with the same text count as one image's). `temp`: the starting
    temperature (BLIP's 0.07), learned unless `learn_temp=False`, clamped to [0.001, 0.5]. `max_grad_norm=None`
    does not clip. `output_dir`: the adapter (peft's files) and `retrieval_config.json` (`{"temp": ...}`) are
    written there at the end. `callback(log)` is called with each logged step's record.
    """
    from blip_peft.training import train  # noqa: PLC0415

    _retrieval_model(model)
    if max_length is None:
        max_length = int(_retrieval_model(model).config.text_config.max_position_embeddings)
    result = train(
        model,
        processor,
        dataset,
        epochs=_positive_int(num_train_epochs, "num_train_epochs"),
        max_steps=max_steps,
        batch_size=_positive_int(per_device_train_batch_size, "per_device_train_batch_size"),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        max_grad_norm=0.0 if max_grad_norm is None else max_grad_norm,  # 0: no clipping
        temp=temp,
        learn_temp=learn_temp,
        max_length=max_length,
        seed=seed,
        logging_steps=_positive_int(logging_steps, "logging_steps"),
        output_dir=output_dir,
        callback=callback,
        progress=False,
    )
    assert result.temp is not None
    return RetrievalTrainResult(global_step=result.global_step, temp=result.temp, log_history=result.history)
