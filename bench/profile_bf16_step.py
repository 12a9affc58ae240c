"""One bf16 LoRA training step on the CPU, ours against transformers + peft under autocast, under the torch
profiler: prints the unprofiled step times and the top ops by self CPU time for each side (bench/RESULTS.md,
"bf16 training at batch 8").

    python bench/profile_bf16_step.py --batch 8            # both sides, one process each (~5 min on 2 cores)
    python bench/profile_bf16_step.py --side ours --no-profile
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)


def run_side(side: str, batch: int, ckpt: str, profiled: bool) -> None:
    from jobs import _caption_batch, _load, tutorial_loop
    from shapes import LEARNING_RATE, MAX_GRAD_NORM, WEIGHT_DECAY
    from torch.profiler import ProfilerActivity, profile

    model = _load("ours" if side == "ours" else "hf", ckpt, "cpu", "float32", lora=True)
    px, ids, mask = _caption_batch("base", batch, 24)
    prof = profile(activities=[ProfilerActivity.CPU]) if profiled else None
    if side == "ours":
        import blip_peft as bp

        # One train() of a warm-up step, two timed steps and the profiled one, timed from its step-end
        # callbacks: a train() call of its own per step would also time what a run does once (lowering the
        # frozen base to bf16, restoring it after).
        stamps: list[float] = []

        def on_step(_log) -> None:
            stamps.append(time.perf_counter())
            if prof is not None and len(stamps) == 3:
                prof.start()
            elif prof is not None and len(stamps) == 4:
                prof.stop()

        data = {"pixel_values": px, "input_ids": ids, "attention_mask": mask}
        bp.train(
            model, None, data, max_steps=4 if profiled else 3,
            batch_size=batch, mixed_precision="bf16", progress=False, logging_steps=1, learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY, lr_scheduler="constant", max_grad_norm=MAX_GRAD_NORM, shuffle=False,
            callback=on_step,
        )  # fmt: skip
        times = [b - a for a, b in zip(stamps[:2], stamps[1:3], strict=True)]
    else:
        bf16_step = tutorial_loop(model, bf16=True)
        bf16_step(px, ids, mask)  # warm-up
        times = []
        for _ in range(2):
            start = time.perf_counter()
            bf16_step(px, ids, mask)
            times.append(time.perf_counter() - start)
        if prof is not None:
            with prof:
                bf16_step(px, ids, mask)
    print(f"{side}, batch {batch}: unprofiled steps " + ", ".join(f"{t:.2f} s" for t in times))
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--side", choices=["ours", "hf", "both"], default="both")
    parser.add_argument("--no-profile", action="store_true", help="only the unprofiled step times")
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpoint:  # a worker: one side in its own process
        run_side(args.side, args.batch, args.checkpoint, not args.no_profile)
        return
    from runner import build_checkpoint

    with tempfile.TemporaryDirectory(prefix="blip_bf16_profile_") as ckpt:
        build_checkpoint("base", ckpt)
        for side in ("ours", "hf") if args.side == "both" else (args.side,):
            command = [sys.executable, __file__, "--side", side, "--batch", str(args.batch), "--checkpoint", ckpt]
            subprocess.run(command + (["--no-profile"] if args.no_profile else []), check=True)


if __name__ == "__main__":
    main()
