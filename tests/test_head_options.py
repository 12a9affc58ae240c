"""The captioner's model options on the VQA and retrieval heads: gradient checkpointing in a plain torch loop
(the same loss and gradients as without, far fewer saved activations), peft's mixed-adapter batches
(`adapter_names`, "__base__" rows) on forward / generate / the scoring pieces, and `resize_token_embeddings`.
Oracles: transformers (+ peft), and each row run alone with its adapter."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import make_hf_model, rel_err
from test_retrieval import batch as itm_batch
from test_retrieval import tiny_retrieval_config
from test_vqa import make_hf_vqa, tiny_vqa_config, vqa_batch
from transformers import BlipForImageTextRetrieval as HFRetrieval
from transformers import BlipForQuestionAnswering as HFVqa

import blip_peft as bp
from blip_peft.modeling_retrieval import new_temperature
from blip_peft.presets import TINY_TEXT

VOCAB = TINY_TEXT["vocab_size"]
# Adapters of different ranks and targets in every tower (vision qkv / MLP, the encoders' and decoder's
# attention, cross-attention, the retrieval projections).
LORA = {
    "cats": dict(r=4, lora_alpha=8, target_modules=["query", "value", "self_attn.qkv", "fc1"]),
    "dogs": dict(r=2, lora_alpha=6, target_modules=["query", "key", "fc2", "output.dense"]),
    "birds": dict(r=8, lora_alpha=4, target_modules=["qkv", "crossattention.self.key", "intermediate.dense"]),
}
ROWS = ["cats", "__base__", "dogs", "birds"]


@pytest.fixture(scope="module")
def tiny_vqa(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny_vqa_options")
    make_hf_vqa(tiny_vqa_config(), seed=4).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_itm(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny_itm_options")
    make_hf_model(tiny_retrieval_config(), seed=5, cls=HFRetrieval).save_pretrained(path)
    return str(path)


def _perturb(named_params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _counted_step(model, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One training-mode step: the loss, every gradient, and how many tensors autograd saved for the backward."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += 1
        return t

    model.train()
    torch.manual_seed(0)  # the same dropout draws in both runs (the checkpointed backward repeats its own)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.eval()
    return loss.detach(), grads, saved


def _same_step_with_checkpointing(model, loss_fn) -> None:
    loss, grads, saved = _counted_step(model, loss_fn)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    try:
        ck_loss, ck_grads, ck_saved = _counted_step(model, loss_fn)
    finally:
        model.gradient_checkpointing_disable()
    assert saved > 100 and ck_saved < 10, (saved, ck_saved)
    torch.testing.assert_close(ck_loss, loss)
    assert grads and set(ck_grads) == set(grads)
    for name, g in grads.items():
        torch.testing.assert_close(ck_grads[name], g, atol=1e-7, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------ gradient checkpointing
def test_vqa_gradient_checkpointing_plain_loop_with_dropout(tmp_path) -> None:
    """Dropout on (training mode): the recomputation draws the same masks, so loss and gradients equal the
    plain run's; the gradients also match transformers' own checkpointed backward without dropout."""
    config = tiny_vqa_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    make_hf_vqa(config, seed=2).save_pretrained(tmp_path / "m")
    model = bp.BlipForQuestionAnswering.from_pretrained(tmp_path / "m")
    assert model.supports_gradient_checkpointing
    px, q, qmask, answer, amask, labels = vqa_batch(seed=3)

    def loss_fn() -> torch.Tensor:
        return model(input_ids=q, pixel_values=px, attention_mask=qmask, labels=answer).loss

    _same_step_with_checkpointing(model, loss_fn)
    # LoRA over the checkpointed forward: only the adapters get gradients, the same as without.
    peft_model = bp.get_peft_model(model, bp.LoraConfig(r=4, target_modules=["query", "value", "qkv"]))
    _perturb(peft_model.named_parameters(), seed=1)
    _same_step_with_checkpointing(peft_model, loss_fn)


def test_vqa_checkpointed_gradients_equal_transformers(tiny_vqa: str) -> None:
    ours = bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa)
    ref = HFVqa.from_pretrained(tiny_vqa)
    ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours.gradient_checkpointing_enable()
    px, q, qmask, answer, amask, labels = vqa_batch(seed=5)
    for m in (ours, ref):
        m.train()
        m(input_ids=q, pixel_values=px, attention_mask=qmask, labels=answer).loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():  # (a key bias's gradient is zero up to rounding: atol)
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-6, rtol=1e-4, msg=name)


def test_retrieval_gradient_checkpointing_forward_and_losses(tiny_itm: str) -> None:
    model = bp.BlipForImageTextRetrieval.from_pretrained(tiny_itm)
    assert model.supports_gradient_checkpointing
    px, ids, mask = itm_batch(images=4, seed=2)
    temp = new_temperature()

    def itm_loss() -> torch.Tensor:
        return model(input_ids=ids, pixel_values=px, attention_mask=mask).itm_score.logsumexp(-1).mean()

    def itc_loss() -> torch.Tensor:
        out = model(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False)
        return out.itm_score.square().sum()

    def blip_losses() -> torch.Tensor:
        return model.retrieval_losses(px, ids, mask, temp, seed=7).loss

    for fn in (itm_loss, itc_loss, blip_losses):
        _same_step_with_checkpointing(model, fn)


# ------------------------------------------------------------------------------------ mixed-adapter batches
def _folders(tmp_path, checkpoint: str, cls) -> dict[str, str]:
    """Adapters made by peft on transformers' head (random weights), saved as folders."""
    folders = {}
    for i, (name, cfg) in enumerate(LORA.items()):
        ref = peft.get_peft_model(cls.from_pretrained(checkpoint), peft.LoraConfig(**cfg))
        _perturb(ref.named_parameters(), seed=10 + i)
        folders[name] = str(tmp_path / name)
        ref.save_pretrained(folders[name])
    return folders


def _ours(cls, checkpoint: str, folders: dict[str, str]) -> bp.PeftModel:
    names = list(folders)
    model = bp.PeftModel.from_pretrained(cls.from_pretrained(checkpoint), folders[names[0]], names[0])
    for n in names[1:]:
        model.load_adapter(folders[n], n)
    return model.eval()


def _peft(cls, checkpoint: str, folders: dict[str, str]) -> peft.PeftModel:
    names = list(folders)
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(checkpoint), folders[names[0]], names[0])
    for n in names[1:]:
        model.load_adapter(folders[n], n)
    return model.eval()


def _alone(model: bp.PeftModel, name: str, fn):
    """`fn()` with only adapter `name` active (the base model for "__base__")."""
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


def _vqa_rows(seed: int):
    """Four (image, question, answer) rows: vqa_batch's two, twice, with other pixels."""
    a = vqa_batch(seed=seed)
    b = vqa_batch(seed=seed + 1)
    return [torch.cat([x, y]) for x, y in zip(a, b, strict=True)]


def test_vqa_mixed_batch_forward_equals_peft_and_each_row_alone(tmp_path, tiny_vqa: str) -> None:
    folders = _folders(tmp_path, tiny_vqa, HFVqa)
    ours, ref = _ours(bp.BlipForQuestionAnswering, tiny_vqa, folders), _peft(HFVqa, tiny_vqa, folders)
    px, q, qmask, answer, amask, labels = _vqa_rows(seed=6)
    kw = dict(input_ids=q, pixel_values=px, attention_mask=qmask, decoder_input_ids=answer)
    with torch.no_grad():
        got = ours(**kw, decoder_attention_mask=amask, adapter_names=ROWS)
        want = ref(**kw, decoder_attention_mask=amask, labels=labels, adapter_names=ROWS)
    assert rel_err(got.image_embeds, want.image_embeds) <= 1e-5
    for i, name in enumerate(ROWS):
        row = {k: v[i : i + 1] for k, v in kw.items()}

        def one(row=row, m=amask[i : i + 1]):
            with torch.no_grad():
                return ours(**row, decoder_attention_mask=m)

        alone = _alone(ours, name, one)
        assert rel_err(got.logits[i : i + 1], alone.logits) <= 1e-5, name
        assert rel_err(got.question_embeds[i : i + 1], alone.question_embeds) <= 1e-5, name
    # The adapters matter: the rows differ from the base run by far more than the tolerance.
    with ours.disable_adapter(), torch.no_grad():
        base = ours(**kw, decoder_attention_mask=amask)
    assert rel_err(base.logits[0], got.logits[0]) > 1e-3
    with pytest.raises(ValueError, match="eval"):
        ours.train()
        try:
            ours(**kw, adapter_names=ROWS)
        finally:
            ours.eval()
    with pytest.raises(ValueError, match="does not hold"):
        ours(**kw, adapter_names=["cats", "nope", "dogs", "birds"])
    with pytest.raises(ValueError, match="one name per"):
        ours(**kw, adapter_names=ROWS[:3])


@pytest.mark.parametrize(
    "settings", [dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=3)], ids=["greedy", "beams"]
)
def test_vqa_mixed_batch_generate_equals_each_row_alone(tmp_path, tiny_vqa: str, settings: dict) -> None:
    folders = _folders(tmp_path, tiny_vqa, HFVqa)
    ours = _ours(bp.BlipForQuestionAnswering, tiny_vqa, folders)
    px, q, qmask, *_ = _vqa_rows(seed=8)
    got = ours.generate(input_ids=q, pixel_values=px, attention_mask=qmask, adapter_names=ROWS, **settings)
    for i, name in enumerate(ROWS):
        alone = _alone(
            ours,
            name,
            lambda i=i: ours.generate(
                input_ids=q[i : i + 1], pixel_values=px[i : i + 1], attention_mask=qmask[i : i + 1], **settings
            ),
        )
        width = alone.shape[1]
        assert torch.equal(got[i, :width], alone[0]), name
        assert bool((got[i, width:] == TINY_TEXT["pad_token_id"]).all()), name


def test_retrieval_mixed_batch_scoring(tmp_path, tiny_itm: str) -> None:
    folders = _folders(tmp_path, tiny_itm, HFRetrieval)
    ours, ref = _ours(bp.BlipForImageTextRetrieval, tiny_itm, folders), _peft(HFRetrieval, tiny_itm, folders)
    px, ids, mask = itm_batch(images=4, seed=9)
    for use_itm_head in (True, False):
        with torch.no_grad():
            got = ours(
                input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=use_itm_head, adapter_names=ROWS
            )
            want = ref(
                input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=use_itm_head, adapter_names=ROWS
            )
        assert rel_err(got.itm_score, want.itm_score) <= 1e-5, use_itm_head
    # The scoring pieces, row by row against each row alone.
    model = ours.get_base_model()
    feats, embeds = model.get_image_features(px, adapter_names=ROWS)
    text = model.get_text_features(ids, mask, adapter_names=ROWS)
    logits = model.itm_logits(embeds, ids, mask, adapter_names=ROWS)
    for i, name in enumerate(ROWS):
        f, e = _alone(ours, name, lambda i=i: model.get_image_features(px[i : i + 1]))
        t = _alone(ours, name, lambda i=i: model.get_text_features(ids[i : i + 1], mask[i : i + 1]))
        lg = _alone(ours, name, lambda i=i, e=e: model.itm_logits(e, ids[i : i + 1], mask[i : i + 1]))
        assert rel_err(feats[i : i + 1], f) <= 1e-5 and rel_err(embeds[i : i + 1], e) <= 1e-5, name
        assert rel_err(text[i : i + 1], t) <= 1e-5 and rel_err(logits[i : i + 1], lg) <= 1e-5, name
    # Adapters chosen row by row take each text's image as its own row (an image's keys/values then differ by row).
    reverse = list(range(len(ROWS)))[::-1]
    by_index = model.itm_logits(embeds.flip(0), ids, mask, adapter_names=ROWS, image_index=reverse)
    assert rel_err(by_index, logits) <= 1e-5
    with pytest.raises(ValueError, match="as many texts as images"):
        ours(input_ids=ids[:3], pixel_values=px, attention_mask=mask[:3], use_itm_head=False, adapter_names=ROWS)


# --------------------------------------------------------------------------------------------- resizing
def _same_new_rows(ours: torch.Tensor, theirs: torch.Tensor, mean_resizing: bool) -> None:
    """The old rows kept exactly; the new ones transformers' draws (mean resizing, same seed) or, without
    mean resizing, rows of the initializer range's scale (transformers initialises the whole new table, so its
    draws differ)."""
    assert ours.shape == theirs.shape
    assert torch.equal(ours[:VOCAB], theirs[:VOCAB])
    if mean_resizing:
        torch.testing.assert_close(ours[VOCAB:], theirs[VOCAB:], atol=1e-5, rtol=0)
    else:
        std = TINY_TEXT.get("initializer_range", 0.02)
        assert 0.5 * std < float(ours[VOCAB:].detach().std()) < 2 * std


@pytest.mark.parametrize("mean_resizing", [True, False])
def test_vqa_resize_matches_transformers_and_saves_a_loadable_folder(tmp_path, tiny_vqa: str, mean_resizing) -> None:
    """transformers resizes the question encoder's table (the input embeddings) only; ours keeps the old rows,
    draws the new ones by transformers' rule (with mean resizing from the same seed: the same draws, rounded
    apart by ~1e-6), and resizes the answer decoder's table and tied head too, so the saved folder loads in
    transformers at the new size with the same outputs."""
    ours = bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa)
    ref = HFVqa.from_pretrained(tiny_vqa)
    old_enc = ours.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(11)
    ref.resize_token_embeddings(VOCAB + 5, mean_resizing=mean_resizing)
    torch.manual_seed(11)
    emb = ours.resize_token_embeddings(VOCAB + 5, mean_resizing=mean_resizing)
    assert (
        emb.weight.shape == (VOCAB + 5, TINY_TEXT["hidden_size"]) and ours.config.text_config.vocab_size == VOCAB + 5
    )
    assert torch.equal(emb.weight[:VOCAB], old_enc)
    _same_new_rows(emb.weight, ref.get_input_embeddings().weight, mean_resizing)
    dec = ours.get_submodule("text_decoder.bert.embeddings.word_embeddings").weight
    head = ours.get_submodule("text_decoder.cls.predictions")
    assert dec.shape[0] == VOCAB + 5 and head.bias.shape == (VOCAB + 5,) and torch.all(head.bias[VOCAB:] == 0)
    px, q, qmask, answer, amask, labels = vqa_batch(seed=2)
    q, answer = q.clone(), answer.clone()
    q[:, 1] = VOCAB + 3  # a new token in the question and the answer
    answer[:, 1] = VOCAB + 4
    with torch.no_grad():
        out = ours(input_ids=q, pixel_values=px, attention_mask=qmask, labels=answer)
    assert out.logits.shape[-1] == VOCAB + 5
    ours.save_pretrained(tmp_path / "ours")
    back, info = HFVqa.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        want = back.eval()(input_ids=q, pixel_values=px, attention_mask=qmask, labels=answer)
    assert rel_err(out.loss, want.loss) <= 1e-5
    again = bp.BlipForQuestionAnswering.from_pretrained(tmp_path / "ours")
    assert rel_err(again(input_ids=q, pixel_values=px, attention_mask=qmask, labels=answer).loss, want.loss) <= 1e-5


def test_vqa_resize_untied_head_and_after_adapters(tmp_path) -> None:
    config = tiny_vqa_config(tie_word_embeddings=False)
    config.tie_word_embeddings = False
    make_hf_vqa(config).save_pretrained(tmp_path / "m")
    ours = bp.BlipForQuestionAnswering.from_pretrained(tmp_path / "m")
    assert not ours._native.lm_head_tied
    ours.resize_token_embeddings(VOCAB + 1, pad_to_multiple_of=8)
    size = -(-(VOCAB + 1) // 8) * 8
    assert ours.get_submodule("text_decoder.cls.predictions.decoder").weight.shape[0] == size
    ours.save_pretrained(tmp_path / "ours")
    back, info = HFVqa.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    px, q, qmask, answer, *_ = vqa_batch(seed=1)
    with torch.no_grad():
        want = back.eval()(input_ids=q, pixel_values=px, attention_mask=qmask, labels=answer).loss
    assert rel_err(ours(input_ids=q, pixel_values=px, attention_mask=qmask, labels=answer).loss, want) <= 1e-5
    bp.get_peft_model(ours, bp.LoraConfig(r=2, target_modules=["decoder"]))
    with pytest.raises(ValueError, match="before adapters"):
        ours.resize_token_embeddings(VOCAB + 20)


@pytest.mark.parametrize("mean_resizing", [True, False])
def test_retrieval_resize_matches_transformers_both_ways(tmp_path, tiny_itm: str, mean_resizing: bool) -> None:
    ours = bp.BlipForImageTextRetrieval.from_pretrained(tiny_itm)
    ref = HFRetrieval.from_pretrained(tiny_itm).eval()
    torch.manual_seed(3)
    ref.resize_token_embeddings(VOCAB + 6, mean_resizing=mean_resizing)
    torch.manual_seed(3)
    emb = ours.resize_token_embeddings(VOCAB + 6, mean_resizing=mean_resizing)
    _same_new_rows(emb.weight, ref.get_input_embeddings().weight, mean_resizing)
    with torch.no_grad():  # the same table on both sides, to compare the scores of new tokens
        ref.get_input_embeddings().weight.copy_(emb.weight)
    assert ours.config.text_config.vocab_size == VOCAB + 6
    px, ids, mask = itm_batch(seed=4)
    ids = ids.clone()
    ids[:, 2] = VOCAB + 5
    for use_itm_head in (True, False):
        with torch.no_grad():
            want = ref(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=use_itm_head).itm_score
        got = ours(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=use_itm_head).itm_score
        assert rel_err(got, want) <= 1e-5
    # Both ways through the files.
    ours.save_pretrained(tmp_path / "ours")
    back, info = HFRetrieval.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref.save_pretrained(tmp_path / "theirs")
    loaded = bp.BlipForImageTextRetrieval.from_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        want = back.eval()(input_ids=ids, pixel_values=px, attention_mask=mask).itm_score
    assert rel_err(loaded(input_ids=ids, pixel_values=px, attention_mask=mask).itm_score, want) <= 1e-5
