"""Bad input gets a clear Python exception naming the problem: never a panic, an abort or a wrong result."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import tiny_batch
from safetensors.torch import load_file, save_file

import blip_peft as bp


@pytest.fixture
def copy_of(tmp_path, tiny_checkpoint: str):
    def make() -> str:
        dst = tmp_path / "ckpt"
        shutil.copytree(tiny_checkpoint, dst)
        return str(dst)

    return make


def test_missing_folder() -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        bp.BlipForConditionalGeneration.from_pretrained("/nonexistent/blip")


def test_missing_config(copy_of) -> None:
    path = copy_of()
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        bp.BlipForConditionalGeneration.from_pretrained(path)


def test_missing_weights(copy_of) -> None:
    path = copy_of()
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        bp.BlipForConditionalGeneration.from_pretrained(path)


def test_pickle_checkpoint_is_refused_with_advice(copy_of) -> None:
    path = copy_of()
    os.remove(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        f.write(b"not unpickled")
    with pytest.raises(ValueError, match="pytorch_model.bin.*save_pretrained"):
        bp.BlipForConditionalGeneration.from_pretrained(path)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: c["text_config"].update(hidden_size="wide"), "text_config.hidden_size"),
        (lambda c: c["vision_config"].update(num_attention_heads=5), "num_attention_heads"),
        (lambda c: c["text_config"].update(hidden_act="mystery"), "hidden_act"),
        (lambda c: c.update(model_type="llama"), "model_type"),
        (lambda c: c["text_config"].update(vocab_size=-3), "vocab_size"),
    ],
)
def test_malformed_config_names_the_field(copy_of, edit, field: str) -> None:
    path = copy_of()
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    edit(config)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=field):
        bp.BlipForConditionalGeneration.from_pretrained(path)


def test_config_not_json(copy_of) -> None:
    path = copy_of()
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        bp.BlipForConditionalGeneration.from_pretrained(path)


def _edit_weights(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(copy_of) -> None:
    path = copy_of()
    _edit_weights(path, lambda t: t.pop("vision_model.post_layernorm.weight"))
    with pytest.raises(ValueError, match="vision_model.post_layernorm.weight.*missing"):
        bp.BlipForConditionalGeneration.from_pretrained(path)


def test_unexpected_tensor_is_named(copy_of) -> None:
    path = copy_of()
    _edit_weights(path, lambda t: t.update({"vision_model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="vision_model.extra.weight"):
        bp.BlipForConditionalGeneration.from_pretrained(path)


def test_wrong_shape_names_tensor_and_both_shapes(copy_of) -> None:
    path = copy_of()
    _edit_weights(path, lambda t: t.update({"vision_model.post_layernorm.weight": torch.zeros(31)}))
    with pytest.raises(ValueError, match=r"vision_model.post_layernorm.weight.*\[31\].*\[32\]"):
        bp.BlipForConditionalGeneration.from_pretrained(path)


def test_corrupt_weights_file(copy_of) -> None:
    path = copy_of()
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x00garbage")
    with pytest.raises(ValueError, match="safetensors"):
        bp.BlipForConditionalGeneration.from_pretrained(path)


@pytest.mark.parametrize("dtype", ["float8", "int8", torch.int64])
def test_unknown_dtype(tiny_checkpoint: str, dtype) -> None:
    with pytest.raises(ValueError, match="dtype"):
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=dtype)


def test_unknown_device(tiny_checkpoint: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint, device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_without_cuda(tiny_checkpoint: str) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint, device="cuda")
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="CUDA is not available"):
        model.to("cuda")


def test_bad_argument_types(tiny_checkpoint: str) -> None:
    with pytest.raises(TypeError, match="pretrained_model_name_or_path"):
        bp.BlipForConditionalGeneration.from_pretrained(42)
    with pytest.raises(TypeError, match="unexpected keyword"):
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint, revision="main", colour="red")


@pytest.fixture(scope="module")
def model(tiny_checkpoint: str) -> bp.BlipForConditionalGeneration:
    return bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)


def test_forward_bad_inputs(model: bp.BlipForConditionalGeneration) -> None:
    px, ids, mask = tiny_batch()
    cases = [
        (dict(pixel_values=px[0], input_ids=ids), ValueError, "pixel_values must have shape"),
        (dict(pixel_values=px[:, :, :16, :16], input_ids=ids), ValueError, "pixel_values must have shape"),
        (dict(pixel_values=px.long(), input_ids=ids), TypeError, "floating-point"),
        (dict(pixel_values=px.numpy(), input_ids=ids), TypeError, "torch.Tensor"),
        (dict(pixel_values=px, input_ids=ids.float()), TypeError, "integer token ids"),
        (dict(pixel_values=px, input_ids=ids[0]), ValueError, r"\[batch, sequence\]"),
        (dict(pixel_values=px[:1], input_ids=ids), ValueError, "batch size"),
        (dict(pixel_values=px, input_ids=ids + 1000), ValueError, r"input_ids must be token ids in \[0, 99\)"),
        (dict(pixel_values=px, input_ids=-ids), ValueError, "input_ids must be token ids"),
        (dict(pixel_values=px, input_ids=ids, attention_mask=mask[:, :3]), ValueError, "attention_mask has shape"),
        (dict(pixel_values=px, input_ids=ids, labels=ids[:, :3]), ValueError, "labels has shape"),
        (dict(pixel_values=px, input_ids=ids, labels=ids + 500), ValueError, "labels must be token ids"),
        (dict(pixel_values=px, input_ids=ids, labels=ids.float()), TypeError, "labels must hold integer"),
        (dict(pixel_values=px, input_ids=torch.zeros(2, 41, dtype=torch.long)), ValueError, "positions"),
        (dict(pixel_values=px, input_ids=torch.zeros(2, 0, dtype=torch.long)), ValueError, "at least one"),
        (dict(input_ids=ids), ValueError, "pixel_values"),
        (dict(pixel_values=px), ValueError, "input_ids is required"),
    ]
    for kwargs, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            model(**kwargs)


def test_model_is_usable_after_errors(model: bp.BlipForConditionalGeneration) -> None:
    px, ids, _ = tiny_batch()
    with pytest.raises(ValueError):
        model(pixel_values=px, input_ids=ids + 1000)
    assert model(pixel_values=px, input_ids=ids).logits.shape == (2, 7, 99)


def test_save_to_unwritable_place(tmp_path, model: bp.BlipForConditionalGeneration) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        model.save_pretrained(blocker / "sub")


def test_native_error_type_is_importable() -> None:
    assert issubclass(bp.BlipPeftError, RuntimeError)
    assert bp.BlipPeftError.__module__ in ("blip_peft._blip_peft", "_blip_peft")
