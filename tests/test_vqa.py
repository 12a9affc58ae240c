"""BlipForQuestionAnswering against transformers' (the oracle): loading, saving, the forward pass (loss, image
embeddings, question encoding, answer logits) with padded questions and answers, gradients, half precision."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import rel_err
from transformers import BlipConfig
from transformers import BlipForQuestionAnswering as HFVqa

import blip_peft as bp
from blip_peft.presets import TINY_TEXT, TINY_VISION, VQA_BASE_TEXT, VQA_BASE_VISION

BOS, SEP, PAD = TINY_TEXT["bos_token_id"], TINY_TEXT["sep_token_id"], TINY_TEXT["pad_token_id"]


def make_hf_vqa(config: BlipConfig, seed: int = 0) -> HFVqa:
    """A transformers VQA model with random weights (initializer range 0.02 in every tower), biases and norms
    perturbed so every parameter matters."""
    torch.manual_seed(seed)
    model = HFVqa(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_vqa_config(**text: object) -> BlipConfig:
    return BlipConfig(text_config=dict(TINY_TEXT, **text), vision_config=dict(TINY_VISION))


@pytest.fixture(scope="module")
def tiny_vqa(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny_vqa")
    make_hf_vqa(tiny_vqa_config()).save_pretrained(path)
    return str(path)


def vqa_batch(seed: int = 0, vocab: int = TINY_TEXT["vocab_size"], image: int = TINY_VISION["image_size"]):
    """Two questions (the second right-padded), two answers `[BOS, ..., SEP]` (the second padded): pixel values,
    question ids and mask, answer ids and mask, labels with the answer padding at -100."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, image, image, generator=g)
    bos = BOS if vocab == TINY_TEXT["vocab_size"] else VQA_BASE_TEXT["bos_token_id"]
    sep = SEP if vocab == TINY_TEXT["vocab_size"] else VQA_BASE_TEXT["sep_token_id"]
    question = torch.randint(4, min(vocab, 1000) - 2, (2, 8), generator=g)
    question_mask = torch.ones(2, 8, dtype=torch.long)
    question[:, -1] = sep
    question[1, 5] = sep
    question[1, 6:] = PAD
    question_mask[1, 6:] = 0
    answer = torch.randint(4, min(vocab, 1000) - 2, (2, 5), generator=g)
    answer[:, 0] = bos
    answer[:, -1] = sep
    answer[1, 3] = sep
    answer[1, 4:] = PAD
    answer_mask = (answer != PAD).long()
    labels = answer.masked_fill(answer_mask == 0, -100)
    return pixel_values, question, question_mask, answer, answer_mask, labels


def hf_parts(ref: HFVqa, px, question, question_mask, answer, answer_mask):
    """transformers' question encoding and answer logits, computed by its own submodules as its forward does."""
    with torch.no_grad():
        image = ref.vision_model(pixel_values=px).last_hidden_state
        q = ref.text_encoder(
            input_ids=question,
            attention_mask=question_mask,
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        logits = ref.text_decoder(
            input_ids=answer,
            attention_mask=answer_mask,
            encoder_hidden_states=q,
            encoder_attention_mask=question_mask,
        ).logits
    return q, logits


def test_tiny_loads_transformers_weights(tiny_vqa: str) -> None:
    ref = HFVqa.from_pretrained(tiny_vqa)
    model = bp.AutoModelForVisualQuestionAnswering.from_pretrained(tiny_vqa)
    assert isinstance(model, bp.BlipForQuestionAnswering)
    assert not isinstance(model, bp.BlipForConditionalGeneration)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    # named_parameters: transformers' order, the tied head once.
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert model.get_input_embeddings() is model.get_submodule("text_encoder.embeddings.word_embeddings")
    assert model.get_input_embeddings().padding_idx == PAD
    assert repr(model) == repr(ref)


def test_tiny_forward_matches_transformers(tiny_vqa: str) -> None:
    ref = HFVqa.from_pretrained(tiny_vqa).eval()
    model = bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa)
    px, question, qmask, answer, amask, labels = vqa_batch()
    with torch.no_grad():
        want = ref(
            input_ids=question,
            pixel_values=px,
            attention_mask=qmask,
            decoder_input_ids=answer,
            decoder_attention_mask=amask,
            labels=labels,
        )
    out = model(
        input_ids=question,
        pixel_values=px,
        attention_mask=qmask,
        decoder_input_ids=answer,
        decoder_attention_mask=amask,
        labels=labels,
    )
    assert list(out.keys()) == list(want.keys()) == ["loss", "image_embeds", "last_hidden_state"]
    assert rel_err(out.loss, want.loss) <= 1e-5
    assert rel_err(out.image_embeds, want.image_embeds) <= 1e-5
    q, logits = hf_parts(ref, px, question, qmask, answer, amask)
    assert rel_err(out.question_embeds, q) <= 1e-5
    assert rel_err(out.logits, logits) <= 1e-5
    # The padding masks matter (so equal numbers above are not an accident of unused masks).
    unmasked = model(input_ids=question, pixel_values=px, decoder_input_ids=answer, labels=labels)
    assert rel_err(unmasked.question_embeds, q) > 1e-3
    assert rel_err(unmasked.logits, logits) > 1e-4  # 30x the tolerance above
    # A tuple without return_dict, as transformers.
    loss, embeds, last = model(
        input_ids=question, pixel_values=px, attention_mask=qmask, labels=answer, return_dict=False
    )
    with torch.no_grad():
        ref_loss = ref(input_ids=question, pixel_values=px, attention_mask=qmask, labels=answer).loss
    assert rel_err(loss, ref_loss) <= 1e-5
    assert embeds is last


def test_labels_alone_and_decoder_input_ids_alone(tiny_vqa: str) -> None:
    """labels alone: they are the decoder's input too (transformers does not shift them); decoder_input_ids
    alone: no loss."""
    ref = HFVqa.from_pretrained(tiny_vqa).eval()
    model = bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa)
    px, question, qmask, answer, amask, _ = vqa_batch(seed=1)
    with torch.no_grad():
        want = ref(input_ids=question, pixel_values=px, attention_mask=qmask, labels=answer)
    out = model(input_ids=question, pixel_values=px, attention_mask=qmask, labels=answer)
    assert rel_err(out.loss, want.loss) <= 1e-5
    _, logits = hf_parts(ref, px, question, qmask, answer, None)
    assert rel_err(out.logits, logits) <= 1e-5
    out = model(input_ids=question, pixel_values=px, decoder_input_ids=answer)
    assert out.loss is None and "loss" not in out.keys()
    with pytest.raises(ValueError, match="decoder_input_ids.*labels"):
        model(input_ids=question, pixel_values=px)
    with pytest.raises(ValueError, match="-100"):
        model(input_ids=question, pixel_values=px, labels=answer.masked_fill(amask == 0, -100))
    with pytest.raises(ValueError, match="decoder_attention_mask"):
        model(input_ids=question, pixel_values=px, labels=answer, decoder_attention_mask=qmask)
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=question, pixel_values=px, labels=answer, attention_mask=amask)
    with pytest.raises(ValueError, match="input_ids"):
        model(input_ids=question[:1], pixel_values=px, labels=answer)
    with pytest.raises(TypeError, match="labels"):
        model(input_ids=question, pixel_values=px, labels=answer.float())


def test_label_smoothing_and_gradients(tmp_path) -> None:
    """The loss with the text config's label smoothing (0.1), and its gradients through all three towers and
    the pixels, equal transformers'."""
    make_hf_vqa(tiny_vqa_config(label_smoothing=0.1), seed=2).save_pretrained(tmp_path)
    ref = HFVqa.from_pretrained(tmp_path).eval()
    model = bp.BlipForQuestionAnswering.from_pretrained(tmp_path)
    px, question, qmask, answer, amask, labels = vqa_batch(seed=2)
    px_ref, px_ours = px.clone().requires_grad_(True), px.clone().requires_grad_(True)
    kw = dict(
        input_ids=question, attention_mask=qmask, decoder_input_ids=answer, decoder_attention_mask=amask, labels=labels
    )
    want = ref(pixel_values=px_ref, **kw).loss
    got = model(pixel_values=px_ours, **kw).loss
    assert rel_err(got, want) <= 1e-5
    want.backward()
    got.backward()
    assert rel_err(px_ours.grad, px_ref.grad) <= 1e-4
    theirs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        want_grad = theirs[name].grad
        if float(want_grad.norm()) < 1e-10:  # keys' biases: softmax ignores them, the gradient is rounding
            assert float(p.grad.norm()) < 1e-10, name
        else:
            assert rel_err(p.grad, want_grad) <= 1e-4, name


def test_save_pretrained_loads_in_transformers(tmp_path, tiny_vqa: str) -> None:
    model = bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa)
    with torch.no_grad():
        model.get_submodule("text_encoder.encoder.layer.0.attention.self.query").weight.add_(0.01)
    model.save_pretrained(tmp_path)
    ref, info = HFVqa.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert json.load(f)["architectures"] == ["BlipForQuestionAnswering"]
    ours = model.state_dict()
    for name, tensor in ref.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    again = bp.BlipForQuestionAnswering.from_pretrained(tmp_path)
    px, question, qmask, answer, amask, labels = vqa_batch()
    kw = dict(input_ids=question, pixel_values=px, attention_mask=qmask, labels=answer)
    assert torch.equal(again(**kw).loss, model(**kw).loss)


def test_untied_head(tmp_path) -> None:
    config = tiny_vqa_config(tie_word_embeddings=False)
    config.tie_word_embeddings = False
    hf = make_hf_vqa(config, seed=3)
    with torch.no_grad():
        hf.text_decoder.cls.predictions.decoder.weight.normal_(0, 0.02)
    hf.save_pretrained(tmp_path / "in")
    ref = HFVqa.from_pretrained(tmp_path / "in").eval()
    model = bp.BlipForQuestionAnswering.from_pretrained(tmp_path / "in")
    assert not model._native.lm_head_tied
    px, question, qmask, answer, amask, labels = vqa_batch(seed=3)
    kw = dict(input_ids=question, pixel_values=px, attention_mask=qmask, labels=answer)
    with torch.no_grad():
        want = ref(**kw).loss
    assert rel_err(model(**kw).loss, want) <= 1e-5
    model.save_pretrained(tmp_path / "out")
    back, info = HFVqa.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert rel_err(back(**kw).loss, want) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiny_half_precision_against_float32(tiny_vqa: str, dtype: torch.dtype) -> None:
    ref = HFVqa.from_pretrained(tiny_vqa).eval()
    model = bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa, dtype=dtype)
    assert model.dtype == dtype
    px, question, qmask, answer, amask, labels = vqa_batch(seed=4)
    kw = dict(
        input_ids=question, attention_mask=qmask, decoder_input_ids=answer, decoder_attention_mask=amask, labels=labels
    )
    with torch.no_grad():
        want = ref(pixel_values=px, **kw)
        out = model(pixel_values=px, **kw)
    assert out.image_embeds.dtype == dtype
    assert out.loss.dtype == torch.float32  # the loss in float32 whatever the weights' precision
    assert rel_err(out.loss, want.loss) <= 2e-2
    assert rel_err(out.image_embeds, want.image_embeds) <= 2e-2
    q, logits = hf_parts(ref, px, question, qmask, answer, amask)
    assert rel_err(out.question_embeds, q) <= 2e-2
    assert rel_err(out.logits, logits) <= 2e-2


def test_from_config_and_training_mode() -> None:
    config = {"text_config": dict(TINY_TEXT), "vision_config": dict(TINY_VISION)}
    model = bp.BlipForQuestionAnswering.from_config(config, seed=1)
    assert not model.training
    model.train()
    assert model.training and model.text_encoder.training
    n = sum(p.numel() for p in make_hf_vqa(tiny_vqa_config()).parameters())
    assert model.num_parameters() == n


@pytest.fixture(scope="module")
def base_vqa(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Random weights of Salesforce/blip-vqa-base's shapes."""
    path = tmp_path_factory.mktemp("base_vqa")
    config = BlipConfig(text_config=dict(VQA_BASE_TEXT), vision_config=dict(VQA_BASE_VISION))
    make_hf_vqa(config, seed=5).save_pretrained(path)
    return str(path)


def test_base_shapes_match_transformers(base_vqa: str) -> None:
    ref = HFVqa.from_pretrained(base_vqa).eval()
    px, question, qmask, answer, amask, labels = vqa_batch(
        seed=5, vocab=VQA_BASE_TEXT["vocab_size"], image=VQA_BASE_VISION["image_size"]
    )
    kw = dict(
        input_ids=question, attention_mask=qmask, decoder_input_ids=answer, decoder_attention_mask=amask, labels=labels
    )
    with torch.no_grad():
        want = ref(pixel_values=px, **kw)
        q, logits = hf_parts(ref, px, question, qmask, answer, amask)
    del ref
    model = bp.BlipForQuestionAnswering.from_pretrained(base_vqa)
    with torch.no_grad():
        out = model(pixel_values=px, **kw)
    assert rel_err(out.loss, want.loss) <= 1e-5
    assert rel_err(out.image_embeds, want.image_embeds) <= 1e-5
    assert rel_err(out.question_embeds, q) <= 1e-5
    assert rel_err(out.logits, logits) <= 1e-5
    model.to(torch.bfloat16)
    with torch.no_grad():
        half = model(pixel_values=px, **kw)
    assert rel_err(half.loss, want.loss) <= 2e-2
    assert rel_err(half.image_embeds, want.image_embeds) <= 2e-2
    assert rel_err(half.logits, logits) <= 2e-2


@pytest.mark.parametrize(
    "settings",
    [
        dict(),  # greedy, transformers' default length (20 new tokens)
        dict(max_new_tokens=6),
        dict(num_beams=3, max_new_tokens=8),
        dict(num_beams=3, num_return_sequences=2, max_new_tokens=7, length_penalty=0.5),
        dict(max_new_tokens=9, repetition_penalty=1.3, no_repeat_ngram_size=2),
    ],
)
def test_generate_matches_transformers(tiny_vqa: str, settings: dict) -> None:
    ref = HFVqa.from_pretrained(tiny_vqa).eval()
    model = bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa)
    px, question, qmask, *_ = vqa_batch(seed=6)
    want = ref.generate(input_ids=question, pixel_values=px, attention_mask=qmask, **settings)
    got = model.generate(input_ids=question, pixel_values=px, attention_mask=qmask, **settings)
    assert got.dtype == torch.long
    assert torch.equal(got, want), (got, want)
    assert bool((got[:, 0] == BOS).all())


def test_generate_ends_at_sep(tmp_path) -> None:
    """A decoder whose LM head favours [SEP] after a few tokens: answers end there and are padded, as
    transformers pads them."""
    hf = make_hf_vqa(tiny_vqa_config(), seed=7)
    with torch.no_grad():
        hf.text_decoder.cls.predictions.bias[SEP] += 1.5
    hf.save_pretrained(tmp_path)
    ref = HFVqa.from_pretrained(tmp_path).eval()
    model = bp.BlipForQuestionAnswering.from_pretrained(tmp_path)
    for seed in range(3):
        px, question, qmask, *_ = vqa_batch(seed=seed)
        for settings in (dict(max_new_tokens=12), dict(num_beams=2, max_new_tokens=12)):
            want = ref.generate(input_ids=question, pixel_values=px, attention_mask=qmask, **settings)
            got = model.generate(input_ids=question, pixel_values=px, attention_mask=qmask, **settings)
            assert torch.equal(got, want), (seed, settings, got, want)
    assert bool((got == SEP).any())


def test_generate_bad_inputs(tiny_vqa: str) -> None:
    model = bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa)
    px, question, qmask, *_ = vqa_batch()
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(pixel_values=px)
    with pytest.raises(ValueError, match="batch size"):
        model.generate(input_ids=question[:1], pixel_values=px)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(input_ids=question, pixel_values=px, attention_mask=qmask[:, :3])
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(input_ids=question, pixel_values=px, num_beams=0)


# ------------------------------------------------------------------------------------------------------ LoRA
VQA_LORA_CONFIGS = {
    "attention": dict(r=4, lora_alpha=8, target_modules=["query", "value", "self_attn.qkv"]),
    "mlp_conv": dict(r=4, lora_alpha=16, target_modules=["patch_embedding", "intermediate.dense", "output.dense"]),
    "encoder_only": dict(r=2, lora_alpha=4, target_modules=r"text_encoder\..*\.(query|key|value)"),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["query", "fc1"]),
    "modules_to_save": dict(r=4, target_modules=["query"], modules_to_save=["post_layernorm", "crossattention"]),
}


def _perturb_adapters(named_params, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "lora_" in name or ".modules_to_save." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _vqa_outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    px, question, qmask, answer, amask, labels = batch
    with torch.no_grad():
        out = model(
            input_ids=question,
            pixel_values=px,
            attention_mask=qmask,
            decoder_input_ids=answer,
            decoder_attention_mask=amask,
            labels=labels,
        )
    return out.loss, out.image_embeds


@pytest.mark.parametrize("name", sorted(VQA_LORA_CONFIGS))
def test_lora_adapters_exchanged_with_peft(tmp_path, tiny_vqa: str, name: str) -> None:
    import warnings

    import peft

    config = VQA_LORA_CONFIGS[name]
    ours = bp.get_peft_model(bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa), bp.LoraConfig(**config))
    theirs = peft.get_peft_model(HFVqa.from_pretrained(tiny_vqa), peft.LoraConfig(**config))
    # The same parameters under peft's names, the same trainable ones, the same printout.
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert any(n.startswith("base_model.model.text_encoder.") and "lora_A" in n for n, _ in ours.named_parameters())
    # Ours -> peft.
    _perturb_adapters(ours.named_parameters(), seed=1)
    ours.save_pretrained(tmp_path / "ours")
    with open(tmp_path / "ours" / "adapter_config.json") as f:
        assert json.load(f)["auto_mapping"]["base_model_class"] == "BlipForQuestionAnswering"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft only warns about missing/unexpected keys: make that fail
        loaded = peft.PeftModel.from_pretrained(HFVqa.from_pretrained(tiny_vqa), tmp_path / "ours").eval()
    batch = vqa_batch(seed=8)
    (loss, embeds), (ref_loss, ref_embeds) = _vqa_outputs(ours.eval(), batch), _vqa_outputs(loaded, batch)
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(embeds, ref_embeds) <= 1e-5
    # from_pretrained on the adapter folder: the base it names, as this head, with the adapter.
    again = bp.BlipForQuestionAnswering.from_pretrained(tmp_path / "ours")
    assert isinstance(again, bp.PeftModel) and isinstance(again.get_base_model(), bp.BlipForQuestionAnswering)
    assert rel_err(_vqa_outputs(again, batch)[0], ref_loss) <= 1e-5
    # The adapter matters: without it the image embeddings or the question encoding differ (by far more than
    # the tolerance).
    px, question, qmask, *_ = batch
    adapted = ours(input_ids=question, pixel_values=px, attention_mask=qmask, labels=batch[3])
    with ours.disable_adapter():
        base = ours(input_ids=question, pixel_values=px, attention_mask=qmask, labels=batch[3])
    changes = [
        rel_err(base.image_embeds, adapted.image_embeds),
        rel_err(base.question_embeds, adapted.question_embeds),
    ]
    assert max(changes) > 1e-3, changes
    # peft -> ours.
    _perturb_adapters(theirs.named_parameters(), seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    back = bp.PeftModel.from_pretrained(bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa), tmp_path / "theirs")
    (loss, embeds), (ref_loss, ref_embeds) = _vqa_outputs(back, batch), _vqa_outputs(theirs.eval(), batch)
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(embeds, ref_embeds) <= 1e-5
    px, question, qmask, *_ = batch
    want = theirs.base_model.model.generate(
        input_ids=question, pixel_values=px, attention_mask=qmask, max_new_tokens=5
    )
    assert torch.equal(
        back.generate(input_ids=question, pixel_values=px, attention_mask=qmask, max_new_tokens=5), want
    )


def test_lora_task_type_harmless_and_training_step(tiny_vqa: str) -> None:
    """A `task_type` is accepted (peft's own wrapper raises a TypeError for VQA with one); a torch step trains
    only the adapters; merge_and_unload keeps the outputs."""
    config = bp.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_2_SEQ_LM")
    model = bp.get_peft_model(bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa), config)
    targets = [path for path, _, _ in bp.lora_targets(model)]
    assert "text_encoder.encoder.layer.0.attention.self.query" in targets
    assert "text_encoder.encoder.layer.1.crossattention.self.value" in targets
    model.train()
    batch = vqa_batch(seed=9)
    px, question, qmask, answer, amask, labels = batch
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=question, pixel_values=px, attention_mask=qmask, labels=answer).loss
    loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == ("lora_B" in n or "lora_A" in n), n
    model.eval()
    adapted = _vqa_outputs(model, batch)[0]
    merged = model.merge_and_unload()
    assert isinstance(merged, bp.BlipForQuestionAnswering)
    assert rel_err(_vqa_outputs(merged, batch)[0], adapted) <= 1e-5
    with pytest.raises(TypeError, match="train"):
        bp.train(bp.get_peft_model(merged, bp.LoraConfig(r=2, target_modules=["query"])), [])
