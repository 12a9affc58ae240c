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
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from jobs import worker_main
from report import BENCH_DIR, render, save_report, write_section
from runner import run_suite
from shapes import CONFIGS, SUITES

# The entry point only; the work is split by responsibility: shapes.py (models, sizes, settings, cost model), jobs.py
# (the timed workloads, run in worker processes), runner.py (a suite's inputs and subprocesses), report.py (tables,
# RESULTS.md, plots).


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--write-results", action="store_true", help="update this machine's section of RESULTS.md")
    parser.add_argument("--note", default="", help="the 'what moved the numbers' line for --write-results")
    parser.add_argument(
        "--only",
        help="comma-separated sections: train,generate,early,preprocess,scale,text_lora_epochs (with --write-results, "
        "the others "
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
