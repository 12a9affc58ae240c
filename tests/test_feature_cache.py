"""The frozen vision tower's feature cache (`train(feature_cache=...)`): the losses of a cached run are the
uncached run's bit for bit, over epochs that reuse the embeddings (and the decoder's cross-attention projections
of them), from tensors and from images, within a budget smaller than the data; the cache stands aside (saying
why) when the vision tower trains or is random."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_hf_model, tiny_hf_config

import blip_peft as bp
from blip_peft import world

# Bit equality rests on each image's features not depending on its batch mates (the trainer computes a frozen
# tower's image by image, cached or not: MKL's AVX2 path on Intel rounds a GEMM row differently at other row
# counts): `make test` runs these twice (capped at AVX2 too).
pytestmark = pytest.mark.cpu_isa

TEXT_ONLY = ["self.query", "self.value"]
CROSS_ATTENTION = ["crossattention.self.query", "crossattention.self.key", "crossattention.self.value"]
# An image's cached bytes in the tiny model (float32): its embeddings, (1 + 16 patches) x 32 values, and each of
# the decoder's 2 layers' cross-attention key and value projections of them, as many again each.
EMBEDDING_BYTES = 17 * 32 * 4
WITH_PROJECTIONS_BYTES = EMBEDDING_BYTES * (1 + 2 * 2)


@pytest.fixture(scope="module")
def dropout_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with dropout in the decoder (its embeddings' dropout draws before any layer reseeds, so a
    skipped vision tower must leave torch's RNG as the tower would)."""
    config = tiny_hf_config()
    config.text_config.hidden_dropout_prob = 0.1
    config.text_config.attention_probs_dropout_prob = 0.1
    # Head size 16, not the tiny model's 8: torch's CPU attention over 17 tokens of head size 8 rounds an image's
    # rows differently in batches of different sizes (the cache cannot then repeat the uncached run's last bit;
    # BLIP's real head size, 64, is batch-invariant, as the bundled model's test below checks).
    config.vision_config.num_attention_heads = 2
    path = tmp_path_factory.mktemp("tiny_dropout")
    make_hf_model(config).save_pretrained(path)
    return str(path)


def _tensors(n: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 90, (n, 7), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        length = 3 + i % 5
        ids[i, length - 1] = 3
        ids[i, length:] = 0
        mask[i, length:] = 0
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask}


def _peft(path: str, targets: list[str], dropout: float = 0.1) -> bp.PeftModel:
    base = bp.BlipForConditionalGeneration.from_pretrained(path, dtype="float32")
    torch.manual_seed(0)  # the same adapter A in every run
    return bp.get_peft_model(base, bp.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))


def _train(path: str, targets: list[str], data, processor=None, **kw):
    model = _peft(path, targets)
    kw = dict(epochs=3, batch_size=4, learning_rate=5e-3, mixed_precision="no", logging_steps=1, progress=False) | kw
    result = bp.train(model, processor, data, **kw)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return result, adapter


def _assert_same_run(a, b) -> None:
    (ra, wa), (rb, wb) = a, b
    assert torch.equal(torch.tensor(ra.losses, dtype=torch.float64), torch.tensor(rb.losses, dtype=torch.float64))
    assert torch.equal(
        torch.tensor([h["grad_norm"] for h in ra.history]), torch.tensor([h["grad_norm"] for h in rb.history])
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("targets", [TEXT_ONLY, CROSS_ATTENTION], ids=["text-only", "cross-attention"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_cached_losses_equal_the_uncached_run_from_tensors(dropout_checkpoint, targets, checkpointing) -> None:
    data = _tensors(10)  # batches of 4, 4 and 2, reshuffled every epoch: an image meets other batch mates
    kw = dict(gradient_checkpointing=checkpointing)
    cached = _train(dropout_checkpoint, targets, data, **kw)
    plain = _train(dropout_checkpoint, targets, data, feature_cache=False, **kw)
    _assert_same_run(cached, plain)
    cache = cached[0].feature_cache
    assert cache["enabled"] and cache["reason"] is None
    assert (cache["misses"], cache["hits"], cache["cached_examples"]) == (10, 20, 10)
    # Gradient checkpointing recomputes the decoder's layers, so it reads the embeddings only.
    assert cache["cross_projections"] is not checkpointing
    assert cache["cached_bytes"] == 10 * (EMBEDDING_BYTES if checkpointing else WITH_PROJECTIONS_BYTES)
    assert plain[0].feature_cache["enabled"] is False and "feature_cache=False" in plain[0].feature_cache["reason"]


def test_cached_losses_equal_the_uncached_run_from_images(caplog) -> None:
    path = bp.bundled_model_path()
    processor = bp.BlipProcessor.from_pretrained(path)
    size = processor.image_processor.size["height"]
    items = world.make_dataset(6, seed=4, domain="target", size=size)
    data = [{"image": d["image"], "text": d["text"]} for d in items]
    for targets in (TEXT_ONLY, CROSS_ATTENTION):
        with caplog.at_level(logging.INFO, logger="blip_peft"):
            cached = _train(path, targets, data, processor, num_workers=1)
        plain = _train(path, targets, data, processor, num_workers=1, feature_cache=False)
        _assert_same_run(cached, plain)
        cache = cached[0].feature_cache
        assert (cache["misses"], cache["hits"]) == (6, 12)
        assert "feature cache: 12 image rows from the cache, 6 computed" in caplog.text


def test_a_budget_smaller_than_the_data_recomputes_the_rest(dropout_checkpoint) -> None:
    data = _tensors(10)
    cached = _train(dropout_checkpoint, TEXT_ONLY, data, feature_cache=3.5 * EMBEDDING_BYTES / 2**20)
    plain = _train(dropout_checkpoint, TEXT_ONLY, data, feature_cache=False)
    _assert_same_run(cached, plain)
    cache = cached[0].feature_cache
    assert cache["cached_examples"] == 3 and cache["cached_bytes"] == 3 * EMBEDDING_BYTES
    assert (cache["hits"], cache["misses"]) == (6, 24) and cache["cross_projections"] is False


@pytest.mark.parametrize("targets", [TEXT_ONLY, CROSS_ATTENTION], ids=["text-only", "cross-attention"])
def test_projections_are_kept_only_when_every_example_fits_with_them(dropout_checkpoint, targets) -> None:
    data = _tensors(10)
    plain = _train(dropout_checkpoint, targets, data, feature_cache=False)
    # Room for every example's projections: all kept; one byte less: the embeddings only, of every example.
    for budget, kept in ((10 * WITH_PROJECTIONS_BYTES, True), (10 * WITH_PROJECTIONS_BYTES - 1, False)):
        cached = _train(dropout_checkpoint, targets, data, feature_cache=budget / 2**20)
        _assert_same_run(cached, plain)
        cache = cached[0].feature_cache
        assert cache["cross_projections"] is kept and cache["cached_examples"] == 10
        assert cache["cached_bytes"] == 10 * (WITH_PROJECTIONS_BYTES if kept else EMBEDDING_BYTES)


def test_trained_cross_attention_weights_are_not_cached(dropout_checkpoint) -> None:
    # modules_to_save trains the cross-attention keys' base weights: their projections change every step.
    model = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(dropout_checkpoint, dtype="float32"),
        bp.LoraConfig(r=4, target_modules=TEXT_ONLY, modules_to_save=["crossattention.self.key"]),
    )
    result = bp.train(model, None, _tensors(6), epochs=2, batch_size=4, progress=False)
    cache = result.feature_cache
    assert cache["enabled"] and cache["cross_projections"] is False
    assert cache["cached_bytes"] == 6 * EMBEDDING_BYTES


def test_bf16_caches_the_embeddings_the_step_computes(dropout_checkpoint) -> None:
    data = _tensors(8)
    cached = _train(dropout_checkpoint, TEXT_ONLY, data, mixed_precision="bf16")
    plain = _train(dropout_checkpoint, TEXT_ONLY, data, mixed_precision="bf16", feature_cache=False)
    _assert_same_run(cached, plain)
    assert cached[0].feature_cache["cached_bytes"] == 8 * WITH_PROJECTIONS_BYTES // 2  # kept in bf16, as produced


def test_the_cache_stands_aside_saying_why(tmp_path, tiny_checkpoint, caplog) -> None:
    data = _tensors(6)
    with caplog.at_level(logging.INFO, logger="blip_peft"):
        vision_lora, _ = _train(tiny_checkpoint, ["self.query", "qkv"], data, epochs=2)
    assert vision_lora.feature_cache["enabled"] is False
    assert "vision tower has trainable parameters" in vision_lora.feature_cache["reason"]
    assert "feature cache not used: the vision tower has trainable parameters" in caplog.text
    # A frozen adapter on the vision tower with dropout makes it random in training.
    model = _peft(tiny_checkpoint, ["self.query", "qkv"])
    for n, p in model.named_parameters():
        if "vision_model" in n:
            p.requires_grad_(False)
    result = bp.train(model, None, data, epochs=2, batch_size=4, progress=False)
    assert "lora_dropout 0.1" in result.feature_cache["reason"]
    # Attention dropout in the vision tower.
    config = tiny_hf_config()
    config.vision_config.attention_dropout = 0.1
    make_hf_model(config).save_pretrained(tmp_path / "vdrop")
    result, _ = _train(str(tmp_path / "vdrop"), TEXT_ONLY, data, epochs=2)
    assert "attention_dropout is 0.1" in result.feature_cache["reason"]
    # Augmentation draws other pixels every epoch.
    path = bp.bundled_model_path()
    processor = bp.BlipProcessor.from_pretrained(path)
    items = world.make_dataset(4, seed=4, domain="target", size=processor.image_processor.size["height"])
    result, _ = _train(path, TEXT_ONLY, items, processor, epochs=2, augment="blip", num_workers=1)
    assert result.feature_cache["enabled"] is False and "augment is on" in result.feature_cache["reason"]
    assert result.feature_cache["hits"] == 0


def test_bad_budgets_name_the_argument(tiny_checkpoint) -> None:
    model = _peft(tiny_checkpoint, TEXT_ONLY)
    with pytest.raises(ValueError, match="feature_cache must be True, False or a budget in MiB"):
        bp.train(model, None, _tensors(4), feature_cache=-1, progress=False)
    with pytest.raises(TypeError, match="feature_cache must be True, False or a budget in MiB"):
        bp.train(model, None, _tensors(4), feature_cache="2GB", progress=False)  # type: ignore[arg-type]
