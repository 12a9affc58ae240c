"""Shared fixtures: BLIP checkpoints made by transformers (the oracle) from random weights."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import torch
from transformers import BlipConfig
from transformers import BlipForConditionalGeneration as HFBlip

from blip_peft.presets import BASE_TEXT, BASE_VISION, TINY_TEXT, TINY_VISION

# A run started in the background by a shell without job control (`make test &` in a script, nohup) inherits
# SIGINT ignored, as POSIX says, and so would every process a test starts: the Ctrl-C tests would send a signal
# nothing sees and fail on a hang that a terminal's Ctrl-C never causes. They test Ctrl-C, so give it back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The model shapes (TINY_* for most tests, BASE_* for the real-shape ones) live in blip_peft.presets, shared with
# bench/ and scripts/.


def pytest_report_header(config: pytest.Config) -> str:
    """Which code paths this run takes (BLIP_PEFT_CPU_CAPABILITY caps them; see tests/test_cpu_capability.py)."""
    import blip_peft as bp

    paths = ", ".join(f"{k} {v}" for k, v in bp._blip_peft.kernel_code_paths().items())
    return f"cpu: torch {torch.backends.cpu.get_cpu_capability()}; blip_peft kernels: {paths}"


def tiny_hf_config(**top: object) -> BlipConfig:
    return BlipConfig(text_config=dict(TINY_TEXT), vision_config=dict(TINY_VISION), **top)


def make_hf_model(config: BlipConfig, seed: int = 0, cls: type = HFBlip) -> Any:
    """A transformers model (`cls`: the captioner unless another BLIP head is given) with random weights, biases
    and norms perturbed so every parameter matters."""
    torch.manual_seed(seed)
    model = cls(config)
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


def tokens_on_truth(ids: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per caption: how many of the float32 caption's tokens a half-precision caption reproduces before it first
    strays (its whole length when it never does)."""
    width = max(ids.shape[1], truth.shape[1])
    ids, truth = (torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in (ids, truth))
    same_so_far = (ids == truth).long().cumprod(1)
    return (same_so_far * (truth != 0)).sum(1)


def sign_test_p(worse: int, better: int) -> float:
    """One-sided exact sign test: the chance of `worse` or more of `worse + better` fair coin flips."""
    from math import comb

    n = worse + better
    return sum(comb(n, k) for k in range(worse, n + 1)) / 2**n


def assert_as_faithful_as_transformers(
    ours: list[torch.Tensor], theirs: list[torch.Tensor], truth: list[torch.Tensor]
) -> None:
    """Half-precision captions (several decodings of the same images) judged against the float32 ones: ours
    keep to the float32 captions as often as transformers' do, up to chance. Where exactly one of the two
    strays (from the whole caption, or earlier in it), ours may not be the one that strays significantly more
    often (exact one-sided sign test at 0.5%: eight strays against none fail); and most captions keep to
    float32 at all."""
    whole = torch.cat([(t != 0).sum(1) for t in truth])
    ours_kept = torch.cat([tokens_on_truth(o, t) for o, t in zip(ours, truth, strict=True)])
    theirs_kept = torch.cat([tokens_on_truth(o, t) for o, t in zip(theirs, truth, strict=True)])
    ours_whole, theirs_whole = ours_kept == whole, theirs_kept == whole
    report = (
        f"whole captions kept: ours {int(ours_whole.sum())}, transformers {int(theirs_whole.sum())} of {len(whole)}; "
        f"tokens kept: ours {int(ours_kept.sum())}, transformers {int(theirs_kept.sum())} of {int(whole.sum())}"
    )
    only_theirs_kept, only_ours_kept = int((theirs_whole & ~ours_whole).sum()), int((ours_whole & ~theirs_whole).sum())
    assert sign_test_p(only_theirs_kept, only_ours_kept) > 0.005, report
    assert sign_test_p(int((ours_kept < theirs_kept).sum()), int((ours_kept > theirs_kept).sum())) > 0.005, report
    assert ours_whole.float().mean() >= 0.8, report
