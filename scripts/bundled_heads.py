"""What scripts/make_vqa_model.py and scripts/make_retrieval_model.py share: a BLIP head initialised from the
bundled captioner's weights (as LAVIS initialises its VQA and retrieval models from the captioning / pretraining
checkpoint), and the bundle written in transformers' folder layout (float16 safetensors, config, processor and
tokenizer files, a training card).

Which captioner weights each head takes:

- `vision_model.*`: the captioner's vision tower, as it is.
- `text_encoder.*` (both heads): the captioner's BERT body, `text_decoder.bert.*` (embeddings, self-attention,
  cross-attention, MLP); the encoder runs it bidirectionally.
- `text_decoder.*` (VQA): the captioner's decoder, LM head included.
- The rest (the retrieval head's `vision_proj`, `text_proj`, `itm_head`) starts at transformers' random
  initialisation; word-embedding rows of tokens the captioner's tokenizer lacks start at the mean of the
  captioner's rows plus noise at the initializer range.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch

import blip_peft as bp

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "python", "blip_peft", "models")
CAPTIONER = os.path.join(MODELS, "blip-shapes-base")


def captioner() -> tuple[bp.BlipForConditionalGeneration, dict[str, Any]]:
    """The bundled captioner in float32 and its config.json as a dict."""
    model = bp.BlipForConditionalGeneration.from_pretrained(CAPTIONER, dtype="float32")
    with open(os.path.join(CAPTIONER, "config.json")) as f:
        config = json.load(f)
    return model, config


def head_config(captioner_config: dict[str, Any], architecture: str, **top: Any) -> dict[str, Any]:
    """The captioner's config.json for another head: the same towers (text settings as they are, a vocabulary
    size changed by the caller), another `architectures`, top-level settings added."""
    config = {
        "model_type": "blip",
        "architectures": [architecture],
        "text_config": dict(captioner_config["text_config"]),
        "vision_config": dict(captioner_config["vision_config"]),
        "tie_word_embeddings": True,
        **top,
    }
    return config


def _with_rows(source: torch.Tensor, rows: int, seed: int, std: float) -> torch.Tensor:
    """`source`'s rows, then `rows - len(source)` new ones at their mean plus noise (transformers' mean resizing
    in spirit: new tokens start where the known ones are, not at zero)."""
    if rows == source.shape[0]:
        return source.clone()
    g = torch.Generator().manual_seed(seed)
    extra = rows - source.shape[0]
    if source.dim() == 1:  # an output bias: the mean
        return torch.cat([source, source.mean().expand(extra)])
    noise = torch.randn(extra, source.shape[1], generator=g) * std
    return torch.cat([source, source.mean(0, keepdim=True) + noise])


def initialise_from_captioner(
    head: Any, captioner_model: bp.BlipForConditionalGeneration, mapping: dict[str, str], seed: int = 0
) -> list[str]:
    """Copies the captioner's tensors into `head` by prefix (`mapping`: head prefix -> captioner prefix), word
    embeddings and output biases widened to the head's vocabulary. Returns the head's keys left at their random
    initialisation."""
    source = {k: v.detach().float() for k, v in captioner_model.state_dict().items()}
    state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    std = float(captioner_model.config.text_config.initializer_range)
    untouched = []
    for key, value in state.items():
        for prefix, from_prefix in mapping.items():
            if key.startswith(prefix):
                src = source[from_prefix + key[len(prefix) :]]
                if src.shape != value.shape:
                    if src.shape[1:] != value.shape[1:] or src.shape[0] > value.shape[0]:
                        raise ValueError(
                            f"{key}: the captioner's {tuple(src.shape)} does not fit {tuple(value.shape)}"
                        )
                    src = _with_rows(src, value.shape[0], seed, std)
                state[key] = src.to(value.dtype)
                break
        else:
            untouched.append(key)
    head.load_state_dict(state, strict=True)
    return untouched


def save_bundle(model: Any, processor: bp.BlipProcessor, out: str, card: dict[str, Any]) -> None:
    """Writes the bundle into `out` (float16 weights, config, processor + tokenizer files, training_card.json):
    into a temporary folder next to it, then renamed into place, so a killed run leaves the old bundle."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".bundle-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would travel into the package
    try:
        model.to(torch.float16).save_pretrained(tmp)  # float16 on disk keeps the package small
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "training_card.json"), "w") as f:
            json.dump(card, f, indent=2)
            f.write("\n")
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    model.to(torch.float32)
