"""What the benchmark builds and measures: the model shapes (from blip_peft.presets), the LoRA and optimiser
settings both sides use, the suites' sizes, the sections and the implementations' labels, and the cost model
(FLOPs and bytes) of the shapes that the report's floors and MFU come from."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

PRESETS_FILE = Path(__file__).resolve().parent.parent / "python" / "blip_peft" / "presets.py"


def _load_presets() -> ModuleType:
    """This checkout's python/blip_peft/presets.py, loaded on its own: importing the package would load torch and the
    native module into every worker process, transformers' side included, and into its memory peaks (and --rerender
    needs no built package)."""
    spec = importlib.util.spec_from_file_location("_bench_presets", PRESETS_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


presets = _load_presets()

SECTIONS = ("train", "generate", "early", "preprocess", "scale", "text_lora_epochs")

# LoRA on the attention and MLP layers of both towers, as the issue specifies (the same config on both sides).
TARGET_MODULES = presets.ATTENTION_MLP_TARGETS
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGET_MODULES)
# LoRA on the decoder only (its self- and cross-attention and MLP outputs): the vision tower is frozen and has no
# randomness, so blip_peft's feature cache serves every epoch after the first (the "text_lora_epochs" section).
TEXT_TARGET_MODULES = [t for t in TARGET_MODULES if not t.startswith(("self_attn.", "mlp."))]
TEXT_LORA = dict(LORA, target_modules=TEXT_TARGET_MODULES)
LEARNING_RATE = 5e-5
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, set explicitly on our side
MAX_GRAD_NORM = 1.0  # transformers' Trainer default; the torch loops clip too

# Salesforce/blip-image-captioning-base's shapes (its config.json), and a tiny config for --suite quick; two settings
# differ from the tests' (the vision initialisation, the tiny decoder's positions): see blip_peft/presets.py.
CONFIGS = presets.BENCH_CONFIGS

LIB_LABEL = {
    "ours": "blip_peft `train()`",
    "ours_loop": "blip_peft + torch loop",
    "ours_nocache": "blip_peft `train(feature_cache=False)`",
    "ours_gen": "blip_peft",
    "ours_pre": "blip_peft",
    "ours_bf16": 'blip_peft `train(mixed_precision="bf16")`',
    "hf": "transformers + peft",
    "hf_autocast": "transformers + peft, bf16 autocast",
    "hf_heap": "transformers + peft, freed memory kept",
    "hf_autocast_heap": "transformers + peft, bf16 autocast, freed memory kept",
    "hf_gen": "transformers",
    "hf_pre": "transformers",
}

# The training rows that run at bf16 on a float32 CPU suite (the model loaded in float32 either way: ours casts its
# frozen base to bf16 and keeps float32 adapters and optimizer state, transformers + peft runs the forward under
# torch.autocast).
BF16_LIBS = ("ours_bf16", "hf_autocast", "hf_autocast_heap")

# glibc's malloc told to keep freed blocks (no mmap, no trimming), as our train() does for its duration
# (src/freed_memory.rs): the "freed memory kept" rows run transformers + peft's loop in a process started with this
# GLIBC_TUNABLES, so the page faults of fresh blocks are measured apart from the rest of the step.
KEPT_MEMORY_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=" + str(1 << 62)
HEAP_LIBS = {"hf_heap": "hf", "hf_autocast_heap": "hf_autocast"}

# Decoding settings of the "early" section: the bundled model's captions end on their own (no minimum length).
EARLY_NEW_TOKENS = 30
EARLY_MODES = {
    "greedy": dict(),
    "3 beams": dict(num_beams=3),
    "sampling, 3 per image": dict(do_sample=True, num_return_sequences=3),
}


# ------------------------------------------------------------------------------------------------------- suites
@dataclass
class Suite:
    name: str
    config: str  # "base" or "tiny"
    device: str  # "cpu" or "cuda"
    dtype: str  # "float32", "bfloat16" or "float16"
    caption_len: int = 24
    new_tokens: int = 30
    train_batches: list[int] = field(default_factory=lambda: [2])
    train_warmup: int = 1
    train_iters: int = 3
    torch_loop_row: bool = True  # also time our model inside a plain torch loop
    bf16_rows: bool = False  # a float32 CPU suite's extra rows: our bf16 mixed precision, theirs under autocast
    heap_rows: bool = False  # transformers + peft again with glibc keeping freed memory (KEPT_MEMORY_TUNABLES)
    threads: int | None = None  # torch intra-op threads (None: torch's default, all cores)
    beams: list[int] = field(default_factory=lambda: [1, 3])
    gen_plan: list[tuple[int, int, int]] = field(default_factory=list)  # (batch, warm-up calls, timed calls)
    # Captions that end on their own (the bundled trained model): (batch, warm-up calls, timed calls)
    early_plan: list[tuple[int, int, int]] = field(default_factory=lambda: [(8, 2, 10)])
    n_images: int = 64
    pre_warmup: int = 1
    pre_iters: int = 2
    scale_train_batches: list[int] = field(default_factory=list)
    scale_caption_lens: list[int] = field(default_factory=list)
    scale_caption_batch: int = 1
    scale_new_tokens: list[int] = field(default_factory=list)
    scale_beams: list[int] = field(default_factory=list)
    scale_gen_batch: int = 1
    scale_warmup: int = 1
    scale_iters: int = 1
    # The tutorial's setting, shortened: (JPEGs, batch, epochs) of text-only LoRA over the same images, whole run.
    epochs_plan: tuple[int, int, int] = (8, 4, 4)


SUITES = {
    "quick": Suite(
        name="quick",
        config="tiny",
        device="cpu",
        dtype="float32",
        threads=1,  # tiny ops: a second thread only adds barrier stalls, and those explode on a busy machine
        train_batches=[2],
        bf16_rows=True,
        train_warmup=2,
        train_iters=4,
        gen_plan=[(1, 1, 2), (8, 1, 2)],
        n_images=16,
        pre_iters=2,
        scale_train_batches=[1, 2, 4, 8],
        scale_caption_lens=[8, 24, 48],
        scale_caption_batch=2,
        scale_new_tokens=[1, 10, 30],
        scale_beams=[1, 2, 3],
        scale_iters=2,
    ),
    "cpu": Suite(
        name="cpu",
        config="base",
        device="cpu",
        dtype="float32",
        train_batches=[2, 8],
        bf16_rows=True,
        heap_rows=True,
        # glibc's malloc settles a training loop's page faults only after a few steps (transformers + peft at
        # batch 8: 34, 23, then 17 s a step); timing before that measures the kernel zeroing pages.
        train_warmup=3,
        train_iters=3,
        gen_plan=[(1, 1, 2), (8, 1, 1)],
        early_plan=[(8, 2, 10), (32, 1, 3)],
        n_images=64,
        pre_iters=2,
        scale_train_batches=[1, 2],
        scale_caption_lens=[8, 48],
        scale_caption_batch=1,
        scale_new_tokens=[1, 10, 30],
        scale_beams=[1, 3],
        scale_gen_batch=1,
        scale_warmup=1,
        scale_iters=1,
    ),
    "gpu": Suite(
        name="gpu",
        config="base",
        device="cuda",
        dtype="bfloat16",
        train_batches=[8, 32, 64],
        train_warmup=3,
        train_iters=10,
        gen_plan=[(1, 2, 5), (32, 1, 3), (128, 1, 2)],
        early_plan=[(32, 2, 5)],
        n_images=64,
        pre_iters=3,
        scale_train_batches=[8, 16, 32, 64, 128],
        scale_caption_lens=[8, 16, 24, 32, 48, 64],
        scale_caption_batch=32,
        scale_new_tokens=[1, 5, 10, 20, 30, 45, 60],
        scale_beams=[1, 2, 3, 4, 5],
        scale_gen_batch=32,
        scale_warmup=2,
        scale_iters=3,
    ),
}


# --------------------------------------------------------------------------------------------- cost model
def config_dims(config: str) -> dict[str, int]:
    text, vision = CONFIGS[config]
    n_img = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    return dict(
        dv=vision["hidden_size"],
        iv=vision["intermediate_size"],
        lv=vision["num_hidden_layers"],
        patch=vision["patch_size"],
        n_img=n_img,
        dt=text["hidden_size"],
        it=text["intermediate_size"],
        lt=text["num_hidden_layers"],
        vocab=text["vocab_size"],
    )


def vision_forward_flops(d: dict[str, int]) -> float:
    """Matmul FLOPs of the vision tower for one image (patch embedding, qkv, projection, MLP, attention)."""
    n, dv, iv = d["n_img"], d["dv"], d["iv"]
    patch = 2 * 3 * d["patch"] ** 2 * dv * (n - 1)
    layer = 2 * n * dv * 3 * dv + 2 * n * dv * dv + 2 * 2 * n * dv * iv + 4 * n * n * dv
    return patch + d["lv"] * layer


def cross_kv_flops(d: dict[str, int]) -> float:
    """The decoder's cross-attention key/value projections of one image's embeddings (all layers)."""
    return d["lt"] * 2 * 2 * d["n_img"] * d["dv"] * d["dt"]


def text_forward_flops(d: dict[str, int], length: int) -> float:
    """The decoder on a caption of `length` tokens (self- and cross-attention, FFN, LM head), cross K/V excluded."""
    n, dt, it, ell = d["n_img"], d["dt"], d["it"], length
    layer = (
        2 * ell * dt * 3 * dt  # self q, k, v
        + 3 * 2 * ell * dt * dt  # self output, cross query, cross output
        + 2 * 2 * ell * dt * it  # FFN
        + 4 * ell * ell * dt  # self-attention scores and values
        + 4 * ell * n * dt  # cross-attention scores and values
    )
    head = 2 * ell * dt * dt + 2 * ell * dt * d["vocab"]
    return d["lt"] * layer + head


def train_flops_per_sample(config: str, length: int) -> float:
    """Forward + backward to the activations (~ the forward again); LoRA weight gradients are negligible."""
    d = config_dims(config)
    forward = vision_forward_flops(d) + cross_kv_flops(d) + text_forward_flops(d, length)
    return 2.0 * forward


def decoder_step_bytes_weights(d: dict[str, int], bytes_per: int) -> float:
    """Decoder weights read once per generated token (cross K/V projections excluded: cached per image)."""
    dt, it = d["dt"], d["it"]
    layer = 6 * dt * dt + 2 * dt * it
    return (d["lt"] * layer + dt * dt + dt * d["vocab"]) * bytes_per


def generation_floor(config: str, batch: int, beams: int, tokens: int, bandwidth: float, flops: float, bpe: int):
    """A roofline lower bound on a generate() call: the vision tower and cross K/V at matmul speed, then per token
    max(bytes moved / bandwidth, FLOPs / matmul speed), where bytes = decoder weights + the KV caches read."""
    d = config_dims(config)
    rows = batch * beams
    prefill = batch * (vision_forward_flops(d) + cross_kv_flops(d)) / flops
    w = decoder_step_bytes_weights(d, bpe)
    total = prefill
    for t in range(1, tokens + 1):
        cache = (rows * d["lt"] * 2 * d["dt"] * t + batch * d["lt"] * 2 * d["dt"] * d["n_img"]) * bpe
        step_flops = rows * (text_forward_flops(d, 1) + d["lt"] * 4 * d["dt"] * t)
        total += max((w + cache) / bandwidth, step_flops / flops)
    return total
