"""Images per second of image preprocessing: blip_peft's processor against transformers' BlipProcessor
(PIL backend), in one run on the same machine.

The batch: 64 JPEG files of 640x480 (photo-like gradients and noise, quality 90), made here in a temporary
folder. Both sides start from the file paths and produce the `pixel_values` tensor of a
`processor(images=..., return_tensors="pt")` call: transformers opens the files with PIL, we pass the paths.

    python bench/preprocess.py [--batch 64] [--repeats 5]

Our side uses all cores through rayon; `RAYON_NUM_THREADS=1` measures it on one core (transformers' side
is single-threaded either way).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image

import blip_peft as bp


def make_jpegs(folder: str, count: int, width: int = 640, height: int = 480) -> list[str]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    paths = []
    for i in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = np.stack(
            [
                127 + 100 * np.sin(x / (40 + 7 * i % 30) + phase[0]),
                255 * y / (height - 1),
                127 + 100 * np.cos((x + y) / 55 + phase[2]),
            ],
            -1,
        )
        pixels = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"image{i:03d}.jpg")
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def best_times(repeats: int, *fns) -> list[float]:  # type: ignore[no-untyped-def]
    """Best wall time of each function; runs alternate so that both sides see the same machine load."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    import transformers
    from transformers import BlipImageProcessorPil

    theirs = BlipImageProcessorPil()
    ours = bp.BlipImageProcessor()
    with tempfile.TemporaryDirectory() as folder:
        paths = make_jpegs(folder, args.batch)

        def run_theirs() -> torch.Tensor:
            images = [Image.open(p) for p in paths]
            return theirs(images, return_tensors="pt")["pixel_values"]

        def run_ours() -> torch.Tensor:
            return ours(paths, return_tensors="pt")["pixel_values"]

        a, b = run_ours(), run_theirs()
        assert a.shape == b.shape == (args.batch, 3, 384, 384)
        t_theirs, t_ours = best_times(args.repeats, run_theirs, run_ours)

    levels = ((a - b).abs() * 255 * torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)).max()
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, Pillow {Image.__version__}")
    print(f"batch: {args.batch} JPEG files 640x480 -> pixel_values {tuple(a.shape)}; best of {args.repeats}")
    label = "transformers BlipProcessor (PIL backend):"
    print(f"{label:43s}{args.batch / t_theirs:8.1f} images/s ({t_theirs * 1e3:.1f} ms)")
    threads = os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count()))
    label = f"blip_peft BlipProcessor (Rust, {threads} threads):"
    print(f"{label:43s}{args.batch / t_ours:8.1f} images/s ({t_ours * 1e3:.1f} ms)")
    print(f"speed-up: {t_theirs / t_ours:.2f}x   (largest pixel difference: {levels:.2f} uint8 levels)")


if __name__ == "__main__":
    main()
