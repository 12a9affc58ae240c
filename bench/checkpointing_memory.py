"""Peak memory and step time of `blip_peft.train` with and without gradient checkpointing.

Real blip-image-captioning-base shapes (random weights), LoRA r=16 on the attention and MLP layers of both
towers, float32 on the CPU. Each setting runs in its own process so that its peak resident memory is its own.
Run: python bench/checkpointing_memory.py [--batch 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, resource, sys, time, torch
    sys.path.insert(0, "bench")
    import blip_peft as bp
    from shapes import CONFIGS, TARGET_MODULES
    batch, steps, checkpointing = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    import transformers
    text, vision = CONFIGS["base"]
    config = transformers.BlipConfig(text_config=dict(text), vision_config=dict(vision)).to_dict()
    model = bp.BlipForConditionalGeneration.from_config(config)
    model = bp.get_peft_model(model, bp.LoraConfig(r=16, lora_alpha=32, target_modules=TARGET_MODULES))
    g = torch.Generator().manual_seed(0)
    n = batch * steps
    data = {"pixel_values": torch.randn(n, 3, 384, 384, generator=g),
            "input_ids": torch.randint(1000, 30000, (n, 24), generator=g)}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    bp.train(model, None, data, max_steps=steps, batch_size=batch, shuffle=False, mixed_precision="no",
             gradient_checkpointing=checkpointing, progress=False)
    seconds = (time.perf_counter() - start) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"step_s": seconds, "peak_mib": peak / 1024, "before_mib": before / 1024}))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rows = {}
    for checkpointing in (False, True):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.batch), str(args.steps), "1" if checkpointing else "0"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows[checkpointing] = json.loads(out.strip().splitlines()[-1])
    plain, ckpt = rows[False], rows[True]
    print(f"batch {args.batch}, LoRA r=16, real shapes, float32, CPU")
    for name, r in (("plain", plain), ("gradient_checkpointing", ckpt)):
        print(
            f"{name:>24}: {r['step_s']:.2f} s/step, peak RSS {r['peak_mib']:.0f} MiB "
            f"(training adds {r['peak_mib'] - r['before_mib']:.0f} MiB over the loaded model and data)"
        )
    saved = (plain["peak_mib"] - plain["before_mib"]) - (ckpt["peak_mib"] - ckpt["before_mib"])
    print(f"activation memory saved: {saved:.0f} MiB; time ratio {ckpt['step_s'] / plain['step_s']:.2f}x")


if __name__ == "__main__":
    main()
