"""Mixed-adapter batches: one batch whose images use different LoRA adapters, against one call per adapter, ours
and peft's (peft's `generate(adapter_names=...)` splits the batch into one sub-batch per adapter in Python).

    .venv/bin/python bench/mixed_adapters.py [--shape base|base224|base-decoder|bundled|tiny] [--batch 8]
        [--adapters 4] [--tokens 20] [--reps 3]

Shapes: `base` is blip-image-captioning-base (384-pixel images, 577 image tokens), `base224` the same towers at
BLIP's pre-training resolution of 224 pixels (197 image tokens: the decoder is blip-base's exactly, the vision
tower costs a third), `base-decoder` blip-base's text decoder (12 layers of width 768, its vocabulary) over the
bundled model's small vision tower (width 192, 128 pixels: its cross-attention reads 65 image tokens of width 192),
`bundled` the bundled model's shapes, `tiny` the tests' model.

Random weights (transformers' initialisation, adapters with random A and B) at the shapes chosen; greedy decoding
of exactly `--tokens` new tokens (min = max), so both sides do the same work; the images cycle through the
adapters and the base model ("__base__"). Prints the best of `--reps` timed calls (one warm-up call first) and
checks that every variant wrote the same tokens.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
from transformers import BlipConfig
from transformers import BlipForConditionalGeneration as HFBlip

import blip_peft as bp
from blip_peft.presets import (
    BASE_TEXT,
    BASE_VISION,
    BUNDLED_TEXT,
    BUNDLED_VISION,
    QUERY_VALUE_TARGETS,
    TINY_TEXT,
    TINY_VISION,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jobs import cpu_name  # noqa: E402


def _shapes(shape: str) -> tuple[dict, dict]:
    if shape == "base":
        return BASE_TEXT, BASE_VISION
    if shape == "base224":
        return BASE_TEXT, dict(BASE_VISION, image_size=224)
    if shape == "base-decoder":
        return BASE_TEXT, BUNDLED_VISION
    if shape == "bundled":
        # The bundled model's tokenizer decides its vocabulary size and ids (scripts/make_base_model.py).
        with open(os.path.join(bp.bundled_model_path(), "config.json")) as f:
            text = json.load(f)["text_config"]
        ids = {k: text[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "sep_token_id", "pad_token_id")}
        return dict(BUNDLED_TEXT, **ids), BUNDLED_VISION
    return TINY_TEXT, TINY_VISION


def _best(fn, reps: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["base", "base224", "base-decoder", "bundled", "tiny"], default="base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text, vision = _shapes(args.shape)
    work = Path(tempfile.mkdtemp(prefix="bench_mixed_"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    torch.manual_seed(0)
    HFBlip(BlipConfig(text_config=dict(text), vision_config=dict(vision))).save_pretrained(work / "base")
    names = [f"adapter{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        ref = peft.get_peft_model(
            HFBlip.from_pretrained(work / "base"),
            peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=QUERY_VALUE_TARGETS),
        )
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        ref.save_pretrained(work / name)

    rows = [(names + ["__base__"])[i % (len(names) + 1)] for i in range(args.batch)]
    g = torch.Generator().manual_seed(1)
    px = torch.randn(args.batch, 3, vision["image_size"], vision["image_size"], generator=g)
    settings = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens)

    ours = bp.PeftModel.from_pretrained(
        bp.BlipForConditionalGeneration.from_pretrained(work / "base"), work / names[0], names[0]
    )
    theirs = peft.PeftModel.from_pretrained(HFBlip.from_pretrained(work / "base"), work / names[0], names[0]).eval()
    for n in names[1:]:
        ours.load_adapter(work / n, n)
        theirs.load_adapter(work / n, n)
    ours.eval()

    def per_adapter(model, disable) -> torch.Tensor:
        out = torch.empty(args.batch, 1 + args.tokens, dtype=torch.long)
        for name in dict.fromkeys(rows):
            idx = torch.tensor([i for i, r in enumerate(rows) if r == name])
            if name == "__base__":
                with disable():
                    ids = model.generate(pixel_values=px[idx], **settings)
            else:
                model.set_adapter(name)
                ids = model.generate(pixel_values=px[idx], **settings)
            out[idx] = ids
        return out

    results = {}
    with torch.no_grad():
        results["ours, mixed batch"] = _best(
            lambda: ours.generate(pixel_values=px, adapter_names=rows, **settings), args.reps
        )
        results["ours, one call per adapter"] = _best(lambda: per_adapter(ours, ours.disable_adapter), args.reps)
        results["peft, mixed batch"] = _best(
            lambda: theirs.generate(pixel_values=px, adapter_names=rows, **settings), args.reps
        )
        results["peft, one call per adapter"] = _best(lambda: per_adapter(theirs, theirs.disable_adapter), args.reps)
    first = next(iter(results.values()))[1]
    same = all(torch.equal(out, first) for _, out in results.values())
    cpu = cpu_name()
    load = os.getloadavg()
    print(
        f"{args.shape} shapes, batch {args.batch} over {args.adapters} adapters + base (r={args.rank} on "
        f"{', '.join(QUERY_VALUE_TARGETS)}), greedy {args.tokens} new tokens, {torch.get_num_threads()} threads, "
        f"{cpu}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    )
    print(f"all variants wrote the same tokens: {same}")
    base = results["ours, mixed batch"][0]
    print(f"| variant | best of {args.reps} (s) | vs ours mixed |")
    print("|---|---|---|")
    for name, (t, _) in results.items():
        print(f"| {name} | {t:.3f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
