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
            """The match logit of each (image, text) pair, in batches."""
            out = []
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                width = max(int(text_masks[t].sum()) for _, t in chunk)
                ids = torch.stack([text_ids[t][:width] for _, t in chunk])
                mask = torch.stack([text_masks[t][:width] for _, t in chunk])
                embeds = embeds_all[torch.tensor([i for i, _ in chunk])]
                out.append(base.itm_logits(embeds, ids, mask)[:, 1].float())
            return torch.cat(out)

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
    """What `train_retrieval` returns: the steps taken, the learned temperature, and each logged step's
    `{"step", "epoch", "loss", "loss_itc", "loss_itm", "temp", "learning_rate"}`."""

    global_step: int
    temp: float
    log_history: list[dict[str, float]]


def _pairs(dataset: Any) -> list[dict[str, Any]]:
    """The training pairs as dicts with "image" and "text" (and maybe "image_id")."""
    if hasattr(dataset, "column_names") and hasattr(dataset, "__getitem__"):  # a datasets.Dataset
        missing = {"image", "text"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"the dataset needs columns 'image' and 'text'; it lacks {sorted(missing)}")
        return [dict(dataset[i]) for i in range(len(dataset))]
    rows = list(dataset)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "image" not in row or "text" not in row:
            raise ValueError(f"dataset item {i} must be a dict with 'image' and 'text' (an image-text pair)")
        if not isinstance(row["text"], str):
            raise TypeError(f"dataset item {i}: 'text' must be a str, got {type(row['text']).__name__}")
    return rows


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
    """Fine-tunes a retrieval model (a `PeftModel` on `BlipForImageTextRetrieval`: its adapters; or the model
    itself: all its parameters) with BLIP's losses, ITC + ITM on hard negatives (see
    `BlipForImageTextRetrieval.retrieval_losses`), and AdamW with a linear schedule after `warmup_steps`.

    `dataset`: image-text pairs (dicts or a `datasets.Dataset` with "image" and "text"; an optional "image_id"
    marks pairs of one image, else pairs with the same text count as one image's). Each epoch shuffles the
    pairs (seeded) into batches of `per_device_train_batch_size` (a last batch of one pair is dropped: it has no
    negatives). `temp`: the starting temperature (BLIP's 0.07), learned unless `learn_temp=False`, clamped to
    [0.001, 0.5]. Each step's negatives are drawn under the seed `seed * 1_000_003 + step` (libtorch's global
    generator is reseeded: runs repeat). `callback(log)` is called with each logged step's values.
    `output_dir`: the adapter (peft's files; or the full model) and `retrieval_config.json` (`{"temp": ...}`)
    are written there at the end.

    What the captioning trainer (`blip_peft.train`) has and this loop does not (yet): mixed precision, gradient
    accumulation, checkpoints and resume, evaluation during training, distributed data parallel.
    """
    from blip_peft.modeling_retrieval import TEMP_INIT, new_temperature  # noqa: PLC0415

    base = _retrieval_model(model)
    pairs = _pairs(dataset)
    batch = _positive_int(per_device_train_batch_size, "per_device_train_batch_size")
    if batch < 2:
        raise ValueError("per_device_train_batch_size must be at least 2 (the other pairs are the negatives)")
    epochs = _positive_int(num_train_epochs, "num_train_epochs")
    logging_steps = _positive_int(logging_steps, "logging_steps")
    if len(pairs) < 2:
        raise ValueError("train_retrieval needs at least 2 image-text pairs")
    if max_length is None:
        max_length = int(base.config.text_config.max_position_embeddings)
    if isinstance(temp, torch.Tensor):
        temperature = temp
    else:
        temperature = new_temperature(TEMP_INIT if temp is None else temp, device=base.device)
    temperature.requires_grad_(bool(learn_temp))

    ids_of_text: dict[str, int] = {}
    image_ids = [
        int(row["image_id"]) if "image_id" in row else ids_of_text.setdefault(row["text"], len(ids_of_text))
        for row in pairs
    ]
    steps_per_epoch = len(pairs) // batch + (1 if len(pairs) % batch > 1 else 0)
    total = steps_per_epoch * epochs if max_steps is None else _positive_int(max_steps, "max_steps")

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (a PeftModel loaded with is_trainable=False?)")
    groups: list[dict[str, Any]] = [{"params": params, "weight_decay": weight_decay}]
    if learn_temp:
        groups.append({"params": [temperature], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=learning_rate)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total - step) / max(1, total - warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    history: list[dict[str, float]] = []
    step = 0
    was_training = base.training
    model.train()
    try:
        for epoch in range(epochs if max_steps is None else 1 << 30):
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            before = step
            for start in range(0, len(order), batch):
                chunk = order[start : start + batch]
                if len(chunk) < 2 or step >= total:
                    continue
                enc = processor(
                    images=[pairs[i]["image"] for i in chunk],
                    text=[pairs[i]["text"] for i in chunk],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                chunk_ids = torch.tensor([image_ids[i] for i in chunk])
                if int(chunk_ids.unique().numel()) < 2:
                    continue  # one image's pairs only: nothing to contrast
                out = base.retrieval_losses(
                    enc["pixel_values"],
                    enc["input_ids"],
                    enc["attention_mask"],
                    temperature,
                    image_ids=chunk_ids,
                    seed=seed * 1_000_003 + step,
                )
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                if step % logging_steps == 0 or step == total:
                    log = {
                        "step": float(step),
                        "epoch": epoch + start / len(order),
                        "loss": float(out.loss.detach()),
                        "loss_itc": float(out.loss_itc.detach()),
                        "loss_itm": float(out.loss_itm.detach()),
                        "temp": float(temperature.detach().clamp(0.001, 0.5)),
                        "learning_rate": float(scheduler.get_last_lr()[0]),
                    }
                    history.append(log)
                    if callback is not None:
                        callback(log)
            if step >= total:
                break
            if step == before:
                raise ValueError(
                    "no batch of this dataset holds pairs of 2 different images (every pair shows the same image?)"
                )
    finally:
        model.train(was_training)
    with torch.no_grad():
        temperature.clamp_(0.001, 0.5)
    final_temp = float(temperature.detach())
    if output_dir is not None:
        import json  # noqa: PLC0415
        import os  # noqa: PLC0415

        from blip_peft import _blip_peft  # noqa: PLC0415

        model.save_pretrained(output_dir)
        text = json.dumps({"temp": final_temp}, indent=2) + "\n"
        _blip_peft.write_text_atomic(os.path.join(os.fspath(output_dir), RETRIEVAL_CONFIG_NAME), text)
    return RetrievalTrainResult(global_step=step, temp=final_temp, log_history=history)
