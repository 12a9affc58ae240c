"""The timed workloads, one per (library, job), each run in its own worker process (`compare.py --worker`): the
machine's floors, LoRA training steps, generation, captions ending on their own, preprocessing and the scaling
curves, for blip_peft and for transformers + peft; a worker prints its result as one tagged JSON line."""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import platform
import statistics
import time
from typing import Any

from shapes import (
    BF16_LIBS,
    CONFIGS,
    EARLY_MODES,
    EARLY_NEW_TOKENS,
    HEAP_LIBS,
    LEARNING_RATE,
    LORA,
    MAX_GRAD_NORM,
    TEXT_LORA,
    WEIGHT_DECAY,
)

RESULT_TAG = "@@BENCH-RESULT@@ "

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name substring (first match).
GPU_PEAKS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
]


# ------------------------------------------------------------------------------------------- worker helpers
def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _proc_status(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    return None


class Memory:
    """Peak memory of one phase: CUDA's allocator peak on a GPU; on the CPU the resident-set high-water mark
    (VmHWM), reset at the phase start through /proc/self/clear_refs (else the process's lifetime peak)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.startswith("cuda") else "RSS high-water"

    def current(self) -> float:
        if self.device.startswith("cuda"):
            import torch

            return torch.cuda.memory_allocated() / 2**20
        return _proc_status("VmRSS") or 0.0

    def reset(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "RSS lifetime peak"

    def peak(self) -> float:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        hwm = _proc_status("VmHWM")
        if hwm is not None and self.kind == "RSS high-water":
            return hwm
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _stat(spec: dict[str, Any], times: list[float]) -> float:
    """The reported time of several timed runs: the best (default; on a shared machine the least disturbed run)
    or the median."""
    return min(times) if spec.get("stat", "min") == "min" else statistics.median(times)


def _caption_batch(config: str, n: int, length: int, seed: int = 0):
    """Random pixels and captions of exactly `length` tokens: BOS first, [SEP] last, no padding."""
    import torch

    text, vision = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    size = vision["image_size"]
    pixel_values = torch.randn(n, 3, size, size, generator=g)
    ids = torch.randint(4, min(text["vocab_size"] - 2, 30000), (n, length), generator=g)
    ids[:, 0] = text["bos_token_id"]
    ids[:, -1] = text["sep_token_id"]
    mask = torch.ones_like(ids)
    return pixel_values, ids, mask


def _load(lib: str, ckpt: str, device: str, dtype: str, lora: bool):
    """The model on `device` in `dtype` (and LoRA-wrapped when `lora`), as each library's user would make it."""
    torch_dtype = _torch_dtype(dtype)
    if lib.startswith("ours"):
        import blip_peft as bp

        model = bp.BlipForConditionalGeneration.from_pretrained(ckpt, dtype=torch_dtype, device=device)
        if lora:
            model = bp.get_peft_model(model, bp.LoraConfig(**LORA))
        return model
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.BlipForConditionalGeneration.from_pretrained(ckpt, dtype=torch_dtype).to(device)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    return model


# A benchmark whose tensors hold more than this share of denormal floats times x86's microcode slow path, not the
# model (transformers' vision default initialiser did that to every training ratio before 2026-12).
DENORMAL_LIMIT = 1e-4


def denormal_share(tensors) -> float:
    """The share of the values in `tensors` that are float denormals (non-zero, below the smallest normal)."""
    import torch

    denormal = total = 0
    for t in tensors:
        if t is None or not t.is_floating_point():
            continue
        t = t.detach()
        tiny = torch.finfo(t.dtype).tiny
        denormal += int(((t != 0) & (t.abs() < tiny)).sum())
        total += t.numel()
    return denormal / max(total, 1)


def check_denormals(what: str, share: float) -> float:
    if share > DENORMAL_LIMIT:
        raise RuntimeError(
            f"{share:.2%} of the benchmark model's {what} are denormal floats: its timings would measure the CPU's "
            "slow path for them, not the model; build the model at a trained model's weight scale (presets.py)"
        )
    return share


def faulted_mib() -> float:
    """The memory this process has page-faulted in so far (minor faults x page size), in MiB: fresh pages the
    kernel zeroed. A step that faults gigabytes spends its time in the kernel, not in the model (glibc hands large
    freed blocks back to the system: src/freed_memory.rs)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt * resource.getpagesize() / 2**20


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_precision(lib: str, suite_dtype: str) -> str:
    return "bfloat16" if lib in BF16_LIBS else suite_dtype


def _time_native_train(
    model, spec: dict[str, Any], batch: int, length: int, warmup: int, iters: int
) -> tuple[list[float], list[float]]:
    """blip_peft.train for warmup + iters steps; per-step times (and memory page-faulted in) from the step-end
    callbacks (logging_steps=1 reads each step's loss back, which also synchronises a GPU)."""
    import blip_peft as bp

    steps = warmup + iters
    px, ids, mask = _caption_batch(spec["config"], batch * min(steps, 2), length)
    stamps: list[tuple[float, float]] = []
    bp.train(
        model,
        None,
        {"pixel_values": px, "input_ids": ids, "attention_mask": mask},
        max_steps=steps,
        batch_size=batch,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler="constant",
        max_grad_norm=MAX_GRAD_NORM,
        mixed_precision={"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[
            train_precision(spec["lib"], spec["dtype"])
        ],
        shuffle=False,
        logging_steps=1,
        progress=False,
        callback=lambda log: stamps.append((time.perf_counter(), faulted_mib())),
    )
    if len(stamps) != steps:
        raise RuntimeError(f"expected {steps} step callbacks, got {len(stamps)}")
    pairs = list(zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True))
    return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


def tutorial_loop(model, bf16: bool = False):
    """transformers + peft's tutorial loop over one fixed CPU batch, as the standalone scripts time it: returns
    `step(px, ids, mask)`, which runs the forward (under bf16 autocast if asked), loss.backward(), clipping,
    AdamW's step, zero_grad and loss.item() (labels = ids with pads -100)."""
    import contextlib

    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def step(px, ids, mask) -> float:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            out = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    return step


def _time_loop_train(
    model, spec: dict[str, Any], batch: int, length: int, warmup: int, iters: int
) -> tuple[list[float], list[float]]:
    """The transformers + peft tutorial loop: AdamW over the trainable parameters, labels = ids with pads -100,
    loss.backward(), clipping, step, zero_grad, loss.item(); batches moved to the device each step. The
    "hf_autocast" row runs the forward under torch.autocast in bf16 (the float32 model, as a torch user does it); the
    "_heap" rows are the same loops in a process whose malloc keeps freed memory (the runner sets GLIBC_TUNABLES)."""
    import contextlib

    import torch

    device, dtype = spec["device"], _torch_dtype(spec["dtype"])
    steps = warmup + iters
    n_batches = min(steps, 2)
    px, ids, mask = _caption_batch(spec["config"], batch * n_batches, length)
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    times, faults = [], []
    for step in range(steps):
        _sync(device)
        start, faulted = time.perf_counter(), faulted_mib()
        sl = slice((step % n_batches) * batch, (step % n_batches + 1) * batch)
        autocast = (
            torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
            if HEAP_LIBS.get(spec["lib"], spec["lib"]) == "hf_autocast"
            else contextlib.nullcontext()
        )
        with autocast:
            out = model(
                pixel_values=px[sl].to(device, dtype),
                input_ids=ids[sl].to(device),
                attention_mask=mask[sl].to(device),
                labels=labels[sl].to(device),
            )
        out.loss.backward()
        if step == 0:  # before the clock matters: the gradients a denormal-prone model would show first
            check_denormals("gradients", denormal_share(p.grad for p in params))
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if not math.isfinite(loss):
            raise RuntimeError(f"loss is {loss} at step {step}")
        _sync(device)
        times.append(time.perf_counter() - start)
        faults.append(faulted_mib() - faulted)
    return times[warmup:], faults[warmup:]


def _time_train(lib, model, spec, batch, length, warmup, iters) -> tuple[list[float], list[float]]:
    fn = _time_native_train if lib in ("ours", "ours_bf16") else _time_loop_train
    return fn(model, spec, batch, length, max(1, warmup), iters)


def _generate(model, px, tokens: int, beams: int):
    return model.generate(pixel_values=px, max_new_tokens=tokens, min_new_tokens=tokens, num_beams=beams)


def _time_generate(model, spec, px, tokens: int, beams: int, warmup: int, iters: int) -> tuple[list[float], int]:
    import torch

    device = spec["device"]
    out = None
    with torch.no_grad():
        for _ in range(warmup):
            _generate(model, px, tokens, beams)
        times = []
        for _ in range(iters):
            _sync(device)
            start = time.perf_counter()
            out = _generate(model, px, tokens, beams)
            _sync(device)
            times.append(time.perf_counter() - start)
    return times, int(out.shape[1]) if out is not None else -1


# ---------------------------------------------------------------------------------------------- worker jobs
def job_info(spec: dict[str, Any]) -> dict[str, Any]:
    """Versions, the device's name, and this machine's memory bandwidth (a large copy) and matmul FLOP/s."""
    import peft
    import torch
    import transformers

    import blip_peft

    device, dtype = spec["device"], _torch_dtype(spec["dtype"])
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("this suite needs CUDA, and torch.cuda.is_available() is False on this machine")
        name = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        detail = f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        # The code path and bf16 arithmetic are in the name: one CPU model is sold (and virtualised) with and
        # without AVX-512, and its results go in different RESULTS.md sections.
        bf16 = ", bf16" if blip_peft.cpu_has_bf16() else ""
        name = f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}{bf16})"
        detail = f"{torch.get_num_threads()} torch threads, {os.cpu_count()} logical CPUs"
    on_gpu = device.startswith("cuda")
    # Memory bandwidth: y.copy_(x) moves 2 x nbytes (read + write); best of several.
    nbytes = (1 << 30) if on_gpu else (256 << 20)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = math.inf
    for _ in range(10 if on_gpu else 5):
        _sync(device)
        start = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    bandwidth = 2 * nbytes / best
    del x, y
    # Matmul throughput in the suite's dtype: best of several n x n GEMMs.
    n = 8192 if on_gpu else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = math.inf
    for _ in range(20 if on_gpu else 4):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    matmul = 2 * n**3 / best
    # On a CPU suite in float32 the bf16 training rows are judged against the bf16 GEMM rate (AVX-512 BF16 / AMX
    # run it ~2x faster; without them torch emulates it, far slower than float32, and the suite runs no bf16 rows).
    matmul_bf16 = None
    if not on_gpu and spec["dtype"] == "float32" and blip_peft.cpu_has_bf16():
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        a16 @ b16
        best = math.inf
        for _ in range(4):
            start = time.perf_counter()
            a16 @ b16
            best = min(best, time.perf_counter() - start)
        matmul_bf16 = 2 * n**3 / best
    nominal = None
    if on_gpu and spec["dtype"] in ("bfloat16", "float16"):
        nominal = next((peak for key, peak in GPU_PEAKS if key in name), None)
    return dict(
        device_name=name,
        device_detail=detail,
        bandwidth=bandwidth,
        matmul_flops=matmul,
        matmul_flops_bf16=matmul_bf16,
        cpu_has_bf16=None if on_gpu else blip_peft.cpu_has_bf16(),
        matmul_n=n,
        nominal_peak=nominal,
        versions=dict(
            python=platform.python_version(),
            torch=torch.__version__,
            transformers=transformers.__version__,
            peft=peft.__version__,
            blip_peft=blip_peft.__version__,
        ),
        has_processor=hasattr(blip_peft, "BlipProcessor"),
    )


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (the platform's name elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def job_train(spec: dict[str, Any]) -> dict[str, Any]:
    lib = spec["lib"]
    model = _load(lib, spec["ckpt"], spec["device"], spec["dtype"], lora=True)
    model.train()
    weights_denormal = check_denormals("weights", denormal_share(p for _, p in model.named_parameters()))
    mem = Memory(spec["device"])
    before = mem.current()
    mem.reset()
    times, faults = _time_train(lib, model, spec, spec["batch"], spec["length"], spec["warmup"], spec["iters"])
    return dict(
        step_s=_stat(spec, times),
        step_times=times,
        # What the reported step page-faulted in (the best step's, or the median of them all with --stat median).
        step_faulted_mib=faults[times.index(min(times))]
        if spec.get("stat", "min") == "min"
        else statistics.median(faults),
        peak_mib=mem.peak(),
        before_mib=before,
        memory_kind=mem.kind,
        trainable=_trainable(model),
        denormal_weights=weights_denormal,
    )


def job_generate(spec: dict[str, Any]) -> dict[str, Any]:
    lib = spec["lib"]
    model = _load(lib, spec["ckpt"], spec["device"], spec["dtype"], lora=False)
    model.eval()
    px, _, _ = _caption_batch(spec["config"], spec["batch"], 2, seed=1)
    px = px.to(spec["device"], _torch_dtype(spec["dtype"]))
    mem = Memory(spec["device"])
    rows = []
    for beams in spec["beams"]:
        mem.reset()
        times, out_len = _time_generate(model, spec, px, spec["tokens"], beams, spec["warmup"], spec["iters"])
        rows.append(dict(beams=beams, latency_s=_stat(spec, times), times=times, peak_mib=mem.peak(), out_len=out_len))
    return dict(rows=rows, memory_kind=mem.kind)


def job_early_inputs(spec: dict[str, Any]) -> dict[str, Any]:
    """Pixel values of world images for the bundled model (transformers' processor), saved for both sides."""
    import torch
    from transformers import BlipProcessor

    import blip_peft as bp
    from blip_peft import world

    path = bp.bundled_model_path()
    processor = BlipProcessor.from_pretrained(path)
    items = world.make_dataset(spec["batch"], seed=5, domain="base", size=processor.image_processor.size["height"])
    pixel_values = processor(images=[d["image"] for d in items], return_tensors="pt")["pixel_values"]
    torch.save(pixel_values, spec["out"])
    return dict(model=path)


def job_generate_early(spec: dict[str, Any]) -> dict[str, Any]:
    """Generation where captions end on their own: the bundled trained model, no minimum length."""
    import torch

    lib = spec["lib"]
    model = _load(lib, spec["model"], spec["device"], spec["dtype"], lora=False)
    model.eval()
    px = torch.load(spec["pixels"]).to(spec["device"], _torch_dtype(spec["dtype"]))
    sep = 3  # the bundled model's [SEP]
    mem = Memory(spec["device"])
    rows = []
    for mode, kwargs in EARLY_MODES.items():
        kwargs = dict(kwargs, max_new_tokens=EARLY_NEW_TOKENS)

        def call(kwargs=kwargs):
            # The same seed on both sides: ours takes it as an argument, transformers from the global generator.
            if not kwargs.get("do_sample"):
                return model.generate(pixel_values=px, **kwargs)
            if lib.startswith("ours"):
                return model.generate(pixel_values=px, seed=0, **kwargs)
            torch.manual_seed(0)
            return model.generate(pixel_values=px, **kwargs)

        mem.reset()
        out = None
        with torch.no_grad():
            for _ in range(spec["warmup"]):
                call()
            times = []
            for _ in range(spec["iters"]):
                _sync(spec["device"])
                start = time.perf_counter()
                out = call()
                _sync(spec["device"])
                times.append(time.perf_counter() - start)
        ids = out.cpu() if out is not None else torch.zeros(0, 1, dtype=torch.long)
        # Ours says how many rows each decoder pass ran (finished rows leave the batch); transformers runs all.
        native = getattr(model, "_native", None)
        passes = native._last_generate_rows_per_step() if hasattr(native, "_last_generate_rows_per_step") else None
        hits = ids[:, 1:] == sep
        ends = [int(h.nonzero()[0]) + 1 if h.any() else ids.shape[1] for h in hits]
        rows.append(
            dict(
                mode=mode,
                latency_s=_stat(spec, times),
                times=times,
                peak_mib=mem.peak(),
                captions=int(ids.shape[0]),
                new_tokens=[min(ends) - 1, max(ends) - 1],  # the shortest and longest caption
                ids_sha1=hashlib.sha1(json.dumps(ids.tolist()).encode()).hexdigest()[:16],  # the tokens, to compare
                decoder_rows=sum(passes) if passes else None,
                all_rows=passes[0] * len(passes) if passes else None,
            )
        )
    return dict(rows=rows, memory_kind=mem.kind)


def job_preprocess(spec: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    if spec["lib"].startswith("ours"):
        import blip_peft as bp

        if not hasattr(bp, "BlipProcessor"):
            return dict(skipped="blip_peft.BlipProcessor is not available")
        processor = bp.BlipProcessor.from_pretrained(spec["processor_dir"])
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        processor = transformers.BlipProcessor.from_pretrained(spec["processor_dir"])
    paths = spec["images"]
    mem = Memory("cpu")

    def run():
        images = [Image.open(p) for p in paths]  # decoding happens inside the processor (PIL opens lazily)
        return processor(images=images, return_tensors="pt")["pixel_values"]

    for _ in range(spec["warmup"]):
        run()
    mem.reset()
    times = []
    out = None
    for _ in range(spec["iters"]):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    peak = mem.peak()
    paths_s = None
    if spec["lib"].startswith("ours"):
        # Where our processor also takes file paths (decoding them itself), time that too.
        try:
            processor(images=list(paths), return_tensors="pt")
        except Exception:  # noqa: BLE001  (paths not accepted: PIL images only)
            paths_s = None
        else:
            path_times = []
            for _ in range(spec["iters"]):
                start = time.perf_counter()
                processor(images=list(paths), return_tensors="pt")
                path_times.append(time.perf_counter() - start)
            paths_s = _stat(spec, path_times)
    return dict(
        batch_s=_stat(spec, times),
        paths_batch_s=paths_s,
        times=times,
        peak_mib=peak,
        memory_kind=mem.kind,
        shape=list(out.shape) if out is not None else None,
        mean=float(out.float().mean()) if out is not None else None,
        processor=type(processor).__name__ + "/" + type(getattr(processor, "image_processor", processor)).__name__,
    )


def job_scale(spec: dict[str, Any]) -> dict[str, Any]:
    """How cost grows: training step time vs batch and caption length, generation time vs new tokens and beams."""
    lib = spec["lib"]
    out: dict[str, list] = {"train_batch": [], "train_len": [], "gen_tokens": [], "gen_beams": []}
    model = _load(lib, spec["ckpt"], spec["device"], spec["dtype"], lora=True)
    warmup, iters = spec["warmup"], spec["iters"]

    def point(key, x, fn):
        try:
            out[key].append([x, _stat(spec, fn())])
        except Exception as e:  # noqa: BLE001  (a point that does not fit, e.g. out of memory, is left blank)
            out[key].append([x, None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"])
            gc.collect()
            if spec["device"].startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

    for b in spec["train_batches"]:
        point("train_batch", b, lambda b=b: _time_train(lib, model, spec, b, spec["length"], warmup, iters)[0])
    for n in spec["caption_lens"]:
        b = spec["caption_batch"]
        point("train_len", n, lambda n=n, b=b: _time_train(lib, model, spec, b, n, warmup, iters)[0])
    # Generation with the adapters merged away: the plain model, as for the generation table.
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    model.eval()
    px, _, _ = _caption_batch(spec["config"], spec["gen_batch"], 2, seed=1)
    px = px.to(spec["device"], _torch_dtype(spec["dtype"]))
    if spec["new_tokens"]:
        _time_generate(model, spec, px, spec["new_tokens"][-1], 1, warmup, 0)  # warm-up at the largest size
    for n in spec["new_tokens"]:
        point("gen_tokens", n, lambda n=n: _time_generate(model, spec, px, n, 1, 0, iters)[0])
    for k in spec["beams"]:
        point(
            "gen_beams", k, lambda k=k: _time_generate(model, spec, px, spec["tokens"], k, 1 if k > 1 else 0, iters)[0]
        )
    return out


def _epoch_captions(config: str, n: int, length: int) -> list[str]:
    """`n` captions of `length` tokens with the made-up tokenizer of runner.build_processor ([CLS] + words + [SEP])."""
    import random

    rng = random.Random(0)
    made_up = CONFIGS[config][0]["vocab_size"] - 2 - 130  # the tokenizer's w0, w1, ... after its specials and letters
    words = [f"w{i}" for i in range(made_up)] if made_up > 26 else [chr(c) for c in range(ord("a"), ord("z") + 1)]
    return [" ".join(rng.choice(words) for _ in range(length - 2)) for _ in range(n)]


def job_text_lora_epochs(spec: dict[str, Any]) -> dict[str, Any]:
    """The tutorial's setting, shortened: text-only LoRA (the decoder's attention and MLP) over `epochs` epochs of
    the same JPEGs, the whole run timed from the images' paths to the last step: blip_peft's `train` with its
    feature cache (lib "ours") or without it ("ours_nocache"), and transformers + peft's tutorial loop ("hf": a
    Dataset whose __getitem__ runs the processor, a shuffled DataLoader, AdamW, clipping)."""
    import torch

    lib, paths = spec["lib"], spec["images"]
    batch, epochs, length = spec["batch"], spec["epochs"], spec["length"]
    captions = _epoch_captions(spec["config"], len(paths), length)
    cache = None
    if lib.startswith("ours"):
        import blip_peft as bp

        processor = bp.BlipProcessor.from_pretrained(spec["processor_dir"])
        model = bp.BlipForConditionalGeneration.from_pretrained(spec["ckpt"], dtype=torch.float32)
        model = bp.get_peft_model(model, bp.LoraConfig(**TEXT_LORA))
        check_denormals("weights", denormal_share(p for _, p in model.named_parameters()))
        data = [{"image": p, "text": c} for p, c in zip(paths, captions, strict=True)]
        mem = Memory("cpu")
        mem.reset()
        start = time.perf_counter()
        result = bp.train(
            model, processor, data, epochs=epochs, batch_size=batch, learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY, lr_scheduler="constant", max_grad_norm=MAX_GRAD_NORM, mixed_precision="no",
            max_length=length, logging_steps=10**6, progress=False, feature_cache=lib == "ours",
        )  # fmt: skip
        total = time.perf_counter() - start
        losses = result.losses
        cache = result.feature_cache
    else:
        import peft
        import transformers
        from PIL import Image

        transformers.logging.set_verbosity_error()
        processor = transformers.BlipProcessor.from_pretrained(spec["processor_dir"])
        model = transformers.BlipForConditionalGeneration.from_pretrained(spec["ckpt"], dtype=torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(**TEXT_LORA))
        check_denormals("weights", denormal_share(p for _, p in model.named_parameters()))

        class Captions(torch.utils.data.Dataset):  # the tutorial's ImageCaptioningDataset
            def __len__(self) -> int:
                return len(paths)

            def __getitem__(self, i: int) -> dict[str, Any]:
                enc = processor(
                    images=Image.open(paths[i]), text=captions[i], padding="max_length", max_length=length,
                    truncation=True, return_tensors="pt",
                )  # fmt: skip
                return {k: v.squeeze(0) for k, v in enc.items()}

        loader = torch.utils.data.DataLoader(Captions(), shuffle=True, batch_size=batch)
        mem = Memory("cpu")
        mem.reset()
        start = time.perf_counter()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        losses = []
        for _ in range(epochs):
            for b in loader:
                labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
                out = model(
                    pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    labels=labels,
                )  # fmt: skip
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(out.loss.item())
        total = time.perf_counter() - start
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"a loss is not finite: {losses}")
    return dict(
        total_s=total, steps=len(losses), peak_mib=mem.peak(), memory_kind=mem.kind, feature_cache=cache,
        images=len(paths), batch=batch, epochs=epochs,
    )  # fmt: skip


JOBS = {
    "text_lora_epochs": job_text_lora_epochs,
    "info": job_info,
    "train": job_train,
    "generate": job_generate,
    "early_inputs": job_early_inputs,
    "generate_early": job_generate_early,
    "preprocess": job_preprocess,
    "scale": job_scale,
}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec["device"] == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import torch  # loads libtorch before blip_peft

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = JOBS[spec["job"]](spec)
    print(RESULT_TAG + json.dumps(result), flush=True)
