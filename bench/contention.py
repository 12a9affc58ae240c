"""How each library degrades when another process keeps one core busy (issue #21's contended-machine note).

libtorch's OpenMP team waits at a barrier after every parallel region; when one of its threads shares a core with
a busy process, every region waits for that thread's next time slice, and small operations (decoding steps, the
LoRA adapters' narrow GEMMs) can slow down by orders of magnitude. This script times the same work, ours and
transformers + peft's, on a quiet machine and again with `--busy` cores spinning in other processes, each job in its
own subprocess as compare.py runs them, alternating quiet and loaded:

    python bench/contention.py                  # base shapes: a LoRA training step (batch 2) and greedy captions
    python bench/contention.py --config tiny    # a smoke run (tiny shapes)

It prints, per (work, library): the quiet time, the loaded time and the slowdown, and ours against theirs in both.
Run it on an otherwise idle machine: the point is the load it adds itself.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Any

from runner import Runner, build_checkpoint
from shapes import CONFIGS, LIB_LABEL

WORK = {
    "LoRA training step, batch 2": dict(job="train", batch=2, length=24, warmup=1, iters=3, libs=("ours", "hf")),
    "greedy caption, batch 1, 30 tokens": dict(
        job="generate", batch=1, beams=[1], tokens=30, warmup=1, iters=3, libs=("ours_gen", "hf_gen")
    ),
}


def _spin(core: int) -> None:
    """A process that keeps `core` busy until it is terminated (the other tenant of a shared machine)."""
    try:
        os.sched_setaffinity(0, {core})
    except (AttributeError, OSError):
        pass
    x = 0
    while True:
        x += 1


class Load:
    """`n` spinning processes on the last `n` cores while the block runs."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[multiprocessing.Process] = []

    def __enter__(self) -> Load:
        cores = (
            sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        )
        for core in cores[-self.n :] if self.n else []:
            p = multiprocessing.get_context("spawn").Process(target=_spin, args=(core,), daemon=True)
            p.start()
            self.procs.append(p)
        time.sleep(0.5)  # let them reach their cores
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join()


def _time_of(res: dict[str, Any]) -> float | None:
    if "error" in res:
        return None
    if "step_s" in res:
        return res["step_s"]
    return res["rows"][0]["latency_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="base")
    parser.add_argument("--busy", type=int, default=1, help="cores kept busy by other processes (default 1)")
    parser.add_argument("--threads", type=int, help="torch threads per job (default: torch's, all cores)")
    parser.add_argument("--job-timeout", type=float, default=1800)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    run = Runner(args.job_timeout, args.verbose, args.threads)
    base = dict(config=args.config, device="cpu", dtype="float32", stat="min", threads=args.threads)
    results: dict[tuple[str, str, str], float | None] = {}
    with tempfile.TemporaryDirectory(prefix="blip_contention_") as tmp:
        ckpt = os.path.join(tmp, "checkpoint")
        build_checkpoint(args.config, ckpt)
        for work, plan in WORK.items():
            spec_base = {k: v for k, v in plan.items() if k != "libs"}
            for lib in plan["libs"]:
                for state in ("quiet", "loaded"):
                    spec = dict(base, ckpt=ckpt, lib=lib, **spec_base)
                    with Load(args.busy if state == "loaded" else 0):
                        res = run(f"{work}, {LIB_LABEL[lib]}, {state}", spec)
                    results[(work, lib, state)] = _time_of(res)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\n{cpu}, {os.cpu_count()} logical CPUs, {args.busy} kept busy by another process; {args.config} shapes\n")
    print("| work | implementation | quiet (ms) | one core busy (ms) | slowdown |")
    print("|---|---|---|---|---|")
    for work, plan in WORK.items():
        for lib in plan["libs"]:
            quiet, loaded = results[(work, lib, "quiet")], results[(work, lib, "loaded")]
            slow = f"{loaded / quiet:.2f}×" if quiet and loaded else "–"
            q = f"{quiet * 1e3:,.0f}" if quiet else "failed"
            lo = f"{loaded * 1e3:,.0f}" if loaded else "failed"
            print(f"| {work} | {LIB_LABEL[lib]} | {q} | {lo} | {slow} |")
    for work, plan in WORK.items():
        ours, theirs = plan["libs"]
        for state in ("quiet", "loaded"):
            a, b = results[(work, ours, state)], results[(work, theirs, state)]
            if a and b:
                print(f"{work}, {state}: ours {b / a:.2f}× as fast as transformers", file=sys.stderr)


if __name__ == "__main__":
    main()
