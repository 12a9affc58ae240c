"""Adapters on a live model: loaded, deleted and hot-swapped without reloading the base; a hundred resident at
once, each row of a batch picking its own; the memory each takes. Oracle: peft (its `hotswap_adapter`)."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import rel_err, tiny_batch
from peft.utils.hotswap import hotswap_adapter as peft_hotswap
from transformers import BlipForConditionalGeneration as HFBlip

import blip_peft as bp

TARGETS = ["query", "value", "self_attn.qkv", "fc1"]


def _peft_folder(path, checkpoint: str, seed: int, **config) -> str:
    ref = peft.get_peft_model(HFBlip.from_pretrained(checkpoint), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ref.save_pretrained(str(path))
    return str(path)


def _logits(model, px, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=px, input_ids=ids).logits


def test_hotswap_replaces_weights_in_place_as_peft_does(tmp_path, tiny_checkpoint) -> None:
    first = _peft_folder(tmp_path / "first", tiny_checkpoint, 1, r=4, lora_alpha=8, target_modules=TARGETS)
    # Same layers and ranks, another alpha: the scaling follows the new config.
    second = _peft_folder(tmp_path / "second", tiny_checkpoint, 2, r=4, lora_alpha=3, target_modules=TARGETS)
    other = _peft_folder(tmp_path / "other", tiny_checkpoint, 3, r=2, lora_alpha=4, target_modules=TARGETS)
    base = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model = bp.PeftModel.from_pretrained(base, first, "live")
    model.load_adapter(other, "other")
    px, ids, _ = tiny_batch(batch=2, seed=1)
    params = {n: p for n, p in model.named_parameters()}
    base_before = {n: p.clone() for n, p in params.items() if "lora_" not in n}
    mixed_before = model(pixel_values=px, input_ids=ids, adapter_names=["live", "other"]).logits

    model.hotswap_adapter(second, "live")

    # In place: the same tensor objects and storage; the base untouched; the other adapter untouched.
    after = dict(model.named_parameters())
    assert all(after[n] is p or after[n].data_ptr() == p.data_ptr() for n, p in params.items())
    assert all(torch.equal(after[n], v) for n, v in base_before.items())
    ref = peft.PeftModel.from_pretrained(HFBlip.from_pretrained(tiny_checkpoint), first, "live").eval()
    peft_hotswap(ref, second, adapter_name="live")
    assert rel_err(_logits(model, px, ids), _logits(ref, px, ids)) <= 1e-5
    fresh = bp.PeftModel.from_pretrained(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), second)
    assert rel_err(_logits(model, px, ids), _logits(fresh, px, ids)) <= 1e-5
    mixed_after = model(pixel_values=px, input_ids=ids, adapter_names=["live", "other"]).logits
    assert not torch.allclose(mixed_after[0], mixed_before[0])
    assert torch.equal(mixed_after[1], mixed_before[1])
    assert model.peft_config["live"].lora_alpha == 3

    # bp.hotswap_adapter is peft's function form; swapping back restores the first adapter exactly.
    bp.hotswap_adapter(model, first, "live")
    assert torch.equal(model(pixel_values=px, input_ids=ids, adapter_names=["live", "other"]).logits, mixed_before)


def test_hotswap_that_does_not_fit_is_refused_and_changes_nothing(tmp_path, tiny_checkpoint) -> None:
    first = _peft_folder(tmp_path / "first", tiny_checkpoint, 1, r=4, lora_alpha=8, target_modules=TARGETS)
    rank2 = _peft_folder(tmp_path / "rank2", tiny_checkpoint, 2, r=2, lora_alpha=8, target_modules=TARGETS)
    fewer = _peft_folder(tmp_path / "fewer", tiny_checkpoint, 3, r=4, lora_alpha=8, target_modules=["query"])
    rslora = _peft_folder(
        tmp_path / "rs", tiny_checkpoint, 4, r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS
    )
    model = bp.PeftModel.from_pretrained(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), first)
    px, ids, _ = tiny_batch(batch=1, seed=2)
    before = _logits(model, px, ids)
    with pytest.raises(ValueError, match="ranks differ"):
        model.hotswap_adapter(rank2, "default")
    with pytest.raises(ValueError, match="incompatible: for use_rslora"):  # peft refuses it too
        model.hotswap_adapter(rslora, "default")
    with pytest.raises(ValueError, match="missing adapter keys"):
        model.hotswap_adapter(fewer, "default")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.hotswap_adapter(first, "nope")
    assert torch.equal(_logits(model, px, ids), before)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.hotswap_adapter(first, "default")


def test_a_hundred_adapters_resident_each_row_its_own(tmp_path, tiny_checkpoint) -> None:
    """100 small adapters on one base: loaded from folders onto the live model, each image of a batch with its
    own, the memory each takes reported; deleting half frees them and their names."""
    config = dict(r=2, lora_alpha=4, target_modules=["query", "value", "self_attn.qkv"])
    folders = [_peft_folder(tmp_path / f"a{i:03d}", tiny_checkpoint, 100 + i, **config) for i in range(100)]
    names = [f"domain{i:03d}" for i in range(100)]
    model = bp.PeftModel.from_pretrained(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), folders[0], names[0]
    )
    for name, folder in zip(names[1:], folders[1:], strict=True):
        model.load_adapter(folder, name)
    model.eval()

    memory = model.adapter_memory()
    assert list(memory) == names
    # Each adapter: r x in (A) + out x r (B) float32 per adapted layer, and nothing else.
    per_adapter = sum((p.numel() * 4) for n, p in model.named_parameters() if f".{names[7]}." in n and "lora_" in n)
    assert per_adapter > 0 and set(memory.values()) == {per_adapter}
    print(f"\n100 adapters resident: {per_adapter} bytes each ({100 * per_adapter / 2**20:.2f} MiB in all)")

    rows = [names[i] for i in (3, 97, 50, 0, 3, 64, 12, 99)] + ["__base__"]
    px, _, _ = tiny_batch(batch=len(rows), seed=3)
    got = model.generate(pixel_values=px, adapter_names=rows, max_new_tokens=8, num_beams=2)
    for i, name in enumerate(rows):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(pixel_values=px[i : i + 1], max_new_tokens=8, num_beams=2)
        else:
            model.set_adapter(name)
            alone = model.generate(pixel_values=px[i : i + 1], max_new_tokens=8, num_beams=2)
        assert torch.equal(got[i, : alone.shape[1]], alone[0]), name
    assert len({tuple(r.tolist()) for r in got}) > 4

    for name in names[50:]:
        model.delete_adapter(name)
    assert list(model.adapter_memory()) == names[:50]
    assert not any(f".{names[60]}." in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="does not hold: domain060"):
        model.generate(pixel_values=px[:2], adapter_names=[names[0], names[60]])
    # A new adapter loaded onto the live model serves at once, next to the others.
    model.load_adapter(folders[60], "late")
    again = model.generate(pixel_values=px[:2], adapter_names=["late", names[3]], max_new_tokens=8, num_beams=2)
    assert torch.equal(again[0, : got.shape[1]][: again.shape[1]], again[0])
