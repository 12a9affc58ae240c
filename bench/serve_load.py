"""Load test of `blip-peft serve` on the loopback interface: N concurrent clients over several adapters, against
the same requests sent one at a time. Bounded: `--requests` in all, `--timeout` seconds at most.

    .venv/bin/python bench/serve_load.py [--clients 8] [--requests 48] [--adapters 3] [--tokens 12]

The bundled model with random LoRA adapters (r=4 on query/value/qkv). Every answer is checked against the caption
the same image gets alone with its adapter, computed in this process: none may be lost or mixed up. Prints
throughput and latency percentiles (p50/p90/p99) of both runs, the batch sizes the server formed and how many
requests were answered from a batch that mixed adapters, with the CPU and the load average (a busy machine shows).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import blip_peft as bp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jobs import cpu_name  # noqa: E402


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    names = [f"domain{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        model = bp.get_peft_model(
            bp.BlipForConditionalGeneration.from_pretrained(bp.bundled_model_path()),
            bp.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "self_attn.qkv"]),
        )
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        model.save_pretrained(work / name)
    jobs = [(_png(i), ([None] + names)[i % (len(names) + 1)]) for i in range(args.requests)]

    # The truth: each image alone with its adapter, in this process.
    processor = bp.AutoProcessor.from_pretrained(bp.bundled_model_path())
    ref = bp.PeftModel.from_pretrained(
        bp.BlipForConditionalGeneration.from_pretrained(bp.bundled_model_path()), work / names[0], names[0]
    )
    for n in names[1:]:
        ref.load_adapter(work / n, n)
    ref.eval()
    truth = []
    for image, adapter in jobs:
        if adapter is None:
            with ref.disable_adapter():
                truth.append(bp.generate(ref, processor, [image], max_new_tokens=args.tokens)[0])
        else:
            ref.set_adapter(adapter)
            truth.append(bp.generate(ref, processor, [image], max_new_tokens=args.tokens)[0])

    cmd = [sys.executable, "-m", "blip_peft", "serve", "--model", bp.bundled_model_path(), "--port", "0"]
    cmd += [a for n in names for a in ("--adapter", f"{n}={work / n}")]
    cmd += ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + args.timeout
    try:
        line = server.stdout.readline() if server.stdout else ""
        if not line.startswith("serving on "):
            raise RuntimeError(f"server did not start: {line!r}")
        url = line.split()[-1] + "/caption"

        def call(i: int) -> tuple[float, dict | None]:
            """The latency and answer of request i; None for a request lost (refused, failed, past --timeout)."""
            if time.monotonic() > deadline:
                return 0.0, None
            image, adapter = jobs[i]
            body = json.dumps(
                {"images": [base64.b64encode(image).decode()], "adapter": adapter, "max_new_tokens": args.tokens}
            ).encode()
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=max(1.0, deadline - time.monotonic())) as r:
                    answer = json.loads(r.read())
            except (OSError, ValueError) as e:
                print(f"request {i} lost: {e}", file=sys.stderr)
                return time.perf_counter() - t, None
            return time.perf_counter() - t, answer

        runs = {}
        for label, clients in (("sequential (1 client)", 1), (f"concurrent ({args.clients} clients)", args.clients)):
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=clients) as pool:
                results = list(pool.map(call, range(len(jobs))))
            wall = time.perf_counter() - start
            answered = [(i, t, a) for i, (t, a) in enumerate(results) if a is not None]
            lost = len(jobs) - len(answered)
            wrong = sum(a["captions"] != [truth[i]] or a["adapter"] != jobs[i][1] for i, _, a in answered)
            lat = [1000 * t for _, t, _ in answered]
            sizes = [a["timings"]["batch_images"] for _, _, a in answered]
            mixed = sum(a["timings"]["batch_adapters"] > 1 for _, _, a in answered)
            runs[label] = (wall, lat, wrong, lost, sizes, mixed)
    finally:
        server.terminate()
        server.wait(timeout=30)

    load = os.getloadavg()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(
        f"bundled model, {len(jobs)} requests of one image, {args.adapters} adapters + base, greedy {args.tokens} "
        f"tokens, max batch {args.max_batch}, max wait {args.max_wait_ms} ms, {torch.get_num_threads()} threads"
    )
    print("| run | wall s | requests/s | p50 ms | p90 ms | p99 ms | mean batch | in a mixed batch | wrong | lost |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, (wall, lat, wrong, lost, sizes, mixed) in runs.items():
        pct = " | ".join(f"{_pct(lat, q):.0f}" if lat else "-" for q in (50, 90, 99))
        mean = f"{sum(sizes) / len(sizes):.1f}" if sizes else "-"
        print(
            f"| {label} | {wall:.1f} | {(len(jobs) - lost) / wall:.2f} | {pct} | {mean} | {mixed} | {wrong} | {lost} |"
        )
    if any(wrong or lost for _, _, wrong, lost, _, _ in runs.values()):
        sys.exit("some requests were lost or got another request's answer")


if __name__ == "__main__":
    main()
