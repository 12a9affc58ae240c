"""Load test of `blip-peft serve` on the loopback interface: N concurrent clients over several adapters, against
the same requests sent one at a time. Bounded: `--requests` in all, `--timeout` seconds at most.

    .venv/bin/python bench/serve_load.py [--clients 8] [--requests 48] [--adapters 3] [--tokens 12]

The bundled model with random LoRA adapters (r=4 on query/value/qkv). Every answer is checked against the caption
the same image gets alone with its adapter, computed in this process: none may be lost or mixed up. Prints
throughput and latency percentiles (p50/p90/p99) of both runs, and the batch sizes the server formed.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
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

        def call(i: int) -> tuple[float, dict]:
            if time.monotonic() > deadline:
                raise TimeoutError("the load test ran past --timeout")
            image, adapter = jobs[i]
            body = json.dumps(
                {"images": [base64.b64encode(image).decode()], "adapter": adapter, "max_new_tokens": args.tokens}
            ).encode()
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=args.timeout) as r:
                answer = json.loads(r.read())
            return time.perf_counter() - t, answer

        runs = {}
        for label, clients in (("sequential (1 client)", 1), (f"concurrent ({args.clients} clients)", args.clients)):
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=clients) as pool:
                results = list(pool.map(call, range(len(jobs))))
            wall = time.perf_counter() - start
            wrong = sum(a["captions"] != [truth[i]] or a["adapter"] != jobs[i][1] for i, (_, a) in enumerate(results))
            lat = [1000 * t for t, _ in results]
            sizes = [a["timings"]["batch_images"] for _, a in results]
            runs[label] = (wall, lat, wrong, sizes)
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(
        f"bundled model, {len(jobs)} requests of one image, {args.adapters} adapters + base, greedy {args.tokens} "
        f"tokens, max batch {args.max_batch}, max wait {args.max_wait_ms} ms, {torch.get_num_threads()} threads"
    )
    print("| run | requests/s | p50 ms | p90 ms | p99 ms | mean batch | wrong or lost |")
    print("|---|---|---|---|---|---|---|")
    for label, (wall, lat, wrong, sizes) in runs.items():
        print(
            f"| {label} | {len(jobs) / wall:.2f} | {_pct(lat, 50):.0f} | {_pct(lat, 90):.0f} | {_pct(lat, 99):.0f} "
            f"| {sum(sizes) / len(sizes):.1f} | {wrong} |"
        )


if __name__ == "__main__":
    main()
