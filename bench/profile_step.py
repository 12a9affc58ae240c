"""Profiles one LoRA training step and one decoding step of blip_peft with the torch profiler and writes
text summaries under bench/profiles/: the top kernels by device (or CPU) time, the number of host
synchronisations, and the share of time in attention, matmuls, elementwise work and copies.

    python bench/profile_step.py --device cuda --dtype bfloat16     # on the GPU machine
    python bench/profile_step.py --device cpu --config tiny         # a smoke run here
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import BlipConfig, BlipForConditionalGeneration

import blip_peft as bp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import CONFIGS, TARGET_MODULES  # noqa: E402

CATEGORIES = {
    "attention": ("attention", "sdpa", "flash", "softmax"),
    "matmul": ("gemm", "mm", "matmul", "linear", "addmm", "conv"),
    "copies": ("copy", "cat", "index_select", "contiguous", "to_copy"),
}


def config(name: str) -> BlipConfig:
    """The benchmark suite's shapes (bench/shapes.py), so profiles and timings describe the same model."""
    text, vision = CONFIGS[name]
    return BlipConfig(text_config=dict(text), vision_config=dict(vision))


def summarise(prof: profile, device: str, title: str, wall: float) -> str:
    on_device = device == "cuda"
    events = prof.key_averages()

    def own(e) -> float:
        return (e.self_device_time_total if on_device else e.self_cpu_time_total) / 1000.0

    total = sum(own(e) for e in events) or 1.0
    shares = {k: 0.0 for k in CATEGORIES}
    other = 0.0
    for e in events:
        name = e.key.lower()
        for category, words in CATEGORIES.items():
            if any(w in name for w in words):
                shares[category] += own(e)
                break
        else:
            other += own(e)
    syncs = sum(e.count for e in events if any(w in e.key.lower() for w in ("synchronize", "item", "_local_scalar")))
    lines = [
        f"# {title}",
        f"wall time {wall * 1000:.1f} ms; profiled {'device' if on_device else 'CPU'} time "
        f"{total:.1f} ms; host synchronisations (item/synchronize calls): {syncs}",
        "",
    ]
    for category, t in shares.items():
        lines.append(f"{category:<12}{t:>10.2f} ms {100 * t / total:>6.1f}%")
    lines.append(f"{'elementwise/other':<12}{other:>10.2f} ms {100 * other / total:>6.1f}%")
    lines.append("")
    sort = "self_cuda_time_total" if on_device else "self_cpu_time_total"
    lines.append(events.table(sort_by=sort, row_limit=25))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--config", choices=["tiny", "base"], default="base")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    cfg = config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        BlipForConditionalGeneration(cfg).save_pretrained(tmp)
        model = bp.BlipForConditionalGeneration.from_pretrained(tmp, device=args.device)
    model = bp.get_peft_model(model, bp.LoraConfig(r=16, lora_alpha=32, target_modules=TARGET_MODULES))
    size = cfg.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    px = torch.randn(args.batch, 3, size, size, generator=g)
    ids = torch.randint(5, cfg.text_config.vocab_size - 3, (args.batch, 24), generator=g)
    data = {"pixel_values": px, "input_ids": ids}
    precision = "no" if args.dtype == "float32" else ("bf16" if args.dtype == "bfloat16" else "fp16")
    run = dict(batch_size=args.batch, mixed_precision=precision, progress=False, logging_steps=1000)
    bp.train(model, None, data, max_steps=2, **run)  # warm-up
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    with profile(activities=activities) as prof:
        sync()
        start = time.perf_counter()
        bp.train(model, None, data, max_steps=1, **run)
        sync()
        wall = time.perf_counter() - start
    path = os.path.join(args.out, f"train-step-{args.device}-{args.config}-{args.dtype}-b{args.batch}.txt")
    with open(path, "w") as f:
        f.write(summarise(prof, args.device, f"one LoRA training step, batch {args.batch}, {args.dtype}", wall))
    print("wrote", path)
    merged = model.merge_and_unload().to(getattr(torch, args.dtype))
    one = px[:1].to(args.device)
    merged.generate(pixel_values=one, max_new_tokens=4, min_new_tokens=4)
    with profile(activities=activities) as prof:
        sync()
        start = time.perf_counter()
        merged.generate(pixel_values=one, max_new_tokens=30, min_new_tokens=30)
        sync()
        wall = time.perf_counter() - start
    path = os.path.join(args.out, f"decode-30-tokens-{args.device}-{args.config}-{args.dtype}-b1.txt")
    with open(path, "w") as f:
        f.write(summarise(prof, args.device, f"greedy caption of 30 tokens, batch 1, {args.dtype}", wall))
    print("wrote", path)


if __name__ == "__main__":
    main()
