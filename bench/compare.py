#!/usr/bin/env python
"""Speed and memory of blip_peft against transformers + peft: the same work, the same machine, one run.

    python bench/compare.py --suite quick      # tiny config: a smoke test of every path (< 2 minutes on 2 cores)
    python bench/compare.py --suite cpu        # real blip-image-captioning-base shapes, float32, on the CPU
    python bench/compare.py --suite gpu        # real shapes, bfloat16, on CUDA
    python bench/compare.py --suite cpu --write-results --note "what changed since the last run"

Each measurement runs in its own subprocess (one per library and job), so one side's memory never shows in the
other's peak. The weights are random (transformers' initialisation) with the real shapes, written once per run to
a temporary folder that both libraries load. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_FILE = BENCH_DIR / "RESULTS.md"
RESULT_TAG = "@@BENCH-RESULT@@ "
SECTIONS = ("train", "generate", "early", "preprocess", "scale")

# LoRA on the attention and MLP layers of both towers, as the issue specifies (the same config on both sides).
TARGET_MODULES = [
    "self.query",
    "self.key",
    "self.value",
    "output.dense",
    "self_attn.qkv",
    "self_attn.projection",
    "mlp.fc1",
    "mlp.fc2",
]
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGET_MODULES)
LEARNING_RATE = 5e-5
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, set explicitly on our side
MAX_GRAD_NORM = 1.0  # transformers' Trainer default; the torch loops clip too

# Salesforce/blip-image-captioning-base's shapes (its config.json), and a tiny config for --suite quick.
BASE_TEXT = dict(
    vocab_size=30524,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=512,
    layer_norm_eps=1e-12,
    bos_token_id=30522,
    eos_token_id=2,
    sep_token_id=102,
    pad_token_id=0,
)
BASE_VISION = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=384,
    patch_size=16,
    layer_norm_eps=1e-5,
)
TINY_TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=80,
    bos_token_id=97,
    eos_token_id=2,
    sep_token_id=3,
    pad_token_id=0,
)
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
CONFIGS = {"base": (BASE_TEXT, BASE_VISION), "tiny": (TINY_TEXT, TINY_VISION)}

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name substring (first match).
GPU_PEAKS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
]

LIB_LABEL = {
    "ours": "blip_peft `train()`",
    "ours_loop": "blip_peft + torch loop",
    "ours_gen": "blip_peft",
    "ours_pre": "blip_peft",
    "hf": "transformers + peft",
    "hf_gen": "transformers",
    "hf_pre": "transformers",
}

# Decoding settings of the "early" section: the bundled model's captions end on their own (no minimum length).
EARLY_NEW_TOKENS = 30
EARLY_MODES = {
    "greedy": dict(),
    "3 beams": dict(num_beams=3),
    "sampling, 3 per image": dict(do_sample=True, num_return_sequences=3),
}


# ------------------------------------------------------------------------------------------------------- suites
@dataclass
class Suite:
    name: str
    config: str  # "base" or "tiny"
    device: str  # "cpu" or "cuda"
    dtype: str  # "float32", "bfloat16" or "float16"
    caption_len: int = 24
    new_tokens: int = 30
    train_batches: list[int] = field(default_factory=lambda: [2])
    train_warmup: int = 1
    train_iters: int = 3
    torch_loop_row: bool = True  # also time our model inside a plain torch loop
    threads: int | None = None  # torch intra-op threads (None: torch's default, all cores)
    beams: list[int] = field(default_factory=lambda: [1, 3])
    gen_plan: list[tuple[int, int, int]] = field(default_factory=list)  # (batch, warm-up calls, timed calls)
    # Captions that end on their own (the bundled trained model): (batch, warm-up calls, timed calls)
    early_plan: list[tuple[int, int, int]] = field(default_factory=lambda: [(8, 2, 10)])
    n_images: int = 64
    pre_warmup: int = 1
    pre_iters: int = 2
    scale_train_batches: list[int] = field(default_factory=list)
    scale_caption_lens: list[int] = field(default_factory=list)
    scale_caption_batch: int = 1
    scale_new_tokens: list[int] = field(default_factory=list)
    scale_beams: list[int] = field(default_factory=list)
    scale_gen_batch: int = 1
    scale_warmup: int = 1
    scale_iters: int = 1


SUITES = {
    "quick": Suite(
        name="quick",
        config="tiny",
        device="cpu",
        dtype="float32",
        threads=1,  # tiny ops: a second thread only adds barrier stalls, and those explode on a busy machine
        train_batches=[2],
        train_warmup=2,
        train_iters=4,
        gen_plan=[(1, 1, 2), (8, 1, 2)],
        n_images=16,
        pre_iters=2,
        scale_train_batches=[1, 2, 4, 8],
        scale_caption_lens=[8, 24, 48],
        scale_caption_batch=2,
        scale_new_tokens=[1, 10, 30],
        scale_beams=[1, 2, 3],
        scale_iters=2,
    ),
    "cpu": Suite(
        name="cpu",
        config="base",
        device="cpu",
        dtype="float32",
        train_batches=[2],
        train_warmup=1,
        train_iters=3,
        gen_plan=[(1, 1, 2), (8, 1, 1)],
        early_plan=[(8, 2, 10), (32, 1, 3)],
        n_images=64,
        pre_iters=2,
        scale_train_batches=[1, 2],
        scale_caption_lens=[8, 48],
        scale_caption_batch=1,
        scale_new_tokens=[1, 10, 30],
        scale_beams=[1, 3],
        scale_gen_batch=1,
        scale_warmup=1,
        scale_iters=1,
    ),
    "gpu": Suite(
        name="gpu",
        config="base",
        device="cuda",
        dtype="bfloat16",
        train_batches=[8, 32, 64],
        train_warmup=3,
        train_iters=10,
        gen_plan=[(1, 2, 5), (32, 1, 3), (128, 1, 2)],
        early_plan=[(32, 2, 5)],
        n_images=64,
        pre_iters=3,
        scale_train_batches=[8, 16, 32, 64, 128],
        scale_caption_lens=[8, 16, 24, 32, 48, 64],
        scale_caption_batch=32,
        scale_new_tokens=[1, 5, 10, 20, 30, 45, 60],
        scale_beams=[1, 2, 3, 4, 5],
        scale_gen_batch=32,
        scale_warmup=2,
        scale_iters=3,
    ),
}


# --------------------------------------------------------------------------------------------- cost model
def config_dims(config: str) -> dict[str, int]:
    text, vision = CONFIGS[config]
    n_img = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    return dict(
        dv=vision["hidden_size"],
        iv=vision["intermediate_size"],
        lv=vision["num_hidden_layers"],
        patch=vision["patch_size"],
        n_img=n_img,
        dt=text["hidden_size"],
        it=text["intermediate_size"],
        lt=text["num_hidden_layers"],
        vocab=text["vocab_size"],
    )


def vision_forward_flops(d: dict[str, int]) -> float:
    """Matmul FLOPs of the vision tower for one image (patch embedding, qkv, projection, MLP, attention)."""
    n, dv, iv = d["n_img"], d["dv"], d["iv"]
    patch = 2 * 3 * d["patch"] ** 2 * dv * (n - 1)
    layer = 2 * n * dv * 3 * dv + 2 * n * dv * dv + 2 * 2 * n * dv * iv + 4 * n * n * dv
    return patch + d["lv"] * layer


def cross_kv_flops(d: dict[str, int]) -> float:
    """The decoder's cross-attention key/value projections of one image's embeddings (all layers)."""
    return d["lt"] * 2 * 2 * d["n_img"] * d["dv"] * d["dt"]


def text_forward_flops(d: dict[str, int], length: int) -> float:
    """The decoder on a caption of `length` tokens (self- and cross-attention, FFN, LM head), cross K/V excluded."""
    n, dt, it, ell = d["n_img"], d["dt"], d["it"], length
    layer = (
        2 * ell * dt * 3 * dt  # self q, k, v
        + 3 * 2 * ell * dt * dt  # self output, cross query, cross output
        + 2 * 2 * ell * dt * it  # FFN
        + 4 * ell * ell * dt  # self-attention scores and values
        + 4 * ell * n * dt  # cross-attention scores and values
    )
    head = 2 * ell * dt * dt + 2 * ell * dt * d["vocab"]
    return d["lt"] * layer + head


def train_flops_per_sample(config: str, length: int) -> float:
    """Forward + backward to the activations (~ the forward again); LoRA weight gradients are negligible."""
    d = config_dims(config)
    forward = vision_forward_flops(d) + cross_kv_flops(d) + text_forward_flops(d, length)
    return 2.0 * forward


def decoder_step_bytes_weights(d: dict[str, int], bytes_per: int) -> float:
    """Decoder weights read once per generated token (cross K/V projections excluded: cached per image)."""
    dt, it = d["dt"], d["it"]
    layer = 6 * dt * dt + 2 * dt * it
    return (d["lt"] * layer + dt * dt + dt * d["vocab"]) * bytes_per


def generation_floor(config: str, batch: int, beams: int, tokens: int, bandwidth: float, flops: float, bpe: int):
    """A roofline lower bound on a generate() call: the vision tower and cross K/V at matmul speed, then per token
    max(bytes moved / bandwidth, FLOPs / matmul speed), where bytes = decoder weights + the KV caches read."""
    d = config_dims(config)
    rows = batch * beams
    prefill = batch * (vision_forward_flops(d) + cross_kv_flops(d)) / flops
    w = decoder_step_bytes_weights(d, bpe)
    total = prefill
    for t in range(1, tokens + 1):
        cache = (rows * d["lt"] * 2 * d["dt"] * t + batch * d["lt"] * 2 * d["dt"] * d["n_img"]) * bpe
        step_flops = rows * (text_forward_flops(d, 1) + d["lt"] * 4 * d["dt"] * t)
        total += max((w + cache) / bandwidth, step_flops / flops)
    return total


# ------------------------------------------------------------------------------------------- worker helpers
def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _proc_status(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    return None


class Memory:
    """Peak memory of one phase: CUDA's allocator peak on a GPU; on the CPU the resident-set high-water mark
    (VmHWM), reset at the phase start through /proc/self/clear_refs (else the process's lifetime peak)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.startswith("cuda") else "RSS high-water"

    def current(self) -> float:
        if self.device.startswith("cuda"):
            import torch

            return torch.cuda.memory_allocated() / 2**20
        return _proc_status("VmRSS") or 0.0

    def reset(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "RSS lifetime peak"

    def peak(self) -> float:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        hwm = _proc_status("VmHWM")
        if hwm is not None and self.kind == "RSS high-water":
            return hwm
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _stat(spec: dict[str, Any], times: list[float]) -> float:
    """The reported time of several timed runs: the best (default; on a shared machine the least disturbed run)
    or the median."""
    return min(times) if spec.get("stat", "min") == "min" else statistics.median(times)


def _caption_batch(config: str, n: int, length: int, seed: int = 0):
    """Random pixels and captions of exactly `length` tokens: BOS first, [SEP] last, no padding."""
    import torch

    text, vision = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    size = vision["image_size"]
    pixel_values = torch.randn(n, 3, size, size, generator=g)
    ids = torch.randint(4, min(text["vocab_size"] - 2, 30000), (n, length), generator=g)
    ids[:, 0] = text["bos_token_id"]
    ids[:, -1] = text["sep_token_id"]
    mask = torch.ones_like(ids)
    return pixel_values, ids, mask


def _load(lib: str, ckpt: str, device: str, dtype: str, lora: bool):
    """The model on `device` in `dtype` (and LoRA-wrapped when `lora`), as each library's user would make it."""
    torch_dtype = _torch_dtype(dtype)
    if lib.startswith("ours"):
        import blip_peft as bp

        model = bp.BlipForConditionalGeneration.from_pretrained(ckpt, dtype=torch_dtype, device=device)
        if lora:
            model = bp.get_peft_model(model, bp.LoraConfig(**LORA))
        return model
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.BlipForConditionalGeneration.from_pretrained(ckpt, dtype=torch_dtype).to(device)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    return model


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _time_native_train(model, spec: dict[str, Any], batch: int, length: int, warmup: int, iters: int) -> list[float]:
    """blip_peft.train for warmup + iters steps; per-step times from the step-end callbacks (logging_steps=1 reads
    each step's loss back, which also synchronises a GPU)."""
    import blip_peft as bp

    steps = warmup + iters
    px, ids, mask = _caption_batch(spec["config"], batch * min(steps, 2), length)
    stamps: list[float] = []
    bp.train(
        model,
        None,
        {"pixel_values": px, "input_ids": ids, "attention_mask": mask},
        max_steps=steps,
        batch_size=batch,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler="constant",
        max_grad_norm=MAX_GRAD_NORM,
        mixed_precision={"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[spec["dtype"]],
        shuffle=False,
        logging_steps=1,
        progress=False,
        callback=lambda log: stamps.append(time.perf_counter()),
    )
    if len(stamps) != steps:
        raise RuntimeError(f"expected {steps} step callbacks, got {len(stamps)}")
    return [b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True)]


def _time_loop_train(model, spec: dict[str, Any], batch: int, length: int, warmup: int, iters: int) -> list[float]:
    """The transformers + peft tutorial loop: AdamW over the trainable parameters, labels = ids with pads -100,
    loss.backward(), clipping, step, zero_grad, loss.item(); batches moved to the device each step."""
    import torch

    device, dtype = spec["device"], _torch_dtype(spec["dtype"])
    steps = warmup + iters
    n_batches = min(steps, 2)
    px, ids, mask = _caption_batch(spec["config"], batch * n_batches, length)
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    times = []
    for step in range(steps):
        _sync(device)
        start = time.perf_counter()
        sl = slice((step % n_batches) * batch, (step % n_batches + 1) * batch)
        out = model(
            pixel_values=px[sl].to(device, dtype),
            input_ids=ids[sl].to(device),
            attention_mask=mask[sl].to(device),
            labels=labels[sl].to(device),
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if not math.isfinite(loss):
            raise RuntimeError(f"loss is {loss} at step {step}")
        _sync(device)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def _time_train(lib, model, spec, batch, length, warmup, iters) -> list[float]:
    fn = _time_native_train if lib == "ours" else _time_loop_train
    return fn(model, spec, batch, length, max(1, warmup), iters)


def _generate(model, px, tokens: int, beams: int):
    return model.generate(pixel_values=px, max_new_tokens=tokens, min_new_tokens=tokens, num_beams=beams)


def _time_generate(model, spec, px, tokens: int, beams: int, warmup: int, iters: int) -> tuple[list[float], int]:
    import torch

    device = spec["device"]
    out = None
    with torch.no_grad():
        for _ in range(warmup):
            _generate(model, px, tokens, beams)
        times = []
        for _ in range(iters):
            _sync(device)
            start = time.perf_counter()
            out = _generate(model, px, tokens, beams)
            _sync(device)
            times.append(time.perf_counter() - start)
    return times, int(out.shape[1]) if out is not None else -1


# ---------------------------------------------------------------------------------------------- worker jobs
def job_info(spec: dict[str, Any]) -> dict[str, Any]:
    """Versions, the device's name, and this machine's memory bandwidth (a large copy) and matmul FLOP/s."""
    import peft
    import torch
    import transformers

    import blip_peft

    device, dtype = spec["device"], _torch_dtype(spec["dtype"])
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("this suite needs CUDA, and torch.cuda.is_available() is False on this machine")
        name = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        detail = f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        name = _cpu_name()
        detail = f"{torch.get_num_threads()} torch threads, {os.cpu_count()} logical CPUs"
    on_gpu = device.startswith("cuda")
    # Memory bandwidth: y.copy_(x) moves 2 x nbytes (read + write); best of several.
    nbytes = (1 << 30) if on_gpu else (256 << 20)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = math.inf
    for _ in range(10 if on_gpu else 5):
        _sync(device)
        start = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    bandwidth = 2 * nbytes / best
    del x, y
    # Matmul throughput in the suite's dtype: best of several n x n GEMMs.
    n = 8192 if on_gpu else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = math.inf
    for _ in range(20 if on_gpu else 4):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    matmul = 2 * n**3 / best
    nominal = None
    if on_gpu and spec["dtype"] in ("bfloat16", "float16"):
        nominal = next((peak for key, peak in GPU_PEAKS if key in name), None)
    return dict(
        device_name=name,
        device_detail=detail,
        bandwidth=bandwidth,
        matmul_flops=matmul,
        matmul_n=n,
        nominal_peak=nominal,
        versions=dict(
            python=platform.python_version(),
            torch=torch.__version__,
            transformers=transformers.__version__,
            peft=peft.__version__,
            blip_peft=blip_peft.__version__,
        ),
        has_processor=hasattr(blip_peft, "BlipProcessor"),
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def job_train(spec: dict[str, Any]) -> dict[str, Any]:
    lib = spec["lib"]
    model = _load(lib, spec["ckpt"], spec["device"], spec["dtype"], lora=True)
    model.train()
    mem = Memory(spec["device"])
    before = mem.current()
    mem.reset()
    times = _time_train(lib, model, spec, spec["batch"], spec["length"], spec["warmup"], spec["iters"])
    return dict(
        step_s=_stat(spec, times),
        step_times=times,
        peak_mib=mem.peak(),
        before_mib=before,
        memory_kind=mem.kind,
        trainable=_trainable(model),
    )


def job_generate(spec: dict[str, Any]) -> dict[str, Any]:
    lib = spec["lib"]
    model = _load(lib, spec["ckpt"], spec["device"], spec["dtype"], lora=False)
    model.eval()
    px, _, _ = _caption_batch(spec["config"], spec["batch"], 2, seed=1)
    px = px.to(spec["device"], _torch_dtype(spec["dtype"]))
    mem = Memory(spec["device"])
    rows = []
    for beams in spec["beams"]:
        mem.reset()
        times, out_len = _time_generate(model, spec, px, spec["tokens"], beams, spec["warmup"], spec["iters"])
        rows.append(dict(beams=beams, latency_s=_stat(spec, times), times=times, peak_mib=mem.peak(), out_len=out_len))
    return dict(rows=rows, memory_kind=mem.kind)


def job_early_inputs(spec: dict[str, Any]) -> dict[str, Any]:
    """Pixel values of world images for the bundled model (transformers' processor), saved for both sides."""
    import torch
    from transformers import BlipProcessor

    import blip_peft as bp
    from blip_peft import world

    path = bp.bundled_model_path()
    processor = BlipProcessor.from_pretrained(path)
    items = world.make_dataset(spec["batch"], seed=5, domain="base", size=processor.image_processor.size["height"])
    pixel_values = processor(images=[d["image"] for d in items], return_tensors="pt")["pixel_values"]
    torch.save(pixel_values, spec["out"])
    return dict(model=path)


def job_generate_early(spec: dict[str, Any]) -> dict[str, Any]:
    """Generation where captions end on their own: the bundled trained model, no minimum length."""
    import torch

    lib = spec["lib"]
    model = _load(lib, spec["model"], spec["device"], spec["dtype"], lora=False)
    model.eval()
    px = torch.load(spec["pixels"]).to(spec["device"], _torch_dtype(spec["dtype"]))
    sep = 3  # the bundled model's [SEP]
    mem = Memory(spec["device"])
    rows = []
    for mode, kwargs in EARLY_MODES.items():
        kwargs = dict(kwargs, max_new_tokens=EARLY_NEW_TOKENS)

        def call(kwargs=kwargs):
            # The same seed on both sides: ours takes it as an argument, transformers from the global generator.
            if not kwargs.get("do_sample"):
                return model.generate(pixel_values=px, **kwargs)
            if lib.startswith("ours"):
                return model.generate(pixel_values=px, seed=0, **kwargs)
            torch.manual_seed(0)
            return model.generate(pixel_values=px, **kwargs)

        mem.reset()
        out = None
        with torch.no_grad():
            for _ in range(spec["warmup"]):
                call()
            times = []
            for _ in range(spec["iters"]):
                _sync(spec["device"])
                start = time.perf_counter()
                out = call()
                _sync(spec["device"])
                times.append(time.perf_counter() - start)
        ids = out.cpu() if out is not None else torch.zeros(0, 1, dtype=torch.long)
        # Ours says how many rows each decoder pass ran (finished rows leave the batch); transformers runs all.
        native = getattr(model, "_native", None)
        passes = native._last_generate_rows_per_step() if hasattr(native, "_last_generate_rows_per_step") else None
        hits = ids[:, 1:] == sep
        ends = [int(h.nonzero()[0]) + 1 if h.any() else ids.shape[1] for h in hits]
        rows.append(
            dict(
                mode=mode,
                latency_s=_stat(spec, times),
                times=times,
                peak_mib=mem.peak(),
                captions=int(ids.shape[0]),
                new_tokens=[min(ends) - 1, max(ends) - 1],  # the shortest and longest caption
                ids_sha1=hashlib.sha1(json.dumps(ids.tolist()).encode()).hexdigest()[:16],  # the tokens, to compare
                decoder_rows=sum(passes) if passes else None,
                all_rows=passes[0] * len(passes) if passes else None,
            )
        )
    return dict(rows=rows, memory_kind=mem.kind)


def job_preprocess(spec: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    if spec["lib"].startswith("ours"):
        import blip_peft as bp

        if not hasattr(bp, "BlipProcessor"):
            return dict(skipped="blip_peft.BlipProcessor is not available")
        processor = bp.BlipProcessor.from_pretrained(spec["processor_dir"])
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        processor = transformers.BlipProcessor.from_pretrained(spec["processor_dir"])
    paths = spec["images"]
    mem = Memory("cpu")

    def run():
        images = [Image.open(p) for p in paths]  # decoding happens inside the processor (PIL opens lazily)
        return processor(images=images, return_tensors="pt")["pixel_values"]

    for _ in range(spec["warmup"]):
        run()
    mem.reset()
    times = []
    out = None
    for _ in range(spec["iters"]):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    peak = mem.peak()
    paths_s = None
    if spec["lib"].startswith("ours"):
        # Where our processor also takes file paths (decoding them itself), time that too.
        try:
            processor(images=list(paths), return_tensors="pt")
        except Exception:  # noqa: BLE001  (paths not accepted: PIL images only)
            paths_s = None
        else:
            path_times = []
            for _ in range(spec["iters"]):
                start = time.perf_counter()
                processor(images=list(paths), return_tensors="pt")
                path_times.append(time.perf_counter() - start)
            paths_s = _stat(spec, path_times)
    return dict(
        batch_s=_stat(spec, times),
        paths_batch_s=paths_s,
        times=times,
        peak_mib=peak,
        memory_kind=mem.kind,
        shape=list(out.shape) if out is not None else None,
        mean=float(out.float().mean()) if out is not None else None,
        processor=type(processor).__name__ + "/" + type(getattr(processor, "image_processor", processor)).__name__,
    )


def job_scale(spec: dict[str, Any]) -> dict[str, Any]:
    """How cost grows: training step time vs batch and caption length, generation time vs new tokens and beams."""
    lib = spec["lib"]
    out: dict[str, list] = {"train_batch": [], "train_len": [], "gen_tokens": [], "gen_beams": []}
    model = _load(lib, spec["ckpt"], spec["device"], spec["dtype"], lora=True)
    warmup, iters = spec["warmup"], spec["iters"]

    def point(key, x, fn):
        try:
            out[key].append([x, _stat(spec, fn())])
        except Exception as e:  # noqa: BLE001  (a point that does not fit, e.g. out of memory, is left blank)
            out[key].append([x, None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"])
            gc.collect()
            if spec["device"].startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

    for b in spec["train_batches"]:
        point("train_batch", b, lambda b=b: _time_train(lib, model, spec, b, spec["length"], warmup, iters))
    for n in spec["caption_lens"]:
        b = spec["caption_batch"]
        point("train_len", n, lambda n=n, b=b: _time_train(lib, model, spec, b, n, warmup, iters))
    # Generation with the adapters merged away: the plain model, as for the generation table.
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    model.eval()
    px, _, _ = _caption_batch(spec["config"], spec["gen_batch"], 2, seed=1)
    px = px.to(spec["device"], _torch_dtype(spec["dtype"]))
    if spec["new_tokens"]:
        _time_generate(model, spec, px, spec["new_tokens"][-1], 1, warmup, 0)  # warm-up at the largest size
    for n in spec["new_tokens"]:
        point("gen_tokens", n, lambda n=n: _time_generate(model, spec, px, n, 1, 0, iters)[0])
    for k in spec["beams"]:
        point(
            "gen_beams", k, lambda k=k: _time_generate(model, spec, px, spec["tokens"], k, 1 if k > 1 else 0, iters)[0]
        )
    return out


JOBS = {
    "info": job_info,
    "train": job_train,
    "generate": job_generate,
    "early_inputs": job_early_inputs,
    "generate_early": job_generate_early,
    "preprocess": job_preprocess,
    "scale": job_scale,
}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec["device"] == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import torch  # loads libtorch before blip_peft

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = JOBS[spec["job"]](spec)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------- setup
def build_checkpoint(config: str, folder: str) -> None:
    """transformers' BlipForConditionalGeneration with random weights (its own initialisation), saved."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    text, vision = CONFIGS[config]
    torch.manual_seed(0)
    model = transformers.BlipForConditionalGeneration(
        transformers.BlipConfig(text_config=dict(text), vision_config=dict(vision))
    )
    model.save_pretrained(folder)
    del model
    gc.collect()


def build_processor(config: str, folder: str) -> None:
    """A BlipProcessor folder with blip-image-captioning-base's image settings (at this config's image size) and a
    BERT-style tokenizer over a made-up vocabulary (only the images are timed)."""
    import transformers

    transformers.logging.set_verbosity_error()
    text, vision = CONFIGS[config]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab += [f"w{i}" for i in range(max(0, text["vocab_size"] - 2 - len(vocab)))]
    os.makedirs(folder, exist_ok=True)
    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer(vocab_file=vocab_file, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    image_processor = transformers.BlipImageProcessor(
        size={"height": vision["image_size"], "width": vision["image_size"]},
        resample=3,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    transformers.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def build_jpegs(n: int, folder: str) -> list[str]:
    """`n` photo-like 640x480 JPEGs (smooth colour fields plus grain), quality 90."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 8, (480, 640, 3))
        path = os.path.join(folder, f"img{i:03d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------- orchestration
class Runner:
    def __init__(self, timeout: float, verbose: bool, threads: int | None) -> None:
        self.threads = threads
        self.timeout = timeout
        self.verbose = verbose
        self.count = 0

    def __call__(self, label: str, spec: dict[str, Any]) -> dict[str, Any]:
        self.count += 1
        print(f"[{self.count:2d}] {label} ...", end="", file=sys.stderr, flush=True)
        env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        env["PYTHONWARNINGS"] = "ignore"
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                env=env,
                cwd=str(REPO_DIR),
            )
        except subprocess.TimeoutExpired:
            print(f" timed out after {self.timeout:.0f} s", file=sys.stderr)
            return {"error": f"timed out after {self.timeout:.0f} s"}
        elapsed = time.perf_counter() - start
        if self.verbose and proc.stderr.strip():
            print("\n" + proc.stderr.rstrip(), file=sys.stderr)
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(RESULT_TAG):
                print(f" {elapsed:.1f} s", file=sys.stderr, flush=True)
                return json.loads(line[len(RESULT_TAG) :])
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f" FAILED ({elapsed:.1f} s): {tail[0]}", file=sys.stderr, flush=True)
        return {"error": tail[0][:300]}


def run_suite(suite: Suite, args: argparse.Namespace) -> dict[str, Any]:
    run = Runner(args.job_timeout, args.verbose, suite.threads)
    sections = set(args.only.split(",")) if args.only else set(SECTIONS)
    report: dict[str, Any] = dict(suite=suite.name, config=suite.config, device=suite.device, dtype=suite.dtype)
    report["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    report["suite_settings"] = {k: v for k, v in vars(suite).items()}
    report["stat"] = args.stat
    base = dict(config=suite.config, device=suite.device, dtype=suite.dtype, stat=args.stat, threads=suite.threads)
    with tempfile.TemporaryDirectory(prefix="blip_bench_") as tmp:
        info = run("machine: versions, memory bandwidth, matmul FLOP/s", dict(base, job="info"))
        if "error" in info:
            raise SystemExit(f"cannot run the {suite.name} suite here: {info['error']}")
        report["info"] = info
        ckpt = os.path.join(tmp, "checkpoint")
        if sections & {"train", "generate", "scale"}:
            t0 = time.perf_counter()
            print(
                f"     building the {suite.config} checkpoint (transformers, random init) ...", end="", file=sys.stderr
            )
            sys.stderr.flush()
            build_checkpoint(suite.config, ckpt)
            print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        common = dict(base, ckpt=ckpt)

        if "train" in sections:
            report["train"] = []
            libs = ["ours"] + (["ours_loop"] if suite.torch_loop_row else []) + ["hf"]
            for batch in suite.train_batches:
                for lib in libs:
                    spec = dict(
                        common,
                        job="train",
                        lib=lib,
                        batch=batch,
                        length=suite.caption_len,
                        warmup=suite.train_warmup,
                        iters=suite.train_iters,
                    )
                    res = run(f"train {LIB_LABEL[lib]}, batch {batch}", spec)
                    report["train"].append(dict(res, lib=lib, batch=batch))

        if "generate" in sections:
            report["generate"] = []
            for batch, warmup, iters in suite.gen_plan:
                for lib in ("ours_gen", "hf_gen"):
                    spec = dict(
                        common,
                        job="generate",
                        lib=lib,
                        batch=batch,
                        beams=suite.beams,
                        tokens=suite.new_tokens,
                        warmup=warmup,
                        iters=iters,
                    )
                    res = run(f"generate {LIB_LABEL[lib]}, batch {batch}, beams {suite.beams}", spec)
                    if "error" in res:
                        report["generate"].append(dict(res, lib=lib, batch=batch))
                        continue
                    for row in res["rows"]:
                        report["generate"].append(dict(row, lib=lib, batch=batch, memory_kind=res["memory_kind"]))

        if "early" in sections:
            report["early"] = []
            for batch, warmup, iters in suite.early_plan:
                pixels = os.path.join(tmp, f"early-pixels-{batch}.pt")
                inputs = run(
                    f"early: {batch} world images for the bundled model",
                    dict(base, job="early_inputs", batch=batch, out=pixels),
                )
                for lib in ("ours_gen", "hf_gen"):
                    if "error" in inputs:
                        report["early"].append(dict(inputs, lib=lib, batch=batch))
                        continue
                    spec = dict(
                        base,
                        job="generate_early",
                        lib=lib,
                        batch=batch,
                        model=inputs["model"],
                        pixels=pixels,
                        warmup=warmup,
                        iters=iters,
                    )
                    res = run(f"generate {LIB_LABEL[lib]}, bundled model, batch {batch}, captions ending early", spec)
                    if "error" in res:
                        report["early"].append(dict(res, lib=lib, batch=batch))
                        continue
                    for row in res["rows"]:
                        report["early"].append(dict(row, lib=lib, batch=batch, memory_kind=res["memory_kind"]))

        if "preprocess" in sections:
            if not info["has_processor"]:
                report["preprocess"] = {"skipped": "blip_peft.BlipProcessor is not available"}
                print("     preprocessing: skipped, blip_peft.BlipProcessor is not available", file=sys.stderr)
            else:
                proc_dir = os.path.join(tmp, "processor")
                build_processor(suite.config, proc_dir)
                images = build_jpegs(suite.n_images, os.path.join(tmp, "jpegs"))
                report["preprocess"] = []
                for lib in ("ours_pre", "hf_pre"):
                    spec = dict(
                        base,
                        job="preprocess",
                        lib=lib,
                        processor_dir=proc_dir,
                        images=images,
                        warmup=suite.pre_warmup,
                        iters=suite.pre_iters,
                    )
                    res = run(f"preprocess {LIB_LABEL[lib]}, {len(images)} JPEGs", spec)
                    report["preprocess"].append(dict(res, lib=lib, n=len(images)))

        if "scale" in sections:
            report["scale"] = {}
            for lib in ("ours", "hf"):
                spec = dict(
                    common,
                    job="scale",
                    lib=lib,
                    length=suite.caption_len,
                    tokens=suite.new_tokens,
                    train_batches=suite.scale_train_batches,
                    caption_lens=suite.scale_caption_lens,
                    caption_batch=suite.scale_caption_batch,
                    new_tokens=suite.scale_new_tokens,
                    beams=suite.scale_beams,
                    gen_batch=suite.scale_gen_batch,
                    warmup=suite.scale_warmup,
                    iters=suite.scale_iters,
                )
                report["scale"][lib] = run(f"scaling curves {LIB_LABEL[lib]}", spec)
    return report


# ------------------------------------------------------------------------------------------------- reporting
def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{x:,.{decimals}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "–"
    return f"{a / b:.2f}×"


def _vs_hf(r: dict[str, Any], hf: dict[str, Any] | None, is_hf: bool, time_key: str, time: float) -> list[str]:
    """A row's "speed vs HF" and "memory vs HF" cells: 1.00× on transformers' own row, – without one."""
    if is_hf:
        return ["1.00×", "1.00×"]
    if not hf:
        return ["–", "–"]
    return [_ratio(hf[time_key], time), _ratio(r["peak_mib"], hf["peak_mib"])]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _bytes_per(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _section_info(report: dict[str, Any], section: str) -> dict[str, Any]:
    """The machine measurement (floors) taken in the run that measured `section`."""
    return report.get("section_info", {}).get(section) or report["info"]


def render(report: dict[str, Any]) -> list[str]:
    info = report["info"]
    suite = report["suite"]
    on_gpu = report["device"].startswith("cuda")
    v = info["versions"]
    out = [
        f"- **Device**: {info['device_name']} ({info['device_detail']}); suite `{suite}` "
        f"({report['config']} shapes, {report['dtype']}); {report['date']}",
        f"- **Versions**: blip_peft {v['blip_peft']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"peft {v['peft']}, Python {v['python']}",
    ]
    measured = [s for s in SECTIONS if s in report]
    groups: list[tuple[dict[str, Any], list[str]]] = []
    for section in measured:
        sinfo = _section_info(report, section)
        for group_info, names in groups:
            if group_info is sinfo or group_info == sinfo:
                names.append(section)
                break
        else:
            groups.append((sinfo, [section]))
    for sinfo, names in groups or [(info, [])]:
        scope = "in this run" if len(groups) <= 1 else f"with the {', '.join(names)} run"
        out.append(
            f"- **Machine floors** (measured {scope}): memory bandwidth {sinfo['bandwidth'] / 1e9:,.1f} GB/s (a "
            f"{'1 GiB' if on_gpu else '256 MiB'} tensor copy), matmul {sinfo['matmul_flops'] / 1e9:,.1f} GFLOP/s "
            f"({sinfo['matmul_n']}² {report['dtype']} GEMM)"
        )
    st = report["suite_settings"]
    gen_plan = ", ".join(f"batch {b}: {w} + {n}" for b, w, n in st["gen_plan"])
    out.append(
        f"- **Timing**: the {'best' if report.get('stat', 'min') == 'min' else 'median'} of the timed runs after "
        f"warm-up (training: {st['train_warmup']} warm-up + {st['train_iters']} timed steps; generation calls: "
        f"{gen_plan}; preprocessing: {st['pre_warmup']} + {st['pre_iters']}; curves: {st['scale_iters']} timed per "
        "point); every (library, job) in its own process"
    )
    length = report["suite_settings"]["caption_len"]
    tflops = train_flops_per_sample(report["config"], length)
    bpe = _bytes_per(report["dtype"])

    if report.get("train"):
        tinfo = _section_info(report, "train")
        mm = tinfo["matmul_flops"]
        peak = tinfo.get("nominal_peak") or mm
        peak_name = (
            f"{tinfo['device_name']} nominal dense {report['dtype']} peak {peak / 1e12:.0f} TFLOP/s"
            if tinfo.get("nominal_peak")
            else f"this machine's measured {report['dtype']} matmul rate ({mm / 1e9:,.1f} GFLOP/s)"
        )
        out += [
            "",
            f"**Training** — LoRA r=16 (α=32, dropout 0.05) on {', '.join(TARGET_MODULES)}; AdamW lr {LEARNING_RATE}, "
            f"clip {MAX_GRAD_NORM}; captions of {length} tokens; {report['dtype']}"
            + (" (frozen base in bf16/fp16, adapters float32)" if report["dtype"] != "float32" else "")
            + f". Model FLOPs: {_fmt(tflops / 1e9)} GFLOP per sample (2 × forward). "
            f"MFU = achieved FLOP/s ÷ {peak_name}. Floor = the FLOPs at the measured matmul rate.",
            "",
        ]
        rows = []
        hf_by_batch = {r["batch"]: r for r in report["train"] if r["lib"] == "hf" and "error" not in r}
        for r in report["train"]:
            label = LIB_LABEL[r["lib"]]
            if "error" in r:
                rows.append([str(r["batch"]), label, "failed: " + r["error"], "", "", "", "", "", ""])
                continue
            step = r["step_s"]
            sps = r["batch"] / step
            floor = r["batch"] * tflops / mm
            hf = hf_by_batch.get(r["batch"])
            is_hf = r["lib"] == "hf"
            rows.append(
                [
                    str(r["batch"]),
                    label,
                    _fmt(step * 1e3),
                    _fmt(sps),
                    _fmt(r["peak_mib"], 4),
                    f"{100 * sps * tflops / peak:.1f}%",
                    f"{_fmt(floor * 1e3)} ({step / floor:.1f}×)",
                    *_vs_hf(r, hf, is_hf, "step_s", step),
                ]
            )
        out += _table(
            [
                "batch",
                "implementation",
                "step (ms)",
                "samples/s",
                "peak mem (MiB)",
                "MFU",
                "floor ms (time/floor)",
                "speed vs HF",
                "memory vs HF",
            ],
            rows,
        )
        kinds = {r.get("memory_kind") for r in report["train"] if "error" not in r}
        trainable = {LIB_LABEL[r["lib"]]: r.get("trainable") for r in report["train"] if "error" not in r}
        out += [
            "",
            f"Peak memory: {', '.join(sorted(k for k in kinds if k))} of the training phase (weights included). "
            f"Trainable parameters: {', '.join(f'{k}: {v:,}' for k, v in trainable.items() if v)}.",
        ]

    if report.get("generate"):
        ginfo = _section_info(report, "generate")
        bw, mm = ginfo["bandwidth"], ginfo["matmul_flops"]
        tokens = report["suite_settings"]["new_tokens"]
        out += [
            "",
            f"**Generation** — {tokens} new tokens forced (min_new_tokens = max_new_tokens = {tokens}), greedy and "
            f"beam search, base model (no adapter), {report['dtype']}. Floor = vision tower + cross-attention K/V at "
            "the matmul rate, then per token max(decoder weights + KV cache ÷ bandwidth, FLOPs ÷ matmul rate).",
            "",
        ]
        rows = []
        hf_rows = {
            (r["batch"], r["beams"]): r for r in report["generate"] if r["lib"] == "hf_gen" and "error" not in r
        }
        order = {"ours_gen": 0, "hf_gen": 1}
        for r in sorted(report["generate"], key=lambda r: (r["batch"], r.get("beams", 0), order[r["lib"]])):
            label = LIB_LABEL[r["lib"]]
            if "error" in r:
                rows.append([str(r["batch"]), "", label, "failed: " + r["error"], "", "", "", "", ""])
                continue
            floor = generation_floor(report["config"], r["batch"], r["beams"], tokens, bw, mm, bpe)
            hf = hf_rows.get((r["batch"], r["beams"]))
            is_hf = r["lib"] == "hf_gen"
            lat = r["latency_s"]
            rows.append(
                [
                    str(r["batch"]),
                    str(r["beams"]),
                    label,
                    _fmt(lat * 1e3),
                    _fmt(r["batch"] / lat),
                    _fmt(r["peak_mib"], 4),
                    f"{_fmt(floor * 1e3)} ({lat / floor:.1f}×)",
                    *_vs_hf(r, hf, is_hf, "latency_s", lat),
                ]
            )
        out += _table(
            [
                "batch",
                "beams",
                "implementation",
                "latency (ms)",
                "captions/s",
                "peak mem (MiB)",
                "floor ms (time/floor)",
                "speed vs HF",
                "memory vs HF",
            ],
            rows,
        )
        lens = {(r["lib"], r["beams"], r.get("out_len")) for r in report["generate"] if "error" not in r}
        by_key: dict[int, set[int]] = {}
        for _, beams, n in lens:
            by_key.setdefault(beams, set()).add(n)
        if any(len(s) > 1 for s in by_key.values()):
            out += ["", f"Warning: the two sides returned sequences of different lengths: {sorted(lens)}"]

    if report.get("early"):
        out += ["", *render_early(report)]

    pre = report.get("preprocess")
    if isinstance(pre, dict) and "skipped" in pre:
        out += ["", f"**Preprocessing** — not available: {pre['skipped']} (this part of the suite was skipped)."]
    elif pre:
        out += [
            "",
            f"**Preprocessing** — a batch of {pre[0]['n']} generated 640×480 JPEGs (PIL-opened, decoded inside the "
            "processor) → `pixel_values` at the model's image size.",
            "",
        ]
        hf = next((r for r in pre if r["lib"] == "hf_pre" and "error" not in r and "skipped" not in r), None)
        rows = []
        for r in pre:
            label = LIB_LABEL[r["lib"]]
            if "error" in r or "skipped" in r:
                rows.append([label, "failed: " + r.get("error", r.get("skipped", "")), "", "", "", ""])
                continue
            rows.append(
                [
                    f"{label} ({r.get('processor', '')})",
                    _fmt(r["batch_s"] * 1e3),
                    _fmt(r["n"] / r["batch_s"]),
                    _fmt(r["peak_mib"], 4),
                    str(r.get("shape")),
                    "1.00×" if r["lib"] == "hf_pre" else (_ratio(hf["batch_s"], r["batch_s"]) if hf else "–"),
                ]
            )
            if r.get("paths_batch_s"):
                t = r["paths_batch_s"]
                rows.append(
                    [
                        f"{label}, given the file paths",
                        _fmt(t * 1e3),
                        _fmt(r["n"] / t),
                        "–",
                        str(r.get("shape")),
                        _ratio(hf["batch_s"], t) if hf else "–",
                    ]
                )
        out += _table(["implementation", "batch (ms)", "images/s", "peak RSS (MiB)", "output", "speed vs HF"], rows)
        means = [r["mean"] for r in pre if r.get("mean") is not None]
        if len(means) > 1 and max(means) - min(means) > 1e-3:
            out += ["", f"Warning: the outputs differ (mean pixel value {', '.join(f'{m:.5f}' for m in means)})."]

    scale = report.get("scale")
    if scale:
        out += ["", "**How cost grows** (seconds; a line fit gives the marginal cost and the fixed part):", ""]
        out += render_scaling(report)
    return out


def render_early(report: dict[str, Any]) -> list[str]:
    early = report["early"]
    ok = [r for r in early if "error" not in r]
    lengths = sorted(n for r in ok for n in r["new_tokens"])
    span = f"{lengths[0]}–{lengths[-1]}" if lengths else "–"
    out = [
        f"**Generation, captions ending on their own** — the bundled trained model (blip-shapes-base: 4 + 4 "
        f"layers of width 192, 64 image patches), world images of its base domain, max_new_tokens = "
        f"{EARLY_NEW_TOKENS} and no minimum, {report['dtype']}: captions end after {span} new tokens, so rows "
        "(beam search: images) that finished leave the batch. Sampling uses the same seed on both sides. Decoder "
        "rows run: the rows of all decoder passes, of those a batch that never shrinks would run (transformers). "
        "Timing: the best of the timed calls after warm-up ("
        + ", ".join(f"batch {b}: {w} + {n}" for b, w, n in report["suite_settings"].get("early_plan", []))
        + ").",
        "",
    ]
    hf_rows = {(r["batch"], r["mode"]): r for r in ok if r["lib"] == "hf_gen"}
    rows = []
    mismatched = []
    order = {"ours_gen": 0, "hf_gen": 1}
    modes = list(EARLY_MODES)
    for r in sorted(early, key=lambda r: (r["batch"], modes.index(r["mode"]) if "mode" in r else -1, order[r["lib"]])):
        label = LIB_LABEL[r["lib"]]
        if "error" in r:
            rows.append([str(r["batch"]), "", label, "failed: " + r["error"], "", "", "", "", "", ""])
            continue
        hf = hf_rows.get((r["batch"], r["mode"]))
        is_hf = r["lib"] == "hf_gen"
        lat = r["latency_s"]
        if hf and not is_hf and hf.get("ids_sha1") != r.get("ids_sha1"):
            mismatched.append(f"batch {r['batch']}, {r['mode']}")
        if is_hf:
            work = "all"
        elif r.get("decoder_rows"):
            work = f"{r['decoder_rows']:,} of {r['all_rows']:,} ({100 * r['decoder_rows'] / r['all_rows']:.0f}%)"
        else:
            work = "–"
        rows.append(
            [
                str(r["batch"]),
                r["mode"],
                label,
                _fmt(lat * 1e3),
                _fmt(r["captions"] / lat),
                _fmt(r["peak_mib"], 4),
                f"{min(r['new_tokens'])}–{max(r['new_tokens'])}",
                work,
                *_vs_hf(r, hf, is_hf, "latency_s", lat),
            ]
        )
    out += _table(
        [
            "batch",
            "decoding",
            "implementation",
            "latency (ms)",
            "captions/s",
            "peak mem (MiB)",
            "new tokens",
            "decoder rows run",
            "speed vs HF",
            "memory vs HF",
        ],
        rows,
    )
    if mismatched:
        out += ["", f"Warning: the two sides returned different tokens ({'; '.join(mismatched)})."]
    return out


CURVES = [
    ("train_batch", "training step (s) vs batch size", "batch", "per sample"),
    ("train_len", "training step (s) vs caption length", "tokens", "per token"),
    ("gen_tokens", "generate (s) vs new tokens, greedy", "new tokens", "per token"),
    ("gen_beams", "generate (s) vs beams", "beams", "per beam"),
]


def _fit(points: list[list]) -> tuple[float, float] | None:
    pts = [(p[0], p[1]) for p in points if len(p) > 1 and p[1] is not None]
    if len(pts) < 2:
        return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


def _curve_context(report: dict[str, Any]) -> dict[str, str]:
    s = report["suite_settings"]
    return {
        "train_batch": f"captions of {s['caption_len']} tokens",
        "train_len": f"batch {s['scale_caption_batch']}",
        "gen_tokens": f"batch {s['scale_gen_batch']}",
        "gen_beams": f"batch {s['scale_gen_batch']}, {s['new_tokens']} new tokens",
    }


def render_scaling(report: dict[str, Any]) -> list[str]:
    scale = report["scale"]
    context = _curve_context(report)
    rows = []
    for key, title, _, unit in CURVES:
        ours, hf = scale.get("ours", {}), scale.get("hf", {})
        if "error" in ours or "error" in hf:
            continue
        pts_o = {p[0]: p[1] for p in ours.get(key, [])}
        pts_h = {p[0]: p[1] for p in hf.get(key, [])}
        xs = sorted(set(pts_o) | set(pts_h))
        if not xs:
            continue
        cells = ", ".join(f"{x}: {_fmt(pts_o.get(x))} / {_fmt(pts_h.get(x))}" for x in xs)
        fits = []
        for name, pts in (("ours", ours.get(key, [])), ("HF", hf.get(key, []))):
            f = _fit(pts)
            fits.append(f"{name} {_fmt(f[0] * 1e3)} ms {unit} + {_fmt(f[1] * 1e3)} ms" if f else f"{name} –")
        rows.append([f"{title} ({context[key]})", cells, "; ".join(fits)])
    errors = [f"{lib}: {v['error']}" for lib, v in scale.items() if "error" in v]
    lines = _table(["curve", "x: blip_peft / transformers", "line fit"], rows)
    if errors:
        lines += ["", "Scaling runs failed: " + "; ".join(errors)]
    return lines


def plot_scaling(report: dict[str, Any], path: Path) -> bool:
    scale = report.get("scale") or {}
    if not scale or all("error" in v for v in scale.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    context = _curve_context(report)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for ax, (key, title, xlabel, _) in zip(axes.flat, CURVES, strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for lib, style, label in (("ours", "o-", "blip_peft"), ("hf", "s--", "transformers + peft")):
            pts = [p for p in scale.get(lib, {}).get(key, []) if len(p) > 1 and p[1] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_title(f"{title}\n({context[key]})", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    info = report["info"]
    fig.suptitle(f"{report['suite']} suite, {info['device_name']}, {report['dtype']} ({report['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def _git_head() -> str | None:
    """The commit checked out (read from .git; git itself is not run). In a worktree `.git` is a file naming the
    worktree's git folder, whose branch refs live in the shared folder."""
    try:
        git = REPO_DIR / ".git"
        if git.is_file():
            git = (REPO_DIR / git.read_text().split("gitdir:", 1)[1].strip()).resolve()
        common = git / (git / "commondir").read_text().strip() if (git / "commondir").exists() else git
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            for folder in (git, common):
                if (folder / ref).exists():
                    return (folder / ref).read_text().strip()[:10]
            packed = common / "packed-refs"
            for line in packed.read_text().splitlines() if packed.exists() else []:
                if line.endswith(" " + ref):
                    return line.split()[0][:10]
            return None
        return head[:10]
    except (OSError, IndexError):
        return None


RESULTS_HEADER = """# Benchmark results

Written by `python bench/compare.py --suite <cpu|gpu> --write-results [--note "..."]`: one section per (suite,
machine), replaced when the suite runs again on that machine. Each section names the device, the versions and the
date, and says what moved the numbers since the previous run. Ratios ("speed vs HF": transformers' time ÷ ours;
"memory vs HF": our peak ÷ transformers' peak) compare both sides measured in the same run on the same machine;
see bench/README.md for the method.
"""


def _raw_path(suite: str, device: str) -> Path:
    return BENCH_DIR / "results" / f"{suite}-{_slug(device)}.json"


def save_report(report: dict[str, Any], note: str, partial: bool) -> dict[str, Any]:
    """Keeps the raw report in bench/results/; a partial run (`--only ...`) replaces just the parts it measured,
    each part keeping the date and machine floors of the run that measured it."""
    report = dict(report, commit=_git_head())
    raw = _raw_path(report["suite"], report["info"]["device_name"])
    measured = [s for s in SECTIONS if s in report]
    if partial and raw.exists():
        old = json.loads(raw.read_text())
        merged = dict(old, info=report["info"], date=report["date"], suite_settings=report["suite_settings"])
        merged["commit"] = report["commit"]
        merged["note"] = note or old.get("note", "")
        dates = dict(old.get("section_dates", {}))
        infos = dict(old.get("section_info", {}))
        for section in SECTIONS:
            if section in old and section not in infos:
                infos[section] = old["info"]
            if section in old and section not in dates:
                dates[section] = old["date"]
        for section in measured:
            merged[section] = report[section]
            dates[section] = report["date"]
            infos[section] = report["info"]
        merged["section_dates"], merged["section_info"] = dates, infos
        report = merged
    else:
        report["note"] = note
        report["section_dates"] = {s: report["date"] for s in measured}
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps(report, indent=1) + "\n")
    return report


def write_section(report: dict[str, Any]) -> Path:
    """Replaces (or appends) this (suite, device) section of RESULTS.md and its scaling-curve PNG."""
    device = report["info"]["device_name"]
    key = f"{report['suite']} | {device}"
    lines = render(report)
    png = BENCH_DIR / f"scaling-{report['suite']}-{_slug(device)}.png"
    has_png = plot_scaling(report, png)
    dates = report.get("section_dates", {})
    distinct = sorted(set(dates.values()))
    if len(distinct) > 1:
        when = "; ".join(f"{', '.join(s for s in SECTIONS if dates.get(s) == d)} on {d}" for d in distinct)
    else:
        when = report["date"]
    commit = report.get("commit")
    body = [
        f"<!-- bench:begin {key} -->",
        f"## `{report['suite']}` suite on {device}",
        "",
        f"Measured {when}" + (f" (last run at commit {commit})" if commit else "") + ".",
        "",
        f"**What moved the numbers**: {report.get('note') or '(not stated; rerun with --note)'}",
        "",
        *lines,
    ]
    if has_png:
        body += ["", f"![scaling curves, {key}]({png.name})"]
    body += [f"<!-- bench:end {key} -->"]
    text = RESULTS_FILE.read_text() if RESULTS_FILE.exists() else RESULTS_HEADER
    pattern = re.compile(
        rf"<!-- bench:begin {re.escape(key)} -->.*?<!-- bench:end {re.escape(key)} -->", flags=re.DOTALL
    )
    block = "\n".join(body)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS_FILE.write_text(text)
    return RESULTS_FILE


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--write-results", action="store_true", help="update this machine's section of RESULTS.md")
    parser.add_argument("--note", default="", help="the 'what moved the numbers' line for --write-results")
    parser.add_argument(
        "--only",
        help="comma-separated sections: train,generate,early,preprocess,scale (with --write-results, the others "
        "keep their previous numbers)",
    )
    parser.add_argument("--json", help="also write the raw report to this JSON file")
    parser.add_argument("--device", help="override the suite's device (e.g. cpu to dry-run the gpu suite)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="override the suite's dtype")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="override the suite's model shapes")
    parser.add_argument(
        "--stat", choices=["min", "median"], default="min", help="time reported from the timed runs (default: best)"
    )
    parser.add_argument("--threads", type=int, help="torch threads per process (default: the suite's, else all)")
    parser.add_argument("--job-timeout", type=float, default=1800, help="seconds allowed per subprocess")
    parser.add_argument("--verbose", action="store_true", help="show each subprocess's stderr")
    parser.add_argument(
        "--rerender", action="store_true", help="rewrite RESULTS.md and the PNGs from bench/results/*.json, no runs"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.worker:
        worker_main(args.worker)
        return
    if args.rerender:
        for raw in sorted((BENCH_DIR / "results").glob("*.json")):
            print(f"rendered {raw.name} into {write_section(json.loads(raw.read_text()))}", file=sys.stderr)
        return
    suite = SUITES[args.suite]
    overrides = {k: getattr(args, k) for k in ("device", "dtype", "config") if getattr(args, k)}
    if args.threads:
        suite = replace(suite, threads=args.threads)
    if overrides:
        suite = replace(suite, **overrides)
        if args.write_results:
            raise SystemExit("--write-results records the suites as defined; drop --device/--dtype/--config")
    start = time.perf_counter()
    report = run_suite(suite, args)
    lines = render(report)
    print("\n".join(lines))
    print(f"\n(total {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.write_results:
        path = write_section(save_report(report, args.note, partial=bool(args.only)))
        print(f"updated {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
