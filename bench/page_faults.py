"""Where a CPU training step's time goes outside the model: the memory each step page-faults in and the system
time that costs, step by step, ours (`train()`) against transformers + peft's loop, each in its own process, with
glibc's default malloc or told to keep freed memory (bench/RESULTS.md, "Page faults in the first training steps").

    python bench/page_faults.py --batch 8                     # f32, both sides, default malloc (~6 min on 2 cores)
    python bench/page_faults.py --batch 8 --precision bf16 --kept-memory
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)


def run_side(side: str, batch: int, precision: str, steps: int, ckpt: str) -> None:
    from jobs import _caption_batch, _load, faulted_mib, tutorial_loop
    from shapes import LEARNING_RATE, MAX_GRAD_NORM, WEIGHT_DECAY

    model = _load(side, ckpt, "cpu", "float32", lora=True)
    px, ids, mask = _caption_batch("base", batch, 24)
    last = [time.perf_counter(), faulted_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_stime]

    def report(step: int) -> None:
        now = [time.perf_counter(), faulted_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_stime]
        spent, faulted, system = (b - a for a, b in zip(last, now, strict=True))
        print(f"{side:4} {precision} batch {batch} step {step}: {spent:6.2f} s, page-faulted {faulted:7.0f} MiB, "
              f"system time {system:5.2f} s", flush=True)  # fmt: skip
        last[:] = now

    if side == "ours":
        import blip_peft as bp

        done = []
        bp.train(
            model, None, {"pixel_values": px, "input_ids": ids, "attention_mask": mask}, max_steps=steps,
            batch_size=batch, mixed_precision="bf16" if precision == "bf16" else "no", progress=False,
            logging_steps=1, learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, lr_scheduler="constant",
            max_grad_norm=MAX_GRAD_NORM, shuffle=False, callback=lambda log: (report(len(done)), done.append(1)),
        )  # fmt: skip
        return
    step = tutorial_loop(model, bf16=precision == "bf16")
    for i in range(steps):
        step(px, ids, mask)
        report(i)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--side", choices=["ours", "hf", "both"], default="both")
    parser.add_argument("--kept-memory", action="store_true", help="start each side with KEPT_MEMORY_TUNABLES")
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpoint:  # a worker: one side in its own process
        run_side(args.side, args.batch, args.precision, args.steps, args.checkpoint)
        return
    from runner import build_checkpoint
    from shapes import KEPT_MEMORY_TUNABLES

    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    if args.kept_memory:
        env["GLIBC_TUNABLES"] = KEPT_MEMORY_TUNABLES
    with tempfile.TemporaryDirectory(prefix="blip_page_faults_") as ckpt:
        build_checkpoint("base", ckpt)
        for side in ("ours", "hf") if args.side == "both" else (args.side,):
            command = [sys.executable, __file__, "--side", side, "--batch", str(args.batch), "--checkpoint", ckpt]
            command += ["--precision", args.precision, "--steps", str(args.steps)]
            subprocess.run(command, check=True, env=env)


if __name__ == "__main__":
    main()
