"""`BlipForImageTextRetrieval`: BLIP's image-text retrieval head, computed by the Rust core.

It mirrors transformers' class of the same name (`Salesforce/blip-itm-base-coco`): `from_pretrained`, the call
with `input_ids` / `pixel_values` / `use_itm_head` / `attention_mask`, `parameters()` a torch optimizer updates in
place, `to`, `train`/`eval`, `save_pretrained`, `print(model)`, LoRA through `get_peft_model`; and BLIP's training
losses (`retrieval_losses`). The module tree, loading options and parameter handling are
`BlipPreTrainedModel`'s, shared with the captioner and the VQA head (so `get_peft_model` and `PeftModel` take
it); what only a captioner does (`generate`, resizing the vocabulary of an LM head) is refused by name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blip_peft import _blip_peft
from blip_peft._convert import fspath
from blip_peft.modeling import BlipPreTrainedModel, ModelOutput, _adapter_names

__all__ = [
    "BlipForImageTextRetrieval",
    "BlipImageTextMatchingModelOutput",
    "RetrievalLossOutput",
    "TEMP_INIT",
    "new_temperature",
]

#: BLIP's initial contrastive temperature (LAVIS's `temp`), and the range it is clamped to before each use.
TEMP_INIT = 0.07
TEMP_RANGE = (0.001, 0.5)


@dataclass(eq=False)
class BlipImageTextMatchingModelOutput(ModelOutput):
    """transformers' output: `itm_score` (`[B, 2]` matching logits with `use_itm_head=True`, else the
    `[images, texts]` cosine similarities), `last_hidden_state` (the vision tower's output), its
    `hidden_states` / `attentions` when asked for, and `question_embeds` (the text encoder's last hidden
    state)."""

    itm_score: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    vision_pooler_output: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    question_embeds: torch.Tensor | None = None


@dataclass(eq=False)
class RetrievalLossOutput(ModelOutput):
    """BLIP's retrieval losses of a batch of pairs: `loss` = `loss_itc + loss_itm`; the negatives the matching
    loss drew (`negative_images[i]`: the image paired with text i, `negative_texts[i]`: the text paired with
    image i) and the weights they were drawn from (`weights_t2i`, `weights_i2t`, `[B, B]`)."""

    loss: torch.Tensor | None = None
    loss_itc: torch.Tensor | None = None
    loss_itm: torch.Tensor | None = None
    negative_images: torch.Tensor | None = None
    negative_texts: torch.Tensor | None = None
    weights_i2t: torch.Tensor | None = None
    weights_t2i: torch.Tensor | None = None


def new_temperature(value: float = TEMP_INIT, device: Any = "cpu") -> torch.Tensor:
    """A learnable contrastive temperature (a 0-dim float32 tensor that requires grad), BLIP's 0.07 by default.
    transformers' `BlipForImageTextRetrieval` has no such parameter, so it lives beside the model (the
    training loop owns it and saves it with the adapter)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value > 0):
        raise ValueError(f"the temperature must be a positive number, got {value!r}")
    return torch.tensor(float(value), dtype=torch.float32, device=device, requires_grad=True)


def _image_index(index: Any) -> list[int] | None:
    """`image_index` as the core takes it: a list of int (one image per text row), or None."""
    if index is None:
        return None
    if isinstance(index, torch.Tensor):
        if index.dim() != 1 or index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            shape = tuple(index.shape)
            raise TypeError(f"image_index must be a 1-D integer tensor, got {index.dtype} of shape {shape}")
        return [int(i) for i in index.tolist()]
    if isinstance(index, (str, bytes)) or not isinstance(index, Sequence):
        raise TypeError(f"image_index must be a sequence of ints (one image per text), got {type(index).__name__}")
    bad = [type(i).__name__ for i in index if isinstance(i, bool) or not isinstance(i, int)]
    if bad:
        raise TypeError(f"image_index must hold ints, got {bad[0]}")
    return list(index)


class BlipForImageTextRetrieval(BlipPreTrainedModel):
    """BLIP for image-text retrieval, with transformers' API and weight names (`vision_model`, `text_encoder`,
    `vision_proj`, `text_proj`, `itm_head`).

    `model(input_ids, pixel_values, use_itm_head=True)` scores each text against its image with the matching
    head (`itm_score`: `[B, 2]` logits, column 1 = match); `use_itm_head=False` gives the cosine similarity of
    every image with every text (`[images, texts]`). `blip_peft.rank` scores whole collections.
    """

    _native_class = _blip_peft._BlipRetrievalModel
    _towers = ("vision_model", "text_encoder")
    _word_embeddings = ("text_encoder.embeddings.word_embeddings",)
    _tied_weights_keys: dict[str, str] = {}
    _no_split_modules = ["BlipEncoderLayer", "BlipTextEmbeddings"]
    supports_gradient_checkpointing = True
    main_input_name = "input_ids"

    @classmethod
    def can_generate(cls) -> bool:
        """False: the retrieval head scores, it does not write text."""
        return False

    # ----------------------------------------------------------------------------------------- forward
    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        use_itm_head: bool | None = True,
        attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' forward. `use_itm_head=True` (the default): the text encoder reads each text over its
        image's embeddings (cross-attention) and `itm_head` gives `[B, 2]` logits (no match, match) from the
        `[CLS]` state; texts and images must pair up. `use_itm_head=False`: texts and images are encoded apart
        and `itm_score` is the `[images, texts]` cosine similarity of the normalised `vision_proj` / `text_proj`
        projections of their `[CLS]` states (the batches may differ). `attention_mask` marks the texts' padding.
        `output_hidden_states` / `output_attentions` add the vision tower's; `return_dict=False` gives a tuple.
        `adapter_names` (peft's mixed-adapter batch, inference only): one adapter per row, `"__base__"` for the
        base model (with `use_itm_head=False`, as many texts as images). With gradient checkpointing on, a
        training forward keeps no activations and the backward recomputes it."""
        if kwargs:
            raise TypeError(f"forward() got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
        if input_ids is None:
            raise ValueError("input_ids is required: BlipForImageTextRetrieval scores texts against images")
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        if use_itm_head is None:
            use_itm_head = True
        if not isinstance(use_itm_head, (bool, int)):
            raise TypeError(f"use_itm_head must be a bool, got {type(use_itm_head).__name__}")
        use_itm_head = bool(use_itm_head)
        call = dict(
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
            eager=self._attn_implementation == "eager",
            interpolate_pos_encoding=bool(interpolate_pos_encoding),
            adapter_names=_adapter_names(adapter_names),
        )

        def run(*tensors: Any) -> Any:
            score, image_embeds, question_embeds, hidden, attn = self._native.forward(*tensors, use_itm_head, **call)
            return score, image_embeds, question_embeds, tuple(hidden or ()), tuple(attn or ())

        score, image_embeds, question_embeds, hidden, attn = self._checkpointed(
            run, pixel_values, input_ids, attention_mask
        )
        hidden = (hidden or None) if output_hidden_states else None
        attn = (attn or None) if output_attentions else None
        out = BlipImageTextMatchingModelOutput(
            itm_score=score,
            last_hidden_state=image_embeds,
            hidden_states=tuple(hidden) if hidden is not None else None,
            attentions=tuple(attn) if attn is not None else None,
            question_embeds=question_embeds,
        )
        return out if return_dict is None or return_dict else out.to_tuple()

    # ------------------------------------------------------------------------------- scoring pieces
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        adapter_names: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(features, image_embeds)`: the normalised contrastive features `[B, image_text_hidden_size]` of the
        images and their vision-tower embeddings `[B, 1 + patches, D]` (what `itm_logits` reads)."""
        feat, embeds = self._native.encode_images(
            pixel_values, bool(interpolate_pos_encoding), _adapter_names(adapter_names)
        )
        return feat, embeds

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
    ) -> torch.Tensor:
        """The normalised contrastive features `[B, image_text_hidden_size]` of texts (no cross-attention).
        `adapter_names` here and in the other scoring pieces: one adapter per row (peft's mixed batch)."""
        return self._native.encode_texts(input_ids, attention_mask, _adapter_names(adapter_names))

    def itm_logits(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
        image_index: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """The `[B, 2]` matching logits of text i over image embeddings i (`get_image_features`' second
        output), as `forward(use_itm_head=True)` computes them.

        With `image_index` (`[B]` ints), `image_embeds` holds each image once (`[images, N, D]`) and text i is
        matched with image `image_index[i]`: each image's cross-attention keys/values are then computed once
        for all its texts, not once per text (re-ranking an image's k candidate texts), with the same logits.
        """
        return self._native.itm_logits(
            image_embeds, input_ids, attention_mask, _adapter_names(adapter_names), _image_index(image_index)
        )

    def retrieval_losses(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        temp: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> RetrievalLossOutput:
        """BLIP's retrieval losses for B pairs (text i describes image i), as LAVIS's `BlipRetrieval` computes them
        without its momentum encoder and queue:

        - `loss_itc`: image-text contrastive. `sim = image_feat @ text_feat.T / temp`; the soft cross-entropy
          of each row against its positives (pairs with the same `image_ids`, spread evenly; each pair alone
          when `image_ids` is None), image-to-text and text-to-image averaged.
        - `loss_itm`: image-text matching on hard negatives. For each text a negative image, for each image a
          negative text, drawn from `softmax(sim)` with the row's positives zeroed; `itm_head`'s cross-entropy
          over the B positives (label 1) and 2B negatives (label 0).

        `temp` is the learnable temperature (`new_temperature()`), clamped in place to [0.001, 0.5] first.
        The draws use torch's global generator (`seed` reseeds it first). The batch needs at least 2 images.
        """
        if not torch.is_tensor(temp):
            raise TypeError(f"temp must be a 0-dim torch.Tensor (see new_temperature()), got {type(temp).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        out = self._checkpointed(
            lambda *t: self._native.losses(*t, seed), pixel_values, input_ids, attention_mask, temp, image_ids
        )
        return RetrievalLossOutput(loss=out["loss_itc"] + out["loss_itm"], **out)

    # ------------------------------------------------------------------------- what only captioners do
    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise TypeError(
            "BlipForImageTextRetrieval scores image-text pairs and does not generate text; use "
            "BlipForConditionalGeneration for captions, or blip_peft.rank(model, processor, images, texts)"
        )

    def _resized_lm_head(self, new: int, mean_resizing: bool, std: float) -> tuple[torch.Tensor, ...]:
        """Nothing: the retrieval head has no LM head; `resize_token_embeddings` resizes the text encoder's
        word embeddings only, as transformers does."""
        return ()

    def get_input_embeddings(self) -> torch.nn.Module:
        """The word embeddings (`text_encoder.embeddings.word_embeddings`)."""
        return self.get_submodule(self._word_embeddings[0])

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Writes `config.json` and `model.safetensors`: a folder transformers' `BlipForImageTextRetrieval`
        loads with no missing or unexpected keys (atomically written)."""
        if kwargs.get("safe_serialization") is False:
            raise ValueError("blip_peft writes safetensors only (safe_serialization=False is not supported)")
        self._native.save_pretrained(fspath(save_directory, "save_directory"))

    def __setstate__(self, state: Any) -> None:
        raise TypeError("BlipForImageTextRetrieval cannot be unpickled; save_pretrained / from_pretrained it")

    def __getstate__(self) -> Any:
        raise TypeError("BlipForImageTextRetrieval cannot be pickled; save it with save_pretrained")
