#!/usr/bin/env python
"""The VQA and retrieval heads against transformers + peft: the same work, the same machine, one run.

    python bench/heads.py --mode quick                 # tiny shapes: a smoke test of every path (~2 min, 2 cores)
    python bench/heads.py --mode full --json bench/results/heads-cpu.json    # the real measurement (quiet machine)

Work (bench/README.md, "The other heads"): a VQA LoRA training step (blip-vqa-base shapes, LoRA r=16 on the
attention and MLP layers of the three towers, AdamW, clipping: both sides the same plain torch loop), VQA answer
generation (greedy and 3 beams, exactly `answer_tokens` new tokens), retrieval scoring at blip-itm-base-coco
shapes: the ITC similarity matrix of M images x N texts (one forward with `use_itm_head=False`) and the ITM
re-ranking of each image's top-k texts (the image embeddings computed once, the text encoder over the k x M
pairs, as BLIP's evaluation and `bp.rank` do). Each (library, job) runs in its own subprocess, the sides
alternating over `--rounds` rounds (the best of all timed runs is reported); the weights are random at realistic
scales (initializer range 0.02 in both towers: no denormals). Floors: FLOPs / the matmul rate measured in the
same run (decoding: max of that and the decoder's weight bytes / the memory bandwidth, per token).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from jobs import JOBS, RESULT_TAG, Memory, _stat, _sync, _torch_dtype, worker_main
from shapes import CONFIGS, LEARNING_RATE, LORA, MAX_GRAD_NORM, WEIGHT_DECAY, presets

ENTRY = os.path.abspath(__file__)
LIBS = ("ours", "hf")
LABEL = {"ours": "blip_peft", "hf": "transformers + peft"}

# What each mode runs: shapes, batch sizes, lengths, repetitions.
MODES: dict[str, dict[str, Any]] = {
    "quick": dict(
        config="tiny", vqa_train_batches=[2, 8], vqa_gen_batches=[1, 8], beams=[1, 3], question_len=12,
        answer_len=6, answer_tokens=8, images=16, texts=16, top_k=4, text_len=20, warmup=1, iters=2, rounds=1,
        threads=1,
    ),
    "full": dict(
        config="base", vqa_train_batches=[2, 8], vqa_gen_batches=[1, 8], beams=[1, 3], question_len=12,
        answer_len=6, answer_tokens=8, images=32, texts=32, top_k=8, text_len=20, warmup=1, iters=3, rounds=2,
        threads=None,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- checkpoints
def build_checkpoints(config: str, folder: str) -> dict[str, str]:
    """transformers' BlipForQuestionAnswering and BlipForImageTextRetrieval with random weights (its own
    initialisation at the presets' ranges), saved; the paths by head."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    text, vision = CONFIGS[config]
    out = {}
    for head, cls, top in (
        ("vqa", transformers.BlipForQuestionAnswering, {}),
        ("itm", transformers.BlipForImageTextRetrieval, dict(presets.ITM_BASE_TOP) if config == "base" else {}),
    ):
        torch.manual_seed(0)
        model = cls(transformers.BlipConfig(text_config=dict(text), vision_config=dict(vision), **top))
        out[head] = os.path.join(folder, head)
        model.save_pretrained(out[head])
        del model
    return out


# ------------------------------------------------------------------------------------------------ inputs
def _ids(config: str, n: int, length: int, seed: int, first: str, ragged: bool = True):
    """Token ids `[n, length]` (`first` token first, [SEP] last) and their mask; with `ragged`, every other row
    right-padded by a quarter."""
    import torch

    text, _ = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, min(text["vocab_size"] - 2, 30000), (n, length), generator=g)
    ids[:, 0] = text[first]
    ids[:, -1] = text["sep_token_id"]
    mask = torch.ones_like(ids)
    if ragged:
        cut = length - max(1, length // 4)
        ids[1::2, cut - 1] = text["sep_token_id"]
        ids[1::2, cut:] = text["pad_token_id"]
        mask[1::2, cut:] = 0
    return ids, mask


def _pixels(config: str, n: int, seed: int):
    import torch

    _, vision = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, vision["image_size"], vision["image_size"], generator=g)


def _load(lib: str, head: str, ckpt: str, device: str, dtype: str, lora: bool):
    import torch

    if lib == "ours":
        import blip_peft as bp

        cls = bp.BlipForQuestionAnswering if head == "vqa" else bp.BlipForImageTextRetrieval
        model = cls.from_pretrained(ckpt, dtype=dtype).to(device)
        return bp.get_peft_model(model, bp.LoraConfig(**LORA)) if lora else model
    import peft
    import transformers

    cls = transformers.BlipForQuestionAnswering if head == "vqa" else transformers.BlipForImageTextRetrieval
    model = cls.from_pretrained(ckpt, dtype=getattr(torch, dtype)).to(device)
    return peft.get_peft_model(model, peft.LoraConfig(**LORA)) if lora else model


# ---------------------------------------------------------------------------------------------- worker jobs
def _timed(spec: dict[str, Any], fn) -> tuple[list[float], float]:
    """`fn()` warmup + iters times; the timed runs' seconds and the phase's peak memory."""
    device = spec["device"]
    mem = Memory(device)
    for _ in range(spec["warmup"]):
        fn()
    mem.reset()
    times = []
    for _ in range(spec["iters"]):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, mem.peak()


def job_vqa_train(spec: dict[str, Any]) -> dict[str, Any]:
    """One LoRA step of the plain torch loop (both sides): forward with the answer as labels, backward,
    clipping, AdamW, zero_grad, loss.item()."""
    import math

    import torch

    device, dtype = spec["device"], _torch_dtype(spec["dtype"])
    model = _load(spec["lib"], "vqa", spec["ckpt"], device, spec["dtype"], lora=True)
    model.train()
    b = spec["batch"]
    px = _pixels(spec["config"], b, 1).to(device, dtype)
    q, qmask = _ids(spec["config"], b, spec["question_len"], 2, "bos_token_id")
    answer, _ = _ids(spec["config"], b, spec["answer_len"], 3, "bos_token_id", ragged=False)
    q, qmask, answer = q.to(device), qmask.to(device), answer.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def step() -> None:
        out = model(input_ids=q, pixel_values=px, attention_mask=qmask, labels=answer)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not math.isfinite(out.loss.item()):
            raise RuntimeError("the loss is not finite")

    times, peak = _timed(spec, step)
    return dict(times=times, time_s=_stat(spec, times), peak_mib=peak, memory_kind=Memory(device).kind)


def job_vqa_generate(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    device, dtype = spec["device"], _torch_dtype(spec["dtype"])
    model = _load(spec["lib"], "vqa", spec["ckpt"], device, spec["dtype"], lora=False).eval()
    b = spec["batch"]
    px = _pixels(spec["config"], b, 4).to(device, dtype)
    q, qmask = _ids(spec["config"], b, spec["question_len"], 5, "bos_token_id")
    q, qmask = q.to(device), qmask.to(device)
    n = spec["answer_tokens"]
    kw = dict(max_new_tokens=n, min_new_tokens=n, num_beams=spec["beams"])
    shape: list[int] = []

    def run() -> None:
        with torch.no_grad():
            out = model.generate(input_ids=q, pixel_values=px, attention_mask=qmask, **kw)
        shape[:] = list(out.shape)

    times, peak = _timed(spec, run)
    return dict(times=times, time_s=_stat(spec, times), peak_mib=peak, memory_kind=Memory(device).kind, out=shape)


def _itc(model, px, ids, mask):
    return model(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score


def job_itc_matrix(spec: dict[str, Any]) -> dict[str, Any]:
    """The `[M, N]` similarity matrix of M images and N texts: one forward with `use_itm_head=False` (each image
    and text encoded once, both sides)."""
    import torch

    device, dtype = spec["device"], _torch_dtype(spec["dtype"])
    model = _load(spec["lib"], "itm", spec["ckpt"], device, spec["dtype"], lora=False).eval()
    px = _pixels(spec["config"], spec["images"], 6).to(device, dtype)
    ids, mask = _ids(spec["config"], spec["texts"], spec["text_len"], 7, "bos_token_id")
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        times, peak = _timed(spec, lambda: _itc(model, px, ids, mask))
    return dict(times=times, time_s=_stat(spec, times), peak_mib=peak, memory_kind=Memory(device).kind)


def job_itm_rerank(spec: dict[str, Any]) -> dict[str, Any]:
    """ITM logits of each image's top-k texts (k x M pairs) over image embeddings computed once, as BLIP's
    evaluation re-ranks: ours `get_image_features` + `itm_logits(image_index=...)` (as `bp.rank` calls it: each
    image's cross-attention keys/values computed once for its k texts); transformers' submodules (vision_model,
    text_encoder over the pairs' image embeddings, itm_head) as its forward computes them."""
    import torch

    device, dtype = spec["device"], _torch_dtype(spec["dtype"])
    model = _load(spec["lib"], "itm", spec["ckpt"], device, spec["dtype"], lora=False).eval()
    px = _pixels(spec["config"], spec["images"], 6).to(device, dtype)
    ids, mask = _ids(spec["config"], spec["texts"], spec["text_len"], 7, "bos_token_id")
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        top = _itc(model, px, ids, mask).topk(spec["top_k"], dim=1).indices  # [M, k], the same on both sides
    image_of = torch.arange(px.shape[0], device=device).repeat_interleave(spec["top_k"])
    text_of = top.reshape(-1)

    def ours() -> None:
        _, embeds = model.get_image_features(px)
        model.itm_logits(embeds, ids[text_of], mask[text_of], image_index=image_of)

    def theirs() -> None:
        embeds = model.vision_model(pixel_values=px).last_hidden_state
        pair = embeds[image_of]
        hidden = model.text_encoder(
            input_ids=ids[text_of],
            attention_mask=mask[text_of],
            encoder_hidden_states=pair,
            encoder_attention_mask=torch.ones(pair.shape[:-1], dtype=torch.long, device=device),
        ).last_hidden_state
        model.itm_head(hidden[:, 0, :])

    with torch.no_grad():
        times, peak = _timed(spec, ours if spec["lib"] == "ours" else theirs)
    return dict(times=times, time_s=_stat(spec, times), peak_mib=peak, memory_kind=Memory(device).kind)


# The worker runs these through jobs.py's entry (the machine's floors, `info`, are its own job).
HEAD_JOBS = dict(
    vqa_train=job_vqa_train, vqa_generate=job_vqa_generate, itc_matrix=job_itc_matrix, itm_rerank=job_itm_rerank
)
JOB_NAMES = tuple(HEAD_JOBS)
JOBS.update(HEAD_JOBS)


# ------------------------------------------------------------------------------------------------ FLOPs
def _layer_flops(t: int, d: int, f: int, cross: int = 0, cross_d: int = 0) -> float:
    """One transformer layer over `t` tokens: projections and MLP, attention scores and values, and a
    cross-attention over `cross` states of width `cross_d` (queries/outputs on `t`, keys/values on `cross`)."""
    flops = 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d
    if cross:
        flops += 2 * t * 2 * d * d + 2 * cross * 2 * cross_d * d + 4 * t * cross * d
    return flops


def model_flops(config: str, work: str, m: dict[str, Any], batch: int = 1) -> float:
    """Forward FLOPs of one piece of work (the matmuls; norms and activations left out)."""
    text, vision = CONFIGS[config]
    dv, fv, lv = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
    n = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    d, f, lt, vocab = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"], text["vocab_size"]
    image = lv * _layer_flops(n, dv, fv) + 2 * n * 3 * vision["patch_size"] ** 2 * dv
    tq, ta = m["question_len"], m["answer_len"]
    question = lt * _layer_flops(tq, d, f, n, dv)
    if work == "vqa_train":  # forward; the step is counted as 2 x forward (LoRA: no frozen-weight gradients)
        answer = lt * _layer_flops(ta, d, f, tq, d) + 2 * ta * d * vocab
        return 2 * batch * (image + question + answer)
    if work == "vqa_generate":  # prefill; the tokens are added by generation_floor
        return batch * (image + question)
    if work == "itc_matrix":
        texts = m["texts"] * lt * _layer_flops(m["text_len"], d, f)
        return m["images"] * image + texts + 2 * m["images"] * m["texts"] * 256
    if work == "itm_rerank":
        pairs = m["images"] * m["top_k"]
        return m["images"] * image + pairs * lt * _layer_flops(m["text_len"], d, f, n, dv)
    raise ValueError(work)


def generation_floor(config: str, m: dict[str, Any], batch: int, beams: int, info: dict[str, Any]) -> float:
    """Prefill FLOPs / matmul rate + per new token max(decoder weight bytes / bandwidth, FLOPs / matmul rate)."""
    text, _ = CONFIGS[config]
    d, f, lt, vocab = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"], text["vocab_size"]
    tq, rows = m["question_len"], batch * beams
    floor = model_flops(config, "vqa_generate", m, batch) / info["matmul_flops"]
    weight_bytes = 4 * (lt * (6 * d * d + 2 * d * f) + d * vocab)
    for step in range(m["answer_tokens"]):
        flops = rows * (lt * _layer_flops(1, d, f, tq, d) + 2 * d * vocab + 4 * lt * (step + 1) * d)
        floor += max(weight_bytes / info["bandwidth"], flops / info["matmul_flops"])
    return floor


# ------------------------------------------------------------------------------------------------ running
def run_job(label: str, spec: dict[str, Any], timeout: float, threads: int | None) -> dict[str, Any]:
    print(f"  {label} ...", end="", file=sys.stderr, flush=True)
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONWARNINGS"] = "ignore"
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, ENTRY, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        print(" timed out", file=sys.stderr)
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr)
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    print(f" FAILED: {tail[0]}", file=sys.stderr)
    return {"error": tail[0][:300]}


def plan(m: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(row name, job, spec extras) of every measurement."""
    rows = []
    for b in m["vqa_train_batches"]:
        rows.append((f"VQA LoRA training step, batch {b}", "vqa_train", dict(batch=b)))
    for b in m["vqa_gen_batches"]:
        for beams in m["beams"]:
            how = "greedy" if beams == 1 else f"{beams} beams"
            rows.append((f"VQA answers, {how}, batch {b}", "vqa_generate", dict(batch=b, beams=beams)))
    rows.append((f"ITC matrix, {m['images']} images x {m['texts']} texts", "itc_matrix", {}))
    rows.append((f"ITM re-rank, top-{m['top_k']} of {m['images']} images", "itm_rerank", {}))
    return rows


def floor_of(job: str, m: dict[str, Any], extra: dict[str, Any], info: dict[str, Any]) -> float:
    if job == "vqa_generate":
        return generation_floor(m["config"], m, extra["batch"], extra["beams"], info)
    return model_flops(m["config"], job, m, extra.get("batch", 1)) / info["matmul_flops"]


def render(report: dict[str, Any]) -> list[str]:
    info = report["info"]
    lines = [
        f"VQA / retrieval heads, {report['mode']} mode ({report['config']} shapes), {report['device']} "
        f"{report['dtype']}, {info['device_name']}; best of {report['timed_runs']} timed runs a side, sides "
        "alternating",
        f"machine: matmul {info['matmul_flops'] / 1e9:.0f} GFLOP/s, bandwidth {info['bandwidth'] / 1e9:.1f} GB/s; "
        f"versions {info['versions']}",
        "",
        "| work | blip_peft | transformers + peft | speed vs HF | blip_peft / floor | HF / floor "
        "| peak MiB ours / HF |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        ours, hf = row["ours"], row["hf"]
        if "error" in ours or "error" in hf:
            lines.append(f"| {row['name']} | {ours.get('error', '')} | {hf.get('error', '')} | | | | |")
            continue
        t_o, t_h, floor = ours["time_s"], hf["time_s"], row["floor_s"]
        lines.append(
            f"| {row['name']} | {t_o * 1e3:.1f} ms | {t_h * 1e3:.1f} ms | {t_h / t_o:.2f}x | {t_o / floor:.1f} | "
            f"{t_h / floor:.1f} | {ours['peak_mib']:.0f} / {hf['peak_mib']:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: the mode's, else all)")
    parser.add_argument("--rounds", type=int, help="alternating rounds of both sides (default: the mode's)")
    parser.add_argument("--json", help="also write the raw report to this JSON file")
    parser.add_argument("--only", help=f"comma-separated jobs to run: {','.join(JOB_NAMES)} (default: all)")
    parser.add_argument("--job-timeout", type=float, default=1800)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    m = dict(MODES[args.mode])
    only = set(args.only.split(",")) if args.only else set(JOB_NAMES)
    if only - set(JOB_NAMES):
        parser.error(f"--only takes {','.join(JOB_NAMES)}, got {','.join(sorted(only - set(JOB_NAMES)))}")
    threads = args.threads or m["threads"]
    rounds = args.rounds or m["rounds"]
    base = dict(config=m["config"], device=args.device, dtype=args.dtype, threads=threads, stat="min")
    started = time.perf_counter()
    info = run_job("machine: matmul FLOP/s, memory bandwidth", dict(base, job="info"), args.job_timeout, threads)
    if "error" in info:
        raise SystemExit(f"cannot run here: {info['error']}")
    report: dict[str, Any] = dict(mode=args.mode, config=m["config"], device=args.device, dtype=args.dtype, info=info)
    report["settings"], report["timed_runs"], report["rows"] = m, rounds * m["iters"], []
    with tempfile.TemporaryDirectory(prefix="blip_heads_bench_") as tmp:
        print(f"  building the {m['config']} checkpoints (transformers, random init) ...", file=sys.stderr)
        ckpts = build_checkpoints(m["config"], tmp)
        for name, job, extra in (row for row in plan(m) if row[1] in only):
            head = "vqa" if job.startswith("vqa") else "itm"
            spec = dict(base, **{k: v for k, v in m.items() if k not in base and not k.endswith("batches")})
            spec.update(extra, job=job, ckpt=ckpts[head], warmup=m["warmup"], iters=m["iters"])
            results: dict[str, list[dict[str, Any]]] = {lib: [] for lib in LIBS}
            for r in range(rounds):  # the sides alternate: ours first in even rounds, theirs in odd ones
                for lib in LIBS if r % 2 == 0 else LIBS[::-1]:
                    results[lib].append(
                        run_job(f"{name}, {LABEL[lib]}", dict(spec, lib=lib), args.job_timeout, threads)
                    )
            row: dict[str, Any] = dict(name=name, job=job, floor_s=floor_of(job, m, extra, info))
            for lib, runs in results.items():
                ok = [x for x in runs if "error" not in x]
                row[lib] = runs[0] if not ok else dict(
                    time_s=min(x["time_s"] for x in ok),
                    times=[t for x in ok for t in x["times"]],
                    peak_mib=max(x["peak_mib"] for x in ok),
                    memory_kind=ok[0]["memory_kind"],
                )  # fmt: skip
            report["rows"].append(row)
    print("\n".join(render(report)))
    print(f"\n(total {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
