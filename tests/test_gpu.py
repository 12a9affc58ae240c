"""CUDA paths (marked `gpu`; skipped on machines without a CUDA device). Run on the GPU machine with
`python -m pytest -m gpu tests/test_gpu.py` (see bench/gpu_check.sh)."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import assert_as_faithful_as_transformers, rel_err, tiny_batch
from transformers import BlipForConditionalGeneration as HFBlip

import blip_peft as bp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and bp._blip_peft.cuda_is_available()), reason="needs a CUDA device"
    ),
]


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)]
)
def test_forward_matches_transformers_on_cuda(tiny_checkpoint: str, dtype: torch.dtype, tolerance: float) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = HFBlip.from_pretrained(tiny_checkpoint, dtype=dtype).to("cuda").eval()
    ours = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=dtype, device="cuda")
    assert ours.device == torch.device("cuda", 0)
    px, ids, mask = (t.cuda() for t in tiny_batch())
    mask[1, -2:] = 0
    with torch.no_grad():
        expected = ref(pixel_values=px.to(dtype), input_ids=ids, attention_mask=mask, labels=ids)
        got = ours(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids)
    assert got.logits.is_cuda
    assert rel_err(got.logits.float(), expected.logits.float()) <= tolerance
    assert abs(got.loss.item() - expected.loss.item()) <= tolerance * abs(expected.loss.item())


def test_lora_exchange_with_peft_on_cuda(tmp_path, tiny_checkpoint: str) -> None:
    config = dict(r=4, lora_alpha=8, target_modules=["query", "qkv", "patch_embedding"])
    ours = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint, device="cuda"), bp.LoraConfig(**config)
    )
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    ours.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(HFBlip.from_pretrained(tiny_checkpoint), tmp_path).cuda().eval()
    px, ids, _ = (t.cuda() for t in tiny_batch())
    with torch.no_grad():
        assert rel_err(ours(pixel_values=px, input_ids=ids).logits, ref(pixel_values=px, input_ids=ids).logits) <= 1e-4


def test_greedy_generation_token_equal_on_cuda(tiny_checkpoint: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = HFBlip.from_pretrained(tiny_checkpoint).to("cuda").eval()
    ours = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint, device="cuda")
    px = tiny_batch(batch=4)[0].cuda()
    for kwargs in (dict(max_new_tokens=12, min_new_tokens=12), dict(num_beams=3, max_new_tokens=8)):
        assert torch.equal(
            ours.generate(pixel_values=px, **kwargs).cpu(), ref.generate(pixel_values=px, **kwargs).cpu()
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_captions_on_cuda_stay_on_float32_as_often_as_transformers(dtype: torch.dtype) -> None:
    """As on the CPU (tests/test_generate.py): judged against the float32 captions on the same card (TF32 off),
    not token-equal to transformers, since cuBLAS and the SDPA kernels round differently from eager attention."""
    from transformers import BlipProcessor as HFProcessor

    from blip_peft import world

    torch.backends.cuda.matmul.allow_tf32 = False
    path = bp.bundled_model_path()
    processor = HFProcessor.from_pretrained(path)
    items = world.make_dataset(192, seed=11, domain="target", size=processor.image_processor.size["height"])
    px = processor(images=[it["image"] for it in items], return_tensors="pt")["pixel_values"].cuda()
    decodings = [dict(max_new_tokens=25), dict(num_beams=3, max_new_tokens=25)]
    ours32 = bp.BlipForConditionalGeneration.from_pretrained(path, dtype="float32", device="cuda")
    ref32 = HFBlip.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    truth = [ours32.generate(pixel_values=px, **kw).cpu() for kw in decodings]
    for kw, t in zip(decodings, truth, strict=True):
        assert torch.equal(t, ref32.generate(pixel_values=px, **kw).cpu()), kw
    ours = bp.BlipForConditionalGeneration.from_pretrained(path, dtype=dtype, device="cuda")
    ref = HFBlip.from_pretrained(path, dtype=dtype).to("cuda").eval()
    ours_ids = [ours.generate(pixel_values=px, **kw).cpu() for kw in decodings]
    theirs_ids = [ref.generate(pixel_values=px.to(dtype), **kw).cpu() for kw in decodings]
    assert_as_faithful_as_transformers(ours_ids, theirs_ids, truth)


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16", "auto"])
def test_training_on_cuda_lowers_the_loss(tiny_checkpoint: str, precision: str) -> None:
    model = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint, device="cuda"),
        bp.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    g = torch.Generator().manual_seed(0)
    data = {
        "pixel_values": torch.randn(8, 3, 32, 32, generator=g),
        "input_ids": torch.randint(4, 90, (8, 6), generator=g),
    }
    result = bp.train(
        model,
        None,
        data,
        epochs=15,
        batch_size=4,
        learning_rate=5e-3,
        mixed_precision=precision,
        progress=False,
        logging_steps=1,
    )
    losses = [h["loss"] for h in result.history if not h["skipped"]]
    assert losses[-1] < losses[0] - 0.3
    assert all(p.is_cuda for p in model.parameters())


def test_fp16_loss_scaling_skips_an_overflowing_step_on_cuda(tiny_checkpoint: str) -> None:
    model = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint, device="cuda"),
        bp.LoraConfig(r=4, target_modules=["query", "qkv"]),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("cls.predictions.transform.LayerNorm.weight"):
                p.mul_(200.0)
    g = torch.Generator().manual_seed(0)
    data = {
        "pixel_values": torch.randn(8, 3, 32, 32, generator=g),
        "input_ids": torch.randint(4, 90, (8, 6), generator=g),
    }
    result = bp.train(
        model, None, data, max_steps=10, batch_size=4, mixed_precision="fp16", progress=False, logging_steps=1
    )
    skipped = [h["skipped"] for h in result.history]
    assert skipped[0] and not all(skipped)


def test_cuda_everywhere_it_is_accepted(tmp_path, tiny_checkpoint: str) -> None:
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model.to("cuda")
    assert next(model.parameters()).is_cuda
    model.to(torch.device("cuda", 0)).cuda().cpu().to("cuda:0")
    assert model.device == torch.device("cuda", 0)
    model.save_pretrained(tmp_path)
    again = bp.AutoModelForVision2Seq.from_pretrained(tmp_path, device_map="cuda")
    assert again.device.type == "cuda"
    px = tiny_batch(batch=1)[0]  # a CPU input is moved to the model's device
    assert again.generate(pixel_values=px, max_new_tokens=3).is_cuda
