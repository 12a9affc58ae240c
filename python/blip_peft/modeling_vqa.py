"""`BlipForQuestionAnswering`: BLIP's visual-question-answering head, computed by the Rust core.

It mirrors transformers' class of the same name: a vision tower, a question encoder (`text_encoder`,
cross-attending to the image) and an answer decoder (`text_decoder`, cross-attending to the question
encoding). Loading, the module tree, parameters, `to`, `train`/`eval` and `save_pretrained` are the shared
`BlipPreTrainedModel`'s; this module adds the forward pass and its output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from blip_peft import _blip_peft
from blip_peft.modeling import BlipPreTrainedModel, ModelOutput, _adapter_names, _generation_settings


@dataclass(eq=False)
class BlipTextVisionModelOutput(ModelOutput):
    """transformers' `BlipTextVisionModelOutput`: `loss` (with labels: the answer decoder's mean
    cross-entropy), `image_embeds` (= `last_hidden_state`, the vision tower's output); `hidden_states` and
    `attentions` are None (not recorded here)."""

    loss: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class BlipForQuestionAnswering(BlipPreTrainedModel):
    """BLIP for visual question answering, with transformers' API and weight names
    (`vision_model.*`, `text_encoder.*`, `text_decoder.*`).

    Load a transformers `BlipForQuestionAnswering` folder (e.g. a downloaded Salesforce/blip-vqa-base) with
    :meth:`from_pretrained`, call the model with `input_ids` (the question), `pixel_values` and `labels` (the
    answer ids) for the loss, and train it with any torch optimizer over :meth:`parameters`.
    """

    _native_class = _blip_peft._BlipVqaModel
    _towers = ("vision_model", "text_encoder", "text_decoder")
    # The question encoder's table is the input embeddings (transformers' get_input_embeddings).
    _word_embeddings = (
        "text_encoder.embeddings.word_embeddings",
        "text_decoder.bert.embeddings.word_embeddings",
    )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' `BlipForQuestionAnswering.forward`: the image embedded, the question (`input_ids`,
        `attention_mask`) encoded over it, the answer (`decoder_input_ids`, else `labels`, which then start
        with BOS and hold no -100) decoded over the question encoding; with `labels`, `loss` is the mean
        cross-entropy of predicting `labels[:, 1:]` from positions `:-1` (-100 ignored; the text config's
        `label_smoothing`). Either `labels` or `decoder_input_ids` is required.

        As in transformers 5.17, the answer decoder attends to every question position (the question's
        `attention_mask` does not reach its cross-attention) and the output carries no logits; the decoder's
        logits and the question encoding are `out.logits` / `out.question_embeds` attributes here (not fields).

        `adapter_names` (peft's mixed-adapter batch, inference only): one adapter per row, `"__base__"` for the
        base model, in the three towers. With gradient checkpointing on (`gradient_checkpointing_enable()`), a
        training forward keeps no activations and the backward recomputes it (the same dropout draws).
        """
        unknown = set(kwargs) - {"use_cache", "output_attentions", "output_hidden_states"}
        if unknown:
            raise TypeError(f"forward() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise ValueError("BlipForQuestionAnswering does not record hidden states or attentions here")
        if input_ids is None:
            raise ValueError("input_ids (the question) is required")
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")

        def run(*tensors: Any) -> Any:
            return self._native.forward(
                *tensors,
                interpolate_pos_encoding=bool(interpolate_pos_encoding),
                adapter_names=_adapter_names(adapter_names),
            )

        loss, image_embeds, question_embeds, logits = self._checkpointed(
            run, input_ids, pixel_values, decoder_input_ids, decoder_attention_mask, attention_mask, labels
        )
        out = BlipTextVisionModelOutput(loss=loss, image_embeds=image_embeds, last_hidden_state=image_embeds)
        # Not fields (transformers returns neither), so keys(), to_tuple() and indexing stay transformers'.
        object.__setattr__(out, "question_embeds", question_embeds)
        object.__setattr__(out, "logits", logits)
        return out if return_dict is None or return_dict else out.to_tuple()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        adapter_names: list[str] | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Answers the questions (`input_ids`, with their `attention_mask`) about the images, as transformers'
        `BlipForQuestionAnswering.generate`: the question is encoded once over the image, and the answer decoded
        from BOS (`text_config.bos_token_id`) over the whole question encoding until `[SEP]`, padded with
        `pad_token_id`. Returns `[batch * num_return_sequences, length]` token ids laid out as transformers'
        (`[BOS, answer..., SEP, pad...]`). The keywords are `BlipForConditionalGeneration.generate`'s
        (`max_new_tokens`, `max_length`, `num_beams`, `length_penalty`, `do_sample`, `seed`, ...);
        `adapter_names`, one adapter per image (peft's mixed-adapter batch; its beams inherit it)."""
        if input_ids is None:
            raise ValueError("generate() needs input_ids (the question)")
        if pixel_values is None:
            raise ValueError("generate() needs pixel_values")
        if isinstance(input_ids, list):
            input_ids = torch.tensor(input_ids, dtype=torch.long)
        settings = _generation_settings(generate_kwargs)
        if interpolate_pos_encoding:
            settings["interpolate_pos_encoding"] = True
        return self._native.generate(pixel_values, input_ids, attention_mask, settings, _adapter_names(adapter_names))

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def get_output_embeddings(self) -> None:
        """None, as transformers' `BlipForQuestionAnswering` returns."""
        return None

    # resize_token_embeddings is the base's: both word-embedding tables (transformers resizes the question
    # encoder's only, leaving the answer decoder and its tied head at the old size, so that its saved folder no
    # longer loads) and the LM head.


AutoModelForVisualQuestionAnswering = BlipForQuestionAnswering
