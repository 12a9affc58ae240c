"""The BLIP authors' training recipe in bp.train: label smoothing (equal to transformers' loss with the same
setting, given to train or read from the checkpoint) and a prompt masked out of the loss, stored with the adapter."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
from conftest import make_hf_model, tiny_hf_config
from test_train import LORA, _data, _peft_pair, _reference_run
from transformers import BlipForConditionalGeneration as HFBlip

import blip_peft as bp
from blip_peft import world

pytestmark = pytest.mark.cpu_isa


@pytest.fixture(scope="module")
def smoothing_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The same random weights saved with text_config.label_smoothing 0.0 and 0.1."""
    model = make_hf_model(tiny_hf_config(), seed=3)
    plain, smoothed = tmp_path_factory.mktemp("ls0"), tmp_path_factory.mktemp("ls1")
    model.save_pretrained(plain)
    model.config.text_config.label_smoothing = 0.1
    model.save_pretrained(smoothed)
    return str(plain), str(smoothed)


def _hf_peft(checkpoint: str, folder):
    """peft over transformers from `checkpoint`, with the starting adapter `_peft_pair` saved in `folder`."""
    return peft.PeftModel.from_pretrained(HFBlip.from_pretrained(checkpoint), folder / "start", is_trainable=True)


def _run(model, data, **kw):
    return bp.train(
        model, None, data, max_steps=6, batch_size=4, learning_rate=1e-2, weight_decay=0.01, shuffle=False,
        mixed_precision="no", logging_steps=1, progress=False, **kw,
    ).losses  # fmt: skip


def _close(got, want) -> None:
    assert max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True)) <= 1e-4, (got, want)
    assert abs(got[0] - want[0]) <= 2e-6 * want[0], (got, want)  # the first step: before any update


def test_label_smoothing_equals_transformers(tmp_path, smoothing_checkpoints) -> None:
    plain, smoothed = smoothing_checkpoints
    data = _data(12)
    # transformers reads label_smoothing from the checkpoint's text_config; our model's own loss does too
    ours, ref = _peft_pair(smoothed, tmp_path / "a", **LORA)
    expected = _reference_run(ref, data, 6, 4, 1e-2, 0.01)
    _close(_run(ours, data), expected)
    # given to train on a checkpoint without it: the same losses as transformers with it in the config
    ours0, ref0 = _peft_pair(plain, tmp_path / "b", **LORA)
    smoothed_b = _reference_run(_hf_peft(smoothed, tmp_path / "b"), data, 6, 4, 1e-2, 0.01)
    _close(_run(ours0, data, label_smoothing=0.1), smoothed_b)
    # ... and only for the run: afterwards the model's loss is unsmoothed again, equal to transformers' at 0.0
    ids = data["input_ids"].clone()
    ids[:, 0] = ours0.config.text_config.bos_token_id
    labels = ids.masked_fill(data["attention_mask"] == 0, -100)
    trained = {n: p.detach().clone() for n, p in ours0.named_parameters() if "lora_" in n}
    ref0.eval()
    with torch.no_grad():
        for n, p in ref0.named_parameters():
            if n in trained:
                p.copy_(trained[n])
        kw = dict(
            pixel_values=data["pixel_values"], input_ids=ids, attention_mask=data["attention_mask"], labels=labels
        )
        ours0.eval()
        assert abs(ours0(**kw).loss.item() - ref0(**kw).loss.item()) <= 1e-5
    # smoothing differs from no smoothing (the test would not see a setting that is ignored)
    unsmoothed_b = _reference_run(_hf_peft(plain, tmp_path / "b"), data, 6, 4, 1e-2, 0.01)
    assert abs(unsmoothed_b[0] - smoothed_b[0]) > 2e-4  # 20x the first step's tolerance (a near-uniform random model)
    # train's setting wins over the checkpoint's: 0.0 on the smoothed checkpoint is transformers at 0.0
    ours2, _ = _peft_pair(smoothed, tmp_path / "d", **LORA)
    _close(
        _run(ours2, data, label_smoothing=0.0), _reference_run(_hf_peft(plain, tmp_path / "d"), data, 6, 4, 1e-2, 0.01)
    )


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_label_smoothing_out_of_range(smoothing_checkpoints, value: float) -> None:
    model = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(smoothing_checkpoints[0]), bp.LoraConfig(**LORA)
    )
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        _run(model, _data(4), label_smoothing=value)


PROMPT = "a picture of "


@pytest.fixture(scope="module")
def bundled_rows(tmp_path_factory: pytest.TempPathFactory):
    path = bp.bundled_model_path()
    processor = bp.BlipProcessor.from_pretrained(path)
    size = processor.image_processor.size["height"]
    folder = tmp_path_factory.mktemp("rows")
    rows = []
    for i, item in enumerate(world.make_dataset(6, seed=4, domain="target", size=size)):
        file = os.path.join(folder, f"{i}.png")
        item["image"].save(file)
        rows.append({"image": file, "text": item["text"].removeprefix("a picture of ")})
    return path, processor, rows


def _lora_model(path: str) -> bp.PeftModel:
    base = bp.BlipForConditionalGeneration.from_pretrained(path, dtype="float32")
    return bp.get_peft_model(base, bp.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))


def test_prompt_is_masked_out_of_the_loss(bundled_rows, tmp_path) -> None:
    path, processor, rows = bundled_rows
    settings = dict(max_steps=3, batch_size=3, learning_rate=1e-3, shuffle=False, mixed_precision="no",
                    logging_steps=1, progress=False)  # fmt: skip
    model = _lora_model(path)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    def twin() -> bp.PeftModel:
        """Another model with `model`'s starting adapter (lora_A is drawn at random)."""
        other = _lora_model(path)
        with torch.no_grad():
            for n, p in other.named_parameters():
                if n in start:
                    p.copy_(start[n])
        return other

    result = bp.train(model, processor, rows, prompt=PROMPT, output_dir=tmp_path / "adapter", **settings)

    # the hand-built batch: prompt + caption, BOS first, pads and the prompt's tokens -100
    enc = processor(
        images=[r["image"] for r in rows], text=[PROMPT + r["text"] for r in rows], padding=True, return_tensors="pt"
    )
    n_prompt = len(processor.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert n_prompt == 3
    ids = enc["input_ids"].clone()
    ids[:, 0] = model.config.text_config.bos_token_id
    labels = ids.masked_fill(enc["attention_mask"] == 0, -100)
    labels[:, 1 : 1 + n_prompt] = -100
    hand = {"pixel_values": enc["pixel_values"], "input_ids": ids, "attention_mask": enc["attention_mask"],
            "labels": labels}  # fmt: skip
    expected = bp.train(twin(), None, hand, **settings)
    assert result.losses == pytest.approx(expected.losses, rel=1e-6)
    # masking matters: unmasked prompt tokens give another loss
    unmasked = dict(hand, labels=ids.masked_fill(enc["attention_mask"] == 0, -100))
    other = bp.train(twin(), None, unmasked, **settings)
    assert abs(other.losses[0] - expected.losses[0]) > 1e-4
    # the collation the core applies to encoded captions, exposed for manual loops
    _, _, collated = bp._blip_peft.collate_captions(
        [list(r) for r in processor.tokenizer([PROMPT + r["text"] for r in rows])["input_ids"]],
        model.config.text_config.bos_token_id,
        model.config.text_config.pad_token_id,
        None,
        n_prompt,
    )
    assert torch.equal(collated, labels)

    # the prompt is kept with the model and its adapter; generation starts with it by default
    assert model.caption_prompt == PROMPT
    with open(tmp_path / "adapter" / "caption_config.json") as f:
        assert json.load(f) == {"prompt": PROMPT}
    images = [r["image"] for r in rows[:3]]
    expected_captions = bp.generate(model, processor, images, prompt=PROMPT, max_new_tokens=12)
    assert all(c.startswith("a picture of") for c in expected_captions)
    assert bp.generate(model, processor, images, max_new_tokens=12) == expected_captions
    base = bp.BlipForConditionalGeneration.from_pretrained(path, dtype="float32")
    reloaded = bp.PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert reloaded.caption_prompt == PROMPT
    assert bp.generate(reloaded, processor, images, max_new_tokens=12) == expected_captions
    # prompt="" captions without it; evaluate strips it before scoring
    assert bp.generate(reloaded, processor, images, prompt="", max_new_tokens=12) == bp.generate(
        base, processor, images, max_new_tokens=12
    )
    scored = bp.evaluate(reloaded, processor, rows[:3], max_new_tokens=12, return_captions=True)
    assert not any(c.startswith("a picture of") for c in scored["captions"])
    # an adapter saved again without a prompt loses the stale file
    reloaded.caption_prompt = None
    reloaded.save_pretrained(tmp_path / "adapter")
    assert not os.path.exists(tmp_path / "adapter" / "caption_config.json")


def test_prompt_with_transformers_processor_and_bad_prompts(bundled_rows) -> None:
    from transformers import BlipProcessor as HFProcessor

    path, processor, rows = bundled_rows
    settings = dict(max_steps=2, batch_size=3, learning_rate=1e-3, shuffle=False, mixed_precision="no",
                    logging_steps=1, progress=False)  # fmt: skip
    ours = bp.train(_lora_model(path), processor, rows, prompt=PROMPT, **settings)
    theirs = bp.train(_lora_model(path), HFProcessor.from_pretrained(path), rows, prompt=PROMPT, **settings)
    # the first step (before any update; lora_A is drawn at random per model): the same masked batch
    assert ours.losses[0] == pytest.approx(theirs.losses[0], rel=1e-6)
    with pytest.raises(TypeError, match="prompt must be a string"):
        bp.train(_lora_model(path), processor, rows, prompt=3, **settings)
    with pytest.raises(ValueError, match="prompt= needs"):
        bp.train(_lora_model(path), None, _data(4), prompt=PROMPT, **settings)


def test_peft_ignores_caption_config(bundled_rows, tmp_path) -> None:
    path, processor, rows = bundled_rows
    model = _lora_model(path)
    model.caption_prompt = PROMPT
    model.save_pretrained(tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(HFBlip.from_pretrained(path), tmp_path / "a")
    assert loaded is not None
