"""blip_peft as a drop-in for transformers' `BlipForConditionalGeneration` (issue #25): folders transformers writes,
the `PreTrainedModel` surface (outputs, loading options, embeddings, gradient checkpointing) and `nn.Module`-ness,
each checked against transformers 5.17 as the oracle. Our own versions of what transformers' `ModelTesterMixin`
checks for these behaviours."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from conftest import make_hf_model, tiny_batch, tiny_hf_config
from safetensors.torch import load_file
from transformers import BlipConfig as HFBlipConfig
from transformers import BlipForConditionalGeneration as HFBlip
from transformers import GenerationConfig as HFGenerationConfig

import blip_peft as bp
from blip_peft.presets import TINY_TEXT, TINY_VISION

TIE_KEYS = ("text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias")


def _hf_tied(model: HFBlip) -> bool:
    head = model.text_decoder
    return head.cls.predictions.decoder.weight is head.bert.embeddings.word_embeddings.weight


def _save_hf(model: HFBlip, path: os.PathLike[str]) -> str:
    model.save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------------------ folders transformers writes
@pytest.mark.parametrize(("top", "text"), [(True, True), (True, False), (False, True), (False, False)])
def test_tie_word_embeddings_precedence_as_transformers(tmp_path, top: bool, text: bool) -> None:
    """Either flag ties the LM head (transformers 5 merges the top model's and the decoder's tied keys); a folder
    saved with the decoder weight omitted loads with no missing keys, and our save loads in transformers."""
    config = tiny_hf_config(tie_word_embeddings=top)
    config.text_config.tie_word_embeddings = text
    hf = make_hf_model(config)
    folder = _save_hf(hf, tmp_path / "hf")
    stored = set(load_file(os.path.join(folder, "model.safetensors")))
    assert all((k in stored) != _hf_tied(hf) for k in TIE_KEYS)  # transformers omits exactly the tied copies

    ours = bp.BlipForConditionalGeneration.from_pretrained(folder)
    assert ours._native.lm_head_tied == _hf_tied(hf)
    px, ids, mask = tiny_batch()
    with torch.no_grad():
        ref = hf(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids)
        out = ours(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)

    ours.save_pretrained(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == stored
    back, info = HFBlip.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert _hf_tied(back) == _hf_tied(hf)


def test_tied_config_over_a_different_stored_head_stays_untied(tmp_path) -> None:
    """A config saying "tied" over a checkpoint whose decoder weight differs from the embeddings: transformers
    warns and does not tie; neither do we (the stored head is used)."""
    config = tiny_hf_config(tie_word_embeddings=False)
    config.text_config.tie_word_embeddings = False
    folder = _save_hf(make_hf_model(config), tmp_path)
    with open(os.path.join(folder, "config.json")) as f:
        data = json.load(f)
    data["tie_word_embeddings"] = True
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(data, f)
    hf = HFBlip.from_pretrained(folder).eval()
    assert not _hf_tied(hf)
    ours = bp.BlipForConditionalGeneration.from_pretrained(folder)
    assert not ours._native.lm_head_tied
    px, ids, mask = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(pixel_values=px, input_ids=ids).logits,
            hf(pixel_values=px, input_ids=ids).logits,
            atol=1e-5,
            rtol=1e-5,
        )


def test_sep_token_outside_vocabulary_loads_with_a_warning(tmp_path) -> None:
    """transformers' default sep_token_id (102) over a small vocabulary: loaded with a warning (as transformers
    does); generation never meets it and decodes to the length limit, as transformers does, min-length masking
    included."""
    config = HFBlipConfig(text_config=dict(TINY_TEXT, sep_token_id=102), vision_config=dict(TINY_VISION))
    hf = make_hf_model(config)
    folder = _save_hf(hf, tmp_path)
    with pytest.warns(UserWarning, match="sep_token_id"):
        ours = bp.BlipForConditionalGeneration.from_pretrained(folder)
    px, ids, _ = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(pixel_values=px, input_ids=ids).logits,
            hf(pixel_values=px, input_ids=ids).logits,
            atol=1e-5,
            rtol=1e-5,
        )
    for kwargs in (dict(max_new_tokens=6), dict(max_new_tokens=6, min_new_tokens=3), dict(num_beams=2, max_length=8)):
        assert torch.equal(ours.generate(px, **kwargs), hf.generate(pixel_values=px, **kwargs)), kwargs


def test_bos_outside_vocabulary_is_refused_where_it_is_embedded(tmp_path) -> None:
    config = HFBlipConfig(text_config=dict(TINY_TEXT, bos_token_id=500), vision_config=dict(TINY_VISION))
    folder = _save_hf(make_hf_model(config), tmp_path)
    with pytest.warns(UserWarning, match="bos_token_id"):
        ours = bp.BlipForConditionalGeneration.from_pretrained(folder)
    px, ids, _ = tiny_batch()
    ours(pixel_values=px, input_ids=ids)  # the caller's ids: fine
    with pytest.raises(ValueError, match="bos_token_id"):
        ours.generate(px)
    assert ours.generate(px, bos_token_id=TINY_TEXT["bos_token_id"], max_new_tokens=3).shape[1] <= 4


# ----------------------------------------------------------------------------- hidden states and attentions
@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[HFBlip, bp.BlipForConditionalGeneration]:
    hf = make_hf_model(tiny_hf_config())
    folder = _save_hf(hf, tmp_path_factory.mktemp("pair"))
    return hf, bp.BlipForConditionalGeneration.from_pretrained(folder)


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"output_hidden_states": True},
        {"output_attentions": True},
        {"output_hidden_states": True, "output_attentions": True},
    ],
)
def test_hidden_states_and_attentions_match_transformers(pair, flags: dict[str, bool]) -> None:
    hf, ours = pair
    px, ids, mask = tiny_batch(batch=3)
    with torch.no_grad():
        ref = hf(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids, **flags)
        out = ours(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids, **flags)
    assert list(out.keys()) == list(ref.keys())
    for key in ref.keys():
        a, b = out[key], ref[key]
        if isinstance(b, tuple):
            assert isinstance(a, tuple) and len(a) == len(b) == TINY_VISION["num_hidden_layers"] + (
                key == "hidden_states"
            )
            for x, y in zip(a, b, strict=True):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if flags.get("output_attentions"):
        grid = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2 + 1
        assert out.attentions[0].shape == (3, TINY_VISION["num_attention_heads"], grid, grid)
        torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(3, TINY_VISION["num_attention_heads"], grid))


def test_hidden_states_carry_gradients(pair) -> None:
    """The recorded tensors are part of the graph, as transformers' are (a loss over them back-propagates)."""
    hf, ours = pair
    px, ids, _ = tiny_batch()
    out = ours(pixel_values=px, input_ids=ids, output_hidden_states=True, output_attentions=True)
    ref = hf(pixel_values=px, input_ids=ids, output_hidden_states=True, output_attentions=True)
    (out.hidden_states[1].square().mean() + out.attentions[-1].square().mean()).backward()
    (ref.hidden_states[1].square().mean() + ref.attentions[-1].square().mean()).backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        if p.grad is not None or theirs[name].grad is not None:
            torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-6, rtol=1e-4)
    ours.zero_grad()
    hf.zero_grad()


def test_eager_attention_matches(tmp_path, pair) -> None:
    hf, _ = pair
    folder = _save_hf(hf, tmp_path)
    eager = bp.BlipForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    px, ids, _ = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            eager(pixel_values=px, input_ids=ids).logits,
            hf(pixel_values=px, input_ids=ids).logits,
            atol=1e-5,
            rtol=1e-5,
        )
    with pytest.raises(ValueError, match="attn_implementation"):
        bp.BlipForConditionalGeneration.from_pretrained(folder, attn_implementation="flash_attention_2")


# -------------------------------------------------------------------------------------------- ModelOutput
def test_output_is_a_model_output_mapping(pair) -> None:
    hf, ours = pair
    px, ids, _ = tiny_batch()
    with torch.no_grad():
        out = ours(pixel_values=px, input_ids=ids, labels=ids)
        ref = hf(pixel_values=px, input_ids=ids, labels=ids)
        tup = ours(pixel_values=px, input_ids=ids, labels=ids, return_dict=False)
        ref_tup = hf(pixel_values=px, input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(out, bp.ModelOutput) and isinstance(out, dict)
    assert list(out) == list(ref) == list(out.keys())
    assert [k for k, _ in out.items()] == list(ref.keys())
    assert out[0] is out.loss and out["logits"] is out.logits and out[1:] == out.to_tuple()[1:]
    assert out.image_embeds is out.last_hidden_state
    assert isinstance(tup, tuple) and len(tup) == len(ref_tup) == len(out.to_tuple())
    for a, b in zip(tup, ref_tup, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError):
        out.pop("loss")


def test_logits_to_keep_and_shift_labels(pair) -> None:
    hf, ours = pair
    px, ids, mask = tiny_batch(seq=9)
    with torch.no_grad():
        for keep in (1, 4):
            a = ours(pixel_values=px, input_ids=ids, logits_to_keep=keep).logits
            b = hf(pixel_values=px, input_ids=ids, logits_to_keep=keep).logits
            assert a.shape == b.shape == (2, keep, TINY_TEXT["vocab_size"])
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        shift = torch.roll(ids, -1, 1)
        shift[:, -1] = -100
        a = ours(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids, shift_labels=shift)
        b = hf(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids, shift_labels=shift)
        torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)
        assert ours(pixel_values=px, input_ids=ids, shift_labels=shift).loss is None  # no labels, no loss
    with pytest.raises(ValueError, match="logits_to_keep"):
        ours(pixel_values=px, input_ids=ids, labels=ids, logits_to_keep=2)
    with pytest.raises(ValueError, match="shift_labels"):
        ours(pixel_values=px, input_ids=ids, labels=ids, shift_labels=shift[:, :3])


# ------------------------------------------------------------------------------------------ loading options
def test_from_pretrained_options(tmp_path, pair) -> None:
    hf, _ = pair
    folder = _save_hf(hf, tmp_path / "hf")
    px, ids, _ = tiny_batch()
    with torch.no_grad():
        want = hf(pixel_values=px, input_ids=ids).logits

    model, info = bp.BlipForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    _, ref_info = HFBlip.from_pretrained(folder, output_loading_info=True)
    assert info == ref_info

    for device_map in ("cpu", {"": "cpu"}, torch.device("cpu")):
        assert bp.BlipForConditionalGeneration.from_pretrained(folder, device_map=device_map).device.type == "cpu"
    with pytest.raises(ValueError, match="device_map"):
        bp.BlipForConditionalGeneration.from_pretrained(folder, device_map="auto")

    # config= (transformers' object): its settings are used (here a label smoothing the folder lacks)
    config = HFBlipConfig.from_pretrained(folder)
    config.text_config.label_smoothing = 0.1
    smoothed = bp.BlipForConditionalGeneration.from_pretrained(folder, config=config)
    assert smoothed.config.text_config.label_smoothing == 0.1
    hf_smoothed = HFBlip.from_pretrained(folder, config=config).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            smoothed(pixel_values=px, input_ids=ids, labels=ids).loss,
            hf_smoothed(pixel_values=px, input_ids=ids, labels=ids).loss,
        )

    # None with config= and state_dict= (transformers' state dict, tied copies and all)
    from_state = bp.BlipForConditionalGeneration.from_pretrained(None, config=hf.config, state_dict=hf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(from_state(pixel_values=px, input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    assert not from_state.training
    # the weights file's own dict (tied copies left out)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    from_file = bp.BlipForConditionalGeneration.from_pretrained(folder, state_dict=weights)
    with torch.no_grad():
        torch.testing.assert_close(from_file(pixel_values=px, input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_pretrained_model_attributes_match_transformers(pair) -> None:
    hf, ours = pair
    assert ours.can_generate() == hf.can_generate() is True
    assert ours.base_model_prefix == hf.base_model_prefix
    assert ours.base_model is ours and hf.base_model is hf
    assert ours.main_input_name == hf.main_input_name
    assert ours.supports_gradient_checkpointing == hf.supports_gradient_checkpointing
    c, r = ours.config, hf.config
    for name in ("is_encoder_decoder", "use_return_dict", "return_dict", "output_hidden_states", "output_attentions"):
        assert getattr(c, name) == getattr(r, name), name
    assert c.tie_word_embeddings == r.tie_word_embeddings
    assert c.get_text_config().vocab_size == r.get_text_config().vocab_size
    assert c.get_text_config(decoder=True).to_dict()["hidden_size"] == r.get_text_config(decoder=True).hidden_size
    assert c.get_text_config(encoder=True) is not None


# --------------------------------------------------------------------------------------- generation config
def test_generation_config_round_trips(tmp_path, pair) -> None:
    hf, _ = pair
    folder = _save_hf(hf, tmp_path / "hf")
    ours = bp.BlipForConditionalGeneration.from_pretrained(folder)
    ref = HFGenerationConfig.from_pretrained(folder).to_diff_dict()
    ref.pop("transformers_version")
    assert ours.generation_config.to_diff_dict() == ref
    # the same for a model made from a config (transformers' `from_model_config`)
    fresh = bp.BlipForConditionalGeneration.from_config(tiny_hf_config().to_dict())
    assert fresh.generation_config.to_diff_dict() == ref

    ours.generation_config.max_new_tokens = 4
    ours.generation_config.num_beams = 2
    ours.save_pretrained(tmp_path / "ours")
    theirs = HFGenerationConfig.from_pretrained(tmp_path / "ours")
    assert theirs.max_new_tokens == 4 and theirs.num_beams == 2 and theirs.eos_token_id == TINY_TEXT["eos_token_id"]
    again = bp.BlipForConditionalGeneration.from_pretrained(tmp_path / "ours")
    assert again.generation_config == ours.generation_config

    # As in transformers' BLIP, the model's generation_config is not applied by itself, and one passed in gives
    # its settings (its special ids give way to BLIP's [SEP] and pad)
    px, _, _ = tiny_batch()
    loaded_hf = HFBlip.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(again.generate(px), loaded_hf.generate(pixel_values=px))
    assert torch.equal(
        again.generate(px, generation_config=again.generation_config),
        loaded_hf.generate(pixel_values=px, generation_config=loaded_hf.generation_config),
    )
    gc = bp.GenerationConfig(max_new_tokens=5, do_sample=False, num_beams=3, eos_token_id=2)
    hgc = HFGenerationConfig(max_new_tokens=5, do_sample=False, num_beams=3, eos_token_id=2)
    assert torch.equal(
        again.generate(px, generation_config=gc), loaded_hf.generate(pixel_values=px, generation_config=hgc)
    )


# --------------------------------------------------------------------------------------------- embeddings
def test_input_and_output_embeddings(pair) -> None:
    hf, ours = pair
    emb = ours.get_input_embeddings()
    assert isinstance(emb, torch.nn.Embedding)
    assert emb.weight is dict(ours.named_parameters())["text_decoder.bert.embeddings.word_embeddings.weight"]
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (
        hf.get_input_embeddings().num_embeddings,
        hf.get_input_embeddings().embedding_dim,
        hf.get_input_embeddings().padding_idx,
    )
    _, ids, _ = tiny_batch()
    torch.testing.assert_close(emb(ids), hf.get_input_embeddings()(ids))
    assert ours.get_output_embeddings() is None and hf.get_output_embeddings() is None
    head = ours.get_submodule("text_decoder.cls.predictions.decoder")
    assert head.weight is emb.weight  # tied, as transformers' head
    ours.tie_weights()
    assert head.weight is emb.weight


def _logits(model, px, ids):
    with torch.no_grad():
        return model(pixel_values=px, input_ids=ids).logits


@pytest.mark.parametrize("mean_resizing", [True, False])
def test_resized_vocabulary_crosses_both_ways(tmp_path, mean_resizing: bool) -> None:
    hf = make_hf_model(tiny_hf_config())
    folder = _save_hf(hf, tmp_path / "base")
    vocab = TINY_TEXT["vocab_size"]
    px, ids, _ = tiny_batch()
    new_ids = ids.clone()
    new_ids[:, 3] = vocab + 2  # a new token

    # ours resized -> transformers
    ours = bp.BlipForConditionalGeneration.from_pretrained(folder)
    old_rows = ours.get_input_embeddings().weight.detach().clone()
    emb = ours.resize_token_embeddings(vocab + 5, mean_resizing=mean_resizing)
    assert (
        emb.weight.shape == (vocab + 5, TINY_TEXT["hidden_size"]) and ours.config.text_config.vocab_size == vocab + 5
    )
    assert torch.equal(emb.weight[:vocab], old_rows)
    bias = ours.get_submodule("text_decoder.cls.predictions").bias
    assert bias.shape == (vocab + 5,) and torch.all(bias[vocab:] == 0)  # tied: padded with zeros, as transformers
    assert _logits(ours, px, new_ids).shape[-1] == vocab + 5
    ours.save_pretrained(tmp_path / "ours")
    back, info = HFBlip.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    torch.testing.assert_close(_logits(ours, px, new_ids), _logits(back.eval(), px, new_ids), atol=1e-5, rtol=1e-5)

    # transformers resized -> ours
    hf.resize_token_embeddings(vocab + 8, pad_to_multiple_of=4, mean_resizing=mean_resizing)  # 107 -> 108
    hf.save_pretrained(tmp_path / "theirs")
    loaded = bp.BlipForConditionalGeneration.from_pretrained(tmp_path / "theirs")
    assert loaded.config.text_config.vocab_size == 108
    torch.testing.assert_close(_logits(loaded, px, new_ids), _logits(hf, px, new_ids), atol=1e-5, rtol=1e-5)


def test_resize_untied_head_and_pad_to_multiple(tmp_path) -> None:
    """transformers leaves an untied BLIP head at the old size (its forward then fails); ours resizes it too,
    and the saved folder loads in transformers at the new size."""
    config = tiny_hf_config(tie_word_embeddings=False)
    config.text_config.tie_word_embeddings = False
    ours = bp.BlipForConditionalGeneration.from_pretrained(_save_hf(make_hf_model(config), tmp_path / "base"))
    ours.resize_token_embeddings(101, pad_to_multiple_of=8)  # -> 104
    head = ours.get_submodule("text_decoder.cls.predictions.decoder")
    assert (
        head.weight.shape == (104, TINY_TEXT["hidden_size"]) and head.weight is not ours.get_input_embeddings().weight
    )
    px, ids, _ = tiny_batch()
    assert _logits(ours, px, ids).shape[-1] == 104
    ours.save_pretrained(tmp_path / "ours")
    back = HFBlip.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(ours, px, ids), _logits(back, px, ids), atol=1e-5, rtol=1e-5)


def test_resize_after_adapters_is_refused(pair) -> None:
    _, ours = pair
    model = bp.BlipForConditionalGeneration.from_config(tiny_hf_config().to_dict())
    bp.get_peft_model(model, bp.LoraConfig(r=2, target_modules=["decoder"]))
    with pytest.raises(ValueError, match="before adapters"):
        model.resize_token_embeddings(120)


# --------------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_switches_and_plain_loop(pair) -> None:
    """A plain torch loop with gradient checkpointing keeps none of the forward's activations and gets the same
    loss and gradients as without."""
    _, ours = pair
    assert ours.supports_gradient_checkpointing and not ours.is_gradient_checkpointing
    px, ids, mask = tiny_batch()

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += 1
            return t

        ours.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = ours(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
        ours.zero_grad()
        ours.eval()
        return loss.detach(), grads, saved

    loss, grads, saved = step()
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ours.is_gradient_checkpointing
    try:
        ck_loss, ck_grads, ck_saved = step()
    finally:
        ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing
    assert saved > 100 and ck_saved < 10, (saved, ck_saved)
    torch.testing.assert_close(ck_loss, loss)
    for name, g in grads.items():
        torch.testing.assert_close(ck_grads[name], g, atol=1e-7, rtol=1e-5)
    ours.enable_input_require_grads()  # accepted (our checkpointing needs no help)
    ours.disable_input_require_grads()


# ------------------------------------------------------------------------------------------ nn.Module-ness
def test_module_tree_matches_transformers(pair) -> None:
    hf, ours = pair
    assert isinstance(ours, torch.nn.Module)
    ours_modules = [(n, type(m).__name__) for n, m in ours.named_modules()]
    ref_modules = [(n, type(m).__name__) for n, m in hf.named_modules()]
    assert [n for n, _ in ours_modules] == [n for n, _ in ref_modules]
    # class names are transformers' (activations aside: the core names them as torch prints them)
    same = [a == b for a, b in zip(ours_modules, ref_modules, strict=True)]
    assert sum(same) >= len(same) - 2 * (TINY_VISION["num_hidden_layers"] + TINY_TEXT["num_hidden_layers"]) - 1
    assert len(list(ours.modules())) == len(list(hf.modules()))
    assert [n for n, _ in ours.named_children()] == [n for n, _ in hf.named_children()]
    # the tree holds the very tensors the core computes with
    params = dict(ours.named_parameters())
    layer = ours.get_submodule("vision_model.encoder.layers.1.self_attn.qkv")
    assert layer.weight is params["vision_model.encoder.layers.1.self_attn.qkv.weight"]
    assert ours.vision_model.embeddings.class_embedding is params["vision_model.embeddings.class_embedding"]
    assert [n for n, _ in torch.nn.Module.named_parameters(ours)] == list(params)


def test_state_dict_round_trips_with_transformers(tmp_path, pair) -> None:
    hf, _ = pair
    ours = bp.BlipForConditionalGeneration.from_pretrained(_save_hf(hf, tmp_path / "hf"))
    state = ours.state_dict()
    assert list(state) == list(hf.state_dict())
    torch.save(state, tmp_path / "sd.pt")
    other = make_hf_model(tiny_hf_config(), seed=5)
    result = other.load_state_dict(torch.load(tmp_path / "sd.pt"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    px, ids, _ = tiny_batch()
    torch.testing.assert_close(_logits(other, px, ids), _logits(ours, px, ids), atol=1e-5, rtol=1e-5)

    # and the other way: transformers' state dict into ours, in place (same tensors, new values)
    fresh = bp.BlipForConditionalGeneration.from_config(tiny_hf_config().to_dict(), seed=3)
    before = dict(fresh.named_parameters())
    result = fresh.load_state_dict(make_hf_model(tiny_hf_config(), seed=7).state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert all(p is before[n] for n, p in fresh.named_parameters())
    torch.testing.assert_close(
        _logits(fresh.eval(), px, ids), _logits(make_hf_model(tiny_hf_config(), seed=7), px, ids), atol=1e-5, rtol=1e-5
    )
    bad = dict(hf.state_dict())
    bad.pop("vision_model.post_layernorm.weight")
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(bad)


def test_top_level_hooks_fire_and_inner_ones_cannot(pair) -> None:
    _, ours = pair
    px, ids, _ = tiny_batch()
    seen: list[str] = []
    pre = ours.register_forward_pre_hook(lambda m, args, kwargs: seen.append("pre"), with_kwargs=True)
    post = ours.register_forward_hook(lambda m, args, kwargs, out: seen.append(type(out).__name__), with_kwargs=True)
    inner = ours.get_submodule("vision_model.encoder.layers.0").register_forward_hook(lambda *a: seen.append("inner"))
    try:
        with torch.no_grad():
            ours(pixel_values=px, input_ids=ids)
    finally:
        pre.remove()
        post.remove()
        inner.remove()
    assert seen == ["pre", "BlipForConditionalGenerationModelOutput"]  # the core runs the layers: no "inner"
    with pytest.raises(RuntimeError, match="inside the Rust core"):
        ours.get_submodule("vision_model.encoder.layers.0")(torch.zeros(1))


def test_train_eval_reach_the_tree_and_optimizer_groups(pair) -> None:
    _, ours = pair
    ours.train()
    assert ours.training and all(m.training for m in ours.modules())
    ours.eval()
    assert not ours.training and not any(m.training for m in ours.modules())
    decay = [p for n, p in ours.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in ours.named_parameters() if n.endswith("bias")]
    torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}])


def test_tree_follows_adapters() -> None:
    model = bp.BlipForConditionalGeneration.from_config(tiny_hf_config().to_dict())
    peft = bp.get_peft_model(model, bp.LoraConfig(r=2, target_modules=["qkv"]))
    names = {n for n, _ in model.named_modules()}
    assert "vision_model.encoder.layers.0.self_attn.qkv.lora_A.default" in names
    assert set(model.state_dict()) >= {n for n, _ in model.named_parameters()}
    peft.unload()
    assert not any("lora" in n for n, _ in model.named_modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.state_dict()


# ------------------------------------------------------------------------------ interpolate_pos_encoding
@pytest.mark.parametrize(("height", "width"), [(48, 48), (24, 24), (40, 24), (37, 30), (32, 32)])
def test_interpolate_pos_encoding_matches_transformers(pair, height: int, width: int) -> None:
    """Images at another resolution than the checkpoint's (larger, smaller, not square, not a multiple of the
    patch): the position embeddings resampled bicubically as transformers does; logits, loss, the vision
    tower's hidden states and generated ids equal."""
    hf, ours = pair
    g = torch.Generator().manual_seed(height * 100 + width)
    px = torch.randn(2, 3, height, width, generator=g)
    _, ids, mask = tiny_batch(batch=2)
    with torch.no_grad():
        ref = hf(
            pixel_values=px,
            input_ids=ids,
            attention_mask=mask,
            labels=ids,
            interpolate_pos_encoding=True,
            output_hidden_states=True,
        )
        out = ours(
            pixel_values=px,
            input_ids=ids,
            attention_mask=mask,
            labels=ids,
            interpolate_pos_encoding=True,
            output_hidden_states=True,
        )
    grid = (height // TINY_VISION["patch_size"]) * (width // TINY_VISION["patch_size"]) + 1
    assert out.image_embeds.shape[1] == grid
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for kwargs in ({}, {"num_beams": 3}, {"do_sample": True, "top_k": 5}):
        seed = {"seed": 3} if kwargs.get("do_sample") else {}
        if kwargs.get("do_sample"):
            torch.manual_seed(3)
        expected = hf.generate(pixel_values=px, interpolate_pos_encoding=True, max_new_tokens=8, **kwargs)
        got = ours.generate(pixel_values=px, interpolate_pos_encoding=True, max_new_tokens=8, **kwargs, **seed)
        assert torch.equal(got, expected), kwargs


def test_other_resolutions_need_interpolate_pos_encoding(pair) -> None:
    _, ours = pair
    px = torch.randn(1, 3, 48, 48)
    _, ids, _ = tiny_batch(batch=1)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        ours(pixel_values=px, input_ids=ids)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        ours.generate(pixel_values=px)
    with pytest.raises(ValueError, match="smaller than one 8x8 patch"):
        ours(pixel_values=torch.randn(1, 3, 7, 32), input_ids=ids, interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        ours(pixel_values=torch.randn(1, 1, 32, 32), input_ids=ids, interpolate_pos_encoding=True)
