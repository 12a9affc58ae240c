"""BlipForConditionalGeneration against transformers: same logits, loss, gradients, names and files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_hf_model, rel_err, tiny_batch, tiny_hf_config
from transformers import BlipForConditionalGeneration as HFBlip

import blip_peft as bp
from blip_peft.presets import BASE_TEXT, BASE_VISION

# Forward parity rests on the kernels the CPU's instruction set picks: `make test` runs these twice.
pytestmark = pytest.mark.cpu_isa


def _padded(input_ids: torch.Tensor, mask: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = input_ids.clone(), mask.clone()
    if side == "right":
        ids[1, -3:] = 0
        mask[1, -3:] = 0
    elif side == "left":
        ids[1, :2] = 0
        mask[1, :2] = 0
    return ids, mask


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_tiny_forward_matches_transformers_fp32(tiny_checkpoint: str, padding: str) -> None:
    ref_model = HFBlip.from_pretrained(tiny_checkpoint).eval()
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    px, ids, mask = tiny_batch()
    ids, mask = _padded(ids, mask, padding)
    labels = ids.masked_fill(mask == 0, -100)
    am = None if padding == "none" else mask
    ref = ref_model(pixel_values=px, input_ids=ids, attention_mask=am, labels=labels)
    out = model(pixel_values=px, input_ids=ids, attention_mask=am, labels=labels)
    assert out.logits.shape == ref.logits.shape
    assert rel_err(out.logits, ref.logits) <= 1e-5
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())


def test_forward_without_graph_equals_forward_with_graph(tiny_checkpoint: str) -> None:
    """Under no_grad the vision layers add their residuals and apply the activation in place, into buffers
    reused across layers (fewer page faults on real sizes); the numbers are the graph path's, bit for bit, and
    a LoRA adapter on the vision MLP (which cannot use the buffer) changes nothing of that."""
    px, ids, mask = tiny_batch()
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    peft = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint),
        bp.LoraConfig(r=4, target_modules=["fc1", "qkv"], init_lora_weights=False),
    )
    for m in (model, peft):
        with_graph = m(pixel_values=px, input_ids=ids, attention_mask=mask).logits
        assert with_graph.requires_grad
        with torch.no_grad():
            without = m(pixel_values=px, input_ids=ids, attention_mask=mask).logits
        assert torch.equal(without, with_graph.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiny_forward_half_precision(tiny_checkpoint: str, dtype: torch.dtype) -> None:
    ref_model = HFBlip.from_pretrained(tiny_checkpoint, dtype=dtype).eval()
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=dtype)
    assert model.dtype == dtype
    px, ids, mask = tiny_batch()
    ids, mask = _padded(ids, mask, "right")
    ref = ref_model(pixel_values=px.to(dtype), input_ids=ids, attention_mask=mask, labels=ids)
    out = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.dtype == dtype
    assert rel_err(out.logits, ref.logits) <= 2e-2
    assert abs(out.loss.item() - ref.loss.item()) <= 2e-2 * abs(ref.loss.item())


def test_torch_dtype_alias_and_auto_dtype(tmp_path, tiny_checkpoint: str) -> None:
    model = bp.AutoModelForVision2Seq.from_pretrained(tiny_checkpoint, torch_dtype=torch.float16)
    assert model.dtype == torch.float16
    # With no dtype the stored precision is kept, as transformers 5 does.
    model.save_pretrained(tmp_path)
    assert bp.BlipForConditionalGeneration.from_pretrained(tmp_path).dtype == torch.float16
    assert HFBlip.from_pretrained(tmp_path).dtype == torch.float16


def test_gradients_match_transformers(tiny_checkpoint: str) -> None:
    ref_model = HFBlip.from_pretrained(tiny_checkpoint).eval()
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    px, ids, mask = tiny_batch(seed=3)
    ids, mask = _padded(ids, mask, "right")
    labels = ids.masked_fill(mask == 0, -100)
    px_ref = px.clone().requires_grad_(True)
    px_ours = px.clone().requires_grad_(True)
    ref_model(pixel_values=px_ref, input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    model(pixel_values=px_ours, input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert rel_err(px_ours.grad, px_ref.grad) <= 1e-4
    ours = dict(model.named_parameters())
    name = "text_decoder.bert.embeddings.word_embeddings.weight"
    assert rel_err(ours[name].grad, dict(ref_model.named_parameters())[name].grad) <= 1e-4
    # Every other parameter too. Some gradients are zero in exact arithmetic (a softmax does not see the
    # key bias), so each is compared against the largest gradient's scale.
    scale = max(float(p.grad.norm()) for p in ref_model.parameters())
    for name, p in ref_model.named_parameters():
        assert ours[name].grad is not None, name
        assert float((ours[name].grad - p.grad).norm()) <= 1e-4 * max(float(p.grad.norm()), 1e-3 * scale), name


def test_names_shapes_and_counts_match(tiny_checkpoint: str) -> None:
    ref_model = HFBlip.from_pretrained(tiny_checkpoint)
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    ours = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    ref = [(n, tuple(p.shape)) for n, p in ref_model.named_parameters()]
    assert ours == ref
    assert model.num_parameters() == ref_model.num_parameters()
    assert all(p.requires_grad for p in model.parameters())


def test_untied_head_matches_transformers(tmp_path) -> None:
    # transformers unties the head only when both the top-level and the text config say so.
    config = tiny_hf_config(tie_word_embeddings=False)
    config.text_config.tie_word_embeddings = False
    ref_model = make_hf_model(config, seed=5)
    ref_model.save_pretrained(tmp_path)
    model = bp.BlipForConditionalGeneration.from_pretrained(tmp_path)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref_model.named_parameters()]
    px, ids, mask = tiny_batch()
    ref = ref_model(pixel_values=px, input_ids=ids, labels=ids)
    out = model(pixel_values=px, input_ids=ids, labels=ids)
    assert rel_err(out.logits, ref.logits) <= 1e-5


def test_sharded_checkpoint_loads(tmp_path) -> None:
    ref_model = make_hf_model(tiny_hf_config(), seed=2)
    ref_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    model = bp.BlipForConditionalGeneration.from_pretrained(tmp_path)
    px, ids, _ = tiny_batch()
    assert (
        rel_err(model(pixel_values=px, input_ids=ids).logits, ref_model(pixel_values=px, input_ids=ids).logits) <= 1e-5
    )


def test_save_pretrained_round_trips_through_transformers(tmp_path, tiny_checkpoint: str) -> None:
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    out_dir = tmp_path / "saved"
    model.save_pretrained(out_dir)
    assert sorted(os.listdir(out_dir)) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]  # as transformers
    ref_model, info = HFBlip.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    px, ids, mask = tiny_batch()
    ref = ref_model.eval()(pixel_values=px, input_ids=ids, attention_mask=mask)
    assert rel_err(model(pixel_values=px, input_ids=ids, attention_mask=mask).logits, ref.logits) <= 1e-6


def test_torch_optimizer_updates_model_in_place(tiny_checkpoint: str) -> None:
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    px, ids, mask = tiny_batch()
    first = model(pixel_values=px, input_ids=ids, labels=ids).loss
    first.backward()
    optimizer.step()
    optimizer.zero_grad()
    changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert changed == len(params)
    second = model(pixel_values=px, input_ids=ids, labels=ids).loss
    assert second.item() < first.item()


def test_to_casts_in_place_and_keeps_identity(tiny_checkpoint: str) -> None:
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    first = next(model.parameters())
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert first.dtype == torch.bfloat16  # the same parameter object, cast in place
    model.to(dtype="float32")
    assert next(model.parameters()).dtype == torch.float32
    assert model.device == torch.device("cpu")
    assert model.train().training and not model.eval().training


def test_print_matches_transformers(tiny_checkpoint: str) -> None:
    assert repr(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)) == repr(
        HFBlip.from_pretrained(tiny_checkpoint)
    )


def test_config_reads_like_transformers(tiny_checkpoint: str) -> None:
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert model.config.text_config.vocab_size == 99
    assert model.config.vision_config.image_size == 32
    assert model.config.to_dict()["text_config"]["bos_token_id"] == 97
    with open(os.path.join(tiny_checkpoint, "config.json")) as f:
        assert model.config.to_dict()["projection_dim"] == json.load(f)["projection_dim"]


def test_output_reads_like_model_output(tiny_checkpoint: str) -> None:
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    px, ids, _ = tiny_batch()
    out = model(pixel_values=px, input_ids=ids, labels=ids)
    assert out["loss"] is out.loss and out[0] is out.loss
    assert model(pixel_values=px, input_ids=ids).loss is None


@pytest.mark.slow
def test_real_shapes_match_transformers(base_checkpoint: str) -> None:
    ref_model = HFBlip.from_pretrained(base_checkpoint).eval()
    model = bp.BlipForConditionalGeneration.from_pretrained(base_checkpoint)
    assert model.num_parameters() == ref_model.num_parameters() == 223_971_644
    px, ids, mask = tiny_batch(batch=2, seq=12, vocab=BASE_TEXT["vocab_size"], image=BASE_VISION["image_size"])
    ids, mask = _padded(ids, mask, "right")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = ref_model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
        out = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_err(out.logits, ref.logits) <= 1e-5
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    del ref_model
    model.to(torch.bfloat16)
    with torch.no_grad():
        half = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_err(half.logits, ref.logits) <= 2e-2
