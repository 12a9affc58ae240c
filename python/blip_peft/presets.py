"""Shape settings and LoRA target lists for tests, benchmarks, scripts and the demo: each fact written once.

The model shapes are ``text_config`` / ``vision_config`` keyword dicts for `transformers.BlipConfig` (or
`blip_peft.BlipConfig`'s ``config.json`` sections); pass a copy (``dict(TINY_TEXT)``) where it may be changed.

- `TINY_TEXT` / `TINY_VISION`: the tiny shape of most tests: every code path, in milliseconds.
- `BASE_TEXT` / `BASE_VISION`: Salesforce/blip-image-captioning-base's shapes (its config.json values).
- `BENCH_CONFIGS`: what bench/compare.py (and the other benchmarks) build: the same shapes, two settings apart.
- `BUNDLED_TEXT` / `BUNDLED_VISION`: the bundled model's shapes (scripts/make_base_model.py adds the ids and
  vocabulary size of its tokenizer).
- `VQA_BASE_TEXT` / `VQA_BASE_VISION`: Salesforce/blip-vqa-base's shapes (BlipForQuestionAnswering).
- `ITM_BASE_TEXT` / `ITM_BASE_VISION` / `ITM_BASE_TOP`: Salesforce/blip-itm-base-coco's shapes (the retrieval
  head, `BlipForImageTextRetrieval`); `ITM_BASE_TOP` holds its top-level settings (`image_text_hidden_size`).
- `ATTENTION_MLP_TARGETS`, `QUERY_VALUE_TARGETS`, `RETRIEVAL_TARGETS`: LoRA ``target_modules`` lists.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ATTENTION_MLP_TARGETS",
    "BASE_TEXT",
    "BASE_VISION",
    "BENCH_CONFIGS",
    "BUNDLED_IMAGE_SIZE",
    "BUNDLED_TEXT",
    "BUNDLED_VISION",
    "HF_DEFAULT_VISION_INITIALIZER_RANGE",
    "ITM_BASE_TEXT",
    "ITM_BASE_TOP",
    "ITM_BASE_VISION",
    "QUERY_VALUE_TARGETS",
    "RETRIEVAL_TARGETS",
    "TINY_TEXT",
    "TINY_VISION",
    "VISION_INITIALIZER_RANGE",
    "VQA_BASE_TEXT",
    "VQA_BASE_VISION",
]

# ------------------------------------------------------------------------------------------ LoRA target lists
# LoRA on the attention and MLP layers of both towers: the demo's, the benchmarks' and the notebook's choice.
ATTENTION_MLP_TARGETS = [
    "self.query",
    "self.key",
    "self.value",
    "output.dense",
    "self_attn.qkv",
    "self_attn.projection",
    "mlp.fc1",
    "mlp.fc2",
]
# Queries and values of the decoder, the vision tower's qkv: the command line's default (--target-modules), also
# examples/train_ddp.py's.
QUERY_VALUE_TARGETS = ["self.query", "self.value", "self_attn.qkv"]
# The retrieval head (BlipForImageTextRetrieval): the text encoder's attention (its self- and cross-attention,
# `text_encoder.encoder.layer.N.{attention,crossattention}.self.*`) and the vision tower's qkv; the projections
# and the matching head stay as trained.
RETRIEVAL_TARGETS = ["self.query", "self.value", "self_attn.qkv"]

# ------------------------------------------------------------------------------------- vision initialisation
# transformers' BLIP vision default (1e-10) leaves the tower's weights below float32 rounding next to its biases;
# the tests' checkpoints and the bundled model use a normal scale, so every vision weight shows in the outputs.
VISION_INITIALIZER_RANGE = 0.02
# transformers' default (BlipVisionConfig's 1e-10), the initialisation a user of `BlipForConditionalGeneration(config)`
# gets. No trained checkpoint has weights at that scale; the benchmarks used it until 2026-12 (bench/RESULTS.md's
# older tables), which made their training ratios measure denormal arithmetic.
HF_DEFAULT_VISION_INITIALIZER_RANGE = 1e-10

# ----------------------------------------------------------------------------------------------- model shapes
TINY_TEXT: dict[str, Any] = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=40,
    bos_token_id=97,
    eos_token_id=2,
    sep_token_id=3,
    pad_token_id=0,
)
TINY_VISION: dict[str, Any] = dict(
    initializer_range=VISION_INITIALIZER_RANGE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)

BASE_TEXT: dict[str, Any] = dict(
    vocab_size=30524,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=512,
    layer_norm_eps=1e-12,
    bos_token_id=30522,
    eos_token_id=2,
    sep_token_id=102,
    pad_token_id=0,
)
BASE_VISION: dict[str, Any] = dict(
    initializer_range=VISION_INITIALIZER_RANGE,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=384,
    patch_size=16,
    layer_norm_eps=1e-5,
)

# The benchmarks' shapes by --config name, at a trained model's weight scale (initializer range 0.02 in both towers,
# as the tests' checkpoints). One setting differs from the tests': the tiny decoder's positions, 80 instead of 40,
# because the quick suite trains captions of up to 48 tokens (the tests keep 40: more positions would change their
# random weights). transformers' own vision default (HF_DEFAULT_VISION_INITIALIZER_RANGE) is not used: its
# gradients fall into float32's denormal range, and the benchmark would time x86's slow path, not the model
# (bench/jobs.py refuses a model whose weights or gradients hold denormals).
BENCH_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "base": (BASE_TEXT, BASE_VISION),
    "tiny": (dict(TINY_TEXT, max_position_embeddings=80), TINY_VISION),
}

# The bundled model (blip_peft/models/blip-shapes-base, made by scripts/make_base_model.py): the architecture of
# blip-image-captioning-base at width 192, 4 + 4 layers, 128-pixel images (64 patches). Its text settings lack the
# vocabulary size and token ids: those come from its tokenizer.
BUNDLED_IMAGE_SIZE = 128
BUNDLED_TEXT: dict[str, Any] = dict(
    hidden_size=192,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=3,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    layer_norm_eps=1e-12,
)
BUNDLED_VISION: dict[str, Any] = dict(
    hidden_size=192,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=3,
    image_size=BUNDLED_IMAGE_SIZE,
    patch_size=16,
    layer_norm_eps=1e-5,
    initializer_range=VISION_INITIALIZER_RANGE,
)

# Salesforce/blip-vqa-base's shapes (BlipForQuestionAnswering: the question encoder has the decoder's text
# settings): the captioning base's towers, named for the VQA tests and benchmarks.
VQA_BASE_TEXT: dict[str, Any] = dict(BASE_TEXT)
VQA_BASE_VISION: dict[str, Any] = dict(BASE_VISION)

# Salesforce/blip-itm-base-coco (BlipForImageTextRetrieval): blip-image-captioning-base's towers (its text tower
# the encoder, same vocabulary and ids) and the 256-wide contrastive projections.
ITM_BASE_TEXT: dict[str, Any] = dict(BASE_TEXT)
ITM_BASE_VISION: dict[str, Any] = dict(BASE_VISION)
ITM_BASE_TOP: dict[str, Any] = dict(image_text_hidden_size=256)
