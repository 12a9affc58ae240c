"""Shared fixtures: BLIP checkpoints made by transformers (the oracle) from random weights."""

from __future__ import annotations

import pytest
import torch
from transformers import BlipConfig
from transformers import BlipForConditionalGeneration as HFBlip

from blip_peft.presets import BASE_TEXT, BASE_VISION, TINY_TEXT, TINY_VISION

# The model shapes (TINY_* for most tests, BASE_* for the real-shape ones) live in blip_peft.presets, shared with
# bench/ and scripts/.


def pytest_report_header(config: pytest.Config) -> str:
    """Which code paths this run takes (BLIP_PEFT_CPU_CAPABILITY caps them; see tests/test_cpu_capability.py)."""
    import blip_peft as bp

    paths = ", ".join(f"{k} {v}" for k, v in bp._blip_peft.kernel_code_paths().items())
    return f"cpu: torch {torch.backends.cpu.get_cpu_capability()}; blip_peft kernels: {paths}"


def tiny_hf_config(**top: object) -> BlipConfig:
    return BlipConfig(text_config=dict(TINY_TEXT), vision_config=dict(TINY_VISION), **top)


def make_hf_model(config: BlipConfig, seed: int = 0) -> HFBlip:
    """A transformers model with random weights, biases and norms perturbed so every parameter matters."""
    torch.manual_seed(seed)
    model = HFBlip(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny_blip")
    make_hf_model(tiny_hf_config()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Random weights of the real blip-image-captioning-base shapes (about 1 GB on disk)."""
    path = tmp_path_factory.mktemp("base_blip")
    config = BlipConfig(text_config=dict(BASE_TEXT), vision_config=dict(BASE_VISION))
    make_hf_model(config, seed=1).save_pretrained(path)
    return str(path)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def tiny_batch(
    batch: int = 2,
    seq: int = 7,
    seed: int = 0,
    vocab: int = TINY_TEXT["vocab_size"],
    image: int = TINY_VISION["image_size"],
):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, image, image, generator=g)
    input_ids = torch.randint(4, vocab - 2, (batch, seq), generator=g)
    input_ids[:, 0] = TINY_TEXT["bos_token_id"] if vocab == TINY_TEXT["vocab_size"] else BASE_TEXT["bos_token_id"]
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    return pixel_values, input_ids, attention_mask
