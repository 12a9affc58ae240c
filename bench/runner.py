"""Runs a suite: builds the shared inputs (the checkpoint both libraries load, the processor folder, the JPEGs),
then each job in its own subprocess, and gathers their results into one report."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs import RESULT_TAG
from shapes import CONFIGS, HEAP_LIBS, KEPT_MEMORY_TUNABLES, LIB_LABEL, SECTIONS, Suite

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
ENTRY = BENCH_DIR / "compare.py"  # the command line, whose --worker runs one job


# ----------------------------------------------------------------------------------------------- setup
def build_checkpoint(config: str, folder: str) -> None:
    """transformers' BlipForConditionalGeneration with random weights (its own initialisation), saved."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    text, vision = CONFIGS[config]
    torch.manual_seed(0)
    model = transformers.BlipForConditionalGeneration(
        transformers.BlipConfig(text_config=dict(text), vision_config=dict(vision))
    )
    model.save_pretrained(folder)
    del model
    gc.collect()


def build_processor(config: str, folder: str) -> None:
    """A BlipProcessor folder with blip-image-captioning-base's image settings (at this config's image size) and a
    BERT-style tokenizer over a made-up vocabulary (only the images are timed)."""
    import transformers

    transformers.logging.set_verbosity_error()
    text, vision = CONFIGS[config]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab += [f"w{i}" for i in range(max(0, text["vocab_size"] - 2 - len(vocab)))]
    os.makedirs(folder, exist_ok=True)
    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer(vocab_file=vocab_file, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    image_processor = transformers.BlipImageProcessor(
        size={"height": vision["image_size"], "width": vision["image_size"]},
        resample=3,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    transformers.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def build_jpegs(n: int, folder: str) -> list[str]:
    """`n` photo-like 640x480 JPEGs (smooth colour fields plus grain), quality 90."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 8, (480, 640, 3))
        path = os.path.join(folder, f"img{i:03d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------- orchestration
class Runner:
    def __init__(self, timeout: float, verbose: bool, threads: int | None) -> None:
        self.threads = threads
        self.timeout = timeout
        self.verbose = verbose
        self.count = 0

    def __call__(self, label: str, spec: dict[str, Any]) -> dict[str, Any]:
        self.count += 1
        print(f"[{self.count:2d}] {label} ...", end="", file=sys.stderr, flush=True)
        env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        env["PYTHONWARNINGS"] = "ignore"
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        env.update(spec.get("env", {}))
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, str(ENTRY), "--worker", json.dumps(spec)],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                env=env,
                cwd=str(REPO_DIR),
            )
        except subprocess.TimeoutExpired:
            print(f" timed out after {self.timeout:.0f} s", file=sys.stderr)
            return {"error": f"timed out after {self.timeout:.0f} s"}
        elapsed = time.perf_counter() - start
        if self.verbose and proc.stderr.strip():
            print("\n" + proc.stderr.rstrip(), file=sys.stderr)
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(RESULT_TAG):
                print(f" {elapsed:.1f} s", file=sys.stderr, flush=True)
                return json.loads(line[len(RESULT_TAG) :])
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f" FAILED ({elapsed:.1f} s): {tail[0]}", file=sys.stderr, flush=True)
        return {"error": tail[0][:300]}


def _rows(res: dict[str, Any], lib: str, batch: int) -> list[dict[str, Any]]:
    """A job's report rows: its error, or each row it measured, with the library, the batch and the memory kind."""
    if "error" in res:
        return [dict(res, lib=lib, batch=batch)]
    return [dict(row, lib=lib, batch=batch, memory_kind=res["memory_kind"]) for row in res["rows"]]


def run_suite(suite: Suite, args: argparse.Namespace) -> dict[str, Any]:
    run = Runner(args.job_timeout, args.verbose, suite.threads)
    sections = set(args.only.split(",")) if args.only else set(SECTIONS)
    report: dict[str, Any] = dict(suite=suite.name, config=suite.config, device=suite.device, dtype=suite.dtype)
    report["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    report["suite_settings"] = {k: v for k, v in vars(suite).items()}
    report["stat"] = args.stat
    base = dict(config=suite.config, device=suite.device, dtype=suite.dtype, stat=args.stat, threads=suite.threads)
    with tempfile.TemporaryDirectory(prefix="blip_bench_") as tmp:
        info = run("machine: versions, memory bandwidth, matmul FLOP/s", dict(base, job="info"))
        if "error" in info:
            raise SystemExit(f"cannot run the {suite.name} suite here: {info['error']}")
        report["info"] = info
        ckpt = os.path.join(tmp, "checkpoint")
        if sections & {"train", "generate", "scale", "text_lora_epochs"}:
            t0 = time.perf_counter()
            print(
                f"     building the {suite.config} checkpoint (transformers, random init) ...", end="", file=sys.stderr
            )
            sys.stderr.flush()
            build_checkpoint(suite.config, ckpt)
            print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        common = dict(base, ckpt=ckpt)

        if "train" in sections:
            report["train"] = []
            heap = suite.heap_rows and suite.device == "cpu" and platform.libc_ver()[0] == "glibc"
            libs = ["ours"] + (["ours_loop"] if suite.torch_loop_row else []) + ["hf"] + (["hf_heap"] if heap else [])
            # Without bf16 arithmetic the CPU emulates it in float32 units: those rows would only measure that.
            if suite.bf16_rows and suite.dtype == "float32" and suite.device == "cpu" and info["cpu_has_bf16"]:
                libs += ["ours_bf16", "hf_autocast"] + (["hf_autocast_heap"] if heap else [])
            for batch in suite.train_batches:
                for lib in libs:
                    spec = dict(
                        common,
                        job="train",
                        lib=lib,
                        batch=batch,
                        length=suite.caption_len,
                        warmup=suite.train_warmup,
                        iters=suite.train_iters,
                    )
                    if lib in HEAP_LIBS:
                        spec["env"] = {"GLIBC_TUNABLES": KEPT_MEMORY_TUNABLES}
                    res = run(f"train {LIB_LABEL[lib]}, batch {batch}", spec)
                    report["train"].append(dict(res, lib=lib, batch=batch))

        if "generate" in sections:
            report["generate"] = []
            for batch, warmup, iters in suite.gen_plan:
                for lib in ("ours_gen", "hf_gen"):
                    spec = dict(
                        common,
                        job="generate",
                        lib=lib,
                        batch=batch,
                        beams=suite.beams,
                        tokens=suite.new_tokens,
                        warmup=warmup,
                        iters=iters,
                    )
                    res = run(f"generate {LIB_LABEL[lib]}, batch {batch}, beams {suite.beams}", spec)
                    report["generate"] += _rows(res, lib, batch)

        if "early" in sections:
            report["early"] = []
            for batch, warmup, iters in suite.early_plan:
                pixels = os.path.join(tmp, f"early-pixels-{batch}.pt")
                inputs = run(
                    f"early: {batch} world images for the bundled model",
                    dict(base, job="early_inputs", batch=batch, out=pixels),
                )
                for lib in ("ours_gen", "hf_gen"):
                    if "error" in inputs:
                        report["early"].append(dict(inputs, lib=lib, batch=batch))
                        continue
                    spec = dict(
                        base,
                        job="generate_early",
                        lib=lib,
                        batch=batch,
                        model=inputs["model"],
                        pixels=pixels,
                        warmup=warmup,
                        iters=iters,
                    )
                    res = run(f"generate {LIB_LABEL[lib]}, bundled model, batch {batch}, captions ending early", spec)
                    report["early"] += _rows(res, lib, batch)

        if "preprocess" in sections:
            if not info["has_processor"]:
                report["preprocess"] = {"skipped": "blip_peft.BlipProcessor is not available"}
                print("     preprocessing: skipped, blip_peft.BlipProcessor is not available", file=sys.stderr)
            else:
                proc_dir = os.path.join(tmp, "processor")
                build_processor(suite.config, proc_dir)
                images = build_jpegs(suite.n_images, os.path.join(tmp, "jpegs"))
                report["preprocess"] = []
                for lib in ("ours_pre", "hf_pre"):
                    spec = dict(
                        base,
                        job="preprocess",
                        lib=lib,
                        processor_dir=proc_dir,
                        images=images,
                        warmup=suite.pre_warmup,
                        iters=suite.pre_iters,
                    )
                    res = run(f"preprocess {LIB_LABEL[lib]}, {len(images)} JPEGs", spec)
                    report["preprocess"].append(dict(res, lib=lib, n=len(images)))

        if "scale" in sections:
            report["scale"] = {}
            for lib in ("ours", "hf"):
                spec = dict(
                    common,
                    job="scale",
                    lib=lib,
                    length=suite.caption_len,
                    tokens=suite.new_tokens,
                    train_batches=suite.scale_train_batches,
                    caption_lens=suite.scale_caption_lens,
                    caption_batch=suite.scale_caption_batch,
                    new_tokens=suite.scale_new_tokens,
                    beams=suite.scale_beams,
                    gen_batch=suite.scale_gen_batch,
                    warmup=suite.scale_warmup,
                    iters=suite.scale_iters,
                )
                report["scale"][lib] = run(f"scaling curves {LIB_LABEL[lib]}", spec)

        if "text_lora_epochs" in sections:
            n, batch, epochs = suite.epochs_plan
            proc_dir = os.path.join(tmp, "processor")
            if not os.path.isdir(proc_dir):
                build_processor(suite.config, proc_dir)
            images = build_jpegs(n, os.path.join(tmp, "jpegs"))
            report["text_lora_epochs"] = []
            for lib in ("ours", "ours_nocache", "hf"):
                spec = dict(
                    common, job="text_lora_epochs", lib=lib, processor_dir=proc_dir, images=images, batch=batch,
                    epochs=epochs, length=suite.caption_len,
                )  # fmt: skip
                res = run(f"text-only LoRA, {epochs} epochs of {n} JPEGs, {LIB_LABEL[lib]}", spec)
                report["text_lora_epochs"].append(dict(res, lib=lib))
    return report
